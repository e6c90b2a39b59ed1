"""The one-stage family on the official canvas (issue 25 item 7; modeling/onestage/model.py,
`model.onestage.mask_canvas`): masked BatchNorm (`layers.BatchNorm(mask=)`, per device and
SyncBN over devices with different masks) against references, and the exactness contract: a batch
placed on a canvas 64 pixels larger in each direction gives the losses, gradients, BatchNorm
running-statistic updates, distillation terms and detections of its official canvas (the batch's
largest image rounded up to 32), for a ResNet-18 + DCNv2 model (focal loss) and a tiny RegNetY
one (SE, MSE heatmap loss), and for a RegNetY backbone alone; without `mask_canvas` they
differ."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cn2_jax.modeling import layers
from cn2_jax.modeling.backbone import regnet as R
from cn2_jax.modeling.layers import BatchNorm, BatchNormSettings
from cn2_jax.modeling.onestage import kd
from cn2_jax.modeling.onestage import model as M

pytestmark = pytest.mark.usefixtures("fast_compile")

PAD = 64  # extra rows and columns of the larger canvas


# ----------------------------------------------------------------------------------------------
# Masked BatchNorm
# ----------------------------------------------------------------------------------------------
def _ref_bn(x, keep, scale, bias, eps=1e-5):
  """Reference by selection: the statistics of `x[keep]` (`[n, C]`), every position
  normalised. Returns (y, mean, biased var, n)."""
  sel = x[keep]  # concrete boolean index: [n, C]
  mean = sel.mean(0)
  var = jnp.square(sel - mean).mean(0)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias, mean, var, sel.shape[0]


@pytest.mark.parametrize("per_image", [True, False])
def test_masked_batchnorm_matches_reference(per_image):
  rng = np.random.RandomState(0)
  x = (rng.randn(2, 5, 6, 4) * 3 + 1).astype(np.float32)
  x[:, 3:] = 1e4  # off-canvas garbage must not reach the statistics
  keep = np.zeros((2, 5, 6) if per_image else (5, 6), bool)
  if per_image:
    keep[0, :3, :4] = keep[1, :2, :6] = True
  else:
    keep[:3, :5] = True
  full = np.broadcast_to(keep, x.shape[:3])
  bn = BatchNorm()
  v = bn.init(jax.random.PRNGKey(0), x, use_running_average=False)
  v = {
      "params": {"scale": jnp.asarray(rng.rand(4) + 0.5), "bias": jnp.asarray(rng.randn(4))},
      "batch_stats": {"mean": jnp.asarray(rng.randn(4)), "var": jnp.asarray(rng.rand(4) + 0.5)},
  }
  g = rng.randn(*x.shape).astype(np.float32)

  def fwd(x, params):
    y, upd = bn.apply(
        {"params": params, "batch_stats": v["batch_stats"]},
        x,
        use_running_average=False,
        mask=jnp.asarray(keep),
        mutable=["batch_stats"],
    )
    return jnp.sum(jnp.where(full[..., None], y, 0.0) * g), (y, upd)

  def ref(x, params):
    y, mean, var, n = _ref_bn(x, full, params["scale"], params["bias"])
    return jnp.sum(jnp.where(full[..., None], y, 0.0) * g), (y, mean, var, n)

  (_, (y, upd)), grads = jax.value_and_grad(fwd, (0, 1), has_aux=True)(x, v["params"])
  (_, (ry, mean, var, n)), rgrads = jax.value_and_grad(ref, (0, 1), has_aux=True)(x, v["params"])
  np.testing.assert_allclose(np.asarray(y)[full], np.asarray(ry)[full], rtol=1e-5, atol=1e-5)
  bs = v["batch_stats"]
  np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.9 * bs["mean"] + 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(  # torch: the unbiased variance, n = the masked count
      upd["batch_stats"]["var"], 0.9 * bs["var"] + 0.1 * var * n / (n - 1), rtol=1e-5
  )
  assert n == full.sum()
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(rgrads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  # all-True mask == no mask; eval mode ignores the mask
  y_all = bn.apply(v, x, False, jnp.ones((5, 6), bool), mutable=["batch_stats"])
  y_none = bn.apply(v, x, False, mutable=["batch_stats"])
  for a, b in zip(jax.tree.leaves(y_all), jax.tree.leaves(y_none)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(bn.apply(v, x, True, jnp.asarray(keep)), bn.apply(v, x, True))


def test_masked_syncbn_two_devices_weights_devices_by_count():
  """SyncBN over 2 devices with different masks = the statistics of all masked positions of both
  (torch SyncBatchNorm weights devices by their counts; a pmean of per-device means would not)."""
  rng = np.random.RandomState(1)
  x = (rng.randn(2, 2, 4, 5, 3) * 2).astype(np.float32)  # 2 devices x per-device batch 2
  keep = np.zeros((2, 2, 4, 5), bool)
  keep[0, :, :2, :3] = True  # 12 positions
  keep[1, :, :4, :5] = True  # 40 positions
  x[~keep] = 50.0
  v = BatchNorm().init(jax.random.PRNGKey(0), x[0], use_running_average=False)
  sync = BatchNorm(axis_name="d")
  y, upd = jax.vmap(
      lambda xs, ms: sync.apply(v, xs, False, ms, mutable=["batch_stats"]), axis_name="d"
  )(jnp.asarray(x), jnp.asarray(keep))
  sel = x[keep].astype(np.float64)
  mean, var, n = sel.mean(0), sel.var(0), sel.shape[0]
  ref_y = (x - mean) / np.sqrt(var + 1e-5)
  np.testing.assert_allclose(np.asarray(y)[keep], ref_y[keep], rtol=1e-5, atol=1e-5)
  for d in range(2):
    np.testing.assert_allclose(upd["batch_stats"]["mean"][d], 0.1 * mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        upd["batch_stats"]["var"][d], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5
    )


# ----------------------------------------------------------------------------------------------
# The exactness contract
# ----------------------------------------------------------------------------------------------
def _batch():
  """Two images, 64x96 and 50x70: official canvas 64x96."""
  rng = np.random.RandomState(0)
  b = M.dummy_batch(2, (64, 96), max_boxes=5)
  b["image"] = rng.randint(0, 255, b["image"].shape).astype(np.uint8)
  b["image_hw"] = np.array([[64, 96], [50, 70]], np.int32)
  b["image"][1, 50:] = 0
  b["image"][1, :, 70:] = 0
  b["gt_boxes"][0, :2] = [[4, 6, 40, 30], [50, 10, 95, 63]]  # the second at the canvas corner
  b["gt_boxes"][1, :1] = [[10, 10, 60, 45]]
  b["gt_classes"][0, :2] = [1, 2]
  b["gt_valid"][0, :2] = True
  b["gt_valid"][1, :1] = True
  return b


def _on_larger_canvas(batch):
  out = dict(batch)
  out["image"] = np.pad(batch["image"], ((0, 0), (0, PAD), (0, PAD), (0, 0)))
  return out


def _perturbed(variables, seed=3):
  """Random BatchNorm running statistics and affine parameters (init's are trivial)."""
  rng = np.random.RandomState(seed)

  def leaf(path, x):
    names = [getattr(p, "key", "") for p in path]
    if names[-1] in ("mean", "bias") and x.ndim == 1:
      return jnp.asarray(rng.randn(*x.shape) * 0.1, x.dtype)
    if names[-1] in ("var", "scale") and x.ndim == 1:
      return jnp.asarray(rng.rand(*x.shape) + 0.5, x.dtype)
    return x

  return jax.tree_util.tree_map_with_path(leaf, variables)


def _run(model, variables, batch, with_kd=False):
  """Losses, gradients, BatchNorm updates, detections (and KD terms) of one batch."""

  def total(params):
    losses, upd = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]},
        batch,
        train=True,
        mutable=["batch_stats"],
    )
    return sum(v for k, v in losses.items() if k.startswith("loss_")), (losses, upd)

  (_, (losses, upd)), grads = jax.value_and_grad(total, has_aux=True)(variables["params"])
  dets = model.apply(variables, batch, train=False)
  out = {"losses": losses, "grads": grads, "stats": upd["batch_stats"], "dets": dets}
  if with_kd:
    # the model as its own teacher with other running statistics: KD terms on its canvas
    teacher_vars = _perturbed(variables, seed=7)
    teacher = kd.teacher_forward(model)(teacher_vars, batch)
    settings = (kd.TeacherKD(0, model.num_classes, norm_wh=True),)
    kd_losses, _ = kd.make_kd_loss_fn(settings)(
        model, variables, batch, [teacher], mutable=["batch_stats"]
    )
    out["kd"] = {k: v for k, v in kd_losses.items() if "kd" in k}
  return out


def _assert_close_tree(a, b, what, rtol=1e-9):
  """Leaf by leaf, to `rtol` of the leaf's largest value plus float32 rounding of each element
  (parameters, their gradients and the running statistics are float32 variables even in a
  float64 model) plus 1e-13 (the gradient of a bias followed by BatchNorm is 0 up to rounding)."""
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    atol = rtol * np.abs(y).max() + 1e-13
    np.testing.assert_allclose(
        x, y, rtol=1.2e-7, atol=atol, err_msg=f"{what} {jax.tree_util.keystr(path)}"
    )


def _assert_same_detections(a, b):
  """The detections with a positive score (zero-score fillers may come from anywhere)."""
  for i in range(a["scores"].shape[0]):
    sa, sb = np.asarray(a["scores"][i]), np.asarray(b["scores"][i])
    ka, kb = sa > 0, sb > 0
    assert ka.sum() == kb.sum() > 0
    np.testing.assert_allclose(sa[ka], sb[kb], rtol=1e-6)  # the decode runs in float32
    np.testing.assert_array_equal(np.asarray(a["classes"][i])[ka], np.asarray(b["classes"][i])[kb])
    np.testing.assert_allclose(
        np.asarray(a["boxes"][i])[ka], np.asarray(b["boxes"][i])[kb], rtol=1e-6, atol=1e-5
    )


def _tiny(**kw):
  cfg = dict(
      num_classes=3,
      backbone_width=8,
      deconv_channels=(16, 8, 8),
      max_detections=20,
      tensor_dim=6,
      bias_value=-1.0,
      dtype="float64",  # exactness to 1e-9, not to float32 rounding (x64 on in the tests)
  )
  cfg.update(kw)
  return M.build_onestage_model(cfg)


def _check_exact(model, with_kd=False):
  """The model in float64 (float32 rounding differs between the two canvas sizes: ~1e-4 on
  some gradients of a deep float32 model)."""
  with jax.enable_x64(True):
    variables = _perturbed(M.init_variables(model))
    batch = _batch()
    run = jax.jit(lambda v, b: _run(model, v, b, with_kd))
    official = run(variables, batch)
    larger = run(variables, _on_larger_canvas(batch))
  assert float(official["losses"]["aux/num_pos"]) == 3
  _assert_close_tree(larger["losses"], official["losses"], "loss")
  _assert_close_tree(larger["stats"], official["stats"], "running statistics")
  _assert_close_tree(larger["grads"], official["grads"], "gradient")
  _assert_same_detections(larger["dets"], official["dets"])
  if with_kd:
    _assert_close_tree(larger["kd"], official["kd"], "KD", rtol=2e-6)  # KD terms are float32
    assert float(official["kd"]["loss_kd_cls_t0"]) > 0


@pytest.fixture
def xla_convs(monkeypatch):
  """XLA's convolutions at every size: `layers.conv2d` switches to its matrix-product forms above a
  size that the larger canvas crosses, and their weight gradient accumulates in float32, which
  the float64 comparison would see."""
  monkeypatch.setattr(layers, "MATMUL_FORMS_MIN_MACS", 2**62)


# The two whole-model checks are compile-heavy (40-55 s each on 2 cores): they run in CI's second
# script (scripts/test_zoo.sh, marker zoo), which keeps the README's suite under its time budget.
@pytest.mark.zoo
def test_resnet18_dcn_on_a_larger_canvas_equals_the_official_canvas(xla_convs):
  _check_exact(_tiny(depth=18, use_deform=True, modulate_deform=True), with_kd=True)


@pytest.mark.zoo
def test_regnet_mse_on_a_larger_canvas_equals_the_official_canvas(xla_convs, monkeypatch):
  """A tiny RegNetY (grouped 3x3 convs, SE, identity and projection shortcuts) with the MSE
  heatmap loss."""
  tiny = R.RegNetParams(depth=5, w0=8, wa=8, wm=1.5, group_w=8, se_r=0.25, stem_w=8)
  monkeypatch.setitem(R.REGNETS, "RegNetY-tiny", tiny)
  _check_exact(_tiny(backbone_name="RegNetY-tiny", hm_loss="mse", use_deform=False))


def test_without_mask_canvas_the_padding_counts():
  model = _tiny(depth=18, use_deform=False, mask_canvas=False, dtype="float32")
  variables = _perturbed(M.init_variables(model))
  batch = _batch()
  fwd = jax.jit(
      lambda v, b: model.apply(v, b, train=True, mutable=["batch_stats"]),
  )
  a, ua = fwd(variables, batch)
  b, ub = fwd(variables, _on_larger_canvas(batch))
  assert abs(float(a["loss_cls"]) - float(b["loss_cls"])) > 1e-3 * abs(float(a["loss_cls"]))
  diff = max(
      float(np.abs(np.asarray(x) - np.asarray(y)).max())
      for x, y in zip(jax.tree.leaves(ua), jax.tree.leaves(ub))
  )
  assert diff > 1e-3


def test_regnet_se_on_a_larger_canvas(xla_convs):
  """A tiny RegNetY (SE) backbone: outputs on the canvas, BatchNorm updates and gradients equal
  the official canvas's."""
  with jax.enable_x64(True):
    _regnet_se_check()


def _regnet_se_check():
  stages = (R.StageSpec(1, 8, 2, 1.0, 4), R.StageSpec(2, 16, 2, 1.0, 8))
  bn = BatchNormSettings(0.9, 1e-5)
  model = R.RegNet(stages, 8, 0.25, "BN", jnp.float64, bn, out_features=("s2",))
  rng = np.random.RandomState(2)
  x = np.zeros((2, 64 + PAD, 96 + PAD, 3), np.float64)
  x[0, :64, :96] = rng.randn(64, 96, 3)
  x[1, :40, :70] = rng.randn(40, 70, 3)
  canvas = jnp.array([64, 96], jnp.int32)
  variables = _perturbed(model.init(jax.random.PRNGKey(0), x[:, :64, :96]))
  g = rng.randn(2, 8, 12, 16)

  @jax.jit
  def run(params, x):
    def f(params):
      out, upd = model.apply(
          {"params": params, "batch_stats": variables["batch_stats"]},
          x,
          canvas,
          train_bn=True,
          mutable=["batch_stats"],
      )
      y = out["s2"][:, :8, :12]
      return jnp.sum(y * g), (y, upd)

    return jax.value_and_grad(f, has_aux=True)(params)

  (_, (ya, ua)), ga = run(variables["params"], x[:, :64, :96])
  (_, (yb, ub)), gb = run(variables["params"], x)
  _assert_close_tree(yb, ya, "s2")
  _assert_close_tree(ub, ua, "running statistics")
  _assert_close_tree(gb, ga, "gradient", rtol=1e-4)
