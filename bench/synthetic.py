"""Image sizes and synthetic batches (numpy only: shared by the JAX and the torch workers)."""

from __future__ import annotations

import math


def ceil_to(v: int, m: int) -> int:
  return int(math.ceil(v / m) * m)


def parse_size(text: str) -> dict:
  """'HxW' (padded to multiples of 32) or 'HxW@PHxPW' -> {h, w, ph, pw, name}."""
  text = text.strip().lower()
  img, _, pad = text.partition("@")
  try:
    h, w = (int(v) for v in img.split("x"))
    ph, pw = (int(v) for v in pad.split("x")) if pad else (ceil_to(h, 32), ceil_to(w, 32))
  except ValueError:
    raise SystemExit(f"bad size {text!r}: expected HxW or HxW@PHxPW (e.g. 800x1333@832x1344)")
  if ph % 32 or pw % 32:
    raise SystemExit(
        f"bad size {text!r}: padded size {ph}x{pw} must be a multiple of 32 "
        f"(FPN size divisibility)"
    )
  if ph < h or pw < w:
    raise SystemExit(f"bad size {text!r}: padded size smaller than the image")
  name = f"{h}x{w}" + (f"@{ph}x{pw}" if (ph, pw) != (h, w) else "")
  return dict(h=h, w=w, ph=ph, pw=pw, name=name)


def synth_images(rng, batch: int, size: dict):
  """uint8 `[B, PH, PW, 3]` RGB noise inside the image, zero padding outside; image_hw `[B, 2]`."""
  import numpy as np

  image = np.zeros((batch, size["ph"], size["pw"], 3), np.uint8)
  image[:, : size["h"], : size["w"]] = rng.integers(
      0, 256, (batch, size["h"], size["w"], 3), dtype=np.uint8
  )
  image_hw = np.tile(np.array([[size["h"], size["w"]]], np.int32), (batch, 1))
  return image, image_hw


def synth_gt(rng, batch: int, size: dict, gt_per_image: float, max_boxes: int, num_classes: int):
  """~Poisson(gt_per_image) boxes per image (1..max_boxes), log-uniform sizes 16 px .. 0.6 of the
  short side, aspect 1/3..3, inside the image. Returns padded arrays of the batch contract."""
  import numpy as np

  h, w = size["h"], size["w"]
  counts = np.clip(rng.poisson(gt_per_image, batch), 1, max_boxes)
  boxes = np.zeros((batch, max_boxes, 4), np.float32)
  classes = np.zeros((batch, max_boxes), np.int32)
  valid = np.zeros((batch, max_boxes), bool)
  hi = max(17.0, 0.6 * min(h, w))
  for b in range(batch):
    n = int(counts[b])
    s = np.exp(rng.uniform(np.log(16.0), np.log(hi), n))
    a = np.exp(rng.uniform(np.log(1 / 3), np.log(3.0), n))
    bw = np.minimum(s * np.sqrt(a), w - 1.0)
    bh = np.minimum(s / np.sqrt(a), h - 1.0)
    x1 = rng.uniform(0, w - bw)
    y1 = rng.uniform(0, h - bh)
    boxes[b, :n] = np.stack([x1, y1, x1 + bw, y1 + bh], -1)
    classes[b, :n] = rng.integers(0, num_classes, n)
    valid[b, :n] = True
  return boxes, classes, valid


def synth_batch(
    seed: int,
    batch: int,
    size: dict,
    gt_per_image: float,
    max_boxes: int,
    num_classes: int,
    with_gt: bool = True,
) -> dict:
  """A host batch of the data pipeline's contract: image, image_hw (+ gt_* with `with_gt`)."""
  import numpy as np

  rng = np.random.default_rng(seed)
  image, image_hw = synth_images(rng, batch, size)
  out = dict(image=image, image_hw=image_hw)
  if with_gt:
    out["gt_boxes"], out["gt_classes"], out["gt_valid"] = synth_gt(
        rng, batch, size, gt_per_image, max_boxes, num_classes
    )
  return out


def infer_batch(seed: int, batch: int, size: dict) -> dict:
  """Images only, seeded per batch size, so both frameworks infer on the same pixels."""
  return synth_batch(seed + 100 + batch, batch, size, 0, 1, 1, with_gt=False)
