"""Res2Net bottom-up backbone (with optional modulated DCN), as CenterNet2's `res2net.py`.

Follows `centernet/modeling/backbone/res2net.py` of xingyizhou/CenterNet2 (`BasicStem`,
`BottleneckBlock`, `DeformBottleneckBlock`, `ResNet`, `build_res2net_backbone`), the bottom-up
network of CenterNet2_R2-101-DCN-BiFPN_1280_4x and CenterNet2_R2-101-DCN_896_4x (RESNETS.DEPTH
101, WIDTH_PER_GROUP 26, DEFORM_ON_PER_STAGE [F, F, T, T], DEFORM_MODULATED True; every other
RESNETS key at its detectron2 default: NUM_GROUPS 1, NORM FrozenBN, STEM_OUT_CHANNELS 64,
RES2_OUT_CHANNELS 256, STRIDE_IN_1X1 True, RES5_DILATION 1, DEFORM_NUM_GROUPS 1; the scale is
hard-coded to 4 in `build_res2net_backbone`).

Variable paths (relative to this module; `backbone.bottom_up.` in the detector) are the official
state-dict keys under the naming contract of docs/DESIGN.md (conv `weight` -> `kernel` HWIO,
FrozenBatchNorm statistics in the `frozen` collection):

* `stem.conv1.{0,3,6}.kernel` (3x3 convs 3->32 s2, 32->32, 32->64, no bias; an `nn.Sequential`,
  hence the indices), `stem.conv1.{1,4}.*` and `stem.bn1.*` (FrozenBN, weight/bias/running_*).
* `res{2..5}.{b}.conv1.kernel` + `.conv1.norm.*` (1x1, FrozenBN), `.convs.{i}.kernel` (the split
  3x3 convs, no bias; a `DeformConv2d` in deformable stages) with `.bns.{i}.*` (FrozenBN),
  `.conv2_offsets.{i}.kernel` (deformable stages only: 3x3 offset/mask conv WITHOUT bias),
  `.conv3.kernel` + `.conv3.norm.*`, and in the first block of a stage (in != out channels)
  `.shortcut.1.kernel` + `.shortcut.1.norm.*` (`shortcut.0` is a parameter-free AvgPool2d).

Forward (official semantics):
  stem: conv1.0 s2 -> FrozenBN -> ReLU -> conv1.3 -> FrozenBN -> ReLU -> conv1.6 -> bn1 -> ReLU
    -> max-pool 3x3 s2 p1 (stride 4, 64 channels).
  Bottle2neck block (bottleneck B = groups * width_per_group * scale, split width w = B / scale):
    out = ReLU(conv1(x))               1x1 (+FrozenBN), carries the block stride (STRIDE_IN_1X1)
    spx = split(out, w)                `scale` splits
    for i < scale - 1:                 (1 split conv when scale == 1)
      sp = spx[i] if (i == 0 or in != out channels) else sp + spx[i]
      sp = ReLU(bns[i](convs[i](sp)))  3x3 p1 conv, or modulated DCN with offsets / mask from
                                       conv2_offsets[i](sp): channels [0, 18G) are the offsets in
                                       the kernel's (dy, dx)-per-tap order (the official
                                       chunk/cat is an identity reordering), [18G, 27G) the mask
                                       logits (sigmoid)
    out = cat(sp_0, .., sp_{scale-2}, spx[scale-1])   the last split passes unchanged
    y = ReLU(conv3(out) + shortcut)    conv3 1x1 + FrozenBN
    shortcut = FrozenBN(conv1x1(AvgPool2d(stride, stride, ceil_mode=True,
               count_include_pad=False)(x))) when in != out channels, else x.
  Stages res2..res5 have 3, 4, 23, 3 blocks (R101; 3, 4, 6, 3 for R50) with first strides
  1, 2, 2, 2; channels double per stage.

Canvas (`cn2_jax/modeling/canvas.py`): with `canvas_hw`, the input of every op that mixes
neighbours (stem convs, max-pool, split convs, offset convs, DCNs, the shortcut average pool) is
zeroed off the official canvas, and the average pool divides by the number of ON-canvas elements
of its window (count_include_pad=False with ceil_mode: a window cut by the border of the official
map averages only its inside elements). A DCN sample beyond the official map is 0 officially and
reads only zeroed pixels here, so the values on the canvas equal the official ones.

Not supported (ValueError): NUM_GROUPS != 1, a norm other than FrozenBN, RES5_DILATION 2, and a
stride-2 block with the stride in the 3x3 (`stride_in_1x1=False`): the official block then uses
`self.pool`, which it only creates when `stride_3x3 != 2`, and raises AttributeError.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cn2_jax.modeling.backbone import resnet
from cn2_jax.modeling.backbone.resnet import max_pool_3x3_s2_p1
from cn2_jax.modeling.canvas import canvas_mask, zero_outside_canvas
from cn2_jax.modeling.layers import Conv2d, FrozenBatchNorm, c2_msra_fill
from cn2_jax.modeling.ops.dcn import DeformConv2d

Dtype = Any

# depth -> number of blocks per stage res2..res5 (build_res2net_backbone; bottleneck depths only)
_BLOCKS_PER_STAGE = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
# the stage names and strides of detectron2's ResNet, which Res2Net keeps
_STAGE_NAMES = resnet.STAGE_NAMES
_FEATURE_STRIDES = resnet.resnet_feature_strides()
_STEM_WIDTH = 32  # the deep stem's first two convs (hard-coded in the official BasicStem)


def res2net_out_channels(
    stem_out_channels: int = 64, res2_out_channels: int = 256
) -> Dict[str, int]:
  """Output channels of `stem` and `res2`..`res5` (channels double per stage)."""
  out = {"stem": stem_out_channels}
  for i, name in enumerate(_STAGE_NAMES):
    out[name] = res2_out_channels * 2**i
  return out


def frozen_param_prefixes(freeze_at: int, prefix: str = "") -> Tuple[str, ...]:
  """Variable-path prefixes frozen by `freeze_at` (official `ResNet.freeze`, the same stage
  names as detectron2's ResNet, so this is `resnet.frozen_param_prefixes`): 0 -> (),
  1 -> ('stem',), 2 -> ('stem', 'res2') (the default FREEZE_AT of these models), k -> the stem
  and res2..res<k>. Every parameter under a prefix (conv kernels, DCN and offset kernels) is
  frozen; FrozenBN statistics are never trained anyway (collection `frozen`)."""
  return resnet.frozen_param_prefixes(freeze_at, prefix)


def avg_pool_ceil_exclude_pad(x: jax.Array, k: int, valid: Optional[jax.Array]) -> jax.Array:
  """torch `AvgPool2d(k, stride=k, ceil_mode=True, count_include_pad=False)` on NHWC.

  Output `ceil(H / k) x ceil(W / k)`; a window that sticks out of the map (ceil_mode) averages
  only its inside elements. `valid` (`[H, W]` bool or None = all) marks the official canvas:
  elements off it count as outside the map (zero weight, not counted), which gives the official
  values on a larger canvas. Sums in torch's window order (rows, then columns), then / count.
  """
  if k == 1:
    return x
  _, h, w, _ = x.shape
  ho, wo = -(-h // k), -(-w // k)
  pad = ((0, 0), (0, ho * k - h), (0, wo * k - w), (0, 0))
  if valid is None:
    valid = jnp.ones((h, w), bool)
  xz = jnp.where(valid[None, :, :, None], x, jnp.zeros((), x.dtype))
  xp = jnp.pad(xz, pad)
  mp = jnp.pad(valid.astype(x.dtype), pad[1:3])
  total = count = None
  for di in range(k):
    for dj in range(k):
      term, cnt = xp[:, di::k, dj::k, :], mp[di::k, dj::k]
      total = term if total is None else total + term
      count = cnt if count is None else count + cnt
  # Windows entirely off the canvas (count 0) give 0; they are not on the official map.
  return total / jnp.maximum(count, 1)[None, :, :, None]


def _frozen_bn_conv(
    features: int, kernel_size: int, stride: int, padding: int, dtype: Dtype, name: str
) -> Conv2d:
  """detectron2 `Conv2d(bias=False, norm=FrozenBN)` with c2_msra_fill."""
  return Conv2d(
      features,
      kernel_size=kernel_size,
      strides=stride,
      padding=padding,
      use_bias=False,
      norm="FrozenBN",
      kernel_init=c2_msra_fill,
      dtype=dtype,
      name=name,
  )


def _plain_conv(
    features: int, stride: int, dtype: Dtype, name: str, kernel_init=c2_msra_fill
) -> Conv2d:
  """A 3x3 p1 conv without bias or norm (the stem's and the split convs)."""
  return Conv2d(
      features,
      kernel_size=3,
      strides=stride,
      padding=1,
      use_bias=False,
      norm="",
      kernel_init=kernel_init,
      dtype=dtype,
      name=name,
  )


class Res2NetStem(nn.Module):
  """Official Res2Net `BasicStem` (deep stem): `conv1` = Sequential(conv 3x3 s2 3->32, FrozenBN,
  ReLU, conv 3x3 32->32, FrozenBN, ReLU, conv 3x3 32->out), `bn1` FrozenBN, ReLU, max-pool 3x3
  s2 p1. `[N, H, W, 3]` -> `[N, ceil(H/4), ceil(W/4), out_channels]`."""

  out_channels: int
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array, canvas_hw: Optional[jax.Array] = None) -> jax.Array:
    x = _plain_conv(_STEM_WIDTH, 2, self.dtype, "conv1.0")(zero_outside_canvas(x, canvas_hw, 1))
    x = nn.relu(FrozenBatchNorm(dtype=self.dtype, name="conv1.1")(x))
    x = _plain_conv(_STEM_WIDTH, 1, self.dtype, "conv1.3")(zero_outside_canvas(x, canvas_hw, 2))
    x = nn.relu(FrozenBatchNorm(dtype=self.dtype, name="conv1.4")(x))
    x = _plain_conv(self.out_channels, 1, self.dtype, "conv1.6")(
        zero_outside_canvas(x, canvas_hw, 2)
    )
    x = nn.relu(FrozenBatchNorm(dtype=self.dtype, name="bn1")(x))
    # Post-ReLU values are >= 0, so zeros off the canvas act like the pool's -inf padding.
    return max_pool_3x3_s2_p1(zero_outside_canvas(x, canvas_hw, 2))


class Bottle2neckBlock(nn.Module):
  """Official Res2Net `BottleneckBlock` (`deform=False`) / `DeformBottleneckBlock`
  (`deform=True`) with num_groups 1 and dilation 1 (see the module docstring for the forward).

  Attributes:
    out_channels: block output channels.
    bottleneck_channels: conv1 output channels B (= width_per_group * scale * 2^stage).
    stride: block stride (1 or 2).
    stride_in_1x1: the stride sits on conv1 (official default); False is only valid for stride 1.
    scale: number of splits (split width B / scale).
    deform: deformable split convs (`conv2_offsets.{i}` + `convs.{i}` DCN).
    deform_modulated: DCNv2 (27G offset/mask channels) rather than DCNv1 (18G offsets).
    deform_num_groups: offset groups G.
    dtype: compute dtype.

  The block is a "first" block (own split per split conv, projection shortcut) exactly when its
  input channels differ from `out_channels`, as the official code decides it.
  `__call__(x [N, H, W, Cin], canvas_hw=None, in_stride=1)` -> `[N, ceil(H/s), ceil(W/s), out]`.
  """

  out_channels: int
  bottleneck_channels: int
  stride: int
  stride_in_1x1: bool
  scale: int
  deform: bool
  deform_modulated: bool
  deform_num_groups: int
  dtype: Dtype

  @nn.compact
  def __call__(
      self, x: jax.Array, canvas_hw: Optional[jax.Array] = None, in_stride: int = 1
  ) -> jax.Array:
    in_channels = x.shape[-1]
    projection = in_channels != self.out_channels
    s1, s3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
    if s3 != 1:
      raise ValueError(
          "Res2Net: a stride-2 block needs stride_in_1x1=True (the official block with the stride "
          "in the 3x3 pools the last split with `self.pool`, which it never creates)"
      )
    if not projection and self.stride != 1:
      raise ValueError("Res2Net: a stride-2 block needs in_channels != out_channels")
    if self.bottleneck_channels % self.scale:
      raise ValueError(f"bottleneck {self.bottleneck_channels} not divisible by {self.scale}")
    width = self.bottleneck_channels // self.scale
    num_convs = 1 if self.scale == 1 else self.scale - 1
    mid_stride = in_stride * s1

    if projection:
      pooled = avg_pool_ceil_exclude_pad(
          x, self.stride, canvas_mask(x.shape[1:3], canvas_hw, in_stride)
      )
      shortcut = _frozen_bn_conv(self.out_channels, 1, 1, 0, self.dtype, "shortcut.1")(pooled)
    else:
      shortcut = x.astype(self.dtype)

    out = nn.relu(_frozen_bn_conv(self.bottleneck_channels, 1, s1, 0, self.dtype, "conv1")(x))
    splits = [out[..., i * width : (i + 1) * width] for i in range(self.scale)]
    pieces = []
    sp = None
    for i in range(num_convs):
      sp = splits[i] if (i == 0 or projection) else sp + splits[i]
      sp = zero_outside_canvas(sp, canvas_hw, mid_stride)
      if self.deform:
        sp = self._deform_conv(sp, i, width, s3)
      else:
        sp = _plain_conv(width, s3, self.dtype, f"convs.{i}")(sp)
      sp = nn.relu(FrozenBatchNorm(dtype=self.dtype, name=f"bns.{i}")(sp))
      pieces.append(sp)
    if self.scale != 1:
      pieces.append(splits[num_convs])  # stride_3x3 == 1: the last split passes unchanged
    out = jnp.concatenate(pieces, axis=-1)
    out = _frozen_bn_conv(self.out_channels, 1, 1, 0, self.dtype, "conv3")(out)
    return nn.relu(out + shortcut)

  def _deform_conv(self, sp: jax.Array, i: int, width: int, stride: int) -> jax.Array:
    """`conv2_offsets.{i}` (3x3, no bias, zero init as the official constructor) then the
    deformable `convs.{i}` (no bias, c2_msra_fill)."""
    taps = 9
    n_off = 2 * taps * self.deform_num_groups
    n_out = (3 if self.deform_modulated else 2) * taps * self.deform_num_groups
    om = _plain_conv(n_out, stride, self.dtype, f"conv2_offsets.{i}", nn.initializers.zeros)(sp)
    offset = om[..., :n_off]
    # Sigmoid in float32 even for a low-precision compute dtype (the mask scales every sample).
    mask = jax.nn.sigmoid(om[..., n_off:].astype(jnp.float32)) if self.deform_modulated else None
    return DeformConv2d(
        width,
        kernel_size=3,
        strides=stride,
        padding=1,
        deformable_groups=self.deform_num_groups,
        use_bias=False,
        kernel_init=c2_msra_fill,
        dtype=self.dtype,
        name=f"convs.{i}",
    )(sp, offset, mask)


class Res2NetStage(nn.Module):
  """A sequence of `Bottle2neckBlock`s named '0', '1', ...; the first carries `first_stride`."""

  num_blocks: int
  out_channels: int
  bottleneck_channels: int
  first_stride: int
  stride_in_1x1: bool
  scale: int
  deform: bool
  deform_modulated: bool
  deform_num_groups: int
  dtype: Dtype

  @nn.compact
  def __call__(
      self, x: jax.Array, canvas_hw: Optional[jax.Array] = None, in_stride: int = 1
  ) -> jax.Array:
    for i in range(self.num_blocks):
      stride = self.first_stride if i == 0 else 1
      x = Bottle2neckBlock(
          out_channels=self.out_channels,
          bottleneck_channels=self.bottleneck_channels,
          stride=stride,
          stride_in_1x1=self.stride_in_1x1,
          scale=self.scale,
          deform=self.deform,
          deform_modulated=self.deform_modulated,
          deform_num_groups=self.deform_num_groups,
          dtype=self.dtype,
          name=str(i),
      )(x, canvas_hw, in_stride)
      in_stride *= stride
    return x


class Res2Net(nn.Module):
  """Res2Net bottom-up backbone (official `build_res2net_backbone`).

  Attributes (the CenterNet2_R2-101-DCN values in brackets):
    depth: 50, 101 or 152 [101].
    width_per_group: RESNETS.WIDTH_PER_GROUP [26]; bottleneck of res2 = num_groups *
      width_per_group * scale (104), doubling per stage.
    scale: number of splits [4] (the official builder hard-codes 4).
    deform_on_per_stage: 4 bools for res2..res5 [(False, False, True, True)].
    deform_modulated: DCNv2 (offsets + sigmoid mask) rather than DCNv1 [True].
    stride_in_1x1: stride on conv1 [True, the detectron2 default]; False is rejected for the
      stride-2 stages (the official code fails there, see the module docstring).
    freeze_at: official `ResNet.freeze`: 0 nothing, 1 the stem, k >= 2 the stem and res2..res<k>
      [2]; implemented with `stop_gradient` on each frozen stage's output (zero gradients for the
      parameters under `frozen_param_prefixes(freeze_at)`, which the optimizer must also exclude).
    out_features: subset of ('stem', 'res2', 'res3', 'res4', 'res5') [('res3', 'res4', 'res5')];
      stages after the last requested one are not built (as officially).
    num_groups: RESNETS.NUM_GROUPS; only 1 is supported [1].
    deform_num_groups: RESNETS.DEFORM_NUM_GROUPS (offset groups) [1].
    stem_out_channels / res2_out_channels: [64] / [256].
    dtype: compute dtype (parameters float32).

  `__call__(x, canvas_hw=None)`: normalised image `[N, H, W, 3]` (H, W multiples of 32) and
  optionally the official canvas `[2]` -> {name: `[N, H/s, W/s, C]`} for `out_features`
  (res3/res4/res5: strides 8/16/32, 512/1024/2048 channels for the official widths).
  """

  depth: int
  width_per_group: int
  scale: int
  deform_on_per_stage: Sequence[bool]
  deform_modulated: bool
  stride_in_1x1: bool
  freeze_at: int
  out_features: Sequence[str]
  num_groups: int = 1
  deform_num_groups: int = 1
  stem_out_channels: int = 64
  res2_out_channels: int = 256
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, canvas_hw: Optional[jax.Array] = None) -> Dict[str, jax.Array]:
    if self.depth not in _BLOCKS_PER_STAGE:
      raise ValueError(
          f"Res2Net depth must be one of {sorted(_BLOCKS_PER_STAGE)}, got {self.depth}"
      )
    if self.num_groups != 1:
      raise ValueError(f"Res2Net: only num_groups=1 is supported, got {self.num_groups}")
    if len(self.deform_on_per_stage) != 4:
      raise ValueError(f"deform_on_per_stage needs 4 entries, got {self.deform_on_per_stage}")
    if x.ndim != 4:
      raise ValueError(f"Res2Net takes [N, H, W, C] inputs, got shape {x.shape}")
    order = ("stem",) + _STAGE_NAMES
    for f in self.out_features:
      if f not in order:
        raise ValueError(f"unknown Res2Net out_feature {f!r}")
    last = max(order.index(f) for f in self.out_features)
    channels = res2net_out_channels(self.stem_out_channels, self.res2_out_channels)
    bottleneck = self.num_groups * self.width_per_group * self.scale

    outputs = {}
    x = Res2NetStem(channels["stem"], dtype=self.dtype, name="stem")(x, canvas_hw)
    if self.freeze_at >= 1:
      x = jax.lax.stop_gradient(x)
    if "stem" in self.out_features:
      outputs["stem"] = x
    for idx in range(1, last + 1):
      name = order[idx]
      x = Res2NetStage(
          num_blocks=_BLOCKS_PER_STAGE[self.depth][idx - 1],
          out_channels=channels[name],
          bottleneck_channels=bottleneck * 2 ** (idx - 1),
          first_stride=1 if name == "res2" else 2,
          stride_in_1x1=self.stride_in_1x1,
          scale=self.scale,
          deform=bool(self.deform_on_per_stage[idx - 1]),
          deform_modulated=self.deform_modulated,
          deform_num_groups=self.deform_num_groups,
          dtype=self.dtype,
          name=name,
      )(x, canvas_hw, _FEATURE_STRIDES[order[idx - 1]])
      if self.freeze_at >= idx + 1:  # res2 -> 2
        x = jax.lax.stop_gradient(x)
      if name in self.out_features:
        outputs[name] = x
    return outputs


def res2net_from_config(model_config, dtype) -> Res2Net:
  """The Res2Net of `config.model` (detectron2 MODEL.RESNETS.*: resnet_depth,
  resnet_width_per_group, resnet_deform_*, stride_in_1x1, freeze_at; res3-res5 out)."""
  if model_config.resnet_norm != "FrozenBN":
    raise ValueError(
        f"Res2Net supports resnet_norm='FrozenBN' only, got {model_config.resnet_norm!r}"
    )
  return Res2Net(
      depth=model_config.resnet_depth,
      width_per_group=model_config.resnet_width_per_group or model_config.resnet_width,
      scale=4,  # the official builder hard-codes 4 splits
      deform_on_per_stage=tuple(model_config.resnet_deform_on_per_stage),
      deform_modulated=model_config.resnet_deform_modulated,
      stride_in_1x1=model_config.stride_in_1x1,
      freeze_at=model_config.freeze_at,
      out_features=("res3", "res4", "res5"),
      num_groups=model_config.resnet_num_groups,
      deform_num_groups=model_config.resnet_deform_num_groups,
      dtype=dtype,
  )


def res2net_frozen(model_config) -> tuple:
  """FREEZE_AT of the Res2Net bottom-up (relative to the backbone)."""
  return frozen_param_prefixes(model_config.freeze_at, prefix="bottom_up.")
