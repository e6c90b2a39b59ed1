"""Host-side train augmentations of the one-stage family (centerX / CenterNet), numpy + PIL.

Shape contract of every function here (docs/DESIGN.md conventions, as ``transforms.py``):

- ``image``: ``[H, W, 3] uint8`` RGB; functions return a new array (the input is never modified);
- ``boxes``: ``float32 [N, 4]`` ``(x1, y1, x2, y2)`` in absolute pixels of the current image,
  continuous coordinates (pixel ``(i, j)`` covers ``[j, j + 1] x [i, i + 1]``, no +1);
- ``classes`` (and crowd flags) ``[N]`` are not passed in: a function that can drop boxes returns
  ``keep``, the int64 indices of the input boxes it kept (in order), so the caller filters classes
  and crowd flags alongside.

Every random function takes an explicit ``numpy.random.Generator`` and explicit settings (no
keyword defaults: the defaults live in the config schema, ``cn2_jax/config.py`` ``data``), so the
output is a pure function of its inputs; the train pipeline seeds one generator per example
(``batcher.py``: ``default_rng([seed, 4, g])``).

What is implemented, and how it relates to the official code (docs/onestage.md §5.4):

* :func:`random_crop_relative_range`: centerX's ``RandomCrop("relative_range", SIZE)`` applied
  through detectron2's ``gen_crop_transform_with_instance``: each side is cropped to
  ``uniform(s, 1)`` of its length (``int(x + 0.5)``), and the window is drawn so that it holds the
  centre of one box chosen uniformly among all boxes (crowd included, as centerX's
  ``np.random.choice(annotations)``); without boxes it is detectron2's plain random crop.
* :func:`color_aug_centerx`: centerX's (= CenterNet-better's) ``RandomBrightness``,
  ``RandomContrast``, ``RandomSaturation`` (factors ``uniform(lo, hi)``, (0.6, 1.4) official) and
  ``RandomLighting(0.1)`` (ImageNet PCA, added to 0-255 pixels), in that fixed order, each a
  detectron2 ``BlendTransform`` on the uint8 image (clip to [0, 255], truncate to uint8) with the
  dtypes numpy 1.x gave it.
* :func:`color_aug_centernet`: CenterNet's ``color_aug``: brightness/contrast/saturation in random
  order (factors ``1 + uniform(-0.4, 0.4)``) on the ``[0, 1]`` float image, contrast and saturation
  against the grey of the input image, then PCA lighting on the ``[0, 1]`` scale with CenterNet's
  COCO eigen-statistics (rows reordered BGR -> RGB: this pipeline is RGB); the result is clipped
  and rounded back to uint8 (CenterNet normalises the float image directly).
* :func:`random_warp`: optional random affine (scale, rotation, translation, shear about the image
  centre) and/or perspective (image corners moved), one resampling, output of the input size; not in
  centerX (whose imgaug perspective does not move the boxes, docs/onestage.md §5.4); here boxes
  move: see :func:`warp_boxes` for the box rule.
* :func:`center_affine`: CenterNet-better's ``CenterAffine``: a square window of side
  ``max(H, W) * scale`` (scale from ``np.arange(0.6, 1.4, 0.1)`` officially) around a random centre
  (``randint(border, side - border)``, border shrunk for small images as ``_get_boarder``) is
  warped to an ``S x S`` canvas; box corners are clipped to ``[0, S - 1]`` as its
  ``AffineTransform.apply_coords`` does.

* :func:`resize_fixed`: centerX's ``RESIZE_TYPE "Resize"`` (``dataset_mapper.build_transform_gen``:
  detectron2 ``Resize(shape=(min_size, max_size))``): every image becomes exactly ``min_size``
  rows by ``max_size`` columns whatever its aspect ratio (:func:`fixed_resize_hw`; in training
  ``min_size`` is the first of ``MIN_SIZE_TRAIN``), boxes scaled by ``new / old`` per axis.
* :func:`min_size_keep`: centerX's ``BOX_MINSIZE`` (detectron2 ``filter_empty_instances(...,
  box_threshold)``, ``Boxes.nonempty``): after augmentation a box is kept when its width **and**
  height are both ``> box_min_size`` px (dropped when either is ``<=``); crowd boxes (ignore
  regions, which centerX does not load at all) are kept.

Resampling: PIL bilinear in continuous coordinates, the same mapping the boxes get (the official
``cv2.warpAffine`` maps pixel indices, i.e. its image is shifted by ``(1 - scale) / 2`` px against
its own boxes; here image and boxes agree).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from cn2_jax import schema
from cn2_jax.errors import ConfigError

__all__ = [
    "AugmentSettings",
    "IMAGENET_EIGVAL",
    "IMAGENET_EIGVEC",
    "CENTERNET_COCO_EIGVAL",
    "CENTERNET_COCO_EIGVEC",
    "COLOR_AUG_STYLES",
    "relative_range_crop_size",
    "crop_window_with_instance",
    "random_crop_relative_range",
    "blend_brightness",
    "blend_contrast",
    "blend_saturation",
    "blend_lighting",
    "color_aug_centerx",
    "color_aug_centernet",
    "color_aug",
    "affine_matrix",
    "perspective_matrix",
    "warp_image",
    "warp_boxes",
    "random_warp",
    "center_affine_params",
    "center_affine_matrix",
    "center_affine",
    "pad_for",
    "RESIZE_TYPES",
    "fixed_resize_hw",
    "resize_fixed",
    "min_size_keep",
]

# detectron2 RandomLighting: ImageNet PCA (fb.resnet.torch), rows = RGB channels, cols = components.
IMAGENET_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
IMAGENET_EIGVEC = np.array(
    [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]
)
# CenterNet (CornerNet) COCO statistics; CenterNet's rows are BGR, reversed here to RGB.
CENTERNET_COCO_EIGVAL = np.array([0.2141788, 0.01817699, 0.00341571], np.float32)
CENTERNET_COCO_EIGVEC = np.ascontiguousarray(
    np.array(
        [
            [-0.58752847, -0.69563484, 0.41340352],
            [-0.5832747, 0.00994535, -0.81221408],
            [-0.56089297, 0.71832671, 0.41158938],
        ],
        np.float32,
    )[::-1]
)
# data.resize_type values: detectron2 ResizeShortestEdge (transforms.py) and centerX's "Resize".
RESIZE_TYPES = ("ResizeShortestEdge", "Resize")
# data.color_aug values: "" = off.
COLOR_AUG_STYLES = ("", "centerx", "centernet")
# ITU-R 601 luma (detectron2 RandomSaturation, cv2 RGB/BGR -> GRAY), RGB order.
_LUMA = (0.299, 0.587, 0.114)


def _as_boxes(boxes) -> np.ndarray:
  return np.asarray(boxes, np.float32).reshape(-1, 4)


def _nonempty(boxes: np.ndarray) -> np.ndarray:
  return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


# ----------------------------------------------------------------------------------------------
# Settings (built from the config; no defaults here)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AugmentSettings:
  """The one-stage train augmentations (config ``data`` keys of the same meaning, see
  ``cn2_jax/config.py``). Order in the train pipeline: crop -> resize (or center_affine) ->
  affine/perspective -> horizontal flip -> colour."""

  crop_relative_range: Tuple[float, ...]  # () = off, else (h, w) minimum fractions
  color_aug: str  # one of COLOR_AUG_STYLES
  color_aug_range: Tuple[float, float]
  color_aug_lighting: float
  affine: bool
  affine_scale: Tuple[float, float]
  affine_rotate: float
  affine_translate: float
  affine_shear: float
  perspective: float
  warp_min_size: float
  warp_min_visible: float
  center_affine: bool
  center_affine_size: int
  center_affine_scale: Tuple[float, float]
  center_affine_scale_step: float
  center_affine_border: int

  @classmethod
  def from_config(cls, data: Mapping[str, Any]) -> "AugmentSettings":
    """From the config's ``data`` section (a ConfigDict or dict with every key above)."""
    return cls(
        crop_relative_range=tuple(float(v) for v in data["crop_relative_range"]),
        color_aug=str(data["color_aug"]),
        color_aug_range=tuple(float(v) for v in data["color_aug_range"]),
        color_aug_lighting=float(data["color_aug_lighting"]),
        affine=bool(data["affine"]),
        affine_scale=tuple(float(v) for v in data["affine_scale"]),
        affine_rotate=float(data["affine_rotate"]),
        affine_translate=float(data["affine_translate"]),
        affine_shear=float(data["affine_shear"]),
        perspective=float(data["perspective"]),
        warp_min_size=float(data["warp_min_size"]),
        warp_min_visible=float(data["warp_min_visible"]),
        center_affine=bool(data["center_affine"]),
        center_affine_size=int(data["center_affine_size"]),
        center_affine_scale=tuple(float(v) for v in data["center_affine_scale"]),
        center_affine_scale_step=float(data["center_affine_scale_step"]),
        center_affine_border=int(data["center_affine_border"]),
    )

  @property
  def crop(self) -> bool:
    return len(self.crop_relative_range) > 0

  @property
  def warp(self) -> bool:
    return self.affine or self.perspective > 0

  @property
  def enabled(self) -> bool:
    """False when every augmentation is off (the pipeline then ignores the settings)."""
    return self.crop or bool(self.color_aug) or self.warp or self.center_affine

  def check(self) -> "AugmentSettings":
    """Raises ValueError on settings out of range; returns self."""
    if self.crop and (
        len(self.crop_relative_range) != 2 or not all(0 < v <= 1 for v in self.crop_relative_range)
    ):
      raise ValueError(
          f"crop_relative_range={self.crop_relative_range} must be () or (h, w) in (0, 1]"
      )
    if self.color_aug not in COLOR_AUG_STYLES:
      raise ValueError(f"color_aug must be one of {COLOR_AUG_STYLES}, got {self.color_aug!r}")
    lo, hi = self.color_aug_range
    if not 0 <= lo <= hi:
      raise ValueError(f"color_aug_range={self.color_aug_range} must be 0 <= lo <= hi")
    if self.color_aug_lighting < 0:
      raise ValueError(f"color_aug_lighting={self.color_aug_lighting} must be >= 0")
    lo, hi = self.affine_scale
    if not 0 < lo <= hi:
      raise ValueError(f"affine_scale={self.affine_scale} must be 0 < lo <= hi")
    if not (
        self.affine_rotate >= 0
        and 0 <= self.affine_translate <= 1
        and 0 <= self.affine_shear < 90
        and 0 <= self.perspective < 0.5
    ):
      raise ValueError(
          "need affine_rotate >= 0, 0 <= affine_translate <= 1, 0 <= affine_shear < 90 (degrees), "
          f"0 <= perspective < 0.5; got {self.affine_rotate}, {self.affine_translate}, "
          f"{self.affine_shear}, {self.perspective}"
      )
    if self.warp_min_size < 0 or not 0 <= self.warp_min_visible <= 1:
      raise ValueError(
          f"warp_min_size={self.warp_min_size} must be >= 0 and warp_min_visible="
          f"{self.warp_min_visible} in [0, 1]"
      )
    lo, hi = self.center_affine_scale
    if (
        self.center_affine_size <= 0
        or not 0 < lo <= hi
        or self.center_affine_scale_step < 0
        or self.center_affine_border < 0
    ):
      raise ValueError(
          "need center_affine_size > 0, 0 < center_affine_scale lo <= hi, "
          f"center_affine_scale_step >= 0, center_affine_border >= 0; got {self.center_affine_size}"
          f", {self.center_affine_scale}, {self.center_affine_scale_step}, "
          f"{self.center_affine_border}"
      )
    return self


# ----------------------------------------------------------------------------------------------
# RandomCrop "relative_range" around a GT centre (centerX dataset_mapper + detectron2)
# ----------------------------------------------------------------------------------------------
def relative_range_crop_size(
    h: int, w: int, size: Sequence[float], rng: np.random.Generator
) -> Tuple[int, int]:
  """detectron2 ``RandomCrop.get_crop_size`` for ``"relative_range"``: ``(crop_h, crop_w)``, each
  ``int(side * uniform(s, 1) + 0.5)`` (one ``rng.random(2)`` draw, float32 ``size`` as d2)."""
  cs = np.asarray(size, np.float32)
  ch, cw = cs + rng.random(2) * (1 - cs)
  return int(h * ch + 0.5), int(w * cw + 0.5)


def crop_window_with_instance(
    crop_hw: Tuple[int, int], image_hw: Tuple[int, int], box, rng: np.random.Generator
) -> Tuple[int, int]:
  """detectron2 ``gen_crop_transform_with_instance``: the crop's top-left ``(y0, x0)`` such that
  ``[x0, x0 + cw] x [y0, y0 + ch]`` holds the centre of ``box`` (xyxy) up to the integer rounding
  (``floor(centre) - crop <= origin <= ceil(centre)``), and lies inside the image; ``y0`` is
  drawn before ``x0``. The centre is clamped into the image (d2 asserts it is inside)."""
  crop = np.asarray(crop_hw, np.int64)
  size = np.asarray(image_hw, np.int64)
  box = np.asarray(box, np.float64)
  center = np.array([(box[1] + box[3]) * 0.5, (box[0] + box[2]) * 0.5])
  center = np.clip(center, 0, size)
  lo = np.maximum(np.floor(center).astype(np.int64) - crop, 0)
  hi = np.maximum(size - crop, 0)
  hi = np.minimum(hi, np.ceil(center).astype(np.int64))
  y0 = int(rng.integers(lo[0], hi[0] + 1))
  x0 = int(rng.integers(lo[1], hi[1] + 1))
  return y0, x0


def random_crop_relative_range(
    image: np.ndarray,
    boxes,
    size: Sequence[float],
    rng: np.random.Generator,
    around_instance: bool = True,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """centerX's training crop: ``(image, boxes, keep)``.

  ``size = (sh, sw)``: crop ``int(H * uniform(sh, 1) + 0.5) x int(W * uniform(sw, 1) + 0.5)``
  (:func:`relative_range_crop_size`), placed so that it holds the centre of one box drawn uniformly
  among ``boxes`` (:func:`crop_window_with_instance`); with no boxes, or ``around_instance=False``
  (centerX woGT: no instances are built, the crop is plain random), the window is uniform (d2
  ``RandomCrop.get_transform``). Boxes are shifted, clipped to the crop, and the empty ones
  (width or height <= 0) dropped; ``keep`` indexes the kept input boxes. Draw order:
  ``random(2)``, then the box index (only when placed around one), then ``y0``, ``x0``.
  """
  boxes = _as_boxes(boxes)
  h, w = image.shape[:2]
  ch, cw = relative_range_crop_size(h, w, size, rng)
  if len(boxes) and around_instance:
    i = int(rng.integers(len(boxes)))
    y0, x0 = crop_window_with_instance((ch, cw), (h, w), boxes[i], rng)
  else:
    y0 = int(rng.integers(h - ch + 1))
    x0 = int(rng.integers(w - cw + 1))
  out = np.ascontiguousarray(image[y0 : y0 + ch, x0 : x0 + cw])
  b = boxes - np.array([x0, y0, x0, y0], np.float32)
  b[:, 0::2] = np.clip(b[:, 0::2], 0, cw)
  b[:, 1::2] = np.clip(b[:, 1::2], 0, ch)
  keep = np.nonzero(_nonempty(b))[0]
  return out, b[keep], keep


# ----------------------------------------------------------------------------------------------
# Colour
# ----------------------------------------------------------------------------------------------
def _to_uint8(x: np.ndarray) -> np.ndarray:
  """detectron2 BlendTransform's return: clip to [0, 255] then ``astype(uint8)`` (truncation)."""
  return np.clip(x, 0, 255).astype(np.uint8)


def blend_brightness(image: np.ndarray, factor: float) -> np.ndarray:
  """d2 ``RandomBrightness``: ``BlendTransform(src=0, 1 - f, f)``: ``f * img`` in float32."""
  return _to_uint8(np.float32(factor) * image.astype(np.float32))


def blend_contrast(image: np.ndarray, factor: float) -> np.ndarray:
  """d2 ``RandomContrast``: blend with the mean of all pixels and channels of ``image``:
  ``(1 - f) * mean + f * img``, in float32 (numpy 1.x: the float64 scalar did not upcast)."""
  mean = image.mean()
  return _to_uint8(np.float32((1 - factor) * mean) + np.float32(factor) * image.astype(np.float32))


def blend_saturation(image: np.ndarray, factor: float) -> np.ndarray:
  """d2 ``RandomSaturation``: blend with the grey ``img . (0.299, 0.587, 0.114)`` (float64):
  ``(1 - f) * grey + f * img`` (the ``f * img`` product in float32, the sum in float64)."""
  grey = image.dot(np.asarray(_LUMA, np.float64))[:, :, None]
  return _to_uint8((1 - factor) * grey + np.float32(factor) * image.astype(np.float32))


def blend_lighting(image: np.ndarray, weights, eigval, eigvec) -> np.ndarray:
  """d2 ``RandomLighting`` with given PCA ``weights`` ``[3]``: adds ``eigvec @ (weights *
  eigval)`` (float64, one value per channel) to the 0-255 pixels."""
  offset = np.asarray(eigvec, np.float64).dot(
      np.asarray(weights, np.float64) * np.asarray(eigval, np.float64)
  )
  return _to_uint8(offset + image.astype(np.float32))


def color_aug_centerx(
    image: np.ndarray,
    rng: np.random.Generator,
    intensity: Tuple[float, float],
    lighting: float,
) -> np.ndarray:
  """centerX's colour ops in its fixed order: brightness, contrast, saturation (factors
  ``rng.uniform(*intensity)``, one each, in that order), lighting (``rng.normal(0, lighting, 3)``
  weights of the ImageNet PCA); each on the uint8 result of the previous one."""
  lo, hi = intensity
  image = blend_brightness(image, rng.uniform(lo, hi))
  image = blend_contrast(image, rng.uniform(lo, hi))
  image = blend_saturation(image, rng.uniform(lo, hi))
  weights = rng.normal(0.0, lighting, 3)
  return blend_lighting(image, weights, IMAGENET_EIGVAL, IMAGENET_EIGVEC)


def color_aug_centernet(
    image: np.ndarray,
    rng: np.random.Generator,
    intensity: Tuple[float, float],
    lighting: float,
) -> np.ndarray:
  """CenterNet's ``color_aug`` on ``x = img / 255`` (float32): ``order = rng.permutation(3)`` of
  (brightness ``x *= a``, contrast ``x = a x + (1 - a) mean(grey)``, saturation ``x = a x +
  (1 - a) grey``), each ``a = rng.uniform(*intensity)`` drawn in that order, with ``grey`` the
  luma of the input image; then ``x += eigvec @ (eigval * rng.normal(0, lighting, 3))`` (CenterNet
  COCO PCA, ``[0, 1]`` scale). Returns ``uint8(clip(round(255 x), 0, 255))``."""
  lo, hi = intensity
  x = image.astype(np.float32) / np.float32(255.0)
  grey = x.dot(np.asarray(_LUMA, np.float32))
  grey_mean = grey.mean(dtype=np.float32)
  for op in rng.permutation(3):
    a = np.float32(rng.uniform(lo, hi))
    if op == 0:
      x = x * a
    elif op == 1:
      x = x * a + grey_mean * (np.float32(1) - a)
    else:
      x = x * a + grey[:, :, None] * (np.float32(1) - a)
  alpha = rng.normal(0.0, lighting, 3)
  x = (x + CENTERNET_COCO_EIGVEC.dot(CENTERNET_COCO_EIGVAL * alpha)).astype(np.float32)
  return np.clip(np.rint(x * np.float32(255.0)), 0, 255).astype(np.uint8)


def color_aug(
    image: np.ndarray,
    rng: np.random.Generator,
    style: str,
    intensity: Tuple[float, float],
    lighting: float,
) -> np.ndarray:
  """``style`` "centerx" (:func:`color_aug_centerx`), "centernet" (:func:`color_aug_centernet`)
  or "" (no change, no draw)."""
  if style == "centerx":
    return color_aug_centerx(image, rng, intensity, lighting)
  if style == "centernet":
    return color_aug_centernet(image, rng, intensity, lighting)
  if style == "":
    return image
  raise ValueError(f"color_aug style must be one of {COLOR_AUG_STYLES}, got {style!r}")


# ----------------------------------------------------------------------------------------------
# Geometric warps (3x3 matrices mapping input to output continuous coordinates)
# ----------------------------------------------------------------------------------------------
def affine_matrix(
    h: int,
    w: int,
    rng: np.random.Generator,
    scale: Tuple[float, float],
    rotate: float,
    translate: float,
    shear: float,
) -> np.ndarray:
  """Random affine about the image centre ``c = (w/2, h/2)``: ``x' = T(c + t) R(a) Sh S(s)
  T(-c) x``, draws in order ``s ~ U(scale)``, ``a ~ U(-rotate, rotate)`` degrees, shear angles
  ``sx, sy ~ U(-shear, shear)`` degrees (``Sh = [[1, tan sx], [tan sy, 1]]``), ``t = (U(-translate,
  translate) w, U(-translate, translate) h)``. Returns float64 ``[3, 3]``."""
  s = rng.uniform(scale[0], scale[1])
  a = math.radians(rng.uniform(-rotate, rotate))
  sx = math.radians(rng.uniform(-shear, shear))
  sy = math.radians(rng.uniform(-shear, shear))
  tx = rng.uniform(-translate, translate) * w
  ty = rng.uniform(-translate, translate) * h
  cx, cy = w / 2.0, h / 2.0
  to_origin = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]], np.float64)
  scale_m = np.diag([s, s, 1.0])
  shear_m = np.array([[1, math.tan(sx), 0], [math.tan(sy), 1, 0], [0, 0, 1]], np.float64)
  cos, sin = math.cos(a), math.sin(a)
  rot = np.array([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]], np.float64)
  back = np.array([[1, 0, cx + tx], [0, 1, cy + ty], [0, 0, 1]], np.float64)
  return back @ rot @ shear_m @ scale_m @ to_origin


def _homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """The 3x3 projective map (``[2, 2] = 1``) sending the 4 points ``src`` to ``dst`` ``[4, 2]``."""
  a, b = [], []
  for (x, y), (u, v) in zip(src, dst):
    a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
    a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    b += [u, v]
  p = np.linalg.solve(np.asarray(a, np.float64), np.asarray(b, np.float64))
  return np.append(p, 1.0).reshape(3, 3)


def perspective_matrix(h: int, w: int, rng: np.random.Generator, distortion: float) -> np.ndarray:
  """Random perspective: the image corners (TL, TR, BR, BL) each move by ``(U(-d, d) w,
  U(-d, d) h)`` (8 draws, x before y, corner by corner); returns the homography sending the
  original corners to the moved ones (float64 ``[3, 3]``)."""
  src = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64)
  jitter = rng.uniform(-distortion, distortion, (4, 2)) * np.array([w, h], np.float64)
  return _homography(src, src + jitter)


def warp_image(image: np.ndarray, matrix: np.ndarray, out_hw: Tuple[int, int]) -> np.ndarray:
  """Resamples ``image`` so that output point ``p`` shows input point ``matrix^-1 p``
  (continuous coordinates, PIL bilinear, black outside the input); ``[out_h, out_w, 3] uint8``."""
  out_h, out_w = int(out_hw[0]), int(out_hw[1])
  m = np.asarray(matrix, np.float64)
  inv = np.linalg.inv(m)
  inv = inv / inv[2, 2]
  pil = Image.fromarray(image)
  if np.allclose(m[2], (0.0, 0.0, m[2, 2]), rtol=0, atol=1e-12):
    method, data = Image.Transform.AFFINE, tuple(inv[:2].ravel())
  else:
    method, data = Image.Transform.PERSPECTIVE, tuple(inv.ravel()[:8])
  out = pil.transform(
      (out_w, out_h), method, data, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0)
  )
  return np.asarray(out)


def warp_boxes(boxes, matrix: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """``(enclosing, ok)``: the axis-aligned box enclosing the 4 mapped corners of every box (float64
  ``[N, 4]``, not clipped), and ``ok``: False where a corner maps to or behind the projective
  horizon (``w' <= 0``; never for affine maps)."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  x1, y1, x2, y2 = boxes.T
  xs = np.stack([x1, x2, x2, x1], 1)
  ys = np.stack([y1, y1, y2, y2], 1)
  m = np.asarray(matrix, np.float64)
  den = m[2, 0] * xs + m[2, 1] * ys + m[2, 2]
  ok = np.all(den > 1e-9, axis=1)
  den = np.where(den > 1e-9, den, 1.0)
  u = (m[0, 0] * xs + m[0, 1] * ys + m[0, 2]) / den
  v = (m[1, 0] * xs + m[1, 1] * ys + m[1, 2]) / den
  enclosing = np.stack([u.min(1), v.min(1), u.max(1), v.max(1)], 1)
  return enclosing, ok


def random_warp(
    image: np.ndarray,
    boxes,
    rng: np.random.Generator,
    affine: bool,
    scale: Tuple[float, float],
    rotate: float,
    translate: float,
    shear: float,
    perspective: float,
    min_size: float,
    min_visible: float,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Random affine (if ``affine``, :func:`affine_matrix`) then perspective (if ``perspective >
  0``, :func:`perspective_matrix`) as one warp of the image onto a canvas of its own size:
  ``(image, boxes, keep)``.

  Box rule: each box's 4 corners are mapped, the enclosing axis-aligned box ``E`` is taken
  (rotation and shear therefore loosen boxes) and clipped to the image (``C``); the box is kept
  iff ``width(C) >= min_size`` and ``height(C) >= min_size`` (pixels) and ``area(C) >=
  min_visible * area(E)`` (at least that fraction of the warped box is still in the image), and
  no corner fell behind the projective horizon. With both off it returns its inputs (no draw).
  """
  boxes = _as_boxes(boxes)
  h, w = image.shape[:2]
  m = np.eye(3)
  if affine:
    m = affine_matrix(h, w, rng, scale, rotate, translate, shear)
  if perspective > 0:
    m = perspective_matrix(h, w, rng, perspective) @ m
  if not affine and perspective <= 0:
    return image, boxes, np.arange(len(boxes))
  out = warp_image(image, m, (h, w))
  enc, ok = warp_boxes(boxes, m)
  clipped = enc.copy()
  clipped[:, 0::2] = np.clip(enc[:, 0::2], 0, w)
  clipped[:, 1::2] = np.clip(enc[:, 1::2], 0, h)
  cw = clipped[:, 2] - clipped[:, 0]
  ch = clipped[:, 3] - clipped[:, 1]
  area = (enc[:, 2] - enc[:, 0]) * (enc[:, 3] - enc[:, 1])
  good = ok & (cw >= min_size) & (ch >= min_size) & (cw > 0) & (ch > 0)
  good &= cw * ch >= min_visible * area
  keep = np.nonzero(good)[0]
  return out, clipped[keep].astype(np.float32), keep


# ----------------------------------------------------------------------------------------------
# CenterNet-better CenterAffine
# ----------------------------------------------------------------------------------------------
def _center_affine_border(border: int, size: int) -> int:
  """CenterNet-better ``CenterAffine._get_boarder``: the border halves until it is below half the
  side."""
  i = 1
  half = size // 2
  while border // i > 0 and half <= border // i:  # (the official loop never ends for side < 2)
    i *= 2
  return border // i


def center_affine_params(
    h: int,
    w: int,
    rng: np.random.Generator,
    scale_range: Tuple[float, float],
    scale_step: float,
    border: int,
) -> Tuple[float, float, float]:
  """``(cx, cy, side)`` of CenterNet-better's random window: ``side = max(h, w) * s`` with ``s``
  chosen uniformly from ``lo, lo + step, ... <= hi`` (``np.arange(0.6, 1.4, 0.1)`` officially;
  ``step == 0``: ``s ~ U(lo, hi)``), then ``cx = randint(bw, w - bw)``, ``cy = randint(bh, h -
  bh)`` (exclusive high) with the borders of :func:`_center_affine_border` (the centre is the
  image centre on a side too small for its border)."""
  lo, hi = scale_range
  if scale_step > 0:
    n = int(math.floor((hi - lo) / scale_step + 1e-6)) + 1
    s = float(lo + scale_step * rng.integers(n))
  else:
    s = float(rng.uniform(lo, hi))
  side = float(max(h, w)) * s
  bh = _center_affine_border(border, h)
  bw = _center_affine_border(border, w)
  cx = float(rng.integers(bw, w - bw)) if w - bw > bw else w / 2.0
  cy = float(rng.integers(bh, h - bh)) if h - bh > bh else h / 2.0
  return cx, cy, side


def center_affine_matrix(cx: float, cy: float, side: float, out_size: int) -> np.ndarray:
  """CenterNet-better ``generate_src_and_dst``: the ``side x side`` window centred at ``(cx, cy)``
  onto the ``out_size`` square: ``x' = (x - cx) * out / side + out / 2`` (no rotation)."""
  k = out_size / side
  return np.array(
      [[k, 0, out_size / 2.0 - k * cx], [0, k, out_size / 2.0 - k * cy], [0, 0, 1]], np.float64
  )


def center_affine(
    image: np.ndarray,
    boxes,
    rng: np.random.Generator,
    out_size: int,
    scale_range: Tuple[float, float],
    scale_step: float,
    border: int,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """CenterNet-better's ``CenterAffine`` (replaces the resize): ``(image [S, S, 3], boxes,
  keep)`` with ``S = out_size``. The window of :func:`center_affine_params` is warped to the
  square; boxes are mapped, clipped to ``[0, S - 1]`` (its ``apply_coords``) and the empty ones
  dropped (detectron2 ``filter_empty_instances``)."""
  boxes = _as_boxes(boxes)
  h, w = image.shape[:2]
  cx, cy, side = center_affine_params(h, w, rng, scale_range, scale_step, border)
  m = center_affine_matrix(cx, cy, side, out_size)
  out = warp_image(image, m, (out_size, out_size))
  enc, _ = warp_boxes(boxes, m)
  enc = np.clip(enc, 0, out_size - 1).astype(np.float32)
  keep = np.nonzero(_nonempty(enc))[0]
  return out, enc[keep], keep


def pad_for(settings: Optional[AugmentSettings], max_size: int) -> Optional[int]:
  """The square side every train image fits in when the settings change the image shape (crop:
  the resize's ``max_size``; center_affine: its output size), else None (shape unchanged)."""
  if settings is None or not settings.enabled:
    return None
  if settings.center_affine:
    return int(settings.center_affine_size)
  if settings.crop:
    return int(max_size)
  return None


# ----------------------------------------------------------------------------------------------
# centerX RESIZE_TYPE "Resize" and BOX_MINSIZE
# ----------------------------------------------------------------------------------------------
def fixed_resize_hw(min_size, max_size: int) -> Tuple[int, int]:
  """The ``(h, w)`` of centerX's ``Resize(shape=(min_size, max_size))``: ``min_size`` is an int
  or a sequence whose first value is used (centerX ``min_size[0]``)."""
  if not isinstance(min_size, (int, np.integer)):
    min_size = tuple(min_size)[0]
  return int(min_size), int(max_size)


def resize_fixed(
    image: np.ndarray, boxes, out_hw: Tuple[int, int]
) -> Tuple[np.ndarray, np.ndarray]:
  """detectron2 ``ResizeTransform`` to exactly ``out_hw = (h, w)`` (PIL bilinear), boxes scaled by
  ``w / W`` in x and ``h / H`` in y. Returns ``(image, boxes)`` (boxes keep their count)."""
  h, w = (int(v) for v in out_hw)
  src_h, src_w = image.shape[:2]
  out = image
  if (src_h, src_w) != (h, w):
    out = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
  factor = np.array([w / src_w, h / src_h, w / src_w, h / src_h], np.float64)
  return out, (_as_boxes(boxes).astype(np.float64) * factor).astype(np.float32)


def min_size_keep(boxes, crowd, box_min_size: float) -> np.ndarray:
  """int64 indices of the boxes kept by centerX's ``BOX_MINSIZE`` rule: width > ``box_min_size``
  and height > ``box_min_size``, or a crowd box (``crowd`` [N] bool)."""
  b = _as_boxes(boxes)
  crowd = np.asarray(crowd, bool).reshape(-1)
  big = (b[:, 2] - b[:, 0] > box_min_size) & (b[:, 3] - b[:, 1] > box_min_size)
  return np.nonzero(big | crowd)[0]


def _validate_augment(cfg) -> None:
  try:
    aug = AugmentSettings.from_config(cfg.data).check()
  except (ValueError, TypeError) as e:
    raise ConfigError(f"data augmentation settings: {e}") from e
  if cfg.data.lsj and (aug.crop or aug.center_affine):
    raise ConfigError(
        "data.crop_relative_range / data.center_affine replace the resize: not with lsj"
    )
  size = cfg.data.box_min_size
  if isinstance(size, bool) or not isinstance(size, (int, float)) or not size >= 0:
    raise ConfigError(f"data.box_min_size must be a number >= 0 (px), got {size!r}")


CONFIG = schema.group(
    "data",
    "One-stage train augmentation (this module), all off by default (the CenterNet2 path is "
    "unchanged). Order: crop -> resize (or center_affine) -> affine/perspective -> flip -> "
    "colour.",
    schema.Field(
        "crop_relative_range",
        (),
        "(h, w) minimum fractions of centerX's RandomCrop 'relative_range' (each side uniform(s, "
        "1) of its length, window holding a random GT box centre; centerX COCO: (0.6, 0.6)); () = "
        "off. On, every batch is padded to one max_size_train square (pad_hw_train, if set, must "
        "hold it)",
    ),
    schema.Field(
        "color_aug",
        "",
        "'' = off; 'centerx' = detectron2 RandomBrightness/Contrast/Saturation then "
        "RandomLighting (ImageNet PCA on 0-255 pixels), fixed order, as centerX / "
        "CenterNet-better; 'centernet' = CenterNet's color_aug (the three in random order on 0-1 "
        "floats, PCA lighting of its COCO stats)",
    ),
    schema.Field("color_aug_range", (0.6, 1.4), "brightness / contrast / saturation factor range"),
    schema.Field("color_aug_lighting", 0.1, "std of the PCA lighting weights"),
    schema.Field(
        "affine",
        False,
        "random affine about the image centre after the resize, boxes moved (not in centerX)",
    ),
    schema.Field("affine_scale", (0.5, 1.5), "zoom factor range"),
    schema.Field("affine_rotate", 0.0, "max rotation, degrees"),
    schema.Field("affine_translate", 0.1, "max shift, fraction of the width / height"),
    schema.Field("affine_shear", 0.0, "max shear angle (x and y), degrees"),
    schema.Field(
        "perspective", 0.0, "> 0: image corners moved by up to this fraction of the side; 0 = off"
    ),
    schema.Field(
        "warp_min_size",
        1.0,
        "affine/perspective: the box enclosing the warped corners, clipped to the image, is "
        "dropped if narrower / shorter than this (px)",
    ),
    schema.Field("warp_min_visible", 0.1, "... or keeping less than this fraction of its area"),
    schema.Field(
        "center_affine",
        False,
        "CenterNet-better CenterAffine, replacing the resize: a square window of max(h, w) * "
        "scale around a random centre (border center_affine_border px) warped to a "
        "center_affine_size square canvas",
    ),
    schema.Field("center_affine_size", 512, "side of the CenterAffine canvas"),
    schema.Field(
        "center_affine_scale",
        (0.6, 1.3),
        "scale from lo, lo + step, ..., hi (CenterNet-better: np.arange(0.6, 1.4, 0.1))",
    ),
    schema.Field("center_affine_scale_step", 0.1, "step of the scale grid; 0 = uniform"),
    schema.Field("center_affine_border", 128, "border (px) the random centre keeps"),
    schema.Field(
        "box_min_size",
        0.0,
        "centerX BOX_MINSIZE: after augmentation, GT boxes whose width or height is <= this "
        "(px) are dropped (become background); crowd boxes are kept. 0 = only empty boxes are "
        "dropped (every family)",
    ),
    validate=_validate_augment,
)
