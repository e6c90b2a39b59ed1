"""R50 CenterNet2 inference (full model.apply: backbone, proposals + NMS, cascade, final NMS) at
1024x1024, batch 1, random weights, on whatever device JAX picks (CPU here).

  JAX_PLATFORMS=cpu PYTHONPATH=. python bench/r50_cpu_forward.py [--size 1024] [--iters 5]
"""

import argparse
import time

import jax
import numpy as np

from cn2_jax.config import base_config
from cn2_jax.modeling import detector


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", type=int, default=1024)
  ap.add_argument("--iters", type=int, default=5)
  args = ap.parse_args()
  cfg = base_config()
  model = detector.build_model(cfg.model)
  variables = detector.init_variables(cfg.model)
  rng = np.random.default_rng(0)
  batch = dict(
      image=rng.integers(0, 255, (1, args.size, args.size, 3), dtype=np.uint8),
      image_hw=np.array([[args.size, args.size]], np.int32),
  )
  fwd = jax.jit(lambda v, b: model.apply(v, b, train=False))
  t0 = time.perf_counter()
  compiled = fwd.lower(variables, batch).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(variables, batch))
  times = []
  for _ in range(args.iters):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(variables, batch))
    times.append(time.perf_counter() - t0)
  print(
      f"device={jax.devices()[0].device_kind} jax={jax.__version__} size={args.size} batch=1 "
      f"compile={compile_s:.1f}s forward median={np.median(times) * 1e3:.0f}ms "
      f"min={np.min(times) * 1e3:.0f}ms over {args.iters}"
  )


if __name__ == "__main__":
  main()
