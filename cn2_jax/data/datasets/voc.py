"""`voc`: a Pascal VOC folder (JPEGImages/, Annotations/*.xml, ImageSets/Main/{split}.txt under
data.root), converted to COCO json (cn2_jax/data/sources.py)."""

from __future__ import annotations

from cn2_jax.data import sources
from cn2_jax.data.catalog import DatasetKind, register


def prepare(data, data_dir: str, workdir: str, seed: int):
  del workdir, seed
  return sources.prepare_from_config(data, data_dir)


register(DatasetKind("voc", prepare))
