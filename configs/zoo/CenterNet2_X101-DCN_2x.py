"""CenterNet2_X101-DCN_2x (official configs/CenterNet2_X101-DCN_2x.yaml, base Base-CenterNet2.yaml):
ResNeXt-101 32x8d with modulated DCN in res4/res5, FPN P3-P7, a DCN last bbox-tower conv, the
cascade pooling from P3-P4 only; 800/1333 test size.

  python main.py --config configs/zoo/CenterNet2_X101-DCN_2x.py --workdir runs/x101 --mode=eval \
      --config.weights=CenterNet2_X101-DCN_2x.pth --config.data.root=/data/coco
"""

from cn2_jax.config import base_config


def get_config():
  c = base_config()  # Base-CenterNet2.yaml
  m = c.model
  m.resnet_depth = 101  # MODEL.RESNETS.DEPTH
  m.stride_in_1x1 = False  # MODEL.RESNETS.STRIDE_IN_1X1 (FAIR ImageNet weights)
  m.resnet_num_groups = 32  # MODEL.RESNETS.NUM_GROUPS
  m.resnet_width_per_group = 8  # MODEL.RESNETS.WIDTH_PER_GROUP
  m.resnet_deform_on_per_stage = (False, False, True, True)  # MODEL.RESNETS.DEFORM_ON_PER_STAGE
  m.resnet_deform_modulated = True  # MODEL.RESNETS.DEFORM_MODULATED
  m.pixel_std = (57.375, 57.120, 58.395)  # MODEL.PIXEL_STD (BGR)
  m.centernet.use_deformable = True  # MODEL.CENTERNET.USE_DEFORMABLE
  m.roi_heads.in_features = ("p3", "p4")  # MODEL.ROI_HEADS.IN_FEATURES
  c.data.dataset = "coco/2017"
  c.data.root = "data/coco"
  # INPUT.MIN_SIZE_TRAIN (480, 960) with MIN_SIZE_TRAIN_SAMPLING "range": every short side in
  # [480, 960] (here the multiples of 32 of that range; the data pipeline draws from a list)
  c.data.min_size_train = tuple(range(480, 961, 32))
  o = c.optim
  o.steps = (120000, 160000)  # SOLVER.STEPS
  o.max_iter = 180000  # SOLVER.MAX_ITER
  c.train.checkpoint_every = 40000  # SOLVER.CHECKPOINT_PERIOD
  return c
