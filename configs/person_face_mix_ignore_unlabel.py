"""Former name of configs/centerx/person_face_res18_ignore_unlabel.py (centerX `person_face_res18_ignore_unlabel.yaml`;
docs/onestage.md §7), kept so that commands and scripts using this name keep working."""

from configs.centerx import load


def get_config(arg: str = ""):
  return load("person_face_res18_ignore_unlabel", arg)
