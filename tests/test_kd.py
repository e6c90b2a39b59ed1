"""Knowledge distillation of the one-stage family (cn2_jax/modeling/onestage/kd.py, centerX spec
§4): the KD losses against numpy references written from the spec, per-teacher settings and
config validation, frozen teachers inside the jitted train step (no gradient, unchanged
variables, BatchNorm in eval mode, woGT), and `app.train` distilling a previous run."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cn2_jax.config import ConfigError, base_config, validate_config
from cn2_jax.engine import optim
from cn2_jax.engine import step as step_lib
from cn2_jax.modeling import detector
from cn2_jax.modeling.onestage import kd
from tests.test_onestage_train import small_demo_config, tiny_batch, tiny_config


# ------------------------------------------------------------------------------------------------
# numpy references (spec §4.1, NCHW -> here NHWC)
# ------------------------------------------------------------------------------------------------
def np_pseudo_nms(heat):
  """3x3 max pool (padding -inf), keep the values equal to it."""
  b, h, w, c = heat.shape
  pad = np.full((b, h + 2, w + 2, c), -np.inf)
  pad[:, 1:-1, 1:-1] = heat
  hmax = np.max(
      np.stack([pad[:, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]), axis=0
  )
  return np.where(hmax == heat, heat, 0.0)


def np_kd_losses(student, teachers, cls_index, weight, cls_w, wh_w, reg_w, norm_wh):
  out = {}
  for i, t in enumerate(teachers):
    s_i = 0 if i == 0 else cls_index[i - 1]
    e_i = cls_index[i]
    p_s = student["cls"][..., s_i:e_i].astype(np.float64)
    p_t = t["cls"].astype(np.float64)
    out[f"loss_kd_cls_t{i}"] = weight[i] * cls_w[i] * np.mean((p_s - p_t) ** 2)
    m = np_pseudo_nms(p_t).max(axis=-1, keepdims=True)
    z = m.sum() + 1e-4
    d = (t["wh"][..., :1] + t["wh"][..., 1:]) / 2 + 1e-4 if norm_wh[i] else 1.0
    wh = np.abs(m * student["wh"] / d - m * t["wh"] / d).sum() / z
    off = np.abs(m * student["reg"] - m * t["reg"]).sum() / z
    out[f"loss_kd_wh_t{i}"] = weight[i] * wh_w[i] * wh
    out[f"loss_kd_reg_t{i}"] = weight[i] * reg_w[i] * off
  return out


def _maps(rng, b, h, w, c):
  return {
      "cls": rng.uniform(0, 1, (b, h, w, c)).astype(np.float32),
      "wh": rng.uniform(1, 30, (b, h, w, 2)).astype(np.float32),
      "reg": rng.uniform(0, 1, (b, h, w, 2)).astype(np.float32),
  }


def test_pseudo_nms_and_soft_peak_mask(fast_compile):
  heat = np.zeros((1, 5, 6, 2), np.float32)
  heat[0, 1, 1, 0] = 0.9  # peak, class 0
  heat[0, 1, 2, 0] = 0.5  # its neighbour: suppressed
  heat[0, 3, 4, 1] = 0.7  # peak, class 1
  heat[0, 3, 4, 0] = 0.2  # same pixel, lower class: the mask takes the max over classes
  heat[0, 4, 0, 1] = 0.3  # border peak (padding is -inf, not 0)
  np.testing.assert_array_equal(np.asarray(kd.pseudo_nms(jnp.asarray(heat))), np_pseudo_nms(heat))
  m = np.asarray(kd.peak_mask(jnp.asarray(heat)))[0, ..., 0]
  want = np.zeros((5, 6), np.float32)
  want[1, 1], want[3, 4], want[4, 0] = 0.9, 0.7, 0.3
  # zeros are their own 3x3 max where the neighbourhood is all zero: 0 weight anyway
  np.testing.assert_array_equal(m, want)
  assert m.sum() == pytest.approx(1.9)  # soft weights (peak scores), not a binary mask


def test_kd_losses_two_teachers_match_spec_reference(fast_compile):
  rng = np.random.default_rng(0)
  student = _maps(rng, 2, 8, 10, 7)
  teachers = [_maps(rng, 2, 8, 10, 3), _maps(rng, 2, 8, 10, 4)]
  cls_index, weight, cls_w = (3, 7), (1.0, 2.0), (1e3, 5e3)
  wh_w, reg_w, norm_wh = (1.0, 0.5), (0.1, 0.2), (True, False)
  settings = tuple(
      kd.TeacherKD(s, e, weight[i], cls_w[i], wh_w[i], reg_w[i], norm_wh[i])
      for i, (s, e) in enumerate(((0, 3), (3, 7)))
  )
  one = jax.jit(kd.kd_teacher_losses, static_argnums=(2, 3))
  got = jax.jit(kd.kd_losses, static_argnums=2)(
      jax.tree.map(jnp.asarray, student), [jax.tree.map(jnp.asarray, t) for t in teachers], settings
  )
  want = np_kd_losses(student, teachers, cls_index, weight, cls_w, wh_w, reg_w, norm_wh)
  assert sorted(got) == sorted(want) and len(want) == 6
  for k in want:
    assert float(got[k]) == pytest.approx(want[k], rel=1e-5), k
  # the slice mapping: teacher 1 equal to the student's channels 3:7 -> zero heatmap loss
  t1 = dict(teachers[1], cls=student["cls"][..., 3:7])
  assert float(one(student, t1, settings[1], 1)["loss_kd_cls_t1"]) == 0.0
  # norm_wh divides the wh term by the teacher's (w + h) / 2 per pixel: scaling both wh maps
  # by 10 leaves it unchanged, and multiplies the un-normalised one by 10
  s10, t10 = dict(student, wh=student["wh"] * 10), dict(teachers[0], wh=teachers[0]["wh"] * 10)
  a = one(student, teachers[0], settings[0], 0)["loss_kd_wh_t0"]
  b = one(s10, t10, settings[0], 0)["loss_kd_wh_t0"]
  assert float(b) == pytest.approx(float(a), rel=1e-4)
  off = dataclasses_replace(settings[0], norm_wh=False)
  a = one(student, teachers[0], off, 0)["loss_kd_wh_t0"]
  b = one(s10, t10, off, 0)["loss_kd_wh_t0"]
  assert float(b) == pytest.approx(10 * float(a), rel=1e-4)
  with pytest.raises(ValueError, match="does not fit"):
    one(student, teachers[1], settings[0], 0)


def dataclasses_replace(x, **kw):
  import dataclasses

  return dataclasses.replace(x, **kw)


def test_teacher_settings_and_config_validation():
  c = base_config().kd
  s = kd.teacher_settings(c, [3])  # centerX defaults, one teacher
  assert s == (kd.TeacherKD(0, 3, 10.0, 1.0, 1.0, 0.1, False),)
  c.weight, c.cls_weight, c.norm_wh = (1.0, 2.0), (1e3,), (True,)
  s = kd.teacher_settings(c, [3, 4])  # () cls_index: the teachers' classes concatenated
  assert [(t.start, t.end, t.weight, t.cls_weight, t.norm_wh) for t in s] == [
      (0, 3, 1.0, 1e3, True),
      (3, 7, 2.0, 1e3, True),
  ]
  c.cls_index = (3, 8)
  with pytest.raises(ValueError, match="teacher 1 has 4 classes"):
    kd.teacher_settings(c, [3, 4])

  cfg = tiny_config()
  cfg.kd.teacher_workdirs = ("a", "b")
  cfg.kd.weight = (1.0, 1.0, 1.0)
  with pytest.raises(ConfigError, match="kd.weight has 3 values for 2 teachers"):
    validate_config(cfg)
  cfg.kd.weight = (1.0,)
  cfg.kd.cls_index = (2, 1)
  with pytest.raises(ConfigError, match="increasing"):
    validate_config(cfg)
  cfg.kd.cls_index = (2, 4)
  with pytest.raises(ConfigError, match="past model.num_classes=3"):
    validate_config(cfg)
  cfg.kd.cls_index = (2, 3)
  validate_config(cfg)
  c2 = base_config()  # CenterNet2 student
  c2.kd.teacher_workdirs = ("a",)
  with pytest.raises(
      ConfigError, match="kd.teacher_workdirs is a setting of the 'onestage' family"
  ):
    validate_config(c2)


# ------------------------------------------------------------------------------------------------
# teachers inside the train step
# ------------------------------------------------------------------------------------------------
def _teacher(num_classes, width, seed):
  cfg = tiny_config(use_deform=False)
  cfg.model.num_classes = num_classes
  cfg.model.resnet_width = width
  model = detector.build_model(cfg.model)
  variables = jax.jit(detector.init_fn(model))(jax.random.PRNGKey(seed))
  # non-trivial running statistics: eval-mode BatchNorm must use them
  variables = dict(
      variables,
      batch_stats=jax.tree.map(
          lambda x: x + 0.1 * jnp.abs(x.mean()) + 0.05, variables["batch_stats"]
      ),
  )
  return model, jax.device_get(variables)


def test_train_step_with_two_teachers_and_wogt(fast_compile):
  mesh = step_lib.make_mesh(jax.devices()[:1])
  cfg = tiny_config(use_deform=False)  # student: 3 classes
  model = detector.build_model(cfg.model)
  tx = optim.make_optimizer(cfg.optim, None, ())
  (t0, v0), (t1, v1) = _teacher(2, 16, 1), _teacher(1, 8, 2)
  settings = kd.teacher_settings(cfg.kd, [2, 1])  # student channels 0:2 and 2:3
  fwd = [kd.teacher_forward(t0), kd.teacher_forward(t1)]
  batch = tiny_batch(b=2)
  tv = step_lib.replicate((v0, v1), mesh)

  # the teachers' maps, BatchNorm in eval mode: they depend on the running statistics
  jf = [jax.jit(f) for f in fwd]
  t_maps = [g(v, batch) for g, v in zip(jf, (v0, v1))]
  assert t_maps[0]["cls"].shape[-1] == 2 and t_maps[1]["cls"].shape[-1] == 1
  v0b = dict(v0, batch_stats=jax.tree.map(lambda x: x * 2.0, v0["batch_stats"]))
  assert not np.allclose(np.asarray(jf[0](v0b, batch)["cls"]), np.asarray(t_maps[0]["cls"]))

  # no gradient reaches the teachers through the KD loss (stop_gradient, as in the step)
  kd_fn = kd.make_kd_loss_fn(settings)
  s_vars = jax.jit(detector.init_fn(model))(jax.random.PRNGKey(0))

  def total_wrt_teachers(tvars):
    outs = [jax.lax.stop_gradient(f(v, batch)) for f, v in zip(fwd, tvars)]
    losses, _ = kd_fn(model, s_vars, batch, outs, mutable=["batch_stats"])
    return step_lib.total_loss(losses)

  g = jax.jit(jax.grad(total_wrt_teachers))((v0, v1))
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g))

  # the student's train-mode maps (the KD terms' reference below)
  s_maps, _ = jax.jit(
      lambda v, b: model.apply(
          v,
          b,
          method=lambda mod, b: mod.maps(mod.preprocess(b["image"], b["image_hw"]), True),
          mutable=["batch_stats"],
      )
  )(s_vars, batch)
  host_before = jax.device_get(tv)
  for without_label in (False, True):
    state = step_lib.state_from_variables(s_vars, tx, jax.random.PRNGKey(0), mesh)
    state0 = jax.device_get(state)
    fn = step_lib.make_train_step(
        model,
        tx,
        mesh,
        teachers=fwd,
        kd_loss_fn=kd.make_kd_loss_fn(settings, without_label),
    )
    b = batch
    if without_label:  # woGT: no annotation is read
      b = {k: batch[k] for k in ("image", "image_hw")}
    state, m = fn(state, step_lib.shard_batch(b, mesh), tv)
    m = jax.device_get(m)
    kd_keys = {f"loss_kd_{n}_t{i}" for n in ("cls", "wh", "reg") for i in (0, 1)}
    gt_keys = {"loss_cls", "loss_box_wh", "loss_off_reg"}
    assert kd_keys <= set(m)
    assert bool(gt_keys & set(m)) is not without_label
    loss_keys = [k for k in m if k.startswith("loss_")]
    assert m["total_loss"] == pytest.approx(sum(m[k] for k in loss_keys), rel=1e-5)
    assert all(np.isfinite(m[k]) and m[k] > 0 for k in kd_keys)
    # the KD terms are the reference on the student's maps and the teachers' maps
    want = np_kd_losses(
        jax.tree.map(np.asarray, s_maps),
        [jax.tree.map(np.asarray, t) for t in t_maps],
        (2, 3),
        *((10.0, 10.0), (1.0, 1.0), (1.0, 1.0), (0.1, 0.1), (False, False)),
    )
    for k in kd_keys:
      assert m[k] == pytest.approx(want[k], rel=1e-4), k
    # the student learned; the teachers did not move
    assert np.abs(_flat(state.params) - _flat(state0.params)).max() > 0
    np.testing.assert_array_equal(_flat(jax.device_get(tv)), _flat(host_before))


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


# ------------------------------------------------------------------------------------------------
# app.train: distil a previous run
# ------------------------------------------------------------------------------------------------
def test_app_train_distils_a_teacher_run(tmp_path, fast_compile):
  from cn2_jax import app

  teacher_cfg = small_demo_config()
  teacher_cfg.data.root = str(tmp_path / "synthetic")
  teacher_cfg.data.data_dir = str(tmp_path / "tfds")
  teacher_cfg.train.eval_at_end = False
  teacher_cfg.optim.max_iter = 2
  teacher_cfg.model.resnet_width = 16  # a wider teacher
  teacher_wd = str(tmp_path / "teacher")
  app.train(teacher_cfg, teacher_wd)
  assert os.path.isfile(os.path.join(teacher_wd, "config.json"))

  cfg = small_demo_config()
  cfg.data.root, cfg.data.data_dir = teacher_cfg.data.root, teacher_cfg.data.data_dir
  cfg.train.eval_at_end = False
  cfg.optim.max_iter = 2
  cfg.kd.teacher_workdirs = (teacher_wd,)
  cfg.kd.weight, cfg.kd.cls_weight, cfg.kd.norm_wh = (1.0,), (1e3,), (True,)
  seen = {}
  state, _ = app.train(cfg, str(tmp_path / "student"), metrics_callback=seen.__setitem__)
  assert sorted(seen) == [1, 2]
  for m in seen.values():
    for k in ("loss_kd_cls_t0", "loss_kd_wh_t0", "loss_kd_reg_t0", "loss_cls"):
      assert k in m and np.isfinite(m[k]), k
  # teachers are not part of the student's state / checkpoint
  assert set(jax.device_get(state.params)) == set(detector.abstract_variables(cfg.model)["params"])
  # TensorBoard scalars per teacher (the tag is stored verbatim in the event records)
  events = [f for f in os.listdir(tmp_path / "student") if f.startswith("events.out.tfevents")]
  data = b"".join((tmp_path / "student" / f).read_bytes() for f in events)
  assert b"train/loss_kd_cls_t0" in data and b"train/loss_kd_wh_t0" in data


def test_render_score_thresh_validation():
  """`kd.render_score_thresh` (CenterNet2 teachers, kd_render.py) is a number in [0, 1]."""
  assert base_config().kd.render_score_thresh == 0.05  # CenterNet2's own score_thresh_test
  cfg = tiny_config()
  for bad in (-0.1, 1.5, float("nan")):
    cfg.kd.render_score_thresh = bad
    with pytest.raises(ConfigError, match="kd.render_score_thresh"):
      validate_config(cfg)
  cfg.kd.render_score_thresh = 0.0
  validate_config(cfg)
