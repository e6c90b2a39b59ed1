"""DLA-34 (modeling/backbone/dla.py) and DLA-up / DLASeg (modeling/backbone/dla_up.py) against the
official CenterNet2 zoo oracles (../shared/oracle_zoo, README there):

  * CenterNet-S4_DLA_8x: the `backbone.*` weights (DLA-34 `base` + `dla_up` + `ida_up`, modulated
    DCNv2 projections/nodes, depthwise transposed-conv upsampling) converted strictly by the
    generic converter onto `DLASeg` named `backbone`; the base levels 2..5, the four DLA-up
    outputs and the stride-4 `dla2` map on the official 608x832 input;
  * CenterNet2_DLA-BiFPN-P5_640_16x: the `backbone.bottom_up.*` weights (dlafpn.py's DLA-34) onto
    the same `DLA` module named `bottom_up`; dla3..dla5 on the official 640x896 RGB input;
  * the canvas contract: a larger zero padding with `canvas_hw` = the official canvas gives the
    same values on the canvas;
  * the depthwise transposed conv against a per-element loop over torch's definition.

Feature maps are compared as the oracle stores them (README §7): float32 crops / whole maps with
max |diff| <= 1e-4 * max |X| (measured <= 5.5e-6, the DCN outputs; the base <= 1.2e-6), float16
maps with rtol = 2e-3, atol = 2e-3 * max|X| (measured max |diff| 3.5e-4 * max|X|), per-channel
float64 sums within 1e-4 of (channel abs-sum + max|X|) (measured <= 5.1e-6; relative to the bare
abs-sum up to 6.4e-4 in nearly dead channels, see `_compare_map`). The canvas test measured 0.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cn2_jax.modeling.backbone.dla import DLA
from cn2_jax.modeling.backbone.dla_up import (
    DepthwiseConvTranspose2d,
    DLASeg,
    bilinear_upsampling_init,
    depthwise_conv_transpose,
)
from cn2_jax.testing.oracle import regenerate_oracle_state_dict
from cn2_jax.testing.zoo_oracle import zoo_dir
from cn2_jax.weights.flax_mapping import convert_to_flax
from cn2_jax.weights.rename import to_detectron2_names

# Full-size official-zoo oracle checks: scripts/test_zoo.sh (CI runs it after the suite).
pytestmark = pytest.mark.zoo


ZOO = zoo_dir()
S4 = "CenterNet-S4_DLA_8x"
BIFPN = "CenterNet2_DLA-BiFPN-P5_640_16x"
IMAGE = "000000000009"
F32_TOL = 1e-4  # max |diff| / max |X|
SUM_TOL = 1e-4  # per-channel |sum diff| / (channel abs-sum + max |X|)

needs_zoo = pytest.mark.skipif(
    ZOO is None or not all((ZOO / f"outputs_{a}_{IMAGE}.npz").is_file() for a in (S4, BIFPN)),
    reason="../shared/oracle_zoo not found: the DLA parity tests need the zoo oracle outputs",
)


# ----------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------
def _network_input(out) -> np.ndarray:
  """README §5: the stored resized BGR image (flipped to RGB for RGB models), (x - mean) / std in
  float32, zero-padded bottom/right to the official canvas. `[1, Hp, Wp, 3]`."""
  img = out["resized_image_bgr_uint8"]
  if float(out["input_format_is_rgb"]):
    img = img[..., ::-1]
  x = (img.astype(np.float32) - out["pixel_mean"]) / out["pixel_std"]
  hp, wp = (int(s) for s in out["input_tensor_shape"][2:])
  padded = np.zeros((hp, wp, 3), np.float32)
  padded[: x.shape[0], : x.shape[1]] = x
  np.testing.assert_allclose(
      padded.astype(np.float64).sum((0, 1)), out["input_tensor_chan_sum"], rtol=1e-9, atol=1e-6
  )
  return padded[None]


def _backbone_state_dict(arch: str, prefix: str) -> tuple:
  """The regenerated `prefix*` weights with detectron2's renaming (drops the BatchNorm
  `num_batches_tracked` counters), and the JSON entries kept."""
  import json

  spec = json.loads((ZOO / f"{arch}_weights.json").read_text())["entries"]
  sd = regenerate_oracle_state_dict(ZOO / f"{arch}_weights.json")
  sd = {k: v for k, v in sd.items() if k.startswith(prefix)}
  renamed = to_detectron2_names(sd, "detectron2")
  dropped = [k for k, _ in renamed.info["dropped"]]
  assert all(k.endswith(".num_batches_tracked") for k in dropped)
  return renamed, [e for e in spec if e["key"].startswith(prefix)]


def _convert(module, sd, scope: tuple, hw=(64, 64)):
  """Strict conversion of `sd` onto `module`'s variables placed under `scope` (the official
  module path, e.g. ('backbone',) or ('backbone', 'bottom_up')); returns (variables of the
  module, report)."""
  abstract = jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1,) + hw + (3,), jnp.float32))
  )

  def nest(tree):
    for name in reversed(scope):
      tree = {name: tree}
    return tree

  def unnest(tree):
    for name in scope:
      tree = tree[name]
    return tree

  variables, report = convert_to_flax(sd, {c: nest(t) for c, t in abstract.items()})
  return {c: unnest(t) for c, t in variables.items()}, report


def _nchw(a) -> np.ndarray:
  return np.transpose(np.asarray(a)[0], (2, 0, 1))


def _compare_map(out, name: str, ours_nhwc, storage: str) -> dict:
  """Compares our `[1, H, W, C]` map with the oracle's stored forms; returns the measured
  errors."""
  ours = _nchw(ours_nhwc)
  assert ours.shape == tuple(int(s) for s in out[f"{name}_shape"][1:]), name
  err = {}
  # float64 per-channel sums of the float32 map (channels with abs-sum 0 must be exactly 0).
  sums = ours.astype(np.float64).sum((1, 2))
  abssum = out[f"{name}_chan_abssum"]
  diff = np.abs(sums - out[f"{name}_chan_sum"])
  assert np.all(diff[abssum == 0] == 0), name
  # Relative to the channel's abs-sum, floored at one element of the map's scale: a nearly dead
  # channel (one nonzero 0.004 in a map up to 32) carries the map's float32 rounding (~1e-6
  # absolute), 2e-4 of its own abs-sum.
  err["sum_raw"] = float(np.max(diff / np.maximum(abssum, 1e-30)))
  err["sum"] = float(np.max(diff / (abssum + np.abs(ours).max())))
  assert err["sum"] <= SUM_TOL, (name, err)
  cy, cx = (int(v) for v in out[f"{name}_crop_center_origin_yx"])
  ref = out[f"{name}_crop_center"]
  err["crop_center"] = float(
      np.abs(ours[:, cy : cy + 16, cx : cx + 16] - ref).max() / np.abs(ref).max()
  )
  for crop, sl in (("crop_tl", np.s_[:, :16, :16]), ("crop_br", np.s_[:, -16:, -16:])):
    if f"{name}_{crop}" in out:
      ref = out[f"{name}_{crop}"]
      err[crop] = float(np.abs(ours[sl] - ref).max() / max(np.abs(ref).max(), 1e-30))
  if storage == "f32":
    ref = out[name]
    err["whole"] = float(np.abs(ours - ref).max() / np.abs(ref).max())
  elif storage == "f16":
    ref = out[f"{name}_f16"].astype(np.float32)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(ours, ref, rtol=2e-3, atol=2e-3 * scale, err_msg=name)
    err["f16"] = float(np.abs(ours - ref).max() / scale)
  else:
    assert storage == "stats", storage
  for k, v in err.items():
    if k not in ("sum", "sum_raw", "f16"):
      assert v <= F32_TOL, (name, k, err)
  print(name, {k: f"{v:.1e}" for k, v in err.items()})
  return err


def _storage(arch: str) -> dict:
  import json

  return json.loads((ZOO / f"summary_{arch}_{IMAGE}.json").read_text())["storage"]


def _capture(names):
  return lambda mdl, method: mdl.name in names and method == "__call__"


# ----------------------------------------------------------------------------------------------
# The transposed conv against torch's definition, written as a loop (no oracle needed).
# ----------------------------------------------------------------------------------------------
def _torch_conv_transpose_loop(x, w, stride, padding):
  """torch ConvTranspose2d(groups=C, bias=False) by definition: x [C, H, W], w [C, 1, k, k]
  (torch layout [C_in, C_out / groups, kh, kw]); out[c, iy*s - p + ky, ix*s - p + kx] +=
  x[c, iy, ix] * w[c, 0, ky, kx], output (H - 1) s - 2p + k."""
  c, h, wd = x.shape
  k = w.shape[-1]
  ho, wo = (h - 1) * stride - 2 * padding + k, (wd - 1) * stride - 2 * padding + k
  out = np.zeros((c, ho, wo), np.float64)
  for ch in range(c):
    for iy in range(h):
      for ix in range(wd):
        for ky in range(k):
          for kx in range(k):
            oy, ox = iy * stride - padding + ky, ix * stride - padding + kx
            if 0 <= oy < ho and 0 <= ox < wo:
              out[ch, oy, ox] += float(x[ch, iy, ix]) * float(w[ch, 0, ky, kx])
  return out


@pytest.mark.parametrize("factor", [2, 4])
def test_depthwise_conv_transpose_matches_loop(factor):
  rng = np.random.RandomState(factor)
  c, h, w = 3, 3, 5
  x = rng.normal(size=(c, h, w)).astype(np.float32)
  weight = rng.uniform(0, 0.5, size=(c, 1, 2 * factor, 2 * factor)).astype(np.float32)  # asym
  ref = _torch_conv_transpose_loop(x, weight, factor, factor // 2)
  assert ref.shape == (c, h * factor, w * factor)
  # Through the generic converter (OIHW -> HWIO) and the module, as the official weights go.
  module = DepthwiseConvTranspose2d(factor)
  xin = jnp.asarray(np.transpose(x, (1, 2, 0))[None])
  abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), xin))
  variables, report = convert_to_flax({"weight": weight}, abstract)
  assert report.ok and variables["params"]["kernel"].shape == (2 * factor, 2 * factor, 1, c)
  ours = _nchw(module.apply(variables, xin))
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  # An unflipped kernel would be wrong here (the kernel is asymmetric).
  unflipped = _nchw(
      depthwise_conv_transpose(xin, jnp.asarray(variables["params"]["kernel"])[::-1, ::-1], factor)
  )
  assert np.abs(unflipped - ref).max() > 1e-2


@pytest.mark.parametrize("k", [4, 8])
def test_bilinear_init_is_fill_up_weights(k):
  """The official `fill_up_weights`, transcribed as its loop."""
  f = int(np.ceil(k / 2))
  c = (2 * f - 1 - f % 2) / (2.0 * f)
  ref = np.zeros((k, k))
  for i in range(k):
    for j in range(k):
      ref[i, j] = (1 - abs(i / f - c)) * (1 - abs(j / f - c))
  w = np.asarray(bilinear_upsampling_init(None, (k, k, 1, 5)))
  np.testing.assert_allclose(w, np.broadcast_to(ref[:, :, None, None], w.shape), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Oracle: the two official DLA-34 bases share structure and keys.
# ----------------------------------------------------------------------------------------------
@needs_zoo
def test_official_dla34_bases_have_the_same_keys():
  import json

  def suffixes(arch, prefix):
    spec = json.loads((ZOO / f"{arch}_weights.json").read_text())["entries"]
    return {e["key"][len(prefix) :]: tuple(e["shape"]) for e in spec if e["key"].startswith(prefix)}

  s4 = suffixes(S4, "backbone.base.")
  fpn = suffixes(BIFPN, "backbone.bottom_up.")
  assert {k: v for k, v in s4.items() if not k.startswith("fc.")} == fpn
  assert s4["fc.weight"] == (1000, 512, 1, 1) and s4["fc.bias"] == (1000,)


# ----------------------------------------------------------------------------------------------
# Oracle: CenterNet-S4_DLA_8x (DLASeg).
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s4_model():
  model = DLASeg(norm="BN", imagenet_classes=1000)
  sd, spec = _backbone_state_dict(S4, "backbone.")
  variables, report = _convert(model, sd, ("backbone",))
  fn = jax.jit(
      lambda v, x, canvas: model.apply(
          v,
          x,
          canvas,
          capture_intermediates=_capture(("base", "dla_up")),
          mutable=["intermediates"],
      )
  )
  return model, variables, report, spec, fn


@pytest.fixture(scope="module")
def s4_run(s4_model):
  _, variables, _, _, fn = s4_model
  out = np.load(ZOO / f"outputs_{S4}_{IMAGE}.npz")
  x = _network_input(out)
  assert x.shape == (1, 608, 832, 3)
  res, state = fn(variables, x, jnp.asarray(x.shape[1:3], jnp.int32))
  inter = state["intermediates"]
  return out, res, inter["base"]["__call__"][0], inter["dla_up"]["__call__"][0]


@needs_zoo
def test_s4_conversion_is_strict(s4_model):
  _, _, report, spec, _ = s4_model
  assert report.ok, report.summary()
  weights = [e for e in spec if not e["key"].endswith("num_batches_tracked")]
  # every backbone tensor used (base.fc included: DLASeg declares the ImageNet classifier)
  assert sorted(m[0] for m in report.mapped) == sorted(e["key"] for e in weights)
  assert report.num_target_tensors == len(weights) == 333
  assert "backbone.base.fc.weight" in {m[0] for m in report.mapped}
  # BatchNorm weight/bias are torch parameters but live in `frozen` here (eval-mode BN)
  assert report.num_mapped_params == sum(
      e["numel"] for e in weights if e["is_parameter"] and e["module_class"] != "BatchNorm2d"
  )
  assert report.num_mapped_elements == sum(e["numel"] for e in weights)
  assert report.num_mapped_params == 19_704_584


@needs_zoo
def test_s4_base_levels(s4_run):
  out, _, base, _ = s4_run
  storage = _storage(S4)
  for lvl in (0, 1):
    assert _nchw(base[f"dla{lvl}"]).shape == tuple(
        int(s) for s in out[f"bottom_level{lvl}_shape"][1:]
    )
  for lvl in (2, 3, 4, 5):
    _compare_map(out, f"bottom_level{lvl}", base[f"dla{lvl}"], storage[f"bottom_level{lvl}"])


@needs_zoo
def test_s4_dla_up_outputs(s4_run):
  out, _, base, up = s4_run
  storage = _storage(S4)
  assert len(up) == 4
  for i in range(4):
    _compare_map(out, f"dla_up_out{i}", up[i], storage[f"dla_up_out{i}"])
  # the coarsest DLA-up output is the base's level5, untouched
  np.testing.assert_array_equal(np.asarray(up[3]), np.asarray(base["dla5"]))


@needs_zoo
def test_s4_dla2(s4_run):
  out, res, _, _ = s4_run
  assert set(res) == {"dla2"} and res["dla2"].shape == (1, 152, 208, 64)
  _compare_map(out, "dla2", res["dla2"], _storage(S4)["dla2"])


@needs_zoo
def test_s4_canvas_padding_gives_the_same_values(s4_model):
  """A 224x288 official canvas (part of the oracle image) padded by 128 more zero rows and
  columns, with canvas_hw = (224, 288): every stored map equals the official-canvas run on it;
  without the canvas (canvas_hw = the padded size) the borders differ."""
  _, variables, _, _, fn = s4_model
  out = np.load(ZOO / f"outputs_{S4}_{IMAGE}.npz")
  x = _network_input(out)[:, :200, :270]
  canvas = (224, 288)
  small = np.zeros((1,) + canvas + (3,), np.float32)
  small[:, :200, :270] = x
  big = np.zeros((1, canvas[0] + 128, canvas[1] + 128, 3), np.float32)
  big[:, :200, :270] = x
  ref = fn(variables, small, jnp.asarray(canvas, jnp.int32))
  got = fn(variables, big, jnp.asarray(canvas, jnp.int32))
  loose = fn(variables, big, jnp.asarray(big.shape[1:3], jnp.int32))

  def maps(run):
    res, state = run
    inter = state["intermediates"]
    base, up = inter["base"]["__call__"][0], inter["dla_up"]["__call__"][0]
    named = {f"base_dla{i}": base[f"dla{i}"] for i in range(6)}
    named.update({f"dla_up_out{i}": up[i] for i in range(4)})
    named["dla2"] = res["dla2"]
    return {k: np.asarray(v) for k, v in named.items()}

  ref, got, loose = maps(ref), maps(got), maps(loose)
  worst = 0.0
  for name, r in ref.items():
    h, w = r.shape[1:3]
    scale = np.abs(r).max()
    err = np.abs(got[name][:, :h, :w] - r).max() / scale
    worst = max(worst, float(err))
    assert err <= 1e-6, (name, err)
  print("canvas: max rel diff on the canvas", worst)
  # the test is sensitive: without the canvas masks, the padding leaks into the canvas border
  r = ref["dla2"]
  assert np.abs(loose["dla2"][:, : r.shape[1], : r.shape[2]] - r).max() > 1e-3 * np.abs(r).max()


# ----------------------------------------------------------------------------------------------
# Oracle: CenterNet2_DLA-BiFPN-P5_640_16x (dlafpn.py's DLA-34 as backbone.bottom_up).
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bifpn_run():
  model = DLA(norm="BN")
  sd, spec = _backbone_state_dict(BIFPN, "backbone.bottom_up.")
  variables, report = _convert(model, sd, ("backbone", "bottom_up"))
  out = np.load(ZOO / f"outputs_{BIFPN}_{IMAGE}.npz")
  x = _network_input(out)
  assert x.shape == (1, 640, 896, 3) and float(out["input_format_is_rgb"]) == 1.0
  feats = jax.jit(lambda v, x: model.apply(v, x, jnp.asarray(x.shape[1:3], jnp.int32)))(
      variables, x
  )
  return out, feats, report, spec


@needs_zoo
def test_bifpn_dla34_conversion_is_strict(bifpn_run):
  _, _, report, spec = bifpn_run
  assert report.ok, report.summary()
  weights = [e for e in spec if not e["key"].endswith("num_batches_tracked")]
  assert sorted(m[0] for m in report.mapped) == sorted(e["key"] for e in weights)
  assert report.num_target_tensors == len(weights)


@needs_zoo
def test_bifpn_dla34_levels(bifpn_run):
  out, feats, _, _ = bifpn_run
  storage = _storage(BIFPN)
  assert set(feats) == {f"dla{i}" for i in range(6)}
  for lvl in (0, 1, 2):
    assert _nchw(feats[f"dla{lvl}"]).shape == tuple(
        int(s) for s in out[f"bottom_dla{lvl}_shape"][1:]
    )
  for lvl in (3, 4, 5):
    _compare_map(out, f"bottom_dla{lvl}", feats[f"dla{lvl}"], storage[f"bottom_dla{lvl}"])
