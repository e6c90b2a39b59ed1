"""COCO 2017 (`coco/2017`: data.root holds annotations/instances_{train,val}2017.json and the
image folders) and any COCO-format folder (`coco_json`: data.train_json / data.val_json relative
to data.root, images under data.image_root or data.root)."""

from __future__ import annotations

import os
from pathlib import Path

from cn2_jax.data import builder as builder_lib
from cn2_jax.data import sources
from cn2_jax.data.catalog import DatasetKind, register
from cn2_jax.errors import ConfigError


def prepare_coco2017(data, data_dir: str, workdir: str, seed: int):
  """``builder.build_coco2017_dataset``; with ``data.classes``, a ``coco_json`` dataset
  ``coco2017-<classes>`` with splits train / val from filtered copies of the 2017 jsons."""
  del workdir, seed
  subset = sources.subset_options(data)
  if not subset["classes"]:
    return builder_lib.build_coco2017_dataset(data.root, data_dir)
  if not data.root:
    raise ConfigError("data.root must name the extracted COCO folder for data.dataset='coco/2017'")
  splits = {
      split: (
          os.path.join(data.root, "annotations", f"instances_{split}2017.json"),
          os.path.join(data.root, f"{split}2017"),
      )
      for split in ("train", "val")
  }
  return sources.build_coco_json("coco2017", splits, data_dir, **subset)


def prepare_coco_json(data, data_dir: str, workdir: str, seed: int):
  del workdir, seed
  if not data.root:
    raise ConfigError("data.root must name the dataset folder for data.dataset='coco_json'")
  image_root = sources.resolve_path(data.root, data.image_root) if data.image_root else data.root
  splits = {}
  for split, json_file in ((data.train_split, data.train_json), (data.eval_split, data.val_json)):
    if split and json_file:
      splits[split] = (sources.resolve_path(data.root, json_file), image_root)
  if not splits:
    raise ConfigError("data.train_json and/or data.val_json must be set for 'coco_json'")
  name = data.name or Path(data.root).resolve().name
  return sources.build_coco_json(name, splits, data_dir, **sources.subset_options(data))


register(DatasetKind("coco/2017", prepare_coco2017))
register(DatasetKind("coco_json", prepare_coco_json))
