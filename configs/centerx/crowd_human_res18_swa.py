"""centerX `yamls/crowd_human/crowd_human_res18_swa.yaml` (CPFLAME/centerX): CrowdHuman ablation:
resdcn18 with SWA, 70 + 10 epochs: 31.1 AP (README 'crowd human' table, resdcn18_swa).

  python main.py --config configs/centerx/crowd_human_res18_swa.py \
      --workdir runs/crowd_human_res18_swa --config.data.root=/data/CrowdHuman \
      --config.init_from=resnet18-5c106cde.pth

As the yaml (`_BASE_: crowd_human_res18.yaml`), this starts from
configs/centerx/crowd_human_res18.py and changes only what the yaml sets. Every field below names
the yaml key it comes from (or the centerX / detectron2 default the yaml leaves in place);
docs/onestage.md §7 lists all recipes and the departures.
"""

from configs.centerx import load


def get_config():
  c = load("crowd_human_res18")  # _BASE_: "crowd_human_res18.yaml"
  c.optim.epochs = 70.0  # crowd_human_res18_swa.yaml SOLVER.MAX_ITER (SWA runs after it)
  c.swa.iters = 10  # crowd_human_res18_swa.yaml SOLVER.SWA.ENABLED True, ITER (epochs)
  c.swa.period = 1  # crowd_human_res18_swa.yaml SOLVER.SWA.PERIOD (epochs)
  c.swa.lr_start = 0.002  # crowd_human_res18_swa.yaml SOLVER.SWA.LR_START
  c.swa.eta_min = 0.0001  # crowd_human_res18_swa.yaml SOLVER.SWA.ETA_MIN_LR
  c.swa.lr_sched = "cosine"  # crowd_human_res18_swa.yaml SOLVER.SWA.LR_SCHED True
  # centerX's SWA keeps the BatchNorm statistics as they are (docs/onestage.md §5.3)
  c.swa.bn_batches = 0
  return c
