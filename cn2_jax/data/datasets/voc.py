"""`voc`: a Pascal VOC folder (JPEGImages/, Annotations/*.xml, ImageSets/Main/{split}.txt under
data.root), converted to COCO json (cn2_jax/data/sources.py).

Files [defaults: list ``ImageSets/Main/{split}.txt``, images ``JPEGImages``, annotations always
``<root>/Annotations/<id>.xml``]: categories are the object names of all splits, sorted by name
(ids 1..K); boxes ``(xmin - 1, ymin - 1, xmax, ymax)`` as detectron2's (and centerX's) VOC
loader; ``difficult == 1`` objects are ignore regions (VOC's own evaluation ignores them; centerX
keeps them as positives).  The image is ``<id>.jpg`` (else the xml's ``<filename>``); image ids
are the 1-based order of the list.  centerX's WIDER Face VOC copy is this format.  Evaluation:
COCO-style AP, not VOC's 11-point / all-point AP@0.5 per class.  The dataset name defaults to the
folder name of data.root.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from typing import List

from cn2_jax.data import sources
from cn2_jax.data.catalog import DatasetKind, register
from cn2_jax.data.sources import SourceImage, read_text, where_suffix
from cn2_jax.errors import DataError


def _voc_ids(list_file: str, where: str) -> List[str]:
  ids = []
  for line in read_text(list_file, "VOC image list", where).splitlines():
    parts = line.split()
    if parts:
      ids.append(parts[0])
  if not ids:
    raise DataError(f"VOC image list {list_file} is empty{where_suffix(where)}")
  return ids


def _voc_xml_paths(list_file: str, annotations_dir: str, where: str = "") -> List[str]:
  return [os.path.join(annotations_dir, f"{i}.xml") for i in _voc_ids(list_file, where)]


def parse_voc(
    list_file: str, annotations_dir: str, image_root: str, *, where: str = ""
) -> List[SourceImage]:
  """The images listed in ``list_file`` (one id a line), from ``annotations_dir/<id>.xml``;
  boxes ``(xmin - 1, ymin - 1, xmax, ymax)``; ``difficult`` objects are ignore regions."""
  ids = _voc_ids(list_file, where)
  xmls = [os.path.join(annotations_dir, f"{i}.xml") for i in ids]
  missing = [path for path in xmls if not os.path.isfile(path)]
  if missing:
    shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
    raise DataError(
        f"{len(missing)} annotation file(s) of the ids listed in {list_file} are missing: "
        f"{shown}{where_suffix(where)}"
    )
  images = []
  for index, (image_id, xml) in enumerate(zip(ids, xmls), 1):
    try:
      root = ET.parse(xml).getroot()
    except (ET.ParseError, OSError) as e:
      raise DataError(
          f"VOC annotation file {xml} is not valid XML: {e}{where_suffix(where)}"
      ) from e
    boxes, names, ignore = [], [], []
    try:
      for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if not name:
          raise ValueError("an object has no <name>")
        bndbox = obj.find("bndbox")
        if bndbox is None:
          raise ValueError(f"object {name!r} has no <bndbox>")
        x1, y1, x2, y2 = (float(bndbox.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append((x1 - 1.0, y1 - 1.0, x2, y2))
        names.append(name)
        ignore.append(int(float((obj.findtext("difficult") or "0").strip() or 0)) != 0)
    except (TypeError, ValueError) as e:
      raise DataError(f"VOC annotation file {xml}: {e}{where_suffix(where)}") from e
    file_name = f"{image_id}.jpg"
    if not os.path.isfile(os.path.join(image_root, file_name)):
      alt = (root.findtext("filename") or "").strip()
      if alt and os.path.isfile(os.path.join(image_root, alt)):
        file_name = alt
    images.append(SourceImage(file_name, index, boxes, names, ignore))
  return images


def _files_read(split: sources.SplitSource) -> List[str]:
  """The image list and the xml of each id it lists."""
  xmls = _voc_xml_paths(split.annotation_file, split.annotations_dir, split.where)
  return [split.annotation_file] + xmls


FORMAT = sources.SourceFormat(
    name="voc",
    parse=lambda split: parse_voc(
        split.annotation_file, split.annotations_dir, split.image_root, where=split.where
    ),
    default_files=("ImageSets/Main/{split}.txt", "JPEGImages"),
    annotations_subdir="Annotations",
    read_files=_files_read,
)


def prepare(data, data_dir: str, workdir: str, seed: int):
  del workdir, seed
  return sources.prepare_from_config(data, data_dir, FORMAT)


register(DatasetKind(FORMAT.name, prepare))
