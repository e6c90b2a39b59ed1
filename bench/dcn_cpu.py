"""CPU timing of the DCNv2 op (prints only; not part of the test suite).

One 64-channel 128x128 map, batch 1, 3x3 kernel, stride 1, padding 1, 64 output channels, one
offset group, offsets ~2 px std and a sigmoid mask (like the centerX neck's last DCN layer at a
512x512 input). Times the jitted forward and forward+backward (gradients w.r.t. input, offset,
mask, kernel and bias) of `deform_conv2d`, next to a plain 3x3 `lax.conv_general_dilated` of the
same shape (forward, and forward+backward w.r.t. input, kernel and bias). Median of several
rounds after the compile run; each round runs all four once, so a shared CPU loads them alike.

  JAX_PLATFORMS=cpu PYTHONPATH=. .venv/bin/python bench/dcn_cpu.py [--reps 7] [--size 128] [--channels 64]
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from cn2_jax.modeling.ops.dcn import deform_conv2d


def time_round_robin(rows, reps):
  """Compile+first run of each function, then `reps` rounds that run every function once in
  turn, so that all of them see the same background load (the CPU is shared)."""
  first, times = {}, {name: [] for name, _, _ in rows}
  for name, fn, args in rows:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first[name] = time.perf_counter() - t0
  for _ in range(reps):
    for name, fn, args in rows:
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - t0)
  return {name: (first[name], float(np.median(t)), float(np.min(t))) for name, t in times.items()}


def conv3x3(x, kernel, bias):
  y = lax.conv_general_dilated(
      x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  return y + bias


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--size", type=int, default=128)
  ap.add_argument("--channels", type=int, default=64)
  args = ap.parse_args()
  n, c = args.size, args.channels
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, n, n, c), np.float32))
  offset = jnp.asarray(2.0 * rng.standard_normal((1, n, n, 18), np.float32))
  mask = jax.nn.sigmoid(jnp.asarray(rng.standard_normal((1, n, n, 9), np.float32)))
  kernel = jnp.asarray(rng.standard_normal((3, 3, c, c), np.float32) * np.sqrt(2 / (9 * c)))
  bias = jnp.asarray(0.1 * rng.standard_normal((c,), np.float32))
  gout = jnp.asarray(rng.standard_normal((1, n, n, c), np.float32))

  dcn_fwd = jax.jit(deform_conv2d)
  dcn_bwd = jax.jit(jax.grad(lambda *a: jnp.sum(deform_conv2d(*a) * gout), argnums=(0, 1, 2, 3, 4)))
  conv_fwd = jax.jit(conv3x3)
  conv_bwd = jax.jit(jax.grad(lambda *a: jnp.sum(conv3x3(*a) * gout), argnums=(0, 1, 2)))

  print(
      f"jax {jax.__version__} on {jax.devices()[0].platform} "
      f"({jax.devices()[0].device_kind}); x [1,{n},{n},{c}] -> [1,{n},{n},{c}], 3x3, "
      f"stride 1, float32; median/min of {args.reps} round-robin rounds after compile"
  )
  rows = [
      ("DCNv2 forward", dcn_fwd, (x, offset, mask, kernel, bias)),
      ("DCNv2 forward+backward", dcn_bwd, (x, offset, mask, kernel, bias)),
      ("conv3x3 forward", conv_fwd, (x, kernel, bias)),
      ("conv3x3 forward+backward", conv_bwd, (x, kernel, bias)),
  ]
  results = time_round_robin(rows, args.reps)
  for name, (first, med, best) in results.items():
    print(
        f"{name:26s}: compile+run {first:6.2f} s, median {med * 1e3:8.2f} ms, "
        f"min {best * 1e3:8.2f} ms"
    )
  ratio = lambda a, b: results[a][1] / results[b][1]
  print(
      f"DCNv2 / conv3x3 (medians): forward {ratio('DCNv2 forward', 'conv3x3 forward'):.1f}x, "
      f"forward+backward {ratio('DCNv2 forward+backward', 'conv3x3 forward+backward'):.1f}x"
  )
  if hasattr(os, "getloadavg"):
    print(
        "load average (1, 5, 15 min): %.2f %.2f %.2f on %d CPUs"
        % (*os.getloadavg(), os.cpu_count())
    )


if __name__ == "__main__":
  main()
