"""Several datasets in one run (cn2_jax/data/mixture.py): image folders without annotations, the
weighted training mixture (proportions, determinism, exact resume, class offsets on the right
channels for ignore_unlabel), woGT's random crops, per-dataset evaluation with the channel
mapping, the config keys and the example configs. Tiny COCO-json datasets written here."""

from __future__ import annotations

import json
import os
import pickle
import types

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cn2_jax import app
from cn2_jax.config import base_config, config_from_json, load_config_file, validate_config
from cn2_jax.data import augment as A
from cn2_jax.data import mixture
from cn2_jax.data import pipeline as P
from cn2_jax.data import schedule
from cn2_jax.data.datasets import image_folder
from cn2_jax.errors import ConfigError
from cn2_jax.evaluation.coco_eval import COCO_METRIC_NAMES
from cn2_jax.modeling.onestage import losses as L
from cn2_jax.modeling.onestage import targets as TG

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W = 32, 48  # every image: 48 x 32 (w x h); short side 32 = no resize


def _img(path, color=(90, 60, 30), size=(W, H)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", size, color).save(path)


def write_coco(root, name, ids, boxes, empty_ids=()):
  """A COCO-json dataset of one class ``name``: images ``ids`` (one box each, ``boxes[i]`` xywh,
  none for ``empty_ids``) in train and val jsons."""
  images, anns = [], []
  for i in ids:
    _img(os.path.join(root, f"{i}.png"), (i % 250, 40, 80))
    images.append({"id": i, "file_name": f"{i}.png", "height": H, "width": W})
    if i not in empty_ids:
      anns.append(
          {"id": len(anns) + 1, "image_id": i, "category_id": 1, "bbox": list(boxes[i]),
           "area": 1.0 * boxes[i][2] * boxes[i][3], "iscrowd": 0}
      )  # fmt: skip
  coco = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": name}]}
  for split in ("train", "val"):
    with open(os.path.join(root, f"instances_{split}.json"), "w") as f:
      json.dump(coco, f)


PEOPLE_IDS = (1, 2, 3, 4, 5, 6)  # image 6 has no box
FACE_IDS = (101, 102, 103, 104)


def _boxes(ids, k):
  return {i: (2.0 + (i + k) % 5, 3.0 + i % 4, 12.0 + i % 7, 10.0 + i % 3) for i in ids}


def coco_entry(root, **kw):
  return dict(
      dataset="coco_json",
      root=str(root),
      train_json="instances_train.json",
      val_json="instances_val.json",
      **kw,
  )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """Two prepared datasets (people: class person, 6 images, one empty; faces: class face, 4
  images) and an image folder (3 images)."""
  root = tmp_path_factory.mktemp("mix")
  write_coco(root / "people", "person", PEOPLE_IDS, _boxes(PEOPLE_IDS, 0), empty_ids=(6,))
  write_coco(root / "faces", "face", FACE_IDS, _boxes(FACE_IDS, 1))
  _img(str(root / "folder" / "3.PNG"))
  _img(str(root / "folder" / "a" / "1.png"), (10, 200, 10))
  _img(str(root / "folder" / "a" / "b" / "2.png"), (200, 10, 10))
  _img(str(root / "folder" / ".hidden.png"))
  (root / "folder" / "notes.txt").write_text("not an image")
  cfg = base_config()
  cfg.data.data_dir = str(root / "tfds")
  cfg.data.num_workers = 0
  out = types.SimpleNamespace(root=root, cfg=cfg)
  for key, sub in (("people", "people"), ("faces", "faces")):
    part = mixture.source_config(cfg.data, coco_entry(root / sub))
    b = app.prepare_dataset(cfg, str(root), data=part)
    setattr(out, key, P.open_split(b, "train"))
  part = mixture.source_config(cfg.data, {"dataset": "image_folder", "root": str(root / "folder")})
  out.folder = P.open_split(app.prepare_dataset(cfg, str(root), data=part), "train")
  return out


KW = dict(batch_size=4, short_sizes=(H,), max_size=W, max_boxes=4, hflip_prob=0.0)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------
# Image folders
# ------------------------------------------------------------------------------------------------
def test_image_folder_records_have_no_boxes_and_are_all_kept(data):
  files = image_folder.image_folder_files(str(data.root / "folder"))
  assert files == ["3.PNG", "a/1.png", "a/b/2.png"]
  split = data.folder
  assert len(split) == 3 and split.num_instances.tolist() == [0, 0, 0]
  assert split.info.class_names == (image_folder.UNLABELLED,)
  assert all(len(split[i]["objects"]["bbox"]) == 0 for i in range(3))
  # the loader keeps them although filter_empty is on for the mixture
  part = P.TrainPart(split, filter_empty=False)
  assert P.num_train_images([part], filter_empty=True) == 3
  (b,) = _take(
      P.make_train_loader([part], P.TrainLoaderSettings(seed=0, **dict(KW, batch_size=3))), 1
  )
  assert sorted(b["image_id"].tolist()) == [1, 2, 3] and not b["gt_valid"].any()
  with pytest.raises(ValueError, match="no training examples"):
    P.make_train_loader(split, P.TrainLoaderSettings(filter_empty=True, **KW))


def test_image_folder_is_reconverted_when_the_folder_changes(tmp_path):
  folder = tmp_path / "imgs"
  _img(str(folder / "x.png"))
  cfg = base_config()
  cfg.data.dataset, cfg.data.root, cfg.data.eval_split = "image_folder", str(folder), ""
  cfg.data.data_dir = str(tmp_path / "tfds")
  validate_config(cfg)
  assert len(P.open_split(app.prepare_dataset(cfg, str(tmp_path)), "train")) == 1
  _img(str(folder / "sub" / "y.jpg"))
  assert len(P.open_split(app.prepare_dataset(cfg, str(tmp_path)), "train")) == 2


def test_crop_position_is_uniform_without_gt_or_around_instance_false():
  img = np.zeros((40, 60, 3), np.uint8)
  img[:, :, 0] = np.arange(60)[None, :]  # x coordinate
  img[:, :, 1] = np.arange(40)[:, None]  # y coordinate
  box = np.array([[50.0, 30.0, 58.0, 38.0]], np.float32)  # bottom-right corner
  centre_in, positions = {True: [], False: []}, set()
  for seed in range(200):
    for around in (True, False):
      out, b, _ = A.random_crop_relative_range(
          img, box, (0.5, 0.5), np.random.default_rng(seed), around
      )
      x0, y0 = int(out[0, 0, 0]), int(out[0, 0, 1])
      h, w = out.shape[:2]
      centre_in[around].append(x0 <= 54 <= x0 + w and y0 <= 34 <= y0 + h)
      if not around:
        positions.add((x0, y0))
    out, b, keep = A.random_crop_relative_range(
        img, box[:0], (0.5, 0.5), np.random.default_rng(seed)
    )
    assert len(b) == 0 and len(keep) == 0
  assert all(centre_in[True])  # centerX with GT: the window holds a box centre
  assert 0.05 < np.mean(centre_in[False]) < 0.9  # woGT: plain random
  assert len(positions) > 50


def _corner_source(n=6):
  """In-memory examples, each a small box in the bottom-right corner."""
  import io

  recs = []
  for i in range(n):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (i * 20, 5, 5)).save(buf, format="PNG")
    recs.append(
        {
            "image": buf.getvalue(),
            "objects": {
                "bbox": np.array([[56.0, 56.0, 63.0, 63.0]], np.float32),
                "label": np.array([0]),
                "is_crowd": np.array([False]),
            },
            "image/id": i + 1,
            "image/filename": f"{i}.png",
        }
    )
  return recs


def test_wogt_loader_crops_at_random_not_around_a_box():
  aug = A.AugmentSettings.from_config(dict(base_config().data, crop_relative_range=(0.3, 0.3)))
  kw = dict(batch_size=6, short_sizes=(64,), max_size=64, max_boxes=2, augment=aug)
  around = _take(P.make_train_loader(_corner_source(), P.TrainLoaderSettings(seed=3, **kw)), 4)
  random = _take(
      P.make_train_loader(
          _corner_source(), P.TrainLoaderSettings(seed=3, crop_around_gt=False, **kw)
      ),
      4,
  )
  assert all(b["gt_valid"].any(axis=1).all() for b in around)
  assert not all(b["gt_valid"].any(axis=1).all() for b in random)


# ------------------------------------------------------------------------------------------------
# Mixture sampling
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", [(3.0, 1.0), (0.5, 0.3, 0.2), (15000.0, 12880.0)])
def test_mixture_proportions_follow_the_weights(weights):
  sizes = (5, 3, 7)[: len(weights)]
  starts = np.cumsum((0,) + sizes)
  orders = [np.arange(starts[k], starts[k + 1]) for k in range(len(weights))]
  sched = schedule._MixtureSchedule(orders, weights, global_batch=8, seed=0)
  idx = np.concatenate([sched.indices(s) for s in range(500)])
  part = np.searchsorted(starts, idx, side="right") - 1
  frac = np.bincount(part, minlength=len(weights)) / len(idx)
  np.testing.assert_allclose(frac, np.array(weights) / sum(weights), atol=0.005)
  for k, o in enumerate(orders):  # each dataset runs through its own epochs: every image once
    drawn = idx[part == k]
    for e in range(len(drawn) // len(o)):
      assert sorted(drawn[e * len(o) : (e + 1) * len(o)].tolist()) == o.tolist()
  again = pickle.loads(pickle.dumps(sched))  # as sent to grain workers
  assert all(np.array_equal(again.indices(s), sched.indices(s)) for s in (0, 7, 499))
  other = schedule._MixtureSchedule(orders, weights, global_batch=8, seed=1)
  assert not all(np.array_equal(other.indices(s), sched.indices(s)) for s in range(5))


def test_mixture_loader_is_deterministic_resumes_exactly_and_offsets_classes(data):
  parts = [P.TrainPart(data.people, 1.0, 0), P.TrainPart(data.faces, 1.0, 1)]
  ref = _take(P.make_train_loader(parts, P.TrainLoaderSettings(seed=5, **KW)), 6)
  again = _take(P.make_train_loader(parts, P.TrainLoaderSettings(seed=5, **KW)), 6)
  assert all(_same(a, b) for a, b in zip(ref, again))
  resumed = _take(P.make_train_loader(parts, P.TrainLoaderSettings(seed=5, **KW), 3), 3)
  assert all(_same(a, b) for a, b in zip(ref[3:], resumed))
  other = _take(P.make_train_loader(parts, P.TrainLoaderSettings(seed=6, **KW)), 6)
  assert not all(_same(a, b) for a, b in zip(ref, other))
  ids = np.concatenate([b["image_id"] for b in ref])
  assert 6 not in ids  # filter_empty: the people image without a box
  assert np.mean(ids >= 100) == pytest.approx(0.5)  # weights 1 : 1
  for b in ref:
    for j, iid in enumerate(b["image_id"]):
      v = b["gt_valid"][j]
      assert v.sum() == 1
      assert b["gt_classes"][j][v].tolist() == [1 if iid >= 100 else 0]
  # two processes split the same global batches
  halves = [
      _take(P.make_train_loader(parts, P.TrainLoaderSettings(seed=5, process_index=p, process_count=2, **dict(KW, batch_size=2))), 2)
      for p in (0, 1)
  ]  # fmt: skip
  for s in range(2):
    both = np.concatenate([halves[0][s]["image_id"], halves[1][s]["image_id"]])
    assert np.array_equal(both, ref[s]["image_id"])
  assert P.num_train_images(parts, filter_empty=True) == 5 + 4
  assert P.num_train_images(parts, filter_empty=False) == 6 + 4


def test_mixed_batch_classes_land_on_their_channels_for_ignore_unlabel(data):
  """A people image's boxes are on channel 0, a face image's on channel 1; with ignore_unlabel
  the channel an image's dataset does not label contributes no negatives."""
  parts = [P.TrainPart(data.people, 2.0, 0), P.TrainPart(data.faces, 1.0, 1)]
  (b,) = _take(
      P.make_train_loader(parts, P.TrainLoaderSettings(seed=0, **dict(KW, batch_size=6))), 1
  )
  hw = b["image"].shape[1:3]
  t = TG.batch_targets(
      jnp.asarray(b["gt_boxes"]), jnp.asarray(b["gt_classes"]), jnp.asarray(b["gt_valid"]),
      out_hw=(hw[0] // 4, hw[1] // 4), num_classes=2,
  )  # fmt: skip
  heat = np.asarray(t["score_map"])  # [B, h, w, 2]
  face = b["image_id"] >= 100
  assert face.any() and (~face).any()
  labelled = heat.max(axis=(1, 2)) > 0  # [B, 2]
  assert np.array_equal(labelled, np.stack([~face, face], 1))
  # a confident wrong prediction on the unlabelled channel costs nothing with ignore_unlabel
  pred = np.full(heat.shape, 0.1, np.float32)
  wrong = pred.copy()
  wrong[~face, :, :, 1] = 0.9
  wrong[face, :, :, 0] = 0.9
  for ignore, equal in ((True, True), (False, False)):
    l0, _ = L.modified_focal_loss(jnp.asarray(pred), jnp.asarray(heat), ignore_unlabel=ignore)
    l1, _ = L.modified_focal_loss(jnp.asarray(wrong), jnp.asarray(heat), ignore_unlabel=ignore)
    assert (float(l0) == pytest.approx(float(l1))) == equal


# ------------------------------------------------------------------------------------------------
# Per-dataset evaluation
# ------------------------------------------------------------------------------------------------
def test_channel_slice():
  classes = np.array([[0, 1, 2, 1]])
  valid = np.array([[True, True, True, False]])
  c, v = mixture.channel_slice(classes, valid, 1, 1)
  assert v.tolist() == [[False, True, False, False]] and c[v].tolist() == [0]
  c, v = mixture.channel_slice(classes, valid, 0, 3)
  assert v.tolist() == valid.tolist() and np.array_equal(c[v], classes[valid])


def _oracle_eval_step(model, mesh):
  """A fake model (app.step_lib.make_eval_step) that knows every image (its id is its red value):
  each GT box on the model's channel of its dataset (people 0, faces 1; score 0.9) plus a more
  confident false box on the other channel."""
  gt = {**_boxes(PEOPLE_IDS, 0), **_boxes(FACE_IDS, 1)}

  def step(variables, batch):
    image = np.asarray(batch["image"])
    n = image.shape[0]
    boxes = np.zeros((n, 2, 4), np.float32)
    classes = np.zeros((n, 2), np.int32)
    valid = np.zeros((n, 2), bool)
    for j in range(n):
      i = int(image[j, 0, 0, 0])
      if i in gt and i != 6:
        x, y, w, h = gt[i]
        boxes[j] = [(x, y, x + w, y + h), (x + 1, y + 1, x + w + 1, y + h + 1)]
        classes[j] = (1, 0) if i >= 100 else (0, 1)
        valid[j] = True
    scores = np.tile(np.array([[0.9, 0.95]], np.float32), (n, 1))
    return dict(boxes=boxes, scores=scores, classes=classes, valid=valid)

  return step


def test_extra_eval_maps_each_dataset_to_its_channels(data, tmp_path, monkeypatch):
  cfg = base_config()
  cfg.compilation_cache_dir = ""
  cfg.model.num_classes = 2
  d = cfg.data
  d.update(coco_entry(data.root / "people"))
  d.data_dir, d.num_workers = data.cfg.data.data_dir, 0
  d.min_size_test, d.max_size_test = H, 1000  # no resize
  d.extra_eval = (coco_entry(data.root / "faces", channel_offset=1, name="faces"),)
  cfg.train.eval_batch_size = 2
  validate_config(cfg)
  monkeypatch.setattr(app.detector, "build_model", lambda m: None)
  monkeypatch.setattr(app.step_lib, "make_eval_step", _oracle_eval_step)
  metrics = app.evaluate(cfg, str(tmp_path), variables={})
  assert metrics["AP"] == pytest.approx(1.0) and metrics["faces/AP"] == pytest.approx(1.0)
  with open(tmp_path / "eval" / "metrics.json") as f:
    saved = json.load(f)
  assert saved["faces/AP"] == pytest.approx(1.0)
  assert saved["num_images"] == 6 and saved["faces/num_images"] == 4
  with open(tmp_path / "eval" / "faces" / "coco_results.json") as f:
    res = json.load(f)
  assert {r["category_id"] for r in res} == {1} and len(res) == 4  # the false ones dropped
  # only the extra datasets
  d.eval_split = ""
  metrics = app.evaluate(cfg, str(tmp_path), variables={})
  assert set(metrics) == {f"faces/{k}" for k in COCO_METRIC_NAMES}
  d.extra_eval = ()
  with pytest.raises(ConfigError, match="nothing to evaluate"):
    app.evaluate(cfg, str(tmp_path), variables={})


def test_train_wires_the_mixture(data, tmp_path, monkeypatch):
  """app.train: datasets concatenated with their offsets, woGT keeps empty and folder images,
  an epoch counts every dataset's images, dataset_info.json names the channels."""
  cfg = base_config()
  cfg.model.num_classes = 2
  d = cfg.data
  d.update(coco_entry(data.root / "people"))
  d.data_dir, d.num_workers = data.cfg.data.data_dir, 0
  d.min_size_train, d.max_size_train, d.pad_hw_train = (H,), W, (64, 64)
  d.mixture = (
      coco_entry(data.root / "faces", channel_offset=1, weight=1.0),
      {"dataset": "image_folder", "root": str(data.root / "folder"), "weight": 0.5},
  )
  cfg.kd.without_label = True
  cfg.optim.epochs = 1.0
  cfg.train.batch_size = 4
  validate_config(cfg)
  seen = {}

  def fake_loop_train(cfg, workdir, model, init_fn, train_batches, **kw):
    seen["n"] = kw["num_train_images"]
    seen["batches"] = _take(train_batches(0), 3)
    return types.SimpleNamespace(step=0)

  monkeypatch.setattr(app.loop, "train", fake_loop_train)
  app.train(cfg, str(tmp_path))
  assert seen["n"] == 6 + 4 + 3  # woGT: the empty people image counts
  classes = []
  for b in seen["batches"]:
    assert set(b) == {"image", "image_hw", "gt_boxes", "gt_classes", "gt_valid", "gt_crowd"}
    classes += b["gt_classes"][b["gt_valid"]].tolist()
  assert set(classes) == {0, 1}
  with open(tmp_path / "dataset_info.json") as f:
    assert json.load(f)["class_names"] == ["person", "face"]
  saved = config_from_json(str(tmp_path / "config.json"))
  assert saved.data.mixture == cfg.data.mixture


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
def _mix_cfg(**data):
  cfg = base_config()
  cfg.model.num_classes = 2
  for k, v in data.items():
    cfg.data[k] = v
  return cfg


@pytest.mark.parametrize(
    "data, match",
    [
        (
            dict(mixture=({"dataset": "wider_face", "rot": "/x"},)),
            r"data\.mixture\[0\]\.rot is not",
        ),
        (dict(mixture=({"root": "/x"},)), r"data\.mixture\[0\] needs a 'dataset'"),
        (dict(mixture=({"dataset": "wider_face", "weight": 0.0},)), r"mixture\[0\]\.weight"),
        (dict(mixture=({"dataset": "wider_face", "channel_offset": 2},)), r"exceed model"),
        (dict(mixture=({"dataset": "voc", "classes": ("a", "b"), "channel_offset": 1},)), "exceed"),
        (dict(mixture=({"dataset": "voc", "classes": "car"},)), r"mixture\[0\]\.classes"),
        (dict(mixture=({"dataset": "wider_face", "root": 3},)), r"mixture\[0\]\.root must be"),
        (dict(mixture=({"dataset": "nope"},)), r"mixture\[0\]\.dataset must be one of"),
        (dict(mixture=("wider_face",)), r"data\.mixture\[0\] must be a dict"),
        (dict(mix_weight=-1.0), "data.mix_weight"),
        (dict(channel_offset=2, dataset="crowdhuman"), "data.channel_offset=2"),
        (dict(dataset="image_folder"), "data.eval_split='val': an image_folder"),
        (dict(dataset="image_folder", eval_split="", classes=("a",)), "image_folder dataset has"),
        (dict(extra_eval=({"dataset": "wider_face"},)), r"extra_eval\[0\]\.name"),
        (dict(extra_eval=({"dataset": "wider_face", "name": "a/b"},)), r"extra_eval\[0\]\.name"),
        (
            dict(extra_eval=({"dataset": "wider_face", "name": "w", "weight": 1.0},)),
            "weight is not",
        ),
        (
            dict(extra_eval=({"dataset": "image_folder", "name": "f", "eval_split": ""},)),
            "needs an",
        ),
    ],
)
def test_config_errors_are_one_line_and_name_the_key(data, match):
  with pytest.raises(ConfigError, match=match) as e:
    validate_config(_mix_cfg(**data))
  assert "\n" not in str(e.value)


def test_config_json_round_trip(tmp_path):
  cfg = _mix_cfg(
      mixture=({"dataset": "coco/2017", "classes": ("car",), "channel_offset": 1, "weight": 2.0},),
      extra_eval=({"dataset": "coco/2017", "classes": ("car",), "channel_offset": 1,
                   "name": "coco_car"},),
  )  # fmt: skip
  validate_config(cfg)
  path = tmp_path / "config.json"
  path.write_text(cfg.to_json_best_effort())
  back = config_from_json(str(path))
  assert back.data.mixture == cfg.data.mixture and back.data.extra_eval == cfg.data.extra_eval
  assert isinstance(back.data.mixture[0]["classes"], tuple)


def test_example_person_face_configs_load_and_validate():
  mix = load_config_file(os.path.join(REPO, "configs", "person_face_mix_ignore_unlabel.py"))
  kd = load_config_file(os.path.join(REPO, "configs", "person_face_multi_kd.py"))
  for c in (mix, kd):
    assert c.model.arch == "onestage" and c.model.num_classes == 2
    assert c.data.dataset == "crowdhuman" and c.data.channel_offset == 0
    (wider,) = c.data.mixture
    assert wider["dataset"] == "wider_face" and wider["channel_offset"] == 1
    assert c.data.extra_eval[0]["name"] == "wider_face"
    assert c.data.extra_eval[0]["channel_offset"] == 1
  assert mix.model.onestage.ignore_unlabel and not mix.kd.teacher_workdirs
  assert kd.kd.without_label and tuple(kd.kd.cls_index) == (1, 2)
  assert tuple(kd.kd.cls_weight) == (1e3, 2e3) and tuple(kd.kd.wh_weight) == (1.0, 2.0)
  assert len(kd.kd.teacher_workdirs) == 2
  from configs import person_face_multi_kd

  c = validate_config(person_face_multi_kd.get_config("/data/ch,/data/wider"))
  assert c.data.root == "/data/ch" and c.data.mixture[0]["root"] == "/data/wider"
  assert c.data.extra_eval[0]["root"] == "/data/wider"
