"""CenterNet2_DLA-BiFPN-P5_640_16x_ST (official configs/CenterNet2_DLA-BiFPN-P5_640_16x_ST.yaml,
base Base-CenterNet2.yaml): the network of CenterNet2_DLA-BiFPN-P5_640_16x (DLA-34 + the
EfficientDet BiFPN P3-P7, 160 channels, 3 cells; RGB input, 608/900 test size) trained with
self-training data (Scaled-YOLOv4 pseudo-labels on the COCO unlabeled images, score > 0.5;
MODEL_ZOO.md lists it as CenterNet2_DLA-BiFPN-P5_640_24x_ST). Training: EfficientDet
resize-and-crop at 640, 360k iterations at 64 images, cosine LR.

  python main.py --config configs/zoo/CenterNet2_DLA-BiFPN-P5_640_16x_ST.py --workdir runs/dla_st \
      --mode=eval --config.weights=CenterNet2_DLA-BiFPN-P5_640_16x_ST.pth \
      --config.data.root=/data/coco
  python -m cn2_jax.convert --src CenterNet2_DLA-BiFPN-P5_640_16x_ST.pth --out /ckpt/dla_st \
      --config configs/zoo/CenterNet2_DLA-BiFPN-P5_640_16x_ST.py
"""

from cn2_jax.config import base_config


def get_config():
  c = base_config()  # Base-CenterNet2.yaml: CenterNet proposals + 3-stage cascade
  m = c.model
  m.backbone = "build_p37_dla_bifpn_backbone"  # MODEL.BACKBONE.NAME (FPN.IN_FEATURES dla3-dla5)
  m.bifpn.out_channels = 160  # MODEL.BIFPN.OUT_CHANNELS
  m.bifpn.num_levels = 5  # MODEL.BIFPN.NUM_LEVELS
  m.bifpn.num_bifpn = 3  # MODEL.BIFPN.NUM_BIFPN
  # MODEL.DLA.NORM (centernet/config.py default). NOT EXPRESSED (training): BN batch statistics;
  # every DLA norm here is the inference affine of its running statistics (backbone/dla.py).
  m.dla.norm = "BN"
  m.centernet.post_nms_topk_test = 128  # MODEL.CENTERNET.POST_NMS_TOPK_TEST
  m.input_format = "RGB"  # INPUT.FORMAT
  m.pixel_mean = (123.675, 116.280, 103.530)  # MODEL.PIXEL_MEAN (RGB)
  m.pixel_std = (58.395, 57.12, 57.375)  # MODEL.PIXEL_STD (RGB)
  d = c.data
  d.dataset = "coco/2017"  # DATASETS.TRAIN[0] coco_2017_train, DATASETS.TEST coco_2017_val
  d.root = "data/coco"
  # NOT EXPRESSED: DATASETS.TRAIN[1] "coco_un_yolov4_55_0.5", the self-training set: Scaled-YOLOv4
  # pseudo-labels (score > 0.5) of coco/unlabeled2017, datasets/coco/annotations/
  # yolov4_cocounlabeled_55_ann0.5.json (CenterNet2's register_distill_coco_instances), trained
  # on together with coco_2017_train (one concatenated dataset). A data.mixture coco_json entry
  # weighted by image counts would approximate it.
  d.custom_aug = "EfficientDetResizeCrop"  # INPUT.CUSTOM_AUG
  d.train_size = 640  # INPUT.TRAIN_SIZE (INPUT.SCALE_RANGE: the default (0.1, 2.0))
  d.min_size_test = 608  # INPUT.MIN_SIZE_TEST
  d.max_size_test = 900  # INPUT.MAX_SIZE_TEST
  d.size_divisibility = 128  # the BiFPN's size_divisibility (P7 must tile the canvas)
  o = c.optim
  o.schedule = "cosine"  # SOLVER.LR_SCHEDULER_NAME: WarmupCosineLR
  o.max_iter = 360000  # SOLVER.MAX_ITER
  o.base_lr = 0.08  # SOLVER.BASE_LR for SOLVER.IMS_PER_BATCH 64
  o.reference_batch_size = 64
  c.train.batch_size = 64  # SOLVER.IMS_PER_BATCH
  c.train.eval_every = 7500  # TEST.EVAL_PERIOD
  return c
