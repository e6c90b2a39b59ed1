"""cn2_jax/modeling/backbone/bifpn.py against the OFFICIAL CenterNet2 BiFPN (torch).

tests/data/zoo/bifpn_reference.npz holds the official outputs P3..P7 of three BiFPNs, made by
tools/zoo_reference/bifpn_reference.py (official bifpn.py / res2net.py builders and yamls, a
stand-in bottom-up returning given maps):
  dla: CenterNet2_DLA-BiFPN-P5_640_16x (dla3/4/5 128/256/512 ch, 160 ch, 3 cells, GN), 128x256.
  r2:  CenterNet2_R2-101-DCN-BiFPN_1280_4x (res3/4/5 512/1024/2048 ch, 288 ch, 7 cells, GN), 128x128.
  sep: not a zoo config: 2 in_features (32, 96 ch), 64 ch, 2 cells, norm '', separable convs.
  fcos: bifpn_fcos.py (`FcosBiFPN`), CenterNet2_DLA-fcosBiFPN-P5_640_16x_ST (160 ch, 3 cells), 128x128.
  fcos3: bifpn_fcos.py, CenterNet2_DLA-BiFPN-P3_4x (P3-P5 only, 160 ch, 4 cells), 128x128.
The weights are regenerated from the JSON specs beside it (oracle_zoo README §4 rule, checksummed;
for dla / r2 identical to the zoo oracle's BiFPN weights) and the inputs from the generator's
seeded recipe (checked against the stored float64 sums).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cn2_jax.modeling.backbone.bifpn import BiFPN
from cn2_jax.modeling.backbone.bifpn_fcos import FcosBiFPN
from cn2_jax.testing.oracle import regenerate_oracle_state_dict
from cn2_jax.testing.zoo_oracle import zoo_dir
from cn2_jax.weights.flax_mapping import convert_to_flax

DATA = Path(__file__).parent / "data" / "zoo"
NPZ = DATA / "bifpn_reference.npz"
LEVELS = ("p3", "p4", "p5", "p6", "p7")
REL_TOL = 1e-5  # of max |P_l|, float32
ZOO_ARCH = {"dla": "CenterNet2_DLA-BiFPN-P5_640_16x", "r2": "CenterNet2_R2-101-DCN-BiFPN_1280_4x"}


def make_input(case: str, name: str, level: int, hw, channels: int) -> np.ndarray:
  """The generator's input recipe (tools/zoo_reference/bifpn_reference.py `make_input`)."""
  rs = np.random.RandomState(zlib.crc32(f"bifpn_reference.{case}.{name}".encode("utf-8")))
  mean = rs.normal(1.5 + 0.5 * level, 2.0 + level, size=channels)
  std = rs.uniform(0.5, 1.5, size=channels)
  x = mean + std * rs.normal(0.0, 1.0, size=(1, hw[0], hw[1], channels))
  return x.astype(np.float32)


@pytest.fixture(scope="module")
def reference():
  ref = np.load(NPZ)
  return ref, json.loads(str(ref["meta"]))


def _bifpn(attrs):
  if "num_top_levels" in attrs:
    return FcosBiFPN(
        in_features=tuple(attrs["in_features"]),
        in_channels=tuple(attrs["in_channels"]),
        out_channels=attrs["out_channels"],
        num_bifpn=attrs["num_bifpn"],
        num_top_levels=attrs["num_top_levels"],
        norm=attrs["norm"],
    )
  return BiFPN(
      in_features=tuple(attrs["in_features"]),
      in_channels=tuple(attrs["in_channels"]),
      out_channels=attrs["out_channels"],
      num_bifpn=attrs["num_bifpn"],
      num_levels=attrs["num_levels"],
      norm=attrs["norm"],
      separable_conv=attrs["separable_conv"],
  )


_CASES = {}


def _case(reference, case):
  """(module, converted variables, inputs {name: NHWC}, jitted apply), built once per case."""
  if case not in _CASES:
    ref, meta = reference
    info = meta["cases"][case]
    model = _bifpn(info["attrs"])
    h, w = info["image_hw"]
    inputs = {}
    for i, (name, (channels, stride)) in enumerate(info["bottom_up"].items()):
      x = make_input(case, name, i, (h // stride, w // stride), channels)
      x64 = x.astype(np.float64)
      assert x64.sum() == pytest.approx(float(ref[f"{case}_input_{name}_sum"]), rel=1e-12)
      assert np.abs(x64).sum() == pytest.approx(
          float(ref[f"{case}_input_{name}_abssum"]), rel=1e-12
      )
      inputs[name] = x
    sd = regenerate_oracle_state_dict(DATA / f"bifpn_reference_{case}_weights.json")
    sd = {k.removeprefix("backbone."): v for k, v in sd.items()}
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), inputs)
    variables, report = convert_to_flax(sd, abstract)
    assert report.ok and not report.dropped_keys and report.num_mapped_tensors == len(sd)
    _CASES[case] = (model, variables, inputs, jax.jit(model.apply))
  return _CASES[case]


@pytest.mark.parametrize("case", ["dla", "r2", "sep", "fcos", "fcos3"])
def test_matches_official_bifpn(reference, case):
  ref, meta = reference
  info = meta["cases"][case]
  model, variables, inputs, apply = _case(reference, case)
  levels = LEVELS[: len(model.strides)]
  assert info["official_out_features"] == list(levels)
  assert [info["official_out_strides"][p] for p in levels] == list(model.strides)
  assert info["official_size_divisibility"] == model.size_divisibility
  outs = apply(variables, inputs)
  assert len(outs) == len(levels) == (3 if case == "fcos3" else 5)
  h, w = info["image_hw"]
  for p, y, stride in zip(levels, outs, model.strides):
    want = ref[f"{case}_{p}"]
    assert y.shape == want.shape == (1, h // stride, w // stride, info["attrs"]["out_channels"])
    assert y.dtype == jnp.float32
    err = float(np.abs(np.asarray(y) - want).max())
    scale = float(np.abs(want).max())
    # Measured: <= 2.3e-6 (dla), 3.2e-6 (r2), 4.7e-7 (sep), 2.1e-6 (fcos), 2.9e-6 (fcos3) of max |P_l|.
    assert err <= REL_TOL * scale, f"{case} {p}: max |diff| {err:.3g} vs max |ref| {scale:.3g}"


@pytest.mark.parametrize("case", ["dla", "r2"])
def test_reference_weights_are_the_zoo_oracle_weights(case):
  """The generator's weight specs equal the zoo oracle's BiFPN entries (keys, shapes, rules,
  checksums): the module's variables are exactly the official `backbone.*` BiFPN keys."""
  root = zoo_dir()
  zoo_json = None if root is None else root / f"{ZOO_ARCH[case]}_weights.json"
  if zoo_json is None or not zoo_json.is_file():
    pytest.skip("shared/oracle_zoo not available")
  fields = ("shape", "module_class", "init_rule", "rule_params", "check_sum", "check_first3")
  with open(DATA / f"bifpn_reference_{case}_weights.json") as f:
    mine = {e["key"]: [e[k] for k in fields] for e in json.load(f)["entries"]}
  with open(zoo_json) as f:
    zoo = {
        e["key"]: [e[k] for k in fields]
        for e in json.load(f)["entries"]
        if e["key"].startswith("backbone.") and not e["key"].startswith("backbone.bottom_up.")
    }
  assert mine == zoo


@pytest.mark.parametrize("case", ["dla", "fcos"])
def test_canvas_padding_gives_the_same_values(reference, case):
  """The case's inputs padded by 128 px (garbage beyond the canvas) with canvas_hw = the official
  canvas: the official P3..P7 on the canvas (GN statistics masked, 3x3 / pool inputs zeroed).
  Measured (dla): <= 3.2e-6 of max |P_l| against the unpadded run, <= 2.9e-6 against the official
  outputs (masked GN sums over a larger map round differently; a canvas leak would be O(0.1))."""
  ref, meta = reference
  model, variables, inputs, apply = _case(reference, case)
  h, w = meta["cases"][case]["image_hw"]
  rs = np.random.RandomState(0)
  padded = {}
  for name, x in inputs.items():
    s = h // x.shape[1]
    big = rs.normal(3.0, 5.0, (1, (h + 128) // s, (w + 128) // s, x.shape[3])).astype(np.float32)
    big[:, : x.shape[1], : x.shape[2]] = x
    padded[name] = big
  canvas = jnp.array([h, w], jnp.int32)
  with_canvas = jax.jit(model.apply)
  same_size = with_canvas(variables, inputs, canvas)
  bigger = with_canvas(variables, padded, canvas)
  plain = apply(variables, inputs)
  for p, a, b, c, stride in zip(LEVELS, same_size, bigger, plain, model.strides):
    hh, ww = h // stride, w // stride
    assert b.shape == (1, (h + 128) // stride, (w + 128) // stride, a.shape[3])
    want = ref[f"{case}_{p}"]
    atol = REL_TOL * float(np.abs(want).max())
    on_canvas = np.asarray(b)[:, :hh, :ww]
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=0, atol=atol, err_msg=p)
    np.testing.assert_allclose(on_canvas, np.asarray(a), rtol=0, atol=atol, err_msg=p)
    np.testing.assert_allclose(on_canvas, want, rtol=0, atol=atol, err_msg=p)
    # Off the canvas the values are finite (whatever they are).
    assert np.isfinite(np.asarray(b)).all()


class _StandInBottomUp(nn.Module):
  """Image -> {"res3": stride 8, "res4": stride 16} (avg-pool + 1x1 conv), for the plug test."""

  @nn.compact
  def __call__(self, x, canvas_hw=None):
    out = {}
    for name, stride, channels in (("res3", 8, 32), ("res4", 16, 96)):
      pooled = nn.avg_pool(x, (stride, stride), (stride, stride))
      out[name] = nn.Conv(channels, (1, 1), name=f"{name}_proj")(pooled)
    return out


def test_bottom_up_child_and_image_call():
  """With `bottom_up` set, the variables sit beside it (`bottom_up.*`, `resample.*`, `cell.*`:
  the official `backbone.*` layout) and an image call equals the feature-dict call."""
  model = BiFPN(
      ("res3", "res4"), (32, 96), 64, num_bifpn=1, norm="GN", bottom_up=_StandInBottomUp()
  )
  image = jax.random.normal(jax.random.PRNGKey(1), (1, 128, 256, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), image)
  assert set(variables["params"]) == {"bottom_up", "resample.2", "cell.0"}
  apply = jax.jit(model.apply)
  outs = apply(variables, image)
  feats = _StandInBottomUp().apply({"params": variables["params"]["bottom_up"]}, image)
  again = apply(variables, feats)
  for a, b, s in zip(outs, again, BiFPN.strides):
    assert a.shape == (1, 128 // s, 256 // s, 64)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rejects_sizes_that_are_not_multiples_of_128():
  model = BiFPN(("res3", "res4", "res5"), (8, 8, 8), 32, num_bifpn=1)
  feats = {
      n: jnp.zeros((1, 12 // 2**i, 16 // 2**i, 8)) for i, n in enumerate(("res3", "res4", "res5"))
  }
  with pytest.raises(ValueError, match="multiple of 128"):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), feats)
  with pytest.raises(ValueError, match="channels"):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), {**feats, "res5": jnp.zeros((1, 3, 4, 16))})
