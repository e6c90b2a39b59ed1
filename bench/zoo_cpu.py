"""Inference time of every zoo model (configs/zoo/*.py) at its official test size, batch 1.

The default user path: the config unchanged, the notebook `Predictor` preprocessing (official
resize to min/max_size_test, official canvas) of a 480x640 COCO image (the oracles' dev image when
present, else random pixels of that size), and the jitted full forward (backbone, proposals + NMS,
ROI heads, final NMS). Random initial weights: the time does not depend on the values (shapes are
static). Compile time is reported separately; the forward is the median of `--iters` runs.

  JAX_PLATFORMS=cpu PYTHONPATH=. python bench/zoo_cpu.py [--iters 5] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import jax
import numpy as np

from cn2_jax.config import load_config_file
from cn2_jax.modeling import detector
from cn2_jax.predictor import Predictor
from cn2_jax.testing.zoo_oracle import dev_image_path

REPO = Path(__file__).resolve().parents[1]


def _image(predictor: Predictor) -> np.ndarray:
  path = dev_image_path()
  if path is not None and path.is_file():
    return predictor.read_image(str(path))
  return np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)


def measure(config_path: Path, iters: int) -> dict:
  cfg = load_config_file(config_path)
  variables = detector.init_variables(cfg.model)
  predictor = Predictor(cfg, variables)
  image, image_hw, _ = predictor.preprocess(_image(predictor))
  batch = dict(image=image, image_hw=image_hw)
  model = predictor.model
  fwd = jax.jit(lambda v, b: model.apply(v, b, train=False))
  t0 = time.perf_counter()
  compiled = fwd.lower(variables, batch).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(variables, batch))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(variables, batch))
    times.append(time.perf_counter() - t0)
  params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables.get("params")))
  return dict(
      name=config_path.stem,
      canvas=f"{image.shape[1]}x{image.shape[2]}",
      params=params,
      compile_s=compile_s,
      median_ms=float(np.median(times) * 1e3),
      min_ms=float(np.min(times) * 1e3),
  )


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--only", nargs="*", default=())
  args = ap.parse_args()
  configs = sorted((REPO / "configs" / "zoo").glob("*.py"))
  if args.only:
    configs = [c for c in configs if c.stem in args.only]
  dev = jax.devices()[0]
  print(
      f"device={dev.platform}:{dev.device_kind} cpu={platform.processor() or platform.machine()} "
      f"jax={jax.__version__} iters={args.iters}"
  )
  print("| model | canvas | params | compile (s) | forward median (ms) | min (ms) |")
  print("|---|---|---|---|---|---|")
  for path in configs:
    try:
      r = measure(path, args.iters)
    except Exception as e:  # noqa: BLE001  (a table row says why a model did not run)
      print(f"| {path.stem} | - | - | - | failed: {type(e).__name__}: {str(e)[:80]} | - |")
      continue
    print(
        f"| {r['name']} | {r['canvas']} | {r['params'] / 1e6:.1f}M | {r['compile_s']:.1f} | "
        f"{r['median_ms']:.0f} | {r['min_ms']:.0f} |",
        flush=True,
    )


if __name__ == "__main__":
  main()
