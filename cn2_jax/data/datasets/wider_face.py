"""`wider_face`: wider_face_split/wider_face_{split}_bbx_gt.txt and WIDER_{split}/images under
data.root, converted to COCO json (cn2_jax/data/sources.py); one class; with data.wider_eval_gt
(the official kit's .mat files) evaluation adds the easy / medium / hard AP
(cn2_jax/evaluation/wider_eval.py)."""

from __future__ import annotations

import os

from cn2_jax.data import sources
from cn2_jax.data.catalog import DatasetKind, register
from cn2_jax.evaluation import wider_eval


def prepare(data, data_dir: str, workdir: str, seed: int):
  del workdir, seed
  return sources.prepare_from_config(data, data_dir)


def official_metrics(annotation_file: str, evaluator, options) -> dict:
  kit = options.get("wider_eval_gt", "")
  if not kit:
    return {}
  return wider_eval.metrics_from_coco(
      annotation_file, evaluator.results, evaluator.image_ids, os.path.expanduser(kit)
  )


register(DatasetKind("wider_face", prepare, fixed_num_classes=1, extra_metrics=official_metrics))
