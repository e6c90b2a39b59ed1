"""Box utilities with detectron2 semantics (docs/centernet2.md §5.4; docs/DESIGN.md).

Boxes are float32 `(x1, y1, x2, y2)` in pixels, no +1 in widths or areas. Every function works on
arbitrary leading batch dimensions unless its docstring says otherwise, and is jit/vmap friendly.

* `box_area`, `pairwise_iou`: detectron2 `Boxes.area` / `structures.pairwise_iou`.
* `encode_boxes`, `decode_boxes`: detectron2 `Box2BoxTransform.get_deltas` / `apply_deltas`.
* `clip_boxes`, `nonempty`: detectron2 `Boxes.clip` / `Boxes.nonempty`.

Exactness note: XLA (CPU and GPU) contracts `a * b + c` into a fused multiply-add, which rounds
differently from PyTorch's separately-rounded eager ops. Where a threshold is applied to the result
(IoU for matching and NMS), products that feed an addition go through `no_fma`, an identity that
hides the product from the contraction, so the IoU values are bit-identical to detectron2 /
torchvision float32 arithmetic.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from cn2_jax.modeling import export_mode


def no_fma_for_onnx(x: jax.Array, zero: jax.Array) -> jax.Array:
  """`no_fma` for an ONNX conversion: `x` itself. Its bitcasts would become BitCast nodes, which
  onnxruntime rejects at opset 18; onnxruntime runs a Mul and the Add it feeds as separate
  kernels, so there is no contraction to block."""
  del zero
  return x.astype(jnp.float32)


@export_mode.onnx_form(no_fma_for_onnx)
@jax.custom_jvp
def no_fma(x: jax.Array, zero: jax.Array) -> jax.Array:
  """Identity on float32 `x` that blocks fused-multiply-add contraction of its producer.

  Args:
    x: float32 array.
    zero: int32 scalar that is 0 at run time but unknown to the compiler (e.g. `count < 0`
      for a non-negative count); a literal constant would be folded away.
  Returns:
    `x`, bit for bit (its bits are XOR-ed with `zero`).
  """
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return jax.lax.bitcast_convert_type(bits ^ zero, jnp.float32)


@no_fma.__wrapped__.defjvp
def _no_fma_jvp(primals, tangents):
  x, zero = primals
  return no_fma(x, zero), tangents[0]


def runtime_zero(x: jax.Array) -> jax.Array:
  """An int32 scalar 0 that the compiler cannot constant-fold (derived from the values of `x`)."""
  x = jax.lax.stop_gradient(x)
  # A count of NaN entries is never negative, but XLA does not know that.
  return (jnp.sum(jnp.isnan(x).astype(jnp.int32)) < 0).astype(jnp.int32)


def box_area(boxes: jax.Array) -> jax.Array:
  """`boxes [..., 4]` -> `[...]` = (x2 - x1) * (y2 - y1) (float32, no +1, may be negative)."""
  boxes = jnp.asarray(boxes, jnp.float32)
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """detectron2 `pairwise_iou`: `boxes1 [N, 4]`, `boxes2 [M, 4]` -> IoU `[N, M]` float32.

  inter = prod(clamp(min(x2) - max(x1), 0)); iou = inter / (area1 + area2 - inter) where
  inter > 0, else 0 (so empty / non-overlapping pairs give 0, never NaN). Values are bit-identical
  to detectron2's float32 arithmetic (see module docstring). Differentiable (gradient-safe where).
  """
  boxes1 = jnp.asarray(boxes1, jnp.float32)
  boxes2 = jnp.asarray(boxes2, jnp.float32)
  zero = runtime_zero(boxes1[..., :1])
  area1 = no_fma(box_area(boxes1), zero)
  area2 = no_fma(box_area(boxes2), zero)
  wh = jnp.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:]) - jnp.maximum(
      boxes1[:, None, :2], boxes2[None, :, :2]
  )
  wh = jnp.maximum(wh, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = (area1[:, None] + area2[None, :]) - no_fma(inter, zero)
  pos = inter > 0
  return jnp.where(pos, inter / jnp.where(pos, union, 1.0), 0.0)


def _centers_sizes(boxes: jax.Array):
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  cx = boxes[..., 0] + 0.5 * w
  cy = boxes[..., 1] + 0.5 * h
  return cx, cy, w, h


def encode_boxes(src: jax.Array, target: jax.Array, weights: Sequence[float]) -> jax.Array:
  """detectron2 `Box2BoxTransform.get_deltas`: `src [..., 4]`, `target [..., 4]` -> `[..., 4]`.

  dx = wx * (tx - sx) / sw, dy = wy * (ty - sy) / sh, dw = ww * log(tw / sw),
  dh = wh * log(th / sh), with widths x2 - x1 and centres x1 + 0.5 * w. Degenerate (zero-width)
  src/target boxes give inf/NaN exactly as in detectron2 (which asserts instead); mask them with
  `jnp.where` downstream.
  """
  wx, wy, ww, wh = (float(v) for v in weights)
  src = jnp.asarray(src, jnp.float32)
  target = jnp.asarray(target, jnp.float32)
  sx, sy, sw, sh = _centers_sizes(src)
  tx, ty, tw, th = _centers_sizes(target)
  dx = wx * (tx - sx) / sw
  dy = wy * (ty - sy) / sh
  dw = ww * jnp.log(tw / sw)
  dh = wh * jnp.log(th / sh)
  return jnp.stack([dx, dy, dw, dh], axis=-1)


def decode_boxes(
    deltas: jax.Array,
    boxes: jax.Array,
    weights: Sequence[float],
    scale_clamp: float,
) -> jax.Array:
  """detectron2 `Box2BoxTransform.apply_deltas` (class-agnostic, 4 deltas per box).

  Args:
    deltas: `[..., 4]` (dx, dy, dw, dh), any float dtype (computed in float32).
    boxes: `[..., 4]` reference boxes, broadcastable against `deltas`.
    weights: (wx, wy, ww, wh); the deltas are divided by them (a cascade stage's
      `config.model.roi_heads.box_weights` entry).
    scale_clamp: dw / dh are clamped from above at this value before `exp`
      (`config.model.roi_heads.scale_clamp`, detectron2's log(1000 / 16)).
  Returns:
    `[..., 4]` float32 boxes: centre = d * size + ctr, size = exp(d) * size,
    x1 = ctr - 0.5 * w, x2 = ctr + 0.5 * w (likewise y).
  """
  wx, wy, ww, wh = (float(v) for v in weights)
  deltas = jnp.asarray(deltas, jnp.float32)
  boxes = jnp.asarray(boxes, jnp.float32)
  cx, cy, w, h = _centers_sizes(boxes)
  dx = deltas[..., 0] / wx
  dy = deltas[..., 1] / wy
  dw = jnp.minimum(deltas[..., 2] / ww, scale_clamp)
  dh = jnp.minimum(deltas[..., 3] / wh, scale_clamp)
  pcx = dx * w + cx
  pcy = dy * h + cy
  pw = jnp.exp(dw) * w
  ph = jnp.exp(dh) * h
  return jnp.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], axis=-1)


def clip_boxes(boxes: jax.Array, hw: jax.Array) -> jax.Array:
  """detectron2 `Boxes.clip`: x clamped to [0, w], y to [0, h].

  Args:
    boxes: `[..., N, 4]`.
    hw: image (h, w), either per image `[..., 2]` (leading dims of `boxes` without N; an N axis is
      inserted) or already per box / broadcastable `[..., 1 or N, 2]` (same rank as `boxes`).
  Returns:
    `[..., N, 4]` float32.
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  hw = jnp.asarray(hw).astype(jnp.float32)
  if hw.ndim == boxes.ndim - 1:
    hw = hw[..., None, :]
  elif hw.ndim != boxes.ndim:
    raise ValueError(f"clip_boxes: hw shape {hw.shape} does not fit boxes shape {boxes.shape}")
  h = hw[..., 0]
  w = hw[..., 1]
  x1 = jnp.clip(boxes[..., 0], 0.0, w)
  y1 = jnp.clip(boxes[..., 1], 0.0, h)
  x2 = jnp.clip(boxes[..., 2], 0.0, w)
  y2 = jnp.clip(boxes[..., 3], 0.0, h)
  return jnp.stack([x1, y1, x2, y2], axis=-1)


def nonempty(boxes: jax.Array, threshold: float = 0.0) -> jax.Array:
  """detectron2 `Boxes.nonempty`: `[..., 4]` -> bool `[...]`, (w > threshold) & (h > threshold)."""
  boxes = jnp.asarray(boxes, jnp.float32)
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  return (w > threshold) & (h > threshold)
