"""CenterNet2_R2-101-DCN-BiFPN_1280_4x (official configs/CenterNet2_R2-101-DCN-BiFPN_1280_4x.yaml,
base Base-CenterNet2.yaml): Res2Net-101 with modulated DCN in res4/res5, BiFPN P3-P7 (288
channels, 7 cells), a DCN last bbox-tower conv, the cascade pooling from P3-P4.

What the official code does with this yaml is reproduced as is: the file has two top-level
`INPUT:` keys and YAML keeps only the last one, so `INPUT.FORMAT: RGB` is dropped: the model reads
BGR images normalised with the RGB-ordered ImageNet mean/std, and tests at the default 800/1333
(the "1280" is the training crop).

  python main.py --config configs/zoo/CenterNet2_R2-101-DCN-BiFPN_1280_4x.py --workdir runs/r2 \
      --mode=eval --config.weights=CenterNet2_R2-101-DCN-BiFPN_1280_4x.pth \
      --config.data.root=/data/coco
"""

from cn2_jax.config import base_config


def get_config():
  c = base_config()  # Base-CenterNet2.yaml
  m = c.model
  m.backbone = "build_res2net_bifpn_backbone"  # MODEL.BACKBONE.NAME
  m.bifpn.num_bifpn = 7  # MODEL.BIFPN.NUM_BIFPN
  m.bifpn.out_channels = 288  # MODEL.BIFPN.OUT_CHANNELS
  m.resnet_depth = 101  # MODEL.RESNETS.DEPTH
  m.resnet_width_per_group = 26  # MODEL.RESNETS.WIDTH_PER_GROUP
  m.resnet_deform_on_per_stage = (False, False, True, True)  # MODEL.RESNETS.DEFORM_ON_PER_STAGE
  m.resnet_deform_modulated = True  # MODEL.RESNETS.DEFORM_MODULATED
  m.pixel_mean = (123.675, 116.280, 103.530)  # MODEL.PIXEL_MEAN
  m.pixel_std = (58.395, 57.12, 57.375)  # MODEL.PIXEL_STD
  m.input_format = "BGR"  # INPUT.FORMAT: the yaml's RGB is lost (see the docstring)
  m.centernet.use_deformable = True  # MODEL.CENTERNET.USE_DEFORMABLE
  m.roi_heads.in_features = ("p3", "p4")  # MODEL.ROI_HEADS.IN_FEATURES
  d = c.data
  d.dataset = "coco/2017"
  d.root = "data/coco"
  d.size_divisibility = 128  # the BiFPN's size_divisibility
  d.custom_aug = "EfficientDetResizeCrop"  # INPUT.CUSTOM_AUG (the yaml's second INPUT: key)
  d.train_size = 1280  # INPUT.TRAIN_SIZE (INPUT.SCALE_RANGE: the default (0.1, 2.0))
  o = c.optim
  o.schedule = "cosine"  # SOLVER.LR_SCHEDULER_NAME: WarmupCosineLR
  o.max_iter = 180000  # SOLVER.MAX_ITER
  o.base_lr = 0.04  # SOLVER.BASE_LR for SOLVER.IMS_PER_BATCH 32
  o.reference_batch_size = 32
  c.train.batch_size = 32  # SOLVER.IMS_PER_BATCH
  c.train.checkpoint_every = 60000  # SOLVER.CHECKPOINT_PERIOD
  c.train.eval_every = 7500  # TEST.EVAL_PERIOD
  return c
