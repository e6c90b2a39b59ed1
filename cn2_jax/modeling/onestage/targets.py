"""CenterNet (centerX) training targets for one image, static shapes (docs/onestage.md §3.1,
centerX `modeling/layers/centernet_gt.py::CenterNetGT.generate`).

For the valid GT boxes (xyxy in input pixels of the padded batch canvas), in their order:
  * boxes are scaled by 1 / down_scale (centerX scales them *in place*; here it is a copy);
  * c = ((x1 + x2) / 2, (y1 + y2) / 2), c_int = trunc(c) (torch `.to(int32)`);
  * index = c_int.y * W_out + c_int.x, reg = c - c_int, wh = (x2 - x1, y2 - y1) (feature units);
  * only the first `tensor_dim` valid boxes are used at all (slots 0..tensor_dim-1, reg_mask 1);
    later boxes are dropped, from the heatmap too;
  * heatmap channel `class`: element-wise max of 2-D Gaussians centred at c_int, with radius
    r = int(max(0, R(w, h))) (float w, h), diameter d = 2r + 1, sigma = d / 6, cropped at the
    map borders (CN's `draw_umich_gaussian`). Pixels beyond r (Chebyshev distance) get nothing.

The drawing is dense: every box evaluates its Gaussian on the whole map ([M, H_out, W_out]),
masked to its (2r+1)^2 window, then a scatter-max per class. Memory is M * H_out * W_out floats
per image. The exponent is computed as 18 (dx^2 + dy^2) / d^2 in float32 (both integers, so one
rounding); centerX evaluates it in float64 and casts the Gaussian to float32, so values other than
the peaks (exactly 1) may differ by ~1e-7. centerX's "< eps * max -> 0" cut-off never triggers for
sigma = d / 6 (the smallest value in the window is exp(-9)); it is kept for fidelity.

Radius R(w, h) with o = min_overlap (docs/onestage.md §3.2):
  * `"fixed"` (centerX): min of (b1 - sqrt(b1^2 - 4 c1)) / 2, (b2 - sqrt(b2^2 - 16 c2)) / 8,
    (b3 + sqrt(b3^2 - 16 o c3)) / (8 o), the corrected CornerNet formula;
  * `"cornernet"` (CN / CNB, the buggy original): (b + sqrt(...)) / 2 for all three.
The radius is truncated to an integer, so rounding matters at integer boundaries: the products
that feed additions are shielded from XLA's fused multiply-add (`ops.boxes.no_fma`) so the float32
arithmetic is torch's, operation by operation.

Ignore regions (not in centerX, which drops them from the data; docs/onestage.md §3.8): the rows
flagged `gt_ignore` (the batch's crowd boxes: COCO `iscrowd`, CrowdHuman `extra.ignore` persons
and "mask" regions, WIDER `invalid` faces, VOC `difficult` objects) give `hm_ignore [H, W, C]`:
1.0 on channel `class` of every output cell (i, j) whose square [j, j + 1) x [i, i + 1) overlaps
the ignore box scaled by 1 / down_scale with positive area (x1 < j + 1 and j < x2, the same in y),
except the GT peaks (score_map == 1), which stay positives. The heatmap losses give these cells
no negative term. Static shape: one separable [M, H] x [M, W] x [M, C] product, no host sync.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from cn2_jax.modeling.ops.boxes import no_fma, runtime_zero

RADIUS_FORMULAS = ("fixed", "cornernet")
_EPS64 = 2.220446049250313e-16  # np.finfo(np.float64).eps, centerX's cut-off factor


def gaussian_radius(
    w: jax.Array, h: jax.Array, min_overlap: float = 0.3, formula: str = "fixed"
) -> jax.Array:
  """CornerNet Gaussian radius R(w, h) in float32 (not clamped, not truncated).

  Args:
    w, h: float32 arrays of the same shape (feature units).
    min_overlap: o.
    formula: "fixed" (centerX) or "cornernet" (the original buggy version of CN / CNB).
  Returns:
    float32 array of the same shape.
  """
  if formula not in RADIUS_FORMULAS:
    raise ValueError(f"radius formula must be one of {RADIUS_FORMULAS}, got {formula!r}")
  w = jnp.asarray(w, jnp.float32)
  h = jnp.asarray(h, jnp.float32)
  z = runtime_zero(w)
  o = float(min_overlap)
  f = lambda v: no_fma(v, z)  # noqa: E731 -- keep every product rounded on its own
  # torch evaluates left to right with Python-double constants cast to float32 (wrapped
  # scalars); b ** 2 is b * b.
  b1 = h + w
  c1 = f(f(w * h) * jnp.float32(1 - o)) / jnp.float32(1 + o)
  sq1 = jnp.sqrt(f(b1 * b1) - f(jnp.float32(4) * c1))
  b2 = jnp.float32(2) * (h + w)
  c2 = f(f(jnp.float32(1 - o) * w) * h)
  sq2 = jnp.sqrt(f(b2 * b2) - f(jnp.float32(16) * c2))
  b3 = f(jnp.float32(-2 * o) * (h + w))
  c3 = f(f(jnp.float32(o - 1) * w) * h)
  a3 = 4 * o
  sq3 = jnp.sqrt(f(b3 * b3) - f(jnp.float32(4 * a3) * c3))
  if formula == "fixed":
    r1 = (b1 - sq1) / jnp.float32(2)
    r2 = (b2 - sq2) / jnp.float32(8)
    r3 = (b3 + sq3) / jnp.float32(2 * a3)
  else:
    r1 = (b1 + sq1) / jnp.float32(2)
    r2 = (b2 + sq2) / jnp.float32(2)
    r3 = (b3 + sq3) / jnp.float32(2)
  return jnp.minimum(r1, jnp.minimum(r2, r3))


def gaussian_radius_int(
    w: jax.Array, h: jax.Array, min_overlap: float = 0.3, formula: str = "fixed"
) -> jax.Array:
  """int32 r = trunc(max(R, 0)) (centerX: `clamp_min(radius, 0).type(torch.int)`)."""
  return jnp.maximum(gaussian_radius(w, h, min_overlap, formula), 0.0).astype(jnp.int32)


def draw_gaussians(
    out_hw: Tuple[int, int],
    centers_int: jax.Array,
    radii: jax.Array,
    classes: jax.Array,
    keep: jax.Array,
    num_classes: int,
) -> jax.Array:
  """The heatmap of `draw_umich_gaussian` calls, combined by max.

  Args:
    out_hw: (H, W) of the output map (static).
    centers_int: `[M, 2]` int32 (x, y) peak cells.
    radii: `[M]` int32 radii (>= 0).
    classes: `[M]` int32 class channels.
    keep: `[M]` bool, boxes to draw.
    num_classes: C.
  Returns:
    `[H, W, C]` float32, 0 where nothing is drawn.
  """
  h, w = out_hw
  cx = centers_int[:, 0][:, None, None]
  cy = centers_int[:, 1][:, None, None]
  r = radii[:, None, None]
  dx = jnp.arange(w, dtype=jnp.int32)[None, None, :] - cx  # [M, 1, W]
  dy = jnp.arange(h, dtype=jnp.int32)[None, :, None] - cy  # [M, H, 1]
  d = 2 * r + 1
  # exp(-(dx^2 + dy^2) / (2 sigma^2)) with 2 sigma^2 = d^2 / 18.
  arg = (18 * (dx * dx + dy * dy)).astype(jnp.float32) / (d * d).astype(jnp.float32)
  g = jnp.exp(-arg)
  g = jnp.where(g < _EPS64, 0.0, g)
  inside = (jnp.abs(dx) <= r) & (jnp.abs(dy) <= r) & keep[:, None, None]
  g = jnp.where(inside, g, 0.0)  # [M, H, W]
  cls = jnp.where(keep, classes, num_classes)  # dropped boxes scatter out of range
  heat = jnp.zeros((num_classes, h, w), jnp.float32).at[cls].max(g, mode="drop")
  return jnp.transpose(heat, (1, 2, 0))


def ignore_map(
    out_hw: Tuple[int, int],
    boxes: jax.Array,
    classes: jax.Array,
    ignore: jax.Array,
    num_classes: int,
) -> jax.Array:
  """`[H, W, C]` float32: 1 on channel `classes[m]` of the cells whose square overlaps box m with
  positive area, for every m with `ignore[m]`; 0 elsewhere.

  Args:
    out_hw: (H, W) of the output map (static).
    boxes: `[M, 4]` float32 xyxy in output-map cells (already divided by the stride).
    classes: `[M]` int class channels (out of range: no channel).
    ignore: `[M]` bool, the ignore regions.
  """
  h, w = out_hw
  boxes = jnp.asarray(boxes, jnp.float32)
  xs = jnp.arange(w, dtype=jnp.float32)[None, :]
  ys = jnp.arange(h, dtype=jnp.float32)[None, :]
  in_x = (boxes[:, 0:1] < xs + 1.0) & (xs < boxes[:, 2:3])  # [M, W]
  in_y = (boxes[:, 1:2] < ys + 1.0) & (ys < boxes[:, 3:4])  # [M, H]
  onehot = jax.nn.one_hot(jnp.asarray(classes, jnp.int32), num_classes, dtype=jnp.float32)
  onehot = onehot * jnp.asarray(ignore, jnp.float32)[:, None]  # [M, C]
  count = jnp.einsum("mh,mw,mc->hwc", in_y.astype(jnp.float32), in_x.astype(jnp.float32), onehot)
  return (count > 0).astype(jnp.float32)


def centernet_targets(
    gt_boxes: jax.Array,
    gt_classes: jax.Array,
    gt_valid: jax.Array,
    gt_ignore: Optional[jax.Array] = None,
    *,
    out_hw: Tuple[int, int],
    num_classes: int,
    down_scale: int = 4,
    min_overlap: float = 0.3,
    tensor_dim: int = 128,
    radius_formula: str = "fixed",
) -> Dict[str, jax.Array]:
  """Targets of one image (vmap over the batch).

  Args:
    gt_boxes: `[M, 4]` float32 xyxy in input pixels (of the padded canvas).
    gt_classes: `[M]` int class ids 0..C-1.
    gt_valid: `[M]` bool; invalid rows are ignored. Valid rows keep their order.
    gt_ignore: `[M]` bool, the ignore regions (rows not valid; module docstring); None = none.
    out_hw: output map size (H_canvas // down_scale, W_canvas // down_scale).
  Returns:
    dict: `score_map [H, W, C]` float32, `wh [T, 2]`, `reg [T, 2]` float32 (x, y order),
    `reg_mask [T]` float32, `index [T]` int32 (y * W + x), with T = tensor_dim; unused slots 0;
    `hm_ignore [H, W, C]` float32 (1 = no negative term; zeros when `gt_ignore` is None).
  """
  boxes = jnp.asarray(gt_boxes, jnp.float32) * jnp.float32(1.0 / down_scale)
  valid = jnp.asarray(gt_valid, bool)
  rank = jnp.cumsum(valid.astype(jnp.int32)) - 1
  keep = valid & (rank < tensor_dim)
  slot = jnp.where(keep, rank, tensor_dim)  # out of range -> dropped by the scatters

  centers = (boxes[:, :2] + boxes[:, 2:]) / jnp.float32(2)
  centers_int = centers.astype(jnp.int32)  # trunc, like torch .to(int32)
  wh = boxes[:, 2:] - boxes[:, :2]
  reg = centers - centers_int.astype(jnp.float32)
  index = centers_int[:, 1] * out_hw[1] + centers_int[:, 0]

  radii = gaussian_radius_int(wh[:, 0], wh[:, 1], min_overlap, radius_formula)
  score_map = draw_gaussians(
      out_hw, centers_int, radii, jnp.asarray(gt_classes, jnp.int32), keep, num_classes
  )
  if gt_ignore is None:
    hm_ignore = jnp.zeros_like(score_map)
  else:
    ignore = jnp.asarray(gt_ignore, bool) & ~valid
    inside = ignore_map(out_hw, boxes, gt_classes, ignore, num_classes)
    hm_ignore = jnp.where(score_map == 1.0, 0.0, inside)
  t = tensor_dim
  return {
      "score_map": score_map,
      "hm_ignore": hm_ignore,
      "wh": jnp.zeros((t, 2), jnp.float32).at[slot].set(wh, mode="drop"),
      "reg": jnp.zeros((t, 2), jnp.float32).at[slot].set(reg, mode="drop"),
      "reg_mask": jnp.zeros((t,), jnp.float32).at[slot].set(1.0, mode="drop"),
      "index": jnp.zeros((t,), jnp.int32).at[slot].set(index, mode="drop"),
  }


def batch_targets(
    gt_boxes: jax.Array,
    gt_classes: jax.Array,
    gt_valid: jax.Array,
    gt_ignore: Optional[jax.Array] = None,
    **kwargs,
) -> Dict[str, jax.Array]:
  """`centernet_targets` vmapped over `[B, M, ...]` inputs (same keyword arguments)."""
  if gt_ignore is None:
    fn = lambda b, c, v: centernet_targets(b, c, v, **kwargs)  # noqa: E731
    return jax.vmap(fn)(gt_boxes, gt_classes, gt_valid)
  fn = lambda b, c, v, i: centernet_targets(b, c, v, i, **kwargs)  # noqa: E731
  return jax.vmap(fn)(gt_boxes, gt_classes, gt_valid, gt_ignore)
