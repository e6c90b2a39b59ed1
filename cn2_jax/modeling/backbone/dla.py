"""DLA-34 bottom-up network (Deep Layer Aggregation), structured and named like the official code.

One module for both official DLA-34 bases, which have the same structure and state-dict keys
(verified key by key in tests/test_zoo_dla.py):
  * `centernet/modeling/backbone/dlafpn.py` `DLA` (`dla34`, CenterNet2_DLA-BiFPN-P5_640_16x; the
    caller names it `bottom_up`, keys `backbone.bottom_up.level2.tree1.conv1.weight`, ...);
  * `centernet/modeling/backbone/dla.py` `DLA` (the `base` of `DLASeg`, CenterNet-S4_DLA_8x;
    keys `backbone.base.*`), which additionally owns the ImageNet classifier `fc` (a 1x1 conv
    512 -> 1000 created by its `load_pretrained_model`, never called in forward): set
    `imagenet_classes=1000` to declare it, so a strict conversion fills `base.fc.{weight,bias}`.

Structure (DLA-34: levels (1, 1, 1, 2, 2, 1), channels (16, 32, 64, 128, 256, 512)):
  base_layer   `base_layer.0` conv 7x7 s1 p3 (no bias), `base_layer.1` norm, ReLU
  level0       conv 3x3 s1 p1 + norm + ReLU (`level0.0`, `level0.1`; torch Sequential indices)
  level1       conv 3x3 s2 p1 + norm + ReLU (`level1.0`, `level1.1`)
  level2..5    `Tree`s with stride 2 (level_root for level3..5):
    Tree(levels=1): bottom = maxpool2x2(x); residual = project(bottom) (`project.0` 1x1 conv,
      `project.1` norm; only when the channel count changes); x1 = tree1(x, residual)
      (`BasicBlock` with the stride); x2 = tree2(x1); out = root(x2, x1, *children) with
      root = ReLU(norm(1x1 conv(concat))) (`root.conv`, `root.bn`).
    Tree(levels=2): tree1 = Tree(1, stride) (which recomputes its own bottom/residual: the
      outer `project` is computed and passed but unused, as in the official forward),
      tree2 = Tree(1, stride 1) fed x1 and children [bottom (level_root), x1].
  BasicBlock   conv1 3x3 (stride) + bn1 + ReLU, conv2 3x3 + bn2, + residual, ReLU.

Norm: MODEL.DLA.NORM "BN" (torch BatchNorm2d in eval mode), "SyncBN" or "FrozenBN" all compute
the fixed affine of the running statistics: `layers.FrozenBatchNorm` (eps 1e-5), variables
weight/bias/running_mean/running_var in the `frozen` collection.

Output: a dict `{"dla0": ..., "dla5": ...}`, the output of `level0` .. `level5` (the names of
dlafpn.py's `DLA.forward`; dla.py's `DLA.forward` returns the same six maps as a list), `dlaK`
`[N, H / 2^K, W / 2^K, channels[K]]` in `dtype`.

Canvas (modeling/canvas.py): every conv with spatial extent (7x7, 3x3) gets its input zeroed off
the official canvas (`canvas_hw`). The 2x2/2 max-pools need nothing: the canvas is a multiple of
32, so a window never straddles its border (the official code itself needs even sizes there).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cn2_jax import schema
from cn2_jax.modeling.canvas import zero_outside_canvas
from cn2_jax.modeling.layers import Conv2d, FrozenBatchNorm, c2_msra_fill, max_pool

Dtype = Any

DLA34_LEVELS = (1, 1, 1, 2, 2, 1)
DLA34_CHANNELS = (16, 32, 64, 128, 256, 512)
# MODEL.DLA.NORM values whose inference forward is the fixed affine of the running statistics.
_FROZEN_AFFINE_NORMS = ("BN", "SyncBN", "FrozenBN")


def dla_norm(norm: str, dtype: Dtype, name: str) -> nn.Module:
  """The norm layer `get_norm(norm, C)` builds, in its inference form (BN eval = FrozenBN)."""
  if norm not in _FROZEN_AFFINE_NORMS:
    raise ValueError(f"DLA norm must be one of {_FROZEN_AFFINE_NORMS}, got {norm!r}")
  return FrozenBatchNorm(eps=1e-5, dtype=dtype, name=name)


def _conv(features: int, kernel_size: int, stride: int, dtype: Dtype, name: str) -> Conv2d:
  """A DLA conv: torch padding (k - 1) // 2, no bias (every DLA-34 conv), He fan-out init
  (dlafpn.py re-initialises its convs with normal(0, sqrt(2 / (k * k * out)))."""
  return Conv2d(
      features,
      kernel_size=kernel_size,
      strides=stride,
      padding=(kernel_size - 1) // 2,
      use_bias=False,
      kernel_init=c2_msra_fill,
      dtype=dtype,
      name=name,
  )


class BasicBlock(nn.Module):
  """Official DLA `BasicBlock` (dilation 1): conv1 3x3 (stride) + bn1 + ReLU, conv2 3x3 + bn2,
  + residual (the input when None), ReLU. `in_stride`: stride of `x` w.r.t. the image."""

  planes: int
  stride: int
  norm: str
  dtype: Dtype

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      residual: Optional[jax.Array] = None,
      canvas_hw: Optional[jax.Array] = None,
      in_stride: int = 1,
  ) -> jax.Array:
    if residual is None:
      residual = x
    out_stride = in_stride * self.stride
    y = _conv(self.planes, 3, self.stride, self.dtype, "conv1")(
        zero_outside_canvas(x, canvas_hw, in_stride)
    )
    y = nn.relu(dla_norm(self.norm, self.dtype, "bn1")(y))
    y = _conv(self.planes, 3, 1, self.dtype, "conv2")(zero_outside_canvas(y, canvas_hw, out_stride))
    y = dla_norm(self.norm, self.dtype, "bn2")(y)
    return nn.relu(y + residual.astype(y.dtype))


class Root(nn.Module):
  """Official DLA `Root` (root_kernel_size 1): ReLU(bn(conv 1x1(concat(children)))) (+ the first
  child before the ReLU when `residual`; False in DLA-34)."""

  out_channels: int
  residual: bool
  norm: str
  dtype: Dtype

  @nn.compact
  def __call__(self, *children: jax.Array) -> jax.Array:
    y = _conv(self.out_channels, 1, 1, self.dtype, "conv")(
        jnp.concatenate([c.astype(self.dtype) for c in children], axis=-1)
    )
    y = dla_norm(self.norm, self.dtype, "bn")(y)
    if self.residual:
      y = y + children[0].astype(y.dtype)
    return nn.relu(y)


class Tree(nn.Module):
  """Official DLA `Tree` with `BasicBlock`s (see the module docstring for the forward).

  Attributes:
    levels: tree depth (1: two blocks and a root; k > 1: two sub-trees of depth k - 1).
    out_channels: output channels (a `project` 1x1 conv + norm exists when the input has other).
    stride: 1 or 2 (a `MaxPool2d(stride)` gives `bottom`; tree1's first block has the stride).
    level_root: append `bottom` to the children aggregated by the root.
    root_residual: Root's residual flag (False in DLA-34).
  """

  levels: int
  out_channels: int
  stride: int
  level_root: bool
  root_residual: bool
  norm: str
  dtype: Dtype

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      residual: Optional[jax.Array] = None,  # unused, as in the official forward
      children: Optional[List[jax.Array]] = None,
      canvas_hw: Optional[jax.Array] = None,
      in_stride: int = 1,
  ) -> jax.Array:
    del residual  # the official Tree.forward overwrites its `residual` argument (eval mode)
    children = [] if children is None else children
    bottom = max_pool(x, self.stride) if self.stride > 1 else x
    if x.shape[-1] != self.out_channels:
      residual = _conv(self.out_channels, 1, 1, self.dtype, "project.0")(bottom)
      residual = dla_norm(self.norm, self.dtype, "project.1")(residual)
    else:
      residual = bottom
    if self.level_root:
      children.append(bottom)
    out_stride = in_stride * self.stride
    if self.levels == 1:
      x1 = BasicBlock(self.out_channels, self.stride, self.norm, self.dtype, name="tree1")(
          x, residual, canvas_hw, in_stride
      )
      x2 = BasicBlock(self.out_channels, 1, self.norm, self.dtype, name="tree2")(
          x1, None, canvas_hw, out_stride
      )
      return Root(self.out_channels, self.root_residual, self.norm, self.dtype, name="root")(
          x2, x1, *children
      )
    subtree = lambda stride, name: Tree(  # noqa: E731
        self.levels - 1,
        self.out_channels,
        stride,
        level_root=False,
        root_residual=self.root_residual,
        norm=self.norm,
        dtype=self.dtype,
        name=name,
    )
    # The outer `residual` goes to tree1 like the official call, which ignores it: the outer
    # `project` only exists for the state dict (XLA drops the dead computation under jit).
    x1 = subtree(self.stride, "tree1")(x, residual, None, canvas_hw, in_stride)
    children.append(x1)
    return subtree(1, "tree2")(x1, None, children, canvas_hw, out_stride)


class DLA(nn.Module):
  """DLA-34 bottom-up network (official `DLA` of dlafpn.py and of dla.py; BasicBlock, no
  residual root). Variable paths relative to this module equal the official keys with the
  DESIGN.md leaf renames, e.g. `level3.tree2.root.conv.kernel` (`...conv.weight`) and
  `frozen/level3.tree2.root.bn.running_var`.

  Attributes:
    norm: MODEL.DLA.NORM: "BN" (the official configs), "SyncBN" or "FrozenBN" (all inference-
      mode affines, see `dla_norm`).
    levels / channels: per-level depth and width (DLA-34 defaults).
    imagenet_classes: 0, or the classes of the ImageNet `fc` 1x1 conv (with bias) that dla.py's
      DLA declares (1000); created at init so the official `fc.{weight,bias}` have a target, never
      used in forward.
    dtype: compute dtype (parameters float32).

  Input: normalised image `[N, H, W, 3]` (H, W multiples of 32), optional official canvas
  `canvas_hw` `[2]`. Output: `{"dla0": [N, H, W, 16], ..., "dla5": [N, H/32, W/32, 512]}`.
  """

  norm: str = "BN"
  levels: Sequence[int] = DLA34_LEVELS
  channels: Sequence[int] = DLA34_CHANNELS
  imagenet_classes: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, canvas_hw: Optional[jax.Array] = None) -> Dict[str, jax.Array]:
    if x.ndim != 4:
      raise ValueError(f"DLA takes [N, H, W, C] inputs, got shape {x.shape}")
    if len(self.levels) != 6 or len(self.channels) != 6:
      raise ValueError(
          f"DLA needs 6 levels and 6 channel counts, got {self.levels}, {self.channels}"
      )
    ch = tuple(self.channels)
    x = _conv(ch[0], 7, 1, self.dtype, "base_layer.0")(zero_outside_canvas(x, canvas_hw, 1))
    x = nn.relu(dla_norm(self.norm, self.dtype, "base_layer.1")(x))
    outputs = {}
    stride = 1
    for level in (0, 1):  # `_make_conv_level`: Sequential(conv, norm, ReLU) x convs
      for i in range(self.levels[level]):
        s = 2 if (level == 1 and i == 0) else 1
        x = _conv(ch[level], 3, s, self.dtype, f"level{level}.{3 * i}")(
            zero_outside_canvas(x, canvas_hw, stride)
        )
        x = nn.relu(dla_norm(self.norm, self.dtype, f"level{level}.{3 * i + 1}")(x))
        stride *= s
      outputs[f"dla{level}"] = x
    for level in range(2, 6):
      x = Tree(
          self.levels[level],
          ch[level],
          stride=2,
          level_root=level > 2,
          root_residual=False,
          norm=self.norm,
          dtype=self.dtype,
          name=f"level{level}",
      )(x, None, None, canvas_hw, stride)
      stride *= 2
      outputs[f"dla{level}"] = x
    if self.imagenet_classes and self.is_initializing():
      # dla.py's ImageNet classifier: a declared, never-called 1x1 conv (weights only).
      Conv2d(self.imagenet_classes, 1, use_bias=True, dtype=self.dtype, name="fc")(
          jnp.zeros((1, 1, 1, ch[5]), self.dtype)
      )
    return outputs


CONFIG = schema.group(
    "model.dla",
    "DLA-34 (MODEL.DLA; build_p37_dla_bifpn_backbone, build_dla_backbone).",
    schema.Field(
        "norm",
        "BN",
        "'BN' (official; used in inference mode: running statistics, as FrozenBN), 'SyncBN' or "
        "'FrozenBN'",
    ),
    families=("centernet2", "centernet"),
)
