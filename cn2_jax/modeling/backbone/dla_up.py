"""DLA-up (iterative deep aggregation) and `DLASeg`, the backbone of CenterNet-S4_DLA_8x.

Follows `centernet/modeling/backbone/dla.py` of the official CenterNet2 (`_DeformConv`, `IDAUp`,
`DLAUp`, `DLASeg` as built by `build_dla_backbone` with the default MODEL.DLA options:
NUM_LAYERS 34, USE_DLA_UP True, MS_OUTPUT False, OUT_FEATURES ["dla2"]). With the caller naming
the `DLASeg` module `backbone`, variable paths equal the official keys with the DESIGN.md leaf
renames: `backbone.base.*` (modeling/backbone/dla.py), `backbone.dla_up.ida_{0,1,2}.*`,
`backbone.ida_up.*`, e.g.
  `dla_up.ida_1.proj_2.offset.{kernel,bias}`  offset/mask conv 3x3 -> 27 channels
  `dla_up.ida_1.proj_2.conv.{kernel,bias}`    the modulated deformable conv (DCNv2)
  `frozen/dla_up.ida_1.proj_2.actf.0.*`       its BatchNorm (eval = FrozenBN)
  `dla_up.ida_1.up_2.kernel`                  depthwise transposed conv, torch [C, 1, 2f, 2f]
                                              -> [2f, 2f, 1, C] by the generic OIHW -> HWIO rule

`_DeformConv(chi, cho)` = offset conv -> `torch.chunk(3)` -> offset = cat(o_x, o_y) (channels
0..17 unchanged: an identity reordering, so channel 2k is dy and 2k + 1 is dx of tap k, the layout
of detectron2's `ModulatedDeformConv` kernels and of `ops.dcn.deform_conv2d`), mask =
sigmoid(channels 18..26) -> `ModulatedDeformConv` 3x3 p1 (+ bias) -> BN -> ReLU.

Canvas (modeling/canvas.py): the input of every `_DeformConv` (offset conv and DCN both read it)
and of every transposed conv is zeroed off the official canvas, so values on the canvas equal the
official ones on any larger padding: the DCN's bilinear samples beyond the canvas read zeros as
the official out-of-map rule does, and the transposed conv's last canvas row/column (which the
official map receives from no input beyond its border) gets nothing from the padding.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cn2_jax.modeling import export_mode
from cn2_jax.modeling.backbone.build import register
from cn2_jax.modeling.backbone.dla import DLA, DLA34_CHANNELS, DLA34_LEVELS, dla_norm
from cn2_jax.modeling.canvas import zero_outside_canvas
from cn2_jax.modeling.layers import Conv2d
from cn2_jax.modeling.ops.dcn import DeformConv2d

Dtype = Any


def bilinear_upsampling_init(key, shape, dtype=jnp.float32):
  """The official `fill_up_weights` for a `[k, k, 1, C]` depthwise transposed-conv kernel:
  w[i, j] = (1 - |i / f - c|) (1 - |j / f - c|), f = ceil(k / 2), c = (2f - 1 - f % 2) / (2f),
  the same for every channel (a bilinear upsampling by f)."""
  del key
  k = shape[0]
  f = math.ceil(k / 2)
  c = (2 * f - 1 - f % 2) / (2.0 * f)
  w1 = 1 - np.abs(np.arange(k) / f - c)
  w = np.outer(w1, w1).astype(np.float32)
  return jnp.broadcast_to(jnp.asarray(w, dtype)[:, :, None, None], shape)


@export_mode.onnx_form(export_mode.depthwise_conv_transpose_for_onnx)
def depthwise_conv_transpose(x: jax.Array, kernel: jax.Array, factor: int) -> jax.Array:
  """torch `ConvTranspose2d(C, C, 2f, stride=f, padding=f // 2, groups=C, bias=False)` on NHWC.

  `kernel` is `[2f, 2f, 1, C]` with `kernel[i, j, 0, c]` = torch `weight[c, 0, i, j]` (what the
  generic OIHW -> HWIO transpose of the torch `[C_in, C_out / groups, kh, kw]` weight gives).
  torch: `y[o] = sum over (t, i) with o = t f - p + i of x[t] w[i]` per axis, output
  `(H - 1) f - 2p + 2f` (= H f for even f). Here: the input dilated by f (lhs_dilation), padded by
  2f - 1 - p, correlated with the spatially FLIPPED kernel (transposed conv = correlation with
  the flipped kernel over the dilated input), depthwise (feature_group_count = C).
  """
  k = kernel.shape[0]
  pad = k - 1 - factor // 2
  return jax.lax.conv_general_dilated(
      x,
      kernel[::-1, ::-1],
      window_strides=(1, 1),
      padding=((pad, pad), (pad, pad)),
      lhs_dilation=(factor, factor),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x.shape[-1],
  )


class DepthwiseConvTranspose2d(nn.Module):
  """The IDA `up_i`: depthwise `ConvTranspose2d(C, C, 2f, stride f, padding f // 2, groups=C,
  bias=False)`, param `kernel` `[2f, 2f, 1, C]` (torch `weight [C, 1, 2f, 2f]` through the
  generic converter; the flip is done here, see `depthwise_conv_transpose`), official bilinear
  init. `[N, H, W, C]` -> `[N, H f, W f, C]`."""

  factor: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = 2 * self.factor
    kernel = self.param("kernel", bilinear_upsampling_init, (k, k, 1, x.shape[-1]), jnp.float32)
    return depthwise_conv_transpose(x.astype(self.dtype), kernel.astype(self.dtype), self.factor)


class DeformConvBNReLU(nn.Module):
  """Official dla.py `_DeformConv(chi, cho)` (DCNV1 False): sub-modules `offset` (Conv2d 3x3 p1
  -> 27 channels, bias, zero init as official), `conv` (modulated DCN 3x3 p1, bias) and `actf.0`
  (BN eval = FrozenBN), then ReLU. `x` `[N, H, W, chi]` at stride `in_stride` -> `[N, H, W, cho]`.
  """

  features: int
  norm: str = "BN"
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(
      self, x: jax.Array, canvas_hw: Optional[jax.Array] = None, in_stride: int = 1
  ) -> jax.Array:
    x = zero_outside_canvas(x.astype(self.dtype), canvas_hw, in_stride)
    offset_mask = Conv2d(
        27,
        kernel_size=3,
        padding=1,
        use_bias=True,
        kernel_init=nn.initializers.zeros,
        bias_init=nn.initializers.zeros,
        dtype=self.dtype,
        name="offset",
    )(x)
    # chunk(3) -> (o_x, o_y, m); cat(o_x, o_y) is channels 0..17 in order (README §3.2).
    offset = offset_mask[..., :18]
    mask = jax.nn.sigmoid(offset_mask[..., 18:].astype(jnp.float32))
    y = DeformConv2d(
        self.features,
        kernel_size=3,
        strides=1,
        padding=1,
        deformable_groups=1,
        use_bias=True,
        dtype=self.dtype,
        precision=self.precision,
        name="conv",
    )(x, offset, mask)
    return nn.relu(dla_norm(self.norm, self.dtype, "actf.0")(y))


class IDAUp(nn.Module):
  """Official `IDAUp(o, channels, up_f)`: for i = startp + 1 .. endp - 1 (j = i - startp),
  layers[i] = node_j(up_j(proj_j(layers[i])) + layers[i - 1]), with proj_j / node_j
  `DeformConvBNReLU` to `out_channels` and up_j the depthwise transposed conv by `up_factors[j]`.

  Functional: returns new lists `(layers, strides)` (the official forward mutates `layers`);
  `strides[i]` is the stride of `layers[i]` w.r.t. the image (for the canvas masks) and becomes
  that of `layers[i - 1]`.
  """

  out_channels: int
  up_factors: Sequence[int]  # official up_f; entry 0 unused
  norm: str = "BN"
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(
      self,
      layers: Sequence[jax.Array],
      startp: int,
      endp: int,
      strides: Sequence[int],
      canvas_hw: Optional[jax.Array] = None,
  ) -> Tuple[List[jax.Array], List[int]]:
    layers, strides = list(layers), list(strides)
    for i in range(startp + 1, endp):
      j = i - startp
      f = int(self.up_factors[j])
      block = lambda name: DeformConvBNReLU(  # noqa: E731
          self.out_channels, self.norm, self.dtype, self.precision, name=name
      )
      y = block(f"proj_{j}")(layers[i], canvas_hw, strides[i])
      y = zero_outside_canvas(y, canvas_hw, strides[i])
      y = DepthwiseConvTranspose2d(f, self.dtype, name=f"up_{j}")(y)
      if y.shape[1:3] != layers[i - 1].shape[1:3] or strides[i] != f * strides[i - 1]:
        raise ValueError(
            f"IDAUp: level {i} upsampled by {f} to {y.shape[1:3]} (stride {strides[i]}) does "
            f"not match level {i - 1} {layers[i - 1].shape[1:3]} (stride {strides[i - 1]})"
        )
      strides[i] = strides[i - 1]
      layers[i] = block(f"node_{j}")(y + layers[i - 1].astype(y.dtype), canvas_hw, strides[i])
    return layers, strides


def dla_up_configs(channels: Sequence[int], scales: Sequence[int]) -> List[Tuple[int, tuple]]:
  """(o, up_f) of `ida_0`, `ida_1`, ... as the official `DLAUp.__init__` builds them
  (`IDAUp(channels[j], in_channels[j:], scales[j:] // scales[j])`, j = -i - 2, then the finer
  scales are set to scales[j])."""
  scales = np.array(scales, dtype=int)
  out = []
  for i in range(len(channels) - 1):
    j = -i - 2
    out.append((int(channels[j]), tuple(int(s) for s in scales[j:] // scales[j])))
    scales[j + 1 :] = scales[j]
  return out


class DLAUp(nn.Module):
  """Official `DLAUp(startp, channels, scales)`: `ida_0 .. ida_{n-2}` (n = len(channels)), each
  folding the coarser levels one level further down; returns `out` = [finest, ..., coarsest]
  (DLA-34 with startp 2: strides 4, 8, 16, 32 with 64, 128, 256, 512 channels; the last entry is
  the base's level5 unchanged)."""

  startp: int
  channels: Sequence[int]
  scales: Sequence[int]
  norm: str = "BN"
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(
      self,
      layers: Sequence[jax.Array],
      strides: Sequence[int],
      canvas_hw: Optional[jax.Array] = None,
  ) -> List[jax.Array]:
    layers, strides = list(layers), list(strides)
    n = len(layers)
    out = [layers[-1]]
    for i, (o, up_f) in enumerate(
        dla_up_configs(self.channels, self.scales)[: n - self.startp - 1]
    ):
      layers, strides = IDAUp(o, up_f, self.norm, self.dtype, self.precision, name=f"ida_{i}")(
          layers, n - i - 2, n, strides, canvas_hw
      )
      out.insert(0, layers[-1])
    return out


class DLASeg(nn.Module):
  """Official `DLASeg` (dla.py, `build_dla_backbone`) for DLA-34: `base` (DLA-34 with the unused
  ImageNet `fc`), `dla_up` (DLAUp from level 2), `ida_up` (IDAUp(64, [64, 128, 256], [1, 2, 4]))
  on the first three DLA-up outputs.

  Output `{"dla2": [N, H/4, W/4, 64]}` (the official name: `ida_up`'s third output, at stride 4
  like all three — the official `_out_feature_strides` entry 2**2 is right only for dla2);
  `out_features` may also request "dla0" / "dla1" (the first two, also stride 4).

  Attributes: norm (MODEL.DLA.NORM, see `dla.dla_norm`), imagenet_classes (the declared `base.fc`,
  1000 for the official state dict, 0 for none), out_features, dtype, precision (of the DCN dots).
  Input `[N, H, W, 3]`, H and W multiples of 32 (`size_divisibility`), optional `canvas_hw`.
  """

  norm: str = "BN"
  imagenet_classes: int = 1000
  out_features: Sequence[str] = ("dla2",)
  dtype: Dtype = jnp.float32
  precision: Any = None

  first_level = 2  # log2(down_ratio 4)
  strides = (4,)  # dla2 (the backbone contract of build.py)
  out_channels = 64
  last_level = 5
  size_divisibility = 32

  @nn.compact
  def __call__(self, x: jax.Array, canvas_hw: Optional[jax.Array] = None) -> Dict[str, jax.Array]:
    channels = DLA34_CHANNELS
    first, last = self.first_level, self.last_level
    for f in self.out_features:
      if f not in [f"dla{i}" for i in range(last - first)]:
        raise ValueError(f"DLASeg out_features must be among dla0..dla2, got {f!r}")
    feats = DLA(self.norm, DLA34_LEVELS, channels, self.imagenet_classes, self.dtype, name="base")(
        x, canvas_hw
    )
    layers = [feats[f"dla{i}"] for i in range(6)]
    strides = [2**i for i in range(6)]
    up = DLAUp(
        first,
        channels[first:],
        [2**i for i in range(len(channels) - first)],
        self.norm,
        self.dtype,
        self.precision,
        name="dla_up",
    )(layers, strides, canvas_hw)
    y, _ = IDAUp(
        channels[first],
        [2**i for i in range(last - first)],
        self.norm,
        self.dtype,
        self.precision,
        name="ida_up",
    )(up[: last - first], 0, last - first, strides[first:last], canvas_hw)
    return {f"dla{i}": y[i] for i in range(last - first) if f"dla{i}" in self.out_features}


@register("build_dla_backbone", frozen_param_prefixes=lambda model_config: ())
def build_dla_backbone(model_config, dtype) -> DLASeg:
  """DLA-34 + DLA-up -> the stride-4 `dla2` map (CenterNet-S4_DLA_8x; `model.dla`)."""
  return DLASeg(norm=model_config.dla.norm, imagenet_classes=1000, dtype=dtype)
