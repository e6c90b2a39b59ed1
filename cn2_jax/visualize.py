"""Drawing detections on images (PIL, host side)."""

from __future__ import annotations

import colorsys
import functools
import math
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    'class_color',
    'draw_detections',
    'font_size_for',
    'label_rects',
    'layout_labels',
    'save_png',
]


def class_color(c: int) -> Tuple[int, int, int]:
  """A saturated RGB colour per class index, spread around the hue circle (golden ratio)."""
  hue = (0.11 + 0.618033988749895 * int(c)) % 1.0
  sat = 0.85 if int(c) % 2 == 0 else 0.65
  val = 0.95 if (int(c) // 2) % 2 == 0 else 0.80
  r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
  return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _text_color(bg: Tuple[int, int, int]) -> Tuple[int, int, int]:
  luminance = 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2]
  return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def font_size_for(h: int, w: int) -> int:
  """Label font size in pixels for an ``h x w`` image: detectron2 Visualizer's default,
  ``max(sqrt(h * w) // 90, 10)``, which is in matplotlib points at 100 dpi, converted to pixels."""
  points = max(math.sqrt(max(h, 1) * max(w, 1)) // 90, 10)
  return int(round(points * 100 / 72))


@functools.lru_cache(maxsize=16)
def _font(size: int):
  """A TrueType font of ``size`` px: Pillow's bundled one (>= 10.1, with FreeType), else
  DejaVuSans if installed, else PIL's fixed bitmap font."""
  try:
    font = ImageFont.load_default(size=size)
    if isinstance(font, ImageFont.FreeTypeFont):
      return font
  except (TypeError, OSError):  # Pillow < 10.1, or no FreeType
    pass
  try:
    return ImageFont.truetype('DejaVuSans.ttf', size)
  except OSError:
    return ImageFont.load_default()


Rect = Tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)


def _overlaps(a: Rect, b: Rect) -> bool:
  return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def layout_labels(
    anchors: Sequence[Tuple[int, int]], sizes: Sequence[Tuple[int, int]], image_hw: Tuple[int, int]
) -> List[Rect]:
  """Places one label rectangle per box, in the given (priority) order, avoiding earlier labels.

  ``anchors[i] = (x1, y1)`` is the top-left corner of box i (pixels), ``sizes[i] = (width,
  height)`` the size of its label.
  A label goes above its box when there is room, else just inside the top edge; when that spot
  overlaps an already placed label it is shifted down, then up, one label height at a time
  (within the image). If no free spot exists the first choice is kept.
  """
  h, w = image_hw
  placed: List[Rect] = []
  for (x1, y1), (tw, th) in zip(anchors, sizes):
    x0 = int(np.clip(x1, 0, max(0, w - tw)))
    y_pref = y1 - th if y1 - th >= 0 else int(np.clip(y1, 0, max(0, h - th)))
    choice = (x0, y_pref, x0 + tw, y_pref + th)
    if any(_overlaps(choice, other) for other in placed):
      for k in range(1, 2 * (h // max(th, 1)) + 1):
        y = y_pref + (k + 1) // 2 * th * (1 if k % 2 else -1)  # +1, -1, +2, -2 ... heights
        cand = (x0, y, x0 + tw, y + th)
        if 0 <= y <= h - th and not any(_overlaps(cand, other) for other in placed):
          choice = cand
          break
    placed.append(choice)
  return placed


def _prepare(image, boxes, scores, classes, class_names, score_thresh):
  """Validated arrays, the kept detection indices (descending score) and their label texts."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f'image must be [H, W, 3], got {image.shape}')
  if image.dtype != np.uint8:
    raise TypeError(f'image must be uint8, got {image.dtype}')
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  scores = np.asarray(scores, np.float64).reshape(-1)
  classes = np.asarray(classes).reshape(-1).astype(np.int64)
  if not (boxes.shape[0] == scores.shape[0] == classes.shape[0]):
    raise ValueError(
        f'boxes/scores/classes disagree: {boxes.shape}, {scores.shape}, ' f'{classes.shape}'
    )
  h, w = image.shape[:2]
  keep = np.isfinite(boxes).all(1) & np.isfinite(scores) & (scores >= score_thresh)
  idx = np.nonzero(keep)[0]
  idx = idx[np.argsort(-scores[idx], kind='stable')]  # best first: it gets the best label spot
  pix = {}
  texts = {}
  for i in idx:
    x1, y1, x2, y2 = boxes[i]
    # integer pixel corners (PIL would truncate floats), clipped to the image
    x1, x2 = np.clip(np.round([min(x1, x2), max(x1, x2)]), 0, w - 1).astype(int)
    y1, y2 = np.clip(np.round([min(y1, y2), max(y1, y2)]), 0, h - 1).astype(int)
    pix[i] = (int(x1), int(y1), int(x2), int(y2))
    label = int(classes[i])
    known = class_names is not None and 0 <= label < len(class_names)
    name = class_names[label] if known else str(label)
    texts[i] = f'{name} {scores[i]:.2f}'
  return image, classes, idx, pix, texts


def _label_geometry(draw, font, font_size, idx, pix, texts, hw):
  pad = max(1, font_size // 6)
  sizes, offsets = [], []
  for i in idx:
    left, top, right, bottom = draw.textbbox((0, 0), texts[i], font=font)
    sizes.append((right - left + 2 * pad, bottom - top + 2 * pad))
    offsets.append((pad - left, pad - top))
  rects = layout_labels([pix[i][:2] for i in idx], sizes, hw)
  return rects, offsets


def label_rects(
    image: np.ndarray,
    boxes,
    scores,
    classes,
    class_names: Optional[Sequence[str]] = None,
    score_thresh: float = 0.3,
) -> List[Rect]:
  """The label rectangles ``(x0, y0, x1, y1)`` (exclusive ends) that ``draw_detections`` would
  draw for the same arguments, best score first."""
  image, _, idx, pix, texts = _prepare(image, boxes, scores, classes, class_names, score_thresh)
  h, w = image.shape[:2]
  size = font_size_for(h, w)
  draw = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  return _label_geometry(draw, _font(size), size, idx, pix, texts, (h, w))[0]


def draw_detections(
    image: np.ndarray,
    boxes,
    scores,
    classes,
    class_names: Optional[Sequence[str]] = None,
    score_thresh: float = 0.3,
) -> np.ndarray:
  """Draws the detections with ``score >= score_thresh`` on a copy of ``image``.

  Labels ("name score") use a font that grows with the image (``font_size_for``) and are placed
  so that they do not cover each other (``layout_labels``).

  Args:
    image: ``[H, W, 3] uint8`` RGB.
    boxes: ``[K, 4]`` xyxy in the pixels of ``image``.
    scores: ``[K]``.
    classes: ``[K]`` int contiguous labels; the colour depends on the class.
    class_names: ``class_names[c]`` is the label text of class ``c`` (the number when missing).
    score_thresh: detections below it are not drawn.
  Returns:
    A new ``[H, W, 3] uint8`` RGB image; ``image`` is not modified.
  """
  image, classes, idx, pix, texts = _prepare(
      image, boxes, scores, classes, class_names, score_thresh
  )
  h, w = image.shape[:2]
  pil = Image.fromarray(np.ascontiguousarray(image))
  draw = ImageDraw.Draw(pil)
  line_w = max(1, int(round(min(h, w) / 300)))
  size = font_size_for(h, w)
  font = _font(size)
  rects, offsets = _label_geometry(draw, font, size, idx, pix, texts, (h, w))
  # Boxes low score first (high scores end on top), then all labels so no box line crosses one.
  for i in idx[::-1]:
    draw.rectangle(list(pix[i]), outline=class_color(int(classes[i])), width=line_w)
  for i, (x0, y0, x1, y1), (ox, oy) in zip(idx, rects, offsets):
    color = class_color(int(classes[i]))
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=color)
    draw.text((x0 + ox, y0 + oy), texts[i], fill=_text_color(color), font=font)
  return np.asarray(pil, dtype=np.uint8).copy()


def save_png(path: Union[str, os.PathLike], image: np.ndarray) -> None:
  """Saves a ``[H, W, 3] uint8`` RGB (or ``[H, W]`` gray) image as PNG, creating parent dirs."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise TypeError(f'image must be uint8, got {image.dtype}')
  folder = os.path.dirname(os.fspath(path))
  if folder:
    os.makedirs(folder, exist_ok=True)
  Image.fromarray(np.ascontiguousarray(image)).save(path, format='PNG')
