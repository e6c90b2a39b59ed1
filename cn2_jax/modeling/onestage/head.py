"""centerX's `CenternetHead` (`modeling/layers/centernet_head.py`, docs/onestage.md §2.4).

Three `SingleHead` branches with separate weights, each `feat_conv` (3x3, pad 1, bias,
in -> head_conv) -> ReLU -> `out_conv` (1x1, bias, head_conv -> n):
  * `cls_head`: n = num_classes, out bias filled with `bias_value` (-2.19); the **sigmoid is
    applied here**, as centerX does (in float32, no clamp: the loss clamps, see `losses.py`);
  * `wh_head`: n = 2, (w, h) in feature (output-stride) units, no activation;
  * `reg_head`: n = 2, sub-pixel centre offset (x, y), no activation.
centerX hard-codes head_conv = the input channels (64); `head_conv=None` does the same.

Init: `init="centerx"` keeps torch's default conv init (weights and biases
U(-1/sqrt(fan_in), +)) except the cls bias; `init="centernet"` follows xingyizhou/CenterNet
(`fill_fc_weights`: wh/reg convs normal(0, 0.001) with zero bias; cls head as centerX).

With the official canvas (`canvas_hw`, `modeling/canvas.py`) the 3x3 `feat_conv`s read their input
zeroed off the canvas, so their outputs on it are the official ones; the outputs off it are
arbitrary (the model zeroes them).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cn2_jax.modeling.canvas import zero_outside_canvas
from cn2_jax.modeling.layers import Conv2d, torch_conv_init
from cn2_jax.modeling.onestage.neck import torch_bias_init

Dtype = Any


class SingleHead(nn.Module):
  """feat_conv 3x3 -> ReLU -> out_conv 1x1. Call: `[N, H, W, Cin]` -> `[N, H, W, out_channels]`
  (`dtype`)."""

  out_channels: int
  head_conv: Optional[int] = None
  bias_value: Optional[float] = None
  small_init: bool = False  # CN fill_fc_weights
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    mid = self.head_conv or cin
    if self.small_init:
      k_init, b_feat, b_out = (
          nn.initializers.normal(0.001),
          nn.initializers.zeros,
          nn.initializers.zeros,
      )
    else:
      k_init, b_feat, b_out = torch_conv_init, torch_bias_init(9 * cin), torch_bias_init(mid)
    if self.bias_value is not None:
      b_out = nn.initializers.constant(self.bias_value)
    y = Conv2d(
        mid,
        3,
        1,
        1,
        use_bias=True,
        kernel_init=k_init,
        bias_init=b_feat,
        dtype=self.dtype,
        name="feat_conv",
    )(x)
    y = nn.relu(y)
    return Conv2d(
        self.out_channels,
        1,
        1,
        0,
        use_bias=True,
        kernel_init=k_init,
        bias_init=b_out,
        dtype=self.dtype,
        name="out_conv",
    )(y)


class CenternetHead(nn.Module):
  """Call: neck features `[N, H, W, C]` at `stride`, optionally the official canvas `canvas_hw`
  `[2]` -> dict `cls [N, H, W, num_classes]` (sigmoid, float32), `wh [N, H, W, 2]`,
  `reg [N, H, W, 2]` (float32)."""

  num_classes: int = 80
  head_conv: Optional[int] = None
  bias_value: float = -2.19
  init: str = "centerx"  # "centerx" | "centernet"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self, x: jax.Array, canvas_hw: Optional[jax.Array] = None, stride: int = 4
  ) -> Dict[str, jax.Array]:
    if self.init not in ("centerx", "centernet"):
      raise ValueError(f"head init must be 'centerx' or 'centernet', got {self.init!r}")
    x = zero_outside_canvas(x, canvas_hw, stride)  # every branch starts with a 3x3 conv
    small = self.init == "centernet"
    cls = SingleHead(
        self.num_classes, self.head_conv, self.bias_value, False, self.dtype, name="cls_head"
    )(x)
    wh = SingleHead(2, self.head_conv, None, small, self.dtype, name="wh_head")(x)
    reg = SingleHead(2, self.head_conv, None, small, self.dtype, name="reg_head")(x)
    f = jnp.promote_types(self.dtype, jnp.float32)  # float32 (float64 for an x64 reference)
    return {"cls": jax.nn.sigmoid(cls.astype(f)), "wh": wh.astype(f), "reg": reg.astype(f)}
