"""Tests for cn2_jax/engine: lr schedule, optimizer groups, data-parallel step, checkpoints, loop.

The detector is replaced by `TinyDet`, a stand-in Linen module with the DESIGN.md Model API:
variables {'params', 'frozen'}, `apply(v, batch, train=True, rngs={'sampling': k})` -> dict of scalar
losses (+ `aux/` metrics), an `axis_name` field used to `pmean` a loss normaliser, a GroupNorm-like
`norm/scale`, a tower GN `bbox_tower.1`, a `Scale` scalar and a frozen stem.
"""

from __future__ import annotations

import bisect
import glob
import json
import math
import os
import subprocess
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cn2_jax.config import base_config
from cn2_jax.engine import checkpoint as ckpt_lib
from cn2_jax.engine import loop, optim
from cn2_jax.engine import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FROZEN_PREFIXES = ("backbone.bottom_up.stem",)


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
  """XLA compile time dominates these tiny tests (flax imagenet train_test does the same)."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


# ------------------------------------------------------------------------------------------------
# Stand-in model
# ------------------------------------------------------------------------------------------------
class _GN(nn.Module):

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    mu = x.mean(axis=(1, 2, 3), keepdims=True)
    var = x.var(axis=(1, 2, 3), keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-5) * scale + bias


class _ConvGN(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, name="conv")(x)
    return _GN(name="norm")(x)


class _Stem(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), strides=2, padding=1, use_bias=False, name="conv1")(x)
    mean = self.variable("frozen", "running_mean", lambda: jnp.full((4,), 0.1)).value
    return x - mean


class TinyDet(nn.Module):
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, batch, train: bool = False):
    x = batch["image"].astype(jnp.float32) / 255.0
    x = _StemWrap(name="backbone")(x)
    x = nn.relu(_ConvGN(8, name="neck")(x))
    t = nn.Conv(8, (3, 3), padding=1, name="bbox_tower.0")(x)
    t = nn.relu(_GN(name="bbox_tower.1")(t))
    s = self.param("scales.0", nn.initializers.ones, (1,))
    feat = t.mean(axis=(1, 2))  # [B, 8]
    pred = nn.Dense(4, name="bbox_pred")(feat) * s  # [B, 4]
    if not train:
      boxes = jnp.tile(pred[:, None, :], (1, 100, 1))
      scores = jax.nn.sigmoid(jnp.tile(feat[:, :1], (1, 100)))
      return {
          "boxes": boxes,
          "scores": scores,
          "classes": jnp.zeros(scores.shape, jnp.int32),
          "valid": scores > 0.5,
      }
    valid = batch["gt_valid"]  # [B, M]
    tgt = batch["gt_boxes"] / 32.0  # [B, M, 4]
    err = jnp.sum(jnp.abs(pred[:, None, :] - tgt), axis=-1)  # [B, M]
    num = jnp.sum(valid).astype(jnp.float32)
    if self.axis_name is not None:
      num = jax.lax.pmean(num, self.axis_name)  # "N bar" normaliser
    loss_a = jnp.sum(jnp.where(valid, err, 0.0)) / jnp.maximum(num, 1.0)
    noise = jax.random.normal(self.make_rng("sampling"), feat.shape)
    loss_b = jnp.mean((feat + 0.0 * noise) ** 2)
    if "poison" in batch:
      loss_b = loss_b + jnp.sum(batch["poison"]) * 0.0  # NaN poison -> NaN loss_b only
    if "boost" in batch:
      loss_a = loss_a * jnp.mean(batch["boost"])  # finite explosion of loss_a only
    return {"loss_a": loss_a, "loss_b": loss_b, "aux/num_pos": num}


class _StemWrap(nn.Module):
  """`backbone/bottom_up/stem/conv1` (frozen) so that paths mirror detectron2's."""

  @nn.compact
  def __call__(self, x):
    return _BottomUp(name="bottom_up")(x)


class _BottomUp(nn.Module):

  @nn.compact
  def __call__(self, x):
    return _Stem(name="stem")(x)


def make_batch(
    seed: int,
    b: int = 4,
    hw: int = 16,
    m: int = 3,
    poison: Optional[float] = None,
    boost: Optional[float] = None,
):
  r = np.random.default_rng(seed)
  xy = r.uniform(0, 10, (b, m, 2)).astype(np.float32)
  wh = r.uniform(1, 6, (b, m, 2)).astype(np.float32)
  batch = {
      "image": r.integers(0, 256, (b, hw, hw, 3), dtype=np.uint8),
      "gt_boxes": np.concatenate([xy, xy + wh], -1),
      "gt_valid": r.uniform(size=(b, m)) < 0.7,
  }
  batch["gt_valid"][0, 0] = True
  if poison is not None:
    batch["poison"] = np.full((b,), poison, np.float32)
  if boost is not None:
    batch["boost"] = np.full((b,), boost, np.float32)
  return batch


def init_fn(model):
  dummy = make_batch(0)
  return lambda rng: model.init({"params": rng, "sampling": rng}, dummy, train=True)


def solver_cfg(**kw) -> ml_collections.ConfigDict:
  cfg = base_config().optim
  cfg.update(dict(base_lr=0.05, warmup_iters=2, warmup_factor=0.1, steps=(5,), max_iter=8))
  cfg.update(kw)
  return cfg


# ------------------------------------------------------------------------------------------------
# LR schedule
# ------------------------------------------------------------------------------------------------
def _d2_multistep(
    step, base_lr=0.02, warmup_iters=4000, warmup_factor=0.00025, steps=(60000, 80000), gamma=0.1
):
  # detectron2 WarmupMultiStepLR / _get_warmup_factor_at_iter("linear")
  if step >= warmup_iters:
    f = 1.0
  else:
    a = step / warmup_iters
    f = warmup_factor * (1 - a) + a
  return base_lr * f * gamma ** bisect.bisect_right(list(steps), step)


def test_lr_schedule_multistep_detectron2_values():
  sched = optim.make_lr_schedule(base_config().optim)
  expected = {
      0: 5e-6,
      2000: 0.02 * (0.00025 * 0.5 + 0.5),
      3999: None,
      4000: 0.02,
      4001: 0.02,
      59999: 0.02,
      60000: 0.002,
      60001: 0.002,
      79999: 0.002,
      80000: 2e-4,
      89999: 2e-4,
  }
  for s, v in expected.items():
    ref = _d2_multistep(s)
    if v is not None:
      assert ref == pytest.approx(v, rel=1e-12)
    np.testing.assert_allclose(float(sched(s)), ref, rtol=2e-6, err_msg=f"step {s}")
    np.testing.assert_allclose(float(jax.jit(sched)(jnp.int32(s))), ref, rtol=2e-6)


def test_lr_schedule_cosine_and_no_warmup():
  cfg = base_config().optim
  cfg.schedule = "cosine"
  sched = optim.make_lr_schedule(cfg)
  for s in (0, 2000, 4000, 45000, 89999, 90000, 95000):
    a = min(s / 4000, 1.0)
    warm = 0.00025 * (1 - a) + a if s < 4000 else 1.0
    ref = 0.02 * warm * 0.5 * (1 + math.cos(math.pi * min(s, 90000) / 90000))
    np.testing.assert_allclose(float(sched(s)), ref, rtol=2e-5, atol=1e-10)
  cfg = base_config().optim
  cfg.warmup_iters = 0
  assert float(optim.make_lr_schedule(cfg)(0)) == pytest.approx(0.02)
  with pytest.raises(ValueError):
    cfg.schedule = "poly"
    optim.make_lr_schedule(cfg)


def test_lr_scaling_with_batch_size():
  cfg = base_config().optim
  assert cfg.reference_batch_size == 16
  assert optim.effective_base_lr(cfg, 4) == pytest.approx(0.005)
  assert optim.effective_base_lr(cfg, 32) == pytest.approx(0.04)
  assert optim.effective_base_lr(cfg, None) == 0.02  # batch unknown: as written
  assert optim.lr_scaling_message(cfg, 4) == "lr 0.02 × batch 4/16 = 0.005"
  sched = optim.make_lr_schedule(cfg, 4)
  for s in (0, 2000, 4000, 70000):  # warm-up and steps untouched
    np.testing.assert_allclose(float(sched(s)), _d2_multistep(s) / 4, rtol=2e-6)
  cfg.reference_batch_size = 0  # off
  assert optim.effective_base_lr(cfg, 4) == 0.02
  assert "not scaled" in optim.lr_scaling_message(cfg, 4)
  cfg.reference_batch_size = -1
  with pytest.raises(ValueError, match="reference_batch_size"):
    optim.effective_base_lr(cfg, 4)


# ------------------------------------------------------------------------------------------------
# Optimizer groups, weight decay mask, clipping, frozen params
# ------------------------------------------------------------------------------------------------
def test_is_norm_param_rule():
  yes = [
      "proposal_generator.centernet_head.bbox_tower.1.scale",
      "proposal_generator.centernet_head.bbox_tower.10.bias",
      "proposal_generator.centernet_head.cls_tower.4.scale",
      "backbone.fpn_output3.norm.scale",
      "neck.norm.bias",
      "norm.scale",
  ]
  no = [
      "proposal_generator.centernet_head.bbox_tower.0.bias",
      "proposal_generator.centernet_head.bbox_tower.0.kernel",
      "proposal_generator.centernet_head.bbox_tower.3.bias",
      "proposal_generator.centernet_head.scales.0.scale",
      "proposal_generator.centernet_head.bbox_pred.bias",
      "backbone.bottom_up.res2.0.conv1.kernel",
      "roi_heads.box_head.0.fc1.bias",
      "neck.norm.kernel",
      "layernorm.scale",
      "subnorm.bias",
  ]
  for p in yes:
    assert optim.is_norm_param(p), p
  for p in no:
    assert not optim.is_norm_param(p), p


def test_param_labels_and_prefix_matching():
  params = {
      "backbone": {
          "bottom_up": {
              "stem": {"conv1": {"kernel": 0}},
              "res2": {"0": {"conv1": {"kernel": 0}}},
              "res20": {"kernel": 0},
          }
      },
      "head": {
          "bbox_tower.1": {"scale": 0, "bias": 0},
          "bbox_tower.0": {"bias": 0},
          "scales.0": {"scale": 0},
      },
  }
  from cn2_jax.modeling.backbone.resnet import frozen_param_prefixes

  prefixes = frozen_param_prefixes(2, "backbone.bottom_up.")
  labels = optim.param_labels(params, prefixes, optim.is_norm_param)
  assert prefixes == ("backbone.bottom_up.stem", "backbone.bottom_up.res2")
  assert labels["backbone"]["bottom_up"]["stem"]["conv1"]["kernel"] == optim.FROZEN
  assert labels["backbone"]["bottom_up"]["res2"]["0"]["conv1"]["kernel"] == optim.FROZEN
  assert labels["backbone"]["bottom_up"]["res20"]["kernel"] == optim.DECAY  # not a res2 child
  assert labels["head"]["bbox_tower.1"] == {"scale": optim.NO_DECAY, "bias": optim.NO_DECAY}
  assert labels["head"]["bbox_tower.0"]["bias"] == optim.DECAY
  assert labels["head"]["scales.0"]["scale"] == optim.DECAY
  with pytest.raises(ValueError, match="matches no parameter"):
    optim.make_optimizer(solver_cfg(), params, frozen_prefixes=("backbone.bottom_up.res9",))


def _reference_sgd(p, grads_seq, lr_seq, wd, momentum, clip):
  """torch.optim.SGD (dampening 0, no nesterov) after detectron2's element-wise value clip."""
  p = np.array(p, np.float64)
  buf = None
  for g, lr in zip(grads_seq, lr_seq):
    g = np.clip(np.asarray(g, np.float64), -clip, clip) if clip > 0 else np.asarray(g, np.float64)
    d = g + wd * p
    buf = d.copy() if buf is None else momentum * buf + d
    p = p - lr * buf
  return p


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_optimizer_matches_torch_sgd_reference(clip):
  cfg = solver_cfg(weight_decay=0.1, weight_decay_norm=0.0, clip_value=clip)
  r = np.random.default_rng(0)
  params = {
      "backbone": {"bottom_up": {"stem": {"conv1": {"kernel": r.normal(size=(3, 3))}}}},
      "neck": {
          "conv": {"kernel": r.normal(size=(2, 4))},
          "norm": {"scale": r.normal(size=4), "bias": r.normal(size=4)},
      },
      "scales.0": r.normal(size=(1,)),
  }
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  tx = optim.make_optimizer(cfg, params, frozen_prefixes=FROZEN_PREFIXES)
  state = tx.init(params)
  # frozen params carry no momentum buffer
  n_state = sum(x.size for x in jax.tree.leaves(state) if np.ndim(x) > 0)
  n_train = sum(x.size for x in jax.tree.leaves(params)) - 9
  assert n_state == n_train
  sched = optim.make_lr_schedule(cfg)
  grads_seq = [
      jax.tree.map(lambda x: jnp.asarray(r.normal(size=x.shape) * 3, jnp.float32), params)
      for _ in range(4)
  ]
  p = params
  for g in grads_seq:
    upd, state = jax.jit(tx.update)(g, state, p)
    p = jax.tree.map(lambda a, b: a + b, p, upd)
  lrs = [float(sched(i)) for i in range(4)]
  flat_p0 = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  for kp, got in jax.tree_util.tree_flatten_with_path(p)[0]:
    name = optim.path_str(kp)
    gseq = [dict(jax.tree_util.tree_flatten_with_path(g)[0])[kp] for g in grads_seq]
    if name.startswith("backbone.bottom_up.stem"):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(flat_p0[kp]))  # exactly frozen
      continue
    wd = 0.0 if ".norm." in name else 0.1
    ref = _reference_sgd(flat_p0[kp], gseq, lrs, wd, 0.9, clip)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6, err_msg=name)
  # decay really applied to the decayed leaves only: with zero grads, norm params do not move
  zero = jax.tree.map(jnp.zeros_like, params)
  upd, _ = tx.update(zero, tx.init(params), params)
  assert np.all(np.asarray(upd["neck"]["norm"]["scale"]) == 0)
  assert np.all(np.asarray(upd["backbone"]["bottom_up"]["stem"]["conv1"]["kernel"]) == 0)
  np.testing.assert_allclose(
      np.asarray(upd["neck"]["conv"]["kernel"]),
      -lrs[0] * 0.1 * np.asarray(params["neck"]["conv"]["kernel"]),
      rtol=1e-6,
  )
  np.testing.assert_allclose(
      np.asarray(upd["scales.0"]), -lrs[0] * 0.1 * np.asarray(params["scales.0"]), rtol=1e-6
  )


def test_value_clipping_is_elementwise():
  cfg = solver_cfg(weight_decay=0.0, momentum=0.0, warmup_iters=0, base_lr=1.0, clip_value=1.0)
  params = {"w": jnp.zeros(4)}
  tx = optim.make_optimizer(cfg, params)
  g = {"w": jnp.array([-5.0, -0.5, 0.25, 100.0])}
  upd, _ = tx.update(g, tx.init(params), params)
  np.testing.assert_allclose(np.asarray(upd["w"]), [1.0, 0.5, -0.25, -1.0])  # not norm-clipping


# ------------------------------------------------------------------------------------------------
# Train / eval step on the stand-in model
# ------------------------------------------------------------------------------------------------
def _tiny_setup(mesh, **kw):
  model = TinyDet()
  cfg = solver_cfg(**kw)
  tx = optim.make_optimizer(cfg, None, FROZEN_PREFIXES)
  state = step_lib.init_train_state(init_fn(model), tx, jax.random.PRNGKey(0), mesh)
  return model, cfg, tx, state


def test_train_step_frozen_and_compiles_once():
  mesh = step_lib.make_mesh(jax.devices()[:1])
  model, cfg, tx, state = _tiny_setup(mesh)
  assert "frozen" in state.variables and state.frozen
  stem0 = np.asarray(state.params["backbone"]["bottom_up"]["stem"]["conv1"]["kernel"]).copy()
  neck0 = np.asarray(state.params["neck"]["conv"]["kernel"]).copy()
  fn = step_lib.make_train_step(
      model, tx, mesh, frozen_prefixes=FROZEN_PREFIXES, lr_schedule=optim.make_lr_schedule(cfg)
  )
  for i in range(3):
    state, metrics = fn(state, step_lib.shard_batch(make_batch(i), mesh))
  assert fn._cache_size() == 1
  assert int(state.step) == 3
  assert set(metrics) == {"loss_a", "loss_b", "aux/num_pos", "total_loss", "grad_norm", "lr"}
  np.testing.assert_allclose(
      float(metrics["total_loss"]), float(metrics["loss_a"]) + float(metrics["loss_b"]), rtol=1e-6
  )
  np.testing.assert_allclose(float(metrics["lr"]), float(optim.make_lr_schedule(cfg)(2)), rtol=1e-6)
  np.testing.assert_array_equal(
      state.params["backbone"]["bottom_up"]["stem"]["conv1"]["kernel"], stem0
  )
  assert not np.allclose(state.params["neck"]["conv"]["kernel"], neck0)
  # a new input shape compiles once more, and only once
  for i in range(2):
    state, _ = fn(state, step_lib.shard_batch(make_batch(i, hw=24), mesh))
  assert fn._cache_size() == 2
  ev = step_lib.make_eval_step(model, mesh)
  det = ev(state.variables, step_lib.shard_batch(make_batch(0), mesh, keys=["image"]))
  assert det["boxes"].shape == (4, 100, 4) and det["valid"].dtype == jnp.bool_


def test_skip_loss_zeroes_the_gradients_of_a_spike():
  """centerX SKIP_LOSS through the real train step: a total >= factor x the last accepted one
  gets zero gradients (momentum and weight decay still act) and leaves the history unchanged."""
  mesh = step_lib.make_mesh(jax.devices()[:1])
  model, cfg, tx, state = _tiny_setup(mesh, skip_loss_factor=3.0, clip_value=0.0)
  fn = step_lib.make_train_step(model, tx, mesh, frozen_prefixes=FROZEN_PREFIXES)
  history = lambda s: float(s.opt_state[0].history)  # noqa: E731
  assert history(state) == optim.SKIP_LOSS_INITIAL
  state, m0 = fn(state, step_lib.shard_batch(make_batch(0), mesh))
  assert history(state) == pytest.approx(float(m0["total_loss"]), rel=1e-6)  # accepted
  before = jax.device_get(state)
  # the same optimizer applied by hand to zero gradients = what a skipped step must do
  zeros = jax.tree.map(jnp.zeros_like, before.params)
  upd, _ = tx.update(zeros, before.opt_state, before.params, value=jnp.float32(1e30))
  want = jax.device_get(optax.apply_updates(before.params, upd))
  state, m1 = fn(state, step_lib.shard_batch(make_batch(1, boost=1e3), mesh))
  assert float(m1["total_loss"]) >= 3.0 * float(m0["total_loss"])  # the spike
  assert history(state) == pytest.approx(float(m0["total_loss"]), rel=1e-6)  # not accepted
  got = jax.device_get(state.params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), got, before.params))
  assert max(moved) > 0  # momentum / weight decay still moved the weights
  state, m2 = fn(state, step_lib.shard_batch(make_batch(2), mesh))
  assert history(state) == pytest.approx(float(m2["total_loss"]), rel=1e-6)
  # off (default): no extra optimizer state
  _, _, _, plain = _tiny_setup(mesh)
  assert not isinstance(plain.opt_state, tuple) or not hasattr(plain.opt_state[0], "history")


def test_shard_batch_errors():
  mesh = step_lib.make_mesh(jax.devices()[:1])
  with pytest.raises(ValueError, match="leading"):
    step_lib.shard_batch({"x": np.float32(1.0)}, mesh)
  out = step_lib.shard_batch({"image_id": np.arange(4, dtype=np.int64)}, mesh)
  assert out["image_id"].dtype == jnp.int32 and out["image_id"].shape == (4,)


# ------------------------------------------------------------------------------------------------
# 2 fake CPU devices vs 1 device (subprocess: XLA_FLAGS must be set before jax is imported)
# ------------------------------------------------------------------------------------------------
def _multi_device_main():
  """Runs inside the subprocess; prints one JSON line."""
  assert jax.device_count() == 2, jax.devices()
  res = {}
  mesh1 = step_lib.make_mesh(jax.devices()[:1])
  mesh2 = step_lib.make_mesh()
  # clip disabled so that the update exposes the raw averaged gradient
  model, cfg, tx, _ = _tiny_setup(mesh1, clip_value=0.0, weight_decay=1e-2)
  init = init_fn(model)
  batches = [make_batch(10 + i, b=4) for i in range(2)]
  runs = {}
  state0 = jax.device_get(step_lib.init_train_state(init, tx, jax.random.PRNGKey(0), mesh1))
  for name, mesh, vma in (
      ("1dev", mesh1, False),
      ("2dev", mesh2, False),
      ("2dev_vma", mesh2, True),
  ):
    state = step_lib.replicate(state0, mesh)
    fn = step_lib.make_train_step(model, tx, mesh, frozen_prefixes=FROZEN_PREFIXES, check_vma=vma)
    ms = []
    for b in batches:
      state, m = fn(state, step_lib.shard_batch(b, mesh))
      ms.append({k: float(v) for k, v in m.items()})
    runs[name] = (jax.device_get(state.params), ms)
    sh = state.params["neck"]["conv"]["kernel"].sharding
    res[f"{name}_replicated"] = bool(sh.is_fully_replicated and len(sh.device_set) == mesh.size)
  for name in ("2dev", "2dev_vma"):
    pa, pb = runs["1dev"][0], runs[name][0]
    res[f"{name}_param_maxdiff"] = max(
        float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb))
    )
    res[f"{name}_moved"] = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(state0.params))
    )
    res[f"{name}_metrics"] = runs[name][1]
  res["1dev_metrics"] = runs["1dev"][1]
  # the wrong recipe (pmean on top of check_vma's automatic psum) would double the gradients;
  # show that the 2-device gradient really is the mean: compare a plain-SGD single update
  # (per-device normaliser differs from the global one, so the mean is not trivial)
  b = batches[0]
  res["per_device_num_pos"] = [float(b["gt_valid"][:2].sum()), float(b["gt_valid"][2:].sum())]
  # eval step: same detections on 1 and 2 devices, leading batch axis kept
  state = step_lib.replicate(state0, mesh2)
  det2 = step_lib.make_eval_step(model, mesh2)(state.variables, step_lib.shard_batch(b, mesh2))
  det1 = step_lib.make_eval_step(model, mesh1)(
      jax.device_get(state.variables), step_lib.shard_batch(b, mesh1)
  )
  res["eval_shape"] = list(det2["boxes"].shape)
  res["eval_spec_ok"] = det2["boxes"].sharding.spec == jax.sharding.PartitionSpec("data")
  res["eval_maxdiff"] = float(np.max(np.abs(np.asarray(det1["boxes"]) - np.asarray(det2["boxes"]))))
  # uneven per-device batch -> clear errors
  fn = step_lib.make_train_step(model, tx, mesh2)
  try:
    step_lib.shard_batch(make_batch(0, b=3), mesh2)
    res["shard_err"] = None
  except ValueError as e:
    res["shard_err"] = str(e)
  try:
    odd = jax.tree.map(jnp.asarray, make_batch(0, b=3))
    fn(state, odd)
    res["step_err"] = None
  except ValueError as e:
    res["step_err"] = str(e)
  print("RESULT" + json.dumps(res))


@pytest.fixture(scope="module")
def multi_device_result():
  from tests.multidevice import run_on_two_devices

  return run_on_two_devices("tests.test_engine", "_multi_device_main")


@pytest.mark.parametrize("name", ["2dev", "2dev_vma"])
def test_two_devices_match_one_device(multi_device_result, name):
  r = multi_device_result
  assert r[f"{name}_replicated"]
  assert r[f"{name}_moved"] > 1e-4  # the params did change
  assert r[f"{name}_param_maxdiff"] < 1e-6, r[f"{name}_param_maxdiff"]
  assert r["per_device_num_pos"][0] != r["per_device_num_pos"][1]
  for m1, m2 in zip(r["1dev_metrics"], r[f"{name}_metrics"]):
    assert set(m1) == set(m2)
    for k in m1:
      if k == "aux/num_pos":  # the model's N-bar: per-device mean count = global count / 2
        np.testing.assert_allclose(m2[k], m1[k] / 2, rtol=1e-6)
      else:
        np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, err_msg=k)


def test_two_devices_eval_and_errors(multi_device_result):
  r = multi_device_result
  assert r["eval_shape"] == [4, 100, 4]
  assert r["eval_spec_ok"]
  assert r["eval_maxdiff"] < 1e-5
  assert r["shard_err"] and "divisible by the 2 local device" in r["shard_err"]
  assert r["step_err"] and "divisible by the 2 device" in r["step_err"]


# ------------------------------------------------------------------------------------------------
# Loop: resume, NaN guard, TensorBoard, checkpoints
# ------------------------------------------------------------------------------------------------
def _config(max_iter=4, checkpoint_every=2, log_every=2):
  cfg = base_config()
  cfg.seed = 0
  cfg.optim = solver_cfg(max_iter=max_iter, steps=(3,))
  cfg.train.update(
      dict(
          batch_size=2,
          log_every=log_every,
          checkpoint_every=checkpoint_every,
          keep_checkpoints=2,
          progress_bar=False,
      )
  )
  return cfg


def _loader(poison_at=None, calls=None, boost_at=()):
  def fn(start):
    if calls is not None:
      calls.append(start)
    k = start
    while True:
      yield make_batch(
          100 + k,
          b=2,
          poison=(np.nan if k == poison_at else 0.0),
          boost=(1e4 if k in boost_at else 1.0) if boost_at else None,
      )
      k += 1

  return fn


def test_resume_reproduces_uninterrupted_run(tmp_path):
  model = TinyDet()
  hist_a = {}
  loop.train(
      _config(),
      str(tmp_path / "a"),
      model,
      init_fn(model),
      _loader(),
      frozen_prefixes=FROZEN_PREFIXES,
      metrics_callback=lambda s, m: hist_a.setdefault(s, m),
  )
  assert sorted(hist_a) == [1, 2, 3, 4]

  hist_b, calls = {}, []
  wd = str(tmp_path / "b")
  st = loop.train(
      _config(),
      wd,
      model,
      init_fn(model),
      _loader(calls=calls),
      frozen_prefixes=FROZEN_PREFIXES,
      stop_at_step=2,
      metrics_callback=lambda s, m: hist_b.setdefault(s, m),
  )
  assert int(st.step) == 2 and sorted(hist_b) == [1, 2]
  assert ckpt_lib.Checkpointer(wd).latest_step() == 2
  st = loop.train(
      _config(),
      wd,
      model,
      init_fn(model),
      _loader(calls=calls),
      frozen_prefixes=FROZEN_PREFIXES,
      metrics_callback=lambda s, m: hist_b.setdefault(s, m),
  )
  assert calls == [0, 2]  # the loader restarts at the restored step
  assert int(st.step) == 4
  for s in (1, 2, 3, 4):
    for k in hist_a[s]:
      np.testing.assert_allclose(hist_b[s][k], hist_a[s][k], rtol=1e-6, err_msg=f"{k}@{s}")
  ck = ckpt_lib.Checkpointer(wd)
  assert ck.all_steps() == [2, 4]
  # restore puts the arrays on the mesh, replicated
  mesh = step_lib.make_mesh()
  tx = optim.make_optimizer(_config().optim, None, FROZEN_PREFIXES)
  restored = ck.restore(step_lib.abstract_train_state(init_fn(model), tx, mesh))
  assert int(restored.step) == 4
  np.testing.assert_array_equal(
      restored.params["neck"]["conv"]["kernel"], st.params["neck"]["conv"]["kernel"]
  )
  assert restored.params["neck"]["conv"]["kernel"].sharding.is_fully_replicated
  ck.close()
  # a finished run is a no-op
  again = loop.train(
      _config(), wd, model, init_fn(model), _loader(calls=calls), frozen_prefixes=FROZEN_PREFIXES
  )
  assert int(again.step) == 4 and calls == [0, 2]
  # TensorBoard event files with every loss, lr and images/s
  events = glob.glob(os.path.join(wd, "events.out.tfevents.*"))
  assert events
  tags = set()
  for f in events:
    tags |= {tag for tag, _, _ in _read_scalars(f)}
  assert {
      "train/loss_a",
      "train/loss_b",
      "train/total_loss",
      "train/lr",
      "train/images_per_sec",
      "train/aux/num_pos",
      "train/grad_norm",
  } <= tags
  # train.batch_size = 2 with the reference batch 16: the LR used is base_lr * 2 / 16
  sched = optim.make_lr_schedule(_config().optim)
  for s in (1, 2, 3, 4):
    np.testing.assert_allclose(hist_a[s]["lr"], float(sched(s - 1)) * 2 / 16, rtol=1e-6)


def _read_scalars(path):
  """(tag, step, value) from a TFRecord-framed event file (no tensorboard dependency)."""
  import struct
  from tensorboardX.proto import event_pb2

  out = []
  with open(path, "rb") as f:
    data = f.read()
  i = 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i : i + 8])
    ev = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
    i += 12 + n + 4
    for v in ev.summary.value:
      out.append((v.tag, ev.step, v.simple_value))
  return out


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
  model = TinyDet()
  wd = str(tmp_path / "nan")
  seen = []
  with pytest.raises(loop.NonFiniteLossError) as ei:
    loop.train(
        _config(max_iter=8, checkpoint_every=2, log_every=100),
        wd,
        model,
        init_fn(model),
        _loader(poison_at=3),
        frozen_prefixes=FROZEN_PREFIXES,
        metrics_callback=lambda s, m: seen.append(s),
    )
  err = ei.value
  assert err.iteration == 3 and err.last_checkpoint == 2
  assert "loss_b" in err.terms and "loss_a" not in err.terms
  msg = str(err)
  assert "iteration 3" in msg and "loss_b=nan" in msg and "step 2" in msg
  assert seen == [1, 2, 3]
  ck = ckpt_lib.Checkpointer(wd)
  assert ck.all_steps() == [2]  # nothing written from the bad state (step 4 is a save step)
  ck.close()


# ------------------------------------------------------------------------------------------------
# Divergence guard
# ------------------------------------------------------------------------------------------------
def _noisy_stream(rng, n, start=0):
  """A healthy run: slowly decreasing, log-normal noise, rare isolated 30x grad-norm spikes."""
  for i in range(start, start + n):
    trend = 2.0 * (1 + 3 * math.exp(-i / 200))
    a = trend * 0.6 * rng.lognormal(0, 0.4)
    b = trend * 0.4 * rng.lognormal(0, 0.8)
    gn = 5.0 * rng.lognormal(0, 0.5) * (30.0 if rng.uniform() < 0.01 else 1.0)
    yield {
        "loss_a": a,
        "loss_b": b,
        "total_loss": a + b,
        "grad_norm": gn,
        "lr": 0.01,
        "aux/num_pos": 3.0,
    }


def test_divergence_guard_ignores_noise_and_spikes():
  guard = loop.DivergenceGuard()  # the defaults of the config schema
  for seed in range(3):
    g = loop.DivergenceGuard()
    for i, m in enumerate(_noisy_stream(np.random.default_rng(seed), 3000)):
      assert g.update(i, m) is None, (seed, i, m)
  # a single 1000x spike (e.g. one bad batch) is suspect but does not stop training
  suspect = []
  for i, m in enumerate(_noisy_stream(np.random.default_rng(0), 200)):
    if i == 120:
      m = dict(m, loss_b=m["loss_b"] * 1000, total_loss=m["total_loss"] * 1000)
    assert guard.update(i, m) is None
    if guard.suspect:
      suspect.append(i)
  assert 120 in suspect and 121 not in suspect and len(suspect) <= 3  # + rare grad-norm spikes


def test_divergence_guard_trips_on_explosion():
  rng = np.random.default_rng(0)
  g = loop.DivergenceGuard(factor=20, window=100, patience=5, min_steps=50)
  report = None
  for i, m in enumerate(_noisy_stream(rng, 400)):
    if i >= 300:  # loss_b grows 2x per iteration from 300 on; loss_a stays normal
      m = dict(m, loss_b=m["loss_b"] * 2.0 ** (i - 299))
      m["total_loss"] = m["loss_a"] + m["loss_b"]
    report = g.update(i, m)
    if report is not None:
      break
  assert report is not None
  first = report["first"]
  assert 300 < first < 315 and i == first + 4  # 5 suspect iterations in a row
  assert list(report["terms"]) == ["loss_b"]  # loss_a is not exploding
  v, med = report["terms"]["loss_b"]
  assert v > 20 * med
  assert report["watched"]["total_loss"][0] > 20 * report["watched"]["total_loss"][1]
  # gradient norm alone also trips (a loss that stays flat while the weights blow up)
  g = loop.DivergenceGuard(factor=20, window=100, patience=5, min_steps=50)
  for i, m in enumerate(_noisy_stream(np.random.default_rng(1), 400)):
    if i >= 200:
      m = dict(m, grad_norm=1e5)
    report = g.update(i, m)
    if report is not None:
      break
  assert i == 204 and report["terms"] == {} and "grad_norm" in report["watched"]
  # nothing before min_steps, nothing when disabled
  g = loop.DivergenceGuard(factor=20, window=100, patience=1, min_steps=50)
  assert all(g.update(i, {"total_loss": 10.0**i, "grad_norm": 1.0}) is None for i in range(50))
  g = loop.DivergenceGuard(factor=0)
  assert not g.enabled
  assert all(g.update(i, {"total_loss": 10.0**i, "grad_norm": 1.0}) is None for i in range(300))
  with pytest.raises(ValueError, match="divergence_window"):
    loop.DivergenceGuard(factor=20, window=10, min_steps=50)
  with pytest.raises(ValueError, match="divergence_factor"):
    loop.DivergenceGuard(factor=0.5)


def _guard_config(**train):
  cfg = _config(max_iter=20, checkpoint_every=2, log_every=100)
  cfg.train.update(
      dict(
          divergence_factor=20.0,
          divergence_window=10,
          divergence_patience=3,
          divergence_min_steps=4,
      )
  )
  cfg.train.update(train)
  return cfg


def test_divergence_guard_stops_training_and_keeps_last_good_checkpoint(tmp_path):
  model = TinyDet()
  wd = str(tmp_path / "div")
  seen = {}
  with pytest.raises(loop.DivergenceError) as ei:
    loop.train(
        _guard_config(keep_checkpoints=10),
        wd,
        model,
        init_fn(model),
        _loader(boost_at=range(9, 100)),
        frozen_prefixes=FROZEN_PREFIXES,
        metrics_callback=lambda s, m: seen.__setitem__(s, m),
    )
  err = ei.value
  # iterations 9, 10, 11 are suspect (loss_a x 1e4); the third in a row stops training
  assert err.iteration == 11 and err.report["first"] == 9
  assert list(err.terms) == ["loss_a"]
  assert max(seen) == 12 and seen[10]["loss_a"] > 1e3 * seen[9]["loss_a"]
  msg = str(err)
  assert "diverged at iteration 11" in msg and "loss_a=" in msg and "loss_b=" not in msg
  assert "20x its running median" in msg
  assert f"last good checkpoint is step 8 in {os.path.join(wd, 'checkpoints')}" in msg
  assert "lr 0.05 × batch 2/16 = 0.00625" in msg and "optim.base_lr" in msg
  assert err.last_checkpoint == 8 and err.lr == pytest.approx(0.00625 * 0.1)  # x0.1 from step 3
  ck = ckpt_lib.Checkpointer(wd)
  # step 10 (the state after suspect iteration 9) came due but was never written
  assert ck.all_steps() == [2, 4, 6, 8]
  ck.close()


def test_divergence_guard_defers_checkpoints_over_a_spike(tmp_path):
  """A 2-iteration spike (< patience) does not stop training; the checkpoint due during it is
  written at the first normal iteration instead (step 10 rather than 8)."""
  model = TinyDet()
  wd = str(tmp_path / "spike")
  seen = {}
  state = loop.train(
      _guard_config(checkpoint_every=4, keep_checkpoints=10),
      wd,
      model,
      init_fn(model),
      _loader(boost_at=(7, 8)),
      frozen_prefixes=FROZEN_PREFIXES,
      metrics_callback=lambda s, m: seen.__setitem__(s, m),
  )
  assert int(state.step) == 20 and sorted(seen) == list(range(1, 21))
  assert seen[8]["loss_a"] > 1e3 * seen[7]["loss_a"]  # iteration 7 really exploded
  ck = ckpt_lib.Checkpointer(wd)
  assert ck.all_steps() == [4, 10, 12, 16, 20]
  ck.close()


def test_schema_declares_guard_and_lr_scaling_keys():
  """The strict config schema knows the new keys, with the engine's defaults."""
  from cn2_jax.config import base_config, validate_config

  c = validate_config(base_config())
  for k in loop._LOOP_KEYS:
    assert k in c.train, k
  assert c.optim.reference_batch_size == 16
  c.train.divergence_factr = 3.0
  with pytest.raises(KeyError, match="divergence_factr"):
    validate_config(c)


def test_global_norm_clipping_matches_numpy():
  """optim.clip_norm (MMDet's grad_clip max_norm): one global L2 norm over all gradients."""
  optim_lib = optim
  cfg = ml_collections.ConfigDict(base_config().optim.to_dict())
  cfg.clip_value, cfg.clip_norm, cfg.momentum, cfg.weight_decay = 0.0, 3.0, 0.0, 0.0
  cfg.warmup_iters, cfg.base_lr, cfg.reference_batch_size = 0, 1.0, 0
  params = {"a": jnp.ones((3,)), "b": {"kernel": jnp.ones((2, 2))}}
  grads = {"a": jnp.array([3.0, 4.0, 0.0]), "b": {"kernel": jnp.full((2, 2), 6.0)}}
  opt = optim_lib.make_optimizer(cfg)
  updates, _ = opt.update(grads, opt.init(params), params)
  g = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(grads)])
  want = g * min(1.0, 3.0 / np.linalg.norm(g))  # numpy reference; lr 1 -> update = -grad
  got = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(updates)])
  np.testing.assert_allclose(got, -want, rtol=1e-6)
  cfg.clip_norm = 0.0  # off: the state keeps the plain multi_transform structure
  off_state = optim_lib.make_optimizer(cfg).init(params)
  on_state = opt.init(params)  # chain(clip, multi_transform) -> (EmptyState, multi state)
  assert isinstance(on_state, tuple) and type(off_state) is type(on_state[1])


# ------------------------------------------------------------------------------------------------
# Disk full during an asynchronous checkpoint save
# ------------------------------------------------------------------------------------------------
def _small_fs(path):
  """A 64 MiB tmpfs at `path` (root only); None where mounting is not allowed."""
  os.makedirs(path, exist_ok=True)
  if os.geteuid() != 0:
    return None
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", path], capture_output=True)
  return path if r.returncode == 0 else None


def test_disk_full_stops_with_one_line_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  import errno
  import orbax.checkpoint as ocp

  model = TinyDet()
  mnt = str(tmp_path / "mnt")
  fs = _small_fs(mnt)
  wd = os.path.join(mnt, "run")

  def fill_disk(step, _):
    if step != 3:
      return
    if fs is not None:  # the real thing: fill the filesystem before the save of step 4
      import time

      deadline = time.time() + 60  # the asynchronous save of step 2 finishes first
      while not os.path.isdir(os.path.join(wd, "checkpoints", "2")) and time.time() < deadline:
        time.sleep(0.05)
      try:  # ENOSPC may come at the open already (tmpfs pages are memory: a loaded machine)
        with open(os.path.join(mnt, "filler"), "wb") as f:
          while True:
            f.write(b"\0" * 65536)
      except OSError:
        pass
    else:  # no mount permission: the next save fails as a full disk makes it fail
      real_save = ocp.CheckpointManager.save

      def no_space(self, step, *a, **k):
        if step == 4:
          raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *a, **k)

      monkeypatch.setattr(ocp.CheckpointManager, "save", no_space)

  try:
    with pytest.raises(ckpt_lib.CheckpointSaveError) as ei:
      loop.train(
          _config(max_iter=8, checkpoint_every=2, log_every=100),
          wd,
          model,
          init_fn(model),
          _loader(),
          frozen_prefixes=FROZEN_PREFIXES,
          metrics_callback=fill_disk,
      )
    msg = str(ei.value)
    assert "\n" not in msg and "step 4" in msg and "last good checkpoint is step 2" in msg
    assert "No space left" in msg or "ENOSPC" in msg or "Errno 28" in msg, msg
    monkeypatch.undo()
    if fs is not None and os.path.exists(os.path.join(mnt, "filler")):
      os.remove(os.path.join(mnt, "filler"))
    ck = ckpt_lib.Checkpointer(wd)  # a restart: unfinished save folders are removed
    assert ck.all_steps() == [2]
    assert not [n for n in os.listdir(ck.directory) if ckpt_lib.TMP_MARK in n]
    ck.close()
  finally:
    if fs is not None:
      subprocess.run(["umount", "-l", mnt], capture_output=True)
