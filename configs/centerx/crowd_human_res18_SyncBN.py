"""centerX `yamls/crowd_human/crowd_human_res18_SyncBN.yaml` (CPFLAME/centerX): CrowdHuman ablation:
resdcn18 with SyncBN: 31.3 AP (README 'crowd human' table).

  python main.py --config configs/centerx/crowd_human_res18_SyncBN.py \
      --workdir runs/crowd_human_res18_SyncBN --config.data.root=/data/CrowdHuman \
      --config.init_from=resnet18-5c106cde.pth

As the yaml (`_BASE_: crowd_human_res18.yaml`), this starts from
configs/centerx/crowd_human_res18.py and changes only what the yaml sets. Every field below names
the yaml key it comes from (or the centerX / detectron2 default the yaml leaves in place);
docs/onestage.md §7 lists all recipes and the departures.
"""

from configs.centerx import load


def get_config():
  c = load("crowd_human_res18")  # _BASE_: "crowd_human_res18.yaml"
  c.model.onestage.sync_bn = True  # crowd_human_res18_SyncBN.yaml MODEL.BN_TYPE "SyncBN"
  return c
