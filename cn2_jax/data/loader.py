"""The grain loaders: training batches (``make_train_loader``, :class:`TrainLoaderSettings`) and
eval batches (``eval_plan``, ``make_eval_loader``), plus the train padding estimate
(``train_padding_overhead``). They combine the splits (``splits.py``), the sampling schedules
(``schedule.py``) and the batchers (``batcher.py``); ``pipeline.py`` describes the whole.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple, Union

import numpy as np

from cn2_jax import schema
from cn2_jax.data import augment as A
from cn2_jax.data import buckets, sampling
from cn2_jax.data import efficientdet_aug as E
from cn2_jax.data import transforms as T
from cn2_jax.data.augment import AugmentSettings
from cn2_jax.data.batcher import LSJ, _as_lsj, _EvalBatcher, _TrainBatcher
from cn2_jax.data.schedule import _make_schedule, _MixtureSchedule
from cn2_jax.data.splits import (
    DetectionSplit,
    _as_parts,
    _as_split,
    _concat_split,
    _split_sizes,
    _train_order,
)

logger = logging.getLogger("cn2_jax.data.pipeline")  # the pipeline's one logger, as before

DEFAULT_TRAIN_SHORT_SIZES = (640, 672, 704, 736, 768, 800)


@dataclasses.dataclass(frozen=True)
class TrainLoaderSettings:
  """Every setting of :func:`make_train_loader` (what it reads from the config: ``from_config``).

  ``batch_size``: examples per process and step (the global batch is ``batch_size *
  process_count``). ``short_sizes`` / ``max_size``: detectron2 ``ResizeShortestEdge`` (tuple =
  choice, ``range(a, b + 1)`` = d2's 'range' style); ``scale_per_batch`` draws one short side per
  global batch instead of one per image. ``pad_hw``: one fixed canvas, or None for the buckets
  (``buckets.train_buckets``, per short side and aspect group of ``aspect_ratios``, rounded up to
  ``size_divisibility``) with ``aspect_grouping``. ``max_boxes``: boxes per image in the batch.
  ``seed``: the stream is a pure function of ``(seed, step)``. ``num_workers``: grain worker
  processes (0: in-process), with ``num_threads`` / ``prefetch``. ``filter_empty``: drop images
  without non-crowd boxes. ``lsj``: the square scale jitter replacing the shortest-edge resize:
  :class:`LSJ` (detectron2 ResizeScale + FixedSizeCrop), :class:`~cn2_jax.data.efficientdet_aug.
  EfficientDetResizeCrop` (CenterNet2's INPUT.CUSTOM_AUG, config ``data.custom_aug``), a dict of
  either, or None. ``hflip_prob``: the horizontal flip probability. ``process_index`` /
  ``process_count``: this host's slice of every global batch. ``augment``: the one-stage
  augmentations (:class:`AugmentSettings`, or the config's ``data`` section to build them from;
  None or all off = none). ``crop_around_gt``: False (woGT) places the crop uniformly at random
  instead of around a GT box centre. ``sampler_train``: ``"TrainingSampler"`` (each image once
  per epoch), or the LVIS / Objects365 recipes' ``"RepeatFactorTrainingSampler"``
  (``repeat_threshold``) / ``"ClassAwareSampler"`` (``sampling.py``; one dataset, not a mixture).
  """

  batch_size: int
  short_sizes: T.ShortSizes = DEFAULT_TRAIN_SHORT_SIZES
  max_size: int = 1333
  pad_hw: Optional[Tuple[int, int]] = None
  max_boxes: int = 100
  seed: int = 0
  num_workers: int = 0
  filter_empty: bool = True
  lsj: Union[None, LSJ, E.EfficientDetResizeCrop, Mapping[str, Any]] = None
  hflip_prob: float = 0.5
  process_index: int = 0
  process_count: int = 1
  num_threads: int = 1
  prefetch: int = 2
  size_divisibility: int = 32
  aspect_grouping: bool = True
  aspect_ratios: Tuple[float, ...] = buckets.DEFAULT_ASPECT_RATIOS
  scale_per_batch: bool = True
  augment: Union[None, AugmentSettings, Mapping[str, Any]] = None
  crop_around_gt: bool = True
  sampler_train: str = sampling.TRAINING_SAMPLER
  repeat_threshold: float = sampling.DEFAULT_REPEAT_THRESHOLD
  resize_type: str = "ResizeShortestEdge"
  box_min_size: float = 0.0

  @classmethod
  def from_config(
      cls, cfg, *, process_index: int = 0, process_count: int = 1
  ) -> "TrainLoaderSettings":
    """The train loader of config ``cfg`` (``data``, ``train.batch_size``, ``seed``,
    ``kd.without_label``) for process ``process_index`` of ``process_count``: each process takes
    ``train.batch_size`` examples of every step (the global batch is ``train.batch_size *
    process_count``; process p takes its p-th slice, so N processes with batch b read the batches
    of one process with batch N·b). woGT (``kd.without_label``) keeps
    every image (no ``filter_empty``) and crops at random positions (docs/onestage.md §4.3);
    ``num_threads`` / ``prefetch`` keep their defaults (not in the config)."""
    d = cfg.data
    return cls(
        batch_size=cfg.train.batch_size,
        short_sizes=tuple(d.min_size_train),
        max_size=d.max_size_train,
        pad_hw=tuple(d.pad_hw_train) or None,
        max_boxes=d.max_boxes,
        seed=cfg.seed,
        num_workers=d.num_workers,
        filter_empty=d.filter_empty and not cfg.kd.without_label,
        lsj=_square_jitter_from_config(d),
        hflip_prob=0.5 if d.flip else 0.0,
        process_index=process_index,
        process_count=process_count,
        size_divisibility=d.size_divisibility,
        aspect_grouping=d.aspect_grouping,
        aspect_ratios=tuple(d.bucket_aspect_ratios),
        scale_per_batch=d.scale_per_batch,
        augment=AugmentSettings.from_config(d),
        crop_around_gt=not cfg.kd.without_label,
        sampler_train=d.sampler_train,
        repeat_threshold=d.repeat_threshold,
        resize_type=d.resize_type,
        box_min_size=float(d.box_min_size),
    )


def _square_jitter_from_config(d) -> Union[None, LSJ, E.EfficientDetResizeCrop]:
  """``data.lsj`` -> :class:`LSJ`; ``data.custom_aug = "EfficientDetResizeCrop"`` -> CenterNet2's
  augmentation (``data.train_size``, ``data.scale_range``); the two exclude each other.
  ``custom_aug`` "" and "ResizeShortestEdge" (its official name) are the shortest-edge resize."""
  custom_aug = d.custom_aug
  if custom_aug not in ("", "ResizeShortestEdge", E.NAME):
    raise ValueError(
        f"data.custom_aug must be '', 'ResizeShortestEdge' or {E.NAME!r}, got {custom_aug!r}"
    )
  if custom_aug == E.NAME and d.lsj:
    raise ValueError(f"data.lsj and data.custom_aug={custom_aug!r} both replace the resize")
  if custom_aug == E.NAME:
    return E.EfficientDetResizeCrop(
        train_size=int(d.train_size),
        scale_range=tuple(float(v) for v in d.scale_range),
    )
  if d.lsj:
    return LSJ(output_size=d.lsj_size, scale_range=tuple(d.lsj_scale_range))
  return None


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
    lsj: Union[None, LSJ, E.EfficientDetResizeCrop],
):
  ph, pw = (int(v) for v in pad_hw)
  if ph % size_divisibility or pw % size_divisibility:
    raise ValueError(f"pad_hw {ph}x{pw} must be multiples of {size_divisibility}")
  if lsj is not None:
    if lsj.output_size > min(ph, pw):
      raise ValueError(
          f"pad_hw {ph}x{pw} is smaller than the {type(lsj).__name__} output size {lsj.output_size}"
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


def _fixed_resize(resize_type: str, min_size, max_size: int) -> Optional[Tuple[int, int]]:
  """The ``(h, w)`` every image is resized to with ``resize_type="Resize"`` (None: the
  shortest-edge resize; also for a ``min_size`` of 0, which means no resize)."""
  if resize_type not in A.RESIZE_TYPES:
    raise ValueError(f"resize_type must be one of {A.RESIZE_TYPES}, got {resize_type!r}")
  if resize_type != "Resize":
    return None
  hw = A.fixed_resize_hw(min_size, max_size)
  return None if hw[0] == 0 else hw


def _check_fixed_canvas(pad_hw, fixed_hw: Tuple[int, int], size_divisibility: int):
  """The canvas of the fixed-size resize: ``pad_hw``, checked, or ``fixed_hw`` rounded up."""
  if pad_hw is None:
    return buckets.official_pad_hw(*fixed_hw, size_divisibility)
  ph, pw = (int(v) for v in pad_hw)
  if ph % size_divisibility or pw % size_divisibility or ph < fixed_hw[0] or pw < fixed_hw[1]:
    raise ValueError(
        f"pad_hw {ph}x{pw} must be multiples of {size_divisibility} holding the "
        f"{fixed_hw[0]}x{fixed_hw[1]} images of resize_type 'Resize'"
    )
  return ph, pw


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
  from absl import flags  # with grain: only when workers start

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


def make_train_loader(
    source, settings: TrainLoaderSettings, start_step: int = 0
) -> Iterator[Dict[str, np.ndarray]]:
  """Infinite iterator of training batches from step ``start_step`` on (numpy, the batch contract
  of ``pipeline.py``), as :class:`TrainLoaderSettings` ``settings`` say.

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
  ``lsj.output_size`` on one square canvas; with an :class:`~cn2_jax.data.efficientdet_aug.
  EfficientDetResizeCrop` by CenterNet2's random resize-and-crop to ``train_size`` + flip (its
  official draws and box filter, ``efficientdet_aug.py``), on the same square canvas.  ``filter_empty`` drops images without non-crowd
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
  s = settings
  parts = _as_parts(source, s.filter_empty)
  split = _concat_split(parts)  # one part: the split itself, with its channel offset
  lsj = _as_lsj(s.lsj)
  augment = s.augment
  if augment is not None and not isinstance(augment, AugmentSettings):
    augment = AugmentSettings.from_config(augment)
  if augment is not None and not augment.check().enabled:
    augment = None
  aug_side = A.pad_for(augment, s.max_size)
  if augment is not None and lsj is not None and (augment.crop or augment.center_affine):
    raise ValueError(
        "the crop / center_affine augmentations replace the resize: not with lsj "
        f"({type(lsj).__name__})"
    )
  if s.batch_size <= 0 or s.max_boxes <= 0:
    raise ValueError("batch_size and max_boxes must be positive")
  if not 0 <= s.process_index < s.process_count:
    raise ValueError(f"process_index {s.process_index} not in [0, {s.process_count})")
  short_sizes = s.short_sizes
  if isinstance(short_sizes, (int, np.integer)):
    short_sizes = (int(short_sizes),)
  short_sizes = tuple(int(v) for v in short_sizes)
  short_max = int(max(short_sizes))
  sizes = _split_sizes(split)
  pad_hw, size_divisibility = s.pad_hw, s.size_divisibility
  fixed_hw = _fixed_resize(s.resize_type, short_sizes, s.max_size)
  if fixed_hw is not None:
    if lsj is not None or (augment is not None and augment.center_affine):
      raise ValueError(
          "resize_type 'Resize' does not combine with lsj / custom_aug / center_affine"
      )
    pad_hw = _check_fixed_canvas(pad_hw, fixed_hw, size_divisibility)
  elif aug_side is not None:
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
          default_pad_hw(s.max_size, size_divisibility),
      )
    pad_hw = default_pad_hw(lsj.output_size if lsj is not None else s.max_size, size_divisibility)
  if pad_hw is not None and aug_side is None and fixed_hw is None:
    pad_hw = _check_pad_hw(
        pad_hw, size_divisibility, split=split, short_max=short_max, max_size=s.max_size, lsj=lsj
    )

  global_batch = s.batch_size * s.process_count
  groups = (
      None if sizes is None else buckets.aspect_group(sizes[:, 0], sizes[:, 1], s.aspect_ratios)
  )
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
  sampler = sampling.check_sampler(s.sampler_train)
  if len(parts) == 1:
    square = lsj is not None or (augment is not None and augment.center_affine)
    schedule = _make_schedule(
        orders[0],
        groups,
        global_batch,
        s.seed,
        aspect_grouping=s.aspect_grouping and not square,
        sampler=sampler,
        image_categories=(
            None
            if sampler == sampling.TRAINING_SAMPLER
            else sampling.image_categories_from_split(split)
        ),
        repeat_threshold=s.repeat_threshold,
    )
  else:
    if sampler != sampling.TRAINING_SAMPLER:
      raise ValueError(
          f"data.sampler_train={sampler!r} samples one dataset; a mixture (data.mixture) is "
          "sampled by its weights: use 'TrainingSampler'"
      )
    schedule = _MixtureSchedule(orders, [p.weight for p in parts], global_batch, s.seed)
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
    table = buckets.train_buckets(short_sizes, s.max_size, s.aspect_ratios, size_divisibility)
    logger.info(
        "train buckets: %d shapes (one compiled program each): %s",
        len(buckets.bucket_shapes(table)),
        buckets.bucket_shapes(table),
    )
  batcher = _TrainBatcher(
      split.source,
      schedule,
      batch_size=s.batch_size,
      short_sizes=short_sizes,
      max_size=s.max_size,
      pad_hw=pad_hw,
      buckets=table,
      sizes=sizes,
      groups=groups,
      max_boxes=s.max_boxes,
      seed=s.seed,
      hflip_prob=s.hflip_prob,
      lsj=lsj,
      scale_per_batch=s.scale_per_batch,
      process_index=s.process_index,
      process_count=s.process_count,
      data_dir=split.data_dir,
      augment=augment,
      crop_around_gt=s.crop_around_gt,
      fixed_hw=fixed_hw,
      box_min_size=float(s.box_min_size),
  )
  return _run(batcher, int(start_step), sys.maxsize // 4, s.num_workers, s.num_threads, s.prefetch)


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
    resize_type: str = "ResizeShortestEdge",
) -> list:
  """``[(canvas, source indices [batch_size * process_count], -1 = padding)]``: the global
  eval batches. With ``pad_hw=None`` every image is padded as the official test code pads it
  (``buckets.official_pad_hw`` of its resized size) and batches hold images of one canvas, in
  source order within a canvas, canvases in order of first appearance. ``resize_type="Resize"``:
  every image is ``short_size x max_size``, so one canvas."""
  split = _as_split(source)
  n = len(split)
  gb = batch_size * process_count
  sizes = _split_sizes(split)
  fixed_hw = _fixed_resize(resize_type, int(short_size), max_size)
  if fixed_hw is not None:  # one size: one canvas (checked here, not against the sizes)
    pad_hw = _check_fixed_canvas(pad_hw, fixed_hw, size_divisibility)
  elif pad_hw is None and sizes is None:
    logger.warning(
        "no per-example image sizes in the metadata: evaluating on one %s canvas "
        "(results can differ slightly from the official per-image padding)",
        default_pad_hw(max_size, size_divisibility),
    )
    pad_hw = default_pad_hw(max_size, size_divisibility)
  if pad_hw is not None:
    if fixed_hw is None:
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
    resize_type: str = "ResizeShortestEdge",
) -> Iterator[Dict[str, np.ndarray]]:
  """Iterator over every example exactly once (test-time resize ``short_size``/``max_size``,
  no flip), batched by :func:`eval_plan`: by default each image on its official canvas (its
  resized size rounded up to ``size_divisibility``), else on the fixed ``pad_hw``.
  ``resize_type="Resize"`` (centerX): every image to exactly ``short_size x max_size``. Batches not
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
      resize_type=resize_type,
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
      fixed_hw=_fixed_resize(resize_type, int(short_size), max_size),
  )
  return _run(batcher, 0, len(plan), num_workers, num_threads, prefetch)


def num_eval_batches(source, batch_size: int, process_count: int = 1, **plan_kw) -> int:
  """Number of batches :func:`make_eval_loader` yields per process (same keyword arguments)."""
  return len(eval_plan(source, batch_size=batch_size, process_count=process_count, **plan_kw))


CONFIG = schema.group(
    "data",
    "The loaders.",
    schema.Field("filter_empty", True, "training skips images without boxes"),
    schema.Field("num_workers", 4, "grain worker processes (0: in-process)"),
)
