"""Robustness benchmark: the small config trains stably on real data (issue 9).

Trains `configs/raccoon_small.py` for 300 steps on the shared raccoon and bccd folders, 3 seeds
each, and checks every run: the divergence guard (engine/loop.py) never trips, nothing is NaN,
and the final loss (mean of the last 25 steps) is below the loss at step 25 (mean of steps 1-25).
bccd is used the way a new user would point the config at it: `data.root`, `data.name`,
`model.num_classes=3` and `data.max_boxes=32` (up to 30 boxes per image). The config's own
schedule is used and the run stops at step 300 (`stop_at_step`), i.e. at the peak LR (the first
decay is at step 400): the part of the run where a too-high LR shows.

  JAX_PLATFORMS=cpu PYTHONPATH=. python bench/robustness.py                 # 6 runs, ~30-40 min
  JAX_PLATFORMS=cpu PYTHONPATH=. python bench/robustness.py --datasets raccoon --seeds 0 \\
      --steps 100 --set optim.base_lr=0.08                                  # one quick probe

Prints one markdown row per finished run (so a partial log is useful) and the full table at the
end; writes per-step metrics and the summary to `<workdir>/robustness.json`. Exit status 1 when
a run fails a check. Not part of CI (needs ../shared/data and ~6 min per run on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import shutil
import sys
import time

import numpy as np

# Keep the log readable: one table row per run instead of a progress bar (tqdm >= 4.66 reads it).
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cn2_jax import app  # noqa: E402
from cn2_jax.config import load_config_file, validate_config  # noqa: E402
from cn2_jax.engine import loop  # noqa: E402

HEADER = (
    "| dataset | seed | loss@25 | final loss | max grad norm | guard tripped? | ok |\n"
    "|---|---|---|---|---|---|---|"
)


def make_config(config_path: str, dataset: str, data_root: str, seed: int, overrides):
  c = load_config_file(config_path)
  c.seed = seed
  c.data.root = os.path.join(data_root, dataset)
  c.data.name = dataset
  if dataset == "bccd":  # 3 classes, up to 30 boxes per image
    c.model.num_classes = 3
    c.data.max_boxes = 32
  c.train.eval_at_end = False
  for kv in overrides:
    key, value = kv.split("=", 1)
    node = c
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    try:
      node[leaf] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[leaf] = value
  return validate_config(c)


def run_one(cfg, workdir: str, steps: int) -> dict:
  shutil.rmtree(workdir, ignore_errors=True)
  hist = []
  tripped, error = "", ""
  t0 = time.time()
  try:
    app.train(
        cfg, workdir, stop_at_step=steps, metrics_callback=lambda s, m: hist.append(dict(m, step=s))
    )
  except loop.DivergenceError as e:
    tripped = f"yes (iteration {e.iteration})"
    error = str(e)
  except loop.NonFiniteLossError as e:
    tripped = f"NaN (iteration {e.iteration})"
    error = str(e)
  except Exception as e:  # keep going with the other runs; reported as a failure
    tripped = f"error: {type(e).__name__}"
    error = repr(e)
  loss = np.array([h["total_loss"] for h in hist], np.float64)
  gn = np.array([h["grad_norm"] for h in hist], np.float64)
  first = float(loss[:25].mean()) if len(loss) else float("nan")
  final = float(loss[-25:].mean()) if len(loss) else float("nan")
  ok = (not tripped) and len(loss) == steps and final < first
  return dict(
      loss_at_25=first,
      final_loss=final,
      max_grad_norm=float(gn.max()) if len(gn) else float("nan"),
      tripped=tripped or "no",
      ok=bool(ok),
      steps_done=len(hist),
      seconds=time.time() - t0,
      error=error,
      history=hist,
  )


def row(r: dict) -> str:
  return (
      f"| {r['dataset']} | {r['seed']} | {r['loss_at_25']:.3f} | {r['final_loss']:.3f} | "
      f"{r['max_grad_norm']:.3g} | {r['tripped']} | {'yes' if r['ok'] else 'NO'} |"
  )


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default=os.path.join(REPO, "configs", "raccoon_small.py"))
  ap.add_argument("--datasets", default="raccoon,bccd")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--data-root", default=os.path.join(os.path.dirname(REPO), "shared", "data"))
  ap.add_argument("--workdir", default="/tmp/cn2_robustness")
  ap.add_argument(
      "--set",
      nargs="*",
      default=[],
      metavar="KEY=VALUE",
      help="config overrides, e.g. optim.base_lr=0.02",
  )
  a = ap.parse_args(argv)
  # force: an imported library may already have configured the root logger at WARNING.
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
  if not os.path.isdir(a.data_root):
    print(f"data folder {a.data_root} not found (the shared raccoon / bccd datasets)")
    return 2
  os.makedirs(a.workdir, exist_ok=True)
  results = []
  print(HEADER, flush=True)
  for dataset in a.datasets.split(","):
    for seed in (int(s) for s in a.seeds.split(",")):
      cfg = make_config(a.config, dataset, a.data_root, seed, a.set)
      cfg.data.data_dir = os.path.join(a.workdir, "tfds")  # prepared once, shared by the seeds
      r = run_one(cfg, os.path.join(a.workdir, f"{dataset}_s{seed}"), a.steps)
      r.update(dataset=dataset, seed=seed)
      results.append(r)
      print(row(r), flush=True)
      if r["error"]:
        print(f"  {r['error'][:2000]}", flush=True)
      with open(os.path.join(a.workdir, "robustness.json"), "w") as f:
        json.dump(dict(config=a.config, steps=a.steps, overrides=a.set, runs=results), f)
  print("\n" + HEADER)
  for r in results:
    print(row(r))
  print(
      f"\n{sum(r['ok'] for r in results)}/{len(results)} runs ok; per-step metrics in "
      f"{os.path.join(a.workdir, 'robustness.json')}"
  )
  return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
  sys.exit(main())
