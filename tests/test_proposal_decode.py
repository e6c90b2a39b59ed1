"""generate_proposals vs a numpy transcription of the official CenterNet2 procedure, and vs the
official oracle outputs (shared/oracle, oracle README §6)."""

import functools
import os

import numpy as np
import pytest

import jax

from cn2_jax.modeling.proposal.decode import generate_proposals
from tests.schema_settings import proposals_kwargs
from tests.test_ops_nms import ref_nms

F32 = np.float32
STRIDES = proposals_kwargs()["strides"]  # P3..P7
ORACLE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "..",
    "..",
    "shared",
    "oracle",
    "outputs_000000000009.npz",
)


def ref_proposals(hms, regs, strides, pre, post, nms_thr, score_thr, clip_hw=None):
  """One image: hms list of [H, W], regs list of [H, W, 4] (numpy), as the official code does it
  (`clip_hw`: the MMDet port's clip to the image before NMS)."""
  all_boxes, all_scores = [], []
  for hm, reg, s in zip(hms, regs, strides):
    h, w = hm.shape
    p = (1.0 / (1.0 + np.exp(-hm.astype(np.float64)))).astype(F32).reshape(-1)
    reg_px = reg.reshape(-1, 4).astype(F32) * F32(s)
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    grid = np.stack([xs.reshape(-1) * s + s // 2, ys.reshape(-1) * s + s // 2], 1).astype(F32)
    cand = np.nonzero(p > F32(score_thr))[0]
    if len(cand) > pre:
      cand = cand[np.argsort(-p[cand], kind="stable")[:pre]]
    r, g = reg_px[cand], grid[cand]
    det = np.stack([g[:, 0] - r[:, 0], g[:, 1] - r[:, 1], g[:, 0] + r[:, 2], g[:, 1] + r[:, 3]], 1)
    det[:, 2] = np.maximum(det[:, 2], det[:, 0] + F32(0.01))
    det[:, 3] = np.maximum(det[:, 3], det[:, 1] + F32(0.01))
    if clip_hw is not None:
      det = np.clip(det, 0, np.array([clip_hw[1], clip_hw[0]] * 2, F32))
    all_boxes.append(det.astype(F32))
    all_scores.append(np.sqrt(p[cand]))
  boxes = np.concatenate(all_boxes)
  scores = np.concatenate(all_scores)
  keep = ref_nms(boxes, scores, np.ones(len(boxes), bool), nms_thr)
  boxes, scores = boxes[keep], scores[keep]
  if len(keep) > post:  # kthvalue cut: keep scores >= the (n - post + 1)-th smallest
    t = np.sort(scores)[len(keep) - post]
    sel = scores >= t
    boxes, scores = boxes[sel], scores[sel]
  return boxes, scores


def level_shapes(h, w):
  shapes = []
  for s in STRIDES:
    shapes.append((-(-h // s), -(-w // s)))
  return shapes


def make_inputs(seed, batch, h, w, logit_mean=-5.0, reg_lo=2.0, reg_hi=12.0):
  rng = np.random.default_rng(seed)
  hms, regs = [], []
  for hl, wl in level_shapes(h, w):
    hms.append(rng.normal(logit_mean, 3.0, (batch, hl, wl)).astype(F32))
    regs.append(rng.uniform(reg_lo, reg_hi, (batch, hl, wl, 4)).astype(F32))
  return hms, regs


@functools.lru_cache(maxsize=None)
def jitted(pre, post, nms_thr, tile):
  return jax.jit(
      lambda h, r: generate_proposals(h, r, STRIDES, pre, post, nms_thr, 1e-4, nms_tile_size=tile)
  )


def check_against_ref(out, hms, regs, pre, post, nms_thr):
  boxes, scores, valid = (np.asarray(out[k]) for k in ("boxes", "scores", "valid"))
  batch = hms[0].shape[0]
  assert boxes.shape == (batch, post, 4) and scores.shape == valid.shape == (batch, post)
  assert boxes.dtype == np.float32 and scores.dtype == np.float32 and valid.dtype == bool
  n_kept = 0
  for b in range(batch):
    rb, rs = ref_proposals(
        [x[b] for x in hms], [x[b] for x in regs], STRIDES, pre, post, nms_thr, 1e-4
    )
    n = len(rs)
    assert n <= post
    np.testing.assert_array_equal(valid[b], np.arange(post) < n)
    np.testing.assert_allclose(boxes[b, :n], rb, rtol=0, atol=1e-4)
    np.testing.assert_allclose(scores[b, :n], rs, rtol=0, atol=1e-6)
    assert np.all(np.diff(scores[b, :n]) <= 0)
    assert np.all(boxes[b, n:] == 0) and np.all(scores[b, n:] == 0)
    n_kept += n
  return n_kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decode_vs_reference_nms09(seed):
  # 64x96 image: levels 8x12, 4x6, 2x3, 1x2, 1x1; large boxes so NMS 0.9 suppresses.
  hms, regs = make_inputs(seed, 2, 64, 96, reg_lo=6.0, reg_hi=14.0)
  out = jitted(20, 30, 0.9, 16)(hms, regs)
  check_against_ref(out, hms, regs, 20, 30, 0.9)


@pytest.mark.parametrize("seed", [3, 4])
def test_decode_vs_reference_padding(seed):
  # Few candidates above 1e-4 (logits mostly below -9.2): outputs are padded; NMS at 0.5.
  hms, regs = make_inputs(seed, 2, 64, 96, logit_mean=-11.0)
  out = jitted(1000, 40, 0.5, 512)(hms, regs)
  n = check_against_ref(out, hms, regs, 1000, 40, 0.5)
  assert 0 < n < 80


def test_decode_clip_to_image_vs_reference():
  """`clip_hw` (model.centernet.clip_proposals, the MMDet port) clips before NMS."""
  hms, regs = make_inputs(5, 2, 64, 96, reg_lo=6.0, reg_hi=14.0)
  clip_hw = np.array([[60, 90], [50, 70]], np.int32)
  out = jax.jit(lambda h, r, c: generate_proposals(h, r, STRIDES, 20, 30, 0.9, 1e-4, clip_hw=c))(
      hms, regs, clip_hw
  )
  boxes, valid = np.asarray(out["boxes"]), np.asarray(out["valid"])
  for b in range(2):
    rb, _ = ref_proposals(
        [x[b] for x in hms], [x[b] for x in regs], STRIDES, 20, 30, 0.9, 1e-4, clip_hw[b]
    )
    n = len(rb)
    np.testing.assert_array_equal(valid[b], np.arange(30) < n)
    np.testing.assert_allclose(boxes[b, :n], rb, rtol=0, atol=1e-4)
    assert boxes[b, :n, 2].max() <= clip_hw[b, 1] and boxes[b, :n, 3].max() <= clip_hw[b, 0]
  unclipped = np.asarray(jitted(20, 30, 0.9, 16)(hms, regs)["boxes"])
  assert unclipped[:, :, 2].max() > 90  # the inputs do reach past the images


def test_decode_suppression_happens():
  hms, regs = make_inputs(7, 1, 64, 96, reg_lo=6.0, reg_hi=14.0)
  b, s = ref_proposals([x[0] for x in hms], [x[0] for x in regs], STRIDES, 1000, 1000, 0.9, 1e-4)
  n_cand = sum(int((1 / (1 + np.exp(-x[0].astype(np.float64))) > 1e-4).sum()) for x in hms)
  assert len(s) < n_cand  # the reference NMS suppresses something on these inputs
  out = jitted(1000, 200, 0.9, 32)(hms, regs)
  check_against_ref(out, hms, regs, 1000, 200, 0.9)


def test_decode_no_recompilation_and_no_gradient():
  traces = []

  def f(h, r):
    traces.append(1)
    return generate_proposals(h, r, STRIDES, 20, 30, 0.9, 1e-4, nms_tile_size=16)

  fn = jax.jit(f)
  for seed in (10, 11, 12):
    hms, regs = make_inputs(seed, 2, 64, 96, reg_lo=6.0, reg_hi=14.0)
    check_against_ref(fn(hms, regs), hms, regs, 20, 30, 0.9)
  assert len(traces) == 1
  hms, regs = make_inputs(13, 1, 64, 96)

  def loss(h, r):
    out = generate_proposals(h, r, STRIDES, 20, 30, 0.9, 1e-4, nms_tile_size=16)
    return out["scores"].sum() + out["boxes"].sum()

  g = jax.jit(jax.grad(loss, argnums=(0, 1)))(hms, regs)
  assert all(not np.asarray(x).any() for x in jax.tree_util.tree_leaves(g))


def test_decode_matches_official_oracle():
  if not os.path.exists(ORACLE):
    pytest.skip(f"official oracle not found at {ORACLE}")
  d = np.load(ORACLE)
  hms = [d[f"head_agn_hm_logits_p{l}"][None].astype(F32) for l in range(3, 8)]
  regs = [np.transpose(d[f"head_reg_p{l}"], (1, 2, 0))[None].astype(F32) for l in range(3, 8)]
  # The schema's test-mode settings (pre/post_nms_topk_test, nms_thresh_test, inference_thresh).
  out = jax.jit(lambda h, r: generate_proposals(h, r, **proposals_kwargs()))(hms, regs)
  boxes = np.asarray(out["boxes"][0])
  scores = np.asarray(out["scores"][0])
  assert np.asarray(out["valid"][0]).all()
  ob, os_ = d["proposal_boxes"], d["proposal_objectness"]
  assert ob.shape == (256, 4)
  # matched sets: each official proposal against its nearest proposal of ours.
  dist = np.abs(ob[:, None, :] - boxes[None, :, :]).max(-1)  # [256, 256]
  nearest = dist.argmin(1)
  ok = dist[np.arange(256), nearest] <= 1e-3
  ok &= np.abs(os_ - scores[nearest]) <= 1e-5
  assert ok.mean() >= 0.99, f"only {ok.sum()}/256 official proposals reproduced"
  assert len(np.unique(nearest[ok])) == ok.sum()
