"""Deterministic synthetic COCO-format detection data (coloured shapes on a noisy background).

``write_synthetic_coco(out_dir)`` writes::

    out_dir/instances_train.json   out_dir/train/000001.png ...
    out_dir/instances_val.json     out_dir/val/1000001.png ...

Classes (COCO category ids 1..4): rectangle, ellipse, triangle, cross.  Each image has 1..
``max_objects`` solid shapes of ``object_size`` px (the longer side; aspect 0.7..1.4), in random
high-contrast colours (luminance < 60 or > 200 on a background of 85..170 with low-frequency
texture and pixel noise), allowed to overlap a little (IoU <= 0.2, at most a quarter of an
earlier shape's box covered by a later one).  Evenly spread fractions of the images are empty,
grayscale ('L' PNG) or JPEG.
Boxes are tight, ``[x, y, w, h]`` with integer corners; ``area`` is the shape's area.

Everything derives from ``numpy.random.default_rng([seed, split, index])``: the same arguments
give byte-identical files (with the same PIL/zlib/libjpeg build), and the val images do not
depend on ``num_train``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

CLASSES: Tuple[str, ...] = ("rectangle", "ellipse", "triangle", "cross")
_SPLIT_CODE = {"train": 0, "val": 1}
_ID_BASE = {"train": 1, "val": 1_000_001}

__all__ = ["CLASSES", "write_synthetic_coco", "render_example"]


def _every(i: int, fraction: float) -> bool:
  """True for an evenly spread ``fraction`` of the indices."""
  if fraction <= 0:
    return False
  return math.floor((i + 1) * fraction + 1e-9) > math.floor(i * fraction + 1e-9)


def _size_range(v: Union[int, Sequence[int]]) -> Tuple[int, int]:
  if isinstance(v, (int, np.integer)):
    return int(v), int(v)
  lo, hi = v
  return int(lo), int(hi)


def _colour(rng: np.random.Generator) -> Tuple[int, int, int]:
  while True:
    c = rng.integers(0, 256, size=3)
    lum = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    if lum < 60 or lum > 200:
      return int(c[0]), int(c[1]), int(c[2])


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  gh, gw = h // 24 + 2, w // 24 + 2
  coarse = rng.uniform(95, 160, size=(gh, gw, 3)).astype(np.uint8)
  smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), np.float32)
  noise = rng.normal(0.0, 6.0, size=(h, w, 3))
  return np.clip(smooth + noise, 85, 170).astype(np.uint8)


def _iou(a, b) -> float:
  ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  ua = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / ua if ua > 0 else 0.0


def _covered_fraction(old, new) -> float:
  ix = max(0.0, min(old[2], new[2]) - max(old[0], new[0]))
  iy = max(0.0, min(old[3], new[3]) - max(old[1], new[1]))
  return ix * iy / ((old[2] - old[0]) * (old[3] - old[1]))


def _draw(draw: ImageDraw.ImageDraw, cls: int, box, colour, rng: np.random.Generator) -> float:
  """Draws shape ``cls`` filling ``box`` = (x0, y0, x1, y1) (pixels x0..x1-1); returns its
  area."""
  x0, y0, x1, y1 = box
  bw, bh = x1 - x0, y1 - y0
  name = CLASSES[cls]
  if name == "rectangle":
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=colour)
    return float(bw * bh)
  if name == "ellipse":
    draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=colour)
    return float(math.pi / 4 * bw * bh)
  if name == "triangle":
    cx = (x0 + x1 - 1) / 2.0
    if rng.uniform() < 0.5:  # apex up
      pts = [(x0, y1 - 1), (x1 - 1, y1 - 1), (cx, y0)]
    else:  # apex down
      pts = [(x0, y0), (x1 - 1, y0), (cx, y1 - 1)]
    draw.polygon(pts, fill=colour)
    return float(bw * bh / 2.0)
  if name == "cross":
    t = max(4, int(round(0.32 * min(bw, bh))))
    cx0 = x0 + (bw - t) // 2
    cy0 = y0 + (bh - t) // 2
    draw.rectangle([x0, cy0, x1 - 1, cy0 + t - 1], fill=colour)
    draw.rectangle([cx0, y0, cx0 + t - 1, y1 - 1], fill=colour)
    return float(t * bw + t * bh - t * t)
  raise ValueError(name)


def render_example(
    rng: np.random.Generator,
    *,
    image_size=(128, 192),
    max_objects: int = 4,
    object_size=(16, 80),
    empty: bool = False,
):
  """One RGB image (``PIL.Image``) and its objects ``[(class, (x0, y0, x1, y1), area)]``."""
  hlo, hhi = _size_range(image_size)
  h = int(rng.integers(hlo, hhi + 1))
  w = int(rng.integers(hlo, hhi + 1))
  img = Image.fromarray(_background(rng, h, w))
  draw = ImageDraw.Draw(img)
  objects: List[Tuple[int, Tuple[int, int, int, int], float]] = []
  n = 0 if empty else int(rng.integers(1, max_objects + 1))
  slo, shi = _size_range(object_size)
  for _ in range(n):
    cls = int(rng.integers(len(CLASSES)))
    colour = _colour(rng)
    for _try in range(30):
      s = int(rng.integers(slo, shi + 1))
      aspect = float(rng.uniform(0.7, 1.4))
      if aspect >= 1.0:
        bw, bh = s, max(slo, int(round(s / aspect)))
      else:
        bw, bh = max(slo, int(round(s * aspect))), s
      bw, bh = min(bw, w - 2), min(bh, h - 2)
      x0 = int(rng.integers(0, w - bw + 1))
      y0 = int(rng.integers(0, h - bh + 1))
      box = (x0, y0, x0 + bw, y0 + bh)
      if all(_iou(box, o[1]) <= 0.2 and _covered_fraction(o[1], box) <= 0.25 for o in objects):
        break
    else:
      continue  # no room: fewer objects
    area = _draw(draw, cls, box, colour, rng)
    objects.append((cls, box, area))
  return img, objects


def write_synthetic_coco(
    out_dir: str,
    num_train: int = 256,
    num_val: int = 64,
    image_size: Union[int, Tuple[int, int]] = (128, 192),
    seed: int = 0,
    *,
    max_objects: int = 4,
    object_size: Union[int, Tuple[int, int]] = (16, 80),
    empty_fraction: float = 0.08,
    gray_fraction: float = 0.05,
    jpeg_fraction: float = 0.1,
) -> Dict[str, Tuple[str, str]]:
  """Writes the dataset; returns ``{'train': (json, image_root), 'val': (json, image_root)}``
  (directly usable as ``builder.build_coco_json_dataset(name, splits=...)``).

  ``image_size``: side length, or an inclusive (min, max) range sampled per side.
  """
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)]
  paths = {}
  for split, num in (("train", num_train), ("val", num_val)):
    os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    images, annotations = [], []
    ann_id = _ID_BASE[split]
    for i in range(num):
      rng = np.random.default_rng([seed, _SPLIT_CODE[split], i])
      img, objects = render_example(
          rng,
          image_size=image_size,
          max_objects=max_objects,
          object_size=object_size,
          empty=_every(i + 7, empty_fraction),
      )
      image_id = _ID_BASE[split] + i
      gray = _every(i + 15, gray_fraction)
      jpeg = _every(i + 8, jpeg_fraction)
      if gray:
        img = img.convert("L")
      file_name = f"{split}/{image_id:06d}.{'jpg' if jpeg else 'png'}"
      full = os.path.join(out_dir, file_name)
      if jpeg:
        img.save(full, format="JPEG", quality=92)
      else:
        img.save(full, format="PNG")
      images.append(
          {"id": image_id, "file_name": file_name, "height": img.height, "width": img.width}
      )
      for cls, (x0, y0, x1, y1), area in objects:
        annotations.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": cls + 1,
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "area": round(area, 2),
                "iscrowd": 0,
            }
        )
        ann_id += 1
    coco = {
        "info": {"description": f"cn2_jax synthetic shapes (seed {seed})", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    json_path = os.path.join(out_dir, f"instances_{split}.json")
    with open(json_path, "w") as f:
      json.dump(coco, f, sort_keys=True, separators=(",", ":"))
    paths[split] = (json_path, out_dir)
  return paths
