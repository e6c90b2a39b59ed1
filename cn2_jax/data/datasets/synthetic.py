"""`synthetic`: the generated shapes dataset of the demo (cn2_jax/data/synthetic.py), written
once under data.root (default <workdir>/synthetic) from the run's seed."""

from __future__ import annotations

import os

from cn2_jax import schema
from cn2_jax.data import sources, synthetic
from cn2_jax.data.catalog import DatasetKind, register


def prepare(data, data_dir: str, workdir: str, seed: int):
  root = data.root or os.path.join(workdir, "synthetic")
  train_json = os.path.join(root, "instances_train.json")
  if os.path.exists(train_json):
    splits = {"train": (train_json, root), "val": (os.path.join(root, "instances_val.json"), root)}
  else:
    sizes = dict(
        num_train=data.synthetic_num_train,
        num_val=data.synthetic_num_val,
        image_size=data.synthetic_image_size,
    )
    splits = synthetic.write_synthetic_coco(
        root,
        seed=seed,
        **{key: value for key, value in sizes.items() if value},  # 0 = the generator's default
    )
  name = data.name or "synthetic"
  return sources.build_coco_json(name, splits, data_dir, **sources.subset_options(data))


register(DatasetKind("synthetic", prepare))


CONFIG = schema.group(
    "data",
    "The synthetic dataset (tests, demos, benchmarks).",
    schema.Field("synthetic_num_train", 0, "training images (0 = generator default)"),
    schema.Field("synthetic_num_val", 0, "validation images (0 = generator default)"),
    schema.Field("synthetic_image_size", 0, "image side in pixels (0 = generator default)"),
)
