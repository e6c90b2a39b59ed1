"""The official WIDER Face protocol (cn2_jax/evaluation/wider_eval.py) on tiny .mat files written
here: hand-computed APs, an independent loop reference of the kit's code on random cases, the
COCO -> WIDER mapping, the prediction-file command line and the one-line errors."""

import json
import os

import numpy as np
import pytest
import scipy.io

from cn2_jax.errors import ConfigError, DataError, InputFileError
from cn2_jax.evaluation import wider_eval as W

A, B, C = (10, 10, 20, 20), (50, 50, 20, 20), (100, 10, 30, 30)  # face boxes x y w h
FAR = (200, 200, 10, 10)  # a box on no face


def _cell(items):
  out = np.empty((len(items), 1), dtype=object)
  for i, x in enumerate(items):
    out[i, 0] = x
  return out


def write_gt(root, images, keep):
  """images: [(event, name, [xywh...])] (events contiguous); keep: {setting: [1-based face
  indices per image]} -> root with the four official .mat files."""
  os.makedirs(root, exist_ok=True)
  events = list(dict.fromkeys(e for e, _, _ in images))
  per = {e: [i for i, im in enumerate(images) if im[0] == e] for e in events}
  scipy.io.savemat(
      os.path.join(root, "wider_face_val.mat"),
      dict(
          event_list=_cell(events),
          file_list=_cell([_cell([images[i][1] for i in per[e]]) for e in events]),
          face_bbx_list=_cell(
              [
                  _cell([np.asarray(images[i][2], np.float64).reshape(-1, 4) for i in per[e]])
                  for e in events
              ]
          ),
      ),
  )
  for s in W.SETTINGS:
    lists = _cell(
        [_cell([np.asarray(keep[s][i], np.float64).reshape(-1, 1) for i in per[e]]) for e in events]
    )
    scipy.io.savemat(os.path.join(root, f"wider_{s}_val.mat"), dict(gt_list=lists))
  return str(root)


def det(box, score):
  return list(box) + [score]


def one_image(tmp_path, faces, keep, dets):
  """AP of one image '0--Parade/0_a' with `faces`, per-setting kept indices and detections."""
  gt = write_gt(tmp_path / "gt", [("0--Parade", "0_a", faces)], {s: [keep[s]] for s in keep})
  return W.evaluate({("0--Parade", "0_a"): np.array(dets, np.float64)}, gt)


ALL = {"easy": [1, 2], "medium": [1, 2], "hard": [1, 2]}


# ------------------------------------------------------------------------------------------------
# Hand-computed cases
# ------------------------------------------------------------------------------------------------
def test_perfect_detection_is_ap_one(tmp_path):
  m = one_image(tmp_path, [A, B], ALL, [det(A, 0.9), det(B, 0.8)])
  assert m == {"wider_easy_ap": 1.0, "wider_medium_ap": 1.0, "wider_hard_ap": 1.0}


def test_false_positive_above_a_true_positive(tmp_path):
  """Scores 0.9 (TP on A), 0.5 (FP), 0.1 (TP on B) normalise to 1, 0.5, 0.  Thresholds above 0.5:
  P 1, R 1/2; down to 0.001: P 1/2, R 1/2; at 0: P 2/3, R 1.  Envelope: 1 up to R 1/2, then 2/3:
  AP = 1/2 * 1 + 1/2 * 2/3 = 5/6."""
  m = one_image(tmp_path, [A, B], ALL, [det(A, 0.9), det(FAR, 0.5), det(B, 0.1)])
  for s in W.SETTINGS:
    assert m[f"wider_{s}_ap"] == pytest.approx(5 / 6, abs=1e-12)
  # the same with the FP ranked first: P 0 at R 0, then 1/2 at R 1/2, 2/3 at R 1 -> 1/2 * 2/3 * 2
  m = one_image(tmp_path, [A, B], ALL, [det(FAR, 0.9), det(A, 0.5), det(B, 0.1)])
  assert m["wider_easy_ap"] == pytest.approx(2 / 3, abs=1e-12)


def test_ignored_face_match_is_neither_tp_nor_fp(tmp_path):
  """B counts only in hard.  A detection on B (ranked first) is ignored in easy / medium (AP 1,
  not the 1/2 of an FP) and a TP in hard."""
  keep = {"easy": [1], "medium": [1], "hard": [1, 2]}
  m = one_image(tmp_path, [A, B], keep, [det(B, 0.9), det(A, 0.5)])
  assert m == {"wider_easy_ap": 1.0, "wider_medium_ap": 1.0, "wider_hard_ap": 1.0}
  # control: the same detection on no face is an FP -> 1/2
  m = one_image(tmp_path, [A, B], keep, [det(FAR, 0.9), det(A, 0.5)])
  assert m["wider_easy_ap"] == pytest.approx(0.5)


def test_easy_and_hard_differ_when_only_the_hard_face_is_missed(tmp_path):
  keep = {"easy": [1], "medium": [1, 3], "hard": [1, 2, 3]}
  m = one_image(tmp_path, [A, B, C], keep, [det(A, 0.9), det(C, 0.3)])
  assert m["wider_easy_ap"] == 1.0  # C is ignored in easy
  assert m["wider_medium_ap"] == 1.0
  assert m["wider_hard_ap"] == pytest.approx(2 / 3)  # precision 1 up to recall 2/3


def test_iou_uses_x_plus_w_and_the_plus_one_convention():
  # GT 0..9 (x2 = x + w = 9, 10 pixels wide with the +1), detection 0..4: 5 * 10 / 100 = 0.5
  assert W.box_overlaps([[0, 0, 4, 9]], [[0, 0, 9, 9]])[0, 0] == pytest.approx(0.5)
  assert W.box_overlaps([[0, 0, 4, 4]], [[6, 6, 4, 4]])[0, 0] == 0.0
  assert W.box_overlaps([[0, 0, 4, 4]], [[4, 4, 4, 4]])[0, 0] == pytest.approx(1 / 49)  # touching


def test_images_without_faces_or_detections(tmp_path):
  """A detection on a face-free image is not an FP (the kit skips the image); the faces of an
  image without detections count as missed; all-equal scores become 1."""
  images = [("0--Parade", "0_a", [A]), ("0--Parade", "0_b", []), ("1--H", "1_c", [B])]
  gt = write_gt(tmp_path / "gt", images, {s: [[1], [], [1]] for s in W.SETTINGS})
  pred = {("0--Parade", "0_a"): [det(A, 0.5)], ("0--Parade", "0_b"): [det(A, 0.99)]}
  m = W.evaluate(pred, gt)
  assert m["wider_easy_ap"] == pytest.approx(0.5)  # recall 1/2 at precision 1
  # only the two images with faces A: the other image's face is not counted
  m = W.evaluate(pred, gt, images=[("0--Parade", "0_a.jpg"), ("0--Parade", "0_b")])
  assert m["wider_easy_ap"] == 1.0


def test_scores_are_min_max_normalised(tmp_path):
  dets = [det(FAR, 0.9), det(A, 0.6), det(B, 0.1)]
  m = one_image(tmp_path, [A, B], ALL, dets)
  scaled = [d[:4] + [d[4] * 7 + 3] for d in dets]  # an affine change of the scores: same AP
  assert one_image(tmp_path, [A, B], ALL, scaled) == m


# ------------------------------------------------------------------------------------------------
# Independent reference: the kit's loops, written out (sort, norm_score, image_evaluation,
# image_pr_info, dataset_pr_info, VOCap)
# ------------------------------------------------------------------------------------------------
def ref_overlap(a, b):  # a, b: x1 y1 x2 y2
  iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
  ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
  if iw <= 0 or ih <= 0:
    return 0.0
  ua = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - iw * ih
  return iw * ih / ua


def ref_ap(images, keep, pred, thresh_num=1000, iou=0.5):
  """images: [[xywh...]], keep: per image 1-based indices, pred: per image [[x y w h s]]."""
  pred = [sorted((list(map(float, r)) for r in p), key=lambda r: -r[4]) for p in pred]
  scores = [r[4] for p in pred for r in p]
  lo, hi = min(scores), max(scores)
  for p in pred:
    for r in p:
      r[4] = (r[4] - lo) / (hi - lo)
  curve = [[0.0, 0.0] for _ in range(thresh_num)]
  count_face = 0
  for gt, kp, p in zip(images, keep, pred):
    count_face += len(kp)
    if not gt or not p:
      continue
    ignore = [1 if j + 1 in kp else 0 for j in range(len(gt))]
    g = [(x, y, x + w, y + h) for x, y, w, h in gt]
    recall_list, proposal, pred_recall = [0] * len(gt), [1] * len(p), [0] * len(p)
    for h, r in enumerate(p):
      box = (r[0], r[1], r[0] + r[2], r[1] + r[3])
      ov = [ref_overlap(gg, box) for gg in g]
      idx = int(np.argmax(ov))
      if ov[idx] >= iou:
        if ignore[idx] == 0:
          recall_list[idx], proposal[h] = -1, -1
        elif recall_list[idx] == 0:
          recall_list[idx] = 1
      pred_recall[h] = sum(1 for v in recall_list if v == 1)
    for t in range(thresh_num):
      thresh = 1 - (t + 1) / thresh_num
      above = [k for k, r in enumerate(p) if r[4] >= thresh]
      if above:
        last = above[-1]
        curve[t][0] += sum(1 for v in proposal[: last + 1] if v == 1)
        curve[t][1] += pred_recall[last]
  prec = [c[1] / c[0] if c[0] else float("nan") for c in curve]
  rec = [c[1] / count_face for c in curve]
  mrec, mpre = [0.0] + rec + [1.0], [0.0] + prec + [0.0]
  for i in range(len(mpre) - 1, 0, -1):
    mpre[i - 1] = np.fmax(mpre[i - 1], mpre[i])  # MATLAB's max skips NaN
  return sum(
      (mrec[i + 1] - mrec[i]) * mpre[i + 1] for i in range(len(mrec) - 1) if mrec[i + 1] != mrec[i]
  )


def test_matches_a_loop_reference_on_random_cases(tmp_path):
  rng = np.random.default_rng(0)
  images, keep, pred = [], {s: [] for s in W.SETTINGS}, []
  for _ in range(12):
    g = int(rng.integers(0, 6))
    xy = rng.uniform(0, 200, (g, 2))
    wh = rng.uniform(8, 60, (g, 2))
    faces = np.round(np.concatenate([xy, wh], 1)).tolist()
    images.append(faces)
    hard = [j + 1 for j in range(g) if rng.random() < 0.8]
    medium = [j for j in hard if rng.random() < 0.7]
    keep["hard"].append(hard)
    keep["medium"].append(medium)
    keep["easy"].append([j for j in medium if rng.random() < 0.6])
    dets = []
    for f in faces:
      for _ in range(int(rng.integers(0, 3))):  # 0-2 jittered copies (duplicates, near misses)
        dets.append(list(np.asarray(f) + rng.normal(0, 1.5, 4)) + [float(rng.random())])
    for _ in range(int(rng.integers(0, 3))):
      dets.append(list(rng.uniform(0, 200, 2)) + list(rng.uniform(4, 40, 2)) + [rng.random()])
    if dets and rng.random() < 0.3:
      dets[-1][4] = dets[0][4]  # a tie
    rng.shuffle(dets)  # unsorted input
    pred.append(dets)
  names = [("0--Parade" if i < 5 else "1--Handshaking", f"img_{i}") for i in range(12)]
  gt = write_gt(tmp_path / "gt", [(e, n, f) for (e, n), f in zip(names, images)], keep)
  m = W.evaluate({k: np.asarray(p).reshape(-1, 5) for k, p in zip(names, pred)}, gt)
  for s in W.SETTINGS:
    want = ref_ap(images, keep[s], pred)
    assert 0.0 < want < 1.0
    assert m[f"wider_{s}_ap"] == pytest.approx(want, abs=1e-12), s


# ------------------------------------------------------------------------------------------------
# COCO results, prediction files, errors
# ------------------------------------------------------------------------------------------------
def _coco_case(tmp_path):
  images = [("0--Parade", "0_a", [A, B]), ("1--H", "1_c", [C])]
  keep = {"easy": [[1], [1]], "medium": [[1, 2], [1]], "hard": [[1, 2], [1]]}
  gt = write_gt(tmp_path / "gt", images, keep)
  coco = {
      "images": [
          {"id": 1, "file_name": "0--Parade/0_a.jpg", "height": 300, "width": 300},
          {"id": 2, "file_name": "1--H/1_c.jpg", "height": 300, "width": 300},
      ],
      "annotations": [],
      "categories": [{"id": 1, "name": "face"}],
  }
  results = [
      {"image_id": 1, "category_id": 1, "bbox": list(A), "score": 0.9},
      {"image_id": 1, "category_id": 1, "bbox": list(FAR), "score": 0.8},
      {"image_id": 2, "category_id": 1, "bbox": list(C), "score": 0.4},
  ]
  pred = {
      ("0--Parade", "0_a"): np.array([det(A, 0.9), det(FAR, 0.8)]),
      ("1--H", "1_c"): np.array([det(C, 0.4)]),
  }
  return gt, coco, results, pred


def test_metrics_from_coco_maps_file_names_to_events(tmp_path):
  gt, coco, results, pred = _coco_case(tmp_path)
  m = W.metrics_from_coco(coco, results, [1, 2], gt)
  assert m == W.evaluate(pred, gt)
  assert m["wider_easy_ap"] != m["wider_hard_ap"]
  path = tmp_path / "val.json"
  path.write_text(json.dumps(coco))
  assert W.metrics_from_coco(str(path), results, None, W.load_gt(gt)) == m
  # a subset of image ids: the protocol on those images
  sub = W.metrics_from_coco(coco, results, [2], gt)
  assert sub == W.evaluate(pred, gt, images=[("1--H", "1_c")])
  assert sub["wider_easy_ap"] == 1.0
  coco["images"] = [{"id": 1, "file_name": "elsewhere/x.jpg"}]
  with pytest.raises(DataError, match="none of the 1 evaluated images"):
    W.metrics_from_coco(coco, results, [1], gt)


def test_command_line_on_prediction_files(tmp_path, capsys):
  gt, _, _, pred = _coco_case(tmp_path)
  root = tmp_path / "pred"
  for (event, name), p in pred.items():
    os.makedirs(root / event, exist_ok=True)
    rows = "".join(f"{x} {y} {w} {h} {s}\n" for x, y, w, h, s in p)
    (root / event / f"{name}.txt").write_text(f"{name}.jpg\n{len(p)}\n{rows}")
  assert W.read_pred_dir(root).keys() == pred.keys()
  assert W.main(["--pred", str(root), "--gt", gt, "--json"]) == 0
  assert json.loads(capsys.readouterr().out) == W.evaluate(pred, gt)
  assert W.main(["--pred", str(root), "--gt", gt]) == 0
  assert "Hard   Val AP:" in capsys.readouterr().out
  (root / "1--H" / "1_c.txt").write_text("1_c.jpg\n2\n1 2 3 4 0.5\n")
  assert W.main(["--pred", str(root), "--gt", gt]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "1_c.txt: the count line says 2 boxes, the file has 1" in err


def test_missing_or_corrupt_mat_is_a_one_line_error(tmp_path, capsys):
  gt, _, _, _ = _coco_case(tmp_path)
  os.remove(os.path.join(gt, "wider_hard_val.mat"))
  with pytest.raises(InputFileError, match="wider_hard_val.mat not found"):
    W.load_gt(gt)
  assert W.main(["--pred", str(tmp_path), "--gt", gt]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "wider_hard_val.mat" in err
  with open(os.path.join(gt, "wider_hard_val.mat"), "wb") as f:
    f.write(b"not a mat file at all" * 10)
  with pytest.raises(DataError, match=r"wider_hard_val.mat: not a readable .mat file") as e:
    W.load_gt(gt)
  assert "\n" not in str(e.value)
  scipy.io.savemat(os.path.join(gt, "wider_hard_val.mat"), dict(other=np.zeros(1)))
  with pytest.raises(DataError, match="wider_hard_val.mat: missing variable.s. gt_list"):
    W.load_gt(gt)
  with pytest.raises(InputFileError, match="nowhere not found"):
    W.load_gt(str(tmp_path / "nowhere"))


def test_config_key_is_validated(tmp_path):
  from cn2_jax.config import base_config, validate_config

  cfg = base_config()
  cfg.data.dataset = "wider_face"
  cfg.data.wider_eval_gt = str(tmp_path / "missing")
  with pytest.raises(ConfigError, match="data.wider_eval_gt"):
    validate_config(cfg)
  cfg.data.wider_eval_gt = str(tmp_path)
  validate_config(cfg)
  cfg.data.dataset = "coco/2017"
  with pytest.raises(ConfigError, match="data.wider_eval_gt"):
    validate_config(cfg)
