"""The one-stage family (arch "onestage") through the engine and the app: config sub-schema,
trainable BatchNorm carried in the train state (per-device and SyncBN over 1 vs 2 devices), exact
resume with BN statistics, eval / predict / Predictor on the same `main.py` path as CenterNet2."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import optax
import pytest

from cn2_jax.config import ConfigError, base_config, validate_config
from cn2_jax.engine import optim
from cn2_jax.engine import step as step_lib
from cn2_jax.modeling import detector

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**onestage):
  c = base_config()
  c.model.arch = "onestage"
  c.model.num_classes = 3
  c.model.resnet_depth = 18
  c.model.resnet_width = 8
  c.model.onestage.deconv_channels = (16, 8, 8)
  c.model.onestage.max_detections = 10
  for k, v in onestage.items():
    c.model.onestage[k] = v
  c.optim.warmup_iters = 0
  c.optim.clip_value = 0.0
  c.optim.reference_batch_size = 0
  c.optim.base_lr = 0.05
  return validate_config(c)


def tiny_batch(b=4, hw=(64, 64)):
  """Two boxes in every image (equal positives per device on a 2-device split)."""
  rng = np.random.default_rng(0)
  h, w = hw
  image = rng.integers(0, 255, (b, h, w, 3), dtype=np.uint8)
  boxes = np.zeros((b, 4, 4), np.float32)
  boxes[:, 0] = [4, 6, 28, 30]
  boxes[:, 1] = [34, 30, 60, 58]
  boxes[:, :2] += rng.uniform(-2, 2, (b, 2, 4)).astype(np.float32)
  valid = np.zeros((b, 4), bool)
  valid[:, :2] = True
  classes = np.tile(np.array([[0, 2, 0, 0]], np.int32), (b, 1))
  classes[1, 0] = 1
  return dict(
      image=image,
      image_hw=np.tile(np.array([[h, w]], np.int32), (b, 1)),
      gt_boxes=boxes,
      gt_classes=classes,
      gt_valid=valid,
  )


def test_family_sub_schema():
  c = tiny_config()
  c.model.fpn_channels = 64  # a CenterNet2 setting: silently ignored would be a bug
  with pytest.raises(ConfigError, match="model.fpn_channels is a setting of the 'centernet2'"):
    validate_config(c)
  c = base_config()
  c.model.onestage.use_deform = False
  with pytest.raises(ConfigError, match="model.onestage.use_deform"):
    validate_config(c)
  c = tiny_config()
  c.model.onestage.norm_wh = "bogus"
  with pytest.raises(ValueError, match="norm_wh"):
    validate_config(c)


def test_variables_and_weight_decay_groups():
  cfg = tiny_config()
  v = detector.abstract_variables(cfg.model)
  assert set(v) == {"params", "batch_stats"}
  assert detector.frozen_param_prefixes(cfg.model) == ()
  from cn2_jax.engine.loop import _with_batchnorm_params

  fn = _with_batchnorm_params(
      optim.is_norm_param, detector.init_fn(detector.build_model(cfg.model))
  )
  labels = optim.param_labels(v["params"], (), fn)
  flat = {optim.path_str(k): l for k, l in jax.tree_util.tree_flatten_with_path(labels)[0]}
  bn = [p for p in flat if p.startswith("backbone.stem.conv1.norm.")]
  assert bn and all(flat[p] == optim.NO_DECAY for p in bn)
  assert flat["backbone.stem.conv1.kernel"] == optim.DECAY
  n_stats = len(jax.tree.leaves(v["batch_stats"]))
  assert sum(l == optim.NO_DECAY for l in flat.values()) == n_stats  # scale+bias per mean+var


def _state_and_step(cfg, mesh):
  model = detector.build_model(cfg.model)
  tx = optim.make_optimizer(cfg.optim, None, ())
  state = step_lib.init_train_state(detector.init_fn(model), tx, jax.random.PRNGKey(0), mesh)
  return model, tx, state, step_lib.make_train_step(model, tx, mesh)


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _reference_per_device_step(model, tx, state, batch, n):
  """pmap semantics written out on one device: each of `n` shards normalises BatchNorm and its
  losses on its own images; gradients and running statistics are averaged."""
  grads, stats, losses = [], [], []
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  for i in range(n):
    shard = {k: v[i * len(v) // n : (i + 1) * len(v) // n] for k, v in batch.items()}

    def loss_fn(p):
      out, upd = model.apply({**variables, "params": p}, shard, train=True, mutable=["batch_stats"])
      return step_lib.total_loss(out), upd["batch_stats"]

    (loss, st), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads.append(g)
    stats.append(st)
    losses.append(loss)
  g = jax.tree.map(lambda *x: sum(x) / n, *grads)
  st = jax.tree.map(lambda *x: sum(x) / n, *stats)
  upd, _ = tx.update(g, state.opt_state, state.params)
  return optax.apply_updates(state.params, upd), st, float(sum(losses) / n)


def _multi_device_main():
  """Runs in a subprocess with 2 CPU devices; prints one RESULT json line."""
  assert jax.device_count() == 2
  mesh1 = step_lib.make_mesh(jax.devices()[:1])
  mesh2 = step_lib.make_mesh()
  batch = tiny_batch()
  res = {}
  out = {}
  for sync in (True, False):
    cfg = tiny_config(sync_bn=sync, use_deform=False)  # BN is under test; DCN compiles slowly
    for n, mesh in ((1, mesh1), (2, mesh2)):
      model, tx, state, fn = _state_and_step(cfg, mesh)
      state0 = jax.device_get(state)
      state, m = fn(state, step_lib.shard_batch(batch, mesh))
      out[sync, n] = jax.device_get((state.params, state.batch_stats, m["total_loss"]))
    # per-device reference on one device, from the same initial state
    ref = _reference_per_device_step(model, tx, state0, batch, 2 if not sync else 1)
    out[sync, "ref"] = ref
    res[f"moved_{sync}"] = float(np.abs(_flat(out[sync, 2][1]) - _flat(state0.batch_stats)).max())

  def diff(a, b):
    return float(np.abs(_flat(a) - _flat(b)).max())

  res["sync_params"] = diff(out[True, 1][0], out[True, 2][0])
  res["sync_stats"] = diff(out[True, 1][1], out[True, 2][1])
  res["sync_loss"] = abs(float(out[True, 1][2]) - float(out[True, 2][2]))
  res["sync_ref_params"] = diff(out[True, "ref"][0], out[True, 1][0])
  res["perdev_params"] = diff(out[False, "ref"][0], out[False, 2][0])
  res["perdev_stats"] = diff(out[False, "ref"][1], out[False, 2][1])
  res["perdev_loss"] = abs(out[False, "ref"][2] - float(out[False, 2][2]))
  res["perdev_vs_sync_stats"] = diff(out[False, 2][1], out[True, 2][1])
  print("RESULT" + json.dumps(res))


@pytest.fixture(scope="module")
def multi_device_result():
  from tests.multidevice import run_on_two_devices

  return run_on_two_devices("tests.test_onestage_train", "_multi_device_main")


def test_two_devices_batchnorm(multi_device_result):
  r = multi_device_result
  assert r["moved_True"] > 1e-3 and r["moved_False"] > 1e-3  # running statistics were updated
  # SyncBN: a 2-device step equals the 1-device step on the same global batch
  # (float32 reductions in another order: params move by ~0.05 here, so 1e-5 is ~2e-4 relative)
  assert r["sync_params"] < 1e-5 and r["sync_stats"] < 1e-5 and r["sync_loss"] < 1e-5, r
  assert r["sync_ref_params"] < 1e-5, r
  # per-device BN: equals the pmap semantics written out (statistics per device, then averaged)
  assert r["perdev_params"] < 1e-5 and r["perdev_stats"] < 1e-5 and r["perdev_loss"] < 1e-5, r
  assert r["perdev_vs_sync_stats"] > 1e-4, r  # and really differs from SyncBN


# ------------------------------------------------------------------------------------------------
# main.py path: train -> checkpoint -> resume (BN statistics) -> eval -> predict -> Predictor
# ------------------------------------------------------------------------------------------------
def small_demo_config():
  from cn2_jax.config import load_config_file

  c = load_config_file(os.path.join(ROOT, "configs", "centernet_demo.py"))
  c.model.resnet_width = 8
  c.model.onestage.deconv_channels = (16, 8, 8)
  c.model.onestage.use_deform = False
  c.data.synthetic_num_train = 8
  c.data.synthetic_num_val = 4
  c.data.min_size_train = (128,)
  c.data.max_size_train = 128
  c.data.min_size_test = 128
  c.data.max_size_test = 128
  c.data.pad_hw_train = (128, 128)
  c.data.pad_hw_test = (128, 128)
  c.train.batch_size = 2
  c.train.eval_batch_size = 4
  c.train.log_every = 2
  c.train.checkpoint_every = 2
  c.optim.max_iter = 4
  c.optim.warmup_iters = 2
  c.optim.steps = (3,)
  return validate_config(c)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fast_compile):
  from cn2_jax import app

  root = tmp_path_factory.mktemp("onestage_runs")
  cfg = small_demo_config()
  cfg.data.root = str(root / "synthetic")
  cfg.data.data_dir = str(root / "tfds")
  cfg.train.eval_at_end = False
  full, resumed = {}, {}
  state_full, _ = app.train(cfg, str(root / "full"), metrics_callback=full.__setitem__)
  wd = str(root / "resumed")
  app.train(cfg, wd, stop_at_step=2, metrics_callback=resumed.__setitem__)
  cfg.train.eval_at_end = True
  state, metrics = app.train(cfg, wd, metrics_callback=resumed.__setitem__)
  return cfg, wd, full, resumed, metrics, jax.device_get(state_full), jax.device_get(state)


def test_resume_is_exact_with_batchnorm_statistics(runs):
  _, wd, full, resumed, _, state_full, state = runs
  assert sorted(full) == sorted(resumed) == [1, 2, 3, 4]
  for step in (3, 4):
    for k in ("total_loss", "loss_cls", "loss_box_wh", "loss_off_reg"):
      assert resumed[step][k] == pytest.approx(full[step][k], rel=1e-6, abs=1e-7), (step, k)
  assert jax.tree.leaves(state.batch_stats)
  np.testing.assert_allclose(_flat(state.batch_stats), _flat(state_full.batch_stats), rtol=1e-6)
  np.testing.assert_allclose(_flat(state.params), _flat(state_full.params), rtol=1e-6, atol=1e-7)
  # the running statistics left their initial values (mean 0, var 1)
  assert np.abs(_flat(state.batch_stats["backbone"]["stem"]["conv1"]["norm"])).max() > 1e-3


def test_eval_predict_and_predictor(runs):
  from cn2_jax import app
  from cn2_jax.predictor import Predictor

  cfg, wd, _, _, metrics, _, state = runs
  with open(os.path.join(wd, "eval", "metrics.json")) as f:
    assert json.load(f)["AP"] == pytest.approx(metrics["AP"])
  # eval restores {'params', 'batch_stats'} from the checkpoint: same metrics as the live state
  again = app.evaluate(cfg, wd)
  assert again["AP"] == pytest.approx(metrics["AP"])
  images = sorted(
      os.path.join(dp, f)
      for dp, _, fs in os.walk(cfg.data.root)
      for f in fs
      if f.endswith((".png", ".jpg"))
  )[:2]
  results = app.predict(cfg, wd, images)
  assert len(results) == 2 and all(os.path.isfile(r["drawn"]) for r in results)
  det = Predictor.from_workdir(wd)(images[0])
  assert det["boxes"].ndim == 2 and det["boxes"].shape[1] == 4
  assert len(det["scores"]) == len(det["classes"]) == len(det["class_names"])
  # eval / predict restore the running statistics of the last checkpoint
  from cn2_jax.weights.loading import restore_model_variables

  restored = restore_model_variables(cfg, wd)
  assert set(restored) == {"params", "batch_stats"}
  np.testing.assert_array_equal(_flat(restored["batch_stats"]), _flat(state.batch_stats))
