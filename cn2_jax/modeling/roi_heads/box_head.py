"""Second-stage box head and predictor (detectron2 FastRCNNConvFCHead + CustomFastRCNNOutputLayers).

docs/centernet2.md §5.3: per cascade stage, flatten the 256x7x7 pooled feature (in torch's C, H, W
order so that official `fc1` weights map by a plain transpose), FC 1024 + ReLU, FC 1024 + ReLU, then
`cls_score` (num_classes + 1 logits, background last) and a class-agnostic `bbox_pred` (4 deltas).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cn2_jax.modeling.layers import c2_xavier_fill

Dtype = Any


class FastRCNNConvFCHead(nn.Module):
  """`num_fc` x (Dense(fc_dim) + ReLU); sub-modules `fc1`, `fc2`, ... (detectron2 names).
  `fc_dim`, `num_fc`: `config.model.roi_heads` (required, as every setting).

  Input `[..., R, S, S, C]` pooled features; output `[..., R, fc_dim]` in `dtype`.
  """

  fc_dim: int
  num_fc: int
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    lead = x.shape[:-3]
    # [.., S, S, C] -> [.., C, S, S] so the flattening order equals torch's NCHW flatten.
    x = jnp.moveaxis(x, -1, -3).reshape(*lead, -1).astype(self.dtype)
    for i in range(self.num_fc):
      x = nn.Dense(
          self.fc_dim,
          kernel_init=c2_xavier_fill,
          dtype=self.dtype,
          param_dtype=jnp.float32,
          name=f"fc{i + 1}",
      )(x)
      x = nn.relu(x)
    return x


class FastRCNNOutputLayers(nn.Module):
  """`cls_score` (N(0, 0.01)) and class-agnostic `bbox_pred` (N(0, 0.001)); outputs float32.

  Input `[..., R, D]`; returns (logits `[..., R, num_classes + 1]`, deltas `[..., R, 4]`).
  """

  num_classes: int
  dtype: Dtype
  # cls_score bias init: 0, or -log((1 - p) / p) with USE_SIGMOID_CE (roi_heads.prior_prob)
  cls_bias_init: float

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = nn.Dense(
        self.num_classes + 1,
        kernel_init=nn.initializers.normal(0.01),
        bias_init=nn.initializers.constant(self.cls_bias_init),
        dtype=self.dtype,
        param_dtype=jnp.float32,
        name="cls_score",
    )(x)
    deltas = nn.Dense(
        4,
        kernel_init=nn.initializers.normal(0.001),
        dtype=self.dtype,
        param_dtype=jnp.float32,
        name="bbox_pred",
    )(x)
    return logits.astype(jnp.float32), deltas.astype(jnp.float32)
