"""Basic layers named like detectron2's, so official weights map one-to-one (docs/DESIGN.md).

* `Conv2d`: detectron2's `layers.Conv2d` — a conv with an optional `norm` sub-module.
* `FrozenBatchNorm`: a fixed affine from (weight, bias, running_mean, running_var), stored in the
  non-trainable Flax collection `frozen`.
* `Scale`: CenterNet's learnable per-level scalar.

All layers take NHWC inputs. `dtype` is the compute dtype (e.g. bfloat16); parameters are float32.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = Callable[..., jax.Array]

# detectron2's c2_msra_fill: kaiming_normal(mode="fan_out", nonlinearity="relu"), untruncated.
c2_msra_fill = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# detectron2's c2_xavier_fill: kaiming_uniform(a=1) = U(-sqrt(3/fan_in), sqrt(3/fan_in)).
c2_xavier_fill = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")

FROZEN = "frozen"  # Flax collection holding FrozenBatchNorm statistics.


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


class Conv2d(nn.Module):
  """Conv (torch-style symmetric padding) followed by an optional norm named `norm`.

  Attributes:
    features: output channels.
    kernel_size: square kernel size k.
    strides: stride s.
    padding: symmetric zero padding p (torch semantics; output = floor((H + 2p - k)/s) + 1).
    use_bias: whether the conv has a bias (detectron2: no bias when followed by a norm).
    norm: "" (none), "FrozenBN" or "GN" (GroupNorm, 32 groups, eps 1e-5).
    kernel_init / bias_init: initialisers.
    groups: weight groups (torch `groups`, ResNeXt's 3x3): kernel `[k, k, Cin / groups,
      features]` (torch `[features, Cin / groups, k, k]`).
  Input `[N, H, W, Cin]`, output `[N, H', W', features]` in `dtype`. `norm_mask` (`[H', W']` or
  `[N, H', W']` bool) restricts GroupNorm statistics (see `GroupNorm`).
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

  @nn.compact
  def __call__(self, x: jax.Array, norm_mask: Optional[jax.Array] = None) -> jax.Array:
    k, cin = self.kernel_size, x.shape[-1]
    if cin % self.groups or self.features % self.groups:
      raise ValueError(f"groups={self.groups} must divide Cin={cin} and features={self.features}")
    kernel = self.param(
        "kernel", self.kernel_init, (k, k, cin // self.groups, self.features), jnp.float32
    )
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype),
        kernel.astype(self.dtype),
        window_strides=(self.strides, self.strides),
        padding=((self.padding, self.padding), (self.padding, self.padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=self.groups,
    )
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return norm_after_conv(self.norm, self.dtype, y, norm_mask)


def norm_after_conv(norm: str, dtype: Dtype, y: jax.Array, norm_mask: Optional[jax.Array]):
  """A conv's `norm` sub-module ("" none, "FrozenBN", "GN") applied to its output `y`; call it
  inside the conv module's compact method (the norm becomes its sub-module `norm`)."""
  if norm == "FrozenBN":
    return FrozenBatchNorm(dtype=dtype, name="norm")(y)
  if norm == "GN":
    return GroupNorm(dtype=dtype, name="norm")(y, norm_mask)
  if norm:
    raise ValueError(f"Conv2d: unknown norm {norm!r} (expected '', 'FrozenBN' or 'GN')")
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
  """torch `nn.MaxPool2d(size)` (stride = size, no padding, floor output size) on NHWC."""
  # A concrete (numpy) -inf init value: lowers to reduce_window_max, which has a gradient.
  window = (1, size, size, 1)
  return jax.lax.reduce_window(x, np.array(-np.inf, x.dtype), jax.lax.max, window, window, "VALID")
