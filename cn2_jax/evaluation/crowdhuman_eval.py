"""CrowdHuman metrics as the official CrowdHuman evaluation defines them: AP at IoU 0.5, MR^-2
(log-average miss rate) and JI (Jaccard index), with its ignore regions.

Written from the definitions of the official toolkit (CrowdDet ``lib/evaluate``: APMRToolkits,
JIToolkits; the same code ships as mmdet's ``CrowdHumanMetric``), not copied:

* **Boxes.** GT and detections are xyxy, clipped as the toolkit clips them: x1 to [0, w - 1],
  x2 to [0, w] (y likewise).  IoU and IoA have no "+1" and a 1e-6 epsilon in the denominator;
  IoA = intersection / area of the first box (the detection, or the GT in JI's GT test).
* **Ignore regions.** GT boxes flagged ignore: ``tag != "person"`` ("mask") or
  ``extra.ignore != 0`` in an odgt file, ``iscrowd`` in a COCO json (``data/datasets/crowdhuman.py``
  converts the former into the latter).
* **Matching** (Caltech rule, ``compare_caltech``).  Per image, detections in decreasing score
  order; a detection takes the still-unmatched non-ignore GT of largest IoU if that IoU > 0.5
  (true positive); else, if it covers an ignore region with IoA > 0.5 it is *ignored*, neither
  TP nor FP (an ignore region absorbs any number of detections); else it is a false positive.
* **AP** (``AP50``).  The TP/FP list of all images in decreasing score (stable: image order, then
  score order within an image, for ties); after each detection recall = TP / G (G = non-ignore GT
  of all images) and precision = TP / (TP + FP); AP = trapezoidal area between consecutive
  (recall, precision) points, from the first detection to the last (no (0, 1) point is added).
* **MR^-2** (``MR-2``).  Same list; FPPI = FP / number of images, miss rate = 1 - recall.  At each
  of the 9 reference FPPI values 10^-2, 10^-1.75, ..., 10^0 (the toolkit's rounded constants
  :data:`MR_REF_FPPI`) take the miss rate at the first detection whose FPPI >= the reference (the
  last detection when none reaches it); MR^-2 = exp(mean(log(those miss rates))).  Lower is
  better.  With no scored detection at all it is 1.0 (the toolkit has no value there).
* **JI.**  For each score threshold t = 0.0, 0.1, ..., 0.9: per image, the detections with score
  > t are matched one-to-one with the non-ignore GT by a maximum-weight bipartite matching on IoU
  (edges IoU > 0.5, weight IoU; k matches); unmatched detections with IoA > 0.5 on an ignore
  region and unmatched GT with IoA > 0.5 on an ignore region are not counted; with m counted GT
  and n counted detections the image scores k / (m + n - k).  JI(t) = sum of the image scores /
  number of images with m + n > 0; JI = max over t (0.0 when no image has any).

Ties between equally good matchings (equal IoU) may resolve differently from the toolkit; the
metrics can then differ in the last digits.  These metrics are computed on the detections the
model returns (``model.roi_heads.detections_per_image``, 100 by default: CrowdHuman images can have
more people than that).

COCO-style AP (``AP``, ``AP50``, ... of ``coco_eval.py``) on the same converted json is what centerX
reports for CrowdHuman (docs/datasets.md §3.3); ``app.evaluate`` writes both into ``metrics.json``,
these with the prefix ``crowdhuman_``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from cn2_jax.errors import DataError, InputFileError

logger = logging.getLogger(__name__)

# The toolkit's reference FPPI points (CALTECH_MRREF_2): 10 ** linspace(-2, 0, 9), rounded.
MR_REF_FPPI = (0.0100, 0.0178, 0.0316, 0.0562, 0.1000, 0.1778, 0.3162, 0.5623, 1.000)
JI_SCORE_THRESHOLDS = tuple(0.1 * i for i in range(10))
_EPS = 1e-6
CROWDHUMAN_BOXES = ("vbox", "fbox", "hbox")  # the box types of an odgt record
CENTERX_MIN_SIDE = 1.0  # centerX keeps a GT box when its clipped width and height are > 1 px

__all__ = [
    "MR_REF_FPPI",
    "EvalImage",
    "match_image",
    "average_precision",
    "log_average_miss_rate",
    "jaccard_index",
    "evaluate",
    "crowdhuman_objects",
    "load_odgt_gt",
    "load_odgt_results",
    "evaluate_odgt",
    "metrics_from_coco",
]


@dataclasses.dataclass
class EvalImage:
  """GT and detections of one image (xyxy pixels of the original image)."""

  gt_boxes: np.ndarray  # [G, 4]
  gt_ignore: np.ndarray  # [G] bool
  dt_boxes: np.ndarray  # [D, 4]
  dt_scores: np.ndarray  # [D]
  height: float = np.inf  # for the toolkit's clipping (inf = no clipping)
  width: float = np.inf
  image_id: Any = None

  def __post_init__(self):
    self.gt_boxes = np.asarray(self.gt_boxes, np.float64).reshape(-1, 4)
    self.gt_ignore = np.asarray(self.gt_ignore, bool).reshape(-1)
    self.dt_boxes = np.asarray(self.dt_boxes, np.float64).reshape(-1, 4)
    self.dt_scores = np.asarray(self.dt_scores, np.float64).reshape(-1)
    if self.gt_ignore.shape[0] != self.gt_boxes.shape[0]:
      raise ValueError(f"{len(self.gt_boxes)} GT boxes but {len(self.gt_ignore)} ignore flags")
    if self.dt_scores.shape[0] != self.dt_boxes.shape[0]:
      raise ValueError(f"{len(self.dt_boxes)} detections but {len(self.dt_scores)} scores")


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------
def clip_boxes(boxes: np.ndarray, height: float, width: float) -> np.ndarray:
  """The toolkit's clip: x1 in [0, w - 1], y1 in [0, h - 1], x2 in [0, w], y2 in [0, h]."""
  clipped = np.array(boxes, np.float64).reshape(-1, 4)
  clipped[:, 0] = np.minimum(np.maximum(clipped[:, 0], 0), width - 1)
  clipped[:, 1] = np.minimum(np.maximum(clipped[:, 1], 0), height - 1)
  clipped[:, 2] = np.maximum(np.minimum(clipped[:, 2], width), 0)
  clipped[:, 3] = np.maximum(np.minimum(clipped[:, 3], height), 0)
  return clipped


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
  ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
  return np.maximum(iw, 0) * np.maximum(ih, 0)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[len(a), len(b)] IoU, inter / (area_a + area_b - inter + 1e-6)."""
  inter = _intersection(a, b)
  area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
  area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  return inter / (area_a[:, None] + area_b[None, :] - inter + _EPS)


def ioa_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[len(a), len(b)] intersection over the area of each box of ``a`` (+ 1e-6)."""
  inter = _intersection(a, b)
  area_a = np.maximum(a[:, 2] - a[:, 0], 0) * np.maximum(a[:, 3] - a[:, 1], 0)
  return inter / (area_a[:, None] + _EPS)


def _clipped(img: EvalImage) -> Tuple[np.ndarray, np.ndarray]:
  return (
      clip_boxes(img.gt_boxes, img.height, img.width),
      clip_boxes(img.dt_boxes, img.height, img.width),
  )


# ----------------------------------------------------------------------------------------------
# AP and MR^-2
# ----------------------------------------------------------------------------------------------
def match_image(img: EvalImage, iou_thresh: float = 0.5) -> Tuple[np.ndarray, np.ndarray]:
  """Caltech matching of one image: ``(scores, is_tp)`` of the detections that are TP or FP, in
  decreasing score order (ignored detections left out)."""
  if img.dt_boxes.shape[0] == 0:
    return np.zeros(0), np.zeros(0, bool)
  gt, dt = _clipped(img)
  order = np.argsort(-img.dt_scores, kind="stable")
  dt, scores = dt[order], img.dt_scores[order]
  pos = ~img.gt_ignore
  iou = iou_matrix(dt, gt[pos])
  ioa = ioa_matrix(dt, gt[~pos])
  matched = np.zeros(int(pos.sum()), bool)
  keep, tp = [], []
  for i in range(dt.shape[0]):
    cand = np.where(matched, -1.0, iou[i]) if matched.size else np.zeros(0)
    if cand.size and cand.max() > iou_thresh:
      matched[int(np.argmax(cand))] = True
      keep.append(i)
      tp.append(True)
    elif ioa.shape[1] and ioa[i].max() > iou_thresh:
      continue  # on an ignore region: neither TP nor FP
    else:
      keep.append(i)
      tp.append(False)
  return scores[keep], np.asarray(tp, bool)


def _sorted_list(images: Sequence[EvalImage], iou_thresh: float):
  per = [match_image(img, iou_thresh) for img in images]
  scores = np.concatenate([image_scores for image_scores, _ in per]) if per else np.zeros(0)
  tp = np.concatenate([image_tp for _, image_tp in per]) if per else np.zeros(0, bool)
  order = np.argsort(-scores, kind="stable")
  return scores[order], tp[order]


def average_precision(tp: np.ndarray, num_gt: int) -> float:
  """The toolkit's AP of a TP/FP list already in decreasing score order."""
  tp = np.asarray(tp, bool)
  if tp.size == 0 or num_gt <= 0:
    return 0.0
  ctp = np.cumsum(tp)
  cfp = np.cumsum(~tp)
  recall = ctp / float(num_gt)
  precision = ctp / (ctp + cfp)
  return float(np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2.0))


def log_average_miss_rate(
    tp: np.ndarray, num_gt: int, num_images: int, ref: Sequence[float] = MR_REF_FPPI
) -> float:
  """The toolkit's MR^-2 of a TP/FP list already in decreasing score order."""
  tp = np.asarray(tp, bool)
  if tp.size == 0 or num_gt <= 0 or num_images <= 0:
    return 1.0
  fppi = np.cumsum(~tp) / float(num_images)
  miss = 1.0 - np.cumsum(tp) / float(num_gt)
  rates = []
  for rate in ref:
    hit = np.nonzero(fppi >= rate)[0]
    rates.append(miss[hit[0]] if hit.size else miss[-1])
  with np.errstate(divide="ignore"):
    return float(np.exp(np.mean(np.log(np.asarray(rates)))))


# ----------------------------------------------------------------------------------------------
# JI
# ----------------------------------------------------------------------------------------------
def _max_weight_matching(weights: np.ndarray) -> List[Tuple[int, int]]:
  """Maximum-weight matching of a bipartite graph given as a [rows, cols] weight matrix (0 = no
  edge; all edges positive)."""
  if weights.size == 0 or not (weights > 0).any():
    return []
  # Start-up time: scipy.optimize takes ~0.6 s, and the dataset catalog imports this module.
  from scipy.optimize import linear_sum_assignment

  rows, cols = linear_sum_assignment(weights, maximize=True)
  return [(int(r), int(c)) for r, c in zip(rows, cols) if weights[r, c] > 0]


def _ji_counts(img: EvalImage, score_thresh: float, iou_thresh: float) -> Tuple[int, int, int]:
  """``(k, m, n)`` of one image at one score threshold."""
  gt, dt = _clipped(img)
  dt = dt[img.dt_scores > score_thresh]
  pos, ign = gt[~img.gt_ignore], gt[img.gt_ignore]
  matches = []
  if dt.shape[0] and pos.shape[0]:
    iou = iou_matrix(dt, pos)
    matches = _max_weight_matching(np.where(iou > iou_thresh, iou, 0.0))
  free_dt = np.setdiff1d(np.arange(dt.shape[0]), np.asarray([i for i, _ in matches], np.int64))
  free_gt = np.setdiff1d(np.arange(pos.shape[0]), np.asarray([j for _, j in matches], np.int64))

  def n_ignored(boxes):
    if not boxes.shape[0] or not ign.shape[0]:
      return 0
    return int((ioa_matrix(boxes, ign).max(axis=1) > iou_thresh).sum())

  k = len(matches)
  m = pos.shape[0] - n_ignored(pos[free_gt])
  n = dt.shape[0] - n_ignored(dt[free_dt])
  return k, m, n


def jaccard_index(
    images: Sequence[EvalImage],
    iou_thresh: float = 0.5,
    score_thresholds: Sequence[float] = JI_SCORE_THRESHOLDS,
) -> Tuple[float, Dict[float, float]]:
  """``(JI, {score threshold: mean ratio})`` (see the module docstring)."""
  per = {}
  for thresh in score_thresholds:
    total, count = 0.0, 0
    for img in images:
      k, m, n = _ji_counts(img, thresh, iou_thresh)
      total += k / (m + n - k + _EPS)
      count += int(m != 0 or n != 0)
    per[float(thresh)] = total / count if count else 0.0
  return (max(per.values()) if per else 0.0), per


# ----------------------------------------------------------------------------------------------
# All three
# ----------------------------------------------------------------------------------------------
def evaluate(images: Sequence[EvalImage], iou_thresh: float = 0.5) -> Dict[str, float]:
  """``{'AP50', 'MR-2', 'JI', 'num_images', 'num_gt', 'num_ignore'}`` of a list of images (every
  image counts for FPPI and JI, detections or not)."""
  num_gt = int(sum(int((~img.gt_ignore).sum()) for img in images))
  num_ignore = int(sum(int(img.gt_ignore.sum()) for img in images))
  _, tp = _sorted_list(images, iou_thresh)
  ji, _ = jaccard_index(images, iou_thresh)
  return {
      "AP50": average_precision(tp, num_gt),
      "MR-2": log_average_miss_rate(tp, num_gt, len(images)),
      "JI": ji,
      "num_images": len(images),
      "num_gt": num_gt,
      "num_ignore": num_ignore,
  }


# ----------------------------------------------------------------------------------------------
# Official file formats (odgt) and our COCO files
# ----------------------------------------------------------------------------------------------
def crowdhuman_objects(record: Mapping, box: str = "vbox") -> Tuple[np.ndarray, np.ndarray]:
  """``(boxes [n, 4] xyxy float64, ignore [n] bool)`` of one odgt record's ``gtboxes``.

  Ignore (as the official evaluation): ``tag != "person"``, ``extra.ignore != 0``, and for
  ``hbox`` also ``head_attr.ignore != 0``.  An ignore region without the ``box`` key uses the
  first of fbox / vbox / hbox it has.  Raises KeyError / TypeError / ValueError on bad entries."""
  if box not in CROWDHUMAN_BOXES:
    raise ValueError(f"box must be one of {CROWDHUMAN_BOXES}, got {box!r}")
  boxes, ignore = [], []
  for gt_box in record.get("gtboxes") or []:
    extra = gt_box.get("extra") or {}
    ignored = gt_box.get("tag") != "person" or int(extra.get("ignore", 0) or 0) != 0
    if box == "hbox":
      ignored = ignored or int((gt_box.get("head_attr") or {}).get("ignore", 0) or 0) != 0
    xywh = gt_box.get(box)
    if xywh is None and ignored:
      xywh = next(
          (gt_box[key] for key in ("fbox", "vbox", "hbox") if gt_box.get(key) is not None), None
      )
    if xywh is None:
      raise KeyError(box)
    x, y, w, h = (float(v) for v in xywh)
    boxes.append((x, y, x + w, y + h))
    ignore.append(ignored)
  return np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(ignore, bool)


def _odgt_lines(path: str) -> List[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def load_odgt_gt(path: str, box: str = "fbox") -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
  """``{ID: (boxes [n, 4] xyxy, ignore [n])}`` of a CrowdHuman annotation file, in file order
  (``box``: fbox as the official benchmark, vbox or hbox)."""
  return {str(record["ID"]): crowdhuman_objects(record, box) for record in _odgt_lines(path)}


def load_odgt_results(path: str) -> Dict[str, dict]:
  """``{ID: {'boxes' xyxy, 'scores', 'height', 'width'}}`` of a results file in the official
  format (one line per image: ``ID``, ``height``, ``width``, ``dtboxes: [{box: [x, y, w, h],
  score}]``)."""
  out = {}
  for record in _odgt_lines(path):
    dts = record.get("dtboxes") or []
    xyxy = np.asarray([det["box"] for det in dts], np.float64).reshape(-1, 4)
    xyxy[:, 2:] += xyxy[:, :2]
    out[str(record["ID"])] = dict(
        boxes=xyxy,
        scores=np.asarray([det["score"] for det in dts], np.float64),
        height=record.get("height"),
        width=record.get("width"),
    )
  return out


def evaluate_odgt(
    gt: Union[str, os.PathLike],
    results: Union[str, os.PathLike, Mapping[str, Mapping[str, Any]]],
    box: str = "fbox",
    iou_thresh: float = 0.5,
) -> Dict[str, float]:
  """Metrics of a results file (or ``{ID: {'boxes', 'scores', 'height', 'width'}}``) against a
  CrowdHuman ``.odgt`` (every GT image counts; the image size comes from the results, as in the
  toolkit, and without it boxes are not clipped)."""
  gts = load_odgt_gt(os.fspath(gt), box)
  dts = (
      load_odgt_results(os.fspath(results)) if isinstance(results, (str, os.PathLike)) else results
  )
  images = []
  for image_id, (boxes, ignore) in gts.items():
    image_dets = dts.get(image_id) or {}
    h, w = image_dets.get("height"), image_dets.get("width")
    images.append(
        EvalImage(
            gt_boxes=boxes,
            gt_ignore=ignore,
            dt_boxes=image_dets.get("boxes", np.zeros((0, 4))),
            dt_scores=image_dets.get("scores", np.zeros(0)),
            height=np.inf if h is None else float(h),
            width=np.inf if w is None else float(w),
            image_id=image_id,
        )
    )
  return evaluate(images, iou_thresh)


def metrics_from_coco(
    gt: Union[str, os.PathLike, Mapping[str, Any]],
    results: Sequence[Mapping[str, Any]],
    image_ids: Optional[Sequence[int]] = None,
    *,
    category_id: Optional[int] = None,
    prefix: str = "crowdhuman_",
) -> Dict[str, float]:
  """The metrics of COCO results (``image_id, category_id, bbox xywh, score``, e.g.
  ``CocoEvaluator.results``) against a COCO json whose ``iscrowd`` boxes are the ignore regions
  (the converted CrowdHuman json of ``data/sources.py``).  ``image_ids``: the evaluated images
  (default: all of the json); ``category_id``: default the only category, else ``person``.
  Returns ``{prefix + 'AP50' | 'MR-2' | 'JI': value}``."""
  if isinstance(gt, Mapping):
    coco = gt
  else:
    with open(gt, encoding="utf-8") as f:
      coco = json.load(f)
  cats = coco.get("categories") or []
  if category_id is None:
    person = [cat for cat in cats if str(cat.get("name")) == "person"]
    if len(cats) == 1:
      category_id = int(cats[0]["id"])
    elif len(person) == 1:
      category_id = int(person[0]["id"])
    else:
      raise ValueError(
          f"CrowdHuman metrics need one category (or one named 'person'); the annotations "
          f"have {[cat.get('name') for cat in cats]}"
      )
  sizes = {int(image["id"]): (image.get("height"), image.get("width")) for image in coco["images"]}
  ids = list(sizes) if image_ids is None else [int(i) for i in image_ids]
  gt_boxes: Dict[int, list] = {i: [] for i in ids}
  gt_ignore: Dict[int, list] = {i: [] for i in ids}
  for ann in coco["annotations"]:
    i = int(ann["image_id"])
    if i in gt_boxes and int(ann["category_id"]) == category_id:
      x, y, w, h = (float(v) for v in ann["bbox"])
      gt_boxes[i].append((x, y, x + w, y + h))
      gt_ignore[i].append(bool(ann.get("iscrowd", 0)))
  dt_boxes: Dict[int, list] = {i: [] for i in ids}
  dt_scores: Dict[int, list] = {i: [] for i in ids}
  for result in results:
    i = int(result["image_id"])
    if i in dt_boxes and int(result["category_id"]) == category_id:
      x, y, w, h = (float(v) for v in result["bbox"])
      dt_boxes[i].append((x, y, x + w, y + h))
      dt_scores[i].append(float(result["score"]))
  images = []
  for i in ids:
    h, w = sizes.get(i, (None, None))
    images.append(
        EvalImage(
            gt_boxes=gt_boxes[i],
            gt_ignore=gt_ignore[i],
            dt_boxes=dt_boxes[i],
            dt_scores=dt_scores[i],
            height=np.inf if h is None else float(h),
            width=np.inf if w is None else float(w),
            image_id=i,
        )
    )
  metrics = evaluate(images)
  logger.info(
      "CrowdHuman metrics (%d images, %d GT, %d ignore regions): AP50 %.4f  MR^-2 %.4f  JI %.4f",
      metrics["num_images"],
      metrics["num_gt"],
      metrics["num_ignore"],
      metrics["AP50"],
      metrics["MR-2"],
      metrics["JI"],
  )
  return {f"{prefix}{name}": float(metrics[name]) for name in ("AP50", "MR-2", "JI")}


# ----------------------------------------------------------------------------------------------
# CrowdHuman as centerX evaluates it (eval.protocol='centerx', evaluation/protocol.py)
# ----------------------------------------------------------------------------------------------
def centerx_crowdhuman_boxes(
    record: Mapping[str, Any], box: str, height: float, width: float
) -> np.ndarray:
  """`[n, 4]` xyxy ground truth of one odgt record as centerX loads it: the `box` of each
  ``tag == "person"`` entry (``extra.ignore`` is not read), clipped to x1, y1 >= 0, x2 <= width,
  y2 <= height, kept when the clipped width and height are > 1."""
  out = []
  for gt_box in record.get("gtboxes") or []:
    if gt_box.get("tag") != "person":
      continue
    x, y, w, h = (float(v) for v in gt_box[box])
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, float(width)), min(y + h, float(height))
    if x2 - x1 > CENTERX_MIN_SIDE and y2 - y1 > CENTERX_MIN_SIDE:
      out.append((x1, y1, x2, y2))
  return np.asarray(out, np.float64).reshape(-1, 4)


def centerx_crowdhuman_coco(
    records: Sequence[Mapping[str, Any]], box: str, converted: Mapping[str, Any]
) -> dict:
  """The COCO ground truth centerX evaluates CrowdHuman on, from the odgt `records` of a split
  and its converted json `converted` (image ids, sizes and the category of this project's
  conversion: image ``<ID>.jpg``): images without a person box left are dropped."""
  cats = list(converted.get("categories") or [])
  person = [cat for cat in cats if cat.get("name") == "person"]
  if len(person) != 1:
    raise DataError(
        f"the centerx protocol of CrowdHuman needs one 'person' category; the converted json "
        f"has {[cat.get('name') for cat in cats]}"
    )
  by_name = {str(image["file_name"]): image for image in converted["images"]}
  images, anns = [], []
  for record in records:
    image = by_name.get(f"{record['ID']}.jpg")
    if image is None:
      continue  # not in this split's conversion (e.g. left out by a class subset)
    boxes = centerx_crowdhuman_boxes(record, box, float(image["height"]), float(image["width"]))
    if boxes.shape[0] == 0:
      continue
    images.append(dict(image))
    for x1, y1, x2, y2 in boxes.tolist():
      anns.append(
          {
              "id": len(anns) + 1,
              "image_id": int(image["id"]),
              "category_id": int(person[0]["id"]),
              "bbox": [x1, y1, x2 - x1, y2 - y1],
              "area": (x2 - x1) * (y2 - y1),
              "iscrowd": 0,
          }
      )
  return {"images": images, "annotations": anns, "categories": cats}


def _source_of(annotation_file: str) -> Tuple[str, str]:
  """(odgt file, box) a converted CrowdHuman json was made from (its ``source.json``)."""
  record_path = os.path.join(os.path.dirname(annotation_file), "source.json")
  split = os.path.splitext(os.path.basename(annotation_file))[0]
  try:
    with open(record_path, encoding="utf-8") as f:
      options = json.load(f)["options"]
    odgt = options["splits"][split][0]
    box = options.get("box") or "vbox"
  except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
    raise InputFileError(
        f"eval.protocol='centerx' reads the CrowdHuman odgt file that {annotation_file} was "
        f"converted from, named in {record_path}: cannot read it ({type(e).__name__}: {e})"
    ) from e
  if box not in CROWDHUMAN_BOXES:
    raise DataError(f"{record_path}: unknown CrowdHuman box {box!r}")
  return odgt, box


def centerx_crowdhuman_gt(annotation_file: str) -> dict:
  """:func:`centerx_crowdhuman_coco` of a converted CrowdHuman split json (the odgt file and the
  box from the conversion's ``source.json``)."""
  odgt, box = _source_of(annotation_file)
  if not os.path.isfile(odgt):
    raise InputFileError(
        f"eval.protocol='centerx' needs the CrowdHuman annotation file {odgt} (the source of "
        f"{annotation_file}): not found"
    )
  with open(odgt, encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
  with open(annotation_file, encoding="utf-8") as f:
    converted = json.load(f)
  return centerx_crowdhuman_coco(records, box, converted)
