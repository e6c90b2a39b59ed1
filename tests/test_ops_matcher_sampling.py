"""match_boxes / subsample_labels vs plain numpy references (detectron2 Matcher / sampling)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from cn2_jax.modeling.ops.matcher import match_boxes
from cn2_jax.modeling.ops.sampling import subsample_labels

F32 = np.float32


def random_boxes(rng, n, size=60.0, max_wh=40.0):
  xy = rng.uniform(0, size, (n, 2))
  wh = rng.uniform(1, max_wh, (n, 2))
  return np.concatenate([xy, xy + wh], axis=1).astype(F32)


def ref_iou(a, b):
  w = max(F32(0), F32(min(a[2], b[2]) - max(a[0], b[0])))
  h = max(F32(0), F32(min(a[3], b[3]) - max(a[1], b[1])))
  inter = F32(w * h)
  if inter <= 0:
    return F32(0)
  aa = F32((a[2] - a[0]) * (a[3] - a[1]))
  ab = F32((b[2] - b[0]) * (b[3] - b[1]))
  return F32(inter / F32(F32(aa + ab) - inter))


def ref_match(boxes, gt, gt_valid, thr):
  """detectron2 Matcher([thr], [0, 1]) on the compacted valid GT list."""
  gidx = np.nonzero(gt_valid)[0]
  n = len(boxes)
  if len(gidx) == 0:
    return np.zeros(n, np.int64), np.zeros(n, bool), np.zeros(n, F32)
  m = np.array([[ref_iou(gt[g], boxes[i]) for i in range(n)] for g in gidx])  # [G, N]
  best = m.argmax(0)  # first max
  vals = m.max(0)
  return gidx[best], vals >= F32(thr), vals.astype(F32)


@pytest.mark.parametrize("seed,n,m", [(0, 30, 6), (1, 50, 1), (2, 17, 9), (3, 40, 4)])
@pytest.mark.parametrize("thr", [0.6, 0.7, 0.8, 0.3])
def test_match_boxes(seed, n, m, thr):
  rng = np.random.default_rng(seed)
  gt = random_boxes(rng, m)
  gt_valid = rng.uniform(size=m) < 0.75
  gt_valid[rng.integers(m)] = True
  # proposals: jittered copies of GT boxes (high IoU) plus random boxes.
  base = gt[rng.integers(m, size=n)]
  boxes = (base + rng.normal(0, 2.0, (n, 4))).astype(F32)
  boxes[: n // 3] = random_boxes(rng, n // 3)
  gt[-1] = gt[0]  # a duplicate GT: ties go to the first valid one
  idx, fg, iou = jax.jit(lambda b, g, v: match_boxes(b, g, v, thr))(boxes, gt, gt_valid)
  ridx, rfg, riou = ref_match(boxes, gt, gt_valid, thr)
  np.testing.assert_array_equal(np.asarray(idx), ridx)
  np.testing.assert_array_equal(np.asarray(fg), rfg)
  np.testing.assert_array_equal(np.asarray(iou), riou)
  assert idx.dtype == jnp.int32 and fg.dtype == jnp.bool_ and iou.dtype == jnp.float32


def test_match_boxes_no_valid_gt():
  rng = np.random.default_rng(0)
  boxes = random_boxes(rng, 10)
  gt = boxes[:3].copy()
  idx, fg, iou = match_boxes(boxes, gt, np.zeros(3, bool), 0.5)
  assert not np.asarray(fg).any() and not np.asarray(idx).any() and not np.asarray(iou).any()
  idx, fg, iou = match_boxes(boxes, np.zeros((0, 4), F32), np.zeros(0, bool), 0.5)
  assert idx.shape == (10,) and not np.asarray(fg).any()


def test_match_boxes_vmap():
  rng = np.random.default_rng(5)
  boxes = random_boxes(rng, 2 * 12).reshape(2, 12, 4)
  gt = np.stack([boxes[0, :4], boxes[1, 3:7]]) + F32(0.5)
  gv = np.array([[True, False, True, True], [False, False, False, False]])
  idx, fg, iou = jax.vmap(lambda b, g, v: match_boxes(b, g, v, 0.6))(boxes, gt, gv)
  for k in range(2):
    r = ref_match(boxes[k], gt[k], gv[k], 0.6)
    np.testing.assert_array_equal(np.asarray(idx[k]), r[0])
    np.testing.assert_array_equal(np.asarray(fg[k]), r[1])


def check_sample(idx, sv, sfg, is_fg, valid, num_samples, frac):
  n_pos_avail = int((is_fg & valid).sum())
  n_neg_avail = int((~is_fg & valid).sum())
  num_pos = min(int(num_samples * frac), n_pos_avail)
  num_neg = min(num_samples - num_pos, n_neg_avail)
  assert idx.shape == sv.shape == sfg.shape == (num_samples,)
  np.testing.assert_array_equal(sfg, np.arange(num_samples) < num_pos)
  np.testing.assert_array_equal(sv, np.arange(num_samples) < num_pos + num_neg)
  pos, neg = idx[:num_pos], idx[num_pos : num_pos + num_neg]
  assert np.all(is_fg[pos] & valid[pos])
  assert np.all(~is_fg[neg] & valid[neg])
  assert len(np.unique(idx[sv])) == num_pos + num_neg
  assert np.all(idx[~sv] == 0)
  return pos, neg


@pytest.mark.parametrize(
    "n,num_samples,frac,p_fg,p_valid",
    [
        (40, 16, 0.25, 0.3, 0.9),  # enough of both
        (40, 16, 0.25, 0.05, 0.9),  # few positives -> filled with negatives
        (30, 64, 0.25, 0.5, 0.8),  # fewer valid than slots -> padding
        (20, 8, 0.5, 0.9, 1.0),  # few negatives
        (25, 10, 0.25, 0.0, 0.7),  # no positives
    ],
)
def test_subsample_labels_counts(n, num_samples, frac, p_fg, p_valid):
  rng = np.random.default_rng(n + num_samples)
  draws = 300
  is_fg = rng.uniform(size=n) < p_fg
  valid = rng.uniform(size=n) < p_valid
  keys = jax.random.split(jax.random.PRNGKey(n), draws)
  fn = jax.jit(jax.vmap(lambda k: subsample_labels(k, is_fg, valid, num_samples, frac)))
  idx, sv, sfg = (np.asarray(x) for x in fn(keys))
  counts_pos = np.zeros(n)
  counts_neg = np.zeros(n)
  for d in range(draws):
    pos, neg = check_sample(idx[d], sv[d], sfg[d], is_fg, valid, num_samples, frac)
    counts_pos[pos] += 1
    counts_neg[neg] += 1
  # uniform without replacement: each candidate has probability num/available.
  for counts, mask in ((counts_pos, is_fg & valid), (counts_neg, ~is_fg & valid)):
    if mask.sum() == 0:
      assert counts.sum() == 0
      continue
    k = counts.sum() / draws
    p = k / mask.sum()
    freq = counts[mask] / draws
    tol = 4.5 * np.sqrt(p * (1 - p) / draws) + 1e-9
    assert np.all(np.abs(freq - p) <= tol), (freq, p)
    assert counts[~mask].sum() == 0
  # sampled order is random: the first positive slot is not always the same element.
  if sfg[0].sum() > 1 and (is_fg & valid).sum() > sfg[0].sum():
    assert len(np.unique(idx[:, 0])) > 1


def test_subsample_positive_fraction_mean():
  # Many positives: exactly int(num_samples * frac) positives every time.
  n, num_samples, frac = 64, 20, 0.25
  is_fg = np.arange(n) % 2 == 0
  valid = np.ones(n, bool)
  keys = jax.random.split(jax.random.PRNGKey(1), 100)
  _, sv, sfg = jax.vmap(lambda k: subsample_labels(k, is_fg, valid, num_samples, frac))(keys)
  assert np.all(np.asarray(sfg).sum(1) == 5) and np.all(np.asarray(sv).sum(1) == 20)


def test_subsample_deterministic_per_key():
  is_fg = np.array([True, False] * 10)
  valid = np.ones(20, bool)
  a = subsample_labels(jax.random.PRNGKey(3), is_fg, valid, 8, 0.25)
  b = subsample_labels(jax.random.PRNGKey(3), is_fg, valid, 8, 0.25)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
