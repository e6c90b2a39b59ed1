"""Memory levers of the train step: gradient accumulation (`train.grad_accum_steps`,
engine/step.py) and rematerialisation (`model.remat`).

* CenterNet2 (no trainable BatchNorm): k = 2 micro-batches of 2 images equal one batch of 4 in the
  losses, the gradients and the update (1e-5), the batch-wide CenterNet normalisers (images with
  different numbers of positives) and the per-image ROI sampling keys included; one compile.
* one-stage centerX (trainable BatchNorm, per-device statistics): k micro-batches equal k devices
  (statistics and loss normalisers per micro-batch, the running statistics averaged), written out
  on one device.
* `model.remat` leaves the gradients unchanged and really rematerialises (checkpoint regions in
  the traced gradient), for both families.
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cn2_jax.config import ConfigError, validate_config
from cn2_jax.engine import optim
from cn2_jax.engine import step as step_lib
from cn2_jax.modeling import detector
from tests import test_detector, test_onestage_train

TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
  """XLA compile time dominates these tiny models (see conftest.fast_compile)."""


def recording(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` between two transformations whose state is what they were last given: the step's
  averaged gradient (`state.opt_state[0]`) and the update `tx` made of it (`state.opt_state[2]`)."""
  keep = optax.GradientTransformation(
      lambda params: jax.tree.map(jnp.zeros_like, params), lambda g, state, params=None: (g, g)
  )
  return optax.chain(keep, tx, keep)


def assert_trees_close(a, b, what, relative=False):
  """Leaf by leaf: max |a - b| <= TOL x max(max |a|, 1) (float32 sums in another order);
  `relative`: <= TOL x max(max |a|, 1e-2 x the largest |a| of the tree), for optimizer updates,
  far below 1 (the gradient of a bias just before a GroupNorm / BatchNorm is 0 but for rounding
  noise, which only the second bound covers)."""
  assert jax.tree.structure(a) == jax.tree.structure(b), what
  largest = max((float(np.abs(x).max(initial=0.0)) for x in jax.tree.leaves(a)), default=0.0)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = float(np.abs(x).max(initial=0.0))
    scale = max(scale, 1e-2 * largest) if relative else max(scale, 1.0)
    err = float(np.abs(x - y).max(initial=0.0))
    assert err <= TOL * scale, f"{what} {jax.tree_util.keystr(path)}: {err} > {TOL} x {scale}"


# ------------------------------------------------------------------------------------------------
# CenterNet2: k x b == one batch of k.b
# ------------------------------------------------------------------------------------------------
def centernet2_config():
  cfg = test_detector.tiny_config()
  # every image fills its ROI quota, so each micro-batch normalises the ROI losses by as many
  # sampled rows as half of the whole batch (the condition of k x b == k.b, engine/step.py)
  cfg.model.roi_heads.batch_size_per_image = 8
  cfg.optim.warmup_iters = 0
  # no element-wise clipping: the update is then linear in the gradient, and compared as such
  cfg.optim.clip_value = 0.0
  return cfg


def centernet2_batch(seed: int):
  """4 images on one canvas with 2, 2, 1, 1 boxes: the two micro-batches have different numbers
  of CenterNet positives, so only the whole batch's normaliser (`data_parallel.device_mean`)
  gives the one-batch losses; and their images need distinct ROI sampling keys."""
  b = test_detector.tiny_batch(b=4, seed=seed)
  b["gt_valid"][2:, 1] = False
  return {k: b[k] for k in ("image", "image_hw", "gt_boxes", "gt_classes", "gt_valid")}


def _train(cfg, model, k, batches):
  """Steps over `batches` from the same initial state with `grad_accum_steps=k`; returns (per-step
  metrics, per-step averaged gradients, per-step optimizer updates, the jitted step)."""
  mesh = step_lib.make_mesh(jax.devices()[:1])
  prefixes = detector.frozen_param_prefixes(cfg.model)
  tx = recording(optim.make_optimizer(cfg.optim, None, prefixes))
  state = step_lib.init_train_state(detector.init_fn(model), tx, jax.random.PRNGKey(0), mesh)
  fn = step_lib.make_train_step(model, tx, mesh, frozen_prefixes=prefixes, grad_accum_steps=k)
  metrics, grads, updates = [], [], []
  for batch in batches:
    state, m = fn(state, step_lib.shard_batch(batch, mesh))
    metrics.append(jax.device_get(m))
    grads.append(jax.device_get(state.opt_state[0]))
    updates.append(jax.device_get(state.opt_state[2]))
  return metrics, grads, updates, fn


@pytest.fixture(scope="module")
def centernet2_runs():
  cfg = centernet2_config()
  model = detector.build_model(cfg.model)
  batches = [centernet2_batch(0), centernet2_batch(1)]
  return {k: _train(cfg, model, k, batches) for k in (1, 2)}


def test_centernet2_accumulation_equals_one_batch(centernet2_runs):
  (m1, g1, u1, _), (m2, g2, u2, fn) = centernet2_runs[1], centernet2_runs[2]
  for step, (a, b) in enumerate(zip(m1, m2)):
    assert set(a) == set(b)
    for key in a:
      np.testing.assert_allclose(b[key], a[key], rtol=TOL, atol=TOL, err_msg=f"{step} {key}")
    assert_trees_close(g1[step], g2[step], f"gradient of step {step}")
    assert_trees_close(u1[step], u2[step], f"update of step {step}", relative=True)
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(g1[0])) > 1e-3  # gradients flow
  assert fn._cache_size() == 1  # both steps ran the one compiled program


def test_batch_not_divisible_by_micro_batches():
  cfg = centernet2_config()
  model = detector.build_model(cfg.model)
  mesh = step_lib.make_mesh(jax.devices()[:1])
  tx = optim.make_optimizer(cfg.optim, None, ())
  fn = step_lib.make_train_step(model, tx, mesh, grad_accum_steps=3)
  batch = jax.tree.map(jnp.asarray, centernet2_batch(0))
  state = jax.eval_shape(
      step_lib.make_train_state_fn(detector.init_fn(model), tx), jnp.zeros(2, jnp.uint32)
  )
  with pytest.raises(ValueError, match=r"1 device\(s\) of the 'data' mesh axis x 3 micro-batches"):
    fn.lower(state, batch)
  with pytest.raises(ValueError, match="grad_accum_steps must be >= 1"):
    step_lib.make_train_step(model, tx, mesh, grad_accum_steps=0)


@pytest.mark.parametrize(
    "steps,batch_size,message",
    [(0, 4, "integer >= 1"), (-2, 4, "integer >= 1"), (3, 4, "divisible by train.grad_accum")],
)
def test_grad_accum_config_checks(steps, batch_size, message):
  cfg = centernet2_config()
  cfg.train.grad_accum_steps = steps
  cfg.train.batch_size = batch_size
  with pytest.raises(ConfigError, match=message):
    validate_config(cfg)


# ------------------------------------------------------------------------------------------------
# one-stage (trainable BatchNorm): k micro-batches == k devices
# ------------------------------------------------------------------------------------------------
def _micro_batches_written_out(model, tx, state, batch, k):
  """What k micro-batches must equal: k "devices" on one device, each normalising BatchNorm and
  its losses on its own images from the same running statistics; losses, gradients and updated
  statistics averaged, one update."""
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  outs = []
  for j in range(k):
    part = {key: v[j * len(v) // k : (j + 1) * len(v) // k] for key, v in batch.items()}

    def loss_fn(p, part=part):
      out, upd = model.apply({**variables, "params": p}, part, train=True, mutable=["batch_stats"])
      return step_lib.total_loss(out), (out, upd["batch_stats"])

    outs.append(jax.value_and_grad(loss_fn, has_aux=True)(state.params))
  mean = lambda *xs: sum(xs) / k  # noqa: E731
  total = mean(*[o[0][0] for o in outs])
  losses = jax.tree.map(mean, *[o[0][1][0] for o in outs])
  stats = jax.tree.map(mean, *[o[0][1][1] for o in outs])
  grads = jax.tree.map(mean, *[o[1] for o in outs])
  update, _ = tx.update(grads, state.opt_state, state.params)
  return total, losses, stats, grads, update


@pytest.mark.parametrize("sync_bn", [False, True])
def test_onestage_accumulation_equals_devices(sync_bn):
  cfg = test_onestage_train.tiny_config(sync_bn=sync_bn, use_deform=False)
  model = detector.build_model(cfg.model)
  mesh = step_lib.make_mesh(jax.devices()[:1])
  tx = recording(optim.make_optimizer(cfg.optim, None, ()))
  state0 = step_lib.init_train_state(detector.init_fn(model), tx, jax.random.PRNGKey(0), mesh)
  state0 = jax.device_get(state0)
  batch = test_onestage_train.tiny_batch(b=4)
  batch["gt_valid"][2:, 1] = False  # the micro-batches have different positives
  fn = step_lib.make_train_step(model, tx, mesh, grad_accum_steps=2)
  state, m = fn(step_lib.replicate(state0, mesh), step_lib.shard_batch(batch, mesh))
  state, m = jax.device_get((state, m))
  total, losses, stats, grads, update = _micro_batches_written_out(model, tx, state0, batch, 2)
  np.testing.assert_allclose(m["total_loss"], total, rtol=TOL)
  for key, value in losses.items():
    np.testing.assert_allclose(m[key], value, rtol=TOL, atol=TOL, err_msg=key)
  assert_trees_close(grads, state.opt_state[0], "gradient")
  assert_trees_close(stats, state.batch_stats, "running statistics")
  assert_trees_close(update, state.opt_state[2], "update", relative=True)
  moved = np.abs(
      test_onestage_train._flat(state.batch_stats) - test_onestage_train._flat(state0.batch_stats)
  ).max()
  assert moved > 1e-3  # the running statistics were updated


# ------------------------------------------------------------------------------------------------
# model.remat: same gradients, really rematerialised
# ------------------------------------------------------------------------------------------------
def _checkpoint_regions(jaxpr) -> int:
  """Number of `jax.checkpoint` (remat) equations, nested ones included."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name in ("checkpoint", "remat2")
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      n += _checkpoint_regions(sub)
  return n


def _loss_and_grads(cfg, batch, remat):
  """((loss, updated batch_stats), gradient) of one training forward, and the number of
  rematerialised regions in the forward."""
  cfg.model.remat = remat
  model = detector.build_model(cfg.model)
  variables = jax.jit(detector.init_fn(model))(jax.random.PRNGKey(0))
  params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}
  bn = "batch_stats" in rest

  def loss_fn(p):
    out = model.apply(
        {"params": p, **rest},
        batch,
        train=True,
        rngs={"sampling": jax.random.PRNGKey(1)},
        mutable=["batch_stats"] if bn else False,
    )
    losses, stats = out if bn else (out, {})
    return step_lib.total_loss(losses), stats

  fn = jax.value_and_grad(loss_fn, has_aux=True)
  regions = _checkpoint_regions(jax.make_jaxpr(loss_fn)(params).jaxpr)
  return jax.device_get(jax.jit(fn)(params)), regions


@pytest.mark.parametrize("family", ["centernet2", "onestage"])
def test_remat_leaves_gradients_unchanged(family):
  if family == "centernet2":
    # R18: res3..res5 trained (freeze_at 2), 2 basic blocks each, + 3 cascade stages
    batch = {k: v[:2] for k, v in centernet2_batch(0).items()}
    cfg, regions = centernet2_config(), 3 * 2 + 3
  else:
    # R18, nothing frozen: the stem + 4 stages x 2 blocks
    cfg = test_onestage_train.tiny_config(use_deform=False)
    batch, regions = test_onestage_train.tiny_batch(b=2), 1 + 4 * 2
  (plain, plain_regions), (remat, remat_regions) = (
      _loss_and_grads(cfg, batch, remat) for remat in (False, True)
  )
  assert plain_regions == 0 and remat_regions == regions, (plain_regions, remat_regions)
  (loss0, stats0), grads0 = plain
  (loss1, stats1), grads1 = remat
  np.testing.assert_allclose(loss1, loss0, rtol=TOL)
  assert_trees_close(grads0, grads1, "gradient")
  assert_trees_close(stats0, stats1, "running statistics")


def test_micro_batch_context_checks_the_replayed_calls():
  """The replayed pass must make exactly the recorded `device_mean` calls (same count, shapes)."""
  from cn2_jax.modeling import data_parallel

  with pytest.raises(ValueError, match="not both"):
    with data_parallel.micro_batch(0, 2, record=True, replay=()):
      pass
  with pytest.raises(ValueError, match="1 recorded device_mean value"):
    with data_parallel.micro_batch(0, 2, replay=(jnp.float32(3.0),)):
      pass  # the model made no call
  with data_parallel.micro_batch(1, 2, replay=(jnp.float32(3.0),)):
    assert float(data_parallel.device_mean(jnp.float32(5.0), "data")) == 3.0
    with pytest.raises(ValueError, match="more device_mean calls"):
      data_parallel.device_mean(jnp.float32(5.0), "data")
  assert float(data_parallel.device_mean(jnp.float32(5.0), None)) == 5.0  # no axis: the value
