"""CenterNet2_R2-101-DCN_896_4x (official configs/CenterNet2_R2-101-DCN_896_4x.yaml, base
Base-CenterNet2.yaml): Res2Net-101 (26w x 4s) with modulated DCN in res4/res5 + FPN P3-P7 (256
channels), a DCN last bbox-tower conv, the 3-stage cascade pooling from P3-P4; trained with
EfficientDet resize-and-crop at 896, 180k iterations at 32 images, cosine LR; 800/1333 test size.

What the official code does with this yaml is reproduced as is: like
CenterNet2_R2-101-DCN-BiFPN_1280_4x.yaml the file has two top-level `INPUT:` keys and YAML keeps
only the last one, so `INPUT.FORMAT: RGB` is dropped: the model reads BGR images normalised with
the RGB-ordered ImageNet mean/std.

  python main.py --config configs/zoo/CenterNet2_R2-101-DCN_896_4x.py --workdir runs/r2_fpn \
      --mode=eval --config.weights=CenterNet2_R2-101-DCN_896_4x.pth --config.data.root=/data/coco
  python -m cn2_jax.convert --src CenterNet2_R2-101-DCN_896_4x.pth --out /ckpt/r2_fpn \
      --config configs/zoo/CenterNet2_R2-101-DCN_896_4x.py
"""

from cn2_jax.config import base_config


def get_config():
  c = base_config()  # Base-CenterNet2.yaml
  m = c.model
  m.backbone = "build_p67_res2net_fpn_backbone"  # MODEL.BACKBONE.NAME
  m.resnet_depth = 101  # MODEL.RESNETS.DEPTH
  m.resnet_width_per_group = 26  # MODEL.RESNETS.WIDTH_PER_GROUP
  m.resnet_deform_on_per_stage = (False, False, True, True)  # MODEL.RESNETS.DEFORM_ON_PER_STAGE
  m.resnet_deform_modulated = True  # MODEL.RESNETS.DEFORM_MODULATED
  m.pixel_mean = (123.675, 116.280, 103.530)  # MODEL.PIXEL_MEAN
  m.pixel_std = (58.395, 57.12, 57.375)  # MODEL.PIXEL_STD
  m.input_format = "BGR"  # INPUT.FORMAT: the yaml's RGB is lost (see the docstring)
  m.centernet.use_deformable = True  # MODEL.CENTERNET.USE_DEFORMABLE
  m.roi_heads.in_features = ("p3", "p4")  # MODEL.ROI_HEADS.IN_FEATURES
  # NOT EXPRESSED: MODEL.WEIGHTS "output/r2_101.pkl", the Res2Net-101 ImageNet initialisation.
  d = c.data
  d.dataset = "coco/2017"
  d.root = "data/coco"
  d.custom_aug = "EfficientDetResizeCrop"  # INPUT.CUSTOM_AUG
  d.train_size = 896  # INPUT.TRAIN_SIZE (INPUT.SCALE_RANGE: the default (0.1, 2.0))
  o = c.optim
  o.schedule = "cosine"  # SOLVER.LR_SCHEDULER_NAME: WarmupCosineLR
  o.max_iter = 180000  # SOLVER.MAX_ITER
  o.base_lr = 0.04  # SOLVER.BASE_LR for SOLVER.IMS_PER_BATCH 32
  o.reference_batch_size = 32
  c.train.batch_size = 32  # SOLVER.IMS_PER_BATCH
  c.train.checkpoint_every = 600000  # SOLVER.CHECKPOINT_PERIOD (beyond MAX_ITER: the last only)
  c.train.eval_every = 7500  # TEST.EVAL_PERIOD
  return c
