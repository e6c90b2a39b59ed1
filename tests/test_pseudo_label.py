"""--mode=pseudo_label (app.pseudo_label, cn2_jax/pseudo_label.py): a tiny demo model trained for
two steps labels a folder of images; the COCO json holds the Predictor's detections above the
threshold in original pixels, loads with pycocotools, and trains as a coco_json dataset (alone or
as a data.mixture entry)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from cn2_jax import app, pseudo_label
from cn2_jax.config import load_config_file, validate_config
from cn2_jax.data import pipeline
from cn2_jax.errors import ConfigError, InputFileError
from cn2_jax.predictor import Predictor
from tests.test_app import small_demo_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.py")


@pytest.fixture(scope="module", autouse=True)
def _fast(fast_compile):
  yield


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, _fast):
  """(workdir, image folder, the json, its threshold, the Predictor) of one pseudo_label call."""
  root = tmp_path_factory.mktemp("pseudo")
  wd = str(root / "wd")
  cfg = small_demo_config()
  cfg.train.eval_at_end = False
  cfg.optim.max_iter = 2
  cfg.optim.warmup_iters = 1
  cfg.optim.steps = (1,)
  app.train(cfg, wd)
  src = os.path.join(wd, "synthetic", "val")
  vals = sorted(os.listdir(src))
  folder = root / "unlabelled"
  (folder / "sub").mkdir(parents=True)
  shutil.copy(os.path.join(src, vals[0]), folder / "a.png")
  shutil.copy(os.path.join(src, vals[1]), folder / "sub" / "b.png")
  with Image.open(os.path.join(src, vals[2])) as im:  # another size: boxes must be rescaled
    im.convert("RGB").resize((150, 110)).save(folder / "c.jpg")
  (folder / "notes.txt").write_text("not an image")
  predictor = Predictor.from_workdir(wd)
  scores = np.concatenate(
      [predictor(str(folder / n))["scores"] for n in ("a.png", "sub/b.png", "c.jpg")]
  )
  # An under-trained model: a threshold between its scores keeps some detections, drops others.
  thresh = float(np.round(np.quantile(scores, 0.6), 4))
  cli = load_config_file(DEMO)  # the command line's config: only the overrides count
  cli.pseudo_label.score_thresh = thresh
  run_cfg = app.run_config(cli, wd, ["pseudo_label.score_thresh"])
  out = app.pseudo_label(run_cfg, wd, [str(folder)])
  return wd, str(folder), out, thresh, predictor


def test_json_holds_the_predictor_detections_above_the_threshold(labelled):
  wd, folder, out, thresh, predictor = labelled
  assert out == os.path.join(wd, "pseudo_label", "unlabelled.json")
  with open(out) as f:
    coco = json.load(f)
  with open(os.path.join(wd, "dataset_info.json")) as f:
    info = json.load(f)
  assert coco["categories"] == [
      {"id": cat_id, "name": name, "supercategory": ""}
      for cat_id, name in zip(info["label_to_category_id"], info["class_names"])
  ]
  assert [im["file_name"] for im in coco["images"]] == ["a.png", "c.jpg", "sub/b.png"]
  assert [im["id"] for im in coco["images"]] == [1, 2, 3]
  kept_total = 0
  for im in coco["images"]:
    path = os.path.join(folder, im["file_name"])
    with Image.open(path) as pil:
      assert (im["width"], im["height"]) == pil.size
    det = predictor(path)
    keep = det["scores"] >= thresh
    kept_total += int(keep.sum())
    anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
    assert len(anns) == int(keep.sum())
    for a, box, score, label in zip(
        anns, det["boxes"][keep], det["scores"][keep], det["classes"][keep]
    ):
      x1, y1, x2, y2 = (float(v) for v in box)
      np.testing.assert_allclose(a["bbox"], [x1, y1, x2 - x1, y2 - y1], atol=1e-4)
      assert 0 <= x1 <= x2 <= im["width"] and 0 <= y1 <= y2 <= im["height"]
      assert a["area"] == pytest.approx((x2 - x1) * (y2 - y1), abs=1e-3)
      assert a["iscrowd"] == 0
      assert a["score"] == pytest.approx(float(score), abs=1e-6)
      assert a["category_id"] == info["label_to_category_id"][int(label)]
  assert 0 < kept_total == len(coco["annotations"])
  # the threshold dropped some detections (those below it)
  assert kept_total < sum(len(predictor(os.path.join(folder, i["file_name"]))["scores"])
                          for i in coco["images"])  # fmt: skip
  assert [a["id"] for a in coco["annotations"]] == list(range(1, kept_total + 1))


def test_json_loads_with_pycocotools(labelled):
  _, _, out, _, _ = labelled
  coco = COCO(out)
  assert sorted(coco.getImgIds()) == [1, 2, 3]
  assert len(coco.getAnnIds()) == len(coco.dataset["annotations"])
  assert set(coco.getCatIds()) >= {a["category_id"] for a in coco.dataset["annotations"]}


def test_json_trains_as_coco_json_and_as_a_mixture_entry(labelled, tmp_path):
  wd, folder, out, _, _ = labelled
  cfg = small_demo_config()
  cfg.data.dataset = "coco_json"
  cfg.data.root = folder
  cfg.data.train_json = out
  cfg.data.eval_split = ""
  cfg.data.data_dir = str(tmp_path / "tfds")
  cfg = validate_config(cfg)
  builder = app.prepare_dataset(cfg, str(tmp_path / "wd"))
  info = pipeline.DetectionInfo.from_builder(builder)
  with open(os.path.join(wd, "dataset_info.json")) as f:
    assert list(info.class_names) == json.load(f)["class_names"]
  assert builder.info.splits["train"].num_examples == 3

  mixed = small_demo_config()  # the teacher's own data plus the pseudo-labelled folder
  mixed.data.root = os.path.join(wd, "synthetic")
  mixed.data.data_dir = str(tmp_path / "tfds")
  mixed.data.mixture = ({"dataset": "coco_json", "root": folder, "train_json": out,
                         "eval_split": "", "weight": 1.0},)  # fmt: skip
  mixed = validate_config(mixed)
  [(_, part, b)] = app._mixture_builders(mixed, str(tmp_path / "wd2"))
  assert part.dataset == "coco_json" and b.info.splits["train"].num_examples == 3


def test_settings_and_inputs_are_checked(labelled, tmp_path):
  cfg = small_demo_config()
  cfg.pseudo_label.score_thresh = 1.5
  with pytest.raises(ConfigError, match="pseudo_label.score_thresh"):
    validate_config(cfg)
  wd, folder, _, _, _ = labelled
  with pytest.raises(ConfigError, match="one folder"):
    app.pseudo_label(small_demo_config(), wd, [folder, folder])
  (tmp_path / "empty").mkdir()
  with pytest.raises(InputFileError, match="no images"):
    pseudo_label.folder_images(str(tmp_path / "empty"), app.IMAGE_EXTENSIONS)
