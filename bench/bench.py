#!/usr/bin/env python
"""One-command benchmark of cn2_jax CenterNet2 (R50) against torchvision Faster R-CNN R50-FPN.

Measures, with random weights on synthetic images (uniform-noise pixels, ~10 random GT boxes per
image, zero padding at the bottom/right exactly as the data pipeline pads):

* JAX training throughput (the project's `make_train_step`: jit + shard_map, SGD recipe of
  `cn2_jax.engine.optim`), per training size (default 1024x1024 and 800x1333 padded to 832x1344)
  at `--batch` images per device (default 16; an out-of-memory run is retried at half the batch);
* JAX inference (`make_eval_step` = the full `model.apply(train=False)`: backbone, CenterNet
  proposals with their NMS, 3 cascade stages, per-class final NMS) at 800x1333 padded to 832x1344:
  batch-1 latency and batch-8/16 throughput, on device-resident inputs (plus an end-to-end time
  that includes host->device transfer of the uint8 batch and the device->host copy of the results);
* cold compile time: `jitted.lower(...)` (trace + lowering) and `.compile()` timed separately in a
  fresh process, then the same in a second fresh process with the same JAX persistent compilation
  cache directory (cache hits are counted from jax.monitoring events);
* peak device memory (`device.memory_stats()['peak_bytes_in_use']`, one process per case, so the
  number belongs to that case) and XLA's `compiled.memory_analysis()`;
* each for `model.dtype` float32 and bfloat16;
* torchvision `fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)` on the same device,
  same image sizes (its transform is set so that it neither resizes nor pads differently: min/max
  size = the image's short/long side, size_divisible chosen to reach the same padded size where
  possible): training under AMP (autocast fp16 + GradScaler, SGD) and inference in fp32 and fp16
  (autocast). Also a `frozen` variant (FrozenBatchNorm + 3 trainable stages, i.e. the
  ImageNet-initialised recipe, the workload that matches cn2_jax's FrozenBN / freeze_at=2).

Timing: warm-up iterations first, then each timed iteration is synchronised
(`block_until_ready` / `torch.cuda.synchronize`) and the median is reported; a second "pipelined"
pass enqueues the same number of iterations and synchronises once (what a training loop sees).

Every case runs in its own subprocess (`--worker`), so compile times are cold, peak memory is per
case and a crash or OOM does not end the run. Results are written after every case (`--out`), a
markdown table is printed at the end (and written next to the JSON as .md).

  PYTHONPATH=. python bench/bench.py --out bench/out/bench.json              # GPU, everything
  JAX_PLATFORMS=cpu PYTHONPATH=. python bench/bench.py --small --skip-torch --out /tmp/b.json
  python bench/bench.py --merge a.json b.json --out merged.json              # one table of several

`bench/run_gpu.sh` is the command a GPU session runs; `bench/RESULTS.md` has the results. This file
is the command line only; the pieces are modules of the `bench` package (see bench/__init__.py).
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not __package__:
  # Run as `python bench/bench.py`: Python puts bench/ first on sys.path, where this file would be
  # imported as the module `bench` instead of the package; take the package from the repo root.
  _here = os.path.dirname(os.path.abspath(__file__))
  sys.path[:] = [REPO] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

from bench import measure  # noqa: E402,F401 (first: its import time is the worker's process start)
from bench import report  # noqa: E402
from bench import runner  # noqa: E402
from bench.synthetic import parse_size  # noqa: E402


# ================================================================================================
# CLI
# ================================================================================================
def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
      "--small",
      action="store_true",
      help="tiny model (R18 width 16, FPN 32) and small images, for CPU smoke runs",
  )
  p.add_argument("--skip-torch", action="store_true", help="do not run torchvision")
  p.add_argument("--skip-jax", action="store_true", help="only torchvision")
  p.add_argument("--dtypes", default="float32,bfloat16", help="cn2_jax model.dtype values")
  p.add_argument(
      "--sizes",
      default=None,
      help="training sizes, comma separated HxW or HxW@PHxPW "
      "(default 800x1333@832x1344,1024x1024; --small: 100x150@128x160,128x128); "
      "the first runs before inference, the others after it; 'none' = no training cases",
  )
  p.add_argument(
      "--infer-size",
      default=None,
      help="inference size (default 800x1333@832x1344; --small: 100x150@128x160)",
  )
  p.add_argument(
      "--batch",
      type=int,
      default=None,
      help="training batch per device (default 16; --small: 2); halved on OOM",
  )
  p.add_argument(
      "--infer-batches",
      default=None,
      help="default 1,8,16 (--small: 1,2); 'none' = no inference cases",
  )
  p.add_argument(
      "--steps",
      type=int,
      default=None,
      help="timed training steps (default 20; "
      "--small 3); the same number again for the pipelined pass",
  )
  p.add_argument(
      "--warmup", type=int, default=None, help="warm-up iterations (default 3; " "--small 1)"
  )
  p.add_argument(
      "--infer-iters",
      type=int,
      default=None,
      help="timed inference iterations (default 30; --small 3)",
  )
  p.add_argument("--gt-per-image", type=float, default=10.0, help="mean GT boxes per image")
  p.add_argument(
      "--max-boxes",
      type=int,
      default=None,
      help="padded GT slots (default data.max_boxes=100; --small 16)",
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
      "--torch-variants",
      default="default,frozen",
      help="torchvision training variants: default = the literal "
      "fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None) (BatchNorm, "
      "all stages trainable); frozen = FrozenBatchNorm + 3 trainable stages",
  )
  p.add_argument("--torch-cpu", action="store_true", help="run torchvision on the CPU if no GPU")
  p.add_argument(
      "--out",
      default=os.path.join(REPO, "bench", "out", "bench.json"),
      help="result JSON (a .md table is written next to it)",
  )
  p.add_argument(
      "--profile",
      default=None,
      metavar="DIR",
      help="capture jax.profiler traces of 3 train steps / inference calls per case",
  )
  p.add_argument(
      "--cache-dir",
      default=None,
      help="persistent compilation cache root (default: a fresh temp dir, removed)",
  )
  p.add_argument("--keep-cache", action="store_true")
  p.add_argument(
      "--no-cache-run",
      action="store_true",
      help="skip the second (persistent-cache) compile process of each JAX case",
  )
  p.add_argument(
      "--no-md",
      action="store_true",
      help="do not write the .md table next to --out (it is still printed)",
  )
  p.add_argument("--no-oom-retry", action="store_true")
  p.add_argument(
      "--budget-s",
      type=float,
      default=0.0,
      help="wall-clock budget for the whole run (0 = none): cases that would start "
      "with less than --min-case-s left are skipped, a running one is killed "
      "at the budget; results so far are always written",
  )
  p.add_argument(
      "--min-case-s",
      type=float,
      default=None,
      help="least budget left to start a case (default 60; --small 10)",
  )
  p.add_argument(
      "--merge",
      nargs="+",
      metavar="JSON",
      help="merge result files into --out and print one table (runs nothing)",
  )
  p.add_argument("--worker", help=argparse.SUPPRESS)
  p.add_argument("--result", help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  small = a.small
  sizes = a.sizes or ("100x150@128x160,128x128" if small else "800x1333@832x1344,1024x1024")
  a.sizes = (
      []
      if sizes.strip().lower() == "none"
      else [parse_size(s) for s in sizes.split(",") if s.strip()]
  )
  a.infer_size = parse_size(a.infer_size or ("100x150@128x160" if small else "800x1333@832x1344"))
  a.batch = a.batch or (2 if small else 16)
  ib = a.infer_batches or ("1,2" if small else "1,8,16")
  a.infer_batches = (
      []
      if ib.strip().lower() in ("none", "0")
      else sorted(int(b) for b in ib.split(",") if b.strip())
  )
  a.steps = a.steps or (3 if small else 20)
  a.warmup = a.warmup if a.warmup is not None else (1 if small else 3)
  a.infer_iters = a.infer_iters or (3 if small else 30)
  a.max_boxes = a.max_boxes or (16 if small else 100)
  a.min_case_s = a.min_case_s if a.min_case_s is not None else (10.0 if small else 60.0)
  a.dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
  for d in a.dtypes:
    if d not in ("float32", "bfloat16"):
      raise SystemExit(f"--dtypes: {d!r} is not float32 or bfloat16")
  a.cache_runs = not a.no_cache_run
  a.torch_variants = [v.strip() for v in a.torch_variants.split(",") if v.strip()]
  for v in a.torch_variants:
    if v not in ("default", "frozen"):
      raise SystemExit(f"--torch-variants: {v!r} is not default or frozen")
  if a.profile:
    a.profile = os.path.abspath(a.profile)
  return a


def main(argv=None) -> int:
  raw = sys.argv[1:] if argv is None else argv
  if "--worker" in raw:
    a = argparse.ArgumentParser()
    a.add_argument("--worker")
    a.add_argument("--result")
    w, _ = a.parse_known_args(raw)
    return runner.worker_main(w.worker, w.result)
  args = parse_args(raw)
  if args.merge:
    merged = report.merge(args.merge, args.out)
    print(report.write_table(merged, args.out, md=not args.no_md))
    return 0
  out = runner.Runner(args).run()
  text = report.write_table(out, args.out, md=not args.no_md)
  print("\n" + text, flush=True)
  print(
      f"\n[bench] results: {args.out}"
      + ("" if args.no_md else f" (+ {os.path.splitext(args.out)[0]}.md)")
      + ", "
      f"{out['meta']['total_s']:.0f} s",
      flush=True,
  )
  failed = [r for r in out["rows"] if r.get("error")]
  return 1 if failed and not any("median_ms" in r for r in out["rows"]) else 0


if __name__ == "__main__":
  sys.exit(main())
