"""grain input pipelines producing numpy batches with the DESIGN.md batch contract (no JAX here).

Every batch (train and eval) has exactly these keys::

    image       [B, H, W, 3] uint8   RGB, zero-padded bottom/right to pad_hw = (H, W)
    image_hw    [B, 2] int32         valid (h, w) after resize (before padding)
    gt_boxes    [B, M, 4] float32    xyxy in resized pixels, M = max_boxes
    gt_classes  [B, M] int32         contiguous 0..C-1
    gt_valid    [B, M] bool          real, non-crowd, non-degenerate GT
    gt_crowd    [B, M] bool          crowd boxes (in the arrays, gt_valid False)
    batch_mask  [B] bool             False for padding examples (eval's last batch)
    image_id    [B] int64            dataset image id (-1 for padding examples)
    orig_hw     [B, 2] int32         original (h, w)

Padding examples of the last eval batch are all-zero images with ``batch_mask=False``,
``image_id=-1`` and ``image_hw = orig_hw = pad_hw`` (never 0, so ratios stay finite).

Determinism: the train stream is a pure function of ``(seed, step)``.  Global example position
``g = (step * process_count + process_index) * batch_size + j`` maps to epoch ``g // n`` and to
position ``g % n`` of that epoch's permutation (``default_rng([seed, 0, epoch])``); its augmentation
uses ``default_rng([seed, 1, g])``.  So ``start_step=N`` reproduces an uninterrupted run from step N
for any ``num_workers``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple, Union

import numpy as np

from cn2_jax.data import transforms as T

logger = logging.getLogger(__name__)

DEFAULT_TRAIN_SHORT_SIZES = (640, 672, 704, 736, 768, 800)
BATCH_KEYS = ("image", "image_hw", "gt_boxes", "gt_classes", "gt_valid", "gt_crowd", "batch_mask",
              "image_id", "orig_hw")

_PERM_STREAM = 0
_AUG_STREAM = 1

__all__ = [
    "DetectionInfo",
    "DetectionSplit",
    "LSJ",
    "open_split",
    "make_train_loader",
    "make_eval_loader",
    "default_pad_hw",
    "num_eval_batches",
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
        return cls(class_names=tuple(str(c["name"]) for c in cats),
                   category_ids=tuple(int(c["id"]) for c in cats), splits=splits)

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

    def __init__(self, source, *, info: Optional[DetectionInfo] = None, image_id=None,
                 height=None, width=None, num_instances=None, name: str = ""):
        self.source = source
        self.info = info
        self.name = name
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
    return DetectionSplit(source, info=DetectionInfo.from_metadata(meta),
                          image_id=smeta.get("image_id"), height=smeta.get("height"),
                          width=smeta.get("width"), num_instances=smeta.get("num_instances"),
                          name=split)


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


def _load(rec: Mapping[str, Any]):
    """Decodes one source record -> (image, boxes, classes, crowd, image_id, name)."""
    name = _to_str(rec.get("image/filename", ""))
    image = T.decode_image(rec["image"], name=name or None)
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


def _put(batch: Dict[str, np.ndarray], j: int, image, boxes, classes, crowd, image_id, orig_hw,
         max_boxes: int, name: str) -> None:
    h, w = image.shape[:2]
    ph, pw = batch["image"].shape[1:3]
    if h > ph or w > pw:
        raise ValueError(f"image {name} ({image_id}) is {h}x{w} after resize, larger than pad_hw "
                         f"{ph}x{pw}; choose pad_hw >= max size rounded up to 32")
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


def _check_pad_hw(pad_hw, size_divisibility: int, *, split: Optional[DetectionSplit],
                  short_max: Optional[int], max_size: Optional[int], lsj: Optional[LSJ]):
    ph, pw = (int(v) for v in pad_hw)
    if ph % size_divisibility or pw % size_divisibility:
        raise ValueError(f"pad_hw {ph}x{pw} must be multiples of {size_divisibility}")
    if lsj is not None:
        if lsj.output_size > min(ph, pw):
            raise ValueError(f"pad_hw {ph}x{pw} is smaller than the LSJ output size "
                             f"{lsj.output_size}")
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
                f"{default_pad_hw(max_size, size_divisibility)}")
    elif min(ph, pw) < max_size:
        raise ValueError(f"pad_hw {ph}x{pw} is smaller than max_size {max_size}: resized images "
                         "may not fit; use pad_hw >= "
                         f"{default_pad_hw(max_size, size_divisibility)}")
    return ph, pw


class _TrainBatcher:
    """step -> batch (picklable; runs in grain worker processes)."""

    def __init__(self, source, order: np.ndarray, *, batch_size, short_sizes, max_size, pad_hw,
                 max_boxes, seed, hflip_prob, lsj, process_index, process_count):
        self.source = source
        self.order = order  # source indices of the examples used for training
        self.batch_size = batch_size
        self.short_sizes = short_sizes
        self.max_size = max_size
        self.pad_hw = pad_hw
        self.max_boxes = max_boxes
        self.seed = seed
        self.hflip_prob = hflip_prob
        self.lsj = lsj
        self.process_index = process_index
        self.process_count = process_count
        self._perms: Dict[int, np.ndarray] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_perms"] = {}
        return state

    def _perm(self, epoch: int) -> np.ndarray:
        p = self._perms.get(epoch)
        if p is None:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            p = np.random.default_rng([self.seed, _PERM_STREAM, epoch]).permutation(len(self.order))
            self._perms[epoch] = p
        return p

    def source_index(self, g: int) -> int:
        n = len(self.order)
        return int(self.order[self._perm(g // n)[g % n]])

    def example(self, g: int):
        rec = self.source[self.source_index(g)]
        image, boxes, classes, crowd, image_id, name = _load(rec)
        orig_hw = image.shape[:2]
        rng = np.random.default_rng([self.seed, _AUG_STREAM, g])
        if self.lsj is not None:
            image, boxes = T.random_hflip(image, boxes, rng, self.hflip_prob)
            image, boxes, keep = T.lsj_resize_crop(image, boxes, self.lsj.output_size,
                                                   self.lsj.scale_range, rng)
            classes, crowd = classes[keep], crowd[keep]
        else:
            image, boxes = T.resize_shortest_edge(image, boxes, self.short_sizes, self.max_size,
                                                  rng)
            image, boxes = T.random_hflip(image, boxes, rng, self.hflip_prob)
        return image, boxes, classes, crowd, image_id, orig_hw, name

    def __call__(self, step: int) -> Dict[str, np.ndarray]:
        b = self.batch_size
        batch = _empty_batch(b, self.pad_hw, self.max_boxes)
        first = (int(step) * self.process_count + self.process_index) * b
        for j in range(b):
            image, boxes, classes, crowd, image_id, orig_hw, name = self.example(first + j)
            _put(batch, j, image, boxes, classes, crowd, image_id, orig_hw, self.max_boxes, name)
        return batch


class _EvalBatcher:
    """local batch index -> batch (picklable)."""

    def __init__(self, source, *, batch_size, short_size, max_size, pad_hw, max_boxes,
                 process_index, process_count):
        self.source = source
        self.batch_size = batch_size
        self.short_size = short_size
        self.max_size = max_size
        self.pad_hw = pad_hw
        self.max_boxes = max_boxes
        self.process_index = process_index
        self.process_count = process_count

    def __call__(self, k: int) -> Dict[str, np.ndarray]:
        b = self.batch_size
        n = len(self.source)
        batch = _empty_batch(b, self.pad_hw, self.max_boxes)
        first = (int(k) * self.process_count + self.process_index) * b
        for j in range(b):
            i = first + j
            if i >= n:
                break
            image, boxes, classes, crowd, image_id, name = _load(self.source[i])
            orig_hw = image.shape[:2]
            image, boxes = T.resize_shortest_edge(image, boxes, self.short_size, self.max_size)
            _put(batch, j, image, boxes, classes, crowd, image_id, orig_hw, self.max_boxes, name)
        return batch


def _run(fn, start: int, stop: int, num_workers: int, num_threads: int,
         prefetch: int) -> Iterator[Dict[str, np.ndarray]]:
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
    ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, num_threads),
                                               prefetch_buffer_size=max(1, prefetch)))
    ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                       per_worker_buffer_size=max(1, prefetch)))
    return iter(ids)


def _as_split(source) -> DetectionSplit:
    return source if isinstance(source, DetectionSplit) else DetectionSplit(source)


# ----------------------------------------------------------------------------------------------
# Public loaders
# ----------------------------------------------------------------------------------------------
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
) -> Iterator[Dict[str, np.ndarray]]:
    """Infinite iterator of training batches (numpy, batch contract in the module docstring).

    ``source``: a :class:`DetectionSplit` (``open_split(builder, 'train')``) or any random-access
    sequence of builder-format example dicts.  Resize: detectron2 ``ResizeShortestEdge`` with the
    short side sampled from ``short_sizes`` (tuple = choice, ``range(a, b + 1)`` = d2's 'range'
    style), long side <= ``max_size``, then horizontal flip with ``hflip_prob``.  With ``lsj``
    (:class:`LSJ` or dict) the resize is replaced by flip + random resize-and-crop to
    ``lsj.output_size`` instead.  ``pad_hw`` defaults to ``max_size`` (or the LSJ size) rounded up
    to ``size_divisibility``, square.  ``filter_empty`` drops images without non-crowd boxes
    (detectron2 FILTER_EMPTY_ANNOTATIONS).  ``num_workers=0`` runs in-process; > 0 uses grain worker
    processes (``num_threads`` threads and ``prefetch`` batches each).  ``process_index/count``
    split every global batch of ``batch_size * process_count`` between hosts.
    """
    split = _as_split(source)
    lsj = _as_lsj(lsj)
    if batch_size <= 0 or max_boxes <= 0:
        raise ValueError("batch_size and max_boxes must be positive")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if isinstance(short_sizes, (int, np.integer)):
        short_sizes = (int(short_sizes),)
    short_max = int(max(short_sizes))
    if pad_hw is None:
        pad_hw = default_pad_hw(lsj.output_size if lsj is not None else max_size,
                                size_divisibility)
    pad_hw = _check_pad_hw(pad_hw, size_divisibility, split=split, short_max=short_max,
                           max_size=max_size, lsj=lsj)

    n = len(split)
    if filter_empty:
        if split.num_instances is None:
            logger.warning("no per-example instance counts in the metadata: scanning %d examples "
                           "to filter empty images", n)
            counts = np.array([int((~np.asarray(split[i]["objects"]["is_crowd"], bool)).sum())
                               for i in range(n)], np.int64)
        else:
            counts = split.num_instances
        order = np.nonzero(counts > 0)[0]
        logger.info("train loader: %d of %d images have annotations (filter_empty)",
                    order.size, n)
    else:
        order = np.arange(n)
    if order.size == 0:
        raise ValueError("no training examples left (all images are empty?)")
    batcher = _TrainBatcher(split.source, order, batch_size=batch_size, short_sizes=short_sizes,
                            max_size=max_size, pad_hw=pad_hw, max_boxes=max_boxes, seed=seed,
                            hflip_prob=hflip_prob, lsj=lsj, process_index=process_index,
                            process_count=process_count)
    return _run(batcher, int(start_step), sys.maxsize // 4, num_workers, num_threads, prefetch)


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
    """Iterator over every example exactly once, in source order (test-time resize
    ``short_size``/``max_size``, no flip).  The last batch is padded with ``batch_mask=False``.

    With several processes, global batch ``k`` goes to process ``k % process_count``; every
    process yields the same number of batches (extra ones fully masked).
    """
    split = _as_split(source)
    if pad_hw is None:
        pad_hw = default_pad_hw(max_size, size_divisibility)
    pad_hw = _check_pad_hw(pad_hw, size_divisibility, split=split, short_max=int(short_size),
                           max_size=max_size, lsj=None)
    n = len(split)
    num_global = -(-n // batch_size)
    num_local = -(-num_global // process_count)
    batcher = _EvalBatcher(split.source, batch_size=batch_size, short_size=int(short_size),
                           max_size=max_size, pad_hw=pad_hw, max_boxes=max_boxes,
                           process_index=process_index, process_count=process_count)
    return _run(batcher, 0, num_local, num_workers, num_threads, prefetch)


def num_eval_batches(source, batch_size: int, process_count: int = 1) -> int:
    """Number of batches :func:`make_eval_loader` yields per process."""
    return -(-(-(-len(source) // batch_size)) // process_count)
