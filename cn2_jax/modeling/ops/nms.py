"""Exact, static-shape, tiled greedy NMS (torchvision `ops.nms` / `ops.batched_nms` semantics).

torchvision's CPU kernel (docs/centernet2.md §4.2): boxes are visited in descending score order (a
stable sort, so equal scores keep the lower index first); a visited box that is not suppressed is
kept and suppresses every later box j with IoU > thr, where IoU = inter / ((area_i + area_j) -
inter) is computed in float32 and compared with the (double) threshold; a NaN IoU (0/0 between
zero-area boxes) never suppresses. Here, additionally, boxes with `valid = False` are never kept and
never suppress (they are the padding of a static-shape array).

Algorithm (per image; `jax.vmap` for a batch): sort once, cut the sorted list into tiles of
`tile_size` boxes, and for each tile (a `lax.while_loop`)
  1. suppress it by the boxes kept so far (a `[cap, tile]` IoU block, cap = min(max_output, N));
  2. resolve suppression inside the tile by iterating keep <- cand & ~any_{i<j}(keep_i & S_ij) to
     its fixed point. After k iterations the first k entries are final, so it reaches the unique
     fixed point, which is exactly the greedy result;
  3. append the tile's kept boxes to the kept buffer.
The loop stops when `max_output` boxes are kept (later boxes cannot enter the output) or the valid
boxes are exhausted. Memory is O(cap * tile + tile^2), never N x N. The result is identical to the
sequential greedy loop, bit for bit: the IoU is evaluated in torchvision's float32 operation
order with fused multiply-add contraction blocked (`boxes.no_fma`), and `IoU > thr` (double) is
evaluated as `IoU > t32`, t32 = the largest float32 <= thr, equivalent for every float32 IoU.

Cost: the tile loop and the fixed-point loop are `while_loop`s (on GPU each iteration is a host
round trip); the fixed point usually converges in a few iterations, at worst `tile_size` (a chain
in which every box only overlaps its predecessor).
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np

import jax
import jax.numpy as jnp

from cn2_jax.modeling import export_mode
from cn2_jax.modeling.ops.boxes import box_area, no_fma

DEFAULT_TILE_SIZE = 512
_VANILLA_NUMEL = {"torchvision_cpu": 4000, "torchvision_cuda": 20000}


def _f32_threshold(thr) -> jax.Array:
  """The largest float32 t32 <= thr, so that (float32 x > double thr) <=> (x > t32)."""
  try:
    thr = float(thr)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return jnp.asarray(thr, jnp.float32)  # traced threshold: plain float32 rounding
  t = np.float32(thr)
  if float(t) > thr:
    t = np.nextafter(t, np.float32(-np.inf))
  return jnp.float32(t)


def _iou_block(
    a: jax.Array, a_area: jax.Array, b: jax.Array, b_area: jax.Array, zero: jax.Array
) -> jax.Array:
  """IoU `[A, B]` in torchvision's float32 operation order (NaN for 0/0)."""
  xx1 = jnp.maximum(a[:, None, 0], b[None, :, 0])
  yy1 = jnp.maximum(a[:, None, 1], b[None, :, 1])
  xx2 = jnp.minimum(a[:, None, 2], b[None, :, 2])
  yy2 = jnp.minimum(a[:, None, 3], b[None, :, 3])
  w = jnp.maximum(xx2 - xx1, 0.0)
  h = jnp.maximum(yy2 - yy1, 0.0)
  inter = w * h
  return inter / ((a_area[:, None] + b_area[None, :]) - no_fma(inter, zero))


def _resolve_tile(cand: jax.Array, sup: jax.Array) -> jax.Array:
  """Greedy keep mask of one sorted tile: fixed point of keep = cand & ~any_i(keep_i & sup_ij)."""

  def body(state):
    keep, _ = state
    new = cand & ~jnp.any(keep[:, None] & sup, axis=0)
    return new, jnp.any(new != keep)

  keep, _ = jax.lax.while_loop(lambda s: s[1], body, (cand, jnp.array(True)))
  return keep


def _nms_core(
    boxes: jax.Array,
    scores: jax.Array,
    valid: jax.Array,
    classes: Optional[jax.Array],
    class_aware: Union[bool, jax.Array],
    iou_threshold,
    max_output: int,
    tile_size: int,
) -> tuple[jax.Array, jax.Array]:
  n = boxes.shape[0]
  max_output = int(max_output)
  if max_output <= 0:
    return jnp.zeros((0,), jnp.int32), jnp.zeros((0,), bool)
  if n == 0:
    return jnp.zeros((max_output,), jnp.int32), jnp.zeros((max_output,), bool)
  boxes = jnp.asarray(boxes, jnp.float32)
  scores = jnp.asarray(scores, jnp.float32)
  valid = jnp.asarray(valid).astype(bool)
  thr = _f32_threshold(iou_threshold)

  # Sort: valid first, then descending score, then ascending index (a stable descending sort).
  iota = jnp.arange(n, dtype=jnp.int32)
  _, _, order = jax.lax.sort(((~valid).astype(jnp.int32), -scores, iota), num_keys=3)
  n_valid = jnp.sum(valid, dtype=jnp.int32)
  zero = (n_valid < 0).astype(jnp.int32)  # run-time 0 for no_fma

  tile = max(1, min(int(tile_size), n))
  n_tiles = -(-n // tile)
  pad = n_tiles * tile - n
  sb = jnp.pad(boxes[order], ((0, pad), (0, 0)))
  sv = jnp.pad(valid[order], (0, pad))
  sa = no_fma(box_area(sb), zero)
  if classes is not None:
    sc = jnp.pad(jnp.asarray(classes).astype(jnp.int32)[order], (0, pad))
  else:
    sc = jnp.zeros((n_tiles * tile,), jnp.int32)
  cap = min(max_output, n)
  cap_iota = jnp.arange(cap, dtype=jnp.int32)
  tile_iota = jnp.arange(tile, dtype=jnp.int32)
  later = tile_iota[:, None] < tile_iota[None, :]  # i before j inside the tile

  def cond(state):
    t, count = state[0], state[1]
    return (t < n_tiles) & (count < max_output) & (t * tile < n_valid)

  def body(state):
    t, count, kb, ka, kc, kpos = state
    start = t * tile
    tb = jax.lax.dynamic_slice_in_dim(sb, start, tile)
    ta = jax.lax.dynamic_slice_in_dim(sa, start, tile)
    tv = jax.lax.dynamic_slice_in_dim(sv, start, tile)
    tc = jax.lax.dynamic_slice_in_dim(sc, start, tile)
    # 1. suppression by the boxes kept in earlier tiles.
    sup = (_iou_block(kb, ka, tb, ta, zero) > thr) & (cap_iota < count)[:, None]
    if classes is not None:
      sup = sup & ((kc[:, None] == tc[None, :]) | ~jnp.asarray(class_aware))
    cand = tv & ~jnp.any(sup, axis=0)
    # 2. greedy resolution inside the tile.
    self_sup = (_iou_block(tb, ta, tb, ta, zero) > thr) & later
    if classes is not None:
      self_sup = self_sup & ((tc[:, None] == tc[None, :]) | ~jnp.asarray(class_aware))
    keep = _resolve_tile(cand, self_sup)
    # 3. append the kept boxes (in sorted order) to the buffer; overflow beyond cap is dropped.
    pos = count + jnp.cumsum(keep.astype(jnp.int32)) - 1
    dest = jnp.where(keep & (pos < cap), pos, cap)
    kb = kb.at[dest].set(tb, mode="drop")
    ka = ka.at[dest].set(ta, mode="drop")
    kc = kc.at[dest].set(tc, mode="drop")
    kpos = kpos.at[dest].set(start + tile_iota, mode="drop")
    count = count + jnp.sum(keep, dtype=jnp.int32)
    return t + 1, count, kb, ka, kc, kpos

  init = (
      jnp.int32(0),
      jnp.int32(0),
      jnp.zeros((cap, 4), jnp.float32),
      jnp.zeros((cap,), jnp.float32),
      jnp.zeros((cap,), jnp.int32),
      jnp.zeros((cap,), jnp.int32),
  )
  _, count, _, _, _, kpos = jax.lax.while_loop(cond, body, init)
  keep_valid = cap_iota < count
  keep_idx = jnp.where(keep_valid, order[kpos], 0)
  if cap < max_output:
    keep_idx = jnp.pad(keep_idx, (0, max_output - cap))
    keep_valid = jnp.pad(keep_valid, (0, max_output - cap))
  return keep_idx.astype(jnp.int32), keep_valid


@export_mode.onnx_form(lambda *a, **k: nms_for_onnx(*a, **k))
def nms(
    boxes: jax.Array,
    scores: jax.Array,
    valid: jax.Array,
    iou_threshold: float,
    max_output: int,
    *,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> tuple[jax.Array, jax.Array]:
  """Greedy NMS with torchvision `ops.nms` semantics (one image; vmappable).

  Args:
    boxes: `[N, 4]` float32 xyxy.
    scores: `[N]` float32 (must not be NaN).
    valid: `[N]` bool; invalid boxes are never kept and never suppress.
    iou_threshold: Python float; box j is suppressed by an earlier kept box i when IoU > thr.
      (A traced threshold also works but is then rounded to float32 to nearest.)
    max_output: static output length.
    tile_size: static tile length of the tiled algorithm (performance only; results identical).
  Returns:
    keep_idx: `[max_output]` int32 indices into the N boxes of the kept boxes in descending-score
      order (ties: lower index first); padding slots hold 0.
    keep_valid: `[max_output]` bool, False for padding slots.
  """
  return _nms_core(boxes, scores, valid, None, False, iou_threshold, max_output, tile_size)


def batched_nms(
    boxes: jax.Array,
    scores: jax.Array,
    classes: jax.Array,
    valid: jax.Array,
    iou_threshold: float,
    max_output: int,
    *,
    mode: str = "per_class",
    tile_size: int = DEFAULT_TILE_SIZE,
) -> tuple[jax.Array, jax.Array]:
  """Class-aware NMS with torchvision `ops.batched_nms` semantics (one image; vmappable).

  A box only suppresses boxes of its own class. torchvision implements this in two ways, chosen by
  the number of boxes and the device, that agree in exact arithmetic but round IoUs differently:
    * `"per_class"` (default): NMS restricted to same-class pairs on the original coordinates =
      torchvision's per-class loop `_batched_nms_vanilla`, used for more than 1000 (CPU) / 5000
      (CUDA) boxes, e.g. the oracle's final 0.7 NMS.
    * `"offset"`: torchvision's coordinate trick: boxes + class * (max_coord + 1) in float32
      (max over valid boxes), then plain NMS (bit-exact float32 emulation, including its rare
      cross-class suppression when coordinates are negative).
    * `"torchvision_cpu"` / `"torchvision_cuda"`: per image, whichever of the two torchvision
      would pick for the valid boxes (vanilla when 4 * #valid > 4000 / 20000).

  Args:
    boxes: `[N, 4]` float32; scores: `[N]`; classes: `[N]` int32; valid: `[N]` bool.
    iou_threshold, max_output, tile_size: as in `nms`.
    mode: see above (static).
  Returns:
    keep_idx `[max_output]` int32, keep_valid `[max_output]` bool, as in `nms`.
  """
  classes = jnp.asarray(classes).astype(jnp.int32)
  if mode == "per_class":
    return _nms_core(boxes, scores, valid, classes, True, iou_threshold, max_output, tile_size)
  if mode not in ("offset",) + tuple(_VANILLA_NUMEL):
    raise ValueError(f"batched_nms: unknown mode {mode!r}")
  boxes = jnp.asarray(boxes, jnp.float32)
  valid = jnp.asarray(valid).astype(bool)
  n_valid = jnp.sum(valid, dtype=jnp.int32)
  zero = (n_valid < 0).astype(jnp.int32)
  max_coord = jnp.max(jnp.where(valid[:, None], boxes, -jnp.inf), initial=-jnp.inf)
  max_coord = jnp.where(n_valid > 0, max_coord, 0.0)
  offsets = no_fma(classes.astype(jnp.float32) * (max_coord + 1.0), zero)
  shifted = boxes + offsets[:, None]
  if mode == "offset":
    return _nms_core(shifted, scores, valid, None, False, iou_threshold, max_output, tile_size)
  vanilla = 4 * n_valid > _VANILLA_NUMEL[mode]
  eff = jnp.where(vanilla, boxes, shifted)
  return _nms_core(eff, scores, valid, classes, vanilla, iou_threshold, max_output, tile_size)


# ------------------------------------------------------------------------ the ONNX-friendly form
def _iou_block_batched(a, a_area, b, b_area, zero) -> jax.Array:
  """`_iou_block` per row of a batch: `a [B, A, 4]`, `b [B, T, 4]` -> `[B, A, T]`, the same
  operations in the same order (bit-identical values)."""
  xx1 = jnp.maximum(a[:, :, None, 0], b[:, None, :, 0])
  yy1 = jnp.maximum(a[:, :, None, 1], b[:, None, :, 1])
  xx2 = jnp.minimum(a[:, :, None, 2], b[:, None, :, 2])
  yy2 = jnp.minimum(a[:, :, None, 3], b[:, None, :, 3])
  w = jnp.maximum(xx2 - xx1, 0.0)
  h = jnp.maximum(yy2 - yy1, 0.0)
  inter = w * h
  return inter / ((a_area[:, :, None] + b_area[:, None, :]) - no_fma(inter, zero))


def sort_order_for_onnx(scores: jax.Array, valid: jax.Array) -> jax.Array:
  """The NMS's visiting order along the last axis, `lax.sort((~valid, -scores, iota),
  num_keys=3)`'s permutation (valid first, then descending score, then ascending index), as two
  stable single-key sorts: by -score, then (stably) by validity. jax2onnx 0.12.5 converts only
  single-key sorts ("lax.sort with num_keys > 1 is not supported yet"), each into an ONNX TopK,
  which orders equal keys by index, i.e. stably. `scores [..., N]`, `valid [..., N]` ->
  int32 `[..., N]`."""
  iota = jnp.zeros(scores.shape, jnp.int32) + jnp.arange(scores.shape[-1], dtype=jnp.int32)
  _, by_score = jax.lax.sort((-scores, iota), dimension=scores.ndim - 1, num_keys=1, is_stable=True)
  invalid = jnp.take_along_axis((~valid).astype(jnp.int32), by_score, axis=-1)
  _, order = jax.lax.sort(
      (invalid, by_score), dimension=scores.ndim - 1, num_keys=1, is_stable=True
  )
  return order


def nms_for_onnx(
    boxes: jax.Array,
    scores: jax.Array,
    valid: jax.Array,
    iou_threshold: float,
    max_output: int,
    *,
    tile_size: int = DEFAULT_TILE_SIZE,
    classes: Optional[jax.Array] = None,
    class_aware: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array]:
  """`nms` for an ONNX conversion, batched explicitly over any leading dimensions (`boxes
  [..., N, 4]`, `scores`/`valid [..., N]` -> `[..., max_output]` each; the leading ones may be a
  symbolic batch): the same tiled algorithm and values, without vmap (jax2onnx 0.12.5 fails on
  vmapped jnp.where: "module 'jax.interpreters.batching' has no attribute 'not_mapped'"),
  without the multi-key sort (`sort_order_for_onnx`) and without scatters (the kept buffer is
  updated through a one-hot comparison, exact for int32 positions).

  The loops run until every row is done; a finished row is unchanged by further tiles (its tiles
  hold only invalid boxes, or its buffer is full: the `pos < cap` guard drops the extra kept
  boxes), and the fixed-point iteration of a converged row is its identity.

  `classes [..., N]` int32 (with `class_aware [...]` bool, default all True): in the rows where
  class_aware holds, a box only suppresses boxes of its own class (`_nms_core`'s class-aware
  mode; `batched_nms_for_onnx`)."""
  lead, n = scores.shape[:-1], scores.shape[-1]
  max_output = int(max_output)
  if max_output <= 0 or n == 0:
    return (
        jnp.zeros(lead + (max(max_output, 0),), jnp.int32),
        jnp.zeros(lead + (max(max_output, 0),), bool),
    )
  boxes = jnp.asarray(boxes, jnp.float32).reshape(-1, n, 4)
  scores = jnp.asarray(scores, jnp.float32).reshape(-1, n)
  valid = jnp.asarray(valid).astype(bool).reshape(-1, n)
  thr = _f32_threshold(iou_threshold)
  if classes is not None:
    classes = jnp.asarray(classes).astype(jnp.int32).reshape(-1, n)
    aware = jnp.ones_like(valid[:, 0]) if class_aware is None else class_aware
    aware = jnp.asarray(aware).astype(bool).reshape(-1, 1, 1)

  order = sort_order_for_onnx(scores, valid)
  n_valid = jnp.sum(valid, axis=1, dtype=jnp.int32)  # [B]
  zero = (jnp.min(n_valid) < 0).astype(jnp.int32)  # run-time 0 for no_fma

  tile = max(1, min(int(tile_size), n))
  n_tiles = -(-n // tile)
  pad = n_tiles * tile - n
  sb = jnp.pad(jnp.take_along_axis(boxes, order[:, :, None], axis=1), ((0, 0), (0, pad), (0, 0)))
  sv = jnp.pad(jnp.take_along_axis(valid, order, axis=1), ((0, 0), (0, pad)))
  sa = no_fma(box_area(sb), zero)
  if classes is not None:
    sc = jnp.pad(jnp.take_along_axis(classes, order, axis=1), ((0, 0), (0, pad)))
  cap = min(max_output, n)
  cap_iota = jnp.arange(cap, dtype=jnp.int32)
  tile_iota = jnp.arange(tile, dtype=jnp.int32)
  later = tile_iota[:, None] < tile_iota[None, :]

  # n_valid rides in the loop state: jax2onnx 0.12.5 misaligns a while cond's closed-over
  # arrays with its carry (it read kpos as count).
  def cond(state):
    t, count, _, rows = state
    return (t < n_tiles) & jnp.any((count < max_output) & (t * tile < rows))

  def resolve(cand, sup):  # `_resolve_tile` per row; stops when no row changes
    def body(state):
      keep, _ = state
      new = cand & ~jnp.any(keep[:, :, None] & sup, axis=1)
      return new, jnp.any(new != keep)

    keep, _ = jax.lax.while_loop(lambda s: s[1], body, (cand, jnp.array(True)))
    return keep

  def body(state):
    t, count, kpos, rows = state
    start = t * tile
    tb = jax.lax.dynamic_slice_in_dim(sb, start, tile, axis=1)
    ta = jax.lax.dynamic_slice_in_dim(sa, start, tile, axis=1)
    tv = jax.lax.dynamic_slice_in_dim(sv, start, tile, axis=1)
    kb = jnp.take_along_axis(sb, kpos[:, :, None], axis=1)  # the kept boxes [B, cap, 4]
    ka = jnp.take_along_axis(sa, kpos, axis=1)
    sup = (_iou_block_batched(kb, ka, tb, ta, zero) > thr) & (cap_iota < count[:, None])[:, :, None]
    self_sup = (_iou_block_batched(tb, ta, tb, ta, zero) > thr) & later
    if classes is not None:
      tc = jax.lax.dynamic_slice_in_dim(sc, start, tile, axis=1)
      kc = jnp.take_along_axis(sc, kpos, axis=1)
      sup = sup & ((kc[:, :, None] == tc[:, None, :]) | ~aware)
      self_sup = self_sup & ((tc[:, :, None] == tc[:, None, :]) | ~aware)
    cand = tv & ~jnp.any(sup, axis=1)
    keep = resolve(cand, self_sup)
    pos = count[:, None] + jnp.cumsum(keep.astype(jnp.int32), axis=1) - 1
    dest = jnp.where(keep & (pos < cap), pos, cap)  # [B, tile]; cap = nowhere
    hit = dest[:, None, :] == cap_iota[None, :, None]  # [B, cap, tile], one True per filled slot
    filled = jnp.sum(jnp.where(hit, start + tile_iota, 0), axis=2, dtype=jnp.int32)
    kpos = jnp.where(jnp.any(hit, axis=2), filled, kpos)
    return t + 1, count + jnp.sum(keep, axis=1, dtype=jnp.int32), kpos, rows

  kpos0 = jnp.zeros_like(n_valid)[:, None] + cap_iota * 0
  init = (jnp.int32(0), jnp.zeros_like(n_valid), kpos0, n_valid)
  _, count, kpos, _ = jax.lax.while_loop(cond, body, init)
  keep_valid = cap_iota < count[:, None]
  keep_idx = jnp.where(keep_valid, jnp.take_along_axis(order, kpos, axis=1), 0)
  if cap < max_output:
    keep_idx = jnp.pad(keep_idx, ((0, 0), (0, max_output - cap)))
    keep_valid = jnp.pad(keep_valid, ((0, 0), (0, max_output - cap)))
  out_shape = (-1,) + tuple(lead[1:]) + (max_output,) if lead else (max_output,)
  return keep_idx.astype(jnp.int32).reshape(out_shape), keep_valid.reshape(out_shape)


def batched_nms_for_onnx(
    boxes: jax.Array,
    scores: jax.Array,
    classes: jax.Array,
    valid: jax.Array,
    iou_threshold: float,
    max_output: int,
    *,
    mode: str = "per_class",
    tile_size: int = DEFAULT_TILE_SIZE,
) -> tuple[jax.Array, jax.Array]:
  """`batched_nms` for an ONNX conversion, batched over leading dimensions (`boxes [..., N, 4]`,
  the rest `[..., N]`; no vmap, as `nms_for_onnx`): the same modes and values. The offset trick's
  coordinates are computed as in `batched_nms` (max over each row's valid boxes), and
  "torchvision_cpu" / "torchvision_cuda" choose per row between them and the class-aware NMS."""
  kw = dict(tile_size=tile_size)
  classes = jnp.asarray(classes).astype(jnp.int32)
  if mode == "per_class":
    return nms_for_onnx(boxes, scores, valid, iou_threshold, max_output, classes=classes, **kw)
  if mode not in ("offset",) + tuple(_VANILLA_NUMEL):
    raise ValueError(f"batched_nms: unknown mode {mode!r}")
  boxes = jnp.asarray(boxes, jnp.float32)
  valid = jnp.asarray(valid).astype(bool)
  n_valid = jnp.sum(valid, axis=-1, dtype=jnp.int32)  # [...]
  zero = (jnp.min(n_valid) < 0).astype(jnp.int32)
  if scores.shape[-1] == 0:  # nothing to reduce (jax2onnx refuses jnp.max's `initial`)
    return nms_for_onnx(boxes, scores, valid, iou_threshold, max_output, **kw)
  max_coord = jnp.max(jnp.where(valid[..., None], boxes, -jnp.inf), axis=(-2, -1))
  max_coord = jnp.where(n_valid > 0, max_coord, 0.0)
  offsets = no_fma(classes.astype(jnp.float32) * (max_coord[..., None] + 1.0), zero)
  shifted = boxes + offsets[..., None]
  if mode == "offset":
    return nms_for_onnx(shifted, scores, valid, iou_threshold, max_output, **kw)
  vanilla = 4 * n_valid > _VANILLA_NUMEL[mode]
  eff = jnp.where(vanilla[..., None, None], boxes, shifted)
  return nms_for_onnx(
      eff, scores, valid, iou_threshold, max_output, classes=classes, class_aware=vanilla, **kw
  )


@export_mode.onnx_form(lambda *a, **k: batched_nms_for_onnx(*a, **k))
def batched_nms_batch(
    boxes: jax.Array,
    scores: jax.Array,
    classes: jax.Array,
    valid: jax.Array,
    iou_threshold: float,
    max_output: int,
    *,
    mode: str = "per_class",
    tile_size: int = DEFAULT_TILE_SIZE,
) -> tuple[jax.Array, jax.Array]:
  """`batched_nms` of each image of a batch (`boxes [B, N, 4]`, the rest `[B, N]`): its vmap;
  `batched_nms_for_onnx` inside `export_mode.onnx_ops()` (jax2onnx fails on the vmap)."""

  def single(bx, sc, cl, ok):
    return batched_nms(bx, sc, cl, ok, iou_threshold, max_output, mode=mode, tile_size=tile_size)

  return jax.vmap(single)(boxes, scores, classes, valid)
