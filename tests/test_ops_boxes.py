"""cn2_jax.modeling.ops.boxes vs plain numpy references written from detectron2's definitions."""

import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from cn2_jax.modeling.ops import boxes as B
from tests.schema_settings import ROI_HEADS

F32 = np.float32
CASCADE_WEIGHTS = list(ROI_HEADS["box_weights"])  # the three stages' (wx, wy, ww, wh)
SCALE_CLAMP = ROI_HEADS["scale_clamp"]  # detectron2's log(1000 / 16)


def random_boxes(rng, n, size=100.0, min_wh=0.0, max_wh=60.0):
  xy = rng.uniform(-10, size, (n, 2))
  wh = rng.uniform(min_wh, max_wh, (n, 2))
  return np.concatenate([xy, xy + wh], axis=1).astype(F32)


def ref_area(b):
  return ((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])).astype(F32)


def ref_pairwise_iou(b1, b2):
  """detectron2 pairwise_iou, one float32 operation at a time."""
  out = np.zeros((len(b1), len(b2)), F32)
  a1, a2 = ref_area(b1), ref_area(b2)
  for i in range(len(b1)):
    for j in range(len(b2)):
      w = max(F32(0), F32(min(b1[i, 2], b2[j, 2]) - max(b1[i, 0], b2[j, 0])))
      h = max(F32(0), F32(min(b1[i, 3], b2[j, 3]) - max(b1[i, 1], b2[j, 1])))
      inter = F32(w * h)
      if inter > 0:
        out[i, j] = inter / F32(F32(a1[i] + a2[j]) - inter)
  return out


def ref_encode(src, tgt, weights):
  wx, wy, ww, wh = weights
  out = np.zeros(src.shape, np.float64)
  for i in range(len(src)):
    sw, sh = src[i, 2] - src[i, 0], src[i, 3] - src[i, 1]
    sx, sy = src[i, 0] + 0.5 * sw, src[i, 1] + 0.5 * sh
    tw, th = tgt[i, 2] - tgt[i, 0], tgt[i, 3] - tgt[i, 1]
    tx, ty = tgt[i, 0] + 0.5 * tw, tgt[i, 1] + 0.5 * th
    out[i] = [
        wx * (tx - sx) / sw,
        wy * (ty - sy) / sh,
        ww * math.log(tw / sw),
        wh * math.log(th / sh),
    ]
  return out


def ref_decode(deltas, boxes, weights, clamp=math.log(1000.0 / 16)):
  wx, wy, ww, wh = weights
  out = np.zeros(boxes.shape, np.float64)
  for i in range(len(boxes)):
    w, h = boxes[i, 2] - boxes[i, 0], boxes[i, 3] - boxes[i, 1]
    cx, cy = boxes[i, 0] + 0.5 * w, boxes[i, 1] + 0.5 * h
    dx, dy = deltas[i, 0] / wx, deltas[i, 1] / wy
    dw, dh = min(deltas[i, 2] / ww, clamp), min(deltas[i, 3] / wh, clamp)
    pcx, pcy = dx * w + cx, dy * h + cy
    pw, ph = math.exp(dw) * w, math.exp(dh) * h
    out[i] = [pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph]
  return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_box_area(seed):
  rng = np.random.default_rng(seed)
  b = random_boxes(rng, 12).reshape(3, 4, 4)
  np.testing.assert_array_equal(np.asarray(B.box_area(jnp.asarray(b))), ref_area(b))


@pytest.mark.parametrize("seed,n,m", [(0, 7, 5), (1, 13, 1), (2, 1, 9), (3, 20, 17)])
def test_pairwise_iou_exact(seed, n, m):
  rng = np.random.default_rng(seed)
  b1 = random_boxes(rng, n)
  b2 = random_boxes(rng, m)
  # identical, disjoint and zero-area boxes.
  b2[0] = b1[0]
  b1[-1] = [5, 5, 5, 9]
  b2[-1] = [500, 500, 510, 520]
  got = np.asarray(jax.jit(B.pairwise_iou)(b1, b2))
  np.testing.assert_array_equal(got, ref_pairwise_iou(b1, b2))  # bit-exact float32
  assert np.all(np.isfinite(got))


def ref_pairwise_iou_vec(b1, b2):
  """Vectorised float32 numpy version (each numpy op rounds separately, like PyTorch)."""
  a1, a2 = ref_area(b1), ref_area(b2)
  wh = np.maximum(
      np.minimum(b1[:, None, 2:], b2[None, :, 2:]) - np.maximum(b1[:, None, :2], b2[None, :, :2]),
      F32(0),
  )
  inter = wh[..., 0] * wh[..., 1]
  union = (a1[:, None] + a2[None, :]) - inter
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(inter > 0, inter / union, F32(0)).astype(F32)


def test_pairwise_iou_exact_large():
  # Large enough for XLA to vectorise: without the FMA guard ~4% of the entries differ by 1 ulp.
  rng = np.random.default_rng(7)
  b1 = random_boxes(rng, 400)
  b2 = random_boxes(rng, 300)
  got = np.asarray(jax.jit(B.pairwise_iou)(b1, b2))
  np.testing.assert_array_equal(got, ref_pairwise_iou_vec(b1, b2))


def test_pairwise_iou_zero_area_pair_is_zero():
  b = np.array([[3, 3, 3, 3], [3, 3, 3, 3], [0, 0, 4, 4]], F32)
  got = np.asarray(B.pairwise_iou(b, b))
  assert got[0, 1] == 0 and got[0, 0] == 0 and got[2, 2] == 1


def test_pairwise_iou_grad_finite():
  b = jnp.array([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 2.0]])
  g = jax.grad(lambda x: B.pairwise_iou(x, x).sum())(b)
  assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("weights", CASCADE_WEIGHTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_encode_decode(weights, seed):
  rng = np.random.default_rng(seed)
  src = random_boxes(rng, 16, min_wh=1.0)
  tgt = random_boxes(rng, 16, min_wh=1.0)
  enc = np.asarray(jax.jit(lambda s, t: B.encode_boxes(s, t, weights))(src, tgt))
  np.testing.assert_allclose(
      enc, ref_encode(src.astype(np.float64), tgt.astype(np.float64), weights), rtol=1e-5, atol=1e-4
  )
  deltas = rng.normal(0, 1, (16, 4)).astype(F32) * np.array(weights, F32) * 0.3
  dec = np.asarray(jax.jit(lambda d, b: B.decode_boxes(d, b, weights, SCALE_CLAMP))(deltas, src))
  np.testing.assert_allclose(
      dec,
      ref_decode(deltas.astype(np.float64), src.astype(np.float64), weights),
      rtol=1e-5,
      atol=1e-3,
  )
  # round trip (encode -> decode) recovers the targets.
  rt = np.asarray(B.decode_boxes(B.encode_boxes(src, tgt, weights), src, weights, SCALE_CLAMP))
  np.testing.assert_allclose(rt, tgt, rtol=1e-5, atol=2e-3)
  assert enc.dtype == np.float32 and dec.dtype == np.float32


@pytest.mark.parametrize("weights", CASCADE_WEIGHTS)
def test_decode_clamp(weights):
  boxes = np.array([[10, 20, 30, 60], [0, 0, 1, 1]], F32)
  deltas = np.array(
      [[0, 0, 100 * weights[2], 100 * weights[3]], [0, 0, -3 * weights[2], 2 * weights[3]]], F32
  )
  got = np.asarray(B.decode_boxes(deltas, boxes, weights, SCALE_CLAMP))
  np.testing.assert_allclose(got, ref_decode(deltas, boxes, weights), rtol=1e-5, atol=1e-3)
  # clamped width = 1000 / 16 * 20, centred on the box centre.
  np.testing.assert_allclose(got[0, 2] - got[0, 0], 20 * 1000 / 16, rtol=1e-5)
  np.testing.assert_allclose((got[0, 0] + got[0, 2]) / 2, 20, atol=1e-3)
  assert np.all(
      np.isfinite(
          np.asarray(B.decode_boxes(np.full((1, 4), 1e6, F32), boxes[:1], weights, SCALE_CLAMP))
      )
  )


def test_decode_broadcast_shapes():
  rng = np.random.default_rng(0)
  boxes = random_boxes(rng, 6, min_wh=1).reshape(2, 3, 4)
  deltas = rng.normal(size=(2, 3, 4)).astype(F32)
  got = B.decode_boxes(deltas, boxes, CASCADE_WEIGHTS[0], SCALE_CLAMP)
  assert got.shape == (2, 3, 4)
  np.testing.assert_allclose(
      np.asarray(got).reshape(6, 4),
      ref_decode(deltas.reshape(6, 4), boxes.reshape(6, 4), (10, 10, 5, 5)),
      rtol=1e-5,
      atol=1e-3,
  )


@pytest.mark.parametrize("seed", [0, 1])
def test_clip_boxes(seed):
  rng = np.random.default_rng(seed)
  boxes = random_boxes(rng, 10, size=120).reshape(2, 5, 4) - 20
  hw = np.array([[50, 80], [90, 40]], np.int32)
  ref = boxes.copy()
  for b in range(2):
    h, w = hw[b]
    ref[b, :, 0::2] = np.clip(ref[b, :, 0::2], 0, w)
    ref[b, :, 1::2] = np.clip(ref[b, :, 1::2], 0, h)
  np.testing.assert_array_equal(np.asarray(B.clip_boxes(boxes, hw)), ref)
  np.testing.assert_array_equal(np.asarray(B.clip_boxes(boxes, hw[:, None, :])), ref)
  np.testing.assert_array_equal(np.asarray(B.clip_boxes(boxes[0], hw[0])), ref[0])


def test_nonempty():
  b = np.array([[0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 1, 0], [2, 2, 1, 3], [0, 0, 0.5, 2]], F32)
  np.testing.assert_array_equal(np.asarray(B.nonempty(b)), [True, False, False, False, True])
  np.testing.assert_array_equal(np.asarray(B.nonempty(b, 0.5)), [True, False, False, False, False])
  assert B.nonempty(b.reshape(1, 5, 4)).shape == (1, 5)
