"""centerX `yamls/crowd_human/crowd_human_res18_KD.yaml` (CPFLAME/centerX): CrowdHuman, resdcn18
distilled without labels (woGT), 140 epochs: 32.8 AP from ImageNet (README 'crowd human' table,
resdcn18_KD_woGT_scratch; the 80-epoch rows start from a trained R18, `--config.init_from`). The
checked-in yaml's teacher is the R18 `coco_det/centernet_r_18_C4_0.5x_coco_person.yaml` run (the
R50 teacher line is commented out), so that is the default teacher here;
`--config.kd.teacher_workdirs` changes it.

  python main.py --config configs/centerx/crowd_human_res18_KD.py \
      --workdir runs/crowd_human_res18_KD --config.data.root=/data/CrowdHuman \
      --config.init_from=resnet18-5c106cde.pth

As the yaml (`_BASE_: crowd_human_res18.yaml`), this starts from
configs/centerx/crowd_human_res18.py and changes only what the yaml sets. Every field below names
the yaml key it comes from (or the centerX / detectron2 default the yaml leaves in place);
docs/onestage.md §7 lists all recipes and the departures.
"""

from configs.centerx import load


def get_config():
  c = load("crowd_human_res18")  # _BASE_: "crowd_human_res18.yaml"
  # crowd_human_res18_KD.yaml KD.TEACHER_CFG
  # ["yamls/coco_det/centernet_r_18_C4_0.5x_coco_person.yaml"]: their runs here
  c.kd.teacher_workdirs = ("runs/centernet_r_18_C4_0.5x_coco_person",)
  c.kd.weight = (1.0,)  # crowd_human_res18_KD.yaml KD.KD_WEIGHT
  c.kd.cls_weight = (1000.0,)  # crowd_human_res18_KD.yaml KD.KD_CLS_WEIGHT
  c.kd.wh_weight = (1.0,)  # crowd_human_res18_KD.yaml KD.KD_WH_WEIGHT
  c.kd.reg_weight = (0.1,)  # crowd_human_res18_KD.yaml KD.KD_REG_WEIGHT
  # centerX configs/config.py default KD.KD_CLS_INDEX [1] (not set in the yaml)
  c.kd.cls_index = (1,)
  c.kd.norm_wh = (True,)  # crowd_human_res18_KD.yaml KD.NORM_WH
  c.kd.without_label = True  # crowd_human_res18_KD.yaml KD.KD_WITHOUT_LABEL
  c.optim.optimizer = "sgd"  # crowd_human_res18_KD.yaml SOLVER.OPTIM_NAME "SGD"
  c.optim.base_lr = 0.02  # crowd_human_res18_KD.yaml SOLVER.BASE_LR
  c.optim.reference_batch_size = 64  # crowd_human_res18_KD.yaml SOLVER.IMS_PER_BATCH
  c.train.batch_size = 64  # crowd_human_res18_KD.yaml SOLVER.IMS_PER_BATCH
  c.optim.warmup_iters = 1  # crowd_human_res18_KD.yaml SOLVER.WARMUP_ITERS (epochs)
  c.optim.epochs = 140.0  # crowd_human_res18_KD.yaml SOLVER.MAX_ITER (epochs)
  # crowd_human_res18_KD.yaml SOLVER.LR_SCHEDULER_NAME "WarmupMultiStepLR"
  c.optim.schedule = "multistep"
  c.optim.steps = (90, 120)  # crowd_human_res18_KD.yaml SOLVER.STEPS (epochs)
  # crowd_human_res18_KD.yaml SOLVER.CLIP_GRADIENTS ENABLED, CLIP_TYPE "value", CLIP_VALUE 1.0
  c.optim.clip_value = 1.0
  return c
