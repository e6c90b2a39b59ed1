"""CenterNet training targets for one image (docs/centernet2.md §3.1-§3.3, §3.5, §3.7).

Mirrors the official `CenterNet._get_ground_truth` / `_get_label_inds` / `assign_fpn_level` /
`assign_reg_fpn` / `get_center3x3` / `_get_reg_targets` / `_create_agn_heatmaps_from_dist`
(xingyizhou/CenterNet2 `centernet/modeling/dense_heads/centernet.py`), rewritten with static
shapes: GT arrays are padded to M and masked by `gt_valid`; the positive index *list* becomes a
dense per-location count (docs/centernet2.md §3.7).

Locations are flattened level-major, then row-major (y * W_l + x), i.e. the per-image slice of the
official order. The caller vmaps over images.

Subtle points of the official code that are reproduced here on purpose:
* Grid point of cell (x, y) at stride s: (x*s + s//2, y*s + s//2) (`compute_grids`).
* "Discretised centre" (peak cell) = trunc(c / s) * s + s / 2, with c = (x1 + x2) / 2 in float32 and
  `.int()` truncation (= floor, centres are >= 0). A location is the peak of a GT iff its grid point
  equals that exactly; this is evaluated at EVERY level, cared or not (docs/centernet2.md §3.3).
* Squared distance d² is to the continuous centre, forced to 0 at each GT's peak cell; the
  same normalised d²/r² drives both the heatmap (min over GTs) and the regression tie-break
  (argmin over qualifying GTs; first GT wins exact ties, e.g. two GTs sharing a peak cell).
  With `all_level_peaks=False` (the MMDet port's "revised" distance map, yyz561
  `original_dis_map=False`, docs/centernet2.md §3.7) d² is forced to 0 only at the peaks of the
  levels where the GT is cared (regression-side criterion, as that port computes it): a peak at
  another level keeps its true distance, so it becomes a down-weighted negative instead of an
  ignored cell. Regression targets do not change (they only involve cared levels).
* r² = max(float32(2 δ²) * area, min_radius²) with area = w*h in float32 and 2δ² formed in
  Python double first, as `self.delta ** 2 * 2 * area` does.
* Heatmap values < 1e-4 are set to 0.
* 3x3 rule (`get_center3x3`): |gx - cdx| <= s and |gy - cdy| <= s from the discretised centre,
  AND strictly inside the box (min(l, t, r, b) > 0).
* The regression-side SOI criterion is recomputed per location from the ltrb target
  (`assign_reg_fpn`: sqrt((l + r)² + (t + b)²) / 2 with l = gx - x1, r = x2 - gx in float32),
  while the positive-side criterion (`assign_fpn_level`) uses sqrt(w² + h²) / 2 of the box.
  They are equal in exact arithmetic but may differ by float32 rounding at an SOI bound, so each
  side uses its own formula, as the official code does. Both bounds are inclusive.
* Regression locations are those whose masked minimum is < INF (1e8); the target is the chosen
  GT's pixel ltrb divided by the level stride. Where `reg_valid` is False the official target is
  -INF; here it is 0 (callers must use `reg_valid`).
* Positives: one entry per (valid GT, cared level) at index trunc(cy/s) * W_l + trunc(cx/s)
  (`_get_label_inds`), duplicates counted (official) or clipped to 1 (`dedup_positives`, MMDet).
  The official code does no bounds check; an index past the level's end (impossible when the
  centre lies inside the padded image) would land in another level/image there and is dropped
  here. A column index >= W_l with a row index in range wraps to the next row, as in the official.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

INF = 100000000.0  # official INF (1e8), exactly representable in float32


def _level_constants(level_shapes, strides, soi):
  """Per-location float32 grid x/y, stride, SOI lower/upper bound (numpy, static)."""
  gx, gy, s, lo, hi = [], [], [], [], []
  for (h, w), st, (a, b) in zip(level_shapes, strides, soi):
    xs = np.arange(w, dtype=np.float32) * np.float32(st) + np.float32(st // 2)
    ys = np.arange(h, dtype=np.float32) * np.float32(st) + np.float32(st // 2)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    n = h * w
    gx.append(xx.reshape(-1))
    gy.append(yy.reshape(-1))
    s.append(np.full((n,), st, np.float32))
    lo.append(np.full((n,), a, np.float32))
    hi.append(np.full((n,), b, np.float32))
  return [np.concatenate(v).astype(np.float32) for v in (gx, gy, s, lo, hi)]


def centernet_targets(
    gt_boxes: jax.Array,
    gt_valid: jax.Array,
    level_shapes: Sequence[Tuple[int, int]],
    strides: Sequence[int],
    soi: Sequence[Tuple[float, float]],
    hm_min_overlap: float,
    min_radius: float,
    dedup_positives: bool,
    all_level_peaks: bool,
    gt_classes: Optional[jax.Array] = None,
    num_classes: Optional[int] = None,
) -> Dict[str, jax.Array]:
  """CenterNet targets for one image. Every setting is required: the values live in the config
  schema (`config.model.centernet`, cn2_jax/config.py) and `CenterNet` passes them.

  Args:
    gt_boxes: `[M, 4]` xyxy boxes in input pixels (padded rows arbitrary).
    gt_valid: `[M]` bool, True for real GT.
    level_shapes: static ((H_l, W_l), ...) of the feature maps, same length as `strides`.
    strides, soi: per-level stride and inclusive half-diagonal range.
    hm_min_overlap: δ = (1 - o) / (1 + o).
    min_radius: r² floor is min_radius².
    dedup_positives: False = official duplicated positives; True = min(count, 1) (MMDet ports).
    all_level_peaks: True = official (d² = 0 at a GT's peak on every level); False = only on its
      cared levels (MMDet "revised" distance map).
    gt_classes, num_classes: with num_classes given, `[M]` int class indices in [0, num_classes):
      also the class-specific heatmaps of the official one-stage mode (`_create_heatmaps_from_dist`:
      channel c = exp(-min over the valid GTs of class c of d²/r²), values < 1e-4 set to 0, all 0
      where the class has no GT). Only the one-stage detector (`onestage_targets`) asks for them.

  Returns dict with L = Σ_l H_l W_l (level-major, row-major):
    heatmap `[L]` f32, pos_count `[L]` f32, reg_target `[L, 4]` f32 (ltrb / stride, 0 where
    invalid), reg_valid `[L]` bool; with num_classes also class_heatmap `[L, num_classes]` f32
    (`heatmap` equals its maximum over the classes).
  """
  level_shapes = tuple((int(h), int(w)) for h, w in level_shapes)
  strides = tuple(int(s) for s in strides)
  if not (len(level_shapes) == len(strides) == len(soi)):
    raise ValueError("centernet_targets: level_shapes, strides and soi must have equal length")
  f32 = jnp.float32
  gx, gy, st, lo, hi = (jnp.asarray(v) for v in _level_constants(level_shapes, strides, soi))
  num_loc = gx.shape[0]

  valid = gt_valid.astype(bool)
  # Sanitise padded rows so garbage (NaN/inf) cannot leak through masked arithmetic.
  boxes = jnp.where(valid[:, None], gt_boxes.astype(f32), jnp.zeros((), f32))
  x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]  # [N]
  cx = (x1 + x2) / 2
  cy = (y1 + y2) / 2
  area = (x2 - x1) * (y2 - y1)

  # ---- dense [L, N] quantities -------------------------------------------------------------
  gxe, gye, ste = gx[:, None], gy[:, None], st[:, None]
  l = gxe - x1[None]
  t = gye - y1[None]
  r = x2[None] - gxe
  b = y2[None] - gye
  cdx = jnp.trunc(cx[None] / ste) * ste + ste / 2  # discretised centre at each location's level
  cdy = jnp.trunc(cy[None] / ste) * ste + ste / 2
  is_peak = (gxe == cdx) & (gye == cdy)
  in_box = jnp.minimum(jnp.minimum(l, t), jnp.minimum(r, b)) > 0
  center3x3 = (jnp.abs(gxe - cdx) <= ste) & (jnp.abs(gye - cdy) <= ste) & in_box
  crit_reg = jnp.sqrt(jnp.square(l + r) + jnp.square(t + b)) / 2
  cared_reg = (crit_reg >= lo[:, None]) & (crit_reg <= hi[:, None])
  reg_mask = center3x3 & cared_reg & valid[None]

  dist2 = jnp.square(gxe - cx[None]) + jnp.square(gye - cy[None])
  forced = is_peak if all_level_peaks else is_peak & cared_reg
  dist2 = jnp.where(forced, jnp.zeros((), f32), dist2)
  delta = (1.0 - hm_min_overlap) / (1.0 + hm_min_overlap)
  coef = np.float32(delta**2 * 2)
  radius2 = jnp.maximum(coef * area, np.float32(min_radius**2))  # [N]
  wdist = dist2 / radius2[None]
  wdist = jnp.where(valid[None], wdist, jnp.inf)

  # ---- heatmap ------------------------------------------------------------------------------
  hm = jnp.exp(-jnp.min(wdist, axis=1)) if wdist.shape[1] else jnp.zeros((num_loc,), f32)
  hm = jnp.where(hm < 1e-4, jnp.zeros((), f32), hm)
  class_hm = None
  if num_classes:
    if gt_classes is None:
      raise ValueError("centernet_targets: num_classes needs gt_classes")
    # Per-class minimum over the GTs as one scatter-min ([M, L] -> [C, L]); padded GTs get an
    # out-of-range segment (dropped), classes without a GT keep the identity +inf -> exp = 0.
    seg = jnp.where(valid, gt_classes.astype(jnp.int32), num_classes)
    cmin = jax.ops.segment_min(wdist.T, seg, num_segments=num_classes)
    class_hm = jnp.exp(-cmin.T)
    class_hm = jnp.where(class_hm < 1e-4, jnp.zeros((), f32), class_hm)

  # ---- regression ---------------------------------------------------------------------------
  if wdist.shape[1]:
    rd = jnp.where(reg_mask, wdist, np.float32(INF))
    idx = jnp.argmin(rd, axis=1)  # first minimum, like torch.min(dim)
    min_d = jnp.take_along_axis(rd, idx[:, None], axis=1)[:, 0]
    reg_valid = min_d < np.float32(INF)
    # ltrb of the chosen GT, recomputed from its coordinates (same float32 ops as l, t, r, b; avoids
    # gathering from the [L, N, 4] array).
    sel = jnp.stack([gx - x1[idx], gy - y1[idx], x2[idx] - gx, y2[idx] - gy], axis=-1)
    tgt = sel / st[:, None]
    reg_target = jnp.where(reg_valid[:, None], tgt, jnp.zeros((), f32))
  else:
    reg_valid = jnp.zeros((num_loc,), bool)
    reg_target = jnp.zeros((num_loc, 4), f32)

  # ---- positives (one per valid GT x cared level; duplicates kept) --------------------------
  crit_box = jnp.sqrt(jnp.square(x2 - x1) + jnp.square(y2 - y1)) / 2  # [N]
  counts = jnp.zeros((num_loc,), f32)
  base = 0
  for (h, w), s_l, (a, bnd) in zip(level_shapes, strides, soi):
    cared = (crit_box >= np.float32(a)) & (crit_box <= np.float32(bnd)) & valid
    ix = jnp.trunc(cx / np.float32(s_l)).astype(jnp.int32)
    iy = jnp.trunc(cy / np.float32(s_l)).astype(jnp.int32)
    local = iy * w + ix
    ok = cared & (local >= 0) & (local < h * w)
    flat = jnp.where(ok, base + local, num_loc)  # num_loc = out of range -> dropped
    counts = counts.at[flat].add(ok.astype(f32), mode="drop")
    base += h * w
  if dedup_positives:
    counts = jnp.minimum(counts, 1.0)

  out = dict(
      heatmap=hm.astype(f32),
      pos_count=counts,
      reg_target=reg_target.astype(f32),
      reg_valid=reg_valid,
  )
  if class_hm is not None:
    out["class_heatmap"] = class_hm.astype(f32)
  return out
