"""FPN on ResNet res3-res5 with P6/P7 from P5 (CenterNet2 `build_p67_resnet_fpn_backbone`).

docs/centernet2.md §2.3. Module/variable names follow detectron2's `FPN` + CenterNet2's
`LastLevelP6P7_P5`, so with the caller naming this module `backbone` the paths are
`backbone.bottom_up.*`, `backbone.fpn_lateral{3,4,5}.{kernel,bias}`,
`backbone.fpn_output{3,4,5}.{kernel,bias}`, `backbone.top_block.p6.{kernel,bias}`,
`backbone.top_block.p7.{kernel,bias}`.

Forward (detectron2 `FPN.forward`, FUSE_TYPE='sum'):
  prev = lateral5(c5); P5 = output5(prev)
  for l in 4, 3: prev = lateral_l(c_l) + nearest_up2(prev); P_l = output_l(prev)
  P6 = p6(P5); P7 = p7(relu(P6))            (3x3 s2 p1: size n -> floor((n - 1) / 2) + 1)
All FPN convs: c2_xavier_fill, bias 0; bias only when `fpn_norm == ''` (the CenterNet2 config).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cn2_jax.modeling.backbone.build import register
from cn2_jax.modeling.backbone.res2net import res2net_from_config, res2net_frozen
from cn2_jax.modeling.backbone.resnet import ResNet
from cn2_jax.modeling.backbone.resnet import frozen_param_prefixes as resnet_frozen_prefixes
from cn2_jax.modeling.canvas import zero_outside_canvas
from cn2_jax.modeling.layers import Conv2d, c2_xavier_fill

Dtype = Any


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
  """torch `F.interpolate(x, scale_factor=2.0, mode='nearest')` on NHWC (out[i] = in[i // 2])."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class LastLevelP6P7_P5(nn.Module):  # noqa: N801 (detectron2/CenterNet2 class name)
  """CenterNet2's top block: P6 = p6(P5), P7 = p7(relu(P6)); 3x3 s2 p1 convs with bias."""

  out_channels: int
  dtype: Dtype

  @nn.compact
  def __call__(self, p5: jax.Array, canvas_hw: Optional[jax.Array] = None) -> List[jax.Array]:
    conv = lambda name: Conv2d(  # noqa: E731
        self.out_channels,
        kernel_size=3,
        strides=2,
        padding=1,
        use_bias=True,
        kernel_init=c2_xavier_fill,
        bias_init=nn.initializers.zeros,
        dtype=self.dtype,
        name=name,
    )
    p6 = conv("p6")(zero_outside_canvas(p5, canvas_hw, 32))
    p7 = conv("p7")(zero_outside_canvas(nn.relu(p6), canvas_hw, 64))
    return [p6, p7]


class FPN(nn.Module):
  """A bottom-up network + FPN (P3-P7). Name the instance `backbone` in the detector.

  Attributes (all required; `build_p67_resnet_fpn_backbone` passes them from `config.model`):
    bottom_up: the bottom-up module (a ResNet here, another network with the same outputs
      elsewhere); `bottom_up(x, canvas_hw)` -> {'res3', 'res4', 'res5'} at strides 8, 16, 32.
      As a field it becomes the child `bottom_up` (paths `backbone.bottom_up.*`).
    out_channels: FPN channels.
    fpn_norm: norm of the lateral/output convs ('' in CenterNet2; with a norm the convs have no
      bias, as in detectron2).
    dtype: compute dtype.

  `__call__(x, canvas_hw=None)`: normalised image `[N, H, W, 3]` with H, W multiples of 32 ->
  `[P3, P4, P5, P6, P7]` (NHWC, `out_channels` channels, strides `FPN.strides`). With the official
  canvas `canvas_hw` (`[2]`), every 3x3 conv input is zeroed off it, so the values on it equal
  the official ones whatever the padding (`canvas.zero_outside_canvas`).
  `forward_features(features)`: the same from a dict {'res3', 'res4', 'res5'} of bottom-up maps.
  """

  bottom_up: nn.Module
  out_channels: int
  fpn_norm: str
  dtype: Dtype

  # Class constants (not dataclass fields): the architecture, not settings.
  in_features = ("res3", "res4", "res5")
  strides = (8, 16, 32, 64, 128)  # P3..P7
  min_level = 3  # log2(strides[0])
  size_divisibility = 32

  def setup(self):
    lat = lambda: Conv2d(  # noqa: E731
        self.out_channels,
        kernel_size=1,
        strides=1,
        padding=0,
        use_bias=self.fpn_norm == "",
        norm=self.fpn_norm,
        kernel_init=c2_xavier_fill,
        dtype=self.dtype,
    )
    out = lambda: Conv2d(  # noqa: E731
        self.out_channels,
        kernel_size=3,
        strides=1,
        padding=1,
        use_bias=self.fpn_norm == "",
        norm=self.fpn_norm,
        kernel_init=c2_xavier_fill,
        dtype=self.dtype,
    )
    self.fpn_lateral3 = lat()
    self.fpn_output3 = out()
    self.fpn_lateral4 = lat()
    self.fpn_output4 = out()
    self.fpn_lateral5 = lat()
    self.fpn_output5 = out()
    self.top_block = LastLevelP6P7_P5(self.out_channels, dtype=self.dtype)

  def __call__(self, x: jax.Array, canvas_hw: Optional[jax.Array] = None) -> List[jax.Array]:
    h, w = x.shape[1], x.shape[2]
    if h % self.size_divisibility or w % self.size_divisibility:
      raise ValueError(
          f"FPN input size {(h, w)} must be a multiple of {self.size_divisibility} "
          "(pad the batch; detectron2 pads to the res5 stride)"
      )
    return self.forward_features(self.bottom_up(x, canvas_hw), canvas_hw)

  def forward_features(
      self, features: Dict[str, jax.Array], canvas_hw: Optional[jax.Array] = None
  ) -> List[jax.Array]:
    laterals = {3: self.fpn_lateral3, 4: self.fpn_lateral4, 5: self.fpn_lateral5}
    outputs = {3: self.fpn_output3, 4: self.fpn_output4, 5: self.fpn_output5}
    prev = laterals[5](features["res5"])
    results = [outputs[5](zero_outside_canvas(prev, canvas_hw, 32))]
    for level in (4, 3):
      lateral = laterals[level](features[f"res{level}"])
      top_down = upsample_nearest_2x(prev)
      if top_down.shape[1:3] != lateral.shape[1:3]:
        # detectron2 would fail here too (F.interpolate x2 + add needs exact 2x sizes).
        raise ValueError(
            f"FPN top-down size {top_down.shape[1:3]} != lateral size {lateral.shape[1:3]} at "
            f"level {level}: input sizes must be multiples of {self.size_divisibility}"
        )
      prev = lateral + top_down
      results.insert(0, outputs[level](zero_outside_canvas(prev, canvas_hw, 2**level)))
    results.extend(self.top_block(results[-1], canvas_hw))  # P6 from the P5 *output*
    return results


def resnet_fpn(
    *,
    depth: int,
    stride_in_1x1: bool,
    freeze_at: int,
    norm: str,
    width: int,
    num_groups: int,
    width_per_group: int,
    deform_on_per_stage,
    deform_modulated: bool,
    deform_num_groups: int,
    out_channels: int,
    fpn_norm: str,
    dtype: Dtype,
    remat: bool = False,
) -> FPN:
  """ResNet + FPN P3-P7 (CenterNet2 `build_p67_resnet_fpn_backbone`); the ResNet settings are
  those of `ResNet` (norm = the ResNet's norm; `remat`: a performance knob, see `ResNet`)."""
  bottom_up = ResNet(
      depth=depth,
      stride_in_1x1=stride_in_1x1,
      norm=norm,
      conv_init="c2_msra",  # detectron2's ResNet init
      width=width,
      freeze_at=freeze_at,
      out_features=FPN.in_features,
      num_groups=num_groups,
      width_per_group=width_per_group,
      deform_on_per_stage=tuple(deform_on_per_stage),
      deform_modulated=deform_modulated,
      deform_num_groups=deform_num_groups,
      dtype=dtype,
      remat=remat,
  )
  return FPN(bottom_up=bottom_up, out_channels=out_channels, fpn_norm=fpn_norm, dtype=dtype)


def _resnet_frozen(model_config) -> tuple:
  return resnet_frozen_prefixes(model_config.freeze_at, prefix="bottom_up.")


@register("build_p67_resnet_fpn_backbone", frozen_param_prefixes=_resnet_frozen)
def build_p67_resnet_fpn_backbone(model_config, dtype) -> FPN:
  """`config.model`'s resnet_* / fpn_* settings -> ResNet-FPN P3-P7."""
  return resnet_fpn(
      depth=model_config.resnet_depth,
      stride_in_1x1=model_config.stride_in_1x1,
      freeze_at=model_config.freeze_at,
      norm=model_config.resnet_norm,
      width=model_config.resnet_width,
      num_groups=model_config.resnet_num_groups,
      width_per_group=model_config.resnet_width_per_group,
      deform_on_per_stage=model_config.resnet_deform_on_per_stage,
      deform_modulated=model_config.resnet_deform_modulated,
      deform_num_groups=model_config.resnet_deform_num_groups,
      out_channels=model_config.fpn_channels,
      fpn_norm=model_config.fpn_norm,
      dtype=dtype,
      remat=model_config.remat,
  )


@register("build_p67_res2net_fpn_backbone", frozen_param_prefixes=res2net_frozen)
def build_p67_res2net_fpn_backbone(model_config, dtype) -> FPN:
  """Res2Net (`model.resnet_*`) + FPN P3-P7 (CenterNet2_R2-101-DCN_896_4x)."""
  return FPN(
      bottom_up=res2net_from_config(model_config, dtype),
      out_channels=model_config.fpn_channels,
      fpn_norm=model_config.fpn_norm,
      dtype=dtype,
  )
