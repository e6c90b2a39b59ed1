"""IoU matcher: detectron2 `Matcher([t], [0, 1], allow_low_quality_matches=False)`.

Used by the cascade ROI heads (docs/centernet2.md §5.1: IoU >= 0.6 / 0.7 / 0.8 is foreground, no
ignore band, no low-quality matches). Static shapes: padded GT with a validity mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cn2_jax.modeling.ops.boxes import pairwise_iou


def match_boxes(
    boxes: jax.Array, gt_boxes: jax.Array, gt_valid: jax.Array, iou_threshold: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Matches each box to its highest-IoU valid GT box (one image; vmap for a batch).

  Args:
    boxes: `[N, 4]` float32 proposals.
    gt_boxes: `[M, 4]` float32 GT boxes (padded).
    gt_valid: `[M]` bool, which GT rows are real.
    iou_threshold: Python float t; a box is foreground iff its max IoU >= t (compared in float32,
      like PyTorch's tensor-vs-Python-scalar comparison).
  Returns:
    matched_idx: `[N]` int32 index into `gt_boxes` of the best valid GT (the first one on ties,
      like `torch.max`); 0 when there is no valid GT.
    is_fg: `[N]` bool, max IoU >= t (all False when there is no valid GT).
    max_iou: `[N]` float32 IoU with the matched GT (0 when there is no valid GT).
  """
  n = boxes.shape[0]
  m = gt_boxes.shape[0]
  if m == 0:
    return (jnp.zeros((n,), jnp.int32), jnp.zeros((n,), bool), jnp.zeros((n,), jnp.float32))
  gt_valid = jnp.asarray(gt_valid).astype(bool)
  iou = pairwise_iou(boxes, gt_boxes)  # [N, M]
  iou = jnp.where(gt_valid[None, :], iou, -1.0)  # real IoUs are >= 0
  matched = jnp.argmax(iou, axis=1).astype(jnp.int32)
  max_iou = jnp.max(iou, axis=1)
  any_gt = jnp.any(gt_valid)
  matched = jnp.where(any_gt, matched, 0)
  max_iou = jnp.where(any_gt, max_iou, 0.0)
  is_fg = any_gt & (max_iou >= jnp.float32(iou_threshold))
  return matched, is_fg, max_iou
