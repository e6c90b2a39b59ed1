"""Drawing detections on images (PIL, host side)."""

from __future__ import annotations

import colorsys
import os
from typing import Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ['class_color', 'draw_detections', 'save_png']


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


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType (>= 10.1)
    except TypeError:  # older Pillow: fixed-size bitmap font
        return ImageFont.load_default()


def draw_detections(image: np.ndarray,
                    boxes,
                    scores,
                    classes,
                    class_names: Optional[Sequence[str]] = None,
                    score_thresh: float = 0.3) -> np.ndarray:
    """Draws the detections with ``score >= score_thresh`` on a copy of ``image``.

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
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f'image must be [H, W, 3], got {image.shape}')
    if image.dtype != np.uint8:
        raise TypeError(f'image must be uint8, got {image.dtype}')
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).reshape(-1)
    classes = np.asarray(classes).reshape(-1).astype(np.int64)
    if not (boxes.shape[0] == scores.shape[0] == classes.shape[0]):
        raise ValueError(f'boxes/scores/classes disagree: {boxes.shape}, {scores.shape}, '
                         f'{classes.shape}')
    h, w = image.shape[:2]
    pil = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(pil)

    short = max(1, min(h, w))
    line_w = max(1, int(round(short / 300)))
    font_size = int(np.clip(round(short / 40), 9, 40))
    font = _font(font_size)
    pad = max(1, font_size // 6)

    keep = np.isfinite(boxes).all(1) & np.isfinite(scores) & (scores >= score_thresh)
    order = np.argsort(scores[keep], kind='stable')  # low scores first: high scores end on top
    idx = np.nonzero(keep)[0][order]
    for i in idx:
        x1, y1, x2, y2 = boxes[i]
        # integer pixel corners (PIL would truncate floats), clipped to the image
        x1, x2 = np.clip(np.round([min(x1, x2), max(x1, x2)]), 0, w - 1).astype(int)
        y1, y2 = np.clip(np.round([min(y1, y2), max(y1, y2)]), 0, h - 1).astype(int)
        c = int(classes[i])
        color = class_color(c)
        draw.rectangle([int(x1), int(y1), int(x2), int(y2)], outline=color, width=line_w)

        name = (class_names[c] if class_names is not None and 0 <= c < len(class_names)
                else str(c))
        text = f'{name} {scores[i]:.2f}'
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        tw, th = r - l + 2 * pad, b - t + 2 * pad
        # Above the box when there is room, else just inside its top edge; keep it in the image.
        lx = int(np.clip(x1, 0, max(0, w - tw)))
        ly = int(y1 - th) if y1 - th >= 0 else int(np.clip(y1, 0, max(0, h - th)))
        draw.rectangle([lx, ly, lx + tw - 1, ly + th - 1], fill=color)
        draw.text((lx + pad - l, ly + pad - t), text, fill=_text_color(color), font=font)
    return np.asarray(pil, dtype=np.uint8).copy()


def save_png(path: Union[str, os.PathLike], image: np.ndarray) -> None:
    """Saves a ``[H, W, 3] uint8`` RGB (or ``[H, W]`` gray) image as PNG, creating parent dirs."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f'image must be uint8, got {image.dtype}')
    d = os.path.dirname(os.fspath(path))
    if d:
        os.makedirs(d, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image)).save(path, format='PNG')
