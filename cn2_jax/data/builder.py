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
    objects/label    int64 [k]  contiguous 0..C-1 (categories sorted by COCO id)
    objects/is_crowd bool [k]
    objects/area     float32 [k]  COCO ``area`` (segment area), as in the json
    objects/id       int64 [k]  COCO annotation id

Metadata (``builder.info.metadata``, also ``<dataset dir>/metadata.json``)::

    format, bbox_format='xyxy_abs',
    categories: [{'id', 'name', 'supercategory'}...]  # label i <-> categories[i]
    splits: {split: {annotation_file, image_root, num_images, num_boxes, num_crowd,
                     num_degenerate_dropped, num_empty,
                     image_id[], height[], width[], num_instances[]}}   # per example, source order

(``num_instances`` counts non-crowd boxes, so a pipeline can drop empty images without reading
them.)  Missing image files and corrupt images (PIL open + verify) raise a ``ValueError`` naming
the file before/while the split is written.
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
import types
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

import tensorflow_datasets as tfds

from cn2_jax.data.transforms import image_size_after_exif

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
]


# ----------------------------------------------------------------------------------------------
# Annotation parsing (pure python / numpy; used by the builders)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ParsedSplit:
    categories: List[dict]
    records: List[dict]  # one per image, sorted by image id
    stats: Dict[str, int]


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


def _categories_of(coco: dict, path: str) -> List[dict]:
    cats = coco.get("categories")
    if not cats:
        raise ValueError(f"{path}: no 'categories'")
    cats = sorted(cats, key=lambda c: int(c["id"]))
    ids = [int(c["id"]) for c in cats]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate category ids {ids}")
    return [{"id": int(c["id"]), "name": str(c.get("name", c["id"])),
             "supercategory": str(c.get("supercategory", ""))} for c in cats]


def parse_coco_split(annotation_file: str, image_root: str) -> ParsedSplit:
    """Reads a COCO instances json into per-image records (images sorted by id, boxes as xyxy,
    labels contiguous by sorted category id). Clipping / degenerate filtering: finalize_record."""
    with open(annotation_file, "r") as f:
        coco = json.load(f)
    categories = _categories_of(coco, annotation_file)
    cat_to_label = {c["id"]: i for i, c in enumerate(categories)}
    images = sorted(coco.get("images", []), key=lambda im: int(im["id"]))
    by_image: Dict[int, List[dict]] = {int(im["id"]): [] for im in images}
    if len(by_image) != len(images):
        raise ValueError(f"{annotation_file}: duplicate image ids")
    for ann in coco.get("annotations", []):
        iid = int(ann["image_id"])
        if iid not in by_image:
            raise ValueError(f"{annotation_file}: annotation {ann.get('id')} refers to unknown "
                             f"image_id {iid}")
        if int(ann["category_id"]) not in cat_to_label:
            raise ValueError(f"{annotation_file}: annotation {ann.get('id')} has unknown "
                             f"category_id {ann['category_id']}")
        by_image[iid].append(ann)

    records = []
    for im in images:
        iid = int(im["id"])
        h, w = im.get("height"), im.get("width")
        anns = by_image[iid]
        boxes = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
        xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
        records.append({
            "image/id": iid,
            "file_name": str(im["file_name"]),
            "path": os.path.join(image_root, str(im["file_name"])),
            "height": None if h is None else int(h),
            "width": None if w is None else int(w),
            "bbox": xyxy,  # float64, not yet clipped (see finalize_record)
            "label": np.array([cat_to_label[int(a["category_id"])] for a in anns], np.int64),
            "is_crowd": np.array([bool(a.get("iscrowd", 0)) for a in anns], bool),
            "area": np.array([float(a.get("area", 0.0)) for a in anns], np.float32),
            "ann_id": np.array([int(a.get("id", -1)) for a in anns], np.int64),
        })
    stats = dict(num_images=len(images), num_annotations=sum(len(v) for v in by_image.values()))
    return ParsedSplit(categories=categories, records=records, stats=stats)


def _check_files_exist(records: Sequence[dict], annotation_file: str) -> None:
    missing = [r["path"] for r in records if not os.path.isfile(r["path"])]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"{len(missing)} image file(s) listed in {annotation_file} are missing: "
                         f"{shown}")


def _read_and_check_image(rec: dict, full_decode: bool) -> Tuple[bytes, int, int]:
    """Reads the file bytes; PIL open + verify (and optionally full decode); returns
    ``(bytes, height, width)`` (EXIF-oriented). Raises ValueError naming the file."""
    path = rec["path"]
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read image file {path}: {e}") from e
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        with Image.open(io.BytesIO(data)) as img:
            h, w = image_size_after_exif(img)
            if full_decode:
                img.load()
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"corrupt or unreadable image file {path}: {type(e).__name__}: {e}") from e
    if rec["height"] is not None and (rec["height"], rec["width"]) != (h, w):
        raise ValueError(
            f"image file {path} has size {h}x{w} (h x w, after EXIF orientation) but the "
            f"annotation says {rec['height']}x{rec['width']}")
    return data, h, w


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
    io=types.SimpleNamespace(gfile=types.SimpleNamespace(
        GFile=_LazyFile, exists=lambda p: os.path.exists(os.fspath(p)),
        remove=lambda p: os.remove(os.fspath(p)))),
    errors=types.SimpleNamespace(ResourceExhaustedError=_ResourceExhaustedError),
)


@contextlib.contextmanager
def _tf_free_shuffler():
    """Without TensorFlow, lets tfds's Shuffler spill splits > 1 GB to its temporary buckets."""
    if importlib.util.find_spec("tensorflow") is not None:
        yield
        return
    from tensorflow_datasets.core import shuffle as tfds_shuffle
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
    full_decode_check: bool = False  # also decode every image at build time (slow, thorough)
    num_threads: int = 8  # file reading / verification threads


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        "image/id": tfds.features.Scalar(dtype=np.int64),
        "image/filename": tfds.features.Text(),
        "image/height": tfds.features.Scalar(dtype=np.int32),
        "image/width": tfds.features.Scalar(dtype=np.int32),
        "objects": tfds.features.FeaturesDict({
            "bbox": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
            "label": tfds.features.Tensor(shape=(None,), dtype=np.int64),
            "is_crowd": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
            "area": tfds.features.Tensor(shape=(None,), dtype=np.float32),
            "id": tfds.features.Tensor(shape=(None,), dtype=np.int64),
        }),
    })


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
            raise ValueError(f"{self.name}: no splits configured "
                             "(need {split: (json, image_root)})")
        return {k: (os.fspath(v[0]), os.fspath(v[1])) for k, v in specs.items()}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="COCO-format object detection (cn2_jax layout, see "
                        "cn2_jax/data/builder.py).",
            features=_features(),
            disable_shuffling=True,  # keep annotation-file order: source index i = i-th image
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        specs = self._split_specs()
        categories = None
        generators = {}
        self._meta_splits = {}
        for split, (ann_file, image_root) in specs.items():
            parsed = parse_coco_split(ann_file, image_root)
            if categories is None:
                categories = parsed.categories
            elif [(c["id"], c["name"]) for c in categories] != \
                    [(c["id"], c["name"]) for c in parsed.categories]:
                raise ValueError(f"split {split!r}: categories in {ann_file} differ from those of "
                                 "the other splits")
            if not parsed.records:
                raise ValueError(f"split {split!r}: {ann_file} has no images")
            _check_files_exist(parsed.records, ann_file)
            self._meta_splits[split] = dict(annotation_file=os.path.abspath(ann_file),
                                            image_root=os.path.abspath(image_root))
            generators[split] = self._generate_examples(parsed.records, split)
        self.info.metadata.update(
            format=FORMAT, bbox_format="xyxy_abs", label_order="sorted_category_id",
            categories=categories, splits=self._meta_splits)
        return generators

    def _full_decode_check(self) -> bool:
        return bool(getattr(self.builder_config, "full_decode_check", False))

    def _generate_examples(self, records: List[dict], split: str) -> Iterator[Tuple[int, dict]]:
        full = self._full_decode_check()
        threads = max(1, int(getattr(self.builder_config, "num_threads", 8)))
        n = len(records)
        # disable_shuffling keeps key order; spread the keys over tfds's 128-bit key space so that
        # its on-disk buckets (> 1 GB splits) each hold a slice of the data.
        key_step = (2 ** 128 - 1) // max(n, 1)
        cols = {k: [] for k in ("image_id", "height", "width", "num_instances")}
        stats = dict(num_images=n, num_boxes=0, num_crowd=0, num_degenerate_dropped=0,
                     num_empty=0)

        def read(rec):
            return _read_and_check_image(rec, full)

        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            chunk = 4 * threads
            for start in range(0, n, chunk):
                part = records[start:start + chunk]
                for i, (rec, (data, h, w)) in enumerate(zip(part, pool.map(read, part)),
                                                        start=start):
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
                    yield i * key_step, {
                        "image": data,
                        "image/id": rec["image/id"],
                        "image/filename": rec["file_name"],
                        "image/height": h,
                        "image/width": w,
                        "objects": objects,
                    }
        logger.info("split %s: %d images, %d boxes (%d crowd), %d without non-crowd boxes; "
                    "dropped %d degenerate boxes", split, stats["num_images"], stats["num_boxes"],
                    stats["num_crowd"], stats["num_empty"], stats["num_degenerate_dropped"])
        if stats["num_degenerate_dropped"]:
            logger.warning("split %s: dropped %d degenerate boxes (w <= 0 or h <= 0 after clipping "
                           "to the image)", split, stats["num_degenerate_dropped"])
        self._meta_splits[split].update(stats, **cols)

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
    RELEASE_NOTES = {"2.0.0": "cn2_jax layout (differs from tfds's built-in coco 1.x): raw image "
                              "bytes, xyxy absolute boxes, splits train/val."}
    BUILDER_CONFIGS = [CocoConfig(name="2017", description="COCO 2017 instances (boxes)")]

    def __init__(self, *, coco_root: Optional[str] = None,
                 splits: Sequence[str] = ("train", "val"), full_decode_check: bool = False,
                 **kwargs):
        self._coco_root = coco_root
        self._wanted_splits = tuple(splits)
        self._full_decode = full_decode_check
        super().__init__(**kwargs)

    def _full_decode_check(self) -> bool:
        return self._full_decode

    def _split_specs(self) -> Dict[str, SplitSpec]:
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
            if not os.path.isfile(ann):
                raise ValueError(f"COCO annotation file not found: {ann}")
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
    full_decode_check: bool = False,
    num_threads: int = 8,
) -> CocoJsonBuilder:
    """Prepares ``<data_dir>/coco_json/<name>/1.0.0`` (if not there yet) and returns the builder.

    ``splits``: ``{'train': (instances_train.json, image_root), 'val': (...)}`` where each image
    path is ``image_root/file_name``.  Read with ``builder.as_data_source(split)``.
    """
    cfg = CocoJsonConfig(name=name, splits=dict(splits), full_decode_check=full_decode_check,
                         num_threads=num_threads, version=CocoJsonBuilder.VERSION)
    builder = CocoJsonBuilder(config=cfg, data_dir=os.fspath(data_dir))
    builder.download_and_prepare()
    _warn_if_stale(builder, {k: v[0] for k, v in splits.items()})
    return builder


def _warn_if_stale(builder, wanted: Mapping[str, str]) -> None:
    """tfds reuses an already prepared folder: say so when it was built from other files."""
    have = {k: v.get("annotation_file") for k, v in
            (builder.info.metadata or {}).get("splits", {}).items()}
    want = {k: os.path.abspath(os.fspath(v)) for k, v in wanted.items()}
    if have != want:
        logger.warning("%s already holds a dataset prepared from %s (requested %s); it is reused "
                       "as is. Delete the folder to rebuild.", builder.data_dir, have, want)


def build_coco2017_dataset(coco_root: str, data_dir: str,
                           splits: Sequence[str] = ("train", "val"),
                           *, full_decode_check: bool = False) -> Coco:
    """Prepares ``<data_dir>/coco/2017/2.0.0`` from an extracted COCO 2017 tree; returns the
    builder.

    The set of splits is fixed when the dataset is first prepared (tfds cannot add a split later).
    """
    builder = Coco(coco_root=os.fspath(coco_root), splits=splits, data_dir=os.fspath(data_dir),
                   config="2017", full_decode_check=full_decode_check)
    builder.download_and_prepare()
    _warn_if_stale(builder, {k: v[0] for k, v in builder._split_specs().items()})
    return builder


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
        versions = [v for v in os.listdir(base)
                    if os.path.isfile(os.path.join(base, v, "dataset_info.json"))]
        if not versions:
            raise FileNotFoundError(f"no prepared version of {name!r} under {base}")
        version = max(versions, key=lambda v: tuple(int(x) for x in v.split(".")))
    return tfds.builder_from_directory(os.path.join(base, version))
