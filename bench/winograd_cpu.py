"""Is Winograd F(2x2, 3x3) faster than XLA:CPU's direct 3x3 convolution here? (issue 24 item 5:
what 2x inference over the official code would need; the answer on the 2-core EPYC: no, see
bench/RESULTS.md "CenterNet2_R50_1x vs the official code").

  JAX_PLATFORMS=cpu PYTHONPATH=. .venv/bin/python bench/winograd_cpu.py [--runs 5]

For each 3x3 stride-1 SAME convolution of the CenterNet2 R50 inference at the oracle's
800x1088 canvas (the head on P3/P4, ResNet stages), prints the minimum time of XLA's
`conv_general_dilated` and of a Winograd F(2x2, 3x3) form (input transform B^T d B as 16
strided slices of the padded input, 16 batched products with the transformed kernels G g G^T,
output transform A^T m A), their GFLOP/s (direct-convolution FLOPs) and the largest relative
difference; then the Winograd form's batched product and input transform alone at the P3 size.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)


def best_of(fn, *args, runs: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return min(times)


def direct(x, kernel):
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def _b_transpose(d):
  """B^T d along one tile axis, d the 4 rows (or columns) of the 4x4 input tiles."""
  return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def input_transform(x):
  """`[N, H, W, C]` -> `[16, N * ceil(H/2) * ceil(W/2), C]`: B^T d B of every 4x4 input tile."""
  n, h, w, c = x.shape
  th, tw = (h + 1) // 2, (w + 1) // 2
  xp = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - w), (0, 0)))
  tiles = []
  for rows in _b_transpose([xp[:, i : i + 2 * th : 2] for i in range(4)]):
    tiles += _b_transpose([rows[:, :, j : j + 2 * tw : 2] for j in range(4)])
  return jnp.stack(tiles).reshape(16, n * th * tw, c)


def winograd(x, kernel):
  n, h, w, _ = x.shape
  th, tw = (h + 1) // 2, (w + 1) // 2
  k = kernel.shape[-1]
  u = jnp.einsum("ai,ijck,bj->abck", _G, kernel, _G).reshape(16, -1, k)
  m = jnp.einsum("stc,sck->stk", input_transform(x), u).reshape(4, 4, n, th, tw, k)
  rows = (m[0] + m[1] + m[2], m[1] - m[2] - m[3])  # A^T m

  def cols(r):
    return jnp.stack([r[0] + r[1] + r[2], r[1] - r[2] - r[3]], -2)

  y = jnp.stack([cols(r) for r in rows], 2)  # [n, th, 2, tw, 2, k]
  return y.reshape(n, 2 * th, 2 * tw, k)[:, :h, :w]


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--runs", type=int, default=5)
  args = ap.parse_args()
  rng = np.random.default_rng(0)
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}")
  print("| x [N, H, W, C] -> K | direct s (GFLOP/s) | Winograd s (GFLOP/s) | rel. diff |")
  print("|---|---|---|---|")
  direct_j, winograd_j = jax.jit(direct), jax.jit(winograd)
  for n, h, w, c, k in (
      (1, 100, 136, 256, 256),
      (1, 50, 68, 256, 256),
      (1, 200, 272, 64, 64),
      (1, 100, 136, 128, 128),
      (1, 25, 34, 512, 512),
  ):
    x = jnp.asarray(rng.standard_normal((n, h, w, c), np.float32))
    kernel = jnp.asarray(rng.standard_normal((3, 3, c, k), np.float32) * 0.05)
    ref, alt = direct_j(x, kernel), winograd_j(x, kernel)
    err = float(jnp.abs(ref - alt).max() / jnp.abs(ref).max())
    gflop = 2 * 9 * n * h * w * c * k / 1e9
    t_d = best_of(direct_j, x, kernel, runs=args.runs)
    t_w = best_of(winograd_j, x, kernel, runs=args.runs)
    print(
        f"| [{n}, {h}, {w}, {c}] -> {k} | {t_d:.4f} ({gflop / t_d:.0f}) | "
        f"{t_w:.4f} ({gflop / t_w:.0f}) | {err:.1e} |",
        flush=True,
    )
  x = jnp.asarray(rng.standard_normal((1, 100, 136, 256), np.float32))
  v = input_transform(x)
  u = jnp.asarray(rng.standard_normal((16, 256, 256), np.float32))
  product = jax.jit(lambda a, b: jnp.einsum("stc,sck->stk", a, b))
  print(
      f"P3 size: the 16 batched products {best_of(product, v, u, runs=args.runs):.4f} s, "
      f"the input transform {best_of(jax.jit(input_transform), x, runs=args.runs):.4f} s"
  )


if __name__ == "__main__":
  main()
