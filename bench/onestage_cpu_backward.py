"""The one-stage backward pass on CPU: the two gradients XLA CPU computed slowly, old form vs the
model's form, and the demo model's training step (fwd + bwd).

  JAX_PLATFORMS=cpu PYTHONPATH=. python bench/onestage_cpu_backward.py [--runs 10]

* transposed conv k4/s2/p1 ([8, 12, 12, 64] -> 64, the demo's first DeconvLayer scale): kernel
  gradient of the lhs-dilated form (`neck._conv_transpose_dilated`) vs the sub-pixel phase form
  (`neck.conv_transpose2d`);
* 3x3/2 max-pool ([8, 96, 96, 16]): input gradient of `lax.reduce_window` (select-and-scatter) vs
  `resnet.max_pool_3x3_s2_p1` (its own VJP);
* `configs/centernet_demo.py`'s model, batch 8 at 192x192: `value_and_grad` of the training loss.
Median milliseconds of `--runs` jitted calls after one warm-up call. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from cn2_jax.modeling.backbone.resnet import max_pool_3x3_s2_p1
from cn2_jax.modeling.onestage import model as M
from cn2_jax.modeling.onestage import neck as N


def median_ms(fn, *args, runs: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1000 * float(np.median(times))


def reduce_window_pool(x):
  init = np.array(-np.inf, dtype=x.dtype)
  return jax.lax.reduce_window(
      x, init, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
  )


def demo_step(runs: int) -> float:
  from configs import centernet_demo

  cfg = centernet_demo.get_config()
  model = M.build_onestage_model(M.model_fields(cfg.model))
  b = M.dummy_batch(8, (192, 192), max_boxes=8)
  r = np.random.RandomState(0)
  b["image"] = r.randint(0, 255, b["image"].shape).astype(np.uint8)
  b["gt_boxes"][:, :3] = [[10, 10, 60, 50], [70, 80, 150, 160], [20, 100, 60, 180]]
  b["gt_valid"][:, :3] = True
  v = M.init_variables(model)

  def loss(p, bs):
    out, upd = model.apply({"params": p, "batch_stats": bs}, b, train=True, mutable=["batch_stats"])
    return sum(x for k, x in out.items() if k.startswith("loss_")), upd

  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  return median_ms(step, v["params"], v["batch_stats"], runs=runs)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--runs", type=int, default=10)
  a = p.parse_args()
  r = np.random.RandomState(0)
  x = jnp.asarray(r.randn(8, 12, 12, 64), jnp.float32)
  k = jnp.asarray(r.randn(4, 4, 64, 64) * 0.05, jnp.float32)
  g = jnp.asarray(r.randn(8, 24, 24, 64), jnp.float32)  # the cotangent (an input, not folded)
  dilated = lambda x, k: N._conv_transpose_dilated(x, k, 2, 1, 0, None)  # noqa: E731
  dk_old = jax.jit(jax.grad(lambda k, x, g: (dilated(x, k) * g).sum()))
  dk_new = jax.jit(jax.grad(lambda k, x, g: (N.conv_transpose2d(x, k) * g).sum()))
  fwd_new = jax.jit(N.conv_transpose2d)
  xp = jnp.asarray(r.randn(8, 96, 96, 16), jnp.float32)
  gp = jnp.asarray(r.randn(8, 48, 48, 16), jnp.float32)
  dp_old = jax.jit(jax.grad(lambda x, g: (reduce_window_pool(x) * g).sum()))
  dp_new = jax.jit(jax.grad(lambda x, g: (max_pool_3x3_s2_p1(x) * g).sum()))
  fwd_pool = jax.jit(max_pool_3x3_s2_p1)
  rows = [
      ("transposed conv kernel gradient", median_ms(dk_old, k, x, g, runs=a.runs),
       median_ms(dk_new, k, x, g, runs=a.runs), median_ms(fwd_new, x, k, runs=a.runs)),
      ("max-pool input gradient", median_ms(dp_old, xp, gp, runs=a.runs),
       median_ms(dp_new, xp, gp, runs=a.runs), median_ms(fwd_pool, xp, runs=a.runs)),
  ]  # fmt: skip
  print("| op | old form (ms) | model's form (ms) | forward (ms) |\n|---|---|---|---|")
  for name, old, new, fwd in rows:
    print(f"| {name} | {old:.1f} | {new:.1f} | {fwd:.1f} |")
  print(f"\ndemo model training step (batch 8, 192x192, fwd + bwd): {demo_step(a.runs):.1f} ms")


if __name__ == "__main__":
  main()
