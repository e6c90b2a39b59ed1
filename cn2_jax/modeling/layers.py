"""Basic layers named like detectron2's, so official weights map one-to-one (docs/DESIGN.md).

* `Conv2d`: detectron2's `layers.Conv2d` — a conv with an optional `norm` sub-module.
* `FrozenBatchNorm`: a fixed affine from (weight, bias, running_mean, running_var), stored in the
  non-trainable Flax collection `frozen`.
* `BatchNorm`: trainable BatchNorm with torch `nn.BatchNorm2d` / `nn.SyncBatchNorm` semantics,
  running statistics in the Flax collection `batch_stats` (the one-stage family's norm).
* `Scale`: CenterNet's learnable per-level scalar.

All layers take NHWC inputs. `dtype` is the compute dtype (e.g. bfloat16); parameters are float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cn2_jax.modeling import export_mode

Dtype = Any
Initializer = Callable[..., jax.Array]

# detectron2's c2_msra_fill: kaiming_normal(mode="fan_out", nonlinearity="relu"), untruncated.
c2_msra_fill = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# detectron2's c2_xavier_fill: kaiming_uniform(a=1) = U(-sqrt(3/fan_in), sqrt(3/fan_in)).
c2_xavier_fill = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
# torch nn.Conv2d's default init, kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
# fan_in = Cin * kh * kw.
torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# model.dtype -> the compute dtype (float64: the oracle tests' exact reference runs).
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
FROZEN = "frozen"  # Flax collection holding FrozenBatchNorm statistics.
BATCH_STATS = "batch_stats"  # Flax collection holding BatchNorm running statistics.

# torch's nn.BatchNorm2d(momentum=0.1, eps=1e-5), in Flax's momentum convention.
TORCH_BN_MOMENTUM = 0.9
TORCH_BN_EPS = 1e-5


class FrozenBatchNorm(nn.Module):
  """detectron2 FrozenBatchNorm2d: y = x * scale + shift, with
  scale = weight * rsqrt(running_var + eps) and shift = bias - running_mean * scale.

  The four arrays live in the `frozen` collection (shape [C]); the fold is done in float32.
  Default values (weight 1, bias 0, mean 0, var 1 - eps) make the layer an exact identity, as
  detectron2's constructor does.
  """

  eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    weight = self.variable(FROZEN, "weight", lambda: jnp.ones((c,), jnp.float32)).value
    bias = self.variable(FROZEN, "bias", lambda: jnp.zeros((c,), jnp.float32)).value
    mean = self.variable(FROZEN, "running_mean", lambda: jnp.zeros((c,), jnp.float32)).value
    var = self.variable(
        FROZEN, "running_var", lambda: jnp.full((c,), 1.0 - self.eps, jnp.float32)
    ).value
    scale = weight * jax.lax.rsqrt(var + self.eps)
    shift = bias - mean * scale
    return (x * scale.astype(self.dtype) + shift.astype(self.dtype)).astype(self.dtype)


class BatchNorm(nn.Module):
  """torch BatchNorm2d / SyncBatchNorm over NHWC inputs (statistics over N, H, W); centerX's
  `get_norm(cfg, C, momentum=0.1)`, docs/onestage.md §2.2 and §5.5.

  Variables: params `scale` [C] (torch `weight`, init 1) and `bias` [C] (init 0); collection
  `batch_stats`: `mean` [C] (torch `running_mean`, init 0) and `var` [C] (torch `running_var`,
  init 1). torch's `num_batches_tracked` is not kept: with an explicit momentum it is never read.

  Training mode (`use_running_average=False`) normalises with the batch statistics (biased
  variance) and, outside `init`, updates the running statistics as torch does:
    running = momentum * running + (1 - momentum) * batch_stat
  with the **unbiased** batch variance n / (n - 1) * var (torch; Flax's own BatchNorm uses the
  biased one). `momentum` is in Flax's convention: torch momentum 0.1 == 0.9 here.

  `axis_name` (inside `shard_map` / `pmap`) makes the statistics cross-device (SyncBN): the mean is
  the `pmean` of per-device means, the variance the `pmean` of per-device mean squared deviations
  from that global mean (equal per-device shapes, which static shapes guarantee), and n counts all
  devices. Statistics are always float32 (float64 for a float64 input).

  `mask` (optional `[N, H, W]` or `[H, W]` bool, the official canvas: `canvas.canvas_mask`)
  restricts the training statistics to the masked positions: mean and two-pass variance over them,
  n = their count. With SyncBN the devices are weighted by their counts, as torch's SyncBatchNorm:
  global mean = psum(masked sum) / psum(count), variance = psum(masked squared deviations from it)
  / psum(count), n = psum(count). Every position is still normalised; eval mode ignores the mask.

  Call: `x [N, H, W, C]`, `use_running_average` (True = eval mode: running statistics, no update),
  `mask` -> `[N, H, W, C]` in `dtype`.
  """

  momentum: float = TORCH_BN_MOMENTUM
  eps: float = TORCH_BN_EPS
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self, x: jax.Array, use_running_average: bool, mask: Optional[jax.Array] = None
  ) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable(BATCH_STATS, "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable(BATCH_STATS, "var", lambda: jnp.ones((c,), jnp.float32))
    # float32 statistics (float64 for a float64 model, the x64 reference of the oracle).
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    elif mask is None:
      axes = tuple(range(x.ndim - 1))
      mean = xf.mean(axes)
      if self.axis_name is not None:
        mean = jax.lax.pmean(mean, self.axis_name)
      # Two-pass variance (as torch's CPU kernel), not E[x^2] - E[x]^2.
      var = jnp.square(xf - mean).mean(axes)
      if self.axis_name is not None:
        var = jax.lax.pmean(var, self.axis_name)
      if not self.is_initializing():
        n = x.size // c
        if self.axis_name is not None:
          n = n * jax.lax.psum(1, self.axis_name)
        self._update(ra_mean, ra_var, mean, var, n)
    else:
      axes = tuple(range(x.ndim - 1))
      keep = jnp.broadcast_to(mask, x.shape[:-1])[..., None]  # [N, H, W, 1]
      zero = jnp.zeros((), xf.dtype)
      # psum (not pmean) of sums and counts: devices weigh by their counts (torch SyncBN).
      psum = (lambda v: jax.lax.psum(v, self.axis_name)) if self.axis_name else (lambda v: v)
      n = psum(keep.sum(dtype=xf.dtype))
      count = jnp.maximum(n, 1.0)  # an empty mask (never on a canvas) stays finite
      # `where`, not a product: values off the canvas are arbitrary and must not reach the sums.
      mean = psum(jnp.where(keep, xf, zero).sum(axes)) / count
      var = psum(jnp.where(keep, jnp.square(xf - mean), zero).sum(axes)) / count
      if not self.is_initializing():
        self._update(ra_mean, ra_var, mean, var, n)
    inv = jax.lax.rsqrt(var + self.eps) * scale
    y = (xf - mean) * inv + bias
    return y.astype(self.dtype)

  def _update(self, ra_mean, ra_var, mean, var, n) -> None:
    """torch's running-statistic update from the batch `mean`, biased `var` and count `n`."""
    unbiased = var * (n / jnp.maximum(n - 1, 1))
    m = self.momentum
    ra_mean.value = m * ra_mean.value + (1.0 - m) * jax.lax.stop_gradient(mean)
    ra_var.value = m * ra_var.value + (1.0 - m) * jax.lax.stop_gradient(unbiased)


@dataclasses.dataclass(frozen=True)
class BatchNormSettings:
  """What a conv's trainable `BatchNorm` norm ("BN" / "SyncBN") is built with: `momentum` (Flax
  convention: torch's 0.1 == 0.9), `eps`, and `axis_name`, the data axis "SyncBN" averages the
  statistics over (None: per-device statistics, e.g. outside `shard_map`; "BN" ignores it)."""

  momentum: float
  eps: float
  axis_name: Optional[str] = None


BATCH_NORMS = ("BN", "SyncBN")  # the norms with trainable BatchNorm (running statistics)


def _conv(x: jax.Array, kernel: jax.Array, strides: int, padding: int, groups: int) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x,
      kernel,
      window_strides=(strides, strides),
      padding=((padding, padding), (padding, padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups,
  )


# A convolution's multiply-adds per image from which `conv2d` uses the matrix-product forms (every
# ResNet-50 bottleneck conv at the official training size has >= 1.9e8; the tests' tiny models and
# the demo stay below and compile as before).
MATMUL_FORMS_MIN_MACS = 2**27


def _conv1x1_as_matmul(x: jax.Array, kernel: jax.Array, strides: int) -> jax.Array:
  """A 1x1 convolution (no padding, groups 1) as one 2-D matrix product; its gradients are 2-D
  products too."""
  taken = x[:, ::strides, ::strides] if strides > 1 else x  # the positions the kernel reads
  out = jnp.dot(taken.reshape(-1, x.shape[-1]), kernel.reshape(kernel.shape[-2:]))
  return out.reshape(*taken.shape[:-1], kernel.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_matmul_weight_grad(x: jax.Array, kernel: jax.Array, strides: int, padding: int):
  """`_conv` (groups 1) whose weight gradient is k*k 2-D matrix products (why: see `conv2d`)."""
  return _conv(x, kernel, strides, padding, 1)


def _conv_fwd(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding, 1), (x, kernel)


def _conv_bwd(strides, padding, residuals, g):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda v: _conv(v, kernel, strides, padding, 1), x)
  (dx,) = input_vjp(g)
  k, (out_h, out_w) = kernel.shape[0], g.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  span_h, span_w = strides * (out_h - 1) + 1, strides * (out_w - 1) + 1
  g_rows = g.reshape(-1, g.shape[-1])
  # dW[i, j] = sum over (b, h, w) of x[b, s*h + i - p, s*w + j - p, :]^T g[b, h, w, :], each a
  # product of 2-D [B*H*W, C] and [B*H*W, K] operands: as 4-D einsums they are canonicalised with
  # the window transposed to [C, B*H*W], a copy XLA:CPU fuses with recomputed activations and
  # runs 5-10x slower than the product itself.
  taps = [
      [
          jnp.einsum(
              "nc,nk->ck",
              xp[:, i : i + span_h : strides, j : j + span_w : strides].reshape(-1, x.shape[-1]),
              g_rows,
              preferred_element_type=jnp.float32,
          )
          for j in range(k)
      ]
      for i in range(k)
  ]
  dkernel = jnp.stack([jnp.stack(row) for row in taps]).astype(kernel.dtype)
  return dx, dkernel


_conv_matmul_weight_grad.defvjp(_conv_fwd, _conv_bwd)


def conv2d(
    x: jax.Array, kernel: jax.Array, strides: int = 1, padding: int = 0, groups: int = 1
) -> jax.Array:
  """NHWC x HWIO convolution with torch-style symmetric padding.

  Same values and gradients as `lax.conv_general_dilated` (to float32 rounding). On XLA:CPU, for
  convolutions of at least MATMUL_FORMS_MIN_MACS multiply-adds per image: a grouped one (at least
  GROUP_SPLIT_MIN_WIDTH input channels per group) is one convolution per group
  (`_grouped_as_convs`); without groups, an unpadded 1x1 convolution is one 2-D matrix product
  (forward and both gradients), a 3x3 one keeps XLA's convolution for the forward and the input
  gradient and gets its weight gradient as nine 2-D products. Why: XLA:CPU hands convolutions to
  YNNPACK, whose weight gradient (a convolution with the whole output-gradient map as kernel)
  runs 3-8x slower than the forward, and whose 1x1 forward is slower than the same matrix
  product (bench/train_step_profile.py); its grouped convolution is slower than separate ones.
  XLA's rule is kept for small convolutions (compile time), on other backends and when tracing
  for ONNX (inference only).
  """
  cout = kernel.shape[-1]
  # per image: the batch dimension may be symbolic (an export with a free batch size)
  out_positions = ((x.shape[1] + 2 * padding - kernel.shape[0]) // strides + 1) * (
      (x.shape[2] + 2 * padding - kernel.shape[1]) // strides + 1
  )
  macs = out_positions * kernel.shape[0] * kernel.shape[1] * kernel.shape[2] * cout
  if (
      macs >= MATMUL_FORMS_MIN_MACS
      and jax.default_backend() == "cpu"
      and not export_mode.onnx_ops_enabled()
  ):
    if groups > 1 and kernel.shape[2] >= GROUP_SPLIT_MIN_WIDTH:
      return _grouped_as_convs(x, kernel, strides, padding, groups)
    if groups == 1 and kernel.shape[:2] == (1, 1) and padding == 0:
      return _conv1x1_as_matmul(x, kernel, strides)
    if groups == 1 and kernel.shape[0] == kernel.shape[1] == 3:
      return _conv_matmul_weight_grad(x, kernel, strides, padding)
  return _conv(x, kernel, strides, padding, groups)


# The narrowest group (input channels per group) `conv2d` splits into separate convolutions on
# XLA:CPU; depthwise-like convolutions (1-2 channels per group) would become hundreds of tiny ones.
GROUP_SPLIT_MIN_WIDTH = 4


def _grouped_as_convs(
    x: jax.Array, kernel: jax.Array, strides: int, padding: int, groups: int
) -> jax.Array:
  """A grouped convolution as `groups` ungrouped ones on channel slices, concatenated: XLA:CPU's
  grouped convolution (feature_group_count) runs 5-12x slower than the same work as separate
  convolutions (ResNeXt's 32-group 3x3s, e.g. [1, 200, 272, 256] -> 256: 0.38 s against 0.07 s;
  bench/RESULTS.md). Each group goes through `conv2d` again (its own size decides its form)."""
  cin, cout = kernel.shape[2], kernel.shape[-1] // groups
  return jnp.concatenate(
      [
          conv2d(
              x[..., g * cin : (g + 1) * cin],
              kernel[..., g * cout : (g + 1) * cout],
              strides,
              padding,
          )
          for g in range(groups)
      ],
      axis=-1,
  )


class Conv2d(nn.Module):
  """Conv (torch-style symmetric padding) followed by an optional norm named `norm`.

  Attributes:
    features: output channels.
    kernel_size: square kernel size k.
    strides: stride s.
    padding: symmetric zero padding p (torch semantics; output = floor((H + 2p - k)/s) + 1).
    use_bias: whether the conv has a bias (detectron2: no bias when followed by a norm).
    norm: "" (none), "FrozenBN", "GN" (GroupNorm, 32 groups, eps 1e-5), "BN" (trainable
      `BatchNorm`, per-device statistics) or "SyncBN" (statistics over `batch_norm.axis_name`).
    kernel_init / bias_init: initialisers.
    groups: weight groups (torch `groups`, ResNeXt's 3x3): kernel `[k, k, Cin / groups,
      features]` (torch `[features, Cin / groups, k, k]`).
    batch_norm: the BatchNorm settings; required by "BN" / "SyncBN", unused by the other norms.
  Input `[N, H, W, Cin]`, output `[N, H', W', features]` in `dtype`. `norm_mask` (`[H', W']` or
  `[N, H', W']` bool) restricts GroupNorm and BatchNorm statistics (see `GroupNorm`,
  `BatchNorm`). `train_bn`: a BatchNorm
  norm normalises with (and updates the running statistics from) the batch statistics.
  """

  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: int = 0
  use_bias: bool = True
  norm: str = ""
  kernel_init: Initializer = c2_msra_fill
  bias_init: Initializer = nn.initializers.zeros
  dtype: Dtype = jnp.float32
  groups: int = 1
  batch_norm: Optional[BatchNormSettings] = None

  @nn.compact
  def __call__(
      self, x: jax.Array, norm_mask: Optional[jax.Array] = None, train_bn: bool = False
  ) -> jax.Array:
    k, cin = self.kernel_size, x.shape[-1]
    if cin % self.groups or self.features % self.groups:
      raise ValueError(f"groups={self.groups} must divide Cin={cin} and features={self.features}")
    kernel = self.param(
        "kernel", self.kernel_init, (k, k, cin // self.groups, self.features), jnp.float32
    )
    y = conv2d(
        x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.padding, self.groups
    )
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return norm_after_conv(self.norm, self.dtype, y, norm_mask, train_bn, self.batch_norm)


def norm_after_conv(
    norm: str,
    dtype: Dtype,
    y: jax.Array,
    norm_mask: Optional[jax.Array],
    train_bn: bool = False,
    batch_norm: Optional[BatchNormSettings] = None,
):
  """A conv's `norm` sub-module ("" none, "FrozenBN", "GN", "BN", "SyncBN"; see `Conv2d`)
  applied to its output `y`; call it inside the conv module's compact method (the norm becomes
  its sub-module `norm`)."""
  if norm == "FrozenBN":
    return FrozenBatchNorm(dtype=dtype, name="norm")(y)
  if norm == "GN":
    return GroupNorm(dtype=dtype, name="norm")(y, norm_mask)
  if norm in BATCH_NORMS:
    if batch_norm is None:
      raise ValueError(f"norm {norm!r} needs its BatchNormSettings (batch_norm)")
    axis_name = batch_norm.axis_name if norm == "SyncBN" else None
    bn = BatchNorm(batch_norm.momentum, batch_norm.eps, axis_name, dtype, name="norm")
    return bn(y, not train_bn, norm_mask)
  if norm:
    raise ValueError(
        f"Conv2d: unknown norm {norm!r} (expected '', 'FrozenBN', 'GN', 'BN' or 'SyncBN')"
    )
  return y


class GroupNorm(nn.Module):
  """GroupNorm(32 groups, eps 1e-5) with params `scale`/`bias`; statistics in float32.

  `mask` (optional, `[B, H, W]` or `[H, W]` bool) restricts the statistics to the masked
  locations (the canvas the official code would have padded the batch to; see `canvas.canvas_mask`);
  every location is still normalised. All-True equals no mask.
  """

  num_groups: int = 32
  eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    xf = x.astype(jnp.float32)
    n, h, w, _ = xf.shape
    g = xf.reshape(n, h, w, self.num_groups, c // self.num_groups)
    if mask is None:
      mean = g.mean(axis=(1, 2, 4), keepdims=True)
      var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
    else:
      m = jnp.broadcast_to(mask, (n, h, w)).astype(jnp.float32)[..., None, None]  # [n,h,w,1,1]
      count = jnp.maximum(m.sum(axis=(1, 2), keepdims=True) * (c // self.num_groups), 1.0)
      mean = (g * m).sum(axis=(1, 2, 4), keepdims=True) / count
      var = (jnp.square(g - mean) * m).sum(axis=(1, 2, 4), keepdims=True) / count
    g = (g - mean) * jax.lax.rsqrt(var + self.eps)
    y = g.reshape(n, h, w, c) * scale + bias
    return y.astype(self.dtype)


class Scale(nn.Module):
  """CenterNet's learnable scalar (param `scale`, shape (1,), init 1.0)."""

  init_value: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = self.param("scale", nn.initializers.constant(self.init_value), (1,), jnp.float32)
    return x * s.astype(x.dtype)


def max_pool(x: jax.Array, size: int) -> jax.Array:
  """torch `nn.MaxPool2d(size)` (stride = size, no padding, floor output size) on NHWC: a 4-D
  `reduce_window_max`, which has a gradient (inside `export_mode.onnx_ops()` a 2-D max-pool, as
  onnxruntime takes no 4-D MaxPool: `export_mode.max_pool`)."""
  return export_mode.max_pool(x, size, size, 0)
