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
import logging
from typing import Optional, Sequence

import ml_collections
import numpy as np

from cn2_jax import schema
from cn2_jax.data import catalog
from cn2_jax.errors import ConfigError
from cn2_jax.evaluation.coco_eval import CocoEvaluator

logger = logging.getLogger(__name__)

PROTOCOLS = ("official", "centerx")

__all__ = [
    "PROTOCOLS",
    "eval_model_config",
    "rescale_without_clipping",
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


def evaluation_gt(dataset: str, annotation_file: str, protocol: str) -> Optional[dict]:
  """The COCO ground truth of the protocol when it is not the converted json itself (None): a
  dataset kind's `centerx_ground_truth` (data/catalog.py; CrowdHuman's is
  `crowdhuman_eval.centerx_crowdhuman_gt`)."""
  if protocol == "centerx":
    centerx_gt = catalog.get(dataset).centerx_ground_truth
    if centerx_gt is not None:
      return centerx_gt(annotation_file)
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
