"""centerX `yamls/crowd_human/crowd_human_res18_communism.yaml` (CPFLAME/centerX): CrowdHuman
ablation: resdcn18 with the communism loss, Adam 5e-4, 70 epochs (centerX docs: within about 0.3
AP of the baseline; no README table row).

  python main.py --config configs/centerx/crowd_human_res18_communism.py \
      --workdir runs/crowd_human_res18_communism --config.data.root=/data/CrowdHuman \
      --config.init_from=resnet18-5c106cde.pth

Every field below names the yaml key it comes from (or the centerX / detectron2 default the yaml
leaves in place); docs/onestage.md §7 lists all recipes and the departures.
"""

from cn2_jax.config import base_config


def get_config():
  c = base_config()
  c.model.arch = "onestage"  # crowd_human_res18_communism.yaml MODEL.META_ARCHITECTURE "CenterNet"
  # crowd_human_res18_communism.yaml MODEL.BACKBONE.DEPTH (NAME "build_resnet")
  c.model.resnet_depth = 18
  c.model.num_classes = 1  # crowd_human_res18_communism.yaml MODEL.CENTERNET.NUM_CLASSES
  c.model.onestage.sync_bn = False  # crowd_human_res18_communism.yaml MODEL.BN_TYPE "BN"
  c.model.onestage.input_format = "RGB"  # crowd_human_res18_communism.yaml INPUT.FORMAT "RGB"
  # crowd_human_res18_communism.yaml MODEL.PIXEL_MEAN
  c.model.onestage.pixel_mean = (0.485, 0.456, 0.406)
  # crowd_human_res18_communism.yaml MODEL.PIXEL_STD
  c.model.onestage.pixel_std = (0.229, 0.224, 0.225)
  # crowd_human_res18_communism.yaml MODEL.CENTERNET.DECONV_CHANNEL [512, 256, 128, 64] (the first
  # is the C5 width)
  c.model.onestage.deconv_channels = (256, 128, 64)
  # crowd_human_res18_communism.yaml MODEL.CENTERNET.DECONV_KERNEL
  c.model.onestage.deconv_kernels = (4, 4, 4)
  c.model.onestage.use_deform = True  # crowd_human_res18_communism.yaml MODEL.CENTERNET.USE_DEFORM
  # crowd_human_res18_communism.yaml MODEL.CENTERNET.MODULATE_DEFORM
  c.model.onestage.modulate_deform = True
  c.model.onestage.bias_value = -2.19  # crowd_human_res18_communism.yaml MODEL.CENTERNET.BIAS_VALUE
  c.model.onestage.down_scale = 4  # crowd_human_res18_communism.yaml MODEL.CENTERNET.DOWN_SCALE
  c.model.onestage.min_overlap = 0.3  # crowd_human_res18_communism.yaml MODEL.CENTERNET.MIN_OVERLAP
  c.model.onestage.tensor_dim = 512  # crowd_human_res18_communism.yaml MODEL.CENTERNET.TENSOR_DIM
  c.model.onestage.cls_weight = 1.0  # centerX configs/config.py default LOSS.CLS_WEIGHT
  # centerX configs/config.py default LOSS.WH_WEIGHT (not set in the yaml)
  c.model.onestage.wh_weight = 0.1
  c.model.onestage.reg_weight = 1.0  # centerX configs/config.py default LOSS.REG_WEIGHT
  # centerX configs/config.py default LOSS.NORM_WH False (not set in the yaml)
  c.model.onestage.norm_wh = ""
  # crowd_human_res18_communism.yaml DATASETS.TRAIN ("crowd_human_train",), TEST
  # ("crowd_human_val",)
  c.data.dataset = "crowdhuman"
  c.data.crowdhuman_box = "vbox"  # centerX data/dataset/crowd_human.py reads 'vbox'
  # centerX crowd_human.py keeps every tag 'person' box; extra.ignore is not read
  c.data.crowdhuman_ignore_as = "person"
  c.data.max_boxes = 512  # project: GT boxes kept per image = TENSOR_DIM
  c.data.min_size_train = (512,)  # crowd_human_res18_communism.yaml INPUT.MIN_SIZE_TRAIN
  c.data.max_size_train = 512  # crowd_human_res18_communism.yaml INPUT.MAX_SIZE_TRAIN
  c.data.min_size_test = 512  # crowd_human_res18_communism.yaml INPUT.MIN_SIZE_TEST
  c.data.max_size_test = 512  # crowd_human_res18_communism.yaml INPUT.MAX_SIZE_TEST
  # crowd_human_res18_communism.yaml INPUT.CROP ENABLED True, TYPE "relative_range", SIZE [0.75,
  # 0.75]
  c.data.crop_relative_range = (0.75, 0.75)
  c.data.flip = True  # centerX configs/config.py default TRAIN_PIPELINES RandomFlip
  # centerX configs/config.py default TRAIN_PIPELINES RandomBrightness / Contrast / Saturation,
  # RandomLighting
  c.data.color_aug = "centerx"
  # centerX configs/config.py default TRAIN_PIPELINES intensity 0.6 to 1.4
  c.data.color_aug_range = (0.6, 1.4)
  # centerX configs/config.py default TRAIN_PIPELINES RandomLighting scale
  c.data.color_aug_lighting = 0.1
  c.optim.optimizer = "adam"  # crowd_human_res18_communism.yaml SOLVER.OPTIM_NAME "Adam"
  c.optim.base_lr = 0.0005  # crowd_human_res18_communism.yaml SOLVER.BASE_LR
  # crowd_human_res18_communism.yaml SOLVER.IMS_PER_BATCH (the LR's batch)
  c.optim.reference_batch_size = 64
  c.optim.epochs = 70.0  # crowd_human_res18_communism.yaml SOLVER.MAX_ITER (epochs in centerX)
  # crowd_human_res18_communism.yaml SOLVER.WARMUP_ITERS (epochs; factor 1 / WARMUP_ITERS)
  c.optim.warmup_iters = 1
  # crowd_human_res18_communism.yaml SOLVER.LR_SCHEDULER_NAME "WarmupCosineAnnealingLR"
  c.optim.schedule = "warmup_cosine_annealing"
  c.optim.cosine_decay_iter = 0.1  # crowd_human_res18_communism.yaml SOLVER.COSINE_DECAY_ITER
  c.optim.min_lr = 1e-08  # centerX configs/config.py default SOLVER.MIN_LR
  # crowd_human_res18_communism.yaml SOLVER.STEPS (not read by the cosine schedule)
  c.optim.steps = (50, 62)
  c.optim.gamma = 0.1  # detectron2 default SOLVER.GAMMA
  c.optim.momentum = 0.9  # detectron2 default SOLVER.MOMENTUM
  c.optim.weight_decay = 0.0001  # detectron2 default SOLVER.WEIGHT_DECAY
  c.optim.weight_decay_norm = 0.0  # detectron2 default SOLVER.WEIGHT_DECAY_NORM
  # crowd_human_res18_communism.yaml SOLVER.CLIP_GRADIENTS commented out: detectron2 default ENABLED
  # False
  c.optim.clip_value = 0.0
  c.optim.clip_norm = 0.0  # detectron2 CLIP_GRADIENTS, CLIP_TYPE value: no norm clip (default)
  c.optim.skip_loss_factor = 0.0  # centerX configs/config.py default LOSS.SKIP_LOSS False
  # crowd_human_res18_communism.yaml SOLVER.IMS_PER_BATCH (global batch, 4 GPUs x 16)
  c.train.batch_size = 64
  c.train.eval_batch_size = 16  # project (test batch; centerX evaluates per GPU)
  # crowd_human_res18_communism.yaml MODEL.CENTERNET.LOSS.COMMUNISM.ENABLE
  c.model.onestage.communism = True
  # crowd_human_res18_communism.yaml LOSS.COMMUNISM CLS_LOSS, WH_LOSS, OFF_LOSS
  c.model.onestage.communism_targets = (1.2, 0.4, 0.1)
  return c
