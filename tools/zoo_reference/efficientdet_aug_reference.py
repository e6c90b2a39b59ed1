"""Reference outputs of the OFFICIAL CenterNet2 ``EfficientDetResizeCrop`` train path (CPU) for
tests/test_efficientdet_aug.py.

Runs, unmodified: ``centernet/data/custom_build_augmentation.py`` (``build_custom_augmentation``:
EfficientDetResizeCrop(TRAIN_SIZE, SCALE_RANGE) + RandomFlip at train, EfficientDetResizeCrop
(TEST_SIZE, (1, 1)) at test), ``centernet/data/transforms/custom_augmentation_impl.py`` and
``custom_transform.py``, ``centernet/config.py`` (``add_centernet_config``), inside detectron2's
``DatasetMapper(cfg, True, augmentations=...)`` as ``train_net.py`` builds it (read_image,
transform_instance_annotations, annotations_to_instances, filter_empty_instances).

The random draws: the official code calls ``np.random.uniform`` four times per train image
(scale, offset y, offset x, flip). ``np.random.uniform`` is replaced by a function that returns
``low + (high - low) * f`` for the next given fraction ``f`` (numpy's own formula) and records the
value, so the cases can place the draws where they matter (crop on both axes, no crop, flip, u
close to 1). Stored per case ``<c>``: ``<c>_image`` (input RGB uint8), ``<c>_boxes`` (input
XYXY float32), ``<c>_size``, ``<c>_scale_range``, ``<c>_fracs`` (the fractions fed),
``<c>_draws`` (the values the official code got: scale factor, u_y, u_x, u_flip),
``<c>_params`` (scaled_h, scaled_w, offset_y, offset_x of the official transform),
``<c>_img_scale``, ``<c>_out_image`` (the mapper's image, HWC RGB), ``<c>_out_boxes``
(``instances.gt_boxes``, float32) and ``<c>_out_keep`` (the input index of every output box:
category_id = index). Test-time cases ``t<k>_*``: the official test augmentation's image and
``apply_box`` (the test mapper drops annotations). ``sweep_*``: the official transform
parameters for 1500 random (h, w, size, draws) with COCO-like sizes, size 640 / 1280 / 896.

Imports: detectron2 from its source tree without ``_C``, with a minimal ``torchvision`` stand-in
in sys.modules (detectron2.layers imports ``torchvision.ops`` names at import time; the data path
never calls them). CenterNet2's ``centernet/__init__.py`` (the whole model) is bypassed: the four
files above are copied from the official repository into a temporary package.

Run (torch, numpy, pillow, fvcore, pycocotools, cloudpickle, omegaconf, packaging):
  python tools/zoo_reference/efficientdet_aug_reference.py --centernet2 <CenterNet2 git dir or
      checkout> --detectron2 <detectron2 source tree> [--out tests/data/zoo]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types

import numpy as np

SOURCES = (
    "centernet/config.py",
    "centernet/data/custom_build_augmentation.py",
    "centernet/data/transforms/custom_augmentation_impl.py",
    "centernet/data/transforms/custom_transform.py",
)

# (image h, w, size, scale_range, fractions of the 4 draws, seed of image + boxes)
CASES = {
    "crop_both": (48, 80, 64, (0.1, 2.0), (0.93, 0.71, 0.38, 0.9), 1),  # crop y and x, no flip
    "crop_flip": (70, 100, 96, (0.1, 2.0), (0.999, 0.999, 0.0, 0.2), 2),  # u_y ~ 1, flip
    "down_flip": (90, 50, 64, (0.1, 2.0), (0.12, 0.5, 0.5, 0.1), 3),  # portrait, shrink, flip
    "identity": (64, 64, 64, (1.0, 1.0), (0.3, 0.6, 0.7, 0.6), 4),  # scale 1: no resize
    "narrow": (30, 120, 64, (0.5, 1.5), (0.77, 0.42, 0.55, 0.4), 5),  # 4:1, crop x only, flip
    "coco_like": (96, 128, 128, (0.1, 2.0), (0.8, 0.25, 0.83, 0.7), 6),  # COCO 3:4, crop x+y
}
DEFAULT_KEYS = (
    "CUSTOM_AUG",
    "TRAIN_SIZE",
    "SCALE_RANGE",
    "TEST_SIZE",
    "TEST_INPUT_TYPE",
    "NOT_CLAMP_BOX",
    "MIN_SIZE_TEST",
    "MAX_SIZE_TEST",
)
TEST_CASES = {"t0": (48, 80, 72, 7), "t1": (90, 50, 64, 8)}  # (h, w, TEST_SIZE, seed)


def read_official(root: str, path: str) -> str:
  if os.path.isfile(os.path.join(root, path)):
    with open(os.path.join(root, path)) as f:
      return f.read()
  return subprocess.run(
      ["git", "-C", root, "show", f"HEAD:{path}"], check=True, capture_output=True, text=True
  ).stdout


def git_head(root: str) -> str:
  try:
    return subprocess.run(
        ["git", "-C", root, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
  except (subprocess.CalledProcessError, FileNotFoundError):
    return "unknown"


def install_torchvision_standin() -> None:
  def unavailable(*args, **kwargs):
    raise RuntimeError("torchvision stand-in: not on the data path")

  def module_getattr(name):
    if name.startswith("__"):
      raise AttributeError(name)
    return unavailable

  tv = types.ModuleType("torchvision")
  tv.__version__ = "0.0+standin"
  tv.__path__ = []
  ops = types.ModuleType("torchvision.ops")
  ops.__path__ = []
  ops.__getattr__ = module_getattr
  boxes = types.ModuleType("torchvision.ops.boxes")
  boxes.__getattr__ = module_getattr
  ops.boxes = boxes
  tv.ops = ops
  sys.modules.update({"torchvision": tv, "torchvision.ops": ops, "torchvision.ops.boxes": boxes})


def install_official(centernet2: str, tmp: str) -> None:
  """Copies the official files into ``tmp/centernet`` (an empty package ``__init__``)."""
  for path in SOURCES:
    dst = os.path.join(tmp, path)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(dst, "w") as f:
      f.write(read_official(centernet2, path))
  with open(os.path.join(tmp, "centernet", "__init__.py"), "w") as f:
    f.write("")  # the official one imports the whole model
  sys.path.insert(0, tmp)


class ScriptedUniform:
  """Stands in for ``np.random.uniform``: the next fraction ``f`` -> ``low + (high - low) * f``."""

  def __init__(self):
    self.fracs = []
    self.values = []

  def __call__(self, low=0.0, high=1.0, size=None):
    assert size is None or np.size(np.empty(size)) == 1, size
    f = self.fracs.pop(0)
    v = np.float64(low) + (np.float64(high) - np.float64(low)) * np.float64(f)
    self.values.append(float(v))
    return v if size is None else np.full(size, v)


def make_case(h: int, w: int, seed: int):
  """Random image and 13 boxes: inside, crossing every border, outside, and degenerate."""
  rs = np.random.RandomState(seed)
  image = rs.randint(0, 256, size=(h, w, 3)).astype(np.uint8)
  xs = rs.uniform(-0.2 * w, 1.1 * w, size=(10, 2))
  ys = rs.uniform(-0.2 * h, 1.1 * h, size=(10, 2))
  boxes = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], 1)
  extra = np.array(
      [
          [0.0, 0.0, w, h],  # the whole image
          [0.25 * w, 0.3 * h, 0.25 * w, 0.6 * h],  # zero width
          [0.5 * w, 0.2 * h, 0.5 * w + 5e-6, 0.9 * h],  # width ~4e-6: > 0 but <= 1e-5 after
      ],
      np.float64,
  )
  return image, np.concatenate([boxes, extra]).astype(np.float32)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--centernet2", default="/work/.mirror/xingyizhou+CenterNet2/repo")
  ap.add_argument("--detectron2", required=True)
  ap.add_argument("--out", default="tests/data/zoo")
  args = ap.parse_args(argv)

  install_torchvision_standin()
  sys.path.insert(0, os.path.abspath(args.detectron2))
  tmp = tempfile.mkdtemp(prefix="cn2_effdet_ref_")
  install_official(args.centernet2, tmp)

  import PIL
  import torch
  from detectron2.config import get_cfg
  from detectron2.data import transforms as T
  from detectron2.data.dataset_mapper import DatasetMapper
  from detectron2.structures import BoxMode
  from PIL import Image

  from centernet.config import add_centernet_config
  from centernet.data.custom_build_augmentation import build_custom_augmentation
  from centernet.data.transforms import custom_augmentation_impl as official_aug

  scripted = ScriptedUniform()
  np.random.uniform = scripted  # the official code and RandomFlip draw from np.random.uniform

  def config(size, scale_range, test_size=640):
    cfg = get_cfg()
    add_centernet_config(cfg)
    cfg.INPUT.CUSTOM_AUG = "EfficientDetResizeCrop"
    cfg.INPUT.TRAIN_SIZE = size
    cfg.INPUT.TEST_SIZE = test_size
    cfg.INPUT.SCALE_RANGE = tuple(scale_range)
    cfg.INPUT.FORMAT = "RGB"  # the mapper's image in RGB, like our pipeline
    return cfg

  base = get_cfg()
  add_centernet_config(base)
  out = {}
  meta = dict(
      centernet2_commit=git_head(args.centernet2),
      detectron2=os.path.abspath(args.detectron2),
      torch=torch.__version__,
      numpy=np.__version__,
      pillow=PIL.__version__,
      official_defaults={k: str(base.INPUT[k]) for k in DEFAULT_KEYS},
      cases={k: list(map(str, v)) for k, v in CASES.items()},
  )
  for name, (h, w, size, scale_range, fracs, seed) in CASES.items():
    image, boxes = make_case(h, w, seed)
    path = os.path.join(tmp, f"{name}.png")
    Image.fromarray(image).save(path)
    cfg = config(size, scale_range)
    augs = build_custom_augmentation(cfg, True)
    assert [type(a).__name__ for a in augs] == ["EfficientDetResizeCrop", "RandomFlip"], augs
    mapper = DatasetMapper(cfg, True, augmentations=augs)
    record = dict(
        file_name=path,
        height=h,
        width=w,
        image_id=0,
        annotations=[
            dict(
                bbox=[float(v) for v in b],
                bbox_mode=BoxMode.XYXY_ABS,
                category_id=i,
                iscrowd=0,
            )
            for i, b in enumerate(boxes)
        ],
    )
    scripted.fracs, scripted.values = list(fracs), []
    # The transform's parameters, from the same draws (a fresh get_transform call).
    t = augs[0].get_transform(np.zeros((h, w, 3), np.uint8))
    params = (t.scaled_h, t.scaled_w, t.offset_y, t.offset_x)
    img_scale = float(t.img_scale)
    scripted.fracs, scripted.values = list(fracs), []
    d = mapper(record)
    assert not scripted.fracs, "every draw used"
    inst = d["instances"]
    out[f"{name}_image"] = image
    out[f"{name}_boxes"] = boxes
    out[f"{name}_size"] = np.int64(size)
    out[f"{name}_scale_range"] = np.asarray(scale_range, np.float64)
    out[f"{name}_fracs"] = np.asarray(fracs, np.float64)
    out[f"{name}_draws"] = np.asarray(scripted.values, np.float64)
    out[f"{name}_params"] = np.asarray(params, np.int64)
    out[f"{name}_img_scale"] = np.float64(img_scale)
    out[f"{name}_out_image"] = d["image"].permute(1, 2, 0).numpy().copy()
    out[f"{name}_out_boxes"] = inst.gt_boxes.tensor.numpy().astype(np.float32)
    out[f"{name}_out_keep"] = inst.gt_classes.numpy().astype(np.int64)
    print(
        name,
        "draws",
        np.round(scripted.values, 4),
        "params",
        params,
        "out",
        tuple(out[f"{name}_out_image"].shape),
        "boxes",
        len(inst),
        "of",
        len(boxes),
    )

  for name, (h, w, test_size, seed) in TEST_CASES.items():
    image, boxes = make_case(h, w, seed)
    cfg = config(640, (0.1, 2.0), test_size)
    augs = build_custom_augmentation(cfg, False)
    assert [type(a).__name__ for a in augs] == ["EfficientDetResizeCrop"], augs
    scripted.fracs, scripted.values = [0.5, 0.5, 0.5], []
    aug_input = T.AugInput(image.copy())
    tfm = T.AugmentationList(augs)(aug_input)
    out[f"{name}_image"] = image
    out[f"{name}_boxes"] = boxes
    out[f"{name}_size"] = np.int64(test_size)
    out[f"{name}_out_image"] = np.ascontiguousarray(aug_input.image)
    out[f"{name}_out_boxes"] = tfm.apply_box(boxes.astype(np.float64)).astype(np.float32)
    print(name, "test out", aug_input.image.shape, "draws", scripted.values)

  # Parameter sweep: the official get_transform on empty images of COCO-like sizes.
  rs = np.random.RandomState(2024)
  n = 1500
  hs = rs.randint(16, 1400, size=n)
  ws = rs.randint(16, 1400, size=n)
  sizes = rs.choice([640, 1280, 896], size=n)
  fr = rs.uniform(0, 1, size=(n, 3))
  fr[:50] = [[1.0 - 1e-12, 1.0 - 1e-12, 1.0 - 1e-12]]  # the top of the range
  res = np.zeros((n, 4), np.int64)
  scales = np.zeros(n, np.float64)
  draws = np.zeros((n, 3), np.float64)
  for i in range(n):
    aug = official_aug.EfficientDetResizeCrop(int(sizes[i]), (0.1, 2.0))
    scripted.fracs, scripted.values = list(fr[i]), []
    t = aug.get_transform(np.broadcast_to(np.uint8(0), (int(hs[i]), int(ws[i]), 3)))
    res[i] = (t.scaled_h, t.scaled_w, t.offset_y, t.offset_x)
    scales[i] = t.img_scale
    draws[i] = scripted.values
  out.update(
      sweep_hw=np.stack([hs, ws], 1).astype(np.int32),
      sweep_size=sizes.astype(np.int32),
      sweep_draws=draws,
      sweep_params=res.astype(np.int32),
      sweep_img_scale=scales,
  )
  out["meta"] = np.asarray(json.dumps(meta))
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "efficientdet_aug.npz")
  np.savez_compressed(path, **out)
  print("wrote", path, os.path.getsize(path), "bytes")
  shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
