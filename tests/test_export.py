"""`python -m cn2_jax.export` (issue 14): the StableHLO file of a tiny model, run in a fresh python
that imports only jax and numpy, gives the Predictor's detections; the ONNX-friendly forms the ONNX
export traces equal the model's ops in JAX; ONNX (optional extra, scripts/test_onnx.sh) gives the
one-stage detector's detections (with and without DCN) and CenterNet2's dense maps and proposals
in onnxruntime, when jax2onnx / onnxruntime are installed (skipped otherwise).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cn2_jax import export
from cn2_jax.errors import ConfigError
from cn2_jax.modeling import export_mode
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


def test_candidates_give_the_models_proposals(run):
  """CenterNet2's default ONNX part: the dense maps plus the proposal decode up to the NMS; the
  host's NMS (`export.centernet2_proposals`) on its candidates gives the model's proposals."""
  predictor = Predictor(run["cfg"], run["variables"])
  fn, names = export.part_fn(predictor, "candidates")
  assert names[:3] == ["cand_boxes", "cand_scores", "cand_valid"], names
  pre = [predictor.preprocess(_image(i, 120, 150 - 30 * i)) for i in range(2)]
  padded, hw = np.concatenate([p[0] for p in pre]), np.concatenate([p[1] for p in pre])
  model, variables = predictor.model, predictor.variables

  def both(image, image_hw):
    _, state = model.apply(
        variables, dict(image=image, image_hw=image_hw), train=False, mutable=["intermediates"]
    )
    return fn(image, image_hw), state["intermediates"]["proposal_generator"]

  out, head = jax.jit(both)(padded, hw)
  out = dict(zip(names, out))
  k = run["cfg"].model.centernet.pre_nms_topk_test
  assert out["cand_valid"].shape == (2, sum(min(k, n * n) for n in (20, 10, 5, 3, 2)))  # 160x160
  np.testing.assert_array_equal(out["hm_logits_p3"], head["head_agn_hm_logits_p3"][0])
  props = export.centernet2_proposals(out, run["cfg"].model.centernet)
  assert int(head["proposal_valid"][0].sum()) > 10
  np.testing.assert_array_equal(props["valid"], head["proposal_valid"][0])
  np.testing.assert_allclose(props["boxes"], head["proposal_boxes"][0], atol=1e-5)
  np.testing.assert_allclose(props["scores"], head["proposal_objectness"][0], atol=1e-6)


def test_onnx_friendly_ops_equal_the_models():
  """Each ONNX-friendly form (modeling/export_mode.py) computes the op it stands for (in JAX, so
  this runs without jax2onnx): ResNet's max-pool, the pseudo-NMS (plateaus and ties included),
  the two-stage top-K, the transposed conv (kernels, strides, paddings, output paddings) and the
  deformable conv (DCNv2 / v1, strides, dilations, offset groups, samples outside the map and on
  integer positions); the model's ops take the forms inside `onnx_ops()` only."""
  from cn2_jax.modeling.backbone import resnet
  from cn2_jax.modeling.onestage import decode, neck
  from cn2_jax.modeling.ops import dcn

  em = export_mode
  assert export.onnx_friendly_ops is em.onnx_ops
  assert not em.onnx_ops_enabled()
  with em.onnx_ops():
    assert em.onnx_ops_enabled()
    with em.onnx_ops(False):
      assert not em.onnx_ops_enabled()
    assert em.onnx_ops_enabled()
  assert not em.onnx_ops_enabled()

  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 9, 11, 3)).astype(np.float32)
  want = resnet.max_pool_3x3_s2_p1(x)
  np.testing.assert_array_equal(em.max_pool_3x3_s2_p1_for_onnx(x), want)
  np.testing.assert_array_equal(em.max_pool_for_onnx(x, 3, 2, 1), want)
  np.testing.assert_array_equal(em.max_pool(x, 3, 2, 1), want)
  heat = (rng.integers(0, 6, (2, 8, 10, 3)) / 5).astype(np.float32)  # many equal neighbours
  heat[0, 2:4, 3:5, 1] = 1.0  # a plateau of maxima
  np.testing.assert_array_equal(em.max_pool_for_onnx(heat, 3, 1, 1), em.max_pool(heat, 3, 1, 1))
  want = decode.pseudo_nms(heat)
  with em.onnx_ops():
    np.testing.assert_array_equal(decode.pseudo_nms(heat), want)
  # The two-stage top-K (top_k_for_onnx, divmod_for_onnx, the batch as -1) on distinct scores:
  # XLA does not specify the order of equal ones for approx_max_k (test_onnx_top_k_ties checks
  # ties in onnxruntime, where TopK orders them by index as lax.top_k does).
  heat = (rng.permutation(2 * 8 * 10 * 3).reshape(2, 8, 10, 3) / 480).astype(np.float32)
  for k in (7, 100):  # K below / above H * W
    want = decode.topk_score(heat, k)
    with em.onnx_ops():
      got = decode.topk_score(heat, k)
    for g, w in zip(got, want):
      assert g.dtype == w.dtype
      np.testing.assert_array_equal(g, w)
  idx = jnp.asarray(rng.integers(0, 1000, (3, 40)), jnp.int32)
  for b in (1, 7, 64):
    want = (idx // b, idx % b)
    for g, w in zip(em.divmod_for_onnx(idx, b), want):
      assert g.dtype == w.dtype
      np.testing.assert_array_equal(g, w)
  # approx_max_k: the same top-k where the values are distinct (the order of equal values is
  # unspecified in XLA; ONNX's TopK orders them by index: test_onnx_top_k_ties).
  scores = rng.permutation(3 * 7 * 50).reshape(3, 7, 50).astype(np.float32)
  for g, w in zip(em.top_k_for_onnx(scores, 20), jax.lax.top_k(scores, 20)):
    assert g.dtype == w.dtype
    np.testing.assert_array_equal(g, w)
  for k, s, pad, out_pad in ((4, 2, 1, 0), (3, 2, 1, 1), (2, 2, 0, 0), (4, 2, 3, 0), (3, 3, 1, 2)):
    kernel = rng.normal(size=(k, k, 3, 5)).astype(np.float32)
    kw = dict(stride=s, padding=pad, output_padding=out_pad)
    np.testing.assert_allclose(
        em.conv_transpose2d_for_onnx(x, kernel, **kw),
        neck.conv_transpose2d(x, kernel, **kw),
        rtol=1e-5,
        atol=1e-5,
    )
  for b, h, w, cin, cout, g, s, pad, d, modulated in (
      (2, 7, 9, 8, 5, 1, 1, 1, 1, True),
      (1, 8, 6, 8, 4, 2, 2, 1, 1, False),
      (2, 6, 6, 4, 3, 1, 1, 2, 2, True),
  ):
    ho, wo = dcn.deform_conv_output_size((h, w), (3, 3), s, pad, d)
    x = rng.normal(size=(b, h, w, cin)).astype(np.float32)
    offset = (rng.normal(size=(b, ho, wo, 2 * g * 9)) * 3).astype(np.float32)
    offset[0, 0, 0, :4] = [-1.0, 0.0, 2.0, -1.0]  # on the grid / at the border
    mask = rng.uniform(size=(b, ho, wo, g * 9)).astype(np.float32) if modulated else None
    kernel = rng.normal(size=(3, 3, cin, cout)).astype(np.float32)
    bias = rng.normal(size=(cout,)).astype(np.float32)
    kw = dict(stride=s, padding=pad, dilation=d, offset_groups=g)
    want = dcn.deform_conv2d(x, offset, mask, kernel, bias, **kw)
    fn = jax.jit(lambda *a, kw=kw: dcn.deform_conv2d_for_onnx(*a, **kw))
    np.testing.assert_allclose(fn(x, offset, mask, kernel, bias), want, rtol=1e-5, atol=1e-5)
    # A symbolic batch takes the batched gather.
    (n,) = jax.export.symbolic_shape("n")
    specs = [jax.ShapeDtypeStruct((n,) + a.shape[1:], a.dtype) for a in (x, offset, mask)[:2]]
    specs.append(None if mask is None else jax.ShapeDtypeStruct((n,) + mask.shape[1:], mask.dtype))
    exported = jax.export.export(
        jax.jit(lambda x_, o_, m_, kw=kw: dcn.deform_conv2d_for_onnx(x_, o_, m_, kernel, **kw))
    )(*specs)
    np.testing.assert_allclose(exported.call(x, offset, mask), want - bias, rtol=1e-5, atol=1e-5)


def _primitives(jaxpr) -> set:
  """The primitives of a jaxpr, sub-jaxprs (jit, custom_vjp, ...) included: their names,
  `call:<name>` for each jitted function and `<name>:padded` for a padded window op."""
  from jax.extend.core import jaxprs_in_params

  out = set()
  for eqn in jaxpr.eqns:
    out.add(eqn.primitive.name)
    if "name" in eqn.params:
      out.add(f"call:{eqn.params['name']}")
    if any(lo or hi for lo, hi in eqn.params.get("padding", ())):
      out.add(f"{eqn.primitive.name}:padded")  # e.g. a max-pool's -inf padding inside the window
    for sub in jaxprs_in_params(eqn.params):
      out |= _primitives(sub)
  return out


def test_onnx_ops_context_is_what_the_models_read(onestage):
  """Inside `onnx_ops()` the one-stage detector (stem max-pool, DCN neck, decode) traces with
  none of the ops jax2onnx mis-converts, outside it with the model's own ops: the modules read the
  mode where their ops are traced."""
  fn = export.detection_fn(onestage)
  specs = export.input_specs("b", (64, 64))
  plain = _primitives(jax.make_jaxpr(lambda *a: fn(*a))(*specs).jaxpr)
  with export_mode.onnx_ops():  # a new function: jax caches the trace of a function it has seen
    friendly = _primitives(jax.make_jaxpr(lambda *a: fn(*a))(*specs).jaxpr)
  xla_only = {"top_k", "rem", "reduce_window_max:padded", "custom_vjp_call", "call:deform_conv2d"}
  assert xla_only <= plain, sorted(plain)
  assert not xla_only & friendly, sorted(xla_only & friendly)
  assert "approx_top_k" in friendly, sorted(friendly)


@pytest.mark.skipif(HAS_ONNX, reason="jax2onnx is installed")
def test_onnx_without_jax2onnx_is_one_line(run):
  rc, stdout, stderr = _cli(
      ["--workdir", run["wd"], "--format", "onnx", "--out", run["root"] / "x.onnx"]
  )
  assert rc == 1 and stdout == ""
  assert stderr.count("\n") == 1 and "pip install -r requirements-onnx.txt" in stderr, stderr


def _same_boxes(got: dict, want: dict, prefix: str = ""):
  """Per image the same valid boxes (within 1e-3 px) with the same scores (within 1e-4) and the
  same number of valid rows, each score within 1e-4 of the one at its index: the order may differ
  only among scores that equal within 1e-4."""
  boxes, scores, valid = (f"{prefix}{k}" for k in ("boxes", "scores", "valid"))
  np.testing.assert_array_equal(got[valid].sum(1), want[valid].sum(1))
  np.testing.assert_allclose(got[scores], want[scores], atol=1e-4, rtol=0)
  for g_box, g_score, w_box, w_score, w_ok in zip(
      got[boxes], got[scores], want[boxes], want[scores], want[valid]
  ):
    free = np.ones(len(g_box), bool)
    for i in np.flatnonzero(w_ok):
      close = (np.abs(g_box - w_box[i]).max(1) <= 1e-3) & (np.abs(g_score - w_score[i]) <= 1e-4)
      match = np.flatnonzero(close & free)
      assert len(match), (i, w_box[i], w_score[i])
      free[match[0]] = False


@pytest.mark.skipif(not HAS_ONNX, reason="needs jax2onnx + onnxruntime (scripts/test_onnx.sh)")
def test_onnx_matches_jax(run):
  import onnxruntime as ort

  path = run["root"] / "cn2.onnx"
  rc, stdout, stderr = _cli(
      ["--workdir", run["wd"], "--weights", run["weights"], "--format", "onnx", "--out", path]
      + ["--onnx-part", "candidates"]
  )
  assert rc == 0, stderr
  assert "image          uint8[b,160,160,3]" in stdout, stdout
  assert "p3             float32[b,20,20,32]" in stdout, stdout
  assert "cand_valid     bool[b,394]" in stdout, stdout  # 256 + 100 + 25 + 9 + 4 (pre_nms_topk 256)
  assert json.loads(open(f"{path}.json").read())["onnx_part"] == "candidates"
  predictor = Predictor(run["cfg"], run["variables"])
  fn, names = export.part_fn(predictor, "candidates")
  pre = [predictor.preprocess(_image(i, 120, 150 - 30 * i)) for i in range(2)]
  padded, hw = np.concatenate([p[0] for p in pre]), np.concatenate([p[1] for p in pre])
  want = jax.jit(fn)(padded, hw)  # JAX with the model's own ops
  sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  assert [o.name for o in sess.get_outputs()] == names
  got = sess.run(None, {"image": padded, "image_hw": hw})  # a batch of 2: the batch is symbolic
  for name, g, w in zip(names, got, want):
    w = np.asarray(w)
    assert g.shape == w.shape, name
    if name.startswith("cand_"):
      continue
    # 1e-4 of the output's largest magnitude (absolute for outputs within +-1): the head maps are
    # within ~1e-5, the unnormalised FPN features (|x| up to ~8) within ~1.3e-4 absolute.
    assert np.abs(g - w).max() <= 1e-4 * max(1.0, np.abs(w).max()), name
  # The proposal decode: the same candidates, and the host NMS on them gives the same proposals
  # (up to the order of scores within ~1e-7 of each other: onnxruntime's sigmoid is not XLA's).
  got, want = dict(zip(names, got)), dict(zip(names, (np.asarray(w) for w in want)))
  _same_boxes(got, want, "cand_")
  centernet = run["cfg"].model.centernet
  got, want = (export.centernet2_proposals(c, centernet) for c in (got, want))
  assert int(want["valid"].sum()) > 10
  _same_boxes(got, want)
  # The proposals have no final boxes: --orig-hw is refused in one line.
  rc, stdout, stderr = _cli(
      ["--workdir", run["wd"], "--format", "onnx", "--orig-hw", "--out", run["root"] / "y.onnx"]
      + ["--onnx-part", "candidates"]
  )
  assert rc == 1 and stderr.count("\n") == 1 and "--onnx-part detector" in stderr, stderr


@pytest.fixture(scope="module")
def onestage(_fast):
  """The one-stage family (configs/centernet_demo.py, random weights) on a 64x64 canvas."""
  from cn2_jax.config import load_config_file

  cfg = load_config_file(os.path.join(REPO, "configs", "centernet_demo.py"))
  cfg.data.min_size_test, cfg.data.max_size_test, cfg.data.pad_hw_test = 48, 64, (64, 64)
  cfg.model.onestage.use_deform = True  # centerX's DCNv2 neck (the demo config has plain convs)
  cfg.model.onestage.mask_canvas = True  # the family's default (the demo config turns it off)
  return Predictor(cfg, detector.init_variables(cfg.model, seed=1))


def _without_dcn(predictor):
  cfg = predictor.config.copy_and_resolve_references()
  cfg.model.onestage.use_deform = False
  return Predictor(cfg, detector.init_variables(cfg.model, seed=1))


def test_onnx_friendly_onestage_detector(onestage):
  """The whole one-stage detector (DCN neck, pseudo-NMS, top-K decode) traced with the ONNX-friendly
  ops gives the model's detections in JAX."""
  padded, hw, _ = onestage.preprocess(_image(4, 40, 60))
  fn = export.detection_fn(onestage)
  want = jax.jit(fn)(padded, hw)
  with export_mode.onnx_ops():
    got = jax.jit(lambda i, h: fn(i, h))(padded, hw)  # a new function: traced afresh
  for k in export.OUTPUT_KEYS:
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), atol=1e-5, err_msg=k)


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
def test_onnx_top_k_ties():
  """The converted two-stage top-K orders equal scores as `lax.top_k` does (lower index first):
  a pseudo-NMSed heatmap with plateaus, ties at the cut and more K than peaks (zeros)."""
  import jax2onnx
  import onnxruntime as ort

  from cn2_jax.modeling.onestage import decode

  heat = (np.random.default_rng(1).integers(0, 6, (2, 8, 10, 3)) / 5).astype(np.float32)
  heat = np.asarray(decode.pseudo_nms(heat))
  for k in (7, 100):
    with export_mode.onnx_ops():
      proto = jax2onnx.to_onnx(
          lambda h, k=k: decode.topk_score(h, k),
          [jax.ShapeDtypeStruct(jax.export.symbolic_shape("b") + heat.shape[1:], jnp.float32)],
          opset=18,
      )
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: heat})
    for g, w in zip(got, decode.topk_score(heat, k)):
      np.testing.assert_array_equal(g, np.asarray(w))


@pytest.mark.skipif(not HAS_ONNX, reason="needs jax2onnx + onnxruntime (scripts/test_onnx.sh)")
def test_onnx_cli_onestage(tmp_path, onestage):
  """`python -m cn2_jax.export --format onnx` in a fresh process (the module runs as __main__)
  on a one-stage run: the whole detector, JAX's dtypes (int32 classes) at a static batch too."""
  import onnxruntime as ort

  wd = tmp_path / "run"
  wd.mkdir()
  (wd / "config.json").write_text(onestage.config.to_json_best_effort())
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  path = tmp_path / "det.onnx"
  argv = ["--workdir", wd, "--random-weights", "--format", "onnx", "--out", path, "--batch", "1"]
  proc = subprocess.run(
      [sys.executable, "-m", "cn2_jax.export"] + [str(a) for a in argv],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "classes        int32[1,20]" in proc.stdout, proc.stdout
  assert json.loads(open(f"{path}.json").read())["onnx_part"] == "detector"
  sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  padded, hw, _ = onestage.preprocess(_image(6, 40, 60))
  out = sess.run(None, {"image": padded, "image_hw": hw})
  assert [o.dtype for o in out] == [np.float32, np.float32, np.int32, np.bool_]


def _detections_match(got: dict, want: dict):
  """Identical detections: the same classes and validity in the same order, scores within 1e-4,
  boxes within 1e-3 px."""
  want = {k: np.asarray(v) for k, v in want.items()}
  np.testing.assert_array_equal(got["classes"], want["classes"])
  np.testing.assert_array_equal(got["valid"], want["valid"])
  np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(got["boxes"], want["boxes"], atol=1e-3, rtol=0)


@pytest.mark.skipif(not HAS_ONNX, reason="needs jax2onnx + onnxruntime (scripts/test_onnx.sh)")
@pytest.mark.parametrize("use_deform", [True, False], ids=["dcn", "plain"])
def test_onnx_onestage_detector(onestage, use_deform):
  """The whole one-stage detector as ONNX (preprocessing, backbone, neck with or without DCN,
  heads, pseudo-NMS, top-K, boxes; symbolic batch): onnxruntime gives the Predictor's forward's
  detections for a batch of 2 images of different sizes."""
  import onnxruntime as ort

  predictor = onestage if use_deform else _without_dcn(onestage)
  proto, names = export.export_onnx(predictor)
  assert names == list(export.OUTPUT_KEYS)
  sig = export.onnx_signature(proto)
  assert sig["inputs"] == {"image": "uint8[b,64,64,3]", "image_hw": "int32[b,2]"}, sig
  assert sig["outputs"] == {
      "boxes": "float32[b,20,4]",
      "scores": "float32[b,20]",
      "classes": "int32[b,20]",
      "valid": "bool[b,20]",
  }, sig
  pre = [predictor.preprocess(_image(i, 40, 60 - 20 * i)) for i in range(2)]
  padded, hw = np.concatenate([p[0] for p in pre]), np.concatenate([p[1] for p in pre])
  sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
  got = dict(zip(names, sess.run(None, {"image": padded, "image_hw": hw})))
  want = predictor._apply(predictor.variables, padded, hw, hw)
  assert np.asarray(want["scores"])[:, 0].min() > 0.1
  _detections_match(got, want)


@pytest.mark.skipif(not HAS_ONNX, reason="needs jax2onnx + onnxruntime (scripts/test_onnx.sh)")
def test_onnx_onestage_orig_hw_and_dense(onestage):
  """`orig_hw` (boxes in original pixels) as the StableHLO export has it, at a static batch of 1
  (DCN's flat gather), and the centerX-style dense part (cls / wh / reg maps, within 1e-4) of
  `--onnx-part dense`; the DCN model."""
  import onnxruntime as ort

  predictor = onestage
  proto, names = export.export_onnx(predictor, batch=1, orig_hw=True)
  assert export.onnx_signature(proto)["outputs"]["classes"] == "int32[1,20]"
  padded, hw, orig = predictor.preprocess(_image(5, 90, 70))
  sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
  got = dict(zip(names, sess.run(None, {"image": padded, "image_hw": hw, "orig_hw": orig})))
  _detections_match(got, predictor._apply(predictor.variables, padded, hw, orig))

  proto, names = export.export_onnx(predictor, part="dense")
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


# ------------------------------------------------------------------------ --check IMAGE (issue 26)
def _image_file(tmp_path, seed=7, h=90, w=130) -> str:
  from PIL import Image

  path = str(tmp_path / f"img{seed}.png")
  Image.fromarray(_image(seed, h, w)).save(path)
  return path


def test_check_runs_the_file_against_the_predictor(tmp_path, run):
  """`--check IMAGE --check-out FILE`: the StableHLO file of CenterNet2 run on the image as the
  Predictor preprocesses it gives the Predictor's detections (all matched, exit 0); the JSON holds
  the file's detections in original pixels."""
  image, out_json = _image_file(tmp_path), tmp_path / "dets.json"
  argv = ["--workdir", run["wd"], "--weights", run["weights"], "--out", tmp_path / "m.stablehlo"]
  rc, stdout, stderr = _cli(argv + ["--check", image, "--check-out", out_json])
  assert rc == 0, stderr + stdout
  want = Predictor(run["cfg"], run["variables"])(image)
  n = len(want["scores"])
  assert n > 0 and f"{n}/{n} detections matched" in stdout and ": ok" in stdout, stdout
  rows = json.loads(out_json.read_text())
  assert [sorted(row) for row in rows] == [["box", "label", "score"]] * n
  np.testing.assert_allclose([row["box"] for row in rows], want["boxes"], atol=1e-3)
  np.testing.assert_allclose([row["score"] for row in rows], want["scores"], atol=1e-6)
  assert [row["label"] for row in rows] == [int(c) for c in want["classes"]]


def _normalized_by_metadata(norm: dict, canvas: np.ndarray, hw: np.ndarray) -> np.ndarray:
  """FILE.json's normalization applied in numpy, as a user would: an independent reference."""
  order = {"RGB": [0, 1, 2], "BGR": [2, 1, 0]}[norm["channels"]]
  x = canvas.astype(np.float64)[..., order] * np.asarray(norm["multiply"]) + np.asarray(norm["add"])
  rows, cols = np.arange(canvas.shape[1]), np.arange(canvas.shape[2])
  inside = (rows[None, :, None] < hw[:, 0, None, None]) & (
      cols[None, None, :] < hw[:, 1, None, None]
  )
  return np.where(inside[..., None], x, 0.0).astype(np.float32)


def test_normalized_nchw_input(tmp_path, run, onestage):
  """`--input normalized --layout nchw`: the file takes float32 [N, 3, H, W], the image as the
  model's preprocessing normalises it (FILE.json's normalization, checked in numpy against the
  family's own preprocess for both families: CenterNet2's BGR minus mean, the one-stage family's
  x / 255 minus mean over std), and gives the Predictor's detections (`--check` exits 0)."""
  image = _image_file(tmp_path)
  out = tmp_path / "n.stablehlo"
  argv = ["--workdir", run["wd"], "--weights", run["weights"], "--out", out]
  rc, stdout, stderr = _cli(argv + ["--input", "normalized", "--layout", "nchw", "--check", image])
  assert rc == 0, stderr + stdout
  assert "image          float32[b,3,160,160]" in stdout, stdout
  assert "detections matched" in stdout and ": ok" in stdout, stdout
  meta = json.loads(open(f"{out}.json").read())["preprocess"]
  assert (meta["input"], meta["layout"]) == ("normalized", "nchw")
  for predictor, norm in (
      (Predictor(run["cfg"], run["variables"]), meta["normalization"]),
      (onestage, export.input_normalization(onestage)),
  ):
    canvas, hw, _ = predictor.preprocess(_image(5, 40, 60))
    want = predictor.model.apply(predictor.variables, canvas, hw, method="preprocess")
    np.testing.assert_allclose(_normalized_by_metadata(norm, canvas, hw), want, atol=2e-5)
  assert meta["normalization"]["channels"] == run["cfg"].model.input_format
  np.testing.assert_allclose(
      meta["normalization"]["add"],
      -np.asarray(run["cfg"].model.pixel_mean) / np.asarray(run["cfg"].model.pixel_std),
      rtol=1e-6,
  )
  with pytest.raises(ConfigError, match="--input must be one of"):
    export.input_specs(1, (64, 64), image_input="float")


def test_check_orig_hw_file_and_a_mismatch(tmp_path, files, run, monkeypatch):
  """The check of the --orig-hw file (boxes already in original pixels) passes; a file whose
  detections differ (one box moved by 0.01 px, one detection dropped) fails with the count."""
  from cn2_jax import export_check

  predictor = Predictor(run["cfg"], run["variables"])
  image = _image_file(tmp_path)
  data = files["c"][0].read_bytes()
  result = export_check.check_export(
      predictor, "stablehlo", data, (160, 160), image, with_orig_hw=True
  )
  n = len(predictor(image)["scores"])
  assert result.ok and result.matched == n > 0 and result.max_box_diff < 1e-3, result
  real = export_check.run_exported

  def perturbed(*args, **kwargs):
    out = {k: np.array(v) for k, v in real(*args, **kwargs).items()}
    out["boxes"][0, 0, 0] += 0.01
    out["valid"][0, 1] = False
    return out

  monkeypatch.setattr(export_check, "run_exported", perturbed)
  data = files["a"][0].read_bytes()
  result = export_check.check_export(predictor, "stablehlo", data, (160, 160), image)
  assert not result.ok and (result.matched, result.exported, result.reference) == (n - 2, n - 1, n)
  assert f"{n - 2}/{n} detections matched" in result.line("x") and "MISMATCH" in result.line("x")


def test_check_matching_rules():
  """Greedy matching by class and box: a swapped score order still matches; another class, a box
  beyond box_tol or a score beyond score_tol does not."""
  from cn2_jax.export_check import compare

  want = dict(
      boxes=np.array([[0, 0, 10, 10], [5, 5, 20, 20]], np.float32),
      scores=np.array([0.9, 0.8], np.float32),
      classes=np.array([1, 2]),
  )
  swapped = {k: v[::-1].copy() for k, v in want.items()}
  assert compare(swapped, want).ok
  for change in (
      lambda d: d["classes"].__setitem__(0, 3),
      lambda d: d["boxes"].__setitem__((0, 2), 10.01),
      lambda d: d["scores"].__setitem__(0, 0.9003),
  ):
    got = {k: v.copy() for k, v in want.items()}
    change(got)
    result = compare(got, want)
    assert not result.ok and result.matched == 1


def test_check_bad_input_is_one_line(tmp_path, files, run):
  from cn2_jax import export_check
  from cn2_jax.errors import DataError

  argv = ["--workdir", run["wd"], "--weights", run["weights"], "--out", tmp_path / "m.stablehlo"]
  rc, _, stderr = _cli(argv + ["--check-out", tmp_path / "d.json"])
  assert rc == 1 and stderr.strip() == "error: --check-out needs --check IMAGE", stderr
  predictor = Predictor(run["cfg"], run["variables"])
  with pytest.raises(DataError, match="missing.jpg"):
    export_check.check_export(
        predictor,
        "stablehlo",
        files["a"][0].read_bytes(),
        (160, 160),
        str(tmp_path / "missing.jpg"),
    )


@pytest.mark.skipif(not HAS_ONNX, reason="needs jax2onnx + onnxruntime (scripts/test_onnx.sh)")
def test_onnx_check_onestage(tmp_path, onestage):
  """`--format onnx --check IMAGE`: onnxruntime runs the one-stage detector file on the image
  preprocessed as the Predictor does; all detections match."""
  wd = tmp_path / "run"
  wd.mkdir()
  (wd / "config.json").write_text(onestage.config.to_json_best_effort())
  variables_path = save_variables(onestage.variables, tmp_path / "weights")
  argv = ["--workdir", wd, "--weights", variables_path, "--format", "onnx", "--out"]
  rc, stdout, stderr = _cli(
      argv + [tmp_path / "d.onnx", "--check", _image_file(tmp_path, h=40, w=60)]
  )
  assert rc == 0, stderr + stdout
  assert "detections matched" in stdout and ": ok" in stdout, stdout


@pytest.mark.onnx_step
def test_onnx_forms_of_centernet2_equal_the_models():
  """CenterNet2's ONNX-friendly forms compute the model's ops in JAX: the batched NMS (ties,
  duplicate boxes, invalid rows, all-invalid rows, more outputs than boxes, tiles of 1..N,
  leading batch dimensions) and its two-sort order, the level assignment without frexp (boxes
  exactly at the level thresholds, just below them, empty / negative / NaN / infinite areas), the
  proposal decode, adaptive ROIAlign's windows of all boxes at once and the final per-class
  inference (distinct scores: the top-k order of equal ones is unspecified in XLA's
  approx_max_k)."""
  from cn2_jax.modeling.ops import nms as nms_ops
  from cn2_jax.modeling.ops import roi_align
  from cn2_jax.modeling.proposal import decode as pdecode
  from cn2_jax.modeling.roi_heads import cascade

  rng = np.random.default_rng(0)
  for b, n, max_out, tile, thr in ((3, 40, 12, 8, 0.5), (2, 30, 45, 512, 0.3), (2, 7, 3, 1, 0.0)):
    xy = rng.integers(0, 30, (b, n, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.integers(0, 15, (b, n, 2))], -1).astype(np.float32)
    boxes[:, 1:n:5] = boxes[:, 0 : n - 1 : 5]  # duplicates (IoU 1, and 0/0 for empty boxes)
    scores = (rng.integers(0, 5, (b, n)) / 4).astype(np.float32)  # many equal scores
    valid = rng.uniform(size=(b, n)) > 0.25
    valid[-1] = False  # a row without any valid box
    want = jax.vmap(lambda x, s, v: nms_ops.nms.__wrapped__(x, s, v, thr, max_out, tile_size=tile))(
        boxes, scores, valid
    )
    got = nms_ops.nms_for_onnx(boxes, scores, valid, thr, max_out, tile_size=tile)
    for g, w in zip(got, want):
      assert g.dtype == w.dtype and g.shape == w.shape
      np.testing.assert_array_equal(g, w)
    with export_mode.onnx_ops():  # the dispatch, with leading dimensions [1, B]
      got = nms_ops.nms(boxes[None], scores[None], valid[None], thr, max_out, tile_size=tile)
    np.testing.assert_array_equal(got[0][0], want[0])
    iota = np.broadcast_to(np.arange(n, dtype=np.int32), (b, n))
    _, _, order = jax.lax.sort(((~valid).astype(np.int32), -scores, iota), num_keys=3)
    np.testing.assert_array_equal(nms_ops.sort_order_for_onnx(scores, valid), order)

  # Level thresholds of canonical 224 / level 4 on P3..P7: sqrt(area) / 224 + 1e-8 = 2**j exactly
  # for a side of 224 * 2**j (the 1e-8 vanishes in float32 at these magnitudes), and just below.
  sides = [224.0 * 2.0**j for j in range(-3, 5)]
  sides += [np.nextafter(np.float32(v), np.float32(0)) for v in sides] + [0.0, 1.0, 3e4]
  boxes = np.array([[0.0, 0.0, v, v] for v in sides], np.float32)
  odd = np.array(
      [[5, 5, 1, 1], [0, 0, -3, 2], [0, 0, np.nan, 3], [0, 0, np.inf, 4], [0, 0, 2, np.inf]],
      np.float32,
  )
  boxes = np.concatenate([boxes, odd, rng.uniform(0, 900, (50, 4)).astype(np.float32)])
  args = (3, 7, 224.0, 4)
  want = roi_align.assign_boxes_to_levels(boxes, *args)
  assert len(set(np.asarray(want).tolist())) == 5
  np.testing.assert_array_equal(roi_align.assign_boxes_to_levels_for_onnx(boxes, *args), want)
  np.testing.assert_array_equal(
      roi_align.assign_boxes_to_levels_for_onnx(boxes.reshape(1, -1, 4), 2, 6, 64.0, 3),
      roi_align.assign_boxes_to_levels(boxes.reshape(1, -1, 4), 2, 6, 64.0, 3),
  )

  # The proposal decode: distinct logits (two images, three levels), off-canvas locations as -inf.
  shapes = ((8, 8), (4, 4), (2, 2))
  logits = [
      rng.permutation(2 * h * w).reshape(2, h, w).astype(np.float32) / 8 - 6 for h, w in shapes
  ]
  logits[0][1, 5:] = -np.inf
  reg = [rng.uniform(0, 3, (2, h, w, 4)).astype(np.float32) for h, w in shapes]
  kw = dict(strides=(8, 16, 32), pre_nms_topk=20, post_nms_topk=16, nms_thresh=0.6)
  for clip in (None, np.array([[60, 50], [40, 64]], np.int32)):
    want = pdecode.generate_proposals(logits, reg, score_thresh=1e-4, clip_hw=clip, **kw)
    got = pdecode.generate_proposals_for_onnx(logits, reg, score_thresh=1e-4, clip_hw=clip, **kw)
    assert int(np.asarray(want["valid"]).sum()) > 10
    for k in ("boxes", "scores", "valid"):
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)

  # Adaptive ROIAlign's windows of every box at once (no loop over a symbolic box count): two
  # images on a 5-level pyramid, boxes wide, tall, larger than the canvas, empty, inverted, NaN
  # and off the map, with and without an official extent smaller than the arrays.
  shapes = ((40, 48), (20, 24), (10, 12), (5, 6), (3, 3))
  feats = [rng.normal(size=(2, h, w, 8)).astype(np.float32) for h, w in shapes]
  xy = rng.uniform(-20, 380, (2, 40, 2)).astype(np.float32)
  boxes = np.concatenate([xy, xy + rng.uniform(0, 200, (2, 40, 2))], -1).astype(np.float32)
  boxes[:, :8] = np.array(
      [[0, 0, 384, 320], [10, 10, 12, 300], [5, 5, 380, 9], [50, 50, 50, 50], [30, 30, 20, 20],
       [0, 0, np.nan, 5], [-50, -50, -10, -10], [370, 310, 500, 400]],
      np.float32,
  )  # fmt: skip
  kw = dict(min_level=3, output_size=7, sampling_ratio=0, aligned=True, canonical_box_size=224.0)
  kw.update(canonical_level=4, max_adaptive_samples=(24, 24))
  for valid_hw in (None, np.array([[38, 40], [19, 20], [10, 10], [5, 5], [3, 3]], np.int32)):
    pool = lambda f, b, v=valid_hw: roi_align.multilevel_roi_align(f, b, valid_hw=v, **kw)
    want = jax.jit(pool)(feats, boxes)
    with export_mode.onnx_ops():
      got = jax.jit(lambda f, b: pool(f, b))(feats, boxes)
    assert float(np.abs(want).max()) > 1
    np.testing.assert_array_equal(got, want)

  # The final inference: 2 images, 24 boxes, 5 classes (+ background), padded rows.
  xy = rng.uniform(-5, 50, (2, 24, 2)).astype(np.float32)
  boxes = np.concatenate([xy, xy + rng.uniform(1, 30, (2, 24, 2))], -1).astype(np.float32)
  boxes[:, 3:24:4] = boxes[:, 2:24:4] + 0.5  # overlapping pairs
  scores = rng.permutation(2 * 24 * 6).reshape(2, 24, 6).astype(np.float32) / 288
  valid = np.ones((2, 24), bool)
  valid[1, 20:] = False
  hw = np.array([[40, 60], [64, 32]], np.int32)
  kw = dict(score_thresh=0.3, nms_thresh=0.5, topk=30)
  want = cascade.fast_rcnn_inference_batch(boxes, scores, valid, hw, **kw)
  got = cascade.fast_rcnn_inference_batch_for_onnx(boxes, scores, valid, hw, **kw)
  assert int(np.asarray(want["valid"]).sum()) > 10
  for k in want:
    assert got[k].dtype == want[k].dtype, k
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.onnx_step
def test_onnx_forms_of_zoo_ops_equal_the_models():
  """The forms that the zoo's other architectures need compute the model's ops in JAX: the
  class-aware batched NMS of the official one-stage CenterNet (every `batched_nms` mode; rows on
  both sides of torchvision_cpu's 4000-coordinate switch; ties, duplicate boxes of other classes,
  negative coordinates, invalid and all-invalid rows), its whole decode (`predict_instances`,
  distinct scores: XLA's approx_max_k leaves the order of equal ones unspecified), DLA's depthwise
  transposed convolution and the MaxPool2d(k) of DLA and BiFPN."""
  from cn2_jax.modeling import layers
  from cn2_jax.modeling.backbone import dla_up
  from cn2_jax.modeling.ops import nms as nms_ops
  from cn2_jax.modeling.proposal import onestage_decode

  rng = np.random.default_rng(3)
  b, n = 3, 1100
  xy = rng.integers(-20, 60, (b, n, 2)).astype(np.float32)
  boxes = np.concatenate([xy, xy + rng.integers(0, 25, (b, n, 2))], -1).astype(np.float32)
  boxes[:, 1:n:7] = boxes[:, 0 : n - 1 : 7]  # duplicates (of the same class or another)
  scores = (rng.integers(0, 9, (b, n)) / 8).astype(np.float32)  # many equal scores
  classes = rng.integers(0, 4, (b, n)).astype(np.int32)
  valid = np.ones((b, n), bool)
  valid[1] = rng.uniform(size=n) > 0.2  # < 1000 valid: the offset trick in torchvision_cpu
  valid[2] = False
  for mode, max_out, tile, thr in (
      ("per_class", 50, 128, 0.5),
      ("offset", 1200, 512, 0.3),
      ("torchvision_cpu", 50, 128, 0.5),
      ("torchvision_cpu", 1200, 512, 0.3),
      ("torchvision_cuda", 60, 256, 0.5),
  ):
    kw = dict(mode=mode, tile_size=tile)
    want = nms_ops.batched_nms_batch(boxes, scores, classes, valid, thr, max_out, **kw)
    with export_mode.onnx_ops():
      got = nms_ops.batched_nms_batch(boxes, scores, classes, valid, thr, max_out, **kw)
    for g, w in zip(got, want):
      assert g.dtype == w.dtype and g.shape == w.shape
      np.testing.assert_array_equal(g, w, err_msg=mode)
    assert np.asarray(want[1])[:2].sum() >= 2 * 50  # rows 0 and 1 keep many boxes

  levels = [(2, 8, 10, 3, 8), (2, 4, 5, 3, 16)]
  logits = [rng.normal(size=(bb, h, w, c)).astype(np.float32) for bb, h, w, c, _ in levels]
  reg = [rng.uniform(0, 3, (bb, h, w, 4)).astype(np.float32) for bb, h, w, _, _ in levels]
  masks = [np.ones((bb, h, w), bool) for bb, h, w, _, _ in levels]
  masks[0][1, 5:] = False
  for kw in (dict(nms_thresh=0.6), dict(nms_thresh=0.6, center_nms=True)):
    kw.update(strides=[lv[-1] for lv in levels], pre_nms_topk=100, post_nms_topk=40)
    fn = lambda lg, rg, ms, kw=kw: onestage_decode.predict_instances(  # noqa: E731
        lg, rg, ms, score_thresh=0.3, **kw
    )
    want = jax.jit(fn)(logits, reg, masks)
    with export_mode.onnx_ops():
      got = jax.jit(lambda *a: fn(*a))(logits, reg, masks)  # a new function: traced afresh
    assert int(np.asarray(want["valid"]).sum()) > 20
    for k in want:
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)

  for f, h, w in ((2, 5, 7), (4, 8, 8), (8, 1, 3)):
    x = rng.normal(size=(2, h, w, 6)).astype(np.float32)
    kernel = rng.normal(size=(2 * f, 2 * f, 1, 6)).astype(np.float32)
    want = dla_up.depthwise_conv_transpose(x, kernel, f)
    with export_mode.onnx_ops():
      got = dla_up.depthwise_conv_transpose(x, kernel, f)
    assert got.shape == want.shape == (2, h * f, w * f, 6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  x = rng.normal(size=(2, 9, 7, 3)).astype(np.float32)
  x[0, 0, 0] = -np.inf
  for size in (2, 3):
    want = layers.max_pool(x, size)
    with export_mode.onnx_ops():
      got = layers.max_pool(x, size)
    assert got.shape == want.shape == (2, 9 // size, 7 // size, 3)
    np.testing.assert_array_equal(got, want)


@pytest.mark.onnx_step
def test_onnx_friendly_centernet2_detector(run):
  """The whole CenterNet2 traced with the ONNX-friendly forms (inside `onnx_ops()`) gives the
  model's detections in JAX, for a batch of 2 images of different sizes."""
  predictor = Predictor(run["cfg"], run["variables"])
  pre = [predictor.preprocess(_image(i, 120, 150 - 30 * i)) for i in range(2)]
  padded, hw = np.concatenate([p[0] for p in pre]), np.concatenate([p[1] for p in pre])
  fn = export.detection_fn(predictor)
  want = jax.jit(fn)(padded, hw)
  with export_mode.onnx_ops():
    got = jax.jit(lambda i, h: fn(i, h))(padded, hw)  # a new function: traced afresh
  assert int(np.asarray(want["valid"]).sum()) > 10
  for k in export.OUTPUT_KEYS:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


@pytest.mark.skipif(not HAS_ONNX, reason="needs jax2onnx + onnxruntime (scripts/test_onnx.sh)")
@pytest.mark.parametrize("sampling_ratio", [2, 0], ids=["fixed2", "adaptive"])
def test_onnx_centernet2_detector(run, tmp_path, sampling_ratio):
  """The whole CenterNet2 as ONNX (`--onnx-part detector`, the default: preprocessing, backbone,
  proposal decode and NMS, ROIAlign, the cascade, the per-class NMS and top-K; symbolic batch):
  onnxruntime gives the Predictor's forward's detections for a batch of 2 images of different
  sizes, and `--check`'s comparison passes on an image file; with ROIAlign's fixed 2x2 sampling
  and its adaptive sampling (0, the official models')."""
  import onnxruntime as ort

  from cn2_jax import export_check

  cfg = run["cfg"].copy_and_resolve_references()
  cfg.model.roi_heads.sampling_ratio = sampling_ratio
  predictor = Predictor(cfg, run["variables"])
  proto, names = export.export_onnx(predictor)
  assert names == list(export.OUTPUT_KEYS)
  sig = export.onnx_signature(proto)
  assert sig["inputs"] == {"image": "uint8[b,160,160,3]", "image_hw": "int32[b,2]"}, sig
  assert sig["outputs"] == {
      "boxes": "float32[b,20,4]",
      "scores": "float32[b,20]",
      "classes": "int32[b,20]",
      "valid": "bool[b,20]",
  }, sig
  data = proto.SerializeToString()
  pre = [predictor.preprocess(_image(i, 120, 150 - 30 * i)) for i in range(2)]
  padded, hw = np.concatenate([p[0] for p in pre]), np.concatenate([p[1] for p in pre])
  sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
  got = dict(zip(names, sess.run(None, {"image": padded, "image_hw": hw})))
  want = {
      k: np.asarray(v) for k, v in predictor._apply(predictor.variables, padded, hw, hw).items()
  }
  assert int(want["valid"].sum()) > 10
  np.testing.assert_array_equal(got["valid"], want["valid"])
  _same_boxes(got, want)  # the order may differ only among scores equal within 1e-4
  np.testing.assert_array_equal(  # and the classes with them
      np.sort(np.where(got["valid"], got["classes"], -1), 1),
      np.sort(np.where(want["valid"], want["classes"], -1), 1),
  )
  result = export_check.check_export(
      predictor, "onnx", data, (160, 160), _image_file(tmp_path, h=120, w=150)
  )
  assert result.ok and result.matched > 0, result


@pytest.mark.skipif(not HAS_ONNX, reason="needs jax2onnx + onnxruntime (scripts/test_onnx.sh)")
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_onnx_normalized_input(run, tmp_path, onestage, layout):
  """`--input normalized` in ONNX: CenterNet2's whole detector and the one-stage detector take the
  normalised float32 image (NHWC or NCHW, symbolic batch) and give the Predictor's detections in
  onnxruntime (`--check`'s comparison on an image file)."""
  from cn2_jax import export_check

  predictor = Predictor(run["cfg"], run["variables"])
  for model, hw, size in ((predictor, (160, 160), (120, 150)), (onestage, (64, 64), (40, 60))):
    proto, _ = export.export_onnx(model, image_input="normalized", layout=layout)
    h, w = hw
    shape = "b,3,{},{}".format(h, w) if layout == "nchw" else "b,{},{},3".format(h, w)
    assert export.onnx_signature(proto)["inputs"]["image"] == f"float32[{shape}]"
    result = export_check.check_export(
        model,
        "onnx",
        proto.SerializeToString(),
        hw,
        _image_file(tmp_path, h=size[0], w=size[1]),
        image_input="normalized",
        layout=layout,
    )
    assert result.ok and result.matched > 0, result


@pytest.mark.skipif(not HAS_ONNX, reason="needs jax2onnx + onnxruntime (scripts/test_onnx.sh)")
def test_onnx_centernet2_nms_plugin(run, tmp_path, onestage):
  """`--nms plugin`: the graph ends with one EfficientNMS_TRT node (domain TRT, the model's
  test-time score threshold / NMS IoU / detections per image, no background class, raw scores,
  corner boxes) on boxes [b, R, 1, 4] and scores [b, R, K], giving the plugin's four outputs. The
  graph before it (run in onnxruntime without the node) gives the model's pre-NMS boxes and
  scores, and the model's own per-class NMS on them gives the Predictor's detections: the cut
  loses nothing. The CLI refuses --check, --orig-hw and the one-stage family with it."""
  import onnx
  import onnxruntime as ort

  from cn2_jax.modeling.roi_heads import cascade

  cfg = run["cfg"].copy_and_resolve_references()
  cfg.model.roi_heads.sampling_ratio = 0
  heads = cfg.model.roi_heads
  predictor = Predictor(cfg, run["variables"])
  proto, names = export.export_onnx(predictor, nms="plugin")
  assert names == list(export.PLUGIN_OUTPUTS)
  r, k, m = cfg.model.centernet.post_nms_topk_test, cfg.model.num_classes, 20
  assert heads.detections_per_image == m
  assert export.onnx_signature(proto) == dict(
      inputs={"image": "uint8[b,160,160,3]", "image_hw": "int32[b,2]"},
      outputs={
          "num_detections": "int32[b,1]",
          "detection_boxes": "float32[b,20,4]",
          "detection_scores": "float32[b,20]",
          "detection_classes": "int32[b,20]",
      },
  )
  plugins = [node for node in proto.graph.node if node.op_type == "EfficientNMS_TRT"]
  assert len(plugins) == 1 and proto.graph.node[-1] == plugins[0]
  node = plugins[0]
  assert node.domain == "TRT" and list(node.output) == list(export.PLUGIN_OUTPUTS)
  assert {op.domain: op.version for op in proto.opset_import}["TRT"] == 1
  onnx.checker.check_model(proto)  # a well-formed graph (the TRT domain's op is not checked)
  attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
  assert attrs == dict(
      score_threshold=pytest.approx(heads.score_thresh_test),
      iou_threshold=pytest.approx(heads.nms_thresh_test),
      max_output_boxes=m,
      background_class=-1,
      score_activation=0,
      class_agnostic=0,
      box_coding=0,
      plugin_version=b"1",
  )
  # The node's inputs, typed as jax2onnx typed the graph's outputs before the node.
  infos = {v.name: v for v in proto.graph.value_info}

  def dims(name):
    shape = infos[name].type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in shape]

  assert dims(node.input[0]) == ["b", r, 1, 4] and dims(node.input[1]) == ["b", r, k]

  # The graph before the plugin in onnxruntime: the model's pre-NMS boxes and scores.
  pre = onnx.ModelProto()
  pre.CopyFrom(proto)
  pre.graph.node.remove(pre.graph.node[-1])
  del pre.graph.output[:]
  pre.graph.output.extend([infos[node.input[0]], infos[node.input[1]]])
  pre.opset_import.remove([op for op in pre.opset_import if op.domain == "TRT"][0])
  images = [predictor.preprocess(_image(i, 120, 150 - 30 * i)) for i in range(2)]
  padded, hw = np.concatenate([p[0] for p in images]), np.concatenate([p[1] for p in images])
  sess = ort.InferenceSession(pre.SerializeToString(), providers=["CPUExecutionProvider"])
  boxes, scores = sess.run(None, {"image": padded, "image_hw": hw})
  want = predictor.model.apply(
      predictor.variables, padded, hw, method=predictor.model.pre_nms_detections
  )
  assert int((np.asarray(want["scores"]) > 0).sum()) > 10
  np.testing.assert_allclose(boxes[:, :, 0], want["boxes"], atol=1e-3, rtol=0)
  np.testing.assert_allclose(scores, want["scores"], atol=1e-4, rtol=0)
  # The model's NMS on the cut: the detections of the whole model.
  with_bg = jnp.concatenate([want["scores"], jnp.zeros_like(want["scores"][..., :1])], -1)
  dets = cascade.fast_rcnn_inference_batch(
      want["boxes"],
      with_bg,
      jnp.ones(with_bg.shape[:2], bool),
      jnp.asarray(hw),
      score_thresh=heads.score_thresh_test,
      nms_thresh=heads.nms_thresh_test,
      topk=m,
  )
  full = predictor.model.apply(predictor.variables, dict(image=padded, image_hw=hw), train=False)
  assert int(np.asarray(full["valid"]).sum()) > 10
  for key in ("boxes", "scores", "classes", "valid"):
    np.testing.assert_array_equal(dets[key], full[key], err_msg=key)

  # The CLI: the plugin node is for TensorRT only.
  wd = str(run["wd"])
  out = str(tmp_path / "p.onnx")
  base = ["--workdir", wd, "--weights", run["weights"], "--format", "onnx", "--out", out]
  for extra, says in (
      (["--check", _image_file(tmp_path)], "onnxruntime"),
      (["--orig-hw"], "--orig-hw"),
      (["--format", "stablehlo"], "--format onnx"),
  ):
    rc, _, err = _cli(base + ["--nms", "plugin"] + extra)
    assert rc == 1 and says in err and len(err.strip().splitlines()) == 1, err
  with pytest.raises(ConfigError, match="per-class NMS"):
    export.export_onnx(onestage, nms="plugin")


@pytest.mark.zoo
@pytest.mark.skipif(not HAS_ONNX, reason="needs jax2onnx + onnxruntime (scripts/test_onnx.sh)")
def test_onnx_centernet2_r50_oracle_parity():
  """Issue 26 item 4, full size: CenterNet2 R50 (configs/cn2_r50.py: adaptive ROIAlign) with the
  regenerated official CenterNet2_R50_1x oracle weights, exported as ONNX with a symbolic batch
  on the oracle image's canvas (640x480 resized to 800x1067, canvas 800x1088): onnxruntime on
  CPU gives the Predictor's 100 detections (same classes, boxes within 1e-3 px, scores within
  1e-4; measured 3.1e-4 px / 3.4e-7). About 40 s and 4 GB on 2 cores. Marked zoo, and in the
  ONNX venv only: `bash scripts/test_onnx.sh -m zoo` (scripts/test_onnx.sh skips zoo tests by
  default); skipped without ../shared/oracle."""
  from cn2_jax import export_check
  from cn2_jax.config import load_config_file, validate_config
  from cn2_jax.convert import convert_to_flax
  from cn2_jax.testing.oracle import oracle_dir, oracle_json_path, regenerate_oracle_state_dict

  json_path = oracle_json_path()
  if json_path is None:
    pytest.skip("the official oracle (../shared/oracle) is not here")
  image = str(oracle_dir() / "000000000009.jpg")
  cfg = validate_config(load_config_file(os.path.join(REPO, "configs", "cn2_r50.py")))
  assert cfg.model.roi_heads.sampling_ratio == 0
  variables, report = convert_to_flax(
      regenerate_oracle_state_dict(json_path), detector.abstract_variables(cfg.model)
  )
  assert report.ok, report
  predictor = Predictor(cfg, variables)
  hw = (800, 1088)
  padded, _, _ = predictor.preprocess(predictor.read_image(image))
  assert padded.shape[1:3] == hw  # the Predictor's canvas
  proto, _ = export.export_onnx(predictor, hw=hw)
  assert export.onnx_signature(proto)["inputs"]["image"] == "uint8[b,800,1088,3]"
  result = export_check.check_export(predictor, "onnx", proto.SerializeToString(), hw, image)
  assert result.ok and result.matched == result.reference == 100, result
