"""Hardening (issue #11): one-line user errors, quiet logs, --helpconfig, packaging, COCO class
names, readable labels in drawn detections."""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import sys
import tomllib

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, timeout=300):
  return subprocess.run(
      [sys.executable, "main.py", *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=timeout,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )


def error_lines(stderr: str):
  return [ln for ln in stderr.splitlines() if ln.strip()]


# ------------------------------------------------------------------------------------- errors
def test_misspelled_override_is_one_error_line(tmp_path):
  proc = run_main(
      "--config", "configs/demo.py", "--workdir", str(tmp_path / "x"), "--config.optim.base_rl=1"
  )
  assert proc.returncode != 0
  lines = error_lines(proc.stderr)
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith("error: ") and "optim.base_rl" in lines[0]
  assert "optim.base_lr" in lines[0]  # the suggestion
  assert "\\n" not in lines[0] and "Traceback" not in proc.stderr
  verbose = run_main(
      "--config",
      "configs/demo.py",
      "--workdir",
      str(tmp_path / "x"),
      "--config.optim.base_rl=1",
      "--verbose",
  )
  assert verbose.returncode != 0 and "Traceback" in verbose.stderr


def test_config_and_data_errors_are_one_line(tmp_path):
  proc = run_main("--config", str(tmp_path / "missing.py"), "--workdir", str(tmp_path / "x"))
  assert proc.returncode != 0
  assert error_lines(proc.stderr) == [f"error: config file not found: {tmp_path / 'missing.py'}"]

  cfg = tmp_path / "cfg.py"  # a key the schema does not know, set inside the config file
  cfg.write_text(
      "from cn2_jax.config import base_config\n\ndef get_config():\n"
      "  c = base_config()\n  c.model.num_clases = 3\n  return c\n"
  )
  proc = run_main("--config", str(cfg), "--workdir", str(tmp_path / "x"))
  lines = error_lines(proc.stderr)
  assert proc.returncode == 1 and len(lines) == 1, proc.stderr
  assert lines[0].startswith("error: ") and "model.num_clases" in lines[0]

  (tmp_path / "ann.json").write_text("[]")
  proc = run_main(
      "--config",
      "configs/demo.py",
      "--workdir",
      str(tmp_path / "x"),
      "--config.data.dataset=coco_json",
      f"--config.data.root={tmp_path}",
      "--config.data.train_json=ann.json",
      "--config.data.val_json=",
  )
  lines = [ln for ln in error_lines(proc.stderr) if ln.startswith("error:")]
  assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert lines[0].startswith("error: annotation file ") and str(tmp_path / "ann.json") in lines[0]
  assert error_lines(proc.stderr)[-1] == lines[0]


def test_error_classes_and_one_line():
  from cn2_jax import errors

  e = errors.ConfigError("Unknown config key 'model.x'")
  assert isinstance(e, KeyError) and isinstance(e, ValueError)
  assert str(e) == "Unknown config key 'model.x'"  # not KeyError's repr
  assert isinstance(errors.DataError("x"), ValueError)
  assert isinstance(errors.InputFileError("x"), FileNotFoundError)
  for exc in (e, errors.DataError("x"), errors.WeightsError("x"), FileNotFoundError("x")):
    assert errors.is_user_error(exc)
  for exc in (ValueError("x"), KeyError("x"), AttributeError("x"), RuntimeError("x")):
    assert not errors.is_user_error(exc)
  assert errors.one_line(KeyError("'base_rl'\nDid you mean")) == "'base_rl' | Did you mean"
  assert errors.one_line(ValueError("")) == "ValueError"


# ------------------------------------------------------------------------------------- logging
@pytest.fixture
def restore_logging():
  root = logging.getLogger()
  names = ["cn2_jax", "absl", "orbax", "jax", "tensorflow_datasets", "grain"]
  saved = (list(root.handlers), root.level, {n: logging.getLogger(n).level for n in names})
  yield
  for h in list(root.handlers):
    root.removeHandler(h)
  for h in saved[0]:
    root.addHandler(h)
  root.setLevel(saved[1])
  for n, level in saved[2].items():
    logging.getLogger(n).setLevel(level)
  from tensorflow_datasets.core.utils import tqdm_utils

  tqdm_utils.display_progress_bar(True)


def test_logging_levels_and_tqdm_routing(restore_logging, monkeypatch):
  from tqdm import tqdm
  from cn2_jax.logging_setup import TqdmHandler, setup_logging

  written = []
  monkeypatch.setattr(tqdm, "write", classmethod(lambda cls, s, file=None, **kw: written.append(s)))
  setup_logging(verbose=False)
  setup_logging(verbose=False)  # idempotent: still one handler
  root = logging.getLogger()
  assert sum(isinstance(h, TqdmHandler) for h in root.handlers) == 1
  assert logging.getLogger("cn2_jax.app").isEnabledFor(logging.INFO)
  for name in ("absl", "orbax.checkpoint", "tensorflow_datasets", "jax._src.xla_bridge", "grain"):
    assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
    assert logging.getLogger(name).isEnabledFor(logging.WARNING), name
  logging.getLogger("cn2_jax.test").info("hello %d", 1)
  logging.getLogger("orbax.checkpoint").info("noise")
  logging.getLogger("absl").warning("Using custom data configuration: x")  # tfds noise
  assert len(written) == 1 and written[0].endswith("] hello 1") and written[0].startswith("I")
  setup_logging(verbose=True)
  logging.getLogger("orbax.checkpoint").info("detail")
  assert written[-1].endswith("] detail")


# ------------------------------------------------------------------------------------- --helpconfig
def test_helpconfig_prints_every_field_with_the_help_its_group_declares():
  from cn2_jax.config import base_config, declared_groups

  proc = run_main("--helpconfig")
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  cfg = base_config()
  # help of a field = the comment lines under it (or the text after "  # " on its line)
  shown, current = {}, None
  for line in out.splitlines():
    m = re.match(r"^([\w.]+) = ", line)
    if m:
      current = m.group(1)
      shown[current] = line.split("  # ", 1)[1] if "  # " in line else ""
    elif line.startswith("    # ") and current:
      shown[current] = (shown[current] + " " + line[len("    # ") :]).strip()
    else:
      current = None
  n_fields = 0
  for group in declared_groups():
    prefix = f"{group.path}." if group.path else ""
    for field in group.fields:
      path = prefix + field.name
      n_fields += 1
      value = cfg
      for key in path.split("."):
        value = value[key]
      assert re.search(rf"^{re.escape(path)} = {re.escape(repr(value))}", out, re.M), path
      assert field.help, f"{path} has no help text"
      assert shown[path] == " ".join(field.help.split()), path
  assert n_fields == len(shown) > 200


# ------------------------------------------------------------------------------------- packaging
def test_pyproject_matches_requirements():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  pins = {}
  for ln in open(os.path.join(REPO, "requirements.txt")):
    ln = ln.split("#", 1)[0].strip()
    if ln:
      name, version = ln.split("==")
      pins[name.lower().replace("_", "-")] = version
  deps = {}
  for d in project["dependencies"]:
    name, version = d.split(">=")
    deps[name.lower().replace("_", "-")] = version
  test_extra = {d.split(">=")[0].lower() for d in project["optional-dependencies"]["test"]}
  assert {"pytest", "pytest-xdist", "nbclient", "ipykernel"} <= test_extra
  runtime_pins = {k: v for k, v in pins.items() if k not in test_extra}
  assert deps == runtime_pins  # same packages, requirements' pins as lower bounds
  assert project["name"] == "cn2_jax"


# ------------------------------------------------------------------------------------- COCO names
def test_coco_class_names_and_ids():
  from cn2_jax.data import coco_classes as C

  assert len(C.COCO_CLASS_NAMES) == 80 == len(set(C.COCO_CLASS_NAMES))
  assert C.COCO_CLASS_NAMES[0] == "person" and C.COCO_CLASS_NAMES[-1] == "toothbrush"
  ids = list(C.COCO_CATEGORY_IDS)
  assert ids == sorted(ids) and len(set(ids)) == 80
  assert set(ids) == set(range(1, 91)) - {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
  assert (
      dict(C.COCO_CATEGORIES)[13] == "stop sign" and dict(C.COCO_CATEGORIES)[67] == "dining table"
  )
  assert C.category_id_to_label()[90] == 79


# ------------------------------------------------------------------------------------- labels
def _intersect(a, b):
  return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_labels_of_overlapping_boxes_do_not_intersect():
  from cn2_jax import visualize as V

  image = np.zeros((200, 300, 3), np.uint8)
  boxes = np.array(
      [[40, 60, 200, 180], [44, 62, 190, 170], [48, 58, 150, 150], [250, 0, 299, 50]], np.float32
  )
  scores = np.array([0.9, 0.8, 0.7, 0.6])
  classes = np.array([0, 1, 2, 3])
  names = ["person", "bicycle", "car", "motorcycle"]
  rects = V.label_rects(image, boxes, scores, classes, names)
  assert len(rects) == 4
  for i in range(4):
    x0, y0, x1, y1 = rects[i]
    assert 0 <= x0 < x1 and 0 <= y0 < y1 <= 200
    for j in range(i):
      assert not _intersect(rects[i], rects[j]), (rects[i], rects[j])
  assert rects[0][3] <= 60  # the best detection keeps the spot above its box
  drawn = V.draw_detections(image, boxes, scores, classes, names)
  x0, y0, x1, y1 = rects[1]
  assert drawn[y0:y1, x0:x1].any()  # a filled label is drawn where the layout put it
  assert drawn.shape == image.shape and not image.any()


def test_font_size_grows_with_the_image():
  from cn2_jax import visualize as V

  sizes = [V.font_size_for(h, w) for h, w in ((160, 192), (480, 640), (800, 1333), (3000, 4000))]
  assert sizes[0] >= 12  # was 9 px
  assert sizes == sorted(sizes) and sizes[-1] > 3 * sizes[0]
  assert V.font_size_for(3000, 4000) == round(max(math.sqrt(3000 * 4000) // 90, 10) * 100 / 72)
  from PIL import ImageFont

  assert isinstance(V._font(20), ImageFont.FreeTypeFont)  # scalable TrueType, not the 9 px bitmap
