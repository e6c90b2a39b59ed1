"""Padded batches from examples: decode, resize / augment, place on a canvas (batch contract).

``_TrainBatcher`` (global step -> this process's slice of the step's batch, on the step's
canvas) and ``_EvalBatcher`` (eval plan entry -> batch) are picklable and run in grain workers;
``_load`` decodes a source record and ``_put`` writes one example into a batch of
``_empty_batch``. Every batch follows the batch contract of docs/DESIGN.md (``BATCH_KEYS``). Part
of the input pipeline (``pipeline.py`` lists the modules).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from cn2_jax import schema
from cn2_jax.data import augment as A
from cn2_jax.data import efficientdet_aug as E
from cn2_jax.data import transforms as T
from cn2_jax.data.augment import AugmentSettings
from cn2_jax.data.schedule import _AUG_STREAM, _EXTRA_AUG_STREAM, _SCALE_STREAM
from cn2_jax.data.splits import _ConcatSource
from cn2_jax.errors import DataError

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


@dataclasses.dataclass(frozen=True)
class LSJ:
  """Large-scale jitter: random resize to ``uniform(scale_range) * output_size`` (fit inside),
  random crop to ``output_size`` (detectron2 ResizeScale + FixedSizeCrop)."""

  output_size: int = 1024
  scale_range: Tuple[float, float] = (0.1, 2.0)


def _as_lsj(lsj) -> Union[None, LSJ, E.EfficientDetResizeCrop]:
  """The square scale jitter: None, :class:`LSJ` or CenterNet2's
  :class:`~cn2_jax.data.efficientdet_aug.EfficientDetResizeCrop` (a dict: of the one whose
  fields it names, ``train_size`` for the latter)."""
  if lsj is None or isinstance(lsj, (LSJ, E.EfficientDetResizeCrop)):
    return lsj
  if isinstance(lsj, Mapping):
    return E.EfficientDetResizeCrop(**lsj) if "train_size" in lsj else LSJ(**lsj)
  raise TypeError(f"lsj must be None, an LSJ, an EfficientDetResizeCrop or a dict, got {type(lsj)}")


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
    # Start-up time: builder imports tensorflow_datasets (~0.4 s), which the loader never needs.
    from cn2_jax.data.builder import prepared_data_hint

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
  for key, value in gt.items():
    batch[key][j] = value
  batch["batch_mask"][j] = True
  batch["image_id"][j] = image_id
  batch["orig_hw"][j] = orig_hw


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
      fixed_hw: Optional[Tuple[int, int]] = None,
      box_min_size: float = 0.0,
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
    self.lsj = lsj  # square scale jitter: LSJ, E.EfficientDetResizeCrop or None
    self.scale_per_batch = scale_per_batch
    self.process_index = process_index
    self.process_count = process_count
    self.fixed_hw = fixed_hw  # data.resize_type "Resize": every image to this (h, w)
    self.box_min_size = box_min_size  # data.box_min_size (0: only empty boxes are dropped)

  def short_sides(self, step: int) -> np.ndarray:
    """The short side of every example of the global batch of ``step``."""
    global_batch = self.batch_size * self.process_count
    if isinstance(self.short_sizes, (int, np.integer)) or len(self.short_sizes) == 1:
      return np.full(global_batch, int(np.ravel(self.short_sizes)[0]), np.int64)
    if self.scale_per_batch:
      rng = np.random.default_rng([self.seed, _SCALE_STREAM, int(step)])
      return np.full(global_batch, T.sample_short_size(self.short_sizes, rng), np.int64)
    first_position = int(step) * global_batch
    return np.array(
        [
            T.sample_short_size(
                self.short_sizes,
                np.random.default_rng([self.seed, _AUG_STREAM, first_position + j]),
            )
            for j in range(global_batch)
        ],
        np.int64,
    )

  def canvas(self, step: int, idx: np.ndarray, short: np.ndarray) -> Tuple[int, int]:
    if self.pad_hw is not None:
      return self.pad_hw
    groups = np.unique(self.groups[idx])
    return self.buckets[(int(short.max()), int(groups[0]) if len(groups) == 1 else -1)]

  def _record(self, src: int):
    """``(record, data_dir, channel offset)`` of source index ``src``."""
    if isinstance(self.source, _ConcatSource):
      part, index = self.source.locate(src)
      return (
          self.source.sources[part][index],
          self.source.data_dirs[part],
          self.source.channel_offsets[part],
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
    if isinstance(self.lsj, E.EfficientDetResizeCrop):
      # CenterNet2 INPUT.CUSTOM_AUG: resize-crop then flip, official draw order and box filter
      image, boxes, keep = E.efficientdet_resize_crop(image, boxes, self.lsj, rng, self.hflip_prob)
      classes, crowd = classes[keep], crowd[keep]
      if aug is not None:  # (crop / center_affine are refused with it, as with LSJ)
        image, boxes, classes, crowd = self._warp(image, boxes, classes, crowd, arng)
        image = A.color_aug(image, arng, aug.color_aug, aug.color_aug_range, aug.color_aug_lighting)
    elif self.lsj is not None:
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
      elif self.fixed_hw is not None:
        image, boxes = A.resize_fixed(image, boxes, self.fixed_hw)
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
    if self.box_min_size > 0:  # centerX BOX_MINSIZE, after every augmentation
      keep = A.min_size_keep(boxes, crowd, self.box_min_size)
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
    batch_size = self.batch_size
    idx = self.schedule.indices(step)
    short = self.short_sides(step)
    canvas = self.canvas(step, idx, short)
    batch = _empty_batch(batch_size, canvas, self.max_boxes)
    first = self.process_index * batch_size
    for j in range(batch_size):
      slot = first + j
      position = int(step) * batch_size * self.process_count + slot
      image, boxes, classes, crowd, image_id, orig_hw, name = self.example(
          idx[slot], position, short[slot]
      )
      _put(batch, j, image, boxes, classes, crowd, image_id, orig_hw, self.max_boxes, name)
    return batch


class _EvalBatcher:
  """local batch index -> batch (picklable). ``plan[k] = (canvas, [global_batch] source
  indices, -1 = padding example)``; this process takes its slice of global batch ``k``."""

  def __init__(
      self,
      source,
      plan,
      *,
      batch_size,
      short_size,
      max_size,
      max_boxes,
      process_index,
      data_dir="",
      fixed_hw: Optional[Tuple[int, int]] = None,
  ):
    self.source = source
    self.fixed_hw = fixed_hw  # data.resize_type "Resize": every image to this (h, w)
    self.data_dir = data_dir
    self.plan = plan
    self.batch_size = batch_size
    self.short_size = short_size
    self.max_size = max_size
    self.max_boxes = max_boxes
    self.process_index = process_index

  def __call__(self, k: int) -> Dict[str, np.ndarray]:
    batch_size = self.batch_size
    canvas, idx = self.plan[int(k)]
    batch = _empty_batch(batch_size, canvas, self.max_boxes)
    for j, i in enumerate(
        idx[self.process_index * batch_size : (self.process_index + 1) * batch_size]
    ):
      if i < 0:
        continue
      image, boxes, classes, crowd, image_id, name = _load(self.source[int(i)], self.data_dir)
      orig_hw = image.shape[:2]
      if self.fixed_hw is not None:
        image, boxes = A.resize_fixed(image, boxes, self.fixed_hw)
      else:
        image, boxes = T.resize_shortest_edge(image, boxes, self.short_size, self.max_size)
      _put(batch, j, image, boxes, classes, crowd, image_id, orig_hw, self.max_boxes, name)
    return batch


CONFIG = schema.group(
    "data",
    "Batching of training examples.",
    schema.Field("flip", True, "random horizontal flip in training"),
    schema.Field("max_boxes", 100, "GT boxes per image (padded with masks; more are dropped)"),
    schema.Field("lsj", False, "square random resize-and-crop instead of shortest edge"),
    schema.Field("lsj_size", 1024, "lsj: the square canvas side"),
    schema.Field("lsj_scale_range", (0.1, 2.0), "lsj: random scale range"),
)
