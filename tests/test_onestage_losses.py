"""Tests for cn2_jax.modeling.onestage.losses against numpy references written from spec §3
(modified focal loss with alpha 2 / beta 4, reg L1 with the NORM_WH variants)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cn2_jax.modeling.onestage import losses as L

pytestmark = pytest.mark.usefixtures("fast_compile")


def ref_focal(pred, gt, lo=1e-12, hi=None):
  p = np.asarray(pred, np.float64)
  p = np.maximum(p, lo) if lo is not None else p
  p = np.minimum(p, hi) if hi is not None else p
  pos = gt == 1
  neg = gt < 1
  with np.errstate(divide="ignore", invalid="ignore"):
    pos_l = np.where(pos, np.log(p) * (1 - p) ** 2, 0).sum()
    neg_l = np.where(neg, np.log(1 - p) * p**2 * (1 - gt) ** 4, 0).sum()
  n = pos.sum()
  return -neg_l if n == 0 else -(pos_l + neg_l) / n


def _heat_case(seed, shape=(2, 6, 7, 3), npos=5):
  rng = np.random.RandomState(seed)
  gt = (rng.rand(*shape) ** 3).astype(np.float32) * 0.99
  flat = gt.reshape(-1)
  flat[rng.choice(flat.size, npos, replace=False)] = 1.0
  pred = (1 / (1 + np.exp(-rng.randn(*shape) * 2))).astype(np.float32)
  return pred, gt


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_focal_loss_matches_reference(seed):
  pred, gt = _heat_case(seed)
  loss, num_pos = jax.jit(L.modified_focal_loss)(pred, gt)
  np.testing.assert_allclose(float(loss), ref_focal(pred, gt), rtol=1e-5)
  assert float(num_pos) == 5.0
  cn, _ = L.modified_focal_loss(pred, gt, L.CENTERNET_CLAMP)
  np.testing.assert_allclose(float(cn), ref_focal(pred, gt, 1e-4, 1 - 1e-4), rtol=1e-5)


def test_focal_loss_without_positives_and_saturation():
  pred, gt = _heat_case(3, npos=0)
  loss, num_pos = L.modified_focal_loss(pred, gt)
  assert float(num_pos) == 0.0
  np.testing.assert_allclose(float(loss), ref_focal(pred, gt), rtol=1e-5)
  # A positive predicted at exactly 1 (centerX: log(1 - 1) * 0 = NaN) stays finite here, and
  # the gradient too; the value is the formula's (the positive term is 0).
  pred, gt = _heat_case(4)
  i = np.argwhere(gt.reshape(-1) == 1)[0, 0]
  pred.reshape(-1)[i] = 1.0
  val, grad = jax.value_and_grad(lambda p: L.modified_focal_loss(p, gt)[0])(pred)
  assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(grad)))
  np.testing.assert_allclose(float(val), ref_focal(pred, gt), rtol=1e-5)
  # peaks are gt == 1 exactly: 0.9999999 is a (weighted) negative
  gt2 = gt.copy()
  gt2.reshape(-1)[i] = np.float32(0.9999999)
  assert float(L.modified_focal_loss(pred, gt2)[1]) == 4.0


def ref_reg_l1(pred_map, index, mask, target, norm=""):
  b, h, w, d = pred_map.shape
  pred = np.take_along_axis(pred_map.reshape(b, h * w, d), index[:, :, None], 1).astype(np.float64)
  m = np.repeat(mask[:, :, None], d, 2).astype(np.float64)
  t = target.astype(np.float64)
  if norm == "centerx":
    n = t.sum(1, keepdims=True) / 2 + 1e-4
  elif norm == "per_object":
    n = t.sum(2, keepdims=True) / 2 + 1e-4
  else:
    n = 1.0
  return np.abs(pred * m / n - t * m / n).sum() / (m.sum() + 1e-4)


@pytest.mark.parametrize("norm", ["", "centerx", "per_object"])
def test_reg_l1_matches_reference(norm):
  rng = np.random.RandomState(5)
  b, h, w, t = 2, 5, 6, 7
  pred_map = rng.randn(b, h, w, 2).astype(np.float32) * 3
  index = rng.randint(0, h * w, (b, t)).astype(np.int32)
  mask = (rng.rand(b, t) > 0.4).astype(np.float32)
  target = (rng.rand(b, t, 2) * 10 * mask[:, :, None]).astype(np.float32)
  got = jax.jit(lambda *a: L.reg_l1_loss(*a, norm_wh=norm))(pred_map, index, mask, target)
  np.testing.assert_allclose(float(got), ref_reg_l1(pred_map, index, mask, target, norm), rtol=1e-5)
  with pytest.raises(ValueError):
    L.reg_l1_loss(pred_map, index, mask, target, norm_wh="bogus")


def test_reg_l1_masked_slots_have_no_gradient():
  pred_map = jnp.ones((1, 3, 3, 2))
  index = jnp.array([[4, 0]])
  mask = jnp.array([[1.0, 0.0]])
  target = jnp.array([[[2.0, 0.5], [0.0, 0.0]]])
  g = jax.grad(lambda p: L.reg_l1_loss(p, index, mask, target))(pred_map)
  g = np.asarray(g).reshape(9, 2)
  assert np.all(g[0] == 0) and np.all(g[4] != 0)


# ------------------------------------------------------------- ignore_unlabel and communism
def ref_ignore_unlabel_focal(pred, gt):
  """centerX `ignore_unlabel_focal_loss`, loop over (image, class) as written there."""
  p = np.maximum(np.asarray(pred, np.float64), 1e-12)
  gt = np.asarray(gt, np.float64)
  pos = (gt == 1).astype(np.float64)
  neg = (gt < 1).astype(np.float64)
  n_img, _, _, n_cls = gt.shape
  for n in range(n_img):
    for c in range(n_cls):
      if gt[n, :, :, c].sum() == 0.0:
        neg[n, :, :, c] = 0.0
  pos_l = (np.log(p) * (1 - p) ** 2 * pos).sum()
  neg_l = (np.log(1 - p) * p**2 * (1 - gt) ** 4 * neg).sum()
  return -neg_l if pos.sum() == 0 else -(pos_l + neg_l) / pos.sum()


def test_ignore_unlabel_focal_matches_centerx_loop():
  pred, gt = _heat_case(5, shape=(3, 6, 7, 4))
  gt[0, :, :, 1] = 0.0  # image 0 has no class-1 label: its negatives are ignored
  gt[2, :, :, :2] = 0.0
  gt[1, :, :, 3] = 0.0
  loss, num_pos = jax.jit(L.modified_focal_loss, static_argnums=(2, 3))(
      pred, gt, L.CENTERX_CLAMP, True
  )
  np.testing.assert_allclose(float(loss), ref_ignore_unlabel_focal(pred, gt), rtol=1e-5)
  plain, _ = L.modified_focal_loss(pred, gt)
  assert float(plain) > float(loss)  # the dropped negatives only ever add loss
  # a fully labelled batch is unchanged; the dropped channels get no gradient
  pred2, gt2 = _heat_case(6, shape=(2, 5, 5, 2))
  gt2 += 1e-3 * (gt2 < 1)
  np.testing.assert_allclose(
      float(L.modified_focal_loss(pred2, gt2, ignore_unlabel=True)[0]),
      float(L.modified_focal_loss(pred2, gt2)[0]),
      rtol=1e-6,
  )
  g = jax.grad(lambda p: L.modified_focal_loss(p, gt, ignore_unlabel=True)[0])(pred)
  assert np.all(np.asarray(g)[0, :, :, 1] == 0) and np.all(np.asarray(g)[2, :, :, :2] == 0)
  assert np.any(np.asarray(g)[0, :, :, 0] != 0)


def test_communism_pins_values_and_scales_gradients():
  losses = {
      "loss_cls": 3.0,
      "loss_box_wh": 0.5,
      "loss_off_reg": 0.2,
      "loss_kd_cls_t0": 40.0,
      "loss_kd_wh_t0": 2.0,
      "loss_kd_reg_t0": 0.25,
      "loss_other": 7.0,
      "aux/num_pos": 4.0,
  }
  kinds = {k: L.communism_kind(k) for k in losses if not k.startswith("aux/")}
  assert kinds == {
      "loss_cls": "cls",
      "loss_box_wh": "wh",
      "loss_off_reg": "off",
      "loss_kd_cls_t0": "cls",
      "loss_kd_wh_t0": "wh",
      "loss_kd_reg_t0": "off",
      "loss_other": None,
  }
  targets = (1.2, 0.4, 0.1)
  tmap = {"cls": 1.2, "wh": 0.4, "off": 0.1}

  def fn(x):  # every term = its value * x: d term / dx = value, so d(scaled)/dx = target / 1
    return L.communism({k: v * x for k, v in losses.items()}, targets)

  out = fn(jnp.float32(1.0))
  for k, kind in kinds.items():
    want = losses[k] if kind is None else tmap[kind]
    np.testing.assert_allclose(float(out[k]), want, rtol=1e-6)
    if kind is not None:
      np.testing.assert_allclose(float(out[f"aux/raw_{k}"]), losses[k], rtol=1e-6)
      # gradient = target * d log L / dx = target / x
      g = jax.grad(lambda x, k=k: fn(x)[k])(jnp.float32(2.0))
      np.testing.assert_allclose(float(g), tmap[kind] / 2.0, rtol=1e-5)
  assert float(out["aux/num_pos"]) == 4.0 and "aux/raw_aux/num_pos" not in out
  # a zero term (no objects) stays 0 with a finite, zero gradient (centerX: 0 / 0 = NaN)
  z = jax.grad(lambda x: L.communism({"loss_box_wh": 0.0 * x}, targets)["loss_box_wh"])(1.0)
  assert float(z) == 0.0
