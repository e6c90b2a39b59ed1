"""Tests for cn2_jax.modeling.proposal.targets / losses (spec §3, §8 items 2-5, 15).

The references are plain numpy loops written from the spec text (float32 scalars where the
official code computes in float32, so SOI / peak / tie decisions are bit-comparable).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cn2_jax.modeling.proposal.losses import centernet_losses as _centernet_losses
from cn2_jax.modeling.proposal.losses import ltrb_giou_loss
from cn2_jax.modeling.proposal.targets import centernet_targets as _centernet_targets
from tests.schema_settings import CENTERNET, losses_kwargs, targets_kwargs

# jit with static configuration (eager op-by-op dispatch is slow on the shared CPU)
_centernet_targets_jit = jax.jit(
    _centernet_targets,
    static_argnums=(2,),
    static_argnames=tuple(targets_kwargs()),
)


def centernet_targets(gt_boxes, gt_valid, level_shapes, **settings):
  """`centernet_targets` with the schema's settings (config.model.centernet), `settings` changed."""
  return _centernet_targets_jit(gt_boxes, gt_valid, level_shapes, **targets_kwargs(**settings))


# The schema's loss settings; a test overrides one by keyword (`ignore_high_fp=-1.0`).
centernet_losses = functools.partial(_centernet_losses, **losses_kwargs())

F = np.float32
STRIDES = targets_kwargs()["strides"]  # P3..P7: (8, 16, 32, 64, 128)
SOI = CENTERNET["soi"]  # the official ((0, 80), (64, 160), (128, 320), (256, 640), (512, 1e7))
# Scaled-down SOI (÷4) so that every level and every overlap band occurs on tiny images.
SOI_SMALL = ((0, 20), (16, 40), (32, 80), (64, 160), (128, 10000000))
# The MMDet reproduction's FCOS-style non-overlapping ranges (spec §8.3), and scaled down (÷4).
SOI_MMDET = ((0, 64), (64, 128), (128, 256), (256, 512), (512, 100000000))
SOI_MMDET_SMALL = ((0, 16), (16, 32), (32, 64), (64, 128), (128, 100000000))


def level_shapes_for(h, w, strides=STRIDES):
  return tuple((-(-h // s), -(-w // s)) for s in strides)


# ------------------------------------------------------------------------------------------
# numpy reference (spec §3.1-3.3, §3.5, §3.7)
# ------------------------------------------------------------------------------------------
def ref_targets(
    boxes,
    valid,
    shapes,
    strides=STRIDES,
    soi=SOI,
    o=0.8,
    min_radius=4.0,
    dedup=False,
    all_level_peaks=True,
):
  nloc = sum(h * w for h, w in shapes)
  hm = np.zeros(nloc, F)
  cnt = np.zeros(nloc, F)
  rt = np.zeros((nloc, 4), F)
  rv = np.zeros(nloc, bool)
  delta = (1 - o) / (1 + o)
  gts = []
  for n in range(len(boxes)):
    if not valid[n]:
      continue
    x1, y1, x2, y2 = (F(v) for v in boxes[n])
    cx, cy = (x1 + x2) / F(2), (y1 + y2) / F(2)
    w, h = x2 - x1, y2 - y1
    r2 = max(F(2 * delta * delta) * (w * h), F(min_radius * min_radius))  # spec §3.3
    c = np.sqrt(w * w + h * h) / F(2)  # half-diagonal, spec §3.1
    cared = [F(lo) <= c <= F(hi) for lo, hi in soi]
    gts.append((x1, y1, x2, y2, cx, cy, r2, cared))
  base = 0
  for lv, ((H, W), s) in enumerate(zip(shapes, strides)):
    for g in gts:  # §3.2: one positive per (GT, cared level)
      x1, y1, x2, y2, cx, cy, r2, cared = g
      if cared[lv]:
        px, py = int(math.floor(cx / F(s))), int(math.floor(cy / F(s)))
        cnt[base + py * W + px] += 1
    for y in range(H):
      for x in range(W):
        m = base + y * W + x
        gx, gy = F(x * s + s // 2), F(y * s + s // 2)
        best, best_q, min_q = None, None, np.inf
        for n, (x1, y1, x2, y2, cx, cy, r2, cared) in enumerate(gts):
          px, py = int(math.floor(cx / F(s))), int(math.floor(cy / F(s)))
          peak = x == px and y == py
          if not all_level_peaks:  # MMDet "revised": forced d² = 0 only where the GT is cared
            peak = peak and cared[lv]
          d2 = F(0) if peak else (gx - cx) ** 2 + (gy - cy) ** 2
          q = F(d2) / r2
          min_q = min(min_q, q)
          ltrb = np.array([gx - x1, gy - y1, x2 - gx, y2 - gy], F)
          ok = ltrb.min() > 0 and abs(x - px) <= 1 and abs(y - py) <= 1 and cared[lv]
          if ok and (best is None or q < best_q):
            best, best_q = ltrb, q
        v = math.exp(-min_q) if gts else 0.0
        hm[m] = v if v >= 1e-4 else 0.0
        if best is not None:
          rv[m] = True
          rt[m] = best / F(s)
    base += H * W
  if dedup:
    cnt = np.minimum(cnt, 1)
  return dict(heatmap=hm, pos_count=cnt, reg_target=rt, reg_valid=rv)


def random_gt(rng, img_h, img_w, soi, n_valid, n_pad):
  """Random GT set: band-straddling sizes, tiny boxes, border boxes, same-cell duplicates."""
  bounds = sorted({float(b) for lo_hi in soi for b in lo_hi if b < 1e6})
  boxes = []
  for i in range(n_valid):
    kind = rng.randint(5)
    if kind == 0 and boxes:  # same centre cell as a previous box (duplicate positives)
      b = np.array(boxes[rng.randint(len(boxes))], np.float64)
      cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
      w, h = (b[2] - b[0]) * rng.uniform(0.9, 1.1), (b[3] - b[1]) * rng.uniform(0.9, 1.1)
      cx, cy = cx + rng.uniform(-0.9, 0.9), cy + rng.uniform(-0.9, 0.9)
    elif kind == 1:  # half-diagonal inside an overlap band / near an SOI bound
      c = rng.choice(bounds) * rng.uniform(0.9, 1.1)
      ang = rng.uniform(0.2, 1.3)
      w, h = 2 * c * math.cos(ang), 2 * c * math.sin(ang)
      cx, cy = rng.uniform(0, img_w), rng.uniform(0, img_h)
    elif kind == 2:  # tiny (under the r² floor)
      w, h = rng.uniform(1, 12), rng.uniform(1, 12)
      cx, cy = rng.uniform(0, img_w), rng.uniform(0, img_h)
    else:
      w, h = rng.uniform(4, img_w), rng.uniform(4, img_h)
      cx, cy = rng.uniform(0, img_w), rng.uniform(0, img_h)
    x1, y1 = max(cx - w / 2, 0.0), max(cy - h / 2, 0.0)
    x2, y2 = min(cx + w / 2, img_w), min(cy + h / 2, img_h)
    if rng.rand() < 0.2:  # touch a border exactly
      x1 = 0.0
    if rng.rand() < 0.2:
      y2 = float(img_h)
    if x2 - x1 < 1:
      x2 = min(x1 + 1, img_w)
      x1 = x2 - 1
    if y2 - y1 < 1:
      y2 = min(y1 + 1, img_h)
      y1 = y2 - 1
    boxes.append([x1, y1, x2, y2])
  boxes = np.array(boxes, np.float32).reshape(-1, 4)
  pad = rng.uniform(-50, 500, (n_pad, 4)).astype(np.float32)  # garbage rows
  if n_pad:
    pad[0, 1] = np.nan
  all_boxes = np.concatenate([boxes, pad])
  valid = np.array([True] * n_valid + [False] * n_pad)
  perm = rng.permutation(len(all_boxes))
  return all_boxes[perm], valid[perm]


def assert_targets_equal(got, ref):
  got = {k: np.asarray(v) for k, v in got.items()}
  np.testing.assert_array_equal(got["reg_valid"], ref["reg_valid"])
  np.testing.assert_array_equal(got["pos_count"], ref["pos_count"])
  np.testing.assert_allclose(got["heatmap"], ref["heatmap"], rtol=2e-6, atol=1e-7)
  np.testing.assert_allclose(got["reg_target"], ref["reg_target"], rtol=1e-6, atol=1e-6)
  assert got["heatmap"].dtype == np.float32 and got["pos_count"].dtype == np.float32
  assert got["reg_target"].dtype == np.float32 and got["reg_valid"].dtype == np.bool_


# ------------------------------------------------------------------------------------------
# targets: random GT sets vs the reference
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_targets_random_small_soi(seed):
  rng = np.random.RandomState(seed)
  img_h, img_w = [(120, 150), (96, 128), (128, 100)][seed % 3]
  shapes = level_shapes_for(img_h, img_w)
  boxes, valid = random_gt(
      rng, img_h, img_w, SOI_SMALL, n_valid=[7, 10, 5][seed % 3], n_pad=[3, 0, 2][seed % 3]
  )
  for dedup in (False, True):
    fn = jax.jit(lambda b, v: centernet_targets(b, v, shapes, soi=SOI_SMALL, dedup_positives=dedup))
    got = fn(jnp.asarray(boxes), jnp.asarray(valid))
    ref = ref_targets(boxes, valid, shapes, soi=SOI_SMALL, dedup=dedup)
    assert_targets_equal(got, ref)
    if not dedup:
      # SOI_SMALL covers [0, 1e7] without gaps: every valid GT has >= 1 positive, and the count
      # is exactly the number of (GT, cared level) pairs (duplicates included).
      assert ref["pos_count"].sum() >= valid.sum()


@pytest.mark.parametrize("seed", [10, 11])
def test_targets_random_default_soi(seed):
  rng = np.random.RandomState(seed)
  img_h, img_w = 384, 512
  shapes = level_shapes_for(img_h, img_w)
  boxes, valid = random_gt(rng, img_h, img_w, SOI, n_valid=6, n_pad=2)
  got = jax.jit(lambda b, v: centernet_targets(b, v, shapes))(
      jnp.asarray(boxes), jnp.asarray(valid)
  )
  assert_targets_equal(got, ref_targets(boxes, valid, shapes))


@pytest.mark.parametrize("seed", [20, 21, 22])
@pytest.mark.parametrize("soi_name", ["official", "mmdet"])
def test_targets_mmdet_switches(seed, soi_name):
  """Every combination of the MMDet switches (ranges, dedup_positives, all_level_peaks) vs the
  numpy reference, on scaled-down ranges (all levels and bounds occur on small images)."""
  soi = SOI_SMALL if soi_name == "official" else SOI_MMDET_SMALL
  rng = np.random.RandomState(seed)
  img_h, img_w = [(120, 150), (96, 128), (128, 100)][seed % 3]
  shapes = level_shapes_for(img_h, img_w)
  boxes, valid = random_gt(rng, img_h, img_w, soi, n_valid=8, n_pad=2)
  outs = {}
  for dedup in (False, True):
    for all_peaks in (True, False):
      got = centernet_targets(
          jnp.asarray(boxes),
          jnp.asarray(valid),
          shapes,
          soi=soi,
          dedup_positives=dedup,
          all_level_peaks=all_peaks,
      )
      ref = ref_targets(boxes, valid, shapes, soi=soi, dedup=dedup, all_level_peaks=all_peaks)
      assert_targets_equal(got, ref)
      outs[dedup, all_peaks] = {k: np.asarray(v) for k, v in got.items()}
  # all_level_peaks only changes the heatmap: never the positives or the regression targets,
  # and only by lowering cells below 1 (un-cared peaks become down-weighted negatives)
  for dedup in (False, True):
    a, b = outs[dedup, True], outs[dedup, False]
    for k in ("pos_count", "reg_target", "reg_valid"):
      np.testing.assert_array_equal(a[k], b[k])
    assert np.all(b["heatmap"] <= a["heatmap"])
    assert np.any(b["heatmap"] < a["heatmap"])  # some GT has a peak at an un-cared level
    assert np.all(b["heatmap"][b["pos_count"] > 0] == 1.0)


def test_mmdet_ranges_and_revised_peaks_by_hand():
  shapes = level_shapes_for(1024, 1024)
  box = np.array([[200, 200, 300, 300], [0, 0, 0, 0]], F)  # 100x100, c = 70.7, centre (250,250)
  valid = np.array([True, False])
  run = lambda **kw: {
      k: np.asarray(v)
      for k, v in centernet_targets(jnp.asarray(box), jnp.asarray(valid), shapes, **kw).items()
  }
  off, mm = run(), run(soi=SOI_MMDET)
  assert _levels_of_positives(off["pos_count"], shapes) == [0, 1]  # overlap band: P3 and P4
  assert _levels_of_positives(mm["pos_count"], shapes) == [1]  # (64, 128]: P4 only
  assert mm["reg_valid"][: 128 * 128].sum() == 0 and mm["reg_valid"].sum() == 9
  p3_peak = 31 * 128 + 31  # grid (252, 252): true d² = 8, r² = 2/81 * 1e4 = 246.9
  p4_peak = 128 * 128 + 15 * 64 + 15
  assert mm["heatmap"][p3_peak] == 1.0  # official map: ignored cell
  rev = run(soi=SOI_MMDET, all_level_peaks=False, dedup_positives=True)
  np.testing.assert_allclose(rev["heatmap"][p3_peak], math.exp(-8 / (2 / 81 * 1e4)), rtol=1e-6)
  assert rev["heatmap"][p4_peak] == 1.0 and rev["pos_count"][p4_peak] == 1
  # P7 peak: floor(250 / 128) = 1, grid (192, 192): d² = 2 * 58² -> exp(-27.2) < 1e-4 -> 0
  p7_peak = sum(h * w for h, w in shapes[:4]) + 1 * 8 + 1
  assert mm["heatmap"][p7_peak] == 1.0 and rev["heatmap"][p7_peak] == 0.0


def test_targets_vmap_batch_and_duplicates():
  """vmapped batch == per-image; forced same-cell duplicates counted twice / once (dedup)."""
  rng = np.random.RandomState(7)
  img_h, img_w = 96, 96
  shapes = level_shapes_for(img_h, img_w)
  b0, v0 = random_gt(rng, img_h, img_w, SOI_SMALL, 6, 2)
  # image 1: two 30x30 boxes centred in the same P3 cell (c = 21.2 -> levels P3? no: small SOI
  # [0,20],[16,40] -> P4 only), plus a third one identical to the first.
  b1 = np.array(
      [
          [30, 30, 60, 60],
          [31, 29, 61, 59],
          [30, 30, 60, 60],
          [0, 0, 0, 0],
          [5, 5, 9, 9],
          [0, 0, 0, 0],
          [0, 0, 0, 0],
          [0, 0, 0, 0],
      ],
      F,
  )
  v1 = np.array([1, 1, 1, 0, 1, 0, 0, 0], bool)
  boxes = np.stack([b0, b1])
  valid = np.stack([v0, v1])
  for dedup in (False, True):
    fn = jax.jit(
        jax.vmap(lambda b, v: centernet_targets(b, v, shapes, soi=SOI_SMALL, dedup_positives=dedup))
    )
    got = fn(jnp.asarray(boxes), jnp.asarray(valid))
    for i in range(2):
      assert_targets_equal(
          {k: v[i] for k, v in got.items()},
          ref_targets(boxes[i], valid[i], shapes, soi=SOI_SMALL, dedup=dedup),
      )
    # centres (45,45), (46,44), (45,45): P4 cell (2,2) (and (2,2) for the second as well)
    p4_base = shapes[0][0] * shapes[0][1]
    idx = p4_base + 2 * shapes[1][1] + 2
    assert float(got["pos_count"][1, idx]) == (1.0 if dedup else 3.0)
    assert float(got["heatmap"][1, idx]) == 1.0


def test_targets_no_valid_gt():
  shapes = level_shapes_for(64, 96)
  boxes = np.array([[10, 10, 50, 50], [np.nan, 0, 1, 1]], F)
  got = centernet_targets(jnp.asarray(boxes), jnp.zeros(2, bool), shapes)
  nloc = sum(h * w for h, w in shapes)
  for k in ("heatmap", "pos_count"):
    np.testing.assert_array_equal(np.asarray(got[k]), np.zeros(nloc, F))
  np.testing.assert_array_equal(np.asarray(got["reg_valid"]), np.zeros(nloc, bool))
  np.testing.assert_array_equal(np.asarray(got["reg_target"]), np.zeros((nloc, 4), F))
  # and zero GT rows at all
  got0 = centernet_targets(jnp.zeros((0, 4)), jnp.zeros((0,), bool), shapes)
  assert float(jnp.sum(got0["heatmap"])) == 0 and not bool(jnp.any(got0["reg_valid"]))


def test_invalid_gt_has_no_effect():
  rng = np.random.RandomState(3)
  shapes = level_shapes_for(128, 128)
  boxes, valid = random_gt(rng, 128, 128, SOI_SMALL, 5, 0)
  garbage = np.array([[1, 2, 100, 120], [40, 40, 44, 44], [np.inf, 0, 3, 3]], F)
  a = centernet_targets(jnp.asarray(boxes), jnp.asarray(valid), shapes, soi=SOI_SMALL)
  b = centernet_targets(
      jnp.asarray(np.concatenate([garbage, boxes])),
      jnp.asarray(np.concatenate([np.zeros(3, bool), valid])),
      shapes,
      soi=SOI_SMALL,
  )
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


# ------------------------------------------------------------------------------------------
# targets: hand-checked cases (default SOI / strides)
# ------------------------------------------------------------------------------------------
def _levels_of_positives(pos_count, shapes):
  out, base = [], 0
  for l, (h, w) in enumerate(shapes):
    if pos_count[base : base + h * w].sum() > 0:
      out.append(l)
    base += h * w
  return out


def _one(box, shapes):
  got = centernet_targets(jnp.asarray(np.array([box], F)), jnp.ones(1, bool), shapes)
  return {k: np.asarray(v) for k, v in got.items()}


def test_level_assignment_by_hand():
  shapes = level_shapes_for(1024, 1024)
  P3, P4, P5, P6, P7 = range(5)
  # 100x100: c = 50*sqrt(2) = 70.71, inside the P3/P4 overlap band [64, 80] -> P3 AND P4.
  # (The task brief suggested "P3 only"; with inclusive overlapping ranges it is two levels.)
  assert _levels_of_positives(_one([200, 200, 300, 300], shapes)["pos_count"], shapes) == [P3, P4]
  # 120x120: c = 60*sqrt(2) = 84.85 > 80 and < 128 -> P4 only.
  assert _levels_of_positives(_one([200, 200, 320, 320], shapes)["pos_count"], shapes) == [P4]
  # 96x128: diagonal 160 exactly, c = 80.0 -> both bounds inclusive -> P3 and P4.
  assert _levels_of_positives(_one([100, 100, 196, 228], shapes)["pos_count"], shapes) == [P3, P4]
  # 192x256: c = 160.0 exactly -> P4 and P5.
  assert _levels_of_positives(_one([100, 100, 292, 356], shapes)["pos_count"], shapes) == [P4, P5]
  # 60x80: c = 50 -> P3 only.   40x30: c = 25 -> P3 only.
  assert _levels_of_positives(_one([0, 0, 60, 80], shapes)["pos_count"], shapes) == [P3]
  # 300x400: c = 250 -> P5 only.  600x800: c = 500 -> P6 only.  768x1024: c = 640 -> P6, P7.
  assert _levels_of_positives(_one([10, 10, 310, 410], shapes)["pos_count"], shapes) == [P5]
  assert _levels_of_positives(_one([10, 10, 610, 810], shapes)["pos_count"], shapes) == [P6]
  assert _levels_of_positives(_one([0, 0, 768, 1024], shapes)["pos_count"], shapes) == [P6, P7]
  # 1000x1000: c = 707.1 -> P7 only.
  assert _levels_of_positives(_one([0, 0, 1000, 1000], shapes)["pos_count"], shapes) == [P7]


def test_inclusive_lower_bound_by_hand():
  """A half-diagonal exactly on a LOWER bound (64/128/... cannot be hit exactly by a real box,
  so a custom SOI is used): 30x40 box -> diagonal 50, c = 25.0 exactly."""
  soi = ((0, 25), (25, 60), (60, 200), (200, 400), (400, 10000000))
  shapes = level_shapes_for(128, 128)
  boxes = np.array([[40, 40, 70, 80], [0, 0, 0, 0]], F)  # centre (55, 60)
  valid = np.array([True, False])
  got = centernet_targets(jnp.asarray(boxes), jnp.asarray(valid), shapes, soi=soi)
  got = {k: np.asarray(v) for k, v in got.items()}
  assert _levels_of_positives(got["pos_count"], shapes) == [0, 1]  # P3 and P4
  # regression side (criterion from l+r, t+b) also includes both levels: 3x3 on P3 (9 cells)
  # + on P4 the 3x3 around cell (3,3): x grids 40/56/72 -> 40 has l = 0 and 72 > x2 = 70, only
  # 56 is strictly inside; y grids 40/56/72 -> 40 has t = 0, 56 and 72 inside -> 1x2 = 2 cells.
  b4 = shapes[0][0] * shapes[0][1]
  assert got["reg_valid"][:b4].sum() == 9 and got["reg_valid"][b4:].sum() == 2
  assert_targets_equal(got, ref_targets(boxes, valid, shapes, soi=soi))


def test_positive_index_by_hand():
  shapes = level_shapes_for(1024, 1024)
  t = _one([200, 200, 300, 300], shapes)  # centre (250, 250)
  # P3: floor(250/8) = 31 -> index 31*128 + 31; P4: floor(250/16) = 15 -> 16384 + 15*64 + 15
  nz = np.nonzero(t["pos_count"])[0].tolist()
  assert nz == [31 * 128 + 31, 128 * 128 + 15 * 64 + 15]
  assert t["pos_count"].sum() == 2


def test_heatmap_by_hand():
  shapes = level_shapes_for(256, 256)
  # δ = (1-0.8)/(1+0.8) = 1/9, 2δ² = 2/81.
  assert abs((1 - 0.8) / (1 + 0.8) - 1 / 9) < 1e-12
  # Tiny 10x10 box (100,100)-(110,110): area 100 -> 2δ²A = 2.47 < 16 -> r² = 16 (floor).
  t = _one([100, 100, 110, 110], shapes)
  hm, pc = t["heatmap"], t["pos_count"]
  W3 = shapes[0][1]  # 32
  # centre (105,105); P3 peak: floor(105/8) = 13, grid point 108 (real d² = 18, forced to 0).
  assert hm[13 * W3 + 13] == 1.0 and pc[13 * W3 + 13] == 1
  # cell (x=12, y=13): grid (100, 108), d² = 25 + 9 = 34 -> exp(-34/16) = 0.119433
  np.testing.assert_allclose(hm[13 * W3 + 12], math.exp(-34 / 16), rtol=1e-6)
  # cell (x=14, y=14): grid (116,116): d² = 121+121 = 242 -> exp(-15.125) = 2.7e-7 < 1e-4 -> 0
  assert hm[14 * W3 + 14] == 0.0
  # P4 (not cared, c = 7.07): peak floor(105/16) = 6 -> hm 1 there but NOT a positive.
  b4 = shapes[0][0] * shapes[0][1]
  W4 = shapes[1][1]
  assert hm[b4 + 6 * W4 + 6] == 1.0 and pc[b4 + 6 * W4 + 6] == 0
  # Peak also rendered on P7: floor(105/128) = 0.
  b7 = sum(h * w for h, w in shapes[:4])
  assert hm[b7] == 1.0 and pc[b7] == 0
  assert pc.sum() == 1

  # 180x180 box (20,20)-(200,200): r² = 2/81 * 32400 = 800 (above the floor). c = 127.3 -> P4.
  t = _one([20, 20, 200, 200], shapes)
  # centre (110,110); P3 cell (x=10, y=13): grid (84, 108): d² = 676 + 4 = 680 -> exp(-0.85)
  np.testing.assert_allclose(t["heatmap"][13 * W3 + 10], math.exp(-680 / 800), rtol=1e-6)
  # min over GTs: add the tiny box -> at its P3 peak hm = 1 regardless of the big box.
  got = centernet_targets(
      jnp.asarray(np.array([[20, 20, 200, 200], [100, 100, 110, 110]], F)),
      jnp.ones(2, bool),
      shapes,
  )
  assert float(got["heatmap"][13 * W3 + 13]) == 1.0
  # cell (x=10,y=13) keeps the larger of the two Gaussians (min normalised distance)
  tiny = math.exp(-((84 - 105) ** 2 + (108 - 105) ** 2) / 16)
  np.testing.assert_allclose(
      float(got["heatmap"][13 * W3 + 10]), max(math.exp(-680 / 800), tiny), rtol=1e-6
  )


def test_regression_by_hand():
  shapes = level_shapes_for(256, 256)
  W3 = shapes[0][1]
  # Tiny box (100,100)-(110,110) at P3: only the peak cell (13,13), grid (108,108), is strictly
  # inside: ltrb = (8, 8, 2, 2) px = (1, 1, 0.25, 0.25) strides. Cells with grid 100 have l = 0.
  t = _one([100, 100, 110, 110], shapes)
  assert np.nonzero(t["reg_valid"])[0].tolist() == [13 * W3 + 13]
  np.testing.assert_allclose(t["reg_target"][13 * W3 + 13], [1, 1, 0.25, 0.25])
  # 100x100 box (200,200)-(300,300) on a 1024 image: P3 and P4, full 3x3 each (18 locations).
  shapes = level_shapes_for(1024, 1024)
  t = _one([200, 200, 300, 300], shapes)
  assert t["reg_valid"].sum() == 18
  # P4 peak (15,15): grid (248,248): ltrb = (48,48,52,52)/16 = (3,3,3.25,3.25)
  np.testing.assert_allclose(t["reg_target"][128 * 128 + 15 * 64 + 15], [3, 3, 3.25, 3.25])
  # 3x3 corner (14,14) on P4: grid (232,232): (32,32,68,68)/16
  np.testing.assert_allclose(t["reg_target"][128 * 128 + 14 * 64 + 14], [2, 2, 4.25, 4.25])
  # Tie-break: two GTs sharing P3 cells -> the one with smaller d²/r² wins. A big box whose
  # centre is far wins nowhere near the small box's peak (its own d² there is large).
  boxes = np.array([[200, 200, 300, 300], [240, 240, 262, 262]], F)  # c2 = (251,251), P3 only
  got = centernet_targets(jnp.asarray(boxes), jnp.ones(2, bool), shapes)
  m = 31 * 128 + 31  # shared P3 peak cell (both centres floor to 31): d² = 0 for both -> tie
  # exact tie at the common peak -> the first GT (index 0) wins, like torch.min(dim)
  np.testing.assert_allclose(np.asarray(got["reg_target"][m]), [52 / 8, 52 / 8, 48 / 8, 48 / 8])
  m2 = 31 * 128 + 32  # grid (260, 252): GT1 d²/r² = (81+1)/max(2/81*484, 16) = 82/16 = 5.1;
  # GT0 d²/r² = (100+4)/(2/81*1e4 = 246.9) = 0.42 -> GT0 wins
  np.testing.assert_allclose(np.asarray(got["reg_target"][m2]), [60 / 8, 52 / 8, 40 / 8, 48 / 8])
  assert float(got["pos_count"][m]) == 2.0  # duplicate positive at the shared P3 peak


# ------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------
def ref_giou(p, t):
  p = p.astype(np.float64)
  t = t.astype(np.float64)
  out = np.zeros(p.shape[:-1])
  for i in np.ndindex(p.shape[:-1]):
    pl, pt, pr, pb = p[i]
    tl, tt, tr, tb = t[i]
    at, ap = (tl + tr) * (tt + tb), (pl + pr) * (pt + pb)
    inter = (min(pl, tl) + min(pr, tr)) * (min(pt, tt) + min(pb, tb))
    union = at + ap - inter
    iou = (inter + 1) / (union + 1)
    c = (max(pl, tl) + max(pr, tr)) * (max(pt, tt) + max(pb, tb))
    out[i] = 1 - (iou - (c - union) / c)
  return out


def test_giou_by_hand_and_random():
  # identical boxes -> 0; (1,1,1,1) vs (2,2,2,2): I=4, U=16, IoU=5/17, C=16 -> 12/17
  np.testing.assert_allclose(float(ltrb_giou_loss(jnp.ones(4) * 3, jnp.ones(4) * 3)), 0, atol=1e-7)
  np.testing.assert_allclose(
      float(ltrb_giou_loss(jnp.ones(4), jnp.ones(4) * 2)), 12 / 17, rtol=1e-6
  )
  # zero prediction vs (1,1,1,1): I=0, U=4, IoU=1/5, C=4 -> GIoU=0.2 -> 0.8
  np.testing.assert_allclose(float(ltrb_giou_loss(jnp.zeros(4), jnp.ones(4))), 0.8, rtol=1e-6)
  for seed in range(3):
    rng = np.random.RandomState(seed)
    p = rng.uniform(0, 10, (3, 7, 4)).astype(F)
    p[0, 0] = 0
    t = rng.uniform(0.05, 10, (3, 7, 4)).astype(F)
    got = ltrb_giou_loss(jnp.asarray(p), jnp.asarray(t))
    assert got.shape == (3, 7) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), ref_giou(p, t), rtol=1e-5, atol=1e-6)
  # bf16 input -> float32 output
  assert ltrb_giou_loss(jnp.ones((2, 4), jnp.bfloat16), jnp.ones((2, 4))).dtype == jnp.float32


def ref_losses(
    logits,
    reg_pred,
    tg,
    alpha=0.25,
    beta=4.0,
    gamma=2.0,
    clamp=1e-4,
    thr=0.85,
    wp=0.5,
    wn=0.5,
    wr=1.0,
    num_pos_override=None,
    num_reg_override=None,
):
  s_pos = s_neg = 0.0
  for idx in np.ndindex(logits.shape):
    p = 1 / (1 + math.exp(-float(logits[idx])))
    p = min(max(p, clamp), 1 - clamp)
    for _ in range(int(tg["pos_count"][idx])):  # duplicates summed once per entry
      s_pos += math.log(p) * (1 - p) ** gamma
    if p < thr:
      s_neg += math.log(1 - p) * p**gamma * (1 - float(tg["heatmap"][idx])) ** beta
  n_pos = tg["pos_count"].sum() if num_pos_override is None else num_pos_override
  n_bar = max(n_pos, 1)
  v = tg["reg_valid"]
  reg_sum = ref_giou(reg_pred[v], tg["reg_target"][v]).sum() if v.any() else 0.0
  n_reg = v.sum() if num_reg_override is None else num_reg_override
  return dict(
      loss_centernet_agn_pos=wp * (-alpha * s_pos) / n_bar,
      loss_centernet_agn_neg=wn * (-(1 - alpha) * s_neg) / n_bar,
      loss_centernet_loc=wr * reg_sum / max(n_reg, 1),
  )


def _random_loss_inputs(rng, B=2, L=60):
  logits = rng.normal(0, 3, (B, L)).astype(F)
  logits[0, :3] = [10.0, 1.8, 1.7]  # p = 0.99995 (clamped), 0.858 (> 0.85 ignored), 0.846
  hm = np.where(rng.rand(B, L) < 0.5, rng.rand(B, L), 0).astype(F)
  cnt = np.zeros((B, L), F)
  pos = rng.choice(B * L, 6, replace=False)
  cnt.reshape(-1)[pos] = [1, 2, 1, 1, 3, 1]
  hm[cnt > 0] = 1.0
  rv = rng.rand(B, L) < 0.3
  rt = np.where(rv[..., None], rng.uniform(0.1, 6, (B, L, 4)), 0).astype(F)
  reg = np.maximum(rng.normal(3, 2, (B, L, 4)), 0).astype(F)
  tg = dict(heatmap=hm, pos_count=cnt, reg_target=rt, reg_valid=rv)
  return logits, reg, tg


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_losses_random(seed):
  rng = np.random.RandomState(seed)
  logits, reg, tg = _random_loss_inputs(rng)
  got = jax.jit(centernet_losses)(
      jnp.asarray(logits), jnp.asarray(reg), {k: jnp.asarray(v) for k, v in tg.items()}
  )
  ref = ref_losses(logits, reg, tg)
  for k in ref:
    assert got[k].dtype == jnp.float32 and got[k].shape == ()
    np.testing.assert_allclose(float(got[k]), ref[k], rtol=2e-5, atol=1e-7)
  # without the high-FP ignore, the neg loss changes (the 0.858 location now counts)
  got2 = centernet_losses(
      jnp.asarray(logits),
      jnp.asarray(reg),
      {k: jnp.asarray(v) for k, v in tg.items()},
      ignore_high_fp=-1.0,
  )
  ref2 = ref_losses(logits, reg, tg, thr=2.0)
  np.testing.assert_allclose(
      float(got2["loss_centernet_agn_neg"]), ref2["loss_centernet_agn_neg"], rtol=2e-5
  )
  assert ref2["loss_centernet_agn_neg"] > ref["loss_centernet_agn_neg"]
  # bf16 logits / reg: computed in float32 (close to the f32 result at bf16 input precision)
  got_bf = centernet_losses(
      jnp.asarray(logits, jnp.bfloat16),
      jnp.asarray(reg, jnp.bfloat16),
      {k: jnp.asarray(v) for k, v in tg.items()},
  )
  ref_bf = ref_losses(
      np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)),
      np.asarray(jnp.asarray(reg, jnp.bfloat16).astype(jnp.float32)),
      tg,
  )
  for k in ref_bf:
    assert got_bf[k].dtype == jnp.float32
    np.testing.assert_allclose(float(got_bf[k]), ref_bf[k], rtol=2e-5, atol=1e-7)


def test_focal_coefficients_by_hand():
  # One positive at logit 0 (p = 0.5) and one negative (hm = 0) at logit 0:
  #   S_pos = log(.5) * .25; loss_pos = 0.5 * 0.25 * 0.25*log2 / 1 = 0.125 * 0.17329 = 0.021661
  #   S_neg = log(.5) * .25 * 1; loss_neg = 0.5 * 0.75 * 0.17329 = 0.375 * 0.17329 = 0.064984
  # The positive's own negative term has weight (1-1)^4 = 0. A p = 0.9 location is ignored.
  logits = jnp.array([[0.0, 0.0, math.log(9.0)]])
  tg = dict(
      heatmap=jnp.array([[1.0, 0.0, 0.0]]),
      pos_count=jnp.array([[1.0, 0.0, 0.0]]),
      reg_target=jnp.zeros((1, 3, 4)),
      reg_valid=jnp.zeros((1, 3), bool),
  )
  got = centernet_losses(logits, jnp.zeros((1, 3, 4)), tg)
  base = 0.25 * math.log(2.0)
  np.testing.assert_allclose(float(got["loss_centernet_agn_pos"]), 0.125 * base, rtol=1e-6)
  np.testing.assert_allclose(float(got["loss_centernet_agn_neg"]), 0.375 * base, rtol=1e-6)
  assert float(got["loss_centernet_loc"]) == 0.0  # no regression locations, R̄ = 1
  # Duplicated positive: count 2 -> S_pos doubles, N̄ = 2 -> pos loss unchanged, neg halved.
  tg2 = dict(tg, pos_count=jnp.array([[2.0, 0.0, 0.0]]))
  got2 = centernet_losses(logits, jnp.zeros((1, 3, 4)), tg2)
  np.testing.assert_allclose(float(got2["loss_centernet_agn_pos"]), 0.125 * base, rtol=1e-6)
  np.testing.assert_allclose(float(got2["loss_centernet_agn_neg"]), 0.375 * base / 2, rtol=1e-6)
  # No positives at all: N̄ = max(0, 1) = 1
  tg3 = dict(tg, pos_count=jnp.zeros((1, 3)), heatmap=jnp.zeros((1, 3)))
  got3 = centernet_losses(logits, jnp.zeros((1, 3, 4)), tg3)
  assert float(got3["loss_centernet_agn_pos"]) == 0.0
  np.testing.assert_allclose(float(got3["loss_centernet_agn_neg"]), 0.375 * 2 * base, rtol=1e-6)


def test_losses_pmean_normalisers_and_grads():
  rng = np.random.RandomState(5)
  shards = [_random_loss_inputs(rng, B=1, L=40) for _ in range(2)]
  shards[1][2]["pos_count"][:] = 0  # device 1 has no positives, device 0 has 9
  shards[1][2]["heatmap"][:] = 0
  logits = jnp.asarray(np.stack([s[0] for s in shards]))
  reg = jnp.asarray(np.stack([s[1] for s in shards]))
  tg = {k: jnp.asarray(np.stack([s[2][k] for s in shards])) for k in shards[0][2]}
  got = jax.vmap(lambda a, b, c: centernet_losses(a, b, c, axis_name="d"), axis_name="d")(
      logits, reg, tg
  )
  n_pos = np.mean([s[2]["pos_count"].sum() for s in shards])
  n_reg = np.mean([s[2]["reg_valid"].sum() for s in shards])
  assert n_pos == 4.5
  for d, s in enumerate(shards):
    ref = ref_losses(*s, num_pos_override=n_pos, num_reg_override=n_reg)
    for k in ref:
      np.testing.assert_allclose(float(got[k][d]), ref[k], rtol=2e-5, atol=1e-7)
  # gradients are finite (masked regression locations hold garbage-free stand-ins)
  logits0, reg0, tg0 = shards[0]
  tg0 = {k: jnp.asarray(v) for k, v in tg0.items()}
  tg0["reg_target"] = jnp.where(tg0["reg_valid"][..., None], tg0["reg_target"], -1e8 / 8)
  g = jax.grad(lambda a, b: sum(centernet_losses(a, b, tg0).values()), argnums=(0, 1))(
      jnp.asarray(logits0), jnp.asarray(reg0)
  )
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in g)
  assert float(jnp.abs(g[1][~tg0["reg_valid"]]).max()) == 0.0


def test_targets_to_losses_end_to_end():
  """targets (vmapped) -> losses with the pos_count / reg_valid normalisers."""
  rng = np.random.RandomState(9)
  shapes = level_shapes_for(96, 128)
  nloc = sum(h * w for h, w in shapes)
  gts = [random_gt(rng, 96, 128, SOI_SMALL, 5, 1) for _ in range(2)]
  boxes = jnp.asarray(np.stack([g[0] for g in gts]))
  valid = jnp.asarray(np.stack([g[1] for g in gts]))
  tg = jax.vmap(lambda b, v: centernet_targets(b, v, shapes, soi=SOI_SMALL))(boxes, valid)
  logits = rng.normal(-2, 2, (2, nloc)).astype(F)
  reg = np.maximum(rng.normal(2, 2, (2, nloc, 4)), 0).astype(F)
  got = jax.jit(centernet_losses)(jnp.asarray(logits), jnp.asarray(reg), tg)
  ref = ref_losses(logits, reg, {k: np.asarray(v) for k, v in tg.items()})
  for k in ref:
    np.testing.assert_allclose(float(got[k]), ref[k], rtol=2e-5, atol=1e-7)


def test_mmdet_config_variants():
  """configs/cn2_r50_mmdet.py: the official recipe plus the port's target switches, which the
  CenterNet module accepts (unknown keys would be a TypeError there)."""
  import importlib.util
  import os
  from cn2_jax.config import model_kwargs, validate_config
  from cn2_jax.modeling.backbone.fpn import FPN
  from cn2_jax.modeling.proposal.centernet import CenterNet

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(
      "cn2_r50_mmdet", os.path.join(root, "configs", "cn2_r50_mmdet.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  for variant, all_peaks in (("original", True), ("", True), ("revised", False)):
    c = validate_config(mod.get_config(variant))
    cn = c.model.centernet
    assert cn.dedup_positives and cn.all_level_peaks == all_peaks
    assert tuple(tuple(r) for r in cn.soi) == SOI_MMDET
    m = model_kwargs(c.model)
    CenterNet(strides=FPN.strides, channels=m["fpn_channels"], dtype=m["dtype"], **m["centernet"])
  with pytest.raises(ValueError, match="variant"):
    mod.get_config("fcos")
