"""Annotation formats besides a COCO instances json, and class subsets of any source, converted to
COCO instances json for the builders of ``builder.py``.

A format is a :class:`SourceFormat`, declared by the dataset kind that reads it (its file under
``data/datasets/``: ``crowdhuman.py``, ``wider_face.py``, ``voc.py``, whose docstrings describe
the files): a parse function from one split's annotation file to :class:`SourceImage` records,
its default files below ``data.root`` and its categories.  :func:`prepare_from_config` reads a
format's files from the ``data`` config (``data.train_json`` / ``data.val_json`` /
``data.image_root``, relative to ``data.root``; ``{split}`` stands for the split name, and an
empty key takes the format's default); COCO json sources (format ``None``: the kinds
``coco_json``, ``coco/2017``, ``objects365``, ``synthetic``) are used as they are, unless
``data.classes`` is set.

Every source becomes a *converted* COCO json per split, which the ``coco_json`` builder
prepares like any other (array_record, same features and metadata) and which COCO evaluation
(``app.evaluate``) reads as its ground truth, since the builder records it as the split's
``annotation_file``.  Ignore regions become ``iscrowd=1`` boxes: no positives there in training
(the pipeline carries them as ``gt_crowd``, with ``gt_valid=False``), and in evaluation a
detection on them is neither a true nor a false positive (COCO crowd matching; a kind's official
metrics, ``DatasetKind.extra_metrics``, apply its own rule).

For a parsed format the image sizes are read from the image files (EXIF-oriented); boxes are
clipped to the image, boxes empty after clipping are dropped, ``area`` is the clipped box area
and image ids are those the parser gives (the 1-based record order of the annotation file).

Class subsets (``data.classes = ("person", "car")``): only those categories, in that order (label
0 = person, label 1 = car), with the source's category ids (ids 1..K in the selection order for
a parsed format); the annotations of other categories are dropped.  Images without a box of
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
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from cn2_jax import schema
from cn2_jax.data import builder as builder_lib
from cn2_jax.data import catalog
from cn2_jax.data.transforms import image_size_after_exif
from cn2_jax.errors import ConfigError, DataError, InputFileError

logger = logging.getLogger(__name__)

_VERSION = 1  # of the converted files: a change remakes them
# The "format" recorded for COCO json sources (format None); kept so that prepared data stays.
_COCO_JSON = "coco_json"
SplitSpec = Tuple[str, str]

__all__ = [
    "SourceImage",
    "SplitSource",
    "SourceFormat",
    "read_text",
    "where_suffix",
    "convert_dataset",
    "build_dataset",
    "build_coco_json",
    "prepare_from_config",
    "subset_options",
]


def where_suffix(where: str) -> str:
  """``" (<where>)"``, the context an error message ends with, or ``""``."""
  return f" ({where})" if where else ""


@dataclasses.dataclass
class SourceImage:
  """One image of a parsed source: boxes xyxy in source pixels (not yet clipped).  The arrays may
  be given as sequences (an image without boxes: ``()``)."""

  file_name: str  # relative to the split's image root
  image_id: int
  boxes: np.ndarray  # [n, 4] float64
  names: List[str]  # category name per box
  ignore: np.ndarray  # [n] bool: ignore region (-> iscrowd)

  def __post_init__(self):
    self.image_id = int(self.image_id)
    self.boxes = np.asarray(self.boxes, np.float64).reshape(-1, 4)
    self.names = list(self.names)
    self.ignore = np.asarray(self.ignore, bool).reshape(-1)


@dataclasses.dataclass(frozen=True)
class SplitSource:
  """What a format's parser reads for one split."""

  annotation_file: str
  image_root: str
  annotations_dir: str  # the per-image annotation folder ("" unless the format has one)
  box: str  # the box type ("" unless the format offers several)
  where: str  # error context: "dataset <name>, split '<split>'"


@dataclasses.dataclass(frozen=True)
class SourceFormat:
  """An annotation format that :func:`convert_dataset` turns into COCO json, declared by the
  dataset kind that reads it (``data/datasets/<kind>.py``), whose ``prepare`` hands it to
  :func:`prepare_from_config`."""

  name: str  # its dataset kind (data.dataset); recorded as the conversion's "format"
  parse: Callable[[SplitSource], List[SourceImage]]  # images in record order
  # (annotation file, image root) below data.root when data.train_json / data.val_json /
  # data.image_root is "" ("{split}": the split name).
  default_files: Tuple[str, str]
  class_names: Tuple[str, ...] = ()  # its categories; (): the sorted names of all parsed splits
  # Dataset name without data.name, before the class-subset suffix ("{box}": the box type);
  # "": data.root's folder name.
  default_name: str = ""
  box_option: str = ""  # the data.<box_option> that picks one of `boxes` ("": one box per object)
  boxes: Tuple[str, ...] = ()
  annotations_subdir: str = ""  # folder below data.root with per-image files (VOC Annotations)
  # Every annotation file a split's parse reads, recorded for the rebuild check; None: just
  # split.annotation_file.
  read_files: Optional[Callable[[SplitSource], List[str]]] = None


def read_text(path: str, what: str, where: str) -> str:
  """The text of an annotation file (UTF-8, BOM dropped); one-line errors naming ``what``."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except FileNotFoundError as e:
    raise InputFileError(f"{what} not found: {path}{where_suffix(where)}") from e
  except OSError as e:
    raise DataError(f"cannot read {what} {path}: {e.strerror or e}{where_suffix(where)}") from e
  try:
    return raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise DataError(f"{what} {path} is not UTF-8 text: {e}{where_suffix(where)}") from e


# ----------------------------------------------------------------------------------------------
# Conversion to COCO json
# ----------------------------------------------------------------------------------------------
def _stat(path: str) -> Optional[List[int]]:
  try:
    stat = os.stat(path)
  except OSError:
    return None
  return [int(stat.st_size), int(stat.st_mtime_ns)]


def _read_size(path: str, where: str) -> Tuple[int, int, List[int]]:
  """``(height, width, [size, mtime_ns])`` of an image file (EXIF-oriented, header only)."""
  try:
    with open(path, "rb") as f:
      stat = os.fstat(f.fileno())
      with Image.open(f) as img:
        h, w = image_size_after_exif(img)
  except OSError as e:  # PIL's UnidentifiedImageError is an OSError
    msg = " ".join(str(e).split())
    raise DataError(f"corrupt or unreadable image file {path}{where_suffix(where)}: {msg}") from e
  return h, w, [int(stat.st_size), int(stat.st_mtime_ns)]


def _image_sizes(paths: Sequence[str], source: str, where: str, num_threads: int):
  missing = [path for path in paths if not os.path.isfile(path)]
  if missing:
    shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
    raise DataError(
        f"{len(missing)} image file(s) listed in {source} are missing: {shown}{where_suffix(where)}"
    )
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    return list(pool.map(lambda p: _read_size(p, where), paths))


def _selection(available: Sequence[str], classes: Sequence[str], source: str, where: str):
  """Final category names: ``classes`` checked against ``available`` (else ``available``)."""
  if not classes:
    return list(available)
  cats = [{"id": i + 1, "name": name} for i, name in enumerate(available)]
  return [cat["name"] for cat in builder_lib.select_categories(cats, classes, source, where)]


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
  paths = [os.path.join(image_root, image.file_name) for image in images]
  sizes = _image_sizes(paths, source, where, num_threads)
  cat_id = {name: i + 1 for i, name in enumerate(names)}
  out_images, anns, stats = [], [], {}
  dropped = 0
  for image, (h, w, stat) in zip(images, sizes):
    stats[image.file_name] = stat
    keep = np.array([name in cat_id for name in image.names], bool)
    boxes = image.boxes[keep].copy()
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0.0, float(w))
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0.0, float(h))
    ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    dropped += int((~ok).sum())
    kept_names = [name for name, kept in zip(image.names, keep) if kept]
    ign = image.ignore[keep]
    if drop_empty and not ok.any():
      continue
    out_images.append({"id": image.image_id, "file_name": image.file_name, "height": h, "width": w})
    for j in np.nonzero(ok)[0]:
      x1, y1, x2, y2 = (float(coord) for coord in boxes[j])
      anns.append(
          {
              "id": len(anns) + 1,
              "image_id": image.image_id,
              "category_id": cat_id[kept_names[j]],
              "bbox": [x1, y1, x2 - x1, y2 - y1],
              "area": (x2 - x1) * (y2 - y1),
              "iscrowd": int(bool(ign[j])),
          }
      )
  if dropped:
    logger.info("%s: dropped %d boxes empty after clipping to the image", where or source, dropped)
  cats = [{"id": i + 1, "name": name, "supercategory": ""} for i, name in enumerate(names)]
  return {"images": out_images, "annotations": anns, "categories": cats}, stats


def _filter_coco(coco: dict, classes, *, drop_empty: bool, source: str, where: str) -> dict:
  """A COCO dict restricted to ``classes`` (categories listed in that order, ids kept)."""
  cats = builder_lib._categories_of(coco, source, where)  # noqa: SLF001 - same package
  by_id = {cat["id"]: cat for cat in coco["categories"] if "id" in cat}
  sel = builder_lib.select_categories(cats, classes, source, where)
  ids = {cat["id"] for cat in sel}
  anns = []
  try:
    for ann in coco["annotations"]:
      if int(ann["category_id"]) in ids:
        anns.append({key: value for key, value in ann.items() if key != "segmentation"})
    images = coco["images"]
    if drop_empty:
      have = {int(ann["image_id"]) for ann in anns}
      images = [image for image in images if int(image["id"]) in have]
  except (KeyError, TypeError, ValueError) as e:
    raise DataError(
        f"annotation file {source}: bad entry ({type(e).__name__}: {e}){where_suffix(where)}"
    )
  categories = [dict(by_id.get(cat["id"], cat)) for cat in sel]
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


def _options(fmt, splits, box, classes, train_splits, annotations_dir) -> dict:
  return json.loads(
      json.dumps(
          dict(
              version=_VERSION,
              format=fmt.name if fmt else _COCO_JSON,
              box=box if fmt and fmt.boxes else "",
              classes=list(classes),
              drop_empty_splits=sorted(
                  split for split in train_splits if split in splits and classes
              ),
              annotations_dir=os.path.abspath(annotations_dir) if annotations_dir else "",
              splits={
                  split: [os.path.abspath(ann_file), os.path.abspath(image_root)]
                  for split, (ann_file, image_root) in sorted(splits.items())
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
  if any(not os.path.isfile(os.path.join(out_dir, f"{split}.json")) for split in splits):
    return False
  gone = 0
  for path, stat in (rec.get("annotation_files") or {}).items():
    now = _stat(path)
    if now is None:
      gone += 1
    elif now != stat:
      return False
  for split, files in (rec.get("images") or {}).items():
    root = splits[split][1]
    for name, stat in files.items():
      now = _stat(os.path.join(root, name))
      if now is None:
        gone += 1
      elif now != stat:
        return False
  if gone:
    logger.warning(
        "%d source file(s) of %s are gone; using the converted annotations as they are",
        gone,
        out_dir,
    )
  return True


def split_files(
    splits: Mapping[str, SplitSpec], out_dir: str
) -> Tuple[Dict[str, SplitSpec], Dict[str, SplitSpec]]:
  """``({split: (annotation file, image root)}`` as strings, ``{split: (out_dir/<split>.json,
  image root)})``: a conversion's sources and the files it writes."""
  splits = {
      split: (os.fspath(ann_file), os.fspath(image_root))
      for split, (ann_file, image_root) in splits.items()
  }
  out = {
      split: (os.path.join(out_dir, f"{split}.json"), image_root)
      for split, (_, image_root) in splits.items()
  }
  return splits, out


def convert_dataset(
    fmt: Optional[SourceFormat],
    splits: Mapping[str, SplitSpec],
    out_dir: str,
    *,
    box: str = "",
    classes: Sequence[str] = (),
    train_splits: Sequence[str] = (),
    annotations_dir: Optional[str] = None,
    num_threads: int = 8,
    name: str = "",
) -> Dict[str, SplitSpec]:
  """Converts ``{split: (annotation file, image root)}`` of format ``fmt`` (``None``: COCO
  instances jsons) to ``out_dir/<split>.json``; returns ``{split: (converted json, image
  root)}`` for :func:`builder.build_coco_json_dataset`.

  ``box``: one of ``fmt.boxes`` ("" = the first); ``classes``: class subset (names, in label
  order); ``train_splits``: splits from which images without a box of ``classes`` are dropped
  (only with ``classes``); ``annotations_dir``: the per-image annotation folder of a format with
  ``annotations_subdir``.  Remade only when the sources or options changed (see the module
  docstring)."""
  if fmt and fmt.boxes:
    box = box or fmt.boxes[0]
    if box not in fmt.boxes:
      raise ConfigError(f"data.{fmt.box_option} must be one of {fmt.boxes}, got {box!r}")
  if fmt and fmt.annotations_subdir and not annotations_dir:
    raise ValueError(
        f"the {fmt.name} format needs annotations_dir (the {fmt.annotations_subdir} folder)"
    )
  classes = tuple(str(class_name) for class_name in classes)
  splits, out = split_files(splits, out_dir)
  options = _options(fmt, splits, box, classes, train_splits, annotations_dir)
  if _up_to_date(out_dir, options, splits):
    return out
  label = name or os.path.basename(out_dir.rstrip(os.sep))

  def where(split):
    return f"dataset {label}, split {split!r}"

  missing = [ann_file for ann_file, _ in splits.values() if not os.path.isfile(ann_file)]
  if missing and all(os.path.isfile(path) for path, _ in out.values()):
    logger.warning(
        "%s is gone; using the converted annotations in %s as they are", missing[0], out_dir
    )
    return out
  drop = {split for split in train_splits if classes}
  converted, ann_stats, image_stats = {}, {}, {}
  if fmt is None:
    for split, (ann, _) in splits.items():
      coco, stat = builder_lib._load_coco_json(ann, where(split))  # noqa: SLF001
      ann_stats[os.path.abspath(ann)] = list(stat)
      converted[split] = (
          _filter_coco(coco, classes, drop_empty=split in drop, source=ann, where=where(split))
          if classes
          else coco
      )
  else:
    parsed = {}
    for split, (ann, root) in splits.items():
      source = SplitSource(ann, root, annotations_dir or "", box if fmt.boxes else "", where(split))
      parsed[split] = fmt.parse(source)
      for path in fmt.read_files(source) if fmt.read_files else [ann]:
        ann_stats[os.path.abspath(path)] = _stat(path)
    available = list(fmt.class_names) or sorted(
        {name for ims in parsed.values() for image in ims for name in image.names}
    )
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
  slug = "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", class_name) for class_name in classes)
  if len(slug) > 60:
    slug = slug[:40] + "_" + hashlib.sha1("\0".join(classes).encode()).hexdigest()[:10]
  return "-" + slug


def build_dataset(
    fmt: Optional[SourceFormat],
    name: str,
    splits: Mapping[str, SplitSpec],
    data_dir: str,
    *,
    box: str = "",
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
      None,
      name + _suffix(classes),
      splits,
      data_dir,
      classes=classes,
      train_splits=train_splits,
  )


def subset_options(d) -> dict:
  """``classes`` / ``train_splits`` keyword arguments of the builders from the ``data`` config
  (images are dropped from the training split only when it is not also the evaluation split)."""
  train = (d.train_split,) if d.train_split and d.train_split != d.eval_split else ()
  return dict(classes=tuple(str(name) for name in d.classes), train_splits=train)


def resolve_path(root: str, p: str) -> str:
  """`p` relative to `root` unless empty or absolute."""
  return p if not p or os.path.isabs(p) else os.path.join(root, p)


def prepare_from_config(d, data_dir: str, fmt: SourceFormat):
  """Builder of a dataset of format ``fmt`` from the ``data`` config ``d`` (files from
  ``data.root`` and the keys in the module docstring)."""
  if not d.root:
    raise ConfigError(f"data.root must name the dataset folder for data.dataset={fmt.name!r}")
  ann_default, root_default = fmt.default_files
  splits = {}
  for split, ann in ((d.train_split, d.train_json), (d.eval_split, d.val_json)):
    if split:
      ann = (ann or ann_default).replace("{split}", split)
      image_root = (d.image_root or root_default).replace("{split}", split)
      splits[split] = (resolve_path(d.root, ann), resolve_path(d.root, image_root))
  if not splits:
    raise ConfigError("data.train_split and/or data.eval_split must be set")
  opts = subset_options(d)
  box = getattr(d, fmt.box_option) if fmt.box_option else ""
  if d.name:
    name = d.name
  elif fmt.default_name:
    name = fmt.default_name.format(box=box) + _suffix(opts["classes"])
  else:
    name = (Path(d.root).resolve().name or fmt.name) + _suffix(opts["classes"])
  subdir = fmt.annotations_subdir
  annotations_dir = os.path.join(d.root, subdir) if subdir else None
  return build_dataset(
      fmt, name, splits, data_dir, box=box, annotations_dir=annotations_dir, **opts
  )


def _validate_source(cfg) -> None:
  catalog.get(cfg.data.dataset)  # a ConfigError naming the registered kinds
  classes = cfg.data.classes
  if (
      isinstance(classes, str)
      or not all(isinstance(name, str) and name and "," not in name for name in classes)
      or len(set(classes)) != len(tuple(classes))
  ):
    raise ConfigError(
        f"data.classes must be a tuple of distinct class names, e.g. "
        f"--config.data.classes=\"('person', 'car')\", got {classes!r}"
    )


CONFIG = schema.group(
    "data",
    "The dataset: its kind, files and splits. Formats other than COCO json (crowdhuman, "
    "wider_face, voc) are converted to COCO json first (this module).",
    schema.Field(
        "dataset",
        "coco/2017",
        "a registered kind (data/datasets/): coco/2017, coco_json, lvis_v1, objects365, "
        "synthetic, crowdhuman (.odgt), wider_face (wider_face_*_bbx_gt.txt), voc (VOC XML "
        "folder), image_folder (every image below data.root, no annotations, training only: "
        "woGT KD; set data.eval_split='')",
    ),
    schema.Field(
        "name", "", "tfds dataset name (default derived from the dataset, its box type and classes)"
    ),
    schema.Field("root", "", "COCO root (coco/2017) or dataset folder (all others)"),
    schema.Field(
        "train_json",
        "",
        "train split annotation file, relative to root or absolute; '' = the format's default: "
        "coco_json: the instances json; crowdhuman / wider_face / voc ('{split}' = the split "
        "name): annotation_{split}.odgt, wider_face_split/wider_face_{split}_bbx_gt.txt, "
        "ImageSets/Main/{split}.txt (image id list)",
    ),
    schema.Field("val_json", "", "annotation file of the eval split (as train_json)"),
    schema.Field(
        "image_root",
        "",
        "image folder, relative to root; '' = the format's default: coco_json: root; "
        "crowdhuman: Images; wider_face: WIDER_{split}/images; voc: JPEGImages (its xml files: "
        "always root/Annotations)",
    ),
    schema.Field("data_dir", "", "where prepared array_record files go (default <workdir>/tfds)"),
    schema.Field("train_split", "train", "the split trained on"),
    schema.Field("eval_split", "val", "the split evaluated ('' = none)"),
    schema.Field(
        "classes",
        (),
        "class subset of any dataset: category names kept, in label order, e.g. ('person', "
        "'car'); () = every class. Training drops images without them, evaluation keeps every "
        "image",
    ),
    validate=_validate_source,
)
