"""LVIS v1 / Objects365 dataset kinds, repeat-factor and class-aware sampling, LVIS evaluation, on
tiny synthetic files written here (cn2_jax/data/datasets/{lvis,objects365}.py,
cn2_jax/data/sampling.py, cn2_jax/data/schedule.py, cn2_jax/evaluation/lvis_eval.py)."""

from __future__ import annotations

import json
import math
import os
import pickle
import sys
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from cn2_jax.config import base_config
from cn2_jax.data import catalog
from cn2_jax.data import pipeline as P
from cn2_jax.data import sampling as S
from cn2_jax.data import schedule
from cn2_jax.data.datasets import lvis as lvis_kind  # noqa: F401  (registers lvis_v1)
from cn2_jax.data.datasets import objects365 as o365_kind  # noqa: F401  (registers objects365)
from cn2_jax.errors import DataError
from cn2_jax.evaluation import lvis_eval

W, H = 64, 48


def _img(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", (W, H), (120, 60, 30)).save(path)


def _data(**kw):
  d = base_config().data
  d.num_workers = 0
  for k, v in kw.items():
    d[k] = v
  return d


# ------------------------------------------------------------------------------------------------
# Tiny LVIS v1
# ------------------------------------------------------------------------------------------------
LVIS_CATS = [  # listed out of id order on purpose
    {"id": 3, "name": "cat_c", "synonyms": ["cat_c"], "frequency": "f", "image_count": 300},
    {"id": 1, "name": "cat_a", "synonyms": ["cat_a", "a2"], "frequency": "r", "image_count": 2},
    {"id": 2, "name": "cat_b", "synonyms": ["cat_b"], "frequency": "c", "image_count": 40},
    {"id": 4, "name": "cat_d", "synonyms": ["cat_d"], "frequency": "f", "image_count": 500},
]


def _lvis_image(iid, folder, neg=(), nel=()):
  return {
      "id": iid,
      "height": H,
      "width": W,
      "coco_url": f"http://images.cocodataset.org/{folder}/{iid:012d}.jpg",
      "flickr_url": "http://farm.example/x.jpg",
      "neg_category_ids": list(neg),
      "not_exhaustive_category_ids": list(nel),
  }


def _ann(aid, iid, cat, box):
  x, y, w, h = box
  return {
      "id": aid,
      "image_id": iid,
      "category_id": cat,
      "bbox": list(box),
      "area": float(w * h),
      "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
  }


def _write_lvis(root):
  train = {
      "info": {"description": "tiny lvis"},
      "licenses": [],
      "categories": LVIS_CATS,
      "images": [
          _lvis_image(11, "train2017"),
          _lvis_image(12, "train2017"),
          _lvis_image(13, "train2017"),
          _lvis_image(14, "train2017"),  # no annotation: dropped from training (filter_empty)
      ],
      "annotations": [
          _ann(1, 11, 3, (2, 3, 20, 10)),
          _ann(2, 11, 4, (30, 5, 10, 30)),
          _ann(3, 12, 1, (5, 5, 30, 30)),
          _ann(4, 12, 3, (40, 10, 10, 10)),
          _ann(5, 13, 2, (1, 1, 8, 8)),
          _ann(6, 13, 3, (20, 20, 20, 20)),
      ],
  }
  val = {
      "info": {},
      "licenses": [],
      "categories": LVIS_CATS,
      "images": [  # LVIS val holds images of both COCO folders
          _lvis_image(21, "val2017", neg=[2], nel=[4]),
          _lvis_image(22, "train2017", neg=[1, 4]),
          {k: v for k, v in _lvis_image(23, "val2017").items() if "category_ids" not in k},
      ],
      "annotations": [
          _ann(11, 21, 1, (4, 4, 20, 20)),
          _ann(12, 21, 3, (30, 10, 25, 30)),
          _ann(13, 22, 2, (10, 5, 40, 35)),
          _ann(14, 23, 4, (0, 0, 64, 48)),
          _ann(15, 23, 3, (5, 25, 12, 12)),
      ],
  }
  for split, d in (("train", train), ("val", val)):
    os.makedirs(root / "lvis", exist_ok=True)
    (root / "lvis" / f"lvis_v1_{split}.json").write_text(json.dumps(d))
    for im in d["images"]:
      folder, name = im["coco_url"].split("/")[-2:]
      _img(str(root / "coco" / folder / name))
  return train, val


@pytest.fixture(scope="module")
def lvis_prepared(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("lvis")
  root = tmp / "datasets"
  train, val = _write_lvis(root)
  d = _data(dataset="lvis_v1", root=str(root))
  builder = catalog.get("lvis_v1").prepare(d, str(tmp / "tfds"), str(tmp), 0)
  return builder, train, val, tmp, root


def test_kinds_registered_with_official_class_counts():
  assert {"lvis_v1", "objects365"} <= set(catalog.names())
  lv, o3 = catalog.get("lvis_v1"), catalog.get("objects365")
  assert (lv.fixed_num_classes, o3.fixed_num_classes) == (1203, 365)
  assert lv.labelled and o3.labelled
  assert lv.extra_metrics is not None and o3.extra_metrics is None


def test_lvis_prepare_class_names_files_and_lvis_fields(lvis_prepared):
  builder, _, _, tmp, root = lvis_prepared
  info = P.DetectionInfo.from_builder(builder)
  assert info.class_names == ("cat_a", "cat_b", "cat_c", "cat_d")  # label = category id - 1
  assert info.category_ids == (1, 2, 3, 4)
  tr = P.open_split(builder, "train")
  assert len(tr) == 4 and list(tr.image_id) == [11, 12, 13, 14]
  assert list(tr.num_instances) == [2, 2, 2, 0]
  ex = tr[1]
  assert ex["image/filename"] == b"train2017/000000000012.jpg"  # from coco_url
  np.testing.assert_array_equal(ex["objects"]["label"], [0, 2])
  va = P.open_split(builder, "val")
  assert [va[i]["image/filename"].decode() for i in range(3)] == [
      "val2017/000000000021.jpg",
      "train2017/000000000022.jpg",
      "val2017/000000000023.jpg",
  ]
  ann = info.annotation_file("val")
  assert ann.endswith(os.path.join("converted", "lvis_v1", "val.json"))
  conv = json.loads(open(ann).read())
  assert all("segmentation" not in a and a["iscrowd"] == 0 for a in conv["annotations"])
  ims = {im["id"]: im for im in conv["images"]}
  assert ims[21]["neg_category_ids"] == [2] and ims[21]["not_exhaustive_category_ids"] == [4]
  assert ims[23]["neg_category_ids"] == [] and ims[23]["not_exhaustive_category_ids"] == []
  cats = {c["id"]: c for c in conv["categories"]}
  assert cats[1]["frequency"] == "r" and cats[1]["synonyms"] == ["cat_a", "a2"]
  # Prepared again: nothing is converted or rebuilt (same files, same mtimes).
  st = os.stat(ann).st_mtime_ns
  d = _data(dataset="lvis_v1", root=str(root))
  again = catalog.get("lvis_v1").prepare(d, str(tmp / "tfds"), str(tmp), 0)
  assert os.fspath(again.data_dir) == os.fspath(builder.data_dir)
  assert os.stat(ann).st_mtime_ns == st


def test_lvis_class_subset_restricts_lvis_fields(tmp_path):
  root = tmp_path / "datasets"
  _write_lvis(root)
  d = _data(dataset="lvis_v1", root=str(root), classes=("cat_d", "cat_a"))
  b = catalog.get("lvis_v1").prepare(d, str(tmp_path / "tfds"), str(tmp_path), 0)
  info = P.DetectionInfo.from_builder(b)
  assert info.class_names == ("cat_d", "cat_a") and info.category_ids == (4, 1)
  assert list(P.open_split(b, "train").image_id) == [11, 12]  # 13, 14 have neither class
  val = json.loads(open(info.annotation_file("val")).read())
  ims = {im["id"]: im for im in val["images"]}
  assert len(ims) == 3  # evaluation keeps every image
  assert ims[21]["neg_category_ids"] == [] and ims[21]["not_exhaustive_category_ids"] == [4]
  assert ims[22]["neg_category_ids"] == [1, 4]


def test_lvis_bad_files_are_one_line_errors(tmp_path):
  root = tmp_path / "datasets"
  train, _ = _write_lvis(root)
  train["categories"] = [dict(c, frequency="x") if c["id"] == 2 else c for c in LVIS_CATS]
  (root / "lvis" / "lvis_v1_train.json").write_text(json.dumps(train))
  d = _data(dataset="lvis_v1", root=str(root), eval_split="")
  with pytest.raises(DataError, match=r"categories \[2\] lack the 'frequency'"):
    catalog.get("lvis_v1").prepare(d, str(tmp_path / "tfds"), str(tmp_path), 0)
  train["categories"] = LVIS_CATS
  del train["images"][0]["coco_url"]
  (root / "lvis" / "lvis_v1_train.json").write_text(json.dumps(train))
  with pytest.raises(DataError, match="neither 'file_name' nor a 'coco_url'"):
    catalog.get("lvis_v1").prepare(d, str(tmp_path / "tfds"), str(tmp_path), 0)


# ------------------------------------------------------------------------------------------------
# Tiny Objects365
# ------------------------------------------------------------------------------------------------
def test_objects365_default_layout_class_names_and_crowd(tmp_path):
  root = tmp_path / "objects365"
  cats = [{"id": 2, "name": "Sneakers"}, {"id": 1, "name": "Person"}, {"id": 3, "name": "Chair"}]
  for split, n in (("train", 3), ("val", 2)):
    images = [
        {"id": 100 * (split == "val") + i, "file_name": f"obj365_{split}_{i:012d}.jpg",
         "height": H, "width": W}
        for i in range(1, n + 1)
    ]  # fmt: skip
    anns = [
        {"id": 1, "image_id": images[0]["id"], "category_id": 3, "bbox": [1, 2, 10, 10],
         "area": 100.0, "iscrowd": 0},
        {"id": 2, "image_id": images[0]["id"], "category_id": 1, "bbox": [20, 2, 30, 40],
         "area": 1200.0, "iscrowd": 1},
        {"id": 3, "image_id": images[1]["id"], "category_id": 2, "bbox": [3, 3, 5, 5],
         "area": 25.0, "iscrowd": 0},
    ]  # fmt: skip
    os.makedirs(root / "annotations", exist_ok=True)
    coco = {"images": images, "annotations": anns, "categories": cats}
    (root / "annotations" / f"objects365_{split}.json").write_text(json.dumps(coco))
    for im in images:
      _img(str(root / split / im["file_name"]))
  d = _data(dataset="objects365", root=str(root))
  b = catalog.get("objects365").prepare(d, str(tmp_path / "tfds"), str(tmp_path), 0)
  info = P.DetectionInfo.from_builder(b)
  assert info.class_names == ("Person", "Sneakers", "Chair")  # official: id i + 1 -> label i
  tr = P.open_split(b, "train")
  assert len(tr) == 3 and list(tr.num_instances) == [1, 1, 0]
  obj = tr[0]["objects"]
  np.testing.assert_array_equal(obj["label"], [2, 0])
  np.testing.assert_array_equal(obj["is_crowd"], [False, True])
  assert len(P.open_split(b, "val")) == 2
  # The samplers' image categories count crowd annotations too (as detectron2's dataset dicts).
  assert [c.tolist() for c in S.image_categories_from_split(tr)] == [[1, 3], [2], []]


def test_image_categories_from_split_json_and_scan_agree(lvis_prepared):
  builder = lvis_prepared[0]
  tr = P.open_split(builder, "train")
  from_json = S.image_categories_from_split(tr)
  assert [c.tolist() for c in from_json] == [[3, 4], [1, 3], [2, 3], []]
  bare = P.DetectionSplit(tr.source, name="train")  # no metadata: labels of the examples
  scanned = S.image_categories_from_split(bare)
  assert [(c + 1).tolist() for c in scanned] == [c.tolist() for c in from_json]


# ------------------------------------------------------------------------------------------------
# Repeat factors (detectron2 RepeatFactorTrainingSampler)
# ------------------------------------------------------------------------------------------------
def _d2_repeat_factors(dataset_dicts, repeat_thresh, sqrt=True):
  """detectron2's repeat_factors_from_category_frequency as a plain loop over dataset dicts."""
  category_freq = defaultdict(int)
  for dd in dataset_dicts:
    for cat_id in {ann["category_id"] for ann in dd["annotations"]}:
      category_freq[cat_id] += 1
  num_images = len(dataset_dicts)
  for k, v in category_freq.items():
    category_freq[k] = v / num_images
  category_rep = {
      c: max(1.0, math.sqrt(repeat_thresh / f) if sqrt else repeat_thresh / f)
      for c, f in category_freq.items()
  }
  return np.array(
      [
          max({category_rep[a["category_id"]] for a in dd["annotations"]}, default=1.0)
          for dd in dataset_dicts
      ]
  )


def _random_dicts(rng, n, num_cats):
  # Zipf-like category popularity, so that some categories are rare; some images are empty.
  p = 1.0 / np.arange(1, num_cats + 1) ** 1.3
  p /= p.sum()
  out = []
  for _ in range(n):
    k = int(rng.integers(0, 6))
    out.append({"annotations": [{"category_id": int(c)} for c in rng.choice(num_cats, k, p=p)]})
  return out


@pytest.mark.parametrize("thresh,sqrt", [(0.001, True), (0.05, True), (0.3, True), (0.3, False)])
def test_repeat_factors_match_detectron2_loop(thresh, sqrt):
  rng = np.random.default_rng(7)
  dicts = _random_dicts(rng, 400, 60)
  cats = [[a["category_id"] for a in dd["annotations"]] for dd in dicts]
  got = S.repeat_factors_from_category_frequency(cats, thresh, sqrt=sqrt)
  want = _d2_repeat_factors(dicts, thresh, sqrt)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
  assert got.min() >= 1.0 and (thresh < 0.01 or got.max() > 1.0)


def test_stochastic_rounding_expectation_and_epoch_lists():
  f = np.array([1.0, 1.25, 2.5, 3.9, 1.01, 7.0])
  epochs = 4000
  counts = np.stack([S.repeat_counts(f, 3, e) for e in range(epochs)])
  assert np.all((counts == np.floor(f)) | (counts == np.floor(f) + 1))
  frac = f - np.floor(f)
  sigma = np.sqrt(frac * (1 - frac) / epochs)
  err = np.abs(counts.mean(0) - f)
  assert np.all(err <= 5 * sigma + 1e-12), (counts.mean(0), f)
  np.testing.assert_array_equal(counts[:, [0, 5]], np.broadcast_to([1, 7], (epochs, 2)))
  for e in (0, 1, 17):
    idx = S.repeat_factor_epoch(f, 3, e)
    np.testing.assert_array_equal(np.bincount(idx, minlength=len(f)), S.repeat_counts(f, 3, e))
    np.testing.assert_array_equal(idx, S.epoch_indices(f, 3, e))  # pure function of (seed, e)
  assert not np.array_equal(S.repeat_factor_epoch(f, 3, 0), S.repeat_factor_epoch(f, 4, 0))


# ------------------------------------------------------------------------------------------------
# Class-aware sampling (CenterNet2 ClassAwareSampler)
# ------------------------------------------------------------------------------------------------
def test_class_aware_weights_and_draw_frequencies():
  rng = np.random.default_rng(1)
  dicts = _random_dicts(rng, 300, 20)
  cats = [[a["category_id"] for a in dd["annotations"]] for dd in dicts]
  # The official _get_class_balance_factor as a loop.
  freq = defaultdict(int)
  for dd in dicts:
    for c in {a["category_id"] for a in dd["annotations"]}:
      freq[c] += 1
  want = [sum(1.0 / freq[c] for c in {a["category_id"] for a in dd["annotations"]}) for dd in dicts]
  w = S.class_balance_weights(cats)
  np.testing.assert_allclose(w, want, rtol=1e-12)
  draws = np.concatenate([S.class_aware_epoch(w, 0, e) for e in range(200)])
  assert len(S.class_aware_epoch(w, 0, 0)) == len(w)  # an epoch is N draws
  assert np.all(w[np.unique(draws)] > 0)  # images without categories are never drawn
  emp = np.bincount(draws, minlength=len(w)) / draws.size
  p = w / w.sum()
  assert np.abs(emp - p).max() < 5 * np.sqrt(p.max() / draws.size)

  # Classes become more balanced than with uniform image sampling: the rarest class's share of
  # the draws rises towards the most frequent one's.
  def share(prob):
    per_class = defaultdict(float)
    for i, pi in enumerate(prob):
      for c in set(cats[i]):
        per_class[c] += pi
    v = np.array(list(per_class.values()))
    return v.min() / v.max()

  uniform = share(np.full(len(w), 1.0 / len(w)))
  aware = share(p)
  assert aware > 4 * uniform, (aware, uniform)
  np.testing.assert_array_equal(S.class_aware_epoch(w, 0, 5), S.class_aware_epoch(w, 0, 5))


# ------------------------------------------------------------------------------------------------
# The schedule: pure function of (seed, step), exact resume
# ------------------------------------------------------------------------------------------------
def _schedule(sampler, grouped, seed=5, gb=4, n_src=150):
  rng = np.random.default_rng(11)
  dicts = _random_dicts(rng, n_src, 30)
  cats = [[a["category_id"] for a in dd["annotations"]] for dd in dicts]
  order = np.array([i for i, c in enumerate(cats) if c])  # filter_empty
  groups = rng.integers(0, 3, n_src)
  s = schedule._make_schedule(
      order, groups, gb, seed, aspect_grouping=grouped, sampler=sampler,
      image_categories=cats, repeat_threshold=0.05,
  )  # fmt: skip
  return s, order, cats, groups


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("sampler", [S.REPEAT_FACTOR_SAMPLER, S.CLASS_AWARE_SAMPLER])
def test_sampled_schedule_is_a_pure_function_of_step(sampler, grouped):
  s, order, cats, groups = _schedule(sampler, grouped)
  assert isinstance(s, schedule._SampledSchedule) and (s.groups is not None) == grouped
  steps = 200  # several epochs, of varying lengths
  run = [s.indices(k) for k in range(steps)]
  assert s.epoch_of_step(steps - 1) >= 3
  # Resume at any step: a fresh schedule (or one sent to a worker) gives the same batches.
  for start in (0, 37, 151, 199):
    fresh, *_ = _schedule(sampler, grouped)
    for k in range(start, min(start + 5, steps)):
      np.testing.assert_array_equal(fresh.indices(k), run[k])
  clone = pickle.loads(pickle.dumps(s))
  np.testing.assert_array_equal(clone.indices(123), run[123])
  for k in (180, 3, 99):  # out of order
    np.testing.assert_array_equal(s.indices(k), run[k])
  assert all(np.isin(b, order).all() for b in run)
  if grouped:  # one aspect group per batch, except mixed remainder batches
    same = np.mean([len(set(groups[b])) == 1 for b in run])
    assert same > 0.7
  other, *_ = _schedule(sampler, grouped, seed=6)
  assert not all(np.array_equal(other.indices(k), run[k]) for k in range(5))


def test_rfs_schedule_stream_is_the_epoch_lists():
  """Ungrouped: the example stream is epoch 0's list, then epoch 1's, ... (varying lengths)."""
  s, order, cats, _ = _schedule(S.REPEAT_FACTOR_SAMPLER, False)
  factors = S.repeat_factors_from_category_frequency([cats[i] for i in order], 0.05)
  np.testing.assert_allclose(s.weights, factors)
  assert factors.max() > 1.5
  lists = [order[S.repeat_factor_epoch(factors, 5, e)] for e in range(4)]
  assert len({len(x) for x in lists}) > 1  # stochastic rounding: epoch lengths vary
  stream = np.concatenate(lists)
  n = len(stream) // s.global_batch
  got = np.concatenate([s.indices(k) for k in range(n)])
  np.testing.assert_array_equal(got, stream[: n * s.global_batch])
  # Rare-category images appear more often than in plain epochs, in proportion to their factors.
  seen = np.bincount(np.searchsorted(order, got), minlength=len(order))
  hi, lo = factors > 2, factors == 1
  assert seen[hi].mean() > 1.8 * seen[lo].mean()


def test_grouped_rfs_epoch_holds_the_epoch_list():
  s, order, _, groups = _schedule(S.REPEAT_FACTOR_SAMPLER, True)
  s._locate(0)
  steps0 = s._ends[0]  # steps of epoch 0
  batches = np.stack([s.indices(k) for k in range(steps0)])
  want = order[S.repeat_factor_epoch(s.weights, 5, 0)]
  # Every batch is cut from epoch 0's list (< one batch per group mix is dropped at most).
  got_counts = np.bincount(batches.ravel(), minlength=order.max() + 1)
  want_counts = np.bincount(want, minlength=order.max() + 1)
  assert np.all(got_counts <= want_counts)
  assert want_counts.sum() - got_counts.sum() < s.global_batch


def test_training_sampler_default_unchanged_and_bad_names():
  order, groups = np.arange(50), np.zeros(50, np.int64)
  plain = schedule._make_schedule(order, groups, 4, 0, aspect_grouping=True)
  assert isinstance(plain, schedule._GroupedSchedule)
  with pytest.raises(ValueError, match="sampler_train must be one of"):
    schedule._make_schedule(order, groups, 4, 0, aspect_grouping=True, sampler="Nope")
  with pytest.raises(ValueError, match="needs the categories"):
    schedule._make_schedule(
        order, groups, 4, 0, aspect_grouping=True, sampler=S.REPEAT_FACTOR_SAMPLER
    )


# ------------------------------------------------------------------------------------------------
# LVIS evaluation (the lvis package's LVISEval)
# ------------------------------------------------------------------------------------------------
def _perfect(gt):
  return [
      {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
      for a in gt["annotations"]
  ]


def test_lvis_eval_perfect_detections_give_ap_one(lvis_prepared):
  pytest.importorskip("lvis", reason="optional extra: pip install -r requirements-lvis.txt")
  builder = lvis_prepared[0]
  ann = P.DetectionInfo.from_builder(builder).annotation_file("val")
  gt = json.loads(open(ann).read())
  m = lvis_eval.evaluate_lvis(ann, _perfect(gt))
  for k in ("AP", "AP50", "AP75", "APr", "APc", "APf", "AR"):
    assert m[k] == pytest.approx(1.0), (k, m)
  # Federated: a detection of a category neither in the image nor in its neg list (image 21,
  # category 4 is not exhaustive; image 23 has no neg list) is not scored ...
  extra = _perfect(gt) + [
      {"image_id": 23, "category_id": 1, "bbox": [30.0, 2.0, 10.0, 10.0], "score": 0.99},
      {"image_id": 21, "category_id": 4, "bbox": [40.0, 2.0, 10.0, 10.0], "score": 0.99},
  ]
  assert lvis_eval.evaluate_lvis(ann, extra)["AP"] == pytest.approx(1.0)
  # ... one of a category in the image's neg list (image 22: 1 and 4) is a false positive.
  fp = _perfect(gt) + [
      {"image_id": 22, "category_id": 4, "bbox": [1.0, 2.0, 10.0, 10.0], "score": 0.99}
  ]
  m_fp = lvis_eval.evaluate_lvis(ann, fp)
  assert m_fp["APf"] < 1.0 and m_fp["APr"] == pytest.approx(1.0)
  # Restricted to some images: rare category 1 only has GT in image 21.
  m22 = lvis_eval.evaluate_lvis(ann, _perfect(gt), image_ids=[22])
  assert m22["APc"] == pytest.approx(1.0) and m22["APr"] == -1.0
  zero = lvis_eval.evaluate_lvis(ann, [])
  assert zero["AP"] == 0.0
  assert "float" not in np.__dict__  # the np.float alias for lvis 0.5.3 is gone again


def test_lvis_kind_extra_metrics_through_the_coco_evaluator(lvis_prepared):
  pytest.importorskip("lvis", reason="optional extra: pip install -r requirements-lvis.txt")
  from cn2_jax.evaluation.coco_eval import CocoEvaluator

  builder = lvis_prepared[0]
  info = P.DetectionInfo.from_builder(builder)
  ann = info.annotation_file("val")
  gt = json.loads(open(ann).read())
  ev = CocoEvaluator(ann, info.category_ids, verbose=False)
  by_img = defaultdict(list)
  for a in gt["annotations"]:
    by_img[a["image_id"]].append(a)
  ids = sorted(by_img)
  k = 3
  boxes = np.zeros((len(ids), k, 4))
  classes = np.zeros((len(ids), k), np.int64)
  valid = np.zeros((len(ids), k), bool)
  for i, iid in enumerate(ids):
    for j, a in enumerate(by_img[iid]):
      x, y, w, h = a["bbox"]
      boxes[i, j] = (x, y, x + w, y + h)
      classes[i, j] = info.category_id_to_label[a["category_id"]]
      valid[i, j] = True
  ev.add(ids, boxes, np.full((len(ids), k), 0.8), classes, valid)
  assert ev.evaluate()["AP"] == pytest.approx(1.0)
  m = catalog.get("lvis_v1").extra_metrics(ann, ev, {})
  assert m["lvis_AP"] == pytest.approx(1.0) and m["lvis_APr"] == pytest.approx(1.0)
  assert set(m) == {f"lvis_{n}" for n in lvis_eval.LVIS_METRIC_NAMES + ("AR", "ARs", "ARm", "ARl")}


def test_missing_lvis_package_is_a_one_line_error_naming_the_extra(monkeypatch, caplog):
  monkeypatch.setitem(sys.modules, "lvis", None)  # import lvis -> ImportError
  with pytest.raises(ImportError) as e:
    lvis_eval.require_lvis()
  assert isinstance(e.value, lvis_eval.LvisNotInstalledError)
  assert "requirements-lvis.txt" in str(e.value) and "\n" not in str(e.value)

  class _Ev:
    results, image_ids = [], []

  assert catalog.get("lvis_v1").extra_metrics("unused.json", _Ev(), {}) == {}
  assert "requirements-lvis.txt" in caplog.text
