"""ROIAlign (torchvision CPU-kernel semantics) and detectron2's multi-level ROI pooler.

docs/centernet2.md §5.2 (pooler, torchvision kernel semantics). Everything here is jittable with
static shapes and differentiable with respect to the features (never the boxes: torchvision's
`roi_align` has no box gradient either, so boxes pass through `stop_gradient`).

Conventions: features are NHWC (`[H, W, C]` for one map, `[B, H_l, W_l, C]` per pyramid level),
boxes are float32 `(x1, y1, x2, y2)` in **image pixels**; a level `l` has stride `2**l`, so its
spatial scale is `2**-l`. Outputs are `[..., out_h, out_w, C]` in the features' dtype.

Exact per-sample semantics (torchvision `roi_align_kernel.cpp`, `aligned=True` unless noted):
  * `start = coord * spatial_scale - 0.5` (no `- 0.5` when `aligned=False`),
    `roi = end - start` (`aligned=False`: `roi = max(roi, 1)`), `bin = roi / out`.
  * `grid` samples per bin and axis (see the modes below); sample
    `y = (start_h + ph * bin_h) + ((iy + 0.5) * bin_h) / grid_h`, `x` likewise.
  * A sample with `y < -1`, `y > H`, `x < -1` or `x > W` contributes 0. Otherwise `y, x` are
    clamped to `>= 0`, `y_low = floor(y)`; if `y_low >= H - 1` then `y_low = y_high = H - 1` and
    `y = H - 1`, else `y_high = y_low + 1` (x likewise). Bilinear weights `hy*hx, hy*lx, ly*hx,
    ly*lx` with `ly = y - y_low`, `hy = 1 - ly`.
  * Samples are summed in the kernel's order (iy outer, ix inner, per sample
    `((w1 v1 + w2 v2) + w3 v3) + w4 v4`) and the sum is divided by `max(grid_h * grid_w, 1)`.
  Coordinates and weights are computed in float32 in the kernel's operation order; the gathers,
  products and the accumulation run in the features' dtype (float32 matches the official kernel
  to rounding; bfloat16 accumulates in bfloat16). torchvision computes `coord * spatial_scale`
  in double: identical for the power-of-two scales of a feature pyramid, within one float32
  rounding for other scales.

Two sampling modes:
  * `sampling_ratio > 0` (fixed, the fast path; scenic uses 2): every bin of every box takes
    `sampling_ratio x sampling_ratio` samples. The sub-sample loop is unrolled (`sampling_ratio**2`
    gathers of `[R, out_h, out_w, C]` per neighbour). This is NOT what the official model does;
    pooled features differ from the official ones for boxes whose bins are larger than
    `sampling_ratio` feature cells (and for tiny boxes, which get more samples than officially).
  * `sampling_ratio == 0` (adaptive, the official `ROIAlignV2` / `POOLER_SAMPLING_RATIO=0`): box `r`
    takes `grid_h = ceil(roi_h / out_h)` by `grid_w = ceil(roi_w / out_w)` samples per bin, the
    roi size being in feature-map units (so a box with `roi <= 0` pools to exactly 0). With static
    shapes the sub-sample loop runs over a static cap `max_adaptive_samples` per axis
    (`(cap_h, cap_w)` or one int for both) and masks the sub-samples a box does not use; a
    `lax.scan` over the `cap_h * cap_w` sub-sample offsets skips (`lax.cond`) offsets that no box
    needs, so a generous cap costs little when unused (under `vmap` the skip becomes a select and
    every offset is computed). The result is exact (identical sample set, order and divisor) for
    every box with `grid_h <= cap_h` and `grid_w <= cap_w`. **A box needing more samples than the
    cap is sampled with the cap**: `grid = min(grid, cap)` per axis, samples evenly spread over the
    bin with that grid and divided by `max(grid_h * grid_w, 1)` of the capped grids (i.e. like a
    fixed sampling ratio of `cap` on that axis). `required_adaptive_samples` returns the per-axis
    grid the boxes need, so callers and tests can check that the cap suffices. The cap is a
    setting (`config.model.roi_heads.max_adaptive_samples`): 8 covers every box whose roi spans
    <= 8 * out cells on its level: all roughly square boxes (level assignment keeps them at 14-28
    cells, <= 4 samples) and the elongated cascade boxes of the oracle image (<= 7); the schema's
    24 covers a 1333 px side on P3. Cost: up to `cap_h * cap_w`
    sub-sample steps (each 4 gathers of `[R, out_h, out_w, C]`) versus `sampling_ratio**2` for
    the fixed mode; on GPU each step's `lax.cond` predicate may cost a device-to-host sync
    (XLA GPU runs dynamic control flow on the host, jax-ml/jax#2491), which is why the fixed
    mode stays the fast path.

Multi-level pooling (detectron2 `ROIPooler`): `assign_boxes_to_levels` picks one level per box
(`clamp(floor(canonical_level + log2(sqrt(area) / canonical_box_size + 1e-8)), min, max)`), and
`multilevel_roi_align` pools each box on its level only: the pyramid (and the batch) is flattened
into one `[B * sum_l H_l W_l, C]` table and every bilinear neighbour is one gather with per-box
base offset / height / width; there is no per-level recomputation (unlike scenic, which pools
every box on every level). The backward pass is a scatter-add into that table. Boxes whose area
is negative or NaN (detectron2 then gets a NaN level that matches no pooler) pool to zeros.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

IntOrPair = Union[int, Tuple[int, int]]


def _pair(v: IntOrPair) -> Tuple[int, int]:
  if isinstance(v, (tuple, list)):
    if len(v) != 2:
      raise ValueError(f"expected an int or a pair, got {v!r}")
    return int(v[0]), int(v[1])
  return int(v), int(v)


def _box_area(boxes: jax.Array) -> jax.Array:
  """detectron2 `Boxes.area`: (x2 - x1) * (y2 - y1), float32, no +1. `[..., 4] -> [...]`."""
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def assign_boxes_to_levels(
    boxes: jax.Array,
    min_level: int,
    max_level: int,
    canonical_box_size: float,
    canonical_level: int,
) -> jax.Array:
  """detectron2 `poolers.assign_boxes_to_levels`, returning the absolute level.

  level = clamp(floor(canonical_level + log2(sqrt(area) / canonical_box_size + 1e-8)),
                min_level, max_level), computed in float32. The floor of the log2 is taken
  exactly from the float32 exponent (`frexp`), so areas at the boundaries (224**2 -> 4,
  448**2 -> 5, ...) never flip through a log2 rounding error. Boxes with a negative or NaN area
  (for which detectron2 computes a NaN level and pools zeros) get `min_level`;
  `multilevel_roi_align` zeroes their output.

  Args:
    boxes: `[..., 4]` xyxy in image pixels.
  Returns:
    `int32[...]` in `[min_level, max_level]`.
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  area = _box_area(boxes)
  s = jnp.sqrt(area) / jnp.float32(canonical_box_size) + jnp.float32(1e-8)
  # s = m * 2**e with m in [0.5, 1)  =>  floor(log2(s)) = e - 1 (s is positive here).
  _, e = jnp.frexp(jnp.where(jnp.isfinite(s), s, jnp.float32(1.0)))
  level = jnp.int32(canonical_level) + e.astype(jnp.int32) - 1
  level = jnp.where(jnp.isinf(s), jnp.int32(max_level), level)
  level = jnp.clip(level, min_level, max_level)
  return jnp.where(area >= 0, level, jnp.int32(min_level)).astype(jnp.int32)


def _roi_geometry(boxes: jax.Array, scale: jax.Array, out_hw: Tuple[int, int], aligned: bool):
  """Per-box start, bin size and roi size in feature units. `boxes [R,4]`, `scale [R] or []` ->
  (y1, x1, bin_h, bin_w, roi_h, roi_w), each `[R]`."""
  offset = jnp.float32(0.5 if aligned else 0.0)
  x1 = boxes[:, 0] * scale - offset
  y1 = boxes[:, 1] * scale - offset
  x2 = boxes[:, 2] * scale - offset
  y2 = boxes[:, 3] * scale - offset
  roi_w = x2 - x1
  roi_h = y2 - y1
  if not aligned:
    roi_w = jnp.maximum(roi_w, jnp.float32(1.0))
    roi_h = jnp.maximum(roi_h, jnp.float32(1.0))
  bin_h = roi_h / jnp.float32(out_hw[0])
  bin_w = roi_w / jnp.float32(out_hw[1])
  return y1, x1, bin_h, bin_w, roi_h, roi_w


def _level_scales(min_level: int, max_level: int) -> jax.Array:
  """Exact spatial scales 2**-l for l = min_level..max_level, `f32[L]`."""
  return jnp.asarray([2.0**-l for l in range(min_level, max_level + 1)], jnp.float32)


def _adaptive_grid(roi: jax.Array, pooled: int) -> jax.Array:
  """torchvision's ceil(roi / pooled), exactly; may be <= 0 (no samples) or NaN.

  XLA rewrites a division by a constant into a multiplication by its reciprocal, so
  `ceil(84 / 7)` would come out 13 (84 * float32(1/7) = 12.000001). The estimate is therefore
  corrected to the smallest integer g with g * pooled >= roi (exact for these small integers),
  which is what the correctly rounded division followed by ceil gives.
  """
  p = jnp.float32(pooled)
  g = jnp.ceil(roi * (1.0 / p))
  g = jnp.where((g - 1.0) * p >= roi, g - 1.0, g)
  return jnp.where(g * p < roi, g + 1.0, g)


def required_adaptive_samples(
    boxes: jax.Array,
    spatial_scale: Optional[float],
    output_size: IntOrPair,
    aligned: bool,
    valid=None,
    *,
    min_level: Optional[int] = None,
    max_level: Optional[int] = None,
    canonical_box_size: Optional[float] = None,
    canonical_level: Optional[int] = None,
) -> jax.Array:
  """Per-axis number of adaptive samples (`sampling_ratio=0`) the boxes need.

  Returns the maximum over boxes of `ceil(roi_h / out_h)` and `ceil(roi_w / out_w)` (roi size in
  feature units), i.e. the smallest `max_adaptive_samples=(cap_h, cap_w)` for which the adaptive
  mode is exact. With `spatial_scale=None` every box is measured on the level that
  `assign_boxes_to_levels(boxes, min_level, max_level, ...)` gives it (scale `2**-level`, as in
  `multilevel_roi_align`; pass `max_level = min_level + num_levels - 1`); otherwise on a single
  map of that scale (as in `roi_align`). The four level-assignment settings are needed (and
  only read) with `spatial_scale=None`. Jittable.

  Args:
    boxes: `[..., 4]` xyxy image pixels.
    valid: optional `bool[...]`; invalid boxes are ignored.
  Returns:
    `int32[2]` = (needed cap_h, needed cap_w), at least 0.
  """
  out_hw = _pair(output_size)
  boxes = lax.stop_gradient(jnp.asarray(boxes, jnp.float32)).reshape(-1, 4)
  if spatial_scale is None:
    levels = dict(
        min_level=min_level,
        max_level=max_level,
        canonical_box_size=canonical_box_size,
        canonical_level=canonical_level,
    )
    unset = [k for k, v in levels.items() if v is None]
    if unset:
      raise ValueError(f"required_adaptive_samples(spatial_scale=None) needs {unset}")
    level = assign_boxes_to_levels(boxes, min_level, max_level, canonical_box_size, canonical_level)
    scale = _level_scales(min_level, max_level)[level - min_level]
  else:
    scale = jnp.float32(spatial_scale)
  _, _, _, _, roi_h, roi_w = _roi_geometry(boxes, scale, out_hw, aligned)
  grid = jnp.stack(
      [_adaptive_grid(roi_h, out_hw[0]), _adaptive_grid(roi_w, out_hw[1])], axis=-1
  )  # [R, 2]
  keep = jnp.isfinite(grid).all(-1)
  if valid is not None:
    keep &= jnp.asarray(valid, bool).reshape(-1)
  grid = jnp.where(keep[:, None], grid, 0.0)
  return jnp.maximum(grid.max(axis=0, initial=0.0), 0.0).astype(jnp.int32)


def _axis_samples(start, bin_size, grid, idx, size, out: int):
  """Sample positions of sub-sample `idx` along one axis, for every bin.

  Args:
    start, bin_size, grid: `f32[R]` (grid >= 1).
    idx: sub-sample index (Python int or int32 scalar).
    size: `int32[R]` map extent along the axis (H or W).
  Returns:
    low, high: `int32[R, out]` neighbour indices (in range);
    w_low, w_high: `f32[R, out]` bilinear weights, zero for samples outside `[-1, size]`.
  """
  size_f = size.astype(jnp.float32)[:, None]
  p = jnp.arange(out, dtype=jnp.float32)
  sub = (jnp.asarray(idx, jnp.float32) + jnp.float32(0.5)) * bin_size[:, None] / grid[:, None]
  c = (start[:, None] + p * bin_size[:, None]) + sub
  inside = (c >= -1.0) & (c <= size_f)  # False for NaN.
  # clamp to [0, size-1]: covers `c <= 0 -> 0` and the border rule (low = high = c = size-1).
  c = jnp.where(inside, jnp.clip(c, 0.0, size_f - 1.0), 0.0)
  low_f = jnp.floor(c)
  low = low_f.astype(jnp.int32)
  high = jnp.minimum(low + 1, size[:, None] - 1)
  l = c - low_f
  h = jnp.float32(1.0) - l
  zero = jnp.float32(0.0)
  return low, high, jnp.where(inside, h, zero), jnp.where(inside, l, zero)


def _pool_flat(
    table: jax.Array,
    boxes: jax.Array,
    scale: jax.Array,
    base: jax.Array,
    height: jax.Array,
    width: jax.Array,
    out_hw: Tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    cap_hw: Tuple[int, int],
    extent_h: Optional[jax.Array] = None,
    extent_w: Optional[jax.Array] = None,
) -> jax.Array:
  """ROIAlign of R boxes, each on its own `[height, width]` block of a flat table.

  Args:
    table: `[N, C]` flattened feature maps (rows `base + y * width + x`).
    boxes: `f32[R, 4]` image pixels; scale: `f32[R]` or scalar spatial scale.
    base, height, width: `int32[R]` block offset and map size of every box.
    extent_h, extent_w: `int32[R]` (<= height, width) the part of the map the kernel's border
      rule applies to (the official canvas of a larger map); default the whole map.
  Returns:
    `[R, out_h, out_w, C]` in `table.dtype`.
  """
  dtype = table.dtype
  out_h, out_w = out_hw
  num = boxes.shape[0]
  start_y, start_x, bin_h, bin_w, roi_h, roi_w = _roi_geometry(boxes, scale, out_hw, aligned)
  adaptive = sampling_ratio <= 0
  if adaptive:
    grid_h = jnp.minimum(_adaptive_grid(roi_h, out_h), jnp.float32(cap_hw[0]))
    grid_w = jnp.minimum(_adaptive_grid(roi_w, out_w), jnp.float32(cap_hw[1]))
    prod = grid_h * grid_w
    count = jnp.where(prod >= 1.0, prod, jnp.float32(1.0))  # max(gh*gw, 1); NaN -> 1.
    # Positions only matter where grid >= 1 (other sub-samples are masked).
    pos_h = jnp.where(grid_h >= 1.0, grid_h, jnp.float32(1.0))
    pos_w = jnp.where(grid_w >= 1.0, grid_w, jnp.float32(1.0))
  else:
    grid_h = grid_w = pos_h = pos_w = jnp.full((num,), sampling_ratio, jnp.float32)
    count = jnp.full((num,), sampling_ratio * sampling_ratio, jnp.float32)

  row_base = base[:, None]
  ext_h = height if extent_h is None else extent_h
  ext_w = width if extent_w is None else extent_w

  def gather(idx):
    return table.at[idx].get(mode="promise_in_bounds")

  def sub_sample(iy, ix):
    y_lo, y_hi, wy_lo, wy_hi = _axis_samples(start_y, bin_h, pos_h, iy, ext_h, out_h)
    x_lo, x_hi, wx_lo, wx_hi = _axis_samples(start_x, bin_w, pos_w, ix, ext_w, out_w)
    if adaptive:  # sub-samples beyond a box's grid do not exist.
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

  acc = jnp.zeros((num, out_h, out_w, table.shape[-1]), dtype)
  if not adaptive:
    for iy in range(sampling_ratio):
      for ix in range(sampling_ratio):
        acc = acc + sub_sample(iy, ix)
  else:
    cap_h, cap_w = cap_hw

    def body(carry, k):
      iy, ix = k // cap_w, k % cap_w
      needed = jnp.any((iy.astype(jnp.float32) < grid_h) & (ix.astype(jnp.float32) < grid_w))
      carry = lax.cond(needed, lambda a: a + sub_sample(iy, ix), lambda a: a, carry)
      return carry, None

    acc, _ = lax.scan(body, acc, jnp.arange(cap_h * cap_w, dtype=jnp.int32))
  return acc / count.astype(dtype)[:, None, None, None]


def _check_modes(sampling_ratio: int, max_adaptive_samples: IntOrPair) -> Tuple[int, int]:
  cap_hw = _pair(max_adaptive_samples)
  if sampling_ratio <= 0 and min(cap_hw) < 1:
    raise ValueError(f"max_adaptive_samples must be >= 1, got {max_adaptive_samples!r}")
  return cap_hw


def roi_align(
    feature: jax.Array,
    boxes: jax.Array,
    spatial_scale: float,
    output_size: IntOrPair,
    sampling_ratio: int,
    aligned: bool,
    max_adaptive_samples: IntOrPair,
) -> jax.Array:
  """Single-map ROIAlign, torchvision `roi_align(input, rois, output_size, spatial_scale,
  sampling_ratio, aligned)` semantics (see the module docstring for the two sampling modes).

  Args:
    feature: `[H, W, C]` one feature map (any float dtype; the compute runs in it).
    boxes: `[R, 4]` xyxy in image pixels (float32; no gradient flows to them).
    spatial_scale: feature cells per image pixel (1 / stride).
    output_size: int or (out_h, out_w).
    sampling_ratio: > 0 fixed samples per bin and axis; 0 adaptive (official ROIAlignV2).
    aligned: True = half-pixel offset (ROIAlignV2); False = legacy (roi size >= 1).
    max_adaptive_samples: static per-axis cap for the adaptive mode (int or (cap_h, cap_w)).
  Returns:
    `[R, out_h, out_w, C]` in `feature.dtype`.
  """
  out_hw = _pair(output_size)
  cap_hw = _check_modes(sampling_ratio, max_adaptive_samples)
  feature = jnp.asarray(feature)
  h, w, c = feature.shape
  boxes = lax.stop_gradient(jnp.asarray(boxes, jnp.float32))
  num = boxes.shape[0]
  table = feature.reshape(h * w, c)
  return _pool_flat(
      table,
      boxes,
      jnp.float32(spatial_scale),
      jnp.zeros((num,), jnp.int32),
      jnp.full((num,), h, jnp.int32),
      jnp.full((num,), w, jnp.int32),
      out_hw,
      sampling_ratio,
      aligned,
      cap_hw,
  )


def multilevel_roi_align(
    features: Sequence[jax.Array],
    boxes: jax.Array,
    min_level: int,
    output_size: IntOrPair,
    sampling_ratio: int,
    aligned: bool,
    canonical_box_size: float,
    canonical_level: int,
    max_adaptive_samples: IntOrPair,
    valid_hw: Optional[jax.Array] = None,
) -> jax.Array:
  """detectron2 `ROIPooler` (ROIAlign / ROIAlignV2) over a feature pyramid.

  The pooler settings are required: the cascade passes `config.model.roi_heads`
  (pooler_resolution, sampling_ratio, canonical_box_size, canonical_level, max_adaptive_samples),
  the level of its first feature map and `aligned=True` (ROIAlignV2).

  Each box is pooled only on its level `assign_boxes_to_levels(box, min_level, max_level,
  canonical_box_size, canonical_level)`, `max_level = min_level + len(features) - 1`, with spatial
  scale `2**-level`. Boxes with a negative or NaN area pool to zeros (as in detectron2).

  Args:
    features: `[B, H_l, W_l, C]` for levels `min_level .. max_level` (same B, C and dtype).
    boxes: `[B, R, 4]` xyxy in image pixels (float32; no gradient flows to them).
    sampling_ratio: > 0 fixed samples per bin and axis (fast path); 0 adaptive (official).
    max_adaptive_samples: static per-axis cap for the adaptive mode (int or (cap_h, cap_w)).
    valid_hw: optional `[L, 2]` int32 rows/columns of each level that the official map has
      (`canvas.level_extents`): samples are clamped / dropped at that border instead of the
      array's, so features on a larger canvas pool exactly as on the official one.
  Returns:
    `[B, R, out_h, out_w, C]` in the features' dtype.
  """
  out_hw = _pair(output_size)
  cap_hw = _check_modes(sampling_ratio, max_adaptive_samples)
  features = [jnp.asarray(f) for f in features]
  if not features:
    raise ValueError("features must hold at least one level")
  bsz, _, _, ch = features[0].shape
  dtype = jnp.result_type(*features)
  max_level = min_level + len(features) - 1
  hs = [int(f.shape[1]) for f in features]
  ws = [int(f.shape[2]) for f in features]
  for f in features:
    if f.shape[0] != bsz or f.shape[3] != ch:
      raise ValueError(f"inconsistent feature shapes {[f.shape for f in features]}")
  offsets = np.cumsum([0] + [h * w for h, w in zip(hs, ws)])
  n = int(offsets[-1])
  # One [B * sum_l H_l W_l, C] table: row b * n + offsets[l] + y * W_l + x.
  table = jnp.concatenate(
      [f.astype(dtype).reshape(bsz, h * w, ch) for f, h, w in zip(features, hs, ws)], axis=1
  )
  table = table.reshape(bsz * n, ch)

  boxes = lax.stop_gradient(jnp.asarray(boxes, jnp.float32))
  num = boxes.shape[1]
  level = assign_boxes_to_levels(
      boxes, min_level, max_level, canonical_box_size, canonical_level
  )  # [B, R]
  li = (level - min_level).reshape(-1)
  base = (
      jnp.asarray(offsets[:-1], jnp.int32)[li].reshape(bsz, num)
      + (jnp.arange(bsz, dtype=jnp.int32) * n)[:, None]
  ).reshape(-1)
  height = jnp.asarray(hs, jnp.int32)[li]
  width = jnp.asarray(ws, jnp.int32)[li]
  scale = _level_scales(min_level, max_level)[li]
  ext_h = ext_w = None
  if valid_hw is not None:
    valid_hw = jnp.asarray(valid_hw, jnp.int32)
    ext_h = jnp.minimum(valid_hw[li, 0], height)
    ext_w = jnp.minimum(valid_hw[li, 1], width)
  out = _pool_flat(
      table,
      boxes.reshape(-1, 4),
      scale,
      base,
      height,
      width,
      out_hw,
      sampling_ratio,
      aligned,
      cap_hw,
      ext_h,
      ext_w,
  )
  out = out.reshape(bsz, num, out_hw[0], out_hw[1], ch)
  ok = (_box_area(boxes) >= 0)[:, :, None, None, None]  # False for NaN.
  return jnp.where(ok, out, jnp.zeros((), dtype))
