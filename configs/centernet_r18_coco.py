"""Former name of configs/centerx/centernet_res18_coco_0.5.py (centerX `centernet_res18_coco_0.5.yaml`;
docs/onestage.md §7), kept so that commands and scripts using this name keep working."""

from configs.centerx import load


def get_config():
  return load("centernet_res18_coco_0.5")
