"""Tests for cn2_jax/evaluation/coco_eval.py and cn2_jax/visualize.py (tiny, CPU, no JAX)."""

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from cn2_jax.evaluation.coco_eval import COCO_METRIC_NAMES, CocoEvaluator, format_metrics_table
from cn2_jax.visualize import class_color, draw_detections, save_png

CAT_IDS = (1, 3, 7)  # non-contiguous COCO ids for labels 0, 1, 2
K = 6  # detection slots per image


def _gt_dataset():
  """4 images: 10, 11, 12 with GT (small, medium and large boxes, one crowd), 13 without GT."""
  images = [
      {'id': i, 'width': 320, 'height': 240, 'file_name': f'{i}.jpg'} for i in (10, 11, 12, 13)
  ]
  # (image_id, category_id, xywh, iscrowd)
  raw = [
      (10, 1, [10, 20, 60, 40], 0),  # medium (2400)
      (10, 3, [100, 50, 150, 120], 0),  # large (18000)
      (10, 1, [250, 180, 20, 20], 0),  # small (400)
      (11, 7, [30, 30, 90, 90], 0),  # large (8100)
      (11, 3, [200, 20, 30, 24], 0),  # medium (720)
      (11, 1, [150, 150, 100, 60], 1),  # crowd: ignored by COCOeval, never detected here
      (12, 7, [5, 5, 24, 20], 0),  # small (480)
      (12, 7, [60, 100, 120, 90], 0),  # large (10800), same category twice in one image
      (12, 1, [220, 40, 50, 50], 0),  # medium (2500)
  ]
  anns = []
  for n, (img, cat, bb, crowd) in enumerate(raw):
    anns.append(
        {
            'id': n + 1,
            'image_id': img,
            'category_id': cat,
            'bbox': bb,
            'area': float(bb[2] * bb[3]),
            'iscrowd': crowd,
        }
    )
  cats = [{'id': c, 'name': f'c{c}'} for c in CAT_IDS]
  return {'images': images, 'annotations': anns, 'categories': cats}


def _label_of(cat_id):
  return CAT_IDS.index(cat_id)


def _batch_from_gt(gt, image_ids, shift_frac=0.0, score=1.0):
  """Detections = the non-crowd GT boxes of `image_ids`, shifted right by shift_frac * width."""
  b = len(image_ids)
  boxes = np.zeros((b, K, 4), np.float32)
  scores = np.zeros((b, K), np.float32)
  classes = np.zeros((b, K), np.int32)
  valid = np.zeros((b, K), bool)
  for i, img in enumerate(image_ids):
    j = 0
    for a in gt['annotations']:
      if a['image_id'] != img or a['iscrowd']:
        continue
      x, y, w, h = a['bbox']
      x = x + shift_frac * w
      boxes[i, j] = [x, y, x + w, y + h]
      scores[i, j] = score
      classes[i, j] = _label_of(a['category_id'])
      valid[i, j] = True
      j += 1
    # junk in the invalid slots must be ignored
    boxes[i, j:] = [1, 1, 300, 200]
    scores[i, j:] = 0.9
  return (np.asarray(image_ids, np.int64), boxes, scores, classes, valid, np.ones((b,), bool))


def _evaluate_all(ev, gt, **kw):
  ev.add(*_batch_from_gt(gt, [10, 11], **kw))
  ev.add(*_batch_from_gt(gt, [12, 13], **kw))
  return ev.evaluate()


def test_perfect_detections_give_ap_one(capsys):
  gt = _gt_dataset()
  ev = CocoEvaluator(gt, CAT_IDS)
  m = _evaluate_all(ev, gt)
  assert tuple(m) == COCO_METRIC_NAMES
  for name in ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl'):
    assert m[name] == pytest.approx(1.0), name
  # image 12 has two GT of category 7: with maxDets=1 one of them cannot be recalled.
  assert m['AR1'] < 1.0
  assert ev.num_images == 4 and ev.num_detections == 8
  out = capsys.readouterr().out
  assert out.count('Average Precision') == 6 and out.count('Average Recall') == 6
  assert 'AP50' in out and 'AR100' in out  # compact table


def test_results_are_xywh_with_coco_category_ids():
  gt = _gt_dataset()
  ev = CocoEvaluator(gt, CAT_IDS, verbose=False)
  ev.add(*_batch_from_gt(gt, [10, 11]))
  got = sorted((r['image_id'], r['category_id'], tuple(r['bbox']), r['score']) for r in ev.results)
  want = sorted(
      (a['image_id'], a['category_id'], tuple(float(v) for v in a['bbox']), 1.0)
      for a in gt['annotations']
      if a['image_id'] in (10, 11) and not a['iscrowd']
  )
  assert got == want


def test_shifted_detections_give_lower_ap():
  gt = _gt_dataset()
  # Shift by w/3: intersection = (2/3) w h, union = (4/3) w h, IoU = 0.5 exactly. At the thresholds
  # 0.55..0.95 nothing matches, so AP <= 1/10 (only the 0.5 threshold can contribute) and AP75 = 0.
  # AP50 sits exactly on its threshold (COCOeval matches IoU >= t), so whether it is 1 or 0 depends
  # on float rounding of the IoU; we do not assert it.
  m = _evaluate_all(CocoEvaluator(gt, CAT_IDS, verbose=False), gt, shift_frac=1 / 3)
  assert m['AP'] < 0.6
  assert m['AP'] <= 0.1 + 1e-6
  assert m['AP75'] == pytest.approx(0.0)
  # Shift by w/5: IoU = (4/5)/(6/5) = 2/3 -> matched at t = 0.50, 0.55, 0.60, 0.65 (4 of 10).
  m = _evaluate_all(CocoEvaluator(gt, CAT_IDS, verbose=False), gt, shift_frac=0.2)
  assert m['AP50'] == pytest.approx(1.0)
  assert m['AP75'] == pytest.approx(0.0)
  assert m['AP'] == pytest.approx(0.4, abs=1e-6)


def test_false_positive_on_image_without_gt_counts():
  gt = _gt_dataset()
  ev = CocoEvaluator(gt, CAT_IDS, verbose=False)
  ids, boxes, scores, classes, valid, mask = _batch_from_gt(gt, [10, 11, 12, 13], score=0.8)
  # a confident category-1 detection on image 13 (no GT at all) ranks above every true positive
  boxes[3, 0] = [10, 10, 100, 100]
  scores[3, 0] = 0.95
  classes[3, 0] = 0
  valid[3, 0] = True
  ev.add(ids, boxes, scores, classes, valid, mask)
  m = ev.evaluate()
  assert m['AP'] < 0.95
  assert m['AR100'] == pytest.approx(1.0)


def test_no_detections_give_zero():
  gt = _gt_dataset()
  ev = CocoEvaluator(gt, CAT_IDS, verbose=False)
  ids, boxes, scores, classes, valid, mask = _batch_from_gt(gt, [10, 11, 12, 13])
  ev.add(ids, boxes, scores, classes, np.zeros_like(valid), mask)
  m = ev.evaluate()
  assert ev.num_detections == 0
  assert all(m[n] == 0.0 for n in COCO_METRIC_NAMES), m


def test_duplicate_image_id_raises():
  gt = _gt_dataset()
  ev = CocoEvaluator(gt, CAT_IDS, verbose=False)
  ev.add(*_batch_from_gt(gt, [10, 11]))
  with pytest.raises(ValueError, match='twice'):
    ev.add(*_batch_from_gt(gt, [11, 12]))
  # nothing from the rejected batch was recorded
  assert ev.image_ids == [10, 11] and ev.num_detections == 5
  ev2 = CocoEvaluator(gt, CAT_IDS, verbose=False)
  with pytest.raises(ValueError, match='twice'):
    ev2.add(*_batch_from_gt(gt, [12, 12]))


def test_unknown_image_id_and_bad_label_raise():
  gt = _gt_dataset()
  ev = CocoEvaluator(gt, CAT_IDS, verbose=False)
  with pytest.raises(ValueError, match='not in the ground-truth'):
    ev.add(*_batch_from_gt(gt, [99]))
  ids, boxes, scores, classes, valid, mask = _batch_from_gt(gt, [10])
  classes[0, 0] = 3
  with pytest.raises(ValueError, match='class labels'):
    ev.add(ids, boxes, scores, classes, valid, mask)
  with pytest.raises(ValueError, match='category ids'):
    CocoEvaluator(gt, (1, 3, 5))


def test_masked_batch_entries_are_ignored():
  gt = _gt_dataset()
  ev = CocoEvaluator(gt, CAT_IDS, verbose=False)
  ev.add(*_batch_from_gt(gt, [10, 11]))
  ids, boxes, scores, classes, valid, mask = _batch_from_gt(gt, [12, 13, 10, 12])
  # padding examples repeat an already-added id and carry confident junk: all must be skipped
  mask[2:] = False
  boxes[2:] = [0, 0, 320, 240]
  scores[2:] = 1.0
  valid[2:] = True
  ev.add(ids, boxes, scores, classes, valid, mask)
  # a padding example may even carry an id that is not in the GT
  ids, boxes, scores, classes, valid, _ = _batch_from_gt(gt, [10])
  ids[:] = 12345
  ev.add(ids, boxes, scores, classes, valid, np.zeros((1,), bool))
  assert sorted(ev.image_ids) == [10, 11, 12, 13]
  assert ev.num_detections == 8
  m = ev.evaluate()
  assert m['AP'] == pytest.approx(1.0)


def test_only_added_images_are_evaluated(tmp_path):
  gt = _gt_dataset()
  path = tmp_path / 'gt.json'
  path.write_text(json.dumps(gt))
  ev = CocoEvaluator(str(path), CAT_IDS, verbose=False)  # load from a json path
  ev.add(*_batch_from_gt(gt, [10]))
  with pytest.warns(UserWarning, match='never added'):
    m = ev.evaluate()
  # images 11 and 12 are not evaluated, so their GT does not count as missed
  assert m['AP'] == pytest.approx(1.0)
  assert m['AR100'] == pytest.approx(1.0)


def test_gt_without_area_or_iscrowd_is_accepted():
  gt = _gt_dataset()
  for a in gt['annotations']:
    if not a['iscrowd']:
      del a['iscrowd']
    del a['area']
  ev = CocoEvaluator(gt, CAT_IDS, verbose=False)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    m = _evaluate_all(ev, _gt_dataset())
  assert m['AP'] == pytest.approx(1.0)


def test_written_json_loads_back(tmp_path):
  gt = _gt_dataset()
  ev = CocoEvaluator(gt, CAT_IDS, verbose=False)
  m = _evaluate_all(ev, gt, shift_frac=0.2)
  ev.write_results(tmp_path / 'out' / 'results.json')
  ev.write_metrics(tmp_path / 'out' / 'metrics.json', m)
  res = json.loads((tmp_path / 'out' / 'results.json').read_text())
  assert len(res) == 8
  assert set(res[0]) == {'image_id', 'category_id', 'bbox', 'score'}
  met = json.loads((tmp_path / 'out' / 'metrics.json').read_text())
  assert met['num_images'] == 4 and met['num_detections'] == 8
  for n in COCO_METRIC_NAMES:
    assert isinstance(met[n], float) and met[n] == pytest.approx(m[n])
  # the written results are a valid pycocotools result file
  from pycocotools.coco import COCO

  coco = COCO()
  coco.dataset = gt
  coco.createIndex()
  assert len(coco.loadRes(str(tmp_path / 'out' / 'results.json')).getAnnIds()) == 8


def test_metrics_table():
  table = format_metrics_table({n: 0.5 for n in COCO_METRIC_NAMES} | {'APs': -1.0})
  header, values = table.splitlines()
  assert header.split()[0] == 'AP' and '50.00' in values and '-' in values


# ---------------------------------------------------------------------------------------------
# visualization


@pytest.mark.parametrize('hw', [(48, 64), (600, 800)])
def test_draw_detections_changes_box_pixels(hw):
  h, w = hw
  img = np.full((h, w, 3), 128, np.uint8)
  img_before = img.copy()
  box = np.array([[0.2 * w, 0.4 * h, 0.7 * w, 0.9 * h]], np.float32)
  out = draw_detections(img, box, np.array([0.87]), np.array([2]), ['a', 'b', 'car'])
  assert out.shape == img.shape and out.dtype == np.uint8
  np.testing.assert_array_equal(img, img_before)  # input untouched
  x1, y1, x2, y2 = box[0].round().astype(int)
  ym = (y1 + y2) // 2
  xm = (x1 + x2) // 2
  for y, x in ((ym, x1), (ym, x2), (y2, xm)):  # left, right and bottom edges
    assert tuple(out[y, x]) == class_color(2), (y, x)
  # interior away from the label stays untouched; the label background sits above the box
  assert tuple(out[ym, xm]) == (128, 128, 128)
  assert tuple(out[y1 - 2, x1 + 2]) != (128, 128, 128)
  # changed pixels stay in the box plus its label (which may be shifted left to fit the image)
  from cn2_jax.visualize import label_rects

  ((lx0, ly0, lx1, ly1),) = label_rects(
      img, box, np.array([0.87]), np.array([2]), ['a', 'b', 'car']
  )
  changed = np.any(out != img, axis=-1)
  assert changed.sum() > 0
  ys, xs = np.nonzero(changed)
  assert xs.min() >= min(x1 - 1, lx0) and ys.max() <= y2 + 1
  assert xs.max() <= max(x2 + 1, lx1) and ys.min() >= min(y1 - 1, ly0)


def test_draw_detections_threshold_and_empty(tmp_path):
  img = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
  empty = draw_detections(img, np.zeros((0, 4)), np.zeros((0,)), np.zeros((0,), np.int32), [])
  np.testing.assert_array_equal(empty, img)
  low = draw_detections(img, [[5, 5, 30, 30]], [0.1], [0], ['x'], score_thresh=0.3)
  np.testing.assert_array_equal(low, img)
  # boxes partly outside, class without a name, several classes
  out = draw_detections(img, [[-10, -10, 30, 30], [20, 10, 80, 60]], [0.9, 0.5], [0, 5], ['x'])
  assert out.shape == img.shape and np.any(out != img)
  save_png(tmp_path / 'd' / 'vis.png', out)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'd' / 'vis.png')), out)
