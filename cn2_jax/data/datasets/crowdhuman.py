"""`crowdhuman`: annotation_{split}.odgt files and Images/ under data.root, converted to COCO json
(cn2_jax/data/sources.py); one class (the box data.crowdhuman_box); evaluation adds the official
CrowdHuman AP50, MR^-2 and JI (cn2_jax/evaluation/crowdhuman_eval.py)."""

from __future__ import annotations

from cn2_jax.data import sources
from cn2_jax.data.catalog import DatasetKind, register
from cn2_jax.evaluation import crowdhuman_eval


def prepare(data, data_dir: str, workdir: str, seed: int):
  del workdir, seed
  return sources.prepare_from_config(data, data_dir)


def official_metrics(annotation_file: str, evaluator, options) -> dict:
  del options
  return crowdhuman_eval.metrics_from_coco(annotation_file, evaluator.results, evaluator.image_ids)


register(DatasetKind("crowdhuman", prepare, fixed_num_classes=1, extra_metrics=official_metrics))
