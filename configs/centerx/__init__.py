"""One config per CPFLAME/centerX yaml whose results its README reports (docs/onestage.md §7):
`configs/centerx/<yaml stem>.py`, every field commented with the yaml file and key it comes from.

  python main.py --config configs/centerx/crowd_human_res18.py --workdir runs/crowd_human_res18 \
      --config.data.root=/data/CrowdHuman --config.init_from=resnet18-5c106cde.pth

`load(stem)` returns a recipe's `get_config()` (the file names keep the yaml stems, some of which,
like `centernet_res18_coco_0.5`, are not importable module names); a yaml with `_BASE_` starts
from its base recipe the same way. `person_face_data` is the data side of the person / face yamls.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLACEHOLDER_ROOTS = ("/path/to/CrowdHuman", "/path/to/WIDER_FACE")


def stems() -> list:
  """The recipe names (yaml stems) in this folder."""
  return sorted(p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_"))


def load(stem: str, *args):
  """`get_config(*args)` of configs/centerx/<stem>.py (not validated)."""
  path = HERE / f"{stem}.py"
  if not path.is_file():
    raise FileNotFoundError(f"no centerX recipe {stem!r} (known: {', '.join(stems())})")
  spec = importlib.util.spec_from_file_location(f"cn2_centerx_recipe_{stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def roots(arg: str = "") -> tuple:
  """(CrowdHuman root, WIDER Face root) from the config argument "CROWDHUMAN,WIDER"."""
  given = [r.strip() for r in (arg or "").split(",")] if arg else []
  if len(given) > 2:
    raise ValueError(f"expected 'CROWDHUMAN_ROOT,WIDER_ROOT', got {arg!r}")
  return tuple(given[i] if i < len(given) and given[i] else PLACEHOLDER_ROOTS[i] for i in (0, 1))


def person_face_data(c, arg: str = "") -> None:
  """The person / face yamls' data: CrowdHuman persons (class 0 -> channel 0) and WIDER Face faces
  (class 1 -> channel 1), trained as one mixture, each evaluated on its channel.

  centerX's `crowd_human_face_train` / `crowd_human_train` read the odgt 'person' boxes (vbox) of
  CrowdHuman, `widerface_crowdhuman_train` / `face_train` its WIDER Face + MAFA VOC set as faces.
  Departure: this project has WIDER Face only (no MAFA), and evaluates CrowdHuman val (persons)
  and WIDER Face val (faces) separately instead of centerX's combined test lists."""
  crowdhuman, wider = roots(arg)
  d = c.data
  d.dataset = "crowdhuman"  # centerX crowd_human_face_train / crowd_human_train
  d.root = crowdhuman
  d.crowdhuman_box = "vbox"  # centerX data/dataset/crowd_human.py reads 'vbox'
  d.crowdhuman_ignore_as = "person"  # centerX keeps every tag 'person' box (extra.ignore unread)
  d.channel_offset = 0  # class 'person' = index 0 of ["person", "face"]
  d.mix_weight = 15000.0  # CrowdHuman train images: centerX concatenates the two lists
  wider_face = {"dataset": "wider_face", "root": wider, "channel_offset": 1}  # 'face' = index 1
  d.mixture = (dict(wider_face, weight=12880.0),)  # WIDER Face train images
  d.extra_eval = (dict(wider_face, name="wider_face"),)
