"""CenterNet2_DLA-BiFPN-P5_640_16x (official configs/CenterNet2_DLA-BiFPN-P5_640_16x.yaml, base
Base-CenterNet2.yaml): the real-time model, DLA-34 + BiFPN P3-P7 (160 channels, 3 cells), 608/900
test size, RGB input. The _ST variant is the same network trained with self-training data.

  python main.py --config configs/zoo/CenterNet2_DLA-BiFPN-P5_640_16x.py --workdir runs/dla \
      --mode=eval --config.weights=CenterNet2_DLA-BiFPN-P5_640_16x.pth --config.data.root=/data/coco
"""

from cn2_jax.config import base_config


def get_config():
  c = base_config()  # Base-CenterNet2.yaml: CenterNet proposals + 3-stage cascade
  m = c.model
  m.backbone = "build_p37_dla_bifpn_backbone"  # MODEL.BACKBONE.NAME
  m.bifpn.out_channels = 160  # MODEL.BIFPN.OUT_CHANNELS
  m.bifpn.num_levels = 5  # MODEL.BIFPN.NUM_LEVELS
  m.bifpn.num_bifpn = 3  # MODEL.BIFPN.NUM_BIFPN
  m.dla.norm = "BN"  # MODEL.DLA.NORM (centernet/config.py default)
  m.centernet.post_nms_topk_test = 128  # MODEL.CENTERNET.POST_NMS_TOPK_TEST
  m.input_format = "RGB"  # INPUT.FORMAT
  m.pixel_mean = (123.675, 116.280, 103.530)  # MODEL.PIXEL_MEAN (RGB)
  m.pixel_std = (58.395, 57.12, 57.375)  # MODEL.PIXEL_STD (RGB)
  d = c.data
  d.dataset = "coco/2017"
  d.root = "data/coco"
  d.min_size_test = 608  # INPUT.MIN_SIZE_TEST
  d.max_size_test = 900  # INPUT.MAX_SIZE_TEST
  d.size_divisibility = 128  # the BiFPN's size_divisibility (P7 must tile the canvas)
  d.custom_aug = "EfficientDetResizeCrop"  # INPUT.CUSTOM_AUG
  d.train_size = 640  # INPUT.TRAIN_SIZE (INPUT.SCALE_RANGE: the default (0.1, 2.0))
  o = c.optim
  o.schedule = "cosine"  # SOLVER.LR_SCHEDULER_NAME: WarmupCosineLR
  o.max_iter = 360000  # SOLVER.MAX_ITER
  o.base_lr = 0.08  # SOLVER.BASE_LR for SOLVER.IMS_PER_BATCH 64
  o.reference_batch_size = 64
  c.train.batch_size = 64  # SOLVER.IMS_PER_BATCH
  c.train.checkpoint_every = 90000  # SOLVER.CHECKPOINT_PERIOD
  c.train.eval_every = 7500  # TEST.EVAL_PERIOD
  return c
