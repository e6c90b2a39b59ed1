"""Former name of configs/centerx/crowd_human_res18.py (centerX `crowd_human_res18.yaml`;
docs/onestage.md §7), kept so that commands and scripts using this name keep working."""

from configs.centerx import load


def get_config():
  return load("crowd_human_res18")
