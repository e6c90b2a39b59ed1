"""COCO 2017 (`coco/2017`: data.root holds annotations/instances_{train,val}2017.json and the
image folders) and any COCO-format folder (`coco_json`: data.train_json / data.val_json relative
to data.root, images under data.image_root or data.root)."""

from __future__ import annotations

from pathlib import Path

from cn2_jax.data import sources
from cn2_jax.data.catalog import DatasetKind, register
from cn2_jax.errors import ConfigError


def prepare_coco2017(data, data_dir: str, workdir: str, seed: int):
  del workdir, seed
  return sources.build_coco2017(data.root, data_dir, **sources.subset_options(data))


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
