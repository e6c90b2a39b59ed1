"""The official WIDER Face evaluation: AP on the easy, medium and hard subsets of the val set.

Written from the official evaluation kit (``eval_tools`` of the WIDER Face site, MATLAB:
``wider_eval.m``, ``read_pred.m``, ``norm_score.m``, ``evaluation.m``, ``boxoverlap.m``,
``plot/VOCap.m``) and its widely used Python port (wondervictor/WiderFace-Evaluation
``evaluation.py``, ``box_overlaps.pyx``), not copied.  Pure numpy (+ ``scipy.io.loadmat``).

**Ground truth** (the kit's ``ground_truth/`` folder; :func:`load_gt`):

* ``wider_face_val.mat``: ``event_list`` (61 event folders, e.g. ``0--Parade``), ``file_list``
  (per event the image names without ``.jpg``) and ``face_bbx_list`` (per image every face,
  ``x y w h`` in pixels, in the order of ``wider_face_val_bbx_gt.txt``).
* ``wider_{easy,medium,hard}_val.mat``: ``gt_list``, per image the 1-based indices of the faces
  that count in that setting.  The other faces of the image are *ignored* (not "missed"): a
  detection matched to one is neither a true nor a false positive.  As the Python port, the boxes
  come from ``wider_face_val.mat`` and only ``gt_list`` from the setting files (the kit's MATLAB
  reads the same boxes again from each setting file).

**Predictions**: per image ``[N, 5]`` rows ``x y w h score`` (pixels of the original image); in
files, the kit's layout ``<pred dir>/<event>/<image name>.txt``: a name line, a count line, then
``count`` lines ``x y w h score`` (:func:`read_pred_dir`; extra columns are ignored).  An image
without a prediction file has no detections (as ``read_pred.m``, which skips it with a message;
the Python port stops with a KeyError).  A malformed file is a one-line :class:`DataError` here
(``read_pred.m`` prints "Invalid format" and treats the image as detection-free).

**The protocol**, the same for the three settings:

1. *Order.*  Per image the detections are sorted by decreasing score, before normalisation
   (``read_pred.m``: ``sort(..., 'descend')``, stable for ties; the Python port does not sort and
   relies on the files being sorted: identical results for sorted files).
2. *Score normalisation* (``norm_score.m``): ``s' = (s - min) / (max - min)`` with ``min`` /
   ``max`` over all detections of all evaluated images.  The Python port starts its running
   ``min`` at 1 and ``max`` at 0, i.e. uses ``min(1, min)`` and ``max(0, max)``; for scores in
   [0, 1] (every score this library outputs) that is the same.  When all scores are equal the kit
   divides by zero (NaN scores, AP 0); here every score becomes 1.0 instead.
3. *Matching per image* (``image_evaluation`` / ``image_eval``): boxes become ``x1 = x, x2 = x +
   w`` (likewise y) for both GT and detections, and IoU uses the "+1 pixel" convention of the
   kit's ``boxoverlap`` (Pascal VOC devkit code): widths ``x2 - x1 + 1``, intersection width
   ``min(x2) - max(x1) + 1``, zero overlap when either intersection side is <= 0.  Detections in
   sorted order each take the GT face of highest IoU among *all* faces of the image (first on
   ties); if that IoU >= 0.5: an ignored face makes the detection ignored (it leaves the
   proposal count), a counted face not yet recalled becomes recalled.  No exclusivity: a second
   detection on an already recalled face stays a proposal that adds no recall (a false positive
   in effect), and a detection whose best face is an ignored one is ignored even if it also
   overlaps a counted face.  ``pred_recall[k]`` = counted faces recalled by the first ``k + 1``
   detections.
4. *Per-image PR counts* (``image_pr_info`` / ``img_pr_info``): for each of the 1000 thresholds
   ``t_k = 1 - k / 1000`` (k = 1..1000, i.e. 0.999 down to 0.0), with ``r`` the last detection
   whose normalised score is >= ``t_k``: (non-ignored proposals among detections 1..r,
   ``pred_recall[r]``), or (0, 0) when there is none.  **Images without GT boxes or without
   detections add nothing** (the kit skips them: detections on a face-free image are not false
   positives), but the counted faces of every evaluated image enter the recall denominator.
5. *Dataset PR* (``dataset_pr_info``): counts summed over images; precision_k = recalled /
   proposals, recall_k = recalled / (number of counted faces of the setting).  Where there are no
   proposals the kit's precision is 0/0 = NaN (MATLAB's ``max`` skips it); here it is 0, which
   gives the same AP (such points have recall 0 and never carry area).
6. *AP* (``VOCap`` / ``voc_ap``): all-point interpolated VOC AP of the 1000 points: sentinels
   (0, 0) before and (recall 1, precision 0) after, precision made monotone from the right, sum
   of recall steps times the precision after the step.  No detections at all: AP 0.

IoU threshold 0.5, 1000 thresholds, 61 events / 3226 images in the official val files.  With
``images`` (or a subset of image ids from :func:`metrics_from_coco`) the protocol runs on those
images only (their counted faces, their detections, their min/max); published numbers are on the
full val set.  :func:`write_pred_dir` writes predictions in the kit's layout (``app.evaluate``
with ``eval.wider_pred_dir``: the eval split's detections, :func:`pred_from_coco`).  Recall on
the hard setting depends on how many detections an image may keep (up to
~1000 faces per image): raise ``model.roi_heads.detections_per_image`` (CenterNet2) or
``model.onestage.max_detections`` (one-stage) from their default 100 for WIDER Face.

In ``app.evaluate`` (``data.dataset == "wider_face"`` and ``data.wider_eval_gt`` = the folder of
the four .mat files) the APs go into ``eval/metrics.json`` as ``wider_easy_ap``,
``wider_medium_ap`` and ``wider_hard_ap`` beside the COCO-style metrics.  Command line, on
prediction files written by any tool::

  python -m cn2_jax.evaluation.wider_eval --pred DIR --gt eval_tools/ground_truth
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from cn2_jax.errors import DataError, InputFileError, UserError, one_line

logger = logging.getLogger(__name__)

SETTINGS = ("easy", "medium", "hard")
GT_FILE = "wider_face_val.mat"
SETTING_FILES = {setting: f"wider_{setting}_val.mat" for setting in SETTINGS}
IOU_THRESH = 0.5
THRESH_NUM = 1000
_IMAGE_EXTS = (".jpg", ".jpeg", ".png")

Key = Tuple[str, str]  # (event folder, image name without extension)

__all__ = [
    "SETTINGS",
    "WiderGT",
    "load_gt",
    "box_overlaps",
    "image_eval",
    "image_pr_info",
    "voc_ap",
    "pr_curves",
    "evaluate",
    "read_pred_file",
    "read_pred_dir",
    "key_of_file_name",
    "metrics_from_coco",
    "main",
]


# ----------------------------------------------------------------------------------------------
# Ground truth
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WiderGT:
  """The official val ground truth: images in .mat order, their faces (xywh) and per setting a
  bool mask of the faces that count."""

  keys: Tuple[Key, ...]
  boxes: Tuple[np.ndarray, ...]  # per image [G, 4] x y w h, float64
  keep: Mapping[str, Tuple[np.ndarray, ...]]  # setting -> per image [G] bool
  gt_dir: str = ""

  def index(self) -> Dict[Key, int]:
    return {key: i for i, key in enumerate(self.keys)}


def _cells(x) -> List[Any]:
  """The elements of a MATLAB cell array as loadmat returns it (an object ndarray)."""
  return list(np.asarray(x, dtype=object).ravel(order="F"))


def _text(x) -> str:
  """A MATLAB char array (possibly wrapped in 1x1 cells) as a str."""
  while isinstance(x, np.ndarray):
    if x.dtype.kind in "US":
      return "".join(str(value) for value in x.ravel())
    if x.size != 1:
      raise ValueError(f"expected a string, got an array of shape {x.shape}")
    x = x.ravel()[0]
  return str(x)


def _loadmat(path: str, keys: Sequence[str]) -> Dict[str, Any]:
  if not os.path.isfile(path):
    raise InputFileError(f"WIDER Face ground truth file {path} not found")
  # Start-up time: scipy.io takes ~0.3 s, and the dataset catalog imports this module.
  from scipy.io import loadmat

  try:
    mat = loadmat(path)
  except NotImplementedError as e:  # MATLAB v7.3 (HDF5)
    raise DataError(f"{path}: a MATLAB v7.3 file, not readable with scipy.io.loadmat ({e})") from e
  except Exception as e:  # noqa: BLE001 - scipy raises many kinds on a corrupt file
    raise DataError(f"{path}: not a readable .mat file ({type(e).__name__}: {e})") from e
  missing = [key for key in keys if key not in mat]
  if missing:
    raise DataError(f"{path}: missing variable(s) {', '.join(missing)} (not a WIDER Face .mat?)")
  return mat


def load_gt(gt_dir: Union[str, os.PathLike]) -> WiderGT:
  """The four official .mat files of ``gt_dir`` (``wider_face_val.mat``,
  ``wider_{easy,medium,hard}_val.mat``).  A missing file is an :class:`InputFileError`, an
  unreadable or inconsistent one a :class:`DataError`, both one line naming the file."""
  gt_dir = os.fspath(gt_dir)
  if not os.path.isdir(gt_dir):
    raise InputFileError(f"WIDER Face ground truth folder {gt_dir} not found")
  path = os.path.join(gt_dir, GT_FILE)
  mat = _loadmat(path, ("event_list", "file_list", "face_bbx_list"))
  keys: List[Key] = []
  boxes: List[np.ndarray] = []
  shape: List[int] = []  # images per event
  try:
    events = [_text(e) for e in _cells(mat["event_list"])]
    files, faces = _cells(mat["file_list"]), _cells(mat["face_bbx_list"])
    if not (len(events) == len(files) == len(faces)):
      raise ValueError(f"{len(events)} events, {len(files)} file lists and {len(faces)} face lists")
    for event, names, fboxes in zip(events, files, faces):
      names, fboxes = _cells(names), _cells(fboxes)
      if len(names) != len(fboxes):
        raise ValueError(f"event {event}: {len(names)} images but {len(fboxes)} face lists")
      shape.append(len(names))
      for name, face_boxes in zip(names, fboxes):
        keys.append((event, _text(name)))
        face_boxes = np.asarray(face_boxes, np.float64)
        if face_boxes.size % 4:
          raise ValueError(
              f"{event}/{_text(name)}: face boxes of shape {face_boxes.shape}, not [n, 4]"
          )
        boxes.append(face_boxes.reshape(-1, 4))
  except (ValueError, TypeError) as e:
    raise DataError(f"{path}: unexpected content ({e})") from e
  if not keys:
    raise DataError(f"{path}: lists no images")
  keep: Dict[str, Tuple[np.ndarray, ...]] = {}
  for setting, name in SETTING_FILES.items():
    spath = os.path.join(gt_dir, name)
    setting_mat = _loadmat(spath, ("gt_list",))
    masks: List[np.ndarray] = []
    try:
      per_event = _cells(setting_mat["gt_list"])
      if len(per_event) != len(shape):
        raise ValueError(f"{len(per_event)} events, {GT_FILE} has {len(shape)}")
      for e, (lists, n_img) in enumerate(zip(per_event, shape)):
        lists = _cells(lists)
        if len(lists) != n_img:
          raise ValueError(f"event {events[e]}: {len(lists)} images, {GT_FILE} has {n_img}")
        for idx in lists:
          num_gt = boxes[len(masks)].shape[0]
          idx = np.asarray(idx, np.float64).ravel()
          if idx.size and (idx.min() < 1 or idx.max() > num_gt or np.any(idx != np.round(idx))):
            key = keys[len(masks)]
            raise ValueError(f"{key[0]}/{key[1]}: face indices {idx.tolist()} outside 1..{num_gt}")
          mask = np.zeros(num_gt, bool)
          mask[idx.astype(np.int64) - 1] = True
          masks.append(mask)
    except (ValueError, TypeError) as e:
      raise DataError(f"{spath}: unexpected content ({e})") from e
    keep[setting] = tuple(masks)
  return WiderGT(tuple(keys), tuple(boxes), keep, gt_dir)


# ----------------------------------------------------------------------------------------------
# The protocol
# ----------------------------------------------------------------------------------------------
def box_overlaps(a_xywh: np.ndarray, b_xywh: np.ndarray) -> np.ndarray:
  """``[len(a), len(b)]`` IoU of x y w h boxes as the kit computes it: x2 = x + w, then widths
  and intersection with "+1" (``boxoverlap.m``), 0 where the boxes do not overlap."""
  a = np.asarray(a_xywh, np.float64).reshape(-1, 4).copy()
  b = np.asarray(b_xywh, np.float64).reshape(-1, 4).copy()
  a[:, 2:] += a[:, :2]
  b[:, 2:] += b[:, :2]
  iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1
  ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1
  area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
  area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
  inter = iw * ih
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = inter / (area_a[:, None] + area_b[None, :] - inter)
  return np.where((iw > 0) & (ih > 0), iou, 0.0)


def _best_gt(pred: np.ndarray, gt: np.ndarray, iou_thresh: float) -> Tuple[np.ndarray, np.ndarray]:
  """Per detection the index of its highest-IoU face and whether that IoU >= the threshold."""
  overlaps = box_overlaps(pred[:, :4], gt)
  best = np.argmax(overlaps, axis=1)
  return best, overlaps[np.arange(overlaps.shape[0]), best] >= iou_thresh


def _eval_matches(best: np.ndarray, hit: np.ndarray, keep: np.ndarray):
  on_ignored = hit & ~keep[best]
  recalls = np.nonzero(hit & keep[best])[0]
  first = np.zeros(best.shape[0], np.int64)
  _, where = np.unique(best[recalls], return_index=True)  # first detection on each face
  first[recalls[where]] = 1
  return np.cumsum(first), ~on_ignored


def image_eval(
    pred: np.ndarray, gt: np.ndarray, keep: np.ndarray, iou_thresh: float = IOU_THRESH
) -> Tuple[np.ndarray, np.ndarray]:
  """``(pred_recall [N] int, proposal [N] bool)`` of one image (step 3 of the module docstring):
  ``pred`` ``[N, >=4]`` x y w h in decreasing score order, ``gt`` ``[G, 4]`` x y w h (G >= 1),
  ``keep`` ``[G]`` bool (False = ignored face)."""
  pred = np.atleast_2d(np.asarray(pred, np.float64))
  gt = np.asarray(gt, np.float64).reshape(-1, 4)
  if gt.shape[0] == 0 or pred.size == 0:
    num_pred = pred.shape[0] if pred.size else 0
    return np.zeros(num_pred, np.int64), np.ones(num_pred, bool)
  best, hit = _best_gt(pred, gt, iou_thresh)
  return _eval_matches(best, hit, np.asarray(keep, bool))


def _thresholds(thresh_num: int = THRESH_NUM) -> np.ndarray:
  return 1.0 - np.arange(1, thresh_num + 1, dtype=np.float64) / thresh_num


def image_pr_info(
    scores: np.ndarray,
    proposal: np.ndarray,
    pred_recall: np.ndarray,
    thresh_num: int = THRESH_NUM,
) -> np.ndarray:
  """``[thresh_num, 2]`` (proposals, recalled faces) of one image at the thresholds ``1 - k /
  thresh_num`` (step 4); ``scores``: normalised, in decreasing order."""
  scores = np.asarray(scores, np.float64)
  n = np.searchsorted(-scores, -_thresholds(thresh_num), side="right")  # #(score >= t)
  out = np.zeros((n.shape[0], 2))
  if scores.size:
    last = np.maximum(n - 1, 0)
    out[:, 0] = np.where(n > 0, np.cumsum(np.asarray(proposal, bool))[last], 0)
    out[:, 1] = np.where(n > 0, np.asarray(pred_recall)[last], 0)
  return out


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
  """All-point interpolated VOC AP (``VOCap.m`` / ``voc_ap``)."""
  mrec = np.concatenate(([0.0], np.asarray(recall, np.float64), [1.0]))
  mpre = np.concatenate(([0.0], np.asarray(precision, np.float64), [0.0]))
  mpre = np.fmax.accumulate(mpre[::-1])[::-1]  # fmax: NaN-skipping, as MATLAB's max
  i = np.nonzero(mrec[1:] != mrec[:-1])[0]
  return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _norm_key(key) -> Key:
  if not (isinstance(key, tuple) and len(key) == 2):
    raise ValueError(f"prediction keys must be (event, image name) pairs, got {key!r}")
  event, name = str(key[0]), str(key[1])
  if name.lower().endswith(_IMAGE_EXTS):
    name = os.path.splitext(name)[0]
  return event, name


def _as_gt(gt: Union[str, os.PathLike, WiderGT]) -> WiderGT:
  return gt if isinstance(gt, WiderGT) else load_gt(gt)


def pr_curves(
    pred: Mapping[Key, np.ndarray],
    gt: Union[str, os.PathLike, WiderGT],
    *,
    images: Optional[Iterable[Key]] = None,
    iou_thresh: float = IOU_THRESH,
    thresh_num: int = THRESH_NUM,
) -> Dict[str, Dict[str, Any]]:
  """Per setting ``{'precision', 'recall'}`` (``[thresh_num]`` each, thresholds decreasing),
  ``'ap'`` and ``'num_faces'``.  ``pred``: ``{(event, image name): [N, 5] x y w h score}``;
  ``gt``: the folder of the four .mat files or a :class:`WiderGT`; ``images``: the evaluated
  images (default every image of the ground truth)."""
  ground_truth = _as_gt(gt)
  index = ground_truth.index()
  preds: Dict[Key, np.ndarray] = {}
  for key, image_preds in pred.items():
    arr = np.asarray(image_preds, np.float64)
    if arr.size == 0:
      arr = np.zeros((0, 5))
    if arr.ndim != 2 or arr.shape[1] < 5:
      raise ValueError(f"predictions of {key!r} must be [N, 5] x y w h score, got {arr.shape}")
    if not np.all(np.isfinite(arr[:, :5])):
      raise ValueError(f"predictions of {key!r} hold NaN or inf")
    preds[_norm_key(key)] = arr[:, :5]
  unknown = [key for key in preds if key not in index]
  if unknown:
    logger.warning(
        "WIDER Face evaluation: %d predicted images are not in the ground truth (e.g. %s/%s)",
        len(unknown),
        *unknown[0],
    )
  if images is None:
    ids = list(range(len(ground_truth.keys)))
  else:
    wanted = {_norm_key(key) for key in images}
    ids = [index[key] for key in ground_truth.keys if key in wanted]
  # steps 1-2: sort per image (stable, decreasing score), normalise over all evaluated images
  sorted_preds: Dict[int, np.ndarray] = {}
  for i in ids:
    image_preds = preds.get(ground_truth.keys[i])
    if image_preds is not None and image_preds.shape[0]:
      sorted_preds[i] = image_preds[np.argsort(-image_preds[:, 4], kind="stable")].copy()
  if sorted_preds:
    lo = min(float(image_preds[:, 4].min()) for image_preds in sorted_preds.values())
    hi = max(float(image_preds[:, 4].max()) for image_preds in sorted_preds.values())
    for image_preds in sorted_preds.values():
      image_preds[:, 4] = (image_preds[:, 4] - lo) / (hi - lo) if hi > lo else 1.0
  counts = {setting: np.zeros((thresh_num, 2)) for setting in SETTINGS}
  num_faces = {
      setting: int(sum(int(ground_truth.keep[setting][i].sum()) for i in ids))
      for setting in SETTINGS
  }
  for i, image_preds in sorted_preds.items():
    if ground_truth.boxes[i].shape[0] == 0:
      continue  # step 4: no GT boxes -> the image adds nothing
    best, hit = _best_gt(image_preds, ground_truth.boxes[i], iou_thresh)
    for setting in SETTINGS:
      pred_recall, proposal = _eval_matches(best, hit, ground_truth.keep[setting][i])
      counts[setting] += image_pr_info(image_preds[:, 4], proposal, pred_recall, thresh_num)
  out = {}
  for setting in SETTINGS:
    setting_counts = counts[setting]
    with np.errstate(divide="ignore", invalid="ignore"):
      precision = np.where(
          setting_counts[:, 0] > 0, setting_counts[:, 1] / setting_counts[:, 0], 0.0
      )
    recall = (
        setting_counts[:, 1] / num_faces[setting] if num_faces[setting] else np.zeros(thresh_num)
    )
    out[setting] = dict(
        precision=precision,
        recall=recall,
        ap=voc_ap(recall, precision) if num_faces[setting] else 0.0,
        num_faces=num_faces[setting],
    )
  return out


def evaluate(
    pred: Mapping[Key, np.ndarray],
    gt_dir: Union[str, os.PathLike, WiderGT],
    *,
    images: Optional[Iterable[Key]] = None,
    iou_thresh: float = IOU_THRESH,
) -> Dict[str, float]:
  """``{'wider_easy_ap', 'wider_medium_ap', 'wider_hard_ap'}`` of ``pred`` (``{(event, image
  name without .jpg): [N, 5] x y w h score}``, original-image pixels) against the official .mat
  files in ``gt_dir`` (or a loaded :class:`WiderGT`).  ``images``: evaluate only these images
  (default: the whole ground truth, as the official protocol)."""
  curves = pr_curves(pred, gt_dir, images=images, iou_thresh=iou_thresh)
  return {f"wider_{setting}_ap": float(curves[setting]["ap"]) for setting in SETTINGS}


# ----------------------------------------------------------------------------------------------
# Prediction files (the kit's layout) and the command line
# ----------------------------------------------------------------------------------------------
def _row(line: str) -> Optional[List[float]]:
  try:
    return [float(value) for value in line.replace(",", " ").split()]
  except ValueError:
    return None


def read_pred_file(path: Union[str, os.PathLike]) -> np.ndarray:
  """``[N, 5]`` x y w h score of one prediction file (name line, count line, ``count`` box
  lines; blank lines after them are allowed)."""
  path = os.fspath(path)
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = f.read().splitlines()
  if len(lines) < 2:
    raise DataError(f"{path}: expected a name line and a count line")
  count = _row(lines[1])
  if count is None or len(count) != 1 or count[0] < 0 or count[0] != int(count[0]):
    raise DataError(f"{path}:2: expected the number of boxes, got {lines[1].strip()!r}")
  num_boxes = int(count[0])
  rows = []
  for row_index in range(num_boxes):
    line = lines[2 + row_index] if 2 + row_index < len(lines) else None
    if line is None:
      raise DataError(f"{path}: the count line says {num_boxes} boxes, the file has {row_index}")
    row = _row(line)
    if row is None or len(row) < 5:
      raise DataError(f"{path}:{3 + row_index}: expected 'x y w h score', got {line.strip()!r}")
    rows.append(row[:5])
  extra = [line for line in lines[2 + num_boxes :] if line.strip()]
  if extra:
    raise DataError(
        f"{path}: the count line says {num_boxes} boxes, the file has {num_boxes + len(extra)}"
    )
  return np.asarray(rows, np.float64).reshape(-1, 5)


def read_pred_dir(pred_dir: Union[str, os.PathLike]) -> Dict[Key, np.ndarray]:
  """``{(event, image name): [N, 5]}`` of every ``<pred_dir>/<event>/<name>.txt`` (the key comes
  from the path, as ``read_pred.m`` looks files up; the name line is not read)."""
  pred_dir = os.fspath(pred_dir)
  if not os.path.isdir(pred_dir):
    raise InputFileError(f"WIDER Face prediction folder {pred_dir} not found")
  out: Dict[Key, np.ndarray] = {}
  for event in sorted(os.listdir(pred_dir)):
    edir = os.path.join(pred_dir, event)
    if not os.path.isdir(edir):
      continue
    for name in sorted(os.listdir(edir)):
      if name.endswith(".txt"):
        out[(event, name[: -len(".txt")])] = read_pred_file(os.path.join(edir, name))
  if not out:
    raise DataError(f"{pred_dir}: no <event>/<image>.txt prediction files")
  return out


def write_pred_file(path: Union[str, os.PathLike], name: str, rows: np.ndarray) -> None:
  """One prediction file in the kit's format: ``name`` (the image name without extension), the
  number of boxes, then one ``x y w h score`` line per box (in decreasing score)."""
  rows = np.asarray(rows, np.float64).reshape(-1, 5)
  rows = rows[np.argsort(-rows[:, 4], kind="stable")]
  lines = [name, str(rows.shape[0])]
  lines += [" ".join(f"{float(v):.3f}" for v in row[:4]) + f" {float(row[4]):.5f}" for row in rows]
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def write_pred_dir(out_dir: Union[str, os.PathLike], pred: Mapping[Key, np.ndarray]) -> int:
  """Writes ``{(event, image name): [N, 5] x y w h score}`` as ``<out_dir>/<event>/<image
  name>.txt`` (:func:`write_pred_file`), the layout the official kit (``read_pred.m``) and
  :func:`read_pred_dir` read; an image with no detection gets a file with count 0.  Returns the
  number of files written."""
  out_dir = os.fspath(out_dir)
  for (event, name), rows in pred.items():
    os.makedirs(os.path.join(out_dir, event), exist_ok=True)
    write_pred_file(os.path.join(out_dir, event, f"{name}.txt"), name, rows)
  return len(pred)


def pred_from_coco(
    coco_gt: Union[str, os.PathLike, Mapping[str, Any]],
    results: Sequence[Mapping[str, Any]],
    image_ids: Optional[Sequence[int]] = None,
    *,
    category_id: Optional[int] = None,
) -> Dict[Key, np.ndarray]:
  """``{(event, image name): [N, 5] x y w h score}`` of COCO results (``image_id, category_id,
  bbox xywh, score``) on the images ``image_ids`` (None = all) of a converted WIDER Face json,
  whose ``file_name`` is ``<event>/<name>.jpg``; images without an event folder are left out.
  ``category_id``: default the only category, else the one named ``face``."""
  if isinstance(coco_gt, Mapping):
    coco = coco_gt
  else:
    with open(coco_gt, encoding="utf-8") as f:
      coco = json.load(f)
  if category_id is None:
    category_id = _face_category(coco)
  names = {int(image["id"]): str(image["file_name"]) for image in coco["images"]}
  ids = list(names) if image_ids is None else [int(i) for i in image_ids]
  keys = {i: key_of_file_name(names.get(i, "")) for i in ids}
  keys = {i: key for i, key in keys.items() if key is not None}
  rows: Dict[Key, List[List[float]]] = {key: [] for key in keys.values()}
  for result in results:
    key = keys.get(int(result["image_id"]))
    if key is not None and int(result["category_id"]) == category_id:
      rows[key].append([float(value) for value in result["bbox"]] + [float(result["score"])])
  return {key: np.asarray(value, np.float64).reshape(-1, 5) for key, value in rows.items()}


def _face_category(coco: Mapping[str, Any]) -> int:
  cats = coco.get("categories") or []
  face = [cat for cat in cats if str(cat.get("name")) == "face"]
  if len(cats) == 1:
    return int(cats[0]["id"])
  if len(face) == 1:
    return int(face[0]["id"])
  raise ValueError(
      f"WIDER Face metrics need one category (or one named 'face'); the annotations have "
      f"{[cat.get('name') for cat in cats]}"
  )


def key_of_file_name(file_name: str) -> Optional[Key]:
  """``(event, image name)`` of a COCO ``file_name`` such as ``0--Parade/0_Parade_x_1.jpg`` (the
  last folder and the name without extension); None without a folder."""
  parts = [part for part in str(file_name).replace("\\", "/").split("/") if part]
  if len(parts) < 2:
    return None
  return parts[-2], os.path.splitext(parts[-1])[0]


def metrics_from_coco(
    coco_gt: Union[str, os.PathLike, Mapping[str, Any]],
    results: Sequence[Mapping[str, Any]],
    image_ids: Optional[Sequence[int]],
    gt_dir: Union[str, os.PathLike, WiderGT],
    *,
    category_id: Optional[int] = None,
) -> Dict[str, float]:
  """The official APs of COCO results (``image_id, category_id, bbox xywh, score``, e.g.
  ``CocoEvaluator.results``) on the images ``image_ids`` (None = every image) of the converted
  WIDER Face val json (``coco_gt``, dict or path), whose ``file_name`` (``<event>/<name>.jpg``)
  names the image in the official .mat files of ``gt_dir``.  ``category_id``: default the only
  category, else the one named ``face``."""
  if isinstance(coco_gt, Mapping):
    coco = coco_gt
  else:
    with open(coco_gt, encoding="utf-8") as f:
      coco = json.load(f)
  if category_id is None:
    category_id = _face_category(coco)
  ground_truth = _as_gt(gt_dir)
  index = ground_truth.index()
  names = {int(image["id"]): str(image["file_name"]) for image in coco["images"]}
  ids = list(names) if image_ids is None else [int(i) for i in image_ids]
  keys: Dict[int, Key] = {}
  for i in ids:
    key = key_of_file_name(names.get(i, ""))
    if key is not None and key in index:
      keys[i] = key
  if not keys:
    example = names.get(ids[0], "?") if ids else "?"
    raise DataError(
        f"none of the {len(ids)} evaluated images (e.g. {example!r}) is listed in "
        f"{os.path.join(ground_truth.gt_dir, GT_FILE)}: is the eval split WIDER Face val?"
    )
  if len(keys) < len(ids):
    logger.warning(
        "WIDER Face evaluation: %d of %d evaluated images are not in %s and are left out",
        len(ids) - len(keys),
        len(ids),
        GT_FILE,
    )
  if len(keys) < len(ground_truth.keys):
    logger.warning(
        "WIDER Face evaluation on %d of the %d images of the official val set: not comparable "
        "with published results",
        len(keys),
        len(ground_truth.keys),
    )
  rows: Dict[Key, List[List[float]]] = {key: [] for key in keys.values()}
  for result in results:
    key = keys.get(int(result["image_id"]))
    if key is not None and int(result["category_id"]) == category_id:
      rows[key].append([float(value) for value in result["bbox"]] + [float(result["score"])])
  pred = {key: np.asarray(value, np.float64).reshape(-1, 5) for key, value in rows.items()}
  metrics = evaluate(pred, ground_truth, images=list(keys.values()))
  logger.info(
      "WIDER Face official AP (%d images): easy %.4f  medium %.4f  hard %.4f",
      len(keys),
      metrics["wider_easy_ap"],
      metrics["wider_medium_ap"],
      metrics["wider_hard_ap"],
  )
  return metrics


def main(argv: Optional[Sequence[str]] = None) -> int:
  ap = argparse.ArgumentParser(
      prog="python -m cn2_jax.evaluation.wider_eval",
      description="The official WIDER Face val evaluation (easy / medium / hard AP) of prediction "
      "files in the kit's layout: <pred>/<event>/<image name>.txt holding a name line, a count "
      "line, then 'x y w h score' lines.",
  )
  ap.add_argument("--pred", required=True, help="prediction folder (<event>/<image>.txt)")
  ap.add_argument(
      "--gt",
      required=True,
      help="folder of wider_face_val.mat and wider_{easy,medium,hard}_val.mat (the kit's "
      "eval_tools/ground_truth)",
  )
  ap.add_argument("--json", action="store_true", help="print the APs as one json object")
  args = ap.parse_args(argv)
  try:
    gt = load_gt(args.gt)
    pred = read_pred_dir(args.pred)
    metrics = evaluate(pred, gt)
  except (UserError, FileNotFoundError) as e:
    print(f"error: {one_line(e)}", file=sys.stderr)
    return 1
  if args.json:
    print(json.dumps(metrics))
  else:
    for setting in SETTINGS:
      print(f"{setting.capitalize():<6} Val AP: {metrics[f'wider_{setting}_ap']:.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
