"""`image_folder`: every image below data.root (recursive), no annotations: training images for
distillation without labels (woGT); never evaluated, never filtered as empty."""

from __future__ import annotations

from cn2_jax.data import sources
from cn2_jax.data.catalog import DatasetKind, register
from cn2_jax.errors import ConfigError


def prepare(data, data_dir: str, workdir: str, seed: int):
  del workdir, seed
  if not data.root:
    raise ConfigError("data.root must name the image folder for data.dataset='image_folder'")
  return sources.build_image_folder(data.root, data_dir, name=data.name, split=data.train_split)


register(DatasetKind("image_folder", prepare, fixed_num_classes=0, labelled=False))
