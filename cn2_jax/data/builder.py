"""tensorflow-datasets builders for COCO-format detection data (array_record; no TensorFlow needed).

Two builders share one feature layout:

* ``coco_json/<name>`` (:class:`CocoJsonBuilder`): any COCO ``instances.json`` + image folder per
  split, configured with :class:`CocoJsonConfig` (see :func:`build_coco_json_dataset`).
* ``coco/2017`` (:class:`Coco`): the standard extracted COCO 2017 tree
  ``ROOT/annotations/instances_{train,val}2017.json`` + ``ROOT/{train,val}2017/`` (no download; see
  :func:`build_coco2017_dataset`).  This is our own builder (tfds's built-in ``coco`` needs
  TensorFlow); it writes to ``<data_dir>/coco/2017/2.0.0`` and has splits ``train`` and ``val``.

Both write ``array_record`` files and are read with ``builder.as_data_source(split)`` (random
access, works with grain); :func:`load_builder` reopens a prepared dataset from its folder without
the source files.  Examples are stored in annotation-file order (images sorted by id;
``disable_shuffling``), so data-source index ``i`` is the i-th image of the split.

Features of one example::

    image            bytes    the encoded file exactly as on disk (JPEG/PNG/..., any mode: gray,
                              CMYK, palette ...). Decode with ``transforms.decode_image`` (EXIF
                              transpose + RGB)
    image/id         int64    COCO image id
    image/filename   text     ``file_name`` from the json (relative to the image root)
    image/height     int32    original height (after EXIF orientation, = json height)
    image/width      int32
    objects/bbox     float32 [k, 4]  (x1, y1, x2, y2) absolute pixels of the original image,
                              clipped to the image; boxes with w <= 0 or h <= 0 after clipping are
                              dropped at build time (counted in the metadata)
    objects/label    int64 [k]  contiguous 0..C-1 (categories sorted by COCO id, or in the order
                              of the builder's ``classes`` selection, see below)
    objects/is_crowd bool [k]
    objects/area     float32 [k]  COCO ``area`` (segment area), as in the json
    objects/id       int64 [k]  COCO annotation id

Metadata (``builder.info.metadata``, also ``<dataset dir>/metadata.json``)::

    format, bbox_format='xyxy_abs', label_order ('sorted_category_id' or 'classes'),
    classes: [names]                                   # the selection, [] = every category
    categories: [{'id', 'name', 'supercategory'}...]  # label i <-> categories[i]
    splits: {split: {annotation_file, image_root, annotation_size, annotation_mtime_ns,
                     num_images, num_boxes, num_crowd, num_degenerate_dropped, num_empty,
                     image_id[], height[], width[], num_instances[],   # per example, source order
                     file_name[], file_size[], file_mtime_ns[]}}       # the source image files

(``num_instances`` counts non-crowd boxes, so a pipeline can drop empty images without reading
them.)

Class subsets.  ``classes=('person', 'car')`` (``CocoJsonConfig.classes``) keeps the categories of
those names, in that order (label 0 = person, label 1 = car, original category ids kept), and drops
the annotations of every other category; an unknown name is a one-line :class:`DataError` naming
the available ones.  (``cn2_jax/data/sources.py`` also writes filtered annotation files, so that
COCO evaluation sees only the selected categories, and drops training images without them.)

Checks.  Preparation fails with a one-line :class:`cn2_jax.errors.DataError` (a ``ValueError``)
naming the file, the annotation json and the dataset for: an annotation file that is missing,
empty, not JSON, not a COCO object or lacks keys; a missing image file; an image that does not
fully decode (every image is decoded once, so a truncated file cannot reach training).

Rebuilds.  tfds reuses a prepared folder as is, so the builder functions compare it with its
sources first and delete and rebuild it when a split's annotation json or image root differs, a
requested split is absent, or the size or mtime of the json or of any image changed (or the folder
predates these records).  Sources that no longer exist are not a change: the prepared copy is used
(with a warning), so the raw files may be removed after preparation.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import importlib.util
import io
import json
import logging
import os
import resource
import shutil
import types
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle as tfds_shuffle
from tqdm import tqdm

from cn2_jax.data.transforms import image_size_after_exif
from cn2_jax.errors import DataError, InputFileError

logger = logging.getLogger(__name__)

FORMAT = "cn2_jax.coco_detection.v1"
SplitSpec = Tuple[str, str]  # (annotation json path, image root)

__all__ = [
    "CocoJsonConfig",
    "CocoJsonBuilder",
    "Coco",
    "build_coco_json_dataset",
    "build_coco2017_dataset",
    "load_builder",
    "parse_coco_split",
    "prepared_data_hint",
    "select_categories",
]


# ----------------------------------------------------------------------------------------------
# Annotation parsing (pure python / numpy; used by the builders)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ParsedSplit:
  categories: List[dict]
  records: List[dict]  # one per image, sorted by image id
  stats: Dict[str, int]
  annotation_stat: Tuple[int, int] = (0, 0)  # (size, mtime_ns) of the json that was read


def finalize_record(rec: dict, h: int, w: int) -> Tuple[dict, int]:
  """Clips the record's boxes to the (h, w) image and drops degenerate ones (w <= 0 or h <= 0).

  Returns ``(objects, num_dropped)`` with float32 xyxy boxes and the matching labels etc.
  """
  xyxy = rec["bbox"].copy()
  xyxy[:, 0::2] = np.clip(xyxy[:, 0::2], 0, float(w))
  xyxy[:, 1::2] = np.clip(xyxy[:, 1::2], 0, float(h))
  xyxy = xyxy.astype(np.float32)
  keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
  objects = {
      "bbox": xyxy[keep].reshape(-1, 4),
      "label": rec["label"][keep],
      "is_crowd": rec["is_crowd"][keep],
      "area": rec["area"][keep],
      "id": rec["ann_id"][keep],
  }
  return objects, int((~keep).sum())


def _in(where: str) -> str:
  return f" ({where})" if where else ""


def _categories_of(coco: dict, path: str, where: str = "") -> List[dict]:
  cats = coco["categories"]
  if not isinstance(cats, list) or not cats:
    raise DataError(f"annotation file {path}: 'categories' is empty or not a list{_in(where)}")
  try:
    cats = sorted(cats, key=lambda c: int(c["id"]))
  except (KeyError, TypeError, ValueError) as e:
    raise DataError(
        f"annotation file {path}: a category has no integer 'id' "
        f"({type(e).__name__}: {e}){_in(where)}"
    ) from e
  ids = [int(cat["id"]) for cat in cats]
  if len(set(ids)) != len(ids):
    raise DataError(f"annotation file {path}: duplicate category ids {ids}{_in(where)}")
  return [
      {
          "id": int(cat["id"]),
          "name": str(cat.get("name", cat["id"])),
          "supercategory": str(cat.get("supercategory", "")),
      }
      for cat in cats
  ]


_REQUIRED_KEYS = ("images", "annotations", "categories")


def _load_coco_json(path: str, where: str = "") -> Tuple[dict, Tuple[int, int]]:
  """The parsed json object and the file's (size, mtime_ns); one-line errors naming the file."""
  try:
    with open(path, "rb") as f:
      stat = os.fstat(f.fileno())
      raw = f.read()
  except FileNotFoundError as e:
    raise InputFileError(f"annotation file not found: {path}{_in(where)}") from e
  except OSError as e:
    raise DataError(f"cannot read annotation file {path}: {e.strerror or e}{_in(where)}") from e
  if not raw.strip():
    raise DataError(f"annotation file {path} is empty{_in(where)}")
  try:
    coco = json.loads(raw)
  except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
    raise DataError(f"annotation file {path} is not valid JSON: {e}{_in(where)}") from e
  if not isinstance(coco, dict):
    raise DataError(
        f"annotation file {path} holds a JSON {type(coco).__name__}, not a COCO "
        f"object with keys {list(_REQUIRED_KEYS)}{_in(where)}"
    )
  missing = [key for key in _REQUIRED_KEYS if key not in coco]
  if missing:
    raise DataError(
        f"annotation file {path} lacks the COCO key(s) {missing} (has "
        f"{sorted(coco)[:8]}){_in(where)}"
    )
  for key in ("images", "annotations"):
    if not isinstance(coco[key], list):
      raise DataError(
          f"annotation file {path}: '{key}' is a {type(coco[key]).__name__}, not a "
          f"list{_in(where)}"
      )
  return coco, (int(stat.st_size), int(stat.st_mtime_ns))


def select_categories(
    categories: Sequence[dict], classes: Sequence[str], source: str, where: str = ""
) -> List[dict]:
  """The categories named by ``classes``, in that order; an unknown, repeated or ambiguous name is
  a one-line :class:`DataError` naming it and the available names."""
  names = [str(cat["name"]) for cat in categories]
  out = []
  for name in classes:
    name = str(name)
    hits = [cat for cat in categories if str(cat["name"]) == name]
    if not hits:
      raise DataError(
          f"unknown class {name!r} in data.classes: {source} has the classes {names}{_in(where)}"
      )
    if len(hits) > 1:
      raise DataError(
          f"class {name!r} of data.classes names {len(hits)} categories of {source} (ids "
          f"{[int(cat['id']) for cat in hits]}){_in(where)}"
      )
    if any(cat is hits[0] for cat in out):
      raise DataError(f"class {name!r} is listed twice in data.classes{_in(where)}")
    out.append(hits[0])
  return out


def parse_coco_split(
    annotation_file: str, image_root: str, *, where: str = "", classes: Sequence[str] = ()
) -> ParsedSplit:
  """Reads a COCO instances json into per-image records (images sorted by id, boxes as xyxy,
  labels contiguous by sorted category id). Clipping / degenerate filtering: finalize_record.

  ``classes`` (names): keep only these categories, labelled in this order (see
  :func:`select_categories`); annotations of the others are dropped.

  Malformed files or entries raise :class:`DataError` naming the file (and ``where``, e.g. the
  dataset and split)."""
  coco, ann_stat = _load_coco_json(annotation_file, where)
  categories = _categories_of(coco, annotation_file, where)
  known_ids = {cat["id"] for cat in categories}
  if classes:
    categories = select_categories(categories, classes, annotation_file, where)
  cat_to_label = {cat["id"]: i for i, cat in enumerate(categories)}
  entry = "images[?]"
  try:
    for i, image in enumerate(coco["images"]):
      entry = f"images[{i}]"
      image["id"], image["file_name"]  # noqa: B018 - KeyError names the missing key
    images = sorted(coco["images"], key=lambda im: int(im["id"]))
    by_image: Dict[int, List[dict]] = {int(image["id"]): [] for image in images}
    if len(by_image) != len(images):
      raise DataError(f"annotation file {annotation_file}: duplicate image ids" f"{_in(where)}")
    for i, ann in enumerate(coco["annotations"]):
      entry = f"annotations[{i}]"
      iid = int(ann["image_id"])
      if iid not in by_image:
        raise DataError(
            f"annotation file {annotation_file}: annotation {ann.get('id')} "
            f"refers to unknown image_id {iid}{_in(where)}"
        )
      if int(ann["category_id"]) not in known_ids:
        raise DataError(
            f"annotation file {annotation_file}: annotation {ann.get('id')} "
            f"has unknown category_id {ann['category_id']}{_in(where)}"
        )
      if len(ann["bbox"]) != 4:
        raise ValueError(f"bbox {ann['bbox']} is not [x, y, w, h]")
      if int(ann["category_id"]) in cat_to_label:
        by_image[iid].append(ann)
  except DataError:
    raise
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    what = f"lacks key {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
    raise DataError(f"annotation file {annotation_file}: {entry} {what}{_in(where)}") from e

  records = []
  for image in images:
    iid = int(image["id"])
    h, w = image.get("height"), image.get("width")
    anns = by_image[iid]
    boxes = np.array([ann["bbox"] for ann in anns], np.float64).reshape(-1, 4)
    xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
    records.append(
        {
            "image/id": iid,
            "file_name": str(image["file_name"]),
            "path": os.path.join(image_root, str(image["file_name"])),
            "height": None if h is None else int(h),
            "width": None if w is None else int(w),
            "bbox": xyxy,  # float64, not yet clipped (see finalize_record)
            "label": np.array([cat_to_label[int(ann["category_id"])] for ann in anns], np.int64),
            "is_crowd": np.array([bool(ann.get("iscrowd", 0)) for ann in anns], bool),
            "area": np.array([float(ann.get("area", 0.0)) for ann in anns], np.float32),
            "ann_id": np.array([int(ann.get("id", -1)) for ann in anns], np.int64),
        }
    )
  stats = dict(
      num_images=len(images),
      num_annotations=sum(len(image_anns) for image_anns in by_image.values()),
  )
  # (num_annotations counts those of the selected classes)
  return ParsedSplit(categories=categories, records=records, stats=stats, annotation_stat=ann_stat)


def _check_files_exist(records: Sequence[dict], annotation_file: str, where: str = "") -> None:
  missing = [record["path"] for record in records if not os.path.isfile(record["path"])]
  if missing:
    shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
    raise DataError(
        f"{len(missing)} image file(s) listed in {annotation_file} are missing: "
        f"{shown}{_in(where)}"
    )


def _read_and_check_image(
    rec: dict, full_decode: bool, annotation_file: str = "", where: str = ""
) -> Tuple[bytes, int, int, int, int]:
  """Reads the file bytes; PIL open + verify and (by default) a full decode; returns
  ``(bytes, height, width, file_size, file_mtime_ns)`` (height/width EXIF-oriented).

  Raises :class:`DataError` naming the file, the annotation json and ``where``."""
  path = rec["path"]
  listed = f"listed in {annotation_file}; " if annotation_file else ""
  context = f" ({listed}{where})" if (listed or where) else ""
  try:
    with open(path, "rb") as f:
      stat = os.fstat(f.fileno())
      data = f.read()
  except OSError as e:
    raise DataError(f"cannot read image file {path}: {e.strerror or e}{context}") from e
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.verify()
    with Image.open(io.BytesIO(data)) as img:
      h, w = image_size_after_exif(img)
      if full_decode:
        # verify() does not decode JPEG data: a truncated file would only fail at the
        # first training batch, after the compile.
        img.load()
  except Exception as e:  # noqa: BLE001
    msg = " ".join(str(e).split())
    raise DataError(
        f"corrupt or unreadable image file {path}{context}: " f"{type(e).__name__}: {msg}"
    ) from e
  if rec["height"] is not None and (rec["height"], rec["width"]) != (h, w):
    raise DataError(
        f"image file {path} has size {h}x{w} (h x w, after EXIF orientation) but the "
        f"annotation says {rec['height']}x{rec['width']}{context}"
    )
  return data, h, w, int(stat.st_size), int(stat.st_mtime_ns)


# ----------------------------------------------------------------------------------------------
# TF-free shuffler spill (tfds's Shuffler spills to disk via tf.io.gfile above 1 GB of data)
# ----------------------------------------------------------------------------------------------
class _ResourceExhaustedError(Exception):

  def __init__(self, message: str):
    super().__init__(message)
    self.message = message


class _LazyFile:
  """Minimal ``tf.io.gfile.GFile`` stand-in: opens on first use (like GFile)."""

  def __init__(self, path, mode="r"):
    self._path, self._mode, self._f = os.fspath(path), mode, None

  def _file(self):
    if self._f is None:
      try:
        self._f = open(self._path, self._mode)
      except OSError as e:
        if e.errno == 24:  # EMFILE
          raise _ResourceExhaustedError("Too many open files") from e
        raise
    return self._f

  def write(self, data):
    return self._file().write(data)

  def read(self, n=-1):
    return self._file().read(n)

  def flush(self):
    if self._f is not None:
      self._f.flush()

  def close(self):
    if self._f is not None:
      self._f.close()
      self._f = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


_TF_SHIM = types.SimpleNamespace(
    io=types.SimpleNamespace(
        gfile=types.SimpleNamespace(
            GFile=_LazyFile,
            exists=lambda p: os.path.exists(os.fspath(p)),
            remove=lambda p: os.remove(os.fspath(p)),
        )
    ),
    errors=types.SimpleNamespace(ResourceExhaustedError=_ResourceExhaustedError),
)


@contextlib.contextmanager
def _tf_free_shuffler():
  """Without TensorFlow, lets tfds's Shuffler spill splits > 1 GB to its temporary buckets."""
  if importlib.util.find_spec("tensorflow") is not None:
    yield
    return
  old = tfds_shuffle.tf
  tfds_shuffle.tf = _TF_SHIM
  # 1000 bucket files are open at once; raise the soft limit like tfds does on EMFILE.
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
  try:
    if soft != resource.RLIM_INFINITY and soft < 4096:
      new = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
      resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
  except (ValueError, OSError):
    pass
  try:
    yield
  finally:
    tfds_shuffle.tf = old


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class CocoJsonConfig(tfds.core.BuilderConfig):
  """``splits``: ``{split_name: (instances_json, image_root)}``."""

  splits: Mapping[str, SplitSpec] = dataclasses.field(default_factory=dict)
  # Decode every image at build time (about 1.5 ms per COCO image): without it a truncated JPEG
  # passes PIL's verify() and fails only in training.
  full_decode_check: bool = True
  num_threads: int = 8  # file reading / verification threads
  # Class subset: category names, in label order (() = every category, sorted by id).
  classes: Tuple[str, ...] = ()


def _features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict(
      {
          "image": tfds.features.Tensor(shape=(), dtype=np.object_),
          "image/id": tfds.features.Scalar(dtype=np.int64),
          "image/filename": tfds.features.Text(),
          "image/height": tfds.features.Scalar(dtype=np.int32),
          "image/width": tfds.features.Scalar(dtype=np.int32),
          "objects": tfds.features.FeaturesDict(
              {
                  "bbox": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
                  "label": tfds.features.Tensor(shape=(None,), dtype=np.int64),
                  "is_crowd": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
                  "area": tfds.features.Tensor(shape=(None,), dtype=np.float32),
                  "id": tfds.features.Tensor(shape=(None,), dtype=np.int64),
              }
          ),
      }
  )


class CocoJsonBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """COCO-format detection data from per-split (instances json, image root) pairs."""

  name = "coco_json"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "cn2_jax layout: raw image bytes, xyxy absolute boxes."}
  BUILDER_CONFIG_CLASS = CocoJsonConfig
  # tfds derives checksum/metadata paths from the code location through `importlib_resources`,
  # which tfds does not install; nothing is downloaded here, so there is no code path to use.
  code_path = None

  def _split_specs(self) -> Dict[str, SplitSpec]:
    specs = dict(getattr(self.builder_config, "splits", {}) or {})
    if not specs:
      raise ValueError(f"{self.name}: no splits configured " "(need {split: (json, image_root)})")
    return {split: (os.fspath(spec[0]), os.fspath(spec[1])) for split, spec in specs.items()}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="COCO-format object detection (cn2_jax layout, see "
        "cn2_jax/data/builder.py).",
        features=_features(),
        disable_shuffling=True,  # keep annotation-file order: source index i = i-th image
        metadata=tfds.core.MetadataDict(),
    )

  def _dataset_label(self) -> str:
    return f"{self.name}/{self.builder_config.name}"

  def _where(self, split: str) -> str:
    return f"dataset {self._dataset_label()}, split {split!r}"

  def _split_generators(self, dl_manager):
    del dl_manager
    specs = self._split_specs()
    categories = None
    generators = {}
    self._meta_splits = {}
    classes = self._classes()
    for split, (ann_file, image_root) in specs.items():
      where = self._where(split)
      parsed = parse_coco_split(ann_file, image_root, where=where, classes=classes)
      if categories is None:
        categories = parsed.categories
      elif [(cat["id"], cat["name"]) for cat in categories] != [
          (cat["id"], cat["name"]) for cat in parsed.categories
      ]:
        raise DataError(
            f"split {split!r}: categories in {ann_file} differ from those of "
            f"the other splits ({where})"
        )
      if not parsed.records:
        raise DataError(f"annotation file {ann_file} has no images ({where})")
      _check_files_exist(parsed.records, ann_file, where)
      size, mtime_ns = parsed.annotation_stat
      self._meta_splits[split] = dict(
          annotation_file=os.path.abspath(ann_file),
          image_root=os.path.abspath(image_root),
          annotation_size=size,
          annotation_mtime_ns=mtime_ns,
      )
      generators[split] = self._generate_examples(parsed.records, split, os.path.abspath(ann_file))
    self.info.metadata.update(
        format=FORMAT,
        bbox_format="xyxy_abs",
        label_order="classes" if classes else "sorted_category_id",
        classes=list(classes),
        categories=categories,
        splits=self._meta_splits,
    )
    return generators

  def _full_decode_check(self) -> bool:
    return bool(getattr(self.builder_config, "full_decode_check", True))

  def _classes(self) -> Tuple[str, ...]:
    return tuple(str(name) for name in (getattr(self.builder_config, "classes", ()) or ()))

  def _generate_examples(
      self, records: List[dict], split: str, annotation_file: str = ""
  ) -> Iterator[Tuple[int, dict]]:
    full = self._full_decode_check()
    where = self._where(split)
    threads = max(1, int(getattr(self.builder_config, "num_threads", 8)))
    num_records = len(records)
    # disable_shuffling keeps key order; spread the keys over tfds's 128-bit key space so that
    # its on-disk buckets (> 1 GB splits) each hold a slice of the data.
    key_step = (2**128 - 1) // max(num_records, 1)
    cols = {
        column: []
        for column in (
            "image_id",
            "height",
            "width",
            "num_instances",
            "file_name",
            "file_size",
            "file_mtime_ns",
        )
    }
    stats = dict(
        num_images=num_records, num_boxes=0, num_crowd=0, num_degenerate_dropped=0, num_empty=0
    )

    def read(rec):
      return _read_and_check_image(rec, full, annotation_file, where)

    # tfds' own bars are off by default (cn2_jax.logging_setup); this one is hidden off a tty.
    bar = tqdm(
        total=num_records,
        desc=f"prepare {split}",
        unit="img",
        leave=False,
        disable=None,
        dynamic_ncols=True,
    )
    with bar, concurrent.futures.ThreadPoolExecutor(threads) as pool:
      chunk = 4 * threads
      for start in range(0, num_records, chunk):
        part = records[start : start + chunk]
        for i, (rec, (data, h, w, size, mtime_ns)) in enumerate(
            zip(part, pool.map(read, part)), start=start
        ):
          objects, dropped = finalize_record(rec, h, w)
          n_inst = int((~objects["is_crowd"]).sum())
          stats["num_boxes"] += len(objects["label"])
          stats["num_crowd"] += int(objects["is_crowd"].sum())
          stats["num_degenerate_dropped"] += dropped
          stats["num_empty"] += int(n_inst == 0)
          cols["image_id"].append(rec["image/id"])
          cols["height"].append(h)
          cols["width"].append(w)
          cols["num_instances"].append(n_inst)
          cols["file_name"].append(rec["file_name"])
          cols["file_size"].append(size)
          cols["file_mtime_ns"].append(mtime_ns)
          yield i * key_step, {
              "image": data,
              "image/id": rec["image/id"],
              "image/filename": rec["file_name"],
              "image/height": h,
              "image/width": w,
              "objects": objects,
          }
        bar.update(len(part))
    logger.info(
        "split %s: %d images, %d boxes (%d crowd), %d without non-crowd boxes; "
        "dropped %d degenerate boxes",
        split,
        stats["num_images"],
        stats["num_boxes"],
        stats["num_crowd"],
        stats["num_empty"],
        stats["num_degenerate_dropped"],
    )
    if stats["num_degenerate_dropped"]:
      logger.warning(
          "split %s: dropped %d degenerate boxes (w <= 0 or h <= 0 after clipping " "to the image)",
          split,
          stats["num_degenerate_dropped"],
      )
    self._meta_splits[split].update(stats, **cols)

  # tfds prints "Downloading and preparing dataset Unknown size (download: Unknown size ...)"
  # and a "downloaded" line to stdout; nothing is downloaded here, so say what happens instead.
  def _log_download_bytes(self) -> None:
    logger.info(
        "preparing dataset %s in %s (reading and decoding every image once)",
        self._dataset_label(),
        self.data_dir,
    )

  def _log_download_done(self) -> None:
    logger.info("prepared dataset %s in %s", self._dataset_label(), self.data_dir)

  def download_and_prepare(self, *args, **kwargs):  # noqa: D102 - same as tfds
    kwargs.setdefault("file_format", "array_record")
    with _tf_free_shuffler():
      return super().download_and_prepare(*args, **kwargs)


@dataclasses.dataclass(eq=False)
class CocoConfig(CocoJsonConfig):
  year: str = "2017"


class Coco(CocoJsonBuilder, skip_registration=True):
  """COCO 2017 detection from an extracted tree: ``Coco(coco_root=ROOT, data_dir=...)``.

  ``coco_root`` must contain ``annotations/instances_{train,val}2017.json`` and the image folders
  ``train2017/`` and ``val2017/`` (only the splits in ``splits`` are needed).
  """

  name = "coco"
  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "2.0.0": "cn2_jax layout (differs from tfds's built-in coco 1.x): raw image "
      "bytes, xyxy absolute boxes, splits train/val."
  }
  BUILDER_CONFIGS = [CocoConfig(name="2017", description="COCO 2017 instances (boxes)")]

  def __init__(
      self,
      *,
      coco_root: Optional[str] = None,
      splits: Sequence[str] = ("train", "val"),
      full_decode_check: bool = True,
      **kwargs,
  ):
    self._coco_root = coco_root
    self._wanted_splits = tuple(splits)
    self._full_decode = full_decode_check
    super().__init__(**kwargs)

  def _full_decode_check(self) -> bool:
    return self._full_decode

  def _split_specs(self, check: bool = True) -> Dict[str, SplitSpec]:
    if self._coco_root is None:
      raise ValueError("Coco builder: pass coco_root=<extracted COCO folder> to prepare it")
    year = self.builder_config.year
    specs = {}
    for split in self._wanted_splits:
      src = {"train": "train", "val": "val"}.get(split)
      if src is None:
        raise ValueError(f"unknown COCO split {split!r} (use 'train' and/or 'val')")
      ann = os.path.join(self._coco_root, "annotations", f"instances_{src}{year}.json")
      root = os.path.join(self._coco_root, f"{src}{year}")
      if check and not os.path.isfile(ann):
        raise InputFileError(f"COCO annotation file not found: {ann} " f"({self._where(split)})")
      specs[split] = (ann, root)
    return specs


# ----------------------------------------------------------------------------------------------
# Convenience functions
# ----------------------------------------------------------------------------------------------
def build_coco_json_dataset(
    name: str,
    splits: Mapping[str, SplitSpec],
    data_dir: str,
    *,
    full_decode_check: bool = True,
    num_threads: int = 8,
    classes: Sequence[str] = (),
) -> CocoJsonBuilder:
  """Prepares ``<data_dir>/coco_json/<name>/1.0.0`` (if not there yet, or rebuilt when its
  sources changed, see the module docstring) and returns the builder.

  ``splits``: ``{'train': (instances_train.json, image_root), 'val': (...)}`` where each image
  path is ``image_root/file_name``.  Read with ``builder.as_data_source(split)``.  ``classes``:
  category names to keep, in label order (() = all; a prepared folder built for another
  selection is rebuilt).
  """
  classes = tuple(str(class_name) for class_name in classes)

  def make():
    cfg = CocoJsonConfig(
        name=name,
        splits=dict(splits),
        full_decode_check=full_decode_check,
        num_threads=num_threads,
        classes=classes,
        version=CocoJsonBuilder.VERSION,
    )
    return CocoJsonBuilder(config=cfg, data_dir=os.fspath(data_dir))

  return _prepare(make, dict(splits), num_threads, classes)


def build_coco2017_dataset(
    coco_root: str,
    data_dir: str,
    splits: Sequence[str] = ("train", "val"),
    *,
    full_decode_check: bool = True,
) -> Coco:
  """Prepares ``<data_dir>/coco/2017/2.0.0`` from an extracted COCO 2017 tree (if not there
  yet, or rebuilt when its sources changed); returns the builder.

  A prepared dataset lacking a requested split is rebuilt with the requested splits only.
  """

  def make():
    return Coco(
        coco_root=os.fspath(coco_root),
        splits=splits,
        data_dir=os.fspath(data_dir),
        config="2017",
        full_decode_check=full_decode_check,
    )

  return _prepare(make, lambda b: b._split_specs(check=False), 8)


def prepared_data_hint(data_dir) -> str:
  """What to tell the user when a prepared example cannot be decoded at load time."""
  return (
      f"the prepared dataset {os.fspath(data_dir)} holds a bad copy of it: delete that "
      f"folder to rebuild it from the source files"
  )


def _prepare(make_builder, specs, num_threads: int, classes: Sequence[str] = ()):
  """Opens (``make_builder()``) and prepares the dataset, first deleting a prepared folder that
  no longer matches ``specs`` (a dict, or a function of the builder returning one) or was built
  for another ``classes`` selection."""
  builder = make_builder()
  if builder.is_prepared():
    wanted = specs(builder) if callable(specs) else specs
    reasons = _source_changes(builder, wanted, num_threads)
    have_classes = list((builder.info.metadata or {}).get("classes", []) or [])
    if have_classes != list(classes):
      reasons.append(f"it was built for data.classes={have_classes}, not {list(classes)}")
    if not reasons:
      return builder
    _remove_prepared(builder, reasons)
    builder = make_builder()
  builder.download_and_prepare()
  return builder


def _file_stat(path: str) -> Optional[Tuple[int, int]]:
  try:
    stat = os.stat(path)
  except OSError:
    return None
  return int(stat.st_size), int(stat.st_mtime_ns)


def _source_changes(builder, wanted: Mapping[str, SplitSpec], num_threads: int) -> List[str]:
  """Why the prepared folder of ``builder`` does not match ``wanted`` ([] when it does)."""
  have = dict((builder.info.metadata or {}).get("splits", {}) or {})
  reasons = []
  for split, (ann, root) in wanted.items():
    meta = have.get(split)
    ann, root = os.path.abspath(os.fspath(ann)), os.path.abspath(os.fspath(root))
    if meta is None:
      reasons.append(f"it has no split {split!r}")
      continue
    if (meta.get("annotation_file"), meta.get("image_root")) != (ann, root):
      reasons.append(
          f"split {split!r} was prepared from {meta.get('annotation_file')} "
          f"(images in {meta.get('image_root')}), not {ann} (images in {root})"
      )
      continue
    ann_stat = _file_stat(ann)
    if ann_stat is None:
      logger.warning(
          "%s is gone; using the prepared split %r in %s as is", ann, split, builder.data_dir
      )
      continue
    if "file_size" not in meta:
      reasons.append(
          f"split {split!r} was prepared by an older version without a record "
          f"of its source files"
      )
      continue
    if ann_stat != (meta.get("annotation_size"), meta.get("annotation_mtime_ns")):
      reasons.append(f"{ann} changed since split {split!r} was prepared")
      continue
    names = list(meta["file_name"])
    with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
      stats = list(
          pool.map(
              _file_stat,
              [os.path.join(root, f) for f in names],
          )
      )
    changed, missing = [], 0
    for file_name, size, mtime, stat in zip(names, meta["file_size"], meta["file_mtime_ns"], stats):
      if stat is None:
        missing += 1
      elif stat != (size, mtime):
        changed.append(file_name)
    if changed:
      shown = ", ".join(changed[:3]) + (" ..." if len(changed) > 3 else "")
      reasons.append(f"{len(changed)} image file(s) of split {split!r} changed ({shown})")
    elif missing:
      logger.warning(
          "%d source image(s) of split %r are gone; using the prepared copies " "in %s",
          missing,
          split,
          builder.data_dir,
      )
  return reasons


def _remove_prepared(builder, reasons: Sequence[str]) -> None:
  path = os.fspath(builder.data_dir)
  meta = builder.info.metadata or {}
  # Only ever delete a folder this module wrote.
  if meta.get("format") != FORMAT or not os.path.isfile(os.path.join(path, "dataset_info.json")):
    raise DataError(
        f"{path} does not match its sources ({'; '.join(reasons)}) and was not "
        f"written by cn2_jax: delete it to rebuild the dataset"
    )
  logger.warning("rebuilding the prepared dataset %s: %s", path, "; ".join(reasons))
  shutil.rmtree(path)


def load_builder(data_dir: str, name: str, version: Optional[str] = None):
  """Reopens a prepared dataset without its source files.

  ``name`` is ``'coco/2017'``, ``'coco_json/<name>'`` or just ``'<name>'``
  (= ``coco_json/<name>``).
  Returns a tfds read-only builder (``as_data_source(split)``, ``info.metadata``).
  """
  if "/" not in name:
    name = f"coco_json/{name}"
  base = os.path.join(os.fspath(data_dir), name)
  if version is None:
    if not os.path.isdir(base):
      raise FileNotFoundError(f"no prepared dataset {name!r} under {data_dir}")
    versions = [
        folder
        for folder in os.listdir(base)
        if os.path.isfile(os.path.join(base, folder, "dataset_info.json"))
    ]
    if not versions:
      raise FileNotFoundError(f"no prepared version of {name!r} under {base}")
    version = max(versions, key=lambda v: tuple(int(x) for x in v.split(".")))
  return tfds.builder_from_directory(os.path.join(base, version))
