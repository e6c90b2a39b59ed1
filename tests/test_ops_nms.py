"""Tiled static-shape NMS vs a plain greedy loop transcribing torchvision's CPU kernel."""

import functools

import numpy as np
import pytest

import jax

from cn2_jax.modeling.ops.nms import batched_nms, nms

F32 = np.float32


def ref_nms(boxes, scores, valid, thr, classes=None):
  """torchvision nms_kernel.cpp: stable descending sort, float32 IoU, `ovr > thr` in double."""
  boxes = boxes.astype(F32)
  n = len(boxes)
  order = sorted([i for i in range(n) if valid[i]], key=lambda i: (-float(scores[i]), i))
  order = np.array(order, np.int64)
  x1, y1, x2, y2 = boxes.T
  areas = (x2 - x1) * (y2 - y1)
  suppressed = np.zeros(n, bool)
  keep = []
  for k, i in enumerate(order):
    if suppressed[i]:
      continue
    keep.append(int(i))
    rest = order[k + 1 :]
    w = np.maximum(F32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
    h = np.maximum(F32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
    inter = w * h
    with np.errstate(divide="ignore", invalid="ignore"):
      ovr = inter / ((areas[i] + areas[rest]) - inter)
    assert ovr.dtype == F32
    sup = ovr.astype(np.float64) > thr  # NaN never suppresses
    if classes is not None:
      sup &= classes[rest] == classes[i]
    suppressed[rest[sup]] = True
  return np.array(keep, np.int64)


def ref_batched_vanilla(boxes, scores, classes, valid, thr):
  """torchvision _batched_nms_vanilla: per-class nms, then a stable descending sort."""
  keep_mask = np.zeros(len(boxes), bool)
  for c in np.unique(classes[valid]):
    sub = np.nonzero((classes == c) & valid)[0]
    keep_mask[sub[ref_nms(boxes[sub], scores[sub], np.ones(len(sub), bool), thr)]] = True
  kept = np.nonzero(keep_mask)[0]
  return np.array(sorted(kept, key=lambda i: (-float(scores[i]), i)), np.int64)


def ref_batched_offset(boxes, scores, classes, valid, thr):
  """torchvision _batched_nms_coordinate_trick in float32."""
  if not valid.any():
    return np.zeros(0, np.int64)
  m = boxes[valid].max()
  off = classes.astype(F32) * (m + F32(1))
  return ref_nms(boxes + off[:, None], scores, valid, thr)


def check(keep_idx, keep_valid, ref, max_output):
  keep_idx, keep_valid = np.asarray(keep_idx), np.asarray(keep_valid)
  assert keep_idx.shape == keep_valid.shape == (max_output,)
  assert keep_idx.dtype == np.int32
  r = ref[:max_output]
  np.testing.assert_array_equal(keep_valid, np.arange(max_output) < len(r))
  np.testing.assert_array_equal(keep_idx[: len(r)], r)
  assert np.all(keep_idx[len(r) :] == 0)


def make_case(seed, n, n_clusters=6, p_invalid=0.15, p_zero=0.05, tie_levels=None, spread=3.0):
  """Heavily overlapping clustered boxes, zero-area boxes, invalid entries, optional score ties."""
  rng = np.random.default_rng(seed)
  centers = rng.uniform(20, 200, (n_clusters, 2))
  sizes = rng.uniform(8, 60, (n_clusters, 2))
  c = rng.integers(n_clusters, size=n)
  ctr = centers[c] + rng.normal(0, spread, (n, 2))
  wh = sizes[c] * rng.uniform(0.8, 1.25, (n, 2))
  boxes = np.concatenate([ctr - wh / 2, ctr + wh / 2], 1).astype(F32)
  zero = rng.uniform(size=n) < p_zero
  boxes[zero, 2] = boxes[zero, 0]  # zero width
  if n > 4:  # identical zero-area boxes (0/0 IoU) and an exact duplicate box
    boxes[1] = boxes[2] = [5, 5, 5, 5]
    boxes[4] = boxes[3]
  scores = rng.uniform(size=n).astype(F32)
  if tie_levels:
    scores = (np.floor(scores * tie_levels) / tie_levels).astype(F32)
  valid = rng.uniform(size=n) >= p_invalid
  return boxes, scores, valid


@functools.lru_cache(maxsize=None)
def jitted_batched(thr, max_output, tile, mode):
  return jax.jit(
      lambda b, s, c, v: batched_nms(b, s, c, v, thr, max_output, mode=mode, tile_size=tile)
  )


@functools.lru_cache(maxsize=None)
def jitted_nms(thr, max_output, tile):
  return jax.jit(lambda b, s, v: nms(b, s, v, thr, max_output, tile_size=tile))


@pytest.mark.parametrize(
    "seed,n,tile,max_output,thr,ties",
    [
        (0, 50, 512, 50, 0.5, None),  # single tile
        (1, 300, 32, 300, 0.5, 4),  # ~10 tiles, heavy ties
        (2, 300, 32, 20, 0.7, None),  # early exit on max_output
        (3, 300, 32, 310, 0.9, 7),  # output padding beyond N
        (4, 257, 64, 100, 0.3, None),  # N not a multiple of the tile
        (5, 1000, 128, 1000, 0.7, 20),  # larger N, several tiles
    ],
)
def test_nms_vs_greedy(seed, n, tile, max_output, thr, ties):
  boxes, scores, valid = make_case(seed, n, tie_levels=ties)
  keep, kv = jitted_nms(thr, max_output, tile)(boxes, scores, valid)
  ref = ref_nms(boxes, scores, valid, thr)
  assert len(ref) < valid.sum()  # suppression happened
  check(keep, kv, ref, max_output)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_many_seeds_same_shape(seed):
  fn = jitted_nms(0.6, 64, 16)
  for sub in range(4):
    boxes, scores, valid = make_case(
        100 * seed + sub, 120, n_clusters=4, tie_levels=3 * sub or None
    )
    keep, kv = fn(boxes, scores, valid)
    check(keep, kv, ref_nms(boxes, scores, valid, 0.6), 64)


def test_nms_iou_bit_exact_per_pair_thresholds():
  """2000 two-box problems, each with a threshold equal to (or 1 ulp below) its own float32 IoU
  in torchvision's operation order: every decision hinges on the last bit of the IoU (a fused
  multiply-add anywhere in the IoU flips ~4% of them). Thresholds are traced here (float32)."""
  rng = np.random.default_rng(0)
  p = 2000
  a = rng.uniform(0, 50, (p, 2))
  wa = rng.uniform(0, 40, (p, 2))
  b = a + rng.normal(0, 3, (p, 2))
  wb = wa * rng.uniform(0.8, 1.2, (p, 2))
  boxes = np.stack([np.concatenate([a, a + wa], 1), np.concatenate([b, b + wb], 1)], 1).astype(F32)
  boxes[:20, :, 2] = boxes[:20, :, 0]  # zero-area pairs: NaN IoU
  area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
  w = np.maximum(
      F32(0),
      np.minimum(boxes[:, 0, 2], boxes[:, 1, 2]) - np.maximum(boxes[:, 0, 0], boxes[:, 1, 0]),
  )
  h = np.maximum(
      F32(0),
      np.minimum(boxes[:, 0, 3], boxes[:, 1, 3]) - np.maximum(boxes[:, 0, 1], boxes[:, 1, 1]),
  )
  inter = w * h
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = inter / ((area[:, 0] + area[:, 1]) - inter)
  scores = np.tile(np.array([1.0, 0.5], F32), (p, 1))
  valid = np.ones((p, 2), bool)
  fn = jax.jit(jax.vmap(lambda b, s, v, t: nms(b, s, v, t, 2)))
  for thr in (iou, np.nextafter(iou, F32(0))):
    _, kv = fn(boxes, scores, valid, thr)
    with np.errstate(invalid="ignore"):
      expect_kept = ~(iou > thr)
    np.testing.assert_array_equal(np.asarray(kv)[:, 1], expect_kept)
    assert np.asarray(kv)[:, 0].all()
  assert 0 < (iou > np.nextafter(iou, F32(0))).sum() < p


def test_nms_double_threshold_semantics():
  # IoU = 0.6000000238 (= float32(0.6)) > 0.6 in double: suppressed, although not > float32(0.6).
  boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 6.0000005]], F32)
  b = boxes
  inter = F32((b[1, 2] - b[1, 0]) * (b[1, 3] - b[1, 1]))
  iou = inter / F32(F32(F32(100) + inter) - inter)
  keep, kv = nms(boxes, np.array([1.0, 0.5], F32), np.ones(2, bool), 0.6, 2)
  ref = ref_nms(boxes, np.array([1.0, 0.5], F32), np.ones(2, bool), 0.6)
  check(keep, kv, ref, 2)
  assert (float(iou) > 0.6) == (len(ref) == 1)


def test_nms_invalid_never_suppress_or_kept():
  boxes = np.array([[0, 0, 10, 10]] * 4, F32)
  scores = np.array([0.9, 0.8, 0.7, 0.95], F32)
  valid = np.array([False, True, True, False])
  keep, kv = nms(boxes, scores, valid, 0.5, 4)
  np.testing.assert_array_equal(np.asarray(keep), [1, 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(kv), [True, False, False, False])
  keep, kv = nms(boxes, scores, np.zeros(4, bool), 0.5, 3)
  assert not np.asarray(kv).any() and not np.asarray(keep).any()
  keep, kv = nms(np.zeros((0, 4), F32), np.zeros(0, F32), np.zeros(0, bool), 0.5, 3)
  assert keep.shape == (3,) and not np.asarray(kv).any()


def test_nms_zero_area_nan_iou_never_suppresses():
  boxes = np.array([[3, 3, 3, 3], [3, 3, 3, 3], [3, 3, 3, 8], [3, 3, 3, 8]], F32)
  keep, kv = nms(boxes, np.array([4, 3, 2, 1], F32), np.ones(4, bool), 0.1, 4)
  np.testing.assert_array_equal(np.asarray(keep), [0, 1, 2, 3])
  assert np.asarray(kv).all()


def test_nms_vmap_batch():
  cases = [make_case(20 + k, 150, tie_levels=5 if k == 1 else None) for k in range(3)]
  boxes, scores, valid = (np.stack(x) for x in zip(*cases))
  fn = jax.jit(jax.vmap(lambda b, s, v: nms(b, s, v, 0.5, 80, tile_size=32)))
  keep, kv = fn(boxes, scores, valid)
  for k in range(3):
    check(keep[k], kv[k], ref_nms(*cases[k], 0.5), 80)


def test_nms_no_recompilation():
  traces = []

  def f(b, s, v):
    traces.append(1)
    return nms(b, s, v, 0.7, 40, tile_size=32)

  fn = jax.jit(f)
  for seed in range(3):
    boxes, scores, valid = make_case(seed, 100)
    keep, kv = fn(boxes, scores, valid)
    check(keep, kv, ref_nms(boxes, scores, valid, 0.7), 40)
  assert len(traces) == 1


@pytest.mark.parametrize("seed,n,n_cls,tile", [(0, 200, 3, 32), (1, 120, 7, 512), (2, 300, 2, 64)])
def test_batched_nms_per_class(seed, n, n_cls, tile):
  boxes, scores, valid = make_case(seed, n, tie_levels=10 if seed == 1 else None)
  classes = np.random.default_rng(seed).integers(n_cls, size=n).astype(np.int32)
  max_out = n // 2
  keep, kv = jax.jit(lambda b, s, c, v: batched_nms(b, s, c, v, 0.5, max_out, tile_size=tile))(
      boxes, scores, classes, valid
  )
  check(keep, kv, ref_batched_vanilla(boxes, scores, classes, valid, 0.5), max_out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_nms_offset_mode(seed):
  boxes, scores, valid = make_case(seed, 200)
  boxes = boxes - F32(60)  # negative coordinates too (torchvision's trick then may cross classes)
  classes = np.random.default_rng(seed).integers(4, size=200).astype(np.int32)
  for mode in ("offset", "torchvision_cpu", "torchvision_cuda"):
    keep, kv = jitted_batched(0.6, 200, 64, mode)(boxes, scores, classes, valid)
    check(keep, kv, ref_batched_offset(boxes, scores, classes, valid, 0.6), 200)


def test_batched_nms_torchvision_cpu_dispatch_large():
  # > 1000 valid boxes: torchvision (CPU) loops over the classes.
  boxes, scores, valid = make_case(9, 1100, p_invalid=0.0)
  classes = np.random.default_rng(9).integers(3, size=1100).astype(np.int32)
  keep, kv = batched_nms(
      boxes, scores, classes, valid, 0.5, 300, mode="torchvision_cpu", tile_size=256
  )
  check(keep, kv, ref_batched_vanilla(boxes, scores, classes, valid, 0.5), 300)
