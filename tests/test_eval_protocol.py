"""eval.protocol ('official' | 'centerx', cn2_jax/evaluation/protocol.py) and the WIDER FACE kit
writer (evaluation/wider_eval.py): one tiny hand-made case per difference between the
protocols, where they give different numbers.  The expected APs are worked out by hand below
from COCOeval's definition (101 recall points 0, 0.01, ..., 1; precision made monotone from the
right; AP = mean over the points; AP = mean of the 10 IoU thresholds 0.5:0.95)."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cn2_jax import app
from cn2_jax.config import base_config, validate_config
from cn2_jax.data import sources
from cn2_jax.data.datasets import crowdhuman
from cn2_jax.errors import ConfigError
from cn2_jax.evaluation import crowdhuman_eval, protocol, wider_eval
from cn2_jax.evaluation.coco_eval import CocoEvaluator
from cn2_jax.modeling.onestage import decode as decode_lib

W, H = 100, 80  # every test image


def _recall_points(recall_step_precisions):
  """COCO AP of a PR curve given as [(recall reached, interpolated precision up to it)]."""
  points = np.linspace(0.0, 1.0, 101)
  total = 0.0
  for r in points:
    prec = [p for reach, p in recall_step_precisions if r <= reach + 1e-12]
    total += max(prec) if prec else 0.0
  return total / 101


# ----------------------------------------------------------------------------------------------
# CrowdHuman: ground truth as centerX builds it (differences 3 and 4 of protocol.py)
# ----------------------------------------------------------------------------------------------
def _person(box, ignore=0):
  return {"tag": "person", "vbox": box, "fbox": box, "hbox": box, "extra": {"ignore": ignore}}


def _mask(box):
  return {"tag": "mask", "vbox": box, "fbox": box, "hbox": box, "extra": {"ignore": 1}}


def _convert(tmp_path, records):
  """The project's conversion of a hand-made odgt file (split 'val'): the converted json."""
  root = tmp_path / "crowd"
  (root / "Images").mkdir(parents=True)
  for rec in records:
    Image.new("RGB", (W, H)).save(root / "Images" / f"{rec['ID']}.jpg")
  odgt = root / "annotation_val.odgt"
  odgt.write_text("".join(json.dumps(rec) + "\n" for rec in records))
  out = sources.convert_dataset(
      crowdhuman.FORMAT,
      {"val": (str(odgt), str(root / "Images"))},
      str(tmp_path / "converted"),
      box="vbox",
      num_threads=1,
  )
  return out["val"][0]


def _aps(ann, detections):
  """{protocol: AP50} of `detections` {image ID: [(x, y, w, h, score)]} on the converted json."""
  with open(ann) as f:
    ids = {image["file_name"][: -len(".jpg")]: image["id"] for image in json.load(f)["images"]}
  out = {}
  for proto in protocol.PROTOCOLS:
    ev = protocol.make_evaluator("crowdhuman", ann, [1], proto, verbose=False)
    for name, dets in detections.items():
      boxes = np.array([[x, y, x + w, y + h] for x, y, w, h, _ in dets], np.float64)
      scores = np.array([d[4] for d in dets], np.float64)
      ev.add([ids[name]], boxes[None], scores[None], np.zeros((1, len(dets)), int),
             np.ones((1, len(dets)), bool))  # fmt: skip
    out[proto] = ev.evaluate()["AP50"]
  return out


def test_crowdhuman_mask_region_is_a_false_positive_only_for_centerx(tmp_path):
  ann = _convert(tmp_path, [{"ID": "a", "gtboxes": [_person([10, 10, 30, 40]),
                                                    _mask([60, 10, 30, 40])]}])  # fmt: skip
  aps = _aps(ann, {"a": [(60, 10, 30, 40, 0.9), (10, 10, 30, 40, 0.8)]})
  # official: the detection on the mask region is ignored (crowd), the person found: AP 1.
  # centerx: the mask region is no ground truth: FP (0.9) then TP (0.8), precision 1/2 at recall 1.
  assert aps["official"] == pytest.approx(1.0)
  assert aps["centerx"] == pytest.approx(0.5)


def test_crowdhuman_image_without_persons_is_dropped_only_for_centerx(tmp_path):
  ann = _convert(
      tmp_path,
      [
          {"ID": "a", "gtboxes": [_person([10, 10, 30, 40])]},
          {"ID": "b", "gtboxes": [_mask([10, 10, 20, 20])]},  # no person
      ],
  )
  gt = crowdhuman_eval.centerx_crowdhuman_gt(ann)
  assert [image["file_name"] for image in gt["images"]] == ["a.jpg"]
  aps = _aps(ann, {"a": [(10, 10, 30, 40, 0.8)], "b": [(50, 40, 20, 20, 0.95)]})
  # official: image b is evaluated, its detection (off the mask) is a FP ranked first: 1/2.
  # centerx: image b is not evaluated: AP 1.
  assert aps["official"] == pytest.approx(0.5)
  assert aps["centerx"] == pytest.approx(1.0)


def test_crowdhuman_extra_ignore_person_is_a_person_for_centerx(tmp_path):
  ann = _convert(tmp_path, [{"ID": "c", "gtboxes": [_person([10, 10, 30, 40]),
                                                    _person([60, 10, 30, 40], ignore=1)]}])  # fmt: skip
  aps = _aps(ann, {"c": [(10, 10, 30, 40, 0.9), (40, 50, 10, 10, 0.8), (60, 10, 30, 40, 0.7)]})
  # official: 1 person; TP, FP, (ignored): recall 1 at precision 1: AP 1.
  # centerx: 2 persons; TP, FP, TP: precision 1 up to recall 1/2, then 2/3 up to recall 1.
  assert aps["official"] == pytest.approx(1.0)
  assert aps["centerx"] == pytest.approx(_recall_points([(0.5, 1.0), (1.0, 2 / 3)]))
  assert aps["centerx"] == pytest.approx((51 + 50 * 2 / 3) / 101)


def test_crowdhuman_boxes_of_one_pixel_or_less_are_dropped_for_centerx(tmp_path):
  ann = _convert(tmp_path, [{"ID": "d", "gtboxes": [_person([10, 10, 30, 40]),
                                                    _person([60, 10, 0.8, 40])]}])  # fmt: skip
  gt = crowdhuman_eval.centerx_crowdhuman_gt(ann)
  assert [a["bbox"] for a in gt["annotations"]] == [[10.0, 10.0, 30.0, 40.0]]
  aps = _aps(ann, {"d": [(10, 10, 30, 40, 0.9)]})
  # official: the 0.8 px wide person is ground truth and missed: recall 1/2 at precision 1.
  assert aps["official"] == pytest.approx(51 / 101)
  assert aps["centerx"] == pytest.approx(1.0)


def test_centerx_crowdhuman_boxes_by_hand():
  rec = {
      "ID": "x",
      "gtboxes": [
          _person([-5, 10, 30, 40]),  # x1 clipped to 0
          _person([90, 70, 30, 40]),  # x2 -> 100, y2 -> 80
          _person([99.5, 10, 10, 10]),  # 0.5 px wide after clipping: dropped
          _mask([0, 0, 50, 50]),
          _person([10, 10, 30, 40], ignore=1),  # extra.ignore is not read
      ],
  }
  got = crowdhuman_eval.centerx_crowdhuman_boxes(rec, "vbox", H, W)
  np.testing.assert_allclose(got, [[0, 10, 25, 50], [90, 70, 100, 80], [10, 10, 40, 50]])


# ----------------------------------------------------------------------------------------------
# Decode and mapping to the original image (differences 1 and 2)
# ----------------------------------------------------------------------------------------------
def _coco_gt(boxes_xywh):
  return {
      "images": [{"id": 1, "file_name": "1.jpg", "height": H, "width": W}],
      "annotations": [
          {"id": i + 1, "image_id": 1, "category_id": 1, "bbox": list(b), "iscrowd": 0,
           "area": b[2] * b[3]}
          for i, b in enumerate(boxes_xywh)
      ],
      "categories": [{"id": 1, "name": "thing"}],
  }  # fmt: skip


def _evaluate(proto, gt, boxes_resized, scores, image_hw=(40, 50)):
  """AP metrics of detections given in resized-image pixels (`image_hw`, original H x W) after
  the protocol's mapping to the original image (`app._to_original_image`)."""
  k = len(scores)
  dets = {
      "boxes": np.asarray(boxes_resized, np.float32)[None],
      "scores": np.asarray(scores, np.float32)[None],
      "classes": np.zeros((1, k), np.int32),
      "valid": np.ones((1, k), bool),
  }
  batch = {"image_hw": np.array([image_hw], np.int32), "orig_hw": np.array([[H, W]], np.int32)}
  out = app._to_original_image(proto, dets, batch)
  ev = CocoEvaluator(gt, [1], verbose=False)
  ev.add([1], out["boxes"], out["scores"], out["classes"], out["valid"])
  return ev.evaluate(), out


def test_boxes_are_clipped_to_the_image_only_by_the_official_protocol():
  gt = _coco_gt([[80, 20, 20, 40]])  # touches the right edge (W = 100)
  # resized image 40 x 50 = half the original: [40, 10, 60, 30] -> [80, 20, 120, 60] originally
  official, out_o = _evaluate("official", gt, [[40, 10, 60, 30]], [0.9])
  centerx, out_c = _evaluate("centerx", gt, [[40, 10, 60, 30]], [0.9])
  np.testing.assert_allclose(out_o["boxes"][0, 0], [80, 20, 100, 60])
  np.testing.assert_allclose(out_c["boxes"][0, 0], [80, 20, 120, 60])
  # official: IoU 1 at every threshold. centerx: IoU = 20 * 40 / (40 * 40) = 0.5: a TP at the
  # 0.5 threshold only (1 of 10): AP 0.1, AP50 1, AP75 0.
  assert official["AP"] == pytest.approx(1.0) and official["AP75"] == pytest.approx(1.0)
  assert centerx["AP"] == pytest.approx(0.1)
  assert centerx["AP50"] == pytest.approx(1.0) and centerx["AP75"] == pytest.approx(0.0)


def test_empty_boxes_are_dropped_only_by_the_official_protocol():
  gt = _coco_gt([[10, 10, 30, 40]])
  # an inverted box (x2 < x1 and y2 < y1) scored first, then a box on the GT (resized pixels)
  boxes = [[30, 30, 20, 10], [5, 5, 20, 25]]
  official, out_o = _evaluate("official", gt, boxes, [0.9, 0.8])
  centerx, out_c = _evaluate("centerx", gt, boxes, [0.9, 0.8])
  assert out_o["valid"][0].tolist() == [False, True]
  assert out_c["valid"][0].tolist() == [True, True]
  np.testing.assert_allclose(out_c["boxes"][0, 0], [60, 60, 40, 20])
  # centerx: the inverted box (COCO w, h < 0) overlaps nothing: FP then TP: precision 1/2.
  assert official["AP"] == pytest.approx(1.0)
  assert centerx["AP"] == pytest.approx(0.5)


def _onestage_model_config():
  cfg = base_config()
  cfg.model.arch = "onestage"
  return validate_config(cfg).model


def test_centerx_protocol_decodes_without_the_wh_clamp():
  model = _onestage_model_config()
  assert model.onestage.clamp_wh  # the project's default
  evaluated = protocol.eval_model_config(model, "centerx")
  assert not evaluated.onestage.clamp_wh
  assert model.onestage.clamp_wh  # the run's config is not changed
  assert protocol.eval_model_config(model, "official") is model
  # A 1-class 4 x 4 heatmap (input 16 x 16, stride 4) with two peaks; the stronger one predicts a
  # negative width and height.
  heat = np.zeros((1, 4, 4, 1), np.float32)
  heat[0, 1, 1, 0], heat[0, 2, 3, 0] = 0.9, 0.8
  wh = np.zeros((1, 4, 4, 2), np.float32)
  wh[0, 1, 1] = (-2.0, -1.0)
  wh[0, 2, 3] = (2.0, 2.0)
  # The second peak: center (3.5, 2.5) (no reg head: + 0.5), w = h = 2 -> [2.5, 1.5, 4.5, 3.5]
  # feature units = [10, 6, 18, 14] input pixels = [20, 12, 36, 28] original (twice the input).
  gt = _coco_gt([[20, 12, 16, 16]])
  aps = {}
  for proto in protocol.PROTOCOLS:
    m = protocol.eval_model_config(model, proto)
    d = decode_lib.decode(
        jnp.asarray(heat), jnp.asarray(wh), None, k=2, down_scale=4.0,
        clamp_wh=m.onestage.clamp_wh,
    )  # fmt: skip
    boxes = np.asarray(d["boxes"])[0]
    # The first peak: center (1.5, 1.5), w = -2, h = -1 -> [2.5, 2, 0.5, 1] x 4; clamped w = h = 0.
    np.testing.assert_allclose(boxes[0], [10, 8, 2, 4] if proto == "centerx" else [6, 6, 6, 6])
    np.testing.assert_allclose(boxes[1], [10, 6, 18, 14])
    metrics, _ = _evaluate(proto, gt, boxes, np.asarray(d["scores"])[0], (40, 50))
    aps[proto] = metrics["AP"]
  # official: the zero-size box is dropped: AP 1. centerx: the inverted box is a FP ranked first.
  assert aps == pytest.approx({"official": 1.0, "centerx": 0.5})


# ----------------------------------------------------------------------------------------------
# Settings and the WIDER FACE kit writer
# ----------------------------------------------------------------------------------------------
def test_settings_are_checked():
  cfg = base_config()
  cfg.eval.protocol = "centerX"
  with pytest.raises(ConfigError, match="eval.protocol"):
    validate_config(cfg)
  cfg = base_config()
  cfg.eval.protocol = "centerx"
  assert validate_config(cfg).eval.protocol == "centerx"


def test_wider_kit_files(tmp_path):
  coco = {
      "images": [
          {"id": 1, "file_name": "0--Parade/0_Parade_1.jpg"},
          {"id": 2, "file_name": "0--Parade/0_Parade_2.jpg"},
          {"id": 3, "file_name": "12--Group/12_Group_7.jpg"},
          {"id": 4, "file_name": "no_event.jpg"},
      ],
      "categories": [{"id": 1, "name": "face"}],
  }
  results = [
      {"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5},
      {"image_id": 1, "category_id": 1, "bbox": [10.25, 20.5, 30, 40.125], "score": 0.75},
      {"image_id": 3, "category_id": 1, "bbox": [5, 6, 7, 8], "score": 0.25},
      {"image_id": 4, "category_id": 1, "bbox": [5, 6, 7, 8], "score": 0.25},
  ]
  pred = wider_eval.pred_from_coco(coco, results, [1, 2, 3, 4])
  assert sorted(pred) == [("0--Parade", "0_Parade_1"), ("0--Parade", "0_Parade_2"),
                          ("12--Group", "12_Group_7")]  # fmt: skip
  assert wider_eval.write_pred_dir(tmp_path, pred) == 3
  assert (tmp_path / "0--Parade" / "0_Parade_1.txt").read_text() == (
      "0_Parade_1\n2\n10.250 20.500 30.000 40.125 0.75000\n1.000 2.000 3.000 4.000 0.50000\n"
  )
  assert (tmp_path / "0--Parade" / "0_Parade_2.txt").read_text() == "0_Parade_2\n0\n"
  assert (tmp_path / "12--Group" / "12_Group_7.txt").read_text() == (
      "12_Group_7\n1\n5.000 6.000 7.000 8.000 0.25000\n"
  )
  back = wider_eval.read_pred_dir(tmp_path)
  np.testing.assert_allclose(back[("0--Parade", "0_Parade_1")][:, 4], [0.75, 0.5])
  assert back[("0--Parade", "0_Parade_2")].shape == (0, 5)
  assert sorted(os.listdir(tmp_path)) == ["0--Parade", "12--Group"]


# ----------------------------------------------------------------------------------------------
# Through app.evaluate (model replaced by a stub, as tests/test_crowdhuman_eval.py does)
# ----------------------------------------------------------------------------------------------
def _stub_eval_step(model, mesh):
  """Per image: the whole image plus 10 px beyond its right edge (score .9, or .95 on a white
  image) and the box (1, 1, 6, 6) (.8, or .7 on a white image)."""
  del model, mesh

  def step(variables, batch):
    del variables
    hw = np.asarray(batch["image_hw"])
    white = np.asarray(batch["image"]).reshape(hw.shape[0], -1).mean(axis=1) > 100
    boxes = np.zeros((hw.shape[0], 2, 4), np.float32)
    boxes[:, 0, 2] = hw[:, 1] + 10
    boxes[:, 0, 3] = hw[:, 0]
    boxes[:, 1] = (1, 1, 6, 6)
    scores = np.where(white[:, None], [[0.95, 0.7]], [[0.9, 0.8]]).astype(np.float32)
    return dict(boxes=boxes, scores=scores, classes=np.zeros((hw.shape[0], 2), np.int32),
                valid=np.ones((hw.shape[0], 2), bool))  # fmt: skip

  return step


def _stub_config(monkeypatch):
  monkeypatch.setattr(app.detector, "build_model", lambda m: None)
  monkeypatch.setattr(app.step_lib, "make_eval_step", _stub_eval_step)
  cfg = base_config()
  cfg.compilation_cache_dir = ""
  cfg.model.num_classes = 1
  cfg.data.num_workers = 0
  cfg.data.min_size_test = 48
  cfg.data.max_size_test = 1000
  cfg.data.train_split = ""
  cfg.train.eval_batch_size = 2
  return cfg


def test_app_evaluate_follows_the_protocol(tmp_path, monkeypatch):
  root = tmp_path / "CrowdHuman"
  (root / "Images").mkdir(parents=True)
  recs = [
      {"ID": "a", "gtboxes": [_person([0, 0, 64, 48]), _mask([0, 0, 8, 8])]},
      {"ID": "b", "gtboxes": [_mask([10, 10, 20, 20])]},  # no person; a white image
  ]
  (root / "annotation_val.odgt").write_text("".join(json.dumps(r) + "\n" for r in recs))
  Image.new("RGB", (64, 48)).save(root / "Images" / "a.jpg")
  Image.new("RGB", (64, 48), (255, 255, 255)).save(root / "Images" / "b.jpg")
  cfg = _stub_config(monkeypatch)
  cfg.data.dataset = "crowdhuman"
  cfg.data.root = str(root)
  cfg.data.data_dir = str(tmp_path / "tfds")
  got = {}
  for proto in protocol.PROTOCOLS:
    cfg.eval.protocol = proto
    wd = str(tmp_path / proto)
    metrics = app.evaluate(cfg, wd, variables={})
    with open(os.path.join(wd, "eval", "metrics.json")) as f:
      written = json.load(f)
    with open(os.path.join(wd, "eval", "coco_results.json")) as f:
      widths = sorted({r["bbox"][2] for r in json.load(f)})
    got[proto] = (metrics["AP50"], written["num_images"], widths)
  # official: b's whole-image box (.95) is a FP, a's (.9) the TP, a's small box on the mask region
  # ignored: AP50 1/2 on 2 images; boxes clipped to the 64 px width.
  assert got["official"] == (pytest.approx(0.5), 2, [5.0, 64.0])
  # centerx: b not evaluated; a's whole-image box (IoU 64/74) the TP ranked before the FP on the
  # mask region: AP50 1 on 1 image; the box 10 px beyond the image is kept.
  assert got["centerx"] == (pytest.approx(1.0), 1, [5.0, 74.0])


def test_app_evaluate_writes_wider_kit_files(tmp_path, monkeypatch):
  root = tmp_path / "WIDER"
  split_dir = root / "wider_face_split"
  split_dir.mkdir(parents=True)
  (split_dir / "wider_face_val_bbx_gt.txt").write_text(
      "0--Parade/0_Parade_1.jpg\n1\n0 0 64 48 0 0 0 0 0 0\n"
      "1--Handshaking/1_Hand_2.jpg\n1\n1 1 5 5 0 0 0 0 0 0\n"
  )
  for name in ("0--Parade/0_Parade_1.jpg", "1--Handshaking/1_Hand_2.jpg"):
    path = root / "WIDER_val" / "images" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48)).save(path)
  cfg = _stub_config(monkeypatch)
  cfg.data.dataset = "wider_face"
  cfg.data.root = str(root)
  cfg.data.data_dir = str(tmp_path / "tfds")
  cfg.eval.wider_pred_dir = str(tmp_path / "kit")
  app.evaluate(cfg, str(tmp_path / "run"), variables={})
  pred = wider_eval.read_pred_dir(tmp_path / "kit")
  assert sorted(pred) == [("0--Parade", "0_Parade_1"), ("1--Handshaking", "1_Hand_2")]
  lines = (tmp_path / "kit" / "0--Parade" / "0_Parade_1.txt").read_text().splitlines()
  assert lines == ["0_Parade_1", "2", "0.000 0.000 64.000 48.000 0.90000",
                   "1.000 1.000 5.000 5.000 0.80000"]  # fmt: skip
