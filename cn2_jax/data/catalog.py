"""The dataset registry: what `data.dataset = "<name>"` means (detectron2's DatasetCatalog and
MetadataCatalog in one small table).

A dataset kind registers, in its own file under `cn2_jax/data/datasets/` (imported by that
package's `__init__.py`):

  register(DatasetKind(
      name="my_format",
      prepare=prepare,            # (data section, data_dir, workdir, seed) -> tfds builder
      fixed_num_classes=None,     # classes without data.classes (None: read from the files)
      labelled=True,              # False: images only (training; never evaluated or filtered)
      extra_metrics=None,         # (annotation file, CocoEvaluator, options) -> {name: value}
      centerx_ground_truth=None,  # eval.protocol="centerx": (annotation file) -> COCO dict
  ))

`prepare` converts the source once (into `data_dir`) and returns the prepared tfds builder whose
splits every loader, evaluator and predictor reads (cn2_jax/data/builder.py). `extra_metrics`
adds a dataset's official metrics beside COCO's (CrowdHuman AP50 / MR^-2 / JI, WIDER Face easy /
medium / hard AP); `options` holds the run's evaluation settings (`wider_eval_gt`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Tuple

from cn2_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class DatasetKind:
  name: str
  prepare: Callable  # (data section, data_dir: str, workdir: str, seed: int) -> tfds builder
  fixed_num_classes: Optional[int] = None  # without data.classes; None: from the annotations
  labelled: bool = True  # False: unlabelled images (woGT distillation), training only
  extra_metrics: Optional[Callable] = None  # (annotation file, evaluator, options) -> dict
  # eval.protocol="centerx": (converted annotation file) -> the COCO dict centerX evaluates on,
  # when that is not the converted json itself (evaluation/protocol.py)
  centerx_ground_truth: Optional[Callable] = None


# The built-in kinds import the dataset converters (tensorflow_datasets): loaded on first use,
# so importing the config schema stays cheap.
KINDS = Registry("dataset kind", "data.dataset", builtins="cn2_jax.data.datasets")


def register(kind: DatasetKind) -> DatasetKind:
  return KINDS.add(kind.name, kind)


def names() -> Tuple[str, ...]:
  """The registered `data.dataset` values, in registration order."""
  return KINDS.names()


def get(name: str, field: str = "data.dataset") -> DatasetKind:
  """The kind registered as `name`; otherwise a ConfigError naming `field` (the config field that
  holds the name) and listing the known kinds."""
  return KINDS.lookup(name, field)
