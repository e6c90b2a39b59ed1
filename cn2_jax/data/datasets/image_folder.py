"""`image_folder`: every image below data.root (recursive), no annotations: training images for
distillation without labels (woGT, docs/onestage.md §4.3); never evaluated, never filtered as
empty.

Every image below ``data.root``, recursively, extensions :data:`IMAGE_EXTENSIONS`, in sorted
path order, is one record with no boxes, split ``data.train_split`` only, with one placeholder
category :data:`UNLABELLED` (the prepared format needs one; it labels no box).  The train loader
never drops these images as empty (``splits.TrainPart.filter_empty``).  Converted to
``<data_dir>/converted/<name>/<split>.json`` like the formats of cn2_jax/data/sources.py; the
file list is part of the conversion record, so adding or removing an image remakes it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import List

from cn2_jax.data import builder as builder_lib
from cn2_jax.data import sources
from cn2_jax.data.catalog import DatasetKind, register
from cn2_jax.data.sources import SourceImage
from cn2_jax.errors import ConfigError, InputFileError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
UNLABELLED = "unlabelled"  # the placeholder category of an image_folder dataset
_VERSION = 1  # of the converted files: a change remakes them


def image_folder_files(root: str) -> List[str]:
  """The images below ``root`` (recursive, :data:`IMAGE_EXTENSIONS`, hidden files and folders
  skipped), as sorted ``/``-separated paths relative to ``root``."""
  if not os.path.isdir(root):
    raise InputFileError(f"data.root={root!r} is not a folder (data.dataset='image_folder')")
  out = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames[:] = sorted(dirname for dirname in dirnames if not dirname.startswith("."))
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
  if not sources._up_to_date(out_dir, options, out):  # noqa: SLF001 - same package
    images = [SourceImage(file, image_id, (), (), ()) for image_id, file in enumerate(files, 1)]
    coco, stats = sources._images_to_coco(  # noqa: SLF001
        images,
        root,
        [UNLABELLED],
        drop_empty=False,
        source=root,
        where=where,
        num_threads=num_threads,
    )
    if sources._write_if_changed(out[split][0], sources._dump(coco)):  # noqa: SLF001
      logger.info("wrote %s (%d unlabelled images)", out[split][0], len(coco["images"]))
    record = dict(options=options, annotation_files={}, images={split: stats})
    source_json = os.path.join(out_dir, "source.json")
    sources._write_if_changed(source_json, sources._dump(record))  # noqa: SLF001
  return builder_lib.build_coco_json_dataset(
      name, out, data_dir, full_decode_check=full_decode_check, num_threads=num_threads
  )


def prepare(data, data_dir: str, workdir: str, seed: int):
  del workdir, seed
  if not data.root:
    raise ConfigError("data.root must name the image folder for data.dataset='image_folder'")
  return build_image_folder(data.root, data_dir, name=data.name, split=data.train_split)


register(DatasetKind("image_folder", prepare, fixed_num_classes=0, labelled=False))
