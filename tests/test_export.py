"""`python -m cn2_jax.export` (issue 14): the StableHLO file of a tiny model, run in a fresh python
that imports only jax and numpy, gives the Predictor's detections; ONNX (optional extra) matches
JAX on the dense part when jax2onnx / onnxruntime are installed (scripts/test_onnx.sh)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cn2_jax import export
from cn2_jax.modeling import detector
from cn2_jax.predictor import Predictor
from cn2_jax.weights.orbax_io import save_variables
from tests.test_app import small_demo_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("jax2onnx", "onnxruntime"))

# Runs in a fresh interpreter: jax + numpy only (no cn2_jax, no flax).
_RUNNER = r"""
import sys
import numpy as np
import jax

assert "cn2_jax" not in sys.modules and "flax" not in sys.modules
inputs = np.load(sys.argv[1])
out = {}
for tag, path, args in (
    ("a", sys.argv[2], (inputs["image_ab"], inputs["hw_ab"])),
    ("c", sys.argv[3], (inputs["image_c"], inputs["hw_c"], inputs["orig_c"])),
):
  with open(path, "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  res = exported.call(*args)
  out.update({f"{tag}_{k}": np.asarray(v) for k, v in res.items()})
assert "cn2_jax" not in sys.modules and "flax" not in sys.modules
np.savez(sys.argv[4], **out)
"""


def _image(seed: int, h: int, w: int) -> np.ndarray:
  """Blocks of colour on noise: enough structure for distinct detection scores."""
  rng = np.random.default_rng(seed)
  img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
  for _ in range(4):
    y, x = rng.integers(0, h - 20), rng.integers(0, w - 20)
    img[y : y + rng.integers(15, 60), x : x + rng.integers(15, 60)] = rng.integers(80, 255, 3)
  return img


def _cli(argv) -> tuple[int, str, str]:
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = export.main([str(a) for a in argv])
  return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module", autouse=True)
def _fast(fast_compile):
  yield


@pytest.fixture(scope="module")
def run(tmp_path_factory, _fast):
  """A run directory (config.json) and random weights written as an Orbax directory."""
  root = tmp_path_factory.mktemp("export")
  cfg = small_demo_config()
  wd = root / "run"
  wd.mkdir()
  (wd / "config.json").write_text(cfg.to_json_best_effort())
  variables = detector.init_variables(cfg.model, seed=3)
  weights = save_variables(variables, root / "weights")
  return dict(root=root, cfg=cfg, wd=wd, weights=weights, variables=variables)


@pytest.fixture(scope="module")
def files(run):
  """Two StableHLO files through the CLI: the default (symbolic batch, boxes in input pixels) and
  `--orig-hw --batch 1`."""
  out = {}
  for tag, extra in (("a", []), ("c", ["--orig-hw", "--batch", "1"])):
    path = run["root"] / f"{tag}.stablehlo"
    out[tag] = (path,) + _cli(
        ["--workdir", run["wd"], "--weights", run["weights"], "--out", path] + extra
    )
  return out


def test_cli_prints_size_and_signature(files, run):
  rc, stdout, stderr = files["a"][1:]
  assert rc == 0, stderr
  path = files["a"][0]
  assert f"{os.path.getsize(path)} bytes" in stdout
  for line in (
      "image          uint8[b,160,160,3]",
      "image_hw       int32[b,2]",
      "boxes          float32[b,20,4]",
      "scores         float32[b,20]",
      "classes        int32[b,20]",
      "valid          bool[b,20]",
      "platforms: cpu, cuda",
  ):
    assert line in stdout, stdout
  meta = json.loads(open(f"{path}.json").read())
  assert meta["arch"] == "centernet2" and meta["batch"] == "b" and meta["canvas_hw"] == [160, 160]
  assert meta["preprocess"]["min_size_test"] == run["cfg"].data.min_size_test
  rc, stdout, stderr = files["c"][1:]
  assert rc == 0, stderr
  assert "orig_hw        int32[1,2]" in stdout and "boxes          float32[1,20,4]" in stdout


def test_fresh_process_matches_predictor(files, run):
  """Deserialized and run where only jax and numpy are imported: the Predictor's detections
  (boxes within 1e-4, same classes and count), for a batch of 2 and a batch of 1."""
  cfg = run["cfg"]
  predictor = Predictor(cfg, run["variables"])
  originals = {"a": _image(0, 120, 150), "b": _image(1, 120, 150), "c": _image(2, 170, 100)}
  pre = {k: predictor.preprocess(v) for k, v in originals.items()}  # (padded, image_hw, orig_hw)
  inputs = dict(
      image_ab=np.concatenate([pre["a"][0], pre["b"][0]]),
      hw_ab=np.concatenate([pre["a"][1], pre["b"][1]]),
      image_c=pre["c"][0],
      hw_c=pre["c"][1],
      orig_c=pre["c"][2],
  )
  root = run["root"]
  np.savez(root / "inputs.npz", **inputs)
  (root / "runner.py").write_text(_RUNNER)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # as this module (conftest.fast_compile)
  proc = subprocess.run(
      [sys.executable, str(root / "runner.py"), str(root / "inputs.npz")]
      + [str(files["a"][0]), str(files["c"][0]), str(root / "out.npz")],
      cwd=str(root),  # not the repository: `import cn2_jax` must not be what makes it work
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = dict(np.load(root / "out.npz"))

  def check(name, boxes, scores, classes, valid):
    want = predictor(originals[name])
    assert len(want["boxes"]) > 0
    np.testing.assert_array_equal(classes[valid], want["classes"])
    np.testing.assert_allclose(scores[valid], want["scores"], atol=1e-5)
    np.testing.assert_allclose(boxes[valid], want["boxes"], atol=1e-4)

  for i, name in enumerate("ab"):  # input pixels: scale to the original image as the caller would
    _, hw, orig = pre[name]
    s = (orig[0] / hw[0]).astype(np.float32)
    scale = np.array([s[1], s[0], s[1], s[0]], np.float32)
    check(
        name,
        got["a_boxes"][i] * scale,
        got["a_scores"][i],
        got["a_classes"][i],
        got["a_valid"][i],
    )
  check("c", got["c_boxes"][0], got["c_scores"][0], got["c_classes"][0], got["c_valid"][0])


def test_dense_part_is_the_models(run):
  """The part --format onnx converts computes what the full model computes (its sown
  intermediates), so the ONNX outputs are the detector's features and head maps."""
  predictor = Predictor(run["cfg"], run["variables"])
  fn, names = export.dense_fn(predictor)
  padded, hw, _ = predictor.preprocess(_image(0, 120, 150))
  model, variables = predictor.model, predictor.variables

  def both(image, image_hw):
    _, state = model.apply(
        variables, dict(image=image, image_hw=image_hw), train=False, mutable=["intermediates"]
    )
    return fn(image, image_hw), state["intermediates"]

  dense, inter = jax.jit(both)(padded, hw)
  dense = dict(zip(names, dense))
  head = inter["proposal_generator"]
  for lvl in range(3, 8):
    np.testing.assert_array_equal(dense[f"p{lvl}"], inter[f"p{lvl}"][0])
    np.testing.assert_array_equal(dense[f"hm_logits_p{lvl}"], head[f"head_agn_hm_logits_p{lvl}"][0])
    np.testing.assert_array_equal(dense[f"reg_p{lvl}"], head[f"head_reg_p{lvl}"][0])


@pytest.mark.skipif(HAS_ONNX, reason="jax2onnx is installed")
def test_onnx_without_jax2onnx_is_one_line(run):
  rc, stdout, stderr = _cli(
      ["--workdir", run["wd"], "--format", "onnx", "--out", run["root"] / "x.onnx"]
  )
  assert rc == 1 and stdout == ""
  assert stderr.count("\n") == 1 and "pip install -r requirements-onnx.txt" in stderr, stderr


@pytest.mark.skipif(not HAS_ONNX, reason="needs jax2onnx + onnxruntime (scripts/test_onnx.sh)")
def test_onnx_matches_jax(run):
  import onnxruntime as ort

  path = run["root"] / "dense.onnx"
  rc, stdout, stderr = _cli(
      ["--workdir", run["wd"], "--weights", run["weights"], "--format", "onnx", "--out", path]
  )
  assert rc == 0, stderr
  assert "image          uint8[b,160,160,3]" in stdout, stdout
  assert "p3             float32[b,20,20,32]" in stdout, stdout
  predictor = Predictor(run["cfg"], run["variables"])
  fn, names = export.dense_fn(predictor)
  pre = [predictor.preprocess(_image(i, 120, 150 - 30 * i)) for i in range(2)]
  padded, hw = np.concatenate([p[0] for p in pre]), np.concatenate([p[1] for p in pre])
  want = jax.jit(fn)(padded, hw)  # JAX with the model's own max-pool
  sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  assert [o.name for o in sess.get_outputs()] == names
  got = sess.run(None, {"image": padded, "image_hw": hw})  # a batch of 2: the batch is symbolic
  for name, g, w in zip(names, got, want):
    # 1e-4 of the output's largest magnitude (absolute for outputs within +-1): the head maps are
    # within ~1e-5, the unnormalised FPN features (|x| up to ~8) within ~1.3e-4 absolute.
    w = np.asarray(w)
    assert g.shape == w.shape, name
    assert np.abs(g - w).max() <= 1e-4 * max(1.0, np.abs(w).max()), name


@pytest.fixture(scope="module")
def onestage(_fast):
  """The one-stage family (configs/centernet_demo.py, random weights) on a 64x64 canvas."""
  from cn2_jax.config import load_config_file

  cfg = load_config_file(os.path.join(REPO, "configs", "centernet_demo.py"))
  cfg.data.min_size_test, cfg.data.max_size_test, cfg.data.pad_hw_test = 48, 64, (64, 64)
  return Predictor(cfg, detector.init_variables(cfg.model, seed=1))


def test_onestage_family_exports(onestage):
  """Family-agnostic: the one-stage CenterNet (DCN neck, peak decode) exports with a symbolic
  batch and its file computes the Predictor's forward."""
  exported = jax.export.deserialize(bytearray(export.serialize(export.export_stablehlo(onestage))))
  assert str(exported.in_avals[0]) == "uint8[b,64,64,3]"
  padded, hw, _ = onestage.preprocess(_image(4, 40, 60))
  got = exported.call(padded, hw)
  want = jax.device_get(onestage._apply(onestage.variables, padded, hw, hw))
  for k in export.OUTPUT_KEYS:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], atol=1e-5, err_msg=k)


@pytest.mark.skipif(not HAS_ONNX, reason="needs jax2onnx + onnxruntime (scripts/test_onnx.sh)")
def test_onnx_onestage_without_dcn(onestage):
  """centerX's ONNX export (spec §6): the DCN-free one-stage model's cls / wh / reg maps; a model
  with DCN is refused in one line."""
  import onnxruntime as ort

  from cn2_jax import errors

  with pytest.raises(errors.ConfigError, match="use_deform"):
    export.export_onnx(onestage)
  cfg = onestage.config.copy_and_resolve_references()
  cfg.model.onestage.use_deform = False
  predictor = Predictor(cfg, detector.init_variables(cfg.model, seed=1))
  proto, names = export.export_onnx(predictor)
  assert names == ["cls", "reg", "wh"]
  fn, _ = export.dense_fn(predictor)
  pre = [predictor.preprocess(_image(i, 40, 60 - 20 * i)) for i in range(2)]
  padded, hw = np.concatenate([p[0] for p in pre]), np.concatenate([p[1] for p in pre])
  want = jax.jit(fn)(padded, hw)
  sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
  got = sess.run(None, {"image": padded, "image_hw": hw})
  for name, g, w in zip(names, got, want):
    assert g.shape == np.shape(w) == (2, 16, 16, 4 if name == "cls" else 2), name
    np.testing.assert_allclose(g, np.asarray(w), atol=1e-4, rtol=0, err_msg=name)
