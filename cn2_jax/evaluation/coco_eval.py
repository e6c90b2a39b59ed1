"""COCO box evaluation on the host (pycocotools).

The detector returns a fixed ``[B, 100]`` set of boxes/scores/classes plus a ``valid`` mask in
resized-image pixels (DESIGN.md "Model API"). The eval loop maps the boxes back to the original image
(``cn2_jax.modeling.detector.postprocess_detections``), then feeds every batch to :meth:`CocoEvaluator.add`, which

* drops padding examples (``batch_mask == False``) and invalid detections (``valid == False``),
* converts xyxy -> COCO xywh and the contiguous label 0..C-1 -> COCO ``category_id``,
* refuses an image id it has already seen (an eval pipeline must yield each image exactly once).

:meth:`CocoEvaluator.evaluate` runs ``COCOeval`` (iouType ``bbox``) restricted to the image ids that
were added and returns the 12 standard metrics as fractions. As in pycocotools, a metric whose area
range has no (non-crowd) ground truth is ``-1.0``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import warnings
from typing import Any, Dict, List, Mapping, Sequence, Union

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

COCO_METRIC_NAMES = (
    'AP',
    'AP50',
    'AP75',
    'APs',
    'APm',
    'APl',
    'AR1',
    'AR10',
    'AR100',
    'ARs',
    'ARm',
    'ARl',
)

__all__ = ['COCO_METRIC_NAMES', 'CocoEvaluator', 'format_metrics_table']


def _quiet():
  """Context manager swallowing pycocotools' chatty stdout ("loading annotations...")."""
  return contextlib.redirect_stdout(io.StringIO())


def _load_gt(annotations: Union[str, os.PathLike, Mapping[str, Any]]):
  if isinstance(annotations, (str, os.PathLike)):
    with open(annotations) as f:
      dataset = json.load(f)
  elif isinstance(annotations, Mapping):
    dataset = copy.deepcopy(dict(annotations))
  else:
    raise TypeError(f'annotations must be a json path or a dict, got {type(annotations)}')
  for key in ('images', 'annotations', 'categories'):
    if key not in dataset:
      raise ValueError(f'COCO annotation dataset lacks the {key!r} field')
  # COCOeval needs `iscrowd` and `area` on every GT annotation; fill them for hand-made GT sets.
  for ann in dataset['annotations']:
    ann.setdefault('iscrowd', 0)
    if 'area' not in ann:
      x, y, w, h = ann['bbox']
      ann['area'] = float(w) * float(h)
  coco = COCO()
  coco.dataset = dataset
  with _quiet():
    coco.createIndex()
  return coco


class CocoEvaluator:
  """Accumulates detections batch by batch and scores them with pycocotools' COCOeval.

  Args:
    annotations: path of a COCO-format annotation json, or the already-loaded dict (copied).
    label_to_category_id: ``label_to_category_id[c]`` is the COCO category id of contiguous label
      ``c`` (0..C-1). Every id must exist in the annotation file's ``categories``.
    verbose: print the COCOeval summary and the compact metric table in :meth:`evaluate`.
    skip_images_not_in_gt: images whose id the annotations lack are skipped by :meth:`add` (not
      recorded, not evaluated) instead of being an error: a ground truth that leaves images out
      on purpose (``eval.protocol='centerx'`` drops CrowdHuman images without persons).
  """

  def __init__(
      self,
      annotations: Union[str, os.PathLike, Mapping[str, Any]],
      label_to_category_id: Sequence[int],
      verbose: bool = True,
      skip_images_not_in_gt: bool = False,
  ):
    self.coco_gt = _load_gt(annotations)
    self.skip_images_not_in_gt = bool(skip_images_not_in_gt)
    self.label_to_category_id = np.asarray(
        [int(cat_id) for cat_id in label_to_category_id], np.int64
    )
    known = set(self.coco_gt.getCatIds())
    missing = [int(cat_id) for cat_id in self.label_to_category_id if int(cat_id) not in known]
    if missing:
      raise ValueError(
          f'category ids {missing} are not in the annotation categories ' f'{sorted(known)}'
      )
    if len(set(self.label_to_category_id.tolist())) != len(self.label_to_category_id):
      raise ValueError('label_to_category_id maps two labels to the same category id')
    self.verbose = verbose
    self._gt_image_ids = set(int(image_id) for image_id in self.coco_gt.getImgIds())
    self._image_ids: List[int] = []
    self._seen: set = set()
    self._results: List[Dict[str, Any]] = []

  # ------------------------------------------------------------------------------------------
  @property
  def num_images(self) -> int:
    return len(self._image_ids)

  @property
  def num_detections(self) -> int:
    return len(self._results)

  @property
  def image_ids(self) -> List[int]:
    return list(self._image_ids)

  @property
  def results(self) -> List[Dict[str, Any]]:
    """The COCO result dicts accumulated so far (``image_id, category_id, bbox xywh, score``)."""
    return list(self._results)

  def reset(self) -> None:
    self._image_ids, self._seen, self._results = [], set(), []

  # ------------------------------------------------------------------------------------------
  def add(self, image_ids, boxes, scores, classes, valid, batch_mask=None) -> None:
    """Adds one batch of detections.

    Args:
      image_ids: ``[B]`` int dataset image ids.
      boxes: ``[B, K, 4]`` xyxy in ORIGINAL image pixels.
      scores: ``[B, K]`` float.
      classes: ``[B, K]`` int contiguous labels 0..C-1.
      valid: ``[B, K]`` bool; invalid detections are skipped.
      batch_mask: ``[B]`` bool; False marks padding examples, which are skipped entirely
        (their image id is not checked or recorded). None means all True.
    Raises:
      ValueError: on a repeated image id (within or across batches), an image id absent from the
        ground truth (unless ``skip_images_not_in_gt``), a class label out of range, or inconsistent shapes.
    """
    image_ids = np.asarray(image_ids).reshape(-1).astype(np.int64)
    batch_size = image_ids.shape[0]
    boxes = np.asarray(boxes, np.float64)
    scores = np.asarray(scores, np.float64)
    classes = np.asarray(classes)
    valid = np.asarray(valid).astype(bool)
    batch_mask = (
        np.ones((batch_size,), bool)
        if batch_mask is None
        else np.asarray(batch_mask).reshape(-1).astype(bool)
    )
    if boxes.ndim != 3 or boxes.shape[0] != batch_size or boxes.shape[2] != 4:
      raise ValueError(f'boxes must be [B={batch_size}, K, 4], got {boxes.shape}')
    max_dets = boxes.shape[1]
    for name, arr in (('scores', scores), ('classes', classes), ('valid', valid)):
      if arr.shape != (batch_size, max_dets):
        raise ValueError(f'{name} must be [{batch_size}, {max_dets}], got {arr.shape}')
    if batch_mask.shape != (batch_size,):
      raise ValueError(f'batch_mask must be [{batch_size}], got {batch_mask.shape}')

    # Validate the whole batch before recording anything (an exception leaves no partial state).
    kept = [i for i in range(batch_size) if batch_mask[i]]
    if self.skip_images_not_in_gt:
      kept = [i for i in kept if int(image_ids[i]) in self._gt_image_ids]
    batch_ids = [int(image_ids[i]) for i in kept]
    for img_id in batch_ids:
      if img_id in self._seen or batch_ids.count(img_id) > 1:
        raise ValueError(
            f'image id {img_id} was added twice; an evaluation pipeline must '
            'yield each image exactly once'
        )
      if img_id not in self._gt_image_ids:
        raise ValueError(f'image id {img_id} is not in the ground-truth annotations')
    num_labels = len(self.label_to_category_id)
    new_results = []
    for i, img_id in zip(kept, batch_ids):
      keep = valid[i]
      if not keep.any():
        continue
      cls = classes[i][keep].astype(np.int64)
      if cls.min() < 0 or cls.max() >= num_labels:
        raise ValueError(
            f'class labels must be in [0, {num_labels}), got '
            f'[{cls.min()}, {cls.max()}] for image {img_id}'
        )
      image_boxes = boxes[i][keep]
      image_scores = scores[i][keep]
      cat = self.label_to_category_id[cls]
      x1, y1, x2, y2 = image_boxes.T
      xywh = np.stack([x1, y1, x2 - x1, y2 - y1], -1)
      for j in range(image_boxes.shape[0]):
        new_results.append(
            {
                'image_id': img_id,
                'category_id': int(cat[j]),
                'bbox': [round(float(v), 3) for v in xywh[j]],
                'score': round(float(image_scores[j]), 5),
            }
        )
    self._image_ids.extend(batch_ids)
    self._seen.update(batch_ids)
    self._results.extend(new_results)

  # ------------------------------------------------------------------------------------------
  def _make_dt(self):
    if self._results:
      with _quiet():
        return self.coco_gt.loadRes(copy.deepcopy(self._results))
    # loadRes indexes anns[0]; build an empty result set by hand so COCOeval still runs.
    dt = COCO()
    dt.dataset = {
        'images': list(self.coco_gt.dataset['images']),
        'categories': copy.deepcopy(self.coco_gt.dataset['categories']),
        'annotations': [],
    }
    with _quiet():
      dt.createIndex()
    return dt

  def evaluate(self) -> Dict[str, float]:
    """Runs COCOeval (bbox) on the added images; returns ``{name: fraction}`` for the 12 metrics.

    Metrics are in [0, 1]; ``-1.0`` (pycocotools' convention) where no GT falls in the metric's
    area range. Zero detections give 0 for every defined metric.
    """
    if not self._image_ids:
      raise ValueError('no images were added; nothing to evaluate')
    never = len(self._gt_image_ids) - len(self._seen)
    if never > 0:
      warnings.warn(
          f'{never} of {len(self._gt_image_ids)} ground-truth images were never added '
          f'to the evaluator; evaluating only the {len(self._seen)} added images',
          stacklevel=2,
      )
    coco_dt = self._make_dt()
    coco_eval = COCOeval(self.coco_gt, coco_dt, iouType='bbox')
    coco_eval.params.imgIds = sorted(self._seen)
    with _quiet():
      coco_eval.evaluate()
      coco_eval.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
      coco_eval.summarize()
    stats = np.asarray(coco_eval.stats, np.float64)
    if stats.shape != (len(COCO_METRIC_NAMES),):
      raise RuntimeError(f'unexpected COCOeval stats shape {stats.shape}')
    metrics = {name: float(value) for name, value in zip(COCO_METRIC_NAMES, stats)}
    self.last_summary = summary.getvalue()
    if self.verbose:
      print(f'COCO bbox evaluation: {self.num_images} images, {self.num_detections} detections')
      print(self.last_summary, end='')
      print(format_metrics_table(metrics))
    return metrics

  # ------------------------------------------------------------------------------------------
  def write_results(self, path: Union[str, os.PathLike]) -> None:
    """Writes the COCO results json (a list of ``image_id, category_id, bbox, score`` dicts)."""
    _makedirs_for(path)
    with open(path, 'w') as f:
      json.dump(self._results, f)

  def write_metrics(self, path: Union[str, os.PathLike], metrics: Mapping[str, float]) -> None:
    """Writes ``metrics`` (as floats) plus ``num_images`` and ``num_detections`` to a json file."""
    out: Dict[str, Any] = {str(name): float(value) for name, value in metrics.items()}
    out['num_images'] = int(self.num_images)
    out['num_detections'] = int(self.num_detections)
    _makedirs_for(path)
    with open(path, 'w') as f:
      json.dump(out, f, indent=2, sort_keys=False)


def format_metrics_table(metrics: Mapping[str, float]) -> str:
  """Two-line table of the 12 metrics in percent (``-`` for undefined, i.e. -1)."""
  names = [name for name in COCO_METRIC_NAMES if name in metrics]
  cells = []
  for name in names:
    value = float(metrics[name])
    cells.append('-' if value < 0 else f'{100.0 * value:.2f}')
  widths = [max(len(name), len(cell)) for name, cell in zip(names, cells)]
  header = ' | '.join(name.rjust(width) for name, width in zip(names, widths))
  values = ' | '.join(cell.rjust(width) for cell, width in zip(cells, widths))
  return f'{header}\n{values}'


def _makedirs_for(path) -> None:
  folder = os.path.dirname(os.fspath(path))
  if folder:
    os.makedirs(folder, exist_ok=True)
