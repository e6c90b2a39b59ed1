"""ResNet-18/34/50/101 / ResNeXt / deformable ResNet bottom-up backbone, structured and named like
detectron2's `resnet.py` (`build_resnet_backbone`); the one ResNet of both families.

docs/centernet2.md §2.2, docs/onestage.md §2.2. Variable paths (relative to this module) follow
detectron2's state-dict keys, e.g. `stem.conv1.kernel`, `stem.conv1.norm.running_var` (collection
`frozen`), `res2.0.conv1.kernel`, `res3.0.shortcut.kernel` (docs/DESIGN.md, "Parameter naming").

The two families use it with different settings:
  * CenterNet2 (detectron2): `norm` "FrozenBN" (or "GN" / ""), `stride_in_1x1` True for the
    MSRA weights, `conv_init` "c2_msra", outputs res3..res5 for the FPN, and the official canvas
    (`canvas_hw`), ResNeXt groups and deformable stages as configured;
  * one-stage centerX (torchvision ResNet): `norm` "BN" / "SyncBN" (trainable BatchNorm,
    `layers.BatchNorm`, running statistics in `batch_stats`; `train_bn` at call time),
    `stride_in_1x1` False, `conv_init` "torch", out_features ("res5",) (C5), and the official
    canvas unless `model.onestage.mask_canvas` is False (BatchNorm statistics on it).
  torchvision's names map one-to-one onto these (detectron2's convert-torchvision-to-d2 rules,
  `weights/rename.py`): `conv1`/`bn1` -> `stem.conv1`/`stem.conv1.norm`, `layer<k>.<i>` ->
  `res<k+1>.<i>`, `bn<t>` -> `conv<t>.norm`, `downsample.0`/`.1` -> `shortcut`/`shortcut.norm`.

* `BasicStem` (`stem`): conv1 7x7 s2 p3 (no bias) + norm, ReLU, max-pool 3x3 s2 p1 (torch semantics:
  implicit -inf padding, floor output size).
* Stages `res2`..`res5`, blocks named `0`, `1`, ...; the first block of res3..res5 has stride 2.
* `BottleneckBlock` (R50/101): conv1 1x1, conv2 3x3 p1, conv3 1x1, each + norm; ReLU after conv1,
  conv2 and after the residual add. With `stride_in_1x1=True` (MSRA/caffe weights) the stride sits
  on conv1, otherwise (torchvision style) on conv2. ResNeXt (`num_groups` > 1): conv2 is a grouped
  conv (kernel `[3, 3, bottleneck / num_groups, bottleneck]`), and the bottleneck width is
  `num_groups * width_per_group` (x2 per stage), e.g. 32 x 8 = 256 in res2 of X101-32x8d.
* `DeformBottleneckBlock` (stages in `deform_on_per_stage`): as `BottleneckBlock`, but conv2 is a
  deformable conv (`ops.dcn.deform_conv2d`; modulated DCNv2 when `deform_modulated`) with the same
  groups, no bias, + norm, whose offsets (and mask logits) come from `conv2_offset`, a plain 3x3
  conv with bias (same stride/padding as conv2, zero-initialised as in detectron2) on conv2's
  input: 18 (DCNv1) or 27 (DCNv2) channels per deformable group. detectron2 splits them
  `offset_x, offset_y, mask = chunk(.., 3)` and re-concatenates `cat(offset_x, offset_y)`, an
  identity on the first 2/3 of the channels, which are already in the layout the kernel reads
  (channel 2k = dy, 2k + 1 = dx of tap k); the last third is the mask logits (sigmoid).
* `BasicBlock` (R18/34): conv1 3x3 (stride) p1, conv2 3x3 p1, each + norm.
* `shortcut` is a 1x1 conv (with the block's stride) + norm when the channel count or the stride
  changes (in detectron2's standard configurations the two coincide), identity otherwise.
* All convs have no bias (detectron2 always builds ResNet convs with `bias=False`) and use
  `c2_msra_fill` (`conv_init="c2_msra"`) or torch's default `nn.Conv2d` init (`conv_init="torch"`,
  `layers.torch_conv_init`: centerX's ResNet sets no init of its own).

`freeze_at` (detectron2 `ResNet.freeze`): 0 freezes nothing, 1 the stem, k >= 2 the stem and
res2..res<k>. The freeze is implemented with `jax.lax.stop_gradient` on the output of every frozen
stage, so the frozen parameters receive exactly zero gradient; the optimizer must additionally
exclude `frozen_param_prefixes(freeze_at)` from weight decay / updates. Trainable BatchNorm
("BN" / "SyncBN") needs freeze_at 0 (detectron2 turns frozen stages' BN into FrozenBN instead).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cn2_jax.modeling import export_mode
from cn2_jax.modeling.canvas import canvas_mask, zero_outside_canvas
from cn2_jax.modeling.layers import (
    BATCH_NORMS,
    BatchNormSettings,
    Conv2d,
    c2_msra_fill,
    norm_after_conv,
    torch_conv_init,
)
from cn2_jax.modeling.ops.dcn import deform_conv2d

Dtype = Any

# depth -> (block type, number of blocks per stage res2..res5)
BLOCKS_BY_DEPTH = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
STAGE_NAMES = ("res2", "res3", "res4", "res5")
# conv_init -> kernel initialiser of every ResNet conv
CONV_INITS = {"c2_msra": c2_msra_fill, "torch": torch_conv_init}
_FEATURE_STRIDES = {"stem": 4, "res2": 4, "res3": 8, "res4": 16, "res5": 32}


def resnet_out_channels(depth: int, width: int = 64) -> Dict[str, int]:
  """Output channels of `stem` and `res2`..`res5` for a ResNet of this depth.

  `width` is detectron2's STEM_OUT_CHANNELS = WIDTH_PER_GROUP (64 in every official model); every
  stage scales with it, which gives narrow ResNets for tests and the CPU demo.
  """
  if depth not in BLOCKS_BY_DEPTH:
    raise ValueError(f"ResNet depth must be one of {sorted(BLOCKS_BY_DEPTH)}, got {depth}")
  base = width if BLOCKS_BY_DEPTH[depth][0] == "basic" else 4 * width
  out = {"stem": width}
  for i, name in enumerate(STAGE_NAMES):
    out[name] = base * 2**i
  return out


def resnet_feature_strides() -> Dict[str, int]:
  """Stride of `stem` and `res2`..`res5` with respect to the input image."""
  return dict(_FEATURE_STRIDES)


def frozen_param_prefixes(freeze_at: int, prefix: str = "") -> Tuple[str, ...]:
  """'.'-joined variable-path prefixes (relative to the ResNet module, optionally prefixed by
  `prefix`, e.g. 'backbone.bottom_up.') of the stages frozen by `freeze_at`.

  freeze_at=0 -> (), 1 -> ('stem',), 2 -> ('stem', 'res2'), ..., 5 -> all stages.
  A path P belongs to a prefix Q when P == Q or P starts with Q + '.'.
  """
  if freeze_at < 0:
    raise ValueError(f"freeze_at must be >= 0, got {freeze_at}")
  names = []
  if freeze_at >= 1:
    names.append("stem")
  for k in range(2, min(freeze_at, 5) + 1):
    names.append(f"res{k}")
  return tuple(prefix + n for n in names)


def _pool_window_views(xp: jax.Array, out_hw: Tuple[int, int]):
  """The 9 strided views of the padded input, one per window position (row-major: the order
  torch scans a window)."""
  ho, wo = out_hw
  for di in range(3):
    for dj in range(3):
      yield di, dj, xp[:, di : di + 2 * (ho - 1) + 1 : 2, dj : dj + 2 * (wo - 1) + 1 : 2, :]


@jax.custom_vjp
def max_pool_3x3_s2_p1(x: jax.Array) -> jax.Array:
  """torch `F.max_pool2d(x, 3, stride=2, padding=1)` on NHWC: -inf padding, floor output size.

  The gradient goes to the first maximum of each window in row-major order (torch's rule, and
  XLA's select-and-scatter), but is computed as 9 strided views and interior-padded adds: XLA CPU's
  select-and-scatter took ~20x the forward's time (47 ms against 2.3 ms for [8, 96, 96, 16]),
  most of a small one-stage model's backward pass."""
  # A concrete (numpy) -inf init lets JAX lower this to reduce_window_max.
  init = np.array(-np.inf, dtype=x.dtype)
  return jax.lax.reduce_window(
      x,
      init,
      jax.lax.max,
      window_dimensions=(1, 3, 3, 1),
      window_strides=(1, 2, 2, 1),
      padding=((0, 0), (1, 1), (1, 1), (0, 0)),
  )


def _max_pool_fwd(x):
  y = max_pool_3x3_s2_p1(x)
  return y, (x, y)


def _max_pool_bwd(res, g):
  x, y = res
  h, w = x.shape[1:3]
  ho, wo = y.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  hp, wp = h + 2, w + 2
  taken = jnp.zeros(y.shape, bool)
  zero = jnp.zeros((), g.dtype)
  dxp = jnp.zeros(xp.shape, g.dtype)
  for di, dj, view in _pool_window_views(xp, (ho, wo)):
    sel = (view == y) & ~taken
    taken = taken | sel
    part = jnp.where(sel, g, zero)
    # back to the padded input grid: element (i, j) -> (di + 2 i, dj + 2 j)
    dxp = dxp + jax.lax.pad(
        part,
        zero,
        (
            (0, 0, 0),
            (di, hp - di - 2 * (ho - 1) - 1, 1),
            (dj, wp - dj - 2 * (wo - 1) - 1, 1),
            (0, 0, 0),
        ),
    )
  return (dxp[:, 1 : h + 1, 1 : w + 1, :],)


max_pool_3x3_s2_p1.defvjp(_max_pool_fwd, _max_pool_bwd)
# Inside export_mode.onnx_ops() (an ONNX conversion): -inf padding + a 2-D max-pool.
max_pool_3x3_s2_p1 = export_mode.onnx_form(export_mode.max_pool_3x3_s2_p1_for_onnx)(
    max_pool_3x3_s2_p1
)


class DeformConv(nn.Module):
  """detectron2 `ModulatedDeformConv` / `DeformConv` as `DeformBottleneckBlock.conv2` builds it:
  a deformable 3x3 conv (`ops.dcn.deform_conv2d`) with kernel `[3, 3, Cin / groups, features]`,
  no bias, `CONV_INITS[conv_init]` init, followed by the optional `norm` sub-module.

  Call: `x [N, H, W, Cin]`, `offset [N, Ho, Wo, 2 G 9]`, `mask [N, Ho, Wo, G 9]` (sigmoided) or
  None (DCNv1), G = `deformable_groups` -> `[N, Ho, Wo, features]` in `dtype`."""

  features: int
  strides: int
  groups: int
  deformable_groups: int
  norm: str
  conv_init: str
  dtype: Dtype
  batch_norm: Optional[BatchNormSettings] = None

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      offset: jax.Array,
      mask: Optional[jax.Array],
      norm_mask: Optional[jax.Array] = None,
      train_bn: bool = False,
  ) -> jax.Array:
    cin = x.shape[-1]
    if cin % self.groups or self.features % self.groups:
      raise ValueError(f"groups={self.groups} must divide Cin={cin} and features={self.features}")
    kernel = self.param(
        "kernel",
        CONV_INITS[self.conv_init],
        (3, 3, cin // self.groups, self.features),
        jnp.float32,
    )
    y = deform_conv2d(
        x.astype(self.dtype),
        offset,
        mask,
        kernel.astype(self.dtype),
        None,
        stride=self.strides,
        padding=1,
        offset_groups=self.deformable_groups,
    )
    return norm_after_conv(self.norm, self.dtype, y, norm_mask, train_bn, self.batch_norm)


def resnet_conv(
    block: nn.Module,
    features: int,
    kernel_size: int,
    stride: int,
    padding: int,
    name: str,
    groups: int = 1,
) -> nn.Module:
  """A ResNet conv inside `block` (a stem or block module with `norm`, `conv_init`, `batch_norm`
  and `dtype`): no bias, followed by `block.norm`, `CONV_INITS[block.conv_init]` init, `groups`
  weight groups (ResNeXt). Call it inside `block`'s compact method (the conv becomes its
  sub-module `name`); call the conv with `(x, norm_mask, train_bn)`."""
  return Conv2d(
      features,
      kernel_size=kernel_size,
      strides=stride,
      padding=padding,
      use_bias=False,
      norm=block.norm,
      kernel_init=CONV_INITS[block.conv_init],
      dtype=block.dtype,
      groups=groups,
      batch_norm=block.batch_norm,
      name=name,
  )


def _shortcut(
    block: nn.Module, x: jax.Array, out_mask: Optional[jax.Array], train_bn: bool
) -> jax.Array:
  """The residual branch of a block: `shortcut` 1x1 conv (the block's stride) + norm when the
  channel count or the stride changes, identity otherwise."""
  if x.shape[-1] != block.out_channels or block.stride != 1:
    conv = resnet_conv(block, block.out_channels, 1, block.stride, 0, "shortcut")
    return conv(x, out_mask, train_bn)
  return x.astype(block.dtype)


class BasicStem(nn.Module):
  """detectron2 BasicStem (= torchvision's conv1/bn1/relu/maxpool): `conv1` (7x7 s2 p3, no bias,
  norm) -> ReLU -> max-pool 3x3 s2 p1. `conv_init` / `batch_norm`: see `ResNet`."""

  out_channels: int
  norm: str
  conv_init: str
  dtype: Dtype
  batch_norm: Optional[BatchNormSettings] = None

  @nn.compact
  def __call__(
      self, x: jax.Array, canvas_hw: Optional[jax.Array] = None, train_bn: bool = False
  ) -> jax.Array:
    # The input image is already zero outside the images (detector.preprocess).
    conv1 = resnet_conv(self, self.out_channels, 7, 2, 3, "conv1")
    x = nn.relu(conv1(x, canvas_mask((x.shape[1] // 2, x.shape[2] // 2), canvas_hw, 2), train_bn))
    # Post-ReLU values are >= 0, so zeros off the canvas act like the pool's -inf padding.
    return max_pool_3x3_s2_p1(zero_outside_canvas(x, canvas_hw, 2))


def _bottleneck(block: nn.Module, x, canvas_hw, in_stride: int, train_bn: bool, conv2) -> jax.Array:
  """The body shared by `BottleneckBlock` and `DeformBottleneckBlock` (call it inside the
  block's compact method): shortcut, conv1 1x1 + norm + ReLU, `conv2(y, stride, out_mask)`
  (the 3x3 conv + norm, on its input zeroed off the canvas) + ReLU, conv3 1x1 + norm, add, ReLU.
  `train_bn`: BatchNorm norms in training mode.
  `canvas_hw`/`in_stride`: see `canvas.zero_outside_canvas` (only the 3x3 conv mixes
  neighbours; the norm masks keep GroupNorm statistics on the canvas)."""
  s1, s3 = (block.stride, 1) if block.stride_in_1x1 else (1, block.stride)
  out_stride = in_stride * block.stride
  out_hw = (-(-x.shape[1] // block.stride), -(-x.shape[2] // block.stride))
  out_mask = canvas_mask(out_hw, canvas_hw, out_stride)
  shortcut = _shortcut(block, x, out_mask, train_bn)
  mid_hw = (-(-x.shape[1] // s1), -(-x.shape[2] // s1))
  y = nn.relu(
      resnet_conv(block, block.bottleneck_channels, 1, s1, 0, "conv1")(
          x, canvas_mask(mid_hw, canvas_hw, in_stride * s1), train_bn
      )
  )
  y = zero_outside_canvas(y, canvas_hw, in_stride * s1)
  y = nn.relu(conv2(y, s3, out_mask))
  y = resnet_conv(block, block.out_channels, 1, 1, 0, "conv3")(y, out_mask, train_bn)
  return nn.relu(y + shortcut)


class BottleneckBlock(nn.Module):
  """detectron2 BottleneckBlock (dilation=1).

  Attributes:
    out_channels: output channels (4 x bottleneck_channels in the standard ResNet).
    bottleneck_channels: width of conv1/conv2.
    stride: block stride (applied on conv1 if `stride_in_1x1`, else on conv2).
    stride_in_1x1: MSRA (True) vs torchvision (False) placement of the stride.
    num_groups: groups of the 3x3 conv2 (ResNeXt cardinality; 1 = ResNet).
    norm / conv_init / batch_norm: see `ResNet`.
  """

  out_channels: int
  bottleneck_channels: int
  stride: int
  stride_in_1x1: bool
  norm: str
  conv_init: str
  dtype: Dtype
  num_groups: int
  batch_norm: Optional[BatchNormSettings] = None

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      canvas_hw: Optional[jax.Array] = None,
      in_stride: int = 1,
      train_bn: bool = False,
  ) -> jax.Array:
    """`canvas_hw`/`in_stride`: see `canvas.zero_outside_canvas`; `train_bn`: see `ResNet`."""

    def conv2(y, stride, out_mask):
      conv = resnet_conv(self, self.bottleneck_channels, 3, stride, 1, "conv2", self.num_groups)
      return conv(y, out_mask, train_bn)

    return _bottleneck(self, x, canvas_hw, in_stride, train_bn, conv2)


class DeformBottleneckBlock(nn.Module):
  """detectron2 DeformBottleneckBlock (dilation=1): `BottleneckBlock` whose conv2 is deformable.

  Sub-modules (names = detectron2 keys): `conv1`, `conv2_offset` (3x3 conv with bias, no norm,
  `offset_channels * deform_num_groups` outputs with 27 (modulated) or 18 offset channels),
  `conv2` (`DeformConv`: kernel `[3, 3, bottleneck / num_groups, bottleneck]` + norm), `conv3`,
  `shortcut`. Attributes as `BottleneckBlock`, plus:
    deform_modulated: DCNv2 (offsets + sigmoid mask) rather than DCNv1 (offsets only).
    deform_num_groups: deformable (offset) groups G.
  """

  out_channels: int
  bottleneck_channels: int
  stride: int
  stride_in_1x1: bool
  norm: str
  conv_init: str
  dtype: Dtype
  num_groups: int
  deform_modulated: bool
  deform_num_groups: int
  batch_norm: Optional[BatchNormSettings] = None

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      canvas_hw: Optional[jax.Array] = None,
      in_stride: int = 1,
      train_bn: bool = False,
  ) -> jax.Array:
    """`canvas_hw`/`in_stride`: see `canvas.zero_outside_canvas` (conv2_offset and the DCN read
    the same input, zeroed off the canvas: offsets, masks and samples equal the official ones
    there, and samples beyond the canvas read zeros as beyond the official map)."""

    def conv2(y, stride, out_mask):
      n_off = 9 * self.deform_num_groups  # taps x deformable groups
      offset_mask = Conv2d(
          (3 if self.deform_modulated else 2) * n_off,
          kernel_size=3,
          strides=stride,
          padding=1,
          use_bias=True,
          kernel_init=nn.initializers.zeros,  # detectron2: constant_(conv2_offset.*, 0)
          bias_init=nn.initializers.zeros,
          dtype=self.dtype,
          name="conv2_offset",
      )(y)
      offset = offset_mask[..., : 2 * n_off]
      mask = None
      if self.deform_modulated:
        # Sigmoid in float32 even for a low-precision compute dtype (it scales every sample).
        mask = jax.nn.sigmoid(offset_mask[..., 2 * n_off :].astype(jnp.float32))
      conv = DeformConv(
          self.bottleneck_channels,
          strides=stride,
          groups=self.num_groups,
          deformable_groups=self.deform_num_groups,
          norm=self.norm,
          conv_init=self.conv_init,
          dtype=self.dtype,
          batch_norm=self.batch_norm,
          name="conv2",
      )
      return conv(y, offset, mask, out_mask, train_bn)

    return _bottleneck(self, x, canvas_hw, in_stride, train_bn, conv2)


class BasicBlock(nn.Module):
  """detectron2 (= torchvision) BasicBlock: conv1 3x3 (stride) p1 + norm, ReLU, conv2 3x3 p1 +
  norm, add, ReLU. `norm` / `conv_init` / `batch_norm`: see `ResNet`."""

  out_channels: int
  stride: int
  norm: str
  conv_init: str
  dtype: Dtype
  batch_norm: Optional[BatchNormSettings] = None

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      canvas_hw: Optional[jax.Array] = None,
      in_stride: int = 1,
      train_bn: bool = False,
  ) -> jax.Array:
    out_stride = in_stride * self.stride
    out_hw = (-(-x.shape[1] // self.stride), -(-x.shape[2] // self.stride))
    out_mask = canvas_mask(out_hw, canvas_hw, out_stride)
    shortcut = _shortcut(self, x, out_mask, train_bn)
    y = nn.relu(
        resnet_conv(self, self.out_channels, 3, self.stride, 1, "conv1")(
            zero_outside_canvas(x, canvas_hw, in_stride), out_mask, train_bn
        )
    )
    y = resnet_conv(self, self.out_channels, 3, 1, 1, "conv2")(
        zero_outside_canvas(y, canvas_hw, out_stride), out_mask, train_bn
    )
    return nn.relu(y + shortcut)


class ResNetStage(nn.Module):
  """A sequence of blocks named '0', '1', ...; the first block carries the stage stride.
  `remat`: each block is rematerialised (`nn.remat`, see `ResNet`)."""

  block: str  # "bottleneck" | "basic"
  num_blocks: int
  out_channels: int
  bottleneck_channels: int  # bottleneck blocks only
  first_stride: int
  stride_in_1x1: bool  # bottleneck blocks only
  norm: str
  conv_init: str
  dtype: Dtype
  num_groups: int  # bottleneck blocks only
  deform: bool  # DeformBottleneckBlock instead of BottleneckBlock
  deform_modulated: bool
  deform_num_groups: int
  remat: bool
  batch_norm: Optional[BatchNormSettings] = None

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      canvas_hw: Optional[jax.Array] = None,
      in_stride: int = 1,
      train_bn: bool = False,
  ) -> jax.Array:
    def block_cls(cls):
      # (self, x, canvas_hw, in_stride, train_bn): the stride and the BatchNorm mode are static
      return nn.remat(cls, static_argnums=(3, 4)) if self.remat else cls

    conv_settings = dict(
        norm=self.norm, conv_init=self.conv_init, dtype=self.dtype, batch_norm=self.batch_norm
    )
    for i in range(self.num_blocks):
      stride = self.first_stride if i == 0 else 1
      if self.block == "bottleneck":
        common = dict(
            out_channels=self.out_channels,
            bottleneck_channels=self.bottleneck_channels,
            stride=stride,
            stride_in_1x1=self.stride_in_1x1,
            num_groups=self.num_groups,
            name=str(i),
            **conv_settings,
        )
        if self.deform:
          block = block_cls(DeformBottleneckBlock)(
              deform_modulated=self.deform_modulated,
              deform_num_groups=self.deform_num_groups,
              **common,
          )
        else:
          block = block_cls(BottleneckBlock)(**common)
      else:
        block = block_cls(BasicBlock)(
            self.out_channels, stride=stride, name=str(i), **conv_settings
        )
      x = block(x, canvas_hw, in_stride, train_bn)
      in_stride *= stride
    return x


class ResNet(nn.Module):
  """detectron2 ResNet / ResNeXt bottom-up backbone (`build_resnet_backbone` with
  STEM_OUT_CHANNELS = `width`, RES2_OUT_CHANNELS = 4 `width` for R50/101 and `width` for R18/34,
  RES5_DILATION=1).

  Attributes (CenterNet2's detector passes `config.model`'s resnet_depth, stride_in_1x1,
  resnet_norm, freeze_at, resnet_width, dtype, the ResNeXt / DCN settings and the FPN's
  `in_features`; the one-stage model its own, see the module docstring):
    depth: 18, 34 (basic blocks) or 50, 101 (bottleneck blocks).
    stride_in_1x1: stride on the bottleneck's first 1x1 conv (MSRA) rather than on the 3x3
      (torchvision); basic blocks always have it on conv1.
    norm: norm of every conv: 'FrozenBN' (official CenterNet2), 'GN', '' (none), 'BN' (trainable
      BatchNorm, per-device statistics) or 'SyncBN' (statistics over `batch_norm.axis_name`).
    conv_init: kernel init of every conv: 'c2_msra' (detectron2's c2_msra_fill) or 'torch'
      (torch's nn.Conv2d default, centerX's ImageNet-initialised ResNet).
    freeze_at: detectron2 freeze semantics (see module docstring); 0 for 'BN' / 'SyncBN'.
    width: stem channels (STEM_OUT_CHANNELS; 64 = every official ResNet); the res2 output has
      4 `width` channels (bottleneck) or `width` (basic blocks).
    out_features: subset of ('stem', 'res2', 'res3', 'res4', 'res5') to return. As in detectron2,
      stages after the last requested one are not built.
    dtype: compute dtype.
    num_groups: NUM_GROUPS, groups of every bottleneck 3x3 conv (1 = ResNet, 32 = ResNeXt-32xNd).
    width_per_group: WIDTH_PER_GROUP; the res2 bottleneck width is `num_groups * width_per_group`,
      doubled per stage. None (or 0) means `width` (detectron2's default WIDTH_PER_GROUP = 64 =
      STEM_OUT_CHANNELS), which keeps the ResNets' bottleneck = `width` and lets tiny test
      models scale with `width` alone. X101-32x8d: num_groups 32, width_per_group 8.
    deform_on_per_stage: DEFORM_ON_PER_STAGE, 4 bools for res2..res5: deformable 3x3 convs
      (`DeformBottleneckBlock`) in every block of those stages (bottleneck ResNets only).
    deform_modulated: DEFORM_MODULATED, DCNv2 (offsets + mask) rather than DCNv1.
    deform_num_groups: DEFORM_NUM_GROUPS, deformable (offset) groups.
    batch_norm: momentum, eps and SyncBN axis of 'BN' / 'SyncBN' (`layers.BatchNormSettings`);
      required by them, unused by the other norms.
    remat: rematerialise the trainable part (`config.model.remat`, a memory / compute trade,
      values unchanged): the stem (when trained) and every block of the trained stages keep only
      their input for the backward pass and recompute their activations there (`nn.remat`), so
      the activations of one block at a time are live instead of the whole network's.

  Input: normalised float image `[N, H, W, 3]`, optionally the official canvas `canvas_hw` `[2]`
  (see `canvas.zero_outside_canvas`; it also restricts GroupNorm / BatchNorm statistics) and
  `train_bn` (BatchNorm norms
  normalise with the batch statistics and update the running ones in `batch_stats`; False = eval
  mode). Output: dict name -> `[N, H/s, W/s, C]` for `out_features`.
  """

  depth: int
  stride_in_1x1: bool
  norm: str
  conv_init: str
  freeze_at: int
  out_features: Sequence[str]
  width: int
  dtype: Dtype
  num_groups: int
  width_per_group: int
  deform_on_per_stage: Sequence[bool]
  deform_modulated: bool
  deform_num_groups: int
  batch_norm: Optional[BatchNormSettings] = None
  remat: bool = False  # a performance knob (memory for compute); False: every activation is kept

  @nn.compact
  def __call__(
      self, x: jax.Array, canvas_hw: Optional[jax.Array] = None, train_bn: bool = False
  ) -> Dict[str, jax.Array]:
    if self.depth not in BLOCKS_BY_DEPTH:
      raise ValueError(f"ResNet depth must be one of {sorted(BLOCKS_BY_DEPTH)}, got {self.depth}")
    if len(self.deform_on_per_stage) != 4:
      raise ValueError(
          f"deform_on_per_stage needs 4 entries (res2..res5), got {self.deform_on_per_stage}"
      )
    if self.num_groups < 1 or self.deform_num_groups < 1:
      raise ValueError(
          f"num_groups ({self.num_groups}) and deform_num_groups ({self.deform_num_groups}) "
          "must be >= 1"
      )
    if x.ndim != 4:
      raise ValueError(f"ResNet takes [N, H, W, C] inputs, got shape {x.shape}")
    for f in self.out_features:
      if f not in _FEATURE_STRIDES:
        raise ValueError(f"unknown ResNet out_feature {f!r}")
    if self.conv_init not in CONV_INITS:
      raise ValueError(
          f"ResNet conv_init must be one of {sorted(CONV_INITS)}, got {self.conv_init!r}"
      )
    if self.norm in BATCH_NORMS and self.freeze_at:
      raise ValueError(
          f"freeze_at={self.freeze_at} with trainable BatchNorm ({self.norm!r}): not implemented "
          "(detectron2 turns frozen stages' BatchNorm into FrozenBN)"
      )
    block, num_blocks = BLOCKS_BY_DEPTH[self.depth]
    if block == "basic" and (self.num_groups != 1 or any(self.deform_on_per_stage)):
      # detectron2 asserts the same for R18/R34.
      raise ValueError("ResNet-18/34 (basic blocks) support neither num_groups > 1 nor DCN")
    channels = resnet_out_channels(self.depth, self.width)
    per_group = self.width_per_group or self.width  # None / 0: detectron2's 64 = STEM width
    res2_bottleneck = self.num_groups * per_group
    order = ("stem",) + STAGE_NAMES
    last = max(order.index(f) for f in self.out_features)

    conv_settings = dict(
        norm=self.norm, conv_init=self.conv_init, dtype=self.dtype, batch_norm=self.batch_norm
    )
    outputs = {}
    # (self, x, canvas_hw, train_bn): the BatchNorm mode is static
    stem = (
        nn.remat(BasicStem, static_argnums=(3,)) if self.remat and not self.freeze_at else BasicStem
    )
    x = stem(channels["stem"], name="stem", **conv_settings)(x, canvas_hw, train_bn)
    if self.freeze_at >= 1:
      x = jax.lax.stop_gradient(x)
    if "stem" in self.out_features:
      outputs["stem"] = x
    for idx in range(1, last + 1):
      name = order[idx]
      stage_num = idx + 1  # res2 -> 2
      x = ResNetStage(
          block=block,
          num_blocks=num_blocks[idx - 1],
          out_channels=channels[name],
          bottleneck_channels=res2_bottleneck * 2 ** (idx - 1),
          first_stride=1 if name == "res2" else 2,
          stride_in_1x1=self.stride_in_1x1,
          num_groups=self.num_groups,
          deform=bool(self.deform_on_per_stage[idx - 1]),
          deform_modulated=self.deform_modulated,
          deform_num_groups=self.deform_num_groups,
          remat=self.remat and self.freeze_at < stage_num,  # a frozen stage has no backward
          name=name,
          **conv_settings,
      )(x, canvas_hw, _FEATURE_STRIDES[order[idx - 1]], train_bn)
      if self.freeze_at >= stage_num:
        x = jax.lax.stop_gradient(x)
      if name in self.out_features:
        outputs[name] = x
    return outputs
