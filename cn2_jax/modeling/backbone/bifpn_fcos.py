"""The AdelaiDet BiFPN of the CenterNet2 zoo (official `centernet/modeling/backbone/bifpn_fcos.py`)
and its four registered backbones.

Registered (official MODEL.BACKBONE.NAME, the bottom-up network, the levels):
  build_p37_fcos_dla_bifpn_backbone    DLA-34 (dlafpn.py) dla3-dla5 + 2 top levels: P3-P7
                                       (CenterNet2_DLA-fcosBiFPN-P5_640_16x_ST)
  build_p35_fcos_dla_bifpn_backbone    DLA-34 dla3-dla5, no top level: P3-P5
                                       (CenterNet2_DLA-BiFPN-P3_4x, CenterNet2_DLA-BiFPN-P3_24x)
  build_fcos_resnet_bifpn_backbone     detectron2 ResNet res3-res5 + 2 top levels: P3-P7
  build_p35_fcos_resnet_bifpn_backbone ResNet res3-res5: P3-P5 (no official yaml uses the two
                                       ResNet ones)
The official builders read MODEL.FPN.IN_FEATURES (dla3/4/5, res3/4/5 in every yaml), BIFPN.
OUT_CHANNELS, NUM_BIFPN and NORM; they ignore BIFPN.NUM_LEVELS (the p37 DLA one asserts it is 5)
and SEPARABLE_CONV. Here the in_features are those of the yamls (`model.bifpn.*` gives the rest).

Structure (official classes; every variable path is the official key below `backbone.`):
  `bottom_up` = `BackboneWithTopLevels`: the bottom-up network as `bottom_up.backbone`
    (`backbone.bottom_up.backbone.level2.tree1.conv1.weight`, ...) and the top levels named
    after its last level (`dla5` -> `dla6`, `dla7`): `FeatureMapResampler` = `reduction` (1x1
    conv, no bias under GN, + `norm`) when the channel count differs (only the first), then
    F.max_pool2d(3, stride 2, padding 1) (`backbone.bottom_up.dla6.reduction.weight`, `.norm.*`;
    `dla7` has no parameters).
  `repeated_bifpn.{i}` = `SingleBiFPN` cells on 5 (P3-P7) or 3 (P3-P5) levels, flat names:
    lateral 1x1 convs `lateral_{offset}_f{level}` (+ `.norm`) WITH a conv bias even under GN
    (detectron2 Conv2d's default), applied to an input whose channels differ from out_channels
    and SHARED by the nodes that read the same offset at the same level (the official
    `add_module` replaces the module of a repeated name, and both nodes then call the survivor:
    cell 0 of the 5-level graph has 3 laterals, lateral_2_f2, lateral_1_f1, lateral_0_f0; the
    3-level graph 4, lateral_1_f1, lateral_2_f1, lateral_0_f0, lateral_2_f2);
    attention weights `weights_f{level}_{offsets}` (a parameter of the cell, official init 1);
    output convs `outputs_f{level}_{offsets}` (3x3 + `.norm`, a bias only without a norm).
  Nodes ((level: input offsets); 0-4 the cell inputs, 5 + k node k):
    5 levels: (3: 3, 4) (2: 2, 5) (1: 1, 6) (0: 0, 7) (1: 1, 7, 8) (2: 2, 6, 9) (3: 3, 5, 10)
              (4: 4, 11)
    3 levels: (1: 1, 2) (0: 0, 3) (1: 1, 3, 4) (2: 2, 5)
  node = outputs(swish(sum_i x_i * (relu(w_i) / (sum relu(w) + 1e-4)))), x_i = lateral (if any),
  then max_pool2d(3, 2, 1) (finer input) or nearest upsampling (coarser input); a cell returns,
  per level, its last node (with these graphs: the last `levels` nodes). No activation after the
  output conv's norm.
Differences from bifpn.py's `BiFPN` (EfficientDet's): the top levels come from the bottom-up
wrapper, every downsampling is the overlapping 3x3/2 max-pool (bifpn.py: MaxPool2d(2, 2)), the
fusion normalises the weights before multiplying (bifpn.py: (x_i * relu(w_i)) / (sum + 1e-4);
equal up to float rounding), the flat shared laterals with biases, and the 3-level graph.

Canvas (modeling/canvas.py): `size_divisibility` is 128 as officially (for P3-P5 too), so every
level's canvas is even and a 3x3/2 window of an on-canvas output never reaches beyond the canvas
(its -inf padding is above / left only). Off-canvas values are zeroed at the input of every 3x3
conv and max-pool, and each GroupNorm takes its statistics on the canvas only; 1x1 convs,
upsampling and the weighted sums are pointwise.

Initialisation (training from scratch): torch's defaults, as the official module keeps them.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cn2_jax.errors import ConfigError
from cn2_jax.modeling.backbone.bifpn import (
    EDGE_EPS,
    _check_norm,
    swish,
    torch_default_bias_init,
    torch_default_kernel_init,
)
from cn2_jax.modeling.backbone.build import register
from cn2_jax.modeling.backbone.dla import DLA
from cn2_jax.modeling.backbone.fpn import upsample_nearest_2x
from cn2_jax.modeling.backbone.resnet import ResNet, max_pool_3x3_s2_p1, resnet_out_channels
from cn2_jax.modeling.backbone.resnet import frozen_param_prefixes as resnet_frozen_prefixes
from cn2_jax.modeling.canvas import canvas_mask, zero_outside_canvas
from cn2_jax.modeling.layers import Conv2d

Dtype = Any

# SingleBiFPN.nodes: (feat_level, input offsets); levels index the cell inputs (0 = finest).
FCOS_NODES = {
    5: (
        (3, (3, 4)),
        (2, (2, 5)),
        (1, (1, 6)),
        (0, (0, 7)),
        (1, (1, 7, 8)),
        (2, (2, 6, 9)),
        (3, (3, 5, 10)),
        (4, (4, 11)),
    ),
    3: ((1, (1, 2)), (0, (0, 3)), (1, (1, 3, 4)), (2, (2, 5))),
}


def split_name(name: str) -> Tuple[str, int]:
  """The official `split_name`: "dla5" -> ("dla", 5). The level is also log2 of the stride
  (dlaK and resK are at stride 2^K)."""
  for i, c in enumerate(name):
    if not c.isalpha():
      return name[:i], int(name[i:])
  raise ValueError(f"feature name {name!r} has no level suffix")


class FeatureMapResampler(nn.Module):
  """Official `FeatureMapResampler` (stride 2): `reduction` (1x1 conv, bias only without a norm,
  + `norm`) when the channel count differs, then F.max_pool2d(3, stride 2, padding 1).
  `x` `[N, H, W, C]` at `in_stride` -> `[N, H/2, W/2, out_channels]`."""

  out_channels: int
  norm: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, in_stride: int, canvas_hw: Optional[jax.Array]) -> jax.Array:
    if x.shape[-1] != self.out_channels:
      x = Conv2d(
          self.out_channels,
          kernel_size=1,
          use_bias=self.norm == "",
          norm=self.norm,
          kernel_init=torch_default_kernel_init,
          bias_init=torch_default_bias_init(x.shape[-1]),
          dtype=self.dtype,
          name="reduction",
      )(x, canvas_mask(x.shape[1:3], canvas_hw, in_stride))
    return max_pool_3x3_s2_p1(zero_outside_canvas(x, canvas_hw, in_stride))


class BackboneWithTopLevels(nn.Module):
  """Official `BackboneWithTopLevels`: the bottom-up network (child `backbone`) plus
  `num_top_levels` stride-2 `FeatureMapResampler`s on its last (deepest) output, named after it
  (`dla5` -> `dla6`, `dla7`).

  Attributes: out_channels (of the top levels), num_top_levels (2 or 0), norm ("GN" or ""),
  backbone (optional bottom-up module `backbone(image, canvas_hw) -> {name: map}`, names ending
  in their level, e.g. `dla0`..`dla5`; adopted as the child `backbone`), dtype.

  `__call__(x, canvas_hw=None)`: `x` an image `[N, H, W, 3]` (runs `backbone`) or an already
  computed {name: map} dict (the bottom-up outputs) -> that dict plus the top levels.
  """

  out_channels: int
  num_top_levels: int
  norm: str = "GN"
  backbone: Optional[nn.Module] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, canvas_hw: Optional[jax.Array] = None) -> Dict[str, jax.Array]:
    if isinstance(x, Mapping):
      features = dict(x)
    elif self.backbone is None:
      raise ValueError("BackboneWithTopLevels called on an image but has no backbone")
    else:
      features = dict(self.backbone(x, canvas_hw))
    prefix, level = split_name(max(features, key=lambda n: split_name(n)[1]))
    y = features[f"{prefix}{level}"]
    for i in range(self.num_top_levels):
      name = f"{prefix}{level + i + 1}"
      y = FeatureMapResampler(self.out_channels, self.norm, dtype=self.dtype, name=name)(
          y, 2 ** (level + i), canvas_hw
      )
      features[name] = y
    return features


class SingleBiFPN(nn.Module):
  """Official `SingleBiFPN`: one cell on 3 or 5 levels (module docstring). `inputs` finest first,
  `strides` theirs (for the canvas masks) -> the cell's outputs, one per level."""

  out_channels: int
  norm: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self, inputs: Sequence[jax.Array], strides: Sequence[int], canvas_hw: Optional[jax.Array]
  ) -> List[jax.Array]:
    num_levels = len(inputs)
    feats, strides = list(inputs), list(strides)
    laterals = {}  # one module per official name: the nodes share `lateral_{o}_f{l}`
    for level, offsets in FCOS_NODES[num_levels]:
      target_hw, stride = feats[level].shape[1:3], strides[level]
      resampled = []
      for offset in offsets:
        x = feats[offset]
        if x.shape[-1] != self.out_channels:
          name = f"lateral_{offset}_f{level}"
          if name not in laterals:
            laterals[name] = Conv2d(  # bias=True (detectron2 Conv2d default) even with the norm
                self.out_channels,
                kernel_size=1,
                use_bias=True,
                norm=self.norm,
                kernel_init=torch_default_kernel_init,
                bias_init=torch_default_bias_init(x.shape[-1]),
                dtype=self.dtype,
                name=name,
            )
          x = laterals[name](x, canvas_mask(x.shape[1:3], canvas_hw, strides[offset]))
        if x.shape[1] > target_hw[0] and x.shape[2] > target_hw[1]:
          x = max_pool_3x3_s2_p1(zero_outside_canvas(x, canvas_hw, strides[offset]))
        elif x.shape[1] < target_hw[0] or x.shape[2] < target_hw[1]:
          x = upsample_nearest_2x(x)  # F.interpolate(size=target, 'nearest') on exact halvings
        resampled.append(x)
      suffix = f"f{level}_{'_'.join(map(str, offsets))}"
      weights = self.param(f"weights_{suffix}", nn.initializers.ones, (len(offsets),), jnp.float32)
      weights = nn.relu(weights.astype(self.dtype))
      norm_weights = weights / (jnp.sum(weights) + EDGE_EPS)  # normalised first, then x * w
      x = None
      for w, r in zip(norm_weights, resampled):
        x = r * w if x is None else x + r * w
      x = zero_outside_canvas(swish(x), canvas_hw, stride)
      x = Conv2d(
          self.out_channels,
          kernel_size=3,
          padding=1,
          use_bias=self.norm == "",
          norm=self.norm,
          kernel_init=torch_default_kernel_init,
          bias_init=torch_default_bias_init(9 * self.out_channels),
          dtype=self.dtype,
          name=f"outputs_{suffix}",
      )(x, canvas_mask(x.shape[1:3], canvas_hw, stride))
      feats.append(x)
      strides.append(stride)
    # Per level its last node: with these graphs the last `num_levels` nodes, in level order.
    return feats[-num_levels:]


class FcosBiFPN(nn.Module):
  """The official `bifpn_fcos.BiFPN` (module docstring).

  Attributes:
    in_features: the bottom-up maps it reads, names ending in their level (dla3/dla4/dla5 or
      res3/res4/res5: strides 8, 16, 32; cfg.MODEL.FPN.IN_FEATURES); any order (sorted by level).
    in_channels: their channel counts, in the order of `in_features` (DLA-34: 128, 256, 512).
    out_channels: cfg.MODEL.BIFPN.OUT_CHANNELS (160 in the zoo).
    num_bifpn: cells (cfg.MODEL.BIFPN.NUM_BIFPN: 3 fcosBiFPN-P5, 4 BiFPN-P3).
    num_top_levels: 2 (P6, P7: the p37 / resnet builders) or 0 (the p35 builders); inputs + top
      levels must be 5 or 3.
    norm: cfg.MODEL.BIFPN.NORM, "GN" (zoo) or "" (convs with biases, no norm).
    bottom_up: optional `BackboneWithTopLevels` holding the bottom-up network (adopted as
      `bottom_up`, so with this module named `backbone` every variable path is the official key);
      None: the top levels are built here under the same name (`bottom_up.dla6`, ...) and the
      module is called on bottom-up feature dicts only.
    dtype: compute dtype (parameters float32).

  `__call__(x, canvas_hw=None)`: `x` the image `[N, H, W, 3]` (needs `bottom_up` with a
  backbone) or the bottom-up {name: `[N, H/s, W/s, C]`} dict -> `[P3, ..., P(2 + levels)]`, each
  `[N, H/s, W/s, out_channels]` at `strides`; H, W multiples of `size_divisibility` (128, the
  official `_size_divisibility`); `canvas_hw` the official canvas (values on it are the
  official ones whatever lies beyond).
  """

  in_features: Tuple[str, ...]
  in_channels: Tuple[int, ...]
  out_channels: int
  num_bifpn: int
  num_top_levels: int = 2
  norm: str = "GN"
  bottom_up: Optional[nn.Module] = None
  dtype: Dtype = jnp.float32

  size_divisibility = 128

  def _levels(self) -> List[int]:
    first = min(split_name(n)[1] for n in self.in_features)
    return [first + i for i in range(len(self.in_features) + self.num_top_levels)]

  @property
  def strides(self) -> Tuple[int, ...]:
    return tuple(2**level for level in self._levels())

  @property
  def out_features(self) -> Tuple[str, ...]:
    return tuple(f"p{level}" for level in self._levels())

  @nn.compact
  def __call__(self, x, canvas_hw: Optional[jax.Array] = None) -> List[jax.Array]:
    _check_norm(self.norm)
    names = sorted(self.in_features, key=lambda n: split_name(n)[1])
    channels = dict(zip(self.in_features, self.in_channels))
    num_levels = len(names) + self.num_top_levels
    if num_levels not in FCOS_NODES or len(self.in_channels) != len(names):
      raise ValueError(
          f"FcosBiFPN: {len(names)} inputs + {self.num_top_levels} top levels (the official "
          f"cells have 5 or 3 levels)"
      )
    if self.bottom_up is None:
      if not isinstance(x, Mapping):
        raise ValueError("FcosBiFPN called on an image but has no bottom_up: pass the features")
      bottom_up = BackboneWithTopLevels(
          self.out_channels, self.num_top_levels, self.norm, dtype=self.dtype, name="bottom_up"
      )
    else:
      bottom_up = self.bottom_up
      got = (bottom_up.out_channels, bottom_up.num_top_levels, bottom_up.norm)
      if got != (self.out_channels, self.num_top_levels, self.norm):
        raise ValueError(
            f"FcosBiFPN: bottom_up (out_channels, num_top_levels, norm) = {got}, expected "
            f"{(self.out_channels, self.num_top_levels, self.norm)}"
        )
    features = bottom_up(x, canvas_hw)
    prefix, last = split_name(names[-1])
    names += [f"{prefix}{last + i + 1}" for i in range(self.num_top_levels)]
    feats = []
    for name in names:
      f = features[name]
      if name in channels and f.shape[-1] != channels[name]:
        raise ValueError(f"FcosBiFPN: {name} has {f.shape[-1]} channels, expected {channels[name]}")
      feats.append(f.astype(self.dtype))
    for level in range(num_levels - 1):
      hw, coarser = feats[level].shape[1:3], feats[level + 1].shape[1:3]
      if hw[0] != 2 * coarser[0] or hw[1] != 2 * coarser[1]:
        raise ValueError(
            f"FcosBiFPN: level sizes {[t.shape[1:3] for t in feats]} are not exact halvings: the "
            f"input size must be a multiple of {self.size_divisibility}"
        )
    strides = self.strides
    for i in range(self.num_bifpn):
      feats = SingleBiFPN(
          self.out_channels, self.norm, dtype=self.dtype, name=f"repeated_bifpn.{i}"
      )(feats, strides, canvas_hw)
    return feats


# ----------------------------------------------------------------------------------------------
# The registered builders.
# ----------------------------------------------------------------------------------------------
DLA_IN_FEATURES = ("dla3", "dla4", "dla5")  # MODEL.FPN.IN_FEATURES of the DLA yamls
DLA_IN_CHANNELS = (128, 256, 512)  # DLA-34
RESNET_IN_FEATURES = ("res3", "res4", "res5")  # MODEL.FPN.IN_FEATURES of Base-CenterNet2.yaml


def _fcos_bifpn(model_config, bottom_up_net, in_features, in_channels, num_top_levels, dtype):
  bf = model_config.bifpn
  return FcosBiFPN(
      in_features=in_features,
      in_channels=in_channels,
      out_channels=bf.out_channels,
      num_bifpn=bf.num_bifpn,
      num_top_levels=num_top_levels,
      norm=bf.norm,
      bottom_up=BackboneWithTopLevels(
          bf.out_channels, num_top_levels, bf.norm, backbone=bottom_up_net, dtype=dtype
      ),
      dtype=dtype,
  )


def _dla(model_config, dtype) -> DLA:
  return DLA(norm=model_config.dla.norm, dtype=dtype)  # dlafpn.py dla34(cfg): no ImageNet fc


def _resnet(model_config, dtype) -> Tuple[ResNet, Tuple[int, ...]]:
  """detectron2 `build_resnet_backbone` (`model.resnet_*`) with res3-res5 out, and their channels."""
  net = ResNet(
      depth=model_config.resnet_depth,
      stride_in_1x1=model_config.stride_in_1x1,
      norm=model_config.resnet_norm,
      conv_init="c2_msra",  # detectron2's ResNet init
      freeze_at=model_config.freeze_at,
      out_features=RESNET_IN_FEATURES,
      width=model_config.resnet_width,
      dtype=dtype,
      num_groups=model_config.resnet_num_groups,
      width_per_group=model_config.resnet_width_per_group,
      deform_on_per_stage=tuple(model_config.resnet_deform_on_per_stage),
      deform_modulated=model_config.resnet_deform_modulated,
      deform_num_groups=model_config.resnet_deform_num_groups,
      remat=model_config.remat,
  )
  channels = resnet_out_channels(model_config.resnet_depth, model_config.resnet_width)
  return net, tuple(channels[n] for n in RESNET_IN_FEATURES)


def _nothing_frozen(model_config) -> tuple:
  return ()  # the DLA of dlafpn.py has no FREEZE_AT: every parameter trains


def _resnet_frozen(model_config) -> tuple:
  # FREEZE_AT of the ResNet, which sits at backbone.bottom_up.backbone.*
  return resnet_frozen_prefixes(model_config.freeze_at, prefix="bottom_up.backbone.")


@register("build_p37_fcos_dla_bifpn_backbone", frozen_param_prefixes=_nothing_frozen)
def build_p37_fcos_dla_bifpn_backbone(model_config, dtype) -> FcosBiFPN:
  """DLA-34 dla3-dla5 + dla6/dla7 + fcos BiFPN -> P3-P7 (CenterNet2_DLA-fcosBiFPN-P5_640_16x_ST)."""
  if model_config.bifpn.num_levels != 5:  # the official builder asserts NUM_LEVELS == 5
    raise ConfigError(
        f"build_p37_fcos_dla_bifpn_backbone needs model.bifpn.num_levels=5, got "
        f"{model_config.bifpn.num_levels}"
    )
  return _fcos_bifpn(
      model_config, _dla(model_config, dtype), DLA_IN_FEATURES, DLA_IN_CHANNELS, 2, dtype
  )


@register("build_p35_fcos_dla_bifpn_backbone", frozen_param_prefixes=_nothing_frozen)
def build_p35_fcos_dla_bifpn_backbone(model_config, dtype) -> FcosBiFPN:
  """DLA-34 dla3-dla5 + fcos BiFPN -> P3-P5 (CenterNet2_DLA-BiFPN-P3_4x / _24x). Like the
  official builder it ignores model.bifpn.num_levels (the yamls say 3)."""
  return _fcos_bifpn(
      model_config, _dla(model_config, dtype), DLA_IN_FEATURES, DLA_IN_CHANNELS, 0, dtype
  )


@register("build_fcos_resnet_bifpn_backbone", frozen_param_prefixes=_resnet_frozen)
def build_fcos_resnet_bifpn_backbone(model_config, dtype) -> FcosBiFPN:
  """ResNet (`model.resnet_*`) res3-res5 + res6/res7 + fcos BiFPN -> P3-P7 (no official yaml)."""
  net, channels = _resnet(model_config, dtype)
  return _fcos_bifpn(model_config, net, RESNET_IN_FEATURES, channels, 2, dtype)


@register("build_p35_fcos_resnet_bifpn_backbone", frozen_param_prefixes=_resnet_frozen)
def build_p35_fcos_resnet_bifpn_backbone(model_config, dtype) -> FcosBiFPN:
  """ResNet res3-res5 + fcos BiFPN -> P3-P5 (no official yaml)."""
  net, channels = _resnet(model_config, dtype)
  return _fcos_bifpn(model_config, net, RESNET_IN_FEATURES, channels, 0, dtype)
