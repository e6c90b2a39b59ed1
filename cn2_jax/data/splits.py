"""Training / eval splits: dataset metadata, random-access example sources, mixture parts.

``DetectionInfo`` (class names, label <-> category id), ``DetectionSplit`` (a source plus the
per-example arrays of the build metadata; ``open_split``), ``TrainPart`` (one dataset of a training
mixture) and their concatenation into one index space (``_ConcatSource``), and the examples the
train loader draws from (``filter_empty``: ``_train_order``, ``num_train_images``). Part of the
input pipeline (``pipeline.py`` lists the modules).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

logger = logging.getLogger("cn2_jax.data.pipeline")


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
    return {cat_id: i for i, cat_id in enumerate(self.category_ids)}

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
        name: {key: value for key, value in split.items() if not isinstance(value, list)}
        for name, split in meta.get("splits", {}).items()
    }
    return cls(
        class_names=tuple(str(cat["name"]) for cat in cats),
        category_ids=tuple(int(cat["id"]) for cat in cats),
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
    num_examples = len(source)

    def arr(x):
      if x is None:
        return None
      x = np.asarray(x, np.int64)
      if x.shape != (num_examples,):
        raise ValueError(f"index array of shape {x.shape} does not match {num_examples} examples")
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
    self.data_dirs = [str(data_dir or "") for data_dir in data_dirs]
    self.channel_offsets = [int(offset) for offset in channel_offsets]
    self.starts = np.cumsum([0] + [len(source) for source in self.sources[:-1]]).astype(np.int64)
    self._len = int(sum(len(source) for source in self.sources))

  def __len__(self) -> int:
    return self._len

  def locate(self, i: int) -> Tuple[int, int]:
    """``(part, index in that part)`` of concatenated index ``i``."""
    part = int(np.searchsorted(self.starts, int(i), side="right")) - 1
    return part, int(i) - int(self.starts[part])

  def __getitem__(self, i):
    part, index = self.locate(i)
    return self.sources[part][index]


def _concat_split(parts) -> DetectionSplit:
  """One DetectionSplit over every part (a :class:`_ConcatSource`); the per-example arrays are
  concatenated (None when a part lacks them)."""
  splits = [_as_split(part.split) for part in parts]
  src = _ConcatSource(
      [split.source for split in splits],
      [s.data_dir for s in splits],
      [part.channel_offset for part in parts],
  )

  def cat(name):
    arrs = [getattr(split, name) for split in splits]
    return None if any(arr is None for arr in arrs) else np.concatenate(arrs).astype(np.int64)

  split = DetectionSplit(
      src,
      info=splits[0].info,
      image_id=cat("image_id"),
      height=cat("height"),
      width=cat("width"),
      num_instances=cat("num_instances"),
      name="+".join(split.name for split in splits),
      data_dir=splits[0].data_dir,
  )
  return split


def _train_order(split: DetectionSplit, filter_empty: bool) -> np.ndarray:
  """Source indices of the examples the train loader draws from: all, or with ``filter_empty``
  those with a non-crowd box (detectron2 FILTER_EMPTY_ANNOTATIONS)."""
  num_examples = len(split)
  if not filter_empty:
    return np.arange(num_examples)
  if split.num_instances is None:
    logger.warning(
        "no per-example instance counts in the metadata: scanning %d examples "
        "to filter empty images",
        num_examples,
    )
    counts = np.array(
        [
            int((~np.asarray(split[i]["objects"]["is_crowd"], bool)).sum())
            for i in range(num_examples)
        ],
        np.int64,
    )
  else:
    counts = split.num_instances
  order = np.nonzero(counts > 0)[0]
  logger.info(
      "train loader: %d of %d images of %s have annotations (filter_empty)",
      order.size,
      num_examples,
      split.name or "the split",
  )
  return order


def _as_parts(source, filter_empty: bool):
  """The loader's ``source`` as a list of :class:`TrainPart` with ``filter_empty`` resolved."""
  if (
      isinstance(source, (list, tuple))
      and source
      and all(isinstance(part, TrainPart) for part in source)
  ):
    parts = list(source)
  else:
    parts = [TrainPart(source)]
  out = []
  for index, part in enumerate(parts):
    if not (part.weight > 0 and np.isfinite(part.weight)):
      raise ValueError(
          f"part {index} of the training mixture has weight {part.weight}; must be > 0"
      )
    if int(part.channel_offset) < 0:
      raise ValueError(
          f"part {index} of the training mixture has channel_offset {part.channel_offset}"
      )
    part_filter_empty = filter_empty if part.filter_empty is None else bool(part.filter_empty)
    out.append(dataclasses.replace(part, filter_empty=part_filter_empty))
  return out


def num_train_images(source, filter_empty: bool = True) -> int:
  """The images one epoch of :func:`make_train_loader` (same ``source`` / ``filter_empty``) holds:
  the training images of a split, or for a mixture the sum over its parts (an epoch of a mixture is
  as many examples as its datasets hold together, as centerX's concatenated dataset lists, whatever
  the weights; ``optim.epochs`` counts these)."""
  return int(sum(len(_train_order(_as_split(part.split), part.filter_empty))
                 for part in _as_parts(source, filter_empty)))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Per-example processing


def _as_split(source) -> DetectionSplit:
  return source if isinstance(source, DetectionSplit) else DetectionSplit(source)


def _split_sizes(split: DetectionSplit) -> Optional[np.ndarray]:
  if split.height is None or split.width is None:
    return None
  return np.stack([split.height, split.width], axis=1)
