"""The train loader's sampling schedules: global step -> the source indices of its examples.

Each is a pure function of ``(seed, step)`` (exact resume for any number of workers), drawing
from its own numpy streams ``default_rng([seed, stream, ...])`` (the stream numbers below; the
batcher's per-example draws use streams 1, 3 and 4): plain shuffled epochs (``_RandomSchedule``),
aspect-grouped epochs (``_GroupedSchedule``) and a weighted mixture of datasets
(``_MixtureSchedule``). Part of the input pipeline (``pipeline.py`` lists the modules).
"""

from __future__ import annotations

import logging
from typing import Dict, Tuple

import numpy as np

logger = logging.getLogger("cn2_jax.data.pipeline")

_PERM_STREAM = 0
_AUG_STREAM = 1
_BATCH_ORDER_STREAM = 2
_SCALE_STREAM = 3
_EXTRA_AUG_STREAM = 4  # augment.py's crop / warp / colour draws
_MIX_STREAM = 5  # per-dataset epoch permutations of a mixture


class _EpochCache:
  """Per-epoch arrays of a schedule, kept for the two newest epochs (a step reads at most two);
  the cache is not pickled to grain workers."""

  _cache: Dict[int, np.ndarray]

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_cache"] = {}
    return state

  def _cached(self, epoch: int, make) -> np.ndarray:
    v = self._cache.get(epoch)
    if v is None:
      if len(self._cache) >= 2:
        self._cache.pop(min(self._cache))
      v = self._cache[epoch] = make(epoch)
    return v

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, _PERM_STREAM, epoch]).permutation(len(self.order))


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
    self.steps_per_epoch = int(
        (counts // global_batch).sum() + (counts % global_batch).sum() // global_batch
    )
    self._cache = {}

  def _epoch(self, epoch: int) -> np.ndarray:
    return self._cached(epoch, self._make_epoch)

  def _make_epoch(self, epoch: int) -> np.ndarray:
    """``[steps_per_epoch, global_batch]`` positions into ``order``."""
    gb = self.global_batch
    perm = self._permutation(epoch)
    grp = self.groups[perm]
    full, rest = [], np.zeros(len(perm), bool)
    for g in np.unique(grp):
      where = np.nonzero(grp == g)[0]  # positions in perm, in perm order
      k = len(where) // gb
      if k:
        full.append(perm[where[: k * gb]].reshape(k, gb))
      rest[where[k * gb :]] = True
    left = perm[rest]
    m = len(left) // gb
    if m:
      full.append(left[: m * gb].reshape(m, gb))
    b = np.concatenate(full, axis=0)
    return b[np.random.default_rng([self.seed, _BATCH_ORDER_STREAM, epoch]).permutation(len(b))]

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
    self.orders = [np.asarray(o, np.int64) for o in orders]
    self.weights = tuple(float(w) for w in weights)
    self.global_batch = global_batch
    self.seed = seed
    if len(self.orders) != len(self.weights) or not self.orders:
      raise ValueError("one weight per dataset of the mixture")
    empty = [k for k, o in enumerate(self.orders) if not len(o)]
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
      import grain

      s = self._STRIDE
      self._mix = grain.MapDataset.mix(
          [grain.MapDataset.range(k * s, (k + 1) * s) for k in range(len(self.orders))],
          list(self.weights),
      )
    return self._mix

  def draw(self, g: int) -> Tuple[int, int]:
    """``(dataset k, draw j of that dataset)`` of global example position ``g``."""
    k, j = divmod(int(self._mixed()[int(g)]), self._STRIDE)
    return int(k), int(j)

  def _perm(self, k: int, epoch: int) -> np.ndarray:
    cache = self._cache.setdefault(k, {})
    v = cache.get(epoch)
    if v is None:
      if len(cache) >= 2:
        cache.pop(min(cache))
      rng = np.random.default_rng([self.seed, _MIX_STREAM, k, epoch])
      v = cache[epoch] = rng.permutation(len(self.orders[k]))
    return v

  def indices(self, step: int) -> np.ndarray:
    """Source indices of the ``global_batch`` examples of ``step``."""
    g0 = int(step) * self.global_batch
    out = np.empty(self.global_batch, np.int64)
    for slot in range(self.global_batch):
      k, j = self.draw(g0 + slot)
      e, p = divmod(j, len(self.orders[k]))
      out[slot] = self.orders[k][self._perm(k, e)[p]]
    return out


def _make_schedule(order, groups, global_batch: int, seed: int, *, aspect_grouping: bool):
  """The train loader's step -> examples map: aspect-grouped epochs when asked and possible
  (group sizes known, at least one full batch), else plain shuffled epochs."""
  if aspect_grouping and groups is not None:
    schedule = _GroupedSchedule(order, groups[order], global_batch, seed)
    if schedule.steps_per_epoch > 0:
      return schedule
    logger.warning(
        "aspect grouping: %d images < one global batch of %d; not grouping",
        len(order),
        global_batch,
    )
  return _RandomSchedule(order, global_batch, seed)
