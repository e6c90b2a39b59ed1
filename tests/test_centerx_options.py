"""centerX options of issue 25 item 3: `data.resize_type = "Resize"` (centerX RESIZE_TYPE,
detectron2 `Resize(shape=(min_size, max_size))`), `data.box_min_size` (centerX BOX_MINSIZE,
detectron2 `Boxes.nonempty(threshold)`: kept when w > t and h > t) and `model.onestage.hm_loss =
"mse"` (centerX LOSS.MSE, `torch.nn.MSELoss()` = the mean over every element); each against a
numpy reference written from the centerX / detectron2 code, through the loaders where they act."""

import io
import types

import numpy as np
import pytest
from PIL import Image

from cn2_jax.config import base_config, validate_config
from cn2_jax.data import augment as A
from cn2_jax.data import pipeline as P
from cn2_jax.errors import ConfigError
from cn2_jax.modeling.onestage import losses as L
from cn2_jax.predictor import Predictor

SIZES = [(40, 60), (50, 30), (36, 44), (30, 80)]  # (h, w): landscape, portrait, ...
BOXES = [
    [[2.0, 3.0, 30.0, 20.0], [10.0, 10.0, 15.0, 14.0], [40.0, 1.0, 58.0, 39.0]],
    [[1.0, 1.0, 20.0, 45.0], [5.0, 30.0, 9.0, 33.0], [0.0, 0.0, 30.0, 50.0]],
    [[3.0, 4.0, 40.0, 30.0], [20.0, 5.0, 26.0, 8.0], [1.0, 1.0, 4.0, 4.0]],
    [[0.0, 0.0, 79.0, 29.0], [60.0, 10.0, 70.0, 12.5], [30.0, 5.0, 33.0, 25.0]],
]


def _source():
  rng = np.random.default_rng(0)
  recs, images = [], []
  for i, (h, w) in enumerate(SIZES):
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    images.append(image)
    recs.append(
        {
            "image": buf.getvalue(),
            "objects": {
                "bbox": np.array(BOXES[i], np.float32),
                "label": np.array([0, 1, 1]),
                "is_crowd": np.array([0, 0, 1], bool),
            },
            "image/id": i,
            "image/filename": f"{i}.png",
        }
    )
  return recs, images


def ref_resize(image, boxes, h, w):
  """detectron2 ResizeTransform(H, W, h, w, BILINEAR): PIL resize; apply_coords x *= w / W,
  y *= h / H."""
  src_h, src_w = image.shape[:2]
  out = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
  b = np.array(boxes, np.float64).copy()
  b[:, [0, 2]] *= w / src_w
  b[:, [1, 3]] *= h / src_h
  return out, b


def ref_nonempty(boxes, threshold):
  """detectron2 Boxes.nonempty(threshold), written out box by box."""
  return [(x2 - x1) > threshold and (y2 - y1) > threshold for x1, y1, x2, y2 in np.asarray(boxes)]


# ----------------------------------------------------------------------------------- Resize
def test_fixed_resize_hw_and_resize_fixed():
  assert A.fixed_resize_hw((384, 416, 448), 640) == (384, 640)  # centerX: min_size[0]
  assert A.fixed_resize_hw(512, 512) == (512, 512)
  _, images = _source()
  for image, boxes in zip(images, BOXES):
    got_image, got_boxes = A.resize_fixed(image, boxes, (24, 64))
    want_image, want_boxes = ref_resize(image, boxes, 24, 64)
    assert got_image.shape == (24, 64, 3) and got_image.dtype == np.uint8
    np.testing.assert_array_equal(got_image, want_image)
    np.testing.assert_allclose(got_boxes, want_boxes, rtol=1e-6)


def _rows(batch):
  return {int(i): j for j, i in enumerate(batch["image_id"]) if batch["batch_mask"][j]}


def test_train_loader_resize_to_a_fixed_size():
  src, images = _source()
  settings = P.TrainLoaderSettings(
      batch_size=2,
      short_sizes=(24, 32),
      max_size=56,
      max_boxes=4,
      hflip_prob=0.0,
      resize_type="Resize",
  )
  seen = set()
  for batch in (b for b, _ in zip(P.make_train_loader(src, settings), range(4))):
    assert batch["image"].shape == (2, 32, 64, 3)  # 24 x 56 rounded up to 32
    for i, j in _rows(batch).items():
      seen.add(i)
      np.testing.assert_array_equal(batch["image_hw"][j], (24, 56))
      np.testing.assert_array_equal(batch["orig_hw"][j], SIZES[i])
      want_image, want_boxes = ref_resize(images[i], BOXES[i], 24, 56)
      np.testing.assert_array_equal(batch["image"][j, :24, :56], want_image)
      want_boxes[:, [0, 2]] = want_boxes[:, [0, 2]].clip(0, 56)
      want_boxes[:, [1, 3]] = want_boxes[:, [1, 3]].clip(0, 24)
      real = batch["gt_valid"][j] | batch["gt_crowd"][j]
      np.testing.assert_allclose(batch["gt_boxes"][j, real], want_boxes, rtol=1e-5)
  assert seen == {0, 1, 2, 3}
  with pytest.raises(ValueError, match="resize_type"):
    next(P.make_train_loader(src, P.TrainLoaderSettings(batch_size=1, resize_type="resize")))
  with pytest.raises(ValueError, match="holding"):
    next(
        P.make_train_loader(
            src,
            P.TrainLoaderSettings(
                batch_size=1, short_sizes=(24,), max_size=56, pad_hw=(32, 32), resize_type="Resize"
            ),
        )
    )


def test_eval_loader_resize_to_a_fixed_size():
  src, images = _source()
  kw = dict(batch_size=3, short_size=24, max_size=40, max_boxes=4)
  plan = P.eval_plan(src, batch_size=3, short_size=24, max_size=40, resize_type="Resize")
  assert [canvas for canvas, _ in plan] == [(32, 64), (32, 64)]  # one canvas for every image
  batches = list(P.make_eval_loader(src, resize_type="Resize", **kw))
  assert len(batches) == 2
  for batch in batches:
    for i, j in _rows(batch).items():
      np.testing.assert_array_equal(batch["image_hw"][j], (24, 40))
      np.testing.assert_array_equal(
          batch["image"][j, :24, :40], ref_resize(images[i], BOXES[i], 24, 40)[0]
      )
  # min_size_test 0 means no resize, whatever the resize type
  plain = next(P.make_eval_loader(src, resize_type="Resize", **{**kw, "short_size": 0}))
  assert {i: tuple(plain["image_hw"][j]) for i, j in _rows(plain).items()} == {
      i: SIZES[i] for i in range(3)
  }


def test_predictor_resizes_as_the_eval_loader():
  """The notebook Predictor (and so predict, pseudo_label and export) preprocesses like the
  evaluation: with resize_type="Resize" every image to exactly min_size_test x max_size_test."""
  cfg = base_config()
  cfg.data.min_size_test, cfg.data.max_size_test = 24, 40
  image = np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)
  for resize_type, resized_hw in (("Resize", (24, 40)), ("ResizeShortestEdge", (24, 40))):
    cfg.data.resize_type = resize_type
    padded, image_hw, orig_hw = Predictor.preprocess(types.SimpleNamespace(config=cfg), image)
    assert tuple(image_hw[0]) == resized_hw and tuple(orig_hw[0]) == (30, 50)
  tall = image[:, :20]  # 30x20: the shortest-edge resize keeps the aspect, Resize does not
  cfg.data.resize_type = "Resize"
  padded, image_hw, _ = Predictor.preprocess(types.SimpleNamespace(config=cfg), tall)
  assert tuple(image_hw[0]) == (24, 40)
  np.testing.assert_array_equal(padded[0, :24, :40], ref_resize(tall, np.zeros((0, 4)), 24, 40)[0])
  cfg.data.resize_type = "ResizeShortestEdge"
  _, image_hw, _ = Predictor.preprocess(types.SimpleNamespace(config=cfg), tall)
  assert tuple(image_hw[0]) == (36, 24)


# ------------------------------------------------------------------------------ BOX_MINSIZE
def test_min_size_keep_matches_detectron2_nonempty():
  boxes = np.array(
      [[0, 0, 5, 10], [0, 0, 5.01, 10], [0, 0, 10, 5], [0, 0, 10, 6], [1, 1, 3, 3], [0, 0, 6, 6]],
      np.float32,
  )
  crowd = np.array([0, 0, 0, 0, 1, 0], bool)
  for t in (0.0, 2.0, 5.0, 5.5, 6.0):
    want = [i for i, ok in enumerate(ref_nonempty(boxes, t)) if ok or crowd[i]]
    np.testing.assert_array_equal(A.min_size_keep(boxes, crowd, t), want)
  np.testing.assert_array_equal(A.min_size_keep(boxes, crowd, 5.0), [1, 3, 4, 5])


@pytest.mark.parametrize("resize_type", ["ResizeShortestEdge", "Resize"])
def test_train_loader_drops_small_boxes_after_the_resize(resize_type):
  src, _ = _source()
  kw = dict(batch_size=4, short_sizes=(24,), max_size=56, max_boxes=4, hflip_prob=0.0, seed=2)
  plain = next(P.make_train_loader(src, P.TrainLoaderSettings(resize_type=resize_type, **kw)))
  t = 3.0
  small = next(
      P.make_train_loader(src, P.TrainLoaderSettings(resize_type=resize_type, box_min_size=t, **kw))
  )
  dropped = 0
  for i, j in _rows(plain).items():
    k = _rows(small)[i]
    real = plain["gt_valid"][j] | plain["gt_crowd"][j]
    boxes, crowd = plain["gt_boxes"][j, real], plain["gt_crowd"][j, real]
    keep = [n for n, ok in enumerate(ref_nonempty(boxes, t)) if ok or crowd[n]]
    dropped += int(real.sum()) - len(keep)
    kept = small["gt_valid"][k] | small["gt_crowd"][k]
    np.testing.assert_array_equal(small["gt_boxes"][k, kept], boxes[keep])
    np.testing.assert_array_equal(small["gt_crowd"][k, kept], crowd[keep])
  assert dropped > 0  # the boxes measured in the resized image, not the original


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(resize_type="resize"), "data.resize_type"),
        (dict(resize_type="Resize", lsj=True), "data.resize_type"),
        (dict(resize_type="Resize", custom_aug="EfficientDetResizeCrop"), "data.resize_type"),
        (dict(resize_type="Resize", center_affine=True), "data.resize_type"),
        (dict(box_min_size=-1.0), "data.box_min_size"),
    ],
)
def test_bad_data_options_are_one_line_errors(changes, field):
  cfg = base_config()
  for key, value in changes.items():
    cfg.data[key] = value
  with pytest.raises(ConfigError, match=field):
    validate_config(cfg)


def test_resize_and_box_min_size_reach_the_train_loader():
  cfg = base_config()
  cfg.data.resize_type = "Resize"
  cfg.data.box_min_size = 5.0
  settings = P.TrainLoaderSettings.from_config(validate_config(cfg))
  assert settings.resize_type == "Resize" and settings.box_min_size == 5.0


def test_hm_loss_option():
  pred = np.random.default_rng(0).uniform(0, 1, (2, 4, 5, 3)).astype(np.float32)
  gt = np.random.default_rng(1).uniform(0, 1, (2, 4, 5, 3)).astype(np.float32) ** 4
  want = sum(float(p - g) ** 2 for p, g in zip(pred.ravel(), gt.ravel())) / pred.size
  np.testing.assert_allclose(float(L.mse_heatmap_loss(pred, gt)), want, rtol=1e-5)
  cfg = base_config()
  cfg.model.arch = "onestage"
  cfg.model.onestage.hm_loss = "mse"
  validate_config(cfg)
  cfg.model.onestage.ignore_unlabel = True
  with pytest.raises(ConfigError, match="hm_loss"):
    validate_config(cfg)
  cfg = base_config()
  cfg.model.arch = "onestage"
  cfg.model.onestage.hm_loss = "l2"
  with pytest.raises(ConfigError, match="model.onestage.hm_loss"):
    validate_config(cfg)
