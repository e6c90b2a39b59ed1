"""Per-example image/box transforms (pure numpy + PIL, no JAX).

Conventions (docs/DESIGN.md):
- images are ``[H, W, 3] uint8`` RGB;
- boxes are ``float32 [N, 4]`` ``(x1, y1, x2, y2)`` in absolute pixels of the current image, no +1;
- every function that can drop boxes returns the indices (or a boolean mask) of the boxes it kept,
  so the caller can filter classes / crowd flags alongside.

The resize rule is detectron2's ``ResizeShortestEdge`` (``get_output_shape``) with its exact
floating-point order and ``int(x + 0.5)`` rounding, followed by PIL bilinear resampling of the uint8
image; boxes are scaled by ``new_w / w`` and ``new_h / h``.  The LSJ option follows detectron2's
``ResizeScale`` + ``FixedSizeCrop``.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

ShortSizes = Union[int, Sequence[int], range]

__all__ = [
    "decode_image",
    "image_size_after_exif",
    "resize_shortest_edge_shape",
    "resize_image",
    "scale_boxes",
    "resize_shortest_edge",
    "sample_short_size",
    "hflip",
    "random_hflip",
    "clip_boxes",
    "nonempty_boxes",
    "lsj_resize_crop",
    "pad_image",
    "pad_gt",
    "round_up",
]


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------
def decode_image(data, *, name: Optional[str] = None) -> np.ndarray:
  """Decodes encoded image bytes (or a path, or a PIL image) to ``[H, W, 3] uint8`` RGB.

  Like detectron2's ``read_image``: PIL open, EXIF orientation applied, ``convert('RGB')`` (so
  grayscale, palette, CMYK, RGBA ... all become 3-channel RGB).  ``name`` (e.g. the file name) is
  put in the error message when decoding fails.
  """
  what = name or (data if isinstance(data, (str, os.PathLike)) else "<bytes>")
  try:
    if isinstance(data, Image.Image):
      img = data
    elif isinstance(data, (str, os.PathLike)):
      img = Image.open(data)
    else:
      if isinstance(data, np.ndarray):
        data = data.tobytes() if data.dtype != object else data.item()
      img = Image.open(io.BytesIO(data))
    img = ImageOps.exif_transpose(img)
    if img.mode != "RGB":
      img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
  except Exception as e:  # noqa: BLE001 - re-raised with the file name
    raise ValueError(f"cannot decode image {what!s}: {type(e).__name__}: {e}") from e
  if arr.ndim != 3 or arr.shape[2] != 3:
    raise ValueError(f"decoded image {what!s} has unexpected shape {arr.shape}")
  return arr


# EXIF orientations 5..8 transpose the image (width and height swap).
_EXIF_ORIENTATION_TAG = 0x0112


def image_size_after_exif(img: Image.Image) -> Tuple[int, int]:
  """``(height, width)`` of an opened PIL image after EXIF transpose (without decoding pixels)."""
  w, h = img.size
  try:
    orientation = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
  except Exception:  # noqa: BLE001 - broken EXIF is ignored, like exif_transpose does
    orientation = 1
  if orientation in (5, 6, 7, 8):
    w, h = h, w
  return int(h), int(w)


# ----------------------------------------------------------------------------------------------
# Resize
# ----------------------------------------------------------------------------------------------
def resize_shortest_edge_shape(h: int, w: int, short: float, max_size: float) -> Tuple[int, int]:
  """detectron2 ``ResizeShortestEdge.get_output_shape`` (same float operations, same rounding).
  ``short == 0`` keeps the original size (detectron2's NoOpTransform; centerX evaluates COCO so)."""
  if short == 0:
    return int(h), int(w)
  size = short * 1.0
  scale = size / min(h, w)
  if h < w:
    newh, neww = size, scale * w
  else:
    newh, neww = scale * h, size
  if max(newh, neww) > max_size:
    scale = max_size * 1.0 / max(newh, neww)
    newh = newh * scale
    neww = neww * scale
  neww = int(neww + 0.5)
  newh = int(newh + 0.5)
  return newh, neww


def resize_shortest_edge_shape_np(h, w, short: float, max_size: float):
  """Vectorised :func:`resize_shortest_edge_shape` over arrays of ``h`` and ``w`` (float64, same
  operation order, hence identical results)."""
  if short == 0:
    return np.asarray(h).astype(np.int64), np.asarray(w).astype(np.int64)
  h = np.asarray(h, np.float64)
  w = np.asarray(w, np.float64)
  size = float(short)
  scale = size / np.minimum(h, w)
  newh = np.where(h < w, size, scale * h)
  neww = np.where(h < w, scale * w, size)
  m = np.maximum(newh, neww)
  over = m > max_size
  s2 = np.where(over, max_size * 1.0 / m, 1.0)
  newh = np.where(over, newh * s2, newh)
  neww = np.where(over, neww * s2, neww)
  return np.floor(newh + 0.5).astype(np.int64), np.floor(neww + 0.5).astype(np.int64)


def resize_image(image: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
  """PIL bilinear resize of a uint8 ``[H, W, C]`` image (detectron2 ``ResizeTransform``)."""
  if image.shape[0] == new_h and image.shape[1] == new_w:
    return image
  pil = Image.fromarray(image)
  pil = pil.resize((int(new_w), int(new_h)), Image.BILINEAR)
  return np.asarray(pil)


def scale_boxes(boxes: np.ndarray, sx: float, sy: float) -> np.ndarray:
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  factor = np.array([sx, sy, sx, sy], np.float64)
  return (boxes.astype(np.float64) * factor).astype(np.float32)


def sample_short_size(short_sizes: ShortSizes, rng: Optional[np.random.Generator]) -> int:
  """Picks the short side: an int is used as is; a tuple/list/``range`` is sampled uniformly
  (detectron2 ``sample_style='choice'``; its ``'range'`` style (a, b) is ``range(a, b + 1)``)."""
  if isinstance(short_sizes, (int, np.integer)):
    return int(short_sizes)
  sizes = short_sizes
  if len(sizes) == 0:
    raise ValueError("short_sizes is empty")
  if len(sizes) == 1 or rng is None:
    if len(sizes) > 1:
      raise ValueError("an rng is needed to sample from several short sizes")
    return int(sizes[0])
  return int(sizes[int(rng.integers(len(sizes)))])


def resize_shortest_edge(
    image: np.ndarray,
    boxes: np.ndarray,
    short_sizes: ShortSizes,
    max_size: int,
    rng: Optional[np.random.Generator] = None,
) -> Tuple[np.ndarray, np.ndarray]:
  """Resizes so the short side is ``short`` (sampled from ``short_sizes``), long side <= max_size.

  Returns ``(resized_image, scaled_boxes)``; boxes keep their count (a positive scale cannot make
  a non-empty box empty).
  """
  short = sample_short_size(short_sizes, rng)
  h, w = image.shape[:2]
  new_h, new_w = resize_shortest_edge_shape(h, w, short, max_size)
  out = resize_image(image, new_h, new_w)
  return out, scale_boxes(boxes, new_w / w, new_h / h)


# ----------------------------------------------------------------------------------------------
# Flip
# ----------------------------------------------------------------------------------------------
def hflip(image: np.ndarray, boxes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Horizontal flip; ``x1' = w - x2``, ``x2' = w - x1``."""
  w = image.shape[1]
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  out_boxes = boxes.copy()
  out_boxes[:, 0] = w - boxes[:, 2]
  out_boxes[:, 2] = w - boxes[:, 0]
  return np.ascontiguousarray(image[:, ::-1]), out_boxes


def random_hflip(image, boxes, rng: np.random.Generator, prob: float = 0.5):
  """Flips with probability ``prob`` (one uniform draw from ``rng`` regardless of the outcome)."""
  if rng.uniform() < prob:
    return hflip(image, boxes)
  return image, np.asarray(boxes, np.float32).reshape(-1, 4)


# ----------------------------------------------------------------------------------------------
# Box utilities
# ----------------------------------------------------------------------------------------------
def clip_boxes(boxes: np.ndarray, h: float, w: float) -> np.ndarray:
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
  boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w)
  boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h)
  return boxes


def nonempty_boxes(boxes: np.ndarray) -> np.ndarray:
  """Boolean mask of boxes with width > 0 and height > 0."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


# ----------------------------------------------------------------------------------------------
# Large-scale jitter (detectron2 ResizeScale + FixedSizeCrop)
# ----------------------------------------------------------------------------------------------
def lsj_resize_crop(
    image: np.ndarray,
    boxes: np.ndarray,
    output_size: Union[int, Tuple[int, int]],
    scale_range: Tuple[float, float],
    rng: np.random.Generator,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Random resize by ``uniform(scale_range) * output_size`` (aspect kept, fit inside), then a
  random crop of at most ``output_size``.

  Returns ``(image, boxes, keep)``: the cropped image (each side <= output size; pad it
  afterwards), the boxes clipped to the crop with the degenerate ones removed, and the indices of
  the kept input boxes.
  """
  if isinstance(output_size, (int, np.integer)):
    out_h = out_w = int(output_size)
  else:
    out_h, out_w = (int(v) for v in output_size)
  h, w = image.shape[:2]
  # ResizeScale
  random_scale = rng.uniform(scale_range[0], scale_range[1])
  scale = min(random_scale * out_h / h, random_scale * out_w / w)
  new_h = max(int(np.round(h * scale)), 1)
  new_w = max(int(np.round(w * scale)), 1)
  image = resize_image(image, new_h, new_w)
  boxes = scale_boxes(boxes, new_w / w, new_h / h)
  # FixedSizeCrop (one uniform draw for both axes, as detectron2)
  max_off_y = max(new_h - out_h, 0)
  max_off_x = max(new_w - out_w, 0)
  u = rng.uniform(0.0, 1.0)
  off_y = int(np.round(max_off_y * u))
  off_x = int(np.round(max_off_x * u))
  crop_h = min(out_h, new_h)
  crop_w = min(out_w, new_w)
  image = np.ascontiguousarray(image[off_y : off_y + crop_h, off_x : off_x + crop_w])
  boxes = boxes - np.array([off_x, off_y, off_x, off_y], np.float32)
  boxes = clip_boxes(boxes, crop_h, crop_w)
  keep = np.nonzero(nonempty_boxes(boxes))[0]
  return image, boxes[keep], keep


# ----------------------------------------------------------------------------------------------
# Padding
# ----------------------------------------------------------------------------------------------
def round_up(x: int, multiple: int) -> int:
  return int(-(-int(x) // multiple) * multiple)


def pad_image(
    image: np.ndarray, pad_hw: Tuple[int, int], *, name: Optional[str] = None
) -> np.ndarray:
  """Zero-pads ``[h, w, C]`` at the bottom/right to ``pad_hw``; raises if it does not fit."""
  h, w = image.shape[:2]
  ph, pw = int(pad_hw[0]), int(pad_hw[1])
  if h > ph or w > pw:
    raise ValueError(
        f"image {name or ''} of size {h}x{w} after resize does not fit pad_hw {ph}x{pw}; "
        "choose pad_hw >= the resize max size (rounded up to 32)"
    )
  out = np.zeros((ph, pw) + image.shape[2:], image.dtype)
  out[:h, :w] = image
  return out


_TRUNCATION_LOGGED = False


def pad_gt(
    boxes: np.ndarray,
    classes: np.ndarray,
    is_crowd: np.ndarray,
    max_boxes: int,
    *,
    name: Optional[str] = None,
) -> dict:
  """Packs GT into fixed ``max_boxes`` arrays.

  Slots are filled with the non-crowd boxes first (in order), then crowd boxes; if there are more
  than ``max_boxes`` the extra ones are dropped (non-crowd kept preferentially; logged once per
  process).  ``gt_valid`` is True for real non-crowd non-degenerate boxes; crowd boxes have
  ``gt_valid=False, gt_crowd=True``; padding slots are zeros with both flags False.
  """
  global _TRUNCATION_LOGGED
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  classes = np.asarray(classes).reshape(-1)
  is_crowd = np.asarray(is_crowd, bool).reshape(-1)
  nonempty = nonempty_boxes(boxes)
  order = np.concatenate([np.nonzero(~is_crowd)[0], np.nonzero(is_crowd)[0]])
  if order.size > max_boxes:
    n_real = int((~is_crowd).sum())
    if not _TRUNCATION_LOGGED:
      _TRUNCATION_LOGGED = True
      logger.warning(
          "image %s has %d GT boxes (%d non-crowd) > max_boxes=%d; keeping the first %d "
          "(non-crowd first). This message is logged once per process.",
          name or "",
          order.size,
          n_real,
          max_boxes,
          max_boxes,
      )
    order = order[:max_boxes]
  n = order.size
  out = {
      "gt_boxes": np.zeros((max_boxes, 4), np.float32),
      "gt_classes": np.zeros((max_boxes,), np.int32),
      "gt_valid": np.zeros((max_boxes,), bool),
      "gt_crowd": np.zeros((max_boxes,), bool),
  }
  out["gt_boxes"][:n] = boxes[order]
  out["gt_classes"][:n] = classes[order].astype(np.int32)
  out["gt_crowd"][:n] = is_crowd[order]
  out["gt_valid"][:n] = (~is_crowd[order]) & nonempty[order]
  return out
