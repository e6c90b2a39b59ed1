"""CenterNet-S4_DLA_8x (official configs/CenterNet-S4_DLA_8x.yaml, base Base_S4_DLA.yaml): the
one-stage CenterNet on the stride-4 DLA-34 + DLA-up map, class heatmaps, 608/900 test size.

  python main.py --config configs/zoo/CenterNet-S4_DLA_8x.py --workdir runs/s4 --mode=eval \
      --config.weights=CenterNet-S4_DLA_8x.pth --config.data.root=/data/coco
"""

from cn2_jax.config import base_config


def get_config():
  c = base_config()
  m = c.model
  m.arch = "centernet"  # MODEL.META_ARCHITECTURE: CenterNetDetector
  m.backbone = "build_dla_backbone"  # MODEL.BACKBONE.NAME
  m.dla.norm = "BN"  # MODEL.DLA.NORM
  m.input_format = "BGR"  # INPUT.FORMAT (detectron2 default)
  m.pixel_mean = (103.530, 116.280, 123.675)  # MODEL.PIXEL_MEAN (detectron2 default, BGR)
  m.pixel_std = (57.375, 57.120, 58.395)  # MODEL.PIXEL_STD
  cd = m.centernet_detector
  cd.in_features = ("dla2",)  # MODEL.CENTERNET.IN_FEATURES (FPN_STRIDES [4])
  cd.num_cls_convs = 1  # MODEL.CENTERNET.NUM_CLS_CONVS
  cd.num_box_convs = 1  # MODEL.CENTERNET.NUM_BOX_CONVS
  cd.soi = ((0, 1000000),)  # MODEL.CENTERNET.SOI
  cd.reg_weight = 1.0  # MODEL.CENTERNET.REG_WEIGHT
  cd.more_pos = True  # MODEL.CENTERNET.MORE_POS
  cd.focal_alpha = 0.25  # MODEL.CENTERNET.HM_FOCAL_ALPHA
  d = c.data
  d.dataset = "coco/2017"
  d.root = "data/coco"
  d.min_size_test = 608  # INPUT.MIN_SIZE_TEST
  d.max_size_test = 900  # INPUT.MAX_SIZE_TEST
  d.custom_aug = "EfficientDetResizeCrop"  # INPUT.CUSTOM_AUG (Base_S4_DLA.yaml)
  d.train_size = 640  # INPUT.TRAIN_SIZE (INPUT.SCALE_RANGE: the default (0.1, 2.0))
  o = c.optim
  o.schedule = "cosine"  # SOLVER.LR_SCHEDULER_NAME: WarmupCosineLR
  o.max_iter = 90000  # SOLVER.MAX_ITER
  o.base_lr = 0.08  # SOLVER.BASE_LR for SOLVER.IMS_PER_BATCH 128
  o.reference_batch_size = 128
  c.train.batch_size = 128  # SOLVER.IMS_PER_BATCH
  c.train.eval_every = 7500  # TEST.EVAL_PERIOD (Base_S4_DLA.yaml)
  o.weight_decay = 1e-4  # SOLVER.WEIGHT_DECAY (Base_S4_DLA.yaml)
  return c
