"""nuImages_CenterNet2_DLA_640_8x (official configs/nuImages_CenterNet2_DLA_640_8x.yaml, base
Base-CenterNet2.yaml): CenterNet2 with instance masks on nuImages (10 classes): the stride-4
DLA-34 + DLA-up map `dla2` (64 channels; `build_dla_backbone`, as CenterNet-S4_DLA_8x), a
1-conv CenterNet proposal head on that single level, the 3-stage cascade pooling from `dla2`, and
a Mask R-CNN mask head (4 convs, 14x14 pooling, bitmask targets); RGB input, 608/900 test size;
EfficientDet resize-and-crop at 640, 180k iterations at 64 images.

NOT RUNNABLE YET: the CenterNet2 family (modeling/meta_arch/centernet2.py) expects the backbone to
return a list of levels named p3, p4, ... (`roi_heads.in_features` are parsed as p<level>), while
build_dla_backbone returns {"dla2": map} at stride 4; and the mask head is not part of this
project (MODEL.MASK_ON). The settings below are those of the yaml, for when the family takes them
(tests/test_zoo_configs.py marks this config as an expected failure, naming both gaps).

  python main.py --config configs/zoo/nuImages_CenterNet2_DLA_640_8x.py --workdir runs/nuimages \
      --mode=eval --config.weights=nuImages_CenterNet2_DLA_640_8x.pth \
      --config.data.root=/data/datasets/nuimages
  python -m cn2_jax.convert --src nuImages_CenterNet2_DLA_640_8x.pth --out /ckpt/nuimages \
      --config configs/zoo/nuImages_CenterNet2_DLA_640_8x.py
"""

from cn2_jax.config import base_config


def get_config():
  c = base_config()  # Base-CenterNet2.yaml: CenterNet proposals + 3-stage cascade
  m = c.model
  m.num_classes = 10  # MODEL.ROI_HEADS.NUM_CLASSES
  m.backbone = "build_dla_backbone"  # MODEL.BACKBONE.NAME (MODEL.DLA.OUT_FEATURES ["dla2"])
  # MODEL.DLA.NORM. NOT EXPRESSED (training): BN batch statistics; every DLA norm here is the
  # inference affine of its running statistics (modeling/backbone/dla.py).
  m.dla.norm = "BN"
  cn = m.centernet
  # MODEL.CENTERNET.IN_FEATURES ["dla2"] / FPN_STRIDES [4]: the backbone's single level
  cn.soi = ((0, 1000000),)  # MODEL.CENTERNET.SOI
  cn.num_convs = 1  # MODEL.CENTERNET.NUM_BOX_CONVS (NUM_CLS_CONVS 1: no cls tower, proposal-only)
  cn.post_nms_topk_test = 128  # MODEL.CENTERNET.POST_NMS_TOPK_TEST
  # MODEL.CENTERNET.REG_WEIGHT 1, HM_FOCAL_ALPHA 0.25: the base_config() values.
  # NOT EXPRESSED: MODEL.CENTERNET.MORE_POS True (extra heatmap positives where the regression
  # loss is small within the centre 3x3; training targets only).
  m.roi_heads.in_features = ("dla2",)  # MODEL.ROI_HEADS.IN_FEATURES
  # NOT EXPRESSED: MODEL.MASK_ON True with ROI_MASK_HEAD MaskRCNNConvUpsampleHead (NUM_CONV 4,
  # POOLER_RESOLUTION 14) and INPUT.MASK_FORMAT bitmask: no mask head in this project.
  m.input_format = "RGB"  # INPUT.FORMAT
  m.pixel_mean = (123.675, 116.280, 103.530)  # MODEL.PIXEL_MEAN (RGB)
  m.pixel_std = (58.395, 57.12, 57.375)  # MODEL.PIXEL_STD (RGB)
  d = c.data
  # DATASETS nuimages_train / nuimages_val (centernet/data/datasets/nuimages.py): COCO-format
  # jsons; no nuImages dataset kind exists here, so the generic coco_json kind reads them
  d.dataset = "coco_json"
  d.root = "datasets/nuimages"  # the official image root
  d.train_json = "annotations/nuimages_v1.0-train.json"
  d.val_json = "annotations/nuimages_v1.0-val.json"
  d.custom_aug = "EfficientDetResizeCrop"  # INPUT.CUSTOM_AUG
  d.train_size = 640  # INPUT.TRAIN_SIZE (INPUT.SCALE_RANGE: the default (0.1, 2.0))
  d.min_size_test = 608  # INPUT.MIN_SIZE_TEST
  d.max_size_test = 900  # INPUT.MAX_SIZE_TEST
  o = c.optim  # SOLVER.LR_SCHEDULER_NAME: the default WarmupMultiStepLR
  o.steps = (120000, 160000)  # SOLVER.STEPS
  o.max_iter = 180000  # SOLVER.MAX_ITER
  o.base_lr = 0.08  # SOLVER.BASE_LR for SOLVER.IMS_PER_BATCH 64
  o.reference_batch_size = 64
  c.train.batch_size = 64  # SOLVER.IMS_PER_BATCH
  return c
