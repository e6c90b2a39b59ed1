"""Padded batch shapes: aspect-ratio groups and a small fixed set of bucket shapes (no JAX here).

The official code (detectron2 ``ImageList.from_tensors``) pads every batch to the largest image in
it, rounded up to a multiple of 32, and groups training images by orientation
(``ASPECT_RATIO_GROUPING``). Under ``jit`` every distinct shape is a compiled program, so here:

* **Evaluation / predict** pad each image exactly as the official test code does (batch of 1 per
  GPU): the resized image rounded up to ``size_divisibility`` (:func:`official_pad_hw`). Eval
  batches group images of equal padded shape, so results equal the official ones image by image.
  COCO val has a few dozen such shapes (one compile each, cached).
* **Training** groups images by orientation and aspect bin (:func:`aspect_group`; bins bounded by
  ``aspect_ratios``, long side / short side) and pads a batch to the bucket of its group and short
  side (:func:`train_buckets`): ``#short sizes x #groups`` shapes plus one square fallback for the
  few mixed batches per epoch. A bucket is the largest resized image of its group rounded up to 32,
  so it is never smaller than what the official code would pad that batch to, and rarely larger.

Every function is a pure function of sizes, so a grain worker and the main process agree.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Sequence, Tuple

import numpy as np

from cn2_jax import schema
from cn2_jax.data import transforms as T
from cn2_jax.data.augment import RESIZE_TYPES
from cn2_jax.errors import ConfigError

HW = Tuple[int, int]

# Aspect bins (long side / short side upper bounds; the last bin is open): 4:3 and 3:2 are the
# common photo shapes, everything wider (16:9, panoramas) shares the third bin, whose images are
# usually limited by max_size anyway.
DEFAULT_ASPECT_RATIOS = (4.0 / 3.0, 3.0 / 2.0)


# The COCO training-image size mix the padding targets are stated for (mostly 640x480, 480x640
# and 640x427): (h, w) shapes and their frequencies.
COCO_SIZE_MIX = (
    ((480, 640), 0.45),
    ((640, 480), 0.2),
    ((427, 640), 0.2),
    ((640, 640), 0.05),
    ((360, 640), 0.05),
    ((500, 375), 0.05),
)


def coco_size_mix(n: int, seed: int = 0) -> np.ndarray:
  """``[n, 2]`` image sizes drawn from ``COCO_SIZE_MIX``."""
  shapes = np.array([hw for hw, _ in COCO_SIZE_MIX])
  p = np.array([f for _, f in COCO_SIZE_MIX])
  return shapes[np.random.default_rng(seed).choice(len(shapes), n, p=p)]


def official_pad_hw(h: int, w: int, size_divisibility: int = 32) -> HW:
  """The official test-time canvas of a resized ``h x w`` image: each side rounded up."""
  return T.round_up(h, size_divisibility), T.round_up(w, size_divisibility)


def aspect_group(h, w, aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS):
  """Group id of images of (original) size ``h x w`` (scalars or arrays).

  ``0 .. n`` are landscape (``w > h``, detectron2's orientation rule) aspect bins, ``n+1 .. 2n+1``
  portrait/square ones, with ``n = len(aspect_ratios)`` bounds: bin ``i`` holds long/short ratios
  in ``(aspect_ratios[i-1], aspect_ratios[i]]``. Resizing keeps the aspect ratio (up to rounding),
  so the group of the original size is the group of the resized one.
  """
  h = np.asarray(h, np.float64)
  w = np.asarray(w, np.float64)
  ratio = np.maximum(h, w) / np.maximum(np.minimum(h, w), 1.0)
  # A tiny tolerance keeps exact 4:3 / 3:2 images (e.g. 480x640) in their own bin despite
  # float division.
  b = np.searchsorted(np.asarray(aspect_ratios, np.float64) + 1e-9, ratio, side="left")
  portrait = ~(w > h)
  return np.where(portrait, b + len(aspect_ratios) + 1, b).astype(np.int64)


def num_groups(aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS) -> int:
  return 2 * (len(aspect_ratios) + 1)


def _group_extreme_shape(
    group: int, short: int, max_size: int, aspect_ratios: Sequence[float]
) -> HW:
  """Largest resized ``(h, w)`` any image of ``group`` can take at short side ``short``."""
  n = len(aspect_ratios)
  portrait = group > n
  b = group - (n + 1) if portrait else group
  hi = aspect_ratios[b] if b < n else math.inf
  # Short side `short`, long side at most short * hi (detectron2's int(x + 0.5) rounding), both
  # limited by the max_size cap (which only shrinks the short side of wider images).
  long_side = max_size if math.isinf(hi) else min(int(short * hi + 0.5 + 1e-6), max_size)
  return (long_side, short) if portrait else (short, long_side)


def train_buckets(
    short_sizes: Iterable[int],
    max_size: int,
    aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS,
    size_divisibility: int = 32,
) -> Dict[Tuple[int, int], HW]:
  """``{(short, group): (H, W)}`` bucket shapes, plus ``(short, -1)``: the square fallback
  ``max_size`` rounded up, for batches that mix groups. Each bucket holds every resized image of
  its group at that short side (landscape buckets are ``(H, W)`` with ``W >= H``)."""
  out = {}
  fallback = T.round_up(max_size, size_divisibility)
  for s in sorted(set(int(v) for v in short_sizes)):
    for g in range(num_groups(aspect_ratios)):
      h, w = _group_extreme_shape(g, s, max_size, aspect_ratios)
      out[(s, g)] = (T.round_up(h, size_divisibility), T.round_up(w, size_divisibility))
    out[(s, -1)] = (fallback, fallback)
  return out


def bucket_shapes(buckets: Dict[Tuple[int, int], HW]) -> list:
  """The distinct shapes of a bucket table, by area (what gets compiled)."""
  return sorted(set(buckets.values()), key=lambda hw: (hw[0] * hw[1], hw))


def fits(shapes: Sequence[HW], canvas: HW) -> bool:
  return all(h <= canvas[0] and w <= canvas[1] for h, w in shapes)


def padding_overhead(image_shapes: Sequence[HW], canvas: HW) -> float:
  """Padded pixels / image pixels of one batch on ``canvas``."""
  return len(image_shapes) * canvas[0] * canvas[1] / max(sum(h * w for h, w in image_shapes), 1)


def _validate_sizes(cfg) -> None:
  d = cfg.data
  div = int(d.size_divisibility)
  if div <= 0 or div % 32:
    raise ConfigError(f"data.size_divisibility must be a positive multiple of 32, got {div}")
  for name in ("pad_hw_train", "pad_hw_test"):
    hw = tuple(d[name])
    if hw and (len(hw) != 2 or any(int(v) <= 0 or int(v) % div for v in hw)):
      raise ConfigError(
          f"data.{name}={hw} must be () (buckets / official padding) or (H, W), "
          f"multiples of {div} (FPN size divisibility)"
      )
  if d.resize_type not in RESIZE_TYPES:
    raise ConfigError(f"data.resize_type must be one of {RESIZE_TYPES}, got {d.resize_type!r}")
  if d.resize_type == "Resize" and (d.lsj or d.custom_aug not in ("", "ResizeShortestEdge")):
    raise ConfigError(
        "data.resize_type='Resize' is a resize; data.lsj / data.custom_aug replace the resize"
    )
  if d.resize_type == "Resize" and d.center_affine:
    raise ConfigError("data.resize_type='Resize' does not combine with data.center_affine")
  ratios = tuple(d.bucket_aspect_ratios)
  if any(a < 1.0 for a in ratios) or list(ratios) != sorted(ratios):
    raise ConfigError(
        f"data.bucket_aspect_ratios={ratios} must be increasing long/short ratios >= 1"
    )


CONFIG = schema.group(
    "data",
    "Resize and padding. Train: pad_hw_train () = aspect-grouped batches, each padded to the "
    "bucket of its short side and aspect group (one compile per bucket); (H, W) = one fixed "
    "canvas. Eval / predict: pad_hw_test () = every image on its official canvas (resized size "
    "rounded up to size_divisibility, as the official test code pads it); (H, W) = one canvas.",
    schema.Field(
        "min_size_train",
        (640, 672, 704, 736, 768, 800),
        "INPUT.MIN_SIZE_TRAIN: short sides drawn from",
    ),
    schema.Field("max_size_train", 1333, "INPUT.MAX_SIZE_TRAIN: long side at most"),
    schema.Field(
        "min_size_test",
        800,
        "short side; 0 = no resize (original resolution, as centerX evaluates COCO)",
    ),
    schema.Field("max_size_test", 1333, "long side at most"),
    schema.Field("pad_hw_train", (), "() = buckets, or one (H, W) canvas for every train batch"),
    schema.Field("pad_hw_test", (), "() = the official canvas per image, or one (H, W) canvas"),
    schema.Field("size_divisibility", 32, "canvas sides are multiples of this (the backbone's)"),
    schema.Field(
        "aspect_grouping", True, "detectron2 ASPECT_RATIO_GROUPING (by orientation and aspect)"
    ),
    schema.Field(
        "bucket_aspect_ratios", (4.0 / 3.0, 1.5), "long/short bounds of the aspect groups"
    ),
    schema.Field(
        "scale_per_batch", True, "one random short side per global batch (False: per image)"
    ),
    schema.Field(
        "resize_type",
        "ResizeShortestEdge",
        "centerX RESIZE_TYPE: 'ResizeShortestEdge' (detectron2's, the sizes above) | 'Resize': "
        "every image resized to exactly min_size x max_size (h x w) whatever its aspect ratio, "
        "in training (min_size_train[0] x max_size_train) and evaluation (min_size_test x "
        "max_size_test; min_size_test 0 = no resize), on one canvas (the size rounded up to "
        "size_divisibility); not with lsj, custom_aug or center_affine",
    ),
    validate=_validate_sizes,
)
