"""Annotation sources besides a COCO instances json (CrowdHuman, WIDER Face, VOC XML) and class
subsets of any source, converted to COCO instances json for the builders of ``builder.py``.

Every source below becomes a *converted* COCO json per split, which the ``coco_json`` builder
prepares like any other (array_record, same features and metadata) and which COCO evaluation
(``app.evaluate``) reads as its ground truth, since the builder records it as the split's
``annotation_file``.  Ignore regions become ``iscrowd=1`` boxes: no positives there in training
(the pipeline carries them as ``gt_crowd``, with ``gt_valid=False``), and in evaluation a
detection on them is neither a true nor a false positive (COCO crowd matching; the CrowdHuman
metrics of ``evaluation/crowdhuman_eval.py`` use the official IoA > 0.5 rule).

``data.dataset`` values and their files (``data.train_json`` / ``data.val_json`` /
``data.image_root``, relative to ``data.root``; ``{split}`` stands for the split name, and an
empty key takes the default in brackets):

* ``crowdhuman`` [``annotation_{split}.odgt``, images ``Images/<ID>.jpg``]: one JSON object per
  line, ``{"ID", "gtboxes": [{"tag", "fbox", "vbox", "hbox", "extra", "head_attr"}...]}``. One
  category, ``person``; the box is ``data.crowdhuman_box`` (``vbox`` as centerX, ``fbox`` as the
  official benchmark, or ``hbox``).  Boxes with ``tag != "person"`` ("mask": reflections,
  posters, dense crowds) or ``extra.ignore == 1`` (for ``hbox`` also ``head_attr.ignore == 1``)
  are ignore regions, as in the official evaluation.  *Deliberate departure from centerX*, which
  drops them (docs/datasets.md §3.2): there they are plain background in training and a detection on
  them is a false positive in its COCO evaluation.
* ``wider_face`` [``wider_face_split/wider_face_{split}_bbx_gt.txt``, images
  ``WIDER_{split}/images``]: per image a path line, a count line, then one line
  ``x y w h blur expression illumination invalid occlusion pose`` per face (a 0-face image has
  one line of zeros).  One category, ``face``; ``invalid == 1`` faces are ignore regions.
* ``voc`` [list ``ImageSets/Main/{split}.txt``, images ``JPEGImages``, annotations always
  ``<root>/Annotations/<id>.xml``]: categories are the object names of all splits, sorted by
  name (ids 1..K); boxes ``(xmin - 1, ymin - 1, xmax, ymax)`` as detectron2's (and centerX's) VOC
  loader; ``difficult == 1`` objects are ignore regions (VOC's own evaluation ignores them; centerX
  keeps them as positives).  The image is ``<id>.jpg`` (else the xml's ``<filename>``).  centerX's
  WIDER Face VOC copy is this format.
* ``coco_json``, ``coco/2017``, ``synthetic``: used as they are, unless ``data.classes`` is set.
* ``image_folder`` [every image below ``data.root``, recursively, extensions
  :data:`IMAGE_EXTENSIONS`, in sorted path order]: unlabelled images for distillation without labels
  (woGT, docs/onestage.md §4.3): one record per image with no boxes, split ``data.train_split``
  only, one placeholder category ``unlabelled`` (the prepared format needs one; it labels no box).
  The train loader never drops these images as empty (``splits.TrainPart.filter_empty``).
  Converted to ``<data_dir>/converted/<name>/<split>.json`` like the formats above; the file
  list is part of the conversion record, so adding or removing an image remakes it.

Evaluation of these datasets is COCO-style AP (``evaluation/coco_eval.py`` on the converted json,
ignore regions as crowd boxes), plus for CrowdHuman the official AP50 / MR^-2 / JI
(``evaluation/crowdhuman_eval.py``).  **WIDER Face:** COCO-style AP, plus the official protocol
(AP on the easy / medium / hard subsets, ``evaluation/wider_eval.py``) when ``data.wider_eval_gt``
names the folder of the official kit's ground-truth files (``wider_face_val.mat``,
``wider_{easy,medium,hard}_val.mat``), which the annotation txt does not carry.  VOC: COCO-style AP, not VOC's 11-point / all-point AP@0.5 per class.

For CrowdHuman, WIDER and VOC the image sizes are read from the image files (EXIF-oriented); boxes
are clipped to the image, boxes empty after clipping are dropped, ``area`` is the clipped box
area and image ids are the 1-based record order of the annotation file.

Class subsets (``data.classes = ("person", "car")``): only those categories, in that order (label
0 = person, label 1 = car), with the source's category ids (ids 1..K in the selection order for
the formats above); the annotations of other categories are dropped.  Images without a box of
the selected classes are dropped from the training split (``data.train_split``) and kept in the
evaluation split.  An unknown name is a one-line ``DataError`` naming it and the available names.

Files: ``<data_dir>/converted/<name>/<split>.json`` plus ``source.json`` (what they were made
from: options, and the size and mtime of the annotation files and images).  They are remade only
when that record differs, and rewritten only when their content changes, so the builder's own
rebuild check (``builder._source_changes``) sees an unchanged source as unchanged.  Sources that
are gone are not a change: the converted files are used as they are (with a warning).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from cn2_jax.data import builder as builder_lib
from cn2_jax.data.transforms import image_size_after_exif
from cn2_jax.errors import ConfigError, DataError, InputFileError

logger = logging.getLogger(__name__)

FORMATS = ("crowdhuman", "wider_face", "voc")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
UNLABELLED = "unlabelled"  # the placeholder category of an image_folder dataset
CROWDHUMAN_BOXES = ("vbox", "fbox", "hbox")
_VERSION = 1  # of the converted files: a change remakes them
# data.dataset -> (annotation file, image root) used when data.train_json / data.image_root is "".
DEFAULT_FILES = {
    "crowdhuman": ("annotation_{split}.odgt", "Images"),
    "wider_face": ("wider_face_split/wider_face_{split}_bbx_gt.txt", "WIDER_{split}/images"),
    "voc": ("ImageSets/Main/{split}.txt", "JPEGImages"),
}
SplitSpec = Tuple[str, str]

__all__ = [
    "FORMATS",
    "CROWDHUMAN_BOXES",
    "SourceImage",
    "crowdhuman_objects",
    "parse_crowdhuman",
    "parse_wider_face",
    "parse_voc",
    "convert_dataset",
    "build_dataset",
    "build_coco_json",
    "build_coco2017",
    "image_folder_files",
    "build_image_folder",
    "prepare_from_config",
    "subset_options",
]


def _in(where: str) -> str:
  return f" ({where})" if where else ""


@dataclasses.dataclass
class SourceImage:
  """One image of a parsed source: boxes xyxy in source pixels (not yet clipped)."""

  file_name: str  # relative to the split's image root
  image_id: int
  boxes: np.ndarray  # [n, 4] float64
  names: List[str]  # category name per box
  ignore: np.ndarray  # [n] bool: ignore region (-> iscrowd)


def _image(file_name, image_id, boxes, names, ignore) -> SourceImage:
  return SourceImage(
      file_name=file_name,
      image_id=int(image_id),
      boxes=np.asarray(boxes, np.float64).reshape(-1, 4),
      names=list(names),
      ignore=np.asarray(ignore, bool).reshape(-1),
  )


def _read_text(path: str, what: str, where: str) -> str:
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except FileNotFoundError as e:
    raise InputFileError(f"{what} not found: {path}{_in(where)}") from e
  except OSError as e:
    raise DataError(f"cannot read {what} {path}: {e.strerror or e}{_in(where)}") from e
  try:
    return raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise DataError(f"{what} {path} is not UTF-8 text: {e}{_in(where)}") from e


# ----------------------------------------------------------------------------------------------
# CrowdHuman .odgt
# ----------------------------------------------------------------------------------------------
def crowdhuman_objects(record: Mapping, box: str = "vbox") -> Tuple[np.ndarray, np.ndarray]:
  """``(boxes [n, 4] xyxy float64, ignore [n] bool)`` of one odgt record's ``gtboxes``.

  Ignore (as the official evaluation): ``tag != "person"``, ``extra.ignore != 0``, and for
  ``hbox`` also ``head_attr.ignore != 0``.  An ignore region without the ``box`` key uses the
  first of fbox / vbox / hbox it has.  Raises KeyError / TypeError / ValueError on bad entries."""
  if box not in CROWDHUMAN_BOXES:
    raise ValueError(f"box must be one of {CROWDHUMAN_BOXES}, got {box!r}")
  boxes, ignore = [], []
  for g in record.get("gtboxes") or []:
    extra = g.get("extra") or {}
    ign = g.get("tag") != "person" or int(extra.get("ignore", 0) or 0) != 0
    if box == "hbox":
      ign = ign or int((g.get("head_attr") or {}).get("ignore", 0) or 0) != 0
    b = g.get(box)
    if b is None and ign:
      b = next((g[k] for k in ("fbox", "vbox", "hbox") if g.get(k) is not None), None)
    if b is None:
      raise KeyError(box)
    x, y, w, h = (float(v) for v in b)
    boxes.append((x, y, x + w, y + h))
    ignore.append(ign)
  return np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(ignore, bool)


def _odgt_records(path: str, where: str = "") -> List[Tuple[int, dict]]:
  """``[(line number, record)]`` of an odgt file (blank lines skipped)."""
  text = _read_text(path, "CrowdHuman annotation file", where)
  out = []
  for lineno, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except ValueError as e:
      raise DataError(f"{path}:{lineno} is not a JSON object: {e}{_in(where)}") from e
    if not isinstance(rec, dict) or "ID" not in rec:
      raise DataError(f"{path}:{lineno}: a record needs an 'ID' (got {str(rec)[:80]}){_in(where)}")
    out.append((lineno, rec))
  if not out:
    raise DataError(f"CrowdHuman annotation file {path} has no records{_in(where)}")
  return out


def parse_crowdhuman(path: str, box: str = "vbox", *, where: str = "") -> List[SourceImage]:
  """The images of a CrowdHuman ``.odgt`` file (category ``person``; ``<ID>.jpg``)."""
  images, seen = [], set()
  for k, (lineno, rec) in enumerate(_odgt_records(path, where), 1):
    name = str(rec["ID"])
    if name in seen:
      raise DataError(f"{path}:{lineno}: ID {name!r} appears twice{_in(where)}")
    seen.add(name)
    try:
      boxes, ignore = crowdhuman_objects(rec, box)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      what = f"a box lacks {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
      raise DataError(f"{path}:{lineno} (ID {name!r}): {what}{_in(where)}") from e
    images.append(_image(f"{name}.jpg", k, boxes, ["person"] * len(boxes), ignore))
  return images


# ----------------------------------------------------------------------------------------------
# WIDER Face txt
# ----------------------------------------------------------------------------------------------
def _numbers(line: str) -> Optional[List[float]]:
  try:
    return [float(v) for v in line.split()]
  except ValueError:
    return None


def parse_wider_face(path: str, *, where: str = "") -> List[SourceImage]:
  """The images of ``wider_face_{train,val}_bbx_gt.txt`` (category ``face``; ``invalid`` faces
  are ignore regions)."""
  lines = _read_text(path, "WIDER Face annotation file", where).splitlines()
  images, i, n_lines = [], 0, len(lines)

  def bad(lineno, msg):
    return DataError(f"{path}:{lineno}: {msg}{_in(where)}")

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
    n = int(count[0])
    i += 2
    boxes, ignore = [], []
    if n == 0 and i < n_lines and _numbers(lines[i]):  # a line of zeros (absent in some copies)
      i += 1
    for _ in range(n):
      if i >= n_lines:
        raise bad(i + 1, f"{name} has {n} faces but the file ends")
      vals = _numbers(lines[i])
      if vals is None or len(vals) < 4:
        raise bad(i + 1, f"expected 'x y w h blur expression illumination invalid occlusion "
                  f"pose' of a face of {name}, got {lines[i].strip()!r}")  # fmt: skip
      x, y, w, h = vals[:4]
      boxes.append((x, y, x + w, y + h))
      ignore.append(len(vals) > 7 and vals[7] != 0)
      i += 1
    images.append(_image(name, len(images) + 1, boxes, ["face"] * len(boxes), ignore))
  if not images:
    raise DataError(f"WIDER Face annotation file {path} lists no images{_in(where)}")
  return images


# ----------------------------------------------------------------------------------------------
# VOC XML
# ----------------------------------------------------------------------------------------------
def _voc_ids(list_file: str, where: str) -> List[str]:
  ids = []
  for line in _read_text(list_file, "VOC image list", where).splitlines():
    parts = line.split()
    if parts:
      ids.append(parts[0])
  if not ids:
    raise DataError(f"VOC image list {list_file} is empty{_in(where)}")
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
  missing = [p for p in xmls if not os.path.isfile(p)]
  if missing:
    shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
    raise DataError(
        f"{len(missing)} annotation file(s) of the ids listed in {list_file} are missing: "
        f"{shown}{_in(where)}"
    )
  images = []
  for k, (image_id, xml) in enumerate(zip(ids, xmls), 1):
    try:
      root = ET.parse(xml).getroot()
    except (ET.ParseError, OSError) as e:
      raise DataError(f"VOC annotation file {xml} is not valid XML: {e}{_in(where)}") from e
    boxes, names, ignore = [], [], []
    try:
      for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if not name:
          raise ValueError("an object has no <name>")
        bb = obj.find("bndbox")
        if bb is None:
          raise ValueError(f"object {name!r} has no <bndbox>")
        x1, y1, x2, y2 = (float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append((x1 - 1.0, y1 - 1.0, x2, y2))
        names.append(name)
        ignore.append(int(float((obj.findtext("difficult") or "0").strip() or 0)) != 0)
    except (TypeError, ValueError) as e:
      raise DataError(f"VOC annotation file {xml}: {e}{_in(where)}") from e
    file_name = f"{image_id}.jpg"
    if not os.path.isfile(os.path.join(image_root, file_name)):
      alt = (root.findtext("filename") or "").strip()
      if alt and os.path.isfile(os.path.join(image_root, alt)):
        file_name = alt
    images.append(_image(file_name, k, boxes, names, ignore))
  return images


# ----------------------------------------------------------------------------------------------
# Conversion to COCO json
# ----------------------------------------------------------------------------------------------
def _stat(path: str) -> Optional[List[int]]:
  try:
    st = os.stat(path)
  except OSError:
    return None
  return [int(st.st_size), int(st.st_mtime_ns)]


def _read_size(path: str, where: str) -> Tuple[int, int, List[int]]:
  """``(height, width, [size, mtime_ns])`` of an image file (EXIF-oriented, header only)."""
  try:
    with open(path, "rb") as f:
      st = os.fstat(f.fileno())
      with Image.open(f) as img:
        h, w = image_size_after_exif(img)
  except OSError as e:  # PIL's UnidentifiedImageError is an OSError
    msg = " ".join(str(e).split())
    raise DataError(f"corrupt or unreadable image file {path}{_in(where)}: {msg}") from e
  return h, w, [int(st.st_size), int(st.st_mtime_ns)]


def _image_sizes(paths: Sequence[str], source: str, where: str, num_threads: int):
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
    raise DataError(
        f"{len(missing)} image file(s) listed in {source} are missing: {shown}{_in(where)}"
    )
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    return list(pool.map(lambda p: _read_size(p, where), paths))


def _selection(available: Sequence[str], classes: Sequence[str], source: str, where: str):
  """Final category names: ``classes`` checked against ``available`` (else ``available``)."""
  if not classes:
    return list(available)
  cats = [{"id": i + 1, "name": n} for i, n in enumerate(available)]
  return [c["name"] for c in builder_lib.select_categories(cats, classes, source, where)]


def _images_to_coco(
    images: Sequence[SourceImage],
    image_root: str,
    names: Sequence[str],
    *,
    drop_empty: bool,
    source: str,
    where: str,
    num_threads: int,
) -> Tuple[dict, Dict[str, List[int]]]:
  """COCO dict of parsed images (categories ``names``, ids 1..K) and ``{file_name: stat}``."""
  paths = [os.path.join(image_root, im.file_name) for im in images]
  sizes = _image_sizes(paths, source, where, num_threads)
  cat_id = {n: i + 1 for i, n in enumerate(names)}
  out_images, anns, stats = [], [], {}
  dropped = 0
  for im, (h, w, st) in zip(images, sizes):
    stats[im.file_name] = st
    keep = np.array([n in cat_id for n in im.names], bool)
    b = im.boxes[keep].copy()
    b[:, 0::2] = np.clip(b[:, 0::2], 0.0, float(w))
    b[:, 1::2] = np.clip(b[:, 1::2], 0.0, float(h))
    ok = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    dropped += int((~ok).sum())
    kept_names = [n for n, k in zip(im.names, keep) if k]
    ign = im.ignore[keep]
    if drop_empty and not ok.any():
      continue
    out_images.append({"id": im.image_id, "file_name": im.file_name, "height": h, "width": w})
    for j in np.nonzero(ok)[0]:
      x1, y1, x2, y2 = (float(v) for v in b[j])
      anns.append(
          {
              "id": len(anns) + 1,
              "image_id": im.image_id,
              "category_id": cat_id[kept_names[j]],
              "bbox": [x1, y1, x2 - x1, y2 - y1],
              "area": (x2 - x1) * (y2 - y1),
              "iscrowd": int(bool(ign[j])),
          }
      )
  if dropped:
    logger.info("%s: dropped %d boxes empty after clipping to the image", where or source, dropped)
  cats = [{"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(names)]
  return {"images": out_images, "annotations": anns, "categories": cats}, stats


def _filter_coco(coco: dict, classes, *, drop_empty: bool, source: str, where: str) -> dict:
  """A COCO dict restricted to ``classes`` (categories listed in that order, ids kept)."""
  cats = builder_lib._categories_of(coco, source, where)  # noqa: SLF001 - same package
  by_id = {c["id"]: c for c in coco["categories"] if "id" in c}
  sel = builder_lib.select_categories(cats, classes, source, where)
  ids = {c["id"] for c in sel}
  anns = []
  try:
    for a in coco["annotations"]:
      if int(a["category_id"]) in ids:
        anns.append({k: v for k, v in a.items() if k != "segmentation"})
    images = coco["images"]
    if drop_empty:
      have = {int(a["image_id"]) for a in anns}
      images = [im for im in images if int(im["id"]) in have]
  except (KeyError, TypeError, ValueError) as e:
    raise DataError(f"annotation file {source}: bad entry ({type(e).__name__}: {e}){_in(where)}")
  categories = [dict(by_id.get(c["id"], c)) for c in sel]
  return {"images": images, "annotations": anns, "categories": categories}


def _dump(obj) -> str:
  return json.dumps(obj, separators=(",", ":"), sort_keys=False)


def _write_if_changed(path: str, text: str) -> bool:
  """Atomically writes ``text`` unless the file already holds it (keeps its mtime)."""
  try:
    with open(path, encoding="utf-8") as f:
      if f.read() == text:
        return False
  except OSError:
    pass
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)
  return True


def _annotation_files(fmt: str, ann: str, annotations_dir: Optional[str], where: str) -> List[str]:
  if fmt == "voc":
    return [ann] + _voc_xml_paths(ann, annotations_dir, where)
  return [ann]


def _options(fmt, splits, box, classes, train_splits, annotations_dir) -> dict:
  return json.loads(
      json.dumps(
          dict(
              version=_VERSION,
              format=fmt,
              box=box if fmt == "crowdhuman" else "",
              classes=list(classes),
              drop_empty_splits=sorted(s for s in train_splits if s in splits and classes),
              annotations_dir=os.path.abspath(annotations_dir) if annotations_dir else "",
              splits={
                  s: [os.path.abspath(a), os.path.abspath(r)]
                  for s, (a, r) in sorted(splits.items())
              },
          )
      )
  )


def _up_to_date(out_dir: str, options: dict, splits: Mapping[str, SplitSpec]) -> bool:
  """Whether the converted files in ``out_dir`` were made from these sources, as they are now
  (gone sources count as unchanged, with a warning)."""
  try:
    with open(os.path.join(out_dir, "source.json"), encoding="utf-8") as f:
      rec = json.load(f)
  except (OSError, ValueError):
    return False
  if not isinstance(rec, dict) or rec.get("options") != options:
    return False
  if any(not os.path.isfile(os.path.join(out_dir, f"{s}.json")) for s in splits):
    return False
  gone = 0
  for path, st in (rec.get("annotation_files") or {}).items():
    now = _stat(path)
    if now is None:
      gone += 1
    elif now != st:
      return False
  for split, files in (rec.get("images") or {}).items():
    root = splits[split][1]
    for name, st in files.items():
      now = _stat(os.path.join(root, name))
      if now is None:
        gone += 1
      elif now != st:
        return False
  if gone:
    logger.warning(
        "%d source file(s) of %s are gone; using the converted annotations as they are",
        gone,
        out_dir,
    )
  return True


def convert_dataset(
    fmt: str,
    splits: Mapping[str, SplitSpec],
    out_dir: str,
    *,
    box: str = "vbox",
    classes: Sequence[str] = (),
    train_splits: Sequence[str] = (),
    annotations_dir: Optional[str] = None,
    num_threads: int = 8,
    name: str = "",
) -> Dict[str, SplitSpec]:
  """Converts ``{split: (annotation file, image root)}`` of format ``fmt`` (one of
  :data:`FORMATS` or ``'coco_json'``) to ``out_dir/<split>.json``; returns ``{split: (converted
  json, image root)}`` for :func:`builder.build_coco_json_dataset`.

  ``box``: CrowdHuman box type; ``classes``: class subset (names, in label order);
  ``train_splits``: splits from which images without a box of ``classes`` are dropped (only with
  ``classes``); ``annotations_dir``: the VOC ``Annotations`` folder.  Remade only when the
  sources or options changed (see the module docstring)."""
  if fmt not in FORMATS + ("coco_json",):
    raise ValueError(f"unknown source format {fmt!r} (one of {FORMATS + ('coco_json',)})")
  if fmt == "crowdhuman" and box not in CROWDHUMAN_BOXES:
    raise ConfigError(f"data.crowdhuman_box must be one of {CROWDHUMAN_BOXES}, got {box!r}")
  if fmt == "voc" and not annotations_dir:
    raise ValueError("the voc format needs annotations_dir (the Annotations folder)")
  classes = tuple(str(c) for c in classes)
  splits = {s: (os.fspath(a), os.fspath(r)) for s, (a, r) in splits.items()}
  out = {s: (os.path.join(out_dir, f"{s}.json"), r) for s, (a, r) in splits.items()}
  options = _options(fmt, splits, box, classes, train_splits, annotations_dir)
  if _up_to_date(out_dir, options, splits):
    return out
  label = name or os.path.basename(out_dir.rstrip(os.sep))

  def where(split):
    return f"dataset {label}, split {split!r}"

  missing = [a for a, _ in splits.values() if not os.path.isfile(a)]
  if missing and all(os.path.isfile(p) for p, _ in out.values()):
    logger.warning(
        "%s is gone; using the converted annotations in %s as they are", missing[0], out_dir
    )
    return out
  drop = {s for s in train_splits if classes}
  converted, ann_stats, image_stats = {}, {}, {}
  if fmt == "coco_json":
    for split, (ann, _) in splits.items():
      coco, st = builder_lib._load_coco_json(ann, where(split))  # noqa: SLF001
      ann_stats[os.path.abspath(ann)] = list(st)
      converted[split] = (
          _filter_coco(coco, classes, drop_empty=split in drop, source=ann, where=where(split))
          if classes
          else coco
      )
  else:
    parsed = {}
    for split, (ann, root) in splits.items():
      if fmt == "crowdhuman":
        parsed[split] = parse_crowdhuman(ann, box, where=where(split))
      elif fmt == "wider_face":
        parsed[split] = parse_wider_face(ann, where=where(split))
      else:
        parsed[split] = parse_voc(ann, annotations_dir, root, where=where(split))
      for p in _annotation_files(fmt, ann, annotations_dir, where(split)):
        ann_stats[os.path.abspath(p)] = _stat(p)
    if fmt == "voc":
      available = sorted({n for ims in parsed.values() for im in ims for n in im.names})
    else:
      available = ["person"] if fmt == "crowdhuman" else ["face"]
    first = next(iter(splits))
    names = _selection(available, classes, splits[first][0], where(first))
    for split, (ann, root) in splits.items():
      converted[split], image_stats[split] = _images_to_coco(
          parsed[split],
          root,
          names,
          drop_empty=split in drop,
          source=ann,
          where=where(split),
          num_threads=num_threads,
      )
  for split, coco in converted.items():
    if not coco["images"]:
      raise DataError(
          f"no images left in split {split!r} of dataset {label}"
          + (f" with data.classes={list(classes)}" if classes else "")
      )
    if _write_if_changed(out[split][0], _dump(coco)):
      logger.info("wrote %s (%d images)", out[split][0], len(coco["images"]))
  record = dict(options=options, annotation_files=ann_stats, images=image_stats)
  _write_if_changed(os.path.join(out_dir, "source.json"), _dump(record))
  return out


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------
def _suffix(classes: Sequence[str]) -> str:
  if not classes:
    return ""
  s = "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", c) for c in classes)
  if len(s) > 60:
    s = s[:40] + "_" + hashlib.sha1("\0".join(classes).encode()).hexdigest()[:10]
  return "-" + s


def build_dataset(
    fmt: str,
    name: str,
    splits: Mapping[str, SplitSpec],
    data_dir: str,
    *,
    box: str = "vbox",
    classes: Sequence[str] = (),
    train_splits: Sequence[str] = (),
    annotations_dir: Optional[str] = None,
    full_decode_check: bool = True,
    num_threads: int = 8,
):
  """Converts (:func:`convert_dataset`, into ``<data_dir>/converted/<name>``) and prepares
  ``<data_dir>/coco_json/<name>``; returns the builder."""
  out_dir = os.path.join(os.fspath(data_dir), "converted", name)
  converted = convert_dataset(
      fmt,
      splits,
      out_dir,
      box=box,
      classes=classes,
      train_splits=train_splits,
      annotations_dir=annotations_dir,
      num_threads=num_threads,
      name=name,
  )
  return builder_lib.build_coco_json_dataset(
      name,
      converted,
      data_dir,
      classes=tuple(classes),
      full_decode_check=full_decode_check,
      num_threads=num_threads,
  )


def build_coco_json(
    name: str,
    splits: Mapping[str, SplitSpec],
    data_dir: str,
    *,
    classes: Sequence[str] = (),
    train_splits: Sequence[str] = (),
):
  """``builder.build_coco_json_dataset``; with ``classes``, from filtered copies of the jsons
  (dataset ``<name>-<classes>``)."""
  if not classes:
    return builder_lib.build_coco_json_dataset(name, splits, data_dir)
  return build_dataset(
      "coco_json",
      name + _suffix(classes),
      splits,
      data_dir,
      classes=classes,
      train_splits=train_splits,
  )


def build_coco2017(
    coco_root: str, data_dir: str, *, classes: Sequence[str] = (), train_splits: Sequence[str] = ()
):
  """``builder.build_coco2017_dataset``; with ``classes``, a ``coco_json`` dataset
  ``coco2017-<classes>`` with splits train / val from filtered copies of the 2017 jsons."""
  if not classes:
    return builder_lib.build_coco2017_dataset(coco_root, data_dir)
  if not coco_root:
    raise ConfigError("data.root must name the extracted COCO folder for data.dataset='coco/2017'")
  splits = {
      s: (
          os.path.join(coco_root, "annotations", f"instances_{s}2017.json"),
          os.path.join(coco_root, f"{s}2017"),
      )
      for s in ("train", "val")
  }
  return build_coco_json("coco2017", splits, data_dir, classes=classes, train_splits=train_splits)


def image_folder_files(root: str) -> List[str]:
  """The images below ``root`` (recursive, :data:`IMAGE_EXTENSIONS`, hidden files and folders
  skipped), as sorted ``/``-separated paths relative to ``root``."""
  if not os.path.isdir(root):
    raise InputFileError(f"data.root={root!r} is not a folder (data.dataset='image_folder')")
  out = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    rel = os.path.relpath(dirpath, root)
    for f in filenames:
      if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
        out.append(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
  if not out:
    raise InputFileError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) below {root}")
  return sorted(out)


def build_image_folder(
    root: str,
    data_dir: str,
    *,
    name: str = "",
    split: str = "train",
    num_threads: int = 8,
    full_decode_check: bool = True,
):
  """An ``image_folder`` dataset (module docstring): converted into
  ``<data_dir>/converted/<name>/<split>.json`` (no annotations; remade when the file list or a
  file changed) and prepared as ``<data_dir>/coco_json/<name>``; returns the builder. ``name``
  defaults to ``images-<folder name>``."""
  if not split:
    raise ConfigError("data.train_split must be set for data.dataset='image_folder'")
  root = os.fspath(root)
  name = name or "images-" + re.sub(r"[^A-Za-z0-9_.]+", "_", Path(root).resolve().name or "root")
  out_dir = os.path.join(os.fspath(data_dir), "converted", name)
  where = f"dataset {name}, split {split!r}"
  files = image_folder_files(root)
  out = {split: (os.path.join(out_dir, f"{split}.json"), root)}
  options = dict(
      version=_VERSION,
      format="image_folder",
      root=os.path.abspath(root),
      split=split,
      files=hashlib.sha1("\0".join(files).encode()).hexdigest(),
      num_files=len(files),
  )
  if not _up_to_date(out_dir, options, out):
    images = [_image(f, k, (), (), ()) for k, f in enumerate(files, 1)]
    coco, stats = _images_to_coco(
        images,
        root,
        [UNLABELLED],
        drop_empty=False,
        source=root,
        where=where,
        num_threads=num_threads,
    )
    if _write_if_changed(out[split][0], _dump(coco)):
      logger.info("wrote %s (%d unlabelled images)", out[split][0], len(coco["images"]))
    record = dict(options=options, annotation_files={}, images={split: stats})
    _write_if_changed(os.path.join(out_dir, "source.json"), _dump(record))
  return builder_lib.build_coco_json_dataset(
      name, out, data_dir, full_decode_check=full_decode_check, num_threads=num_threads
  )


def subset_options(d) -> dict:
  """``classes`` / ``train_splits`` keyword arguments of the builders from the ``data`` config
  (images are dropped from the training split only when it is not also the evaluation split)."""
  train = (d.train_split,) if d.train_split and d.train_split != d.eval_split else ()
  return dict(classes=tuple(str(c) for c in d.classes), train_splits=train)


def resolve_path(root: str, p: str) -> str:
  """`p` relative to `root` unless empty or absolute."""
  return p if not p or os.path.isabs(p) else os.path.join(root, p)


def prepare_from_config(d, data_dir: str):
  """Builder of ``data.dataset`` in :data:`FORMATS` (files from ``data.root`` and the keys in the
  module docstring)."""
  fmt = d.dataset
  if not d.root:
    raise ConfigError(f"data.root must name the dataset folder for data.dataset={fmt!r}")
  ann_default, root_default = DEFAULT_FILES[fmt]
  splits = {}
  for split, ann in ((d.train_split, d.train_json), (d.eval_split, d.val_json)):
    if split:
      ann = (ann or ann_default).replace("{split}", split)
      image_root = (d.image_root or root_default).replace("{split}", split)
      splits[split] = (resolve_path(d.root, ann), resolve_path(d.root, image_root))
  if not splits:
    raise ConfigError("data.train_split and/or data.eval_split must be set")
  opts = subset_options(d)
  if d.name:
    name = d.name
  else:
    base = {"crowdhuman": "crowdhuman", "wider_face": "wider_face"}.get(fmt)
    base = base or (Path(d.root).resolve().name or "voc")
    if fmt == "crowdhuman":
      base += f"-{d.crowdhuman_box}"
    name = base + _suffix(opts["classes"])
  return build_dataset(
      fmt,
      name,
      splits,
      data_dir,
      box=d.crowdhuman_box,
      annotations_dir=os.path.join(d.root, "Annotations") if fmt == "voc" else None,
      **opts,
  )
