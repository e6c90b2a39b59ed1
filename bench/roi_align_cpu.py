"""CPU timing of multilevel_roi_align (prints only; not part of the test suite).

B=2 images of 512x512, a 5-level pyramid P3..P7 (64^2 .. 4^2), R=512 boxes per image, C=256,
7x7 output. Times the jitted forward and the gradient w.r.t. the features for the fixed-ratio
path (sampling_ratio=2) and, for reference, the official adaptive path (sampling_ratio=0).

  JAX_PLATFORMS=cpu /work/venv/bin/python bench/roi_align_cpu.py
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from cn2_jax.config import base_config
from cn2_jax.modeling.backbone.fpn import FPN
from cn2_jax.modeling.ops import roi_align as ra


def make_inputs(bsz=2, num=512, img=512, ch=256, seed=0):
  rng = np.random.default_rng(seed)
  feats = [
      jnp.asarray(rng.standard_normal((bsz, img // 2**l, img // 2**l, ch), np.float32))
      for l in range(3, 8)
  ]
  size = np.exp(rng.uniform(np.log(8.0), np.log(img), size=(bsz, num)))
  asp = np.exp(rng.uniform(np.log(1 / 3), np.log(3), size=(bsz, num)))
  bw, bh = size * np.sqrt(asp), size / np.sqrt(asp)
  cx, cy = rng.uniform(0, img, size=(2, bsz, num))
  boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
  boxes = jnp.asarray(np.clip(boxes, 0, img).astype(np.float32))
  return feats, boxes


def timeit(fn, *args, reps=5):
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return first, float(np.median(times)), float(np.min(times))


def main():
  feats, boxes = make_inputs()
  # The CenterNet2 pooler (config.model.roi_heads) on P3..P7, ROIAlignV2.
  r = base_config().model.roi_heads
  levels = dict(
      min_level=FPN.min_level,
      max_level=FPN.min_level + len(FPN.strides) - 1,
      canonical_box_size=r.canonical_box_size,
      canonical_level=r.canonical_level,
  )
  need = np.asarray(ra.required_adaptive_samples(boxes, None, r.pooler_resolution, True, **levels))
  print(
      f"jax {jax.__version__} on {jax.devices()[0].platform}; B=2 R=512 C=256, 512x512 image, "
      f"P3..P7; adaptive mode needs (cap_h, cap_w) = {tuple(int(v) for v in need)}"
  )
  gout = jnp.asarray(np.random.default_rng(1).standard_normal((2, 512, 7, 7, 256), np.float32))
  pooler = dict(
      min_level=FPN.min_level,
      output_size=r.pooler_resolution,
      aligned=True,
      canonical_box_size=r.canonical_box_size,
      canonical_level=r.canonical_level,
  )
  for name, kw in [
      ("fixed sampling_ratio=2", dict(pooler, sampling_ratio=2, max_adaptive_samples=8)),
      ("adaptive sampling_ratio=0, cap 8", dict(pooler, sampling_ratio=0, max_adaptive_samples=8)),
  ]:
    fwd = jax.jit(functools.partial(ra.multilevel_roi_align, **kw))
    grad = jax.jit(
        jax.grad(lambda fs, b, g, kw=kw: jnp.sum(ra.multilevel_roi_align(fs, b, **kw) * g))
    )
    first, med, best = timeit(fwd, feats, boxes)
    print(
        f"{name:34s} forward : compile+run {first:6.2f} s, median {med * 1e3:8.1f} ms, "
        f"min {best * 1e3:8.1f} ms"
    )
    first, med, best = timeit(grad, feats, boxes, gout)
    print(
        f"{name:34s} grad    : compile+run {first:6.2f} s, median {med * 1e3:8.1f} ms, "
        f"min {best * 1e3:8.1f} ms"
    )


if __name__ == "__main__":
  main()
