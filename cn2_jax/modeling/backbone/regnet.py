"""RegNetX / RegNetY (pycls `regnet.py` / `anynet.py`; "Designing Network Design Spaces",
Radosavovic et al. 2020), the backbone of centerX's DCN-free exportable person / face models
(centerX `modeling/backbone/regnet/regnet.py`, `MODEL.BACKBONE.NAME: "build_regnet"`).

docs/onestage.md §2.6. Structure and names are pycls's, so a pycls state dict (`model_state` of a
`.pyth` file: `stem.conv.weight`, `s1.b1.f.a.weight`, `s1.b1.f.a_bn.running_mean`, ...) maps by
leaf renames only (`weights/onestage.py`, format 'pycls'):

* widths and depths (`regnet_stages`): per-block widths `w_j = w0 + wa * j` (j < depth) quantised
  to `w0 * wm^round(log(w_j / w0) / log(wm))` rounded to a multiple of 8; consecutive equal widths
  form a stage; then each stage's bottleneck width `w * bot_mul` is made a multiple of its group
  width (the group width capped at the bottleneck width), pycls `generate_regnet` +
  `adjust_block_compatibility`;
* `stem` (SimpleStem, pycls "simple_stem_in"): `conv` 3x3 stride 2 pad 1 (no bias) -> `bn` -> ReLU,
  32 channels;
* stages `s1`..`s4`, blocks `b1`, `b2`, ... (ResBottleneckBlock, "res_bottleneck_block"); the
  first block of each stage has stride 2 and, as every block whose width or stride changes, a
  projection shortcut `proj` (1x1, stride, no bias) -> `bn`. The residual branch `f`: `a` 1x1 ->
  `a_bn` -> ReLU -> `b` 3x3 (stride, pad 1, groups = w_b / group_w) -> `b_bn` -> ReLU -> [`se`] ->
  `c` 1x1 -> `c_bn`; the block returns ReLU(shortcut + f(x));
* `se` (RegNetY): global average pool -> `f_ex.0` 1x1 conv (bias, w_se = round(se_r * w_in), w_in
  the block's input width) -> ReLU -> `f_ex.2` 1x1 conv (bias) -> sigmoid, which scales `b`'s output
  per channel.
No classifier head (centerX drops it): the output is `s4` (stride 32), fed to the deconv neck.

Norms: trainable BatchNorm (`layers.BatchNorm`, running statistics in `batch_stats`: "BN" /
"SyncBN") or "FrozenBN" (`layers.FrozenBatchNorm`, collection `frozen`), each a sibling module
named as pycls's (`a_bn`, `bn`), not a conv's `norm`. Init as pycls `init_weights`: conv kernels
N(0, sqrt(2 / (k * k * out))) (`c2_msra_fill`), BatchNorm weight 1 / bias 0; the SE convs' biases
keep torch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

The official canvas (`canvas_hw`, see `modeling/canvas.py`; None = none): the input of every 3x3
conv is zeroed off the canvas, BatchNorm statistics and SE's global average cover the canvas
positions only, so a batch on a larger canvas gives the official values on the official one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cn2_jax.modeling.canvas import canvas_mask, zero_outside_canvas
from cn2_jax.modeling.layers import (
    BATCH_NORMS,
    BatchNorm,
    BatchNormSettings,
    Conv2d,
    FrozenBatchNorm,
    c2_msra_fill,
)

Dtype = Any
NORMS = BATCH_NORMS + ("FrozenBN",)
SIZE_DIVISIBILITY = 32  # four stride-2 stages after the stride-2 stem
OUTPUT = "s4"  # the stage the one-stage family's neck reads (stride 32)


@dataclasses.dataclass(frozen=True)
class RegNetParams:
  """pycls `REGNET.*` (the model zoo's `configs/dds_baselines/regnet[xy]/*.yaml`): DEPTH, W0, WA,
  WM, GROUP_W, BOT_MUL, SE_R (0 = RegNetX, no SE), STEM_W and STRIDE."""

  depth: int
  w0: int
  wa: float
  wm: float
  group_w: int
  bot_mul: float = 1.0
  se_r: float = 0.0
  stem_w: int = 32
  stride: int = 2


# pycls model-zoo name -> parameters (pycls configs/dds_baselines; centerX STR_DEPTH 200x / 400x /
# 4000y). Another pycls RegNet is one more line here.
REGNETS: Dict[str, RegNetParams] = {
    "RegNetX-200MF": RegNetParams(depth=13, w0=24, wa=36.44, wm=2.49, group_w=8),
    "RegNetX-400MF": RegNetParams(depth=22, w0=24, wa=24.48, wm=2.54, group_w=16),
    "RegNetY-4.0GF": RegNetParams(depth=22, w0=96, wa=31.41, wm=2.24, group_w=64, se_r=0.25),
}


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One stage: `depth` blocks of output width `width`, the first with stride `stride`;
  bottleneck width `round(width * bot_mul)` in groups of `group_w` channels."""

  depth: int
  width: int
  stride: int
  bot_mul: float
  group_w: int


def generate_regnet(
    wa: float, w0: int, wm: float, depth: int, q: int = 8
) -> Tuple[List[int], List[int]]:
  """pycls `generate_regnet`: per-stage widths and depths (in increasing width order)."""
  if not (wa >= 0 and w0 > 0 and wm > 1 and w0 % q == 0):
    raise ValueError(f"RegNet needs wa >= 0, w0 > 0, wm > 1, w0 % {q} == 0; got {wa}, {w0}, {wm}")
  ws_cont = np.arange(depth) * wa + w0
  ks = np.round(np.log(ws_cont / w0) / np.log(wm))
  ws_all = w0 * np.power(wm, ks)
  ws_all = np.round(np.divide(ws_all, q)).astype(int) * q
  ws, ds = np.unique(ws_all, return_counts=True)
  return [int(w) for w in ws], [int(d) for d in ds]


def adjust_block_compatibility(
    ws: Sequence[int], bs: Sequence[float], gs: Sequence[int]
) -> Tuple[List[int], List[float], List[int]]:
  """pycls `blocks.adjust_block_compatibility`: group widths capped at the bottleneck width, and
  bottleneck widths rounded to a multiple of the group width (and of the bottleneck multiplier
  when it is an integer > 1); the widths follow."""
  if not all(w > 0 and b > 0 and g > 0 for w, b, g in zip(ws, bs, gs)):
    raise ValueError(f"widths, bottleneck multipliers and group widths must be > 0: {ws} {bs} {gs}")
  vs = [int(max(1, w * b)) for w, b in zip(ws, bs)]
  gs = [int(min(g, v)) for g, v in zip(gs, vs)]
  ms = [int(np.lcm(g, int(b))) if b > 1 else g for g, b in zip(gs, bs)]
  vs = [max(m, int(round(v / m) * m)) for v, m in zip(vs, ms)]
  ws = [int(v / b) for v, b in zip(vs, bs)]
  return ws, list(bs), gs


def regnet_stages(params: RegNetParams) -> Tuple[StageSpec, ...]:
  """pycls `generate_regnet_full`: the stages of a RegNet."""
  ws, ds = generate_regnet(params.wa, params.w0, params.wm, params.depth)
  n = len(ws)
  ws, bs, gs = adjust_block_compatibility(ws, [params.bot_mul] * n, [params.group_w] * n)
  return tuple(
      StageSpec(depth=d, width=w, stride=params.stride, bot_mul=b, group_w=g)
      for d, w, b, g in zip(ds, ws, bs, gs)
  )


def regnet_out_channels(name: str) -> int:
  """Channels of the output (`s4`) of the RegNet `name` (a key of `REGNETS`)."""
  return regnet_stages(REGNETS[name])[-1].width


def _torch_bias_init(fan_in: int):
  """torch's default conv bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (pycls leaves the SE
  biases at it)."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _conv(module: nn.Module, features: int, k: int, stride: int, name: str, groups: int = 1):
  """A pycls `conv2d` (padding (k - 1) / 2, no bias, pycls init) inside `module`'s compact
  method."""
  return Conv2d(
      features,
      kernel_size=k,
      strides=stride,
      padding=(k - 1) // 2,
      use_bias=False,
      kernel_init=c2_msra_fill,
      dtype=module.dtype,
      groups=groups,
      name=name,
  )


def _norm(
    module: nn.Module,
    x: jax.Array,
    name: str,
    train_bn: bool,
    canvas_hw: Optional[jax.Array] = None,
    stride: int = 1,
) -> jax.Array:
  """pycls `norm2d` as `module.norm` ("BN" / "SyncBN": `layers.BatchNorm` with
  `module.batch_norm`, statistics on the canvas `canvas_hw` of `x` at `stride`; "FrozenBN"), a
  sub-module `name` of `module`."""
  settings = module.batch_norm
  if module.norm == "FrozenBN":
    eps = settings.eps if settings is not None else 1e-5
    return FrozenBatchNorm(eps=eps, dtype=module.dtype, name=name)(x)
  if module.norm not in BATCH_NORMS:
    raise ValueError(f"RegNet norm must be one of {NORMS}, got {module.norm!r}")
  if settings is None:
    raise ValueError(f"RegNet norm {module.norm!r} needs its BatchNormSettings (batch_norm)")
  axis_name = settings.axis_name if module.norm == "SyncBN" else None
  bn = BatchNorm(settings.momentum, settings.eps, axis_name, module.dtype, name=name)
  return bn(x, not train_bn, canvas_mask(x.shape[1:3], canvas_hw, stride))


class SE(nn.Module):
  """pycls `SE`: average pool -> `f_ex.0` (1x1, bias) -> ReLU -> `f_ex.2` (1x1, bias) -> sigmoid,
  times the input. Call: `x [N, H, W, C]`, optionally the canvas `canvas_hw` of `x` at `stride`
  (the average covers its positions only) -> `[N, H, W, C]`."""

  w_se: int
  dtype: Dtype

  @nn.compact
  def __call__(
      self, x: jax.Array, canvas_hw: Optional[jax.Array] = None, stride: int = 1
  ) -> jax.Array:
    c = x.shape[-1]
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    keep = canvas_mask(x.shape[1:3], canvas_hw, stride)
    if keep is None:
      pooled = xf.mean((1, 2), keepdims=True)
    else:
      total = jnp.where(keep[None, :, :, None], xf, jnp.zeros((), xf.dtype)).sum(
          (1, 2), keepdims=True
      )
      pooled = total / keep.sum(dtype=xf.dtype)
    s = Conv2d(
        self.w_se,
        kernel_size=1,
        kernel_init=c2_msra_fill,
        bias_init=_torch_bias_init(c),
        dtype=self.dtype,
        name="f_ex.0",
    )(pooled)
    s = Conv2d(
        c,
        kernel_size=1,
        kernel_init=c2_msra_fill,
        bias_init=_torch_bias_init(self.w_se),
        dtype=self.dtype,
        name="f_ex.2",
    )(nn.relu(s))
    return (x * jax.nn.sigmoid(s.astype(jnp.float32)).astype(x.dtype)).astype(self.dtype)


class BottleneckTransform(nn.Module):
  """pycls `BottleneckTransform` (`f`): `a` 1x1, `b` 3x3 grouped (stride), [`se`], `c` 1x1, each
  conv followed by its `*_bn`; ReLU after `a_bn` and `b_bn`. Call: `x [N, H, W, w_in]` at
  `in_stride` (of the canvas `canvas_hw`), `train_bn` -> `[N, H / stride, W / stride, w_out]`."""

  w_out: int
  stride: int
  bot_mul: float
  group_w: int
  se_r: float
  norm: str
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
    w_in = x.shape[-1]
    w_b = int(round(self.w_out * self.bot_mul))
    w_se = int(round(w_in * self.se_r))
    out_stride = in_stride * self.stride
    y = nn.relu(_norm(self, _conv(self, w_b, 1, 1, "a")(x), "a_bn", train_bn, canvas_hw, in_stride))
    # Only `b` mixes neighbours: its input is zeroed off the canvas (the official zero padding).
    y = zero_outside_canvas(y, canvas_hw, in_stride)
    y = _conv(self, w_b, 3, self.stride, "b", groups=w_b // self.group_w)(y)
    y = nn.relu(_norm(self, y, "b_bn", train_bn, canvas_hw, out_stride))
    if w_se:
      y = SE(w_se, self.dtype, name="se")(y, canvas_hw, out_stride)
    y = _conv(self, self.w_out, 1, 1, "c")(y)
    return _norm(self, y, "c_bn", train_bn, canvas_hw, out_stride)


class ResBottleneckBlock(nn.Module):
  """pycls `ResBottleneckBlock`: ReLU(shortcut + f(x)); the shortcut is `proj` (1x1, stride) ->
  `bn` when the width or the stride changes, else the identity. Call: see
  `BottleneckTransform`."""

  w_out: int
  stride: int
  bot_mul: float
  group_w: int
  se_r: float
  norm: str
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
    if x.shape[-1] != self.w_out or self.stride != 1:
      proj = _conv(self, self.w_out, 1, self.stride, "proj")(x)  # 1x1: reads no neighbour
      shortcut = _norm(self, proj, "bn", train_bn, canvas_hw, in_stride * self.stride)
    else:
      shortcut = x.astype(self.dtype)
    f = BottleneckTransform(
        self.w_out,
        self.stride,
        self.bot_mul,
        self.group_w,
        self.se_r,
        self.norm,
        self.dtype,
        self.batch_norm,
        name="f",
    )
    return nn.relu(shortcut + f(x, canvas_hw, in_stride, train_bn))


class SimpleStem(nn.Module):
  """pycls `SimpleStem` ("simple_stem_in"): `conv` 3x3 stride 2 -> `bn` -> ReLU. Call: the
  image `[N, H, W, 3]`, optionally its canvas `canvas_hw`, `train_bn` -> `[N, H/2, W/2, w_out]`."""

  w_out: int
  norm: str
  dtype: Dtype
  batch_norm: Optional[BatchNormSettings] = None

  @nn.compact
  def __call__(
      self, x: jax.Array, canvas_hw: Optional[jax.Array] = None, train_bn: bool = False
  ) -> jax.Array:
    y = _conv(self, self.w_out, 3, 2, "conv")(zero_outside_canvas(x, canvas_hw, 1))
    return nn.relu(_norm(self, y, "bn", train_bn, canvas_hw, 2))


class AnyStage(nn.Module):
  """pycls `AnyStage`: blocks `b1`, `b2`, ... of `stage` (the first one carries the stride);
  `remat`: each block is rematerialised in training (`nn.remat`). Call: `x` at `in_stride`,
  `canvas_hw`, `train_bn` (see `BottleneckTransform`)."""

  stage: StageSpec
  se_r: float
  norm: str
  dtype: Dtype
  batch_norm: Optional[BatchNormSettings] = None
  remat: bool = False

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      canvas_hw: Optional[jax.Array] = None,
      in_stride: int = 1,
      train_bn: bool = False,
  ) -> jax.Array:
    # (self, x, canvas_hw, in_stride, train_bn): the stride and the BatchNorm mode are static
    block_cls = (
        nn.remat(ResBottleneckBlock, static_argnums=(3, 4)) if self.remat else ResBottleneckBlock
    )
    s = self.stage
    for j in range(s.depth):
      x = block_cls(
          s.width,
          s.stride if j == 0 else 1,
          s.bot_mul,
          s.group_w,
          self.se_r,
          self.norm,
          self.dtype,
          self.batch_norm,
          name=f"b{j + 1}",
      )(x, canvas_hw, in_stride, train_bn)
      in_stride *= s.stride if j == 0 else 1
    return x


class RegNet(nn.Module):
  """pycls AnyNet body (stem + stages, no head) with RegNet stages; see the module docstring.

  Attributes:
    stages: the stages (`regnet_stages(REGNETS[name])`, or any `StageSpec`s: tests build tiny
      ones); named `s1`, `s2`, ... with blocks `b1`, `b2`, ...
    stem_w: stem width (pycls STEM_W, 32).
    se_r: SE ratio (RegNetY 0.25; 0 = RegNetX).
    norm: "BN", "SyncBN" (trainable, `batch_norm` required) or "FrozenBN".
    batch_norm: momentum / eps / SyncBN axis (`layers.BatchNormSettings`); FrozenBN reads its eps.
    dtype: compute dtype (parameters and BatchNorm statistics stay float32).
    remat: rematerialise the stem and every block in training (`nn.remat`; values unchanged).
    out_features: which of `stem`, `s1`, ... to return.
  Call: normalised `[N, H, W, 3]` (H, W multiples of 32 for whole stride-32 maps), optionally the
  official canvas `canvas_hw` `[2]` (module docstring; None = the whole input), `train_bn`
  (BatchNorm uses and updates batch statistics) -> {name: `[N, H / s, W / s, C]`}.
  """

  stages: Tuple[StageSpec, ...]
  stem_w: int
  se_r: float
  norm: str
  dtype: Dtype
  batch_norm: Optional[BatchNormSettings] = None
  remat: bool = False
  out_features: Sequence[str] = (OUTPUT,)

  @property
  def size_divisibility(self) -> int:
    return 2 ** (1 + sum(1 for s in self.stages if s.stride == 2))

  @nn.compact
  def __call__(
      self, x: jax.Array, canvas_hw: Optional[jax.Array] = None, train_bn: bool = False
  ) -> Dict[str, jax.Array]:
    names = ("stem",) + tuple(f"s{i + 1}" for i in range(len(self.stages)))
    for f in self.out_features:
      if f not in names:
        raise ValueError(f"unknown RegNet out_feature {f!r} (have {names})")
    if self.norm not in NORMS:
      raise ValueError(f"RegNet norm must be one of {NORMS}, got {self.norm!r}")
    common = dict(norm=self.norm, dtype=self.dtype, batch_norm=self.batch_norm)
    # (self, x, canvas_hw, train_bn): the BatchNorm mode is static
    stem_cls = nn.remat(SimpleStem, static_argnums=(3,)) if self.remat else SimpleStem
    x = stem_cls(self.stem_w, name="stem", **common)(x, canvas_hw, train_bn)
    outputs = {"stem": x}
    last = max(names.index(f) for f in self.out_features)
    stride = 2
    for i, stage in enumerate(self.stages[:last]):
      stage_module = AnyStage(stage, self.se_r, remat=self.remat, name=names[i + 1], **common)
      x = stage_module(x, canvas_hw, stride, train_bn)
      stride *= stage.stride
      outputs[names[i + 1]] = x
    return {f: outputs[f] for f in self.out_features}


def build_regnet(
    name: str,
    *,
    norm: str,
    batch_norm: Optional[BatchNormSettings],
    dtype: Dtype,
    remat: bool = False,
    out_features: Sequence[str] = (OUTPUT,),
) -> RegNet:
  """The RegNet `name` (a key of `REGNETS`), which must have 4 stride-2 stages (all pycls
  models do): its `s4` output has stride 32."""
  if name not in REGNETS:
    raise ValueError(f"unknown RegNet {name!r}; known: {sorted(REGNETS)}")
  params = REGNETS[name]
  stages = regnet_stages(params)
  if len(stages) != 4 or any(s.stride != 2 for s in stages):
    raise ValueError(
        f"{name}: {len(stages)} stages of strides {[s.stride for s in stages]}, not "
        f"4 of stride 2 (an {OUTPUT} output of stride 32)"
    )
  return RegNet(
      stages=stages,
      stem_w=params.stem_w,
      se_r=params.se_r,
      norm=norm,
      dtype=dtype,
      batch_norm=batch_norm,
      remat=remat,
      out_features=tuple(out_features),
  )
