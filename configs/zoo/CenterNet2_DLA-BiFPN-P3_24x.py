"""CenterNet2_DLA-BiFPN-P3_24x (official configs/CenterNet2_DLA-BiFPN-P3_24x.yaml, base
Base-CenterNet2.yaml): the same network as CenterNet2_DLA-BiFPN-P3_4x (DLA-34 + the AdelaiDet
BiFPN on P3-P5, 160 channels, 4 cells, cascade on P3-P5; 512/736 test size), trained longer. The
yaml file is byte-identical to the _4x one: MODEL_ZOO.md says the 24x model repeats that 4x
schedule 6 times (from learning rate 0.01).

  python main.py --config configs/zoo/CenterNet2_DLA-BiFPN-P3_24x.py --workdir runs/dla_p3_24x \
      --mode=eval --config.weights=CenterNet2_DLA-BiFPN-P3_24x.pth --config.data.root=/data/coco
  python -m cn2_jax.convert --src CenterNet2_DLA-BiFPN-P3_24x.pth --out /ckpt/dla_p3_24x \
      --config configs/zoo/CenterNet2_DLA-BiFPN-P3_24x.py
"""

from cn2_jax.config import base_config


def get_config():
  c = base_config()  # Base-CenterNet2.yaml: CenterNet proposals + 3-stage cascade
  m = c.model
  # MODEL.BACKBONE.NAME; MODEL.FPN.IN_FEATURES dla3/dla4/dla5 (fixed by the builder); the
  # official builder ignores BIFPN.NUM_LEVELS and adds no top level: the levels are P3-P5
  m.backbone = "build_p35_fcos_dla_bifpn_backbone"
  m.bifpn.out_channels = 160  # MODEL.BIFPN.OUT_CHANNELS
  m.bifpn.num_levels = 3  # MODEL.BIFPN.NUM_LEVELS (read by nothing, as officially)
  m.bifpn.num_bifpn = 4  # MODEL.BIFPN.NUM_BIFPN
  # MODEL.DLA.NUM_LAYERS 34 (the only DLA here); MODEL.DLA.NORM. NOT EXPRESSED (training):
  # SyncBN's batch statistics; every DLA norm here is the inference affine of its running
  # statistics (modeling/backbone/dla.py), which is what SyncBN computes at test time.
  m.dla.norm = "SyncBN"
  # MODEL.CENTERNET.IN_FEATURES p3-p5 / FPN_STRIDES 8, 16, 32: every level of the backbone
  m.centernet.soi = ((0, 64), (48, 192), (128, 1000000))  # MODEL.CENTERNET.SOI
  m.centernet.post_nms_topk_test = 128  # MODEL.CENTERNET.POST_NMS_TOPK_TEST
  m.roi_heads.in_features = ("p3", "p4", "p5")  # MODEL.ROI_HEADS.IN_FEATURES
  # INPUT.FORMAT, MODEL.PIXEL_MEAN / PIXEL_STD: detectron2's defaults (BGR, std 1) = base_config()
  # NOT EXPRESSED: the ImageNet initialisation; MODEL.WEIGHTS (Base: R-50.pkl) fits no DLA key,
  # and the official DLA downloads its ImageNet DLA-34 weights itself in __init__ (dlafpn.py).
  d = c.data
  d.dataset = "coco/2017"
  d.root = "data/coco"
  d.size_divisibility = 128  # the BiFPN's size_divisibility (also for P3-P5)
  d.min_size_train = (256, 288, 320, 352, 384, 416, 448, 480, 512, 544, 576, 608)  # INPUT
  d.max_size_train = 900  # INPUT.MAX_SIZE_TRAIN
  d.min_size_test = 512  # INPUT.MIN_SIZE_TEST
  d.max_size_test = 736  # INPUT.MAX_SIZE_TEST
  o = c.optim  # SOLVER.IMS_PER_BATCH 16, BASE_LR 0.02, WARMUP 4000 / 0.00025: the defaults
  o.steps = (300000, 340000)  # SOLVER.STEPS
  o.max_iter = 360000  # SOLVER.MAX_ITER
  # NOT EXPRESSED: the 24x recipe itself (MODEL_ZOO.md): this 4x schedule run 6 times in a row,
  # each from the previous run's weights with SOLVER.BASE_LR 0.01; the yaml does not encode it.
  c.train.checkpoint_every = 100000  # SOLVER.CHECKPOINT_PERIOD
  return c
