"""Tests for cn2_jax.modeling.ops.roi_align against a per-element numpy transcription of
torchvision's CPU roi_align kernel (oracle README §3) and against the official oracle outputs."""

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cn2_jax.modeling.ops import roi_align as ra
from tests.schema_settings import level_kwargs, pooler_kwargs

F32 = np.float32
ORACLE_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "oracle"
)


# ----------------------------------------------------------------------------------------------
# numpy reference (plain loops, float32 scalars in the kernel's operation order)
# ----------------------------------------------------------------------------------------------
def _ref_box_params(box, scale, out_hw, sampling_ratio, aligned, cap=None):
  off = F32(0.5) if aligned else F32(0.0)
  sx = F32(F32(box[0]) * F32(scale)) - off
  sy = F32(F32(box[1]) * F32(scale)) - off
  ex = F32(F32(box[2]) * F32(scale)) - off
  ey = F32(F32(box[3]) * F32(scale)) - off
  rw, rh = F32(ex - sx), F32(ey - sy)
  if not aligned:
    rw, rh = max(rw, F32(1.0)), max(rh, F32(1.0))
  bh, bw = F32(rh / F32(out_hw[0])), F32(rw / F32(out_hw[1]))
  if sampling_ratio > 0:
    gh = gw = sampling_ratio
  else:
    gh = int(math.ceil(F32(rh / F32(out_hw[0]))))
    gw = int(math.ceil(F32(rw / F32(out_hw[1]))))
    if cap is not None:
      gh, gw = min(gh, cap[0]), min(gw, cap[1])
  return sy, sx, bh, bw, gh, gw, max(gh * gw, 1)


def _ref_bin_samples(h, w, sy, sx, bh, bw, gh, gw, ph, pw):
  """Yields (y_low, x_low, y_high, x_high, w1, w2, w3, w4) per sample, iy outer / ix inner."""
  for iy in range(gh):
    yy = F32(sy + F32(ph) * bh) + F32(F32(iy + 0.5) * bh) / F32(gh)
    for ix in range(gw):
      xx = F32(sx + F32(pw) * bw) + F32(F32(ix + 0.5) * bw) / F32(gw)
      y, x = F32(yy), F32(xx)
      if y < -1.0 or y > h or x < -1.0 or x > w:
        yield None
        continue
      if y <= 0:
        y = F32(0.0)
      if x <= 0:
        x = F32(0.0)
      y_low, x_low = int(y), int(x)
      if y_low >= h - 1:
        y_high = y_low = h - 1
        y = F32(y_low)
      else:
        y_high = y_low + 1
      if x_low >= w - 1:
        x_high = x_low = w - 1
        x = F32(x_low)
      else:
        x_high = x_low + 1
      ly, lx = F32(y - F32(y_low)), F32(x - F32(x_low))
      hy, hx = F32(1.0) - ly, F32(1.0) - lx
      yield y_low, x_low, y_high, x_high, hy * hx, hy * lx, ly * hx, ly * lx


def ref_roi_align(feat, boxes, scale, out_hw=(7, 7), sampling_ratio=2, aligned=True, cap=None):
  """feat [H,W,C] float32, boxes [R,4] image pixels -> [R, out_h, out_w, C]."""
  h, w, c = feat.shape
  out = np.zeros((len(boxes), out_hw[0], out_hw[1], c), F32)
  for r, box in enumerate(boxes):
    sy, sx, bh, bw, gh, gw, count = _ref_box_params(
        box, scale, out_hw, sampling_ratio, aligned, cap
    )
    for ph in range(out_hw[0]):
      for pw in range(out_hw[1]):
        val = np.zeros((c,), F32)
        for s in _ref_bin_samples(h, w, sy, sx, bh, bw, gh, gw, ph, pw):
          if s is None:
            continue
          yl, xl, yh, xh, w1, w2, w3, w4 = s
          val = val + (
              ((w1 * feat[yl, xl] + w2 * feat[yl, xh]) + w3 * feat[yh, xl]) + w4 * feat[yh, xh]
          )
        out[r, ph, pw] = val / F32(count)
  return out


def ref_roi_align_adjoint(
    feat_shape, boxes, scale, gout, out_hw=(7, 7), sampling_ratio=2, aligned=True, cap=None
):
  """Transpose of ref_roi_align (a linear map of feat): returns d<out, gout>/d feat."""
  h, w, c = feat_shape
  grad = np.zeros((h, w, c), np.float64)
  for r, box in enumerate(boxes):
    sy, sx, bh, bw, gh, gw, count = _ref_box_params(
        box, scale, out_hw, sampling_ratio, aligned, cap
    )
    for ph in range(out_hw[0]):
      for pw in range(out_hw[1]):
        g = gout[r, ph, pw].astype(np.float64) / count
        for s in _ref_bin_samples(h, w, sy, sx, bh, bw, gh, gw, ph, pw):
          if s is None:
            continue
          yl, xl, yh, xh, w1, w2, w3, w4 = s
          grad[yl, xl] += w1 * g
          grad[yl, xh] += w2 * g
          grad[yh, xl] += w3 * g
          grad[yh, xh] += w4 * g
  return grad


def ref_levels(boxes, min_level=3, max_level=7):
  boxes = np.asarray(boxes, F32)
  with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    lv = np.floor(F32(4) + np.log2(np.sqrt(area) / F32(224) + F32(1e-8)))
  return np.clip(lv, min_level, max_level)  # NaN stays NaN (detectron2: pooled to zeros)


def ref_multilevel(feats, boxes, min_level=3, **kw):
  """feats: list of [B,H,W,C]; boxes [B,R,4] -> [B,R,oh,ow,C]."""
  lv = ref_levels(boxes, min_level, min_level + len(feats) - 1)
  out_hw = kw.get("out_hw", (7, 7))
  b, r = boxes.shape[:2]
  out = np.zeros((b, r, out_hw[0], out_hw[1], feats[0].shape[-1]), F32)
  for i in range(b):
    for j in range(r):
      if np.isnan(lv[i, j]):
        continue
      l = int(lv[i, j])
      out[i, j] = ref_roi_align(feats[l - min_level][i], boxes[i, j : j + 1], 2.0**-l, **kw)[0]
  return out


def ref_multilevel_adjoint(feats, boxes, gout, min_level=3, **kw):
  lv = ref_levels(boxes, min_level, min_level + len(feats) - 1)
  grads = [np.zeros(f.shape, np.float64) for f in feats]
  for i in range(boxes.shape[0]):
    for j in range(boxes.shape[1]):
      if np.isnan(lv[i, j]):
        continue
      l = int(lv[i, j])
      grads[l - min_level][i] += ref_roi_align_adjoint(
          feats[l - min_level].shape[1:], boxes[i, j : j + 1], 2.0**-l, gout[i, j : j + 1], **kw
      )
  return grads


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def make_boxes(rng, img_h, img_w, cell):
  """Boxes in image pixels on a map of img_h x img_w pixels with `cell` pixels per feature cell:
  interior, border-crossing, fully outside, tiny (< 1 cell), huge, zero-size and inverted."""

  def rand_box(cx, cy, bw, bh):
    return [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]

  u = rng.uniform
  b = []
  for _ in range(3):  # interior
    b.append(
        rand_box(u(0.2, 0.8) * img_w, u(0.2, 0.8) * img_h, u(0.1, 0.6) * img_w, u(0.1, 0.6) * img_h)
    )
  for _ in range(2):  # crossing a border
    b.append(
        rand_box(
            u(-0.1, 1.1) * img_w, u(-0.1, 1.1) * img_h, u(0.3, 1.0) * img_w, u(0.3, 1.0) * img_h
        )
    )
  b.append([-3.0 * img_w, u(0, img_h / 2), -2.5 * img_w, u(img_h / 2, img_h)])  # left, outside
  b.append([u(0, img_w / 2), img_h + 2.5 * cell, u(img_w / 2, img_w), img_h + 6 * cell])  # below
  for _ in range(2):  # tiny
    x, y = u(-cell, img_w + cell), u(-cell, img_h + cell)
    b.append([x, y, x + u(0.05, 0.9) * cell, y + u(0.05, 0.9) * cell])
  b.append(rand_box(u(0, img_w), u(0, img_h), u(1.5, 3.0) * img_w, u(1.5, 3.0) * img_h))  # huge
  x, y = u(0, img_w), u(0, img_h)
  b.append([x, y, x, y + u(1, 3) * cell])  # zero width
  b.append([x, y, x, y])  # point
  b.append([u(0.5, 1) * img_w, u(0, 0.5) * img_h, u(0, 0.5) * img_w, u(0.5, 1) * img_h])  # x2<x1
  # Exactly on the map borders (border rule y_low >= H - 1).
  b.append([0.0, 0.0, img_w, img_h])
  return np.asarray(b, F32)


SINGLE_CONFIGS = [
    # (seed, H, W, scale, out_hw, sampling_ratio, aligned)
    (0, 9, 11, 0.5, (7, 7), 2, True),
    (1, 6, 13, 0.25, (7, 7), 0, True),
    (2, 9, 11, 0.5, (3, 5), 0, True),
    (3, 10, 8, 1.0, (3, 5), 2, True),
    (4, 7, 12, 0.5, (7, 7), 2, False),
    (5, 8, 6, 0.125, (7, 7), 0, False),
    (6, 1, 7, 1.0, (7, 7), 0, True),
    (7, 5, 16, 1.0 / 3.0, (7, 7), 1, True),
    (8, 12, 9, 0.5, (3, 5), 3, False),
]


def _cap_for(boxes, scale, out_hw, aligned):
  need = np.asarray(ra.required_adaptive_samples(boxes, scale, out_hw, aligned))
  cap = tuple(int(max(v, 1)) for v in need)
  return need, cap


@pytest.mark.parametrize("seed,h,w,scale,out_hw,sr,aligned", SINGLE_CONFIGS)
def test_roi_align_matches_reference(seed, h, w, scale, out_hw, sr, aligned):
  rng = np.random.default_rng(seed)
  c = 3
  feat = rng.standard_normal((h, w, c)).astype(F32)
  boxes = make_boxes(rng, h / scale, w / scale, 1.0 / scale)
  cap = None
  if sr == 0:
    need, cap = _cap_for(boxes, scale, out_hw, aligned)
    cap = (cap[0] + seed % 2, cap[1])  # exact cap and a larger one
    assert need[0] <= cap[0] and need[1] <= cap[1]
  fn = jax.jit(
      functools.partial(
          ra.roi_align,
          spatial_scale=scale,
          output_size=out_hw,
          sampling_ratio=sr,
          aligned=aligned,
          max_adaptive_samples=cap if cap else 8,
      )
  )
  got = np.asarray(fn(feat, boxes))
  want = ref_roi_align(feat, boxes, scale, out_hw, sr, aligned)
  assert got.shape == (len(boxes),) + tuple(out_hw) + (c,)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  if sr == 0:  # adaptive: the boxes with no sample (roi <= 0) pool to exactly zero
    _, _, bh, bw, _, _ = [
        np.asarray(v)
        for v in ra._roi_geometry(jnp.asarray(boxes), jnp.float32(scale), out_hw, aligned)
    ]
    empty = (np.ceil(bh) <= 0) | (np.ceil(bw) <= 0)
    assert np.all(got[empty] == 0)


def test_required_adaptive_samples_matches_reference():
  rng = np.random.default_rng(11)
  boxes = make_boxes(rng, 40.0, 30.0, 4.0)
  for aligned in (True, False):
    for out_hw in ((7, 7), (3, 5)):
      need = np.asarray(ra.required_adaptive_samples(boxes, 0.25, out_hw, aligned))
      want = np.zeros(2, int)
      for box in boxes:
        p = _ref_box_params(box, 0.25, out_hw, 0, aligned)
        want = np.maximum(want, [p[4], p[5]])
      np.testing.assert_array_equal(need, want)
  valid = np.zeros(len(boxes), bool)
  assert tuple(np.asarray(ra.required_adaptive_samples(boxes, 0.25, 7, True, valid=valid))) == (
      0,
      0,
  )


def test_adaptive_cap_samples_with_the_cap():
  """Documented behaviour: a box needing more than the cap is sampled with the cap per axis."""
  rng = np.random.default_rng(3)
  feat = rng.standard_normal((16, 16, 2)).astype(F32)
  boxes = np.asarray([[0, 0, 64, 64], [-8, 4, 50, 60], [3, 3, 47, 61]], F32)  # need 3..5 / axis
  need = np.asarray(ra.required_adaptive_samples(boxes, 1.0, 7, True))
  assert np.all(need > 2)
  single = dict(output_size=7, aligned=True)
  capped = ra.roi_align(feat, boxes, 1.0, sampling_ratio=0, max_adaptive_samples=2, **single)
  fixed = ra.roi_align(feat, boxes, 1.0, sampling_ratio=2, max_adaptive_samples=8, **single)
  np.testing.assert_allclose(np.asarray(capped), np.asarray(fixed), rtol=1e-6, atol=1e-6)
  capped = ra.roi_align(feat, boxes, 1.0, sampling_ratio=0, max_adaptive_samples=(2, 3), **single)
  want = ref_roi_align(feat, boxes, 1.0, sampling_ratio=0, cap=(2, 3))
  np.testing.assert_allclose(np.asarray(capped), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "sr,aligned,out_hw", [(2, True, (7, 7)), (0, True, (3, 5)), (0, False, (7, 7))]
)
def test_roi_align_grad_is_reference_adjoint(sr, aligned, out_hw):
  rng = np.random.default_rng(21 + sr)
  h, w, c, scale = 8, 10, 3, 0.5
  feat = rng.standard_normal((h, w, c)).astype(F32)
  boxes = make_boxes(rng, h / scale, w / scale, 1.0 / scale)
  gout = rng.standard_normal((len(boxes),) + out_hw + (c,)).astype(F32)
  cap = 8
  if sr == 0:
    assert np.all(np.asarray(ra.required_adaptive_samples(boxes, scale, out_hw, aligned)) <= cap)

  def loss(f):
    out = ra.roi_align(f, boxes, scale, out_hw, sr, aligned, max_adaptive_samples=cap)
    return jnp.sum(out * gout)

  got = np.asarray(jax.jit(jax.grad(loss))(feat))
  want = ref_roi_align_adjoint(feat.shape, boxes, scale, gout, out_hw, sr, aligned)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# level assignment and multi-level pooling
# ----------------------------------------------------------------------------------------------
def test_assign_boxes_to_levels_boundaries():
  boxes = np.asarray(
      [
          [0, 0, 224, 224],  # sqrt area 224 -> 4
          [0, 0, 448, 448],  # 448 -> 5
          [10.5, 3.25, 458.5, 451.25],  # 448 (shifted) -> 5
          [0, 0, 112, 448],  # area 224^2 -> 4
          [0, 0, 223.9, 224],  # just below 224 -> 3
          [0, 0, 447.9, 448],  # just below 448 -> 4
          [0, 0, 896, 896],  # -> 6
          [0, 0, 1792, 1792],  # -> 7
          [0, 0, 1791.9, 1792],  # -> 6
          [0, 0, 5000, 9000],  # clamped -> 7
          [5, 5, 5, 5],  # zero area -> 3
          [0, 0, 1, 1],  # tiny -> 3
          [0, 0, 3e38, 3e38],  # inf area -> 7
      ],
      F32,
  )
  want = [4, 5, 5, 4, 3, 4, 6, 7, 6, 7, 3, 3, 7]
  got = np.asarray(ra.assign_boxes_to_levels(boxes, **level_kwargs()))
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got[:10], ref_levels(boxes)[:10])
  # Other canonical settings and a leading batch shape.
  got = np.asarray(ra.assign_boxes_to_levels(boxes[None, :4], 2, 5, 112, 3))
  np.testing.assert_array_equal(got, [[4, 5, 5, 4]])
  # Negative / NaN area -> min_level (multilevel_roi_align pools zeros for them).
  bad = np.asarray([[10, 10, 5, 20], [np.nan, 0, 5, 5]], F32)
  np.testing.assert_array_equal(
      np.asarray(ra.assign_boxes_to_levels(bad, **level_kwargs())), [3, 3]
  )


def test_assign_boxes_to_levels_random():
  rng = np.random.default_rng(5)
  wh = np.exp(rng.uniform(np.log(0.5), np.log(4000), size=(500, 2)))
  xy = rng.uniform(-100, 1000, size=(500, 2))
  boxes = np.concatenate([xy, xy + wh], -1).astype(F32)
  np.testing.assert_array_equal(
      np.asarray(ra.assign_boxes_to_levels(boxes, **level_kwargs())), ref_levels(boxes)
  )


def _need(boxes):
  """Per-axis adaptive samples the boxes need on their P3..P7 level (7x7 ROIAlignV2 pooler)."""
  return np.asarray(ra.required_adaptive_samples(boxes, None, 7, True, **level_kwargs()))


def _pyramid(rng, bsz, img_h, img_w, c, min_level=3, num_levels=5, dtype=F32):
  return [
      rng.standard_normal((bsz, -(-img_h // 2**l), -(-img_w // 2**l), c)).astype(dtype)
      for l in range(min_level, min_level + num_levels)
  ]


def _multilevel_boxes(rng, bsz, r, img_h, img_w):
  sz = np.exp(rng.uniform(np.log(2.0), np.log(3000.0), size=(bsz, r)))
  asp = np.exp(rng.uniform(np.log(1 / 3), np.log(3), size=(bsz, r)))
  bw, bh = sz * np.sqrt(asp), sz / np.sqrt(asp)
  cx = rng.uniform(-0.2, 1.2, size=(bsz, r)) * img_w
  cy = rng.uniform(-0.2, 1.2, size=(bsz, r)) * img_h
  boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1).astype(F32)
  special = np.asarray(
      [
          [5, 7, 229, 231],
          [0, 0, 448, 448],
          [20, 10, 20, 60],
          [30, 30, 31, 30.5],
          [10, 10, 5, 20],
          [0, 0, 1792, 1792],
          [-50, 40, 70, 40],
          [0, 0, 112, 448],
      ],
      F32,
  )
  boxes[0, : len(special)] = special
  boxes[1, :3] = [
      [img_w - 3, img_h - 3, img_w + 400, img_h + 100],
      [-1000, -800, -600, -700],
      [-300, -400, 700, 500],
  ]  # levels 5, 5, 6
  return boxes


@pytest.mark.parametrize(
    "seed,sr,aligned,out_hw",
    [(0, 2, True, (7, 7)), (1, 0, True, (7, 7)), (2, 0, False, (3, 5)), (3, 1, False, (7, 7))],
)
def test_multilevel_matches_reference(seed, sr, aligned, out_hw):
  rng = np.random.default_rng(100 + seed)
  bsz, r, img_h, img_w, c = 2, 14, 160, 216, 3
  feats = _pyramid(rng, bsz, img_h, img_w, c)
  boxes = _multilevel_boxes(rng, bsz, r, img_h, img_w)
  lv = ref_levels(boxes)
  assert set(np.unique(lv[~np.isnan(lv)]).astype(int)) == {3, 4, 5, 6, 7}  # every level
  np.testing.assert_array_equal(
      np.asarray(ra.assign_boxes_to_levels(boxes, **level_kwargs()))[0, [0, 1, 7]], [4, 5, 4]
  )
  cap = 8
  if sr == 0:
    need = np.asarray(ra.required_adaptive_samples(boxes, None, out_hw, aligned, **level_kwargs()))
    cap = (max(8, int(need[0])), max(8, int(need[1])))
    assert need[0] <= cap[0] and need[1] <= cap[1], need
  fn = jax.jit(
      functools.partial(
          ra.multilevel_roi_align,
          **pooler_kwargs(
              output_size=out_hw, sampling_ratio=sr, aligned=aligned, max_adaptive_samples=cap
          ),
      )
  )
  got = np.asarray(fn(feats, boxes))
  want = ref_multilevel(feats, boxes, out_hw=out_hw, sampling_ratio=sr, aligned=aligned)
  assert got.shape == (bsz, r) + out_hw + (c,)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.all(got[0, 4] == 0)  # negative area -> zeros
  assert np.abs(got[0, 0]).max() > 0


@pytest.mark.parametrize("sr", [2, 0])
def test_multilevel_grad_is_reference_adjoint(sr):
  rng = np.random.default_rng(300 + sr)
  bsz, r, img_h, img_w, c = 2, 10, 96, 136, 2
  feats = _pyramid(rng, bsz, img_h, img_w, c)
  boxes = _multilevel_boxes(rng, bsz, r, img_h, img_w)
  gout = rng.standard_normal((bsz, r, 7, 7, c)).astype(F32)
  if sr == 0:
    assert np.all(_need(boxes) <= 8)

  def loss(fs):
    out = ra.multilevel_roi_align(
        fs, boxes, **pooler_kwargs(sampling_ratio=sr, max_adaptive_samples=8)
    )
    return jnp.sum(out * gout)

  got = jax.jit(jax.grad(loss))(feats)
  want = ref_multilevel_adjoint(feats, boxes, gout, sampling_ratio=sr)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-5)


def test_multilevel_bfloat16_and_no_recompilation():
  rng = np.random.default_rng(7)
  bsz, r, img_h, img_w, c = 2, 8, 64, 96, 4
  feats = _pyramid(rng, bsz, img_h, img_w, c)
  traces = []

  def f(fs, b):
    traces.append(1)
    return ra.multilevel_roi_align(fs, b, **pooler_kwargs(sampling_ratio=0, max_adaptive_samples=4))

  fn = jax.jit(f)
  outs = []
  for seed in range(3):
    boxes = _multilevel_boxes(np.random.default_rng(seed), bsz, r, img_h, img_w)
    outs.append(fn(feats, boxes))
  jax.block_until_ready(outs)
  assert len(traces) == 1
  if hasattr(fn, "_cache_size"):  # private jit API; the trace counter above is the real check
    assert fn._cache_size() == 1
  # bfloat16 features: bf16 output, close to the float32 result.
  feats_bf = [x.astype(jnp.bfloat16) for x in feats]
  got = fn(feats_bf, boxes)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, F32), np.asarray(outs[-1]), rtol=0.05, atol=0.05)


def test_vmap_over_images_matches_batched_call():
  """Per-image vmap (the adaptive mode's loop over boxes runs batched) == batched call."""
  rng = np.random.default_rng(9)
  bsz, r, img_h, img_w, c = 2, 8, 64, 80, 2
  feats = _pyramid(rng, bsz, img_h, img_w, c)
  boxes = _multilevel_boxes(rng, bsz, r, img_h, img_w)
  kw = pooler_kwargs(sampling_ratio=0, max_adaptive_samples=8)
  assert np.all(_need(boxes) <= 8)
  batched = ra.multilevel_roi_align(feats, boxes, **kw)
  per_image = jax.vmap(
      lambda fs, b: ra.multilevel_roi_align([f[None] for f in fs], b[None], **kw)[0]
  )(feats, boxes)
  np.testing.assert_allclose(np.asarray(per_image), np.asarray(batched), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# official oracle (detectron2 ROIAlignV2 = aligned, adaptive)
# ----------------------------------------------------------------------------------------------
def test_matches_official_pooler_outputs():
  path = os.path.join(ORACLE_DIR, "outputs_000000000009.npz")
  if not os.path.exists(path):
    pytest.skip(f"oracle outputs not found at {os.path.normpath(path)}")
  d = np.load(path)
  feats = [np.zeros((1, 100, 136, 256), F32)]  # p3 is not stored whole: dummy zeros
  feats += [d[f"p{l}"].transpose(1, 2, 0)[None] for l in range(4, 8)]
  fn = jax.jit(
      functools.partial(
          ra.multilevel_roi_align, **pooler_kwargs(sampling_ratio=0, max_adaptive_samples=8)
      )
  )
  compared = 0
  for k in range(3):
    boxes = d[f"stage{k}_input_boxes"][None].astype(F32)
    need = _need(boxes)
    assert np.all(need <= 8), need
    got = np.asarray(fn(feats, boxes))[0, :8]
    want = d[f"stage{k}_pooled_first8"].transpose(0, 2, 3, 1)
    levels = np.asarray(ra.assign_boxes_to_levels(boxes[0, :8], **level_kwargs()))
    for i in np.nonzero(levels >= 4)[0]:
      scale = np.abs(want[i]).max()
      err = np.abs(got[i] - want[i]).max()
      assert err <= 1e-4 * scale, (k, i, err, scale)
      np.testing.assert_allclose(got[i], want[i], rtol=1e-4, atol=1e-5 * scale)
      compared += 1
  assert compared >= 15, compared


def test_adaptive_grid_exact_on_multiples_of_the_output_size():
  """ceil(roi / 7) must be exact: XLA turns `/ 7` into `* (1/7)` and 84 * f32(1/7) = 12.000001
  (found by bench/parity_torchvision.py). Box sides (aligned, scale 1) of 7k px and 7k +- 1 ulp."""
  sides = [7.0, 14.0, 21.0, 49.0, 84.0, 91.0, 700.0, 84.00001, 83.99999]
  boxes = np.array([[0.5, 0.5, 0.5 + s, 0.5 + s] for s in sides], np.float32)
  need = np.asarray(ra.required_adaptive_samples(jnp.asarray(boxes), 1.0, 7, True))
  expect = max(
      int(math.ceil(np.float32(np.float32(s) / np.float32(7))))
      for s in (boxes[:, 2] - 0.5 - (boxes[:, 0] - 0.5))
  )
  assert tuple(need) == (expect, expect)
  for b in boxes:
    got = np.asarray(ra.required_adaptive_samples(jnp.asarray(b[None]), 1.0, 7, True))
    side = np.float32(b[2] - 0.5) - np.float32(b[0] - 0.5)
    assert got[0] == int(math.ceil(np.float32(side / np.float32(7)))), (b, got)
  rng = np.random.default_rng(3)
  feat = rng.normal(size=(120, 120, 4)).astype(np.float32)
  small = boxes[:6]
  out = ra.roi_align(
      jnp.asarray(feat),
      jnp.asarray(small),
      1.0,
      output_size=7,
      sampling_ratio=0,
      aligned=True,
      max_adaptive_samples=16,
  )
  ref = ref_roi_align(feat, small, 1.0, sampling_ratio=0, aligned=True)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
