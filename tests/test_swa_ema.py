"""SWA and EMA (cn2_jax/engine/swa.py) on the tiny one-stage model (trainable BatchNorm): the SWA
running mean and the EMA against numpy, the BatchNorm recompute against statistics computed
directly, exact resume inside the SWA phase, eval / restore with the EMA weights, checkpoints of
runs without them."""

from __future__ import annotations

import math
import os

import jax
import numpy as np
import pytest

from cn2_jax.config import ConfigError, validate_config
from cn2_jax.engine import checkpoint as ckpt_lib
from cn2_jax.engine import loop
from cn2_jax.engine import optim
from cn2_jax.engine import step as step_lib
from cn2_jax.engine import swa as swa_lib
from cn2_jax.modeling import detector
from tests.test_onestage_train import tiny_batch, tiny_config

MAX_ITER, SWA_ITERS, PERIOD, BN_BATCHES = 3, 4, 2, 2
FINAL = MAX_ITER + SWA_ITERS  # snapshots after steps 5 and 7
DECAY = 0.9


def _config(**swa):
  cfg = tiny_config(use_deform=False)
  cfg.seed = 0
  cfg.optim.max_iter = MAX_ITER
  cfg.optim.steps = (100,)
  cfg.optim.base_lr = 0.02
  cfg.train.update(
      dict(
          batch_size=2,
          log_every=1,
          checkpoint_every=100,
          keep_checkpoints=5,
          progress_bar=False,
          async_checkpoint=False,
      )
  )
  cfg.ema.decay = DECAY
  cfg.swa.update(dict(iters=SWA_ITERS, period=PERIOD, lr_start=0.01, bn_batches=BN_BATCHES, **swa))
  return validate_config(cfg)


def _batch(k):
  """Loader batch k: different images per k (BatchNorm statistics differ)."""
  b = tiny_batch(b=2)
  b["image"] = np.random.default_rng(100 + k).integers(0, 255, b["image"].shape, dtype=np.uint8)
  return b


def _loader(start):
  k = start
  while True:
    yield _batch(k)
    k += 1


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def test_config_and_schedule():
  cfg = _config()
  for key, bad in (("ema.decay", 1.0), ("swa.period", 0), ("swa.lr_sched", "step")):
    c = _config()
    c[key.split(".")[0]][key.split(".")[1]] = bad
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
      validate_config(c)
  assert swa_lib.total_iters(cfg, 10) == 10 + SWA_ITERS
  base = lambda step: 0.5 + 0 * step  # noqa: E731
  const = swa_lib.swa_schedule(base, cfg, 10)
  assert [float(const(s)) for s in (0, 9, 10, 13)] == pytest.approx([0.5, 0.5, 0.01, 0.01])
  cfg.swa.lr_sched, cfg.swa.eta_min, cfg.swa.period = "cosine", 1e-4, 4
  cos = swa_lib.swa_schedule(base, cfg, 10)
  # torch CosineAnnealingWarmRestarts(T_0=4, eta_min), restarting every 4 iterations
  want = [1e-4 + (0.01 - 1e-4) * (1 + math.cos(math.pi * (t % 4) / 4)) / 2 for t in range(9)]
  np.testing.assert_allclose([float(cos(10 + t)) for t in range(9)], want, rtol=1e-5)
  cfg.swa.iters = 0
  assert swa_lib.swa_schedule(base, cfg, 10) is base  # off: the base schedule itself


def test_swa_counts_in_epochs():
  """With optim.epochs > 0, swa.iters / swa.period are epochs (centerX SWA.ITER / SWA.PERIOD)."""
  cfg = _config()
  assert swa_lib.in_iterations(cfg, 7) is cfg  # a schedule in iterations: as written
  cfg.optim.epochs = 2.0
  cfg.optim.steps = (1,)
  cfg.optim.warmup_iters = 0
  res = swa_lib.in_iterations(cfg, 7)
  assert (res.swa.iters, res.swa.period) == (SWA_ITERS * 7, PERIOD * 7)
  assert (cfg.swa.iters, cfg.swa.period) == (SWA_ITERS, PERIOD)  # the input is not changed
  assert swa_lib.total_iters(res, 14) == 14 + SWA_ITERS * 7
  cfg.swa.iters = 0
  assert swa_lib.in_iterations(cfg, 7) is cfg  # off


def _loop_tx(cfg, model, max_iter=MAX_ITER):
  """The optimizer exactly as `loop.train` builds it (BN params without decay, SWA LR)."""
  init = detector.init_fn(model)
  schedule = swa_lib.swa_schedule(optim.make_lr_schedule(cfg.optim, 2), cfg, max_iter)
  no_decay = loop._with_batchnorm_params(optim.is_norm_param, init)
  tx = optim.make_optimizer(cfg.optim, None, (), no_decay, batch_size=2, schedule=schedule)
  return tx, schedule


@pytest.fixture(scope="module")
def straight(fast_compile):
  """FINAL updates run by hand through the train step (= loop.train before the SWA finalize)."""
  cfg = _config()
  mesh = step_lib.make_mesh()
  model = detector.build_model(cfg.model)
  tx, schedule = _loop_tx(cfg, model)
  state = step_lib.init_train_state(detector.init_fn(model), tx, jax.random.PRNGKey(0), mesh)
  state = swa_lib.add_averages(cfg, state, mesh)
  records = [jax.device_get((state.params, state.batch_stats, state.ema))]
  fn = step_lib.make_train_step(
      model, tx, mesh, lr_schedule=schedule, post_update=swa_lib.make_post_update(cfg, MAX_ITER)
  )
  metrics = {}
  for k in range(FINAL):
    state, m = fn(state, step_lib.shard_batch(_batch(k), mesh))
    metrics[k + 1] = jax.device_get(m)
    records.append(jax.device_get((state.params, state.batch_stats, state.ema)))
  return cfg, jax.device_get(state), records, metrics


def test_swa_mean_and_ema_formula(straight):
  """The SWA buffer is the mean of the period snapshots; the EMA follows ema = d ema + (1 - d) p
  with d = min(decay, (1 + t) / (10 + t)) (params and batch_stats)."""
  cfg, state, records, _ = straight
  p0, bs0, e0 = records[0]
  np.testing.assert_array_equal(_flat(e0["params"]), _flat(p0))
  ema_p, ema_bs = _flat(p0), _flat(bs0)
  snaps = []
  for k in range(FINAL):
    p, bs, e = _flat(records[k + 1][0]), _flat(records[k + 1][1]), records[k + 1][2]
    d = min(DECAY, (1 + k) / (10 + k))
    ema_p, ema_bs = d * ema_p + (1 - d) * p, d * ema_bs + (1 - d) * bs
    np.testing.assert_allclose(_flat(e["params"]), ema_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_flat(e["batch_stats"]), ema_bs, rtol=1e-5, atol=1e-6)
    if k + 1 > MAX_ITER and (k + 1 - MAX_ITER) % PERIOD == 0:
      snaps.append(p)
  assert len(snaps) == 2 and int(state.swa["n"]) == 2
  np.testing.assert_allclose(_flat(state.swa["params"]), np.mean(snaps, 0), rtol=1e-5, atol=1e-7)
  assert np.abs(snaps[0] - snaps[1]).max() > 1e-4  # the snapshots really differ
  # eval uses the EMA weights when configured
  v = swa_lib.eval_variables(cfg, state)
  np.testing.assert_array_equal(_flat(v["params"]), _flat(state.ema["params"]))
  np.testing.assert_array_equal(_flat(v["batch_stats"]), _flat(state.ema["batch_stats"]))
  cfg = _config()
  cfg.ema.use_for_eval = False
  v = swa_lib.eval_variables(cfg, state)
  np.testing.assert_array_equal(_flat(v["params"]), _flat(state.params))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fast_compile):
  """loop.train stopped at 6 (inside the SWA phase, after one snapshot), then resumed."""
  root = tmp_path_factory.mktemp("swa_runs")
  cfg = _config()
  model = detector.build_model(cfg.model)
  init = detector.init_fn(model)
  hist = {}
  wd = str(root / "b")
  loop.train(cfg, wd, model, init, _loader, stop_at_step=6, metrics_callback=hist.__setitem__)
  b = loop.train(cfg, wd, model, init, _loader, metrics_callback=hist.__setitem__)
  return cfg, model, wd, jax.device_get(b), hist


def _restore(wd, cfg, model, step):
  mesh = step_lib.make_mesh()
  tx = optim.make_optimizer(cfg.optim, None, ())
  abstract = step_lib.abstract_train_state(detector.init_fn(model), tx, mesh)
  with ckpt_lib.Checkpointer(wd) as ck:
    return jax.device_get(swa_lib.restore_state(cfg, ck, abstract, step, mesh))


def test_resume_inside_swa_is_exact(straight, runs):
  _, ref, _, ref_metrics = straight
  cfg, model, wd, b, hist = runs
  assert int(b.step) == FINAL and sorted(hist) == list(range(1, FINAL + 1))
  for s in range(1, FINAL + 1):
    assert hist[s]["total_loss"] == pytest.approx(float(ref_metrics[s]["total_loss"]), rel=1e-6)
  # the SWA LR from max_iter on (metrics 'lr' of update k uses schedule(k))
  assert [hist[s]["lr"] for s in range(MAX_ITER + 1, FINAL + 1)] == pytest.approx([0.01] * 4)
  assert hist[MAX_ITER]["lr"] == pytest.approx(0.02)
  for name in ("ema", "swa"):
    np.testing.assert_allclose(
        _flat(getattr(b, name)), _flat(getattr(ref, name)), rtol=1e-6, atol=1e-7, err_msg=name
    )
  # final params = the SWA mean (of the snapshots after steps 5 and 7)
  assert int(b.swa["n"]) == 2
  np.testing.assert_array_equal(_flat(b.params), _flat(b.swa["params"]))
  np.testing.assert_allclose(_flat(b.params), _flat(ref.swa["params"]), rtol=1e-6, atol=1e-7)
  s6 = _restore(wd, cfg, model, 6)  # the stop inside the SWA phase: one snapshot
  assert int(s6.swa["n"]) == 1
  # the final checkpoint holds the averaged state with the recomputed statistics
  last = _restore(wd, cfg, model, FINAL)
  np.testing.assert_array_equal(_flat(last.params), _flat(b.params))
  np.testing.assert_array_equal(_flat(last.batch_stats), _flat(b.batch_stats))


def test_batchnorm_recomputed_for_the_averaged_weights(straight, runs):
  """The stem BatchNorm's (torchvision `bn1`) running statistics = the mean over loader batches
  FINAL, FINAL + 1 of the batch mean and unbiased variance of its input (the stem conv's output,
  recomputed from the sown normalised image) under the averaged weights."""
  _, ref, _, _ = straight
  _, model, _, b, _ = runs
  variables = {"params": b.params, "batch_stats": b.batch_stats}
  apply = jax.jit(
      lambda v, batch: model.apply(
          v,
          batch,
          train=True,
          rngs={"sampling": jax.random.PRNGKey(0)},
          capture_intermediates=True,
          mutable=["batch_stats", "intermediates"],
      )[1]
  )
  means, varis = [], []
  stem_conv = jax.jit(
      lambda image, kernel: jax.lax.conv_general_dilated(
          image, kernel, (2, 2), ((3, 3), (3, 3)), dimension_numbers=("NHWC", "HWIO", "NHWC")
      )
  )
  kernel = b.params["backbone"]["stem"]["conv1"]["kernel"]
  for k in range(FINAL, FINAL + BN_BATCHES):
    st = apply(variables, _batch(k))
    x = np.asarray(stem_conv(st["intermediates"]["input"][0], kernel), np.float64)
    x = x.reshape(-1, x.shape[-1])
    means.append(x.mean(0))
    varis.append(x.var(0, ddof=1))
  bn1 = b.batch_stats["backbone"]["stem"]["conv1"]["norm"]
  np.testing.assert_allclose(bn1["mean"], np.mean(means, 0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(bn1["var"], np.mean(varis, 0), rtol=1e-4, atol=1e-6)
  # every layer's statistics were replaced (differ from the running ones of the last step)
  for (path, new), old in zip(
      jax.tree_util.tree_flatten_with_path(b.batch_stats)[0], jax.tree.leaves(ref.batch_stats)
  ):
    assert np.abs(np.asarray(new) - np.asarray(old)).max() > 1e-6, jax.tree_util.keystr(path)


def test_restore_model_variables_uses_ema(runs):
  from cn2_jax.weights.loading import restore_model_variables

  cfg, _, wd, b, _ = runs
  v = restore_model_variables(cfg, wd)
  np.testing.assert_array_equal(_flat(v["params"]), _flat(b.ema["params"]))
  np.testing.assert_array_equal(_flat(v["batch_stats"]), _flat(b.ema["batch_stats"]))
  cfg = _config()
  cfg.ema.use_for_eval = False
  v = restore_model_variables(cfg, wd)
  np.testing.assert_array_equal(_flat(v["params"]), _flat(b.params))
  # --config.weights naming the run (from another workdir) follows the same EMA rule
  for weights in (wd, os.path.join(wd, "checkpoints")):
    cfg = _config()
    cfg.weights = weights
    v = restore_model_variables(cfg, "/nonexistent")
    np.testing.assert_array_equal(_flat(v["params"]), _flat(b.ema["params"]))
    cfg.ema.use_for_eval = False
    v = restore_model_variables(cfg, "/nonexistent")
    np.testing.assert_array_equal(_flat(v["params"]), _flat(b.params))


def test_checkpoints_without_averages(runs, tmp_path):
  """A checkpoint of a run with EMA / SWA off (no averages in it) resumes with them switched on
  (fresh averages), and a checkpoint with them resumes with them off."""
  cfg, model, wd, _, _ = runs
  off = _config()
  off.ema.decay, off.swa.iters = 0.0, 0
  s = _restore(wd, off, model, 6)  # averages on disk, off in the config: dropped
  assert not jax.tree.leaves(s.ema) and not jax.tree.leaves(s.swa)
  with ckpt_lib.Checkpointer(str(tmp_path), async_save=False) as ck:
    ck.save(6, s, force=True)
  mesh = step_lib.make_mesh()
  tx = optim.make_optimizer(cfg.optim, None, ())
  abstract = step_lib.abstract_train_state(detector.init_fn(model), tx, mesh)
  with ckpt_lib.Checkpointer(str(tmp_path)) as ck:
    r = jax.device_get(swa_lib.restore_state(cfg, ck, abstract, 6, mesh))
  np.testing.assert_array_equal(_flat(r.params), _flat(s.params))
  np.testing.assert_array_equal(_flat(r.ema["params"]), _flat(s.params))  # EMA starts at params
  assert int(r.swa["n"]) == 0
