"""`eval.protocol`: which evaluation the numbers of `--mode=eval` follow.

* ``"official"`` (default): detectron2's, as CenterNet2 evaluates.  The one-stage decode clamps
  the predicted w / h at 0 (``model.onestage.clamp_wh``), detections are mapped to the original
  image, clipped to it and dropped when empty (``detector.postprocess_detections``, detectron2's
  ``detector_postprocess``), and COCO evaluation reads the converted annotation json of the
  split, where a dataset's ignore regions are crowd boxes (a detection on one is neither a true
  nor a false positive) and every image of the split counts.
* ``"centerx"``: the numbers centerX (CPFLAME/centerX) reports, which differ from those in four
  ways (each read from its code: ``modeling/layers/centernet_decode.py``,
  ``modeling/meta_arch/centernet.py::CenterNet.inference``, ``data/dataset/crowd_human.py``,
  detectron2's ``COCOEvaluator`` on the registered dataset dicts):

  1. **No w/h clamp.**  The decode uses the predicted w, h as they are (a negative one gives an
     inverted box, x2 < x1); :func:`eval_model_config` sets ``model.onestage.clamp_wh=False``
     for the evaluation (family ``onestage``; other families have no such clamp).
  2. **No clipping, no dropping of empty boxes.**  ``CenterNet.inference`` only scales the boxes
     by original / resized size (:func:`rescale_without_clipping`); every one of the K
     detections is scored, inverted or outside the image.  (An inverted box has a negative COCO
     width and / or height and overlaps nothing: a false positive, except that COCOeval ignores
     an unmatched detection whose area w * h is negative, i.e. one inverted side only, as
     outside every area range.)
  3. **CrowdHuman 'mask' regions are false-positive sources.**  centerX's loader keeps only
     ``tag == "person"`` boxes, so its COCO ground truth has no ignore regions: a detection on a
     mask region (reflection, poster, crowd) is a false positive, and a person with
     ``extra.ignore == 1`` is an ordinary person to find.  Its boxes are the odgt box
     (``data.crowdhuman_box``; vbox in centerX) clipped to the image (x1, y1 >= 0, x2 <= w,
     y2 <= h), kept only when the clipped width and height are both > 1 pixel; ``area`` = w * h,
     ``iscrowd`` 0.
  4. **CrowdHuman images without persons are dropped** from the evaluation (centerX's loader
     keeps only images with at least one box left by 3), so detections on them count nowhere.

  3 and 4 need what the converted json does not keep (which crowd box was a mask region, which a
  person with ``extra.ignore``): :func:`centerx_crowdhuman_gt` reads the split's odgt file again
  (its path is in ``source.json`` beside the converted json) and the image sizes from the json.
  Other datasets keep their converted json under both protocols.  The CrowdHuman toolkit metrics
  (``crowdhuman_AP50``, ``MR-2``, ``JI``, evaluation/crowdhuman_eval.py) keep their own ignore
  rule under both, on the images evaluated.

`eval.wider_pred_dir` (WIDER Face evaluation): the eval split's detections are also written in
the official WIDER FACE kit's layout (``evaluation/wider_eval.py`` ``write_pred_dir``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Mapping, Optional, Sequence, Tuple

import ml_collections
import numpy as np

from cn2_jax import schema
from cn2_jax.errors import ConfigError, DataError, InputFileError
from cn2_jax.evaluation.coco_eval import CocoEvaluator
from cn2_jax.evaluation.crowdhuman_eval import CROWDHUMAN_BOXES
from cn2_jax.registry import Registry

logger = logging.getLogger(__name__)

PROTOCOLS = ("official", "centerx")
CENTERX_MIN_SIDE = 1.0  # centerX keeps a GT box when its clipped width and height are > 1 px

__all__ = [
    "PROTOCOLS",
    "eval_model_config",
    "rescale_without_clipping",
    "centerx_crowdhuman_boxes",
    "centerx_crowdhuman_coco",
    "centerx_crowdhuman_gt",
    "evaluation_gt",
    "make_evaluator",
]


def eval_model_config(model: ml_collections.ConfigDict, protocol: str) -> ml_collections.ConfigDict:
  """The `model` section the evaluation builds its model from: `model` itself, or for the centerx
  protocol a copy with `onestage.clamp_wh=False` (centerX's decode; read by the `onestage`
  family only, the others have no such clamp)."""
  if protocol != "centerx" or not model.onestage.clamp_wh:
    return model
  out = copy.deepcopy(model)
  with out.unlocked():
    out.onestage.clamp_wh = False
  return out


def rescale_without_clipping(
    boxes: np.ndarray, image_hw: np.ndarray, orig_hw: np.ndarray
) -> np.ndarray:
  """centerX's mapping of `[B, K, 4]` xyxy boxes from the resized image (`image_hw [B, 2]`) to
  the original one (`orig_hw [B, 2]`): x * orig_w / resized_w, y * orig_h / resized_h, nothing
  clipped or dropped."""
  hw = np.asarray(image_hw, np.float64)
  ohw = np.asarray(orig_hw, np.float64)
  sx = ohw[:, 1] / hw[:, 1]
  sy = ohw[:, 0] / hw[:, 0]
  scale = np.stack([sx, sy, sx, sy], axis=-1)[:, None, :]
  return (np.asarray(boxes, np.float64) * scale).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# CrowdHuman as centerX evaluates it
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


# The dataset kinds (`data.dataset`) whose centerx ground truth is not their converted json:
# kind -> (converted annotation file -> COCO dict).
CENTERX_GROUND_TRUTH = Registry("centerX evaluation ground truth", "data.dataset")
CENTERX_GROUND_TRUTH.add("crowdhuman", centerx_crowdhuman_gt)


def evaluation_gt(dataset: str, annotation_file: str, protocol: str) -> Optional[dict]:
  """The COCO ground truth of the protocol when it is not the converted json itself (None)."""
  if protocol == "centerx" and dataset in CENTERX_GROUND_TRUTH:
    return CENTERX_GROUND_TRUTH[dataset](annotation_file)
  return None


def make_evaluator(
    dataset: str,
    annotation_file: str,
    label_to_category_id: Sequence[int],
    protocol: str,
    *,
    verbose: bool = True,
) -> CocoEvaluator:
  """The `CocoEvaluator` of a split of `dataset` (its `data.dataset` kind) under `protocol`: on
  the converted json `annotation_file`, or on the protocol's own ground truth
  (:func:`evaluation_gt`), in which case the images it leaves out are skipped."""
  gt = evaluation_gt(dataset, annotation_file, protocol)
  if gt is not None:
    logger.info(
        "eval.protocol=%r: %s on %d images with %d boxes (centerX's ground truth)",
        protocol,
        dataset,
        len(gt["images"]),
        len(gt["annotations"]),
    )
  return CocoEvaluator(
      annotation_file if gt is None else gt,
      label_to_category_id,
      verbose=verbose,
      skip_images_not_in_gt=gt is not None,
  )


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------
def _validate(cfg) -> None:
  e = cfg.eval
  if e.protocol not in PROTOCOLS:
    raise ConfigError(f"eval.protocol must be one of {PROTOCOLS}, got {e.protocol!r}")
  if not isinstance(e.wider_pred_dir, str):
    raise ConfigError(f"eval.wider_pred_dir must be a folder path, got {e.wider_pred_dir!r}")


CONFIG = schema.group(
    "eval",
    "Evaluation (--mode=eval and the evaluations during training; evaluation/protocol.py).",
    schema.Field(
        "protocol",
        "official",
        "'official' (detectron2's: w/h clamped, boxes clipped to the image and empty ones "
        "dropped, ignore regions as crowd boxes) | 'centerx' (centerX's numbers: no clamp, no "
        "clipping or dropping, CrowdHuman mask regions as false-positive sources and images "
        "without persons dropped; docs/datasets.md §8)",
    ),
    schema.Field(
        "wider_pred_dir",
        "",
        "WIDER Face (data.dataset='wider_face', images <event>/<image>.jpg): also write the eval "
        "split's detections to this folder in the official WIDER FACE kit's layout "
        "(<event>/<image>.txt: name line, count line, 'x y w h score' lines); relative to the "
        "working directory; '' = not written",
    ),
    validate=_validate,
)
