"""A CenterNet2 teacher for a one-stage student (issue 13): detections rendered into soft KD targets
(cn2_jax/modeling/onestage/kd_render.py) against a numpy loop written from the documented rule,
their equality with the student's GT targets at score 1, and a tiny CenterNet2 run used as a
teacher (with a one-stage one) in a jitted KD train step."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cn2_jax.config import load_config_file, validate_config
from cn2_jax.engine import optim
from cn2_jax.engine import step as step_lib
from cn2_jax.engine.checkpoint import Checkpointer
from cn2_jax.modeling import detector
from cn2_jax.modeling.onestage import kd
from cn2_jax.modeling.onestage.kd_render import render_detections
from cn2_jax.modeling.onestage.targets import centernet_targets
from tests.test_onestage_train import tiny_batch, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRIDE = 4
OUT_HW = (16, 16)  # a 64 x 64 canvas


# ------------------------------------------------------------------------------------------------
# numpy reference, written from the rule (kd_render module docstring), float64
# ------------------------------------------------------------------------------------------------
def np_radius(w, h, o, formula):
  """CornerNet radius (centerX spec §3), truncated; the test boxes stay off integer boundaries."""
  b1, c1 = h + w, w * h * (1 - o) / (1 + o)
  b2, c2 = 2 * (h + w), (1 - o) * w * h
  a3, b3, c3 = 4 * o, -2 * o * (h + w), (o - 1) * w * h
  sq1 = math.sqrt(b1 * b1 - 4 * c1)
  sq2 = math.sqrt(b2 * b2 - 16 * c2)
  sq3 = math.sqrt(b3 * b3 - 4 * a3 * c3)
  if formula == "fixed":
    r = min((b1 - sq1) / 2, (b2 - sq2) / 8, (b3 + sq3) / (2 * a3))
  else:
    r = min((b1 + sq1) / 2, (b2 + sq2) / 2, (b3 + sq3) / 2)
  assert abs(r - round(r)) > 1e-3, "test box on an integer radius boundary"
  return int(max(r, 0.0))


def np_render(boxes, scores, classes, valid, num_classes, thresh, o=0.3, formula="fixed"):
  n, k = scores.shape
  h, w = OUT_HW
  cls = np.zeros((n, h, w, num_classes))
  wh_map, reg_map = np.zeros((n, h, w, 2)), np.zeros((n, h, w, 2))
  for i in range(n):
    best = np.zeros((h, w))
    for j in range(k):
      s = float(scores[i, j])
      if not valid[i, j] or s < thresh:
        continue
      b = np.asarray(boxes[i, j], np.float64) / STRIDE
      c = (b[:2] + b[2:]) / 2
      p = np.floor(c).astype(int)
      size = b[2:] - b[:2]
      r = np_radius(size[0], size[1], o, formula)
      sigma = (2 * r + 1) / 6
      for y in range(h):
        for x in range(w):
          dx, dy = x - p[0], y - p[1]
          if abs(dx) > r or abs(dy) > r:
            continue
          v = s * math.exp(-(dx * dx + dy * dy) / (2 * sigma * sigma))
          cls[i, y, x, classes[i, j]] = max(cls[i, y, x, classes[i, j]], v)
          if v > best[y, x]:  # strictly larger: ties keep the lower index
            best[y, x] = v
            wh_map[i, y, x], reg_map[i, y, x] = size, c - p
  return {"cls": cls, "wh": wh_map, "reg": reg_map}


def render(boxes, scores, classes, valid, num_classes, thresh=0.05, o=0.3, formula="fixed"):
  fn = jax.jit(
      render_detections,
      static_argnames=(
          "out_hw",
          "num_classes",
          "stride",
          "min_overlap",
          "radius_formula",
          "score_thresh",
      ),
  )
  out = fn(
      jnp.asarray(boxes, jnp.float32),
      jnp.asarray(scores, jnp.float32),
      jnp.asarray(classes, jnp.int32),
      jnp.asarray(valid, bool),
      out_hw=OUT_HW,
      num_classes=num_classes,
      stride=STRIDE,
      min_overlap=o,
      radius_formula=formula,
      score_thresh=thresh,
  )
  return {k: np.asarray(v) for k, v in out.items()}


def dets(*rows):
  """One image from rows (box, score, class[, valid]) -> batched arrays."""
  boxes = np.array([[r[0] for r in rows]], np.float32)
  scores = np.array([[r[1] for r in rows]], np.float32)
  classes = np.array([[r[2] for r in rows]], np.int32)
  valid = np.array([[r[3] if len(r) > 3 else True for r in rows]], bool)
  return boxes, scores, classes, valid


def assert_matches_reference(got, want):
  for k in ("cls", "wh", "reg"):
    assert got[k].shape == want[k].shape and got[k].dtype == np.float32, k
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def peak_cell(box):
  c = (np.asarray(box, np.float64)[:2] + np.asarray(box, np.float64)[2:]) / 2 / STRIDE
  return tuple(int(v) for v in np.floor(c))  # (x, y)


# ------------------------------------------------------------------------------------------------
# the rendering rule
# ------------------------------------------------------------------------------------------------
def test_single_box_peak_is_the_score(fast_compile):
  box = [10.0, 14.0, 42.0, 38.0]
  d = dets((box, 0.7, 1))
  got = render(*d, num_classes=3)
  assert_matches_reference(got, np_render(*d, num_classes=3, thresh=0.05))
  x, y = peak_cell(box)
  assert got["cls"][0, y, x, 1] == np.float32(0.7)  # peak value = score, exactly
  assert got["cls"].max() == np.float32(0.7) and np.argmax(got["cls"][0, ..., 1]) == y * 16 + x
  assert not got["cls"][..., 0].any() and not got["cls"][..., 2].any()
  # wh in feature units, reg = c - floor(c), everywhere the Gaussian reaches
  reached = got["cls"][0, ..., 1] > 0
  assert reached.sum() > 1
  np.testing.assert_allclose(got["wh"][0][reached], np.tile([[8.0, 6.0]], (reached.sum(), 1)))
  np.testing.assert_allclose(got["reg"][0][reached], np.tile([[0.5, 0.5]], (reached.sum(), 1)))
  assert not got["wh"][0][~reached].any() and not got["reg"][0][~reached].any()


def test_two_overlapping_boxes_of_one_class_take_the_max(fast_compile):
  a, b = ([4.0, 4.0, 52.0, 52.0], 0.9, 0), ([12.0, 8.0, 60.0, 56.0], 0.6, 0)
  got = render(*dets(a, b), num_classes=2)
  assert_matches_reference(got, np_render(*dets(a, b), num_classes=2, thresh=0.05))
  one, two = render(*dets(a), num_classes=2), render(*dets(b), num_classes=2)
  overlap = (one["cls"] > 0) & (two["cls"] > 0)
  assert overlap.sum() > 10
  np.testing.assert_array_equal(got["cls"], np.maximum(one["cls"], two["cls"]))  # not the sum
  assert not got["cls"][..., 1].any()


def test_two_classes_and_a_batch(fast_compile):
  # image 0: classes 0 and 2 overlapping; image 1: one class-1 box and a padded row
  boxes = np.array(
      [
          [[6.0, 10.0, 34.0, 30.0], [14.0, 6.0, 50.0, 46.0]],
          [[30.0, 30.0, 62.0, 58.0], [0.0, 0.0, 0.0, 0.0]],
      ],
      np.float32,
  )
  scores = np.array([[0.8, 0.5], [0.4, 0.0]], np.float32)
  classes = np.array([[0, 2], [1, 0]], np.int32)
  valid = np.array([[True, True], [True, False]])
  got = render(boxes, scores, classes, valid, num_classes=3)
  assert_matches_reference(got, np_render(boxes, scores, classes, valid, 3, 0.05))
  a = render(boxes[:1, :1], scores[:1, :1], classes[:1, :1], valid[:1, :1], num_classes=3)
  b = render(boxes[:1, 1:], scores[:1, 1:], classes[:1, 1:], valid[:1, 1:], num_classes=3)
  np.testing.assert_array_equal(got["cls"][0, ..., 0], a["cls"][0, ..., 0])  # channels apart
  np.testing.assert_array_equal(got["cls"][0, ..., 2], b["cls"][0, ..., 2])
  assert not got["cls"][0, ..., 1].any() and not got["cls"][1, ..., [0, 2]].any()


def test_below_threshold_and_invalid_detections_give_nothing(fast_compile):
  weak = ([8.0, 8.0, 40.0, 40.0], 0.04, 0)
  invalid = ([20.0, 20.0, 60.0, 60.0], 0.9, 1, False)
  got = render(*dets(weak, invalid), num_classes=2, thresh=0.05)
  for k in ("cls", "wh", "reg"):
    assert not got[k].any(), k
  # with a drawn one: the others change nothing; score == threshold is drawn
  kept = ([24.0, 4.0, 56.0, 30.0], 0.05, 1)
  got = render(*dets(weak, invalid, kept), num_classes=2, thresh=0.05)
  alone = render(*dets(kept), num_classes=2, thresh=0.05)
  assert got["cls"].max() == np.float32(0.05)
  for k in ("cls", "wh", "reg"):
    np.testing.assert_array_equal(got[k], alone[k], err_msg=k)


def test_wh_and_reg_come_from_the_strongest_detection(fast_compile):
  # a strong large box of class 0 and a weak small box of class 1 whose peak is one cell away
  strong = ([4.0, 4.0, 60.0, 58.0], 0.9, 0)  # c = (8, 7.75), peak (8, 7), wh (14, 13.5)
  weak = ([20.0, 20.0, 40.0, 40.0], 0.3, 1)  # c = (7.5, 7.5), peak (7, 7), wh (5, 5)
  far = ([44.0, 40.0, 60.0, 62.0], 0.2, 1)  # c = (13, 12.75): out of the strong box's reach
  d = dets(strong, weak, far)
  got = render(*d, num_classes=2)
  assert_matches_reference(got, np_render(*d, num_classes=2, thresh=0.05))
  # at the weak box's own peak the strong Gaussian is larger: the strong box's wh / offset
  x, y = peak_cell(weak[0])
  assert got["cls"][0, y, x, 1] == np.float32(0.3) and got["cls"][0, y, x, 0] > 0.3
  np.testing.assert_allclose(got["wh"][0, y, x], [14.0, 13.5])
  np.testing.assert_allclose(got["reg"][0, y, x], [0.0, 0.75])
  x, y = peak_cell(far[0])
  assert got["cls"][0, y, x, 0] == 0 and got["cls"][0, y, x, 1] == np.float32(0.2)
  np.testing.assert_allclose(got["wh"][0, y, x], [4.0, 5.5])
  np.testing.assert_allclose(got["reg"][0, y, x], [0.0, 0.75])
  # what the KD wh / reg losses see: the teacher's soft peak mask is the scores at the peaks
  m = np.asarray(kd.peak_mask(jnp.asarray(got["cls"])))[0, ..., 0]
  want = np.zeros(OUT_HW, np.float32)
  for box, s, _ in (strong, weak, far):
    want[peak_cell(box)[::-1]] = s
  np.testing.assert_array_equal(m, want)


@pytest.mark.parametrize("o, formula", [(0.3, "fixed"), (0.7, "cornernet")])
def test_score_one_renders_the_students_gt_targets(o, formula, fast_compile):
  """A GT box rendered with score 1 is the student's GT: equal heatmap, and wh / reg at its peak
  equal to the GT wh / reg targets (same units)."""
  boxes = np.array(
      [
          [3.0, 5.0, 29.0, 27.0],
          [17.5, 9.25, 45.0, 39.0],  # overlaps box 0, same class
          [33.0, 30.0, 62.0, 63.0],
          [40.0, 2.0, 63.5, 20.0],
          [0.0, 0.0, 0.0, 0.0],  # padding
      ],
      np.float32,
  )
  classes = np.array([0, 0, 2, 1, 0], np.int32)
  valid = np.array([True, True, True, True, False])
  gt = centernet_targets(
      jnp.asarray(boxes),
      jnp.asarray(classes),
      jnp.asarray(valid),
      out_hw=OUT_HW,
      num_classes=3,
      down_scale=STRIDE,
      min_overlap=o,
      tensor_dim=8,
      radius_formula=formula,
  )
  got = render(
      boxes[None], np.ones((1, 5), np.float32), classes[None], valid[None], 3, 0.05, o, formula
  )
  np.testing.assert_array_equal(got["cls"][0], np.asarray(gt["score_map"]))
  n = int(valid.sum())
  idx = np.asarray(gt["index"])[:n]
  y, x = idx // OUT_HW[1], idx % OUT_HW[1]
  np.testing.assert_array_equal(got["wh"][0, y, x], np.asarray(gt["wh"])[:n])
  np.testing.assert_array_equal(got["reg"][0, y, x], np.asarray(gt["reg"])[:n])
  assert_matches_reference(got, np_render(boxes[None], np.ones((1, 5)), classes[None],
                                          valid[None], 3, 0.05, o, formula))  # fmt: skip


# ------------------------------------------------------------------------------------------------
# a CenterNet2 run as a teacher of a one-stage student, inside the jitted KD train step
# ------------------------------------------------------------------------------------------------
def tiny_centernet2_config(num_classes=2):
  c = load_config_file(os.path.join(REPO, "configs", "demo.py"))
  m = c.model
  m.num_classes = num_classes
  m.resnet_width = 8
  m.resnet_norm = ""  # GroupNorm needs >= 32 channels
  m.fpn_channels = 32
  m.centernet.num_convs = 1
  m.centernet.pre_nms_topk_test = 64
  m.centernet.post_nms_topk_test = 32
  m.roi_heads.fc_dim = 32
  m.roi_heads.detections_per_image = 10
  return validate_config(c)


def write_run(workdir, cfg, variables):
  """A run workdir as `app.train` leaves it, for the KD loader: config.json + a checkpoint."""
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(json.loads(cfg.to_json_best_effort()), f)
  with Checkpointer(workdir, every=0, async_save=False) as ckpt:
    ckpt.save(1, variables, force=True)


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def test_centernet2_teacher_in_a_jitted_kd_train_step(tmp_path, fast_compile):
  t_cfg = tiny_centernet2_config(num_classes=2)
  t_model = detector.build_model(t_cfg.model)
  t_vars = jax.device_get(jax.jit(detector.init_fn(t_model))(jax.random.PRNGKey(1)))
  write_run(str(tmp_path / "cn2"), t_cfg, t_vars)
  o_cfg = tiny_config(use_deform=False)
  o_cfg.model.num_classes = 1
  o_vars = jax.device_get(
      jax.jit(detector.init_fn(detector.build_model(o_cfg.model)))(jax.random.PRNGKey(2))
  )
  write_run(str(tmp_path / "onestage"), o_cfg, o_vars)

  cfg = tiny_config(use_deform=False)  # student: 3 classes, stride 4
  cfg.kd.teacher_workdirs = (str(tmp_path / "onestage"), str(tmp_path / "cn2"))
  cfg.kd.render_score_thresh = 0.1
  cfg = validate_config(cfg)
  teachers, settings = kd.load_teachers(cfg)
  assert [(s.start, s.end) for s in settings] == [(0, 1), (1, 3)]  # CenterNet2 -> channels 1:3
  fwd, tv = zip(*teachers)
  np.testing.assert_array_equal(_flat(tv[1]), _flat(t_vars))  # restored from its checkpoint

  batch = tiny_batch(b=2)
  batch["image_hw"][1] = (48, 40)  # image 1 fills part of the 64 x 64 canvas

  def both(v, b):  # the model's own inference output and the teacher forward, same batch
    return t_model.apply(v, {k: b[k] for k in ("image", "image_hw")}, train=False), fwd[1](v, b)

  raw, maps = jax.device_get(jax.jit(both)(tv[1], batch))
  assert maps["cls"].shape == (2, 16, 16, 2) and maps["wh"].shape == (2, 16, 16, 2)
  # the frame: the model's boxes are in the canvas pixels of each image (clipped to its
  # image_hw, not mapped to the original image), rendered as they are at the student's stride
  drawn = raw["valid"] & (raw["scores"] >= 0.1)
  assert drawn[0].any() and drawn[1].any()
  for i, (h, w) in enumerate(batch["image_hw"]):
    bx = raw["boxes"][i][raw["valid"][i]]
    assert (bx >= 0).all() and (bx[:, [0, 2]] <= w).all() and (bx[:, [1, 3]] <= h).all()
  for i, j in zip(*np.nonzero(drawn)):
    x, y = peak_cell(raw["boxes"][i, j])
    assert maps["cls"][i, y, x, raw["classes"][i, j]] >= raw["scores"][i, j]
    assert y < 48 // 4 and x < 40 // 4 if i == 1 else True
  want = render(raw["boxes"], raw["scores"], raw["classes"], raw["valid"], 2, 0.1)
  for k in ("cls", "wh", "reg"):
    np.testing.assert_array_equal(maps[k], want[k], err_msg=k)
  assert maps["cls"].max() == pytest.approx(float(raw["scores"][drawn].max()))

  # one jitted train step: GT + KD terms of both teachers, the teachers unchanged
  mesh = step_lib.make_mesh(jax.devices()[:1])
  model = detector.build_model(cfg.model)
  tx = optim.make_optimizer(cfg.optim, None, ())
  s_vars = jax.jit(detector.init_fn(model))(jax.random.PRNGKey(0))
  state = step_lib.state_from_variables(s_vars, tx, jax.random.PRNGKey(0), mesh)
  params0 = _flat(jax.device_get(state.params))
  fn = step_lib.make_train_step(
      model,
      tx,
      mesh,
      teachers=list(fwd),
      kd_loss_fn=kd.make_kd_loss_fn(settings, cfg.kd.without_label),
  )
  tvr = step_lib.replicate(tuple(tv), mesh)
  before = _flat(jax.device_get(tvr))
  state, m = fn(state, step_lib.shard_batch(batch, mesh), tvr)
  m = jax.device_get(m)
  for i in (0, 1):
    for name in ("cls", "wh", "reg"):
      key = f"loss_kd_{name}_t{i}"
      assert key in m and np.isfinite(m[key]), key
  assert m["loss_kd_cls_t1"] > 0 and m["loss_kd_wh_t1"] > 0
  assert all(np.isfinite(m[k]) for k in ("loss_cls", "loss_box_wh", "loss_off_reg", "total_loss"))
  assert np.abs(_flat(jax.device_get(state.params)) - params0).max() > 0
  np.testing.assert_array_equal(_flat(jax.device_get(tvr)), before)
