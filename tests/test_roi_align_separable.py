"""The adaptive ROIAlign (`sampling_ratio=0`, separable window contractions) against the former
sub-sample scan (cn2_jax/testing/roi_align_scan.py): values and feature gradients on boxes of every
kind, the static window's guarantee that every box fits, and the absence of control flow.
tests/test_ops_roi_align.py compares both modes with a loop transcription of torchvision's kernel
and with the official pooled features."""

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cn2_jax.modeling.ops import roi_align as ra
from cn2_jax.testing import roi_align_scan as rs
from tests.schema_settings import level_kwargs, pooler_kwargs
from tests.test_ops_roi_align import ORACLE_DIR, _multilevel_boxes, _pyramid, make_boxes

F32 = np.float32
TOL = dict(rtol=1e-5, atol=1e-5)


def _adaptive_kw(**overrides):
  kw = pooler_kwargs(sampling_ratio=0, **overrides)
  return kw


def _scan_kw(kw):
  return {k: v for k, v in kw.items() if k != "sampling_ratio"}


def _elongated_boxes(rng, bsz, r, img_h, img_w):
  """Thin boxes along either axis, up to the image size (the largest supports a level allows),
  partly outside the image, with sub-cell and huge sides."""
  long = np.exp(rng.uniform(np.log(16.0), np.log(2.5 * max(img_h, img_w)), size=(bsz, r)))
  short = np.exp(rng.uniform(np.log(0.3), np.log(64.0), size=(bsz, r)))
  tall = rng.random((bsz, r)) < 0.5
  bw, bh = np.where(tall, short, long), np.where(tall, long, short)
  cx = rng.uniform(-0.3, 1.3, size=(bsz, r)) * img_w
  cy = rng.uniform(-0.3, 1.3, size=(bsz, r)) * img_h
  return np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1).astype(F32)


def _grad_pair(fn_new, fn_old, feats, gout):
  def loss(fn):
    return lambda fs: jnp.sum(fn(fs) * gout)

  return jax.jit(jax.grad(loss(fn_new)))(feats), jax.jit(jax.grad(loss(fn_old)))(feats)


@pytest.mark.parametrize(
    "seed,h,w,scale,out_hw,aligned,cap",
    [
        (0, 9, 11, 0.5, (7, 7), True, 8),
        (1, 6, 13, 0.25, (3, 5), True, (2, 3)),  # capped boxes (grid > cap)
        (2, 8, 6, 0.125, (7, 7), False, 4),
        (3, 1, 7, 1.0, (7, 7), True, 8),  # a one-row map
        (4, 14, 5, 1.0, (5, 3), True, 3),
    ],
)
def test_single_map_values_and_grads_equal_scan(seed, h, w, scale, out_hw, aligned, cap):
  rng = np.random.default_rng(seed)
  c = 3
  feat = rng.standard_normal((h, w, c)).astype(F32)
  boxes = np.concatenate(
      [make_boxes(rng, h / scale, w / scale, 1.0 / scale), _elongated_boxes(rng, 1, 6, h, w)[0]]
  )
  kw = dict(spatial_scale=scale, output_size=out_hw, aligned=aligned, max_adaptive_samples=cap)
  new = functools.partial(ra.roi_align, sampling_ratio=0, **kw)
  old = functools.partial(rs.roi_align_scan, **kw)
  got, want = jax.jit(new)(feat, boxes), jax.jit(old)(feat, boxes)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)
  empty = np.all(np.asarray(want) == 0, axis=(1, 2, 3))
  assert np.all(np.asarray(got)[empty] == 0)  # no sample (roi <= 0 or outside): exactly 0
  gout = rng.standard_normal(got.shape).astype(F32)
  g_new, g_old = _grad_pair(lambda f: new(f, boxes), lambda f: old(f, boxes), feat, gout)
  np.testing.assert_allclose(np.asarray(g_new), np.asarray(g_old), **TOL)


@pytest.mark.parametrize("seed,aligned,out_hw,cap", [(0, True, (7, 7), 24), (1, False, (3, 5), 4)])
def test_multilevel_values_and_grads_equal_scan(seed, aligned, out_hw, cap):
  """Batch of 2, every level, tiny / huge / out-of-image / degenerate / thin boxes, a canvas
  border (`valid_hw`) smaller than the arrays."""
  rng = np.random.default_rng(40 + seed)
  bsz, img_h, img_w, c = 2, 96, 136, 2
  feats = _pyramid(rng, bsz, img_h, img_w, c)
  boxes = np.concatenate(
      [_multilevel_boxes(rng, bsz, 12, img_h, img_w), _elongated_boxes(rng, bsz, 10, img_h, img_w)],
      1,
  )
  boxes[1, -1] = [np.nan, 0, 5, 5]
  levels = np.asarray(ra.assign_boxes_to_levels(boxes, **level_kwargs()))
  assert set(levels[np.isfinite(boxes).all(-1)].ravel()) == {3, 4, 5, 6, 7}
  kw = _adaptive_kw(output_size=out_hw, aligned=aligned, max_adaptive_samples=cap)
  need = np.asarray(ra.required_adaptive_samples(boxes, None, out_hw, aligned, **level_kwargs()))
  if cap == 4:
    assert need.max() > 4  # some boxes are sampled with the capped grid
  valid_hw = np.asarray([[f.shape[1] - 1, f.shape[2] - 2] for f in feats], np.int32)
  for vhw in (None, valid_hw):
    new = functools.partial(ra.multilevel_roi_align, valid_hw=vhw, **kw)
    old = functools.partial(rs.multilevel_roi_align_scan, valid_hw=vhw, **_scan_kw(kw))
    got, want = jax.jit(new)(feats, boxes), jax.jit(old)(feats, boxes)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)
    assert np.all(np.asarray(got)[1, -1] == 0)  # NaN box
    gout = rng.standard_normal(got.shape).astype(F32)
    g_new, g_old = _grad_pair(lambda f: new(f, boxes), lambda f: old(f, boxes), feats, gout)
    for a, b in zip(g_new, g_old):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)


def test_bfloat16_close_to_scan():
  rng = np.random.default_rng(5)
  feats = _pyramid(rng, 2, 64, 96, 4)
  boxes = _multilevel_boxes(rng, 2, 8, 64, 96)
  kw = _adaptive_kw(max_adaptive_samples=8)
  feats_bf = [f.astype(jnp.bfloat16) for f in feats]
  got = ra.multilevel_roi_align(feats_bf, boxes, **kw)
  want = rs.multilevel_roi_align_scan(feats_bf, boxes, **_scan_kw(kw))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, F32), np.asarray(want, F32), rtol=0.03, atol=0.03)


def test_oracle_features_and_boxes_equal_scan():
  """The official image's P4..P7 features and the boxes of the three cascade stages (the official
  pooled features of the first boxes: tests/test_ops_roi_align.py): values and gradients."""
  path = os.path.join(ORACLE_DIR, "outputs_000000000009.npz")
  if not os.path.exists(path):
    pytest.skip(f"oracle outputs not found at {os.path.normpath(path)}")
  d = np.load(path)
  feats = [d[f"p{l}"].transpose(1, 2, 0)[None] for l in range(4, 8)]
  feats = [np.zeros((1, 2 * feats[0].shape[1], 2 * feats[0].shape[2], 256), F32)] + feats
  boxes = np.concatenate([d[f"stage{k}_input_boxes"] for k in range(3)])[None].astype(F32)
  levels = np.asarray(ra.assign_boxes_to_levels(boxes, **level_kwargs()))
  boxes = boxes[:, levels[0] >= 4]  # P3 is not stored: its boxes would pool zeros
  kw = _adaptive_kw(max_adaptive_samples=24)
  new = jax.jit(functools.partial(ra.multilevel_roi_align, **kw))
  old = jax.jit(functools.partial(rs.multilevel_roi_align_scan, **_scan_kw(kw)))
  got, want = np.asarray(new(feats, boxes)), np.asarray(old(feats, boxes))
  scale = np.abs(want).max()
  assert np.abs(got - want).max() <= 1e-5 * scale
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * scale)
  gout = np.random.default_rng(0).standard_normal(got.shape).astype(F32)
  g_new, g_old = _grad_pair(lambda f: new(f, boxes), lambda f: old(f, boxes), feats, gout)
  for a, b in zip(g_new[1:], g_old[1:]):
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def _spans(boxes, feats, out, cap, aligned=True):
  """(S_h, S_w) supports the adaptive pooler computes for the boxes, on their levels."""
  flat = ra._flatten_pyramid(feats, boxes, 3, 224, 4, None, transposed=False)
  sy, sx, bh, bw, rh, rw = ra._roi_geometry(flat.boxes, flat.scale, (out, out), aligned)
  gh = jnp.minimum(ra._adaptive_grid(rh, out), cap)
  gw = jnp.minimum(ra._adaptive_grid(rw, out), cap)
  _, span_h, _ = ra._axis_weight_vectors(sy, bh, gh, flat.ext_h, out, cap, 512)
  _, span_w, _ = ra._axis_weight_vectors(sx, bw, gw, flat.ext_w, out, cap, 512)
  return np.asarray(span_h), np.asarray(span_w), flat


@pytest.mark.parametrize("img_hw", [(800, 1216), (1333, 750), (320, 1333)])
@pytest.mark.parametrize("aligned", [True, False])
def test_window_holds_every_support(img_hw, aligned):
  """`_adaptive_window`'s bound: the folded support of adversarial boxes (the largest area a level
  takes, at every aspect ratio up to the image's, on the level borders) fits the window."""
  rng = np.random.default_rng(img_hw[0] + aligned)
  img_h, img_w = img_hw
  feats = [
      jax.ShapeDtypeStruct((1, -(-img_h // 2**l), -(-img_w // 2**l), 1), jnp.float32)
      for l in range(3, 8)
  ]
  shapes = tuple((f.shape[1], f.shape[2]) for f in feats)
  rows, cols, length = ra._adaptive_window(shapes, ra._level_area_bounds(5, 224, 4), 7)
  # sqrt(area) just below each level's upper end (and far above it for P7), every aspect ratio
  side = np.concatenate([224.0 * 2.0 ** (np.arange(-3, 3)) * (1 - 1e-6), [5000.0]])
  aspect = np.exp(rng.uniform(np.log(1 / 400), np.log(400), size=(side.size, 300)))
  bw, bh = side[:, None] * np.sqrt(aspect), side[:, None] / np.sqrt(aspect)
  x0 = rng.uniform(-0.2, 1.0, size=bw.shape) * img_w
  y0 = rng.uniform(-0.2, 1.0, size=bw.shape) * img_h
  edge = rng.random(bw.shape) < 0.3  # boxes along the map borders
  x0, y0 = np.where(edge, 0.0, x0), np.where(edge, 0.0, y0)
  boxes = np.stack([x0, y0, x0 + bw, y0 + bh], -1).reshape(1, -1, 4).astype(F32)
  zeros = [np.zeros(f.shape, F32) for f in feats]
  span_h, span_w, _ = _spans(boxes, zeros, 7, 24, aligned)
  short, long = np.minimum(span_h, span_w), np.maximum(span_h, span_w)
  assert np.all(-(-long // cols) * short <= rows), (rows, cols)
  assert long.max() <= length
  assert (np.maximum(span_h, span_w) > 30).sum() > 100  # the test reaches large supports


def test_window_whole_map_for_single_map_and_coarsest_level():
  # No level bound: the window holds the whole map (folded).
  rows, cols, length = ra._adaptive_window(((9, 11),), (math.inf,), 7)
  assert -(-11 // cols) * 9 <= rows and length >= 11
  rows, cols, length = ra._adaptive_window(
      ((40, 30), (20, 15)), ra._level_area_bounds(2, 224, 4), 7
  )
  assert -(-40 // cols) * 30 <= rows or -(-30 // cols) * 40 <= rows  # P4 unbounded: whole map


def test_no_condition_and_one_compilation(monkeypatch):
  """No `cond` (no data-dependent control flow, forward or backward); the loop over boxes is a
  scan of static length whose steps (with a remainder) give the single-step result; one trace
  per shape."""
  rng = np.random.default_rng(9)
  bsz, r, img_h, img_w, c = 2, 8, 64, 80, 2
  feats = _pyramid(rng, bsz, img_h, img_w, c)
  boxes = _multilevel_boxes(rng, bsz, r, img_h, img_w)
  gout = rng.standard_normal((bsz, r, 7, 7, c)).astype(F32)
  kw = _adaptive_kw(max_adaptive_samples=24)

  def functions():  # new function objects: JAX caches traces per function, not per budget
    def pool(fs, b):
      return ra.multilevel_roi_align(fs, b, **kw)

    def grad(fs, b):
      return jax.grad(lambda f: jnp.sum(pool(f, b) * gout))(fs)

    return pool, grad

  results = {}
  window = ra._adaptive_window(
      tuple((f.shape[1], f.shape[2]) for f in feats), ra._level_area_bounds(5, 224, 4), 7
  )
  for per_step in (bsz * r, 3):  # one step; 6 steps of 3 boxes (the last one partial)
    monkeypatch.setattr(ra, "_CPU_WINDOW_ELEMENTS", per_step * window[0] * window[1] * c)
    monkeypatch.setattr(ra, "_DEVICE_WINDOW_ELEMENTS", per_step * window[0] * window[1] * c)
    pool, grad = functions()
    for fn in (pool, grad):
      text = str(jax.make_jaxpr(fn)(feats, boxes))
      assert "cond[" not in text
      assert ("scan[" in text) == (per_step < bsz * r)
    results[per_step] = jax.jit(pool)(feats, boxes), jax.jit(grad)(feats, boxes)
  for a, b in zip(jax.tree.leaves(results[3]), jax.tree.leaves(results[bsz * r])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)

  traces = []

  def f(fs, b):
    traces.append(1)
    return ra.multilevel_roi_align(fs, b, **kw)

  fn = jax.jit(f)
  for seed in range(3):
    jax.block_until_ready(fn(feats, _multilevel_boxes(np.random.default_rng(seed), 2, r, 64, 80)))
  assert len(traces) == 1
