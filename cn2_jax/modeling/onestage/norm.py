"""Trainable BatchNorm with PyTorch `nn.BatchNorm2d` / `nn.SyncBatchNorm` semantics (centerX's
`get_norm(cfg, C, momentum=0.1)`, docs/onestage.md §2.2 and §5.5).

Variables (names follow the one-stage naming rule, see `cn2_jax/weights/onestage.py`):
  * params `scale` [C] (torch `weight`, init 1) and `bias` [C] (init 0);
  * collection `batch_stats`: `mean` [C] (torch `running_mean`, init 0) and `var` [C]
    (torch `running_var`, init 1). torch's `num_batches_tracked` is not kept: with an explicit
    momentum it is never read.

Training mode (`use_running_average=False`) normalises with the batch statistics (biased
variance) and, outside `init`, updates the running statistics as torch does:
  running = momentum * running + (1 - momentum) * batch_stat
with the **unbiased** batch variance n / (n - 1) * var (torch; Flax's own BatchNorm uses the
biased one). `momentum` is in Flax's convention: torch momentum 0.1 == 0.9 here.

`axis_name` (inside `shard_map` / `pmap`) makes the statistics cross-device (SyncBN): the mean is
the `pmean` of per-device means, the variance the `pmean` of per-device mean squared deviations
from that global mean (equal per-device shapes, which static shapes guarantee), and n counts all
devices. Statistics are always float32.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
BATCH_STATS = "batch_stats"

# torch's nn.BatchNorm2d(momentum=0.1, eps=1e-5), in Flax's momentum convention.
TORCH_BN_MOMENTUM = 0.9
TORCH_BN_EPS = 1e-5


class BatchNorm(nn.Module):
  """torch BatchNorm2d over NHWC inputs (statistics over N, H, W).

  Call: `x [N, H, W, C]`, `use_running_average` (True = eval mode: running statistics, no update)
  -> `[N, H, W, C]` in `dtype`.
  """

  momentum: float = TORCH_BN_MOMENTUM
  eps: float = TORCH_BN_EPS
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable(BATCH_STATS, "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable(BATCH_STATS, "var", lambda: jnp.ones((c,), jnp.float32))
    # float32 statistics (float64 for a float64 model, the x64 reference of the oracle).
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
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
        unbiased = var * (n / jnp.maximum(n - 1, 1))
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1.0 - m) * jax.lax.stop_gradient(mean)
        ra_var.value = m * ra_var.value + (1.0 - m) * jax.lax.stop_gradient(unbiased)
    inv = jax.lax.rsqrt(var + self.eps) * scale
    y = (xf - mean) * inv + bias
    return y.astype(self.dtype)
