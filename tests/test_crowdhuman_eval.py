"""CrowdHuman metrics (cn2_jax/evaluation/crowdhuman_eval.py) on hand-computed cases written as
tiny odgt files here, and their place in app.evaluate's metrics.json."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from cn2_jax.evaluation import crowdhuman_eval as CH

SIZE = 100  # every image is 100 x 100


def person(xywh, ignore=0):
  return {"tag": "person", "fbox": list(xywh), "extra": {"box_id": 0, "ignore": ignore}}


def mask(xywh):
  return {"tag": "mask", "fbox": list(xywh), "extra": {"ignore": 1}}


def det(xywh, score):
  return {"box": list(xywh), "score": score, "tag": 1}


def write_odgt(tmp_path, gt, dt):
  """gt: {ID: [gtboxes]}, dt: {ID: [dtboxes]} -> (gt path, results path) in the official
  formats (the results carry the image size, as the toolkit's do)."""
  g, d = tmp_path / "gt.odgt", tmp_path / "dt.odgt"
  g.write_text("".join(json.dumps({"ID": k, "gtboxes": v}) + "\n" for k, v in gt.items()))
  d.write_text(
      "".join(
          json.dumps({"ID": k, "height": SIZE, "width": SIZE, "dtboxes": dt.get(k, [])}) + "\n"
          for k in gt
      )
  )
  return str(g), str(d)


# ------------------------------------------------------------------------------------------------
# AP and MR^-2
# ------------------------------------------------------------------------------------------------
def test_ap_and_mr_hand_computed_over_ten_images(tmp_path):
  """10 images, one person each (G = 10); 13 scored detections whose TP/FP sequence in score order
  is T T T F T F T F F T F F T, plus one detection on a mask region (ignored: not an FP)."""
  gt = {f"img{i}": [person((10, 10, 20, 40))] for i in range(10)}
  gt["img9"].append(mask((60, 0, 30, 30)))
  hit, miss = (10, 10, 20, 40), (60, 60, 20, 20)
  seq = [  # (image, box, score) in decreasing score order
      (0, hit, 0.99),
      (1, hit, 0.98),
      (2, hit, 0.97),
      (0, miss, 0.96),
      (3, hit, 0.95),
      (1, miss, 0.94),
      (4, hit, 0.93),
      (2, miss, 0.92),
      (3, miss, 0.91),
      (5, hit, 0.90),
      (4, miss, 0.89),
      (5, miss, 0.88),
      (6, hit, 0.87),
  ]
  dt = {}
  for i, box, s in seq:
    dt.setdefault(f"img{i}", []).append(det(box, s))
  dt["img9"] = [det((65, 5, 10, 10), 0.965)]  # inside the mask region
  m = CH.evaluate_odgt(*write_odgt(tmp_path, gt, dt))
  assert (m["num_images"], m["num_gt"], m["num_ignore"]) == (10, 10, 1)

  # recall / precision after each TP/FP detection; AP = trapezoids between consecutive points
  # (only the steps where recall grows contribute; no (0, 1) starting point)
  ap = (
      0.1 * (1 + 1) / 2  # det 2: recall .1 -> .2, precision 1 -> 1
      + 0.1 * (1 + 1) / 2  # det 3
      + 0.1 * (3 / 4 + 4 / 5) / 2  # det 5: precision 3/4 (after the FP) -> 4/5
      + 0.1 * (4 / 6 + 5 / 7) / 2  # det 7
      + 0.1 * (5 / 9 + 6 / 10) / 2  # det 10
      + 0.1 * (6 / 12 + 7 / 13) / 2  # det 13
  )
  assert m["AP50"] == pytest.approx(ap, abs=1e-9)

  # FPPI = FP / 10 images. Reference .01, .0178, .0316, .0562, .1 -> the first FP (fppi .1):
  # 3 TP, miss rate .7; .1778 -> 2nd FP (.2): .6; .3162 -> 4th FP (.4): .5; .5623 -> 6th FP (.6):
  # .4; 1.0 is never reached -> the last detection: 7 TP, miss rate .3.
  rates = [0.7] * 5 + [0.6, 0.5, 0.4, 0.3]
  assert m["MR-2"] == pytest.approx(math.exp(np.mean(np.log(rates))), abs=1e-9)


def test_ignore_rules_of_the_caltech_matching(tmp_path):
  gt = {
      "a": [
          person((0, 0, 10, 20)),  # A
          person((50, 0, 10, 20)),  # B
          mask((0, 60, 40, 40)),  # M
          person((70, 70, 20, 20), ignore=1),  # extra.ignore = 1
      ]
  }
  dt = {
      "a": [
          det((0, 0, 10, 20), 0.9),  # A: TP
          det((5, 65, 10, 10), 0.8),  # inside M (IoA 1): ignored
          det((80, 30, 10, 10), 0.7),  # nothing there: FP
          det((72, 72, 10, 10), 0.6),  # inside the ignored person: ignored
          det((0, 0, 10, 20), 0.5),  # A again, already matched: FP (not absorbed by anything)
          det((30, 60, 20, 10), 0.4),  # half inside M (IoA exactly .5, not > .5): FP
          det((50, 0, 10, 20), 0.3),  # B: TP
      ]
  }
  m = CH.evaluate_odgt(*write_odgt(tmp_path, gt, dt))
  # list T F F F T, G = 2: recall .5 .5 .5 .5 1, precision 1 .5 1/3 .25 .4
  assert m["AP50"] == pytest.approx(0.5 * (0.25 + 0.4) / 2, abs=1e-9)
  # one image: the first FP already has fppi 1 >= every reference point: miss rate .5 at all 9
  assert m["MR-2"] == pytest.approx(0.5, abs=1e-9)
  assert (m["num_gt"], m["num_ignore"]) == (2, 2)

  scores, tp = CH.match_image(
      CH.EvalImage(
          gt_boxes=[[0, 0, 10, 20]], gt_ignore=[False], dt_boxes=[[0, 10, 10, 30]], dt_scores=[1]
      )
  )  # IoU = 100 / 300: FP
  assert tp.tolist() == [False]
  # no detections at all: AP 0, MR^-2 1 (the toolkit has no value there)
  m0 = CH.evaluate_odgt(*write_odgt(tmp_path, gt, {}))
  assert (m0["AP50"], m0["MR-2"], m0["JI"]) == (0.0, 1.0, 0.0)


def test_boxes_are_clipped_as_the_toolkit_clips_them():
  np.testing.assert_array_equal(
      CH.clip_boxes([[-5, -5, 120, 130], [100, 100, 120, 120]], 100, 100),
      [[0, 0, 100, 100], [99, 99, 100, 100]],
  )
  # a GT leaving the image matches the detection clipped the same way
  img = CH.EvalImage(
      gt_boxes=[[50, 0, 150, 100]], gt_ignore=[False], dt_boxes=[[50, 0, 100, 100]], dt_scores=[1]
  )
  assert CH.match_image(img)[1].tolist() == [False]  # image size unknown: IoU .5, not > .5
  img.height = img.width = 100.0
  assert CH.match_image(img)[1].tolist() == [True]


# ------------------------------------------------------------------------------------------------
# JI
# ------------------------------------------------------------------------------------------------
def test_ji_hand_computed(tmp_path):
  gt = {
      "one": [person((0, 0, 20, 40)), person((15, 0, 20, 40)), mask((60, 60, 40, 40))],
      "two": [
          person((10, 10, 20, 20)),  # missed, but inside the ignored person below: not counted
          person((0, 0, 50, 50), ignore=1),
          person((60, 60, 20, 20)),
      ],
      "three": [],  # no GT, no detection: not in the mean
  }
  dt = {
      "one": [
          det((2, 0, 20, 40), 0.9),  # IoU .818 with the 1st person (.212 with the 2nd)
          det((14, 0, 20, 40), 0.9),  # IoU .905 with the 2nd person
          det((65, 65, 10, 10), 0.9),  # on the mask region: not counted
          det((0, 70, 10, 10), 0.35),  # a false positive above threshold .3 only
      ],
      "two": [det((60, 60, 20, 20), 0.95)],
  }
  g, d = write_odgt(tmp_path, gt, dt)
  images = [
      CH.EvalImage(b, ig, r["boxes"], r["scores"], SIZE, SIZE)
      for (b, ig), r in zip(CH.load_odgt_gt(g).values(), CH.load_odgt_results(d).values())
  ]
  ji, per = CH.jaccard_index(images)
  # t <= .3: image one k=2, m=2, n=3 -> 2/3; image two k=1, m=1, n=1 -> 1; mean over 2 images
  for i in range(4):
    assert per[0.1 * i] == pytest.approx((2 / 3 + 1) / 2, abs=1e-5)
  for i in range(4, 9):  # the false positive is gone: 1 and 1
    assert per[0.1 * i] == pytest.approx(1.0, abs=1e-5)
  assert per[0.1 * 9] == pytest.approx(0.5, abs=1e-5)  # scores must exceed .9: image one 0
  assert ji == pytest.approx(1.0, abs=1e-5)
  assert CH.evaluate_odgt(g, d)["JI"] == pytest.approx(1.0, abs=1e-5)


def test_ji_uses_a_maximum_weight_matching():
  # D1 overlaps P1 (IoU 7/13) and P2 (9/11), D2 only P2 (9/11): a greedy IoU matcher could give
  # D1-P2 and leave 1 match; the maximum-weight matching takes D1-P1 + D2-P2.
  img = CH.EvalImage(
      gt_boxes=[[0, 0, 10, 10], [4, 0, 14, 10]],
      gt_ignore=[False, False],
      dt_boxes=[[3, 0, 13, 10], [5, 0, 15, 10]],
      dt_scores=[0.9, 0.8],
      height=SIZE,
      width=SIZE,
  )
  ji, _ = CH.jaccard_index([img])
  assert ji == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------------------------------------
# COCO files (the converted dataset) and app.evaluate
# ------------------------------------------------------------------------------------------------
def test_metrics_from_coco_equal_the_odgt_path(tmp_path):
  boxes = [((0, 0, 10, 20), 0), ((50, 0, 10, 20), 0), ((0, 60, 40, 40), 1), ((70, 70, 20, 20), 1)]
  gt = {"a": [person(b) if not c else mask(b) for b, c in boxes]}
  dets = [((0, 0, 10, 20), 0.9), ((5, 65, 10, 10), 0.8), ((80, 30, 10, 10), 0.7)]
  dets += [((50, 0, 10, 20), 0.3)]
  want = CH.evaluate_odgt(*write_odgt(tmp_path, gt, {"a": [det(b, s) for b, s in dets]}))
  coco = {
      "images": [{"id": 7, "file_name": "a.jpg", "height": SIZE, "width": SIZE}],
      "annotations": [
          {"id": k + 1, "image_id": 7, "category_id": 1, "bbox": list(b), "iscrowd": c}
          for k, (b, c) in enumerate(boxes)
      ],
      "categories": [{"id": 1, "name": "person"}],
  }
  results = [{"image_id": 7, "category_id": 1, "bbox": list(b), "score": s} for b, s in dets]
  got = CH.metrics_from_coco(coco, results, [7])
  assert set(got) == {"crowdhuman_AP50", "crowdhuman_MR-2", "crowdhuman_JI"}
  for k in ("AP50", "MR-2", "JI"):
    assert got[f"crowdhuman_{k}"] == pytest.approx(want[k], abs=1e-12)


def test_app_evaluate_writes_crowdhuman_metrics(tmp_path, monkeypatch):
  """app.evaluate on a crowdhuman dataset (model replaced by a stub returning the whole image and
  a small box): metrics.json holds the COCO metrics and the CrowdHuman ones."""
  from cn2_jax import app
  from cn2_jax.config import base_config

  root = tmp_path / "CrowdHuman"
  recs = {
      "full": [person((0, 0, 64, 48)), mask((0, 0, 8, 8))],
      "small": [person((30, 10, 10, 20))],
  }
  for split in ("train", "val"):
    (root / f"annotation_{split}.odgt").parent.mkdir(parents=True, exist_ok=True)
    (root / f"annotation_{split}.odgt").write_text(
        "".join(json.dumps({"ID": k, "gtboxes": v}) + "\n" for k, v in recs.items())
    )
  for k in recs:
    os.makedirs(root / "Images", exist_ok=True)
    Image.new("RGB", (64, 48)).save(root / "Images" / f"{k}.jpg")
  cfg = base_config()
  cfg.compilation_cache_dir = ""
  cfg.model.num_classes = 1
  cfg.data.dataset = "crowdhuman"
  cfg.data.crowdhuman_box = "fbox"
  cfg.data.root = str(root)
  cfg.data.num_workers = 0
  cfg.data.min_size_test = 48
  cfg.data.max_size_test = 1000
  cfg.train.eval_batch_size = 2

  def make_eval_step(model, mesh):
    def step(variables, batch):
      hw = np.asarray(batch["image_hw"])
      boxes = np.zeros((hw.shape[0], 2, 4), np.float32)
      boxes[:, 0, 2:] = hw[:, ::-1]  # the whole image
      boxes[:, 1] = (1, 1, 6, 6)  # inside the mask region of image "full"
      scores = np.tile(np.array([[0.9, 0.8]], np.float32), (hw.shape[0], 1))
      return dict(
          boxes=boxes, scores=scores, classes=np.zeros_like(scores, np.int32), valid=scores > 0
      )

    return step

  monkeypatch.setattr(app.detector, "build_model", lambda m: None)
  monkeypatch.setattr(app.step_lib, "make_eval_step", make_eval_step)
  workdir = str(tmp_path / "run")
  metrics = app.evaluate(cfg, workdir, variables={})
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    written = json.load(f)
  for k in ("AP", "AP50", "crowdhuman_AP50", "crowdhuman_MR-2", "crowdhuman_JI"):
    assert written[k] == pytest.approx(metrics[k])
  # image "full": whole-image box TP, small box on the mask ignored; image "small": 1 FP, 1 miss
  # -> list (tie at .9: image order) T F / F..., G = 2
  with open(os.path.join(workdir, "eval", "coco_results.json")) as f:
    results = json.load(f)
  b = app.prepare_dataset(cfg, workdir)
  from cn2_jax.data import pipeline as P

  ann = P.DetectionInfo.from_builder(b).annotation_file("val")
  again = CH.metrics_from_coco(ann, results)
  assert again == pytest.approx({k: metrics[k] for k in again})
  assert metrics["crowdhuman_MR-2"] == pytest.approx(0.5)
  # JI: image full k=1 m=1 n=1 (the small box is on the ignore region) -> 1; image small k=0,
  # m=1, n=2 -> 0 (the .8 box is a FP there too); mean .5
  assert metrics["crowdhuman_JI"] == pytest.approx(0.5, abs=1e-5)
