"""BiFPN neck of the CenterNet2 zoo (official `centernet/modeling/backbone/bifpn.py`, class `BiFPN`).

Used by CenterNet2_DLA-BiFPN-P5_640_16x (`build_p37_dla_bifpn_backbone`: DLA-34 `dla3/dla4/dla5`,
128/256/512 channels, 160 out channels, 3 cells) and CenterNet2_R2-101-DCN-BiFPN_1280_4x
(`build_res2net_bifpn_backbone`: Res2Net `res3/res4/res5`, 512/1024/2048 channels, 288 out
channels, 7 cells). Both configs: `MODEL.BIFPN.NORM = "GN"` (GroupNorm(32, C), eps 1e-5),
`NUM_LEVELS = 5`, `SEPARABLE_CONV = False` (centernet/config.py defaults; the yamls set
OUT_CHANNELS / NUM_BIFPN). The official module derives from efficientdet-pytorch; what it computes
with the CenterNet2 arguments (`pad_type` / `pooling_type` / `redundant_bias` are accepted there
but have no effect):

  Levels: the in_features are at strides 8, 16, 32 (P3-P5); the missing top levels come from
  `resample.{level}` (`ResampleFeatureMap`, ratio 2, apply_bn=True): P6 = maxpool2x2(GN(conv1x1
  no bias)(in[-1])) (the conv only because the channel count differs), P7 = maxpool2x2(P6)
  (`resample.4` has no parameters). MaxPool2d(2, 2): no padding, floor.
  Each of the `num_bifpn` cells (`cell.{i}`, `BiFpnLayer`) appends 8 nodes (`fnode.{j}`) to its
  5 inputs (offsets 0-4) and returns the last 5 nodes (P3..P7):

      node j  stride  inputs (offset: 0-4 = the cell inputs P3..P7, 5 + k = node k)
        0       64    3, 4            4       16    1, 7, 8
        1       32    2, 5            5       32    2, 6, 9
        2       16    1, 6            6       64    3, 5, 10
        3        8    0, 7            7      128    4, 11

  node = after_combine.conv(swish(sum_i (r_i(x_i) * relu(w_i)) / (sum_k relu(w_k) + 1e-4)))
  with `combine.edge_weights` w (official init 1). `r_i` = `combine.resample.{offset}`: a 1x1
  conv + GN (`conv.conv`, `conv.bn`; no conv bias) when the input's channels differ from
  out_channels (only cell 0's inputs 0-2), then nearest x2 upsampling or MaxPool2d(2, 2) to the
  node's stride. `after_combine.conv` (ConvBnAct2d, act None) = GN(conv3x3 p1, no bias); with
  `separable_conv` it is SeparableConv2d: depthwise 3x3 `conv_dw` (no bias), 1x1 `conv_pw`, GN.
  Without a norm (norm='') every such conv has a bias and there is no `bn` (the depthwise conv
  never has one). The cell outputs have no activation after the GN.

Variable paths (relative to this module, = the official keys below `backbone.`):
  `resample.3.conv.conv.kernel`, `resample.3.conv.bn.{scale,bias}`,
  `cell.{i}.fnode.{j}.combine.edge_weights`,
  `cell.0.fnode.{j}.combine.resample.{offset}.conv.conv.kernel` / `.conv.bn.{scale,bias}`,
  `cell.{i}.fnode.{j}.after_combine.conv.conv.kernel` / `.conv.bn.{scale,bias}`
  (separable: `after_combine.conv.conv_dw.kernel`, `.conv_pw.kernel`, `.bn.*`).

Canvas: the official canvas is a multiple of 128 (`size_divisibility`), so every map lies on an
exact multiple of 2 at every level and pooling windows never straddle its edge. Off-canvas values
are zeroed at the input of every 3x3 conv and max-pool, and each GroupNorm takes its statistics on
the canvas only (`canvas.canvas_mask` at the map's stride); 1x1 convs, upsampling and the weighted
sum are pointwise.

Initialisation (training from scratch): torch's defaults, as the official module keeps them
(kaiming_uniform(a=sqrt(5)) kernels, U(+-1/sqrt(fan_in)) biases, GN 1/0, edge weights 1).

The other official BiFPN, `centernet/modeling/backbone/bifpn_fcos.py` (from AdelaiDet;
CenterNet2_DLA-fcosBiFPN-P5_640_16x_ST and the 3-level CenterNet2_DLA-BiFPN-P3_{4x,24x}), is
`FcosBiFPN` in bifpn_fcos.py, with its registered builders; its docstring says how it differs.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# upsample_nearest_2x = torch nn.UpsamplingNearest2d(scale_factor=2) / F.interpolate x2 'nearest'.
from cn2_jax import schema
from cn2_jax.modeling.backbone.build import register
from cn2_jax.modeling.backbone.dla import DLA
from cn2_jax.modeling.backbone.fpn import upsample_nearest_2x
from cn2_jax.modeling.backbone.res2net import res2net_from_config, res2net_frozen
from cn2_jax.modeling.canvas import canvas_mask, zero_outside_canvas
from cn2_jax.modeling.layers import Conv2d, GroupNorm, max_pool

Dtype = Any

# get_fpn_config(base_reduction=8): (stride of the node, input offsets), weight_method 'fastattn'.
FPN_NODES: Tuple[Tuple[int, Tuple[int, ...]], ...] = (
    (64, (3, 4)),
    (32, (2, 5)),
    (16, (1, 6)),
    (8, (0, 7)),
    (16, (1, 7, 8)),
    (32, (2, 6, 9)),
    (64, (3, 5, 10)),
    (128, (4, 11)),
)
LEVEL_STRIDES = (8, 16, 32, 64, 128)  # P3..P7: the cell inputs and outputs
EDGE_EPS = 1e-4  # FpnCombine 'fastattn': relu(w) / (sum relu(w) + 0.0001)

# torch.nn.Conv2d's default init (kaiming_uniform_(a=sqrt(5)) = U(+-1/sqrt(fan_in))); the official
# BiFPN never re-initialises its convs.
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int):
  """torch.nn.Conv2d's default bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / float(np.sqrt(fan_in))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def swish(x: jax.Array) -> jax.Array:
  """The official `swish`: x * sigmoid(x)."""
  return x * jax.nn.sigmoid(x)


def _check_norm(norm: str) -> None:
  if norm not in ("GN", ""):
    raise ValueError(f"BiFPN: norm {norm!r} not supported (the zoo uses 'GN'; '' = none)")


class ConvBnAct2d(nn.Module):
  """Official `ConvBnAct2d` with act_layer=None: `conv` (k x k, padding k // 2, bias only without a
  norm), then `bn` (GroupNorm(32), statistics restricted by `norm_mask`) unless norm == ''.
  `[N, H, W, Cin]` -> `[N, H, W, features]`; the caller zeroes the input off the canvas for k > 1.
  """

  features: int
  kernel_size: int
  norm: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, norm_mask: Optional[jax.Array] = None) -> jax.Array:
    _check_norm(self.norm)
    fan_in = x.shape[-1] * self.kernel_size**2
    y = Conv2d(
        self.features,
        kernel_size=self.kernel_size,
        padding=self.kernel_size // 2,
        use_bias=self.norm == "",
        kernel_init=torch_default_kernel_init,
        bias_init=torch_default_bias_init(fan_in),
        dtype=self.dtype,
        name="conv",
    )(x)
    if self.norm == "GN":
      y = GroupNorm(dtype=self.dtype, name="bn")(y, norm_mask)
    return y


class DepthwiseConv2d(nn.Module):
  """Depthwise k x k conv, padding k // 2, no bias (the official `conv_dw`: groups = channels).
  Kernel `[k, k, 1, C]` (torch weight `[C, 1, k, k]`)."""

  kernel_size: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, c, p = self.kernel_size, x.shape[-1], self.kernel_size // 2
    kernel = self.param("kernel", torch_default_kernel_init, (k, k, 1, c), jnp.float32)
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype),
        kernel.astype(self.dtype),
        window_strides=(1, 1),
        padding=((p, p), (p, p)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
    )


class SeparableConv2d(nn.Module):
  """Official `SeparableConv2d` (SEPARABLE_CONV=True; act None): `conv_dw` depthwise 3x3 without
  bias, `conv_pw` 1x1 (bias only without a norm), then `bn` unless norm == ''."""

  features: int
  norm: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, norm_mask: Optional[jax.Array] = None) -> jax.Array:
    _check_norm(self.norm)
    if x.shape[-1] != self.features:
      raise ValueError("SeparableConv2d: the official conv_dw has groups=out_channels (in == out)")
    y = DepthwiseConv2d(3, dtype=self.dtype, name="conv_dw")(x)
    y = Conv2d(
        self.features,
        kernel_size=1,
        use_bias=self.norm == "",
        kernel_init=torch_default_kernel_init,
        bias_init=torch_default_bias_init(x.shape[-1]),
        dtype=self.dtype,
        name="conv_pw",
    )(y)
    if self.norm == "GN":
      y = GroupNorm(dtype=self.dtype, name="bn")(y, norm_mask)
    return y


class ResampleFeatureMap(nn.Module):
  """Official `ResampleFeatureMap` with apply_bn=True, conv_after_downsample=False: `conv` (1x1
  ConvBnAct2d) when the channel count differs from `out_channels`, then MaxPool2d(2, 2)
  (`ratio` 2), nearest x2 upsampling (`ratio` 0.5) or nothing (1).

  `x` `[N, H, W, C]` at `in_stride`; `canvas_hw` the official canvas (GN statistics at
  `in_stride`, pooling input zeroed off it)."""

  out_channels: int
  ratio: float
  norm: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, in_stride: int, canvas_hw: Optional[jax.Array]) -> jax.Array:
    if x.shape[-1] != self.out_channels:
      mask = canvas_mask(x.shape[1:3], canvas_hw, in_stride)
      x = ConvBnAct2d(self.out_channels, 1, self.norm, dtype=self.dtype, name="conv")(x, mask)
    if self.ratio == 2:
      x = max_pool(zero_outside_canvas(x, canvas_hw, in_stride), 2)
    elif self.ratio == 0.5:
      x = upsample_nearest_2x(x)
    elif self.ratio != 1:
      raise ValueError(f"ResampleFeatureMap: unsupported reduction ratio {self.ratio}")
    return x


class FpnCombine(nn.Module):
  """Official `FpnCombine` ('fastattn'): resample every input (`resample.{offset}`) to the node's
  stride and take sum_i (x_i * relu(w_i)) / (sum relu(w) + 1e-4) with `edge_weights` w."""

  inputs_offsets: Tuple[int, ...]
  target_stride: int
  out_channels: int
  norm: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self, nodes: Sequence[jax.Array], strides: Sequence[int], canvas_hw: Optional[jax.Array]
  ) -> jax.Array:
    n = len(self.inputs_offsets)
    edge_weights = self.param("edge_weights", nn.initializers.ones, (n,), jnp.float32)
    # The official casts the weights to the features' dtype before relu / sum.
    w = nn.relu(edge_weights.astype(self.dtype))
    denom = jnp.sum(w) + EDGE_EPS
    out = None
    for i, offset in enumerate(self.inputs_offsets):
      x = ResampleFeatureMap(
          self.out_channels,
          ratio=self.target_stride / strides[offset],
          norm=self.norm,
          dtype=self.dtype,
          name=f"resample.{offset}",
      )(nodes[offset], strides[offset], canvas_hw)
      term = (x * w[i]) / denom  # the official order: (x * w_i) / (sum + eps), then the sum
      out = term if out is None else out + term
    return out


class BiFpnLayer(nn.Module):
  """Official `BiFpnLayer` (one cell): 8 nodes `fnode.{j}` (`combine`, `after_combine.conv`) on
  the 5 inputs P3..P7; returns the last 5 nodes (P3..P7, `out_channels` each)."""

  out_channels: int
  norm: str
  separable_conv: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self, inputs: Sequence[jax.Array], canvas_hw: Optional[jax.Array]
  ) -> List[jax.Array]:
    nodes = list(inputs)
    strides = list(LEVEL_STRIDES)
    for j, (stride, offsets) in enumerate(FPN_NODES):
      x = FpnCombine(
          offsets, stride, self.out_channels, self.norm, dtype=self.dtype, name=f"fnode.{j}.combine"
      )(nodes, strides, canvas_hw)
      x = zero_outside_canvas(swish(x), canvas_hw, stride)  # after_combine.act, then the 3x3
      mask = canvas_mask(x.shape[1:3], canvas_hw, stride)
      name = f"fnode.{j}.after_combine.conv"
      if self.separable_conv:
        x = SeparableConv2d(self.out_channels, self.norm, dtype=self.dtype, name=name)(x, mask)
      else:
        x = ConvBnAct2d(self.out_channels, 3, self.norm, dtype=self.dtype, name=name)(x, mask)
      nodes.append(x)
      strides.append(stride)
    return nodes[-len(LEVEL_STRIDES) :]


class BiFPN(nn.Module):
  """The official CenterNet2 `BiFPN` neck (module docstring), without its bottom-up network.

  Attributes:
    in_features: names of the bottom-up maps, finest first, at strides 8, 16, 32, ... (DLA-BiFPN:
      ("dla3", "dla4", "dla5"); R2-101-BiFPN: ("res3", "res4", "res5"); cfg.MODEL.FPN.IN_FEATURES).
    in_channels: their channel counts (DLA-34: (128, 256, 512); Res2Net-101: (512, 1024, 2048)).
    out_channels: BiFPN channels (cfg.MODEL.BIFPN.OUT_CHANNELS: 160 DLA, 288 R2-101).
    num_bifpn: number of cells (cfg.MODEL.BIFPN.NUM_BIFPN: 3 DLA, 7 R2-101).
    num_levels: output levels (cfg.MODEL.BIFPN.NUM_LEVELS, 5; the official node graph is fixed
      to P3..P7, so only 5 is valid).
    norm: "GN" (cfg.MODEL.BIFPN.NORM, the zoo) or "" (no norm; convs get biases).
    separable_conv: cfg.MODEL.BIFPN.SEPARABLE_CONV (False in the zoo).
    bottom_up: optional bottom-up module (`bottom_up(x, canvas_hw) -> {name: map}`), adopted as
      the child `bottom_up` so that, with this module named `backbone`, every variable path is the
      official `backbone.*` key; needed only to call the module on an image.
    dtype: compute dtype (parameters float32).

  `__call__(features, canvas_hw=None)`: `features` {in_feature: `[N, H/s, W/s, C_in]`} (extra
  keys ignored) -> `[P3, P4, P5, P6, P7]`, `[N, H/s, W/s, out_channels]` at `strides`
  (8, 16, 32, 64, 128); H, W multiples of `size_divisibility` (128; the official
  `_size_divisibility`). `canvas_hw` (`[2]` int, a multiple of 128, or None): the official canvas;
  values on it are the official ones whatever lies beyond it (module docstring). With `bottom_up`
  set, `__call__(image, canvas_hw)` runs it first (the registry's backbone contract).
  """

  in_features: Tuple[str, ...]
  in_channels: Tuple[int, ...]
  out_channels: int
  num_bifpn: int
  num_levels: int = 5
  norm: str = "GN"
  separable_conv: bool = False
  bottom_up: Optional[nn.Module] = None
  dtype: Dtype = jnp.float32

  # Class constants (readable on the unbound module).
  strides = LEVEL_STRIDES  # P3..P7
  out_features = ("p3", "p4", "p5", "p6", "p7")
  size_divisibility = 128

  def __call__(self, x, canvas_hw: Optional[jax.Array] = None) -> List[jax.Array]:
    if isinstance(x, Mapping):
      return self.forward_features(x, canvas_hw)
    if self.bottom_up is None:
      raise ValueError("BiFPN called on an image but has no bottom_up; pass the feature dict")
    return self.forward_features(self.bottom_up(x, canvas_hw), canvas_hw)

  @nn.compact
  def forward_features(
      self, features: Dict[str, jax.Array], canvas_hw: Optional[jax.Array] = None
  ) -> List[jax.Array]:
    n_in = len(self.in_features)
    if self.num_levels != len(LEVEL_STRIDES):
      raise ValueError(
          f"BiFPN: num_levels must be 5 (the official node graph), got {self.num_levels}"
      )
    if len(self.in_channels) != n_in or not 1 <= n_in <= self.num_levels:
      raise ValueError(f"BiFPN: in_features {self.in_features} / in_channels {self.in_channels}")
    _check_norm(self.norm)
    x = []
    for name, channels in zip(self.in_features, self.in_channels):
      f = features[name]
      if f.shape[-1] != channels:
        raise ValueError(f"BiFPN: {name} has {f.shape[-1]} channels, expected {channels}")
      x.append(f.astype(self.dtype))
    # SequentialAppendLast: each missing top level from the previous one.
    for level in range(n_in, self.num_levels):
      x.append(
          ResampleFeatureMap(
              self.out_channels, ratio=2, norm=self.norm, dtype=self.dtype, name=f"resample.{level}"
          )(x[-1], LEVEL_STRIDES[level - 1], canvas_hw)
      )
    for level in range(self.num_levels - 1):
      hw, coarser = x[level].shape[1:3], x[level + 1].shape[1:3]
      if hw[0] != 2 * coarser[0] or hw[1] != 2 * coarser[1]:
        # The official code fails here too (upsampled and lateral maps of different sizes).
        raise ValueError(
            f"BiFPN: level sizes {[t.shape[1:3] for t in x]} are not exact halvings: the input "
            f"size must be a multiple of {self.size_divisibility}"
        )
    for i in range(self.num_bifpn):
      x = BiFpnLayer(
          self.out_channels,
          self.norm,
          separable_conv=self.separable_conv,
          dtype=self.dtype,
          name=f"cell.{i}",
      )(x, canvas_hw)
    return x


def _nothing_frozen(model_config) -> tuple:
  return ()  # the DLA of dlafpn.py has no FREEZE_AT: every parameter trains


@register("build_p37_dla_bifpn_backbone", frozen_param_prefixes=_nothing_frozen)
def build_p37_dla_bifpn_backbone(model_config, dtype) -> BiFPN:
  """DLA-34 (dlafpn.py; `model.dla`) + BiFPN on dla3-dla5 (`model.bifpn`) -> P3-P7
  (CenterNet2_DLA-BiFPN-P5_640_16x and its _ST variant)."""
  bf = model_config.bifpn
  return BiFPN(
      in_features=("dla3", "dla4", "dla5"),
      in_channels=(128, 256, 512),
      out_channels=bf.out_channels,
      num_bifpn=bf.num_bifpn,
      num_levels=bf.num_levels,
      norm=bf.norm,
      separable_conv=bf.separable_conv,
      bottom_up=DLA(norm=model_config.dla.norm, dtype=dtype),
      dtype=dtype,
  )


@register("build_res2net_bifpn_backbone", frozen_param_prefixes=res2net_frozen)
def build_res2net_bifpn_backbone(model_config, dtype) -> BiFPN:
  """Res2Net (`model.resnet_*`) + BiFPN on res3-res5 (`model.bifpn`) -> P3-P7
  (CenterNet2_R2-101-DCN-BiFPN_1280_4x, _4x+4x_1560_ST)."""
  bf = model_config.bifpn
  bottom_up = res2net_from_config(model_config, dtype)
  return BiFPN(
      in_features=("res3", "res4", "res5"),
      in_channels=(512, 1024, 2048),
      out_channels=bf.out_channels,
      num_bifpn=bf.num_bifpn,
      num_levels=bf.num_levels,
      norm=bf.norm,
      separable_conv=bf.separable_conv,
      bottom_up=bottom_up,
      dtype=dtype,
  )


CONFIG = schema.group(
    "model.bifpn",
    "BiFPN neck (MODEL.BIFPN; backbones build_p37_dla_bifpn_backbone, build_res2net_bifpn_backbone).",
    schema.Field("out_channels", 160, "BIFPN.OUT_CHANNELS"),
    schema.Field("num_levels", 5, "P3-P7 (the only node graph the official BiFPN has)"),
    schema.Field("num_bifpn", 6, "BiFPN cells (3 for DLA-BiFPN-P5, 7 for R2-101-BiFPN)"),
    schema.Field("norm", "GN", "BIFPN.NORM of the cells' convs"),
    schema.Field("separable_conv", False, "BIFPN.SEPARABLE_CONV: depthwise-separable cell convs"),
    families=("centernet2", "centernet"),
)
