"""Notebook API: restore a trained (or converted official) model and run it on images.

    from cn2_jax.predictor import Predictor
    predictor = Predictor.from_workdir("runs/demo")          # latest checkpoint + saved config
    det = predictor("image.jpg")                              # or an RGB uint8 array
    det["boxes"], det["scores"], det["classes"], det["class_names"]

Images go through the official test preprocessing (shortest edge `data.min_size_test`, long side
<= `data.max_size_test`, zero padding to the fixed `data.pad_hw_test`, so every image reuses one
compiled program); boxes come back in original-image pixels, sorted by score.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import jax
import ml_collections
import numpy as np

from cn2_jax.config import base_config, validate_config
from cn2_jax.data import transforms
from cn2_jax.modeling import detector


def _config_from_json(path: str) -> ml_collections.ConfigDict:
  """Rebuilds a run's ConfigDict from workdir/config.json on top of the schema defaults."""
  with open(path) as f:
    saved = json.load(f)
  cfg = base_config()

  def merge(dst, src, prefix=""):
    for k, v in src.items():
      if k not in dst:
        raise KeyError(f"{path}: unknown config key '{prefix}{k}'")
      if isinstance(dst[k], ml_collections.ConfigDict):
        merge(dst[k], v, f"{prefix}{k}.")
      else:
        dst[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v) \
            if isinstance(v, list) else v
  merge(cfg, saved)
  return validate_config(cfg)


class Predictor:
  """Image in, boxes/scores/classes out. Construct with `from_workdir` or directly."""

  def __init__(self, config: ml_collections.ConfigDict, variables: dict,
               class_names: Optional[Sequence[str]] = None):
    self.config = config
    self.class_names = list(class_names) if class_names else None
    self.model = detector.build_model(config.model)
    self.variables = jax.device_put(variables)
    self._apply = jax.jit(self._forward)

  @classmethod
  def from_workdir(cls, workdir: str,
                   config: Optional[ml_collections.ConfigDict] = None) -> "Predictor":
    """Loads `config.json` / `dataset_info.json` of a run (unless `config` is given) and its
    weights: `config.weights` if set, else the latest checkpoint in `workdir`."""
    from cn2_jax.app import restore_variables
    if config is None:
      path = os.path.join(workdir, "config.json")
      if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: pass the run's config explicitly")
      config = _config_from_json(path)
    names = None
    info_path = os.path.join(workdir, "dataset_info.json")
    if os.path.isfile(info_path):
      with open(info_path) as f:
        names = json.load(f)["class_names"]
    return cls(config, restore_variables(config, workdir), names)

  def class_name(self, label: int) -> str:
    if self.class_names and 0 <= label < len(self.class_names):
      return self.class_names[label]
    return str(label)

  @staticmethod
  def read_image(path: str) -> np.ndarray:
    """RGB uint8 `[H, W, 3]` (EXIF-rotated; grayscale/CMYK converted); clear error on bad files."""
    return transforms.decode_image(path, name=str(path))

  def _forward(self, variables, image, image_hw, orig_hw):
    dets = self.model.apply(variables, dict(image=image, image_hw=image_hw), train=False)
    return detector.postprocess_detections(dets, image_hw, orig_hw)

  def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = self.config.data
    h, w = image.shape[:2]
    resized, _ = transforms.resize_shortest_edge(image, np.zeros((0, 4), np.float32),
                                                 (d.min_size_test,), d.max_size_test)
    padded = transforms.pad_image(resized, tuple(d.pad_hw_test))
    return (padded[None], np.array([resized.shape[:2]], np.int32),
            np.array([[h, w]], np.int32))

  def __call__(self, image) -> dict:
    """`image`: a path or an RGB uint8 `[H, W, 3]` array. Returns numpy arrays boxes `[K, 4]`
    (xyxy, original pixels), scores `[K]`, classes `[K]` and `class_names` (K = valid detections)."""
    if isinstance(image, (str, os.PathLike)):
      image = self.read_image(image)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
      raise ValueError(f"expected an RGB uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    batch_image, image_hw, orig_hw = self.preprocess(image)
    out = jax.device_get(self._apply(self.variables, batch_image, image_hw, orig_hw))
    keep = out["valid"][0]
    classes = out["classes"][0][keep]
    return dict(boxes=out["boxes"][0][keep], scores=out["scores"][0][keep], classes=classes,
                class_names=[self.class_name(int(c)) for c in classes])
