"""Tests for cn2_jax/modeling/backbone/res2net.py (official CenterNet2 `backbone/res2net.py`).

1. The CenterNet2_R2-101-DCN-BiFPN_1280_4x oracle (../shared/oracle_zoo, README §6): the official
   `backbone.bottom_up.*` weights converted strictly onto `Res2Net` (R2-101, 26w x 4s, modulated
   DCN on res4/res5), the oracle's own 896x1152 input, `bottom_res3..5` compared as stored
   (per-channel float64 sums / abs-sums, mean / std, float32 centre crops).
2. One Bottle2neck block (plain, DCNv2, DCNv1; first / non-first; stride 1 / 2 on odd sizes)
   against a numpy float64 re-implementation written from the official source (torch layouts,
   explicit loops for the ceil-mode average pool and torchvision's bilinear sampling rule).
3. A tiny random Res2Net (R50 layout, narrow, DCNv2 with offsets of several px) against a numpy
   re-implementation of the whole network (deep stem included), on the official canvas and with
   the same image padded by +128 px and `canvas_hw` = the official canvas (same values on it).
4. freeze_at, structure and the unsupported settings.
"""

from __future__ import annotations

import json
import resource
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cn2_jax.modeling.backbone.res2net import (
    Bottle2neckBlock,
    Res2Net,
    avg_pool_ceil_exclude_pad,
    frozen_param_prefixes,
)
from cn2_jax.testing.oracle import regenerate_oracle_state_dict
from cn2_jax.testing.zoo_oracle import zoo_dir
from cn2_jax.weights.flax_mapping import convert_to_flax

# Full-size official-zoo oracle checks: scripts/test_zoo.sh (CI runs it after the suite).
pytestmark = pytest.mark.zoo

ARCH = "CenterNet2_R2-101-DCN-BiFPN_1280_4x"
ZOO = zoo_dir()
ZOO_WEIGHTS = None if ZOO is None else ZOO / f"{ARCH}_weights.json"
ZOO_OUTPUTS = None if ZOO is None else ZOO / f"outputs_{ARCH}_000000000009.npz"
HAVE_ZOO = ZOO_WEIGHTS is not None and ZOO_WEIGHTS.is_file() and ZOO_OUTPUTS.is_file()
needs_zoo = pytest.mark.skipif(
    not HAVE_ZOO, reason=f"../shared/oracle_zoo ({ARCH} weights/outputs) not found"
)
PREFIX = "backbone.bottom_up."
EPS = 1e-5

# The official CenterNet2_R2-101-DCN(-BiFPN) settings (yaml + detectron2 defaults).
R2_101_DCN = dict(
    depth=101,
    width_per_group=26,
    scale=4,
    deform_on_per_stage=(False, False, True, True),
    deform_modulated=True,
    stride_in_1x1=True,
    freeze_at=2,
    out_features=("res3", "res4", "res5"),
)
# A tiny Res2Net-50-like network (same structure, narrow): stem 16, res2 32 (splits of 2).
TINY = dict(R2_101_DCN, depth=50, width_per_group=2, stem_out_channels=16, res2_out_channels=32)


# ----------------------------------------------------------------------------------------------
# Torch-layout state dicts for a Flax variable tree.
# ----------------------------------------------------------------------------------------------
def torch_spec(variables):
  """{official key: torch shape} for every leaf (kernel HWIO -> weight OIHW)."""
  out = {}
  for col, tree in variables.items():
    for path, leaf in traverse_util.flatten_dict(tree).items():
      shape = tuple(leaf.shape)
      name = path[-1]
      if col == "params" and name == "kernel":
        h, w, i, o = shape
        name, shape = "weight", (o, i, h, w)
      out[".".join(path[:-1] + (name,))] = shape
  return out


def random_state(variables, seed, offset_gain=3.0):
  """Random official-layout weights in the spirit of the oracle rule (oracle_zoo README §4):
  He-normal convs, offset convs normal(0, offset_gain / sqrt(fan_in)) (offsets of a few px),
  FrozenBN weight U(0.8, 1.2) (U(0.1, 0.2) for conv3's), bias N(0, 0.1), mean N(0, 0.1),
  var U(0.5, 1.5)."""
  rng = np.random.RandomState(seed)
  sd = {}
  for key, shape in sorted(torch_spec(variables).items()):
    if key.endswith(".running_mean"):
      a = rng.normal(0, 0.1, shape)
    elif key.endswith(".running_var"):
      a = rng.uniform(0.5, 1.5, shape)
    elif key.endswith(".bias"):
      a = rng.normal(0, 0.1, shape)
    elif len(shape) == 4:
      fan_in = int(np.prod(shape[1:]))
      std = (offset_gain if ".conv2_offsets." in "." + key else np.sqrt(2.0)) / np.sqrt(fan_in)
      a = rng.normal(0, std, shape)
    elif key.endswith("conv3.norm.weight"):
      a = rng.uniform(0.1, 0.2, shape)
    else:
      a = rng.uniform(0.8, 1.2, shape)
    sd[key] = a.astype(np.float32)
  return sd


def load(module, x, sd, **kwargs):
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x, **kwargs))
  variables, report = convert_to_flax(sd, shapes)
  assert report.ok
  return jax.tree_util.tree_map(jnp.asarray, variables)


# ----------------------------------------------------------------------------------------------
# Numpy float64 reference, written from the official res2net.py (HWC maps, torch weights).
# ----------------------------------------------------------------------------------------------
def np_conv(x, w, stride=1, pad=0):
  """torch Conv2d (no bias) of an [H, W, C] map with an OIHW weight."""
  h, wd, _ = x.shape
  o, _, kh, kw = w.shape
  xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
  ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
  out = np.zeros((ho, wo, o))
  for i in range(kh):
    for j in range(kw):
      patch = xp[i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
      out += patch @ w[:, :, i, j].T
  return out


def np_frozen_bn(x, sd, key):
  scale = sd[key + ".weight"] / np.sqrt(sd[key + ".running_var"].astype(np.float64) + EPS)
  return (x - sd[key + ".running_mean"]) * scale + sd[key + ".bias"]


def relu(x):
  return np.maximum(x, 0.0)


def np_avg_pool_ceil(x, k):
  """AvgPool2d(k, k, ceil_mode=True, count_include_pad=False): clipped windows, / their size."""
  h, w, c = x.shape
  ho, wo = -(-h // k), -(-w // k)
  out = np.zeros((ho, wo, c))
  for oy in range(ho):
    for ox in range(wo):
      win = x[oy * k : min(oy * k + k, h), ox * k : min(ox * k + k, w)]
      out[oy, ox] = win.reshape(-1, c).mean(0)
  return out


def np_bilinear(img, y, x):
  """torchvision deform_conv2d's bilinear_interpolate for arrays of points: [P] -> [P, C]."""
  h, w, _ = img.shape
  inside = (y > -1) & (y < h) & (x > -1) & (x < w)
  y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
  ly, lx = y - y0, x - x0

  def corner(yy, xx):
    ok = inside & (yy >= 0) & (yy <= h - 1) & (xx >= 0) & (xx <= w - 1)
    return img[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)] * ok[:, None]

  return (
      ((1 - ly) * (1 - lx))[:, None] * corner(y0, x0)
      + ((1 - ly) * lx)[:, None] * corner(y0, x0 + 1)
      + (ly * (1 - lx))[:, None] * corner(y0 + 1, x0)
      + (ly * lx)[:, None] * corner(y0 + 1, x0 + 1)
  )


def np_deform_conv(x, offset, mask, w, stride=1, pad=1):
  """torchvision deform_conv2d (one image, weight groups 1): offset [Ho, Wo, 2 G K] with channel
  g*2K + 2k = dy, + 1 = dx of tap k = i * kw + j; mask [Ho, Wo, G K] or None."""
  h, wd, cin = x.shape
  o, _, kh, kw = w.shape
  ho, wo = offset.shape[:2]
  groups = offset.shape[-1] // (2 * kh * kw)
  cg = cin // groups
  oy, ox = np.meshgrid(np.arange(ho), np.arange(wo), indexing="ij")
  out = np.zeros((ho, wo, o))
  for g in range(groups):
    for i in range(kh):
      for j in range(kw):
        k = i * kw + j
        py = oy * stride - pad + i + offset[..., g * 2 * kh * kw + 2 * k]
        px = ox * stride - pad + j + offset[..., g * 2 * kh * kw + 2 * k + 1]
        cols = np_bilinear(x[..., g * cg : (g + 1) * cg], py.ravel(), px.ravel())
        if mask is not None:
          cols = cols * mask[..., g * kh * kw + k].ravel()[:, None]
        out += (cols @ w[:, g * cg : (g + 1) * cg, i, j].T).reshape(ho, wo, o)
  return out


def np_bottle2neck(x, sd, in_channels, out_channels, stride, scale, deform, modulated):
  """Official BottleneckBlock / DeformBottleneckBlock.forward (stride_in_1x1, groups 1)."""
  out = relu(np_frozen_bn(np_conv(x, sd["conv1.weight"], stride), sd, "conv1.norm"))
  width = out.shape[-1] // scale
  spx = [out[..., s : s + width] for s in range(0, out.shape[-1], width)]  # torch.split
  nums = 1 if scale == 1 else scale - 1
  sp = None
  for i in range(nums):
    sp = spx[i] if (i == 0 or in_channels != out_channels) else sp + spx[i]
    if deform:
      off = np_conv(sp, sd[f"conv2_offsets.{i}.weight"], 1, 1)
      if modulated:
        n = off.shape[-1] // 3  # torch.chunk(offset_mask, 3, dim=1)
        offset = np.concatenate([off[..., :n], off[..., n : 2 * n]], -1)
        mask = 1.0 / (1.0 + np.exp(-off[..., 2 * n :]))
      else:
        offset, mask = off, None
      sp = np_deform_conv(sp, offset, mask, sd[f"convs.{i}.weight"])
    else:
      sp = np_conv(sp, sd[f"convs.{i}.weight"], 1, 1)
    sp = relu(np_frozen_bn(sp, sd, f"bns.{i}"))
    out = sp if i == 0 else np.concatenate([out, sp], -1)
  if scale != 1:
    out = np.concatenate([out, spx[nums]], -1)
  out = np_frozen_bn(np_conv(out, sd["conv3.weight"]), sd, "conv3.norm")
  if in_channels != out_channels:
    pooled = np_avg_pool_ceil(x, stride)
    shortcut = np_frozen_bn(np_conv(pooled, sd["shortcut.1.weight"]), sd, "shortcut.1.norm")
  else:
    shortcut = x
  return relu(out + shortcut)


def np_max_pool_3x3_s2_p1(x):
  h, w, c = x.shape
  xp = np.full((h + 2, w + 2, c), -np.inf)
  xp[1 : h + 1, 1 : w + 1] = x
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  out = np.full((ho, wo, c), -np.inf)
  for i in range(3):
    for j in range(3):
      out = np.maximum(out, xp[i : i + 2 * (ho - 1) + 1 : 2, j : j + 2 * (wo - 1) + 1 : 2])
  return out


def np_res2net(x, sd, blocks_per_stage, deform_on_per_stage, scale=4, modulated=True):
  """Official BasicStem + ResNet.forward over the stages (res2 stride 1, res3..5 stride 2)."""
  x = relu(np_frozen_bn(np_conv(x, sd["stem.conv1.0.weight"], 2, 1), sd, "stem.conv1.1"))
  x = relu(np_frozen_bn(np_conv(x, sd["stem.conv1.3.weight"], 1, 1), sd, "stem.conv1.4"))
  x = relu(np_frozen_bn(np_conv(x, sd["stem.conv1.6.weight"], 1, 1), sd, "stem.bn1"))
  x = np_max_pool_3x3_s2_p1(x)
  outs = {}
  for s, (num_blocks, deform) in enumerate(zip(blocks_per_stage, deform_on_per_stage)):
    for b in range(num_blocks):
      p = f"res{s + 2}.{b}."
      block_sd = {k[len(p) :]: v for k, v in sd.items() if k.startswith(p)}
      out_ch = block_sd["conv3.weight"].shape[0]
      stride = 2 if (b == 0 and s > 0) else 1
      x = np_bottle2neck(x, block_sd, x.shape[-1], out_ch, stride, scale, deform, modulated)
    outs[f"res{s + 2}"] = x
  return outs


# ----------------------------------------------------------------------------------------------
# 1. The official oracle.
# ----------------------------------------------------------------------------------------------
def _oracle_input(out):
  """The oracle's network input `[1, Hp, Wp, 3]` from its stored resized image (README §5)."""
  img = out["resized_image_bgr_uint8"].astype(np.float32)
  if float(out["input_format_is_rgb"]) > 0.5:
    img = img[..., ::-1]
  img = (img - out["pixel_mean"].astype(np.float32)) / out["pixel_std"].astype(np.float32)
  hp, wp = (int(v) for v in out["input_tensor_shape"][2:])
  x = np.zeros((1, hp, wp, 3), np.float32)
  x[0, : img.shape[0], : img.shape[1]] = img
  return x


@pytest.fixture(scope="module")
def oracle_run():
  if not HAVE_ZOO:
    pytest.skip(f"../shared/oracle_zoo ({ARCH}) not found")
  t0 = time.perf_counter()
  sd = regenerate_oracle_state_dict(ZOO_WEIGHTS)  # checks every JSON checksum
  bottom_up = {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)}
  out = np.load(ZOO_OUTPUTS)
  x = _oracle_input(out)
  model = Res2Net(**R2_101_DCN)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x[:, :64, :64]))
  variables, report = convert_to_flax(bottom_up, shapes)
  t1 = time.perf_counter()
  feats = jax.block_until_ready(jax.jit(model.apply)(variables, x))
  t2 = time.perf_counter()
  feats = {k: np.asarray(v[0], np.float64).transpose(2, 0, 1) for k, v in feats.items()}  # CHW
  return dict(
      out=out,
      x=x,
      report=report,
      feats=feats,
      shapes=shapes,
      timing=(t1 - t0, t2 - t1),
      peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  )


@needs_zoo
def test_oracle_weights_convert_strictly(oracle_run):
  """Every `backbone.bottom_up.*` key fills exactly one variable and vice versa, with the official
  module classes (Conv2d / ModulatedDeformConv / FrozenBatchNorm2d) at the expected paths."""
  report = oracle_run["report"]
  assert report.ok, report.summary()
  with open(ZOO_WEIGHTS) as f:
    entries = [e for e in json.load(f)["entries"] if e["key"].startswith(PREFIX)]
  assert report.num_mapped_tensors == len(entries) == 938
  assert report.num_mapped_params == sum(e["numel"] for e in entries if e["is_parameter"])
  classes = {}
  for e in entries:
    classes.setdefault(e["module_class"], set()).add(e["key"][len(PREFIX) :])
  spec = torch_spec(oracle_run["shapes"])
  assert len(classes["ModulatedDeformConv"]) == 78  # 26 res4/res5 blocks x 3 split convs
  for key in classes["ModulatedDeformConv"]:
    assert ".convs." in key and spec[key][1:] in ((104, 3, 3), (208, 3, 3))
  offsets = [k for k in classes["Conv2d"] if ".conv2_offsets." in k]
  assert len(offsets) == 78 and all(spec[k][0] == 27 for k in offsets)
  assert not any(k.endswith(".bias") for k in classes["Conv2d"] | classes["ModulatedDeformConv"])


@needs_zoo
def test_oracle_input_matches(oracle_run):
  out, x = oracle_run["out"], oracle_run["x"]
  assert x.shape == (1, 896, 1152, 3)
  np.testing.assert_allclose(
      x[0].astype(np.float64).sum((0, 1)), out["input_tensor_chan_sum"], rtol=1e-9, atol=1e-3
  )


@needs_zoo
@pytest.mark.parametrize("name", ["res3", "res4", "res5"])
def test_oracle_bottom_up_features(oracle_run, name):
  """`bottom_<name>` is stored as statistics + a float32 centre crop (the maps are > 600k values).

  Tolerances: crop |d| <= 1e-4 max|crop| (README: ~1e-4 of the max abs value); per-channel float64
  sum and abs-sum |d| <= 1e-4 |X_c|_1 + 1e-6 max_c |X_c|_1 (a few channels are almost dead: a
  handful of tiny post-ReLU values, where float32 rounding of 101 layers is a large fraction of
  their own abs-sum); channel mean / std |d| <= 1e-5 max|crop|. Measured on CPU: crop 1.1e-5 /
  4.1e-5 / 1.8e-4 absolute for res3 / res4 / res5 (max |crop| 19.2 / 24.1 / 39.7, i.e. <= 4.5e-6
  relative); sums <= 1.7e-7 of the largest channel abs-sum; mean / std <= 4.3e-6."""
  out, feats = oracle_run["out"], oracle_run["feats"]
  y = feats[name]
  key = f"bottom_{name}"
  assert (1,) + y.shape == tuple(int(v) for v in out[key + "_shape"])
  crop = out[key + "_crop_center"].astype(np.float64)
  cy, cx = (int(v) for v in out[key + "_crop_center_origin_yx"])
  scale = np.abs(crop).max()
  np.testing.assert_allclose(y[:, cy : cy + 16, cx : cx + 16], crop, rtol=0, atol=1e-4 * scale)
  abssum = out[key + "_chan_abssum"]
  tol = 1e-4 * abssum + 1e-6 * abssum.max()
  assert np.all(np.abs(y.sum((1, 2)) - out[key + "_chan_sum"]) <= tol)
  assert np.all(np.abs(np.abs(y).sum((1, 2)) - abssum) <= tol)
  np.testing.assert_allclose(y.mean((1, 2)), out[key + "_chan_mean"], rtol=0, atol=1e-5 * scale)
  np.testing.assert_allclose(
      y.std((1, 2), ddof=1), out[key + "_chan_std"], rtol=0, atol=1e-5 * scale
  )


@needs_zoo
def test_oracle_cost(oracle_run):
  """Records the cost of the full-size comparison and bounds its memory. Measured with 2 CPU
  cores: ~3 s weights + conversion, ~6 s compile + forward (3 s each) when the machine is idle,
  up to ~30 s under load from other processes; peak RSS ~1.8-1.9 GB. The time bound only catches
  a pathological slowdown."""
  prep, forward = oracle_run["timing"]
  peak = oracle_run["peak_mib"]
  print(f"weights+convert {prep:.1f} s, jit+forward {forward:.1f} s, peak {peak:.0f} MiB")
  assert peak < 6 * 1024
  assert forward < 300


# ----------------------------------------------------------------------------------------------
# 2. One block against the numpy re-implementation.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "in_ch, out_ch, stride, scale, deform, modulated, hw",
    [
        (16, 32, 2, 4, True, True, (9, 11)),  # first block, stride 2, ceil-mode pool, DCNv2
        (32, 32, 1, 4, True, True, (7, 10)),  # non-first: split i takes sp_{i-1} + spx[i]
        (32, 32, 1, 4, True, False, (6, 5)),  # DCNv1 (18 offsets, no mask)
        (8, 32, 1, 4, False, False, (8, 9)),  # res2-like first block (AvgPool2d(1) shortcut)
        (16, 32, 2, 4, False, False, (7, 7)),  # plain first block, stride 2, odd size
        (32, 32, 1, 4, False, False, (6, 7)),  # plain non-first
        (32, 32, 1, 1, False, False, (5, 6)),  # scale 1: one conv, nothing concatenated
    ],
)
def test_bottle2neck_block_matches_numpy(in_ch, out_ch, stride, scale, deform, modulated, hw):
  block = Bottle2neckBlock(
      out_channels=out_ch,
      bottleneck_channels=16,
      stride=stride,
      stride_in_1x1=True,
      scale=scale,
      deform=deform,
      deform_modulated=modulated,
      deform_num_groups=1,
      dtype=jnp.float32,
  )
  seed = zlib.crc32(repr((in_ch, out_ch, stride, scale, deform, modulated, hw)).encode())
  rng = np.random.RandomState(seed)
  x = rng.normal(0, 1, (1,) + hw + (in_ch,)).astype(np.float32)
  shapes = jax.eval_shape(lambda: block.init(jax.random.PRNGKey(0), x))
  sd = random_state(shapes, seed)
  variables = load(block, x, sd)
  got = np.asarray(jax.jit(block.apply)(variables, x)[0], np.float64)
  sd64 = {k: v.astype(np.float64) for k, v in sd.items()}
  want = np_bottle2neck(
      x[0].astype(np.float64), sd64, in_ch, out_ch, stride, scale, deform, modulated
  )
  assert got.shape == want.shape == (-(-hw[0] // stride), -(-hw[1] // stride), out_ch)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  if deform:  # the offsets are large enough to matter (the test is not a plain 3x3 conv)
    off = np_conv(
        relu(np_frozen_bn(np_conv(x[0], sd64["conv1.weight"], stride), sd64, "conv1.norm"))[
            ..., :4
        ],
        sd64["conv2_offsets.0.weight"],
        1,
        1,
    )[..., :18]
    assert np.abs(off).max() > 2.0


def test_avg_pool_ceil_exclude_pad():
  """Ceil-mode windows at odd borders average their inside elements; a canvas mask counts
  off-canvas elements as outside."""
  rng = np.random.RandomState(0)
  x = rng.normal(size=(1, 7, 9, 3)).astype(np.float32)
  got = np.asarray(avg_pool_ceil_exclude_pad(jnp.asarray(x), 2, None)[0])
  np.testing.assert_allclose(got, np_avg_pool_ceil(x[0].astype(np.float64), 2), rtol=1e-6)
  big = np.zeros((1, 12, 14, 3), np.float32)
  big[:, :7, :9] = x
  big[:, 7:, :] = 5.0  # garbage off the canvas
  big[:, :, 9:] = -3.0
  valid = (np.arange(12)[:, None] < 7) & (np.arange(14)[None, :] < 9)
  masked = np.asarray(avg_pool_ceil_exclude_pad(jnp.asarray(big), 2, jnp.asarray(valid))[0])
  np.testing.assert_array_equal(masked[:4, :5], got)


# ----------------------------------------------------------------------------------------------
# 3. The whole tiny network vs numpy; a larger padded canvas gives the official values on it.
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
  model = Res2Net(**TINY)
  x = np.zeros((1, 64, 96, 3), np.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  sd = random_state(shapes, 7, offset_gain=6.0)
  variables, report = convert_to_flax(sd, shapes)
  assert report.ok
  return model, jax.tree_util.tree_map(jnp.asarray, variables), sd


def test_tiny_res2net_matches_numpy_and_canvas(tiny):
  """The whole tiny network (deep stem, 16 blocks, 27 DCNv2 with offsets of several px) against
  the numpy reference on the official 64x96 canvas, and the same image padded by +128 rows and
  columns with `canvas_hw` = (64, 96): the same values on the canvas. Not bit-identical: XLA
  blocks the DCN / conv contractions differently for the larger shapes; measured on CPU: official
  canvas vs numpy <= 1.1e-5, padded canvas vs numpy <= 1.7e-5, padded vs official 0 / 6.7e-6 /
  1.7e-5 (res3 / res4 / res5; max |x| 28 / 22 / 32); without `canvas_hw` the padded run differs by
  ~3-5 (the DCN samples and the shortcut pools then read the padding)."""
  model, variables, sd = tiny
  rng = np.random.RandomState(1)
  x = rng.normal(0, 1, (1, 64, 96, 3)).astype(np.float32)
  big = np.zeros((1, 64 + 128, 96 + 128, 3), np.float32)
  big[:, :64, :96] = x
  run = jax.jit(model.apply)
  ref = run(variables, x)
  got = run(variables, big, jnp.asarray([64, 96], jnp.int32))
  plain = run(variables, big)  # no canvas: DCN samples and pools see the padding's values
  want = np_res2net(
      x[0].astype(np.float64),
      {k: v.astype(np.float64) for k, v in sd.items()},
      (3, 4, 6, 3),
      TINY["deform_on_per_stage"],
  )
  differs = False
  for name, stride in (("res3", 8), ("res4", 16), ("res5", 32)):
    h, w = 64 // stride, 96 // stride
    r, wn = np.asarray(ref[name])[0], want[name]
    assert r.shape == wn.shape and r.shape[:2] == (h, w)
    atol = 1e-5 * np.abs(wn).max()
    np.testing.assert_allclose(r, wn, rtol=0, atol=atol)
    np.testing.assert_allclose(np.asarray(got[name])[0, :h, :w], wn, rtol=0, atol=atol)
    np.testing.assert_allclose(np.asarray(got[name])[0, :h, :w], r, rtol=0, atol=atol)
    differs |= np.abs(np.asarray(plain[name])[0, :h, :w] - r).max() > 1e-2 * np.abs(r).max()
  assert differs  # the masking is what makes the canvas values official


# ----------------------------------------------------------------------------------------------
# 4. freeze_at, structure, unsupported settings.
# ----------------------------------------------------------------------------------------------
def test_freeze_at_two_zeroes_stem_and_res2_gradients(tiny):
  model, variables, _ = tiny
  x = np.random.RandomState(2).normal(0, 1, (1, 64, 64, 3)).astype(np.float32)

  def loss(params):
    feats = model.apply({**variables, "params": params}, x)
    return sum(jnp.sum(v) for v in feats.values())

  grads = traverse_util.flatten_dict(jax.jit(jax.grad(loss))(variables["params"]), sep=".")
  frozen = frozen_param_prefixes(2)
  assert frozen == ("stem", "res2")
  for path, g in grads.items():
    is_frozen = any(path == p or path.startswith(p + ".") for p in frozen)
    if is_frozen:
      assert not np.any(np.asarray(g)), path
  assert any(np.any(np.asarray(g)) for p, g in grads.items() if p.startswith("res3."))
  assert any(np.any(np.asarray(g)) for p, g in grads.items() if ".conv2_offsets." in p)


def test_r2_101_structure_and_shapes():
  model = Res2Net(**R2_101_DCN)
  x = jax.ShapeDtypeStruct((1, 896, 1152, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  feats = jax.eval_shape(model.apply, shapes, x)
  assert {k: v.shape for k, v in feats.items()} == {
      "res3": (1, 112, 144, 512),
      "res4": (1, 56, 72, 1024),
      "res5": (1, 28, 36, 2048),
  }
  spec = torch_spec(shapes)
  assert spec["stem.conv1.0.weight"] == (32, 3, 3, 3)
  assert spec["stem.conv1.6.weight"] == (64, 32, 3, 3)
  assert spec["res2.0.convs.0.weight"] == (26, 26, 3, 3)
  assert "res2.0.conv2_offsets.0.weight" not in spec and "res3.3.conv2_offsets.0.weight" not in spec
  assert spec["res4.22.conv2_offsets.2.weight"] == (27, 104, 3, 3)
  assert spec["res5.0.convs.2.weight"] == (208, 208, 3, 3)
  assert spec["res5.0.shortcut.1.weight"] == (2048, 1024, 1, 1)
  assert "res4.1.shortcut.1.weight" not in spec
  # Without res5 requested, res5 is not built (as officially).
  small = Res2Net(**dict(R2_101_DCN, out_features=("res3",)))
  assert not any(
      k.startswith("res4") for k in torch_spec(jax.eval_shape(small.init, jax.random.PRNGKey(0), x))
  )


def test_unsupported_settings_raise():
  x = jnp.zeros((1, 64, 64, 3))
  with pytest.raises(ValueError, match="stride_in_1x1"):
    jax.eval_shape(Res2Net(**dict(TINY, stride_in_1x1=False)).init, jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="num_groups"):
    jax.eval_shape(Res2Net(**dict(TINY, num_groups=2)).init, jax.random.PRNGKey(0), x)
