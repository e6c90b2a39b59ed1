"""`crowdhuman`: CrowdHuman (annotation_{split}.odgt files and Images/ under data.root), converted
to COCO json (cn2_jax/data/sources.py); evaluation adds the official CrowdHuman AP50, MR^-2 and JI
(cn2_jax/evaluation/crowdhuman_eval.py).

Files [defaults: ``annotation_{split}.odgt``, images ``Images/<ID>.jpg``]: one JSON object per
line, ``{"ID", "gtboxes": [{"tag", "fbox", "vbox", "hbox", "extra", "head_attr"}...]}``. One
category, ``person``; the box is ``data.crowdhuman_box`` (``vbox`` as centerX, ``fbox`` as the
official benchmark, or ``hbox``).  Boxes with ``tag != "person"`` ("mask": reflections, posters,
dense crowds) or ``extra.ignore == 1`` (for ``hbox`` also ``head_attr.ignore == 1``) are ignore
regions, as in the official evaluation (``crowdhuman_eval.crowdhuman_objects``): crowd boxes
(``iscrowd``), which the one-stage heatmap loss leaves out of its negatives (docs/onestage.md
§3.8).  ``data.crowdhuman_ignore_as = "person"`` is centerX's reading instead (its
``load_crowd_instances`` keeps every ``tag == "person"`` box, ``extra.ignore`` or not, and drops
the other tags): the ``extra.ignore`` persons become ordinary ``person`` boxes and the "mask"
regions are dropped, in training and in the converted json the evaluation reads (a separate
conversion, ``crowdhuman-<box>-persons``).  Image ids are the 1-based record order of the file.
"""

from __future__ import annotations

import dataclasses
import json
from typing import List, Tuple

import numpy as np

from cn2_jax import schema
from cn2_jax.data import sources
from cn2_jax.data.catalog import DatasetKind, register
from cn2_jax.data.sources import SourceImage, read_text, where_suffix
from cn2_jax.errors import ConfigError, DataError
from cn2_jax.evaluation import crowdhuman_eval
from cn2_jax.evaluation.crowdhuman_eval import CROWDHUMAN_BOXES, crowdhuman_objects


def _odgt_records(path: str, where: str = "") -> List[Tuple[int, dict]]:
  """``[(line number, record)]`` of an odgt file (blank lines skipped)."""
  text = read_text(path, "CrowdHuman annotation file", where)
  out = []
  for lineno, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except ValueError as e:
      raise DataError(f"{path}:{lineno} is not a JSON object: {e}{where_suffix(where)}") from e
    if not isinstance(rec, dict) or "ID" not in rec:
      raise DataError(
          f"{path}:{lineno}: a record needs an 'ID' (got {str(rec)[:80]}){where_suffix(where)}"
      )
    out.append((lineno, rec))
  if not out:
    raise DataError(f"CrowdHuman annotation file {path} has no records{where_suffix(where)}")
  return out


IGNORE_AS = ("ignore", "person")  # data.crowdhuman_ignore_as values


def parse_crowdhuman(
    path: str, box: str = "vbox", *, where: str = "", ignore_as: str = "ignore"
) -> List[SourceImage]:
  """The images of a CrowdHuman ``.odgt`` file (category ``person``; ``<ID>.jpg``).

  ``ignore_as``: ``"ignore"``: non-person tags and ``extra.ignore`` boxes are ignore regions;
  ``"person"`` (centerX): every ``tag == "person"`` box is a person, the other tags are dropped."""
  if ignore_as not in IGNORE_AS:
    raise ValueError(f"ignore_as must be one of {IGNORE_AS}, got {ignore_as!r}")
  images, seen = [], set()
  for image_id, (lineno, rec) in enumerate(_odgt_records(path, where), 1):
    name = str(rec["ID"])
    if name in seen:
      raise DataError(f"{path}:{lineno}: ID {name!r} appears twice{where_suffix(where)}")
    seen.add(name)
    try:
      if ignore_as == "person":
        rec = {"gtboxes": [b for b in rec.get("gtboxes") or [] if b.get("tag") == "person"]}
      boxes, ignore = crowdhuman_objects(rec, box)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      what = f"a box lacks {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
      raise DataError(f"{path}:{lineno} (ID {name!r}): {what}{where_suffix(where)}") from e
    if ignore_as == "person":
      ignore = np.zeros(len(boxes), bool)
    images.append(SourceImage(f"{name}.jpg", image_id, boxes, ["person"] * len(boxes), ignore))
  return images


FORMAT = sources.SourceFormat(
    name="crowdhuman",
    parse=lambda split: parse_crowdhuman(split.annotation_file, split.box, where=split.where),
    default_files=("annotation_{split}.odgt", "Images"),
    class_names=("person",),
    default_name="crowdhuman-{box}",
    box_option="crowdhuman_box",
    boxes=CROWDHUMAN_BOXES,
)


# centerX's reading (data.crowdhuman_ignore_as = "person"): its own conversion (the format name is
# recorded with the converted files, so switching the option remakes them even under one
# data.name) and its own default dataset name.
FORMAT_PERSONS = dataclasses.replace(
    FORMAT,
    name="crowdhuman-ignore-as-person",
    parse=lambda split: parse_crowdhuman(
        split.annotation_file, split.box, where=split.where, ignore_as="person"
    ),
    default_name="crowdhuman-{box}-persons",
)


def prepare(data, data_dir: str, workdir: str, seed: int):
  del workdir, seed
  if not data.root:  # (before the format: FORMAT_PERSONS's name is not a data.dataset)
    raise ConfigError("data.root must name the dataset folder for data.dataset='crowdhuman'")
  fmt = FORMAT_PERSONS if data.crowdhuman_ignore_as == "person" else FORMAT
  return sources.prepare_from_config(data, data_dir, fmt)


def official_metrics(annotation_file: str, evaluator, options) -> dict:
  del options
  return crowdhuman_eval.metrics_from_coco(annotation_file, evaluator.results, evaluator.image_ids)


register(
    DatasetKind(
        FORMAT.name,
        prepare,
        fixed_num_classes=len(FORMAT.class_names),
        extra_metrics=official_metrics,
        centerx_ground_truth=crowdhuman_eval.centerx_crowdhuman_gt,
    )
)


def check_source(where: str, source) -> None:
  """The CrowdHuman settings of one dataset description (`data`, or a data.mixture /
  data.extra_eval entry: each may read CrowdHuman its own way). data.mixture's check of every
  description calls it, so there is one check for all of them."""
  box, ignore_as = source["crowdhuman_box"], source["crowdhuman_ignore_as"]
  if box not in CROWDHUMAN_BOXES:
    raise ConfigError(f"{where}.crowdhuman_box must be one of {CROWDHUMAN_BOXES}, got {box!r}")
  if ignore_as not in IGNORE_AS:
    raise ConfigError(f"{where}.crowdhuman_ignore_as must be one of {IGNORE_AS}, got {ignore_as!r}")


CONFIG = schema.group(
    "data",
    "CrowdHuman.",
    schema.Field(
        "crowdhuman_box",
        "vbox",
        "the box trained and evaluated: 'vbox' (visible, as centerX), 'fbox' (full body, the "
        "official benchmark's) or 'hbox' (head). 'mask' regions and extra.ignore boxes are "
        "ignore regions (like COCO crowd boxes) unless crowdhuman_ignore_as='person'",
    ),
    schema.Field(
        "crowdhuman_ignore_as",
        "ignore",
        "'ignore': 'mask' regions and extra.ignore persons are ignore regions (crowd boxes: no "
        "positives, no heatmap negatives, ignored by the evaluation); 'person': centerX's reading, "
        "extra.ignore persons are ordinary persons and 'mask' regions are dropped (training and "
        "evaluation ground truth; dataset crowdhuman-<box>-persons)",
    ),
)
