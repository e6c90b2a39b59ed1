"""Training targets of the official one-stage CenterNet (class heatmaps, ONLY_PROPOSAL False).

Official: `centernet/modeling/dense_heads/centernet.py`, `CenterNet`: `_get_ground_truth`
(`_create_heatmaps_from_dist`, `_get_reg_targets`, `get_center3x3`, `assign_reg_fpn`),
`_get_label_inds` (MORE_POS False) and `_add_more_pos` / `_get_c33_inds` (MORE_POS True; the
CenterNet-FPN_R50_1x and Base_S4_DLA yamls set it).

What is shared with CenterNet2's class-agnostic proposal targets comes from
`targets.centernet_targets` (same distances, radii, SOI rules, regression targets; the official
code path is the same function): the class heatmaps are its `class_heatmap` output, the agnostic
heatmap (the official `flattened_hms.max(dim=1)`, the regression weights of NOT_NORM_REG False and
the target of the WITH_AGN_HM loss) its `heatmap`. The positives (a list of (location, class)
entries, duplicates kept) are computed here:

* MORE_POS False (`_get_label_inds`): one entry per (GT, level whose SOI range holds the box's
  half-diagonal) at the GT centre's cell trunc(c / s), labelled with the GT's class.
* MORE_POS True (`_add_more_pos`), per GT, over every level (SOI or not) and the 3x3 cells
  around its centre cell (row-major, K = 9):
  - reg = (g - x1, g - y1, x2 - g, y2 - g) / s at the centre cell's grid point g = trunc(c / s) * s
    + s // 2 (float32), shifted by the offset for the neighbours: (l + dx, t + dy, r - dx, b - dy);
  - a candidate is valid when the cell is on the feature map and min(shifted reg) >= 0;
  - its cost is the GIoU loss of the head's (detached) prediction at that cell against
    max(shifted reg, 0); invalid candidates cost INF (1e8); the centre cell of every level where
    the GT is "cared" (min(reg) >= 0 and the box half-diagonal in the SOI range) costs 0;
  - threshold = min(k-th smallest cost over the L x 9 candidates (MORE_POS_TOPK), MORE_POS_THRESH);
    positives = candidates with cost < threshold (strict: with one level and k = 9 the most
    expensive of 9 valid candidates is never one).
  So a GT whose centre grid point lies outside the box at every level (a box narrower than the
  stride between grid points) and has no other valid cell gets no positive at all, and positives
  can lie on levels outside the GT's SOI range.

Differences to the official code, all in cases our data never produces (boxes are clipped to the
image, so centres lie on the feature maps): a positive whose cell is off the feature map (the
official forced-0 centre of a GT whose centre cell is outside the map, which lands at flattened
index 0 there; MORE_POS False: an index past the level) is dropped here. Images are independent
(`jax.vmap`); locations are level-major then row-major per image, the per-image slice of the
official level-first order.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from cn2_jax.modeling.proposal.losses import ltrb_giou_loss
from cn2_jax.modeling.proposal.targets import INF, centernet_targets

f32 = jnp.float32

# The 3x3 neighbourhood of `_get_c33_inds`, row-major: k = 3 * (dy + 1) + (dx + 1); k = 4 = centre.
_C33_DX = np.array([-1, 0, 1, -1, 0, 1, -1, 0, 1], np.int32)
_C33_DY = np.array([-1, -1, -1, 0, 0, 0, 1, 1, 1], np.int32)
_C33_CENTRE = 4


def _level_bases(level_shapes: Sequence[Tuple[int, int]]) -> np.ndarray:
  return np.cumsum([0] + [h * w for h, w in level_shapes[:-1]]).astype(np.int32)


def _box_cared(boxes: jax.Array, soi: Sequence[Tuple[float, float]]) -> jax.Array:
  """`assign_fpn_level`: `[M, L]` bool, half-diagonal of the box within each SOI range."""
  crit = jnp.sqrt(jnp.sum(jnp.square(boxes[:, 2:] - boxes[:, :2]), axis=1)) / 2  # [M]
  lo = jnp.asarray([a for a, _ in soi], f32)
  hi = jnp.asarray([b for _, b in soi], f32)
  return (crit[:, None] >= lo[None]) & (crit[:, None] <= hi[None])


def centre_positives(
    boxes: jax.Array,
    classes: jax.Array,
    valid: jax.Array,
    level_shapes: Sequence[Tuple[int, int]],
    strides: Sequence[int],
    soi: Sequence[Tuple[float, float]],
) -> Dict[str, jax.Array]:
  """`_get_label_inds` (MORE_POS False) for one image: `[M * L]` entries (GT-major)."""
  num_levels = len(strides)
  st = jnp.asarray(strides, f32)
  cx = (boxes[:, 0] + boxes[:, 2]) / 2
  cy = (boxes[:, 1] + boxes[:, 3]) / 2
  ix = jnp.trunc(cx[:, None] / st[None]).astype(jnp.int32)  # [M, L] (`.long()`)
  iy = jnp.trunc(cy[:, None] / st[None]).astype(jnp.int32)
  widths = jnp.asarray([w for _, w in level_shapes], jnp.int32)
  sizes = jnp.asarray([h * w for h, w in level_shapes], jnp.int32)
  local = iy * widths[None] + ix
  ok = _box_cared(boxes, soi) & valid[:, None] & (local >= 0) & (local < sizes[None])
  index = jnp.asarray(_level_bases(level_shapes))[None] + local
  label = jnp.broadcast_to(classes[:, None], (boxes.shape[0], num_levels))
  return dict(
      pos_index=jnp.where(ok, index, 0).reshape(-1),
      pos_label=jnp.where(ok, label, 0).reshape(-1),
      pos_valid=ok.reshape(-1),
  )


def more_positives(
    boxes: jax.Array,
    classes: jax.Array,
    valid: jax.Array,
    reg_pred: jax.Array,
    level_shapes: Sequence[Tuple[int, int]],
    strides: Sequence[int],
    soi: Sequence[Tuple[float, float]],
    more_pos_thresh: float,
    more_pos_topk: int,
) -> Dict[str, jax.Array]:
  """`_add_more_pos` (MORE_POS True) for one image: `[M * L * 9]` candidate entries (GT, level,
  3x3 cell), `pos_valid` marks the positives; also `c33_cost [M, L, 9]` (INF where invalid)."""
  num_levels, k = len(strides), _C33_DX.shape[0]
  if not 1 <= more_pos_topk <= num_levels * k:
    raise ValueError(f"more_pos_topk={more_pos_topk} must be in [1, {num_levels * k}]")
  st = jnp.asarray(strides, f32)  # [L]
  cx = (boxes[:, 0] + boxes[:, 2]) / 2
  cy = (boxes[:, 1] + boxes[:, 3]) / 2
  ix = jnp.trunc(cx[:, None] / st[None]).astype(jnp.int32)  # [M, L]
  iy = jnp.trunc(cy[:, None] / st[None]).astype(jnp.int32)
  half = jnp.asarray([s // 2 for s in strides], f32)  # `strides // 2` on the float tensor
  gx = ix.astype(f32) * st[None] + half[None]
  gy = iy.astype(f32) * st[None] + half[None]
  reg = (
      jnp.stack(
          [gx - boxes[:, 0:1], gy - boxes[:, 1:2], boxes[:, 2:3] - gx, boxes[:, 3:4] - gy], axis=-1
      )
      / st[None, :, None]
  )  # [M, L, 4]
  level_mask = (jnp.min(reg, axis=-1) >= 0) & _box_cared(boxes, soi) & valid[:, None]

  dx, dy = jnp.asarray(_C33_DX), jnp.asarray(_C33_DY)
  nx = ix[..., None] + dx  # [M, L, K]
  ny = iy[..., None] + dy
  heights = jnp.asarray([h for h, _ in level_shapes], jnp.int32)[None, :, None]
  widths = jnp.asarray([w for _, w in level_shapes], jnp.int32)[None, :, None]
  on_map = (ny < heights) & (ny >= 0) & (nx < widths) & (nx >= 0)
  # (l + dx, t + dy, r - dx, b - dy): the official `c33_reg[...] -= 1 / += 1` (exact in float32)
  shift = jnp.stack([dx, dy, -dx, -dy], axis=-1).astype(f32)  # [K, 4]
  c33_reg = reg[:, :, None, :] + shift[None, None]  # [M, L, K, 4]
  c33_valid = on_map & (jnp.min(c33_reg, axis=-1) >= 0) & valid[:, None, None]
  index = jnp.asarray(_level_bases(level_shapes))[None, :, None] + ny * widths + nx
  index = jnp.where(on_map, index, 0)

  pred = jax.lax.stop_gradient(reg_pred.astype(f32))[index]  # [M, L, K, 4]
  cost = ltrb_giou_loss(pred, jnp.maximum(c33_reg, 0.0))
  cost = jnp.where(c33_valid, cost, np.float32(INF))
  centre = (jnp.arange(k) == _C33_CENTRE)[None, None]
  cost = jnp.where(centre & level_mask[..., None], jnp.zeros((), f32), cost)
  kth = jnp.sort(cost.reshape(cost.shape[0], -1), axis=1)[:, more_pos_topk - 1]  # `kthvalue`
  thresh = jnp.minimum(kth, np.float32(more_pos_thresh))
  positive = (cost < thresh[:, None, None]) & on_map & valid[:, None, None]
  label = jnp.broadcast_to(classes[:, None, None], positive.shape)
  return dict(
      pos_index=index.reshape(-1),
      pos_label=jnp.where(positive, label, 0).reshape(-1),
      pos_valid=positive.reshape(-1),
      c33_cost=cost,
  )


def onestage_targets(
    gt_boxes: jax.Array,
    gt_classes: jax.Array,
    gt_valid: jax.Array,
    reg_pred: jax.Array,
    *,
    level_shapes: Sequence[Tuple[int, int]],
    strides: Sequence[int],
    soi: Sequence[Tuple[float, float]],
    num_classes: int,
    hm_min_overlap: float,
    min_radius: float,
    more_pos: bool,
    more_pos_thresh: float,
    more_pos_topk: int,
) -> Dict[str, jax.Array]:
  """Targets of the official one-stage CenterNet for one image (`jax.vmap` over the batch).

  Args:
    gt_boxes: `[M, 4]` xyxy input pixels; gt_classes `[M]` int in [0, num_classes); gt_valid `[M]`.
    reg_pred: `[L, 4]` the head's regression (relu(scale * bbox_pred), stride units), all levels
      flattened; only read with more_pos (detached: the selection has no gradient).
    level_shapes, strides, soi: per level (H_l, W_l), stride, inclusive SOI range (`FPN_STRIDES`,
      `SOI`).
    num_classes, hm_min_overlap, min_radius, more_pos, more_pos_thresh, more_pos_topk:
      `NUM_CLASSES`, `HM_MIN_OVERLAP`, `MIN_RADIUS`, `MORE_POS`, `MORE_POS_THRESH`,
      `MORE_POS_TOPK`.

  Returns (L = Σ_l H_l W_l; P = M * num_levels * 9 with more_pos, else M * num_levels):
    heatmap `[L, C]`, agn_heatmap `[L]` (its max over classes), reg_target `[L, 4]` (ltrb /
    stride, 0 where invalid), reg_valid `[L]` bool, pos_index `[P]` int32 (location),
    pos_label `[P]` int32, pos_valid `[P]` bool.
  """
  level_shapes = tuple((int(h), int(w)) for h, w in level_shapes)
  strides = tuple(int(s) for s in strides)
  soi = tuple((float(a), float(b)) for a, b in soi)
  if not len(level_shapes) == len(strides) == len(soi):
    raise ValueError(
        f"onestage_targets: {len(level_shapes)} levels, {len(strides)} strides, "
        f"{len(soi)} SOI ranges (one per level)"
    )
  base = centernet_targets(
      gt_boxes,
      gt_valid,
      level_shapes,
      strides,
      soi,
      hm_min_overlap,
      min_radius,
      dedup_positives=False,
      all_level_peaks=True,
      gt_classes=gt_classes,
      num_classes=num_classes,
  )
  valid = gt_valid.astype(bool)
  boxes = jnp.where(valid[:, None], gt_boxes.astype(f32), jnp.zeros((), f32))
  classes = gt_classes.astype(jnp.int32)
  if more_pos:
    pos = more_positives(
        boxes,
        classes,
        valid,
        reg_pred,
        level_shapes,
        strides,
        soi,
        more_pos_thresh,
        more_pos_topk,
    )
    pos.pop("c33_cost")
  else:
    pos = centre_positives(boxes, classes, valid, level_shapes, strides, soi)
  return dict(
      heatmap=base["class_heatmap"],
      agn_heatmap=base["heatmap"],
      reg_target=base["reg_target"],
      reg_valid=base["reg_valid"],
      pos_index=pos["pos_index"].astype(jnp.int32),
      pos_label=pos["pos_label"].astype(jnp.int32),
      pos_valid=pos["pos_valid"],
  )
