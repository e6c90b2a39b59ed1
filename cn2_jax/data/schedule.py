"""The train loader's sampling schedules: global step -> the source indices of its examples.

Each is a pure function of ``(seed, step)`` (exact resume for any number of workers), drawing
from its own numpy streams ``default_rng([seed, stream, ...])`` (the stream numbers below; the
batcher's per-example draws use streams 1, 3 and 4): plain shuffled epochs (``_RandomSchedule``),
aspect-grouped epochs (``_GroupedSchedule``), a weighted mixture of datasets
(``_MixtureSchedule``), and the repeat-factor / class-aware samplers of the LVIS / Objects365
recipes (``_SampledSchedule``, plain or aspect-grouped; ``sampling.py``, streams 6 and 7). Part of
the input pipeline (``pipeline.py`` lists the modules).
"""

from __future__ import annotations

import bisect
import logging
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from cn2_jax.data import sampling

logger = logging.getLogger("cn2_jax.data.pipeline")

_PERM_STREAM = 0
_AUG_STREAM = 1
_BATCH_ORDER_STREAM = 2
_SCALE_STREAM = 3
_EXTRA_AUG_STREAM = 4  # augment.py's crop / warp / colour draws
_MIX_STREAM = 5  # per-dataset epoch permutations of a mixture
# 6: repeat-factor epochs, 7: class-aware epochs (sampling.RFS_STREAM, sampling.CLASS_AWARE_STREAM)


class _EpochCache:
  """Per-epoch arrays of a schedule, kept for the two newest epochs (a step reads at most two);
  the cache is not pickled to grain workers."""

  _cache: Dict[int, np.ndarray]

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_cache"] = {}
    return state

  def _cached(self, epoch: int, make) -> np.ndarray:
    value = self._cache.get(epoch)
    if value is None:
      if len(self._cache) >= 2:
        self._cache.pop(min(self._cache))
      value = self._cache[epoch] = make(epoch)
    return value

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, _PERM_STREAM, epoch]).permutation(len(self.order))


def _group_batches(items: np.ndarray, item_groups: np.ndarray, gb: int) -> np.ndarray:
  """``items`` (in sampling order) cut into ``[k, gb]`` batches: each aspect group's items in
  order into full batches, then the groups' remainders (in sampling order) into mixed batches;
  what is left (< one batch) is dropped. ``k = _num_group_batches(bincount(item_groups), gb)``."""
  full, rest = [], np.zeros(len(items), bool)
  for g in np.unique(item_groups):
    where = np.nonzero(item_groups == g)[0]  # positions in items, in items order
    k = len(where) // gb
    if k:
      full.append(items[where[: k * gb]].reshape(k, gb))
    rest[where[k * gb :]] = True
  left = items[rest]
  m = len(left) // gb
  if m:
    full.append(left[: m * gb].reshape(m, gb))
  if not full:
    return np.zeros((0, gb), np.int64)
  return np.concatenate(full, axis=0)


def _num_group_batches(counts: np.ndarray, gb: int) -> int:
  """Batches :func:`_group_batches` makes from groups of ``counts`` items."""
  counts = np.asarray(counts, np.int64)
  return int((counts // gb).sum() + (counts % gb).sum() // gb)


class _RandomSchedule(_EpochCache):
  """No grouping: global example position ``g`` -> epoch ``g // n``, position ``g % n`` of that
  epoch's permutation (``default_rng([seed, 0, epoch])``)."""

  def __init__(self, order: np.ndarray, global_batch: int, seed: int):
    self.order = order  # source indices of the examples used for training
    self.global_batch = global_batch
    self.seed = seed
    self._cache = {}

  def _perm(self, epoch: int) -> np.ndarray:
    return self._cached(epoch, self._permutation)

  def indices(self, step: int) -> np.ndarray:
    """Source indices of the ``global_batch`` examples of ``step``."""
    n = len(self.order)
    g0 = int(step) * self.global_batch
    return np.array(
        [self.order[self._perm((g0 + j) // n)[(g0 + j) % n]] for j in range(self.global_batch)],
        np.int64,
    )


class _GroupedSchedule(_EpochCache):
  """Aspect-ratio grouping (detectron2 ``ASPECT_RATIO_GROUPING``), as a pure function of step.

  Epoch ``e``: the training examples are permuted (``default_rng([seed, 0, e])``), split by
  aspect group keeping that order, and each group is cut into full global batches; the
  remainders of all groups (in permutation order) form mixed batches, and what is left after
  those (< one batch) is skipped this epoch. The epoch's batches are then shuffled
  (``default_rng([seed, 2, e])``). Group sizes are fixed, so every epoch has the same number of
  steps and ``step -> batch`` needs no history (exact resume, any number of workers).
  """

  def __init__(self, order: np.ndarray, groups: np.ndarray, global_batch: int, seed: int):
    self.order = order
    self.groups = np.asarray(groups, np.int64)  # group of each entry of ``order``
    self.global_batch = global_batch
    self.seed = seed
    counts = np.bincount(self.groups) if len(self.groups) else np.zeros(0, np.int64)
    self.steps_per_epoch = _num_group_batches(counts, global_batch)
    self._cache = {}

  def _epoch(self, epoch: int) -> np.ndarray:
    return self._cached(epoch, self._make_epoch)

  def _make_epoch(self, epoch: int) -> np.ndarray:
    """``[steps_per_epoch, global_batch]`` positions into ``order``."""
    perm = self._permutation(epoch)
    batches = _group_batches(perm, self.groups[perm], self.global_batch)
    return batches[
        np.random.default_rng([self.seed, _BATCH_ORDER_STREAM, epoch]).permutation(len(batches))
    ]

  def indices(self, step: int) -> np.ndarray:
    e, j = divmod(int(step), self.steps_per_epoch)
    return self.order[self._epoch(e)[j]]


class _MixtureSchedule:
  """Several datasets sampled by weight, per example slot, as a pure function of ``(seed, step)``.

  ``orders[k]``: the (concatenated) source indices of dataset ``k``'s training examples. Global
  example position ``g`` (``step * global_batch + slot``) -> ``(k, j)``: the dataset and its
  draw count that ``grain.MapDataset.mix`` (weights ``weights``) puts at position ``g`` of its
  weighted interleaving of the datasets (grain scales the weights so that the smallest is 100 and
  truncates them to integers; any ``sum`` of those consecutive positions holds each dataset
  exactly in proportion); draw ``j`` of dataset ``k`` is position ``j % n_k`` of its epoch
  ``j // n_k``, a permutation ``default_rng([seed, 5, k, epoch])``. Every dataset cycles through
  its own epochs independently of the others, so a small dataset with a large weight repeats
  more often; no history is needed (exact resume, any number of workers)."""

  _STRIDE = 1 << 40  # dataset k's draws are k * _STRIDE + j in grain's mixed index space

  def __init__(self, orders, weights, global_batch: int, seed: int):
    self.orders = [np.asarray(order, np.int64) for order in orders]
    self.weights = tuple(float(w) for w in weights)
    self.global_batch = global_batch
    self.seed = seed
    if len(self.orders) != len(self.weights) or not self.orders:
      raise ValueError("one weight per dataset of the mixture")
    empty = [index for index, order in enumerate(self.orders) if not len(order)]
    if empty:
      raise ValueError(f"dataset {empty[0]} of the training mixture has no training examples")
    self._mix = None
    self._cache = {}

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_mix"], state["_cache"] = None, {}
    return state

  def _mixed(self):
    if self._mix is None:
      import grain  # start-up time: grain (~0.5 s, with orbax) only for a dataset mixture

      stride = self._STRIDE
      self._mix = grain.MapDataset.mix(
          [grain.MapDataset.range(k * stride, (k + 1) * stride) for k in range(len(self.orders))],
          list(self.weights),
      )
    return self._mix

  def draw(self, g: int) -> Tuple[int, int]:
    """``(dataset k, draw j of that dataset)`` of global example position ``g``."""
    k, j = divmod(int(self._mixed()[int(g)]), self._STRIDE)
    return int(k), int(j)

  def _perm(self, k: int, epoch: int) -> np.ndarray:
    cache = self._cache.setdefault(k, {})
    perm = cache.get(epoch)
    if perm is None:
      if len(cache) >= 2:
        cache.pop(min(cache))
      rng = np.random.default_rng([self.seed, _MIX_STREAM, k, epoch])
      perm = cache[epoch] = rng.permutation(len(self.orders[k]))
    return perm

  def indices(self, step: int) -> np.ndarray:
    """Source indices of the ``global_batch`` examples of ``step``."""
    g0 = int(step) * self.global_batch
    out = np.empty(self.global_batch, np.int64)
    for slot in range(self.global_batch):
      k, j = self.draw(g0 + slot)
      e, p = divmod(j, len(self.orders[k]))
      out[slot] = self.orders[k][self._perm(k, e)[p]]
    return out


class _SampledSchedule(_EpochCache):
  """The repeat-factor or class-aware sampler (``sampling.py``) as a pure function of step.

  Epoch ``e`` is the sampler's list of positions into ``order`` for that epoch (repeat factors:
  each image ``floor(r)`` or ``ceil(r)`` times, shuffled; class-aware: ``len(order)`` weighted
  draws with replacement), drawn from ``default_rng([seed, 6 or 7, e])``. Without ``groups`` the
  example stream is the concatenation of the epochs (global example position ``g`` -> the epoch
  holding it); with ``groups`` (aspect grouping) each epoch's list is cut into batches as
  ``_GroupedSchedule`` cuts a permutation, and the batches are shuffled
  (``sampling.batch_order_rng``). Epoch lengths vary (stochastic rounding, group counts), so
  step -> epoch uses the cumulative lengths of the epochs before, each a function of ``(seed,
  epoch)`` alone: no history of the run (exact resume, any number of workers)."""

  def __init__(
      self,
      order: np.ndarray,
      global_batch: int,
      seed: int,
      *,
      sampler: str,
      weights: np.ndarray,
      groups: Optional[np.ndarray] = None,
  ):
    self.order = np.asarray(order, np.int64)
    self.global_batch = int(global_batch)
    self.seed = int(seed)
    self.sampler = sampling.check_sampler(sampler)
    if sampler == sampling.TRAINING_SAMPLER:
      raise ValueError("_SampledSchedule: TrainingSampler uses _RandomSchedule / _GroupedSchedule")
    # Repeat factors (RepeatFactorTrainingSampler) or image weights (ClassAwareSampler), one per
    # entry of ``order``.
    self.weights = np.asarray(weights, np.float64)
    if self.weights.shape != self.order.shape:
      raise ValueError(f"{self.weights.shape[0]} sampler weights for {len(self.order)} examples")
    if sampler == sampling.REPEAT_FACTOR_SAMPLER and not np.all(self.weights >= 1.0):
      raise ValueError("repeat factors must be >= 1")
    if sampler == sampling.CLASS_AWARE_SAMPLER and not self.weights.sum() > 0:
      raise ValueError("class-aware sampling: no training image has a category")
    self.groups = None if groups is None else np.asarray(groups, np.int64)
    if self.groups is not None and len(self.order) < self.global_batch:
      raise ValueError("aspect grouping needs at least one global batch of examples")
    self._cache = {}
    self._ends = []  # _ends[e]: examples (steps, if grouped) of epochs 0..e together

  def _draw(self, epoch: int) -> np.ndarray:
    """Positions into ``order`` of ``epoch``, in sampling order."""
    if self.sampler == sampling.REPEAT_FACTOR_SAMPLER:
      return sampling.repeat_factor_epoch(self.weights, self.seed, epoch)
    return sampling.class_aware_epoch(self.weights, self.seed, epoch)

  def _length(self, epoch: int) -> int:
    """Examples (steps, if grouped) of ``epoch``; >= 1 (factors >= 1, >= one global batch)."""
    if self.sampler == sampling.REPEAT_FACTOR_SAMPLER:
      reps = sampling.repeat_counts(self.weights, self.seed, epoch)
      if self.groups is None:
        return int(reps.sum())
      return _num_group_batches(np.bincount(self.groups, weights=reps).astype(np.int64),
                                self.global_batch)  # fmt: skip
    if self.groups is None:
      return len(self.order)
    return _num_group_batches(np.bincount(self.groups[self._draw(epoch)]), self.global_batch)

  def _locate(self, g: int) -> Tuple[int, int]:
    """``(epoch, offset in it)`` of stream position ``g`` (example, or step if grouped)."""
    while not self._ends or self._ends[-1] <= g:
      self._ends.append((self._ends[-1] if self._ends else 0) + self._length(len(self._ends)))
    e = bisect.bisect_right(self._ends, g)
    return e, g - (self._ends[e - 1] if e else 0)

  def _epoch(self, epoch: int) -> np.ndarray:
    return self._cached(epoch, self._make_epoch)

  def _make_epoch(self, epoch: int) -> np.ndarray:
    """The epoch's positions into ``order`` (``[L]``, or ``[steps, global_batch]`` if grouped)."""
    draw = self._draw(epoch)
    if self.groups is None:
      return draw
    batches = _group_batches(draw, self.groups[draw], self.global_batch)
    return batches[
        sampling.batch_order_rng(self.sampler, self.seed, epoch).permutation(len(batches))
    ]

  def epoch_of_step(self, step: int) -> int:
    """The sampler epoch that step ``step`` starts in."""
    g = int(step) if self.groups is not None else int(step) * self.global_batch
    return self._locate(g)[0]

  def indices(self, step: int) -> np.ndarray:
    """Source indices of the ``global_batch`` examples of ``step``."""
    if self.groups is not None:
      e, j = self._locate(int(step))
      return self.order[self._epoch(e)[j]]
    g0 = int(step) * self.global_batch
    out = np.empty(self.global_batch, np.int64)
    for slot in range(self.global_batch):
      e, p = self._locate(g0 + slot)
      out[slot] = self.order[self._epoch(e)[p]]
    return out


def _sampler_weights(order, sampler: str, image_categories, repeat_threshold: float) -> np.ndarray:
  """Repeat factors / class-aware weights of the training examples ``order`` (source indices),
  from ``image_categories[i]`` (the categories of source example ``i``)."""
  if image_categories is None:
    raise ValueError(f"data.sampler_train={sampler!r} needs the categories of each image")
  cats = [image_categories[int(i)] for i in order]
  if sampler == sampling.REPEAT_FACTOR_SAMPLER:
    w = sampling.repeat_factors_from_category_frequency(cats, repeat_threshold)
    logger.info(
        "repeat-factor sampling (threshold %g): %d images, mean repeat factor %.3f, %d repeated",
        repeat_threshold,
        len(w),
        float(w.mean()) if len(w) else 0.0,
        int((w > 1).sum()),
    )
    return w
  w = sampling.class_balance_weights(cats)
  logger.info(
      "class-aware sampling: %d images, %d without categories (never drawn)",
      len(w),
      int((w == 0).sum()),
  )
  return w


def _make_schedule(
    order,
    groups,
    global_batch: int,
    seed: int,
    *,
    aspect_grouping: bool,
    sampler: str = sampling.TRAINING_SAMPLER,
    image_categories: Optional[Sequence] = None,
    repeat_threshold: float = sampling.DEFAULT_REPEAT_THRESHOLD,
):
  """The train loader's step -> examples map: aspect-grouped epochs when asked and possible
  (group sizes known, at least one full batch), else plain shuffled epochs.

  ``sampler`` (``data.sampler_train``): ``"TrainingSampler"`` (each image once per epoch),
  ``"RepeatFactorTrainingSampler"`` (``repeat_threshold``) or ``"ClassAwareSampler"``
  (``_SampledSchedule``); the latter two need ``image_categories``, indexed by source index like
  ``groups`` (``sampling.image_categories_from_split``)."""
  sampler = sampling.check_sampler(sampler)
  grouped = aspect_grouping and groups is not None
  if sampler != sampling.TRAINING_SAMPLER:
    weights = _sampler_weights(order, sampler, image_categories, repeat_threshold)
    if grouped and len(order) < global_batch:
      logger.warning(
          "aspect grouping: %d images < one global batch of %d; not grouping",
          len(order),
          global_batch,
      )
      grouped = False
    return _SampledSchedule(
        order,
        global_batch,
        seed,
        sampler=sampler,
        weights=weights,
        groups=np.asarray(groups, np.int64)[order] if grouped else None,
    )
  if grouped:
    schedule = _GroupedSchedule(order, groups[order], global_batch, seed)
    if schedule.steps_per_epoch > 0:
      return schedule
    logger.warning(
        "aspect grouping: %d images < one global batch of %d; not grouping",
        len(order),
        global_batch,
    )
  return _RandomSchedule(order, global_batch, seed)
