"""CrowdHuman / WIDER Face / VOC sources (cn2_jax/data/datasets/) and class subsets
(cn2_jax/data/sources.py), on tiny files written here: parsing, conversion, the prepared dataset
through the pipeline, config keys."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from cn2_jax import app
from cn2_jax.config import base_config, validate_config
from cn2_jax.data import pipeline as P
from cn2_jax.data.datasets import crowdhuman, voc, wider_face
from cn2_jax.errors import DataError

W, H = 64, 48  # every test image is 64 x 48 (w x h): evaluated at short side 48, boxes unscaled


def _img(path, size=(W, H), fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", size, (120, 60, 30)).save(path, format=fmt)


def _cfg(tmp_path, **data):
  cfg = base_config()
  cfg.data.data_dir = str(tmp_path / "tfds")
  cfg.data.num_workers = 0
  for k, v in data.items():
    cfg.data[k] = v
  return validate_config(cfg)


def _eval_examples(builder, split):
  """{image_id: (boxes, classes, crowd)} through the eval loader (no resize: short side 48)."""
  sp = P.open_split(builder, split)
  out = {}
  for b in P.make_eval_loader(sp, batch_size=2, short_size=H, max_size=1000, max_boxes=8):
    assert np.array_equal(b["image_hw"][b["batch_mask"]], b["orig_hw"][b["batch_mask"]])
    for j in np.nonzero(b["batch_mask"])[0]:
      v = b["gt_valid"][j] | b["gt_crowd"][j]
      out[int(b["image_id"][j])] = (b["gt_boxes"][j, v], b["gt_classes"][j, v], b["gt_crowd"][j, v])
  return out


# ------------------------------------------------------------------------------------------------
# CrowdHuman
# ------------------------------------------------------------------------------------------------
CH_REC1 = {
    "ID": "273271,c9db000d5146c15",
    "gtboxes": [
        {  # fbox leaves the image on the left and bottom
            "tag": "person",
            "fbox": [-5, 2, 30, 50],
            "vbox": [1, 3, 20, 30],
            "hbox": [8, 4, 6, 6],
            "head_attr": {"ignore": 0, "occ": 0, "unsure": 0},
            "extra": {"box_id": 0, "occ": 1},
        },
        {  # head marked ignore: an ignore region only for hbox
            "tag": "person",
            "fbox": [30, 5, 20, 40],
            "vbox": [32, 6, 15, 30],
            "hbox": [36, 6, 5, 5],
            "head_attr": {"ignore": 1},
            "extra": {"box_id": 1, "occ": 0},
        },
        {  # a "mask" region (reflection, poster, crowd): ignore
            "tag": "mask",
            "fbox": [50, 30, 10, 10],
            "vbox": [50, 30, 10, 10],
            "hbox": [50, 30, 10, 10],
            "head_attr": {},
            "extra": {"ignore": 1},
        },
        {  # a person with extra.ignore = 1: ignore
            "tag": "person",
            "fbox": [2, 20, 10, 20],
            "vbox": [2, 20, 8, 10],
            "hbox": [3, 20, 4, 4],
            "head_attr": {"ignore": 0},
            "extra": {"box_id": 3, "ignore": 1},
        },
    ],
}
CH_REC2 = {  # ignore regions only
    "ID": "284193,faa9000f2678b5e",
    "gtboxes": [{"tag": "mask", "fbox": [0, 0, 30, 30], "extra": {"ignore": 1}}],
}
CH_REC3 = {"ID": "no_people", "gtboxes": []}


def write_crowdhuman(root, train=(CH_REC1, CH_REC2, CH_REC3), val=(CH_REC1, CH_REC3)):
  os.makedirs(root, exist_ok=True)
  for name, recs in (("train", train), ("val", val)):
    with open(os.path.join(root, f"annotation_{name}.odgt"), "w") as f:
      for r in recs:
        f.write(json.dumps(r) + "\n")
      f.write("\n")  # a blank line is skipped
  for r in {r["ID"]: r for r in (*train, *val)}.values():
    _img(os.path.join(root, "Images", f"{r['ID']}.jpg"))


@pytest.mark.parametrize(
    "box, boxes, ignore",
    [
        (
            "vbox",
            [[1, 3, 21, 33], [32, 6, 47, 36], [50, 30, 60, 40], [2, 20, 10, 30]],
            [0, 0, 1, 1],
        ),
        (
            "fbox",
            [[-5, 2, 25, 52], [30, 5, 50, 45], [50, 30, 60, 40], [2, 20, 12, 40]],
            [0, 0, 1, 1],
        ),
        ("hbox", [[8, 4, 14, 10], [36, 6, 41, 11], [50, 30, 60, 40], [3, 20, 7, 24]], [0, 1, 1, 1]),
    ],
)
def test_crowdhuman_parse_box_types_and_ignore_regions(tmp_path, box, boxes, ignore):
  path = tmp_path / "a.odgt"
  path.write_text("\n".join(json.dumps(r) for r in (CH_REC1, CH_REC2, CH_REC3)))
  images = crowdhuman.parse_crowdhuman(str(path), box)
  assert [im.file_name for im in images] == [f"{r['ID']}.jpg" for r in (CH_REC1, CH_REC2, CH_REC3)]
  assert [im.image_id for im in images] == [1, 2, 3]
  np.testing.assert_array_equal(images[0].boxes, boxes)
  np.testing.assert_array_equal(images[0].ignore, np.array(ignore, bool))
  assert images[0].names == ["person"] * 4
  # an ignore region without the chosen box key falls back to its fbox
  np.testing.assert_array_equal(images[1].boxes, [[0, 0, 30, 30]])
  assert images[1].ignore.tolist() == [True]
  assert images[2].boxes.shape == (0, 4)


def test_crowdhuman_bad_lines_are_one_line_errors(tmp_path):
  bad = tmp_path / "bad.odgt"
  bad.write_text(json.dumps(CH_REC3) + "\n{not json\n")
  with pytest.raises(DataError, match=r"bad.odgt:2 is not a JSON object"):
    crowdhuman.parse_crowdhuman(str(bad))
  bad.write_text(json.dumps({"ID": "x", "gtboxes": [{"tag": "person", "fbox": [1, 2, 3, 4]}]}))
  with pytest.raises(DataError, match=r"bad.odgt:1 \(ID 'x'\): a box lacks 'vbox'"):
    crowdhuman.parse_crowdhuman(str(bad), "vbox")
  bad.write_text(json.dumps(CH_REC3) + "\n" + json.dumps(CH_REC3))
  with pytest.raises(DataError, match="appears twice"):
    crowdhuman.parse_crowdhuman(str(bad))


def test_crowdhuman_prepared_round_trip_and_caching(tmp_path):
  root = tmp_path / "CrowdHuman"
  write_crowdhuman(str(root))
  cfg = _cfg(tmp_path, dataset="crowdhuman", root=str(root))
  b = app.prepare_dataset(cfg, str(tmp_path / "run"))
  assert os.path.basename(os.path.dirname(os.fspath(b.data_dir))) == "crowdhuman-vbox"
  info = P.DetectionInfo.from_builder(b)
  assert info.class_names == ("person",) and info.category_ids == (1,)
  meta = b.info.metadata["splits"]
  assert meta["train"]["num_images"] == 3 and meta["train"]["num_instances"] == [2, 0, 0]
  assert meta["train"]["num_crowd"] == 3
  ex = _eval_examples(b, "val")
  assert sorted(ex) == [1, 2]
  boxes, classes, crowd = ex[1]
  # non-crowd first (pad_gt), then the ignore regions
  np.testing.assert_allclose(
      boxes, [[1, 3, 21, 33], [32, 6, 47, 36], [50, 30, 60, 40], [2, 20, 10, 30]]
  )
  assert classes.tolist() == [0] * 4 and crowd.tolist() == [False, False, True, True]
  assert ex[2][0].shape == (0, 4)
  # the converted json is the eval ground truth: ignore regions are iscrowd boxes
  ann = info.annotation_file("val")
  assert ann.endswith(os.path.join("converted", "crowdhuman-vbox", "val.json"))
  with open(ann) as f:
    gt = json.load(f)
  assert [im["file_name"] for im in gt["images"]] == [f"{CH_REC1['ID']}.jpg", "no_people.jpg"]
  assert gt["images"][0]["height"] == H and gt["images"][0]["width"] == W
  assert [a["iscrowd"] for a in gt["annotations"]] == [0, 0, 1, 1]

  # training: ignore regions are crowd boxes (no positives), the images without people dropped
  train = P.open_split(b, "train")
  batch = next(
      P.make_train_loader(
          train, P.TrainLoaderSettings(batch_size=1, short_sizes=(H,), max_size=1000, max_boxes=8)
      )
  )
  assert batch["image_id"].tolist() == [1]
  assert batch["gt_valid"][0].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
  assert batch["gt_crowd"][0].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]

  # unchanged sources (even touched ones): neither the converted json nor the dataset is remade
  stamp = os.stat(ann).st_mtime_ns
  info_file = os.path.join(os.fspath(b.data_dir), "dataset_info.json")
  info_stamp = os.stat(info_file).st_mtime_ns
  os.utime(root / "annotation_val.odgt")
  b2 = app.prepare_dataset(cfg, str(tmp_path / "run"))
  assert os.stat(ann).st_mtime_ns == stamp
  assert os.stat(info_file).st_mtime_ns == info_stamp and b2.data_dir == b.data_dir

  # full-body boxes: another dataset; fbox clipped to the image
  cfg_f = _cfg(tmp_path, dataset="crowdhuman", root=str(root), crowdhuman_box="fbox")
  bf = app.prepare_dataset(cfg_f, str(tmp_path / "run"))
  assert "crowdhuman-fbox" in os.fspath(bf.data_dir)
  np.testing.assert_allclose(
      _eval_examples(bf, "val")[1][0],
      [[0, 2, 25, 48], [30, 5, 50, 45], [50, 30, 60, 40], [2, 20, 12, 40]],
  )

  # a changed annotation file is converted again and the dataset rebuilt
  rec = json.loads(json.dumps(CH_REC1))
  rec["gtboxes"] = rec["gtboxes"][:1]
  write_crowdhuman(str(root), val=(rec, CH_REC3))
  b3 = app.prepare_dataset(cfg, str(tmp_path / "run"))
  np.testing.assert_allclose(_eval_examples(b3, "val")[1][0], [[1, 3, 21, 33]])


# ------------------------------------------------------------------------------------------------
# WIDER Face
# ------------------------------------------------------------------------------------------------
WIDER_TRAIN = """0--Parade/0_Parade_a.jpg
3
1 2 10 12 1 0 0 0 0 1 
20 5 8 0 0 0 0 0 0 0 
30 10 40 50 2 0 0 1 0 0 
1--Handshaking/1_b.jpg
0
0 0 0 0 0 0 0 0 0 0 
1--Handshaking/1_c.jpg
1
5 5 10 10 0 0 0 0 0 0 
"""
WIDER_VAL = """1--Handshaking/1_c.jpg
1
5 5 10 10 0 0 0 0 0 0
"""


def write_wider(root):
  os.makedirs(os.path.join(root, "wider_face_split"))
  for split, text in (("train", WIDER_TRAIN), ("val", WIDER_VAL)):
    with open(os.path.join(root, "wider_face_split", f"wider_face_{split}_bbx_gt.txt"), "w") as f:
      f.write(text)
    for line in text.splitlines():
      if line.endswith(".jpg"):
        _img(os.path.join(root, f"WIDER_{split}", "images", line))


def test_wider_face_parse(tmp_path):
  path = tmp_path / "gt.txt"
  path.write_text(WIDER_TRAIN)
  a, b, c = wider_face.parse_wider_face(str(path))
  assert (a.file_name, b.file_name, c.file_name) == (
      "0--Parade/0_Parade_a.jpg",
      "1--Handshaking/1_b.jpg",
      "1--Handshaking/1_c.jpg",
  )
  np.testing.assert_array_equal(a.boxes, [[1, 2, 11, 14], [20, 5, 28, 5], [30, 10, 70, 60]])
  assert a.ignore.tolist() == [False, False, True]  # the "invalid" face
  assert b.boxes.shape == (0, 4) and [a.image_id, b.image_id, c.image_id] == [1, 2, 3]
  # a 0-face image without its line of zeros is read too
  path.write_text("x/1.jpg\n0\nx/2.jpg\n1\n1 1 4 4 0 0 0 0 0 0\n")
  one, two = wider_face.parse_wider_face(str(path))
  assert one.boxes.shape == (0, 4) and two.boxes.tolist() == [[1, 1, 5, 5]]
  path.write_text("x/1.jpg\nabc\n")
  with pytest.raises(DataError, match=r"gt.txt:2: expected the face count of x/1.jpg"):
    wider_face.parse_wider_face(str(path))
  path.write_text("x/1.jpg\n2\n1 1 4 4 0 0 0 0 0 0\n")
  with pytest.raises(DataError, match="has 2 faces but the file ends"):
    wider_face.parse_wider_face(str(path))


def test_wider_face_prepared_round_trip(tmp_path):
  root = tmp_path / "WIDER"
  write_wider(str(root))
  b = app.prepare_dataset(_cfg(tmp_path, dataset="wider_face", root=str(root)), str(tmp_path))
  info = P.DetectionInfo.from_builder(b)
  assert info.class_names == ("face",) and info.category_ids == (1,)
  assert "coco_json/wider_face/" in os.fspath(b.data_dir)
  ex = _eval_examples(b, "train")
  # the zero-height face is dropped, the invalid one is an ignore region clipped to the image
  np.testing.assert_allclose(ex[1][0], [[1, 2, 11, 14], [30, 10, 64, 48]])
  assert ex[1][2].tolist() == [False, True]
  assert ex[2][0].shape == (0, 4)
  np.testing.assert_allclose(ex[3][0], [[5, 5, 15, 15]])
  assert sorted(_eval_examples(b, "val")) == [1]
  assert b.info.metadata["splits"]["val"]["image_root"].endswith(
      os.path.join("WIDER_val", "images")
  )


# ------------------------------------------------------------------------------------------------
# VOC
# ------------------------------------------------------------------------------------------------
def _voc_xml(filename, objects):
  objs = "".join(
      f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated>"
      f"<difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
      f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
      for n, b, d in objects
  )
  return (
      f"<annotation><folder>JPEGImages</folder><filename>{filename}</filename><size>"
      f"<width>{W}</width><height>{H}</height><depth>3</depth></size>{objs}</annotation>"
  )


def write_voc(root):
  ann = {
      "a": ("a.jpg", [("dog", (1, 1, 20, 30), 0), ("cat", (10, 10, 40, 40), 1)]),
      "b": ("b.png", [("cat", (5, 5, 30, 30), 0)]),  # no b.jpg: the xml's <filename> is used
      "c": ("c.jpg", [("bird", (2, 3, 12, 13), 0)]),
  }
  os.makedirs(os.path.join(root, "Annotations"))
  os.makedirs(os.path.join(root, "ImageSets", "Main"))
  for i, (fname, objs) in ann.items():
    with open(os.path.join(root, "Annotations", f"{i}.xml"), "w") as f:
      f.write(_voc_xml(fname, objs))
    _img(os.path.join(root, "JPEGImages", fname))
  for split, ids in (("train", "a\nb\n"), ("val", "c\n")):
    with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w") as f:
      f.write(ids)


def test_voc_parse_and_prepared_round_trip(tmp_path):
  root = tmp_path / "myvoc"
  write_voc(str(root))
  a, b = voc.parse_voc(
      str(root / "ImageSets/Main/train.txt"), str(root / "Annotations"), str(root / "JPEGImages")
  )
  np.testing.assert_array_equal(a.boxes, [[0, 0, 20, 30], [9, 9, 40, 40]])  # xmin/ymin - 1
  assert a.names == ["dog", "cat"] and a.ignore.tolist() == [False, True]  # difficult: ignore
  assert (a.file_name, b.file_name) == ("a.jpg", "b.png")

  b = app.prepare_dataset(_cfg(tmp_path, dataset="voc", root=str(root)), str(tmp_path))
  info = P.DetectionInfo.from_builder(b)
  # categories: the names of all splits, sorted; ids 1..K
  assert info.class_names == ("bird", "cat", "dog") and info.category_ids == (1, 2, 3)
  assert "coco_json/myvoc/" in os.fspath(b.data_dir)
  ex = _eval_examples(b, "train")
  np.testing.assert_allclose(ex[1][0], [[0, 0, 20, 30], [9, 9, 40, 40]])
  assert ex[1][1].tolist() == [2, 1] and ex[1][2].tolist() == [False, True]
  np.testing.assert_allclose(ex[2][0], [[4, 4, 30, 30]])
  val = _eval_examples(b, "val")
  np.testing.assert_allclose(val[1][0], [[1, 2, 12, 13]])
  assert val[1][1].tolist() == [0]

  os.remove(root / "Annotations" / "c.xml")
  with pytest.raises(DataError, match=r"1 annotation file\(s\) of the ids listed in .*val.txt"):
    voc.parse_voc(
        str(root / "ImageSets/Main/val.txt"), str(root / "Annotations"), str(root / "JPEGImages")
    )


def test_voc_shared_bccd_sample_matches_its_coco_json(tmp_path):
  """The VOC XML of ../shared/data/bccd against the COCO json converted from it (same rule)."""
  root = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "bccd")
  if not os.path.isdir(os.path.join(root, "Annotations")):
    pytest.skip(f"no shared data at {root}")
  lst = tmp_path / "three.txt"
  lst.write_text("BloodImage_00000\nBloodImage_00001\nBloodImage_00002\n")
  images = voc.parse_voc(
      str(lst), os.path.join(root, "Annotations"), os.path.join(root, "JPEGImages")
  )
  with open(os.path.join(root, "instances_train.json")) as f:
    coco = json.load(f)
  names = {c["id"]: c["name"] for c in coco["categories"]}
  by_file = {im["file_name"]: im["id"] for im in coco["images"]}
  for im in images:
    iid = by_file[f"JPEGImages/{im.file_name}"]
    anns = [a for a in coco["annotations"] if a["image_id"] == iid]
    want = sorted((names[a["category_id"]], *a["bbox"]) for a in anns)
    got = sorted((n, x1, y1, x2 - x1, y2 - y1) for n, (x1, y1, x2, y2) in zip(im.names, im.boxes))
    assert got == want


# ------------------------------------------------------------------------------------------------
# Class subsets
# ------------------------------------------------------------------------------------------------
def write_coco3(root):
  """person (1), bicycle (2), car (3); image 1: person + car, 2: bicycle only, 3: no boxes."""
  images = [{"id": i, "file_name": f"{i}.jpg", "height": H, "width": W} for i in (1, 2, 3)]
  for im in images:
    _img(os.path.join(root, im["file_name"]))
  anns = [
      {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 20], "area": 200, "iscrowd": 0},
      {
          "id": 2,
          "image_id": 1,
          "category_id": 3,
          "bbox": [20, 5, 30, 10],
          "area": 300,
          "iscrowd": 0,
      },
      {"id": 3, "image_id": 1, "category_id": 2, "bbox": [5, 30, 8, 8], "area": 64, "iscrowd": 0},
      {"id": 4, "image_id": 2, "category_id": 2, "bbox": [2, 2, 9, 9], "area": 81, "iscrowd": 0},
  ]
  cats = [
      {"id": 1, "name": "person", "supercategory": "person"},
      {"id": 2, "name": "bicycle", "supercategory": "vehicle"},
      {"id": 3, "name": "car", "supercategory": "vehicle"},
  ]
  for split in ("train", "val"):
    with open(os.path.join(root, f"instances_{split}.json"), "w") as f:
      json.dump({"images": images, "annotations": anns, "categories": cats}, f)


def test_class_subset_selects_orders_drops_in_train_keeps_in_eval(tmp_path):
  root = tmp_path / "three"
  write_coco3(str(root))
  cfg = _cfg(
      tmp_path,
      dataset="coco_json",
      root=str(root),
      train_json="instances_train.json",
      val_json="instances_val.json",
      classes=("car", "person"),
  )
  cfg.model.num_classes = 2
  workdir = str(tmp_path / "run")
  b = app.prepare_dataset(cfg, workdir)
  assert "coco_json/three-car-person/" in os.fspath(b.data_dir)
  info = P.DetectionInfo.from_builder(b)
  assert info.class_names == ("car", "person") and info.category_ids == (3, 1)
  assert b.info.metadata["classes"] == ["car", "person"]
  app._save_run_files(cfg, workdir, info)
  with open(os.path.join(workdir, "dataset_info.json")) as f:
    assert json.load(f) == {"class_names": ["car", "person"], "label_to_category_id": [3, 1]}

  train = _eval_examples(b, "train")
  assert sorted(train) == [1]  # image 2 (bicycle only) and 3 (empty) dropped in training
  np.testing.assert_allclose(train[1][0], [[1, 1, 11, 21], [20, 5, 50, 15]])
  assert train[1][1].tolist() == [1, 0]  # person = label 1, car = label 0
  assert sorted(_eval_examples(b, "val")) == [1, 2, 3]  # every image kept for evaluation
  with open(info.annotation_file("val")) as f:
    gt = json.load(f)
  assert [c["name"] for c in gt["categories"]] == ["car", "person"]
  assert sorted(a["id"] for a in gt["annotations"]) == [1, 2] and len(gt["images"]) == 3

  # the same subset of a converted source (VOC): ids 1..K in the selection order
  write_voc(str(tmp_path / "voc"))
  bv = app.prepare_dataset(
      _cfg(tmp_path, dataset="voc", root=str(tmp_path / "voc"), classes=("dog", "bird")), workdir
  )
  iv = P.DetectionInfo.from_builder(bv)
  assert iv.class_names == ("dog", "bird") and iv.category_ids == (1, 2)
  assert sorted(_eval_examples(bv, "train")) == [1]  # b (cats only) dropped
  assert _eval_examples(bv, "train")[1][1].tolist() == [0]

  cfg.data.classes = ("person", "zebra")
  with pytest.raises(DataError) as e:
    app.prepare_dataset(cfg, workdir)
  msg = str(e.value)
  assert "\n" not in msg and "'zebra'" in msg and "['person', 'bicycle', 'car']" in msg


def test_builder_classes_rebuilds_for_another_selection(tmp_path):
  from cn2_jax.data import builder as B

  root = tmp_path / "three"
  write_coco3(str(root))
  splits = {"val": (str(root / "instances_val.json"), str(root))}
  b1 = B.build_coco_json_dataset("d", splits, str(tmp_path / "tfds"), classes=("car",))
  assert P.DetectionInfo.from_builder(b1).class_names == ("car",)
  b2 = B.build_coco_json_dataset("d", splits, str(tmp_path / "tfds"))
  assert P.DetectionInfo.from_builder(b2).class_names == ("person", "bicycle", "car")


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
def test_config_dataset_values_and_keys():
  for ds in ("crowdhuman", "wider_face", "voc", "coco_json", "coco/2017", "synthetic"):
    cfg = base_config()
    cfg.data.dataset = ds
    validate_config(cfg)
  cfg = base_config()
  assert cfg.data.classes == () and cfg.data.crowdhuman_box == "vbox"
  cfg.data.dataset = "crowd_human"
  with pytest.raises(ValueError, match="data.dataset must be one of"):
    validate_config(cfg)
  cfg = base_config()
  cfg.data.crowdhuman_box = "box"
  with pytest.raises(ValueError, match="crowdhuman_box"):
    validate_config(cfg)
  for bad in (("person", "person"), ("",), ("person,car",)):
    cfg = base_config()
    cfg.data.classes = bad
    with pytest.raises(ValueError, match="data.classes"):
      validate_config(cfg)
  cfg = base_config()
  cfg.data.dataset = "crowdhuman"
  with pytest.raises(ValueError, match="data.root"):
    app.prepare_dataset(cfg, "/nonexistent")
