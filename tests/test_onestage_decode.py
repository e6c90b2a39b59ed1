"""Tests for cn2_jax.modeling.onestage.decode against a numpy reference written from spec §2
"Decoding" (pseudo-NMS incl. plateau ties, two-stage top-K, boxes, clamp_wh)."""

import jax
import numpy as np
import pytest

from cn2_jax.modeling.onestage import decode as D

pytestmark = pytest.mark.usefixtures("fast_compile")


def ref_pseudo_nms(heat):
  """`heat [B, H, W, C]`: keep pixels equal to the max of their 3x3 neighbourhood."""
  b, h, w, _ = heat.shape
  out = np.zeros_like(heat)
  for n in range(b):
    for y in range(h):
      for x in range(w):
        m = heat[n, max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2].max(axis=(0, 1))
        out[n, y, x] = np.where(m == heat[n, y, x], heat[n, y, x], 0)
  return out


def ref_decode(heat, wh, reg, k, down, clamp):
  b, h, w, c = heat.shape
  heat = ref_pseudo_nms(heat)
  res = []
  for n in range(b):
    per = heat[n].transpose(2, 0, 1).reshape(c, h * w)
    cand = []
    for ci in range(c):
      order = np.argsort(-per[ci], kind="stable")[:k]  # ties: lower index first
      cand += [(per[ci, p], ci, p) for p in order]
    cand = sorted(enumerate(cand), key=lambda t: (-t[1][0], t[0]))[:k]
    dets = []
    for _, (s, ci, p) in cand:
      y, x = divmod(p, w)
      cx = x + (reg[n, y, x, 0] if reg is not None else 0.5)
      cy = y + (reg[n, y, x, 1] if reg is not None else 0.5)
      ww, hh = wh[n, y, x]
      if clamp:
        ww, hh = max(ww, 0), max(hh, 0)
      dets.append((s, ci, p, np.array([cx - ww / 2, cy - hh / 2, cx + ww / 2, cy + hh / 2])))
    res.append(dets)
  return res


def test_pseudo_nms_keeps_plateaus():
  heat = np.zeros((1, 5, 6, 2), np.float32)
  heat[0, 1, 1, 0] = heat[0, 1, 2, 0] = 0.8  # plateau of two equal maxima: both survive
  heat[0, 2, 1, 0] = 0.5  # dominated neighbour: suppressed
  heat[0, 3:5, 3:6, 1] = 0.6  # 2x3 plateau at the border: all survive
  heat[0, 0, 5, 1] = 0.9
  heat[0, 1, 5, 1] = 0.3  # neighbour of 0.9 and of the plateau
  got = np.asarray(jax.jit(D.pseudo_nms)(heat))
  np.testing.assert_array_equal(got, ref_pseudo_nms(heat))
  assert got[0, 1, 1, 0] == got[0, 1, 2, 0] == np.float32(0.8) and got[0, 2, 1, 0] == 0
  assert (got[0, 3:5, 3:6, 1] == np.float32(0.6)).all() and got[0, 1, 5, 1] == 0


@pytest.mark.parametrize(
    "seed,clamp,with_reg", [(0, False, True), (1, True, True), (2, False, False)]
)
def test_decode_matches_reference(seed, clamp, with_reg):
  rng = np.random.RandomState(seed)
  b, h, w, c, k = 2, 9, 11, 4, 20
  heat = rng.rand(b, h, w, c).astype(np.float32)
  heat[0, 2, 3, 1] = heat[0, 2, 4, 1] = 1.5  # a plateau tie survives twice
  wh = (rng.randn(b, h, w, 2) * 3).astype(np.float32)  # some negative sizes
  reg = rng.rand(b, h, w, 2).astype(np.float32) if with_reg else None
  got = jax.jit(lambda a, s, r: D.decode(a, s, r, k=k, down_scale=4, clamp_wh=clamp))(heat, wh, reg)
  ref = ref_decode(heat, wh, reg, k, 4, clamp)
  for n in range(b):
    rs = np.array([d[0] for d in ref[n]], np.float32)
    np.testing.assert_array_equal(np.asarray(got["scores"][n]), rs)
    np.testing.assert_array_equal(np.asarray(got["classes"][n]), [d[1] for d in ref[n]])
    np.testing.assert_array_equal(np.asarray(got["index"][n]), [d[2] for d in ref[n]])
    rb = np.stack([d[3] for d in ref[n]])
    np.testing.assert_allclose(np.asarray(got["boxes_feat"][n]), rb, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got["boxes"][n]), rb * 4, atol=4e-5)
  assert got["valid"].dtype == bool and bool(got["valid"].all())
  assert got["classes"].dtype == np.int32
  inverted = (np.asarray(got["boxes"])[..., 2] < np.asarray(got["boxes"])[..., 0]).any()
  assert inverted == (not clamp)
  top = np.asarray(got["index"][0])
  assert 2 * w + 3 in top and 2 * w + 4 in top


def test_decode_small_map_and_rescale():
  heat = np.random.RandomState(3).rand(1, 2, 3, 2).astype(np.float32)
  out = D.decode(heat, np.ones((1, 2, 3, 2), np.float32), None, k=100)
  assert out["boxes"].shape == (1, 12, 4)  # K is capped by C * H * W
  boxes = np.array([[[4.0, 8.0, 12.0, 16.0]]], np.float32)
  got = D.rescale_boxes(boxes, np.array([[100, 200]]), np.array([[50, 400]]))
  np.testing.assert_allclose(np.asarray(got), [[[8.0, 4.0, 24.0, 8.0]]])
