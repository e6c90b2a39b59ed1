"""Overfit: a tiny CenterNet2 trained for a few hundred steps on four synthetic images must detect
those objects (COCO AP50 >= 0.9 on them). Exercises the whole train path (targets, both stages'
losses, sampling, optimizer) and the whole inference path (proposals, cascade, scores, NMS)."""

from __future__ import annotations

import os
import time

import jax
import numpy as np
import pytest

from cn2_jax.config import load_config_file
from cn2_jax.engine import optim, step as step_lib
from cn2_jax.evaluation.coco_eval import CocoEvaluator
from cn2_jax.modeling import detector

pytestmark = pytest.mark.slow

STEPS = 300


def make_images(n=4, size=96, seed=0):
  """n images, 1-2 objects each (filled rectangle = class 0, disc = class 1) on noise."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 60, (n, size, size, 3)).astype(np.uint8)
  boxes = np.zeros((n, 4, 4), np.float32)
  classes = np.zeros((n, 4), np.int32)
  valid = np.zeros((n, 4), bool)
  yy, xx = np.mgrid[:size, :size]
  for i in range(n):
    for j in range(1 + i % 2):
      w, h = rng.integers(24, 44, 2)
      x0 = int(rng.integers(0, size - w)) if j == 0 else int(size - w - 2)
      y0 = int(rng.integers(0, size - h)) if j == 0 else 2
      c = (i + j) % 2
      color = np.array([230, 60, 60]) if c == 0 else np.array([60, 220, 90])
      if c == 0:
        m = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
      else:
        m = ((yy + 0.5 - y0 - h / 2) / (h / 2)) ** 2 + ((xx + 0.5 - x0 - w / 2) / (w / 2)) ** 2 <= 1
      images[i][m] = color
      boxes[i, j] = [x0, y0, x0 + w, y0 + h]
      classes[i, j] = c
      valid[i, j] = True
  return images, boxes, classes, valid


def test_tiny_model_overfits_four_images():
  # The demo's toy-width model (configs/demo.py) at even smaller sizes.
  c = load_config_file(
      os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "demo.py")
  )
  m = c.model
  m.num_classes = 2
  m.fpn_channels = 32
  m.centernet.num_convs = 1
  m.centernet.pre_nms_topk_train = 128
  m.centernet.post_nms_topk_test = 32
  m.roi_heads.batch_size_per_image = 32
  m.roi_heads.fc_dim = 64
  m.roi_heads.detections_per_image = 10
  o = c.optim
  o.base_lr, o.warmup_iters, o.warmup_factor = 0.02, 50, 0.01
  o.max_iter, o.steps = STEPS, (240,)

  images, boxes, classes, valid = make_images()
  n, size = images.shape[:2]
  batch = dict(
      image=images,
      image_hw=np.full((n, 2), size, np.int32),
      gt_boxes=boxes,
      gt_classes=classes,
      gt_valid=valid,
  )
  model = detector.build_model(m)
  mesh = step_lib.make_mesh(jax.devices()[:1])
  tx = optim.make_optimizer(o, None, ())
  state = step_lib.init_train_state(detector.init_fn(model), tx, jax.random.PRNGKey(0), mesh)
  train_step = step_lib.make_train_step(model, tx, mesh)
  dev_batch = step_lib.shard_batch(batch, mesh)
  losses = []
  t0 = time.perf_counter()
  for _ in range(STEPS):
    state, metrics = train_step(state, dev_batch)
    losses.append(float(metrics["total_loss"]))
  train_s = time.perf_counter() - t0
  assert np.isfinite(losses).all()
  assert np.mean(losses[-20:]) < 0.3 * np.mean(losses[:5]), (losses[:5], losses[-20:])

  dets = jax.device_get(
      jax.jit(lambda v, b: model.apply(v, b, train=False))(
          state.variables, {"image": images, "image_hw": batch["image_hw"]}
      )
  )
  gt = dict(
      images=[dict(id=i + 1, height=size, width=size) for i in range(n)],
      categories=[dict(id=1, name="rect"), dict(id=2, name="disc")],
      annotations=[],
  )
  for i in range(n):
    for b, cl in zip(boxes[i][valid[i]], classes[i][valid[i]]):
      gt["annotations"].append(
          dict(
              id=len(gt["annotations"]) + 1,
              image_id=i + 1,
              category_id=int(cl) + 1,
              iscrowd=0,
              bbox=[float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
              area=float((b[2] - b[0]) * (b[3] - b[1])),
          )
      )
  ev = CocoEvaluator(gt, [1, 2], verbose=False)
  ev.add(
      np.arange(1, n + 1),
      dets["boxes"],
      dets["scores"],
      dets["classes"],
      dets["valid"],
      np.ones(n, bool),
  )
  metrics = ev.evaluate()
  print(
      f"overfit: {STEPS} steps in {train_s:.1f}s, loss {losses[0]:.3f} -> "
      f"{np.mean(losses[-20:]):.3f}, AP50={metrics['AP50']:.3f} AP={metrics['AP']:.3f}"
  )
  assert metrics["AP50"] >= 0.9, metrics
