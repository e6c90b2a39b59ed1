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
  * The bin's value is the sum of its samples divided by `max(grid_h * grid_w, 1)`; the kernel
    sums them iy outer, ix inner, per sample `((w1 v1 + w2 v2) + w3 v3) + w4 v4`.
  Coordinates and weights are computed in float32 in the kernel's operation order. torchvision
  computes `coord * spatial_scale` in double: identical for the power-of-two scales of a feature
  pyramid, within one float32 rounding for other scales.

Two sampling modes:
  * `sampling_ratio > 0` (fixed; scenic uses 2): every bin of every box takes
    `sampling_ratio x sampling_ratio` samples. The sub-sample loop is unrolled (per sub-sample,
    4 gathers of `[R, out_h, out_w, C]`), summed in the kernel's order, in the features' dtype
    (bfloat16 accumulates in bfloat16). This is NOT what the official model does; pooled features
    differ from the official ones for boxes whose bins are larger than `sampling_ratio` feature
    cells (and for tiny boxes, which get more samples than officially).
  * `sampling_ratio == 0` (adaptive, the default: the official `ROIAlignV2` /
    `POOLER_SAMPLING_RATIO=0`): box `r` takes `grid_h = ceil(roi_h / out_h)` by
    `grid_w = ceil(roi_w / out_w)` samples per bin, the roi size being in feature-map units (so a
    box with `roi <= 0` pools to exactly 0). The grid is capped per axis by the static setting
    `max_adaptive_samples` (`config.model.roi_heads.max_adaptive_samples`, `(cap_h, cap_w)` or
    one int): exact for every box with `grid_h <= cap_h` and `grid_w <= cap_w`; **a box needing
    more samples than the cap is sampled with the cap** (`grid = min(grid, cap)` per axis, samples
    evenly spread over the bin with that grid, divided by `max(grid_h * grid_w, 1)` of the capped
    grids, like a fixed sampling ratio of `cap` on that axis). `required_adaptive_samples`
    returns the per-axis grid the boxes need. The schema's 24 covers a 1333 px side on P3 (the
    oracle's boxes need <= 8). The cap costs next to nothing: it bounds only the sample loop that
    builds the weight vectors below, which has no channel axis.

Adaptive mode, computation (`_pool_adaptive`). The average of bilinear samples over a product grid
is separable: a sample's weight on cell `(row, col)` is `wy(row) * wx(col)`, and a dropped sample
(outside `[-1, H]` in y or `[-1, W]` in x, or beyond the box's grid) has a zero weight on the
dropping axis. So bin `(p, q)` = `sum_row sum_col Wy[p, row] Wx[q, col] F[row, col] / count`,
where `Wy[p, row]` sums the y weights (`hy` on `y_low`, `ly` on `y_high`) of bin p's samples, `Wx`
likewise. Per box:
  1. the sample positions and bilinear weights are computed exactly as above (float32, the
     kernel's operations) for every sub-sample up to the cap and scatter-added into `Wy`, `Wx`
     over the box's support rows `lo_h .. lo_h + S_h - 1` and columns `lo_w .. lo_w + S_w - 1`;
  2. the support is gathered once as a static window of `rows` slices of `cols` contiguous cells:
     cut along its longer axis into `ceil(S_long / cols)` pieces, stacked (`pieces * S_short <=
     rows`); a tall box's slices come from a column-major copy of the feature table;
  3. two contractions: `t[a, q] = sum_b W_long[q, piece(a) * cols + b] * window[a, b]` per
     slice, then `out[p, q] = sum_a W_short[p, offset(a)] * t[a, q]`, divided by the count.
  No data-dependent control flow; the work per box is its window (`rows * cols` cells, about
  `out + out**2 / cols` multiply-adds per cell and channel), whatever the cap. The window is
  static and chosen at trace time (`_adaptive_window`) so that every possible box fits, which
  makes the mode exact for every box (no fallback): a box on a level below the coarsest has a
  roi area < `(2 * canonical_box_size / 2**canonical_level)**2` cells (28^2 by default, level
  assignment) and a support <= `floor(roi) + 3` cells per axis, clipped to its map; the coarsest
  level (and `roi_align`'s single map) can hold a box as large as its map. On the 800x1216 pyramid
  (P3 100x152 .. P7 7x10) the window is 63 slices of 22 cells (1386 cells; the oracle's pooled
  boxes have a median support of ~360 cells and at most ~1000); the zoo configs that pool from
  P3-P4 only take the whole P4 map (6400 cells at 1280 px).
  Exactness: the same samples, bitwise-equal float32 weights and the same divisor as the kernel;
  only the summation order differs (weights summed per row and column, then two contractions),
  so float32 results equal the kernel's to float32 rounding, not bitwise: on the official P4-P7
  features with the official image's 510 P4-P7 cascade boxes, new vs the former per-sample
  accumulation differ by at most 3.1e-5 (1.0e-6 of the largest value, 29.5; both are 6.9e-5 from
  a float64 sum of the kernel's samples), feature gradients by 1.1e-6 of the largest (tests/
  test_roi_align_separable.py); 2 x 512 oracle training boxes on 800x1216 random features:
  5.8e-6 and 2e-6 (bench/roi_align_cpu.py). The window values are upcast to float32 and
  both contractions run in float32, so bfloat16 features pool to the float32 result rounded once.
  The boxes run in a loop of steps of a few boxes (`lax.map`, static trip count, no condition: XLA
  runs a while loop of known trip count without reading the predicate back to the host): on
  XLA:CPU a step's windows stay in cache from the gather to the contractions. The gradient is,
  per step, the two transposed contractions and a scatter-add of the step's contiguous window
  slices into the feature tables.

Multi-level pooling (detectron2 `ROIPooler`): `assign_boxes_to_levels` picks one level per box
(`clamp(floor(canonical_level + log2(sqrt(area) / canonical_box_size + 1e-8)), min, max)`), and
`multilevel_roi_align` pools each box on its level only: the pyramid (and the batch) is flattened
into one `[B * sum_l H_l W_l, C]` table (plus its column-major copy in the adaptive mode) that
every gather reads with per-box base offset / height / width; there is no per-level
recomputation (unlike scenic, which pools every box on every level). The backward pass is a
scatter-add into that table. Boxes whose area is negative or NaN (detectron2 then gets a NaN
level that matches no pooler) pool to zeros.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from cn2_jax.modeling import export_mode

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


def assign_boxes_to_levels_for_onnx(
    boxes: jax.Array,
    min_level: int,
    max_level: int,
    canonical_box_size: float,
    canonical_level: int,
) -> jax.Array:
  """`assign_boxes_to_levels` without `frexp` (whose bitcast becomes a BitCast node that
  onnxruntime rejects at opset 18): the level is min_level plus the number of level thresholds
  s reaches, floor(log2(s)) >= j <=> s >= 2**j, compared exactly (powers of two are exact in
  float32). The same levels, at exact powers of two too: +inf reaches every threshold
  (max_level); a NaN s (negative or NaN area) none, and gets min_level as there."""
  boxes = jnp.asarray(boxes, jnp.float32)
  area = _box_area(boxes)
  s = jnp.sqrt(area) / jnp.float32(canonical_box_size) + jnp.float32(1e-8)
  level = jnp.full_like(s, min_level, dtype=jnp.int32)
  for lvl in range(min_level + 1, max_level + 1):
    level = level + (s >= jnp.float32(2.0 ** (lvl - int(canonical_level)))).astype(jnp.int32)
  return jnp.where(area >= 0, level, jnp.int32(min_level)).astype(jnp.int32)


@export_mode.onnx_form(assign_boxes_to_levels_for_onnx)
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


def _axis_weight_vectors(start, bin_size, grid, size, out: int, cap: int, length: int):
  """Adaptive sampling along one axis as one weight vector per bin over the map's rows (columns).

  Sample `i < cap` of bin `p` sits at `(start + p * bin) + ((i + 0.5) * bin) / grid` (the kernel's
  float32 operations, as `_axis_samples`); it exists when `i < grid` and is dropped outside
  `[-1, size]`. Its bilinear weights `1 - l` and `l` go to rows `low` and `high` (the kernel's
  clamping and border rule), and every bin sums the weights of its samples per row.

  Args:
    start, bin_size: `f32[R]`; grid: `f32[R]` samples per bin (capped; may be <= 0 or NaN).
    size: `int32[R]` extent of the map along the axis (the border rule's H or W).
    length: static length of the returned vectors (>= the largest support).
  Returns:
    lo: `int32[R]` first row with a sample weight (0 for a box without samples);
    span: `int32[R]` rows `lo .. lo + span - 1` hold every weight (1 for a box without samples);
    weights: `f32[R, out, length]`, `weights[r, p, t]` = summed weight of row `lo + t` in bin `p`.
  """
  num = start.shape[0]
  pos = jnp.where(grid >= 1.0, grid, jnp.float32(1.0))  # positions only matter where grid >= 1
  i = jnp.arange(cap, dtype=jnp.float32)[None, None, :]
  p = jnp.arange(out, dtype=jnp.float32)[None, :, None]
  start, bin_size, pos = start[:, None, None], bin_size[:, None, None], pos[:, None, None]
  size3 = size[:, None, None]
  size_f = size3.astype(jnp.float32)
  c = (start + p * bin_size) + ((i + jnp.float32(0.5)) * bin_size) / pos  # [R, out, cap]
  inside = (c >= -1.0) & (c <= size_f)  # False for NaN.
  live = inside & (i < grid[:, None, None])
  c = jnp.where(inside, jnp.clip(c, 0.0, size_f - 1.0), 0.0)
  low_f = jnp.floor(c)
  low = low_f.astype(jnp.int32)
  high = jnp.minimum(low + 1, size3 - 1)
  frac = c - low_f
  zero = jnp.float32(0.0)
  w_low = jnp.where(live, jnp.float32(1.0) - frac, zero)
  w_high = jnp.where(live, frac, zero)
  lo = jnp.min(jnp.where(live, low, jnp.iinfo(jnp.int32).max), axis=(1, 2))
  hi = jnp.max(jnp.where(live, high, -1), axis=(1, 2))
  empty = hi < lo
  lo = jnp.where(empty, 0, lo)
  span = jnp.where(empty, 1, hi - lo + 1)
  # iotas, not jnp.arange(num): jax2onnx cannot trace the latter for a symbolic box count
  rows = lax.broadcasted_iota(jnp.int32, low.shape, 0)
  bins = jnp.broadcast_to(jnp.arange(out, dtype=jnp.int32)[None, :, None], low.shape)
  # Dead samples go to a spare last slot, cut off after: every index is in bounds (onnxruntime's
  # ScatterND rejects the out-of-bounds indices a dropping scatter would use).
  t_low = jnp.where(live, low - lo[:, None, None], length)
  t_high = jnp.where(live, high - lo[:, None, None], length)
  weights = jnp.zeros((num, out, length + 1), jnp.float32)
  weights = weights.at[rows, bins, t_low].add(w_low, mode="promise_in_bounds")
  weights = weights.at[rows, bins, t_high].add(w_high, mode="promise_in_bounds")
  return lo, span, weights[:, :, :length]


# Support of an adaptive box along one axis: S <= floor(roi) + 3 cells (samples lie strictly inside
# the roi; `floor(last) + 1 - floor(first) + 1` rows), with 0.01 cell of float32 slack.
_SUPPORT_SLACK = 3.01
# Cost of one gathered window cell relative to one multiply-add of the first contraction (the
# window gather and, in the backward pass, its scatter-add), to choose the window's shape.
_GATHER_COST = 4.0
# Window values gathered per step of `_pool_adaptive`'s loop over boxes: on CPU a few boxes, whose
# windows (8 MB) stay in cache from the gather to the contractions (all 2 x 512 boxes' windows at
# once, 1.5 GB, made the pooler 5x slower on XLA:CPU); elsewhere 256 MB of float32 per step.
_CPU_WINDOW_ELEMENTS = 1 << 21
_DEVICE_WINDOW_ELEMENTS = 1 << 26


def _boxes_per_step(window_elements: int) -> int:
  """Boxes per step of `_pool_adaptive`'s loop for a window of `window_elements` values."""
  budget = _CPU_WINDOW_ELEMENTS if jax.default_backend() == "cpu" else _DEVICE_WINDOW_ELEMENTS
  return max(1, budget // window_elements)


def _partner_support(s: np.ndarray, ext_other: int, area_bound: float) -> np.ndarray:
  """Largest support along the other axis of a box with support `s` along one axis, for boxes of
  roi area (cells^2) below `area_bound`: s >= 5 means roi >= s - 3 (also when `aligned=False`
  raises a roi to 1), hence roi_other < area_bound / (s - 3)."""
  if not math.isfinite(area_bound):
    return np.full(s.shape, ext_other)
  roi_min = np.maximum(s - _SUPPORT_SLACK, 1e-9)
  other = np.floor(area_bound * 1.001 / roi_min + 0.01) + 3
  return np.where(s <= 4, ext_other, np.minimum(other, ext_other)).astype(np.int64)


@functools.lru_cache(maxsize=None)
def _adaptive_window(
    level_shapes: Tuple[Tuple[int, int], ...], area_bounds: Tuple[float, ...], out: int
) -> Tuple[int, int, int]:
  """Static window `(rows, cols)` that holds the folded support of every possible box, and the
  padded length of the per-axis weight vectors.

  A box's support `S_short x S_long` (the longer axis `long`) is cut along `long` into
  `m = ceil(S_long / cols)` pieces of `cols` cells, stacked as `m * S_short <= rows` window rows.
  Every box fits when this holds for the largest supports its level allows: up to the level's map
  extent per axis and, on levels whose boxes have a bounded area (all but the coarsest, see
  `_level_area_bounds`), `S <= floor(roi) + 3` with `roi_h * roi_w < bound`. Among the shapes
  that fit, the one with the least estimated work (gather + contractions) is taken.
  """
  pairs = []
  for (h, w), bound in zip(level_shapes, area_bounds):
    sh = np.arange(1, h + 1)
    sw = _partner_support(sh, w, bound)
    pairs += [np.stack([sh, sw], 1), np.stack([sh, np.minimum(sh, sw)], 1)]
    sw = np.arange(1, w + 1)
    sh = _partner_support(sw, h, bound)
    pairs += [np.stack([sh, sw], 1), np.stack([np.minimum(sh, sw), sw], 1)]
  pairs = np.concatenate(pairs)
  short, long = pairs.min(1), pairs.max(1)
  best = None
  for cols in range(1, int(long.max()) + 1):
    rows = int(np.max(-(-long // cols) * short))
    cost = rows * cols * (_GATHER_COST + out) + rows * out * out
    if best is None or cost <= best[0]:
      best = (cost, rows, cols)
  _, rows, cols = best
  extent = max(max(hw) for hw in level_shapes)
  return rows, cols, -(-extent // cols) * cols


def _pool_adaptive(flat: _Flat, out_hw: Tuple[int, int], aligned: bool, cap_hw) -> jax.Array:
  """Adaptive ROIAlign (`sampling_ratio=0`) of the flat boxes by separable window contractions.

  Per box: the per-axis weight vectors `wy [out_h, S_h]`, `wx [out_w, S_w]` over its support
  (`_axis_weight_vectors`); its support cut along the longer axis into pieces of `cols` cells and
  gathered as `rows` slices of `cols` contiguous cells (`[rows, cols, C]`, from the row-major
  table for wide boxes, the column-major one for tall boxes); then
  `t[a, q] = sum_b w_long[q, piece(a) * cols + b] * win[a, b]` and
  `out[p, q] = sum_a w_short[p, offset(a)] * t[a, q]`, divided by `max(grid_h * grid_w, 1)`.
  Returns `[R, out_h, out_w, C]` in the table's dtype.
  """
  table, dtype = flat.table, flat.table.dtype
  out_h, out_w = out_hw
  n = max(out_h, out_w)
  num, ch = flat.boxes.shape[0], table.shape[-1]
  rows, cols, length = _adaptive_window(flat.level_shapes, flat.area_bounds, n)
  start_y, start_x, bin_h, bin_w, roi_h, roi_w = _roi_geometry(
      flat.boxes, flat.scale, out_hw, aligned
  )
  grid_h = jnp.minimum(_adaptive_grid(roi_h, out_h), jnp.float32(cap_hw[0]))
  grid_w = jnp.minimum(_adaptive_grid(roi_w, out_w), jnp.float32(cap_hw[1]))
  prod = grid_h * grid_w
  count = jnp.where(prod >= 1.0, prod, jnp.float32(1.0))  # max(gh*gw, 1); NaN -> 1.
  lo_h, span_h, wy = _axis_weight_vectors(
      start_y, bin_h, grid_h, flat.ext_h, out_h, cap_hw[0], length
  )
  lo_w, span_w, wx = _axis_weight_vectors(
      start_x, bin_w, grid_w, flat.ext_w, out_w, cap_hw[1], length
  )
  wy = jnp.pad(wy, ((0, 0), (0, n - out_h), (0, 0)))
  wx = jnp.pad(wx, ((0, 0), (0, n - out_w), (0, 0)))

  # Fold the support: window row a holds piece j = a // S_short, short-axis offset u = a % S_short.
  tall = span_h > span_w
  s_long = jnp.where(tall, span_h, span_w)
  s_short = jnp.where(tall, span_w, span_h)
  # lax.div (truncating, = floor for these non-negative ints), not // and %: jnp's emit lax.rem,
  # which jax2onnx 0.12.5 cannot convert for a symbolic box count.
  pieces = lax.div(s_long + (cols - 1), jnp.int32(cols))
  a = lax.broadcasted_iota(jnp.int32, (num, rows), 1)
  s_short_a = jnp.broadcast_to(s_short[:, None], a.shape)
  piece = lax.div(a, s_short_a)
  used = piece < pieces[:, None]  # [R, rows]
  offset = jnp.where(used, a - piece * s_short_a, 0)
  piece = jnp.where(used, piece, 0)
  base, height, width = flat.base[:, None], flat.height[:, None], flat.width[:, None]
  lo_h, lo_w = lo_h[:, None], lo_w[:, None]
  start_wide = base + (lo_h + offset) * width + lo_w + piece * cols
  start_tall = table.shape[0] + base + (lo_w + offset) * height + lo_h + piece * cols
  start = jnp.where(tall[:, None], start_tall, start_wide)
  # Row-major table, column-major table, and `cols` zero rows for the last slices' overhang (the
  # cells a slice reads past its support carry zero weight).
  source = jnp.concatenate([table, flat.table_t, jnp.zeros((cols, ch), dtype)], axis=0)
  box = lax.broadcasted_iota(jnp.int32, piece.shape, 0)  # jnp.arange(num)[:, None], broadcast
  w_long = jnp.where(tall[:, None, None], wy, wx).reshape(num, n, length // cols, cols)
  w_short = jnp.where(tall[:, None, None], wx, wy)
  m_long = jnp.where(used[..., None, None], w_long[box, :, piece], 0.0)  # [R, rows, n, cols]
  m_short = jnp.where(used[..., None], w_short[box, :, offset], 0.0)  # [R, rows, n]

  def pool_box(box_start, box_long, box_short):
    """One box: `[rows]` slice starts, `[rows, n, cols]`, `[rows, n]` -> f32 `[n, n, C]`."""
    window = lax.gather(
        source,
        box_start[:, None],
        lax.GatherDimensionNumbers(
            offset_dims=(1, 2), collapsed_slice_dims=(), start_index_map=(0,)
        ),
        slice_sizes=(cols, ch),
        mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )  # [rows, cols, C]
    t = jnp.einsum("aqb,abc->aqc", box_long, window.astype(jnp.float32))
    return jnp.einsum("ap,aqc->pqc", box_short, t)

  # A loop over steps of a few boxes: static trip count, no condition (XLA runs a while loop of
  # known trip count without reading its predicate back to the host).
  per_step = _boxes_per_step(rows * cols * ch)
  args = (start, m_long, m_short)
  if export_mode.onnx_ops_enabled():
    pooled = _pool_windows_for_onnx(source, start, m_long, m_short, cols)
  elif isinstance(num, int):
    if per_step >= num:
      pooled = jax.vmap(pool_box)(*args)
    else:
      pooled = lax.map(lambda x: pool_box(*x), args, batch_size=per_step)
  else:
    # A symbolic box count (bsz * flat.num, a symbolic batch: jax.export): steps of a divisor of
    # the boxes per image, so that no remainder (of unknown size) is left.
    per_image = flat.num if isinstance(flat.num, int) else 1
    step = max(d for d in range(1, min(per_step, per_image) + 1) if per_image % d == 0)
    steps = [x.reshape((-1, step) + x.shape[1:]) for x in args]
    pooled = lax.map(lambda x: jax.vmap(pool_box)(*x), steps)
    pooled = pooled.reshape((num,) + pooled.shape[2:])
  # pooled: f32 [R, short-axis bin, long-axis bin, C]
  pooled = jnp.where(tall[:, None, None, None], jnp.swapaxes(pooled, 1, 2), pooled)
  return (pooled[:, :out_h, :out_w] / count[:, None, None, None]).astype(dtype)


def _pool_windows_for_onnx(source, start, m_long, m_short, cols: int) -> jax.Array:
  """`_pool_adaptive`'s per-box window contractions for every box at once, for an ONNX
  conversion: the same gathered cells and contractions as its loop (`lax.map` over steps of
  boxes), whose trip count jax2onnx 0.12.5 cannot take from a symbolic box count (a symbolic
  batch); the windows are gathered as one axis-0 Gather of explicit cell indices. All boxes'
  windows are live at once (onnxruntime: `R * rows * cols * C` float32).

  Args:
    source: `[N, C]` the stacked tables; start: `int32[R, rows]` slice starts;
    m_long: `f32[R, rows, n, cols]`; m_short: `f32[R, rows, n]`.
  Returns:
    f32 `[R, n, n, C]` (short-axis bin, long-axis bin).
  """
  cells = start[:, :, None] + jnp.arange(cols, dtype=jnp.int32)  # [R, rows, cols]
  window = source.at[cells].get(mode="promise_in_bounds").astype(jnp.float32)
  t = jnp.einsum("raqb,rabc->raqc", m_long, window)
  return jnp.einsum("rap,raqc->rpqc", m_short, t)


def _pool_fixed(flat: _Flat, out_hw: Tuple[int, int], sampling_ratio: int, aligned: bool):
  """Fixed-ratio ROIAlign (`sampling_ratio > 0`) of the flat boxes: the sub-sample loop unrolled,
  4 gathers of `[R, out_h, out_w, C]` per sub-sample. Returns `[R, out_h, out_w, C]`."""
  table, dtype = flat.table, flat.table.dtype
  out_h, out_w = out_hw
  num = flat.boxes.shape[0]
  start_y, start_x, bin_h, bin_w, _, _ = _roi_geometry(flat.boxes, flat.scale, out_hw, aligned)
  # full_like: jax2onnx's jnp.full fails on a symbolic box count
  grid = jnp.full_like(flat.boxes[:, 0], sampling_ratio, dtype=jnp.float32)
  row_base, width = flat.base[:, None], flat.width[:, None]

  def gather(idx):
    return table.at[idx].get(mode="promise_in_bounds")

  def sub_sample(iy, ix):
    y_lo, y_hi, wy_lo, wy_hi = _axis_samples(start_y, bin_h, grid, iy, flat.ext_h, out_h)
    x_lo, x_hi, wx_lo, wx_hi = _axis_samples(start_x, bin_w, grid, ix, flat.ext_w, out_w)
    r_lo = (row_base + y_lo * width)[:, :, None]  # [R, out_h, 1]
    r_hi = (row_base + y_hi * width)[:, :, None]
    c_lo, c_hi = x_lo[:, None, :], x_hi[:, None, :]  # [R, 1, out_w]

    def w(a, b):  # f32 [R,out_h] x [R,out_w] -> [R, out_h, out_w, 1] in dtype
      return (a[:, :, None] * b[:, None, :]).astype(dtype)[..., None]

    val = w(wy_lo, wx_lo) * gather(r_lo + c_lo) + w(wy_lo, wx_hi) * gather(r_lo + c_hi)
    val = val + w(wy_hi, wx_lo) * gather(r_hi + c_lo)
    val = val + w(wy_hi, wx_hi) * gather(r_hi + c_hi)
    return val

  acc = jnp.zeros((num, out_h, out_w, table.shape[-1]), dtype)
  for iy in range(sampling_ratio):
    for ix in range(sampling_ratio):
      acc = acc + sub_sample(iy, ix)
  return acc / jnp.asarray(sampling_ratio * sampling_ratio, dtype)


def _check_modes(sampling_ratio: int, max_adaptive_samples: IntOrPair) -> Tuple[int, int]:
  cap_hw = _pair(max_adaptive_samples)
  if sampling_ratio <= 0 and min(cap_hw) < 1:
    raise ValueError(f"max_adaptive_samples must be >= 1, got {max_adaptive_samples!r}")
  return cap_hw


class _Flat(NamedTuple):
  """Boxes of a batch, each on its own `[height, width]` block of a flat feature table.

  table: `[N, C]`, row `base + y * width + x`; table_t: `[N, C]` the same blocks column-major
  (row `base + x * height + y`), or None when not needed. boxes `f32[R, 4]` (image pixels),
  scale `f32[R]`, base / height / width / ext_h / ext_w `int32[R]` (ext: the part of the map the
  kernel's border rule applies to, <= height / width). bsz, num: boxes are `[bsz, num]` before
  flattening; keep `bool[bsz, num]` or None: boxes to pool (the others are zeroed).
  level_shapes, area_bounds: static, the `(H, W)` of every map and the bound on the roi area
  (cells^2) of the boxes pooled from it (inf: none), for `_adaptive_window`.
  """

  table: jax.Array
  table_t: Optional[jax.Array]
  boxes: jax.Array
  scale: jax.Array
  base: jax.Array
  height: jax.Array
  width: jax.Array
  ext_h: jax.Array
  ext_w: jax.Array
  bsz: int
  num: int
  keep: Optional[jax.Array]
  level_shapes: Tuple[Tuple[int, int], ...]
  area_bounds: Tuple[float, ...]


def _pool(flat: _Flat, out_hw, sampling_ratio: int, aligned: bool, cap_hw) -> jax.Array:
  """Pools every flat box; `[bsz, num, out_h, out_w, C]`, zero where `flat.keep` is False."""
  if sampling_ratio > 0:
    out = _pool_fixed(flat, out_hw, sampling_ratio, aligned)
  else:
    out = _pool_adaptive(flat, out_hw, aligned, cap_hw)
  return _unflatten(out, flat)


def _unflatten(out: jax.Array, flat: _Flat) -> jax.Array:
  out = out.reshape((flat.bsz, flat.num) + out.shape[1:])
  if flat.keep is None:
    return out
  return jnp.where(flat.keep[:, :, None, None, None], out, jnp.zeros((), out.dtype))


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

  The adaptive mode sizes its window for any box on this map (no level bounds the box sizes), up
  to the whole map.

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
  height = jnp.full((num,), h, jnp.int32)
  width = jnp.full((num,), w, jnp.int32)
  flat = _Flat(
      table=feature.reshape(h * w, c),
      table_t=jnp.swapaxes(feature, 0, 1).reshape(h * w, c) if sampling_ratio <= 0 else None,
      boxes=boxes,
      scale=jnp.full((num,), spatial_scale, jnp.float32),
      base=jnp.zeros((num,), jnp.int32),
      height=height,
      width=width,
      ext_h=height,
      ext_w=width,
      bsz=1,
      num=num,
      keep=None,
      level_shapes=((h, w),),
      area_bounds=(math.inf,),
  )
  return _pool(flat, out_hw, sampling_ratio, aligned, cap_hw)[0]


def _level_area_bounds(
    num_levels: int, canonical_box_size: float, canonical_level: int
) -> Tuple[float, ...]:
  """Upper bound on the roi area (cells^2 of its level) of the boxes `assign_boxes_to_levels`
  puts on each level: level <= l means sqrt(area) < canonical_box_size * 2**(l + 1 -
  canonical_level) pixels, i.e. (2 * canonical_box_size / 2**canonical_level)**2 cells on level l
  (28^2 for 224 at level 4); the coarsest level takes every larger box (no bound)."""
  bound = (2.0 * canonical_box_size / 2.0**canonical_level) ** 2
  return (bound,) * (num_levels - 1) + (math.inf,)


def _flatten_pyramid(
    features: Sequence[jax.Array],
    boxes: jax.Array,
    min_level: int,
    canonical_box_size: float,
    canonical_level: int,
    valid_hw: Optional[jax.Array],
    transposed: bool,
) -> _Flat:
  """`multilevel_roi_align`'s flat view: the pyramid (and the batch) as one `[B * sum_l H_l W_l,
  C]` table (row `b * n + offset_l + y * W_l + x`; with `transposed`, also the column-major
  table), every box on the block of its image and level."""
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

  def flat_table(maps):
    return jnp.concatenate([m.astype(dtype).reshape(bsz, -1, ch) for m in maps], axis=1).reshape(
        bsz * n, ch
    )

  boxes = lax.stop_gradient(jnp.asarray(boxes, jnp.float32))
  num = boxes.shape[1]
  level = assign_boxes_to_levels(
      boxes, min_level, max_level, canonical_box_size, canonical_level
  )  # [B, R]
  li = (level - min_level).reshape(-1)
  base = (
      jnp.asarray(offsets[:-1], jnp.int32)[li].reshape(bsz, num)
      # the image's block; an iota, not jnp.arange(bsz), which jax2onnx cannot trace for a
      # symbolic batch ("'_DynamicDimSentinel' object has no attribute 'rmax'")
      + lax.broadcasted_iota(jnp.int32, level.shape, 0) * n
  ).reshape(-1)
  height = jnp.asarray(hs, jnp.int32)[li]
  width = jnp.asarray(ws, jnp.int32)[li]
  ext_h, ext_w = height, width
  if valid_hw is not None:
    valid_hw = jnp.asarray(valid_hw, jnp.int32)
    ext_h = jnp.minimum(valid_hw[li, 0], height)
    ext_w = jnp.minimum(valid_hw[li, 1], width)
  return _Flat(
      table=flat_table(features),
      table_t=flat_table([jnp.swapaxes(f, 1, 2) for f in features]) if transposed else None,
      boxes=boxes.reshape(-1, 4),
      scale=_level_scales(min_level, max_level)[li],
      base=base,
      height=height,
      width=width,
      ext_h=ext_h,
      ext_w=ext_w,
      bsz=bsz,
      num=num,
      keep=_box_area(boxes) >= 0,  # False for NaN.
      level_shapes=tuple(zip(hs, ws)),
      area_bounds=_level_area_bounds(len(features), canonical_box_size, canonical_level),
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
    sampling_ratio: > 0 fixed samples per bin and axis; 0 adaptive (official).
    max_adaptive_samples: static per-axis cap for the adaptive mode (int or (cap_h, cap_w)).
    valid_hw: optional `[L, 2]` int32 rows/columns of each level that the official map has
      (`canvas.level_extents`): samples are clamped / dropped at that border instead of the
      array's, so features on a larger canvas pool exactly as on the official one.
  Returns:
    `[B, R, out_h, out_w, C]` in the features' dtype.
  """
  out_hw = _pair(output_size)
  cap_hw = _check_modes(sampling_ratio, max_adaptive_samples)
  flat = _flatten_pyramid(
      features,
      boxes,
      min_level,
      canonical_box_size,
      canonical_level,
      valid_hw,
      transposed=sampling_ratio <= 0,
  )
  return _pool(flat, out_hw, sampling_ratio, aligned, cap_hw)
