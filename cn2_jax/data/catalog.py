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
  ))

`prepare` converts the source once (into `data_dir`) and returns the prepared tfds builder whose
splits every loader, evaluator and predictor reads (cn2_jax/data/builder.py). `extra_metrics`
adds a dataset's official metrics beside COCO's (CrowdHuman AP50 / MR^-2 / JI, WIDER Face easy /
medium / hard AP); `options` holds the run's evaluation settings (`wider_eval_gt`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

from cn2_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DatasetKind:
  name: str
  prepare: Callable  # (data section, data_dir: str, workdir: str, seed: int) -> tfds builder
  fixed_num_classes: Optional[int] = None  # without data.classes; None: from the annotations
  labelled: bool = True  # False: unlabelled images (woGT distillation), training only
  extra_metrics: Optional[Callable] = None  # (annotation file, evaluator, options) -> dict


_KINDS: Dict[str, DatasetKind] = {}


def register(kind: DatasetKind) -> DatasetKind:
  if kind.name in _KINDS:
    raise ValueError(f"dataset kind {kind.name!r} is registered twice")
  _KINDS[kind.name] = kind
  return kind


def _load_builtins() -> None:
  # The built-in kinds import the dataset converters (tensorflow_datasets): loaded on first use,
  # so importing the config schema stays cheap.
  import cn2_jax.data.datasets  # noqa: F401  (registers the built-in kinds)


def names() -> Tuple[str, ...]:
  """The registered `data.dataset` values, in registration order."""
  _load_builtins()
  return tuple(_KINDS)


def get(name: str, field: str = "data.dataset") -> DatasetKind:
  """The kind registered as `name`; otherwise a ConfigError naming `field` (the config field that
  holds the name) and listing the known kinds."""
  _load_builtins()
  if name not in _KINDS:
    raise ConfigError(f"{field} must be one of {names()}, got {name!r}")
  return _KINDS[name]
