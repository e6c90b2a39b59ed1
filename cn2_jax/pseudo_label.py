"""`--mode=pseudo_label`: a trained model's detections on a folder of images, written as a COCO
instances json that trains like any labelled dataset (centerX's pseudo-label baseline,
``inference/gnt_pseudo_label.py``; README "Pseudo-labels").

    python main.py --config C --workdir W --mode=pseudo_label --images=FOLDER

* Images: every image of FOLDER and its subfolders (``app.IMAGE_EXTENSIONS``, sorted by path),
  run through the `Predictor` by ``app.pseudo_label`` (the run's test preprocessing; boxes
  mapped to the original image, clipped to it, empty ones dropped).
* ``images``: ids 1..N in that order, ``file_name`` relative to FOLDER ('/'-separated),
  ``width`` / ``height`` of the original (EXIF-oriented) image.  Images with no detection above
  the threshold are kept, without annotations (``data.filter_empty`` decides whether training
  sees them; centerX's pseudo-label loader drops them).
* ``annotations``: the detections with ``score >= pseudo_label.score_thresh`` (centerX: 0.3),
  ``bbox`` ``[x, y, w, h]`` in original pixels, ``area`` = w * h, ``iscrowd`` 0,
  ``category_id`` of the model's class, plus the detection's ``score``.
* ``categories``: one per model class, the class names and category ids of the run's
  dataset_info.json (``Predictor.class_names`` / ``category_ids``; ids 1..K when the run has
  none), so the labels of a dataset made from the file are the model's.

Train on it with ``data.dataset='coco_json'``, ``data.root=FOLDER``,
``data.train_json=<the json>`` (or as a ``data.mixture`` entry with the same keys).
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

from cn2_jax import schema
from cn2_jax.errors import ConfigError, InputFileError


def folder_images(folder: str, extensions: Sequence[str]) -> List[str]:
  """Paths relative to `folder` ('/'-separated) of its images (names ending in one of
  `extensions`, any case) and those of its subfolders, sorted; none is a one-line
  InputFileError."""
  if not os.path.isdir(folder):
    raise InputFileError(f"--mode=pseudo_label: {folder} is not a folder")
  out = []
  for parent, dirs, files in os.walk(folder):
    dirs.sort()
    for name in files:
      if name.lower().endswith(tuple(extensions)):
        rel = os.path.relpath(os.path.join(parent, name), folder)
        out.append(rel.replace(os.sep, "/"))
  if not out:
    raise InputFileError(f"no images ({', '.join(extensions)}) in folder {folder}")
  return sorted(out)


def categories(num_classes: int, predictor) -> List[dict]:
  """One COCO category per model class of a `Predictor`: `{"id", "name", "supercategory"}`."""
  return [
      {
          "id": category_id(predictor, label),
          "name": predictor.class_name(label),
          "supercategory": "",
      }
      for label in range(num_classes)
  ]


def category_id(predictor, label: int) -> int:
  """The model's category id of `label` (1-based label order when the run records none)."""
  cat = predictor.category_id(label)
  return int(cat) if cat is not None else label + 1


def coco_pseudo_labels(
    images: Sequence[Tuple[str, int, int, dict]],
    cats: Sequence[dict],
    label_to_category_id: Sequence[int],
    score_thresh: float,
) -> dict:
  """The COCO dict of `images` = `[(file_name, height, width, detections)]` (detections as the
  Predictor returns them: `boxes [K, 4]` xyxy original pixels, `scores`, `classes`): the
  detections with score >= `score_thresh`."""
  out_images, anns = [], []
  for image_id, (file_name, height, width, det) in enumerate(images, 1):
    out_images.append(
        {"id": image_id, "file_name": file_name, "height": int(height), "width": int(width)}
    )
    boxes = np.asarray(det["boxes"], np.float64).reshape(-1, 4)
    scores = np.asarray(det["scores"], np.float64).reshape(-1)
    classes = np.asarray(det["classes"]).reshape(-1)
    for box, score, label in zip(boxes, scores, classes):
      if score < score_thresh:
        continue
      x1, y1, x2, y2 = (float(v) for v in box)
      anns.append(
          {
              "id": len(anns) + 1,
              "image_id": image_id,
              "category_id": int(label_to_category_id[int(label)]),
              "bbox": [x1, y1, x2 - x1, y2 - y1],
              "area": (x2 - x1) * (y2 - y1),
              "iscrowd": 0,
              "score": float(score),
          }
      )
  return {"images": out_images, "annotations": anns, "categories": list(cats)}


def output_path(cfg, workdir: str, folder: str) -> str:
  """`pseudo_label.output`, or `<workdir>/pseudo_label/<folder name>.json`."""
  if cfg.pseudo_label.output:
    return os.path.expanduser(cfg.pseudo_label.output)
  stem = os.path.basename(os.path.normpath(os.path.abspath(folder))) or "images"
  return os.path.join(workdir, "pseudo_label", f"{stem}.json")


def _validate(cfg) -> None:
  p = cfg.pseudo_label
  thresh: Optional[float] = p.score_thresh
  if not isinstance(thresh, (int, float)) or not 0.0 <= float(thresh) <= 1.0:
    raise ConfigError(f"pseudo_label.score_thresh must be a number in [0, 1], got {thresh!r}")
  if not isinstance(p.output, str):
    raise ConfigError(f"pseudo_label.output must be a file path, got {p.output!r}")


CONFIG = schema.group(
    "pseudo_label",
    "--mode=pseudo_label (cn2_jax/pseudo_label.py).",
    schema.Field(
        "score_thresh",
        0.3,
        "detections with score >= this become pseudo boxes (centerX's gnt_pseudo_label.py: 0.3)",
    ),
    schema.Field(
        "output",
        "",
        "the COCO json written; '' = <workdir>/pseudo_label/<folder name>.json",
    ),
    validate=_validate,
)
