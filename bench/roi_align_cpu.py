"""CPU timing of the ROIAlign pooler (prints only; not part of the test suite).

Pooler op (default): B=2 images of 800x1216 (the training oracle's padded batch), the P3..P7
pyramid (100x152 .. 7x10), C=256, 512 boxes per image (the default `batch_size_per_image`), 7x7
output, ROIAlignV2. The boxes are drawn from the boxes the official training run pooled
(../shared/oracle/train_outputs_dev.npz, all three cascade stages: proposals, GT and the elongated
regressed boxes of stages 1-2), or synthetic boxes when the oracle is absent. Times the jitted
forward and forward + gradient w.r.t. the features of

  * the adaptive mode (`sampling_ratio=0`, the default) as the model computes it (separable
    window contractions, ops/roi_align.py),
  * the same mode by the former sub-sample scan (cn2_jax/testing/roi_align_scan.py), and
  * the fixed 2x2 grid (`sampling_ratio=2`),

and the largest difference of the adaptive results (new vs scan: values and gradients).

  JAX_PLATFORMS=cpu .venv/bin/python bench/roi_align_cpu.py [--reps 3]

`--train-step` instead times one training step (forward + `jax.grad`, float32) of the default
config (`batch_size_per_image=512`, `max_adaptive_samples=24`) on the training oracle's batch
with its converted weights, for the three poolers; it needs ~12-15 GB of memory and minutes per
pooler (`--poolers` picks some of new / scan / fixed2):

  JAX_PLATFORMS=cpu .venv/bin/python bench/roi_align_cpu.py --train-step [--poolers new,fixed2]
"""

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from cn2_jax.config import base_config
from cn2_jax.modeling.backbone.fpn import FPN
from cn2_jax.modeling.ops import roi_align as ra
from cn2_jax.testing import roi_align_scan

ORACLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "oracle")
TRAIN_NPZ = os.path.join(ORACLE, "train_outputs_dev.npz")
IMAGE_HW = (800, 1216)


def make_inputs(bsz=2, num=512, ch=256, seed=0):
  """Features `[B, H_l, W_l, C]` of P3..P7 for an 800x1216 image and boxes `[B, num, 4]`."""
  rng = np.random.default_rng(seed)
  img_h, img_w = IMAGE_HW
  feats = [
      jnp.asarray(rng.standard_normal((bsz, -(-img_h // 2**l), -(-img_w // 2**l), ch), np.float32))
      for l in range(3, 8)
  ]
  if os.path.exists(TRAIN_NPZ):
    d = np.load(TRAIN_NPZ)
    pool = np.concatenate([d[f"stage{k}_boxes"] for k in range(3)], 0)
    boxes = pool[rng.choice(len(pool), size=bsz * num, replace=False)].reshape(bsz, num, 4)
    source = f"{len(pool)} boxes the official training step pooled"
  else:
    size = np.exp(rng.uniform(np.log(8.0), np.log(800.0), size=(bsz, num)))
    asp = np.exp(rng.uniform(np.log(1 / 4), np.log(4), size=(bsz, num)))
    bw, bh = size * np.sqrt(asp), size / np.sqrt(asp)
    cx, cy = rng.uniform(0, img_w, size=(bsz, num)), rng.uniform(0, img_h, size=(bsz, num))
    boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
    boxes = np.clip(boxes, 0, [img_w, img_h, img_w, img_h])
    source = "synthetic boxes (oracle not found)"
  return feats, jnp.asarray(boxes.astype(np.float32)), source


def timeit(fn, *args, reps=3):
  """(compile + first run, median, min) seconds."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return first, float(np.median(times)), float(np.min(times))


def pooler_op(reps: int):
  feats, boxes, source = make_inputs()
  r = base_config().model.roi_heads
  levels = dict(
      min_level=FPN.min_level,
      max_level=FPN.min_level + len(FPN.strides) - 1,
      canonical_box_size=r.canonical_box_size,
      canonical_level=r.canonical_level,
  )
  need = np.asarray(ra.required_adaptive_samples(boxes, None, r.pooler_resolution, True, **levels))
  shapes = tuple((int(f.shape[1]), int(f.shape[2])) for f in feats)
  window = ra._adaptive_window(
      shapes,
      ra._level_area_bounds(len(feats), r.canonical_box_size, r.canonical_level),
      r.pooler_resolution,
  )
  bsz, num = boxes.shape[:2]
  print(
      f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cpus); B={bsz} "
      f"R={num} per image, C={feats[0].shape[-1]}, {IMAGE_HW[0]}x{IMAGE_HW[1]} image, P3..P7 "
      f"{shapes}; {source}\nadaptive samples needed (h, w) = {tuple(int(v) for v in need)}, "
      f"cap {r.max_adaptive_samples}; separable window (rows, cols, weight length) = {window}"
  )
  pooler = dict(
      min_level=FPN.min_level,
      output_size=r.pooler_resolution,
      aligned=True,
      canonical_box_size=r.canonical_box_size,
      canonical_level=r.canonical_level,
      max_adaptive_samples=r.max_adaptive_samples,
  )
  rng = np.random.default_rng(1)
  gout = jnp.asarray(rng.standard_normal((bsz, num, 7, 7, feats[0].shape[-1]), np.float32))
  scan_kw = {k: v for k, v in pooler.items()}
  paths = [
      (
          "adaptive, separable (new)",
          functools.partial(ra.multilevel_roi_align, **pooler, sampling_ratio=0),
      ),
      (
          "adaptive, scan (old)",
          functools.partial(roi_align_scan.multilevel_roi_align_scan, **scan_kw),
      ),
      ("fixed 2x2", functools.partial(ra.multilevel_roi_align, **pooler, sampling_ratio=2)),
  ]
  results = {}
  for name, pool in paths:
    fwd = jax.jit(pool)

    def fwd_bwd(fs, b, g, pool=pool):
      out, vjp = jax.vjp(lambda f: pool(f, b), fs)
      return out, vjp(g)[0]

    fwd_bwd = jax.jit(fwd_bwd)
    first, med, best = timeit(fwd, feats, boxes, reps=reps)
    print(
        f"{name:28s} forward    : compile+run {first:6.2f} s, median {med * 1e3:8.1f} ms, "
        f"min {best * 1e3:8.1f} ms",
        flush=True,
    )
    first, med, best = timeit(fwd_bwd, feats, boxes, gout, reps=reps)
    print(
        f"{name:28s} fwd + grad : compile+run {first:6.2f} s, median {med * 1e3:8.1f} ms, "
        f"min {best * 1e3:8.1f} ms",
        flush=True,
    )
    results[name] = jax.device_get(fwd_bwd(feats, boxes, gout))
  (new_out, new_grad), (old_out, old_grad) = results[paths[0][0]], results[paths[1][0]]
  err = np.abs(new_out - old_out)
  print(
      f"new vs scan, pooled: max abs {err.max():.3g}, max abs / max |scan| "
      f"{err.max() / np.abs(old_out).max():.3g}"
  )
  for lvl, (g_new, g_old) in enumerate(zip(new_grad, old_grad)):
    err = np.abs(g_new - g_old)
    print(
        f"new vs scan, grad P{lvl + 3}: max abs {err.max():.3g}, max abs / max |scan| "
        f"{err.max() / max(np.abs(g_old).max(), 1e-30):.3g}"
    )


def train_step(poolers):
  """One training step of the default config on the training oracle's batch, per pooler."""
  from cn2_jax.modeling.roi_heads import cascade
  from cn2_jax.testing import train_oracle

  npz = train_oracle.load_npz(TRAIN_NPZ)
  runner = train_oracle.TrainRunner(npz, cap=(24, 24), log=print)
  rh = runner.cfg.model.roi_heads
  rh.batch_size_per_image = base_config().model.roi_heads.batch_size_per_image
  print(
      f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cpus); batch "
      f"{tuple(runner.batch['image'].shape)}, batch_size_per_image {rh.batch_size_per_image}, "
      f"ROIAlign cap {runner.cap}, float32"
  )
  separable = cascade.multilevel_roi_align

  def scan_pooler(features, boxes, sampling_ratio, **kw):
    assert sampling_ratio == 0
    return roi_align_scan.multilevel_roi_align_scan(features, boxes, **kw)

  settings = dict(new=(0, separable), scan=(0, scan_pooler), fixed2=(2, separable))
  times = {}
  for name in poolers:
    ratio, pooler = settings[name]
    rh.sampling_ratio = ratio
    cascade.multilevel_roi_align = pooler
    runner._fn = None
    try:
      t0 = time.perf_counter()
      out = runner.step(runner.params0, 0)
      first = time.perf_counter() - t0
      runs = []
      for _ in range(2):
        t0 = time.perf_counter()
        runner.step(runner.params0, 0)
        runs.append(time.perf_counter() - t0)
    finally:
      cascade.multilevel_roi_align = separable
    times[name] = min(runs)
    print(
        f"train step, pooler {name:6s} (sampling_ratio={ratio}): compile+run {first:6.1f} s, "
        f"runs {', '.join(f'{t:.1f}' for t in runs)} s; total loss {float(out['total']):.6f}",
        flush=True,
    )
  if "fixed2" in times:
    for name, t in times.items():
      print(f"{name}: {t / times['fixed2']:.2f}x the fixed 2x2 step")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--train-step", action="store_true")
  ap.add_argument("--poolers", default="new,scan,fixed2")
  args = ap.parse_args()
  if args.train_step:
    train_step(args.poolers.split(","))
  else:
    pooler_op(args.reps)


if __name__ == "__main__":
  main()
