"""centerX's up-sampling neck `CenternetDeconv` (`modeling/layers/centernet_deconv.py`,
docs/onestage.md §2.3): three DeconvLayers, C5 (stride 32) -> 64 channels at stride 4.

Each `DeconvLayer` (module names = official state-dict names):
  `dcn`      3x3 conv in -> out: modulated DCNv2 (`ops.dcn.ModulatedDeformConv`: `offset_mask_conv`
             + `dcnv2`) when `use_deform and modulate_deform` (centerX default), DCNv1
             (`offset_conv` + bias-free `dcn`) when only `use_deform`, else a plain conv `conv`;
  `dcn_bn`   BatchNorm, ReLU;
  `up_sample` ConvTranspose2d(out -> out, k=4, stride 2, pad 1, output_pad 0, no bias);
  `up_bn`    BatchNorm, ReLU.

Transposed-conv layout (the one convention that is easy to get wrong):
  torch stores `ConvTranspose2d.weight` as `[Cin, Cout, kh, kw]` and computes
    y[o, Y, X] = sum_{i, ky, kx} x[i, y, x] * w[i, o, ky, kx]  with Y = y*s - p + ky, X = x*s - p + kx
  (output size (H - 1) s - 2p + k + output_padding). Here the parameter `kernel` is
  `[kh, kw, Cin, Cout]` with kernel[ky, kx, i, o] = w[i, o, ky, kx]: a plain transpose (2, 3, 0, 1)
  of the torch tensor, NOT the (2, 3, 1, 0) of an ordinary conv, and NOT flipped. The forward
  flips it spatially and runs a stride-1 correlation on the input dilated by s and padded by
  k - 1 - p (+ output_padding at the bottom/right), which is the same sum.

Initialisation (centerX `DeconvLayer._deconv_init` = CN `fill_up_weights`): torch's default
ConvTranspose2d init everywhere (kaiming_uniform(a=sqrt(5)) with torch's fan_in = Cout*kh*kw, i.e.
U(-1/sqrt(Cout k^2), +)), then the bilinear kernel outer(p, p), p_i = 1 - |i/f - c|,
f = ceil(k/2), c = (2f - 1 - f % 2) / (2f) ([0.25, 0.75, 0.75, 0.25] for k = 4), written to
**output channel 0 for every input channel** (w[ci, 0, :, :]); the other output channels keep the
random init. The offset/mask conv keeps torch's default init (not zeroed) unless
`zero_init_offset` (CN's `DCN.init_offset`).

The official canvas (`canvas_hw`, `modeling/canvas.py`; None = none): the inputs of the 3x3 (or
deformable) conv and of the transposed conv are zeroed off the canvas at their stride (the zero
padding they see on the official canvas; the deformable conv's bilinear samples beyond the canvas
read zeros as beyond the official map) and the BatchNorm statistics cover the canvas only, so a
batch on a larger canvas gives the official values on the official canvas.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cn2_jax.modeling import export_mode
from cn2_jax.modeling.canvas import canvas_mask, zero_outside_canvas
from cn2_jax.modeling.layers import (
    TORCH_BN_EPS,
    TORCH_BN_MOMENTUM,
    BatchNorm,
    Conv2d,
    torch_conv_init,
)
from cn2_jax.modeling.ops.dcn import DeformConv2d, ModulatedDeformConv, dcn_kernel_init

Dtype = Any

# Modules whose torch weight is [Cin, Cout, kh, kw] (the weights converter maps them with the
# transpose (2, 3, 0, 1) instead of the ordinary OIHW -> HWIO (2, 3, 1, 0)).
TRANSPOSED_CONV_NAMES = ("up_sample",)


def torch_bias_init(fan_in: int) -> Callable:
  """torch's default conv bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def bilinear_profile(k: int) -> np.ndarray:
  """The 1-D profile of `fill_up_weights`: p_i = 1 - |i / f - c| (float64, length k)."""
  f = math.ceil(k / 2)
  c = (2 * f - 1 - f % 2) / (2.0 * f)
  return np.array([1 - abs(i / f - c) for i in range(k)], np.float64)


def bilinear_kernel_2d(k: int) -> np.ndarray:
  """`[k, k]` float32: w[i, j] = p_i * p_j, as `fill_up_weights` computes it."""
  p = bilinear_profile(k)
  return np.outer(p, p).astype(np.float32)


# torch ConvTranspose2d default init on our [kh, kw, Cin, Cout] layout: torch's fan_in is
# weight.size(1) * kh * kw = Cout * kh * kw, so the "input" axis here is the last one.
_torch_deconv_default = nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform", in_axis=-1, out_axis=-2
)


def bilinear_deconv_init(key, shape, dtype=jnp.float32):
  """centerX's up_sample init on `[kh, kw, Cin, Cout]`: torch default, then
  kernel[:, :, ci, 0] = bilinear for every input channel ci (output channel 0 only)."""
  kh, kw = shape[0], shape[1]
  if kh != kw:
    raise ValueError(f"bilinear init needs a square kernel, got {shape}")
  w = _torch_deconv_default(key, shape, dtype)
  bil = jnp.asarray(bilinear_kernel_2d(kh), dtype)
  return w.at[:, :, :, 0].set(jnp.broadcast_to(bil[:, :, None], (kh, kw, shape[2])))


@export_mode.onnx_form(export_mode.conv_transpose2d_for_onnx)
def conv_transpose2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    stride: int = 2,
    padding: int = 1,
    output_padding: int = 0,
    precision: Any = None,
) -> jax.Array:
  """torch `F.conv_transpose2d` (groups 1, dilation 1) on NHWC.

  Args:
    x: `[N, H, W, Cin]`.
    kernel: `[kh, kw, Cin, Cout]`, kernel[ky, kx, i, o] = torch weight[i, o, ky, kx].
    stride, padding, output_padding: torch semantics (output_padding < stride).
  Returns:
    `[N, (H-1)s - 2p + kh + op, (W-1)s - 2p + kw + op, Cout]`.
  """
  kh, kw = kernel.shape[0], kernel.shape[1]
  if not 0 <= output_padding < stride:
    raise ValueError(f"output_padding {output_padding} must be in [0, stride={stride})")
  if padding > min(kh, kw) - 1:
    raise ValueError(f"padding {padding} > kernel size - 1 is not supported")
  if (kh, kw, stride, padding, output_padding) == (4, 4, 2, 1, 0):
    return _conv_transpose_k4s2p1(x, kernel, precision)
  return _conv_transpose_dilated(x, kernel, stride, padding, output_padding, precision)


def _conv_transpose_dilated(x, kernel, stride, padding, output_padding, precision):
  kh, kw = kernel.shape[0], kernel.shape[1]
  # Scatter form == correlation of the s-dilated input with the spatially flipped kernel.
  flipped = kernel[::-1, ::-1]
  pad_h = (kh - 1 - padding, kh - 1 - padding + output_padding)
  pad_w = (kw - 1 - padding, kw - 1 - padding + output_padding)
  return jax.lax.conv_general_dilated(
      x,
      flipped.astype(x.dtype),
      window_strides=(1, 1),
      padding=(pad_h, pad_w),
      lhs_dilation=(stride, stride),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=precision,
  )


# Sub-pixel form of the k=4, s=2, p=1 case (every centerX DeconvLayer). Per axis the scatter sum
# gives y[2m] = x[m] k[1] + x[m-1] k[3] and y[2m+1] = x[m] k[2] + x[m+1] k[0], so each of the 4
# output phases (a, b) is a 2x2 stride-1 correlation of the undilated input; the phases are then
# interleaved. Same sums as the dilated form (to float rounding), but its gradients are plain
# convolutions: XLA CPU computed the kernel gradient of the lhs-dilated convolution ~30x slower
# than the forward (226 ms against 7 ms for [8, 12, 12, 64] -> 64), most of a small model's step.
_PHASE_TAPS = {0: (3, 1), 1: (2, 0)}  # kernel taps of phase a, for input offsets (a - 1, a)
_PHASE_PAD = {0: (1, 0), 1: (0, 1)}


def _conv_transpose_k4s2p1(x: jax.Array, kernel: jax.Array, precision: Any) -> jax.Array:
  n, h, w, _ = x.shape
  kernel = kernel.astype(x.dtype)
  rows = []
  for a in (0, 1):
    cols = []
    for b in (0, 1):
      k_ab = kernel[jnp.array(_PHASE_TAPS[a])][:, jnp.array(_PHASE_TAPS[b])]  # [2, 2, Cin, Cout]
      cols.append(
          jax.lax.conv_general_dilated(
              x,
              k_ab,
              window_strides=(1, 1),
              padding=(_PHASE_PAD[a], _PHASE_PAD[b]),
              dimension_numbers=("NHWC", "HWIO", "NHWC"),
              precision=precision,
          )
      )
    rows.append(jnp.stack(cols, axis=3))  # [N, H, W, 2 (b), Cout]
  y = jnp.stack(rows, axis=2)  # [N, H, 2 (a), W, 2 (b), Cout]
  return y.reshape(n, 2 * h, 2 * w, kernel.shape[-1])


class ConvTranspose2d(nn.Module):
  """torch `nn.ConvTranspose2d(Cin, features, k, stride, padding, output_padding, bias=False)`.

  Param `kernel` `[k, k, Cin, features]` (layout in the module docstring). Call: `[N, H, W, Cin]`
  -> `[N, (H-1)s - 2p + k + op, (W-1)s - 2p + k + op, features]`.
  """

  features: int
  kernel_size: int = 4
  strides: int = 2
  padding: int = 1
  output_padding: int = 0
  kernel_init: Callable = bilinear_deconv_init
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
    return conv_transpose2d(
        x.astype(self.dtype),
        kernel.astype(self.dtype),
        stride=self.strides,
        padding=self.padding,
        output_padding=self.output_padding,
    )


class DeformConvWithOff(nn.Module):
  """centerX `DeformConvWithOff`: DCNv1 (`offset_conv` 3x3 -> 2*9 offsets, then the bias-free
  deformable conv `dcn`) when `use_deform`, else a plain 3x3 conv `conv` with bias.

  Call: `[N, H, W, Cin]` -> `[N, H, W, features]`.
  """

  features: int
  use_deform: bool = True
  zero_init_offset: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = 9 * x.shape[-1]
    if not self.use_deform:
      return Conv2d(
          self.features,
          3,
          1,
          1,
          use_bias=True,
          kernel_init=torch_conv_init,
          bias_init=torch_bias_init(fan_in),
          dtype=self.dtype,
          name="conv",
      )(x)
    zero = nn.initializers.zeros
    offset = Conv2d(
        18,
        3,
        1,
        1,
        use_bias=True,
        kernel_init=zero if self.zero_init_offset else torch_conv_init,
        bias_init=zero if self.zero_init_offset else torch_bias_init(fan_in),
        dtype=self.dtype,
        name="offset_conv",
    )(x)
    return DeformConv2d(
        self.features,
        3,
        1,
        1,
        use_bias=False,
        kernel_init=dcn_kernel_init,
        dtype=self.dtype,
        name="dcn",
    )(x, offset.astype(jnp.float32), None)


class DeconvLayer(nn.Module):
  """One centerX DeconvLayer: dcn -> dcn_bn -> ReLU -> up_sample (x2) -> up_bn -> ReLU.

  Call: `x [N, H, W, Cin]` at `stride` (pixels per location), `train_bn`, optionally the
  official canvas `canvas_hw` `[2]` -> `[N, 2H, 2W, features]` (k = 4, p = 1, op = 0).
  """

  features: int
  deconv_kernel: int = 4
  use_deform: bool = True
  modulate_deform: bool = True
  zero_init_offset: bool = False
  bn_momentum: float = TORCH_BN_MOMENTUM
  bn_eps: float = TORCH_BN_EPS
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      train_bn: bool,
      canvas_hw: Optional[jax.Array] = None,
      stride: int = 32,
  ) -> jax.Array:
    x = zero_outside_canvas(x, canvas_hw, stride)
    if self.use_deform and self.modulate_deform:
      y = ModulatedDeformConv(
          self.features,
          kernel_size=3,
          zero_init_offset=self.zero_init_offset,
          dtype=self.dtype,
          name="dcn",
      )(x)
    else:
      y = DeformConvWithOff(
          self.features,
          use_deform=self.use_deform,
          zero_init_offset=self.zero_init_offset,
          dtype=self.dtype,
          name="dcn",
      )(x)
    bn = lambda name: BatchNorm(
        self.bn_momentum, self.bn_eps, self.axis_name, self.dtype, name=name  # noqa: E731
    )
    y = nn.relu(bn("dcn_bn")(y, not train_bn, canvas_mask(y.shape[1:3], canvas_hw, stride)))
    y = zero_outside_canvas(y, canvas_hw, stride)  # the transposed conv reads the next row/column
    y = ConvTranspose2d(
        self.features,
        self.deconv_kernel,
        strides=2,
        padding=1,
        output_padding=0,
        dtype=self.dtype,
        name="up_sample",
    )(y)
    up_mask = canvas_mask(y.shape[1:3], canvas_hw, stride // 2)
    return nn.relu(bn("up_bn")(y, not train_bn, up_mask))


class CenternetDeconv(nn.Module):
  """`deconv1`..`deconv3` (named as in centerX). `channels` are the outputs of the three layers
  (DECONV_CHANNEL[1:]; the input channels come from C5).

  Call: C5 `[N, H, W, C5]` (stride `in_stride`, 32), `train_bn`, optionally the official canvas
  `canvas_hw` `[2]` (module docstring) -> `[N, 8H, 8W, channels[-1]]`. Each layer's output is
  sown as `intermediates/deconv{i}_out` (not `deconv{i}`: that is the sub-module's scope).
  """

  channels: Sequence[int] = (256, 128, 64)
  kernels: Sequence[int] = (4, 4, 4)
  use_deform: bool = True
  modulate_deform: bool = True
  zero_init_offset: bool = False
  bn_momentum: float = TORCH_BN_MOMENTUM
  bn_eps: float = TORCH_BN_EPS
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      train_bn: bool = False,
      canvas_hw: Optional[jax.Array] = None,
      in_stride: int = 32,
  ) -> jax.Array:
    if len(self.channels) != len(self.kernels):
      raise ValueError(f"{len(self.channels)} deconv channels but {len(self.kernels)} kernels")
    for i, (c, k) in enumerate(zip(self.channels, self.kernels)):
      x = DeconvLayer(
          c,
          k,
          self.use_deform,
          self.modulate_deform,
          self.zero_init_offset,
          self.bn_momentum,
          self.bn_eps,
          self.axis_name,
          self.dtype,
          name=f"deconv{i + 1}",
      )(x, train_bn, canvas_hw, in_stride // 2**i)
      self.sow("intermediates", f"deconv{i + 1}_out", x)
    return x
