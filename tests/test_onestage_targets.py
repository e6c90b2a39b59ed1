"""Tests for cn2_jax.modeling.onestage.targets (centerX CenterNetGT, spec §3).

numpy references written from the spec: the corrected and the original (buggy) CornerNet radius,
`draw_umich_gaussian` with cropping (float64 Gaussian cast to float32, as centerX), and the
per-image target generation with TENSOR_DIM truncation.
"""

import math

import jax
import numpy as np
import pytest

from cn2_jax.modeling.onestage import targets as T

pytestmark = pytest.mark.usefixtures("fast_compile")


def ref_radius64(w, h, o, formula="fixed"):
  """Spec §3 'Gaussian radius' in float64."""
  b1 = h + w
  c1 = w * h * (1 - o) / (1 + o)
  sq1 = math.sqrt(b1**2 - 4 * c1)
  b2 = 2 * (h + w)
  c2 = (1 - o) * w * h
  sq2 = math.sqrt(b2**2 - 16 * c2)
  a3 = 4 * o
  b3 = -2 * o * (h + w)
  c3 = (o - 1) * w * h
  sq3 = math.sqrt(b3**2 - 4 * a3 * c3)
  if formula == "fixed":
    return min((b1 - sq1) / 2, (b2 - sq2) / 8, (b3 + sq3) / (2 * a3))
  return min((b1 + sq1) / 2, (b2 + sq2) / 2, (b3 + sq3) / 2)


def ref_radius32(w, h, o):
  """centerX's float32 evaluation, operation by operation (torch order, no fused multiply-add;
  Python-double constants rounded to float32)."""
  f = np.float32
  w, h = f(w), f(h)
  b1 = h + w
  c1 = f(f(w * h) * f(1 - o)) / f(1 + o)
  sq1 = np.sqrt(f(b1 * b1) - f(f(4) * c1))
  b2 = f(2) * (h + w)
  c2 = f(f(f(1 - o) * w) * h)
  sq2 = np.sqrt(f(b2 * b2) - f(f(16) * c2))
  b3 = f(f(-2 * o) * (h + w))
  c3 = f(f(f(o - 1) * w) * h)
  sq3 = np.sqrt(f(b3 * b3) - f(f(4 * (4 * o)) * c3))
  return min(f(b1 - sq1) / f(2), f(b2 - sq2) / f(8), f(b3 + sq3) / f(2 * (4 * o)))


def test_radius_matches_spec_and_float32_order():
  rng = np.random.RandomState(0)
  w = np.concatenate(
      [
          rng.uniform(0, 150, 500),
          rng.randint(0, 64, 200).astype(float) / 4,
          [0.0, 0.25, 1e-3, 16, 32, 64],
      ]
  ).astype(np.float32)
  h = np.concatenate(
      [
          rng.uniform(0, 150, 500),
          rng.randint(0, 64, 200).astype(float) / 4,
          [0.0, 7.0, 3.0, 16, 32, 64],
      ]
  ).astype(np.float32)
  for o in (0.3, 0.7):
    got = np.asarray(jax.jit(lambda a, b, o=o: T.gaussian_radius(a, b, o))(w, h))
    ref64 = np.array([ref_radius64(float(a), float(b), o) for a, b in zip(w, h)])
    np.testing.assert_allclose(got, ref64, rtol=2e-5, atol=2e-5)
    # bit-exact float32 (the truncation to int makes the last bit matter)
    ref32 = np.array([ref_radius32(a, b, o) for a, b in zip(w, h)], np.float32)
    np.testing.assert_array_equal(got, ref32)
    r_int = np.asarray(T.gaussian_radius_int(w, h, o))
    np.testing.assert_array_equal(r_int, np.maximum(ref32, 0).astype(np.int32))


def test_radius_spec_table_and_buggy_formula():
  # spec §3 table: R/s for square boxes
  for s, fixed03, fixed07, buggy07 in (
      (16, 3.62, 1.31, 4.37),
      (32, 7.24, 2.61, 8.75),
      (64, 14.5, 5.23, 17.5),
  ):
    a = np.float32(s)
    assert abs(float(T.gaussian_radius(a, a, 0.3)) - fixed03) < 0.02 * s / 16
    assert abs(float(T.gaussian_radius(a, a, 0.7)) - fixed07) < 0.02 * s / 16
    assert abs(float(T.gaussian_radius(a, a, 0.7, "cornernet")) - buggy07) < 0.05 * s / 16
  rng = np.random.RandomState(1)
  w, h = rng.uniform(1, 100, (2, 50)).astype(np.float32)
  got = np.asarray(T.gaussian_radius(w, h, 0.7, "cornernet"))
  ref = [ref_radius64(float(a), float(b), 0.7, "cornernet") for a, b in zip(w, h)]
  np.testing.assert_allclose(got, ref, rtol=2e-5)
  with pytest.raises(ValueError):
    T.gaussian_radius(w, h, 0.7, "nope")


def ref_gaussian2d(r):
  """centerX gaussian2D((r, r), sigma=(2r+1)/6) in float64."""
  sigma = (2 * r + 1) / 6
  y, x = np.ogrid[-r : r + 1, -r : r + 1]
  g = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
  g[g < np.finfo(g.dtype).eps * g.max()] = 0
  return g


def ref_draw(fmap, center, r):
  """CN draw_umich_gaussian on `fmap [H, W]` (float32) in place."""
  g = ref_gaussian2d(r).astype(np.float32)
  x, y = int(center[0]), int(center[1])
  height, width = fmap.shape
  left, right = min(x, r), min(width - x, r + 1)
  top, bottom = min(y, r), min(height - y, r + 1)
  mf = fmap[y - top : y + bottom, x - left : x + right]
  mg = g[r - top : r + bottom, r - left : r + right]
  if min(mg.shape) > 0 and min(mf.shape) > 0:
    fmap[y - top : y + bottom, x - left : x + right] = np.maximum(mf, mg)


def test_draw_gaussians_crops_and_maxes():
  h, w, c = 13, 17, 3
  centers = np.array([[0, 0], [16, 12], [5, 6], [6, 6], [8, 1], [3, 11], [10, 10]], np.int32)
  radii = np.array([3, 4, 2, 5, 0, 7, 1], np.int32)
  classes = np.array([0, 1, 2, 2, 0, 1, 1], np.int32)
  keep = np.array([1, 1, 1, 1, 1, 1, 0], bool)
  got = np.asarray(
      jax.jit(lambda *a: T.draw_gaussians((h, w), *a, num_classes=c))(centers, radii, classes, keep)
  )
  ref = np.zeros((c, h, w), np.float32)
  for ctr, r, k, kp in zip(centers, radii, classes, keep):
    if kp:
      ref_draw(ref[k], ctr, int(r))
  np.testing.assert_allclose(got, ref.transpose(1, 2, 0), atol=1e-6, rtol=0)
  # peaks are exactly 1, nothing is drawn beyond the radius
  assert got[0, 0, 0] == 1.0 and got[12, 16, 1] == 1.0 and got[1, 8, 0] == 1.0
  assert got[1, 9, 0] == 0.0  # radius 0: the peak only


def ref_targets(boxes, classes, valid, out_hw, c, down, o, tdim):
  """CenterNetGT.generate for one image (float32 like torch)."""
  hm = np.zeros((c, *out_hw), np.float32)
  wh_t = np.zeros((tdim, 2), np.float32)
  reg_t = np.zeros((tdim, 2), np.float32)
  mask = np.zeros((tdim,), np.float32)
  index = np.zeros((tdim,), np.float32)
  b = boxes[valid].astype(np.float32) * np.float32(1.0 / down)
  cl = classes[valid]
  n = min(len(b), tdim)
  b, cl = b[:n], cl[:n]
  ctr = (b[:, :2] + b[:, 2:]) / np.float32(2)
  ci = ctr.astype(np.int32)
  index[:n] = ci[:, 1] * out_hw[1] + ci[:, 0]
  reg_t[:n] = ctr - ci
  mask[:n] = 1
  wh = b[:, 2:] - b[:, :2]
  wh_t[:n] = wh
  for i in range(n):
    r = max(0, int(max(ref_radius32(wh[i, 0], wh[i, 1], o), 0)))
    ref_draw(hm[cl[i]], ci[i], r)
  return hm.transpose(1, 2, 0), wh_t, reg_t, mask, index


@pytest.mark.parametrize("seed,tdim", [(0, 128), (1, 4)])
def test_targets_match_reference_with_truncation(seed, tdim):
  rng = np.random.RandomState(seed)
  m, c, canvas = 12, 4, (96, 128)
  x1 = rng.uniform(0, canvas[1] - 10, m)
  y1 = rng.uniform(0, canvas[0] - 10, m)
  boxes = np.stack(
      [
          x1,
          y1,
          np.minimum(x1 + rng.uniform(1, 90, m), canvas[1]),
          np.minimum(y1 + rng.uniform(1, 70, m), canvas[0]),
      ],
      1,
  ).astype(np.float32)
  boxes[3] = [120.5, 90.25, 128.0, 96.0]  # at the bottom-right border
  classes = rng.randint(0, c, m).astype(np.int32)
  valid = rng.rand(m) > 0.25
  valid[:2] = True
  out_hw = (canvas[0] // 4, canvas[1] // 4)
  got = jax.jit(
      lambda b, k, v: T.centernet_targets(
          b, k, v, out_hw=out_hw, num_classes=c, down_scale=4, min_overlap=0.3, tensor_dim=tdim
      )
  )(boxes, classes, valid)
  hm, wh, reg, mask, index = ref_targets(boxes, classes, valid, out_hw, c, 4, 0.3, tdim)
  np.testing.assert_allclose(np.asarray(got["score_map"]), hm, atol=1e-6, rtol=0)
  np.testing.assert_array_equal(np.asarray(got["score_map"]) == 1, hm == 1)
  np.testing.assert_array_equal(np.asarray(got["wh"]), wh)
  np.testing.assert_array_equal(np.asarray(got["reg"]), reg)
  np.testing.assert_array_equal(np.asarray(got["reg_mask"]), mask)
  np.testing.assert_array_equal(np.asarray(got["index"]), index.astype(np.int32))
  if tdim < valid.sum():  # truncated boxes are gone from the heatmap too
    assert int((np.asarray(got["score_map"]) == 1).sum()) <= tdim


def test_batch_targets_vmaps():
  boxes = np.zeros((2, 3, 4), np.float32)
  boxes[0, 0] = [8, 8, 40, 24]
  boxes[1, 1] = [0, 0, 64, 64]
  valid = np.array([[1, 0, 0], [0, 1, 0]], bool)
  out = T.batch_targets(
      boxes, np.zeros((2, 3), np.int32), valid, out_hw=(16, 16), num_classes=2, tensor_dim=5
  )
  assert out["score_map"].shape == (2, 16, 16, 2) and out["wh"].shape == (2, 5, 2)
  np.testing.assert_array_equal(np.asarray(out["reg_mask"]).sum(1), [1, 1])
  assert int(out["index"][0, 0]) == 4 * 16 + 6 and int(out["index"][1, 0]) == 8 * 16 + 8
