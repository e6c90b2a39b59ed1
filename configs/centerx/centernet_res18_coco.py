"""centerX `yamls/coco/centernet_res18_coco.yaml` (CPFLAME/centerX): COCO, R18, 140 epochs: 30.2 AP
(README 'coco' table).

  python main.py --config configs/centerx/centernet_res18_coco.py \
      --workdir runs/centernet_res18_coco --config.data.root=/data/coco \
      --config.init_from=resnet18-5c106cde.pth

Every field below names the yaml key it comes from (or the centerX / detectron2 default the yaml
leaves in place); docs/onestage.md §7 lists all recipes and the departures.
"""

from cn2_jax.config import base_config


def get_config():
  c = base_config()
  c.model.arch = "onestage"  # centernet_res18_coco.yaml MODEL.META_ARCHITECTURE "CenterNet"
  c.model.resnet_depth = 18  # centernet_res18_coco.yaml MODEL.BACKBONE.DEPTH (NAME "build_resnet")
  c.model.num_classes = 80  # centernet_res18_coco.yaml MODEL.CENTERNET.NUM_CLASSES
  c.model.onestage.sync_bn = False  # centernet_res18_coco.yaml MODEL.BN_TYPE "BN"
  c.model.onestage.input_format = "RGB"  # centernet_res18_coco.yaml INPUT.FORMAT "RGB"
  c.model.onestage.pixel_mean = (0.485, 0.456, 0.406)  # centernet_res18_coco.yaml MODEL.PIXEL_MEAN
  c.model.onestage.pixel_std = (0.229, 0.224, 0.225)  # centernet_res18_coco.yaml MODEL.PIXEL_STD
  # centernet_res18_coco.yaml MODEL.CENTERNET.DECONV_CHANNEL [512, 256, 128, 64] (the first is the
  # C5 width)
  c.model.onestage.deconv_channels = (256, 128, 64)
  # centernet_res18_coco.yaml MODEL.CENTERNET.DECONV_KERNEL
  c.model.onestage.deconv_kernels = (4, 4, 4)
  # centerX configs/config.py default MODEL.CENTERNET.USE_DEFORM (the yaml leaves it)
  c.model.onestage.use_deform = True
  # centernet_res18_coco.yaml MODEL.CENTERNET.MODULATE_DEFORM
  c.model.onestage.modulate_deform = True
  c.model.onestage.bias_value = -2.19  # centernet_res18_coco.yaml MODEL.CENTERNET.BIAS_VALUE
  c.model.onestage.down_scale = 4  # centernet_res18_coco.yaml MODEL.CENTERNET.DOWN_SCALE
  c.model.onestage.min_overlap = 0.3  # centernet_res18_coco.yaml MODEL.CENTERNET.MIN_OVERLAP
  c.model.onestage.tensor_dim = 128  # centernet_res18_coco.yaml MODEL.CENTERNET.TENSOR_DIM
  c.model.onestage.cls_weight = 1.0  # centerX configs/config.py default LOSS.CLS_WEIGHT
  # centerX configs/config.py default LOSS.WH_WEIGHT (not set in the yaml)
  c.model.onestage.wh_weight = 0.1
  c.model.onestage.reg_weight = 1.0  # centerX configs/config.py default LOSS.REG_WEIGHT
  # centerX configs/config.py default LOSS.NORM_WH False (not set in the yaml)
  c.model.onestage.norm_wh = ""
  # centernet_res18_coco.yaml DATASETS.TRAIN ("coco_2017_train",), TEST ("coco_2017_val",)
  c.data.dataset = "coco/2017"
  c.data.max_boxes = 128  # project: GT boxes kept per image = TENSOR_DIM
  c.data.min_size_train = (384, 448, 512)  # centernet_res18_coco.yaml INPUT.MIN_SIZE_TRAIN
  c.data.max_size_train = 512  # centernet_res18_coco.yaml INPUT.MAX_SIZE_TRAIN
  c.data.min_size_test = 0  # centernet_res18_coco.yaml INPUT.MIN_SIZE_TEST
  # centernet_res18_coco.yaml INPUT.MIN_SIZE_TEST 0 makes the test resize a NoOp: no limit (original
  # size)
  c.data.max_size_test = 100000
  # centernet_res18_coco.yaml INPUT.CROP ENABLED True, TYPE "relative_range", SIZE [0.6, 0.6]
  c.data.crop_relative_range = (0.6, 0.6)
  c.data.flip = True  # centerX configs/config.py default TRAIN_PIPELINES RandomFlip
  # centerX configs/config.py default TRAIN_PIPELINES RandomBrightness / Contrast / Saturation,
  # RandomLighting
  c.data.color_aug = "centerx"
  # centerX configs/config.py default TRAIN_PIPELINES intensity 0.6 to 1.4
  c.data.color_aug_range = (0.6, 1.4)
  # centerX configs/config.py default TRAIN_PIPELINES RandomLighting scale
  c.data.color_aug_lighting = 0.1
  c.optim.optimizer = "sgd"  # centernet_res18_coco.yaml SOLVER.OPTIM_NAME "SGD"
  c.optim.base_lr = 0.02  # centernet_res18_coco.yaml SOLVER.BASE_LR
  # centernet_res18_coco.yaml SOLVER.IMS_PER_BATCH (the LR's batch)
  c.optim.reference_batch_size = 64
  c.optim.epochs = 140.0  # centernet_res18_coco.yaml SOLVER.MAX_ITER (epochs in centerX)
  # centernet_res18_coco.yaml SOLVER.WARMUP_ITERS (epochs; factor 1 / WARMUP_ITERS)
  c.optim.warmup_iters = 1
  # centernet_res18_coco.yaml SOLVER.LR_SCHEDULER_NAME "WarmupCosineAnnealingLR"
  c.optim.schedule = "warmup_cosine_annealing"
  c.optim.cosine_decay_iter = 0.5  # centernet_res18_coco.yaml SOLVER.COSINE_DECAY_ITER
  c.optim.min_lr = 1e-08  # centerX configs/config.py default SOLVER.MIN_LR
  # centernet_res18_coco.yaml SOLVER.STEPS (not read by the cosine schedule)
  c.optim.steps = (50, 62)
  c.optim.gamma = 0.1  # detectron2 default SOLVER.GAMMA
  c.optim.momentum = 0.9  # detectron2 default SOLVER.MOMENTUM
  c.optim.weight_decay = 0.0001  # detectron2 default SOLVER.WEIGHT_DECAY
  c.optim.weight_decay_norm = 0.0  # detectron2 default SOLVER.WEIGHT_DECAY_NORM
  # centernet_res18_coco.yaml SOLVER.CLIP_GRADIENTS commented out: detectron2 default ENABLED False
  c.optim.clip_value = 0.0
  c.optim.clip_norm = 0.0  # detectron2 CLIP_GRADIENTS, CLIP_TYPE value: no norm clip (default)
  c.optim.skip_loss_factor = 0.0  # centerX configs/config.py default LOSS.SKIP_LOSS False
  # centernet_res18_coco.yaml SOLVER.IMS_PER_BATCH (global batch, 4 GPUs x 16)
  c.train.batch_size = 64
  c.train.eval_batch_size = 16  # project (test batch; centerX evaluates per GPU)
  return c
