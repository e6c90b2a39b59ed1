"""centerX `yamls/crowd_human/res18_multi_KD.yaml` (CPFLAME/centerX): CrowdHuman, resdcn18 distilled
without labels (woGT) from the resdcn50 CrowdHuman model, 140 epochs (the 'multi KD' form with one
teacher; README 'crowd human' table, resdcn18_KD_woGT_scratch: 32.8 AP).

  python main.py --config configs/centerx/res18_multi_KD.py \
      --workdir runs/res18_multi_KD --config.data.root=/data/CrowdHuman \
      --config.init_from=resnet18-5c106cde.pth

As the yaml (`_BASE_: crowd_human_res18.yaml`), this starts from
configs/centerx/crowd_human_res18.py and changes only what the yaml sets. Every field below names
the yaml key it comes from (or the centerX / detectron2 default the yaml leaves in place);
docs/onestage.md §7 lists all recipes and the departures.
"""

from configs.centerx import load


def get_config():
  c = load("crowd_human_res18")  # _BASE_: "crowd_human_res18.yaml"
  # res18_multi_KD.yaml KD.TEACHER_CFG ["yamls/crowd_human/crowd_human_res50.yaml"]: their runs here
  c.kd.teacher_workdirs = ("runs/crowd_human_res50",)
  c.kd.weight = (1.0,)  # res18_multi_KD.yaml KD.KD_WEIGHT
  c.kd.cls_weight = (1000.0,)  # res18_multi_KD.yaml KD.KD_CLS_WEIGHT
  c.kd.wh_weight = (1.0,)  # res18_multi_KD.yaml KD.KD_WH_WEIGHT
  c.kd.reg_weight = (0.1,)  # res18_multi_KD.yaml KD.KD_REG_WEIGHT
  c.kd.cls_index = (1,)  # res18_multi_KD.yaml KD.KD_CLS_INDEX
  c.kd.norm_wh = (True,)  # res18_multi_KD.yaml KD.NORM_WH
  c.kd.without_label = True  # res18_multi_KD.yaml KD.KD_WITHOUT_LABEL
  c.optim.optimizer = "sgd"  # res18_multi_KD.yaml SOLVER.OPTIM_NAME "SGD"
  c.optim.base_lr = 0.02  # res18_multi_KD.yaml SOLVER.BASE_LR
  c.optim.reference_batch_size = 64  # res18_multi_KD.yaml SOLVER.IMS_PER_BATCH
  c.train.batch_size = 64  # res18_multi_KD.yaml SOLVER.IMS_PER_BATCH
  c.optim.warmup_iters = 1  # res18_multi_KD.yaml SOLVER.WARMUP_ITERS (epochs)
  c.optim.epochs = 140.0  # res18_multi_KD.yaml SOLVER.MAX_ITER (epochs)
  c.optim.schedule = "multistep"  # res18_multi_KD.yaml SOLVER.LR_SCHEDULER_NAME "WarmupMultiStepLR"
  c.optim.steps = (90, 120)  # res18_multi_KD.yaml SOLVER.STEPS (epochs)
  # res18_multi_KD.yaml SOLVER.CLIP_GRADIENTS ENABLED, CLIP_TYPE "value", CLIP_VALUE 1.0
  c.optim.clip_value = 1.0
  return c
