"""The full CenterNet head of the official code (class heatmap + box regression), as the one-stage
`CenterNetDetector` models use it (CenterNet-FPN_R50_1x, CenterNet-S4_DLA_8x).

Official: `centernet/modeling/dense_heads/centernet_head.py` (`CenterNetHead`) in its general
form. `CenterNetHead` (centernet_head.py next to this file) is the ONLY_PROPOSAL special case that
CenterNet2 uses; this module covers every switch of the official constructor:

  towers   share_tower (NUM_SHARE_CONVS), then cls_tower (NUM_CLS_CONVS, 0 with ONLY_PROPOSAL)
           and bbox_tower (NUM_BOX_CONVS) on the share tower's output; each tower is an
           `nn.Sequential` of [conv 3x3 (bias), norm, ReLU] per conv, so the torch indices are
           conv = s*i, norm = s*i + 1 with s = 3 (s = 2 and no norm when NORM == "").
  norm     "GN": GroupNorm(32, C), or GroupNorm(25, C) when C % 32 != 0 (an official special
           case); "": none. (Other detectron2 norms are not supported.)
  DCN      USE_DEFORMABLE: the LAST conv of every tower (cls, bbox and share alike) is
           `DFConv2d` = `offset` conv 3x3 (27 ch: offsets 0..17 in the (dy, dx)-per-tap order,
           mask logits 18..26) + modulated deformable `conv` (3x3, bias).
  outputs  cls_logits (3x3 -> num_classes, prior bias, on the cls tower), agn_hm (3x3 -> 1,
           prior bias, on the bbox tower; WITH_AGN_HM), bbox_pred (3x3 -> 4, bias 8 in the
           official init, on the bbox tower), one `Scale` per level; reg = relu(scale_l *
           bbox_pred).

The head is shared by all levels (same weights; GroupNorm statistics per level, since levels are
processed one by one). Parameter paths under the caller's `proposal_generator/centernet_head`
equal the state-dict keys (docs/DESIGN.md), e.g. for CenterNet-FPN_R50_1x
`cls_tower.{0,3,6,9}/{kernel,bias}`, `cls_tower.{1,4,7,10}/{scale,bias}`, the same for
`bbox_tower`, `cls_logits/{kernel,bias}`, `bbox_pred/{kernel,bias}`, `scales.{0..4}/scale`; with
USE_DEFORMABLE e.g. `bbox_tower.9/offset/{kernel,bias}` and `bbox_tower.9/conv/{kernel,bias}`.

Canvas (cn2_jax/modeling/canvas.py): with per-level `masks` (the locations on the official
canvas) every 3x3 conv / DCN input is zeroed off the canvas and GroupNorm statistics cover the
canvas only, so a larger canvas gives the official values on the official canvas.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cn2_jax.modeling.layers import Conv2d, GroupNorm, Scale
from cn2_jax.modeling.proposal.centernet_head import DFConv2d

Dtype = Any

# CenterNetHead re-initialises every `nn.Conv2d` of its towers and outputs (detectron2's Conv2d,
# hence also DFConv2d's `offset` conv, is one) with normal(std=0.01) and bias 0; the modulated
# deformable conv is not an `nn.Conv2d` and keeps detectron2's kaiming_uniform(relu) / bias 0.
_HEAD_W_INIT = nn.initializers.normal(stddev=0.01)


def _prior_bias(prior_prob: float) -> float:
  """-log((1 - p) / p): the logit whose sigmoid is the prior probability (focal-loss init)."""
  return -math.log((1.0 - prior_prob) / prior_prob)


def _group_norm_groups(channels: int) -> int:
  """The official head: GroupNorm(25, C) when C is not a multiple of 32, else get_norm('GN')
  = GroupNorm(32, C)."""
  return 32 if channels % 32 == 0 else 25


class CenterNetOneStageHead(nn.Module):
  """The official `CenterNetHead` with all its switches (see the module docstring).

  Attributes:
    num_levels: input levels (one `Scale` each): 5 for P3-P7, 1 for S4's `dla2`.
    channels: input (= tower) channels (official `in_channels`: 256 for FPN, 64 for DLA S4).
    num_classes: class heatmap channels (`CENTERNET.NUM_CLASSES`, 80).
    num_cls_convs, num_box_convs, num_share_convs: tower depths (`NUM_CLS_CONVS`, 4 / 1 for S4;
      `NUM_BOX_CONVS`, 4 / 1; `NUM_SHARE_CONVS`, 0).
    norm: "GN" (official default) or "" (`CENTERNET.NORM`).
    use_deformable: last conv of every tower is `DFConv2d` (`CENTERNET.USE_DEFORMABLE`).
    with_agn_hm: the class-agnostic heatmap `agn_hm` on the bbox tower (`WITH_AGN_HM`).
    only_proposal: no cls tower and no `cls_logits` (`ONLY_PROPOSAL`, CenterNet2's proposal head;
      requires with_agn_hm, as the official CenterNet asserts).
    prior_prob: prior of `cls_logits` / `agn_hm`: bias = -log((1 - p) / p) (`PRIOR_PROB`, 0.01).
    bbox_bias_init: `bbox_pred` bias init (8.0 in the official head).
    dtype: compute dtype (parameters and outputs are float32).

  `__call__(features, masks=None)`: `features` a list of `num_levels` NHWC maps
  `[B, H_l, W_l, channels]`, `masks` optional per-level `[B, H_l, W_l]` bool (official canvas).
  Returns a dict of per-level lists (float32):
    cls_logits: `[B, H_l, W_l, num_classes]` class heatmap logits (absent with only_proposal);
    agn_hm_logits: `[B, H_l, W_l]` agnostic heatmap logits (only with with_agn_hm);
    reg: `[B, H_l, W_l, 4]` relu(scale_l * bbox_pred), (l, t, r, b) in stride units;
    reg_raw: `[B, H_l, W_l, 4]` bbox_pred before the Scale and the ReLU.
  """

  num_levels: int
  channels: int
  num_classes: int
  num_cls_convs: int
  num_box_convs: int
  num_share_convs: int = 0
  norm: str = "GN"
  use_deformable: bool = False
  with_agn_hm: bool = False
  only_proposal: bool = False
  prior_prob: float = 0.01
  bbox_bias_init: float = 8.0
  dtype: Dtype = jnp.float32

  def _tower(self, name: str, num_convs: int):
    """([conv modules], [norm modules or None]) named like the official nn.Sequential."""
    if self.norm not in ("GN", ""):
      raise ValueError(f"CenterNetOneStageHead: norm {self.norm!r} not supported ('GN' or '')")
    step = 3 if self.norm else 2  # conv, [norm], ReLU
    convs, norms = [], []
    for i in range(num_convs):
      conv_name = f"{name}.{step * i}"
      if self.use_deformable and i == num_convs - 1:
        convs.append(DFConv2d(self.channels, dtype=self.dtype, name=conv_name))
      else:
        convs.append(
            Conv2d(
                self.channels,
                kernel_size=3,
                strides=1,
                padding=1,
                use_bias=True,
                kernel_init=_HEAD_W_INIT,
                bias_init=nn.initializers.zeros,
                dtype=self.dtype,
                name=conv_name,
            )
        )
      norms.append(
          GroupNorm(
              num_groups=_group_norm_groups(self.channels),
              dtype=self.dtype,
              name=f"{name}.{step * i + 1}",
          )
          if self.norm
          else None
      )
    return convs, norms

  def _output_conv(self, features: int, bias: float, name: str) -> Conv2d:
    return Conv2d(
        features,
        kernel_size=3,
        strides=1,
        padding=1,
        use_bias=True,
        kernel_init=_HEAD_W_INIT,
        bias_init=nn.initializers.constant(bias),
        dtype=self.dtype,
        name=name,
    )

  def setup(self):
    if self.only_proposal and not self.with_agn_hm:
      raise ValueError("CenterNetOneStageHead: only_proposal requires with_agn_hm")
    self.share_tower = self._tower("share_tower", self.num_share_convs)
    self.cls_tower = self._tower("cls_tower", 0 if self.only_proposal else self.num_cls_convs)
    self.bbox_tower = self._tower("bbox_tower", self.num_box_convs)
    prior = _prior_bias(self.prior_prob)
    self.bbox_pred = self._output_conv(4, self.bbox_bias_init, "bbox_pred")
    self.agn_hm = self._output_conv(1, prior, "agn_hm") if self.with_agn_hm else None
    self.cls_logits = (
        None if self.only_proposal else self._output_conv(self.num_classes, prior, "cls_logits")
    )
    self.scales = [Scale(1.0, name=f"scales.{level}") for level in range(self.num_levels)]

  @staticmethod
  def _run_tower(tower, x: jax.Array, on, mask: Optional[jax.Array]) -> jax.Array:
    convs, norms = tower
    for conv, norm in zip(convs, norms):
      x = conv(on(x))
      if norm is not None:
        x = norm(x, mask)
      x = nn.relu(x)
    return x

  def __call__(
      self, features: Sequence[jax.Array], masks: Optional[Sequence[jax.Array]] = None
  ) -> Dict[str, List[jax.Array]]:
    if len(features) != self.num_levels:
      raise ValueError(
          f"CenterNetOneStageHead: expected {self.num_levels} levels, got {len(features)}"
      )
    out = dict(reg=[], reg_raw=[])
    if self.cls_logits is not None:
      out["cls_logits"] = []
    if self.agn_hm is not None:
      out["agn_hm_logits"] = []
    for level, x in enumerate(features):
      mask = None if masks is None else masks[level]
      # Off-canvas locations are zeroed before every 3x3 conv / DCN: the official zero padding.
      if mask is None:
        on_canvas = lambda a: a  # noqa: E731
      else:
        on_canvas = lambda a, m=mask: jnp.where(m[..., None], a, jnp.zeros((), a.dtype))  # noqa: E731
      shared = self._run_tower(self.share_tower, x, on_canvas, mask)
      cls_feat = self._run_tower(self.cls_tower, shared, on_canvas, mask)
      box_feat = self._run_tower(self.bbox_tower, shared, on_canvas, mask)
      if self.cls_logits is not None:
        out["cls_logits"].append(self.cls_logits(on_canvas(cls_feat)).astype(jnp.float32))
      if self.agn_hm is not None:
        out["agn_hm_logits"].append(self.agn_hm(on_canvas(box_feat))[..., 0].astype(jnp.float32))
      raw = self.bbox_pred(on_canvas(box_feat)).astype(jnp.float32)
      out["reg_raw"].append(raw)
      out["reg"].append(nn.relu(self.scales[level](raw)))
    return out
