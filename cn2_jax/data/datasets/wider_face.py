"""`wider_face`: WIDER Face (wider_face_split/wider_face_{split}_bbx_gt.txt and
WIDER_{split}/images under data.root), converted to COCO json (cn2_jax/data/sources.py); with
data.wider_eval_gt (the official kit's .mat files) evaluation adds the easy / medium / hard AP
(cn2_jax/evaluation/wider_eval.py).

Files [defaults: ``wider_face_split/wider_face_{split}_bbx_gt.txt``, images
``WIDER_{split}/images``]: per image a path line, a count line, then one line ``x y w h blur
expression illumination invalid occlusion pose`` per face (a 0-face image has one line of zeros).
One category, ``face``; ``invalid == 1`` faces are ignore regions.  Image ids are the 1-based
image order of the file.  Evaluation: COCO-style AP, plus the official protocol (AP on the easy /
medium / hard subsets) when ``data.wider_eval_gt`` names the folder of the official kit's
ground-truth files (``wider_face_val.mat``, ``wider_{easy,medium,hard}_val.mat``), which the
annotation txt does not carry.
"""

from __future__ import annotations

import os
from typing import List, Optional

from cn2_jax import schema
from cn2_jax.data import sources
from cn2_jax.data.catalog import DatasetKind, register
from cn2_jax.data.sources import SourceImage, read_text, where_suffix
from cn2_jax.errors import ConfigError, DataError
from cn2_jax.evaluation import wider_eval


def _numbers(line: str) -> Optional[List[float]]:
  try:
    return [float(value) for value in line.split()]
  except ValueError:
    return None


def parse_wider_face(path: str, *, where: str = "") -> List[SourceImage]:
  """The images of ``wider_face_{train,val}_bbx_gt.txt`` (category ``face``; ``invalid`` faces
  are ignore regions)."""
  lines = read_text(path, "WIDER Face annotation file", where).splitlines()
  images, i, n_lines = [], 0, len(lines)

  def bad(lineno, msg):
    return DataError(f"{path}:{lineno}: {msg}{where_suffix(where)}")

  while i < n_lines:
    name = lines[i].strip()
    if not name:
      i += 1
      continue
    if i + 1 >= n_lines:
      raise bad(i + 2, f"missing the face count of {name}")
    count = _numbers(lines[i + 1])
    if count is None or len(count) != 1 or count[0] < 0 or count[0] != int(count[0]):
      raise bad(i + 2, f"expected the face count of {name}, got {lines[i + 1].strip()!r}")
    num_boxes = int(count[0])
    i += 2
    boxes, ignore = [], []
    if (
        num_boxes == 0 and i < n_lines and _numbers(lines[i])
    ):  # a line of zeros (absent in some copies)
      i += 1
    for _ in range(num_boxes):
      if i >= n_lines:
        raise bad(i + 1, f"{name} has {num_boxes} faces but the file ends")
      vals = _numbers(lines[i])
      if vals is None or len(vals) < 4:
        raise bad(i + 1, f"expected 'x y w h blur expression illumination invalid occlusion "
                  f"pose' of a face of {name}, got {lines[i].strip()!r}")  # fmt: skip
      x, y, w, h = vals[:4]
      boxes.append((x, y, x + w, y + h))
      ignore.append(len(vals) > 7 and vals[7] != 0)
      i += 1
    images.append(SourceImage(name, len(images) + 1, boxes, ["face"] * len(boxes), ignore))
  if not images:
    raise DataError(f"WIDER Face annotation file {path} lists no images{where_suffix(where)}")
  return images


FORMAT = sources.SourceFormat(
    name="wider_face",
    parse=lambda split: parse_wider_face(split.annotation_file, where=split.where),
    default_files=("wider_face_split/wider_face_{split}_bbx_gt.txt", "WIDER_{split}/images"),
    class_names=("face",),
    default_name="wider_face",
)


def prepare(data, data_dir: str, workdir: str, seed: int):
  del workdir, seed
  return sources.prepare_from_config(data, data_dir, FORMAT)


def official_metrics(annotation_file: str, evaluator, options) -> dict:
  kit = options.get("wider_eval_gt", "")
  if not kit:
    return {}
  return wider_eval.metrics_from_coco(
      annotation_file, evaluator.results, evaluator.image_ids, os.path.expanduser(kit)
  )


register(
    DatasetKind(
        FORMAT.name,
        prepare,
        fixed_num_classes=len(FORMAT.class_names),
        extra_metrics=official_metrics,
    )
)


def _validate_eval_gt(cfg) -> None:
  gt_dir = cfg.data.wider_eval_gt
  if not gt_dir:
    return
  if not isinstance(gt_dir, str):
    raise ConfigError(f"data.wider_eval_gt must be a folder path, got {gt_dir!r}")
  if cfg.data.dataset != "wider_face":
    raise ConfigError(
        f"data.wider_eval_gt is read only with data.dataset='wider_face', not "
        f"{cfg.data.dataset!r}"
    )
  if not os.path.isdir(os.path.expanduser(gt_dir)):
    raise ConfigError(
        f"data.wider_eval_gt={gt_dir!r} is not a folder (it must hold the official "
        f"wider_face_val.mat and wider_{{easy,medium,hard}}_val.mat)"
    )


CONFIG = schema.group(
    "data",
    "WIDER FACE.",
    schema.Field(
        "wider_eval_gt",
        "",
        "folder of the official kit's wider_face_val.mat and wider_{easy,medium,hard}_val.mat "
        "(absolute or relative to the working directory); set, eval adds the official easy / "
        "medium / hard AP (evaluation/wider_eval.py) to the COCO-style metrics; '' = COCO-style "
        "AP only",
    ),
    validate=_validate_eval_gt,
)
