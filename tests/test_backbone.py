"""Tests for cn2_jax/modeling/backbone/{resnet,fpn}.py (spec §2.2-2.3, DESIGN.md naming).

The numpy references below are written from the torch-layout arrays (OIHW conv weights, FrozenBN
weight/bias/running_mean/running_var) addressed by their detectron2 state-dict keys; convolutions
are explicit correlations over kernel offsets in float64.
"""

from __future__ import annotations

import json
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cn2_jax.modeling.backbone.fpn import FPN, resnet_fpn, upsample_nearest_2x
from cn2_jax.modeling.backbone.resnet import (
    BasicBlock,
    BasicStem,
    BottleneckBlock,
    ResNet,
    frozen_param_prefixes,
    max_pool_3x3_s2_p1,
    resnet_out_channels,
)
from tests.schema_settings import MODEL, block_kwargs, bottleneck_kwargs, fpn_kwargs, resnet_kwargs

ORACLE_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "oracle")
ORACLE_WEIGHTS = os.path.join(ORACLE_DIR, "cn2_r50_oracle_weights.json")
ORACLE_OUTPUTS = os.path.join(ORACLE_DIR, "outputs_000000000009.npz")
EPS = 1e-5
R50_FPN_LEARNABLE = 27_323_584  # sum of numel of the learnable `backbone.` entries of the oracle


# ----------------------------------------------------------------------------------------------
# Flax <-> detectron2 naming helpers (DESIGN.md "Parameter naming").
# ----------------------------------------------------------------------------------------------
def _torch_key(collection, path):
  leaf = path[-1]
  if collection == "params":
    leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
  return ".".join(tuple(path[:-1]) + (leaf,))


def _torch_shape(collection, path, shape):
  if collection == "params" and path[-1] == "kernel" and len(shape) == 4:
    h, w, i, o = shape
    return (o, i, h, w)
  return tuple(shape)


def torch_entries(variables, prefix=""):
  """{d2 key: (collection, flax path, torch shape)} for every leaf of a Flax variable tree."""
  out = {}
  for col, tree in variables.items():
    for path, leaf in traverse_util.flatten_dict(tree).items():
      out[prefix + _torch_key(col, path)] = (col, path, _torch_shape(col, path, leaf.shape))
  return out


def random_torch_state(variables, seed, bias_std=0.1):
  """Random torch-layout arrays for every variable (keyed by d2 key, relative to the module)."""
  rng = np.random.RandomState(seed)
  sd = {}
  for key, (col, path, shape) in sorted(torch_entries(variables).items()):
    leaf = path[-1]
    if col == "params" and leaf == "kernel":
      fan_in = int(np.prod(shape[1:]))
      sd[key] = rng.normal(0, np.sqrt(1.0 / fan_in), shape)
    elif col == "params" and leaf == "bias":
      sd[key] = rng.normal(0, bias_std, shape)
    elif leaf == "weight":
      sd[key] = rng.uniform(0.5, 1.5, shape)
    elif leaf == "bias":
      sd[key] = rng.normal(0, 0.1, shape)
    elif leaf == "running_mean":
      sd[key] = rng.normal(0, 0.2, shape)
    elif leaf == "running_var":
      sd[key] = rng.uniform(0.5, 1.5, shape)
    else:
      raise AssertionError(key)
    sd[key] = sd[key].astype(np.float32)
  return sd


def load_torch_state(variables, sd):
  """Flax variables with every leaf replaced by the torch array of the same d2 key."""
  out = {}
  for col, tree in variables.items():
    flat = {}
    for path, leaf in traverse_util.flatten_dict(tree).items():
      arr = np.asarray(sd[_torch_key(col, path)], np.float32)
      if col == "params" and path[-1] == "kernel" and arr.ndim == 4:
        arr = arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
      assert arr.shape == tuple(leaf.shape), (col, path)
      flat[path] = jnp.asarray(arr)
    out[col] = traverse_util.unflatten_dict(flat)
  return out


# ----------------------------------------------------------------------------------------------
# Independent numpy reference (torch layout, float64).
# ----------------------------------------------------------------------------------------------
def np_conv(x, w, b=None, stride=1, pad=0):
  """Cross-correlation of NHWC x with OIHW w, symmetric zero padding (torch Conv2d)."""
  x = np.asarray(x, np.float64)
  w = np.asarray(w, np.float64)
  n, h, wd, c = x.shape
  o, i, kh, kw = w.shape
  assert i == c
  xp = np.zeros((n, h + 2 * pad, wd + 2 * pad, c))
  xp[:, pad : pad + h, pad : pad + wd] = x
  ho = (h + 2 * pad - kh) // stride + 1
  wo = (wd + 2 * pad - kw) // stride + 1
  out = np.zeros((n, ho, wo, o))
  for dy in range(kh):
    for dx in range(kw):
      patch = xp[
          :, dy : dy + stride * (ho - 1) + 1 : stride, dx : dx + stride * (wo - 1) + 1 : stride
      ]
      out += np.tensordot(patch, w[:, :, dy, dx], axes=([3], [1]))
  if b is not None:
    out += np.asarray(b, np.float64)
  return out


def np_frozen_bn(x, sd, key):
  w, b = sd[key + ".weight"], sd[key + ".bias"]
  m, v = sd[key + ".running_mean"], sd[key + ".running_var"]
  return (x - m) / np.sqrt(np.asarray(v, np.float64) + EPS) * w + b


def np_conv_bn(x, sd, key, stride=1, pad=0):
  return np_frozen_bn(np_conv(x, sd[key + ".weight"], None, stride, pad), sd, key + ".norm")


def np_relu(x):
  return np.maximum(x, 0.0)


def np_maxpool_3x3_s2_p1(x):
  n, h, w, c = x.shape
  xp = np.full((n, h + 2, w + 2, c), -np.inf)
  xp[:, 1 : 1 + h, 1 : 1 + w] = x
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  out = np.full((n, ho, wo, c), -np.inf)
  for dy in range(3):
    for dx in range(3):
      out = np.maximum(out, xp[:, dy : dy + 2 * (ho - 1) + 1 : 2, dx : dx + 2 * (wo - 1) + 1 : 2])
  return out


def np_stem(x, sd, p):
  return np_maxpool_3x3_s2_p1(np_relu(np_conv_bn(x, sd, p + "conv1", stride=2, pad=3)))


def np_bottleneck(x, sd, p, stride, stride_in_1x1):
  s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
  if p + "shortcut.weight" in sd:
    sc = np_conv_bn(x, sd, p + "shortcut", stride=stride)
  else:
    sc = x
  y = np_relu(np_conv_bn(x, sd, p + "conv1", stride=s1))
  y = np_relu(np_conv_bn(y, sd, p + "conv2", stride=s3, pad=1))
  y = np_conv_bn(y, sd, p + "conv3")
  return np_relu(y + sc)


def np_basic(x, sd, p, stride):
  sc = np_conv_bn(x, sd, p + "shortcut", stride=stride) if p + "shortcut.weight" in sd else x
  y = np_relu(np_conv_bn(x, sd, p + "conv1", stride=stride, pad=1))
  y = np_conv_bn(y, sd, p + "conv2", pad=1)
  return np_relu(y + sc)


def np_resnet(x, sd, p, blocks, bottleneck, stride_in_1x1):
  x = np_stem(x, sd, p + "stem.")
  outs = {}
  for k, nb in zip(range(2, 6), blocks):
    for i in range(nb):
      s = 2 if (i == 0 and k > 2) else 1
      bp = f"{p}res{k}.{i}."
      x = np_bottleneck(x, sd, bp, s, stride_in_1x1) if bottleneck else np_basic(x, sd, bp, s)
    outs[f"res{k}"] = x
  return outs


def np_upsample2(x):
  n, h, w, c = x.shape
  iy = np.arange(2 * h) // 2
  ix = np.arange(2 * w) // 2
  return x[:, iy][:, :, ix]


def np_fpn(feats, sd, p):
  conv = lambda x, name, s, pad: np_conv(
      x, sd[p + name + ".weight"], sd[p + name + ".bias"], s, pad
  )
  prev = conv(feats["res5"], "fpn_lateral5", 1, 0)
  p5 = conv(prev, "fpn_output5", 1, 1)
  prev = conv(feats["res4"], "fpn_lateral4", 1, 0) + np_upsample2(prev)
  p4 = conv(prev, "fpn_output4", 1, 1)
  prev = conv(feats["res3"], "fpn_lateral3", 1, 0) + np_upsample2(prev)
  p3 = conv(prev, "fpn_output3", 1, 1)
  p6 = conv(p5, "top_block.p6", 2, 1)
  p7 = conv(np_relu(p6), "top_block.p7", 2, 1)
  return [p3, p4, p5, p6, p7]


def assert_close(actual, expected, tol=1e-5):
  actual = np.asarray(actual, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  np.testing.assert_allclose(
      actual, expected, rtol=tol, atol=tol * max(1.0, np.abs(expected).max())
  )


def _init_and_load(module, x, seed, method=None, bias_std=0.1):
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x, method=method))
  sd = random_torch_state(shapes, seed, bias_std)
  return load_torch_state(shapes, sd), sd


# ----------------------------------------------------------------------------------------------
# 1. Parameter structure vs the official state dict.
# ----------------------------------------------------------------------------------------------
def test_r50_fpn_param_structure_matches_oracle():
  with open(ORACLE_WEIGHTS) as f:
    oracle = json.load(f)["entries"]
  want = {e["key"]: tuple(e["shape"]) for e in oracle if e["key"].startswith("backbone.")}
  want_learnable = {
      e["key"] for e in oracle if e["key"].startswith("backbone.") and e["is_parameter"]
  }
  shapes = jax.eval_shape(
      lambda: resnet_fpn(**fpn_kwargs(depth=50)).init(
          jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))
      )
  )
  assert set(shapes) == {"params", "frozen"}
  got = torch_entries(shapes, prefix="backbone.")
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  assert not missing and not extra, (missing[:10], extra[:10])
  for key, (col, path, shape) in got.items():
    assert shape == want[key], (key, shape, want[key])
    assert (col == "params") == (key in want_learnable), key
  n_learnable = sum(int(np.prod(l.shape)) for l in jax.tree_util.tree_leaves(shapes["params"]))
  assert n_learnable == R50_FPN_LEARNABLE
  assert n_learnable == sum(int(np.prod(want[k])) for k in want_learnable)
  assert len(got) == 281


def test_r50_eval_shape_matches_oracle_feature_shapes():
  out = np.load(ORACLE_OUTPUTS)
  x = jax.ShapeDtypeStruct((1, 800, 1088, 3), jnp.float32)
  model = resnet_fpn(**fpn_kwargs(depth=50))

  def run(x):
    v = model.init(jax.random.PRNGKey(0), x)
    return model.apply(v, x), model.apply(v, x, method=lambda m, x: m.bottom_up(x))

  ps, feats = jax.eval_shape(run, x)
  for i, p in enumerate(ps):
    n, c, h, w = out[f"p{i + 3}_shape"].astype(int)
    assert p.shape == (n, h, w, c)
  for k in ("res3", "res4", "res5"):
    n, c, h, w = out[f"{k}_shape"].astype(int)
    assert feats[k].shape == (n, h, w, c)


def test_r101_and_small_resnet_structure():
  def struct(depth):
    v = jax.eval_shape(
        lambda: ResNet(**resnet_kwargs(depth=depth)).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))
        )
    )
    return v, traverse_util.flatten_dict(v["params"], sep=".")

  for depth, blocks, bottleneck in (
      (18, (2, 2, 2, 2), False),
      (34, (3, 4, 6, 3), False),
      (50, (3, 4, 6, 3), True),
      (101, (3, 4, 23, 3), True),
  ):
    v, flat = struct(depth)
    for k, nb in zip(range(2, 6), blocks):
      ids = {int(p.split(".")[1]) for p in flat if p.startswith(f"res{k}.")}
      assert ids == set(range(nb)), (depth, k, ids)
    convs = ("conv1", "conv2", "conv3") if bottleneck else ("conv1", "conv2")
    assert all(p.split(".")[2] in convs + ("shortcut",) for p in flat if p.startswith("res"))
    has_sc = {k for k in range(2, 6) if f"res{k}.0.shortcut.kernel" in flat}
    assert has_sc == ({2, 3, 4, 5} if bottleneck else {3, 4, 5})
    assert not any(".1.shortcut" in p for p in flat)
    # torch-side count: convs only (FrozenBN buffers are not parameters).
    n = sum(int(np.prod(l.shape)) for l in jax.tree_util.tree_leaves(v["params"]))
    expected = {18: 11_166_912, 34: 21_267_648, 50: 23_454_912, 101: 42_394_816}[depth]
    assert n == expected, (depth, n)


# ----------------------------------------------------------------------------------------------
# 2. Numeric layout checks vs the numpy reference.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stride_in_1x1", [True, False])
@pytest.mark.parametrize("seed,hw", [(0, (9, 10)), (1, (8, 8))])
def test_bottleneck_block_numeric(stride_in_1x1, seed, hw):
  x = np.random.RandomState(100 + seed).normal(size=(2,) + hw + (8,)).astype(np.float32)
  block = BottleneckBlock(
      out_channels=16,
      bottleneck_channels=4,
      stride=2,
      stride_in_1x1=stride_in_1x1,
      **bottleneck_kwargs(),
  )
  v, sd = _init_and_load(block, x, seed)
  assert "shortcut.weight" in sd and "conv3.norm.running_var" in sd
  got = block.apply(v, x)
  assert_close(got, np_bottleneck(x, sd, "", 2, stride_in_1x1))


def test_bottleneck_identity_shortcut_and_basic_block_numeric():
  rng = np.random.RandomState(7)
  x = rng.normal(size=(1, 6, 7, 16)).astype(np.float32)
  block = BottleneckBlock(
      out_channels=16, bottleneck_channels=4, stride=1, stride_in_1x1=True, **bottleneck_kwargs()
  )
  v, sd = _init_and_load(block, x, 3)
  assert "shortcut.weight" not in sd
  assert_close(block.apply(v, x), np_bottleneck(x, sd, "", 1, True))

  x = rng.normal(size=(2, 7, 6, 8)).astype(np.float32)
  for stride, cout in ((2, 12), (1, 8)):
    block = BasicBlock(out_channels=cout, stride=stride, **block_kwargs())
    v, sd = _init_and_load(block, x, 4 + stride)
    assert ("shortcut.weight" in sd) == (stride == 2)
    assert_close(block.apply(v, x), np_basic(x, sd, "", stride))


def test_stem_and_maxpool_numeric():
  rng = np.random.RandomState(11)
  x = rng.normal(size=(2, 19, 22, 3)).astype(np.float32)
  stem = BasicStem(out_channels=MODEL["resnet_width"], **block_kwargs())
  v, sd = _init_and_load(stem, x, 12)
  assert sorted(sd) == [
      "conv1.norm.bias",
      "conv1.norm.running_mean",
      "conv1.norm.running_var",
      "conv1.norm.weight",
      "conv1.weight",
  ]
  assert_close(stem.apply(v, x), np_stem(x, sd, ""))
  # -inf padding (matters for negative inputs) and floor output size.
  for shape in ((1, 5, 6, 2), (2, 8, 9, 3)):
    z = rng.normal(size=shape).astype(np.float32) - 3.0
    assert_close(max_pool_3x3_s2_p1(jnp.asarray(z)), np_maxpool_3x3_s2_p1(z), tol=0)


@pytest.mark.parametrize("seed,hw5", [(0, (2, 3)), (1, (1, 1)), (2, (3, 2))])
def test_fpn_levels_numeric(seed, hw5):
  rng = np.random.RandomState(seed)
  h, w = hw5
  feats = {
      "res3": rng.normal(size=(2, 4 * h, 4 * w, 6)).astype(np.float32),
      "res4": rng.normal(size=(2, 2 * h, 2 * w, 10)).astype(np.float32),
      "res5": rng.normal(size=(2, h, w, 12)).astype(np.float32),
  }
  fpn = resnet_fpn(**fpn_kwargs(out_channels=8))
  v, sd = _init_and_load(fpn, feats, seed, method=FPN.forward_features)
  assert sorted(v) == ["params"]
  assert sorted(sd) == sorted(
      f"{m}.{leaf}"
      for m in (
          "fpn_lateral3",
          "fpn_lateral4",
          "fpn_lateral5",
          "fpn_output3",
          "fpn_output4",
          "fpn_output5",
          "top_block.p6",
          "top_block.p7",
      )
      for leaf in ("weight", "bias")
  )
  got = fpn.apply(v, feats, method=FPN.forward_features)
  want = np_fpn(feats, sd, "")
  assert len(got) == 5
  for g, e in zip(got, want):
    assert_close(g, e)


def test_upsample_matches_torch_nearest():
  x = jnp.arange(2 * 3 * 5 * 2, dtype=jnp.float32).reshape(2, 3, 5, 2)
  assert_close(upsample_nearest_2x(x), np_upsample2(np.asarray(x)), tol=0)


@pytest.mark.parametrize("stride_in_1x1", [True, False])
def test_r18_fpn_full_numeric(stride_in_1x1):
  """Whole bottom-up + FPN wiring (ResNet-18, 64x64) against the numpy reference."""
  x = np.random.RandomState(5).normal(size=(1, 64, 64, 3)).astype(np.float32)
  model = resnet_fpn(**fpn_kwargs(depth=18, stride_in_1x1=stride_in_1x1, out_channels=16))
  v, sd = _init_and_load(model, x, 21)
  got = model.apply(v, x)
  ref_feats = np_resnet(x, sd, "bottom_up.", (2, 2, 2, 2), False, stride_in_1x1)
  want = np_fpn(ref_feats, sd, "")
  for g, e in zip(got, want):
    assert_close(g, e, tol=2e-5)


# ----------------------------------------------------------------------------------------------
# 3. Freezing, small depths, output strides/shapes.
# ----------------------------------------------------------------------------------------------
def test_frozen_param_prefixes():
  assert frozen_param_prefixes(0) == ()
  assert frozen_param_prefixes(1) == ("stem",)
  assert frozen_param_prefixes(2) == ("stem", "res2")
  assert frozen_param_prefixes(5) == ("stem", "res2", "res3", "res4", "res5")
  assert frozen_param_prefixes(2, "backbone.bottom_up.") == (
      "backbone.bottom_up.stem",
      "backbone.bottom_up.res2",
  )


@pytest.mark.parametrize("freeze_at", [1, 2, 3])
def test_freeze_at_zero_gradients(freeze_at):
  model = ResNet(**resnet_kwargs(depth=18, freeze_at=freeze_at))
  x = jnp.asarray(np.random.RandomState(0).normal(size=(1, 32, 32, 3)), jnp.float32)
  v = model.init(jax.random.PRNGKey(1), x)

  def loss(params):
    outs = model.apply({"params": params, "frozen": v["frozen"]}, x)
    return sum(jnp.sum(o * jnp.sin(jnp.arange(o.size).reshape(o.shape))) for o in outs.values())

  # The default freeze_at=2 runs under jit (as the training step does): the stem's max-pool must
  # lower to a differentiable primitive there.
  grad_fn = jax.jit(jax.grad(loss)) if freeze_at == 2 else jax.grad(loss)
  grads = traverse_util.flatten_dict(grad_fn(v["params"]), sep=".")
  prefixes = frozen_param_prefixes(freeze_at)
  n_frozen = 0
  for path, g in grads.items():
    g = np.asarray(g)
    if any(path == p or path.startswith(p + ".") for p in prefixes):
      assert np.all(g == 0.0), path
      n_frozen += 1
    else:
      assert np.any(g != 0.0), path
  assert n_frozen == sum(1 for p in grads if p.split(".")[0] in prefixes)
  assert n_frozen > 0 and n_frozen < len(grads)


@pytest.mark.parametrize("depth,channels", [(18, (64, 128, 256, 512)), (34, (64, 128, 256, 512))])
def test_small_resnets_run(depth, channels):
  x = jnp.asarray(np.random.RandomState(depth).normal(size=(1, 64, 64, 3)), jnp.float32)
  model = ResNet(
      **resnet_kwargs(depth=depth, out_features=("stem", "res2", "res3", "res4", "res5"))
  )
  v = model.init(jax.random.PRNGKey(0), x)
  outs = model.apply(v, x)
  assert outs["stem"].shape == (1, 16, 16, 64)
  for k, c, s in zip(range(2, 6), channels, (4, 8, 16, 32)):
    o = outs[f"res{k}"]
    assert o.shape == (1, 64 // s, 64 // s, c)
    assert np.all(np.isfinite(np.asarray(o))) and np.all(np.asarray(o) >= 0)
  assert resnet_out_channels(depth) == {
      "stem": 64,
      "res2": 64,
      "res3": 128,
      "res4": 256,
      "res5": 512,
  }


def test_resnet_builds_only_needed_stages():
  v = jax.eval_shape(
      lambda: ResNet(**resnet_kwargs(depth=50, out_features=("res3",))).init(
          jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))
      )
  )
  assert sorted(v["params"]) == ["res2", "res3", "stem"]


def test_fpn_output_shapes_64x96():
  x = jnp.asarray(np.random.RandomState(3).normal(size=(2, 64, 96, 3)), jnp.float32)
  model = resnet_fpn(**fpn_kwargs(depth=18, out_channels=32))
  v = model.init(jax.random.PRNGKey(0), x)
  ps = model.apply(v, x)
  assert FPN.strides == (8, 16, 32, 64, 128)
  # 3x3 s2 p1 of size n gives floor((n - 1) / 2) + 1: P5 (2, 3) -> P6 (1, 2) -> P7 (1, 1).
  assert [p.shape for p in ps] == [
      (2, 8, 12, 32),
      (2, 4, 6, 32),
      (2, 2, 3, 32),
      (2, 1, 2, 32),
      (2, 1, 1, 32),
  ]
  # R50 / 256 channels, and a size where the ceil behaviour shows at P6 and P7.
  for (h, w), want in (
      ((64, 96), [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]),
      ((160, 224), [(20, 28), (10, 14), (5, 7), (3, 4), (2, 2)]),
  ):
    shapes = jax.eval_shape(
        lambda z: resnet_fpn(**fpn_kwargs(depth=50)).init_with_output(jax.random.PRNGKey(0), z)[0],
        jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32),
    )
    assert [p.shape for p in shapes] == [(1,) + hw + (256,) for hw in want]
    for p, s in zip(shapes, FPN.strides):
      assert p.shape[1] == -(-h // s) and p.shape[2] == -(-w // s)


def test_fpn_rejects_sizes_not_multiple_of_32():
  with pytest.raises(ValueError, match="multiple of 32"):
    jax.eval_shape(
        lambda: resnet_fpn(**fpn_kwargs(depth=18)).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 48, 64, 3))
        )
    )
  feats = {
      "res3": jnp.zeros((1, 5, 4, 4)),
      "res4": jnp.zeros((1, 3, 2, 4)),
      "res5": jnp.zeros((1, 2, 1, 4)),
  }
  with pytest.raises(ValueError, match="top-down size"):
    jax.eval_shape(
        lambda: resnet_fpn(**fpn_kwargs(out_channels=4)).init(
            jax.random.PRNGKey(0), feats, method=FPN.forward_features
        )
    )


def test_bfloat16_compute_dtype():
  x = jnp.zeros((1, 64, 64, 3), jnp.float32)
  model = resnet_fpn(**fpn_kwargs(depth=18, out_channels=16, dtype=jnp.bfloat16))
  shapes = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), x))
  outs, v = shapes
  assert all(p.dtype == jnp.bfloat16 for p in outs)
  assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(v))


def test_default_init_fills():
  """c2_msra_fill on ResNet convs, c2_xavier_fill + zero bias on FPN convs, identity FrozenBN."""
  x = jnp.zeros((1, 64, 64, 3))
  v = resnet_fpn(**fpn_kwargs(depth=18)).init(jax.random.PRNGKey(0), x)
  k = np.asarray(v["params"]["bottom_up"]["res4"]["0"]["conv2"]["kernel"])  # 3x3x256x256
  np.testing.assert_allclose(k.std(), np.sqrt(2.0 / (9 * 256)), rtol=0.02)
  k = np.asarray(v["params"]["fpn_output3"]["kernel"])
  bound = np.sqrt(3.0 / (9 * 256))
  assert np.abs(k).max() <= bound and np.abs(k).max() > 0.99 * bound
  assert np.all(np.asarray(v["params"]["top_block"]["p7"]["bias"]) == 0)
  fb = v["frozen"]["bottom_up"]["stem"]["conv1"]["norm"]
  np.testing.assert_allclose(fb["running_var"] + EPS, 1.0, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# 4. Opt-in: full R50+FPN forward against the official outputs (too heavy for the default run).
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(
    os.environ.get("CN2_ORACLE_FULL") != "1",
    reason="full R50 800x1088 forward; set CN2_ORACLE_FULL=1 to run",
)
def test_r50_fpn_matches_official_oracle():
  with open(ORACLE_WEIGHTS) as f:
    entries = json.load(f)["entries"]
  sd = {}
  for e in entries:
    key = e["key"]
    if not key.startswith("backbone."):
      continue
    rs = np.random.RandomState(zlib.crc32(key.encode("utf-8")))
    a, b = e["rule_params"]
    assert e["init_rule"] in ("normal", "uniform"), key
    draw = rs.normal if e["init_rule"] == "normal" else rs.uniform
    arr = draw(a, b, size=e["shape"]).astype(np.float32)
    assert abs(arr.astype(np.float64).sum() - e["check_sum"]) <= 1e-6 * max(1, e["check_abs_sum"])
    sd[key[len("backbone.") :]] = arr
  out = np.load(ORACLE_OUTPUTS)
  h, w = out["resized_image_bgr_uint8"].shape[:2]
  x = np.zeros((1,) + tuple(out["input_tensor_shape"][2:].astype(int)) + (3,), np.float32)
  x[0, :h, :w] = out["resized_image_bgr_uint8"].astype(np.float32) - out["pixel_mean"]
  model = resnet_fpn(**fpn_kwargs(depth=50))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
  v = load_torch_state(shapes, sd)
  run = jax.jit(
      lambda v, x: (model.apply(v, x), model.apply(v, x, method=lambda m, x: m.bottom_up(x)))
  )
  ps, feats = run(v, x)
  for k in ("res3", "res4", "res5"):
    r = np.asarray(feats[k][0], np.float64)
    assert_close(r.mean((0, 1)), out[k + "_chan_mean"].astype(np.float64), tol=1e-5)
    assert_close(r.std((0, 1), ddof=1), out[k + "_chan_std"].astype(np.float64), tol=1e-5)
  p = [np.asarray(q[0], np.float64).transpose(2, 0, 1) for q in ps]
  cy, cx = out["p3_crop_center_origin_yx"].astype(int)
  assert_close(p[0][:, :16, :16], out["p3_crop_tl"].astype(np.float64), tol=1e-5)
  assert_close(
      p[0][:, cy : cy + 16, cx : cx + 16], out["p3_crop_center"].astype(np.float64), tol=1e-5
  )
  assert_close(p[0][:, -16:, -16:], out["p3_crop_br"].astype(np.float64), tol=1e-5)
  for i in range(1, 5):
    assert_close(p[i], out[f"p{i + 3}"].astype(np.float64), tol=1e-5)


def _ref_max_pool_grad(x, g):
  """torch max_pool2d(3, 2, 1) backward as a loop: each window's gradient goes to its first
  maximum in row-major order (-inf padding)."""
  n, h, w, c = x.shape
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  dx = np.zeros_like(x, dtype=np.float64)
  for b in range(n):
    for ch in range(c):
      for i in range(ho):
        for j in range(wo):
          best, arg = -np.inf, None
          for di in range(3):
            for dj in range(3):
              y, xx = 2 * i - 1 + di, 2 * j - 1 + dj
              if 0 <= y < h and 0 <= xx < w and x[b, y, xx, ch] > best:
                best, arg = x[b, y, xx, ch], (y, xx)
          dx[b, arg[0], arg[1], ch] += g[b, i, j, ch]
  return dx


@pytest.mark.parametrize("shape", [(2, 9, 11, 3), (1, 8, 8, 2), (1, 7, 6, 2)])
def test_max_pool_gradient_goes_to_the_first_maximum(shape):
  """The custom backward (strided views, interior-padded adds) against a loop of torch's rule,
  with ties (ReLU zeros, repeated values)."""
  rng = np.random.RandomState(sum(shape))
  x = np.maximum(rng.randn(*shape), 0).astype(np.float32)  # ReLU: windows of tied zeros
  x[0, 2:5, 2:5, 0] = 1.5  # a plateau of ties
  y, vjp = jax.vjp(max_pool_3x3_s2_p1, x)
  g = rng.randn(*y.shape).astype(np.float32)
  np.testing.assert_allclose(np.asarray(vjp(g)[0]), _ref_max_pool_grad(x, g), atol=1e-5)
