"""Tests for cn2_jax.modeling.ops.dcn (modulated deformable conv, DCNv2 / DCNv1).

* a per-sample numpy loop written from the kernel semantics of the centerX oracle README §3
  (torchvision `bilinear_interpolate` / `deformable_im2col`), including hand-placed samples on
  the boundary cases (p = -1, p = size, partially outside, integer positions);
* special cases: zero offsets with mask 1 are a plain conv, integer offsets a shifted conv;
* gradients against central finite differences in float64;
* the official op reference `centerx_dcn_op_dev.npz` (forward and the five gradients);
* the Flax module: parameter names/shapes, offset/mask split, initialisation;
* jit traces once for repeated calls with the same shapes.
"""

import math

import flax
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from cn2_jax.modeling.ops import dcn
from cn2_jax.testing import centerx_oracle_dcn as cxo

# Tiny shapes: XLA compile time dominates, so most XLA optimisations are off for this module
# (shared fixture in conftest.py); the numerics checked here do not depend on them.
pytestmark = pytest.mark.usefixtures("fast_compile")


# ----------------------------------------------------------------------------------------------
# numpy reference (plain loops over output pixels, groups and taps; float64)
# ----------------------------------------------------------------------------------------------
def _ref_bilinear(img, h, w):
  """torchvision `bilinear_interpolate` on one `[H, W, C]` map: 0 unless -1 < h < H and
  -1 < w < W; each of the four corners that lies outside the map reads 0."""
  height, width = img.shape[:2]
  if h <= -1 or h >= height or w <= -1 or w >= width:
    return np.zeros(img.shape[-1])
  h_low, w_low = int(math.floor(h)), int(math.floor(w))
  h_high, w_high = h_low + 1, w_low + 1
  lh, lw = h - h_low, w - w_low
  hh, hw = 1 - lh, 1 - lw

  def at(y, x):
    if 0 <= y < height and 0 <= x < width:
      return img[y, x]
    return np.zeros(img.shape[-1])

  return (
      hh * hw * at(h_low, w_low)
      + hh * lw * at(h_low, w_high)
      + lh * hw * at(h_high, w_low)
      + lh * lw * at(h_high, w_high)
  )


def ref_deform_conv2d(x, offset, mask, kernel, bias=None, stride=1, padding=1, dilation=1):
  """Spec-level DCNv2 in float64. x `[B,H,W,Cin]`, offset `[B,Ho,Wo,2GK]` (channel g*2K + 2k =
  dy, +1 = dx, tap k = i*kw + j), mask `[B,Ho,Wo,GK]` or None, kernel HWIO."""
  x, offset, kernel = (np.asarray(a, np.float64) for a in (x, offset, kernel))
  bsz, height, width, cin = x.shape
  kh, kw, _, cout = kernel.shape
  sh, sw = dcn._pair(stride)
  ph, pw = dcn._pair(padding)
  dh, dw = dcn._pair(dilation)
  ho = (height + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
  wo = (width + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
  taps = kh * kw
  groups = offset.shape[-1] // (2 * taps)
  cg = cin // groups
  out = np.zeros((bsz, ho, wo, cout))
  for b in range(bsz):
    for oy in range(ho):
      for ox in range(wo):
        col = np.zeros((kh, kw, cin))
        for g in range(groups):
          for i in range(kh):
            for j in range(kw):
              k = i * kw + j
              dy = offset[b, oy, ox, g * 2 * taps + 2 * k]
              dx = offset[b, oy, ox, g * 2 * taps + 2 * k + 1]
              m = 1.0 if mask is None else float(mask[b, oy, ox, g * taps + k])
              py = oy * sh - ph + i * dh + dy
              px = ox * sw - pw + j * dw + dx
              col[i, j, g * cg : (g + 1) * cg] = m * _ref_bilinear(
                  x[b, :, :, g * cg : (g + 1) * cg], py, px
              )
        out[b, oy, ox] = np.einsum("ijc,ijco->o", col, kernel)
  if bias is not None:
    out = out + np.asarray(bias, np.float64)
  return out


def _inputs(seed, bsz, height, width, cin, cout, kh, kw, ho, wo, groups, offset_std=2.0):
  rng = np.random.default_rng(seed)
  taps = kh * kw
  x = rng.standard_normal((bsz, height, width, cin))
  offset = offset_std * rng.standard_normal((bsz, ho, wo, 2 * groups * taps))
  mask = 1 / (1 + np.exp(-rng.standard_normal((bsz, ho, wo, groups * taps))))
  kernel = rng.standard_normal((kh, kw, cin, cout)) * np.sqrt(2 / (taps * cin))
  bias = 0.1 * rng.standard_normal((cout,))
  return x, offset, mask, kernel, bias


def _place_boundary_samples(offset, kh, kw, stride, padding, dilation, height, width):
  """Overwrite the first taps of output pixel (0, 0) of image 0 so the samples hit the edge
  cases exactly (all values are exact in float32): p = -1 and p = size (both give 0),
  p in (-1, 0) and (size - 1, size) (partially outside), integer p, and a sample outside on
  one axis only."""
  sh, sw = dcn._pair(stride)
  ph, pw = dcn._pair(padding)
  dh, dw = dcn._pair(dilation)
  targets = [
      (-1.0, 2.0),
      (height, 1.5),
      (-0.5, -0.25),
      (height - 0.75, width - 0.5),
      (2.0, 3.0),
      (1.5, -1.0),
      (0.25, width),
      (-1.5, 1.0),
  ]
  offset = offset.copy()
  for k, (ty, tx) in enumerate(targets[: kh * kw]):
    i, j = divmod(k, kw)
    offset[0, 0, 0, 2 * k] = ty - (0 * sh - ph + i * dh)
    offset[0, 0, 0, 2 * k + 1] = tx - (0 * sw - pw + j * dw)
  return offset


CASES = [
    # (B, H, W, Cin, Cout, kh, kw, stride, padding, dilation, groups, masked)
    (2, 5, 6, 4, 3, 3, 3, 1, 1, 1, 1, True),
    (1, 7, 6, 4, 2, 3, 3, 2, 1, 1, 2, True),
    (1, 6, 5, 3, 2, 3, 3, 1, 2, 2, 1, False),  # DCNv1, dilated
    (1, 5, 6, 2, 3, 2, 3, (1, 2), (1, 0), 1, 1, True),  # non-square kernel, pair stride/pad
]


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_numpy_loop(case):
  bsz, height, width, cin, cout, kh, kw, stride, padding, dilation, groups, masked = case
  ho, wo = dcn.deform_conv_output_size((height, width), (kh, kw), stride, padding, dilation)
  x, offset, mask, kernel, bias = _inputs(0, bsz, height, width, cin, cout, kh, kw, ho, wo, groups)
  offset = _place_boundary_samples(offset, kh, kw, stride, padding, dilation, height, width)
  mask = mask if masked else None
  want = ref_deform_conv2d(x, offset, mask, kernel, bias, stride, padding, dilation)
  f = lambda *a: dcn.deform_conv2d(
      *a, stride=stride, padding=padding, dilation=dilation, offset_groups=groups
  )
  m32 = None if mask is None else jnp.asarray(mask, jnp.float32)
  got = f(
      *(jnp.asarray(a, jnp.float32) for a in (x, offset)),
      m32,
      *(jnp.asarray(a, jnp.float32) for a in (kernel, bias)),
  )
  assert got.shape == want.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-6 * np.abs(want).max())
  with jax.enable_x64(True):
    got64 = f(
        *(jnp.asarray(a) for a in (x, offset)),
        None if mask is None else jnp.asarray(mask),
        *(jnp.asarray(a) for a in (kernel, bias)),
    )
    assert got64.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got64), want, rtol=0, atol=1e-12)


def test_boundary_rule_single_samples():
  """One channel, 1x1 kernel, no padding: the output is the sample itself."""
  height, width = 3, 4
  img = np.arange(1, 13, dtype=np.float32).reshape(1, height, width, 1)
  # (py, px) -> expected, by hand from the rule.
  cases = {
      (-1.0, 1.0): 0.0,  # p = -1 is outside
      (-0.5, 1.0): 0.5 * img[0, 0, 1, 0],  # half of the only inside corner
      (1.0, 2.0): img[0, 1, 2, 0],  # integer position
      (2.5, 3.0): 0.5 * img[0, 2, 3, 0],  # lower corner only (row 3 is outside)
      (3.0, 0.0): 0.0,  # p = H is outside
      (1.0, 4.0): 0.0,  # p = W is outside
      (1.25, -0.75): 0.25 * (0.75 * img[0, 1, 0, 0] + 0.25 * img[0, 2, 0, 0]),
      (-1.5, 1.0): 0.0,  # both corners outside
  }
  f = jax.jit(
      lambda o: dcn.deform_conv2d(
          jnp.asarray(img), o, None, jnp.ones((1, 1, 1, 1), jnp.float32), padding=0
      )
  )
  for (py, px), want in cases.items():
    o = np.zeros((1, height, width, 2), np.float32)
    o[0, 0, 0] = (py, px)  # output pixel (0, 0) samples (py, px)
    got = float(f(jnp.asarray(o))[0, 0, 0, 0])
    assert got == pytest.approx(float(want), abs=1e-6), (py, px)


# ----------------------------------------------------------------------------------------------
# special cases
# ----------------------------------------------------------------------------------------------
def _conv(x, kernel, stride=1, padding=1, dilation=1):
  s, p, d = dcn._pair(stride), dcn._pair(padding), dcn._pair(dilation)
  return lax.conv_general_dilated(
      x,
      kernel,
      s,
      ((p[0], p[0]), (p[1], p[1])),
      rhs_dilation=d,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=lax.Precision.HIGHEST,
  )


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2)])
def test_zero_offsets_unit_mask_is_plain_conv(stride, padding, dilation):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 9, 8, 5)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 5, 4)), jnp.float32)
  bias = jnp.asarray(rng.standard_normal((4,)), jnp.float32)
  want = _conv(x, kernel, stride, padding, dilation) + bias
  ho, wo = want.shape[1:3]
  offset = jnp.zeros((2, ho, wo, 18), jnp.float32)
  kw = dict(stride=stride, padding=padding, dilation=dilation, precision="highest")
  got = dcn.deform_conv2d(x, offset, jnp.ones((2, ho, wo, 9)), kernel, bias, **kw)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  got_v1 = dcn.deform_conv2d(x, offset, None, kernel, bias, **kw)  # DCNv1: mask None == 1
  np.testing.assert_allclose(np.asarray(got_v1), np.asarray(got), rtol=0, atol=0)
  half = dcn.deform_conv2d(x, offset, jnp.full((2, ho, wo, 9), 0.5), kernel, None, **kw)
  np.testing.assert_allclose(np.asarray(half), 0.5 * np.asarray(want - bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shift", [(1, -2), (-3, 0), (2, 5)])
def test_integer_offsets_are_a_shifted_conv(shift):
  """dy = a, dx = b for every tap moves every 3x3 window by (a, b) over the zero-extended input
  (integer positions read one pixel; p <= -1 and p >= size read 0, like zero padding): the
  output is a window of a conv with wide zero padding."""
  a, b = shift
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((1, 7, 8, 3)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 2)), jnp.float32)
  h, w = x.shape[1:3]
  big = 1 + max(abs(a), abs(b))
  # Output q of the conv padded by `big` has its window starting at input row q - big; the DCN
  # output y has its window starting at y - 1 + a.
  full = _conv(x, kernel, padding=big)
  want = full[:, a + big - 1 : a + big - 1 + h, b + big - 1 : b + big - 1 + w]
  offset = jnp.asarray(np.broadcast_to(np.tile(np.float32([a, b]), 9), (1, h, w, 18)))
  got = dcn.deform_conv2d(x, offset, None, kernel, precision="highest")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_offset_channel_order_dy_then_dx():
  """Tap 4 (the centre of a 3x3 kernel) alone: offset channel 8 moves the sample down (rows),
  channel 9 moves it right (columns)."""
  x = jnp.asarray(np.arange(30, dtype=np.float32).reshape(1, 5, 6, 1))
  kernel = jnp.zeros((3, 3, 1, 1)).at[1, 1, 0, 0].set(1.0)
  for ch, want in [(8, x[0, 3, 2, 0]), (9, x[0, 2, 3, 0])]:
    offset = jnp.zeros((1, 5, 6, 18)).at[0, 2, 2, ch].set(1.0)
    got = dcn.deform_conv2d(x, offset, None, kernel)
    assert float(got[0, 2, 2, 0]) == float(want)
  # mask channel k scales tap k only.
  mask = jnp.ones((1, 5, 6, 9)).at[0, 2, 2, 4].set(0.25).at[0, 2, 2, 0].set(0.0)
  got = dcn.deform_conv2d(x, jnp.zeros((1, 5, 6, 18)), mask, kernel)
  assert float(got[0, 2, 2, 0]) == 0.25 * float(x[0, 2, 2, 0])


# ----------------------------------------------------------------------------------------------
# gradients: central finite differences in float64
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("masked,groups,stride", [(True, 1, 1), (False, 2, 2)])
def test_gradients_match_finite_differences(masked, groups, stride):
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    bsz, height, width, cin, cout = 1, 4, 5, 4, 2
    ho, wo = dcn.deform_conv_output_size((height, width), (3, 3), stride)
    x, _, mask, kernel, bias = _inputs(4, bsz, height, width, cin, cout, 3, 3, ho, wo, groups)
    # Offsets = integer + fraction in [0.15, 0.85]: every sample point is at least 0.15 px from
    # the grid lines where the bilinear weights (and the -1 / size cut-offs) have kinks, so the
    # function is smooth within the FD step. Integers in [-3, 3] put some samples outside.
    offset = rng.integers(-3, 4, (bsz, ho, wo, 18 * groups)) + rng.uniform(
        0.15, 0.85, (bsz, ho, wo, 18 * groups)
    )
    gout = rng.standard_normal((bsz, ho, wo, cout))
    args = [x, offset, mask, kernel, bias]
    names = ["input", "offset", "mask", "kernel", "bias"]
    if not masked:
      args[2] = None

    def loss(*a):
      return jnp.sum(dcn.deform_conv2d(*a, stride=stride, offset_groups=groups) * gout)

    argnums = tuple(i for i, a in enumerate(args) if a is not None)
    jargs = [None if a is None else jnp.asarray(a) for a in args]
    grads = jax.grad(loss, argnums=argnums)(*jargs)
    lossj = jax.jit(loss)
    eps = 1e-6
    for gi, i in enumerate(argnums):
      for d in range(2):  # two random directions per argument
        v = rng.standard_normal(args[i].shape)
        plus = list(jargs)
        minus = list(jargs)
        plus[i] = jargs[i] + eps * v
        minus[i] = jargs[i] - eps * v
        fd = (float(lossj(*plus)) - float(lossj(*minus))) / (2 * eps)
        an = float(jnp.sum(grads[gi] * v))
        assert an == pytest.approx(fd, rel=1e-6, abs=1e-7), (names[i], d, an, fd)


# ----------------------------------------------------------------------------------------------
# the official op reference (centerX oracle)
# ----------------------------------------------------------------------------------------------
needs_oracle = pytest.mark.skipif(
    cxo.dcn_op_npz_path() is None, reason="centerX oracle (shared/oracle_centerx) not found"
)

QUANTITIES = ["output", "grad_input", "grad_offset", "grad_mask", "grad_kernel", "grad_bias"]


def _oracle_run(ref):
  """Forward and the VJP of `sum(out * grad_output)` on the reference inputs (NHWC/HWIO)."""
  f = lambda x, o, m, k, b: dcn.deform_conv2d(x, o, m, k, b, **cxo.DCN_OP_SETTINGS)
  out, vjp = jax.vjp(
      f, *(jnp.asarray(ref[n]) for n in ["input", "offset", "mask", "kernel", "bias"])
  )
  grads = vjp(jnp.asarray(ref["grad_output"]))
  return dict(zip(QUANTITIES, [out, *grads]))


def _max_err(got, ref):
  """Per quantity: (max |diff|, max |ref|)."""
  return {
      q: (float(np.abs(np.asarray(got[q], np.float64) - ref[q]).max()), float(np.abs(ref[q]).max()))
      for q in QUANTITIES
  }


@needs_oracle
def test_official_op_reference_float64():
  with jax.enable_x64(True):
    ref = cxo.load_dcn_op_reference("float64")
    got = _oracle_run(ref)
    assert got["output"].dtype == jnp.float64
    errs = _max_err(got, ref)
  for q, (err, scale) in errs.items():
    # README §7: float64 output and gradients to 1e-10.
    assert err <= 1e-10 * max(1.0, scale), (q, err, scale)


@needs_oracle
def test_official_op_reference_float32():
  ref = cxo.load_dcn_op_reference("float32")
  got = _oracle_run(ref)
  assert got["output"].dtype == jnp.float32
  for q, (err, scale) in _max_err(got, ref).items():
    # README §7: float32 to about 1e-5 relative (to the largest magnitude of each quantity).
    assert err <= 1e-5 * scale, (q, err, scale)


@needs_oracle
def test_oracle_layout_and_own_checks():
  ref = cxo.load_dcn_op_reference("float64")
  assert ref["input"].shape == (2, 9, 11, 16)
  assert ref["offset"].shape == (2, 9, 11, 18) and ref["mask"].shape == (2, 9, 11, 9)
  assert ref["kernel"].shape == (3, 3, 16, 8) and ref["grad_kernel"].shape == (3, 3, 16, 8)
  checks = cxo.load_dcn_checks()
  assert checks is not None
  assert checks["gradcheck_f64_tiny_with_mask"] and checks["gradcheck_f64_tiny_no_mask"]
  # Our independent numpy loop agrees with the official forward too (a check of the loop).
  want = ref_deform_conv2d(
      ref["input"][:1], ref["offset"][:1], ref["mask"][:1], ref["kernel"], ref["bias"]
  )
  np.testing.assert_allclose(want, ref["output"][:1], rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Flax module
# ----------------------------------------------------------------------------------------------
def _torch_style_chunk_split(om_nchw, n_off):
  """centerX `ModulatedDeformConvWithOff.forward`: o1, o2, m = chunk(x, 3, dim=1);
  offset = cat(o1, o2); mask = sigmoid(m)."""
  o1, o2, m = np.split(om_nchw, 3, axis=1)
  assert o1.shape[1] == n_off
  return np.concatenate([o1, o2], axis=1), 1 / (1 + np.exp(-m))


def test_module_params_split_and_init():
  cin, cout = 6, 5
  layer = dcn.ModulatedDeformConv(cout)
  x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 7, 8, cin)), jnp.float32)
  # jit: eager Flax init/apply would dispatch and compile every primitive separately.
  apply = jax.jit(layer.apply)
  variables = jax.jit(layer.init)(jax.random.PRNGKey(0), x)
  flat = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(variables).items()}
  assert {k: v.shape for k, v in flat.items()} == {
      "params/offset_mask_conv/kernel": (3, 3, cin, 27),
      "params/offset_mask_conv/bias": (27,),
      "params/dcnv2/kernel": (3, 3, cin, cout),
      "params/dcnv2/bias": (cout,),
  }
  # Zero-initialised offset/mask conv (DCNv2 `init_offset`): regular grid, mask sigmoid(0).
  assert not np.any(flat["params/offset_mask_conv/kernel"])
  assert not np.any(flat["params/offset_mask_conv/bias"])
  assert not np.any(flat["params/dcnv2/bias"])
  bound = math.sqrt(6 / (9 * cin))  # kaiming_uniform(relu)
  kern = np.asarray(flat["params/dcnv2/kernel"])
  assert np.abs(kern).max() <= bound and np.abs(kern).max() > 0.8 * bound
  y = apply(variables, x)
  np.testing.assert_allclose(np.asarray(y), 0.5 * np.asarray(_conv(x, kern)), rtol=1e-5, atol=1e-5)

  # centerX's own init (torch default Conv2d init, not zeroed).
  v2 = jax.jit(dcn.ModulatedDeformConv(cout, zero_init_offset=False).init)(jax.random.PRNGKey(1), x)
  b2 = 1 / math.sqrt(9 * cin)
  for leaf in ("kernel", "bias"):
    p = np.asarray(v2["params"]["offset_mask_conv"][leaf])
    assert 0.5 * b2 < np.abs(p).max() <= b2, leaf

  # Split: a constant offset/mask conv output (zero kernel, bias = c) must reach the op as
  # offset = c[:18] and mask = sigmoid(c[18:]), the order of centerX's chunk/cat.
  c = np.random.default_rng(6).standard_normal(27).astype(np.float32) * 2
  params = flax.core.unfreeze(variables["params"])
  params["offset_mask_conv"]["bias"] = jnp.asarray(c)
  y = apply({"params": params}, x)
  om_nchw = np.broadcast_to(c[None, :, None, None], (2, 27, 7, 8))
  off_nchw, mask_nchw = _torch_style_chunk_split(om_nchw, 9)
  want = dcn.deform_conv2d(
      x,
      jnp.asarray(off_nchw.transpose(0, 2, 3, 1)),
      jnp.asarray(mask_nchw.transpose(0, 2, 3, 1)),
      jnp.asarray(kern),
      params["dcnv2"]["bias"],
  )
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_low_precision_compute_keeps_float32_coordinates():
  """bfloat16 activations/kernel with float32 offsets: the sample positions stay float32 (a
  bfloat16 position such as 13.37 would be off by up to 1/32 px), so the result equals the
  float32 op on the bfloat16-rounded inputs up to bfloat16 arithmetic."""
  x, offset, mask, kernel, bias = (
      jnp.asarray(a, jnp.float32) for a in _inputs(8, 1, 16, 16, 8, 4, 3, 3, 16, 16, 1, 4.0)
  )
  offset = offset + 0.37
  bf = lambda a: a.astype(jnp.bfloat16)
  got = dcn.deform_conv2d(bf(x), offset, mask, bf(kernel), bf(bias))
  assert got.dtype == jnp.bfloat16
  want = dcn.deform_conv2d(
      bf(x).astype(jnp.float32),
      offset,
      mask,
      bf(kernel).astype(jnp.float32),
      bf(bias).astype(jnp.float32),
  )
  err = float(jnp.abs(got.astype(jnp.float32) - want).max())
  assert err <= 0.02 * float(jnp.abs(want).max()), err


# ----------------------------------------------------------------------------------------------
# jit
# ----------------------------------------------------------------------------------------------
def test_jit_traces_once_for_same_shapes():
  traces = []

  def fn(x, offset, mask, kernel, bias):
    traces.append(1)  # runs at trace time only
    return dcn.deform_conv2d(x, offset, mask, kernel, bias)

  jitted = jax.jit(fn)
  gjitted = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2, 3, 4)))
  for seed in range(3):
    args = [jnp.asarray(a, jnp.float32) for a in _inputs(seed, 1, 6, 7, 3, 2, 3, 3, 6, 7, 1)]
    jax.block_until_ready(jitted(*args))
  assert len(traces) == 1
  for seed in range(3):
    args = [jnp.asarray(a, jnp.float32) for a in _inputs(seed, 1, 6, 7, 3, 2, 3, 3, 6, 7, 1)]
    jax.block_until_ready(gjitted(*args))
  assert len(traces) == 2


def test_argument_checks():
  x = jnp.zeros((1, 5, 5, 4))
  k = jnp.zeros((3, 3, 4, 2))
  with pytest.raises(ValueError, match="offset"):
    dcn.deform_conv2d(x, jnp.zeros((1, 5, 5, 17)), None, k)
  with pytest.raises(ValueError, match="mask"):
    dcn.deform_conv2d(x, jnp.zeros((1, 5, 5, 18)), jnp.zeros((1, 5, 5, 8)), k)
  with pytest.raises(ValueError, match="divisible"):
    dcn.deform_conv2d(x, jnp.zeros((1, 5, 5, 54)), None, k, offset_groups=3)
  with pytest.raises(ValueError, match="!="):
    dcn.deform_conv2d(x, jnp.zeros((1, 5, 5, 36)), None, k, offset_groups=2, deformable_groups=1)
  # deformable_groups is an alias of offset_groups; None infers G from the offsets.
  rng = np.random.default_rng(9)
  xr = jnp.asarray(rng.standard_normal((1, 5, 5, 4)), jnp.float32)
  kr = jnp.asarray(rng.standard_normal((3, 3, 4, 2)), jnp.float32)
  off = jnp.asarray(rng.standard_normal((1, 5, 5, 36)), jnp.float32)
  a = dcn.deform_conv2d(xr, off, None, kr, deformable_groups=2)
  b = dcn.deform_conv2d(xr, off, None, kr)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------------------------
# weight groups (grouped conv weights, ResNeXt's `groups`; torchvision `n_weight_grps`)
# ----------------------------------------------------------------------------------------------
def _block_diagonal(kernel, weight_groups, cin):
  """The ungrouped HWIO kernel `[kh, kw, Cin, Cout]` a grouped one `[kh, kw, Cin/Gw, Cout]`
  stands for: zero between input and output channels of different weight groups."""
  kh, kw, cig, cout = kernel.shape
  cog = cout // weight_groups
  dense = np.zeros((kh, kw, cin, cout), kernel.dtype)
  for w in range(weight_groups):
    dense[:, :, w * cig : (w + 1) * cig, w * cog : (w + 1) * cog] = kernel[
        ..., w * cog : (w + 1) * cog
    ]
  return dense


def _per_weight_group_calls(x, offset, mask, kernel, weight_groups, offset_groups, **kw):
  """Reference: one UNgrouped `deform_conv2d` call per weight group w, its output channels
  concatenated. Where a weight group is a union of whole offset groups, or lies inside one,
  the call takes only its input channels (and their offset / mask channels); otherwise it takes
  every input channel with a kernel that is zero outside the group's channels."""
  cin = x.shape[-1]
  kh, kw_, cig, cout = kernel.shape
  taps = kh * kw_
  cog, cg = cout // weight_groups, cin // offset_groups
  outs = []
  for w in range(weight_groups):
    kern_w = kernel[..., w * cog : (w + 1) * cog]
    lo, hi = w * cig, (w + 1) * cig
    if cig % cg == 0 or cg % cig == 0:  # aligned: slice channels and offset groups
      g0, g1 = lo // cg, max(lo // cg + 1, hi // cg)
      sl = lambda a, per: None if a is None else a[..., g0 * per : g1 * per]  # noqa: E731
      outs.append(
          dcn.deform_conv2d(
              x[..., lo:hi],
              sl(offset, 2 * taps),
              sl(mask, taps),
              kern_w,
              offset_groups=g1 - g0,
              **kw,
          )
      )
    else:
      dense = np.zeros((kh, kw_, cin, cog), np.float32)
      dense[:, :, lo:hi] = kern_w
      outs.append(dcn.deform_conv2d(x, offset, mask, dense, offset_groups=offset_groups, **kw))
  return np.concatenate([np.asarray(o) for o in outs], axis=-1)


WEIGHT_GROUP_CASES = [
    # (Cin, Cout, weight groups, offset groups, stride, masked)
    (8, 6, 2, 1, 1, True),
    (8, 8, 4, 2, 2, True),  # 2 weight groups per offset group, stride 2
    (8, 4, 2, 4, 1, True),  # 2 offset groups per weight group
    (12, 6, 2, 3, 1, False),  # DCNv1, weight groups span offset groups unevenly (6 vs 4 ch)
    (16, 16, 16, 1, 1, True),  # depthwise-like: one channel per weight group
]


@pytest.mark.parametrize("cin,cout,wg,og,stride,masked", WEIGHT_GROUP_CASES)
def test_weight_groups_equal_per_group_calls(cin, cout, wg, og, stride, masked):
  """Grouped weights (kernel `[3, 3, Cin/Gw, Cout]`) equal one ungrouped call per weight group,
  and the spec-level numpy loop on the block-diagonal dense kernel."""
  h, w = 7, 9
  ho, wo = dcn.deform_conv_output_size((h, w), (3, 3), stride)
  x, offset, mask, _, bias = _inputs(11 + cin, 2, h, w, cin, cout, 3, 3, ho, wo, og, 2.5)
  rng = np.random.default_rng(cin * 7 + wg)
  kernel = rng.standard_normal((3, 3, cin // wg, cout)) * np.sqrt(2 / (9 * cin // wg))
  x, offset, mask, kernel, bias = (
      np.asarray(a, np.float32) for a in (x, offset, mask, kernel, bias)
  )
  if not masked:
    mask = None
  kw = dict(stride=stride, padding=1, offset_groups=og)
  got = np.asarray(dcn.deform_conv2d(x, offset, mask, kernel, bias, **kw, precision="highest"))
  split = _per_weight_group_calls(
      x, offset, mask, kernel, wg, og, stride=stride, padding=1, precision="highest"
  )
  scale = np.abs(split).max()
  np.testing.assert_allclose(got - bias, split, rtol=0, atol=2e-6 * scale)
  want = ref_deform_conv2d(x, offset, mask, _block_diagonal(kernel, wg, cin), bias, stride, 1, 1)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
  # The ONNX-friendly form (export_mode.onnx_ops) computes the same, with a symbolic batch too.
  onnx = jax.jit(lambda *a: dcn.deform_conv2d_for_onnx(*a, **kw, precision="highest"))
  np.testing.assert_allclose(
      np.asarray(onnx(x, offset, mask, kernel, bias)), got, rtol=0, atol=2e-6 * scale
  )
  (n,) = jax.export.symbolic_shape("n")
  sym = lambda a: None if a is None else jax.ShapeDtypeStruct((n,) + a.shape[1:], a.dtype)  # noqa: E731
  exported = jax.export.export(
      jax.jit(lambda x_, o_, m_: dcn.deform_conv2d_for_onnx(x_, o_, m_, kernel, **kw))
  )(sym(x), sym(offset), sym(mask))
  np.testing.assert_allclose(
      np.asarray(exported.call(x, offset, mask)), got - bias, rtol=0, atol=2e-5 * scale
  )


def test_weight_groups_gradients_equal_block_diagonal():
  """The gradients of the grouped op equal those of the ungrouped op on the block-diagonal
  kernel (whose gradients the finite-difference test covers), kernel gradient = its blocks."""
  cin, cout, wg, og = 8, 6, 2, 2
  x, offset, mask, _, bias = _inputs(21, 1, 6, 7, cin, cout, 3, 3, 6, 7, og, 2.0)
  kernel = np.random.default_rng(22).standard_normal((3, 3, cin // wg, cout)) * 0.3
  gout = np.random.default_rng(23).standard_normal((1, 6, 7, cout))
  args = [jnp.asarray(a, jnp.float32) for a in (x, offset, mask)]

  def loss(x_, o_, m_, k_, dense):
    k_ = jnp.asarray(_block_diagonal(np.asarray(k_), wg, cin)) if dense else k_
    out = dcn.deform_conv2d(x_, o_, m_, k_, precision="highest")
    return jnp.sum(out * gout)

  g_grouped = jax.grad(loss, argnums=(0, 1, 2, 3))(*args, jnp.asarray(kernel, jnp.float32), False)
  dense = jnp.asarray(_block_diagonal(kernel, wg, cin), jnp.float32)
  g_dense = jax.grad(
      lambda x_, o_, m_, k_: jnp.sum(dcn.deform_conv2d(x_, o_, m_, k_, precision="highest") * gout),
      argnums=(0, 1, 2, 3),
  )(*args, dense)
  for a, b in zip(g_grouped[:3], g_dense[:3]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  gk = np.asarray(g_dense[3])
  cig, cog = cin // wg, cout // wg
  want_k = np.concatenate(
      [gk[:, :, w * cig : (w + 1) * cig, w * cog : (w + 1) * cog] for w in range(wg)], axis=-1
  )
  np.testing.assert_allclose(np.asarray(g_grouped[3]), want_k, rtol=1e-5, atol=1e-5)


def test_module_weight_groups_and_kernel_checks():
  x = jnp.asarray(np.random.default_rng(30).standard_normal((1, 5, 6, 8)), jnp.float32)
  offset = jnp.asarray(np.random.default_rng(31).standard_normal((1, 5, 6, 18)), jnp.float32)
  layer = dcn.DeformConv2d(6, groups=2, use_bias=False)
  variables = jax.jit(layer.init)(jax.random.PRNGKey(0), x, offset)
  kern = variables["params"]["kernel"]
  assert kern.shape == (3, 3, 4, 6)
  # kaiming_uniform(relu) with torch's fan_in of a grouped weight: (Cin / groups) * 9
  bound = math.sqrt(6 / (9 * 4))
  assert 0.8 * bound < float(jnp.abs(kern).max()) <= bound
  np.testing.assert_array_equal(
      np.asarray(layer.apply(variables, x, offset)),
      np.asarray(dcn.deform_conv2d(x, offset, None, kern)),
  )
  with pytest.raises(ValueError, match="groups=3"):
    dcn.DeformConv2d(6, groups=3).init(jax.random.PRNGKey(0), x, offset)
  # A kernel whose input channels are not Cin / Gw for a Gw dividing Cin and Cout.
  for bad in ((3, 3, 3, 6), (3, 3, 2, 6), (3, 3, 16, 6)):
    with pytest.raises(ValueError, match="does not match"):
      dcn.deform_conv2d(x, offset, None, jnp.zeros(bad))
