"""Notebook API: restore a trained (or converted official) model and run it on images.

    from cn2_jax.predictor import Predictor
    predictor = Predictor.from_workdir("runs/demo")          # latest checkpoint + saved config
    det = predictor("image.jpg")                              # or an RGB uint8 array
    det["boxes"], det["scores"], det["classes"], det["class_names"]

`from_workdir` also accepts a run whose weights live elsewhere (`config.weights` = a run
directory, one of its `checkpoints/<step>` folders, a converted Orbax directory or an official
.pkl/.pth); class names and COCO category ids come from the run's dataset_info.json (for an
80-class model without one: COCO's).

Images go through the official test preprocessing: shortest edge `data.min_size_test`, long side
<= `data.max_size_test`, zero padding to the resized size rounded up to 32 (the official canvas;
one compiled program per distinct canvas, cached) or to the fixed `data.pad_hw_test` when set.
Boxes come back in original-image pixels, sorted by score.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import jax
import ml_collections
import numpy as np

from cn2_jax import schema
from cn2_jax.config import config_from_json
from cn2_jax.data import augment, buckets, transforms
from cn2_jax.data.coco_classes import COCO_CATEGORY_IDS, COCO_CLASS_NAMES
from cn2_jax.errors import DataError, InputFileError
from cn2_jax.modeling import detector
from cn2_jax.weights.loading import restore_model_variables, weights_run_dir


def _dataset_info(workdir: str, config: ml_collections.ConfigDict) -> tuple:
  """(class names, label -> category id) of the model: dataset_info.json of the run its weights
  come from, else of `workdir`; COCO's for an 80-class model without one; else (None, None)."""
  run = weights_run_dir(config.weights) if config.weights else None
  for run_dir in (run, workdir):
    path = os.path.join(run_dir, "dataset_info.json") if run_dir else ""
    if path and os.path.isfile(path):
      with open(path) as f:
        info = json.load(f)
      return info["class_names"], info.get("label_to_category_id")
  if config.model.num_classes == 80:
    # No run's dataset (e.g. --config.weights=CenterNet2_R50_1x.pth): an 80-class model is a
    # COCO model, whose labels follow the COCO category ids.
    return list(COCO_CLASS_NAMES), list(COCO_CATEGORY_IDS)
  return None, None


class Predictor:
  """Image in, boxes/scores/classes out. Construct with `from_workdir` or directly."""

  def __init__(
      self,
      config: ml_collections.ConfigDict,
      variables: dict,
      class_names: Optional[Sequence[str]] = None,
      category_ids: Optional[Sequence[int]] = None,
  ):
    self.config = config
    self.class_names = list(class_names) if class_names else None
    self.category_ids = [int(cat_id) for cat_id in category_ids] if category_ids else None
    self.model = detector.build_model(config.model)
    self.variables = jax.device_put(variables)
    self._apply = jax.jit(self._forward)

  @classmethod
  def from_workdir(
      cls, workdir: str, config: Optional[ml_collections.ConfigDict] = None
  ) -> "Predictor":
    """Loads `config.json` / `dataset_info.json` of a run (unless `config` is given) and its
    weights: `config.weights` if set, else the latest checkpoint in `workdir`."""
    if config is None:
      path = os.path.join(workdir, "config.json")
      if not os.path.isfile(path):
        raise InputFileError(f"{path} not found: pass the run's config explicitly")
      config = config_from_json(path)
    names, category_ids = _dataset_info(workdir, config)
    return cls(config, restore_model_variables(config, workdir), names, category_ids)

  def class_name(self, label: int) -> str:
    if self.class_names and 0 <= label < len(self.class_names):
      return self.class_names[label]
    return str(label)

  def category_id(self, label: int) -> Optional[int]:
    """The dataset's (COCO) category id of a contiguous label, or None when unknown."""
    if self.category_ids and 0 <= label < len(self.category_ids):
      return self.category_ids[label]
    return None

  @staticmethod
  def read_image(path: str) -> np.ndarray:
    """RGB uint8 `[H, W, 3]` (EXIF-rotated; grayscale/CMYK converted); clear error on bad files."""
    try:
      return transforms.decode_image(path, name=str(path))
    except ValueError as e:  # the file's fault, not the code's: a one-line user error
      raise DataError(str(e)) from e

  def _forward(self, variables, image, image_hw, orig_hw):
    dets = self.model.apply(variables, dict(image=image, image_hw=image_hw), train=False)
    return detector.postprocess_detections(dets, image_hw, orig_hw)

  def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data_cfg = self.config.data
    h, w = image.shape[:2]
    no_boxes = np.zeros((0, 4), np.float32)
    fixed_hw = augment.fixed_resize_hw(data_cfg.min_size_test, data_cfg.max_size_test)
    if data_cfg.resize_type == "Resize" and fixed_hw[0] > 0:  # centerX: exactly that size
      resized, _ = augment.resize_fixed(image, no_boxes, fixed_hw)
    else:
      resized, _ = transforms.resize_shortest_edge(
          image, no_boxes, (data_cfg.min_size_test,), data_cfg.max_size_test
      )
    canvas = tuple(data_cfg.pad_hw_test) or buckets.official_pad_hw(
        *resized.shape[:2], data_cfg.size_divisibility
    )
    padded = transforms.pad_image(resized, canvas)
    return (padded[None], np.array([resized.shape[:2]], np.int32), np.array([[h, w]], np.int32))

  def __call__(self, image) -> dict:
    """`image`: a path or an RGB uint8 `[H, W, 3]` array. Returns numpy arrays boxes `[K, 4]`
    (xyxy, original pixels), scores `[K]`, classes `[K]` and `class_names` (K = valid detections).
    """
    if isinstance(image, (str, os.PathLike)):
      image = self.read_image(image)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
      raise ValueError(f"expected an RGB uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    batch_image, image_hw, orig_hw = self.preprocess(image)
    out = jax.device_get(self._apply(self.variables, batch_image, image_hw, orig_hw))
    keep = out["valid"][0]
    classes = out["classes"][0][keep]
    return dict(
        boxes=out["boxes"][0][keep],
        scores=out["scores"][0][keep],
        classes=classes,
        class_names=[self.class_name(int(label)) for label in classes],
    )


CONFIG = schema.group(
    "predict",
    "--mode=predict.",
    schema.Field("images", "", "comma-separated image paths for --mode=predict"),
    schema.Field("score_thresh", 0.3, "drawing threshold"),
)
