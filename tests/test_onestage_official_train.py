"""Training of the official one-stage CenterNet (arch "centernet"): proposal/onestage_targets.py,
proposal/onestage_losses.py and `CenterNetDetector(train=True)`.

Against the official code (tests/data/zoo/onestage_train_<case>.npz, written by
tools/zoo_reference/onestage_train_reference.py: the training branch of the official
`CenterNet.forward` in torch on CPU, with a stand-in head returning random maps; cases `fpn`
(CenterNet-FPN_R50_1x.yaml, P3-P7, MORE_POS), `s4` (CenterNet-S4_DLA_8x.yaml, one stride-4
level, SOI [[0, 1e6]], MORE_POS), `agn` (2 levels, WITH_AGN_HM, NOT_NORM_REG False,
IGNORE_HIGH_FP, HM_FOCAL_ALPHA -1, non-default weights, gamma and beta, an image without GT) and
`agn_more` (2 levels, MORE_POS with TOPK 5 / THRESH 0.3, WITH_AGN_HM, an image without GT)):
  * targets: positives (flattened index, class) as a multiset, exactly; regression locations and
    targets exactly; class heatmaps: the zero pattern exactly, values to 4e-6 relative (measured
    <= 1.0e-6 = 15 float32 ulps: XLA rewrites d² / r² into d² * (1 / r²), 1 ulp in the exponent;
    its exp is within 1 ulp of torch's);
  * every loss to 1e-6 relative (measured <= 1.8e-7) and the gradients of their sum w.r.t. the
    head's maps (class logits, regression, agnostic logits) to 1e-5 of their largest magnitude
    (measured <= 3.2e-7);
  * the same on a larger canvas (maps padded with garbage, the canvas as location mask) and
    with the batch split over two "devices" (normalisers averaged over the mapped axis).
MORE_POS rules checked directly: the most expensive of 9 valid cells of a one-level model is never
a positive (a perfect prediction on all 9 makes none), and a box that holds no grid point gets
no positive at all.
End to end: the "centernet" family with a tiny R18-FPN trains through `cn2_jax.engine` (a few SGD
steps on a fixed batch): every loss is finite and the total falls; the CenterNet-S4_DLA_8x zoo
config traces its training graph (abstractly) once it has its one-level SOI.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cn2_jax.config import base_config
from cn2_jax.engine import optim, step as step_lib
from cn2_jax.modeling import detector
from cn2_jax.modeling.proposal.onestage_losses import onestage_losses
from cn2_jax.modeling.proposal.onestage_targets import more_positives, onestage_targets

DATA = Path(__file__).parent / "data" / "zoo"
CASES = ("fpn", "s4", "agn", "agn_more")


@functools.lru_cache(maxsize=None)
def _case(name):
  z = np.load(DATA / f"onestage_train_{name}.npz")
  arrays = {k: z[k] for k in z.files if k != "meta"}
  return arrays, json.loads(str(z["meta"]))


def _flat(xs):
  return jnp.concatenate([x.reshape(x.shape[0], -1, *x.shape[3:]) for x in xs], axis=1)


def _to_official(x, shapes):
  """`[B, L, ...]` per-image level-major -> the official level-first `[sum_l B H_l W_l, ...]`."""
  out, base = [], 0
  for h, w in shapes:
    n = h * w
    out.append(x[:, base : base + n].reshape(x.shape[0] * n, *x.shape[2:]))
    base += n
  return np.concatenate(out, axis=0)


def _official_pos(image, local, shapes, batch):
  """Per-image flat indices -> the official global index (level base over all images first)."""
  sizes = np.array([h * w for h, w in shapes])
  bases = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  level = np.searchsorted(bases, local, side="right") - 1
  return bases[level] * batch + image * sizes[level] + (local - bases[level])


def _settings(meta):
  st = meta["settings"]
  targets = dict(
      strides=tuple(st["FPN_STRIDES"]),
      soi=tuple(tuple(r) for r in st["SOI"]),
      num_classes=st["NUM_CLASSES"],
      hm_min_overlap=st["HM_MIN_OVERLAP"],
      min_radius=st["MIN_RADIUS"],
      more_pos=st["MORE_POS"],
      more_pos_thresh=st["MORE_POS_THRESH"],
      more_pos_topk=st["MORE_POS_TOPK"],
  )
  losses = dict(
      alpha=st["HM_FOCAL_ALPHA"],
      beta=st["HM_FOCAL_BETA"],
      gamma=st["LOSS_GAMMA"],
      sigmoid_clamp=st["SIGMOID_CLAMP"],
      ignore_high_fp=st["IGNORE_HIGH_FP"],
      pos_weight=st["POS_WEIGHT"],
      neg_weight=st["NEG_WEIGHT"],
      reg_weight=st["REG_WEIGHT"],
      not_norm_reg=st["NOT_NORM_REG"],
  )
  return targets, losses, st["WITH_AGN_HM"]


def _loss_fn(meta, shapes, gt, masks=None, axis_name=None):
  """(cls, reg, agn) per-level maps -> (sum of losses, (losses, targets))."""
  t_kw, l_kw, _ = _settings(meta)
  tf = functools.partial(onestage_targets, level_shapes=shapes, **t_kw)

  def fn(cls, reg, agn):
    reg_flat = _flat(reg)
    targets = jax.vmap(tf)(gt["gt_boxes"], gt["gt_classes"], gt["gt_valid"], reg_flat)
    losses = onestage_losses(
        _flat(cls),
        reg_flat,
        targets,
        agn_hm_logits=None if agn is None else _flat(agn),
        axis_name=axis_name,
        location_mask=None if masks is None else _flat(masks),
        **l_kw,
    )
    return sum(losses.values()), (losses, targets)

  return fn


def _inputs(arrays, num_levels, with_agn):
  cls = [jnp.asarray(arrays[f"cls_{l}"]) for l in range(num_levels)]
  reg = [jnp.asarray(arrays[f"reg_{l}"]) for l in range(num_levels)]
  agn = [jnp.asarray(arrays[f"agn_{l}"]) for l in range(num_levels)] if with_agn else None
  gt = {k: jnp.asarray(arrays[k]) for k in ("gt_boxes", "gt_classes", "gt_valid")}
  return cls, reg, agn, gt


@functools.lru_cache(maxsize=None)
def _run(name):
  arrays, meta = _case(name)
  shapes = tuple(tuple(s) for s in meta["level_shapes"])
  with_agn = _settings(meta)[2]
  cls, reg, agn, gt = _inputs(arrays, len(shapes), with_agn)
  fn = jax.jit(jax.value_and_grad(_loss_fn(meta, shapes, gt), argnums=(0, 1, 2), has_aux=True))
  (_, (losses, targets)), grads = fn(cls, reg, agn)
  return jax.device_get((losses, targets, grads))


def _assert_losses_and_grads(arrays, meta, losses, grads, note=""):
  num_levels = len(meta["level_shapes"])
  assert sorted(losses) == sorted(meta["losses"]), (sorted(losses), sorted(meta["losses"]))
  for k, ref in meta["losses"].items():
    np.testing.assert_allclose(float(losses[k]), ref, rtol=1e-6, atol=0, err_msg=k + note)
  for i, name in enumerate(("cls", "reg", "agn")):
    if grads[i] is None:
      continue
    for l in range(num_levels):
      ref = arrays[f"grad_{name}_{l}"]
      got = np.asarray(grads[i][l])[tuple(slice(0, n) for n in ref.shape)]
      scale = max(np.abs(ref).max(), 1e-12)
      np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * scale, err_msg=f"{name}{l}{note}")


# ----------------------------------------------------------------------------------------------
# Targets and losses against the official code
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_targets_match_official(name):
  arrays, meta = _case(name)
  shapes = [tuple(s) for s in meta["level_shapes"]]
  _, targets, _ = _run(name)
  batch = arrays["gt_boxes"].shape[0]

  # positives: (official flattened index, class), duplicates included
  image = np.broadcast_to(np.arange(batch)[:, None], targets["pos_index"].shape)
  v = targets["pos_valid"]
  ours = sorted(
      zip(
          _official_pos(image[v], targets["pos_index"][v], shapes, batch).tolist(),
          targets["pos_label"][v].tolist(),
      )
  )
  ref = sorted(zip(arrays["pos_inds"].tolist(), arrays["labels"].tolist()))
  assert ours == ref, (len(ours), len(ref))
  assert len(ref) == meta["num_pos"] > 0

  # regression locations and targets (the official -INF / stride marks "none")
  reg_valid = _to_official(targets["reg_valid"], shapes)
  ref_valid = arrays["reg_targets"].max(axis=1) >= 0
  np.testing.assert_array_equal(reg_valid, ref_valid)
  np.testing.assert_array_equal(
      _to_official(targets["reg_target"], shapes)[reg_valid], arrays["reg_targets"][ref_valid]
  )

  # class heatmaps (and the agnostic one = their maximum)
  hm = _to_official(targets["heatmap"], shapes)
  np.testing.assert_array_equal(hm == 0, arrays["hms"] == 0)
  np.testing.assert_allclose(hm, arrays["hms"], rtol=4e-6, atol=0)
  np.testing.assert_array_equal(
      _to_official(targets["agn_heatmap"], shapes), hm.max(axis=1, initial=0.0)
  )


@pytest.mark.parametrize("name", CASES)
def test_losses_and_gradients_match_official(name):
  arrays, meta = _case(name)
  losses, _, grads = _run(name)
  _assert_losses_and_grads(arrays, meta, losses, grads)


def test_larger_canvas_gives_the_official_losses():
  """Maps padded by 2 rows / 3 columns of garbage at every level, the official canvas as the
  location mask: the same targets on the canvas, losses and gradients; none off the canvas."""
  arrays, meta = _case("agn_more")
  shapes = tuple(tuple(s) for s in meta["level_shapes"])
  big = tuple((h + 2, w + 3) for h, w in shapes)
  cls, reg, agn, gt = _inputs(arrays, len(shapes), True)
  rng = np.random.default_rng(0)

  def pad(x):
    h, w = x.shape[1:3]
    out = rng.uniform(0.0, 4.0, size=(x.shape[0], h + 2, w + 3) + x.shape[3:]).astype(np.float32)
    out[:, :h, :w] = np.asarray(x)
    return jnp.asarray(out)

  masks = [
      jnp.broadcast_to(
          (jnp.arange(bh)[:, None] < h) & (jnp.arange(bw)[None] < w), (cls[0].shape[0], bh, bw)
      )
      for (h, w), (bh, bw) in zip(shapes, big)
  ]
  fn = jax.jit(jax.value_and_grad(_loss_fn(meta, big, gt, masks), argnums=(0, 1, 2), has_aux=True))
  (_, (losses, _)), grads = fn([pad(x) for x in cls], [pad(x) for x in reg], [pad(x) for x in agn])
  losses, grads = jax.device_get((losses, grads))
  _assert_losses_and_grads(arrays, meta, losses, grads, " (larger canvas)")
  for g in grads:
    for l, (h, w) in enumerate(shapes):
      off = np.asarray(g[l]).copy()
      off[:, :h, :w] = 0
      assert not off.any()


def test_batch_split_over_devices_gives_the_same_losses():
  """Two images on two "devices" (vmap with axis_name): the device-averaged losses equal the
  one-device losses (the official all-reduce sum / world size normalisers + DDP averaging)."""
  arrays, meta = _case("fpn")
  shapes = tuple(tuple(s) for s in meta["level_shapes"])
  cls, reg, _, gt = _inputs(arrays, len(shapes), False)
  split = lambda x: x.reshape(2, x.shape[0] // 2, *x.shape[1:])  # noqa: E731

  def per_device(cls, reg, gt):
    return _loss_fn(meta, shapes, gt, axis_name="data")(cls, reg, None)[1][0]

  losses = jax.jit(jax.vmap(per_device, axis_name="data"))(
      [split(x) for x in cls], [split(x) for x in reg], {k: split(v) for k, v in gt.items()}
  )
  for k, ref in meta["losses"].items():
    np.testing.assert_allclose(float(np.mean(losses[k])), ref, rtol=1e-6, err_msg=k)


# ----------------------------------------------------------------------------------------------
# MORE_POS rules (`_add_more_pos`)
# ----------------------------------------------------------------------------------------------
def _c33_targets(box, stride, shape):
  """`[H * W, 4]` regression whose 3x3 cells around the box centre equal their targets."""
  h, w = shape
  reg = np.full((h * w, 4), 3.0, np.float32)
  cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
  ix, iy = int(cx / stride), int(cy / stride)
  for dy in (-1, 0, 1):
    for dx in (-1, 0, 1):
      gx, gy = (ix + dx) * stride + stride // 2, (iy + dy) * stride + stride // 2
      reg[(iy + dy) * w + ix + dx] = np.array([gx - box[0], gy - box[1], box[2] - gx, box[3] - gy])
  return reg / stride


@pytest.mark.parametrize("perfect", [False, True])
def test_more_pos_one_level_rules(perfect):
  box = np.array([[20.0, 22.0, 50.0, 44.0]], np.float32)
  reg = _c33_targets(box[0], 4, (16, 16))
  if not perfect:  # costs grow with the cell number; the centre is forced to 0
    reg = reg * np.linspace(1.0, 1.5, 16 * 16, dtype=np.float32)[:, None]
  out = more_positives(
      jnp.asarray(box),
      jnp.asarray([2]),
      jnp.asarray([True]),
      jnp.asarray(reg),
      level_shapes=((16, 16),),
      strides=(4,),
      soi=((0.0, 1e6),),
      more_pos_thresh=1.0,
      more_pos_topk=9,
  )
  cost = np.asarray(out["c33_cost"])[0, 0]
  valid = np.asarray(out["pos_valid"])
  assert cost.max() < 1e8  # all 9 cells are valid
  if perfect:  # every cost 0: the threshold min(0, 1) = 0 keeps none
    assert not cost.any() and not valid.any()
  else:  # threshold = the largest of the 9 costs: the 8 cheaper cells
    assert valid.sum() == 8 and not valid[np.argmax(cost)]
    assert (np.asarray(out["pos_label"])[valid] == 2).all()


def test_more_pos_box_without_grid_point_has_no_positive():
  box = np.array([[5.0, 5.0, 7.0, 7.0]], np.float32)  # no stride-8 grid point (4 + 8k) inside
  out = more_positives(
      jnp.asarray(box),
      jnp.asarray([0]),
      jnp.asarray([True]),
      jnp.ones((8 * 8, 4), jnp.float32),
      level_shapes=((8, 8),),
      strides=(8,),
      soi=((0.0, 80.0),),
      more_pos_thresh=0.2,
      more_pos_topk=9,
  )
  assert not np.asarray(out["pos_valid"]).any()
  assert (np.asarray(out["c33_cost"]) == 1e8).all()


# ----------------------------------------------------------------------------------------------
# End to end: a tiny "centernet" family model trains through cn2_jax.engine
# ----------------------------------------------------------------------------------------------
def _tiny_config():
  c = base_config()
  m = c.model
  m.arch = "centernet"
  m.num_classes = 3
  m.resnet_depth = 18
  m.resnet_width = 32
  m.fpn_channels = 32
  cd = m.centernet_detector
  cd.num_cls_convs = 1
  cd.num_box_convs = 1
  cd.pre_nms_topk_test = 32
  cd.post_nms_topk_test = 16
  with cd.unlocked():
    cd.more_pos = True  # CenterNet-FPN_R50_1x
  o = c.optim
  o.base_lr, o.warmup_iters, o.warmup_factor = 0.02, 1, 1.0
  o.max_iter, o.steps = 100, (100,)
  return c


def test_tiny_centernet_trains(fast_compile):
  c = _tiny_config()
  model = detector.build_model(c.model)
  assert model.proposal_generator.more_pos
  rng = np.random.default_rng(0)
  batch = detector.dummy_batch(2, (96, 128), max_boxes=4)
  batch["image"][:] = rng.integers(0, 60, batch["image"].shape, dtype=np.uint8)
  batch["gt_boxes"][:, :3] = [[8, 10, 50, 60], [60, 20, 120, 90], [30, 40, 44, 52]]
  batch["gt_classes"][:, :3] = [0, 2, 1]
  batch["gt_valid"][:, :3] = True
  batch["gt_valid"][1, 2] = False
  for i, (x1, y1, x2, y2) in enumerate(batch["gt_boxes"][0, :3].astype(int)):
    batch["image"][:, y1:y2, x1:x2] = (200, 60 + 60 * i, 60)
  batch["image_hw"][:] = [96, 120]
  mesh = step_lib.make_mesh(jax.devices()[:1])
  tx = optim.make_optimizer(c.optim, None, ())
  state = step_lib.init_train_state(detector.init_fn(model), tx, jax.random.PRNGKey(0), mesh)
  train_step = step_lib.make_train_step(model, tx, mesh)
  dev_batch = step_lib.shard_batch(batch, mesh)
  totals = []
  t0 = time.perf_counter()
  for _ in range(8):
    state, metrics = train_step(state, dev_batch)
    totals.append(float(metrics["total_loss"]))
  metrics = jax.device_get(metrics)
  for k in ("loss_centernet_pos", "loss_centernet_neg", "loss_centernet_loc"):
    assert np.isfinite(metrics[k]), (k, metrics[k])
  assert metrics["aux/num_pos_per_image"] > 0
  assert np.isfinite(totals).all()
  assert np.mean(totals[-2:]) < 0.8 * totals[0], totals
  print(f"tiny centernet: 8 steps in {time.perf_counter() - t0:.1f}s, total loss {totals}")


def test_s4_zoo_config_builds_the_training_graph():
  """CenterNet-S4_DLA_8x: one stride-4 level needs its own SOI (Base_S4_DLA.yaml SOI [[0, 1e6]]);
  with it the training graph traces (abstractly) to the official loss keys."""
  from cn2_jax.config import load_config_file
  from cn2_jax.modeling.variables import abstract_module_variables

  c = load_config_file(Path(__file__).parents[1] / "configs" / "zoo" / "CenterNet-S4_DLA_8x.py")
  cd = c.model.centernet_detector
  batch = detector.dummy_batch(1, (64, 64), max_boxes=2)
  batch["gt_valid"][:, 0] = True
  batch["gt_boxes"][:, 0] = [8, 8, 40, 30]

  def trace(model_config):
    model = detector.build_model(model_config)
    variables = abstract_module_variables(model)
    return jax.eval_shape(lambda v, b: model.apply(v, b, train=True), variables, batch)

  if tuple(map(tuple, getattr(cd, "soi", ()) or ())) != ((0, 1000000),):
    with pytest.raises(ValueError, match="SOI"):
      trace(c.model)
    with cd.unlocked():
      cd.soi = ((0, 1000000),)
  out = trace(c.model)
  assert {k for k in out if not k.startswith("aux/")} == {
      "loss_centernet_pos",
      "loss_centernet_neg",
      "loss_centernet_loc",
  }
  assert all(v.shape == () and v.dtype == jnp.float32 for v in out.values())
