"""Training samplers of the official LVIS / Objects365 recipes, as pure functions of
``(seed, epoch)`` (``schedule._SampledSchedule`` turns them into a step -> examples map).

``data.sampler_train`` (detectron2 / CenterNet2 ``DATALOADER.SAMPLER_TRAIN``):

* ``"TrainingSampler"``: every training image once per epoch, shuffled (``schedule.py``'s plain
  and aspect-grouped schedules; nothing here).
* ``"RepeatFactorTrainingSampler"`` (LVIS configs, ``DATALOADER.REPEAT_THRESHOLD`` 0.001):
  detectron2 ``RepeatFactorTrainingSampler``. Category ``c`` is in a fraction ``f(c)`` of the
  training images; its repeat factor is ``r(c) = max(1, sqrt(t / f(c)))``; an image repeats
  ``r(I) = max_{c in I} r(c)`` times per epoch (1 without categories). Fractional factors are
  rounded stochastically each epoch (``floor(r) + [u < r - floor(r)]``, ``u ~ U[0, 1)``), so an
  epoch's length varies and the factor holds in expectation; the epoch's list (each image
  repeated) is then shuffled. (:func:`repeat_factors_from_category_frequency`,
  :func:`repeat_factor_epoch`.)
* ``"ClassAwareSampler"`` (Objects365 config; CenterNet2
  ``centernet/data/custom_dataset_dataloader.py``): image ``I`` has weight
  ``w(I) = sum_{c in I} 1 / n(c)``, ``n(c)`` the number of training images holding ``c``; an
  epoch is ``N`` (the number of training images) draws with replacement, ``P(I) ~ w(I)``
  (torch.multinomial there). (:func:`class_balance_weights`, :func:`class_aware_epoch`.)

"Training images" are those the train loader draws from (after ``data.filter_empty``), and an
image's categories are those of all its annotations, crowd ones included, as detectron2 counts
them over its dataset dicts (:func:`image_categories_from_split` reads them from the split's
annotation json).

Random streams (see ``schedule.py`` for streams 0-5): epoch ``e`` of the repeat-factor sampler
draws its rounding and then its permutation from ``default_rng([seed, 6, e])``; the class-aware
sampler its draws from ``default_rng([seed, 7, e])``; with aspect grouping the order of an epoch's
batches comes from ``default_rng([seed, stream, e, 1])``. Nothing depends on earlier epochs'
draws except their lengths, so a step's examples are a pure function of ``(seed, step)``.
The numbers differ from detectron2's torch generator (same distributions, other draws).
"""

from __future__ import annotations

import json
import logging
from typing import Iterable, List, Optional, Sequence

import numpy as np

from cn2_jax import schema
from cn2_jax.errors import ConfigError

logger = logging.getLogger("cn2_jax.data.pipeline")

TRAINING_SAMPLER = "TrainingSampler"
REPEAT_FACTOR_SAMPLER = "RepeatFactorTrainingSampler"
CLASS_AWARE_SAMPLER = "ClassAwareSampler"
SAMPLERS = (TRAINING_SAMPLER, REPEAT_FACTOR_SAMPLER, CLASS_AWARE_SAMPLER)
DEFAULT_REPEAT_THRESHOLD = 0.001  # CenterNet2 LVIS configs' DATALOADER.REPEAT_THRESHOLD

RFS_STREAM = 6
CLASS_AWARE_STREAM = 7
_BATCH_ORDER_SUBSTREAM = 1  # default_rng([seed, stream, epoch, 1]): grouped batch order

__all__ = [
    "SAMPLERS",
    "TRAINING_SAMPLER",
    "REPEAT_FACTOR_SAMPLER",
    "CLASS_AWARE_SAMPLER",
    "DEFAULT_REPEAT_THRESHOLD",
    "check_sampler",
    "repeat_factors_from_category_frequency",
    "repeat_counts",
    "repeat_factor_epoch",
    "class_balance_weights",
    "class_aware_epoch",
    "epoch_indices",
    "batch_order_rng",
    "image_categories_from_coco",
    "image_categories_from_split",
]


def check_sampler(name: str) -> str:
  if name not in SAMPLERS:
    raise ValueError(f"data.sampler_train must be one of {SAMPLERS}, got {name!r}")
  return name


def _flatten(image_categories: Sequence[Iterable[int]]):
  """``(image index, category)`` of every distinct category of every image, as two int64
  arrays, plus the number of images."""
  sets = [np.unique(np.asarray(list(c) if not isinstance(c, np.ndarray) else c, np.int64))
          for c in image_categories]  # fmt: skip
  n = len(sets)
  sizes = np.array([len(s) for s in sets], np.int64)
  cats = np.concatenate(sets) if n and sizes.sum() else np.zeros(0, np.int64)
  img = np.repeat(np.arange(n, dtype=np.int64), sizes)
  return img, cats, n


def repeat_factors_from_category_frequency(
    image_categories: Sequence[Iterable[int]], repeat_threshold: float, sqrt: bool = True
) -> np.ndarray:
  """Per-image repeat factors ``[N]`` float64 (detectron2
  ``RepeatFactorTrainingSampler.repeat_factors_from_category_frequency``).

  ``image_categories[i]``: the category ids (any integers; repeats allowed) of training image
  ``i``. ``f(c)`` = fraction of the ``N`` images holding ``c``; ``r(c) = max(1, sqrt(t / f(c)))``
  (``t / f(c)`` without ``sqrt``); ``r(I) = max_{c in I} r(c)``, 1 for an image without
  categories."""
  if not repeat_threshold > 0:
    raise ValueError(f"data.repeat_threshold must be > 0, got {repeat_threshold!r}")
  img, cats, n = _flatten(image_categories)
  factors = np.ones(n, np.float64)
  if not cats.size:
    return factors
  uniq, inv = np.unique(cats, return_inverse=True)
  freq = np.bincount(inv, minlength=len(uniq)) / float(n)  # each image counts a category once
  ratio = float(repeat_threshold) / freq
  cat_rep = np.maximum(1.0, np.sqrt(ratio) if sqrt else ratio)
  np.maximum.at(factors, img, cat_rep[inv])
  return factors


def _epoch_rng(stream: int, seed: int, epoch: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), stream, int(epoch)])


def batch_order_rng(sampler: str, seed: int, epoch: int) -> np.random.Generator:
  """The generator that orders the aspect-grouped batches of ``epoch`` of ``sampler``."""
  stream = RFS_STREAM if sampler == REPEAT_FACTOR_SAMPLER else CLASS_AWARE_STREAM
  return np.random.default_rng([int(seed), stream, int(epoch), _BATCH_ORDER_SUBSTREAM])


def _stochastic_round(repeat_factors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  r = np.asarray(repeat_factors, np.float64)
  whole = np.floor(r)
  return (whole + (rng.random(r.shape[0]) < (r - whole))).astype(np.int64)


def repeat_counts(repeat_factors, seed: int, epoch: int) -> np.ndarray:
  """How often each image appears in ``epoch`` (``[N]`` int64): the stochastic rounding, the
  first draw of the epoch's generator (so the epoch's length needs no permutation)."""
  return _stochastic_round(repeat_factors, _epoch_rng(RFS_STREAM, seed, epoch))


def repeat_factor_epoch(repeat_factors, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
  """The image indices of ``epoch`` of the repeat-factor sampler, in sampling order: image ``i``
  ``repeat_counts(...)[i]`` times, then shuffled (detectron2 ``_get_epoch_indices`` + randperm)."""
  rng = _epoch_rng(RFS_STREAM, seed, epoch)
  reps = _stochastic_round(repeat_factors, rng)
  idx = np.repeat(np.arange(reps.shape[0], dtype=np.int64), reps)
  return idx[rng.permutation(idx.shape[0])] if shuffle else idx


def epoch_indices(repeat_factors, seed: int, epoch: int) -> np.ndarray:
  """Alias of :func:`repeat_factor_epoch` (shuffled)."""
  return repeat_factor_epoch(repeat_factors, seed, epoch)


def class_balance_weights(
    image_categories: Sequence[Iterable[int]], power: float = 1.0
) -> np.ndarray:
  """Per-image weights ``[N]`` float64 of the class-aware sampler (CenterNet2
  ``ClassAwareSampler._get_class_balance_factor``): ``sum_{c in I} 1 / n(c) ** power``, ``n(c)``
  the number of images holding ``c``; 0 for an image without categories."""
  img, cats, n = _flatten(image_categories)
  weights = np.zeros(n, np.float64)
  if not cats.size:
    return weights
  uniq, inv = np.unique(cats, return_inverse=True)
  count = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
  np.add.at(weights, img, 1.0 / count[inv] ** float(power))
  return weights


def class_aware_epoch(weights, seed: int, epoch: int, size: Optional[int] = None) -> np.ndarray:
  """``size`` (default ``N``) image indices drawn with replacement, ``P(i) ~ weights[i]``, for
  ``epoch`` of the class-aware sampler."""
  w = np.asarray(weights, np.float64)
  total = w.sum()
  if not (w.ndim == 1 and w.size and np.all(w >= 0) and total > 0 and np.isfinite(total)):
    raise ValueError("class-aware sampling needs non-negative weights with a positive sum")
  n = int(w.shape[0] if size is None else size)
  return _epoch_rng(CLASS_AWARE_STREAM, seed, epoch).choice(w.shape[0], size=n, p=w / total)


# ----------------------------------------------------------------------------------------------
# The categories of each training image
# ----------------------------------------------------------------------------------------------
def image_categories_from_coco(coco, image_ids: Sequence[int]) -> List[np.ndarray]:
  """The distinct category ids of every annotation (crowd ones included) of each image of
  ``image_ids``, from a COCO-format dict or json path."""
  if not isinstance(coco, dict):
    with open(coco, "rb") as f:
      coco = json.load(f)
  by_image = {int(i): set() for i in image_ids}
  for a in coco.get("annotations", []):
    s = by_image.get(int(a["image_id"]))
    if s is not None:
      s.add(int(a["category_id"]))
  return [np.array(sorted(by_image[int(i)]), np.int64) for i in image_ids]


def image_categories_from_split(split) -> List[np.ndarray]:
  """The categories of each example of a ``splits.DetectionSplit`` (``[len(split)]`` arrays):
  from the annotation json its build recorded (category ids, as detectron2 counts them), or, if
  that json or the per-example image ids are unavailable, from the prepared examples' labels
  (reads every example once; degenerate boxes dropped at build time are then missing)."""
  info = getattr(split, "info", None)
  ann = info.annotation_file(split.name) if info is not None and split.name else None
  if ann and split.image_id is not None:
    try:
      return image_categories_from_coco(ann, [int(i) for i in split.image_id])
    except OSError as e:
      logger.warning("cannot read %s (%s): reading the labels of the prepared examples", ann, e)
  logger.warning(
      "sampler: reading the labels of %d prepared examples of %s once", len(split),
      split.name or "the split",
  )  # fmt: skip
  return [np.unique(np.asarray(split[i]["objects"]["label"], np.int64)) for i in range(len(split))]


def _validate_sampler(cfg) -> None:
  if cfg.data.sampler_train not in SAMPLERS:
    raise ConfigError(
        f"data.sampler_train must be one of {SAMPLERS}, got {cfg.data.sampler_train!r}"
    )
  if cfg.data.repeat_threshold <= 0:
    raise ConfigError(f"data.repeat_threshold must be > 0, got {cfg.data.repeat_threshold}")


CONFIG = schema.group(
    "data",
    "Training sampler (DATALOADER.SAMPLER_TRAIN).",
    schema.Field(
        "sampler_train",
        "TrainingSampler",
        "'TrainingSampler' (each image once per epoch), 'RepeatFactorTrainingSampler' (LVIS: an "
        "image repeats max over its categories of max(1, sqrt(repeat_threshold / f(c))) times, "
        "f(c) = fraction of training images holding c) or 'ClassAwareSampler' (Objects365: "
        "images drawn with probability ~ sum over their categories of 1 / #images of the "
        "category). Not with data.mixture",
    ),
    schema.Field("repeat_threshold", 0.001, "DATALOADER.REPEAT_THRESHOLD"),
    validate=_validate_sampler,
)
