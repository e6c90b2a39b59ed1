"""torchvision-style ResNet-18/34/50/101 returning C5 only (centerX `modeling/backbone/resnet.py`,
docs/onestage.md §2.2).

Differences from the detectron2 ResNet of CenterNet2 (`modeling/backbone/resnet.py`):
  * trainable BatchNorm (`norm.BatchNorm`, running statistics in `batch_stats`) after every conv;
  * the stride of a bottleneck sits on its 3x3 conv (torchvision), the BasicBlock has it on conv1;
  * torchvision names: `conv1`, `bn1`, `layer1`..`layer4`, blocks `0`, `1`, ..., inside a block
    `conv1`/`bn1`/`conv2`/`bn2`[/`conv3`/`bn3`] and the projection `downsample.0` (1x1 conv with
    the block stride) + `downsample.1` (BN);
  * convs have no bias and torch's default init (kaiming_uniform(a=sqrt(5)), i.e.
    U(-1/sqrt(fan_in), 1/sqrt(fan_in))): centerX's ResNet class sets no init of its own and relies
    on the ImageNet checkpoint.

Variable paths relative to this module equal centerX's `backbone.*` state-dict keys under the
rename rule of `cn2_jax/weights/onestage.py`, e.g. `layer2.0.downsample.0.kernel`,
`layer2.0.downsample.1.scale`, `batch_stats/layer2.0.bn1.var`.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cn2_jax.modeling.backbone.resnet import max_pool_3x3_s2_p1
from cn2_jax.modeling.layers import Conv2d
from cn2_jax.modeling.onestage.norm import TORCH_BN_EPS, TORCH_BN_MOMENTUM, BatchNorm

Dtype = Any

# torch nn.Conv2d default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = Cin*kh*kw.
torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# depth -> (block, blocks per stage); expansion 1 for "basic", 4 for "bottleneck".
RESNET_SPECS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


def c5_channels(depth: int, width: int = 64) -> int:
  """Channels of C5: 8 * width (basic blocks) or 32 * width (bottlenecks); 512 / 2048 at width 64."""
  if depth not in RESNET_SPECS:
    raise ValueError(f"ResNet depth must be one of {sorted(RESNET_SPECS)}, got {depth}")
  return width * 8 * (1 if RESNET_SPECS[depth][0] == "basic" else 4)


def _conv(features, k, stride, name, dtype):
  return Conv2d(
      features,
      kernel_size=k,
      strides=stride,
      padding=k // 2,
      use_bias=False,
      kernel_init=torch_conv_init,
      dtype=dtype,
      name=name,
  )


class Block(nn.Module):
  """torchvision BasicBlock (expansion 1) or Bottleneck (expansion 4, stride on the 3x3 conv).

  Call: `x [N, H, W, Cin]`, `train_bn` -> `[N, ceil(H/stride), ceil(W/stride), planes * expansion]`.
  """

  kind: str  # "basic" | "bottleneck"
  planes: int
  stride: int = 1
  bn_momentum: float = TORCH_BN_MOMENTUM
  bn_eps: float = TORCH_BN_EPS
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train_bn: bool) -> jax.Array:
    bn = lambda name: BatchNorm(
        self.bn_momentum, self.bn_eps, self.axis_name, self.dtype, name=name  # noqa: E731
    )
    out_ch = self.planes * (1 if self.kind == "basic" else 4)
    use_ra = not train_bn
    if self.kind == "basic":
      y = nn.relu(bn("bn1")(_conv(self.planes, 3, self.stride, "conv1", self.dtype)(x), use_ra))
      y = bn("bn2")(_conv(self.planes, 3, 1, "conv2", self.dtype)(y), use_ra)
    else:
      y = nn.relu(bn("bn1")(_conv(self.planes, 1, 1, "conv1", self.dtype)(x), use_ra))
      y = nn.relu(bn("bn2")(_conv(self.planes, 3, self.stride, "conv2", self.dtype)(y), use_ra))
      y = bn("bn3")(_conv(out_ch, 1, 1, "conv3", self.dtype)(y), use_ra)
    if self.stride != 1 or x.shape[-1] != out_ch:
      # torchvision `downsample = Sequential(conv1x1(stride), BN)`: names "downsample.0/.1".
      shortcut = bn("downsample.1")(
          _conv(out_ch, 1, self.stride, "downsample.0", self.dtype)(x), use_ra
      )
    else:
      shortcut = x.astype(self.dtype)
    return nn.relu(y + shortcut)


class ResNetC5(nn.Module):
  """centerX `build_resnet`: conv1 7x7/2 + bn1 + ReLU + max-pool 3x3/2, layer1..layer4 -> C5.

  Attributes:
    depth: 18, 34 (BasicBlock) or 50, 101 (Bottleneck).
    width: base width (64 in every torchvision ResNet; smaller only for tests).
    bn_momentum / bn_eps: BatchNorm settings (Flax momentum convention: torch 0.1 == 0.9).
    axis_name: cross-device BatchNorm statistics (SyncBN) when set.
    dtype: compute dtype.
  Call: normalised image `[N, H, W, 3]`, `train_bn` (batch statistics + running-stat update when
  True) -> C5 `[N, H/32, W/32, c5_channels(depth, width)]` (H, W multiples of 32).
  """

  depth: int = 18
  width: int = 64
  bn_momentum: float = TORCH_BN_MOMENTUM
  bn_eps: float = TORCH_BN_EPS
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train_bn: bool = False) -> jax.Array:
    if self.depth not in RESNET_SPECS:
      raise ValueError(f"ResNet depth must be one of {sorted(RESNET_SPECS)}, got {self.depth}")
    if x.ndim != 4:
      raise ValueError(f"ResNetC5 takes [N, H, W, 3] images, got shape {x.shape}")
    kind, blocks = RESNET_SPECS[self.depth]
    x = _conv(self.width, 7, 2, "conv1", self.dtype)(x)
    x = BatchNorm(self.bn_momentum, self.bn_eps, self.axis_name, self.dtype, name="bn1")(
        x, not train_bn
    )
    x = max_pool_3x3_s2_p1(nn.relu(x))
    for stage, n in enumerate(blocks):
      planes = self.width * 2**stage
      for i in range(n):
        stride = 2 if (stage > 0 and i == 0) else 1
        x = Block(
            kind,
            planes,
            stride,
            self.bn_momentum,
            self.bn_eps,
            self.axis_name,
            self.dtype,
            name=f"layer{stage + 1}.{i}",
        )(x, train_bn)
    return x
