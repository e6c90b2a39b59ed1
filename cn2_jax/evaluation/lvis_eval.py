"""LVIS box AP (the official ``lvis`` package's ``LVISEval``), as detectron2's ``LVISEvaluator``
scores the CenterNet2 LVIS models: AP, AP50, AP75, APs/m/l and the frequency groups APr / APc /
APf (categories in < 10, 10-99, >= 100 training images: the ``frequency`` field ``'r'`` / ``'c'``
/ ``'f'`` of each LVIS category), plus AR at ``max_dets``. At most ``max_dets`` = 300 detections
per image are kept (highest scores), as the official evaluation and the LVIS configs' ``TEST.
DETECTIONS_PER_IMAGE: 300``. LVIS is federated: a detection of a category neither annotated in
its image nor in the image's ``neg_category_ids`` is not scored, and an unmatched detection of a
category in ``not_exhaustive_category_ids`` is not a false positive.

The ``lvis`` package is an optional extra (``pip install -r requirements-lvis.txt``), imported
only here and only when called. Its PyPI release (0.5.3) still uses ``np.float``, which numpy
>= 1.24 removed: the evaluation runs with ``np.float = float`` set for its duration only.

Metrics are fractions in [0, 1]; ``-1.0`` where undefined (e.g. APr when no rare category has a
ground-truth box in the evaluated images). No detection at all gives 0 for the defined metrics.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np

from cn2_jax.errors import UserError

LVIS_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
DEFAULT_MAX_DETS = 300  # official LVIS evaluation (LVISResults max_dets)
EXTRA_HINT = "pip install -r requirements-lvis.txt"
_GROUPS = ("r", "c", "f")  # LVIS category frequency: rare, common, frequent

__all__ = [
    "LVIS_METRIC_NAMES",
    "LvisNotInstalledError",
    "require_lvis",
    "evaluate_lvis",
    "metrics_from_coco",
]


class LvisNotInstalledError(UserError, ImportError):
  """The optional ``lvis`` package is missing."""


def require_lvis():
  """The ``lvis`` module; a one-line :class:`LvisNotInstalledError` naming the extra if absent."""
  root = logging.getLogger()
  handlers, level = list(root.handlers), root.level
  try:
    import lvis  # noqa: PLC0415 - optional extra (requirements-lvis.txt), imported on use
  except ImportError as e:
    raise LvisNotInstalledError(
        f"LVIS evaluation needs the optional 'lvis' package ({EXTRA_HINT}): {e}"
    ) from e
  finally:
    # `import lvis` calls logging.basicConfig(level=WARN): keep the root logger as it was.
    for h in list(root.handlers):
      if h not in handlers:
        root.removeHandler(h)
    root.setLevel(level)
  return lvis


@contextlib.contextmanager
def _numpy_float_alias():
  """``np.float`` (removed in numpy 1.24; lvis 0.5.3's accumulate uses it) while in the block."""
  if "float" in np.__dict__:
    yield
    return
  np.float = float  # type: ignore[attr-defined]
  try:
    yield
  finally:
    np.__dict__.pop("float", None)


def _load(annotations: Union[str, os.PathLike, Mapping[str, Any]]) -> dict:
  if isinstance(annotations, (str, os.PathLike)):
    with open(annotations, "rb") as f:
      return json.load(f)
  if isinstance(annotations, Mapping):
    return copy.deepcopy(dict(annotations))
  raise TypeError(f"annotations must be a json path or a dict, got {type(annotations)}")


def _gt_dataset(dataset: dict) -> dict:
  """The LVIS ground truth with the fields ``LVISEval`` reads filled: per image
  ``neg_category_ids`` / ``not_exhaustive_category_ids`` (default [], as detectron2's loader);
  box-only annotations need no ``segmentation``. Raises ValueError on a category without
  ``frequency``."""
  for image in dataset.get("images", []):
    image.setdefault("neg_category_ids", [])
    image.setdefault("not_exhaustive_category_ids", [])
  for ann in dataset.get("annotations", []):
    if "area" not in ann:
      ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
  bad = [
      cat.get("id") for cat in dataset.get("categories", []) if cat.get("frequency") not in _GROUPS
  ]
  if bad:
    raise ValueError(
        f"LVIS evaluation: categories {bad[:5]} lack the 'frequency' field ('r', 'c' or 'f')"
    )
  return dataset


def evaluate_lvis(
    annotations: Union[str, os.PathLike, Mapping[str, Any]],
    results: Sequence[Mapping[str, Any]],
    image_ids: Optional[Sequence[int]] = None,
    *,
    max_dets: int = DEFAULT_MAX_DETS,
    verbose: bool = False,
) -> Dict[str, float]:
  """LVIS box metrics of COCO-format ``results`` (``image_id, category_id, bbox xywh, score``)
  against the LVIS json ``annotations`` (path or dict), on ``image_ids`` (default: every image
  of the ground truth). Returns ``{name: fraction}`` for :data:`LVIS_METRIC_NAMES` plus ``AR``
  / ``ARs`` / ``ARm`` / ``ARl`` (at ``max_dets`` detections per image)."""
  lvis = require_lvis()
  from lvis.eval import LVISEval  # noqa: PLC0415 - optional extra (requirements-lvis.txt)
  from lvis.results import LVISResults  # noqa: PLC0415 - optional extra

  gt = lvis.LVIS.__new__(lvis.LVIS)  # LVIS() only reads a path; index the dict we have
  gt.logger = logging.getLogger("lvis.lvis")
  gt.dataset = _gt_dataset(_load(annotations))
  with contextlib.redirect_stdout(io.StringIO()):
    gt._create_index()  # noqa: SLF001
  ids = sorted({int(i) for i in (gt.get_img_ids() if image_ids is None else image_ids)})
  keys = LVIS_METRIC_NAMES + ("AR", "ARs", "ARm", "ARl")
  wanted = set(ids)
  res = [dict(result) for result in results if int(result["image_id"]) in wanted]
  if not res:
    return {name: 0.0 for name in keys}
  for det in res:
    det["bbox"] = [float(coord) for coord in det["bbox"]]
  out = io.StringIO()
  lvis_logger = logging.getLogger("lvis")
  old_level = lvis_logger.level
  lvis_logger.setLevel(logging.ERROR)  # "Assuming user provided the results in correct format."
  try:
    with _numpy_float_alias(), contextlib.redirect_stdout(out):
      dt = LVISResults(gt, res, max_dets=max_dets)
      lvis_evaluator = LVISEval(gt, dt, iou_type="bbox")
      lvis_evaluator.params.img_ids = ids
      lvis_evaluator.params.max_dets = max_dets
      lvis_evaluator.run()
      lvis_evaluator.print_results()
  finally:
    lvis_logger.setLevel(old_level)
  got = lvis_evaluator.get_results()
  metrics = {name: float(got[name]) for name in LVIS_METRIC_NAMES}
  for short, area in (("AR", ""), ("ARs", "s"), ("ARm", "m"), ("ARl", "l")):
    metrics[short] = float(got[f"AR{area}@{max_dets}"])
  if verbose:
    print(f"LVIS bbox evaluation: {len(ids)} images, {len(res)} detections")
    print(out.getvalue(), end="")
  return metrics


def metrics_from_coco(annotation_file: str, evaluator, options=None) -> Dict[str, float]:
  """The LVIS metrics of a ``CocoEvaluator``'s detections on its images, named ``lvis_<name>``
  (the ``extra_metrics`` of the ``lvis_v1`` dataset kind, cn2_jax/data/catalog.py)."""
  del options
  metrics = evaluate_lvis(annotation_file, evaluator.results, evaluator.image_ids, verbose=True)
  return {f"lvis_{name}": value for name, value in metrics.items()}
