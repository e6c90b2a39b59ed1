"""CenterNet2's class-agnostic CenterNet proposal head (docs/centernet2.md §2.4).

Official: `centernet/modeling/dense_heads/centernet_head.py` with ONLY_PROPOSAL=True,
WITH_AGN_HM=True, NORM="GN", NUM_BOX_CONVS=4, NUM_SHARE_CONVS=0 (and the cls tower reduced to 0
convs by ONLY_PROPOSAL, so it has no parameters and is omitted here).

One head is shared by all levels (same weights); only the `Scale` differs per level. Sub-module
names equal the detectron2 state-dict prefixes (docs/DESIGN.md), so under the caller's
`proposal_generator/centernet_head` the parameters are

  bbox_tower.{0,3,6,9}/{kernel,bias}   3x3 conv 256->256 (torch nn.Sequential indices: conv, GN, ReLU)
  bbox_tower.{1,4,7,10}/{scale,bias}   GroupNorm(32)
  agn_hm/{kernel,bias}                 3x3 conv 256->1 (objectness logit)
  bbox_pred/{kernel,bias}              3x3 conv 256->4 (ltrb in stride units)
  scales.{0..4}/scale                  per-level scalar, init 1.0

GroupNorm statistics are per level (levels are processed independently, never concatenated), as
in the official per-level loop, over the level's map or, with `masks`, over the part of it that
covers the official canvas of the batch; with `masks` every conv input is also zeroed off that
canvas, so extra (bucket) padding changes nothing on it.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cn2_jax.modeling.layers import Conv2d, GroupNorm, Scale
from cn2_jax.modeling.ops.dcn import DeformConv2d

Dtype = Any


class DFConv2d(nn.Module):
  """CenterNet2's `layers/deform_conv.py` `DFConv2d` (with_modulated_dcn=True, 3x3, stride 1,
  padding 1, one deformable group), as the head's last tower conv builds it (bias=True;
  CENTERNET.USE_DEFORMABLE, the DCN zoo models).

  Sub-modules (= state-dict keys): `offset` (Conv2d C -> 27, 3x3, bias) and `conv` (the modulated
  deformable conv, `kernel [3, 3, C, features]`, `bias`). Forward: om = offset(x); the deformable
  conv samples x at the offsets om[..., :18] (official channel order, 2k = dy, 2k+1 = dx of tap
  k = 3i + j) with the modulation sigmoid(om[..., 18:27]). Initialisation as the official head
  leaves it: its init loop re-initialises every nn.Conv2d, `offset` included, to N(0, 0.01) with
  bias 0 (DFConv2d's own zero init is overwritten); the deformable kernel keeps detectron2's
  kaiming-uniform init.

  Call: `x [B, H, W, C]` -> `[B, H, W, features]` in `dtype`. The caller zeroes x off the canvas.
  """

  features: int
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    taps = 9
    offset_mask = Conv2d(
        3 * taps,
        kernel_size=3,
        strides=1,
        padding=1,
        use_bias=True,
        kernel_init=nn.initializers.normal(stddev=0.01),
        bias_init=nn.initializers.zeros,
        dtype=self.dtype,
        name="offset",
    )(x)
    # The mask scales every sample: sigmoid in float32 even for a low-precision compute dtype.
    mask = jax.nn.sigmoid(offset_mask[..., 2 * taps :].astype(jnp.float32))
    return DeformConv2d(self.features, use_bias=True, dtype=self.dtype, name="conv")(
        x, offset_mask[..., : 2 * taps], mask
    )


class CenterNetHead(nn.Module):
  """Shared CenterNet head.

  Attributes (all required; `CenterNet` passes them from `config.model`, where the official
  values live):
    num_levels: number of FPN levels (P3..P7 -> 5); one `Scale` per level.
    num_convs: convs in the bbox tower (`centernet.num_convs`).
    channels: tower width (`fpn_channels`; must equal the input channels, as in the official head).
    prior_prob: objectness prior (`centernet.prior_prob`); `agn_hm` bias = -log((1 - p) / p).
    bbox_bias_init: `bbox_pred` bias init (`centernet.bbox_bias_init`, in stride units;
      docs/centernet2.md §2.4).
    use_deformable: the last bbox-tower conv is a `DFConv2d` (CENTERNET.USE_DEFORMABLE).
    dtype: compute dtype of the convs (`dtype`; parameters and outputs are float32).

  `__call__(features, masks=None)` with `features` a list of `num_levels` NHWC maps
  `[B, H_l, W_l, C]` (and optional GroupNorm masks `[B, H_l, W_l]` bool per level) returns
  a dict of per-level lists:
    hm_logits: `[B, H_l, W_l]` float32 objectness logits (before the sigmoid);
    reg:       `[B, H_l, W_l, 4]` float32 = relu(scale_l * bbox_pred), ltrb in stride units;
    reg_raw:   `[B, H_l, W_l, 4]` float32 bbox_pred output before Scale and ReLU.
  """

  num_levels: int
  num_convs: int
  channels: int
  prior_prob: float
  bbox_bias_init: float
  use_deformable: bool
  dtype: Dtype

  def setup(self):
    w_init = nn.initializers.normal(stddev=0.01)  # torch.nn.init.normal_(std=0.01), untruncated
    convs, norms = [], []
    for i in range(self.num_convs):
      # torch nn.Sequential indices: conv = 3i, GroupNorm = 3i+1, ReLU = 3i+2 (no params).
      if self.use_deformable and i == self.num_convs - 1:
        convs.append(DFConv2d(self.channels, dtype=self.dtype, name=f"bbox_tower.{3 * i}"))
        norms.append(GroupNorm(dtype=self.dtype, name=f"bbox_tower.{3 * i + 1}"))
        continue
      convs.append(
          Conv2d(
              self.channels,
              kernel_size=3,
              strides=1,
              padding=1,
              use_bias=True,
              kernel_init=w_init,
              bias_init=nn.initializers.zeros,
              dtype=self.dtype,
              name=f"bbox_tower.{3 * i}",
          )
      )
      norms.append(GroupNorm(dtype=self.dtype, name=f"bbox_tower.{3 * i + 1}"))
    self.tower_convs = convs
    self.tower_norms = norms
    hm_bias = -math.log((1.0 - self.prior_prob) / self.prior_prob)
    self.agn_hm = Conv2d(
        1,
        kernel_size=3,
        strides=1,
        padding=1,
        use_bias=True,
        kernel_init=w_init,
        bias_init=nn.initializers.constant(hm_bias),
        dtype=self.dtype,
        name="agn_hm",
    )
    self.bbox_pred = Conv2d(
        4,
        kernel_size=3,
        strides=1,
        padding=1,
        use_bias=True,
        kernel_init=w_init,
        bias_init=nn.initializers.constant(self.bbox_bias_init),
        dtype=self.dtype,
        name="bbox_pred",
    )
    self.scales = [Scale(1.0, name=f"scales.{level}") for level in range(self.num_levels)]

  def __call__(
      self, features: Sequence[jax.Array], masks: Optional[Sequence[jax.Array]] = None
  ) -> Dict[str, List[jax.Array]]:
    if len(features) != self.num_levels:
      raise ValueError(f"CenterNetHead: expected {self.num_levels} levels, got {len(features)}")
    hm_logits, reg, reg_raw = [], [], []
    for level, x in enumerate(features):
      mask = None if masks is None else masks[level]
      # Off-canvas locations are zeroed before every 3x3 conv: the official zero padding.
      on_canvas = (
          (lambda a: a)
          if mask is None
          else (lambda a, m=mask: jnp.where(m[..., None], a, jnp.zeros((), a.dtype)))
      )
      y = on_canvas(x)
      for conv, norm in zip(self.tower_convs, self.tower_norms):
        y = on_canvas(nn.relu(norm(conv(y), mask)))
      hm_logits.append(self.agn_hm(y)[..., 0].astype(jnp.float32))
      raw = self.bbox_pred(y).astype(jnp.float32)
      reg_raw.append(raw)
      reg.append(nn.relu(self.scales[level](raw)))
    return dict(hm_logits=hm_logits, reg=reg, reg_raw=reg_raw)
