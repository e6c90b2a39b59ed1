"""Padding before/after aspect-ratio buckets (issue: pad like the official code).

  JAX_PLATFORMS=cpu PYTHONPATH=. python bench/padding.py [--skip-model] [--iters 3]

1. Padding overhead (padded pixels / image pixels) of training batches under the COCO recipe
   (short side 640-800, max 1333) for the image sizes of ../shared/data/{raccoon,bccd} and the COCO
   size mix, before (every image on one 1344x1344 canvas) and after (aspect-grouped buckets,
   one short side per batch), at global batch 2 and 16; and the number of compiled programs.
2. CPU speed at reduced resolution (short side 320, max 533, 640x480 images, batch 2): the R50
   training step (loss + grad) and the eval forward on the old square canvas (544x544) and on the
   bucket (320x448), in one run; compile times cold and from the persistent compilation cache
   (a second process reading the cache the first one wrote).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cn2_jax.data import buckets as Bk  # noqa: E402
from cn2_jax.data import pipeline as P  # noqa: E402

SHORT = (640, 672, 704, 736, 768, 800)
SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")


def _sizes_of(name):
  out = []
  for split in ("train", "val"):
    path = os.path.join(SHARED, name, f"instances_{split}.json")
    if os.path.isfile(path):
      with open(path) as f:
        out += [(im["height"], im["width"]) for im in json.load(f)["images"]]
  return np.array(out) if out else None


def overhead(sizes, global_batch, *, bucketed):
  """Before: one 1344x1344 canvas, plain epochs, a short side per image; after: the defaults."""
  if bucketed:
    return P.train_padding_overhead(sizes, global_batch=global_batch, short_sizes=SHORT,
                                    max_size=1333)  # fmt: skip
  return P.train_padding_overhead(
      sizes, global_batch=global_batch, short_sizes=SHORT, max_size=1333, pad_hw=(1344, 1344),
      aspect_grouping=False, scale_per_batch=False,
  )  # fmt: skip


def padding_table():
  sets = {"COCO mix": Bk.coco_size_mix(4000)}
  for name in ("raccoon", "bccd"):
    s = _sizes_of(name)
    if s is not None:
      sets[name] = s
  print("| images | global batch | before (1344x1344) | after (buckets) | canvases used |")
  print("|---|---|---|---|---|")
  for name, sizes in sets.items():
    for gb in (2, 16):
      before, _ = overhead(sizes, gb, bucketed=False)
      after, n = overhead(sizes, gb, bucketed=True)
      print(f"| {name} ({len(sizes)}) | {gb} | {before:.2f} | {after:.3f} | {n} |")
  table = Bk.train_buckets(SHORT, 1333)
  print(
      f"\ncompiled train programs (COCO recipe): {len(Bk.bucket_shapes(table))} buckets "
      f"(6 short sides x 6 aspect groups + 1 mixed fallback), before: 1"
  )


_WORKER = r"""
import json, sys, time
import jax, numpy as np
cache = sys.argv[1]
jax.config.update("jax_compilation_cache_dir", cache)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
from cn2_jax.config import base_config
from cn2_jax.modeling import detector
iters = int(sys.argv[2])
cfg = base_config()
model = detector.build_model(cfg.model)
variables = detector.init_variables(cfg.model)
params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}
rng = np.random.default_rng(0)

def loss_fn(p, b, key):
  losses = model.apply({"params": p, **rest}, b, train=True, rngs={"sampling": key})
  return sum(v for k, v in losses.items() if not k.startswith("aux/"))

train = jax.jit(jax.value_and_grad(loss_fn))
fwd = jax.jit(lambda v, b: model.apply(v, b, train=False))
out = {}
for name, canvas in (("square 544x544 (before)", (544, 544)), ("bucket 320x448 (after)", (320, 448))):
  img = np.zeros((2, *canvas, 3), np.uint8)
  img[:, :320, :427] = rng.integers(0, 255, (2, 320, 427, 3), dtype=np.uint8)
  b = dict(image=img, image_hw=np.array([[320, 427]] * 2, np.int32),
           gt_boxes=np.array([[[20, 30, 200, 250], [150, 40, 400, 300]]] * 2, np.float32),
           gt_classes=np.array([[1, 7]] * 2, np.int32), gt_valid=np.ones((2, 2), bool))
  key = jax.random.PRNGKey(0)
  row = {}
  for what, fn, args in (("train", train, (params, b, key)),
                         ("eval", fwd, (variables, {"image": b["image"], "image_hw": b["image_hw"]}))):
    t0 = time.perf_counter(); c = fn.lower(*args).compile(); row[what + "_compile_s"] = time.perf_counter() - t0
    jax.block_until_ready(c(*args))
    ts = []
    for _ in range(iters):
      t0 = time.perf_counter(); jax.block_until_ready(c(*args)); ts.append(time.perf_counter() - t0)
    row[what + "_step_s"] = float(np.median(ts))
  out[name] = row
print("RESULT " + json.dumps(out))
"""


def speed(iters):
  cache = tempfile.mkdtemp(prefix="cn2_padding_cache_")
  env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), ".."))
  runs = []
  for label in ("cold cache", "warm cache"):
    p = subprocess.run(
        [sys.executable, "-c", _WORKER, cache, str(iters)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")][-1]
    runs.append((label, json.loads(line[len("RESULT ") :])))
  import jax

  print(
      f"\nR50 CenterNet2 (base config: adaptive ROIAlign), batch 2 of 640x480 images at short "
      f"side 320 (320x427), {jax.devices()[0].device_kind}, jax {jax.__version__}, median of "
      f"{iters}:"
  )
  print(
      "| canvas | train step | eval forward | compile train (cold / cached) | "
      "compile eval (cold / cached) |"
  )
  print("|---|---|---|---|---|")
  cold, warm = runs[0][1], runs[1][1]
  for name in cold:
    c, w = cold[name], warm[name]
    print(
        f"| {name} | {c['train_step_s']:.2f} s | {c['eval_step_s']:.2f} s | "
        f"{c['train_compile_s']:.1f} / {w['train_compile_s']:.1f} s | "
        f"{c['eval_compile_s']:.1f} / {w['eval_compile_s']:.1f} s |"
    )


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--skip-model", action="store_true")
  ap.add_argument("--iters", type=int, default=3)
  args = ap.parse_args()
  padding_table()
  if not args.skip_model:
    speed(args.iters)


if __name__ == "__main__":
  main()
