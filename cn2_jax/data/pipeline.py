"""grain input pipelines producing numpy batches with the DESIGN.md batch contract (no JAX here).

Every batch (train and eval) follows the batch contract of docs/DESIGN.md (the single statement of
it: keys, shapes, dtypes). Padding examples of the last eval batch are all-zero images with
``batch_mask=False``, ``image_id=-1`` and ``image_hw`` = ``orig_hw`` = the canvas (never 0, so
ratios stay finite).

Determinism: the train stream is a pure function of ``(seed, step)``.  ``step`` selects a global
batch of ``batch_size * process_count`` examples (aspect-grouped epochs: ``_GroupedSchedule``; or
plain epochs of ``default_rng([seed, 0, epoch])`` permutations: ``_RandomSchedule``); process ``p``
takes slots ``[p * batch_size, (p + 1) * batch_size)``.  Slot ``j`` has the global example
position ``g = step * batch_size * process_count + j``, and its augmentation uses
``default_rng([seed, 1, g])``; the per-batch short side uses ``default_rng([seed, 3, step])``.
So ``start_step=N`` reproduces an uninterrupted run from step N for any ``num_workers``.
The optional one-stage augmentations (``augment.py``; off by default) draw from their own
``default_rng([seed, 4, g])``, so turning them on leaves the flips and short sides unchanged.

Several datasets (:class:`TrainPart`, ``data.mixture``; ``cn2_jax/data/mixture.py``): the train
loader also takes a list of parts, each a split with a sampling ``weight``, a ``channel_offset``
(its label ``i`` becomes ``gt_classes`` ``channel_offset + i``) and its own ``filter_empty``.
The parts are concatenated (one index space) and sampled per example slot by
``_MixtureSchedule``: slot ``g`` takes the dataset that grain's weighted interleaving
(``grain.MapDataset.mix``) puts at position ``g``, and the next image of that dataset's own
shuffled epochs (``default_rng([seed, 5, k, epoch])``), so it is again a pure function of
``(seed, step)``. A mixture is not aspect-grouped: a batch goes to the bucket of its images'
aspect group, or to the square fallback bucket when they differ (or to ``pad_hw``).

Padded shapes (``buckets.py``): training batches go to a bucket per short side and aspect group
(or one fixed ``pad_hw``); eval batches hold images of one official canvas (resized size rounded
up to 32), so the model sees exactly the official padding.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple, Union

import numpy as np

from cn2_jax.data import augment as A
from cn2_jax.data import buckets
from cn2_jax.data import transforms as T
from cn2_jax.data.augment import AugmentSettings

logger = logging.getLogger(__name__)

DEFAULT_TRAIN_SHORT_SIZES = (640, 672, 704, 736, 768, 800)
BATCH_KEYS = (
    "image",
    "image_hw",
    "gt_boxes",
    "gt_classes",
    "gt_valid",
    "gt_crowd",
    "batch_mask",
    "image_id",
    "orig_hw",
)

_PERM_STREAM = 0
_AUG_STREAM = 1
_BATCH_ORDER_STREAM = 2
_SCALE_STREAM = 3
_EXTRA_AUG_STREAM = 4  # augment.py's crop / warp / colour draws
_MIX_STREAM = 5  # per-dataset epoch permutations of a mixture

__all__ = [
    "DetectionInfo",
    "DetectionSplit",
    "TrainPart",
    "LSJ",
    "AugmentSettings",
    "open_split",
    "make_train_loader",
    "make_eval_loader",
    "default_pad_hw",
    "num_eval_batches",
    "eval_plan",
    "train_padding_overhead",
    "num_train_images",
    "BATCH_KEYS",
    "DEFAULT_TRAIN_SHORT_SIZES",
]


# ----------------------------------------------------------------------------------------------
# Dataset metadata accessor
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DetectionInfo:
  """Class names and the contiguous label <-> COCO category id mapping (label i = categories
  sorted by id), plus per-split summaries (annotation file, counts)."""

  class_names: Tuple[str, ...]
  category_ids: Tuple[int, ...]
  splits: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def category_id_to_label(self) -> Dict[int, int]:
    return {c: i for i, c in enumerate(self.category_ids)}

  def label_to_category_id(self, labels) -> np.ndarray:
    """Maps contiguous labels (array-like) to COCO category ids (int64 array)."""
    return np.asarray(self.category_ids, np.int64)[np.asarray(labels, np.int64)]

  def annotation_file(self, split: str) -> Optional[str]:
    """The source instances json of ``split`` (as recorded at build time), for COCO eval."""
    return self.splits.get(split, {}).get("annotation_file")

  @classmethod
  def from_metadata(cls, meta: Mapping[str, Any]) -> "DetectionInfo":
    cats = meta["categories"]
    splits = {
        name: {k: v for k, v in s.items() if not isinstance(v, list)}
        for name, s in meta.get("splits", {}).items()
    }
    return cls(
        class_names=tuple(str(c["name"]) for c in cats),
        category_ids=tuple(int(c["id"]) for c in cats),
        splits=splits,
    )

  @classmethod
  def from_builder(cls, builder) -> "DetectionInfo":
    return cls.from_metadata(_builder_metadata(builder))


def _builder_metadata(builder) -> Mapping[str, Any]:
  meta = builder.info.metadata
  if not meta or "categories" not in meta:
    path = os.path.join(os.fspath(builder.data_dir), "metadata.json")
    with open(path) as f:
      meta = json.load(f)
  return meta


class DetectionSplit:
  """A random-access example source plus per-example index arrays (from build metadata).

  ``source[i]`` returns a dict with the builder's features (see ``builder.py``); ``num_instances``
  (non-crowd boxes per example), ``height``/``width`` and ``image_id`` are numpy arrays aligned
  with the source, or None when unknown.
  """

  def __init__(
      self,
      source,
      *,
      info: Optional[DetectionInfo] = None,
      image_id=None,
      height=None,
      width=None,
      num_instances=None,
      name: str = "",
      data_dir: str = "",
  ):
    self.source = source
    self.info = info
    self.name = name
    self.data_dir = data_dir  # the prepared dataset folder, named in load-time decode errors
    n = len(source)

    def arr(x):
      if x is None:
        return None
      x = np.asarray(x, np.int64)
      if x.shape != (n,):
        raise ValueError(f"index array of shape {x.shape} does not match {n} examples")
      return x

    self.image_id = arr(image_id)
    self.height = arr(height)
    self.width = arr(width)
    self.num_instances = arr(num_instances)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i):
    return self.source[i]


def open_split(builder, split: str) -> DetectionSplit:
  """``DetectionSplit`` for ``split`` of a prepared builder (``builder.py``'s builders or the
  read-only builder from ``builder.load_builder``)."""
  meta = _builder_metadata(builder)
  smeta = meta.get("splits", {}).get(split, {})
  source = builder.as_data_source(split)
  return DetectionSplit(
      source,
      info=DetectionInfo.from_metadata(meta),
      image_id=smeta.get("image_id"),
      height=smeta.get("height"),
      width=smeta.get("width"),
      num_instances=smeta.get("num_instances"),
      name=split,
      data_dir=os.fspath(getattr(builder, "data_dir", "") or ""),
  )


@dataclasses.dataclass(frozen=True)
class TrainPart:
  """One dataset of a training mixture (``data`` or an entry of ``data.mixture``).

  ``split``: its training split (a :class:`DetectionSplit` or a sequence of example dicts);
  ``weight``: its sampling weight (> 0; the parts' weights are relative); ``channel_offset``: its
  label ``i`` becomes class ``channel_offset + i`` of the batch (the student's channel);
  ``filter_empty``: drop its images without non-crowd boxes (None: the loader's ``filter_empty``;
  image folders, which have no boxes, use False)."""

  split: Any
  weight: float = 1.0
  channel_offset: int = 0
  filter_empty: Optional[bool] = None


class _ConcatSource:
  """The examples of several sources in one index space (part ``k`` from ``starts[k]``), with
  each part's prepared folder (load-time errors) and channel offset. Picklable."""

  def __init__(self, sources, data_dirs, channel_offsets):
    self.sources = list(sources)
    self.data_dirs = [str(d or "") for d in data_dirs]
    self.channel_offsets = [int(o) for o in channel_offsets]
    self.starts = np.cumsum([0] + [len(s) for s in self.sources[:-1]]).astype(np.int64)
    self._len = int(sum(len(s) for s in self.sources))

  def __len__(self) -> int:
    return self._len

  def locate(self, i: int) -> Tuple[int, int]:
    """``(part, index in that part)`` of concatenated index ``i``."""
    k = int(np.searchsorted(self.starts, int(i), side="right")) - 1
    return k, int(i) - int(self.starts[k])

  def __getitem__(self, i):
    k, j = self.locate(i)
    return self.sources[k][j]


def _concat_split(parts) -> DetectionSplit:
  """One DetectionSplit over every part (a :class:`_ConcatSource`); the per-example arrays are
  concatenated (None when a part lacks them)."""
  splits = [_as_split(p.split) for p in parts]
  src = _ConcatSource(
      [s.source for s in splits], [s.data_dir for s in splits], [p.channel_offset for p in parts]
  )

  def cat(name):
    arrs = [getattr(s, name) for s in splits]
    return None if any(a is None for a in arrs) else np.concatenate(arrs).astype(np.int64)

  split = DetectionSplit(
      src,
      info=splits[0].info,
      image_id=cat("image_id"),
      height=cat("height"),
      width=cat("width"),
      num_instances=cat("num_instances"),
      name="+".join(s.name for s in splits),
      data_dir=splits[0].data_dir,
  )
  return split


def _train_order(split: DetectionSplit, filter_empty: bool) -> np.ndarray:
  """Source indices of the examples the train loader draws from: all, or with ``filter_empty``
  those with a non-crowd box (detectron2 FILTER_EMPTY_ANNOTATIONS)."""
  n = len(split)
  if not filter_empty:
    return np.arange(n)
  if split.num_instances is None:
    logger.warning(
        "no per-example instance counts in the metadata: scanning %d examples "
        "to filter empty images",
        n,
    )
    counts = np.array(
        [int((~np.asarray(split[i]["objects"]["is_crowd"], bool)).sum()) for i in range(n)],
        np.int64,
    )
  else:
    counts = split.num_instances
  order = np.nonzero(counts > 0)[0]
  logger.info(
      "train loader: %d of %d images of %s have annotations (filter_empty)",
      order.size,
      n,
      split.name or "the split",
  )
  return order


def _as_parts(source, filter_empty: bool):
  """The loader's ``source`` as a list of :class:`TrainPart` with ``filter_empty`` resolved."""
  if isinstance(source, (list, tuple)) and source and all(isinstance(p, TrainPart) for p in source):
    parts = list(source)
  else:
    parts = [TrainPart(source)]
  out = []
  for k, p in enumerate(parts):
    if not (p.weight > 0 and np.isfinite(p.weight)):
      raise ValueError(f"part {k} of the training mixture has weight {p.weight}; must be > 0")
    if int(p.channel_offset) < 0:
      raise ValueError(f"part {k} of the training mixture has channel_offset {p.channel_offset}")
    fe = filter_empty if p.filter_empty is None else bool(p.filter_empty)
    out.append(dataclasses.replace(p, filter_empty=fe))
  return out


def num_train_images(source, filter_empty: bool = True) -> int:
  """The images one epoch of :func:`make_train_loader` (same ``source`` / ``filter_empty``) holds:
  the training images of a split, or for a mixture the sum over its parts (an epoch of a mixture is
  as many examples as its datasets hold together, as centerX's concatenated dataset lists, whatever
  the weights; ``optim.epochs`` counts these)."""
  return int(sum(len(_train_order(_as_split(p.split), p.filter_empty))
                 for p in _as_parts(source, filter_empty)))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Per-example processing
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LSJ:
  """Large-scale jitter: random resize to ``uniform(scale_range) * output_size`` (fit inside),
  random crop to ``output_size`` (detectron2 ResizeScale + FixedSizeCrop)."""

  output_size: int = 1024
  scale_range: Tuple[float, float] = (0.1, 2.0)


def _as_lsj(lsj) -> Optional[LSJ]:
  if lsj is None or isinstance(lsj, LSJ):
    return lsj
  if isinstance(lsj, Mapping):
    return LSJ(**lsj)
  raise TypeError(f"lsj must be None, an LSJ or a dict, got {type(lsj)}")


def _to_str(x) -> str:
  if isinstance(x, bytes):
    return x.decode("utf-8", "replace")
  if isinstance(x, np.ndarray):
    return _to_str(x.item())
  return str(x)


def _load(rec: Mapping[str, Any], data_dir: str = ""):
  """Decodes one source record -> (image, boxes, classes, crowd, image_id, name)."""
  name = _to_str(rec.get("image/filename", ""))
  try:
    image = T.decode_image(rec["image"], name=name or None)
  except ValueError as e:
    if not data_dir:
      raise
    # The bytes were decoded once at preparation: the stored copy is what is broken.
    from cn2_jax.data.builder import prepared_data_hint
    from cn2_jax.errors import DataError

    raise DataError(f"{e}; {prepared_data_hint(data_dir)}") from e
  obj = rec["objects"]
  boxes = np.asarray(obj["bbox"], np.float32).reshape(-1, 4)
  classes = np.asarray(obj["label"], np.int64).reshape(-1)
  crowd = np.asarray(obj.get("is_crowd", np.zeros(len(classes), bool)), bool).reshape(-1)
  image_id = int(np.asarray(rec.get("image/id", -1)))
  return image, boxes, classes, crowd, image_id, name


def _empty_batch(batch_size: int, pad_hw: Tuple[int, int], max_boxes: int) -> Dict[str, np.ndarray]:
  ph, pw = pad_hw
  return {
      "image": np.zeros((batch_size, ph, pw, 3), np.uint8),
      "image_hw": np.tile(np.array([ph, pw], np.int32), (batch_size, 1)),
      "gt_boxes": np.zeros((batch_size, max_boxes, 4), np.float32),
      "gt_classes": np.zeros((batch_size, max_boxes), np.int32),
      "gt_valid": np.zeros((batch_size, max_boxes), bool),
      "gt_crowd": np.zeros((batch_size, max_boxes), bool),
      "batch_mask": np.zeros((batch_size,), bool),
      "image_id": np.full((batch_size,), -1, np.int64),
      "orig_hw": np.tile(np.array([ph, pw], np.int32), (batch_size, 1)),
  }


def _put(
    batch: Dict[str, np.ndarray],
    j: int,
    image,
    boxes,
    classes,
    crowd,
    image_id,
    orig_hw,
    max_boxes: int,
    name: str,
) -> None:
  h, w = image.shape[:2]
  ph, pw = batch["image"].shape[1:3]
  if h > ph or w > pw:
    raise ValueError(
        f"image {name} ({image_id}) is {h}x{w} after resize, larger than pad_hw "
        f"{ph}x{pw}; choose pad_hw >= max size rounded up to 32"
    )
  batch["image"][j, :h, :w] = image
  batch["image_hw"][j] = (h, w)
  gt = T.pad_gt(boxes, classes, crowd, max_boxes, name=name)
  for k, v in gt.items():
    batch[k][j] = v
  batch["batch_mask"][j] = True
  batch["image_id"][j] = image_id
  batch["orig_hw"][j] = orig_hw


def default_pad_hw(max_size: int, size_divisibility: int = 32) -> Tuple[int, int]:
  s = T.round_up(max_size, size_divisibility)
  return (s, s)


def _check_pad_hw(
    pad_hw,
    size_divisibility: int,
    *,
    split: Optional[DetectionSplit],
    short_max: Optional[int],
    max_size: Optional[int],
    lsj: Optional[LSJ],
):
  ph, pw = (int(v) for v in pad_hw)
  if ph % size_divisibility or pw % size_divisibility:
    raise ValueError(f"pad_hw {ph}x{pw} must be multiples of {size_divisibility}")
  if lsj is not None:
    if lsj.output_size > min(ph, pw):
      raise ValueError(
          f"pad_hw {ph}x{pw} is smaller than the LSJ output size " f"{lsj.output_size}"
      )
    return ph, pw
  if split is not None and split.height is not None and split.width is not None and len(split):
    nh, nw = T.resize_shortest_edge_shape_np(split.height, split.width, short_max, max_size)
    bad = np.nonzero((nh > ph) | (nw > pw))[0]
    if bad.size:
      i = int(bad[0])
      raise ValueError(
          f"{bad.size} image(s) do not fit pad_hw {ph}x{pw} after resizing to short side "
          f"{short_max} (max {max_size}); e.g. example {i} ({split.height[i]}x"
          f"{split.width[i]} -> {nh[i]}x{nw[i]}). Use pad_hw >= "
          f"{default_pad_hw(max_size, size_divisibility)}"
      )
  elif min(ph, pw) < max_size:
    raise ValueError(
        f"pad_hw {ph}x{pw} is smaller than max_size {max_size}: resized images "
        "may not fit; use pad_hw >= "
        f"{default_pad_hw(max_size, size_divisibility)}"
    )
  return ph, pw


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


class _TrainBatcher:
  """step -> this process's slice of the global batch (picklable; runs in grain workers).

  The canvas of a step is ``pad_hw`` when fixed, else the bucket (``buckets.train_buckets``) of
  the global batch's aspect group and largest short side, so every process and device of a step
  gets the same shape.
  """

  def __init__(
      self,
      source,
      schedule,
      *,
      batch_size,
      short_sizes,
      max_size,
      pad_hw,
      buckets,
      sizes,
      groups,
      max_boxes,
      seed,
      hflip_prob,
      lsj,
      scale_per_batch,
      process_index,
      process_count,
      data_dir="",
      augment: Optional[AugmentSettings] = None,
      crop_around_gt: bool = True,
  ):
    self.source = source  # a _ConcatSource (channel offsets, data dirs per part) or a sequence
    self.data_dir = data_dir
    self.augment = augment  # enabled AugmentSettings or None
    self.crop_around_gt = crop_around_gt  # False: woGT's plain random crop positions
    self.schedule = schedule
    self.batch_size = batch_size
    self.short_sizes = short_sizes
    self.max_size = max_size
    self.pad_hw = pad_hw  # fixed canvas, or None for buckets
    self.buckets = buckets  # {(short, group): (H, W)} when pad_hw is None
    self.sizes = sizes  # [n_source, 2] original (h, w), or None
    self.groups = groups  # [n_source] aspect group, or None
    self.max_boxes = max_boxes
    self.seed = seed
    self.hflip_prob = hflip_prob
    self.lsj = lsj
    self.scale_per_batch = scale_per_batch
    self.process_index = process_index
    self.process_count = process_count

  def short_sides(self, step: int) -> np.ndarray:
    """The short side of every example of the global batch of ``step``."""
    gb = self.batch_size * self.process_count
    if isinstance(self.short_sizes, (int, np.integer)) or len(self.short_sizes) == 1:
      return np.full(gb, int(np.ravel(self.short_sizes)[0]), np.int64)
    if self.scale_per_batch:
      rng = np.random.default_rng([self.seed, _SCALE_STREAM, int(step)])
      return np.full(gb, T.sample_short_size(self.short_sizes, rng), np.int64)
    g0 = int(step) * gb
    return np.array(
        [
            T.sample_short_size(
                self.short_sizes, np.random.default_rng([self.seed, _AUG_STREAM, g0 + j])
            )
            for j in range(gb)
        ],
        np.int64,
    )

  def canvas(self, step: int, idx: np.ndarray, short: np.ndarray) -> Tuple[int, int]:
    if self.pad_hw is not None:
      return self.pad_hw
    g = np.unique(self.groups[idx])
    return self.buckets[(int(short.max()), int(g[0]) if len(g) == 1 else -1)]

  def _record(self, src: int):
    """``(record, data_dir, channel offset)`` of source index ``src``."""
    if isinstance(self.source, _ConcatSource):
      k, j = self.source.locate(src)
      return (
          self.source.sources[k][j],
          self.source.data_dirs[k],
          self.source.channel_offsets[k],
      )
    return self.source[int(src)], self.data_dir, 0

  def example(self, src: int, g: int, short: int):
    rec, data_dir, offset = self._record(int(src))
    image, boxes, classes, crowd, image_id, name = _load(rec, data_dir)
    if offset:
      classes = classes + offset  # the dataset's labels on its channels of the student
    orig_hw = image.shape[:2]
    rng = np.random.default_rng([self.seed, _AUG_STREAM, g])
    aug = self.augment
    arng = None if aug is None else np.random.default_rng([self.seed, _EXTRA_AUG_STREAM, g])
    if self.lsj is not None:
      image, boxes = T.random_hflip(image, boxes, rng, self.hflip_prob)
      image, boxes, keep = T.lsj_resize_crop(
          image, boxes, self.lsj.output_size, self.lsj.scale_range, rng
      )
      classes, crowd = classes[keep], crowd[keep]
      if aug is not None:  # (crop / center_affine are refused with LSJ)
        image, boxes, classes, crowd = self._warp(image, boxes, classes, crowd, arng)
        image = A.color_aug(image, arng, aug.color_aug, aug.color_aug_range, aug.color_aug_lighting)
    else:
      if not self.scale_per_batch:
        T.sample_short_size(self.short_sizes, rng)  # same draw as short_sides(): keep rng in step
      # One-stage augmentation order (augment.py): crop -> resize or CenterAffine -> affine /
      # perspective -> flip -> colour (centerX: crop, resize, flip, colour).
      if aug is not None and aug.crop:
        image, boxes, keep = A.random_crop_relative_range(
            image, boxes, aug.crop_relative_range, arng, self.crop_around_gt
        )
        classes, crowd = classes[keep], crowd[keep]
      if aug is not None and aug.center_affine:
        image, boxes, keep = A.center_affine(
            image,
            boxes,
            arng,
            aug.center_affine_size,
            aug.center_affine_scale,
            aug.center_affine_scale_step,
            aug.center_affine_border,
        )
        classes, crowd = classes[keep], crowd[keep]
      else:
        image, boxes = T.resize_shortest_edge(image, boxes, int(short), self.max_size)
      if aug is not None:
        image, boxes, classes, crowd = self._warp(image, boxes, classes, crowd, arng)
      image, boxes = T.random_hflip(image, boxes, rng, self.hflip_prob)
      if aug is not None:
        image = A.color_aug(image, arng, aug.color_aug, aug.color_aug_range, aug.color_aug_lighting)
      # detectron2 annotations_to_instances: clip to the image, drop empty boxes
      boxes = T.clip_boxes(boxes, *image.shape[:2])
      keep = np.nonzero(T.nonempty_boxes(boxes))[0]
      boxes, classes, crowd = boxes[keep], classes[keep], crowd[keep]
    return image, boxes, classes, crowd, image_id, orig_hw, name

  def _warp(self, image, boxes, classes, crowd, arng):
    aug = self.augment
    if not aug.warp:
      return image, boxes, classes, crowd
    image, boxes, keep = A.random_warp(
        image,
        boxes,
        arng,
        aug.affine,
        aug.affine_scale,
        aug.affine_rotate,
        aug.affine_translate,
        aug.affine_shear,
        aug.perspective,
        aug.warp_min_size,
        aug.warp_min_visible,
    )
    return image, boxes, classes[keep], crowd[keep]

  def __call__(self, step: int) -> Dict[str, np.ndarray]:
    b = self.batch_size
    idx = self.schedule.indices(step)
    short = self.short_sides(step)
    canvas = self.canvas(step, idx, short)
    batch = _empty_batch(b, canvas, self.max_boxes)
    first = self.process_index * b
    for j in range(b):
      k = first + j
      g = int(step) * b * self.process_count + k
      image, boxes, classes, crowd, image_id, orig_hw, name = self.example(idx[k], g, short[k])
      _put(batch, j, image, boxes, classes, crowd, image_id, orig_hw, self.max_boxes, name)
    return batch


class _EvalBatcher:
  """local batch index -> batch (picklable). ``plan[k] = (canvas, [global_batch] source
  indices, -1 = padding example)``; this process takes its slice of global batch ``k``."""

  def __init__(
      self, source, plan, *, batch_size, short_size, max_size, max_boxes, process_index, data_dir=""
  ):
    self.source = source
    self.data_dir = data_dir
    self.plan = plan
    self.batch_size = batch_size
    self.short_size = short_size
    self.max_size = max_size
    self.max_boxes = max_boxes
    self.process_index = process_index

  def __call__(self, k: int) -> Dict[str, np.ndarray]:
    b = self.batch_size
    canvas, idx = self.plan[int(k)]
    batch = _empty_batch(b, canvas, self.max_boxes)
    for j, i in enumerate(idx[self.process_index * b : (self.process_index + 1) * b]):
      if i < 0:
        continue
      image, boxes, classes, crowd, image_id, name = _load(self.source[int(i)], self.data_dir)
      orig_hw = image.shape[:2]
      image, boxes = T.resize_shortest_edge(image, boxes, self.short_size, self.max_size)
      _put(batch, j, image, boxes, classes, crowd, image_id, orig_hw, self.max_boxes, name)
    return batch


def _run(
    fn, start: int, stop: int, num_workers: int, num_threads: int, prefetch: int
) -> Iterator[Dict[str, np.ndarray]]:
  """Yields ``fn(i)`` for i in [start, stop): in-process (num_workers=0) or grain processes."""
  if num_workers <= 0:

    def gen():
      for i in range(start, stop):
        yield fn(i)

    return gen()
  import grain  # imported lazily: workers are only needed here
  from absl import flags

  # grain reads its settings from absl flags and fails ("Trying to access flag ... before flags
  # were parsed") outside absl.app; use the defaults in that case.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

  ds = grain.MapDataset.range(start, stop).map(fn)
  ids = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=max(1, num_threads), prefetch_buffer_size=max(1, prefetch))
  )
  ids = ids.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=max(1, prefetch))
  )
  return iter(ids)


def _as_split(source) -> DetectionSplit:
  return source if isinstance(source, DetectionSplit) else DetectionSplit(source)


# ----------------------------------------------------------------------------------------------
# Public loaders
# ----------------------------------------------------------------------------------------------
def _split_sizes(split: DetectionSplit) -> Optional[np.ndarray]:
  if split.height is None or split.width is None:
    return None
  return np.stack([split.height, split.width], axis=1)


def make_train_loader(
    source,
    *,
    batch_size: int,
    short_sizes: T.ShortSizes = DEFAULT_TRAIN_SHORT_SIZES,
    max_size: int = 1333,
    pad_hw: Optional[Tuple[int, int]] = None,
    max_boxes: int = 100,
    seed: int = 0,
    start_step: int = 0,
    num_workers: int = 0,
    filter_empty: bool = True,
    lsj: Union[None, LSJ, Mapping[str, Any]] = None,
    hflip_prob: float = 0.5,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 1,
    prefetch: int = 2,
    size_divisibility: int = 32,
    aspect_grouping: bool = True,
    aspect_ratios: Tuple[float, ...] = buckets.DEFAULT_ASPECT_RATIOS,
    scale_per_batch: bool = True,
    augment: Union[None, AugmentSettings, Mapping[str, Any]] = None,
    crop_around_gt: bool = True,
) -> Iterator[Dict[str, np.ndarray]]:
  """Infinite iterator of training batches (numpy, batch contract in the module docstring).

  ``source``: a :class:`DetectionSplit` (``open_split(builder, 'train')``) or any random-access
  sequence of builder-format example dicts; or a list of :class:`TrainPart` (several datasets
  mixed by weight, each label shifted by its part's ``channel_offset``: ``_MixtureSchedule``; a
  single part keeps the plain / aspect-grouped schedules).  Resize: detectron2 ``ResizeShortestEdge`` with the
  short side sampled from ``short_sizes`` (tuple = choice, ``range(a, b + 1)`` = d2's 'range'
  style), long side <= ``max_size``, then horizontal flip with ``hflip_prob``; boxes are clipped
  to the image and empty ones dropped (detectron2 ``annotations_to_instances``).
  ``scale_per_batch`` draws one short side per global batch (every image still gets each size
  with equal probability) instead of one per image, so a batch fits a small bucket.

  Padding: ``pad_hw`` fixes one canvas for every batch. ``pad_hw=None`` (default) pads each
  batch to its bucket (``buckets.train_buckets``: per short side and aspect group, rounded up
  to ``size_divisibility``), with ``aspect_grouping`` batching images of one group together (see
  ``_GroupedSchedule``); that needs the per-example sizes of the build metadata. With ``lsj``
  (:class:`LSJ` or dict) the resize is replaced by flip + random resize-and-crop to
  ``lsj.output_size`` on one square canvas.  ``filter_empty`` drops images without non-crowd
  boxes (detectron2 FILTER_EMPTY_ANNOTATIONS).  ``num_workers=0`` runs in-process; > 0 uses grain
  worker processes.  ``process_index/count`` split every global batch of ``batch_size *
  process_count`` between hosts; all of them use the same canvas at every step.

  ``augment``: the one-stage augmentations (:class:`AugmentSettings`, or the config's ``data``
  section to build them from); None or all off = none. Crop changes the aspect ratio and
  CenterAffine the size, so with either every batch goes to one square canvas (``pad_hw``, by
  default ``max_size`` resp. ``center_affine_size`` rounded up); CenterAffine turns aspect grouping
  off (square images), and neither combines with ``lsj``. ``crop_around_gt=False`` (woGT,
  docs/onestage.md §4.3) places the crop uniformly at random instead of around a GT box centre.
  """
  parts = _as_parts(source, filter_empty)
  split = _concat_split(parts)  # one part: the split itself, with its channel offset
  lsj = _as_lsj(lsj)
  if augment is not None and not isinstance(augment, AugmentSettings):
    augment = AugmentSettings.from_config(augment)
  if augment is not None and not augment.check().enabled:
    augment = None
  aug_side = A.pad_for(augment, max_size)
  if augment is not None and lsj is not None and (augment.crop or augment.center_affine):
    raise ValueError("the crop / center_affine augmentations replace the resize: not with lsj")
  if batch_size <= 0 or max_boxes <= 0:
    raise ValueError("batch_size and max_boxes must be positive")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if isinstance(short_sizes, (int, np.integer)):
    short_sizes = (int(short_sizes),)
  short_sizes = tuple(int(v) for v in short_sizes)
  short_max = int(max(short_sizes))
  sizes = _split_sizes(split)
  if aug_side is not None:
    if pad_hw is None:
      pad_hw = default_pad_hw(aug_side, size_divisibility)
    ph, pw = (int(v) for v in pad_hw)
    if ph % size_divisibility or pw % size_divisibility or min(ph, pw) < aug_side:
      raise ValueError(
          f"pad_hw {ph}x{pw} must be multiples of {size_divisibility} holding a {aug_side} px "
          f"square (crop / center_affine); use {default_pad_hw(aug_side, size_divisibility)}"
      )
    pad_hw = (ph, pw)
  elif pad_hw is None and (lsj is not None or sizes is None):
    if lsj is None:
      logger.warning(
          "no per-example image sizes in the metadata: padding every batch to " "one %s canvas",
          default_pad_hw(max_size, size_divisibility),
      )
    pad_hw = default_pad_hw(lsj.output_size if lsj is not None else max_size, size_divisibility)
  if pad_hw is not None and aug_side is None:
    pad_hw = _check_pad_hw(
        pad_hw, size_divisibility, split=split, short_max=short_max, max_size=max_size, lsj=lsj
    )

  global_batch = batch_size * process_count
  groups = None if sizes is None else buckets.aspect_group(sizes[:, 0], sizes[:, 1], aspect_ratios)
  starts = split.source.starts
  orders = []
  for k, p in enumerate(parts):
    n_k = len(p.split)
    sub = DetectionSplit(
        split.source.sources[k],
        image_id=None,
        num_instances=(
            None
            if split.num_instances is None
            else split.num_instances[starts[k] : starts[k] + n_k]
        ),
        name=_as_split(p.split).name,
    )
    order_k = _train_order(sub, p.filter_empty)
    if order_k.size == 0:
      raise ValueError(
          "no training examples left (all images are empty?)"
          + (f" in dataset {k} of the mixture" if len(parts) > 1 else "")
      )
    orders.append(order_k + starts[k])
  if len(parts) == 1:
    square = lsj is not None or (augment is not None and augment.center_affine)
    schedule = _make_schedule(
        orders[0], groups, global_batch, seed, aspect_grouping=aspect_grouping and not square
    )
  else:
    schedule = _MixtureSchedule(orders, [p.weight for p in parts], global_batch, seed)
    logger.info(
        "train mixture of %d datasets: %s images, weights %s, channel offsets %s (not "
        "aspect-grouped)",
        len(parts),
        [len(o) for o in orders],
        [p.weight for p in parts],
        [p.channel_offset for p in parts],
    )
  table = None
  if pad_hw is None:
    table = buckets.train_buckets(short_sizes, max_size, aspect_ratios, size_divisibility)
    logger.info(
        "train buckets: %d shapes (one compiled program each): %s",
        len(buckets.bucket_shapes(table)),
        buckets.bucket_shapes(table),
    )
  batcher = _TrainBatcher(
      split.source,
      schedule,
      batch_size=batch_size,
      short_sizes=short_sizes,
      max_size=max_size,
      pad_hw=pad_hw,
      buckets=table,
      sizes=sizes,
      groups=groups,
      max_boxes=max_boxes,
      seed=seed,
      hflip_prob=hflip_prob,
      lsj=lsj,
      scale_per_batch=scale_per_batch,
      process_index=process_index,
      process_count=process_count,
      data_dir=split.data_dir,
      augment=augment,
      crop_around_gt=crop_around_gt,
  )
  return _run(batcher, int(start_step), sys.maxsize // 4, num_workers, num_threads, prefetch)


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


def train_padding_overhead(
    sizes,
    *,
    global_batch: int,
    short_sizes: Tuple[int, ...],
    max_size: int,
    pad_hw: Optional[Tuple[int, int]] = None,
    aspect_grouping: bool = True,
    scale_per_batch: bool = True,
    aspect_ratios: Tuple[float, ...] = buckets.DEFAULT_ASPECT_RATIOS,
    size_divisibility: int = 32,
    steps: int = 500,
    seed: int = 0,
) -> Tuple[float, int]:
  """``(padded pixels / image pixels, number of distinct canvases)`` of the first ``steps``
  training batches over images of original sizes ``sizes`` ``[N, 2]``, through the train
  loader's own schedule, short-side draws and canvas choice (no image is read; arguments as
  :func:`make_train_loader`). Raises ValueError if an image would not fit its canvas."""
  sizes = np.asarray(sizes, np.int64)
  groups = buckets.aspect_group(sizes[:, 0], sizes[:, 1], aspect_ratios)
  schedule = _make_schedule(
      np.arange(len(sizes)), groups, global_batch, seed, aspect_grouping=aspect_grouping
  )
  table = None
  if pad_hw is None:
    table = buckets.train_buckets(short_sizes, max_size, aspect_ratios, size_divisibility)
  batcher = _TrainBatcher(
      None, schedule, batch_size=global_batch, short_sizes=tuple(short_sizes),
      max_size=max_size, pad_hw=pad_hw, buckets=table, sizes=sizes, groups=groups, max_boxes=1,
      seed=seed, hflip_prob=0.5, lsj=None, scale_per_batch=scale_per_batch, process_index=0,
      process_count=1,
  )  # fmt: skip
  pad = img = 0
  canvases = set()
  for step in range(steps):
    idx = schedule.indices(step)
    short = batcher.short_sides(step)
    canvas = batcher.canvas(step, idx, short)
    canvases.add(canvas)
    for (h, w), s in zip(sizes[idx], short):
      nh, nw = T.resize_shortest_edge_shape(int(h), int(w), int(s), max_size)
      if nh > canvas[0] or nw > canvas[1]:
        raise ValueError(f"a {h}x{w} image resized to {nh}x{nw} does not fit canvas {canvas}")
      img += nh * nw
    pad += global_batch * canvas[0] * canvas[1]
  return pad / img, len(canvases)


def eval_plan(
    source,
    *,
    batch_size: int,
    short_size: int = 800,
    max_size: int = 1333,
    pad_hw: Optional[Tuple[int, int]] = None,
    process_count: int = 1,
    size_divisibility: int = 32,
) -> list:
  """``[(canvas, source indices [batch_size * process_count], -1 = padding)]``: the global
  eval batches. With ``pad_hw=None`` every image is padded as the official test code pads it
  (``buckets.official_pad_hw`` of its resized size) and batches hold images of one canvas, in
  source order within a canvas, canvases in order of first appearance."""
  split = _as_split(source)
  n = len(split)
  gb = batch_size * process_count
  sizes = _split_sizes(split)
  if pad_hw is None and sizes is None:
    logger.warning(
        "no per-example image sizes in the metadata: evaluating on one %s canvas "
        "(results can differ slightly from the official per-image padding)",
        default_pad_hw(max_size, size_divisibility),
    )
    pad_hw = default_pad_hw(max_size, size_divisibility)
  if pad_hw is not None:
    pad_hw = _check_pad_hw(
        pad_hw,
        size_divisibility,
        split=split,
        short_max=int(short_size),
        max_size=max_size,
        lsj=None,
    )
    keys = [pad_hw] * n
  else:
    nh, nw = T.resize_shortest_edge_shape_np(sizes[:, 0], sizes[:, 1], short_size, max_size)
    keys = [buckets.official_pad_hw(int(h), int(w), size_divisibility) for h, w in zip(nh, nw)]
  by_canvas: Dict[Tuple[int, int], list] = {}
  for i, k in enumerate(keys):
    by_canvas.setdefault(tuple(k), []).append(i)
  plan = []
  for canvas, idx in by_canvas.items():
    for s in range(0, len(idx), gb):
      chunk = np.full(gb, -1, np.int64)
      part = idx[s : s + gb]
      chunk[: len(part)] = part
      plan.append((canvas, chunk))
  if not plan:  # empty split: one fully masked batch keeps every process in step
    plan.append((pad_hw or default_pad_hw(max_size, size_divisibility), np.full(gb, -1, np.int64)))
  return plan


def make_eval_loader(
    source,
    *,
    batch_size: int,
    short_size: int = 800,
    max_size: int = 1333,
    pad_hw: Optional[Tuple[int, int]] = None,
    max_boxes: int = 100,
    num_workers: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 1,
    prefetch: int = 2,
    size_divisibility: int = 32,
) -> Iterator[Dict[str, np.ndarray]]:
  """Iterator over every example exactly once (test-time resize ``short_size``/``max_size``,
  no flip), batched by :func:`eval_plan`: by default each image on its official canvas (its
  resized size rounded up to ``size_divisibility``), else on the fixed ``pad_hw``. Batches not
  filled are padded with ``batch_mask=False``. ``batch_size`` is per process; global batch
  ``k`` is split between the processes, so all of them yield the same number of batches with
  the same canvas at every step.
  """
  split = _as_split(source)
  plan = eval_plan(
      split,
      batch_size=batch_size,
      short_size=short_size,
      max_size=max_size,
      pad_hw=pad_hw,
      process_count=process_count,
      size_divisibility=size_divisibility,
  )
  batcher = _EvalBatcher(
      split.source,
      plan,
      batch_size=batch_size,
      short_size=int(short_size),
      max_size=max_size,
      max_boxes=max_boxes,
      process_index=process_index,
      data_dir=split.data_dir,
  )
  return _run(batcher, 0, len(plan), num_workers, num_threads, prefetch)


def num_eval_batches(source, batch_size: int, process_count: int = 1, **plan_kw) -> int:
  """Number of batches :func:`make_eval_loader` yields per process (same keyword arguments)."""
  return len(eval_plan(source, batch_size=batch_size, process_count=process_count, **plan_kw))
