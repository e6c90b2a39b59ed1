"""Tests for cn2_jax.data: builder (tfds, no TF), transforms, grain pipelines, synthetic data."""

import dataclasses
import filecmp
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from cn2_jax.data import builder as B
from cn2_jax.data import pipeline as P
from cn2_jax.data import synthetic as S
from cn2_jax.data import transforms as T
from cn2_jax.data.efficientdet_aug import EfficientDetResizeCrop

CONTRACT = {
    "image": (("B", "H", "W", 3), np.uint8),
    "image_hw": (("B", 2), np.int32),
    "gt_boxes": (("B", "M", 4), np.float32),
    "gt_classes": (("B", "M"), np.int32),
    "gt_valid": (("B", "M"), np.bool_),
    "gt_crowd": (("B", "M"), np.bool_),
    "batch_mask": (("B",), np.bool_),
    "image_id": (("B",), np.int64),
    "orig_hw": (("B", 2), np.int32),
}


def check_contract(batch, b, h, w, m):
  assert set(batch) == set(CONTRACT)
  dims = {"B": b, "H": h, "W": w, "M": m}
  for k, (shape, dtype) in CONTRACT.items():
    want = tuple(dims.get(s, s) for s in shape)
    assert batch[k].shape == want, (k, batch[k].shape, want)
    assert batch[k].dtype == dtype, (k, batch[k].dtype)


def d2_shape(h, w, short, max_size):
  """Independent transcription of detectron2 ResizeShortestEdge.get_output_shape."""
  scale = short * 1.0 / min(h, w)
  if h < w:
    newh, neww = short * 1.0, scale * w
  else:
    newh, neww = scale * h, short * 1.0
  if max(newh, neww) > max_size:
    s = max_size * 1.0 / max(newh, neww)
    newh, neww = newh * s, neww * s
  return int(newh + 0.5), int(neww + 0.5)


# ------------------------------------------------------------------------------------------------
# A hand-written mini COCO
# ------------------------------------------------------------------------------------------------
def _save(img, path, fmt, **kw):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img.save(path, format=fmt, **kw)


def write_mini_coco(root):
  """5 train images (rgb png + crowd + degenerate, gray png, CMYK jpeg, empty jpeg, EXIF-rotated
  jpeg with a box partly outside and one fully outside) and 3 val images."""
  rng = np.random.default_rng(0)
  rgb = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
  _save(rgb, f"{root}/img/rgb.png", "PNG")
  _save(
      Image.fromarray(rng.integers(0, 255, (30, 50), dtype=np.uint8), "L"),
      f"{root}/img/gray.png",
      "PNG",
  )
  _save(Image.new("CMYK", (32, 48), (0, 255, 255, 0)), f"{root}/img/cmyk.jpg", "JPEG", quality=95)
  _save(Image.new("RGB", (36, 36), (9, 9, 9)), f"{root}/img/empty.jpg", "JPEG")
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 cw on display: stored 40x20 (w x h) -> displayed 20x40
  _save(Image.new("RGB", (40, 20), (200, 10, 10)), f"{root}/img/exif.jpg", "JPEG", exif=exif)
  images = [
      {"id": 11, "file_name": "img/rgb.png", "height": 40, "width": 60},
      {"id": 3, "file_name": "img/gray.png", "height": 30, "width": 50},
      {"id": 7, "file_name": "img/cmyk.jpg", "height": 48, "width": 32},
      {"id": 20, "file_name": "img/empty.jpg", "height": 36, "width": 36},
      {"id": 25, "file_name": "img/exif.jpg", "height": 40, "width": 20},
  ]
  # categories listed out of order, non-contiguous ids: label 0 = cat (3), label 1 = dog (7)
  cats = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]
  anns = [
      {
          "id": 1,
          "image_id": 11,
          "category_id": 7,
          "bbox": [5, 6, 20, 10],
          "area": 200,
          "iscrowd": 0,
      },
      {
          "id": 2,
          "image_id": 11,
          "category_id": 3,
          "bbox": [0, 0, 30, 30],
          "area": 900,
          "iscrowd": 1,
      },
      {"id": 3, "image_id": 11, "category_id": 3, "bbox": [10, 10, 0, 5], "area": 0, "iscrowd": 0},
      {
          "id": 4,
          "image_id": 11,
          "category_id": 3,
          "bbox": [30, 2, 25, 30],
          "area": 750,
          "iscrowd": 0,
      },
      {"id": 5, "image_id": 3, "category_id": 3, "bbox": [1, 2, 10, 12], "area": 120, "iscrowd": 0},
      {"id": 6, "image_id": 7, "category_id": 7, "bbox": [4, 4, 20, 30], "area": 600, "iscrowd": 0},
      {
          "id": 7,
          "image_id": 25,
          "category_id": 7,
          "bbox": [10, 30, 20, 20],
          "area": 400,
          "iscrowd": 0,
      },
      {"id": 8, "image_id": 25, "category_id": 3, "bbox": [25, 5, 5, 5], "area": 25, "iscrowd": 0},
  ]
  with open(f"{root}/train.json", "w") as f:
    json.dump({"images": images, "annotations": anns, "categories": cats}, f)
  val_images = [dict(im) for im in images[:3]]
  with open(f"{root}/val.json", "w") as f:
    json.dump(
        {
            "images": val_images,
            "annotations": [a for a in anns if a["image_id"] != 25],
            "categories": cats,
        },
        f,
    )
  return {"train": (f"{root}/train.json", root), "val": (f"{root}/val.json", root)}


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("mini"))
  splits = write_mini_coco(root)
  builder = B.build_coco_json_dataset("mini", splits, os.path.join(root, "tfds"))
  return root, splits, builder


# ------------------------------------------------------------------------------------------------
# Builder
# ------------------------------------------------------------------------------------------------
def test_builder_examples_and_metadata(mini):
  root, _, builder = mini
  ds = builder.as_data_source("train")
  assert len(ds) == 5
  ids = [int(ds[i]["image/id"]) for i in range(len(ds))]
  assert ids == [3, 7, 11, 20, 25]  # sorted by image id, source index order kept
  meta = builder.info.metadata
  assert [c["id"] for c in meta["categories"]] == [3, 7]
  assert [c["name"] for c in meta["categories"]] == ["cat", "dog"]
  tr = meta["splits"]["train"]
  assert tr["num_degenerate_dropped"] == 2  # zero-width box + box fully outside after clipping
  assert tr["num_crowd"] == 1 and tr["num_boxes"] == 6 and tr["num_empty"] == 1
  assert tr["image_id"] == ids and tr["num_instances"] == [1, 1, 2, 0, 1]
  assert tr["height"] == [30, 48, 40, 36, 40] and tr["width"] == [50, 32, 60, 36, 20]

  rgb = ds[2]
  assert isinstance(rgb["image"], bytes)
  assert rgb["image/filename"] in (b"img/rgb.png", "img/rgb.png")
  np.testing.assert_allclose(
      rgb["objects"]["bbox"], [[5, 6, 25, 16], [0, 0, 30, 30], [30, 2, 55, 32]]
  )
  assert rgb["objects"]["bbox"].dtype == np.float32
  np.testing.assert_array_equal(rgb["objects"]["label"], [1, 0, 0])
  np.testing.assert_array_equal(rgb["objects"]["is_crowd"], [False, True, False])
  np.testing.assert_array_equal(rgb["objects"]["id"], [1, 2, 4])
  exif = ds[4]  # box [10,30,30,50] clipped to the 20x40 (w x h) image; the other one dropped
  assert (int(exif["image/height"]), int(exif["image/width"])) == (40, 20)
  np.testing.assert_allclose(exif["objects"]["bbox"], [[10, 30, 20, 40]])
  empty = ds[3]
  assert empty["objects"]["bbox"].shape == (0, 4)

  # reopen from the folder alone; DatasetInfo-like accessor
  rb = B.load_builder(os.path.join(root, "tfds"), "mini")
  info = P.DetectionInfo.from_builder(rb)
  assert info.num_classes == 2 and info.class_names == ("cat", "dog")
  np.testing.assert_array_equal(info.label_to_category_id([1, 0, 1]), [7, 3, 7])
  assert info.category_id_to_label == {3: 0, 7: 1}
  assert info.annotation_file("val").endswith("val.json")
  assert len(rb.as_data_source("val")) == 3


def test_decode_gray_cmyk_exif_to_rgb(mini):
  _, _, builder = mini
  ds = builder.as_data_source("train")
  gray = T.decode_image(ds[0]["image"])
  assert gray.shape == (30, 50, 3) and gray.dtype == np.uint8
  assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])
  cmyk = T.decode_image(ds[1]["image"])
  assert cmyk.shape == (48, 32, 3)
  np.testing.assert_allclose(cmyk.reshape(-1, 3).mean(0), [255, 0, 0], atol=12)  # CMYK red
  exif = T.decode_image(ds[4]["image"])
  assert exif.shape == (40, 20, 3)  # EXIF orientation applied
  with pytest.raises(ValueError, match="broken.png"):
    T.decode_image(b"not an image", name="broken.png")


def test_missing_and_corrupt_images_named(tmp_path):
  splits = write_mini_coco(str(tmp_path))
  os.remove(tmp_path / "img" / "gray.png")
  with pytest.raises(ValueError, match=r"missing.*img/gray\.png"):
    B.build_coco_json_dataset("missing", splits, str(tmp_path / "tfds"))
  splits = write_mini_coco(str(tmp_path))
  (tmp_path / "img" / "cmyk.jpg").write_bytes(b"\xff\xd8\xff garbage, not a jpeg")
  with pytest.raises(ValueError, match=r"corrupt.*img/cmyk\.jpg"):
    B.build_coco_json_dataset("corrupt", splits, str(tmp_path / "tfds"))


def test_builder_disk_spill_keeps_order(tmp_path, monkeypatch):
  """Splits > tfds's in-memory limit go through its on-disk buckets (tf.io.gfile without TF)."""
  from tensorflow_datasets.core import shuffle

  monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 1000)
  splits = write_mini_coco(str(tmp_path))
  b = B.build_coco_json_dataset("spill", {"train": splits["train"]}, str(tmp_path / "tfds"))
  ds = b.as_data_source("train")
  assert [int(ds[i]["image/id"]) for i in range(len(ds))] == [3, 7, 11, 20, 25]


def test_coco2017_layout_builder(tmp_path):
  """coco/2017 from an extracted tree (only val here), reopened by name."""
  write_mini_coco(str(tmp_path / "src"))
  root = tmp_path / "coco"
  (root / "annotations").mkdir(parents=True)
  coco = json.load(open(tmp_path / "src" / "val.json"))
  for im in coco["images"]:
    im["file_name"] = os.path.basename(im["file_name"])
  json.dump(coco, open(root / "annotations" / "instances_val2017.json", "w"))
  os.rename(tmp_path / "src" / "img", root / "val2017")
  b = B.build_coco2017_dataset(str(root), str(tmp_path / "tfds"), splits=("val",))
  assert b.data_dir.endswith(os.path.join("coco", "2017", "2.0.0"))
  rb = B.load_builder(str(tmp_path / "tfds"), "coco/2017")
  split = P.open_split(rb, "val")
  assert len(split) == 3 and list(split.image_id) == [3, 7, 11]
  assert split.info.category_ids == (3, 7)


def _truncate(path, keep=1 / 3):
  data = open(path, "rb").read()
  open(path, "wb").write(data[: int(len(data) * keep)])
  return data


def test_truncated_image_fails_at_preparation_and_fixing_it_rebuilds(tmp_path):
  """verify() passes a truncated JPEG; the full decode at preparation must not. After the file is
  fixed, the same data_dir is prepared again (no stale copy) and holds the fixed bytes."""
  splits = write_mini_coco(str(tmp_path))
  data_dir = str(tmp_path / "tfds")
  good = _truncate(tmp_path / "img" / "exif.jpg")
  with pytest.raises(ValueError) as err:
    B.build_coco_json_dataset("trunc", {"train": splits["train"]}, data_dir)
  msg = str(err.value)
  assert "\n" not in msg
  for part in ("img/exif.jpg", "train.json", "coco_json/trunc", "'train'"):
    assert part in msg, (part, msg)
  (tmp_path / "img" / "exif.jpg").write_bytes(good)
  b = B.build_coco_json_dataset("trunc", {"train": splits["train"]}, data_dir)
  ds = b.as_data_source("train")
  assert bytes(ds[4]["image"]) == good
  assert T.decode_image(ds[4]["image"]).shape == (40, 20, 3)


def test_changed_sources_rebuild_the_prepared_split(tmp_path, caplog):
  splits = write_mini_coco(str(tmp_path))
  data_dir = str(tmp_path / "tfds")
  b = B.build_coco_json_dataset("stale", splits, data_dir)
  meta = b.info.metadata["splits"]["train"]
  assert meta["file_name"] == [
      "img/gray.png",
      "img/cmyk.jpg",
      "img/rgb.png",
      "img/empty.jpg",
      "img/exif.jpg",
  ]
  assert meta["file_size"][2] == os.path.getsize(tmp_path / "img" / "rgb.png")
  assert meta["annotation_size"] == os.path.getsize(splits["train"][0])

  def build():
    with caplog.at_level(logging.WARNING, logger="cn2_jax.data.builder"):
      caplog.clear()
      out = B.build_coco_json_dataset("stale", splits, data_dir)
    return out, [r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage()]

  _, rebuilt = build()  # unchanged sources: reused
  assert not rebuilt
  # an image replaced by another valid one (same size in pixels, other bytes)
  Image.new("RGB", (60, 40), (1, 2, 3)).save(tmp_path / "img" / "rgb.png")
  b, rebuilt = build()
  assert len(rebuilt) == 1 and "img/rgb.png" in rebuilt[0]
  new_bytes = (tmp_path / "img" / "rgb.png").read_bytes()
  assert bytes(b.as_data_source("train")[2]["image"]) == new_bytes
  # the annotation json changed: one annotation fewer
  coco = json.load(open(splits["train"][0]))
  coco["annotations"] = [a for a in coco["annotations"] if a["id"] != 5]
  json.dump(coco, open(splits["train"][0], "w"))
  b, rebuilt = build()
  assert len(rebuilt) == 1 and "train.json changed" in rebuilt[0]
  assert b.info.metadata["splits"]["train"]["num_instances"][0] == 0
  # a folder prepared before the source records existed is rebuilt once
  path = os.path.join(b.data_dir, "metadata.json")
  old = json.load(open(path))
  for k in ("file_name", "file_size", "file_mtime_ns"):
    del old["splits"]["train"][k]
  json.dump(old, open(path, "w"))
  b, rebuilt = build()
  assert len(rebuilt) == 1 and "older version" in rebuilt[0]
  assert "file_size" in b.info.metadata["splits"]["train"]
  # removed sources are not a change: the prepared copy stays usable
  os.remove(tmp_path / "img" / "empty.jpg")
  b, rebuilt = build()
  assert not rebuilt and len(b.as_data_source("train")) == 5
  # another annotation file under the same dataset name rebuilds (it used to be reused silently)
  splits = {"train": splits["val"]}
  b, rebuilt = build()
  assert len(rebuilt) == 1 and "val.json" in rebuilt[0]
  assert len(b.as_data_source("train")) == 3


@pytest.mark.parametrize(
    "content,match",
    [
        ("[]", r"holds a JSON list, not a COCO object"),
        ("", r"is empty"),
        ('{"images": [', r"is not valid JSON"),
        ('{"images": [], "categories": [{"id": 1}]}', r"lacks the COCO key\(s\) \['annotations'\]"),
        (
            '{"images": [{"id": 1}], "annotations": [], "categories": [{"id": 1}]}',
            r"images\[0\] lacks key 'file_name'",
        ),
        (
            '{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1, '
            '"category_id": 1}], "categories": [{"id": 1}]}',
            r"annotations\[0\] lacks key 'bbox'",
        ),
    ],
)
def test_bad_annotation_file_is_a_one_line_error_naming_it(tmp_path, content, match):
  from cn2_jax.errors import DataError

  path = tmp_path / "bad.json"
  path.write_text(content)
  with pytest.raises(DataError, match=match) as err:
    B.build_coco_json_dataset("bad", {"train": (str(path), str(tmp_path))}, str(tmp_path / "tfds"))
  msg = str(err.value)
  assert str(path) in msg and "coco_json/bad" in msg and "\n" not in msg
  assert isinstance(err.value, ValueError)  # callers catching ValueError keep working
  with pytest.raises(FileNotFoundError, match="nope.json"):
    B.build_coco_json_dataset(
        "bad", {"train": (str(tmp_path / "nope.json"), str(tmp_path))}, str(tmp_path / "tfds")
    )


@pytest.mark.skipif(
    "data_dir" not in P.DetectionSplit.__init__.__code__.co_varnames,
    reason="needs DetectionSplit.data_dir (pipeline change proposed in #11)",
)
def test_load_time_decode_error_names_the_prepared_folder(mini):
  """Preparation decodes every image, so a load-time failure means the stored copy is bad: the
  error says which folder to delete."""
  from cn2_jax.errors import DataError

  _, _, builder = mini
  split = P.open_split(builder, "train")
  assert split.data_dir == builder.data_dir
  records = [dict(split.source[i]) for i in range(len(split))]
  records[1]["image"] = records[1]["image"][:200]  # as if the array_record copy were damaged
  split.source = records
  with pytest.raises(DataError) as err:
    list(
        P.make_eval_loader(
            split, batch_size=5, short_size=32, max_size=64, max_boxes=4, pad_hw=(64, 64)
        )
    )
  msg = str(err.value)
  assert "img/cmyk.jpg" in msg and builder.data_dir in msg and "delete" in msg


# ------------------------------------------------------------------------------------------------
# Transforms
# ------------------------------------------------------------------------------------------------
def test_resize_rule_matches_detectron2():
  assert T.resize_shortest_edge_shape(480, 640, 800, 1333) == (800, 1067)
  assert T.resize_shortest_edge_shape(100, 1000, 800, 1333) == (133, 1333)
  rng = np.random.default_rng(1)
  hs, ws = rng.integers(10, 3000, 200), rng.integers(10, 3000, 200)
  for short, mx in [(800, 1333), (640, 1333), (37, 61)]:
    nh, nw = T.resize_shortest_edge_shape_np(hs, ws, short, mx)
    for h, w, a, b in zip(hs, ws, nh, nw):
      assert (
          (a, b)
          == d2_shape(int(h), int(w), short, mx)
          == T.resize_shortest_edge_shape(int(h), int(w), short, mx)
      )
  img = rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)
  boxes = np.array([[5, 3, 25, 20]], np.float32)
  out, ob = T.resize_shortest_edge(img, boxes, (60,), 1000)
  assert out.shape == (60, 100, 3)
  np.testing.assert_allclose(ob, [[10, 6, 50, 40]])
  np.testing.assert_array_equal(
      out, np.asarray(Image.fromarray(img).resize((100, 60), Image.BILINEAR))
  )


def test_flip_lsj_pad_gt():
  img = np.arange(2 * 10 * 3, dtype=np.uint8).reshape(2, 10, 3)
  fi, fb = T.hflip(img, np.array([[1, 0, 4, 2]], np.float32))
  np.testing.assert_array_equal(fi, img[:, ::-1])
  np.testing.assert_allclose(fb, [[6, 0, 9, 2]])

  rng = np.random.default_rng(0)
  big = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
  boxes = np.array([[0, 0, 80, 60], [70, 50, 80, 60], [10, 10, 20, 20]], np.float32)
  for seed in range(20):
    im, bx, keep = T.lsj_resize_crop(big, boxes, 48, (0.3, 2.0), np.random.default_rng(seed))
    assert im.shape[0] <= 48 and im.shape[1] <= 48
    assert len(bx) == len(keep) and np.all(T.nonempty_boxes(bx))
    assert np.all(bx[:, 0::2] <= im.shape[1]) and np.all(bx[:, 1::2] <= im.shape[0])
    assert np.all(bx >= 0)

  padded = T.pad_image(big, (64, 96))
  assert padded.shape == (64, 96, 3) and padded[60:].max() == 0 and padded[:, 80:].max() == 0
  with pytest.raises(ValueError, match="does not fit"):
    T.pad_image(big, (32, 96))

  boxes = np.array([[0, 0, 5, 5], [1, 1, 2, 2], [2, 2, 9, 9], [3, 3, 4, 4]], np.float32)
  classes = np.array([0, 1, 2, 3])
  crowd = np.array([True, False, False, False])
  gt = T.pad_gt(boxes, classes, crowd, 6)
  np.testing.assert_array_equal(gt["gt_classes"], [1, 2, 3, 0, 0, 0])  # non-crowd, then crowd
  np.testing.assert_array_equal(gt["gt_valid"], [1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(gt["gt_crowd"], [0, 0, 0, 1, 0, 0])
  gt = T.pad_gt(boxes, classes, crowd, 2)  # truncation keeps the first non-crowd boxes
  np.testing.assert_array_equal(gt["gt_classes"], [1, 2])
  assert gt["gt_valid"].all() and not gt["gt_crowd"].any()


# ------------------------------------------------------------------------------------------------
# Pipelines
# ------------------------------------------------------------------------------------------------
def test_eval_loader_every_image_once_with_masked_padding(mini):
  _, _, builder = mini
  split = P.open_split(builder, "train")
  batches = list(
      P.make_eval_loader(
          split, batch_size=2, short_size=64, max_size=100, max_boxes=4, pad_hw=(128, 128)
      )
  )  # one fixed canvas
  assert (
      len(batches)
      == 3
      == P.num_eval_batches(split, 2, pad_hw=(128, 128), short_size=64, max_size=100)
  )
  for bt in batches:
    check_contract(bt, 2, 128, 128, 4)
  ids = np.concatenate([bt["image_id"] for bt in batches])
  mask = np.concatenate([bt["batch_mask"] for bt in batches])
  np.testing.assert_array_equal(mask, [1, 1, 1, 1, 1, 0])
  np.testing.assert_array_equal(ids[mask], [3, 7, 11, 20, 25])
  last = batches[-1]
  assert last["image"][1].max() == 0 and not last["gt_valid"][1].any()
  assert np.all(last["image_hw"][1] > 0) and np.all(last["orig_hw"][1] > 0)

  origs = [(30, 50), (48, 32), (40, 60), (36, 36), (40, 20)]
  hw = np.concatenate([bt["image_hw"] for bt in batches])[:5]
  np.testing.assert_array_equal(np.concatenate([bt["orig_hw"] for bt in batches])[:5], origs)
  for (h, w), got in zip(origs, hw):
    assert tuple(got) == d2_shape(h, w, 64, 100)
  # the rgb image (index 2): boxes scaled, crowd kept but not valid, gray/cmyk became RGB
  b1 = batches[1]
  (h, w), (nh, nw) = origs[2], tuple(hw[2])
  np.testing.assert_allclose(
      b1["gt_boxes"][0, :3],
      np.array([[5, 6, 25, 16], [30, 2, 55, 32], [0, 0, 30, 30]])
      * [nw / w, nh / h, nw / w, nh / h],
      rtol=1e-6,
  )
  np.testing.assert_array_equal(b1["gt_valid"][0], [1, 1, 0, 0])
  np.testing.assert_array_equal(b1["gt_crowd"][0], [0, 0, 1, 0])
  np.testing.assert_array_equal(b1["gt_classes"][0, :3], [1, 0, 0])
  img = batches[0]["image"][1]  # CMYK red, resized
  assert img[: hw[1][0], : hw[1][1]].reshape(-1, 3).mean(0)[0] > 200
  assert img[hw[1][0] :].max() == 0 and img[:, hw[1][1] :].max() == 0  # zero padding
  g = batches[0]["image"][0, : hw[0][0], : hw[0][1]]
  assert np.array_equal(g[..., 0], g[..., 1])  # grayscale -> RGB


def _take(it, n):
  out = [next(it) for _ in range(n)]
  it.close()
  return out


def _same(a, b):
  return all(np.array_equal(a[k], b[k]) for k in CONTRACT)


# No aspect grouping: plain epochs (the grouped schedule is tested in test_buckets.py); every
# batch then lands on the square fallback bucket, 64x64 here.
TRAIN_KW = dict(
    batch_size=3,
    short_sizes=(24, 32, 40),
    max_size=64,
    max_boxes=4,
    aspect_grouping=False,
    scale_per_batch=False,
)


def test_train_loader_contract_filter_determinism_resume(mini):
  _, _, builder = mini
  split = P.open_split(builder, "train")
  ref = _take(
      P.make_train_loader(split, P.TrainLoaderSettings(seed=5, **TRAIN_KW)), 6
  )  # 18 examples > 4 epochs
  for bt in ref:
    check_contract(bt, 3, 64, 64, 4)
    assert bt["batch_mask"].all()
    assert np.all(bt["image_hw"] <= 64)
    for j in range(3):  # boxes inside the valid image area
      v = bt["gt_valid"][j] | bt["gt_crowd"][j]
      assert np.all(bt["gt_boxes"][j, v, 2] <= bt["image_hw"][j, 1] + 1e-4)
      assert np.all(bt["gt_boxes"][j, v, 3] <= bt["image_hw"][j, 0] + 1e-4)
  ids = np.concatenate([bt["image_id"] for bt in ref])
  assert 20 not in ids  # the empty image is filtered
  for e in range(4):  # every epoch is a permutation of the 4 non-empty images
    assert sorted(ids[4 * e : 4 * e + 4]) == [3, 7, 11, 25]
  assert len({tuple(bt["image_hw"].ravel()) for bt in ref}) > 1  # random short sizes

  again = _take(P.make_train_loader(split, P.TrainLoaderSettings(seed=5, **TRAIN_KW)), 6)
  assert all(_same(a, b) for a, b in zip(ref, again))
  resumed = _take(P.make_train_loader(split, P.TrainLoaderSettings(seed=5, **TRAIN_KW), 4), 2)
  assert all(_same(a, b) for a, b in zip(ref[4:], resumed))
  other = _take(P.make_train_loader(split, P.TrainLoaderSettings(seed=6, **TRAIN_KW)), 6)
  assert not all(_same(a, b) for a, b in zip(ref, other))

  unfiltered = _take(
      P.make_train_loader(split, P.TrainLoaderSettings(seed=5, filter_empty=False, **TRAIN_KW)), 4
  )
  ids = np.concatenate([bt["image_id"] for bt in unfiltered])
  assert sorted(ids[:5]) == [3, 7, 11, 20, 25]

  lsj = _take(
      P.make_train_loader(
          split,
          P.TrainLoaderSettings(
              seed=1, batch_size=2, max_boxes=4, lsj=dict(output_size=48, scale_range=(0.5, 1.5))
          ),
      ),
      3,
  )
  for bt in lsj:
    check_contract(bt, 2, 64, 64, 4)
    assert np.all(bt["image_hw"] <= 48)

  with pytest.raises(ValueError, match="pad_hw"):
    P.make_train_loader(split, P.TrainLoaderSettings(pad_hw=(32, 32), **TRAIN_KW))
  with pytest.raises(ValueError, match="multiples of 32"):
    P.make_train_loader(split, P.TrainLoaderSettings(pad_hw=(70, 70), **TRAIN_KW))


@pytest.mark.skipif(os.environ.get("CN2_SKIP_MP_TESTS") == "1", reason="CN2_SKIP_MP_TESTS=1")
def test_train_loader_grain_workers_match_in_process(mini):
  _, _, builder = mini
  split = P.open_split(builder, "train")
  ref = _take(P.make_train_loader(split, P.TrainLoaderSettings(seed=2, **TRAIN_KW), 1), 2)
  got = _take(
      P.make_train_loader(split, P.TrainLoaderSettings(seed=2, num_workers=1, **TRAIN_KW), 1), 2
  )
  assert all(_same(a, b) for a, b in zip(ref, got))


def test_max_boxes_truncation_logged_once(mini, caplog):
  _, _, builder = mini
  split = P.open_split(builder, "train")
  T._TRUNCATION_LOGGED = False
  with caplog.at_level(logging.WARNING, logger="cn2_jax.data.transforms"):
    bt = list(
        P.make_eval_loader(
            split, batch_size=5, short_size=32, max_size=64, max_boxes=1, pad_hw=(64, 64)
        )
    )[0]
  assert sum("max_boxes" in r.getMessage() for r in caplog.records) == 1
  assert bt["gt_valid"][2, 0] and not bt["gt_crowd"].any()  # rgb image keeps a non-crowd box


# ------------------------------------------------------------------------------------------------
# Synthetic data
# ------------------------------------------------------------------------------------------------
def test_synthetic_deterministic_and_valid_coco(tmp_path):
  from pycocotools.coco import COCO

  kw = dict(num_train=14, num_val=3, image_size=(48, 64), object_size=(10, 24), seed=3)
  p1 = S.write_synthetic_coco(str(tmp_path / "a"), **kw)
  S.write_synthetic_coco(str(tmp_path / "b"), **kw)
  files = sorted(
      os.path.relpath(os.path.join(d, f), tmp_path / "a")
      for d, _, fs in os.walk(tmp_path / "a")
      for f in fs
  )
  assert len(files) == 2 + 14 + 3
  match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
  assert not mismatch and not errors
  p3 = S.write_synthetic_coco(str(tmp_path / "c"), **dict(kw, seed=4))
  assert open(p1["train"][0], "rb").read() != open(p3["train"][0], "rb").read()

  coco = COCO(p1["train"][0])
  assert sorted(coco.getCatIds()) == [1, 2, 3, 4]
  assert len(coco.getImgIds()) == 14
  n_per_image = [len(coco.getAnnIds(imgIds=[i])) for i in coco.getImgIds()]
  assert min(n_per_image) == 0 and max(n_per_image) <= 4
  modes = set()
  for im in coco.loadImgs(coco.getImgIds()):
    with Image.open(os.path.join(p1["train"][1], im["file_name"])) as f:
      assert f.size == (im["width"], im["height"])
      modes.add(f.mode)
    for a in coco.loadAnns(coco.getAnnIds(imgIds=[im["id"]])):
      x, y, w, h = a["bbox"]
      assert w > 0 and h > 0 and x >= 0 and y >= 0
      assert x + w <= im["width"] and y + h <= im["height"]
  assert {"L", "RGB"} <= modes
  COCO(p1["val"][0])


def _demo_config():
  from cn2_jax.config import load_config_file

  return load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py"))


def test_train_loader_settings_from_config_reads_every_field(mini):
  """Each config key the train loader takes lands in its field of ``TrainLoaderSettings``, and
  the loader built from the demo config's settings yields the batches of one given the values."""
  cfg = _demo_config()
  base = P.TrainLoaderSettings.from_config(cfg, process_index=1, process_count=2)
  assert (base.process_index, base.process_count) == (1, 2)
  aug = dict(cfg.data.to_dict(), color_aug="centerx")
  changes = [  # (config changes, the settings fields they set)
      ({"train.batch_size": 6}, {"batch_size": 6}),  # per process
      ({"data.min_size_train": (96, 112)}, {"short_sizes": (96, 112)}),
      ({"data.max_size_train": 224}, {"max_size": 224}),
      ({"data.pad_hw_train": ()}, {"pad_hw": None}),
      ({"data.max_boxes": 5}, {"max_boxes": 5}),
      ({"seed": 7}, {"seed": 7}),
      ({"data.num_workers": 2}, {"num_workers": 2}),
      ({"data.filter_empty": False}, {"filter_empty": False}),
      ({"kd.without_label": True}, {"filter_empty": False, "crop_around_gt": False}),
      (
          {"data.lsj": True, "data.lsj_size": 256, "data.lsj_scale_range": (0.5, 1.5)},
          {"lsj": P.LSJ(output_size=256, scale_range=(0.5, 1.5))},
      ),
      ({"data.flip": False}, {"hflip_prob": 0.0}),
      ({"data.size_divisibility": 64}, {"size_divisibility": 64}),
      ({"data.aspect_grouping": False}, {"aspect_grouping": False}),
      ({"data.bucket_aspect_ratios": (1.25,)}, {"aspect_ratios": (1.25,)}),
      ({"data.scale_per_batch": False}, {"scale_per_batch": False}),
      ({"data.color_aug": "centerx"}, {"augment": P.AugmentSettings.from_config(aug)}),
      (
          {
              "data.custom_aug": "EfficientDetResizeCrop",
              "data.train_size": 256,
              "data.scale_range": (0.5, 1.5),
          },
          {"lsj": EfficientDetResizeCrop(256, (0.5, 1.5))},
      ),
      (
          {"data.sampler_train": "RepeatFactorTrainingSampler"},
          {"sampler_train": "RepeatFactorTrainingSampler"},
      ),
      ({"data.repeat_threshold": 0.01}, {"repeat_threshold": 0.01}),
      ({"data.resize_type": "Resize"}, {"resize_type": "Resize"}),
      ({"data.box_min_size": 5.0}, {"box_min_size": 5.0}),
  ]
  covered = {"process_index", "process_count", "num_threads", "prefetch"}  # not in the config
  for edits, fields in changes:
    c = _demo_config()
    for key, value in edits.items():
      *path, last = key.split(".")
      section = c
      for p in path:
        section = section[p]
      section[last] = value
    got = P.TrainLoaderSettings.from_config(c, process_index=1, process_count=2)
    assert all(getattr(base, f) != v for f, v in fields.items()), edits
    assert got == dataclasses.replace(base, **fields), edits
    covered |= set(fields)
  assert covered == {f.name for f in dataclasses.fields(P.TrainLoaderSettings)}
  assert (base.num_threads, base.prefetch) == (1, 2)  # the loader's defaults

  # The demo config's loader, from the settings and from the values given one by one (as
  # app.train passed them before the settings object).
  _, _, builder = mini
  split = P.open_split(builder, "train")
  cfg.train.batch_size = 2
  cfg.data.num_workers = 0
  d = cfg.data
  explicit = P.TrainLoaderSettings(
      batch_size=2,
      short_sizes=tuple(d.min_size_train),
      max_size=d.max_size_train,
      pad_hw=tuple(d.pad_hw_train) or None,
      max_boxes=d.max_boxes,
      seed=cfg.seed,
      num_workers=0,
      filter_empty=d.filter_empty and not cfg.kd.without_label,
      lsj=P.LSJ(output_size=d.lsj_size, scale_range=tuple(d.lsj_scale_range)) if d.lsj else None,
      hflip_prob=0.5 if d.flip else 0.0,
      process_index=0,
      process_count=1,
      size_divisibility=d.size_divisibility,
      aspect_grouping=d.aspect_grouping,
      aspect_ratios=tuple(d.bucket_aspect_ratios),
      scale_per_batch=d.scale_per_batch,
      augment=P.AugmentSettings.from_config(d),
      crop_around_gt=not cfg.kd.without_label,
  )
  settings = P.TrainLoaderSettings.from_config(cfg, process_index=0, process_count=1)
  assert settings == explicit
  ref = _take(P.make_train_loader(split, explicit, 1), 3)
  got = _take(P.make_train_loader(split, settings, 1), 3)
  for a, b in zip(ref, got):
    check_contract(a, 2, 192, 192, d.max_boxes)
    assert _same(a, b)
