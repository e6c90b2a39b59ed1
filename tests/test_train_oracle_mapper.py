"""Data path vs the training oracle's detectron2 `DatasetMapper` (TRAIN_README §2.3, issue 9 1.4).

The official run mapped each COCO record with ResizeShortestEdge(800, max 1333) (PIL bilinear on
uint8), no flip, crowd annotations dropped, boxes xywh -> xyxy, scaled per axis by
(new_w / w, new_h / h), clipped to the resized image and empty ones removed. Our train-time
transforms (`cn2_jax.data.transforms`, called in the order of `data/pipeline.py` with the short
side fixed at 800 and flip probability 0) must give the same network image and the same GT.

Inputs: the original of image 0 (`000000000009.jpg`) is decoded from the JPEG beside the oracle;
the JPEG of image 1 (`000000000074.jpg`) is not in the oracle folder, so its decoded original
(`img1_orig_bgr_uint8`, detectron2 `read_image`) is the starting point instead.
"""

from __future__ import annotations

import numpy as np
import pytest

from cn2_jax.data import transforms as T
from cn2_jax.testing.oracle import oracle_dir

ORACLE = oracle_dir()
NPZ = None if ORACLE is None else ORACLE / "train_outputs_dev.npz"
pytestmark = pytest.mark.skipif(
    NPZ is None or not NPZ.is_file(), reason="training oracle (train_outputs_dev.npz) not found"
)
SHORT, MAX_SIZE = 800, 1333


@pytest.fixture(scope="module")
def npz():
  with np.load(NPZ) as z:
    return {k: z[k] for k in z.files}


def _images(npz):
  return range(len(npz["image_ids"]))


def _original_rgb(npz, i):
  """(RGB original, source) for image i: its JPEG when the oracle folder has it."""
  jpg = ORACLE / f"{int(npz['image_ids'][i]):012d}.jpg"
  if jpg.is_file():
    return T.decode_image(jpg), jpg.name
  return np.ascontiguousarray(npz[f"img{i}_orig_bgr_uint8"][..., ::-1]), "npz original"


def _orig_xyxy(xywh, h, w):
  """COCO xywh -> xyxy as our dataset builder does it (float64, clipped to the original image,
  then float32). detectron2 adds x + w in float32: identical here (the sum of two float32 values
  is exact in float64, so rounding it once gives the float32 sum)."""
  b = np.asarray(xywh, np.float64)
  xyxy = np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)
  xyxy[:, 0::2] = np.clip(xyxy[:, 0::2], 0, w)
  xyxy[:, 1::2] = np.clip(xyxy[:, 1::2], 0, h)
  return xyxy.astype(np.float32)


def _train_transform(image, boxes, classes, crowd):
  """The non-LSJ train path of data/pipeline.py (`_Mapper.example`) with short side 800 and no
  flip: resize, flip (p = 0), clip, drop empty boxes."""
  image, boxes = T.resize_shortest_edge(image, boxes, SHORT, MAX_SIZE)
  image, boxes = T.random_hflip(image, boxes, np.random.default_rng(0), 0.0)
  boxes = T.clip_boxes(boxes, *image.shape[:2])
  keep = np.nonzero(T.nonempty_boxes(boxes))[0]
  return image, boxes[keep], classes[keep], crowd[keep]


def test_decoded_original_matches_read_image(npz):
  jpg = ORACLE / f"{int(npz['image_ids'][0]):012d}.jpg"
  if not jpg.is_file():
    pytest.skip(f"{jpg.name} not in the oracle folder")
  np.testing.assert_array_equal(T.decode_image(jpg), npz["img0_orig_bgr_uint8"][..., ::-1])


@pytest.mark.parametrize("i", [0, 1])
def test_resized_image_and_gt_match_oracle(npz, i):
  if i >= len(npz["image_ids"]):
    pytest.skip("batch has fewer images")
  rgb, source = _original_rgb(npz, i)
  h, w = rgb.shape[:2]
  assert (h, w) == tuple(int(v) for v in npz[f"img{i}_orig_hw"])
  assert T.resize_shortest_edge_shape(h, w, SHORT, MAX_SIZE) == tuple(
      int(v) for v in npz[f"img{i}_resized_hw"]
  )

  boxes = _orig_xyxy(npz[f"gt{i}_orig_bbox_xywh"], h, w)
  classes = npz[f"gt{i}_classes"].astype(np.int64)
  crowd = np.zeros(len(classes), bool)
  image, b, c, cr = _train_transform(rgb, boxes, classes, crowd)

  # Image: PIL bilinear on uint8 in both; allow a rounding step where Pillow versions differ.
  ref = npz[f"img{i}_resized_bgr_uint8"][..., ::-1]
  assert image.shape == ref.shape
  diff = np.abs(image.astype(np.int16) - ref.astype(np.int16))
  print(
      f"image {i} ({source}): resized max abs diff {int(diff.max())}, "
      f"{int((diff > 0).sum())} of {diff.size} values differ"
  )
  assert diff.max() <= 1 and (diff > 0).mean() < 1e-3

  # GT: same boxes to the bit (per-axis scale in float64, clip, float32), same classes.
  gt = T.pad_gt(b, c, cr, max_boxes=len(classes) + 4)
  valid = gt["gt_valid"]
  np.testing.assert_array_equal(gt["gt_boxes"][valid], npz[f"gt{i}_boxes_xyxy"])
  np.testing.assert_array_equal(gt["gt_classes"][valid], npz[f"gt{i}_classes"])
  assert int(npz[f"gt{i}_num_crowd_dropped"]) == 0


def test_crowd_and_out_of_image_boxes_are_dropped(npz):
  """The oracle images have no crowd box and nothing leaves the image; add one of each and check
  the GT the model trains on (gt_valid rows) is still exactly the oracle's."""
  rgb, _ = _original_rgb(npz, 0)
  h, w = rgb.shape[:2]
  boxes = _orig_xyxy(npz["gt0_orig_bbox_xywh"], h, w)
  classes = npz["gt0_classes"].astype(np.int64)
  extra = np.array(
      [
          [10, 10, 200, 200],  # crowd: kept as gt_crowd, never trained on
          [w + 5, 20, w + 50, 60],
      ],  # outside the image: empty after clipping
      np.float32,
  )
  boxes = np.concatenate([boxes[:3], extra[:1], boxes[3:], extra[1:]])
  classes = np.concatenate([classes[:3], [0], classes[3:], [0]])
  crowd = np.zeros(len(classes), bool)
  crowd[3] = True
  _, b, c, cr = _train_transform(rgb, boxes, classes, crowd)
  assert len(b) == len(classes) - 1  # the outside box is gone
  gt = T.pad_gt(b, c, cr, max_boxes=16)
  np.testing.assert_array_equal(gt["gt_boxes"][gt["gt_valid"]], npz["gt0_boxes_xyxy"])
  assert gt["gt_crowd"].sum() == 1 and not (gt["gt_crowd"] & gt["gt_valid"]).any()
