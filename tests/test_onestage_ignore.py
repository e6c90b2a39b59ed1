"""Ignore regions in the one-stage losses (issue 25 item 1; docs/onestage.md §3.8): the crowd boxes
of a batch (CrowdHuman extra.ignore persons and "mask" regions, WIDER invalid faces, VOC difficult
objects, COCO iscrowd) give no heatmap negatives, in the GT focal / MSE loss and in the
distillation heatmap term; numpy references written from the rule. Plus data.crowdhuman_ignore_as
on a CrowdHuman odgt file written here, through parsing and the prepared dataset's train batches."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cn2_jax import app
from cn2_jax.config import base_config, validate_config
from cn2_jax.data import pipeline as P
from cn2_jax.data.datasets import crowdhuman
from cn2_jax.errors import ConfigError
from cn2_jax.modeling.onestage import kd
from cn2_jax.modeling.onestage import losses as L
from cn2_jax.modeling.onestage import model as M
from cn2_jax.modeling.onestage.targets import batch_targets, centernet_targets

pytestmark = pytest.mark.usefixtures("fast_compile")


# ------------------------------------------------------------------------------ numpy references
def ref_ignore_map(boxes, classes, ignore, out_hw, num_classes, down_scale, score_map):
  """Cell (i, j) of channel c is ignored when an ignore box of class c, divided by the stride,
  overlaps the cell's square [j, j + 1) x [i, i + 1) with positive area; GT peaks never are."""
  h, w = out_hw
  out = np.zeros((h, w, num_classes), np.float32)
  for box, cls, ign in zip(boxes, classes, ignore):
    if not ign:
      continue
    x1, y1, x2, y2 = np.asarray(box, np.float64) / down_scale
    for i in range(h):
      for j in range(w):
        ox = min(x2, j + 1) - max(x1, j)
        oy = min(y2, i + 1) - max(y1, i)
        if ox > 0 and oy > 0:
          out[i, j, cls] = 1.0
  out[score_map == 1.0] = 0.0
  return out


def ref_focal(pred, gt, ignore, lo=1e-12):
  """centerX's modified focal loss with each negative term weighted by (1 - ignore)."""
  p = np.maximum(np.asarray(pred, np.float64), lo)
  pos = gt == 1
  neg = gt < 1
  pos_l = np.where(pos, np.log(p) * (1 - p) ** 2, 0).sum()
  neg_l = np.where(neg, np.log(1 - p) * p**2 * (1 - gt) ** 4 * (1 - ignore), 0).sum()
  n = pos.sum()
  return -neg_l if n == 0 else -(pos_l + neg_l) / n


def ref_masked_mse(pred, target, ignore):
  keep = 1.0 - np.asarray(ignore, np.float64)
  sq = (np.asarray(pred, np.float64) - target) ** 2
  return (sq * keep).sum() / max(keep.sum(), 1.0)


# ------------------------------------------------------------------------------------ targets
def test_ignore_map_matches_the_cell_overlap_rule():
  rng = np.random.RandomState(0)
  m, out_hw, c, ds = 7, (10, 12), 3, 4
  xy = rng.uniform(0, 40, (m, 2))
  wh = rng.uniform(0.5, 20, (m, 2))
  boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  boxes[0] = [8.0, 12.0, 16.0, 20.0]  # on cell borders: cells 2..3 x 3..4 exactly
  classes = rng.randint(0, c, m).astype(np.int32)
  valid = np.array([0, 1, 0, 1, 0, 0, 1], bool)
  crowd = ~valid
  crowd[5] = False  # a padding row: neither valid nor crowd
  got = jax.jit(
      lambda b, k, v, i: centernet_targets(b, k, v, i, out_hw=out_hw, num_classes=c, down_scale=ds)
  )(boxes, classes, valid, crowd)
  score_map = np.asarray(got["score_map"])
  want = ref_ignore_map(boxes, classes, crowd & ~valid, out_hw, c, ds, score_map)
  np.testing.assert_array_equal(np.asarray(got["hm_ignore"]), want)
  assert want.sum() > 0
  # the box on cell borders covers exactly its 2 x 2 cells
  box0 = ref_ignore_map(boxes[:1], classes[:1], [True], out_hw, c, ds, np.zeros_like(score_map))
  assert box0.sum() == 4 and box0[3:5, 2:4, classes[0]].sum() == 4
  # no ignore rows: all zeros; without gt_ignore: zeros too, and the other targets unchanged
  none = jax.jit(
      lambda b, k, v: centernet_targets(b, k, v, out_hw=out_hw, num_classes=c, down_scale=ds)
  )(boxes, classes, valid)
  assert float(np.asarray(none["hm_ignore"]).sum()) == 0.0
  for key in ("score_map", "wh", "reg", "reg_mask", "index"):
    np.testing.assert_array_equal(np.asarray(none[key]), np.asarray(got[key]))


def test_gt_peak_inside_an_ignore_region_stays_positive():
  boxes = np.array([[8, 8, 24, 24], [0, 0, 40, 40]], np.float32)
  classes = np.array([1, 1], np.int32)
  got = jax.jit(
      lambda b, k, v, i: centernet_targets(b, k, v, i, out_hw=(10, 10), num_classes=2, down_scale=4)
  )(boxes, classes, np.array([True, False]), np.array([False, True]))
  heat, ign = np.asarray(got["score_map"]), np.asarray(got["hm_ignore"])
  assert heat[4, 4, 1] == 1.0 and ign[4, 4, 1] == 0.0
  assert ign[..., 1].sum() == 100 - 1 and ign[..., 0].sum() == 0  # only the crowd box's class


# ------------------------------------------------------------------------------------- losses
def _region_case(seed=0):
  """A 2-image batch: GT objects and one GT-free crowd region of class 0 in image 0."""
  rng = np.random.RandomState(seed)
  boxes = np.zeros((2, 4, 4), np.float32)
  boxes[0, :3] = [[4, 4, 20, 28], [40, 8, 60, 24], [24, 36, 56, 60]]  # [2] is the crowd region
  boxes[1, :1] = [[10, 10, 50, 40]]
  classes = np.zeros((2, 4), np.int32)
  classes[0, :3] = [1, 0, 0]
  valid = np.zeros((2, 4), bool)
  valid[0, :2] = valid[1, 0] = True
  crowd = np.zeros((2, 4), bool)
  crowd[0, 2] = True
  t = batch_targets(
      boxes, classes, valid, crowd & ~valid, out_hw=(16, 16), num_classes=2, down_scale=4
  )
  pred = (1 / (1 + np.exp(-rng.randn(2, 16, 16, 2) * 2))).astype(np.float32)
  return pred, np.asarray(t["score_map"]), np.asarray(t["hm_ignore"])


def test_focal_loss_has_no_negatives_inside_a_crowd_region():
  pred, gt, ign = _region_case()
  region = np.zeros_like(ign)
  region[0, 9:15, 6:14, 0] = 1.0  # (24..56) / 4 = 6..14 in x, (36..60) / 4 = 9..15 in y
  np.testing.assert_array_equal(ign, region)  # no GT of class 0 overlaps it
  loss, num_pos = jax.jit(lambda q, g, i: L.modified_focal_loss(q, g, ignore=i))(pred, gt, ign)
  np.testing.assert_allclose(float(loss), ref_focal(pred, gt, ign), rtol=1e-5)
  assert float(num_pos) == 3.0
  # what is left out is exactly the negative terms of the region's pixels
  plain = float(L.modified_focal_loss(pred, gt)[0])
  p = pred.astype(np.float64)
  region_neg = -(np.log(1 - p) * p**2 * (1 - gt) ** 4 * region).sum() / 3.0
  np.testing.assert_allclose(plain - float(loss), region_neg, rtol=1e-4)
  assert region_neg > 0
  # the gradient is zero inside the region, not outside
  grad = np.asarray(
      jax.grad(lambda q: L.modified_focal_loss(q, gt, L.CENTERX_CLAMP, False, ign)[0])(pred)
  )
  assert np.all(grad[region == 1] == 0) and np.all(grad[(region == 0) & (gt < 1)] != 0)
  # changing the prediction inside the region does not change the loss
  pred2 = np.where(region == 1, 0.99, pred).astype(np.float32)
  np.testing.assert_allclose(
      float(L.modified_focal_loss(pred2, gt, L.CENTERX_CLAMP, False, ign)[0]),
      float(loss),
      rtol=1e-6,
  )
  # combined with ignore_unlabel
  both = float(L.modified_focal_loss(pred, gt, L.CENTERX_CLAMP, True, ign)[0])
  unlabelled = (gt.sum(axis=(1, 2), keepdims=True) == 0).astype(np.float32)
  np.testing.assert_allclose(
      both, ref_focal(pred, gt, np.maximum(ign, unlabelled * (gt < 1))), rtol=1e-5
  )


def test_mse_heatmap_loss_with_ignore():
  pred, gt, ign = _region_case(1)
  np.testing.assert_allclose(
      float(L.mse_heatmap_loss(pred, gt)), ((pred.astype(np.float64) - gt) ** 2).mean(), rtol=1e-6
  )
  np.testing.assert_allclose(
      float(jax.jit(L.mse_heatmap_loss)(pred, gt, ign)), ref_masked_mse(pred, gt, ign), rtol=1e-6
  )
  grad = np.asarray(jax.grad(lambda q: L.mse_heatmap_loss(q, gt, ign))(pred))
  assert np.all(grad[ign == 1] == 0)


def test_kd_heatmap_term_has_nothing_inside_a_crowd_region():
  pred, _, ign = _region_case(2)
  rng = np.random.RandomState(3)
  student = {
      "cls": jnp.asarray(pred),
      "wh": jnp.asarray(rng.rand(2, 16, 16, 2).astype(np.float32) * 5),
      "reg": jnp.asarray(rng.rand(2, 16, 16, 2).astype(np.float32)),
  }
  teacher = {
      "cls": jnp.asarray(rng.rand(2, 16, 16, 1).astype(np.float32)),  # channel 0 of the student
      "wh": jnp.asarray(rng.rand(2, 16, 16, 2).astype(np.float32) * 5),
      "reg": jnp.asarray(rng.rand(2, 16, 16, 2).astype(np.float32)),
  }
  s = kd.TeacherKD(0, 1, weight=2.0, cls_weight=3.0)
  plain = kd.kd_teacher_losses(student, teacher, s)
  got = kd.kd_teacher_losses(student, teacher, s, 0, jnp.asarray(ign))
  ps, pt = pred[..., :1].astype(np.float64), np.asarray(teacher["cls"], np.float64)
  np.testing.assert_allclose(
      float(plain["loss_kd_cls_t0"]), 6.0 * ((ps - pt) ** 2).mean(), rtol=1e-5
  )
  np.testing.assert_allclose(
      float(got["loss_kd_cls_t0"]), 6.0 * ref_masked_mse(ps, pt, ign[..., :1]), rtol=1e-5
  )
  assert float(got["loss_kd_cls_t0"]) != float(plain["loss_kd_cls_t0"])
  for key in ("loss_kd_wh_t0", "loss_kd_reg_t0"):  # the peak-masked terms are unchanged
    assert float(got[key]) == float(plain[key])

  def cls_term(q):
    return kd.kd_losses({**student, "cls": q}, [teacher], [s], jnp.asarray(ign))["loss_kd_cls_t0"]

  grad = np.asarray(jax.grad(cls_term)(jnp.asarray(pred)))
  assert np.all(grad[..., :1][ign[..., :1] == 1] == 0)
  assert np.all(grad[..., :1][ign[..., :1] == 0] != 0)
  # a teacher on channels 1:2 sees channel 1 of the ignore map (empty here): the plain mean
  s1 = kd.TeacherKD(1, 2)
  np.testing.assert_allclose(
      float(kd.kd_teacher_losses(student, teacher, s1, 0, jnp.asarray(ign))["loss_kd_cls_t0"]),
      float(kd.kd_teacher_losses(student, teacher, s1)["loss_kd_cls_t0"]),
      rtol=1e-6,
  )


def _tiny(**kw):
  cfg = dict(
      num_classes=2,
      backbone_width=8,
      deconv_channels=(8, 8, 8),
      max_detections=5,
      tensor_dim=4,
      use_deform=False,
  )
  cfg.update(kw)
  return M.build_onestage_model(cfg)


def test_model_reads_the_batch_crowd_boxes():
  """model.targets turns the batch's crowd rows into hm_ignore; the training heatmap loss (focal
  and MSE) equals the numpy reference on the model's own maps."""
  rng = np.random.RandomState(0)
  batch = M.dummy_batch(2, (64, 64), max_boxes=4)
  batch["image"] = rng.randint(0, 255, batch["image"].shape).astype(np.uint8)
  batch["gt_boxes"][0, :2] = [[4, 4, 20, 28], [24, 36, 56, 60]]
  batch["gt_classes"][0, :2] = [1, 0]
  batch["gt_valid"][0, 0] = True
  batch["gt_crowd"][0, 1] = True
  model, mse_model = _tiny(), _tiny(hm_loss="mse")
  variables = M.init_variables(model)
  no_crowd = {k: v for k, v in batch.items() if k != "gt_crowd"}

  @jax.jit
  def run(v, b, b_plain):
    gt = model.apply(v, b, method=M.CenterNetOneStage.targets)
    maps = model.apply(v, b["image"], b["image_hw"], method="dense_outputs")
    losses = [m.apply(v, x, train=True, bn_train=False) for m, x in ((model, b), (model, b_plain))]
    return gt, maps, losses + [mse_model.apply(v, b, train=True, bn_train=False)]

  gt, maps, (focal, plain, mse) = run(variables, batch, no_crowd)
  ign = np.asarray(gt["hm_ignore"])
  assert ign[0, 9:15, 6:14, 0].all() and ign.sum() == 6 * 8
  heat, cls = np.asarray(gt["score_map"]), np.asarray(maps["cls"])
  np.testing.assert_allclose(float(focal["loss_cls"]), ref_focal(cls, heat, ign), rtol=1e-4)
  assert float(plain["loss_cls"]) > float(focal["loss_cls"])
  np.testing.assert_allclose(float(mse["loss_cls"]), ref_masked_mse(cls, heat, ign), rtol=1e-5)
  assert float(mse["aux/num_pos"]) == float(focal["aux/num_pos"]) == 1.0
  for key in ("loss_box_wh", "loss_off_reg"):
    assert float(mse[key]) == float(focal[key])


# -------------------------------------------------------------------------------- CrowdHuman
_REC = {
    "ID": "img_a",
    "gtboxes": [
        {"tag": "person", "vbox": [1, 2, 20, 30], "fbox": [0, 0, 22, 40], "extra": {}},
        {"tag": "person", "vbox": [30, 4, 10, 20], "fbox": [28, 2, 14, 30], "extra": {"ignore": 0}},
        {"tag": "person", "vbox": [44, 6, 12, 24], "fbox": [42, 4, 14, 30], "extra": {"ignore": 1}},
        {"tag": "mask", "vbox": [2, 34, 20, 10], "fbox": [2, 34, 20, 10], "extra": {"ignore": 1}},
        {"tag": "mask", "fbox": [40, 36, 10, 8], "extra": {"ignore": 1}},  # no vbox: fbox is used
    ],
}
_REC_ONLY_IGNORED = {
    "ID": "img_b",
    "gtboxes": [
        {"tag": "person", "vbox": [5, 5, 20, 20], "fbox": [5, 5, 20, 20], "extra": {"ignore": 1}},
        {"tag": "mask", "vbox": [30, 5, 10, 10], "fbox": [30, 5, 10, 10], "extra": {"ignore": 1}},
    ],
}


def _write_odgt(root, recs):
  os.makedirs(os.path.join(root, "Images"), exist_ok=True)
  for split in ("train", "val"):
    with open(os.path.join(root, f"annotation_{split}.odgt"), "w") as f:
      f.write("".join(json.dumps(r) + "\n" for r in recs))
  for r in recs:
    Image.new("RGB", (64, 48), (90, 90, 90)).save(os.path.join(root, "Images", f"{r['ID']}.jpg"))


def test_crowdhuman_ignore_as_parse(tmp_path):
  path = tmp_path / "a.odgt"
  path.write_text("\n".join(json.dumps(r) for r in (_REC, _REC_ONLY_IGNORED)))
  ign = crowdhuman.parse_crowdhuman(str(path), "vbox")
  assert [len(im.boxes) for im in ign] == [5, 2]
  assert ign[0].ignore.tolist() == [False, False, True, True, True]
  assert ign[1].ignore.tolist() == [True, True]
  per = crowdhuman.parse_crowdhuman(str(path), "vbox", ignore_as="person")
  assert [len(im.boxes) for im in per] == [3, 1]
  assert not per[0].ignore.any() and not per[1].ignore.any()
  np.testing.assert_array_equal(per[0].boxes, [[1, 2, 21, 32], [30, 4, 40, 24], [44, 6, 56, 30]])
  np.testing.assert_array_equal(per[1].boxes, [[5, 5, 25, 25]])
  with pytest.raises(ValueError, match="ignore_as"):
    crowdhuman.parse_crowdhuman(str(path), ignore_as="drop")


def test_crowdhuman_ignore_as_config_is_checked():
  cfg = base_config()
  cfg.data.crowdhuman_ignore_as = "persons"
  with pytest.raises(ConfigError, match="data.crowdhuman_ignore_as"):
    validate_config(cfg)


def _train_batch(tmp_path, root, **data):
  cfg = base_config()
  cfg.data.data_dir = str(tmp_path / "tfds")
  cfg.data.num_workers = 0
  cfg.data.dataset = "crowdhuman"
  cfg.data.root = root
  for k, v in data.items():
    cfg.data[k] = v
  cfg = validate_config(cfg)
  b = app.prepare_dataset(cfg, str(tmp_path / "run"))
  settings = P.TrainLoaderSettings(
      batch_size=2, short_sizes=(48,), max_size=1000, max_boxes=8, filter_empty=False, seed=1
  )
  batch = next(P.make_train_loader(P.open_split(b, "train"), settings))
  return b, {int(i): j for j, i in enumerate(batch["image_id"])}, batch


def test_crowdhuman_ignore_counts_through_the_train_loader(tmp_path):
  root = str(tmp_path / "CH")
  _write_odgt(root, (_REC, _REC_ONLY_IGNORED))
  b, row, batch = _train_batch(tmp_path, root)
  assert os.path.basename(os.path.dirname(os.fspath(b.data_dir))) == "crowdhuman-vbox"
  valid, crowd = batch["gt_valid"], batch["gt_crowd"]
  assert (valid[row[1]].sum(), crowd[row[1]].sum()) == (2, 3)
  assert (valid[row[2]].sum(), crowd[row[2]].sum()) == (0, 2)
  # the crowd rows reach the one-stage targets as ignore regions (class 0 = person)
  t = batch_targets(
      batch["gt_boxes"],
      batch["gt_classes"],
      batch["gt_valid"],
      batch["gt_crowd"] & ~batch["gt_valid"],
      out_hw=(batch["image"].shape[1] // 4, batch["image"].shape[2] // 4),
      num_classes=1,
      down_scale=4,
  )
  assert float(np.asarray(t["hm_ignore"])[row[2]].sum()) > 0

  # centerX's reading: the ignored person is a person, the mask regions are gone
  b2, row2, batch2 = _train_batch(tmp_path, root, crowdhuman_ignore_as="person")
  assert os.path.basename(os.path.dirname(os.fspath(b2.data_dir))) == "crowdhuman-vbox-persons"
  assert (batch2["gt_valid"][row2[1]].sum(), batch2["gt_crowd"][row2[1]].sum()) == (3, 0)
  assert (batch2["gt_valid"][row2[2]].sum(), batch2["gt_crowd"][row2[2]].sum()) == (1, 0)
  # one data.name for both readings: the conversion is remade when the option changes
  _, row3, batch3 = _train_batch(tmp_path, root, name="ch")
  assert batch3["gt_crowd"][row3[1]].sum() == 3
  _, row4, batch4 = _train_batch(tmp_path, root, name="ch", crowdhuman_ignore_as="person")
  assert batch4["gt_crowd"][row4[1]].sum() == 0 and batch4["gt_valid"][row4[1]].sum() == 3
