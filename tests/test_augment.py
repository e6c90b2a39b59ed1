"""Tests for cn2_jax.data.augment (one-stage train augmentations) and their pipeline wiring."""

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from cn2_jax.config import base_config, validate_config
from cn2_jax.data import augment as A
from cn2_jax.data import pipeline as P
from cn2_jax.data import transforms as T


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def rect_image(h, w, box):
  """A black ``h x w`` image with the integer box ``(x1, y1, x2, y2)`` filled white."""
  img = np.zeros((h, w, 3), np.uint8)
  x1, y1, x2, y2 = (int(v) for v in box)
  img[y1:y2, x1:x2] = 255
  return img


def drawn_box(img, thresh=127):
  """Box (continuous coordinates) enclosing the pixels brighter than ``thresh``, or None."""
  ys, xs = np.nonzero(img[..., 0] > thresh)
  if len(xs) == 0:
    return None
  return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def coord_image(h, w):
  """Pixel (y, x) holds (y, x, 0): the top-left pixel of a crop tells its offset."""
  img = np.zeros((h, w, 3), np.uint8)
  img[..., 0] = np.arange(h)[:, None]
  img[..., 1] = np.arange(w)[None, :]
  return img


def settings(**kw):
  """AugmentSettings from the schema defaults (all off) with ``kw`` overrides."""
  d = base_config().data
  for k, v in kw.items():
    d[k] = v
  return A.AugmentSettings.from_config(d).check()


# ------------------------------------------------------------------------------------------------
# Geometry: the transformed box covers the same drawn pixels
# ------------------------------------------------------------------------------------------------
BOX = (30, 20, 62, 44)  # x1, y1, x2, y2 on a 96 x 80 (h x w) image
H, W = 96, 80


def test_flip_moves_the_box_with_the_pixels():
  img, boxes = T.hflip(rect_image(H, W, BOX), np.array([BOX], np.float32))
  np.testing.assert_array_equal(drawn_box(img), boxes[0])


@pytest.mark.parametrize(
    "kind",
    ["affine_scale_shift", "affine_rotate_shear", "perspective", "affine_and_perspective"],
)
def test_warp_box_encloses_the_warped_rectangle(kind):
  kw = dict(
      affine=kind != "perspective",
      scale=(0.6, 1.4),
      rotate=40.0 if "rotate" in kind or "and" in kind else 0.0,
      translate=0.1,
      shear=12.0 if "rotate" in kind else 0.0,
      perspective=0.08 if "perspective" in kind else 0.0,
      min_size=1.0,
      min_visible=0.1,
  )
  checked = 0
  for seed in range(12):
    img = rect_image(H, W, BOX)
    out, boxes, keep = A.random_warp(
        img, np.array([BOX], np.float32), np.random.default_rng(seed), **kw
    )
    assert out.shape == img.shape and out.dtype == np.uint8
    got = drawn_box(out)
    if len(keep) == 0:  # dropped: (almost) nothing of it is left in the image
      assert got is None or (got[2] - got[0]) * (got[3] - got[1]) < 0.2 * 32 * 24 * 2
      continue
    assert boxes.dtype == np.float32 and boxes.shape == (1, 4)
    np.testing.assert_allclose(got, boxes[0], atol=2.0)
    checked += 1
  assert checked >= 8


def test_warp_box_rule_drops_boxes_pushed_out_and_keeps_classes_aligned():
  boxes = np.array([[2, 2, 10, 10], [30, 30, 50, 50], [70, 85, 79, 95]], np.float32)
  shift = np.array([[1, 0, -12], [0, 1, 0], [0, 0, 1]], np.float64)  # 12 px to the left
  enc, ok = A.warp_boxes(boxes, shift)
  np.testing.assert_allclose(enc, boxes - np.array([12, 0, 12, 0]))
  assert ok.all()

  # random_warp with a pure translation: drive the generator so that t_x = -0.15 * w
  class Fixed:

    def __init__(self, values):
      self.values = list(values)

    def uniform(self, lo, hi, size=None):
      return self.values.pop(0)

  img = np.zeros((H, W, 3), np.uint8)
  rng = Fixed([1.0, 0.0, 0.0, 0.0, -12 / W, 0.0])  # s, angle, shear x/y, t_x / w, t_y / h
  _, out, keep = A.random_warp(img, boxes, rng, True, (1, 1), 0, 1, 0, 0.0, 1.0, 0.1)
  np.testing.assert_array_equal(keep, [1, 2])  # box 0 left the image
  np.testing.assert_allclose(out, [[18, 30, 38, 50], [58, 85, 67, 95]])
  # min_visible: a box half outside keeps 50% of its area
  rng = Fixed([1.0, 0.0, 0.0, 0.0, -6 / W, 0.0])
  _, _, keep = A.random_warp(img, boxes[:1], rng, True, (1, 1), 0, 1, 0, 0.0, 1.0, 0.6)
  assert len(keep) == 0
  rng = Fixed([1.0, 0.0, 0.0, 0.0, -6 / W, 0.0])
  _, out, keep = A.random_warp(img, boxes[:1], rng, True, (1, 1), 0, 1, 0, 0.0, 1.0, 0.4)
  np.testing.assert_allclose(out, [[0, 2, 4, 10]])
  # min_size: a 4 px wide remainder is dropped at min_size 5
  rng = Fixed([1.0, 0.0, 0.0, 0.0, -6 / W, 0.0])
  _, _, keep = A.random_warp(img, boxes[:1], rng, True, (1, 1), 0, 1, 0, 0.0, 5.0, 0.0)
  assert len(keep) == 0
  # both off: inputs back, nothing drawn
  out_img, out, keep = A.random_warp(img, boxes, Fixed([]), False, (1, 1), 0, 0, 0, 0.0, 1.0, 0.1)
  assert out_img is img
  np.testing.assert_array_equal(keep, [0, 1, 2])


def test_center_affine_moves_the_box_with_the_pixels():
  checked = 0
  for seed in range(10):
    img = rect_image(H, W, BOX)
    out, boxes, keep = A.center_affine(
        img, np.array([BOX], np.float32), np.random.default_rng(seed), 64, (0.6, 1.3), 0.1, 16
    )
    assert out.shape == (64, 64, 3)
    got = drawn_box(out)
    if len(keep) == 0:
      assert got is None
      continue
    b = boxes[0]
    assert b.min() >= 0 and b.max() <= 63  # corners clipped to [0, S - 1] as CenterNet-better
    if 0 < b[0] and 0 < b[1] and b[2] < 63 and b[3] < 63:  # not clipped: must match the pixels
      np.testing.assert_allclose(got, b, atol=1.5)
      checked += 1
  assert checked >= 3


def test_center_affine_window_follows_centernet_better():
  # scale from np.arange(0.6, 1.4, 0.1); centre randint(border, side - border), border 128 -> 64 on
  # a 200 px side (_get_boarder halves it while side // 2 <= border)
  seen = set()
  for seed in range(60):
    cx, cy, side = A.center_affine_params(
        200, 300, np.random.default_rng(seed), (0.6, 1.3), 0.1, 128
    )
    s = side / 300
    seen.add(round(s, 6))
    assert 128 <= cx < 300 - 128 and 64 <= cy < 200 - 64
  np.testing.assert_allclose(sorted(seen), np.arange(0.6, 1.4, 0.1), atol=1e-6)
  assert A._center_affine_border(128, 640) == 128
  assert A._center_affine_border(128, 256) == 64  # 128 <= 128: halved
  assert A._center_affine_border(128, 1) == 0  # (the official loop would not end)
  m = A.center_affine_matrix(150.0, 100.0, 300.0, 512)
  np.testing.assert_allclose(m @ [150, 100, 1], [256, 256, 1])
  np.testing.assert_allclose(m @ [0, 100, 1], [0, 256, 1])  # the window's left edge -> 0


# ------------------------------------------------------------------------------------------------
# Crop (centerX RandomCrop "relative_range" around a GT centre)
# ------------------------------------------------------------------------------------------------
def test_crop_box_is_exact_on_pixels():
  for seed in range(5):
    out, boxes, keep = A.random_crop_relative_range(
        rect_image(H, W, BOX), np.array([BOX], np.float32), (0.6, 0.6), np.random.default_rng(seed)
    )
    assert len(keep) == 1
    got = drawn_box(out)
    np.testing.assert_array_equal(got, boxes[0])


def test_crop_keeps_a_gt_centre_and_drops_empty_boxes():
  h, w = 120, 160
  rng0 = np.random.default_rng(123)
  dropped = 0
  for seed in range(40):
    n = int(rng0.integers(1, 6))
    xy = rng0.uniform(0, [w - 8, h - 8], (n, 2))
    wh = rng0.uniform(2, 40, (n, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1).astype(np.float32)
    classes = np.arange(n) + 10
    out, got, keep = A.random_crop_relative_range(
        coord_image(h, w), boxes, (0.5, 0.7), np.random.default_rng(seed)
    )
    ch, cw = out.shape[:2]
    assert int(h * 0.5 + 0.5) <= ch <= h and int(w * 0.7 + 0.5) <= cw <= w
    y0, x0 = int(out[0, 0, 0]), int(out[0, 0, 1])
    np.testing.assert_array_equal(out, coord_image(h, w)[y0 : y0 + ch, x0 : x0 + cw])
    # boxes: shifted, clipped, empty ones dropped (classes follow keep)
    ref = boxes - [x0, y0, x0, y0]
    ref[:, 0::2] = np.clip(ref[:, 0::2], 0, cw)
    ref[:, 1::2] = np.clip(ref[:, 1::2], 0, ch)
    nonempty = (ref[:, 2] > ref[:, 0]) & (ref[:, 3] > ref[:, 1])
    np.testing.assert_array_equal(keep, np.nonzero(nonempty)[0])
    np.testing.assert_allclose(got, ref[nonempty])
    assert len(classes[keep]) == len(got)
    dropped += n - len(keep)
    # at least one GT centre inside the window (up to detectron2's integer rounding: 1 px)
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    inside = (cx >= x0 - 1) & (cx <= x0 + cw + 1) & (cy >= y0 - 1) & (cy <= y0 + ch + 1)
    assert inside.any(), seed
  assert dropped > 0  # the case of dropped boxes was exercised


def test_crop_window_rule_and_no_boxes():
  # the window always holds the centre (floor(c) - crop <= origin <= ceil(c), inside the image)
  for seed in range(50):
    rng = np.random.default_rng(seed)
    c = rng.uniform(0, [100, 200])
    box = [c[1] - 3, c[0] - 2, c[1] + 3, c[0] + 2]
    y0, x0 = A.crop_window_with_instance((60, 90), (100, 200), box, rng)
    assert 0 <= y0 <= 100 - 60 and 0 <= x0 <= 200 - 90
    assert np.floor(c[0]) - 60 <= y0 <= np.ceil(c[0]) and np.floor(c[1]) - 90 <= x0 <= np.ceil(c[1])
  out, boxes, keep = A.random_crop_relative_range(
      coord_image(50, 70), np.zeros((0, 4), np.float32), (0.6, 0.6), np.random.default_rng(0)
  )
  assert out.shape[0] >= 30 and out.shape[1] >= 42 and boxes.shape == (0, 4) and len(keep) == 0
  # d2: crop size int(side * uniform(s, 1) + 0.5) from one random(2) draw
  r = np.random.default_rng(7).random(2)
  ch, cw = A.relative_range_crop_size(50, 70, (0.6, 0.75), np.random.default_rng(7))
  assert (ch, cw) == (
      int(50 * (np.float32(0.6) + r[0] * (1 - np.float32(0.6))) + 0.5),
      int(70 * (np.float32(0.75) + r[1] * (1 - np.float32(0.75))) + 0.5),
  )


# ------------------------------------------------------------------------------------------------
# Colour: against a numpy transcription of the formulas
# ------------------------------------------------------------------------------------------------
def small_image():
  return np.random.default_rng(3).integers(0, 256, (5, 7, 3), dtype=np.uint8)


def test_blend_ops_on_known_values():
  img = np.array([[[200, 101, 0], [10, 20, 30]]], np.uint8)
  # brightness 1.5: 300 -> 255, 151.5 -> 151 (uint8 truncation), 0
  np.testing.assert_array_equal(A.blend_brightness(img, 1.5)[0, 0], [255, 151, 0])
  # contrast 0.5 against the mean of all values (361 / 6)
  mean = 361 / 6
  want = np.floor(0.5 * mean + 0.5 * img.astype(np.float64))
  np.testing.assert_array_equal(A.blend_contrast(img, 0.5), want)
  # saturation 0: every channel becomes the luma
  grey = img @ np.array([0.299, 0.587, 0.114])
  np.testing.assert_array_equal(
      A.blend_saturation(img, 0.0), np.floor(grey)[..., None].repeat(3, -1)
  )
  # lighting: the eigen offset added per channel
  off = A.IMAGENET_EIGVEC @ (np.array([10.0, -5.0, 3.0]) * A.IMAGENET_EIGVAL)
  np.testing.assert_array_equal(
      A.blend_lighting(img, [10.0, -5.0, 3.0], A.IMAGENET_EIGVAL, A.IMAGENET_EIGVEC),
      np.floor(np.clip(img + off, 0, 255)),
  )


def test_color_aug_centerx_matches_a_transcription():
  img = small_image()
  for seed in range(5):
    got = A.color_aug_centerx(img, np.random.default_rng(seed), (0.6, 1.4), 0.1)
    # detectron2 BlendTransform: out = clip(src_w * src + dst_w * float32(img)) -> uint8 (trunc);
    # brightness src 0, contrast src mean(img), saturation src luma(img), lighting src PCA offset
    rng = np.random.default_rng(seed)
    x = img
    w = rng.uniform(0.6, 1.4)
    x = np.clip(np.float32(w) * x.astype(np.float32), 0, 255).astype(np.uint8)
    w = rng.uniform(0.6, 1.4)
    x = np.clip(
        np.float32((1 - w) * x.mean()) + np.float32(w) * x.astype(np.float32), 0, 255
    ).astype(np.uint8)
    w = rng.uniform(0.6, 1.4)
    luma = x.dot([0.299, 0.587, 0.114])[:, :, None]
    x = np.clip((1 - w) * luma + np.float32(w) * x.astype(np.float32), 0, 255).astype(np.uint8)
    eigval = np.array([0.2175, 0.0188, 0.0045])
    eigvec = np.array(
        [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]
    )
    alpha = rng.normal(scale=0.1, size=3)
    x = np.clip(eigvec.dot(alpha * eigval) + x.astype(np.float32), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(got, x)
    assert got.dtype == np.uint8 and got.shape == img.shape


def test_color_aug_centernet_matches_a_transcription():
  img = small_image()
  eigval = np.array([0.2141788, 0.01817699, 0.00341571], np.float32)
  eigvec_bgr = np.array(
      [
          [-0.58752847, -0.69563484, 0.41340352],
          [-0.5832747, 0.00994535, -0.81221408],
          [-0.56089297, 0.71832671, 0.41158938],
      ],
      np.float32,
  )
  orders = set()
  for seed in range(8):
    got = A.color_aug_centernet(img, np.random.default_rng(seed), (0.6, 1.4), 0.1)
    # CenterNet color_aug on the BGR float image (here computed in BGR, returned as RGB)
    rng = np.random.default_rng(seed)
    bgr = img[..., ::-1].astype(np.float32) / np.float32(255)
    gs = bgr @ np.array([0.114, 0.587, 0.299], np.float32)
    gs_mean = gs.mean(dtype=np.float32)
    order = rng.permutation(3)
    orders.add(tuple(order))
    for op in order:
      a = np.float32(rng.uniform(0.6, 1.4))
      if op == 0:  # brightness_
        bgr = bgr * a
      elif op == 1:  # contrast_
        bgr = bgr * a + gs_mean * (np.float32(1) - a)
      else:  # saturation_
        bgr = bgr * a + gs[:, :, None] * (np.float32(1) - a)
    alpha = rng.normal(scale=0.1, size=3)
    bgr = (bgr + eigvec_bgr.dot(eigval * alpha)).astype(np.float32)
    want = np.clip(np.rint(bgr * 255), 0, 255).astype(np.uint8)[..., ::-1]
    np.testing.assert_allclose(got.astype(int), want.astype(int), atol=1)  # luma sum order
    assert (got == want).mean() > 0.97
  assert len(orders) > 2  # random order


def test_color_aug_dispatch():
  img = small_image()
  assert A.color_aug(img, np.random.default_rng(0), "", (0.6, 1.4), 0.1) is img
  with pytest.raises(ValueError, match="color_aug"):
    A.color_aug(img, np.random.default_rng(0), "bogus", (0.6, 1.4), 0.1)


# ------------------------------------------------------------------------------------------------
# Config and pipeline
# ------------------------------------------------------------------------------------------------
def test_config_defaults_are_off_and_validated():
  d = base_config().data
  s = A.AugmentSettings.from_config(d)
  assert not s.enabled and s.crop_relative_range == () and s.color_aug == ""
  assert s.center_affine_scale == (0.6, 1.3) and s.color_aug_range == (0.6, 1.4)
  for key, bad in [
      ("crop_relative_range", (0.6,)),
      ("crop_relative_range", (0.0, 0.6)),
      ("color_aug", "yes"),
      ("affine_scale", (1.5, 0.5)),
      ("perspective", 0.7),
      ("warp_min_visible", 2.0),
      ("center_affine_scale", (0.0, 1.3)),
  ]:
    cfg = base_config()
    cfg.data[key] = bad
    with pytest.raises(ValueError, match=key):
      validate_config(cfg)
  cfg = base_config()
  cfg.data.lsj = True
  cfg.data.crop_relative_range = (0.6, 0.6)
  with pytest.raises(ValueError, match="lsj"):
    validate_config(cfg)
  cfg = base_config()
  cfg.data.crop_relative_range = (0.6, 0.6)
  cfg.data.color_aug = "centerx"
  validate_config(cfg)


def _source(n=4):
  rng = np.random.default_rng(0)
  recs = []
  for i, (h, w) in enumerate([(40, 60), (50, 30), (36, 44), (30, 80)][:n]):
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


KW = dict(batch_size=2, short_sizes=(24, 32), max_size=64, max_boxes=4, aspect_grouping=False)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_pipeline_defaults_off_path_is_unchanged():
  src = _source()
  ref = _take(P.make_train_loader(src, P.TrainLoaderSettings(seed=1, **KW)), 3)
  off = _take(
      P.make_train_loader(src, P.TrainLoaderSettings(seed=1, augment=base_config().data, **KW)), 3
  )
  assert all(_same(a, b) for a, b in zip(ref, off))
  # colour alone draws from its own stream: same flips, same boxes, different pixels
  col = _take(
      P.make_train_loader(
          src, P.TrainLoaderSettings(seed=1, augment=settings(color_aug="centerx"), **KW)
      ),
      3,
  )
  for a, b in zip(ref, col):
    for k in a:
      if k != "image":
        np.testing.assert_array_equal(a[k], b[k])
  assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(ref, col))


@pytest.mark.parametrize(
    "aug,canvas",
    [
        (dict(crop_relative_range=(0.6, 0.6), color_aug="centerx"), 64),
        (dict(affine=True, affine_rotate=10.0, perspective=0.05, color_aug="centernet"), 64),
        (dict(center_affine=True, center_affine_size=48, center_affine_border=8), 64),
    ],
)
def test_pipeline_augmented_is_deterministic(aug, canvas):
  src = _source()
  s = settings(**aug)
  ref = _take(P.make_train_loader(src, P.TrainLoaderSettings(seed=4, augment=s, **KW)), 4)
  for bt in ref:
    assert bt["image"].shape == (2, canvas, canvas, 3)
    assert bt["batch_mask"].all()
    for j in range(2):
      v = bt["gt_valid"][j] | bt["gt_crowd"][j]
      b = bt["gt_boxes"][j, v]
      assert np.all(b[:, 2] > b[:, 0]) and np.all(b[:, 3] > b[:, 1])
      assert np.all(b[:, 2] <= bt["image_hw"][j, 1] + 1e-4)
      assert np.all(b[:, 3] <= bt["image_hw"][j, 0] + 1e-4)
      if s.center_affine:
        np.testing.assert_array_equal(bt["image_hw"][j], (48, 48))
  again = _take(P.make_train_loader(src, P.TrainLoaderSettings(seed=4, augment=s, **KW)), 4)
  assert all(_same(a, b) for a, b in zip(ref, again))
  resumed = _take(P.make_train_loader(src, P.TrainLoaderSettings(seed=4, augment=s, **KW), 2), 2)
  assert all(_same(a, b) for a, b in zip(ref[2:], resumed))
  other = _take(P.make_train_loader(src, P.TrainLoaderSettings(seed=5, augment=s, **KW)), 4)
  assert not all(_same(a, b) for a, b in zip(ref, other))
  plain = _take(P.make_train_loader(src, P.TrainLoaderSettings(seed=4, **KW)), 4)
  assert not all(_same(a, b) for a, b in zip(ref, plain))


def test_pipeline_shape_changing_augments_need_a_square_canvas():
  src = _source()
  with pytest.raises(ValueError, match="square"):
    P.make_train_loader(
        src,
        P.TrainLoaderSettings(
            pad_hw=(32, 64), augment=settings(crop_relative_range=(0.6, 0.6)), **KW
        ),
    )
  with pytest.raises(ValueError, match="lsj"):
    P.make_train_loader(
        src,
        P.TrainLoaderSettings(lsj=dict(output_size=48), augment=settings(center_affine=True), **KW),
    )
  s = dataclasses.replace(settings(), color_aug="bogus")
  with pytest.raises(ValueError, match="color_aug"):
    P.make_train_loader(src, P.TrainLoaderSettings(augment=s, **KW))


def test_pipeline_lsj_with_warp_and_colour():
  src = _source()
  s = settings(affine=True, color_aug="centerx")
  kw = dict(batch_size=2, max_boxes=4, lsj=dict(output_size=48, scale_range=(0.5, 1.5)))
  ref = _take(P.make_train_loader(src, P.TrainLoaderSettings(seed=2, augment=s, **kw)), 2)
  plain = _take(P.make_train_loader(src, P.TrainLoaderSettings(seed=2, **kw)), 2)
  for a, b in zip(ref, plain):
    assert a["image"].shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(a["image_hw"], b["image_hw"])  # same LSJ draws
    assert not np.array_equal(a["image"], b["image"])
  again = _take(P.make_train_loader(src, P.TrainLoaderSettings(seed=2, augment=s, **kw)), 2)
  assert all(_same(a, b) for a, b in zip(ref, again))
