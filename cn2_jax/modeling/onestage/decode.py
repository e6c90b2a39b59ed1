"""centerX decoding (`modeling/layers/centernet_decode.py::CenterNetDecoder.decode` and
`CenterNet.inference`, docs/onestage.md §2.5), inside jit.

1. Pseudo-NMS: keep = (maxpool3x3 (stride 1, pad 1, -inf padding)(heat) == heat),
   heat <- heat * keep. Every pixel of a plateau of equal maxima survives.
2. Top-K per class over H*W, then top-K of the C*K candidates: score, class = index // K,
   y = pixel // W, x = pixel % W. Ties go to the lower index (`lax.top_k`; torch's CPU topk
   order among exactly equal scores is not specified).
3. x += reg[..., 0], y += reg[..., 1] at that pixel (+0.5 when there is no reg head); (w, h) from
   wh[..., 0], wh[..., 1] at that pixel.
4. Box = (x - w/2, y - h/2, x + w/2, y + h/2) in feature units, times `down_scale` -> input
   (resized-image) pixels.
No score threshold and no NMS: all K detections are returned.

centerX never clamps w, h, so a negative prediction gives an inverted box (x2 < x1).
`clamp_wh=False` reproduces that (parity); the default `clamp_wh=True` uses max(w, 0), max(h, 0).
"""

from __future__ import annotations

from typing import Dict, Optional

import jax
import jax.numpy as jnp

from cn2_jax.modeling import export_mode


def pseudo_nms(heat: jax.Array, pool_size: int = 3) -> jax.Array:
  """`heat [B, H, W, C]` -> heat * (maxpool(heat) == heat) (torch max_pool2d, -inf padding).

  The suppression is an equality with the pooled max (Equal + Mul in ONNX), safe in fp16: the
  pooled max is one of the inputs, bit for bit, and no 1e-9 / 1e9 constant (which fp16 flushes to
  0 / inf) is involved. The max-pool is `export_mode.max_pool` (a 2-D flax max_pool while
  converting to ONNX)."""
  hmax = export_mode.max_pool(heat, pool_size, 1, (pool_size - 1) // 2)
  return heat * (hmax == heat).astype(heat.dtype)


def topk_score(heat: jax.Array, k: int = 100):
  """Two-stage top-K of `heat [B, H, W, C]` (already pseudo-NMSed).

  Returns: scores `[B, K]`, pixel index `[B, K]` int32 (y * W + x), classes `[B, K]` int32,
  ys `[B, K]` int32, xs `[B, K]` int32.

  `export_mode.top_k` and `export_mode.int_divmod`, the batch as -1 in reshapes: while converting
  to ONNX (`export_mode.onnx_ops()`) they take the forms jax2onnx converts, with the same values
  and indices.
  """
  _, h, w, c = heat.shape
  per_class = jnp.transpose(heat, (0, 3, 1, 2)).reshape(-1, c, h * w)
  k1 = min(k, h * w)
  cls_scores, cls_inds = export_mode.top_k(per_class, k1)  # [B, C, K1]
  scores, idx = export_mode.top_k(cls_scores.reshape(-1, c * k1), min(k, c * k1))
  classes, _ = export_mode.int_divmod(idx, k1)
  pix = jnp.take_along_axis(cls_inds.reshape(-1, c * k1), idx, axis=1).astype(jnp.int32)
  ys, xs = export_mode.int_divmod(pix, w)
  return scores, pix, classes.astype(jnp.int32), ys, xs


def decode(
    heat: jax.Array,
    wh: jax.Array,
    reg: Optional[jax.Array] = None,
    *,
    k: int = 100,
    down_scale: float = 4.0,
    clamp_wh: bool = True,
) -> Dict[str, jax.Array]:
  """Args:
    heat: `[B, H, W, C]` sigmoided heatmap; wh: `[B, H, W, 2]`; reg: `[B, H, W, 2]` or None.
    k: detections per image (centerX hard-codes 100).
    down_scale: output stride (feature units -> input pixels).
    clamp_wh: clamp w, h at 0 (False = official, inverted boxes possible).
  Returns:
    dict `boxes [B, K, 4]` (input pixels), `scores [B, K]`, `classes [B, K]` int32,
    `valid [B, K]` bool (all True: no threshold), and `boxes_feat [B, K, 4]` (feature units),
    `index [B, K]` int32 (y * W + x), `ys`, `xs` `[B, K]` int32.
  """
  b, h, w, _ = heat.shape
  heat = pseudo_nms(heat.astype(jnp.float32))
  scores, pix, classes, ys, xs = topk_score(heat, k)
  kk = scores.shape[1]
  gather = lambda m: jnp.take_along_axis(  # noqa: E731
      m.astype(jnp.float32).reshape(b, h * w, -1), pix[:, :, None], axis=1
  )  # [B, K, D]
  x = xs.astype(jnp.float32)
  y = ys.astype(jnp.float32)
  if reg is not None:
    off = gather(reg)
    x = x + off[..., 0]
    y = y + off[..., 1]
  else:
    x = x + 0.5
    y = y + 0.5
  size = gather(wh)
  if clamp_wh:
    size = jnp.maximum(size, 0.0)
  half_w = size[..., 0] / 2
  half_h = size[..., 1] / 2
  boxes_feat = jnp.stack([x - half_w, y - half_h, x + half_w, y + half_h], axis=-1)
  return {
      "boxes": boxes_feat * jnp.float32(down_scale),
      "scores": scores,
      "classes": classes,
      "valid": jnp.ones((b, kk), bool),
      "boxes_feat": boxes_feat,
      "index": pix,
      "ys": ys,
      "xs": xs,
  }


def rescale_boxes(boxes: jax.Array, image_hw: jax.Array, orig_hw: jax.Array) -> jax.Array:
  """centerX `inference`'s mapping to original pixels: x * (orig_w / resized_w), y likewise,
  **without** clipping (unlike `detector.postprocess_detections`, which clips and drops empty
  boxes as detectron2's `detector_postprocess`). `boxes [B, K, 4]`, hw `[B, 2]`."""
  hw = image_hw.astype(jnp.float32)
  ohw = orig_hw.astype(jnp.float32)
  sx = ohw[:, 1] / hw[:, 1]
  sy = ohw[:, 0] / hw[:, 0]
  return boxes * jnp.stack([sx, sy, sx, sy], axis=-1)[:, None, :]
