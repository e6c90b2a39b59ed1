"""End to end through cn2_jax.app (what main.py runs): synthetic data -> train -> checkpoint ->
resume -> eval (COCO json + metrics) -> predict (json + PNGs), plus config/CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cn2_jax import app
from cn2_jax.config import load_config_file, validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_demo_config():
  c = load_config_file(os.path.join(REPO, "configs", "demo.py"))
  c.model.fpn_channels = 32
  c.model.centernet.num_convs = 1
  c.model.roi_heads.fc_dim = 64
  c.model.roi_heads.batch_size_per_image = 32
  c.data.synthetic_num_train = 12
  c.data.synthetic_num_val = 6
  c.data.min_size_train = (128, 160)
  c.data.max_size_train = 160
  c.data.min_size_test = 128
  c.data.max_size_test = 160
  c.data.pad_hw_train = (160, 160)
  c.data.pad_hw_test = (160, 160)
  c.train.batch_size = 2
  c.train.eval_batch_size = 4
  c.train.log_every = 2
  c.train.checkpoint_every = 2
  c.optim.max_iter = 4
  c.optim.warmup_iters = 2
  c.optim.steps = (3,)
  return validate_config(c)


@pytest.fixture(scope="module", autouse=True)
def _fast(fast_compile):
  yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory, _fast):
  root = tmp_path_factory.mktemp("runs")
  cfg = small_demo_config()
  cfg.data.root = str(root / "synthetic")  # shared dataset for both runs
  cfg.data.data_dir = str(root / "tfds")
  full, resumed = {}, {}
  wd_full = str(root / "full")
  cfg.train.eval_at_end = False
  app.train(cfg, wd_full, metrics_callback=lambda s, m: full.__setitem__(s, m))
  wd = str(root / "resumed")
  app.train(cfg, wd, stop_at_step=2, metrics_callback=lambda s, m: resumed.__setitem__(s, m))
  cfg.train.eval_at_end = True
  _, metrics = app.train(cfg, wd, metrics_callback=lambda s, m: resumed.__setitem__(s, m))
  return cfg, wd, full, resumed, metrics


def test_resume_gives_same_losses_as_uninterrupted(runs):
  _, wd, full, resumed, _ = runs
  assert sorted(full) == sorted(resumed) == [1, 2, 3, 4]
  for step in (3, 4):
    for k in ("total_loss", "loss_centernet_agn_pos", "loss_cls_stage0"):
      assert resumed[step][k] == pytest.approx(full[step][k], rel=1e-6, abs=1e-7), (step, k)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "4"]


def test_eval_outputs(runs):
  _, wd, _, _, metrics = runs
  from cn2_jax.evaluation.coco_eval import COCO_METRIC_NAMES

  with open(os.path.join(wd, "eval", "metrics.json")) as f:
    saved = json.load(f)
  for name in COCO_METRIC_NAMES:
    assert name in saved and -1.0 <= saved[name] <= 1.0
    assert saved[name] == pytest.approx(metrics[name])
  with open(os.path.join(wd, "eval", "coco_results.json")) as f:
    results = json.load(f)
  assert isinstance(results, list)
  assert all(set(r) >= {"image_id", "category_id", "bbox", "score"} for r in results)
  assert os.path.isfile(os.path.join(wd, "config.json"))
  # the end-of-training evaluation is in TensorBoard too, at the last step
  from tests.test_engine import _read_scalars

  events = [os.path.join(wd, f) for f in os.listdir(wd) if f.startswith("events.out.tfevents")]
  scalars = {(tag, step): v for f in events for tag, step, v in _read_scalars(f)}
  assert scalars[("eval/AP", 4)] == pytest.approx(metrics["AP"])
  assert ("train/total_loss", 4) in scalars


def test_predict_and_notebook_predictor(runs):
  cfg, wd, _, _, _ = runs
  img_dir = os.path.join(cfg.data.root, "val")
  if not os.path.isdir(img_dir):
    img_dir = cfg.data.root
  images = sorted(
      os.path.join(dp, f)
      for dp, _, fs in os.walk(img_dir)
      for f in fs
      if f.endswith((".png", ".jpg"))
  )[:2]
  results = app.predict(cfg, wd, images)
  assert len(results) == 2
  for r in results:
    assert os.path.isfile(r["drawn"])
  assert os.path.isfile(os.path.join(wd, "predict", "detections.json"))
  from cn2_jax.predictor import Predictor

  predictor = Predictor.from_workdir(wd)
  det = predictor(images[0])
  assert det["boxes"].ndim == 2 and det["boxes"].shape[1] == 4
  assert len(det["scores"]) == len(det["classes"]) == len(det["class_names"])
  with pytest.raises(FileNotFoundError, match="nope.jpg"):
    app.predict(cfg, wd, [os.path.join(wd, "nope.jpg")])


def test_unknown_config_key_is_an_error():
  cfg = small_demo_config()
  cfg.model.unlocked = True  # an attribute the schema lacks, on purpose
  with pytest.raises(KeyError, match="model.unlocked"):
    validate_config(cfg)


def test_cli_rejects_misspelled_override(tmp_path):
  proc = subprocess.run(
      [
          sys.executable,
          "main.py",
          "--config",
          "configs/demo.py",
          "--workdir",
          str(tmp_path),
          "--config.optim.base_lrr=0.1",
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode != 0
  assert "base_lrr" in proc.stderr


def test_two_devices_match_one_device():
  proc = subprocess.run(
      [sys.executable, os.path.join("tests", "two_device_check.py")],
      cwd=REPO,
      capture_output=True,
      text=True,
      env={
          **os.environ,
          "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
      },
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  assert res["loss_diff"] < 1e-5 * max(1.0, abs(res["total_loss"])), res
  assert res["param_diff"] < 1e-6, res


def test_eval_with_converted_weights_dir_matches_checkpoint(runs, tmp_path):
  """--mode=eval --config.weights=DIR (an Orbax dir as written by `python -m cn2_jax.convert`)
  gives the same metrics as evaluating the run's own checkpoint."""
  from cn2_jax.convert import save_variables

  cfg, wd, _, _, metrics = runs
  variables = app.restore_model_variables(cfg, wd)
  import jax

  weights = save_variables(jax.device_get(variables), tmp_path / "converted")
  cfg2 = cfg.copy_and_resolve_references()
  cfg2.weights = str(weights)
  metrics2 = app.evaluate(cfg2, str(tmp_path / "eval_run"))
  for k in ("AP", "AP50", "AR100"):
    assert metrics2[k] == pytest.approx(metrics[k], abs=1e-9), k
  with pytest.raises(Exception, match="missing.pkl"):
    cfg2.weights = str(tmp_path / "missing.pkl")
    app.evaluate(cfg2, str(tmp_path / "eval_run2"))
