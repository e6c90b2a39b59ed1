"""`lvis_v1`: LVIS v1 (1203 categories; boxes of the COCO 2017 images), the dataset of the official
LVIS_CenterNet2_R50_1x / _Fed_1x configs (detectron2 `lvis_v1_train` / `lvis_v1_val`).

Default layout (detectron2's `datasets/`; data.root is that folder):

    <data.root>/lvis/lvis_v1_{split}.json        data.train_json / data.val_json ("{split}": the split)
    <data.root>/coco/{train2017,val2017}/        data.image_root (default "coco")

LVIS images have no `file_name`: as detectron2's `load_lvis_json`, the file is the last two parts
of `coco_url` (`.../train2017/000000155379.jpg` -> `<image_root>/train2017/000000155379.jpg`; the
val split takes images from both COCO folders). Each split is converted once into
`<data_dir>/converted/<name>/<split>.json` (remade when the source json, its options or
data.classes change): `file_name` added, `segmentation` dropped (boxes only), `iscrowd = 0`
(LVIS has no crowd boxes), and the LVIS fields kept: per image `neg_category_ids` /
`not_exhaustive_category_ids` (default []), per category `frequency` ('r' / 'c' / 'f': in < 10,
10-99, >= 100 training images), `synonyms`, `image_count` .... That json is the split's
annotation file, read by COCO evaluation and by the LVIS evaluation this kind adds
(evaluation/lvis_eval.py: AP, APr / APc / APf, ... as `lvis_*`; needs the optional `lvis` package,
without it only COCO-style metrics are reported, with an error logged). Labels 0..1202 follow
the category ids 1..1203 (detectron2: `category_id - 1`).

A class subset (data.classes) keeps those categories in that order and restricts each image's
`neg_category_ids` / `not_exhaustive_category_ids` to them. The official recipe samples images
by repeat factor (data.sampler_train = "RepeatFactorTrainingSampler", data/sampling.py) and
keeps 300 detections per image for evaluation.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, Mapping, Sequence

from cn2_jax.data import builder as builder_lib
from cn2_jax.data import sources
from cn2_jax.data.catalog import DatasetKind, register
from cn2_jax.errors import ConfigError, DataError
from cn2_jax.evaluation import lvis_eval

logger = logging.getLogger(__name__)

NAME = "lvis_v1"
NUM_CLASSES = 1203
DEFAULT_JSON = "lvis/lvis_v1_{split}.json"
DEFAULT_IMAGE_ROOT = "coco"
FREQUENCIES = ("r", "c", "f")
_VERSION = 1  # of the converted files: a change remakes them


def image_file_name(im: Mapping, source: str = "", where: str = "") -> str:
  """The image's path relative to the image root: its `file_name`, else `<folder>/<file>` of
  its `coco_url` (detectron2 `load_lvis_json`)."""
  if im.get("file_name"):
    return str(im["file_name"])
  url = str(im.get("coco_url") or "")
  parts = url.rstrip("/").split("/")
  if len(parts) < 2 or not parts[-1]:
    raise DataError(
        f"annotation file {source}: image {im.get('id')} has neither 'file_name' nor a "
        f"'coco_url' (.../<folder>/<file>)" + (f" ({where})" if where else "")
    )
  return f"{parts[-2]}/{parts[-1]}"


def convert_split(
    lvis: dict, source: str, *, classes: Sequence[str] = (), drop_empty: bool = False, where=""
) -> dict:
  """The COCO-format copy of one LVIS split dict (see the module docstring); changes ``lvis``."""
  cats = builder_lib._categories_of(lvis, source, where)  # noqa: SLF001 - checks ids
  by_id = {int(cat["id"]): cat for cat in lvis["categories"]}
  bad = [cat["id"] for cat in cats if by_id[cat["id"]].get("frequency") not in FREQUENCIES]
  if bad:
    raise DataError(
        f"annotation file {source}: LVIS categories {bad[:5]} lack the 'frequency' field "
        f"('r', 'c' or 'f')" + (f" ({where})" if where else "")
    )
  keep_ids = None
  categories = [by_id[cat["id"]] for cat in cats]
  if classes:
    sel = builder_lib.select_categories(cats, classes, source, where)
    keep_ids = {cat["id"] for cat in sel}
    categories = [by_id[cat["id"]] for cat in sel]
  anns = []
  try:
    for ann in lvis["annotations"]:
      if keep_ids is not None and int(ann["category_id"]) not in keep_ids:
        continue
      ann.pop("segmentation", None)
      ann.setdefault("iscrowd", 0)
      anns.append(ann)
    images = []
    have = {int(ann["image_id"]) for ann in anns} if drop_empty and keep_ids is not None else None
    for image in lvis["images"]:
      if have is not None and int(image["id"]) not in have:
        continue
      image["file_name"] = image_file_name(image, source, where)
      for key in ("neg_category_ids", "not_exhaustive_category_ids"):
        ids = [int(cat_id) for cat_id in image.get(key, [])]
        image[key] = ids if keep_ids is None else [cat_id for cat_id in ids if cat_id in keep_ids]
      images.append(image)
  except (KeyError, TypeError, ValueError) as e:
    raise DataError(
        f"annotation file {source}: bad entry ({type(e).__name__}: {e})"
        + (f" ({where})" if where else "")
    ) from e
  out = {
      key: value
      for key, value in lvis.items()
      if key not in ("images", "annotations", "categories")
  }
  out.update(images=images, annotations=anns, categories=categories)
  return out


def convert(
    splits: Mapping[str, sources.SplitSpec],
    out_dir: str,
    *,
    classes: Sequence[str] = (),
    train_splits: Sequence[str] = (),
    name: str = NAME,
) -> Dict[str, sources.SplitSpec]:
  """``{split: (LVIS json, image root)}`` -> ``{split: (out_dir/<split>.json, image root)}``,
  converted only when the sources or options changed (sources.py's record in source.json)."""
  classes = tuple(str(class_name) for class_name in classes)
  splits, out = sources.split_files(splits, out_dir)
  drop = sorted(split for split in train_splits if split in splits and classes)
  options = json.loads(
      json.dumps(
          dict(
              version=_VERSION,
              format=NAME,
              classes=list(classes),
              drop_empty_splits=drop,
              splits={
                  split: [os.path.abspath(ann_file), os.path.abspath(image_root)]
                  for split, (ann_file, image_root) in sorted(splits.items())
              },
          )
      )
  )
  if sources._up_to_date(out_dir, options, splits):  # noqa: SLF001 - same package
    return out
  missing = [ann_file for ann_file, _ in splits.values() if not os.path.isfile(ann_file)]
  if missing and all(os.path.isfile(path) for path, _ in out.values()):
    logger.warning(
        "%s is gone; using the converted annotations in %s as they are", missing[0], out_dir
    )
    return out
  ann_stats = {}
  for split, (ann, _) in splits.items():
    where = f"dataset {name}, split {split!r}"
    lvis, stat = builder_lib._load_coco_json(ann, where)  # noqa: SLF001
    ann_stats[os.path.abspath(ann)] = list(stat)
    coco = convert_split(lvis, ann, classes=classes, drop_empty=split in drop, where=where)
    del lvis
    if not coco["images"]:
      raise DataError(f"no images left in split {split!r} of dataset {name}")
    if sources._write_if_changed(out[split][0], sources._dump(coco)):  # noqa: SLF001
      logger.info("wrote %s (%d images)", out[split][0], len(coco["images"]))
  record = dict(options=options, annotation_files=ann_stats, images={})
  sources._write_if_changed(os.path.join(out_dir, "source.json"), sources._dump(record))  # noqa: SLF001
  return out


def split_files(data) -> Dict[str, sources.SplitSpec]:
  """``{split: (LVIS json, image root)}`` of the train and eval splits of the ``data`` config."""
  if not data.root:
    raise ConfigError(
        f"data.root must name the folder holding lvis/ and coco/ for data.dataset={NAME!r}"
    )
  image_root = sources.resolve_path(data.root, data.image_root or DEFAULT_IMAGE_ROOT)
  splits = {}
  for split, ann in ((data.train_split, data.train_json), (data.eval_split, data.val_json)):
    if split:
      ann = (ann or DEFAULT_JSON).replace("{split}", split)
      splits[split] = (sources.resolve_path(data.root, ann), image_root)
  if not splits:
    raise ConfigError("data.train_split and/or data.eval_split must be set")
  return splits


def prepare(data, data_dir: str, workdir: str, seed: int):
  del workdir, seed
  splits = split_files(data)
  opts = sources.subset_options(data)
  name = data.name or NAME + sources._suffix(opts["classes"])  # noqa: SLF001
  converted = convert(
      splits,
      os.path.join(os.fspath(data_dir), "converted", name),
      classes=opts["classes"],
      train_splits=opts["train_splits"],
      name=name,
  )
  builder = builder_lib.build_coco_json_dataset(name, converted, data_dir, classes=opts["classes"])
  num_classes = len((builder.info.metadata or {}).get("categories", []) or [])
  if not opts["classes"] and num_classes != NUM_CLASSES:
    logger.warning("%s: %d categories, not LVIS v1's %d", name, num_classes, NUM_CLASSES)
  if data.eval_split:
    try:
      lvis_eval.require_lvis()
    except ImportError as e:
      logger.warning("%s; evaluation will report COCO-style metrics only", e)
  return builder


def official_metrics(annotation_file: str, evaluator, options) -> dict:
  """LVIS AP / APr / APc / APf ... (`lvis_*`); {} with an error logged without the `lvis`
  package (the COCO-style metrics and the detections are kept)."""
  try:
    return lvis_eval.metrics_from_coco(annotation_file, evaluator, options)
  except lvis_eval.LvisNotInstalledError as e:
    logger.error("%s", e)
    return {}


register(DatasetKind(NAME, prepare, fixed_num_classes=NUM_CLASSES, extra_metrics=official_metrics))
