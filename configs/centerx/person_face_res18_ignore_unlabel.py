"""centerX `yamls/person_face/person_face_res18_ignore_unlabel.yaml` (CPFLAME/centerX): Person + face
from CrowdHuman (persons only) and WIDER Face (faces only) with LOSS.IGNORE_UNLABEL, resdcn18, 140
epochs: 29.1 AP CrowdHuman / 24.2 AP WIDER (README 'multi teacher KD' second table, row 5).

  python main.py --config configs/centerx/person_face_res18_ignore_unlabel.py:/data/CrowdHuman,/data/WIDER \
      --workdir runs/person_face_res18_ignore_unlabel \
      --config.init_from=resnet18-5c106cde.pth

Every field below names the yaml key it comes from (or the centerX / detectron2 default the yaml
leaves in place); docs/onestage.md §7 lists all recipes and the departures. The config argument
(after ':') is "CROWDHUMAN_ROOT,WIDER_ROOT" (configs/centerx/__init__.py `person_face_data`).
"""

from cn2_jax.config import base_config
from configs.centerx import person_face_data


def get_config(arg: str = ""):
  c = base_config()
  person_face_data(
      c, arg
  )  # person_face_res18_ignore_unlabel.yaml DATASETS.TRAIN ("crowd_human_face_train", "widerface_crowdhuman_train")
  # person_face_res18_ignore_unlabel.yaml MODEL.META_ARCHITECTURE "CenterNet"
  c.model.arch = "onestage"
  # person_face_res18_ignore_unlabel.yaml MODEL.BACKBONE.DEPTH (NAME "build_resnet")
  c.model.resnet_depth = 18
  c.model.num_classes = 2  # person_face_res18_ignore_unlabel.yaml MODEL.CENTERNET.NUM_CLASSES
  c.model.onestage.sync_bn = False  # person_face_res18_ignore_unlabel.yaml MODEL.BN_TYPE "BN"
  c.model.onestage.input_format = "RGB"  # person_face_res18_ignore_unlabel.yaml INPUT.FORMAT "RGB"
  # person_face_res18_ignore_unlabel.yaml MODEL.PIXEL_MEAN
  c.model.onestage.pixel_mean = (0.485, 0.456, 0.406)
  # person_face_res18_ignore_unlabel.yaml MODEL.PIXEL_STD
  c.model.onestage.pixel_std = (0.229, 0.224, 0.225)
  # person_face_res18_ignore_unlabel.yaml MODEL.CENTERNET.DECONV_CHANNEL [512, 256, 128, 64] (the
  # first is the C5 width)
  c.model.onestage.deconv_channels = (256, 128, 64)
  # person_face_res18_ignore_unlabel.yaml MODEL.CENTERNET.DECONV_KERNEL
  c.model.onestage.deconv_kernels = (4, 4, 4)
  # person_face_res18_ignore_unlabel.yaml MODEL.CENTERNET.USE_DEFORM
  c.model.onestage.use_deform = True
  # person_face_res18_ignore_unlabel.yaml MODEL.CENTERNET.MODULATE_DEFORM
  c.model.onestage.modulate_deform = True
  # person_face_res18_ignore_unlabel.yaml MODEL.CENTERNET.BIAS_VALUE
  c.model.onestage.bias_value = -2.19
  # person_face_res18_ignore_unlabel.yaml MODEL.CENTERNET.DOWN_SCALE
  c.model.onestage.down_scale = 4
  # person_face_res18_ignore_unlabel.yaml MODEL.CENTERNET.MIN_OVERLAP
  c.model.onestage.min_overlap = 0.3
  # person_face_res18_ignore_unlabel.yaml MODEL.CENTERNET.TENSOR_DIM
  c.model.onestage.tensor_dim = 128
  c.model.onestage.cls_weight = 1.0  # centerX configs/config.py default LOSS.CLS_WEIGHT
  # centerX configs/config.py default LOSS.WH_WEIGHT (not set in the yaml)
  c.model.onestage.wh_weight = 0.1
  c.model.onestage.reg_weight = 1.0  # centerX configs/config.py default LOSS.REG_WEIGHT
  # centerX configs/config.py default LOSS.NORM_WH False (not set in the yaml)
  c.model.onestage.norm_wh = ""
  c.data.max_boxes = 128  # project: GT boxes kept per image = TENSOR_DIM
  c.data.min_size_train = (384,)  # person_face_res18_ignore_unlabel.yaml INPUT.MIN_SIZE_TRAIN
  c.data.max_size_train = 640  # person_face_res18_ignore_unlabel.yaml INPUT.MAX_SIZE_TRAIN
  c.data.min_size_test = 384  # person_face_res18_ignore_unlabel.yaml INPUT.MIN_SIZE_TEST
  c.data.max_size_test = 640  # person_face_res18_ignore_unlabel.yaml INPUT.MAX_SIZE_TEST
  # person_face_res18_ignore_unlabel.yaml INPUT.CROP ENABLED True, TYPE "relative_range", SIZE [0.6,
  # 0.6]
  c.data.crop_relative_range = (0.6, 0.6)
  c.data.flip = True  # centerX configs/config.py default TRAIN_PIPELINES RandomFlip
  # centerX configs/config.py default TRAIN_PIPELINES RandomBrightness / Contrast / Saturation,
  # RandomLighting
  c.data.color_aug = "centerx"
  # centerX configs/config.py default TRAIN_PIPELINES intensity 0.6 to 1.4
  c.data.color_aug_range = (0.6, 1.4)
  # centerX configs/config.py default TRAIN_PIPELINES RandomLighting scale
  c.data.color_aug_lighting = 0.1
  c.optim.optimizer = "adam"  # person_face_res18_ignore_unlabel.yaml SOLVER.OPTIM_NAME "Adam"
  c.optim.base_lr = 2.5e-05  # person_face_res18_ignore_unlabel.yaml SOLVER.BASE_LR
  # person_face_res18_ignore_unlabel.yaml SOLVER.IMS_PER_BATCH (the LR's batch)
  c.optim.reference_batch_size = 64
  # person_face_res18_ignore_unlabel.yaml SOLVER.MAX_ITER (epochs in centerX)
  c.optim.epochs = 140.0
  # person_face_res18_ignore_unlabel.yaml SOLVER.WARMUP_ITERS (epochs; factor 1 / WARMUP_ITERS)
  c.optim.warmup_iters = 1
  # person_face_res18_ignore_unlabel.yaml SOLVER.LR_SCHEDULER_NAME "WarmupCosineAnnealingLR"
  c.optim.schedule = "warmup_cosine_annealing"
  c.optim.cosine_decay_iter = 0.6  # person_face_res18_ignore_unlabel.yaml SOLVER.COSINE_DECAY_ITER
  c.optim.min_lr = 1e-08  # centerX configs/config.py default SOLVER.MIN_LR
  # person_face_res18_ignore_unlabel.yaml SOLVER.STEPS (not read by the cosine schedule)
  c.optim.steps = (50, 62)
  c.optim.gamma = 0.1  # detectron2 default SOLVER.GAMMA
  c.optim.momentum = 0.9  # detectron2 default SOLVER.MOMENTUM
  c.optim.weight_decay = 0.0001  # detectron2 default SOLVER.WEIGHT_DECAY
  c.optim.weight_decay_norm = 0.0  # detectron2 default SOLVER.WEIGHT_DECAY_NORM
  # person_face_res18_ignore_unlabel.yaml SOLVER.CLIP_GRADIENTS ENABLED True, CLIP_VALUE 0.6,
  # CLIP_TYPE "value" (detectron2 default)
  c.optim.clip_value = 0.6
  c.optim.clip_norm = 0.0  # detectron2 CLIP_GRADIENTS, CLIP_TYPE value: no norm clip (default)
  c.optim.skip_loss_factor = 0.0  # centerX configs/config.py default LOSS.SKIP_LOSS False
  # person_face_res18_ignore_unlabel.yaml SOLVER.IMS_PER_BATCH (global batch, 4 GPUs x 16)
  c.train.batch_size = 64
  c.train.eval_batch_size = 16  # project (test batch; centerX evaluates per GPU)
  # person_face_res18_ignore_unlabel.yaml MODEL.CENTERNET.LOSS.IGNORE_UNLABEL
  c.model.onestage.ignore_unlabel = True
  return c
