"""cn2_jax/modeling/backbone/bifpn_fcos.py: the registered fcos-BiFPN backbones as the detector
builds them (the bottom-up wrapper, the image call, the canvas contract).

The cell arithmetic is compared with the official code in tests/test_zoo_bifpn.py (cases fcos,
fcos3: `FcosBiFPN` on given DLA maps) and the DLA in tests/test_zoo_dla.py; the official key
layout of the whole detectors in tests/test_zoo_configs.py (strict conversion of the official
state dicts of CenterNet2_DLA-fcosBiFPN-P5_640_16x_ST and CenterNet2_DLA-BiFPN-P3_4x/_24x).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cn2_jax.config import base_config
from cn2_jax.modeling.backbone.build import BACKBONES, build_backbone, frozen_param_prefixes

H, W, PAD = 128, 256, 128
REL_TOL = 1e-4  # of max |P_l| (oracle README float32 tolerance)


@pytest.fixture(scope="module", autouse=True)
def _fast(fast_compile):
  yield


def _model_config(backbone: str) -> ml_collections.FrozenConfigDict:
  c = base_config()
  c.model.backbone = backbone
  # small, but 2 channels per GroupNorm(32) group: with 1, P7's groups (1 x 2 pixels here) hold
  # 2 values and their normalisation amplifies float32 rounding to ~1e-4
  c.model.bifpn.out_channels = 64
  c.model.bifpn.num_bifpn = 2
  return ml_collections.FrozenConfigDict(c.model)


def _random_variables(abstract) -> dict:
  """Variables of the abstract tree drawn like the oracle's weight rule (oracle_zoo README §4:
  He-normal kernels, small biases, GN / BN affines near 1 / 0, BN statistics, fusion weights
  U(0.5, 1.5)), without tracing the forward that `init` runs (30 s on a busy CPU)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
  out = []
  for key, (path, leaf) in zip(keys, leaves):
    name, shape = str(path[-1].key), leaf.shape
    u = lambda lo, hi: jax.random.uniform(key, shape, jnp.float32, lo, hi)  # noqa: E731
    n = lambda std: std * jax.random.normal(key, shape, jnp.float32)  # noqa: E731
    if name == "kernel":
      out.append(n(float(np.sqrt(2.0 / np.prod(shape[:-1])))))
    elif name.startswith("weights_f"):
      out.append(u(0.5, 1.5))
    elif name in ("scale", "weight"):
      out.append(u(0.8, 1.2))
    elif name == "running_mean":
      out.append(n(0.1))
    elif name == "running_var":
      out.append(u(0.5, 1.5))
    else:  # conv / norm biases
      out.append(n(0.05))
  return jax.tree_util.tree_unflatten(treedef, out)


_RUNS = {}


def _run(backbone: str):
  """(module, variables, image, jitted apply, outputs) of a registered backbone, 128 x 256."""
  if backbone not in _RUNS:
    model = build_backbone(_model_config(backbone), jnp.float32)
    image = jax.random.normal(jax.random.PRNGKey(1), (1, H, W, 3))
    variables = _random_variables(jax.eval_shape(model.init, jax.random.PRNGKey(0), image))
    apply = jax.jit(model.apply)
    _RUNS[backbone] = (model, variables, image, apply, apply(variables, image))
  return _RUNS[backbone]


def test_the_four_official_builders_are_registered():
  for name in (
      "build_p37_fcos_dla_bifpn_backbone",
      "build_p35_fcos_dla_bifpn_backbone",
      "build_fcos_resnet_bifpn_backbone",
      "build_p35_fcos_resnet_bifpn_backbone",
  ):
    assert name in BACKBONES
  cfg = _model_config("build_fcos_resnet_bifpn_backbone")
  # the ResNet sits at backbone.bottom_up.backbone (official BackboneWithTopLevels.backbone)
  assert frozen_param_prefixes(cfg) == (
      "backbone.bottom_up.backbone.stem",
      "backbone.bottom_up.backbone.res2",
  )
  assert frozen_param_prefixes(_model_config("build_p37_fcos_dla_bifpn_backbone")) == ()


@pytest.mark.parametrize(
    "backbone, levels",
    [("build_p37_fcos_dla_bifpn_backbone", 5), ("build_p35_fcos_dla_bifpn_backbone", 3)],
)
def test_variable_layout_and_levels(backbone, levels):
  model, variables, _, _, outs = _run(backbone)
  strides = (8, 16, 32, 64, 128)[:levels]
  assert model.strides == strides and model.size_divisibility == 128
  assert model.out_features == ("p3", "p4", "p5", "p6", "p7")[:levels]
  params = variables["params"]
  assert set(params) == {"bottom_up", "repeated_bifpn.0", "repeated_bifpn.1"}
  # official keys backbone.bottom_up.backbone.* (the DLA) and backbone.bottom_up.dla6.reduction.*
  # (dla7 has no parameters: its input already has out_channels)
  assert set(params["bottom_up"]) == ({"backbone", "dla6"} if levels == 5 else {"backbone"})
  if levels == 5:
    assert set(params["bottom_up"]["dla6"]["reduction"]) == {"kernel", "norm"}
  assert set(variables["frozen"]) == {"bottom_up"}
  assert len(outs) == levels
  for y, s in zip(outs, strides):
    assert y.shape == (1, H // s, W // s, 64) and y.dtype == jnp.float32
    assert np.isfinite(np.asarray(y)).all()


def test_image_call_equals_the_feature_dict_call():
  """With the bottom-up features computed first (a separate jit), the dict call gives the image
  call's levels up to float32 rounding. Measured: 0 (with fast_compile; 4.7e-6 optimised)."""
  from cn2_jax.modeling.backbone.dla import DLA

  model, variables, image, apply, outs = _run("build_p37_fcos_dla_bifpn_backbone")
  dla_vars = {c: v["bottom_up"]["backbone"] for c, v in variables.items()}
  features = jax.jit(DLA(norm="BN").apply)(dla_vars, image)
  again = apply(variables, {k: features[k] for k in ("dla3", "dla4", "dla5")})
  for a, b in zip(outs, again):
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(a - b).max() <= REL_TOL * np.abs(a).max()


@pytest.mark.parametrize(
    "backbone", ["build_p37_fcos_dla_bifpn_backbone", "build_p35_fcos_dla_bifpn_backbone"]
)
def test_a_larger_canvas_gives_the_same_values_on_the_official_one(backbone):
  """The image padded by 128 px, canvas_hw = the official 128 x 256 canvas. Garbage or zeros
  beyond the canvas give bit-identical values on it (same program, so any read of an off-canvas
  value would show: GN statistics are masked, 3x3 conv / max-pool inputs zeroed), and those equal
  the unpadded run up to float32 rounding (other shapes, other kernels). Measured: <= 3.1e-6 of
  max |P_l|."""
  model, variables, image, apply, outs = _run(backbone)
  canvas = jnp.array([H, W], jnp.int32)
  zeros = jnp.zeros((1, H + PAD, W + PAD, 3)).at[:, :H, :W].set(image)
  garbage = jax.random.normal(jax.random.PRNGKey(3), zeros.shape) * 3.0 + 1.0
  garbage = garbage.at[:, :H, :W].set(image)
  with_zeros = apply(variables, zeros, canvas)
  with_garbage = apply(variables, garbage, canvas)
  for a, z, g, s in zip(outs, with_zeros, with_garbage, model.strides):
    assert g.shape == (1, (H + PAD) // s, (W + PAD) // s, 64)
    z = np.asarray(z)[:, : H // s, : W // s]
    np.testing.assert_array_equal(np.asarray(g)[:, : H // s, : W // s], z, err_msg=f"stride {s}")
    a = np.asarray(a)
    assert np.abs(z - a).max() <= REL_TOL * np.abs(a).max(), f"stride {s}"
    assert np.isfinite(np.asarray(g)).all()


def test_bottom_up_settings_must_match():
  from cn2_jax.modeling.backbone.bifpn_fcos import BackboneWithTopLevels, FcosBiFPN

  model = FcosBiFPN(
      ("dla3", "dla4", "dla5"),
      (8, 8, 8),
      16,
      num_bifpn=1,
      num_top_levels=2,
      bottom_up=BackboneWithTopLevels(16, 0),
  )
  feats = {f"dla{k}": jnp.zeros((1, 2 ** (8 - k), 2 ** (8 - k), 8)) for k in (3, 4, 5)}
  with pytest.raises(ValueError, match="num_top_levels"):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), feats)
