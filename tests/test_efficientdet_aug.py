"""CenterNet2's EfficientDetResizeCrop train augmentation (cn2_jax/data/efficientdet_aug.py) against
the official code, and its train-loader option (``TrainLoaderSettings.lsj`` =
``EfficientDetResizeCrop``, config ``data.custom_aug``).

Reference: tests/data/zoo/efficientdet_aug.npz, written by
tools/zoo_reference/efficientdet_aug_reference.py from the official
``build_custom_augmentation`` + detectron2 ``DatasetMapper`` (torch, CPU) with scripted
``np.random.uniform`` draws. Images must match bit for bit (both are PIL bilinear on uint8),
kept boxes exactly the same indices, box coordinates within 1e-4 px.
"""

import io
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from cn2_jax.config import base_config
from cn2_jax.data import efficientdet_aug as E
from cn2_jax.data import pipeline as P
from cn2_jax.data import transforms as T
from cn2_jax.data.batcher import _load
from cn2_jax.data.schedule import _AUG_STREAM

REF_PATH = os.path.join(os.path.dirname(__file__), "data", "zoo", "efficientdet_aug.npz")
TRAIN_CASES = ("crop_both", "crop_flip", "down_flip", "identity", "narrow", "coco_like")
BOX_ATOL = 1e-4  # px


@pytest.fixture(scope="module")
def ref():
  if not os.path.exists(REF_PATH):
    pytest.skip(f"{REF_PATH} absent (tools/zoo_reference/efficientdet_aug_reference.py)")
  with np.load(REF_PATH) as z:
    return {k: z[k] for k in z.files}


class ScriptedRng:
  """A Generator stand-in for ``uniform``: ``low + (high - low) * f`` for the next fraction ``f``
  (numpy's formula, as the reference's scripted ``np.random.uniform``)."""

  def __init__(self, fracs):
    self.fracs = [float(f) for f in fracs]

  def uniform(self, low=0.0, high=1.0):
    f = self.fracs.pop(0)
    return np.float64(low) + (np.float64(high) - np.float64(low)) * np.float64(f)


# ------------------------------------------------------------------------------------------------
# Against the official code
# ------------------------------------------------------------------------------------------------
def test_params_match_official_sweep(ref):
  """scaled size (floor), offsets (floor of an independent draw per axis) and img_scale of 1500
  COCO-like images at sizes 640 / 896 / 1280: all identical."""
  hw, sizes, draws = ref["sweep_hw"], ref["sweep_size"], ref["sweep_draws"]
  got = np.zeros_like(ref["sweep_params"])
  scales = np.zeros_like(ref["sweep_img_scale"])
  for i in range(len(hw)):
    p = E.resize_crop_params(int(hw[i, 0]), int(hw[i, 1]), int(sizes[i]), *draws[i])
    got[i] = (p.scaled_h, p.scaled_w, p.offset_y, p.offset_x)
    scales[i] = p.img_scale
  np.testing.assert_array_equal(got, ref["sweep_params"])
  np.testing.assert_array_equal(scales, ref["sweep_img_scale"])  # same float64 operations
  assert (got[:, 2] > 0).any() and (got[:, 3] > 0).any() and (got[:, 2] == 0).any()


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_case_matches_official_mapper(ref, case):
  """EfficientDetResizeCrop + RandomFlip + transform_instance_annotations +
  filter_empty_instances: image bit-exact, the same kept boxes, coordinates within 1e-4 px."""
  image, boxes = ref[f"{case}_image"], ref[f"{case}_boxes"]
  size = int(ref[f"{case}_size"])
  scale_factor, u_y, u_x, u_flip = ref[f"{case}_draws"]
  h, w = image.shape[:2]
  p = E.resize_crop_params(h, w, size, scale_factor, u_y, u_x)
  np.testing.assert_array_equal(
      (p.scaled_h, p.scaled_w, p.offset_y, p.offset_x), ref[f"{case}_params"]
  )
  assert p.img_scale == float(ref[f"{case}_img_scale"])
  out, out_boxes, keep = E.apply_resize_crop(image, boxes, p, hflip=bool(u_flip < 0.5))
  want = ref[f"{case}_out_image"]
  assert out.shape == want.shape == p.crop_hw + (3,)
  np.testing.assert_array_equal(out, want)
  np.testing.assert_array_equal(keep, ref[f"{case}_out_keep"])
  assert out_boxes.dtype == np.float32
  np.testing.assert_allclose(out_boxes, ref[f"{case}_out_boxes"], rtol=0, atol=BOX_ATOL)

  # The loader's entry point: the same four draws from a generator, in the official order.
  aug = E.EfficientDetResizeCrop(size, tuple(ref[f"{case}_scale_range"]))
  out2, boxes2, keep2 = E.efficientdet_resize_crop(
      image, boxes, aug, ScriptedRng(ref[f"{case}_fracs"]), hflip_prob=0.5
  )
  np.testing.assert_array_equal(out2, want)
  np.testing.assert_array_equal(keep2, keep)
  np.testing.assert_array_equal(boxes2, out_boxes)


def test_reference_cases_cover_the_edges(ref):
  """The cases exercise what they are meant to: crops on each axis, flips, no resize, and a
  box of width in (0, 1e-5] dropped (kept by a plain > 0 rule)."""
  params = np.stack([ref[f"{c}_params"] for c in TRAIN_CASES])
  assert (params[:, 2] > 0).sum() >= 2 and (params[:, 3] > 0).sum() >= 3
  assert sum(ref[f"{c}_draws"][3] < 0.5 for c in TRAIN_CASES) >= 3
  assert tuple(params[TRAIN_CASES.index("identity"), :2]) == (64, 64)
  tiny = 12  # make_case's last box: width ~4e-6 px
  for c in ("crop_both", "identity"):
    b = ref[f"{c}_boxes"][tiny].astype(np.float64) * float(ref[f"{c}_img_scale"])
    assert 0 < b[2] - b[0] <= E.EMPTY_BOX_THRESHOLD
    assert tiny not in ref[f"{c}_out_keep"]


@pytest.mark.parametrize("case", ("t0", "t1"))
def test_eval_square_case_matches_official(ref, case):
  """TEST_INPUT_TYPE 'square': EfficientDetResizeCrop(TEST_SIZE, (1, 1)), no flip. The official
  test mapper drops annotations; the boxes are compared with its transforms' ``apply_box``
  clipped to the image."""
  image, boxes = ref[f"{case}_image"], ref[f"{case}_boxes"]
  h, w = image.shape[:2]
  p = E.eval_resize_crop_params(h, w, int(ref[f"{case}_size"]))
  out, out_boxes, keep = E.apply_resize_crop(image, boxes, p)
  np.testing.assert_array_equal(out, ref[f"{case}_out_image"])
  size = int(ref[f"{case}_size"])
  assert size - 1 <= max(out.shape[:2]) <= size  # the long side to TEST_SIZE, floored
  oh, ow = out.shape[:2]
  want = np.clip(ref[f"{case}_out_boxes"].astype(np.float64), 0, [ow, oh, ow, oh])
  np.testing.assert_allclose(out_boxes, want[keep], rtol=0, atol=BOX_ATOL)


# ------------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------------
def test_boxes_follow_the_pixels():
  """A white rectangle on black: after resize-crop (+ flip) the transformed box encloses the
  white pixels up to the bilinear blur (1 px)."""
  h, w = 60, 90
  img = np.zeros((h, w, 3), np.uint8)
  box = np.array([[30.0, 20.0, 70.0, 50.0]], np.float32)
  img[20:50, 30:70] = 255
  for fracs, flip in (((0.95, 0.4, 0.7, 0.9), False), ((0.95, 0.4, 0.7, 0.1), True)):
    out, b, keep = E.efficientdet_resize_crop(
        img, box, E.EfficientDetResizeCrop(64, (0.1, 2.0)), ScriptedRng(fracs)
    )
    assert list(keep) == [0]
    ys, xs = np.nonzero(out[..., 0] > 127)
    x1, y1, x2, y2 = b[0]
    assert abs(xs.min() - x1) <= 1 and abs(xs.max() + 1 - x2) <= 1, (flip, xs.min(), xs.max(), b)
    assert abs(ys.min() - y1) <= 1 and abs(ys.max() + 1 - y2) <= 1, (flip, ys.min(), ys.max(), b)


def test_draw_order_and_bounds():
  """Four draws per image (scale, u_y, u_x, flip) from the generator even without a crop or
  flip; the output never exceeds train_size, boxes stay inside it."""
  rng = np.random.default_rng(0)
  aug = E.EfficientDetResizeCrop(48, (0.1, 2.0))
  img = np.zeros((30, 40, 3), np.uint8)
  boxes = np.array([[-5, -5, 45, 35], [10, 10, 20, 20]], np.float32)
  for k in range(50):
    g1, g2 = np.random.default_rng([7, k]), np.random.default_rng([7, k])
    out, b, _ = E.efficientdet_resize_crop(img, boxes, aug, g1, hflip_prob=0.0)
    g2.uniform(size=4)
    assert g1.uniform() == g2.uniform()  # exactly four draws were made
    assert max(out.shape[:2]) <= 48 and min(out.shape[:2]) >= 1
    oh, ow = out.shape[:2]
    assert np.all(b >= 0) and np.all(b[:, 2] <= ow) and np.all(b[:, 3] <= oh)
  del rng
  out, b, keep = E.efficientdet_resize_crop(
      img, np.zeros((0, 4), np.float32), aug, ScriptedRng((0.9, 0.5, 0.5, 0.1))
  )
  assert out.shape == (48, 48, 3) and b.shape == (0, 4) and keep.shape == (0,)  # 65x86 cropped
  assert pickle.loads(pickle.dumps(aug)) == aug  # travels to grain workers
  with pytest.raises(ValueError, match="scale_range"):
    E.EfficientDetResizeCrop(64, (2.0, 1.0))


# ------------------------------------------------------------------------------------------------
# The train loader option
# ------------------------------------------------------------------------------------------------
def _source():
  """Synthetic records of the builder format (PNG bytes, XYXY float32 boxes, one crowd)."""
  rng = np.random.default_rng(0)
  recs = []
  for i, (h, w) in enumerate([(40, 60), (50, 30), (36, 44), (30, 80), (64, 48)]):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    x1 = rng.uniform(0, w / 2, 3)
    y1 = rng.uniform(0, h / 2, 3)
    bb = np.stack([x1, y1, x1 + rng.uniform(4, w / 2, 3), y1 + rng.uniform(4, h / 2, 3)], 1)
    recs.append(
        {
            "image": buf.getvalue(),
            "objects": {
                "bbox": bb.astype(np.float32),
                "label": np.array([0, 1, 2]),
                "is_crowd": np.array([0, 0, 1], bool),
            },
            "image/id": i,
            "image/filename": f"{i}.png",
        }
    )
  return recs


AUG = E.EfficientDetResizeCrop(train_size=48, scale_range=(0.5, 2.0))
KW = dict(batch_size=2, max_boxes=4, lsj=AUG)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_loader_examples_are_the_transform_of_their_draws():
  """Every example of a batch = ``efficientdet_resize_crop`` of its record with the generator of
  (seed, AUG stream, global example index), on one 64x64 canvas (48 rounded up to 32), zeros
  outside ``image_hw``; crowd boxes kept with their flag."""
  src = _source()
  seed = 3
  it = P.make_train_loader(src, P.TrainLoaderSettings(seed=seed, **KW))
  sizes = set()
  for step in range(4):
    bt = next(it)
    assert bt["image"].shape == (2, 64, 64, 3) and bt["batch_mask"].all()
    for j in range(2):
      rec = src[int(bt["image_id"][j])]
      image, boxes, classes, crowd, _, _ = _load(rec)
      rng = np.random.default_rng([seed, _AUG_STREAM, step * 2 + j])
      want, wb, keep = E.efficientdet_resize_crop(image, boxes, AUG, rng, 0.5)
      h, w = want.shape[:2]
      np.testing.assert_array_equal(bt["image_hw"][j], (h, w))
      np.testing.assert_array_equal(bt["image"][j, :h, :w], want)
      assert not bt["image"][j, h:].any() and not bt["image"][j, :, w:].any()
      gt = T.pad_gt(wb, classes[keep], crowd[keep], 4)
      for k in ("gt_boxes", "gt_classes", "gt_valid", "gt_crowd"):
        np.testing.assert_array_equal(bt[k][j], gt[k])
      np.testing.assert_array_equal(bt["orig_hw"][j], image.shape[:2])
      sizes.add((h, w))
  assert len(sizes) > 3  # random scales


def test_loader_is_deterministic_per_seed_and_step():
  src = _source()
  ref = _take(P.make_train_loader(src, P.TrainLoaderSettings(seed=4, **KW)), 5)
  again = _take(P.make_train_loader(src, P.TrainLoaderSettings(seed=4, **KW)), 5)
  assert all(_same(a, b) for a, b in zip(ref, again))
  resumed = _take(P.make_train_loader(src, P.TrainLoaderSettings(seed=4, **KW), 3), 2)
  assert all(_same(a, b) for a, b in zip(ref[3:], resumed))
  other = _take(P.make_train_loader(src, P.TrainLoaderSettings(seed=5, **KW)), 5)
  assert not all(_same(a, b) for a, b in zip(ref, other))
  as_dict = dict(KW, lsj=dict(train_size=48, scale_range=(0.5, 2.0)))
  from_dict = _take(P.make_train_loader(src, P.TrainLoaderSettings(seed=4, **as_dict)), 5)
  assert all(_same(a, b) for a, b in zip(ref, from_dict))
  lsj = dict(KW, lsj=P.LSJ(output_size=48, scale_range=(0.5, 2.0)))  # the other square jitter
  d2 = _take(P.make_train_loader(src, P.TrainLoaderSettings(seed=4, **lsj)), 5)
  assert not all(_same(a, b) for a, b in zip(ref, d2))
  # two processes share the global batch of each step
  halves = [
      _take(
          P.make_train_loader(
              src,
              P.TrainLoaderSettings(
                  seed=4, process_index=i, process_count=2, **dict(KW, batch_size=1)
              ),
          ),
          5,
      )
      for i in range(2)
  ]
  for k in range(5):
    for key in ref[k]:
      np.testing.assert_array_equal(
          np.concatenate([halves[0][k][key], halves[1][k][key]]), ref[k][key]
      )
  with pytest.raises(ValueError, match="EfficientDetResizeCrop output size"):
    P.make_train_loader(src, P.TrainLoaderSettings(pad_hw=(32, 32), **KW))
  crop = P.AugmentSettings.from_config(
      dict(base_config().data.to_dict(), crop_relative_range=(0.6, 0.6))
  )
  with pytest.raises(ValueError, match="EfficientDetResizeCrop"):
    P.make_train_loader(src, P.TrainLoaderSettings(augment=crop, **KW))


def test_loader_with_colour_after_the_jitter():
  """The one-stage colour / warp augmentations still apply after it (as after LSJ): same
  geometry, other pixels."""
  src = _source()
  colour = P.AugmentSettings.from_config(dict(base_config().data.to_dict(), color_aug="centerx"))
  a = _take(P.make_train_loader(src, P.TrainLoaderSettings(seed=2, augment=colour, **KW)), 2)
  b = _take(P.make_train_loader(src, P.TrainLoaderSettings(seed=2, **KW)), 2)
  for x, y in zip(a, b):
    for k in ("image_hw", "gt_boxes", "gt_valid", "gt_crowd", "gt_classes"):
      np.testing.assert_array_equal(x[k], y[k])
    assert not np.array_equal(x["image"], y["image"])


def test_settings_from_config():
  cfg = base_config()
  assert not isinstance(P.TrainLoaderSettings.from_config(cfg).lsj, E.EfficientDetResizeCrop)
  cfg.data.custom_aug = "EfficientDetResizeCrop"
  cfg.data.train_size = 1280
  cfg.data.scale_range = (0.1, 2.0)
  s = P.TrainLoaderSettings.from_config(cfg)
  assert s.lsj == E.EfficientDetResizeCrop(train_size=1280, scale_range=(0.1, 2.0))
  cfg.data.lsj = True
  with pytest.raises(ValueError, match="custom_aug"):
    P.TrainLoaderSettings.from_config(cfg)
  cfg.data.lsj = False
  cfg.data.custom_aug = "ResizeShortestEdge"  # the official name of the default resize
  assert P.TrainLoaderSettings.from_config(cfg) == P.TrainLoaderSettings.from_config(base_config())
  cfg.data.custom_aug = "RandomResizedCrop"
  with pytest.raises(ValueError, match="custom_aug"):
    P.TrainLoaderSettings.from_config(cfg)
