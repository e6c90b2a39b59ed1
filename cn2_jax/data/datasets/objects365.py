"""`objects365`: Objects365 v1 (365 categories, COCO-format jsons), the dataset of the official
O365_CenterNet2_R50_1x config (CenterNet2 `centernet/data/datasets/objects365.py`:
`objects365_train` / `objects365_val`).

Default layout (data.root is the `objects365/` folder of detectron2's `datasets/`):

    <data.root>/annotations/objects365_{split}.json   data.train_json / data.val_json
    <data.root>/{split}/                              data.image_root ("{split}": the split)

Labels 0..364 follow the category ids 1..365 (the official metadata maps id i + 1 -> i, names
in id order). Crowd boxes (`iscrowd`) are ignore regions, as for COCO. Evaluated with COCO-style
AP; the official recipe samples images class-aware (data.sampler_train = "ClassAwareSampler",
data/sampling.py) and keeps 300 detections per image.
"""

from __future__ import annotations

import logging

from cn2_jax.data import sources
from cn2_jax.data.catalog import DatasetKind, register
from cn2_jax.errors import ConfigError

logger = logging.getLogger(__name__)

NAME = "objects365"
NUM_CLASSES = 365
DEFAULT_JSON = "annotations/objects365_{split}.json"
DEFAULT_IMAGE_ROOT = "{split}"


def split_files(data):
  """``{split: (annotation json, image root)}`` of the train and eval splits of ``data``."""
  if not data.root:
    raise ConfigError(f"data.root must name the objects365 folder for data.dataset={NAME!r}")
  splits = {}
  for split, ann in ((data.train_split, data.train_json), (data.eval_split, data.val_json)):
    if split:
      ann = (ann or DEFAULT_JSON).replace("{split}", split)
      image_root = (data.image_root or DEFAULT_IMAGE_ROOT).replace("{split}", split)
      splits[split] = (
          sources.resolve_path(data.root, ann),
          sources.resolve_path(data.root, image_root),
      )
  if not splits:
    raise ConfigError("data.train_split and/or data.eval_split must be set")
  return splits


def prepare(data, data_dir: str, workdir: str, seed: int):
  del workdir, seed
  builder = sources.build_coco_json(
      data.name or NAME, split_files(data), data_dir, **sources.subset_options(data)
  )
  num_classes = len((builder.info.metadata or {}).get("categories", []) or [])
  if not tuple(data.classes) and num_classes != NUM_CLASSES:
    logger.warning(
        "%s: %d categories, not Objects365 v1's %d", data.name or NAME, num_classes, NUM_CLASSES
    )
  return builder


register(DatasetKind(NAME, prepare, fixed_num_classes=NUM_CLASSES))
