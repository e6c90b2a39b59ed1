"""CenterNet2_R2-101-DCN-BiFPN_4x+4x_1560_ST (official
configs/CenterNet2_R2-101-DCN-BiFPN_4x+4x_1560_ST.yaml, base Base-CenterNet2.yaml): the network of
CenterNet2_R2-101-DCN-BiFPN_1280_4x (Res2Net-101 with modulated DCN in res4/res5, BiFPN P3-P7 with
288 channels and 7 cells, a DCN last bbox-tower conv, the cascade pooling from P3-P4), fine-tuned
from that model for another 4x with self-training data; trained on 1280 crops, tested on the
whole image resized to fit 1560 x 1560 (56.1 AP, the zoo's best). Unlike the _1280_4x yaml this
file has a single `INPUT:` key, so `INPUT.FORMAT: RGB` holds: RGB input.

  python main.py --config "configs/zoo/CenterNet2_R2-101-DCN-BiFPN_4x+4x_1560_ST.py" \
      --workdir runs/r2_st --mode=eval \
      --config.weights="CenterNet2_R2-101-DCN-BiFPN_4x+4x_1560_ST.pth" --config.data.root=/data/coco
  python -m cn2_jax.convert --src "CenterNet2_R2-101-DCN-BiFPN_4x+4x_1560_ST.pth" --out /ckpt/r2_st \
      --config "configs/zoo/CenterNet2_R2-101-DCN-BiFPN_4x+4x_1560_ST.py"
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
  m.input_format = "RGB"  # INPUT.FORMAT
  m.pixel_mean = (123.675, 116.280, 103.530)  # MODEL.PIXEL_MEAN
  m.pixel_std = (58.395, 57.12, 57.375)  # MODEL.PIXEL_STD
  m.centernet.use_deformable = True  # MODEL.CENTERNET.USE_DEFORMABLE
  m.roi_heads.in_features = ("p3", "p4")  # MODEL.ROI_HEADS.IN_FEATURES
  # NOT EXPRESSED: MODEL.WEIGHTS "output/r2_101.pkl" (the Res2Net-101 ImageNet weights). The
  # "4x+4x" recipe (MODEL_ZOO.md) fine-tunes the CenterNet2_R2-101-DCN-BiFPN_1280_4x model
  # instead: MODEL.WEIGHTS given on the command line, and since train_net.py would then continue
  # from that checkpoint's iteration, SOLVER.RESET_ITER True (its switch for this; the yaml leaves
  # RESET_ITER / TRAIN_ITER at False / -1). Here: init_from=<that checkpoint> starts at step 0
  # with the schedule below.
  d = c.data
  d.dataset = "coco/2017"  # DATASETS.TRAIN[0] coco_2017_train, DATASETS.TEST coco_2017_val
  d.root = "data/coco"
  # NOT EXPRESSED: DATASETS.TRAIN[1] "coco_un_yolov4_55_0.5", the self-training set: Scaled-YOLOv4
  # pseudo-labels (score > 0.5) of coco/unlabeled2017, datasets/coco/annotations/
  # yolov4_cocounlabeled_55_ann0.5.json (CenterNet2's register_distill_coco_instances), trained
  # on together with coco_2017_train (one concatenated dataset). A data.mixture coco_json entry
  # weighted by image counts would approximate it.
  d.custom_aug = "EfficientDetResizeCrop"  # INPUT.CUSTOM_AUG
  d.train_size = 1280  # INPUT.TRAIN_SIZE (INPUT.SCALE_RANGE: the default (0.1, 2.0))
  # INPUT.TEST_SIZE 1560 with TEST_INPUT_TYPE 'square': the test image is resized by
  # EfficientDetResizeCrop(1560, (1, 1)), scale = min(1560 / h, 1560 / w) (the long side becomes
  # 1560). A shortest-edge resize with min = max = 1560 has that same scale. NOT EXPRESSED: its
  # rounding, the official int(h * scale) (floor) against ResizeShortestEdge's int(h * scale + 0.5)
  # here: the short side can come out 1 px longer than officially.
  d.min_size_test = 1560
  d.max_size_test = 1560
  d.size_divisibility = 128  # the BiFPN's size_divisibility
  o = c.optim
  o.schedule = "cosine"  # SOLVER.LR_SCHEDULER_NAME: WarmupCosineLR
  o.max_iter = 180000  # SOLVER.MAX_ITER
  o.base_lr = 0.04  # SOLVER.BASE_LR for SOLVER.IMS_PER_BATCH 32
  o.reference_batch_size = 32
  c.train.batch_size = 32  # SOLVER.IMS_PER_BATCH
  c.train.checkpoint_every = 7500  # SOLVER.CHECKPOINT_PERIOD
  c.train.eval_every = 7500  # TEST.EVAL_PERIOD
  return c
