"""Several datasets in one run: a training mixture and per-dataset evaluations (no JAX here).

centerX trains one student over datasets with disjoint label sets (CrowdHuman persons, WIDER faces,
COCO cars; docs/datasets.md §6, docs/onestage.md §4.3, §4.5): the student's classes are the
datasets' (or the teachers') classes side by side, and each dataset is evaluated on its own
channels.  Here:

* ``data`` is dataset 0 of the training mixture (weight ``data.mix_weight``, channel offset
  ``data.channel_offset``); each ``data.mixture`` entry adds one: a dict of the ``data`` keys that
  describe a dataset (``DATA_SOURCE_KEYS``: dataset, root, classes, ...; unset keys take the
  schema defaults, not the values of ``data``) plus ``weight`` and ``channel_offset``. An entry is
  prepared exactly as ``data`` with those keys would be (:func:`source_config`), so an entry and
  an ``extra_eval`` entry naming the same dataset (same keys) share one prepared folder.
* Labels: a dataset's label ``i`` becomes class ``channel_offset + i`` in the batch
  (``pipeline.TrainPart``), so every dataset's boxes land on its own channels. With
  ``model.onestage.ignore_unlabel`` (docs/onestage.md §4.5) the focal loss then skips the negatives
  of the channels an image's dataset does not label (their GT heatmap is all zero).
* Sampling (``schedule._MixtureSchedule``): per example slot, the dataset that grain's weighted
  interleaving (``grain.MapDataset.mix``) puts at that position, then the next image of that
  dataset's own shuffled epochs; a pure function of ``(seed, step)``, so resuming at any step is
  exact. Proportions are the weights' (grain rounds them: the smallest becomes 100, the others
  are truncated to integers). centerX itself chains the lists and samples uniformly per image
  (weights proportional to the dataset sizes here).
* Epoch (``optim.epochs``): the training images of all the datasets together
  (``pipeline.num_train_images``), as centerX's concatenated lists; with weights proportional to
  the sizes, one epoch sees every image about once.
* Padding: a mixture is not aspect-grouped; a batch is padded to the bucket of its images' aspect
  group, or the square fallback bucket when they differ (or ``data.pad_hw_train``; with the
  crop / CenterAffine augmentations every batch is one square canvas anyway).
* Filtering: ``data.filter_empty`` applies per dataset; ``image_folder`` datasets (no labels) are
  never filtered, and woGT (``kd.without_label``) turns it off for all (docs/onestage.md §4.3),
  where the crop is also placed uniformly (not around a GT box).
* Evaluation (``data.extra_eval``): after the main evaluation, each entry (the same keys plus
  ``channel_offset``; ``name`` labels its metrics) is evaluated on its ``eval_split`` with the
  model's classes ``[channel_offset, channel_offset + its classes)`` as its labels
  (:func:`channel_slice`; detections of other classes are dropped): centerX's ``coco_car_val``
  (``["", "car"]``: car at channel 1) is ``{"dataset": "coco/2017", "classes": ("car",),
  "channel_offset": 1, "name": "coco_car"}``. Its metrics are ``"<name>/AP"``, ... in
  eval/metrics.json (and TensorBoard eval/<name>/AP), its detections eval/<name>/coco_results.json.
  The main evaluation also maps its channels when ``data.channel_offset`` is set or the model has
  more classes than ``data``.
"""

from __future__ import annotations

import copy
import math
from typing import Optional, Sequence, Tuple

import ml_collections
import numpy as np

from cn2_jax import schema
from cn2_jax.config import base_config
from cn2_jax.data import catalog
from cn2_jax.data.datasets import crowdhuman
from cn2_jax.errors import ConfigError

__all__ = [
    "source_config",
    "num_labels",
    "channel_slice",
    "run_class_names",
    "is_mixed",
]


def source_config(data, entry, *, label_is_name: bool = False):
  """The ``data`` section describing one ``data.mixture`` / ``data.extra_eval`` entry: a copy of
  the run's ``data`` (sizes, data_dir, workers, ...) whose ``DATA_SOURCE_KEYS`` are the schema
  defaults overridden by the entry's values. ``label_is_name``: the entry's ``name`` labels
  metrics (``extra_eval``), so the prepared dataset keeps its default name."""
  out = copy.deepcopy(data)
  defaults = base_config().data
  for key in DATA_SOURCE_KEYS:
    out[key] = defaults[key]
  for key, value in entry.items():
    if key in DATA_SOURCE_KEYS and not (label_is_name and key == "name"):
      out[key] = tuple(value) if key == "classes" else value
  out.channel_offset = int(entry.get("channel_offset", 0))
  out.mixture, out.extra_eval = (), ()
  return out


def num_labels(dataset: str, info) -> int:
  """Classes a dataset labels: its ``DetectionInfo``'s, none for an ``image_folder``."""
  if not catalog.get(dataset).labelled:
    return 0
  return int(info.num_classes)


def is_mixed(data) -> bool:
  """Whether the model's classes are not simply ``data``'s (a mixture, extra evaluations, an
  offset, unlabelled images): then each dataset only has to fit its channels, not equal the
  model's classes."""
  return (
      bool(data.mixture)
      or bool(data.extra_eval)
      or int(data.channel_offset) != 0
      or not catalog.get(data.dataset).labelled
  )


def channel_slice(classes, valid, offset: int, num: int) -> Tuple[np.ndarray, np.ndarray]:
  """Detections of a model with more classes than a dataset, in that dataset's labels: classes
  ``[offset, offset + num)`` become ``0 .. num - 1``; the others are dropped (``valid`` False;
  their class is set to 0). Returns ``(classes, valid)``."""
  classes = np.asarray(classes, np.int64)
  keep = np.asarray(valid, bool) & (classes >= offset) & (classes < offset + num)
  return np.where(keep, classes - offset, 0).astype(np.int32), keep


def run_class_names(
    num_classes: int,
    datasets: Sequence[Tuple[str, object, int]],
    teacher_names: Optional[Sequence[Tuple[int, Sequence[str]]]] = None,
) -> list:
  """The name of every model class of a mixed run (dataset_info.json, predict's labels): from the
  first dataset ``(dataset, DetectionInfo, channel_offset)`` that labels the channel, else the
  first teacher ``(start channel, class names)`` covering it, else ``class<c>``."""
  names = [None] * int(num_classes)
  for dataset, info, offset in datasets:
    for i in range(num_labels(dataset, info)):
      c = int(offset) + i
      if 0 <= c < len(names) and names[c] is None:
        names[c] = str(info.class_names[i])
  for start, tnames in teacher_names or ():
    for i, n in enumerate(tnames):
      c = int(start) + i
      if 0 <= c < len(names) and names[c] is None:
        names[c] = str(n)
  return [n if n is not None else f"class{c}" for c, n in enumerate(names)]


# The `data` keys that describe one dataset: what a data.mixture / data.extra_eval entry may set
# (with "weight" / "channel_offset" resp. "channel_offset"; in data.extra_eval "name" labels the
# metrics, and the prepared dataset takes its default name).
DATA_SOURCE_KEYS = (
    "dataset",
    "name",
    "root",
    "train_json",
    "val_json",
    "image_root",
    "train_split",
    "eval_split",
    "classes",
    "crowdhuman_box",
    "crowdhuman_ignore_as",
    "synthetic_num_train",
    "synthetic_num_val",
    "synthetic_image_size",
)
MIXTURE_KEYS = DATA_SOURCE_KEYS + ("weight", "channel_offset")
EXTRA_EVAL_KEYS = DATA_SOURCE_KEYS + ("channel_offset",)


def _check_classes(where: str, classes) -> None:
  if (
      isinstance(classes, str)
      or not isinstance(classes, (tuple, list))
      or not all(isinstance(c, str) and c and "," not in c for c in classes)
      or len(set(classes)) != len(tuple(classes))
  ):
    raise ConfigError(
        f"{where}.classes must be a tuple of distinct class names, e.g. ('person', 'car'), "
        f"got {classes!r}"
    )


def _check_source(where: str, src, num_classes: int, *, evaluated: bool) -> None:
  """One dataset description (`data`, or an entry merged onto the schema defaults)."""
  kind = catalog.get(src["dataset"], field=f"{where}.dataset")
  crowdhuman.check_source(where, src)
  _check_classes(where, src["classes"])
  offset = src["channel_offset"]
  if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
    raise ConfigError(f"{where}.channel_offset must be an integer >= 0, got {offset!r}")
  if not kind.labelled:
    if tuple(src["classes"]):
      raise ConfigError(f"{where}.classes: an {kind.name} dataset has no classes (no labels)")
    if evaluated and src["eval_split"]:
      raise ConfigError(
          f"{where}.eval_split={src['eval_split']!r}: an {kind.name} dataset has no annotations "
          f"to evaluate; set {where}.eval_split='' (evaluate other datasets with data.extra_eval)"
      )
  n = len(tuple(src["classes"])) or kind.fixed_num_classes or 0
  if offset + n > num_classes:
    raise ConfigError(
        f"{where}.channel_offset={offset} + its {n} classes exceed model.num_classes={num_classes}"
    )


def _entry_source(where: str, entry, allowed, defaults) -> dict:
  """A data.mixture / data.extra_eval entry merged onto the schema's `data` defaults."""
  if not isinstance(entry, (dict, ml_collections.ConfigDict)):
    raise ConfigError(f"{where} must be a dict of {', '.join(allowed)}, got {entry!r}")
  for key in entry.keys():
    if key not in allowed:
      raise ConfigError(f"{where}.{key} is not a key of this entry (keys: {', '.join(allowed)})")
  if "dataset" not in entry:
    raise ConfigError(f"{where} needs a 'dataset' (one of {catalog.names()})")
  src = {k: defaults[k] for k in DATA_SOURCE_KEYS}
  src["channel_offset"] = 0
  for key, value in entry.items():
    want = type(defaults[key]) if key in defaults else None
    if key == "classes":
      pass  # checked by _check_classes
    elif key == "weight":
      ok = isinstance(value, (int, float)) and not isinstance(value, bool)
      if not (ok and math.isfinite(value) and value > 0):
        raise ConfigError(f"{where}.weight must be a number > 0, got {value!r}")
    elif want is not None and (
        isinstance(value, bool) != (want is bool) or not isinstance(value, want)
    ):
      raise ConfigError(f"{where}.{key} must be a {want.__name__}, got {value!r}")
    src[key] = value
  return src


def _validate_sources(cfg) -> None:
  """`data` as dataset 0 of a mixture, data.mixture and data.extra_eval."""
  d, num_classes = cfg.data, cfg.model.num_classes
  defaults = base_config().data
  main = {k: d[k] for k in DATA_SOURCE_KEYS}
  main["channel_offset"] = d.channel_offset
  _check_source("data", main, num_classes, evaluated=True)
  if not (isinstance(d.mix_weight, (int, float)) and d.mix_weight > 0):
    raise ConfigError(f"data.mix_weight must be a number > 0, got {d.mix_weight!r}")
  for key in ("mixture", "extra_eval"):
    if not isinstance(d[key], (tuple, list)):
      raise ConfigError(f"data.{key} must be a tuple of dicts, got {d[key]!r}")
  for i, entry in enumerate(d.mixture):
    where = f"data.mixture[{i}]"
    src = _entry_source(where, entry, MIXTURE_KEYS, defaults)
    _check_source(where, src, num_classes, evaluated=False)
    if not src["train_split"]:
      raise ConfigError(f"{where}.train_split is empty: a mixture entry is trained on")
  names = set()
  for i, entry in enumerate(d.extra_eval):
    where = f"data.extra_eval[{i}]"
    src = _entry_source(where, entry, EXTRA_EVAL_KEYS, defaults)
    _check_source(where, src, num_classes, evaluated=True)
    name = entry.get("name", "")
    if not name or "/" in name or name in names:
      raise ConfigError(
          f"{where}.name must be a distinct non-empty label without '/' (its metrics are "
          f"'<name>/AP', ...), got {name!r}"
      )
    names.add(name)
    if not catalog.get(src["dataset"]).labelled or not src["eval_split"]:
      raise ConfigError(f"{where} needs an eval_split with annotations to evaluate")


CONFIG = schema.group(
    "data",
    "Several datasets in one run (this module). The dataset of `data` is dataset 0 of the "
    "training mixture; each data.mixture entry is a dict of DATA_SOURCE_KEYS (unset keys take "
    "the schema defaults, not the values of `data`; 'dataset' is required) plus 'weight' and "
    "'channel_offset', e.g. ({'dataset': 'wider_face', 'root': '/data/WIDER_FACE', 'weight': "
    "1.0, 'channel_offset': 1},). Examples are drawn per image with probability proportional to "
    "the weights; a dataset's label i is the model's class channel_offset + i. An epoch of a "
    "mixture (optim.epochs) = the training images of all its datasets together.",
    schema.Field("mix_weight", 1.0, "sampling weight of the dataset of `data` in a mixture"),
    schema.Field("channel_offset", 0, "its label i -> model class channel_offset + i"),
    schema.Field(
        "mixture", (), "more training datasets: dicts of DATA_SOURCE_KEYS + weight, channel_offset"
    ),
    schema.Field(
        "extra_eval",
        (),
        "more evaluations after the main one: dicts of DATA_SOURCE_KEYS + channel_offset, with "
        "'name' the label of their metrics ('{name}/AP' ... in eval/metrics.json and "
        "TensorBoard); each is evaluated on its eval_split with the model's classes "
        "[channel_offset, channel_offset + its classes) as its labels (centerX coco_car_val: car "
        "at channel 1)",
    ),
    validate=_validate_sources,
)
