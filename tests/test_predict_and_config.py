"""Hardening (issue #11) of predict, of the run's config in eval/predict, of weights folders and
resumes, and the inference notebook: one tiny demo run trained once for the module."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from cn2_jax import app, errors
from cn2_jax.config import load_config_file
from tests.test_app import small_demo_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.py")


@pytest.fixture(scope="module", autouse=True)
def _fast(fast_compile):
  yield


@pytest.fixture(scope="module")
def run(tmp_path_factory, _fast):
  """A 4-step run of the tiny demo model. Its config departs from configs/demo.py (e.g.
  model.fpn_channels=32, not 64): training overrides that eval / predict must not need again."""
  wd = str(tmp_path_factory.mktemp("run") / "wd")
  cfg = small_demo_config()
  cfg.train.eval_at_end = False
  app.train(cfg, wd)
  return wd


class _Records(logging.Handler):

  def __init__(self):
    super().__init__(logging.INFO)
    self.records = []

  def emit(self, record):
    self.records.append(record)


def _messages(records, level=logging.INFO):
  return [r.getMessage() for r in records if r.levelno == level]


@pytest.fixture(scope="module")
def predicted(run, tmp_path_factory):
  """One predict call over the awkward inputs: two files named 1.png in different folders, a
  corrupt file, and a folder (two images and a text file)."""
  src = os.path.join(run, "synthetic", "val")
  vals = sorted(os.listdir(src))
  root = tmp_path_factory.mktemp("images")
  for d in ("a", "b", "d"):
    (root / d).mkdir()
  shutil.copy(os.path.join(src, vals[0]), root / "a" / "1.png")
  shutil.copy(os.path.join(src, vals[1]), root / "b" / "1.png")
  shutil.copy(os.path.join(src, vals[2]), root / "d" / "y.png")
  shutil.copy(os.path.join(src, vals[3]), root / "d" / "x.JPG")
  (root / "d" / "notes.txt").write_text("not an image")
  (root / "bad.png").write_bytes(b"not a png")
  images = [
      str(root / "a" / "1.png"),
      str(root / "bad.png"),
      str(root / "b" / "1.png"),
      str(root / "d"),
  ]
  cli = load_config_file(DEMO)  # the config file of the command line, not the run's
  cli.predict.score_thresh = 0.0
  cfg = app.run_config(cli, run, ["predict.score_thresh"])
  handler, logger = _Records(), logging.getLogger("cn2_jax")
  level = logger.level
  logger.setLevel(logging.INFO)
  logger.addHandler(handler)
  try:
    with pytest.raises(errors.DataError) as failure:
      app.predict(cfg, run, images)
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)
  with open(os.path.join(run, "predict", "detections.json")) as f:
    results = json.load(f)
  return dict(root=root, results=results, error=str(failure.value), records=handler.records)


# ------------------------------------------------------------------------------------- predict
def test_same_stems_get_distinct_pngs(predicted):
  drawn = {
      os.path.relpath(r["image"], predicted["root"]): os.path.basename(r["drawn"])
      for r in predicted["results"]
  }
  assert drawn["a/1.png"] == "a_1.png" and drawn["b/1.png"] == "b_1.png"
  assert len(set(drawn.values())) == len(drawn)
  assert all(os.path.isfile(r["drawn"]) for r in predicted["results"])
  assert app.output_names(["x/1.jpg", "x/1.png", "1.png", "y/1_x.png"]) == [
      "x_1.jpg.png",
      "x_1.png.png",
      "1.png",
      "1_x.png",
  ]
  assert app.output_names(["a/1.png", "b/1.png", "c/a_1.png"]) == [
      "a_1.png",
      "b_1.png",
      "a_1-2.png",
  ]
  assert app.output_names(["a/b/c.png", "a/d/c.png"]) == ["b_c.png", "d_c.png"]
  assert app.output_names(["a/p.png", "a/p.png"]) == ["p.png", "p-2.png"]


def test_folder_is_expanded_to_its_images(predicted, tmp_path):
  images = [os.path.relpath(r["image"], predicted["root"]) for r in predicted["results"]]
  assert images == ["a/1.png", "b/1.png", "d/x.JPG", "d/y.png"]  # sorted, no notes.txt
  with pytest.raises(errors.InputFileError, match="no images"):
    app.expand_images([str(tmp_path)])
  with pytest.raises(FileNotFoundError, match="nope.jpg"):
    app.expand_images([str(tmp_path / "nope.jpg")])


def test_bad_image_is_reported_after_the_others_are_written(predicted):
  msg = predicted["error"]
  assert msg.startswith("1 of 5 images failed: ") and "bad.png" in msg and "\n" not in msg
  assert len(predicted["results"]) == 4
  assert not any(r["image"].endswith("bad.png") for r in predicted["results"])
  errors_logged = _messages(predicted["records"], logging.ERROR)
  assert len(errors_logged) == 1 and "bad.png" in errors_logged[0]


def test_per_image_and_summary_log_lines(predicted):
  info = _messages(predicted["records"])
  for r in predicted["results"]:
    k = len(r["detections"])
    line = next(m for m in info if m.startswith(r["image"] + ":"))
    top = max(d["score"] for d in r["detections"])
    assert f"{k} detections, {k} drawn ≥ 0.00 (max score {top:.2f}) → {r['drawn']}" in line
  total = sum(len(r["detections"]) for r in predicted["results"])
  assert info[-1].startswith(f"predict: 4 of 5 images, {total} detections, {total} drawn")


def test_detections_have_the_dataset_category_ids(predicted, run):
  with open(os.path.join(run, "dataset_info.json")) as f:
    info = json.load(f)
  dets = [d for r in predicted["results"] for d in r["detections"]]
  assert dets
  for d in dets:
    assert d["category_id"] == info["label_to_category_id"][d["label"]]
    assert d["class_name"] == info["class_names"][d["label"]]


def test_warns_when_no_detection_reaches_the_threshold(run, caplog):
  cfg = app.run_config(load_config_file(DEMO), run, [])
  cfg.predict.score_thresh = 1.0
  image = os.path.join(
      run, "synthetic", "val", sorted(os.listdir(os.path.join(run, "synthetic", "val")))[0]
  )
  with caplog.at_level(logging.INFO, logger="cn2_jax"):
    app.predict(cfg, run, [image])
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any(
      m.startswith("no detection reached predict.score_thresh=1.00 (highest score")
      and "--config.predict.score_thresh=" in m
      for m in warnings
  ), warnings


# ------------------------------------------------------------------------------------- run config
def _main(*args, timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
  return subprocess.run(
      [sys.executable, "main.py", *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=timeout,
      env=env,
  )


def test_eval_uses_the_runs_config_json(run):
  """The run was trained with model.fpn_channels=32 etc.; eval with configs/demo.py and no
  override restores it (the command-line config would build a 64-channel model)."""
  proc = _main("--config", "configs/demo.py", "--workdir", run, "--mode=eval")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"config: {run}/config.json" in proc.stderr
  with open(os.path.join(run, "eval", "metrics.json")) as f:
    assert "AP" in json.load(f)


def test_override_that_does_not_fit_the_checkpoint_is_one_line(run):
  proc = _main(
      "--config",
      "configs/demo.py",
      "--workdir",
      run,
      "--mode=predict",
      f"--images={run}/synthetic/val",
      "--config.model.fpn_channels=64",
  )
  assert proc.returncode == 1, proc.stderr[-3000:]
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  assert any("--config.model.fpn_channels=64 differs from the run's" in ln for ln in lines)
  assert lines[-1].startswith("error: checkpoint ") and "Traceback" not in proc.stderr
  assert "fpn_lateral3" in lines[-1] and "model.fpn_channels=32 (this config: 64)" in lines[-1]
  assert sum(ln.startswith("error:") for ln in lines) == 1


def test_shape_mismatch_names_the_field(run):
  cfg = app.run_config(load_config_file(DEMO), run, [])
  cfg.model.num_classes = 80
  with pytest.raises(errors.WeightsError) as e:
    app.restore_model_variables(cfg, run)
  msg = str(e.value)
  assert "\n" not in msg and "cls_score" in msg and "(5,) in the checkpoint but (81,)" in msg
  assert "model.num_classes=4 (this config: 80)" in msg
  assert "--config.model.num_classes=4" in msg


def test_weights_can_be_a_run_or_one_of_its_checkpoints(run, tmp_path):
  cfg = app.run_config(load_config_file(DEMO), run, [])
  ref = jax.tree.leaves(app.restore_model_variables(cfg, run))

  def restored(weights):
    c = cfg.copy_and_resolve_references()
    c.weights = weights
    return jax.tree.leaves(app.restore_model_variables(c, str(tmp_path / "elsewhere")))

  for weights in (run, os.path.join(run, "checkpoints"), os.path.join(run, "checkpoints", "4")):
    assert all(np.array_equal(a, b) for a, b in zip(ref, restored(weights))), weights
  assert not all(
      np.array_equal(a, b) for a, b in zip(ref, restored(os.path.join(run, "checkpoints", "2")))
  )
  (tmp_path / "empty").mkdir()
  with pytest.raises(errors.WeightsError, match="cannot read it as an Orbax checkpoint"):
    restored(str(tmp_path / "empty"))
  # A fresh workdir with --config.weights=RUN takes that run's config and class names.
  cli = load_config_file(DEMO)
  cli.weights = run
  fresh = app.run_config(cli, str(tmp_path / "fresh"), ["weights"])
  assert fresh.model.fpn_channels == 32 and fresh.weights == run
  from cn2_jax.predictor import _dataset_info

  names, ids = _dataset_info(str(tmp_path / "fresh"), fresh)
  assert len(names) == 4 and len(ids) == 4


def test_resume_with_changed_config_warns_and_keeps_the_old_one(run, tmp_path, caplog):
  wd = str(tmp_path / "copy")
  shutil.copytree(run, wd)
  before = open(os.path.join(wd, "config.json")).read()
  cfg = small_demo_config()
  cfg.train.eval_at_end = False
  cfg.optim.base_lr = 0.01
  with caplog.at_level(logging.INFO, logger="cn2_jax"):
    app.train(cfg, wd)  # already at max_iter: nothing to train
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("optim.base_lr 0.02 → 0.01" in m for m in warned), warned
  kept = [f for f in os.listdir(wd) if f.startswith("config.") and f != "config.json"]
  assert len(kept) == 1 and open(os.path.join(wd, kept[0])).read() == before
  assert json.load(open(os.path.join(wd, "config.json")))["optim"]["base_lr"] == 0.01
  # A change that the checkpoint cannot take is refused before anything is written.
  cfg.model.fpn_channels = 64
  with pytest.raises(errors.WeightsError, match=r"cannot resume.*model\.fpn_channels=32"):
    app.train(cfg, wd)
  assert json.load(open(os.path.join(wd, "config.json")))["model"]["fpn_channels"] == 32


# ------------------------------------------------------------------------------------- notebook
def test_inference_notebook_runs(tmp_path, monkeypatch):
  """Executes notebooks/inference.ipynb on its fresh-clone path (no runs/demo: it trains a tiny
  model) in a kernel of this interpreter."""
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import KernelManager
  # A kernel spec of this venv's python: a user-installed "python3" spec could be another one.
  spec = tmp_path / "kernels" / "cn2"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(
      json.dumps(
          dict(
              argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
              display_name="cn2",
              language="python",
          )
      )
  )
  monkeypatch.setenv("CN2_NOTEBOOK_FAST", "1")
  monkeypatch.setenv("CN2_NOTEBOOK_RUN", str(tmp_path / "no_demo_run"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(os.path.join(REPO, "notebooks", "inference.ipynb"), as_version=4)
  km = KernelManager(
      kernel_name="cn2",
      kernel_spec_manager=KernelSpecManager(
          kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False
      ),
  )
  client = nbclient.NotebookClient(
      nb, km=km, timeout=300, resources={"metadata": {"path": os.path.join(REPO, "notebooks")}}
  )
  client.execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "trained a tiny model" in text and " detections" in text
  assert any("image/png" in o.get("data", {}) for o in outputs)
