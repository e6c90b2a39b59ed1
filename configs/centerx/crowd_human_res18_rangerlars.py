"""centerX `yamls/crowd_human/crowd_human_res18_rangerlars.yaml` (CPFLAME/centerX): CrowdHuman
ablation: resdcn18 with RangerLars at LR 1e-3 and centerX's cosine schedule (README 'What's new':
RangerLars supported, does not converge on COCO; no table row).

  python main.py --config configs/centerx/crowd_human_res18_rangerlars.py \
      --workdir runs/crowd_human_res18_rangerlars --config.data.root=/data/CrowdHuman \
      --config.init_from=resnet18-5c106cde.pth

As the yaml (`_BASE_: crowd_human_res18.yaml`), this starts from
configs/centerx/crowd_human_res18.py and changes only what the yaml sets. Every field below names
the yaml key it comes from (or the centerX / detectron2 default the yaml leaves in place);
docs/onestage.md §7 lists all recipes and the departures.
"""

from configs.centerx import load


def get_config():
  c = load("crowd_human_res18")  # _BASE_: "crowd_human_res18.yaml"
  # crowd_human_res18_rangerlars.yaml SOLVER.OPTIM_NAME "RangerLars"
  c.optim.optimizer = "rangerlars"
  c.optim.base_lr = 0.001  # crowd_human_res18_rangerlars.yaml SOLVER.BASE_LR
  # crowd_human_res18_rangerlars.yaml SOLVER.LR_SCHEDULER_NAME "WarmupCosineAnnealingLR"
  c.optim.schedule = "warmup_cosine_annealing"
  # centerX configs/config.py default SOLVER.COSINE_DECAY_ITER (not set in the yaml)
  c.optim.cosine_decay_iter = 0.7
  c.optim.min_lr = 1e-08  # centerX configs/config.py default SOLVER.MIN_LR
  return c
