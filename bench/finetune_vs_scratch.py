"""Fine-tuning from a trained detector vs training from scratch, on two real datasets (issue 21).

  JAX_PLATFORMS=cpu PYTHONPATH=. .venv/bin/python bench/finetune_vs_scratch.py
  (--quick: 10 source steps, evaluations at steps 5 and 10: a smoke check of the whole pipeline)

What it measures: the gain of `init_from=<run directory>` (weights/finetune.py: every tensor
taken from a trained detector, class rows matched by name with init_class_map="auto", unmatched
rows initialised as a new head) over the same run from scratch. Model and recipe:
`configs/raccoon_small.py` (a toy-width CenterNet2, ResNet-18/GN at width 32, trained from
scratch), at batch 4, on two COCO-format folders of DATA_ROOT: `raccoon` (1 class) and `bccd`
(Platelets, RBC, WBC).

  1. a *source* model on each dataset, --source-steps steps (default 300);
  2. for each direction (bccd -> raccoon, raccoon -> bccd): the target dataset trained from the
     other dataset's source run (fine-tune) and from scratch, same seed, same schedule;
     COCO AP / AP50 on the target's val split at each of --eval-steps (default 100, 300).

Both arms use one LR schedule, that of raccoon_small scaled to the run's length (max_iter = last
eval step; warmup max_iter/6, decays at 0.8 and 0.93 of it: 50, (240, 280) for 300 steps). A run
stops at each eval step (`app.train(stop_at_step=...)`, checkpoint saved, schedule unchanged),
is evaluated from that checkpoint (`app.evaluate`) and resumes. No class name is shared between
the two datasets, so every class row of the fine-tuned models starts as a new head: what transfers
is the backbone, FPN, proposal network and box heads.

Dataset-driven settings (both arms alike): data.max_boxes is raised to cover the most boxes of a
bccd training image (30 -> 32; raccoon_small keeps 8, which would drop bccd's boxes) and
model.roi_heads.detections_per_image to match (20 -> 32), so that the 13 cells per bccd image are
not capped by the output. Sources run first and fill the compilation cache (under ROOT) with
every shape of the targets, so the targets' wall times exclude compilation alike.

Writes ROOT/<run>/ workdirs, ROOT/results.json (--out) and prints markdown tables. A run whose
ROOT/<run>/bench_run.json was written with the same settings is not repeated.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time

from cn2_jax import app
from cn2_jax.config import load_config_file, validate_config
from cn2_jax.logging_setup import setup_logging
from cn2_jax.weights.loading import latest_checkpoint_dir

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
log = logging.getLogger("finetune_vs_scratch")

BASE_CONFIG = os.path.join(REPO_DIR, "configs", "raccoon_small.py")
DATASETS = ("bccd", "raccoon")
DIRECTIONS = (("bccd", "raccoon"), ("raccoon", "bccd"))  # (source, target)
ARMS = ("fine-tune", "scratch")
RUN_RECORD = "bench_run.json"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--root", default="", help="workdirs (runs/finetune_vs_scratch[_quick])")
  p.add_argument("--out", default="", help="results JSON (default ROOT/results.json)")
  p.add_argument("--source-steps", type=int, default=300)
  p.add_argument("--eval-steps", default="100,300", help="comma-separated target steps")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--data-root", default=os.path.join(REPO_DIR, "..", "shared", "data"))
  p.add_argument("--quick", action="store_true", help="10 source steps, eval at 5,10 (smoke)")
  args = p.parse_args(argv)
  if args.quick:
    args.source_steps, args.eval_steps = 10, "5,10"
  args.eval_steps = sorted({int(s) for s in args.eval_steps.split(",") if s.strip()})
  if not args.eval_steps or args.eval_steps[0] <= 0 or args.source_steps <= 0:
    p.error("--source-steps and --eval-steps must be positive")
  args.root = args.root or "runs/finetune_vs_scratch" + ("_quick" if args.quick else "")
  args.out = args.out or os.path.join(args.root, "results.json")
  return args


def dataset_facts(data_root: str, name: str) -> dict:
  """Class names (in category id order) and the most boxes of one training image."""
  with open(os.path.join(data_root, name, "instances_train.json")) as f:
    coco = json.load(f)
  boxes_per_image = {}
  for a in coco["annotations"]:
    boxes_per_image[a["image_id"]] = boxes_per_image.get(a["image_id"], 0) + 1
  categories = sorted(coco["categories"], key=lambda c: c["id"])
  return dict(class_names=[c["name"] for c in categories], max_boxes=max(boxes_per_image.values()))


def set_schedule(cfg, max_iter: int) -> None:
  """raccoon_small's schedule shape (500 steps: warmup 50, decays at 400 and 460) at max_iter,
  rounded as issue 21 asks for 300 steps: warmup 50, decays at (240, 280)."""
  o = cfg.optim
  o.max_iter = max_iter
  o.warmup_iters = max(1, round(max_iter / 6))
  first, second = round(max_iter * 0.8), round(max_iter * 14 / 15)
  o.steps = (max(first, 1), max(second, first + 1, 2))


def make_config(args, dataset: str, max_iter: int, init_from: str = ""):
  cfg = load_config_file(BASE_CONFIG)
  facts = dataset_facts(args.data_root, dataset)
  cfg.seed = args.seed
  d = cfg.data
  d.name = dataset
  d.root = os.path.join(args.data_root, dataset)
  d.train_json, d.val_json = "instances_train.json", "instances_val.json"
  d.image_root = ""  # file_name is relative to the dataset folder (JPEGImages/..., images/...)
  d.data_dir = os.path.join(args.root, "tfds")  # prepared once per dataset, shared by its runs
  # Keep every GT box in training and let the output hold as many: bccd has up to 30 per image.
  d.max_boxes = max(d.max_boxes, 8 * math.ceil(facts["max_boxes"] / 8))
  cfg.model.num_classes = len(facts["class_names"])
  rh = cfg.model.roi_heads
  rh.detections_per_image = max(rh.detections_per_image, d.max_boxes)
  set_schedule(cfg, max_iter)
  cfg.train.eval_every = 0
  cfg.train.eval_at_end = False  # evaluated here, timed apart from training
  cfg.train.checkpoint_every = max_iter
  cfg.train.progress_bar = False
  cfg.init_from = init_from
  cfg.init_class_map = "auto"
  cfg.compilation_cache_dir = os.path.join(os.path.abspath(args.root), "xla_cache")
  return validate_config(cfg)


def evaluate_at(cfg, workdir: str, step: int) -> dict:
  item = latest_checkpoint_dir(workdir)
  saved = os.path.basename(os.path.dirname(item)) if item else None
  if saved != str(step):  # the evaluation must see the weights of this very step
    raise RuntimeError(f"{workdir}: newest checkpoint is step {saved}, expected {step}")
  metrics = app.evaluate(cfg, workdir)
  return {k: float(metrics[k]) for k in ("AP", "AP50")}


def init_summary(workdir: str) -> dict | None:
  path = os.path.join(workdir, "init_report.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    report = json.load(f)
  return dict(
      source=report["source"],
      source_step=report["source_step"],
      source_what=report["source_what"],
      loaded_tensors=len(report["loaded"]),
      class_params=report["class_params"],
      class_rows=report["class_rows"],
      reinitialized=len(report["reinitialized"]),
      reinitialized_names=report["reinitialized"],
      skipped_source_tensors=len(report["skipped"]),
  )


def run(args, name: str, dataset: str, eval_steps, source: dict | None = None) -> dict:
  """Trains ROOT/<name> on `dataset` to the last of `eval_steps`, evaluating at each; from the
  run `source` (its record) when given, else from scratch."""
  init_from = source["workdir"] if source else ""
  workdir = os.path.join(args.root, name)
  settings = dict(
      dataset=dataset,
      eval_steps=list(eval_steps),
      seed=args.seed,
      init_from=init_from,
      source_settings=source["settings"] if source else None,  # a rerun source: rerun this
      data_root=os.path.abspath(args.data_root),
  )
  record_path = os.path.join(workdir, RUN_RECORD)
  if os.path.isfile(record_path):
    with open(record_path) as f:
      record = json.load(f)
    if record["settings"] == settings:
      log.info("%s: done before, reusing %s", name, record_path)
      return record
  if os.path.isdir(workdir):  # an unfinished or different run: start clean, timings honest
    shutil.rmtree(workdir)
  cfg = make_config(args, dataset, eval_steps[-1], init_from)
  evals, train_s, eval_s = {}, 0.0, 0.0
  start = time.perf_counter()
  for step in eval_steps:
    t0 = time.perf_counter()
    app.train(cfg, workdir, stop_at_step=step)
    t1 = time.perf_counter()
    evals[str(step)] = evaluate_at(cfg, workdir, step)
    train_s, eval_s = train_s + t1 - t0, eval_s + time.perf_counter() - t1
    print(f"[{name}] step {step}: {evals[str(step)]}", flush=True)
  record = dict(
      name=name,
      settings=settings,
      workdir=os.path.abspath(workdir),
      evals=evals,
      wall_s=time.perf_counter() - start,
      train_s=train_s,
      eval_s=eval_s,
      schedule=dict(
          max_iter=cfg.optim.max_iter,
          warmup_iters=cfg.optim.warmup_iters,
          steps=list(cfg.optim.steps),
          base_lr=cfg.optim.base_lr,
          batch_size=cfg.train.batch_size,
      ),
      max_boxes=cfg.data.max_boxes,
      detections_per_image=cfg.model.roi_heads.detections_per_image,
      init_report=init_summary(workdir),
  )
  write_json(record_path, record)
  return record


def write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(path + ".tmp", path)


def minutes(seconds: float) -> str:
  return f"{int(seconds // 60)}m{int(round(seconds % 60)):02d}s"


def tables(results: dict, eval_steps) -> str:
  last = eval_steps[-1]
  lines = ["| source run | steps | AP50 | AP | wall (train + eval) |", "|---|---|---|---|---|"]
  for dataset, r in results["sources"].items():
    m = r["evals"][str(results["source_steps"])]
    lines.append(
        f"| {dataset} | {results['source_steps']} | {m['AP50']:.3f} | {m['AP']:.3f} "
        f"| {minutes(r['wall_s'])} ({minutes(r['train_s'])} + {minutes(r['eval_s'])}) |"
    )
  lines.append("")
  head = ["direction", "arm"] + [f"AP50@{s}" for s in eval_steps] + [f"AP@{last}", "wall"]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in results["targets"]:
    cells = [r["direction"], r["arm"]]
    cells += [f"{r['evals'][str(s)]['AP50']:.3f}" for s in eval_steps]
    cells += [f"{r['evals'][str(last)]['AP']:.3f}", minutes(r["wall_s"])]
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  for r in results["targets"]:
    rep = r["init_report"]
    if rep is None:
      continue
    rows = ", ".join(f"{c['target']}<-{c['source']}" for c in rep["class_rows"]) or "none"
    # "<class tensor>[<row>]" names a new class row; anything else is a whole tensor
    new_rows = [n for n in rep["reinitialized_names"] if n.split("[")[0] in rep["class_params"]]
    lines.append(
        f"- {r['direction']} init_report: {rep['loaded_tensors']} tensors loaded from "
        f"{os.path.basename(rep['source'])} (step {rep['source_step']}, {rep['source_what']}); "
        f"class rows kept: {rows}; initialised: {rep['reinitialized']} tensors or rows "
        f"({len(new_rows)} new class rows of the {len(rep['class_params'])} class-dependent "
        f"tensors {', '.join(rep['class_params'])}); source tensors skipped: "
        f"{rep['skipped_source_tensors']}"
    )
  return "\n".join(lines)


def main(argv=None) -> None:
  args = parse_args(argv)
  setup_logging()
  os.makedirs(args.root, exist_ok=True)
  start = time.perf_counter()
  results = dict(
      command=" ".join(sys.argv),
      source_steps=args.source_steps,
      eval_steps=args.eval_steps,
      seed=args.seed,
      data_root=os.path.abspath(args.data_root),
      base_config=os.path.relpath(BASE_CONFIG, REPO_DIR),
      sources={},
      targets=[],
  )
  for dataset in DATASETS:
    results["sources"][dataset] = run(args, f"source_{dataset}", dataset, [args.source_steps])
  for source, target in DIRECTIONS:
    for arm in ARMS:
      from_source = results["sources"][source] if arm == "fine-tune" else None
      tag = "finetune" if from_source else "scratch"
      r = run(args, f"{source}_to_{target}_{tag}", target, args.eval_steps, from_source)
      results["targets"].append(dict(r, direction=f"{source} -> {target}", arm=arm))
  results["total_wall_s"] = time.perf_counter() - start  # of this invocation (reused runs: 0)
  runs = list(results["sources"].values()) + results["targets"]
  results["runs_wall_s"] = sum(r["wall_s"] for r in runs)
  write_json(args.out, results)
  print(tables(results, args.eval_steps))
  print(
      f"\nthis invocation {minutes(results['total_wall_s'])}, the runs' own wall times "
      f"{minutes(results['runs_wall_s'])}; results: {args.out}",
      flush=True,
  )


if __name__ == "__main__":
  main()
