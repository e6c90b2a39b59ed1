"""CenterNet2's ``EfficientDetResizeCrop`` train augmentation (``INPUT.CUSTOM_AUG``), in numpy.

Official code: ``centernet/data/transforms/custom_augmentation_impl.py`` (``EfficientDetResizeCrop``:
the random draws), ``custom_transform.py`` (``EfficientDetResizeCropTransform``: image and
coordinates), ``centernet/data/custom_build_augmentation.py`` (train: ``scale = INPUT.SCALE_RANGE``
(default (0.1, 2.0)), ``size = INPUT.TRAIN_SIZE``, then ``RandomFlip()``; test: scale (1, 1),
``size = INPUT.TEST_SIZE``, no flip) and detectron2's ``DatasetMapper`` for the boxes
(``transform_instance_annotations``: transform, clip to the augmented image;
``filter_empty_instances``: drop boxes of width or height <= 1e-5).

One example, given ``u_scale, u_y, u_x`` (three ``uniform`` draws, in this order, as the official
``get_transform`` draws them from ``np.random``) and the image's ``(h, w)``::

  scale_factor = uniform(*scale_range)                  # u_scale
  img_scale = min(scale_factor * size / h, scale_factor * size / w)
  scaled_h, scaled_w = int(h * img_scale), int(w * img_scale)     # floor, not round
  offset_y = int(max(0, scaled_h - size) * u_y)         # independent draws per axis, floor
  offset_x = int(max(0, scaled_w - size) * u_x)
  image: PIL bilinear resize to (scaled_h, scaled_w), then the window
         [offset_y, min(scaled_h, offset_y + size)) x [offset_x, min(scaled_w, offset_x + size))
  boxes: x * img_scale - offset_x, y * img_scale - offset_y  (the float ``img_scale``, not
         scaled_w / w: boxes and pixels differ by < 1 px of the resized image)

The result is at most ``size x size`` (smaller when the scaled image is); the official batch
pads it bottom / right with zeros (``ImageList.from_tensors``), and so does the train loader on
its one square canvas (``size`` rounded up to ``size_divisibility``). The train flip (detectron2 ``RandomFlip``, a fourth draw ``u_flip < prob``)
mirrors about the cropped width; the boxes are then clipped to the cropped image (float64, as
``transform_instance_annotations``), cast to float32 (``Boxes``) and the ones with width or
height <= 1e-5 dropped (``filter_empty_instances``). The official mapper drops crowd boxes
before all this; here every box is transformed alike (the pipeline keeps crowd boxes, flagged
``gt_crowd``), and ``keep`` lets the caller select the classes / crowd flags of the kept boxes.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import numpy as np

from cn2_jax import schema
from cn2_jax.data import transforms as T

# detectron2 filter_empty_instances(box_threshold=1e-5): kept boxes are wider and taller.
EMPTY_BOX_THRESHOLD = 1e-5
NAME = "EfficientDetResizeCrop"  # the official INPUT.CUSTOM_AUG value

__all__ = [
    "EfficientDetResizeCrop",
    "ResizeCropParams",
    "resize_crop_params",
    "sample_resize_crop_params",
    "eval_resize_crop_params",
    "apply_resize_crop",
    "efficientdet_resize_crop",
]


@dataclasses.dataclass(frozen=True)
class EfficientDetResizeCrop:
  """Settings of the train augmentation: ``train_size`` (INPUT.TRAIN_SIZE: the square crop and
  canvas side) and ``scale_range`` (INPUT.SCALE_RANGE: the random scale of ``train_size``).
  ``output_size`` is ``train_size`` (the loader sizes the square canvas from it, as for LSJ)."""

  train_size: int = 640
  scale_range: Tuple[float, float] = (0.1, 2.0)

  def __post_init__(self):
    lo, hi = (float(v) for v in self.scale_range)
    if int(self.train_size) <= 0 or not 0 < lo <= hi:
      raise ValueError(
          f"EfficientDetResizeCrop needs train_size > 0 and 0 < scale_range[0] <= "
          f"scale_range[1], got {self.train_size}, {self.scale_range}"
      )

  @property
  def output_size(self) -> int:
    return int(self.train_size)


@dataclasses.dataclass(frozen=True)
class ResizeCropParams:
  """One draw of the transform (``EfficientDetResizeCropTransform``'s attributes)."""

  scaled_h: int
  scaled_w: int
  offset_y: int
  offset_x: int
  img_scale: float
  size: int

  @property
  def crop_hw(self) -> Tuple[int, int]:
    """``(h, w)`` of the augmented image."""
    return (
        min(self.scaled_h, self.offset_y + self.size) - self.offset_y,
        min(self.scaled_w, self.offset_x + self.size) - self.offset_x,
    )


def resize_crop_params(
    h: int, w: int, size: int, scale_factor: float, u_y: float, u_x: float
) -> ResizeCropParams:
  """The transform of an ``h x w`` image for the given draws: ``scale_factor`` (already in
  ``scale_range``) and the offset fractions ``u_y, u_x`` in [0, 1). Same float64 operations in
  the same order as the official ``get_transform``."""
  scaled_target_h = float(scale_factor) * size
  scaled_target_w = float(scale_factor) * size
  img_scale = min(scaled_target_h / h, scaled_target_w / w)
  # The official int(): floor. A scaled side of 0 would crash PIL there; keep 1 px instead.
  scaled_h = max(int(h * img_scale), 1)
  scaled_w = max(int(w * img_scale), 1)
  offset_y = int(max(0.0, float(scaled_h - size)) * float(u_y))
  offset_x = int(max(0.0, float(scaled_w - size)) * float(u_x))
  return ResizeCropParams(scaled_h, scaled_w, offset_y, offset_x, float(img_scale), int(size))


def sample_resize_crop_params(
    h: int, w: int, aug: EfficientDetResizeCrop, rng: np.random.Generator
) -> ResizeCropParams:
  """Draws the transform from ``rng``: ``uniform(*scale_range)``, then ``uniform(0, 1)`` for y and
  for x (both always drawn, as the official code does)."""
  lo, hi = (float(v) for v in aug.scale_range)
  scale_factor = rng.uniform(lo, hi)
  u_y = rng.uniform(0.0, 1.0)
  u_x = rng.uniform(0.0, 1.0)
  return resize_crop_params(h, w, aug.output_size, scale_factor, u_y, u_x)


def eval_resize_crop_params(h: int, w: int, test_size: int) -> ResizeCropParams:
  """The official test-time transform (``TEST_INPUT_TYPE: 'square'``): scale range (1, 1), so the
  long side becomes ``test_size`` (floored) and nothing is cropped. (With the default
  ``TEST_INPUT_TYPE: 'default'`` the official test uses ResizeShortestEdge(MIN/MAX_SIZE_TEST).)"""
  return resize_crop_params(h, w, test_size, 1.0, 0.0, 0.0)


def apply_resize_crop(
    image: np.ndarray, boxes: np.ndarray, p: ResizeCropParams, hflip: bool = False
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Applies ``p`` (then the horizontal flip if ``hflip``) to a uint8 ``[H, W, C]`` image and
  float ``[N, 4]`` XYXY boxes. Returns ``(image, boxes, keep)``: the augmented image (``p.crop_hw``),
  the boxes clipped to it (float32) without those of width or height <= 1e-5, and the indices
  of the kept input boxes."""
  # PIL bilinear on uint8, as the official apply_image (T.resize_image: identity at equal size,
  # as PIL's resize is).
  out = T.resize_image(image, p.scaled_h, p.scaled_w)
  ch, cw = p.crop_hw
  out = out[p.offset_y : p.offset_y + ch, p.offset_x : p.offset_x + cw]
  b = np.asarray(boxes, np.float64).reshape(-1, 4)
  b = b * p.img_scale - np.array([p.offset_x, p.offset_y, p.offset_x, p.offset_y], np.float64)
  if hflip:
    out = out[:, ::-1]
    b = np.stack([cw - b[:, 2], b[:, 1], cw - b[:, 0], b[:, 3]], axis=1)
  # transform_instance_annotations: clip at 0 and at the image size (float64), then Boxes (float32)
  b = np.minimum(np.maximum(b, 0.0), np.array([cw, ch, cw, ch], np.float64)).astype(np.float32)
  keep = np.nonzero(
      ((b[:, 2] - b[:, 0]) > EMPTY_BOX_THRESHOLD) & ((b[:, 3] - b[:, 1]) > EMPTY_BOX_THRESHOLD)
  )[0]
  return np.ascontiguousarray(out), b[keep], keep


def efficientdet_resize_crop(
    image: np.ndarray,
    boxes: np.ndarray,
    aug: EfficientDetResizeCrop,
    rng: np.random.Generator,
    hflip_prob: float = 0.5,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The official train augmentation list (EfficientDetResizeCrop, RandomFlip) with its draws
  from ``rng`` in the official order (scale, offset y, offset x, flip; the flip draw is made
  even when ``hflip_prob`` is 0). Returns ``(image, boxes, keep)`` as :func:`apply_resize_crop`."""
  h, w = image.shape[:2]
  params = sample_resize_crop_params(h, w, aug, rng)
  flip = rng.uniform(0.0, 1.0) < hflip_prob
  return apply_resize_crop(image, boxes, params, hflip=bool(flip))


CONFIG = schema.group(
    "data",
    "CenterNet2 INPUT.CUSTOM_AUG (this module). Eval is unchanged (the official TEST_INPUT_TYPE "
    "'default' uses min/max_size_test).",
    schema.Field(
        "custom_aug",
        "",
        "'' or 'ResizeShortestEdge' = the shortest-edge resize; 'EfficientDetResizeCrop' = random "
        "scale uniform(scale_range) * train_size (aspect kept, fit inside), random crop to "
        "train_size, then flip; every batch on one train_size square (rounded up to "
        "size_divisibility). Not with lsj, crop_relative_range or center_affine",
    ),
    schema.Field("train_size", 640, "INPUT.TRAIN_SIZE"),
    schema.Field("scale_range", (0.1, 2.0), "INPUT.SCALE_RANGE"),
)
