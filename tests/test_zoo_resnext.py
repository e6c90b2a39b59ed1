"""Tests for the ResNeXt / deformable stages of cn2_jax/modeling/backbone/resnet.py (detectron2
`modeling/backbone/resnet.py`: `BottleneckBlock(num_groups=)`, `DeformBottleneckBlock`,
`build_resnet_backbone`'s NUM_GROUPS / WIDTH_PER_GROUP / DEFORM_* settings).

1. The CenterNet2_X101-DCN_2x oracle (../shared/oracle_zoo, README §6): ResNeXt-101 32x8d,
   stride in the 3x3, modulated DCN (groups 32, 1 deformable group) in every res4/res5 block.
   The official `backbone.bottom_up.*` weights are converted strictly onto `ResNet`, run on the
   oracle's own 800x1088 input, and `bottom_res3..5` compared as stored (per-channel float64 sums
   and abs-sums, mean / std, float32 centre crops).
2. One (Deform)BottleneckBlock (grouped; DCNv2 / DCNv1; 1 or 2 deformable groups; stride on the
   1x1 or the 3x3; odd sizes) against a numpy float64 re-implementation written from
   detectron2's source (torch layouts, torchvision's bilinear sampling rule, torch.chunk split).
3. Canvas: a tiny random ResNeXt with large DCN offsets, the same image padded by +128 px with
   `canvas_hw` = the official canvas -> the same values on the canvas.
4. The defaults keep the plain ResNet (R50 and the narrow test models) as it was; unsupported
   settings raise.
"""

from __future__ import annotations

import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cn2_jax.modeling.backbone.resnet import BottleneckBlock, DeformBottleneckBlock, ResNet
from cn2_jax.testing.oracle import regenerate_oracle_state_dict
from cn2_jax.testing.zoo_oracle import zoo_dir
from cn2_jax.weights.flax_mapping import convert_to_flax

# Full-size official-zoo oracle checks: scripts/test_zoo.sh (CI runs it after the suite).
pytestmark = pytest.mark.zoo

ARCH = "CenterNet2_X101-DCN_2x"
ZOO = zoo_dir()
ZOO_WEIGHTS = None if ZOO is None else ZOO / f"{ARCH}_weights.json"
ZOO_OUTPUTS = None if ZOO is None else ZOO / f"outputs_{ARCH}_000000000009.npz"
HAVE_ZOO = ZOO_WEIGHTS is not None and ZOO_WEIGHTS.is_file() and ZOO_OUTPUTS.is_file()
needs_zoo = pytest.mark.skipif(
    not HAVE_ZOO, reason=f"../shared/oracle_zoo ({ARCH} weights/outputs) not found"
)
PREFIX = "backbone.bottom_up."
EPS = 1e-5

# configs/CenterNet2_X101-DCN_2x.yaml on detectron2's defaults (STEM_OUT_CHANNELS 64,
# RES2_OUT_CHANNELS 256, DEFORM_NUM_GROUPS 1, NORM FrozenBN, FREEZE_AT 2).
X101_DCN = dict(
    depth=101,
    stride_in_1x1=False,
    norm="FrozenBN",
    conv_init="c2_msra",
    freeze_at=2,
    out_features=("res3", "res4", "res5"),
    width=64,
    dtype=jnp.float32,
    num_groups=32,
    width_per_group=8,
    deform_on_per_stage=(False, False, True, True),
    deform_modulated=True,
    deform_num_groups=1,
)


# ----------------------------------------------------------------------------------------------
# Torch-layout state dicts for a Flax variable tree.
# ----------------------------------------------------------------------------------------------
def torch_spec(variables):
  """{official key: torch shape} for every leaf (kernel HWIO -> weight OIHW)."""
  out = {}
  for col, tree in variables.items():
    for path, leaf in traverse_util.flatten_dict(tree).items():
      shape, name = tuple(leaf.shape), path[-1]
      if col == "params" and name == "kernel":
        h, w, i, o = shape
        name, shape = "weight", (o, i, h, w)
      out[".".join(path[:-1] + (name,))] = shape
  return out


def random_state(variables, seed, offset_gain=3.0):
  """Random official-layout weights in the spirit of the oracle rule (oracle_zoo README §4):
  He-normal convs, `conv2_offset` normal(0, offset_gain / sqrt(fan_in)) (offsets of a few px)
  with bias N(0, 0.5), FrozenBN weight U(0.8, 1.2) (U(0.1, 0.2) for conv3's), bias N(0, 0.1),
  mean N(0, 0.1), var U(0.5, 1.5)."""
  rng = np.random.RandomState(seed)
  sd = {}
  for key, shape in sorted(torch_spec(variables).items()):
    if key.endswith(".running_mean"):
      a = rng.normal(0, 0.1, shape)
    elif key.endswith(".running_var"):
      a = rng.uniform(0.5, 1.5, shape)
    elif key.endswith("conv2_offset.bias"):
      a = rng.normal(0, 0.5, shape)
    elif key.endswith(".bias"):
      a = rng.normal(0, 0.1, shape)
    elif len(shape) == 4:
      fan_in = int(np.prod(shape[1:]))
      gain = offset_gain if key.endswith("conv2_offset.weight") else np.sqrt(2.0)
      a = rng.normal(0, gain / np.sqrt(fan_in), shape)
    elif key.endswith("conv3.norm.weight"):
      a = rng.uniform(0.1, 0.2, shape)
    else:
      a = rng.uniform(0.8, 1.2, shape)
    sd[key] = a.astype(np.float32)
  return sd


def load(module, x, sd):
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x))
  variables, report = convert_to_flax(sd, shapes)
  assert report.ok
  return jax.tree_util.tree_map(jnp.asarray, variables)


# ----------------------------------------------------------------------------------------------
# 1. The CenterNet2_X101-DCN_2x oracle.
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def x101_run():
  """The oracle weights on the X101-DCN ResNet, one jitted forward on the oracle's input."""
  t0 = time.perf_counter()
  full = regenerate_oracle_state_dict(ZOO_WEIGHTS)  # checked against the JSON checksums
  sd = {k[len(PREFIX) :]: v for k, v in full.items() if k.startswith(PREFIX)}
  del full
  out = np.load(ZOO_OUTPUTS)
  model = ResNet(**X101_DCN)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
  variables, report = convert_to_flax(sd, shapes)
  t_weights = time.perf_counter() - t0

  # Official preprocessing (README §5): BGR model, (x - mean) / std in float32, zero padding
  # at the bottom/right to the 32-rounded canvas.
  assert not bool(out["input_format_is_rgb"])
  img = out["resized_image_bgr_uint8"].astype(np.float32)
  h, w = img.shape[:2]
  hp, wp = (int(v) for v in out["input_tensor_shape"][2:])
  x = np.zeros((1, hp, wp, 3), np.float32)
  x[0, :h, :w] = (img - out["pixel_mean"].astype(np.float32)) / out["pixel_std"].astype(np.float32)

  run = jax.jit(model.apply).lower(variables, x).compile()
  t1 = time.perf_counter()
  feats = jax.block_until_ready(run(variables, x))
  t_forward = time.perf_counter() - t1
  feats = {k: np.asarray(v[0]).transpose(2, 0, 1) for k, v in feats.items()}  # official [C,H,W]
  print(
      f"\n{ARCH} bottom-up: weights+conversion {t_weights:.1f}s, forward {t_forward:.1f}s "
      f"(compiled), peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
  )
  return dict(out=out, x=x, report=report, sd=sd, feats=feats)


@needs_zoo
def test_x101_dcn_strict_conversion(x101_run):
  """Every official `backbone.bottom_up.*` tensor maps onto exactly one variable and every
  variable is filled: the grouped 3x3s `[C, C/32, 3, 3]`, the DCN kernels and their
  `conv2_offset` 27-channel convs with bias, FrozenBN everywhere."""
  report, sd = x101_run["report"], x101_run["sd"]
  assert report.ok, report.summary()
  assert len(report.mapped) == len(sd) == 572
  assert sd["res4.0.conv2.weight"].shape == (1024, 32, 3, 3)
  assert sd["res5.2.conv2_offset.weight"].shape == (27, 2048, 3, 3)
  assert sd["res3.0.conv2.weight"].shape == (512, 16, 3, 3)
  assert sd["res2.0.conv1.weight"].shape == (256, 64, 1, 1)  # bottleneck 32 x 8 in res2
  assert not any("conv2_offset" in k for k in sd if k.startswith(("res2.", "res3.")))
  assert sum("conv2_offset.weight" in k for k in sd) == 23 + 3  # every res4 / res5 block


@needs_zoo
def test_x101_dcn_input_matches_oracle(x101_run):
  out, x = x101_run["out"], x101_run["x"]
  got = x[0].astype(np.float64).sum((0, 1))
  want = out["input_tensor_chan_sum"]
  np.testing.assert_allclose(got, want, rtol=1e-9)
  assert x.shape[1:3] == tuple(int(v) for v in out["input_tensor_shape"][2:])


@needs_zoo
@pytest.mark.parametrize("name", ["res3", "res4", "res5"])
def test_x101_dcn_bottom_up_matches_oracle(x101_run, name):
  """Measured on CPU (float32): centre crops within 7.6e-6 / 1.8e-5 / 3.2e-5 absolute for
  res3 / res4 / res5 (max |x| 13.7 / 15.9 / 19.2, i.e. <= 1.7e-6 of the max; tolerance 1e-4 of
  the max); per-channel float64 sums within 9.6e-7 / 2.6e-6 of the channel abs-sum for res3 /
  res4 and 1.9e-3 absolute at most (abs-sum 8.3e3) for res5."""
  out, feats = x101_run["out"], x101_run["feats"]
  key = f"bottom_{name}"
  got = feats[name]
  assert (1,) + got.shape == tuple(int(v) for v in out[key + "_shape"])
  cy, cx = (int(v) for v in out[key + "_crop_center_origin_yx"])
  crop = out[key + "_crop_center"]
  np.testing.assert_allclose(
      got[:, cy : cy + 16, cx : cx + 16], crop, rtol=0, atol=1e-4 * np.abs(crop).max()
  )
  if key in out.files:  # the whole map (stored when C*H*W <= 600k values; not for X101)
    np.testing.assert_allclose(got, out[key], rtol=0, atol=1e-4 * np.abs(out[key]).max())
  g64 = got.astype(np.float64)
  abssum = out[key + "_chan_abssum"]
  scale = np.abs(crop).max()
  # Relative to the channel abs-sum, plus a floor for (nearly) dead ReLU channels: res5 has
  # 6 all-zero channels and one with abs-sum 0.046 (a few small values left by cancellation,
  # each off by float32 rounding of the ~20-sized terms: 3.5e-6, 7.6e-5 of that abs-sum).
  tol = 2e-5 * abssum + 1e-5 * scale
  assert np.all(np.abs(g64.sum((1, 2)) - out[key + "_chan_sum"]) <= tol)
  assert np.all(np.abs(np.abs(g64).sum((1, 2)) - abssum) <= tol)
  np.testing.assert_allclose(g64.mean((1, 2)), out[key + "_chan_mean"], rtol=0, atol=1e-5 * scale)
  np.testing.assert_allclose(
      g64.reshape(g64.shape[0], -1).std(1, ddof=1),
      out[key + "_chan_std"],
      rtol=0,
      atol=1e-5 * scale,
  )


# ----------------------------------------------------------------------------------------------
# 2. One block against a numpy float64 re-implementation of detectron2's forward.
# ----------------------------------------------------------------------------------------------
def np_conv(x, w, stride=1, pad=0, groups=1):
  """torch Conv2d (no bias, `groups`) of an [H, W, C] map with an OIHW weight."""
  h, wd, cin = x.shape
  o, cig, kh, kw = w.shape
  cog = o // groups
  xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
  ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
  out = np.zeros((ho, wo, o))
  for g in range(groups):
    for i in range(kh):
      for j in range(kw):
        patch = xp[i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
        wg = w[g * cog : (g + 1) * cog, :, i, j]  # [cog, cig]
        out[..., g * cog : (g + 1) * cog] += patch[..., g * cig : (g + 1) * cig] @ wg.T
  return out


def np_frozen_bn(x, sd, key):
  scale = sd[key + ".weight"] / np.sqrt(sd[key + ".running_var"].astype(np.float64) + EPS)
  return (x - sd[key + ".running_mean"]) * scale + sd[key + ".bias"]


def relu(x):
  return np.maximum(x, 0.0)


def np_bilinear(img, y, x):
  """torchvision deform_conv2d's bilinear_interpolate for arrays of points: [P] -> [P, C]
  (0 unless -1 < y < H and -1 < x < W; corners outside the map read 0)."""
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


def np_deform_conv(x, offset, mask, w, stride, pad, groups):
  """torchvision deform_conv2d (one image) with weight groups `groups`: offset [Ho, Wo, 2 G K]
  (channel g*2K + 2k = dy, + 1 = dx of tap k = i * kw + j), mask [Ho, Wo, G K] or None; the
  im2col columns [Ho, Wo, Cin, K] are multiplied per weight group (`weight[g].flatten(1) @
  columns[g]`)."""
  h, wd, cin = x.shape
  o, cig, kh, kw = w.shape
  ho, wo = offset.shape[:2]
  taps = kh * kw
  og = offset.shape[-1] // (2 * taps)
  cg = cin // og
  oy, ox = np.meshgrid(np.arange(ho), np.arange(wo), indexing="ij")
  cols = np.zeros((ho, wo, cin, taps))
  for g in range(og):
    for i in range(kh):
      for j in range(kw):
        k = i * kw + j
        py = oy * stride - pad + i + offset[..., g * 2 * taps + 2 * k]
        px = ox * stride - pad + j + offset[..., g * 2 * taps + 2 * k + 1]
        v = np_bilinear(x[..., g * cg : (g + 1) * cg], py.ravel(), px.ravel())
        if mask is not None:
          v = v * mask[..., g * taps + k].ravel()[:, None]
        cols[..., g * cg : (g + 1) * cg, k] = v.reshape(ho, wo, cg)
  cog = o // groups
  out = np.zeros((ho, wo, o))
  for g in range(groups):
    wmat = w[g * cog : (g + 1) * cog].reshape(cog, cig * taps)  # weight[g].flatten(1)
    colg = cols[..., g * cig : (g + 1) * cig, :].reshape(ho, wo, cig * taps)
    out[..., g * cog : (g + 1) * cog] = colg @ wmat.T
  return out


def np_block(x, sd, stride, stride_in_1x1, groups, deform, modulated):
  """detectron2 BottleneckBlock / DeformBottleneckBlock.forward (dilation 1, FrozenBN)."""
  s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
  out = relu(np_frozen_bn(np_conv(x, sd["conv1.weight"], s1), sd, "conv1.norm"))
  if deform:
    om = np_conv(out, sd["conv2_offset.weight"], s3, 1) + sd["conv2_offset.bias"]
    if modulated:
      n = om.shape[-1] // 3  # torch.chunk(offset_mask, 3, dim=1)
      offset_x, offset_y, mask = om[..., :n], om[..., n : 2 * n], om[..., 2 * n :]
      offset = np.concatenate([offset_x, offset_y], axis=-1)
      mask = 1 / (1 + np.exp(-mask))
    else:
      offset, mask = om, None
    out = np_deform_conv(out, offset, mask, sd["conv2.weight"], s3, 1, groups)
  else:
    out = np_conv(out, sd["conv2.weight"], s3, 1, groups)
  out = relu(np_frozen_bn(out, sd, "conv2.norm"))
  out = np_frozen_bn(np_conv(out, sd["conv3.weight"]), sd, "conv3.norm")
  if "shortcut.weight" in sd:
    shortcut = np_frozen_bn(np_conv(x, sd["shortcut.weight"], stride), sd, "shortcut.norm")
  else:
    shortcut = x
  return relu(out + shortcut)


BLOCK_CASES = [
    # (in, out, bottleneck, groups, stride, stride_in_1x1, deform, modulated, deform groups, hw)
    (16, 32, 16, 4, 2, False, True, True, 1, (9, 11)),  # X101-DCN's first res4/res5 block
    (32, 32, 16, 4, 1, False, True, True, 2, (7, 8)),  # identity shortcut, 2 deformable groups
    (16, 32, 16, 8, 2, True, True, False, 1, (8, 9)),  # DCNv1, stride on the 1x1
    (16, 32, 32, 8, 2, False, False, False, 1, (9, 10)),  # plain ResNeXt block
]


@pytest.mark.parametrize("cin,cout,bott,groups,stride,s1x1,deform,modulated,dg,hw", BLOCK_CASES)
def test_block_matches_numpy_reference(
    cin, cout, bott, groups, stride, s1x1, deform, modulated, dg, hw
):
  common = dict(
      out_channels=cout,
      bottleneck_channels=bott,
      stride=stride,
      stride_in_1x1=s1x1,
      norm="FrozenBN",
      conv_init="c2_msra",
      dtype=jnp.float32,
      num_groups=groups,
  )
  if deform:
    block = DeformBottleneckBlock(deform_modulated=modulated, deform_num_groups=dg, **common)
  else:
    block = BottleneckBlock(**common)
  x = np.random.RandomState(cin + bott + groups).normal(0, 1, (1,) + hw + (cin,))
  x = x.astype(np.float32)
  shapes = jax.eval_shape(lambda: block.init(jax.random.PRNGKey(0), x))
  spec = torch_spec(shapes)
  assert spec["conv2.weight"] == (bott, bott // groups, 3, 3)
  if deform:
    assert spec["conv2_offset.weight"] == ((27 if modulated else 18) * dg, bott, 3, 3)
    assert spec["conv2_offset.bias"] == ((27 if modulated else 18) * dg,)
    assert "conv2.bias" not in spec and "conv2.norm.running_var" in spec
  sd = random_state(shapes, seed=cin * groups + stride, offset_gain=4.0)
  variables = load(block, x, sd)
  got = np.asarray(jax.jit(block.apply)(variables, x)[0], np.float64)
  sd64 = {k: v.astype(np.float64) for k, v in sd.items()}
  want = np_block(x[0].astype(np.float64), sd64, stride, s1x1, groups, deform, modulated)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
  if deform:  # the offsets matter: the same block with zero offsets/mask logits differs
    zero = dict(sd, **{k: 0 * v for k, v in sd.items() if "conv2_offset" in k})
    plain = np.asarray(jax.jit(block.apply)(load(block, x, zero), x)[0])
    assert np.abs(plain - got).max() > 1e-2 * np.abs(want).max()


def test_deform_block_with_zero_offsets_and_unit_mask_is_the_grouped_block():
  """conv2_offset = (0 offsets, mask logits 30 -> sigmoid == 1.0 in float32): the DCNv2 block
  equals the plain grouped BottleneckBlock with the same weights; DCNv1 with zero offsets too.
  A swapped offset / mask split would shift the samples by 30 px."""
  common = dict(
      out_channels=32,
      bottleneck_channels=16,
      stride=2,
      stride_in_1x1=False,
      norm="FrozenBN",
      conv_init="c2_msra",
  )
  x = np.random.RandomState(3).normal(0, 1, (2, 9, 10, 16)).astype(np.float32)
  plain = BottleneckBlock(dtype=jnp.float32, num_groups=4, **common)
  sd = random_state(jax.eval_shape(lambda: plain.init(jax.random.PRNGKey(0), x)), 5)
  want = np.asarray(jax.jit(plain.apply)(load(plain, x, sd), x))
  for modulated in (True, False):
    block = DeformBottleneckBlock(
        dtype=jnp.float32,
        num_groups=4,
        deform_modulated=modulated,
        deform_num_groups=1,
        **common,
    )
    n = 27 if modulated else 18
    bias = np.zeros(n, np.float32)
    bias[18:] = 30.0
    sd_d = dict(sd, **{"conv2_offset.weight": np.zeros((n, 16, 3, 3), np.float32)})
    sd_d["conv2_offset.bias"] = bias
    got = np.asarray(jax.jit(block.apply)(load(block, x, sd_d), x))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# ----------------------------------------------------------------------------------------------
# 3. Canvas: a larger padded canvas gives the official values on the official canvas.
# ----------------------------------------------------------------------------------------------
# A tiny ResNeXt-50 (stem 16, res2 64 out, bottleneck 4 x 4 = 16) with grouped plain stages
# (res2, res4) and grouped DCN stages (res3, res5), stride in the 3x3 like X101-DCN.
TINY = dict(
    X101_DCN,
    depth=50,
    width=16,
    num_groups=4,
    width_per_group=4,
    deform_on_per_stage=(False, True, False, True),
    out_features=("res2", "res3", "res4", "res5"),
)


@pytest.mark.parametrize("modulated,deform_groups", [(True, 1), (False, 2)])
def test_canvas_padding_keeps_official_values(modulated, deform_groups):
  model = ResNet(**dict(TINY, deform_modulated=modulated, deform_num_groups=deform_groups))
  rng = np.random.RandomState(1)
  x = rng.normal(0, 1, (1, 64, 96, 3)).astype(np.float32)
  sd = random_state(
      jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x)), 7, offset_gain=6.0
  )
  variables = load(model, x, sd)
  big = np.zeros((1, 64 + 128, 96 + 128, 3), np.float32)
  big[:, :64, :96] = x
  run = jax.jit(model.apply)
  ref = run(variables, x)
  got = run(variables, big, jnp.asarray([64, 96], jnp.int32))
  plain = run(variables, big)  # no canvas: 3x3 convs, pools and DCN samples see the padding
  differs = {}
  for name, stride in (("res2", 4), ("res3", 8), ("res4", 16), ("res5", 32)):
    h, w = 64 // stride, 96 // stride
    r = np.asarray(ref[name])
    assert r.shape[1:3] == (h, w)
    np.testing.assert_allclose(
        np.asarray(got[name])[:, :h, :w], r, rtol=1e-6, atol=1e-6 * np.abs(r).max()
    )
    differs[name] = np.abs(np.asarray(plain[name])[:, :h, :w] - r).max() / np.abs(r).max()
  assert differs["res5"] > 1e-3, differs  # the masking is what makes the canvas values official


# ----------------------------------------------------------------------------------------------
# 4. Defaults keep the plain ResNet; unsupported settings.
# ----------------------------------------------------------------------------------------------
_PLAIN = dict(
    stride_in_1x1=True,
    norm="FrozenBN",
    conv_init="c2_msra",
    freeze_at=2,
    out_features=("res2", "res3", "res4", "res5"),
    dtype=jnp.float32,
)
# A plain ResNet's ResNeXt / DCN settings (the schema's values)
_RESNET = dict(
    num_groups=1,
    width_per_group=0,
    deform_on_per_stage=(False, False, False, False),
    deform_modulated=False,
    deform_num_groups=1,
)


def _structure(model, hw=(64, 64)):
  v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + hw + (3,))))
  return torch_spec(v)


def test_defaults_keep_the_plain_resnet():
  """R50 with the new attributes at their defaults, and with them spelled out as detectron2's
  R50 (NUM_GROUPS 1, WIDTH_PER_GROUP 64, no DCN), has the same variables; a narrow model
  (width 16) keeps bottleneck = width (None / 0 = `width`) and the same values."""
  r50 = _structure(ResNet(depth=50, width=64, **_PLAIN, **_RESNET))
  explicit = _structure(ResNet(depth=50, width=64, **_PLAIN, **dict(_RESNET, width_per_group=64)))
  assert r50 == explicit
  assert r50["res2.0.conv2.weight"] == (64, 64, 3, 3)
  assert r50["res5.2.conv3.weight"] == (2048, 512, 1, 1)
  assert not any("conv2_offset" in k for k in r50)

  x = np.random.RandomState(4).normal(0, 1, (1, 64, 64, 3)).astype(np.float32)
  outs = []
  for extra in ({}, dict(width_per_group=0), dict(width_per_group=16, num_groups=1)):
    model = ResNet(depth=50, width=16, **_PLAIN, **dict(_RESNET, **extra))
    spec = _structure(model)
    assert spec["res2.0.conv1.weight"] == (16, 16, 1, 1)
    assert spec["res4.0.conv2.weight"] == (64, 64, 3, 3)
    sd = random_state(jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0), x)), 2)
    outs.append(jax.jit(model.apply)(load(model, x, sd), x))
  for o in outs[1:]:
    for k in o:
      np.testing.assert_array_equal(np.asarray(o[k]), np.asarray(outs[0][k]))


def test_resnext_structure_and_unsupported_settings():
  spec = _structure(ResNet(**X101_DCN))
  assert spec["res2.0.conv2.weight"] == (256, 8, 3, 3)
  assert spec["res3.3.conv2.weight"] == (512, 16, 3, 3)
  assert spec["res4.22.conv2.weight"] == (1024, 32, 3, 3)
  assert spec["res5.0.conv2_offset.weight"] == (27, 2048, 3, 3)  # on conv1's output
  assert spec["res5.0.conv2.weight"] == (2048, 64, 3, 3)
  assert "res3.0.conv2_offset.weight" not in spec
  dcnv1 = _structure(ResNet(**dict(X101_DCN, deform_modulated=False, deform_num_groups=2)))
  assert dcnv1["res4.0.conv2_offset.weight"] == (36, 1024, 3, 3)

  x = jnp.zeros((1, 64, 64, 3))
  bad = [
      dict(depth=18, width=64, num_groups=2),
      dict(depth=34, width=64, deform_on_per_stage=(False, False, True, True)),
      dict(depth=50, width=64, deform_on_per_stage=(False, True)),
      dict(depth=50, width=64, num_groups=0),
  ]
  for kwargs in bad:
    with pytest.raises(ValueError):
      model = ResNet(**_PLAIN, **dict(_RESNET, **kwargs))
      jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0), x))
