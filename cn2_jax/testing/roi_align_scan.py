"""The previous adaptive ROIAlign (`sampling_ratio=0`): a scan over sub-sample offsets.

Test reference only (tests/test_ops_roi_align.py, tests/test_roi_align_separable.py,
bench/roi_align_cpu.py): the model pools with `cn2_jax.modeling.ops.roi_align`, whose adaptive
mode computes the same per-box, per-bin average of bilinear samples as separable contractions of
a support window. This module keeps the former formulation, which follows torchvision's kernel
loop for loop (docs/centernet2.md §5.2): for every sub-sample offset `(iy, ix)` up to the static
cap `(cap_h, cap_w)`, one bilinear sample per bin of every box (4 gathers of `[R, out_h, out_w,
C]`), masked where `iy >= grid_h` or `ix >= grid_w`, accumulated iy outer / ix inner as the kernel
does, and divided by `max(grid_h * grid_w, 1)`. A `lax.scan` runs over the `cap_h * cap_w`
offsets and skips (`lax.cond`) those no box needs; on GPU each predicate is a device-to-host read.
Boxes needing more samples than the cap are sampled with the capped grid (same semantics as the
model's pooler).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from cn2_jax.modeling.ops import roi_align as ra


def _pool_flat_scan(
    table: jax.Array,
    boxes: jax.Array,
    scale: jax.Array,
    base: jax.Array,
    height: jax.Array,
    width: jax.Array,
    out_hw: Tuple[int, int],
    aligned: bool,
    cap_hw: Tuple[int, int],
    extent_h: Optional[jax.Array] = None,
    extent_w: Optional[jax.Array] = None,
) -> jax.Array:
  """Adaptive ROIAlign of R boxes on their `[height, width]` blocks of a flat `[N, C]` table
  (rows `base + y * width + x`); returns `[R, out_h, out_w, C]` in `table.dtype`."""
  dtype = table.dtype
  out_h, out_w = out_hw
  num = boxes.shape[0]
  start_y, start_x, bin_h, bin_w, roi_h, roi_w = ra._roi_geometry(boxes, scale, out_hw, aligned)
  grid_h = jnp.minimum(ra._adaptive_grid(roi_h, out_h), jnp.float32(cap_hw[0]))
  grid_w = jnp.minimum(ra._adaptive_grid(roi_w, out_w), jnp.float32(cap_hw[1]))
  prod = grid_h * grid_w
  count = jnp.where(prod >= 1.0, prod, jnp.float32(1.0))  # max(gh*gw, 1); NaN -> 1.
  pos_h = jnp.where(grid_h >= 1.0, grid_h, jnp.float32(1.0))
  pos_w = jnp.where(grid_w >= 1.0, grid_w, jnp.float32(1.0))
  row_base = base[:, None]
  ext_h = height if extent_h is None else extent_h
  ext_w = width if extent_w is None else extent_w

  def gather(idx):
    return table.at[idx].get(mode="promise_in_bounds")

  def sub_sample(iy, ix):
    y_lo, y_hi, wy_lo, wy_hi = ra._axis_samples(start_y, bin_h, pos_h, iy, ext_h, out_h)
    x_lo, x_hi, wx_lo, wx_hi = ra._axis_samples(start_x, bin_w, pos_w, ix, ext_w, out_w)
    use_y = (jnp.asarray(iy, jnp.float32) < grid_h)[:, None]
    use_x = (jnp.asarray(ix, jnp.float32) < grid_w)[:, None]
    wy_lo, wy_hi = jnp.where(use_y, wy_lo, 0.0), jnp.where(use_y, wy_hi, 0.0)
    wx_lo, wx_hi = jnp.where(use_x, wx_lo, 0.0), jnp.where(use_x, wx_hi, 0.0)
    r_lo = (row_base + y_lo * width[:, None])[:, :, None]  # [R, out_h, 1]
    r_hi = (row_base + y_hi * width[:, None])[:, :, None]
    c_lo, c_hi = x_lo[:, None, :], x_hi[:, None, :]  # [R, 1, out_w]

    def w(a, b):  # f32 [R,out_h] x [R,out_w] -> [R, out_h, out_w, 1] in dtype
      return (a[:, :, None] * b[:, None, :]).astype(dtype)[..., None]

    val = w(wy_lo, wx_lo) * gather(r_lo + c_lo) + w(wy_lo, wx_hi) * gather(r_lo + c_hi)
    val = val + w(wy_hi, wx_lo) * gather(r_hi + c_lo)
    val = val + w(wy_hi, wx_hi) * gather(r_hi + c_hi)
    return val

  cap_h, cap_w = cap_hw

  def body(carry, k):
    iy, ix = k // cap_w, k % cap_w
    needed = jnp.any((iy.astype(jnp.float32) < grid_h) & (ix.astype(jnp.float32) < grid_w))
    carry = lax.cond(needed, lambda a: a + sub_sample(iy, ix), lambda a: a, carry)
    return carry, None

  acc = jnp.zeros((num, out_h, out_w, table.shape[-1]), dtype)
  acc, _ = lax.scan(body, acc, jnp.arange(cap_h * cap_w, dtype=jnp.int32))
  return acc / count.astype(dtype)[:, None, None, None]


def roi_align_scan(
    feature: jax.Array,
    boxes: jax.Array,
    spatial_scale: float,
    output_size,
    aligned: bool,
    max_adaptive_samples,
) -> jax.Array:
  """`ra.roi_align(..., sampling_ratio=0, ...)` computed by the sub-sample scan."""
  out_hw = ra._pair(output_size)
  cap_hw = ra._check_modes(0, max_adaptive_samples)
  feature = jnp.asarray(feature)
  h, w, c = feature.shape
  boxes = lax.stop_gradient(jnp.asarray(boxes, jnp.float32))
  num = boxes.shape[0]
  return _pool_flat_scan(
      feature.reshape(h * w, c),
      boxes,
      jnp.float32(spatial_scale),
      jnp.zeros((num,), jnp.int32),
      jnp.full((num,), h, jnp.int32),
      jnp.full((num,), w, jnp.int32),
      out_hw,
      aligned,
      cap_hw,
  )


def multilevel_roi_align_scan(
    features: Sequence[jax.Array],
    boxes: jax.Array,
    min_level: int,
    output_size,
    aligned: bool,
    canonical_box_size: float,
    canonical_level: int,
    max_adaptive_samples,
    valid_hw: Optional[jax.Array] = None,
) -> jax.Array:
  """`ra.multilevel_roi_align(..., sampling_ratio=0, ...)` computed by the sub-sample scan."""
  out_hw = ra._pair(output_size)
  cap_hw = ra._check_modes(0, max_adaptive_samples)
  flat = ra._flatten_pyramid(
      features, boxes, min_level, canonical_box_size, canonical_level, valid_hw, transposed=False
  )
  out = _pool_flat_scan(
      flat.table,
      flat.boxes,
      flat.scale,
      flat.base,
      flat.height,
      flat.width,
      out_hw,
      aligned,
      cap_hw,
      flat.ext_h,
      flat.ext_w,
  )
  return ra._unflatten(out, flat)
