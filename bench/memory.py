#!/usr/bin/env python
"""Compiled per-device memory of the CenterNet2 R50 training step, per train bucket (issue 24).

For each train bucket of `configs/cn2_r50.py` (the padded shapes the training step is compiled
for: `data/buckets.py`, 37 shapes from 640x864 to the 1344x1344 fallback) at 1 and 2 images per
device, with and without `model.remat`, this prints XLA's `compiled.memory_analysis()` of the
jitted train step (`engine/step.py`: forward, gradient, SGD update, state donated): the argument
(train state + batch), output, aliased (donated) and temporary sizes, and the per-device peak
estimate `argument + output - alias + temp`. It then says which GPU memory sizes (16/24/40/80 GB)
the official recipe (2 images per GPU, every bucket) fits, with JAX's default GPU memory pool
(`XLA_PYTHON_CLIENT_MEM_FRACTION`, 75% of the card) and with 95% of the card.

Nothing is allocated or run: the step is lowered with abstract inputs (`ShapeDtypeStruct`s with the
mesh's shardings) and compiled for the backend JAX runs on, one case per subprocess. On CPU the
figures are XLA:CPU's buffer assignment, an approximation of a GPU's: other fusions and layouts,
no cuDNN workspaces, no allocator fragmentation, no CUDA context; run it on the GPU for that
GPU's figures. In particular XLA:CPU removes the optimization barriers of `jax.checkpoint` before
its common-subexpression elimination and scheduling (cpu_compiler.cc), which merges the
recomputation back into the forward: `model.remat` saves nothing in CPU figures. XLA:GPU removes
them after scheduling, so the saving shows there. Each row therefore also gives the activations
the forward keeps for the backward pass as JAX sees them (`saved residuals`: the residuals of
the per-device loss's VJP, before XLA's fusions, so an upper bound of what a GPU keeps, and the
same on every backend), where remat's effect is visible on any machine.

  PYTHONPATH=. python bench/memory.py --out bench/out/memory.json       # every case (a GPU)
  JAX_PLATFORMS=cpu PYTHONPATH=. python bench/memory.py --buckets largest --images 2
  PYTHONPATH=. python bench/memory.py --buckets 800x1344,1344x1344 --grad-accum 2

`--grad-accum k` compiles the step with `train.grad_accum_steps = k` (the images per device are
then k micro-batches of images/k).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not __package__:  # `python bench/memory.py`: the repository root, not bench/, on sys.path
  _here = os.path.dirname(os.path.abspath(__file__))
  sys.path[:] = [REPO] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

CONFIG = os.path.join(REPO, "configs", "cn2_r50.py")
GPU_GB = (16, 24, 40, 80)
POOL_FRACTIONS = (0.75, 0.95)  # JAX's default GPU memory pool; the most one would set
TRAIN_KEYS = ("image", "image_hw", "gt_boxes", "gt_classes", "gt_valid")
GIB = 2.0**30


def train_bucket_shapes(cfg) -> list:
  """The distinct train canvases (H, W) of `cfg.data`, by area (`buckets.bucket_shapes`)."""
  from cn2_jax.data import buckets

  d = cfg.data
  if tuple(d.pad_hw_train):
    return [tuple(int(v) for v in d.pad_hw_train)]
  table = buckets.train_buckets(
      d.min_size_train, d.max_size_train, d.bucket_aspect_ratios, d.size_divisibility
  )
  return buckets.bucket_shapes(table)


def measure(case: dict) -> dict:
  """One case (in a worker process): lower + compile the train step with abstract inputs; the
  fields of `compiled.memory_analysis()` in bytes, the peak estimate and the compile time."""
  import jax
  import jax.numpy as jnp

  from cn2_jax.config import load_config_file
  from cn2_jax.engine import optim
  from cn2_jax.engine import step as step_lib
  from cn2_jax.modeling import detector

  cfg = load_config_file(CONFIG)
  cfg.model.remat = bool(case["remat"])
  model = detector.build_model(cfg.model)
  frozen = detector.frozen_param_prefixes(cfg.model)
  tx = optim.make_optimizer(cfg.optim, None, frozen)
  mesh = step_lib.make_mesh(jax.devices()[:1])  # per-device figures: one device of the mesh
  state = step_lib.abstract_train_state(detector.init_fn(model), tx, mesh)
  h, w = case["hw"]
  b, m = case["images"], int(cfg.data.max_boxes)
  shapes = dict(
      image=((b, h, w, 3), jnp.uint8),
      image_hw=((b, 2), jnp.int32),
      gt_boxes=((b, m, 4), jnp.float32),
      gt_classes=((b, m), jnp.int32),
      gt_valid=((b, m), jnp.bool_),
  )
  sharding = step_lib.data_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(s, t, sharding=sharding) for k, (s, t) in shapes.items()}
  train_step = step_lib.make_train_step(
      model,
      tx,
      mesh,
      frozen_prefixes=frozen,
      lr_schedule=optim.make_lr_schedule(cfg.optim),
      grad_accum_steps=case["grad_accum"],
  )
  t0 = time.perf_counter()
  lowered = train_step.lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  fields = (
      "argument_size_in_bytes",
      "output_size_in_bytes",
      "alias_size_in_bytes",
      "temp_size_in_bytes",
      "generated_code_size_in_bytes",
  )
  out = {f.replace("_size_in_bytes", ""): int(getattr(mem, f)) for f in fields}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  micro = {
      k: jax.ShapeDtypeStruct((b // case["grad_accum"],) + s[1:], t) for k, (s, t) in shapes.items()
  }
  out["residuals"] = residual_bytes(model, state, micro)
  out.update(
      lower_s=round(t1 - t0, 1),
      compile_s=round(t2 - t1, 1),
      backend=jax.default_backend(),
      device=str(jax.devices()[0].device_kind),
      jax=jax.__version__,
      params=int(sum(x.size for x in jax.tree.leaves(state.params))),
  )
  return out


def residual_bytes(model, state, batch) -> int:
  """Bytes of the activations the training forward of `batch` keeps for its backward pass (the
  residuals of the loss's VJP w.r.t. the params, leaving out the variables themselves), as JAX
  traces them: before XLA's fusions, and rematerialised regions keep only their inputs."""
  import jax

  # the function behind the public jax.ad_checkpoint.print_saved_residuals
  from jax._src.ad_checkpoint import saved_residuals

  from cn2_jax.engine import step as step_lib

  def loss(params, frozen, batch):
    variables = {"params": params, "frozen": frozen} if frozen else {"params": params}
    losses = model.apply(variables, batch, train=True, rngs={"sampling": jax.random.key(0)})
    return step_lib.total_loss(losses)

  saved = saved_residuals(loss, state.params, state.frozen, batch)
  return int(
      sum(a.size * a.dtype.itemsize for a, why in saved if not why.startswith("from the argument"))
  )


def run_case(case: dict, timeout: float) -> dict:
  """`measure(case)` in a fresh process (memory back after each compile; a crash is one row)."""
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(case)]
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  t0 = time.perf_counter()
  try:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return dict(case, error=f"timed out after {timeout:.0f} s")
  lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT")]
  if p.returncode or not lines:
    return dict(case, error=(p.stderr.strip().splitlines() or ["no output"])[-1][:300])
  return dict(case, **json.loads(lines[-1][len("RESULT") :]), wall_s=time.perf_counter() - t0)


def gib(x: float) -> str:
  return f"{x / GIB:.2f}"


def fitting_sizes(peak_bytes: float, fraction: float) -> list:
  return [g for g in GPU_GB if peak_bytes <= fraction * g * GIB]


def table(rows: list) -> str:
  """Markdown: one row per case (GiB), then the verdict for the official recipe."""
  out = [
      "| canvas (HxW) | images/device | grad accum | remat | argument | output | alias | temp "
      "| peak estimate | saved residuals (JAX) | compile (s) |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    head = f"| {r['hw'][0]}x{r['hw'][1]} | {r['images']} | {r['grad_accum']} | {r['remat']} "
    if "error" in r:
      out.append(head + f"| failed: {r['error']} | | | | | | |")
      continue
    out.append(
        head + f"| {gib(r['argument'])} | {gib(r['output'])} | {gib(r['alias'])} "
        f"| {gib(r['temp'])} | **{gib(r['peak'])}** | {gib(r['residuals'])} | {r['compile_s']} |"
    )
  out.append("")
  out.append(
      "GiB per device. Peak estimate = argument + output - alias + temp (XLA's "
      "memory_analysis); saved residuals = the activations kept for the backward pass before "
      "XLA's fusions (JAX's VJP residuals of one micro-batch)."
  )
  if any(r.get("backend") == "cpu" for r in rows):
    out.append(
        "Compiled on CPU: XLA:CPU's buffer assignment approximates a GPU's, and it undoes remat "
        "(barriers removed before CSE / scheduling), so remat rows show no saving in XLA's "
        "figures; the residual column shows what remat removes."
    )
  for remat in sorted({r["remat"] for r in rows}):
    for accum in sorted({r["grad_accum"] for r in rows}):
      done = [
          r
          for r in rows
          if r["remat"] == remat
          and r["grad_accum"] == accum
          and r["images"] == 2
          and "error" not in r
      ]
      if not done:
        continue
      worst = max(done, key=lambda r: r["peak"])
      shapes = "every bucket" if len(done) > 1 else f"the {worst['hw'][0]}x{worst['hw'][1]} bucket"
      verdict = "; ".join(
          f"{int(f * 100)}% pool: " + (", ".join(f"{g} GB" for g in fits) or "none of them")
          for f in POOL_FRACTIONS
          for fits in [fitting_sizes(worst["peak"], f)]
      )
      out.append(
          f"- official recipe (2 images per GPU), remat={remat}, grad_accum={accum}, "
          f"{shapes} (worst {gib(worst['peak'])} GiB at {worst['hw'][0]}x{worst['hw'][1]}): "
          f"fits {verdict}."
      )
  return "\n".join(out)


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
      "--buckets",
      default="all",
      help="'all' (every train bucket), 'largest' (by area) or HxW[,HxW...] canvases",
  )
  p.add_argument("--images", default="1,2", help="images per device, comma separated")
  p.add_argument("--remat", default="off,on", help="model.remat values: off, on or off,on")
  p.add_argument("--grad-accum", type=int, default=1, help="train.grad_accum_steps")
  p.add_argument("--timeout", type=float, default=3600.0, help="seconds per case")
  p.add_argument("--out", default=None, help="write the rows as JSON here (after every case)")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.worker:
    print("RESULT" + json.dumps(measure(json.loads(args.worker))), flush=True)
    return
  from cn2_jax.config import load_config_file

  shapes = train_bucket_shapes(load_config_file(CONFIG))
  if args.buckets == "largest":
    shapes = shapes[-1:]
  elif args.buckets != "all":
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.buckets.split(",")]
  remats = [{"off": False, "on": True}[v] for v in args.remat.split(",")]
  images = [int(v) for v in args.images.split(",")]
  for n in images:
    if n % args.grad_accum:
      raise SystemExit(f"--images {n} is not divisible by --grad-accum {args.grad_accum}")
  rows = []
  for hw in shapes:
    for n in images:
      for remat in remats:
        case = dict(hw=list(hw), images=n, remat=remat, grad_accum=args.grad_accum)
        row = run_case(case, args.timeout)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
          os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
          with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
  print(table(rows))


if __name__ == "__main__":
  main()
