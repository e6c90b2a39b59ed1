"""Official key renaming (detectron2 `c2_model_loading` and the model-zoo torchvision conversion):
`detect_format(sd)` -> 'detectron2' | 'msra_c2' | 'torchvision', and `to_detectron2_names(sd, fmt)`
renames ImageNet formats to `backbone.bottom_up.*` keys, dropping the classifier.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np

from cn2_jax.errors import ConversionError
from cn2_jax.weights.reader import StateDict

BACKBONE_PREFIX = "backbone.bottom_up."
FROZEN_BN_EPS = 1e-5

# What the ImageNet initialisations assume about the model (reported to the user).
FORMAT_EXPECTATIONS = {
    "msra_c2": dict(
        stride_in_1x1=True,
        input_format="BGR",
        pixel_mean=(103.530, 116.280, 123.675),
        pixel_std=(1.0, 1.0, 1.0),
    ),
    "torchvision": dict(
        stride_in_1x1=False,
        input_format="RGB",
        pixel_mean=(123.675, 116.280, 103.530),
        pixel_std=(58.395, 57.120, 57.375),
    ),
}


_D2_HEADS = ("backbone.", "proposal_generator.", "roi_heads.")
_D2_BARE_BACKBONE = re.compile(r"^(stem\.|res[2-5]\.)")
_MSRA_HINT = re.compile(r"^(conv1_w|res_conv1_bn_[sb]|res\d+_\d+_branch(1|2[abc])_)")
_TV_HINT = re.compile(r"^(conv1\.weight|bn1\.|layer[1-4]\.\d+\.)")


def detect_format(state_dict) -> str:
  """'detectron2' (full-model or bare d2 backbone names), 'msra_c2' (caffe2 blob names such as
  `res2_0_branch2a_w`) or 'torchvision' (`conv1.weight`, `layer1.0.bn1.*`)."""
  keys = list(state_dict)
  if any(key.startswith(_D2_HEADS) for key in keys) or (
      keys and all(_D2_BARE_BACKBONE.match(key) for key in keys)
  ):
    return "detectron2"
  if any(_MSRA_HINT.match(key) for key in keys):
    return "msra_c2"
  if "conv1.weight" in state_dict and any(key.startswith("layer1.") for key in keys):
    return "torchvision"
  raise ConversionError(
      f"unrecognised checkpoint naming ({len(keys)} keys, e.g. {keys[:8]}): "
      "expected detectron2, MSRA caffe2 or torchvision ResNet names"
  )


_D2_RESNET_KEY = re.compile(
    r"^(stem\.conv1|res[2-9]\.\d+\.(conv[1-3]|shortcut))(\.norm)?\."
    r"(weight|bias|running_mean|running_var)$"
)


def _msra_name(key: str) -> str:
  """caffe2 blob name -> detectron2 backbone name (the ResNet subset of detectron2's
  convert_basic_c2_names)."""
  name = key.replace("_", ".")
  name = re.sub(r"\.b$", ".bias", name)
  name = re.sub(r"\.w$", ".weight", name)
  name = re.sub(r"bn\.s$", "norm.weight", name)
  name = re.sub(r"bn\.bias$", "norm.bias", name)
  name = re.sub(r"bn\.rm$", "norm.running_mean", name)
  name = re.sub(r"bn\.running\.mean$", "norm.running_mean", name)
  name = re.sub(r"bn\.riv$", "norm.running_var", name)
  name = re.sub(r"bn\.running\.var$", "norm.running_var", name)
  name = re.sub(r"bn\.gamma$", "norm.weight", name)
  name = re.sub(r"bn\.beta$", "norm.bias", name)
  name = re.sub(r"^res\.conv1\.norm\.", "conv1.norm.", name)
  name = re.sub(r"^conv1\.", "stem.conv1.", name)
  for caffe2_part, d2_part in (
      (".branch1.", ".shortcut."),
      (".branch2a.", ".conv1."),
      (".branch2b.", ".conv2."),
      (".branch2c.", ".conv3."),
  ):
    name = name.replace(caffe2_part, d2_part)
  return name


def _torchvision_name(key: str) -> str:
  """torchvision ResNet name -> detectron2 backbone name (detectron2's
  tools/convert-torchvision-to-d2.py rules)."""
  name = key
  if "layer" not in name:
    name = "stem." + name
  for layer in (1, 2, 3, 4):
    name = name.replace(f"layer{layer}", f"res{layer + 1}")
  for conv in (1, 2, 3):
    name = name.replace(f"bn{conv}", f"conv{conv}.norm")
  name = name.replace("downsample.0", "shortcut")
  name = name.replace("downsample.1", "shortcut.norm")
  return name


def to_detectron2_names(state_dict, fmt: str) -> StateDict:
  """Renames a state dict to detectron2 keys (ImageNet formats -> `backbone.bottom_up.*`).

  - 'detectron2': unchanged, except that a bare backbone dict (`stem.*`, `res2.*`, ... as written
    by detectron2's torchvision converter) gets the `backbone.bottom_up.` prefix, and non-weight
    entries (`pixel_mean`, `pixel_std`, `*.num_batches_tracked`, the LVIS federated loss's
    `*.freq_weight` / `*.fed_loss_cls_weights` buffers) are dropped.
  - 'msra_c2': caffe2 names as detectron2 renames them; `fc1000_*` and `*_momentum` dropped.
  - 'torchvision': conv1/bn1/layerN/downsample names; `fc.*` and `num_batches_tracked` dropped.
  Anything that does not become a ResNet backbone key raises `ConversionError` (ImageNet formats).
  The result's `.info` records dropped keys, the renaming and notes on the input convention.
  """
  info = dict(getattr(state_dict, "info", {}))
  dropped, renamed, notes, bad = [], {}, [], []
  out = {}
  if fmt == "detectron2":
    keys = list(state_dict)
    bare = bool(keys) and all(
        _D2_BARE_BACKBONE.match(key) or key.endswith("num_batches_tracked") for key in keys
    )
    for name, array in state_dict.items():
      if name in ("pixel_mean", "pixel_std") or name.endswith("num_batches_tracked"):
        dropped.append((name, "not a weight (buffer of the meta-architecture / BatchNorm counter)"))
        continue
      if name.endswith((".freq_weight", ".fed_loss_cls_weights")):
        # LVIS federated loss: the class frequencies (image_count ** 0.5) the official box
        # predictor keeps as a buffer; here they are read from roi_heads.cat_freq_path
        dropped.append((name, "federated-loss class frequencies (roi_heads.cat_freq_path)"))
        continue
      if bare and name.startswith("stem.fc."):
        dropped.append((name, "ImageNet classifier"))
        continue
      new = BACKBONE_PREFIX + name if bare else name
      out[new] = array
      if new != name:
        renamed[new] = name
    if bare:
      # detectron2 loads such files by suffix matching onto backbone.bottom_up.*
      versions = info.get("module_versions", {})
      info["module_versions"] = {
          BACKBONE_PREFIX + prefix if prefix else prefix: version
          for prefix, version in versions.items()
      }
      notes.append("bare detectron2 backbone names prefixed with 'backbone.bottom_up.'")
      if str(info.get("author", "")).lower() == "torchvision":
        notes.append(_expectation_note("torchvision"))
  elif fmt in ("msra_c2", "torchvision"):
    for name, array in state_dict.items():
      if fmt == "msra_c2":
        if name.endswith("_momentum"):
          dropped.append((name, "caffe2 optimizer momentum"))
          continue
        if name.startswith("fc1000_"):
          dropped.append((name, "ImageNet classifier"))
          continue
        new = _msra_name(name)
      else:
        if name.startswith("fc."):
          dropped.append((name, "ImageNet classifier"))
          continue
        if name.endswith("num_batches_tracked"):
          dropped.append((name, "BatchNorm counter"))
          continue
        new = _torchvision_name(name)
      if not _D2_RESNET_KEY.match(new):
        bad.append(f"{name} -> {new}")
        continue
      new = BACKBONE_PREFIX + new
      if new in out:
        bad.append(f"{name} -> {new} (duplicate)")
        continue
      out[new] = array
      renamed[new] = name
    if bad:
      raise ConversionError(
          f"{len(bad)} {fmt} keys are not ResNet backbone weights " f"(not converted): {bad[:30]}"
      )
    notes.append(_expectation_note(fmt))
  else:
    raise ConversionError(f"unknown format {fmt!r}")
  info.update(
      source_format=fmt, dropped=dropped, renamed=renamed, notes=info.get("notes", []) + notes
  )
  return StateDict(out, info=info)


def _expectation_note(fmt: str) -> str:
  e = FORMAT_EXPECTATIONS[fmt]
  origin = {"msra_c2": "MSRA caffe2 ResNet", "torchvision": "torchvision ResNet"}[fmt]
  return (
      f"{origin} weights: the model must use stride_in_1x1={e['stride_in_1x1']}, "
      f"input_format={e['input_format']!r}, pixel_mean={list(e['pixel_mean'])}, "
      f"pixel_std={list(e['pixel_std'])}"
  )


def format_expectations(fmt: str) -> Optional[dict]:
  """The model settings an ImageNet format needs (None for detectron2 checkpoints)."""
  return dict(FORMAT_EXPECTATIONS[fmt]) if fmt in FORMAT_EXPECTATIONS else None


def find_setting(cfg, name):
  """The first value of key `name` anywhere in a (nested) config, or None."""
  tree = cfg.to_dict() if hasattr(cfg, "to_dict") else cfg
  stack = [tree]
  while stack:
    node = stack.pop()
    if isinstance(node, dict):
      if name in node:
        return node[name]
      stack.extend(node.values())
  return None


def config_warnings(model_config, fmt: str) -> list:
  """The model settings that differ from what weights of format `fmt` need (format_expectations),
  as messages."""
  want = format_expectations(fmt)
  if want is None:
    return []
  warnings = []
  for name, value in want.items():
    got = find_setting(model_config, name)
    if got is None:
      continue
    same = (
        np.allclose(np.asarray(got, float), np.asarray(value, float), atol=1e-3)
        if isinstance(value, tuple)
        else got == value
    )
    if not same:
      warnings.append(f"config sets {name}={got!r} but {fmt} weights need {value!r}")
  return warnings
