"""centerX `yamls/crowd_human/crowd_human_res50.yaml` (CPFLAME/centerX): CrowdHuman, resdcn50, 80
epochs: 35.1 AP / 61.2 AP50 (README 'crowd human' table); the teacher of the KD recipes.

  python main.py --config configs/centerx/crowd_human_res50.py \
      --workdir runs/crowd_human_res50 --config.data.root=/data/CrowdHuman \
      --config.init_from=resnet50-19c8e357.pth

As the yaml (`_BASE_: crowd_human_res18.yaml`), this starts from
configs/centerx/crowd_human_res18.py and changes only what the yaml sets. Every field below names
the yaml key it comes from (or the centerX / detectron2 default the yaml leaves in place);
docs/onestage.md §7 lists all recipes and the departures.
"""

from configs.centerx import load


def get_config():
  c = load("crowd_human_res18")  # _BASE_: "crowd_human_res18.yaml"
  c.model.resnet_depth = 50  # crowd_human_res50.yaml MODEL.BACKBONE.DEPTH
  # crowd_human_res50.yaml MODEL.CENTERNET.DECONV_CHANNEL [2048, 256, 128, 64] (the first is the C5
  # width)
  c.model.onestage.deconv_channels = (256, 128, 64)
  return c
