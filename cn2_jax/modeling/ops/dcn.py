"""Deformable convolution v1/v2 (modulated) in JAX, and centerX's DCNv2 layer as a Flax module.

Semantics are those of the official kernels: torchvision's CPU `deform_conv2d` (which the
centerX oracle runs) and detectron2's / DCNv2's CUDA `modulated_deformable_im2col`, whose
sampling is line-for-line the same (docs/onestage.md §2.3). For output pixel (y, x) and kernel tap
(i, j), k = i * kw + j (row-major), offset group g:

  * offset channel `g * 2K + 2k` is **dy**, channel `g * 2K + 2k + 1` is **dx** (interleaved per
    tap, K = kh * kw); mask channel `g * K + k` goes with tap k;
  * the sample point is `py = y * stride_h - pad_h + i * dilation_h + dy` (px likewise);
  * bilinear sampling of the input channels of group g (channels `g * Cg .. (g+1) * Cg - 1`):
    the sample is 0 unless `-1 < py < H` and `-1 < px < W`; otherwise the four corners
    `floor(p), floor(p) + 1` are weighted `hy*hx, hy*lx, ly*hx, ly*lx` (`ly = py - floor(py)`,
    `hy = 1 - ly`) and a corner outside the map reads 0 — so a sample partially outside the map
    keeps its inside corners;
  * the sample is multiplied by the mask (DCNv2; `mask=None` means 1, i.e. DCNv1) and the
    columns `[K, Cin]` are contracted with the kernel (+ bias). With weight groups Gw (torch's
    conv `groups`, detectron2 `ModulatedDeformConv(groups=)`, torchvision's `n_weight_grps`,
    inferred from the kernel `[kh, kw, Cin / Gw, Cout]` as torchvision does) output channels
    `[w * Cout/Gw, (w+1) * Cout/Gw)` contract only the columns of input channels
    `[w * Cin/Gw, (w+1) * Cin/Gw)` — independent of the offset groups G.

Formulation (gather / im2col): the input is zero-padded by one pixel on each side, so every
corner of a valid sample (`floor(p)` in `[-1, H-1]`) lies inside the padded map and reads the
padding zero exactly when the official kernel reads "outside = 0"; no per-corner masks are
needed. The four corners of all `kh * kw` taps of all output pixels are fetched by one gather
(`[B, Ho, Wo, G, K, 4, Cg]`), reduced with their (mask-scaled) bilinear weights into the columns
`[B, Ho, Wo, K, Cin]`, and the columns are contracted with the HWIO kernel in one dot. There are
no Python loops over pixels or taps, shapes are static (jit-friendly; the function is jitted with
the geometry static), and plain `jax.grad` gives the gradients
for input, offset, mask, kernel and bias. Those agree with the official backward kernels
(`deformable_col2im`, `deformable_col2im_coord`, `get_coordinate_weight`): the derivative of the
floor-based bilinear weights w.r.t. py/px is exactly `get_coordinate_weight` (also one-sided,
from the floor, at integer positions), and invalid samples get zero gradient in both.

Layouts (docs/DESIGN.md): NHWC activations, HWIO kernels. Official NCHW tensors map by a plain
transpose with the channel order unchanged (the offset channel order above is the official one).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cn2_jax.modeling import export_mode
from cn2_jax.modeling.layers import Conv2d

IntOrPair = Union[int, Tuple[int, int]]
Dtype = Any
Initializer = Callable[..., jax.Array]

# detectron2 `ModulatedDeformConv.reset_parameters`: kaiming_uniform_(nonlinearity="relu"),
# i.e. U(-sqrt(6 / fan_in), sqrt(6 / fan_in)) with fan_in = Cin * kh * kw (Flax's HWIO fan_in).
dcn_kernel_init = nn.initializers.variance_scaling(2.0, "fan_in", "uniform")
# torch.nn.Conv2d's default weight init (kaiming_uniform(a=sqrt(5))): U(-1/sqrt(fan_in), ..).
torch_conv_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _pair(v: IntOrPair) -> Tuple[int, int]:
  if isinstance(v, (tuple, list)):
    if len(v) != 2:
      raise ValueError(f"expected an int or a pair, got {v!r}")
    return int(v[0]), int(v[1])
  return int(v), int(v)


def deform_conv_output_size(
    hw: Tuple[int, int],
    kernel_hw: Tuple[int, int],
    stride: IntOrPair = 1,
    padding: IntOrPair = 1,
    dilation: IntOrPair = 1,
) -> Tuple[int, int]:
  """(Ho, Wo) of a (deformable) conv: `(H + 2p - (d (k - 1) + 1)) // s + 1` per axis."""
  s, p, d = _pair(stride), _pair(padding), _pair(dilation)
  return tuple(
      (n + 2 * p[a] - (d[a] * (kernel_hw[a] - 1) + 1)) // s[a] + 1 for a, n in enumerate(hw)
  )


def _weight_groups(cin: int, kernel_shape) -> int:
  """Gw = Cin / kernel in-channels (torchvision `n_weight_grps`); both Cin and Cout must be
  multiples of Gw."""
  kcin, cout = kernel_shape[2], kernel_shape[3]
  if kcin < 1 or cin % kcin or cout % (cin // kcin):
    raise ValueError(
        f"kernel {tuple(kernel_shape)} does not match {cin} input channels: its input channels "
        f"must be Cin / Gw for a weight-group count Gw that divides Cin and Cout"
    )
  return cin // kcin


def _grouped_contraction(
    cols: jax.Array, kernel: jax.Array, weight_groups: int, precision=None
) -> jax.Array:
  """Sampled columns `[N, K * Cin]` (tap-major, then the Cin channels) times a grouped HWIO
  kernel `[kh, kw, Cin/Gw, Cout]` -> `[N, Cout]`: the columns viewed as [K, Gw, Cin/Gw] and
  contracted per weight group (a block-diagonal dense kernel would cost Gw times the
  multiplies), as one batched matmul with the group axis first, [Gw, N, K*Cin/Gw] x [Gw,
  K*Cin/Gw, Cout/Gw] (a MatMul in ONNX). The same contraction as one einsum over the middle
  group axis ran 2.5-3.5x slower on XLA:CPU, forward and gradient (ResNeXt's 32 groups)."""
  kh, kw, cig, cout = kernel.shape
  taps, cog = kh * kw, cout // weight_groups
  gcols = cols.reshape(-1, taps, weight_groups, cig).transpose(2, 0, 1, 3)
  gkern = _grouped_kernel(kernel, weight_groups).transpose(2, 0, 1, 3)
  out = jnp.matmul(
      gcols.reshape(weight_groups, -1, taps * cig),
      gkern.reshape(weight_groups, taps * cig, cog),
      precision=precision,
  )
  return out.transpose(1, 0, 2).reshape(-1, cout)


def _grouped_kernel(kernel: jax.Array, weight_groups: int) -> jax.Array:
  """HWIO `[kh, kw, Cin/Gw, Cout]` -> `[kh*kw, Cin/Gw, Gw, Cout/Gw]`: output channel
  `w * Cout/Gw + o` belongs to weight group w (torch's grouped-conv layout)."""
  kh, kw, cig, cout = kernel.shape
  return kernel.reshape(kh * kw, cig, weight_groups, cout // weight_groups)


def deform_conv2d_for_onnx(
    x,
    offset,
    mask,
    kernel,
    bias=None,
    *,
    stride=1,
    padding=1,
    dilation=1,
    offset_groups=None,
    deformable_groups=None,
    precision=None,
):
  """`deform_conv2d` (same arguments and semantics: zero-padded table, the four
  floor/floor+1 corners, validity and mask folded into the bilinear weights) in a form jax2onnx
  converts, with the same values up to float rounding:
    * not jitted: inside the op's `jax.jit` jax2onnx fails at "No plugins registered for
      primitive 'stack' inside jit body";
    * with a symbolic batch, a batched gather (`take_along_axis` on a `[B, G, Hp*Wp, Cg]`
      table) instead of a flat table indexed with `arange(B)`, which fails there
      ("'_DynamicDimSentinel' object has no attribute 'rmax'"); the batch is -1 in reshapes;
      with a static batch (`--batch N`) the op's flat gather (one Gather on axis 0: jax2onnx
      wraps the batched one in two full-size Transposes);
    * the corners weighted by batched [1, 4] x [4, Cg] matmuls and the columns contracted by a
      2-D matmul (MatMul nodes), where the op's einsum / dot give ONNX Einsum nodes;
    * size-1 group axes moved by reshapes, not transposes (`_transpose`)."""
  _, height, width, cin = x.shape
  kh, kw, _, cout = kernel.shape
  (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
  ho, wo = deform_conv_output_size((height, width), (kh, kw), (sh, sw), (ph, pw), (dh, dw))
  taps = kh * kw
  groups = offset_groups if offset_groups is not None else deformable_groups
  groups = int(groups if groups is not None else offset.shape[-1] // (2 * taps))
  cg = cin // groups
  dtype = jnp.result_type(x.dtype, kernel.dtype)
  cdtype = jnp.promote_types(offset.dtype, jnp.float32)
  off = offset.astype(cdtype).reshape(-1, ho, wo, groups, taps, 2)
  tap_i, tap_j = np.repeat(np.arange(kh), kw), np.tile(np.arange(kw), kh)  # row-major taps
  base_y = (np.arange(ho) * sh - ph)[:, None] + tap_i[None, :] * dh  # [Ho, K]
  base_x = (np.arange(wo) * sw - pw)[:, None] + tap_j[None, :] * dw  # [Wo, K]
  py = jnp.asarray(base_y[None, :, None, None, :], cdtype) + off[..., 0]  # [B, Ho, Wo, G, K]
  px = jnp.asarray(base_x[None, None, :, None, :], cdtype) + off[..., 1]
  valid = (py > -1) & (py < height) & (px > -1) & (px < width)
  py = jnp.where(valid, py, jnp.zeros_like(py))
  px = jnp.where(valid, px, jnp.zeros_like(px))
  y0f, x0f = jnp.floor(py), jnp.floor(px)
  ly, lx = py - y0f, px - x0f
  hy, hx = 1 - ly, 1 - lx
  scale = valid.astype(cdtype)
  if mask is not None:
    scale = scale * mask.astype(cdtype).reshape(-1, ho, wo, groups, taps)
  weights = jnp.stack([hy * hx, hy * lx, ly * hx, ly * lx], axis=-1) * scale[..., None]
  hp, wp = height + 2, width + 2
  xp = jnp.pad(x.astype(dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
  table = export_mode.transpose_for_onnx(
      xp.reshape(-1, hp * wp, groups, cg), (0, 2, 1, 3)
  )  # [B, G, Hp*Wp, Cg]
  r00 = (y0f.astype(jnp.int32) + 1) * wp + x0f.astype(jnp.int32) + 1  # [B, Ho, Wo, G, K]
  rows = r00[..., None] + jnp.asarray([0, 1, wp, wp + 1], jnp.int32)  # [B, Ho, Wo, G, K, 4]
  rows = export_mode.transpose_for_onnx(rows, (0, 3, 1, 2, 4, 5)).reshape(
      -1, groups, ho * wo * taps * 4
  )
  bsz = x.shape[0]
  if isinstance(bsz, (int, np.integer)):  # a static batch: one flat table, one plain Gather
    rows = rows + np.arange(bsz * groups, dtype=np.int32).reshape(bsz, groups, 1) * (hp * wp)
    corners = jnp.take(table.reshape(-1, cg), rows.reshape(-1), axis=0, mode="clip")
  else:  # per image (a batched gather), where the batch is symbolic
    corners = jnp.take_along_axis(table, rows[..., None], axis=2)  # [B, G, Ho*Wo*K*4, Cg]
  wts = export_mode.transpose_for_onnx(
      weights.astype(dtype), (0, 3, 1, 2, 4, 5)
  )  # [B, G, Ho, Wo, K, 4]
  # The four corners weighted and summed as [1, 4] x [4, Cg] matmuls (MatMul in ONNX).
  cols = jnp.matmul(
      wts.reshape(-1, groups, ho * wo * taps, 1, 4),
      corners.reshape(-1, groups, ho * wo * taps, 4, cg),
      precision=jax.lax.Precision.HIGHEST,
  ).reshape(-1, groups, ho, wo, taps, cg)
  cols = export_mode.transpose_for_onnx(cols, (0, 2, 3, 4, 1, 5))  # [B, Ho, Wo, K, G, Cg]
  wg = _weight_groups(cin, kernel.shape)
  if wg == 1:
    out = jnp.dot(
        cols.reshape(-1, taps * cin),
        kernel.astype(dtype).reshape(taps * cin, cout),
        precision=precision,
    ).reshape(-1, ho, wo, cout)
  else:  # one batched MatMul over the weight groups
    out = _grouped_contraction(
        cols.reshape(-1, taps * cin), kernel.astype(dtype), wg, precision
    ).reshape(-1, ho, wo, cout)
  if bias is not None:
    out = out + jnp.asarray(bias).astype(dtype)
  return out


# Inside export_mode.onnx_ops() (an ONNX conversion): deform_conv2d_for_onnx, not jitted.
@export_mode.onnx_form(deform_conv2d_for_onnx)
# jit with the geometry static: eager calls then compile the whole op once per shape instead of
# dispatching (and compiling) its ~50 primitives one by one; inside an outer jit it is inlined.
@functools.partial(
    jax.jit,
    static_argnames=(
        "stride",
        "padding",
        "dilation",
        "offset_groups",
        "deformable_groups",
        "precision",
    ),
)
def deform_conv2d(
    x: jax.Array,
    offset: jax.Array,
    mask: Optional[jax.Array],
    kernel: jax.Array,
    bias: Optional[jax.Array] = None,
    *,
    stride: IntOrPair = 1,
    padding: IntOrPair = 1,
    dilation: IntOrPair = 1,
    offset_groups: Optional[int] = None,
    deformable_groups: Optional[int] = None,
    precision: Any = None,
) -> jax.Array:
  """Modulated deformable convolution (DCNv2; DCNv1 with `mask=None`), official semantics.

  Args:
    x: `[B, H, W, Cin]` input (its dtype is the compute dtype of the gathers and the dot).
    offset: `[B, Ho, Wo, 2 * G * kh * kw]`, official channel order: for group g and tap
      k = i * kw + j, channel `g*2K + 2k` = dy (rows), `g*2K + 2k + 1` = dx (columns), pixels.
    mask: `[B, Ho, Wo, G * kh * kw]` modulation (already sigmoided; channel `g*K + k`), or None
      for DCNv1 (mask 1).
    kernel: `[kh, kw, Cin / Gw, Cout]` (HWIO; torch OIHW -> `transpose(2, 3, 1, 0)`); Gw = 1
      (the usual case) or the weight-group count of a grouped conv (ResNeXt), inferred from the
      shape as torchvision does.
    bias: optional `[Cout]`.
    stride, padding, dilation: int or (h, w) tuple (static); torch semantics (symmetric zero
      padding).
    offset_groups / deformable_groups: G (aliases). None infers G from the offset channels
      (`C_offset / (2 kh kw)`, as torchvision does); Cin must be divisible by G.
    precision: `lax.Precision` of the final dot (None = JAX default, as for `lax.conv`).
  Returns:
    `[B, Ho, Wo, Cout]` in the result dtype of x and kernel, with
    `Ho = (H + 2 pad_h - (dil_h (kh - 1) + 1)) // stride_h + 1` (Wo likewise).
  """
  x = jnp.asarray(x)
  offset = jnp.asarray(offset)
  kernel = jnp.asarray(kernel)
  bsz, height, width, cin = x.shape
  kh, kw, _, cout = kernel.shape
  weight_groups = _weight_groups(cin, kernel.shape)
  sh, sw = _pair(stride)
  ph, pw = _pair(padding)
  dh, dw = _pair(dilation)
  ho, wo = deform_conv_output_size((height, width), (kh, kw), (sh, sw), (ph, pw), (dh, dw))
  taps = kh * kw

  if (
      offset_groups is not None
      and deformable_groups is not None
      and offset_groups != deformable_groups
  ):
    raise ValueError(f"offset_groups={offset_groups} != deformable_groups={deformable_groups}")
  groups = offset_groups if offset_groups is not None else deformable_groups
  if groups is None:
    if offset.shape[-1] % (2 * taps):
      raise ValueError(f"offset has {offset.shape[-1]} channels, not a multiple of 2*{taps}")
    groups = offset.shape[-1] // (2 * taps)
  groups = int(groups)
  if groups < 1 or cin % groups:
    raise ValueError(f"{cin} input channels are not divisible by {groups} offset groups")
  if offset.shape != (bsz, ho, wo, 2 * groups * taps):
    raise ValueError(f"offset {offset.shape} != {(bsz, ho, wo, 2 * groups * taps)}")
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.shape != (bsz, ho, wo, groups * taps):
      raise ValueError(f"mask {mask.shape} != {(bsz, ho, wo, groups * taps)}")
  cg = cin // groups

  dtype = jnp.result_type(x.dtype, kernel.dtype)
  # Coordinates and bilinear weights in the offset's precision, at least float32 (the official
  # kernel uses its scalar_t): bfloat16 positions have a 1-px step from 128 px on.
  cdtype = jnp.promote_types(offset.dtype, jnp.float32)
  off = offset.astype(cdtype).reshape(bsz, ho, wo, groups, taps, 2)
  dy, dx = off[..., 0], off[..., 1]  # [B, Ho, Wo, G, K]

  # Integer part of the sample position (exact in float): output pixel + tap position.
  tap_i, tap_j = [
      t.reshape(-1) for t in jnp.meshgrid(jnp.arange(kh), jnp.arange(kw), indexing="ij")
  ]  # [K], row-major taps
  base_y = (jnp.arange(ho) * sh - ph)[:, None] + tap_i[None, :] * dh  # [Ho, K]
  base_x = (jnp.arange(wo) * sw - pw)[:, None] + tap_j[None, :] * dw  # [Wo, K]
  py = base_y[None, :, None, None, :].astype(cdtype) + dy
  px = base_x[None, None, :, None, :].astype(cdtype) + dx

  # The official "-1 < p < size" rule; invalid samples move to 0 (a safe in-range position,
  # and `where` also stops their gradient) and get weight 0 below.
  valid = (py > -1) & (py < height) & (px > -1) & (px < width)
  py = jnp.where(valid, py, 0)
  px = jnp.where(valid, px, 0)
  y0f = jnp.floor(py)
  x0f = jnp.floor(px)
  ly = py - y0f
  lx = px - x0f
  hy = 1 - ly
  hx = 1 - lx
  # Fold validity and the modulation into the four corner weights ([B,Ho,Wo,G,K] each) instead
  # of scaling the [.., Cg]-sized samples: the same products, Cg times fewer multiplies.
  scale = valid.astype(cdtype)
  if mask is not None:
    scale = scale * mask.astype(cdtype).reshape(bsz, ho, wo, groups, taps)
  weights = jnp.stack([hy * hx, hy * lx, ly * hx, ly * lx], axis=-1) * scale[..., None]

  # One flat table of the 1-pixel zero-padded input, grouped so one row = Cg channels of one
  # group at one padded pixel: row ((b * G + g) * Hp + y + 1) * Wp + x + 1 holds x[b, y, x, g].
  hp, wp = height + 2, width + 2
  xp = jnp.pad(x.astype(dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
  table = xp.reshape(bsz, hp, wp, groups, cg).transpose(0, 3, 1, 2, 4).reshape(-1, cg)
  bg = jnp.arange(bsz)[:, None] * groups + jnp.arange(groups)[None, :]  # [B, G]
  # floor(p) in [-1, size - 1] for valid samples (0 for invalid ones): +1 makes it a padded
  # row/column in [0, size], and the +1 neighbour stays inside the padded map.
  r00 = (
      (bg[:, None, None, :, None] * hp + y0f.astype(jnp.int32) + 1) * wp + x0f.astype(jnp.int32) + 1
  )  # [B, Ho, Wo, G, K]
  rows = r00[..., None] + jnp.asarray([0, 1, wp, wp + 1], jnp.int32)  # [B,Ho,Wo,G,K,4]
  corners = table.at[rows].get(mode="promise_in_bounds")  # [B, Ho, Wo, G, K, 4, Cg]
  # Weighted sum of the four corners (the official `w1*v1 + w2*v2 + w3*v3 + w4*v4`, up to the
  # order of the 4-term sum) as a batched dot rather than broadcast multiplies: XLA then also
  # differentiates it into dots, where the elementwise form made the offset/mask gradient
  # (a reduction over Cg of the gathered corners) ~5x slower on CPU. HIGHEST keeps the
  # interpolation in full float32 on GPUs (no TF32).
  cols = jnp.einsum(
      "bhwgkq,bhwgkqc->bhwkgc", weights.astype(dtype), corners, precision=lax.Precision.HIGHEST
  )
  if weight_groups == 1:
    # Columns [K, G, Cg] = [K, Cin] match the HWIO kernel flattened to [kh * kw * Cin, Cout].
    cols = cols.reshape(bsz, ho, wo, taps * cin)
    out = jnp.dot(cols, kernel.astype(dtype).reshape(taps * cin, cout), precision=precision)
  else:
    out = _grouped_contraction(
        cols.reshape(-1, taps * cin), kernel.astype(dtype), weight_groups, precision
    ).reshape(bsz, ho, wo, cout)
  if bias is not None:
    out = out + jnp.asarray(bias).astype(dtype)
  return out


class DeformConv2d(nn.Module):
  """The deformable conv itself (detectron2 `ModulatedDeformConv` / `DeformConv`): params
  `kernel` `[kh, kw, Cin / groups, features]` and (if `use_bias`) `bias` `[features]`; offsets
  and mask are inputs. Named `dcnv2` inside `ModulatedDeformConv`, so `...dcnv2.weight/bias` map
  here. `groups`: weight groups of a grouped conv (detectron2 `groups`; 1 = ordinary).

  Call: `x [B, H, W, Cin]`, `offset [B, Ho, Wo, 2 G k k]`, `mask [B, Ho, Wo, G k k]` or None ->
  `[B, Ho, Wo, features]` in `dtype`.
  """

  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: int = 1
  dilation: int = 1
  deformable_groups: int = 1
  use_bias: bool = True
  kernel_init: Initializer = dcn_kernel_init
  bias_init: Initializer = nn.initializers.zeros
  dtype: Dtype = jnp.float32
  precision: Any = None
  groups: int = 1

  @nn.compact
  def __call__(
      self, x: jax.Array, offset: jax.Array, mask: Optional[jax.Array] = None
  ) -> jax.Array:
    k = self.kernel_size
    cin = x.shape[-1]
    if cin % self.groups or self.features % self.groups:
      raise ValueError(f"groups={self.groups} must divide Cin={cin} and features={self.features}")
    kernel = self.param(
        "kernel", self.kernel_init, (k, k, cin // self.groups, self.features), jnp.float32
    )
    bias = (
        self.param("bias", self.bias_init, (self.features,), jnp.float32) if self.use_bias else None
    )
    return deform_conv2d(
        x.astype(self.dtype),
        offset,
        mask,
        kernel.astype(self.dtype),
        None if bias is None else bias.astype(self.dtype),
        stride=self.strides,
        padding=self.padding,
        dilation=self.dilation,
        offset_groups=self.deformable_groups,
        precision=self.precision,
    )


class ModulatedDeformConv(nn.Module):
  """centerX's DCNv2 layer (`ModulatedDeformConvWithOff`): an ordinary conv predicts offsets and
  mask logits from the input, then a modulated deformable conv is applied.

  Sub-modules and parameters (names = official state-dict keys under the rename rule of
  docs/DESIGN.md, e.g. `upsample.deconv1.dcn.offset_mask_conv.weight` ->
  `upsample/deconv1/dcn/offset_mask_conv/kernel`):
    * `offset_mask_conv`: `Conv2d(Cin -> 3 G k k, k x k, stride, padding, bias)`; like the
      official module it has no dilation;
    * `dcnv2`: `DeformConv2d` with `kernel [k, k, Cin, features]` and `bias [features]`.

  Split of the 3GK offset_mask_conv channels (centerX `torch.chunk(x, 3, dim=1)`, then
  `offset = cat(o1, o2)`, `mask = sigmoid(m)`): channels `[0, 2GK)` are the offsets, already in
  the interleaved (dy, dx)-per-tap order the kernel reads (docs/onestage.md §2.3: the chunk/cat is
  an identity reordering), and channels `[2GK, 3GK)` are the mask logits.

  Initialisation: `zero_init_offset=True` (default) zeroes the offset/mask conv as the original
  DCNv2 / CenterNet `DCN.init_offset` does, so a fresh layer samples the regular grid with mask
  sigmoid(0) = 0.5. centerX itself does NOT zero it (torch's default init; docs/onestage.md §2.3):
  `zero_init_offset=False` reproduces that (weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))). The
  deformable kernel uses detectron2's kaiming_uniform(relu) and a zero bias.

  Call: `x [B, H, W, Cin]` -> `[B, Ho, Wo, features]` in `dtype`.
  """

  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: int = 1
  dilation: int = 1
  deformable_groups: int = 1
  zero_init_offset: bool = True
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    n_off = self.deformable_groups * k * k
    if self.zero_init_offset:
      om_kernel_init = om_bias_init = nn.initializers.zeros
    else:
      bound = 1.0 / math.sqrt(x.shape[-1] * k * k)
      om_kernel_init = torch_conv_kernel_init

      def om_bias_init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    om = Conv2d(
        3 * n_off,
        kernel_size=k,
        strides=self.strides,
        padding=self.padding,
        use_bias=True,
        kernel_init=om_kernel_init,
        bias_init=om_bias_init,
        dtype=self.dtype,
        name="offset_mask_conv",
    )(x)
    offset = om[..., : 2 * n_off]
    # Sigmoid in float32 even for a low-precision compute dtype (the mask scales every sample).
    mask = jax.nn.sigmoid(om[..., 2 * n_off :].astype(jnp.float32))
    return DeformConv2d(
        self.features,
        kernel_size=k,
        strides=self.strides,
        padding=self.padding,
        dilation=self.dilation,
        deformable_groups=self.deformable_groups,
        dtype=self.dtype,
        precision=self.precision,
        name="dcnv2",
    )(x, offset, mask)
