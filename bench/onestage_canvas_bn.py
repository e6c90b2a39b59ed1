"""One-stage BatchNorm train/eval shift with and without the official canvas (issue 25 item 7).

  JAX_PLATFORMS=cpu PYTHONPATH=. python bench/onestage_canvas_bn.py [--steps 400] \
      [--root /tmp/onestage_canvas_bn] [--seed 0]

With the crop on (`data.crop_relative_range`), every training batch is padded to one
max_size_train square (here 384x384), larger than most resized raccoon images (short side
192-256, long side <= 384). The same narrow one-stage model (ResNet-18 at width 16, plain-conv
neck (32, 16, 16), Adam) is trained twice on raccoon (../shared/data/raccoon, COCO json) with the
same seed and steps: `model.onestage.mask_canvas=False` (the padding counts: extra BatchNorm
samples and heatmap negatives) and True (everything restricted to each batch's official canvas,
its largest image rounded up to 32, as centerX pads per GPU).

Then, for every BatchNorm layer, its running statistics are compared with the statistics of its
input on the val images, each forwarded alone at its own canvas (the image rounded up to 32, the
eval centerX runs; BatchNorm in eval mode; statistics pooled over all images' canvas positions):
  shift_mean = mean over channels of |running_mean - eval_mean| / sqrt(eval_var)
  shift_var  = mean over channels of |log(running_var / eval_var)|
reported averaged over the layers of each part (backbone / neck) and overall, with each run's
val AP (COCO, `app.evaluate`, eval batch 1 on the image's own canvas). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cn2_jax import app  # noqa: E402
from cn2_jax.config import base_config  # noqa: E402
from cn2_jax.data import pipeline  # noqa: E402
from cn2_jax.data.splits import open_split  # noqa: E402
from cn2_jax.modeling import detector  # noqa: E402
from cn2_jax.modeling.layers import BatchNorm  # noqa: E402
from cn2_jax.weights.loading import restore_model_variables  # noqa: E402

RACCOON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                       "raccoon")  # fmt: skip
MAX_SIZE = 384


def make_config(steps: int, seed: int, mask_canvas: bool):
  c = base_config()
  m = c.model
  m.arch = "onestage"
  m.num_classes = 1
  m.resnet_depth = 18
  m.resnet_width = 16
  o = m.onestage
  o.deconv_channels = (32, 16, 16)
  o.use_deform = False
  o.max_detections = 20
  o.mask_canvas = mask_canvas
  d = c.data
  d.dataset = "coco_json"
  d.name = "raccoon"
  d.root = RACCOON
  d.train_json = "instances_train.json"
  d.val_json = "instances_val.json"
  d.min_size_train = (192, 224, 256)
  d.max_size_train = MAX_SIZE
  d.min_size_test = 224
  d.max_size_test = MAX_SIZE
  d.crop_relative_range = (0.6, 0.6)  # on: every batch on one MAX_SIZE^2 canvas
  d.max_boxes = 8
  d.num_workers = 0
  c.train.batch_size = 8
  c.train.eval_batch_size = 1  # each val image on its own canvas
  c.train.eval_at_end = False  # app.evaluate below
  c.train.log_every = 50
  c.train.checkpoint_every = steps
  c.seed = seed
  s = c.optim
  s.optimizer = "adam"
  s.base_lr = 0.003
  s.weight_decay = 0.0
  s.reference_batch_size = 8
  s.warmup_iters = 50
  s.warmup_factor = 0.001
  s.max_iter = steps
  s.steps = (int(steps * 0.8), int(steps * 0.95))
  return c


def eval_input_statistics(cfg, workdir, variables):
  """Per BatchNorm layer (path): (running mean, running var, eval mean, eval var) `[C]`, the eval
  statistics of the layer's input over the val images, each alone on its own canvas."""
  model = detector.build_model(cfg.model)
  sums = collections.defaultdict(lambda: [0.0, 0.0, 0.0])  # path -> [sum, sum of squares, count]

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, BatchNorm) and context.method_name == "__call__":
      x = args[0].astype(jnp.float32)
      context.module.sow("bn_inputs", "sum", x.sum((0, 1, 2)))
      context.module.sow("bn_inputs", "sumsq", jnp.square(x).sum((0, 1, 2)))
      context.module.sow("bn_inputs", "count", jnp.float32(x.size // x.shape[-1]))
    return next_fun(*args, **kwargs)

  @jax.jit
  def stats(variables, image, image_hw):
    with nn.intercept_methods(record):
      _, out = model.apply(
          variables, {"image": image, "image_hw": image_hw}, train=False, mutable=["bn_inputs"]
      )
    return out["bn_inputs"]

  d = cfg.data
  b = app.prepare_dataset(cfg, workdir)
  split = open_split(b, cfg.data.eval_split)
  n = 0
  for batch in pipeline.make_eval_loader(
      split,
      batch_size=1,
      short_size=d.min_size_test,
      max_size=d.max_size_test,
      max_boxes=d.max_boxes,
      size_divisibility=32,
      num_workers=0,
  ):
    if not batch["batch_mask"].all():
      continue
    hw = batch["image_hw"][0]
    canvas = -(-hw // 32) * 32  # the image's own canvas
    image = batch["image"][:, : canvas[0], : canvas[1]]
    tree = jax.device_get(stats(variables, image, batch["image_hw"]))
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      keys = [p.key for p in path[:-1]]  # sow keeps a tuple: the last entry is its index
      layer, kind = "/".join(keys[:-1]), keys[-1]
      i = {"sum": 0, "sumsq": 1, "count": 2}[kind]
      sums[layer][i] = sums[layer][i] + np.asarray(leaf, np.float64)
    n += 1
  out = {}
  bstats = jax.device_get(variables["batch_stats"])
  for layer, (s, ss, cnt) in sums.items():
    node = bstats
    for k in layer.split("/"):
      node = node[k]
    mean = s / cnt
    var = ss / cnt - mean**2
    out[layer] = (np.asarray(node["mean"], np.float64), np.asarray(node["var"], np.float64),
                  mean, var)  # fmt: skip
  return out, n


def shifts(stats):
  """Per layer: (mean shift, log-variance shift) averaged over channels."""
  res = {}
  for layer, (rm, rv, em, ev) in stats.items():
    ev = np.maximum(ev, 1e-12)
    res[layer] = (
        float(np.mean(np.abs(rm - em) / np.sqrt(ev))),
        float(np.mean(np.abs(np.log(np.maximum(rv, 1e-12) / ev)))),
    )
  return res


def part(layer):
  return "backbone" if layer.startswith("backbone") else "neck"


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--root", default="/tmp/onestage_canvas_bn")
  args = p.parse_args()
  rows = {}
  per_layer = {}
  for mask in (False, True):
    cfg = make_config(args.steps, args.seed, mask)
    wd = os.path.join(args.root, f"mask_canvas_{mask}")
    t0 = time.perf_counter()
    app.train(cfg, wd)
    train_s = time.perf_counter() - t0
    metrics = app.evaluate(cfg, wd)
    ap = float(metrics.get("bbox/AP", metrics.get("AP", float("nan"))))
    variables = restore_model_variables(cfg, wd)
    stats, n = eval_input_statistics(cfg, wd, variables)
    sh = shifts(stats)
    per_layer[mask] = sh
    groups = collections.defaultdict(list)
    for layer, v in sh.items():
      groups[part(layer)].append(v)
      groups["all"].append(v)
    rows[mask] = {g: np.mean(np.asarray(v), axis=0) for g, v in groups.items()}
    rows[mask]["ap"] = ap
    rows[mask]["n_layers"] = len(sh)
    rows[mask]["n_images"] = n
    rows[mask]["train_s"] = train_s
    print(f"mask_canvas={mask}: AP {ap:.4f}, {len(sh)} BatchNorm layers, {n} val images, "
          f"train {train_s:.0f} s, metric keys {sorted(metrics)[:6]}", flush=True)  # fmt: skip

  print()
  print("| mask_canvas | val AP | mean shift: backbone | neck | all | "
        "log-var shift: backbone | neck | all | train s |")  # fmt: skip
  print("|---|---|---|---|---|---|---|---|---|")
  for mask in (False, True):
    r = rows[mask]
    print(f"| {mask} | {r['ap']:.4f} | {r['backbone'][0]:.3f} | {r['neck'][0]:.3f} | "
          f"{r['all'][0]:.3f} | {r['backbone'][1]:.3f} | {r['neck'][1]:.3f} | {r['all'][1]:.3f} | "
          f"{r['train_s']:.0f} |")  # fmt: skip
  print()
  print("| BatchNorm layer | mean shift (False -> True) | log-var shift (False -> True) |")
  print("|---|---|---|")
  for layer in per_layer[True]:
    a, b = per_layer[False].get(layer, (np.nan, np.nan)), per_layer[True][layer]
    print(f"| {layer} | {a[0]:.3f} -> {b[0]:.3f} | {a[1]:.3f} -> {b[1]:.3f} |")


if __name__ == "__main__":
  main()
