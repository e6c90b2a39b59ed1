"""Weights of the one-stage CenterNet (`cn2_jax/modeling/onestage`): centerX state dicts (and
xingyizhou/CenterNet `resdcn` / torchvision ResNet ones) -> Flax variables, strictly, and back.

The command line is `python -m cn2_jax.convert` (one CLI for every family: it detects these formats
and dispatches here). Files are read with `cn2_jax.weights.load_checkpoint_file` (restricted
unpickler, torch never imported; a common `module.` prefix is stripped there). Then:
  1. `detect_format(sd)`: 'centerx' (`backbone.*`, `upsample.*`, `head.*`), 'xingyizhou'
     (CenterNet `resdcn_*`: `conv1`, `layerN`, `deconv_layers.*`, `hm/wh/reg.{0,2}`),
     'torchvision' (ImageNet ResNet: backbone only) or 'pycls' (ImageNet RegNet, the `model_state`
     of a pycls `.pyth`: `stem.conv.*`, `s1.b1.f.a.*`, ..., `head.fc.*`; backbone only).
  2. `to_centerx_names(sd, fmt)`: renames to centerX keys (dropping `fc.*` / `head.fc.*`; pycls
     keys only get the `backbone.` prefix, as centerX's `build_regnet` loads them).
  3. `convert_onestage(sd, target_variables)`: maps every key onto the target tree and reports
     mapped / missing / unexpected / mis-shaped / dropped keys, one line each; anything but a
     complete, exact mapping raises `ConversionError` (with `.report`).

Naming rule (`'.'`-joined Flax path == centerX key with the leaf renamed and, under `backbone.`,
torchvision's module names as detectron2's, `_model_module`):
  * backbone modules (the shared ResNet of `modeling/backbone/resnet.py`): detectron2's
    convert-torchvision-to-d2 renaming, `conv1` -> `stem.conv1`, `bn1` -> `stem.conv1.norm`,
    `layer<k>.<i>` -> `res<k+1>.<i>`, `bn<t>` -> `conv<t>.norm`, `downsample.0` -> `shortcut`,
    `downsample.1` -> `shortcut.norm`; a RegNet backbone (`modeling/backbone/regnet.py`, pycls
    names `stem.conv`, `stem.bn`, `s<k>.b<i>.*`) keeps its names, and so do the neck
    (`upsample.*`) and the head (`head.*`);
  * conv `weight` [O, I, kh, kw] -> params `kernel` [kh, kw, I, O] (transpose (2, 3, 1, 0));
  * ConvTranspose2d `weight` [I, O, kh, kw] (modules named in `neck.TRANSPOSED_CONV_NAMES`,
    i.e. `up_sample`) -> params `kernel` [kh, kw, I, O] (transpose (2, 3, 0, 1), no flip; the
    forward flips, see `onestage/neck.py`). The two rules give the same shape when I == O, so
    the module name, not the shape, decides;
  * conv `bias` -> params `bias`;
  * BatchNorm (a module with `batch_stats/<module>.mean` in the target): `weight` -> params
    `scale`, `bias` -> params `bias`, `running_mean` -> batch_stats `mean`, `running_var` ->
    batch_stats `var`; `num_batches_tracked` is dropped (unused with an explicit momentum).
Example: `upsample.deconv1.up_sample.weight` -> `params/upsample/deconv1/up_sample/kernel`,
`backbone.layer2.0.downsample.1.running_var` -> `batch_stats/backbone/res3/0/shortcut/norm/var`.

`export_state_dict(variables)` is the inverse (torch layouts and centerX keys), also used to
compare gradients with official ones.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np

from cn2_jax.modeling.backbone.regnet import REGNETS, regnet_stages
from cn2_jax.modeling.backbone.resnet import BLOCKS_BY_DEPTH
from cn2_jax.weights import ConversionError, StateDict, load_checkpoint_file
from cn2_jax.weights.flax_mapping import _index, _key_str
from cn2_jax.weights.rename import _torchvision_name

__all__ = [
    "FORMATS",
    "OneStageReport",
    "convert_onestage",
    "detect_format",
    "export_state_dict",
    "infer_model_config",
    "is_pycls",
    "load_onestage_weights",
    "named_flax_tensors",
    "official_named_tensors",
    "to_centerx_names",
    "torch_key_of",
]

FORMATS = ("centerx", "xingyizhou", "torchvision", "pycls")
_CENTERX_HEADS = ("backbone.", "upsample.", "head.")
_BACKBONE = "backbone."
# pycls RegNet module names (relative to the backbone): kept as they are.
_PYCLS_MODULE = re.compile(r"^(stem\.(conv|bn)|s\d+\.b\d+)(\.|$)")
_PYCLS_CLASSIFIER = "head.fc."
_TRANSPOSED = ("up_sample",)  # == onestage.neck.TRANSPOSED_CONV_NAMES (checked in the tests)


# ----------------------------------------------------------------------------------------------
# Formats and renaming.
# ----------------------------------------------------------------------------------------------


def is_pycls(sd) -> bool:
  """A pycls ImageNet RegNet state dict (`stem.conv.weight`, `s1.b1.*`, optionally `head.fc.*`)."""
  return "stem.conv.weight" in sd and any(key.startswith("s1.b1.") for key in sd)


def detect_format(sd) -> str:
  keys = list(sd)
  if is_pycls(sd):  # before centerX: pycls's classifier is `head.fc.*`
    return "pycls"
  if any(key.startswith(_CENTERX_HEADS) for key in keys):
    return "centerx"
  if any(key.startswith(("deconv_layers.", "hm.")) for key in keys):
    return "xingyizhou"
  if "conv1.weight" in sd and any(key.startswith("layer1.") for key in keys):
    return "torchvision"
  raise ConversionError(
      f"unrecognised checkpoint naming ({len(keys)} keys, e.g. {keys[:8]}): "
      "expected centerX (backbone./upsample./head.), xingyizhou/CenterNet "
      "resdcn, torchvision ResNet or pycls RegNet names"
  )


_CN_HEADS = {"hm": "cls_head", "wh": "wh_head", "reg": "reg_head"}
_CN_HEAD_LAYERS = {"0": "feat_conv", "2": "out_conv"}
# position inside one CN deconv block of 6 (DCN, BN, ReLU, ConvTranspose, BN, ReLU)
_CN_DECONV_PARTS = {0: "dcn", 1: "dcn_bn", 3: "up_sample", 4: "up_bn"}


def _xingyizhou_name(key: str) -> Optional[str]:
  """CenterNet resdcn key -> centerX key (None if not part of a resdcn model)."""
  if key.startswith(("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")):
    return "backbone." + key
  match = re.match(r"^deconv_layers\.(\d+)\.(.+)$", key)
  if match:
    i, rest = int(match.group(1)), match.group(2)
    part = _CN_DECONV_PARTS.get(i % 6)
    if part is None:
      return None
    prefix = f"upsample.deconv{i // 6 + 1}."
    if part == "dcn":
      # DCNv2 lib `DCN`: weight/bias on the module itself, offsets from `conv_offset_mask`
      # (same (dy, dx)-per-tap channel layout as centerX's offset_mask_conv).
      if rest.startswith("conv_offset_mask."):
        return prefix + "dcn.offset_mask_conv." + rest[len("conv_offset_mask.") :]
      if rest in ("weight", "bias"):
        return prefix + "dcn.dcnv2." + rest
      return None
    return prefix + part + "." + rest
  match = re.match(r"^(hm|wh|reg)\.(\d+)\.(weight|bias)$", key)
  if match and match.group(2) in _CN_HEAD_LAYERS:
    return f"head.{_CN_HEADS[match.group(1)]}.{_CN_HEAD_LAYERS[match.group(2)]}.{match.group(3)}"
  return None


def to_centerx_names(sd, fmt: str) -> StateDict:
  """Renames a state dict to centerX keys. `.info` gets source_format, dropped [(key, reason)],
  renamed {new: old}, notes. Keys that cannot be renamed raise `ConversionError`."""
  info = dict(getattr(sd, "info", {}))
  out, dropped, renamed, notes, bad = {}, [], {}, [], []
  if fmt == "centerx":
    out = dict(sd)
  elif fmt == "torchvision":
    for key, value in sd.items():
      if key.startswith("fc."):
        dropped.append((key, "ImageNet classifier"))
        continue
      if not key.startswith(("conv1.", "bn1.", "layer")):
        bad.append(key)
        continue
      out["backbone." + key] = value
      renamed["backbone." + key] = key
    notes.append(
        "torchvision ImageNet ResNet: backbone only; the model must use "
        "input_format='RGB', pixel_mean=(0.485, 0.456, 0.406), "
        "pixel_std=(0.229, 0.224, 0.225) (centerX's defaults)"
    )
  elif fmt == "pycls":
    for key, value in sd.items():
      if key.startswith(_PYCLS_CLASSIFIER):
        dropped.append((key, "ImageNet classifier"))
        continue
      if not _PYCLS_MODULE.match(key):
        bad.append(key)
        continue
      out[_BACKBONE + key] = value
      renamed[_BACKBONE + key] = key
    notes.append(
        "pycls ImageNet RegNet: backbone only; the model must use model.onestage.backbone = "
        "this RegNet. pycls trained on BGR input with (0.406, 0.456, 0.485) / (0.225, 0.224, "
        "0.229); centerX's RegNet yamls feed RGB with (0.485, 0.456, 0.406) / (0.229, 0.224, "
        "0.225) (this family's defaults)"
    )
  elif fmt == "xingyizhou":
    if not any(key.startswith("deconv_layers.") and "conv_offset_mask" in key for key in sd):
      raise ConversionError(
          "xingyizhou/CenterNet checkpoint without DCN deconv layers (msra_resnet 'res_*', "
          "DLA-34 'dla_*' or hourglass): TODO, only the 'resdcn_*' architecture maps onto this "
          "model"
      )
    for key, value in sd.items():
      new = _xingyizhou_name(key)
      if new is None:
        bad.append(key)
        continue
      out[new] = value
      renamed[new] = key
    notes.append(
        "xingyizhou/CenterNet resdcn weights: the model must use input_format='BGR', "
        "pixel_mean=(0.408, 0.447, 0.470), pixel_std=(0.289, 0.274, 0.278) (CN's COCO "
        "values) and head_conv=64"
    )
  else:
    raise ConversionError(f"unknown format {fmt!r} (expected one of {FORMATS})")
  if bad:
    raise ConversionError(f"{len(bad)} {fmt} keys have no centerX equivalent: {bad[:30]}")
  info.update(
      source_format=fmt, dropped=dropped, renamed=renamed, notes=info.get("notes", []) + notes
  )
  return StateDict(out, info=info)


# ----------------------------------------------------------------------------------------------
# Mapping.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class OneStageReport:
  """What `convert_onestage` did. Rows are one line each in `summary()`."""

  source_format: str = "centerx"
  backbone_only: bool = False
  num_source_tensors: int = 0
  num_target_tensors: int = 0
  mapped: list = dataclasses.field(
      default_factory=list
  )  # (key, 'coll/path', src shape, flax shape, how)
  missing: list = dataclasses.field(default_factory=list)  # 'coll/path' without a source key
  unexpected: list = dataclasses.field(default_factory=list)  # source keys without a target
  misshaped: list = dataclasses.field(
      default_factory=list
  )  # (key, src shape, expected torch shape)
  dropped: list = dataclasses.field(default_factory=list)  # (key, reason)
  left_at_init: list = dataclasses.field(default_factory=list)  # backbone-only: 'coll/path'
  notes: list = dataclasses.field(default_factory=list)

  @property
  def ok(self) -> bool:
    return not (self.missing or self.unexpected or self.misshaped)

  def mapped_variables(self) -> list:
    """(collection, '.'-joined path) of every variable filled from the checkpoint."""
    return [tuple(target.split("/", 1)) for _, target, *_ in self.mapped]

  def unused_source_keys(self) -> list:
    """Source keys not loaded (dropped: the ImageNet classifier, BatchNorm counters)."""
    return [key for key, _ in self.dropped]

  def summary(self, max_list: int = 200, show_mapped: bool = True) -> str:
    lines = [
        (
            f"one-stage conversion of a {self.source_format} checkpoint"
            f"{' (backbone only)' if self.backbone_only else ''}: "
            f"{'OK' if self.ok else 'FAILED'}; {len(self.mapped)}/{self.num_source_tensors} "
            f"source tensors mapped onto {self.num_target_tensors} target variables"
        )
    ]

    def block(title, rows):
      if rows:
        lines.append(f"  {title} ({len(rows)}):")
        lines.extend(f"    {row}" for row in rows[:max_list])
        if len(rows) > max_list:
          lines.append(f"    ... and {len(rows) - max_list} more")

    block("UNEXPECTED source keys (no model variable)", self.unexpected)
    block("MISSING model variables (absent from the checkpoint)", self.missing)
    block(
        "MIS-SHAPED (key: checkpoint shape != expected torch shape)",
        [f"{key}: {tuple(shape)} != {tuple(e)}" for key, shape, e in self.misshaped],
    )
    block("dropped", [f"{key}: {reason}" for key, reason in self.dropped])
    block("left at initial values", self.left_at_init)
    if show_mapped:
      block(
          "mapped",
          [
              f"{key} {tuple(shape)} -> {path} {tuple(f)} ({how})"
              for key, path, shape, f, how in self.mapped
          ],
      )
    lines.extend(f"  NOTE: {note}" for note in self.notes)
    return "\n".join(lines)


def _is_transposed(module_path: str) -> bool:
  return module_path.rpartition(".")[2] in _TRANSPOSED


def _model_module(centerx_module: str) -> str:
  """centerX module name -> the model's module path: torchvision backbone names become the
  shared ResNet's detectron2 names (`backbone.layer1.0.bn1` -> `backbone.res2.0.conv1.norm`)."""
  if centerx_module.startswith(_BACKBONE):
    name = centerx_module[len(_BACKBONE) :]
    return _BACKBONE + (name if _PYCLS_MODULE.match(name) else _torchvision_name(name))
  return centerx_module


def _centerx_module(model_module: str) -> str:
  """The inverse of `_model_module` (`backbone.res3.0.shortcut.norm` ->
  `backbone.layer2.0.downsample.1`)."""
  if not model_module.startswith(_BACKBONE):
    return model_module
  name = model_module[len(_BACKBONE) :]
  if _PYCLS_MODULE.match(name):
    return model_module
  name = re.sub(r"^stem\.conv1\.norm(?=\.|$)", "bn1", name)
  name = re.sub(r"^stem\.", "", name)
  name = re.sub(r"^res([2-5])(?=\.|$)", lambda m: f"layer{int(m.group(1)) - 1}", name)
  name = re.sub(r"(^|\.)shortcut\.norm(?=\.|$)", r"\1downsample.1", name)
  name = re.sub(r"(^|\.)shortcut(?=\.|$)", r"\1downsample.0", name)
  name = re.sub(r"(^|\.)conv([1-3])\.norm(?=\.|$)", r"\1bn\2", name)
  return _BACKBONE + name


def _target_of(key: str, index) -> Tuple[Optional[str], Optional[str], str]:
  """(collection, path, how) for a centerX key; how in copy / conv / deconv / drop."""
  module, _, leaf = key.rpartition(".")
  module = _model_module(module)
  dotted_prefix = module + "." if module else ""
  if leaf == "num_batches_tracked":
    return None, None, "drop"
  if ("batch_stats", dotted_prefix + "mean") in index:  # a BatchNorm module
    return {
        "weight": ("params", dotted_prefix + "scale", "copy"),
        "bias": ("params", dotted_prefix + "bias", "copy"),
        "running_mean": ("batch_stats", dotted_prefix + "mean", "copy"),
        "running_var": ("batch_stats", dotted_prefix + "var", "copy"),
    }.get(leaf, (None, None, "none"))
  if leaf == "weight":
    return "params", dotted_prefix + "kernel", "deconv" if _is_transposed(module) else "conv"
  if leaf == "bias":
    return "params", dotted_prefix + "bias", "copy"
  return None, None, "none"


def _to_flax(a: np.ndarray, how: str) -> Optional[np.ndarray]:
  if how == "copy":
    return a
  if a.ndim != 4:
    return None
  return np.transpose(a, (2, 3, 0, 1) if how == "deconv" else (2, 3, 1, 0))


def _torch_shape(flax_shape: tuple, how: str) -> tuple:
  if how == "conv" and len(flax_shape) == 4:
    kh, kw, i, o = flax_shape
    return (o, i, kh, kw)
  if how == "deconv" and len(flax_shape) == 4:
    kh, kw, i, o = flax_shape
    return (i, o, kh, kw)
  return tuple(flax_shape)


def convert_onestage(sd, target_variables, *, backbone_only: bool = False):
  """Maps a centerX-named state dict onto `target_variables`.

  Args:
    sd: `{centerX key: array}` (torch layouts), e.g. from `to_centerx_names`.
    target_variables: the model's `{'params', 'batch_stats'}` tree of arrays or
      `jax.ShapeDtypeStruct` (structure, shapes and dtypes of the result).
    backbone_only: map only `backbone.*` (ImageNet init); other variables keep their values from
      `target_variables`, which must then be arrays.
  Returns:
    (variables, report): `variables` has the treedef of `target_variables`, numpy leaves.
  Raises:
    ConversionError (with `.report`) on any missing, unexpected or mis-shaped key.
  """
  info = dict(getattr(sd, "info", {}))
  leaves, treedef, index = _index(target_variables)
  report = OneStageReport(
      source_format=info.get("source_format", "centerx"),
      backbone_only=backbone_only,
      num_source_tensors=len(sd),
      num_target_tensors=len(leaves),
      dropped=list(info.get("dropped", [])),
      notes=list(info.get("notes", [])),
  )
  in_scope = lambda path: (not backbone_only) or path.startswith("backbone.")  # noqa: E731
  out = [None] * len(leaves)
  for key, value in sd.items():
    coll, path, how = _target_of(key, index)
    if how == "drop":
      report.dropped.append((key, "BatchNorm counter (unused with an explicit momentum)"))
      continue
    if coll is None or (coll, path) not in index or not in_scope(key):
      report.unexpected.append(key)
      continue
    i = index[(coll, path)]
    leaf = leaves[i][1]
    want = tuple(int(dim) for dim in leaf.shape)
    array = np.asarray(value)
    flax_array = _to_flax(array, how)
    if flax_array is None or tuple(flax_array.shape) != want:
      report.misshaped.append((key, tuple(array.shape), _torch_shape(want, how)))
      continue
    out[i] = np.array(flax_array, dtype=np.dtype(leaf.dtype), order="C", copy=True)
    report.mapped.append((key, f"{coll}/{path}", tuple(array.shape), want, how))
  for i, (kp, leaf) in enumerate(leaves):
    if out[i] is not None:
      continue
    coll, path = _key_str(kp[0]), ".".join(_key_str(key) for key in kp[1:])
    if in_scope(path):
      report.missing.append(f"{coll}/{path}")
    elif isinstance(leaf, jax.ShapeDtypeStruct) or not hasattr(leaf, "__array__"):
      report.missing.append(f"{coll}/{path} (outside the backbone, but the target is abstract)")
    else:
      report.left_at_init.append(f"{coll}/{path}")
      out[i] = np.asarray(leaf)
  if not report.ok:
    raise ConversionError(report.summary(max_list=50), report)
  return jax.tree_util.tree_unflatten(treedef, out), report


def named_flax_tensors(sd, target_variables):
  """The tensors of a centerX-named state dict in this project's names and layouts, whatever
  their shapes (fine-tuning compares the shapes itself, weights/finetune.py).

  Returns ({(collection, '.'-joined path): array}, report); `target_variables` only supplies the
  names. Keys with no target variable are in `report.unexpected`."""
  info = dict(getattr(sd, "info", {}))
  _, _, index = _index(target_variables)
  report = OneStageReport(
      source_format=info.get("source_format", "centerx"),
      num_source_tensors=len(sd),
      dropped=list(info.get("dropped", [])),
  )
  out = {}
  for key, value in sd.items():
    coll, path, how = _target_of(key, index)
    if how == "drop":
      report.dropped.append((key, "BatchNorm counter (unused with an explicit momentum)"))
      continue
    if coll is None or (coll, path) not in index:
      report.unexpected.append(key)
      continue
    array = np.asarray(value)
    flax_array = _to_flax(array, how)
    out[(coll, path)] = np.array(array if flax_array is None else flax_array, np.float32)
  return out, report


def official_named_tensors(state_dict, abstract):
  """Every tensor of a centerX / xingyizhou CenterNet checkpoint in this project's names and
  layouts (any shapes): ({(collection, '.'-path): array}, unmapped source keys, dropped keys)."""
  renamed = to_centerx_names(state_dict, detect_format(state_dict))
  named, report = named_flax_tensors(renamed, abstract)
  return named, list(report.unexpected), [key for key, _ in report.dropped]


def torch_key_of(collection: str, path: str) -> Tuple[str, str]:
  """('.'-joined Flax path in `collection`) -> (centerX key, how) with how in copy/conv/deconv."""
  module, _, leaf = path.rpartition(".")
  transposed = _is_transposed(module)
  module = _centerx_module(module)
  dotted_prefix = module + "." if module else ""
  if collection == "batch_stats":
    return dotted_prefix + {"mean": "running_mean", "var": "running_var"}[leaf], "copy"
  if leaf == "scale":
    return dotted_prefix + "weight", "copy"
  if leaf == "kernel":
    return dotted_prefix + "weight", "deconv" if transposed else "conv"
  return dotted_prefix + leaf, "copy"


def export_state_dict(variables, *, collections=("params", "batch_stats")) -> Dict[str, np.ndarray]:
  """Flax variables (or a gradient tree of `params`, passed as `{'params': grads}`) ->
  `{centerX key: float32 array in torch layout}`, the inverse of `convert_onestage`."""
  out = {}
  for coll in collections:
    if coll not in variables:
      continue
    for kp, leaf in jax.tree_util.tree_flatten_with_path(variables[coll])[0]:
      path = ".".join(_key_str(key) for key in kp)
      key, how = torch_key_of(coll, path)
      array = np.asarray(leaf)
      if how == "conv":
        array = np.transpose(array, (3, 2, 0, 1))
      elif how == "deconv":
        array = np.transpose(array, (2, 3, 0, 1))
      out[key] = np.ascontiguousarray(array)
  return out


def _regnet_signature(stages, se: bool) -> tuple:
  """(per stage: (blocks, width, group width), SE) of a RegNet."""
  return tuple((s.depth, s.width, s.group_w) for s in stages), se


def infer_regnet(sd, prefix: str = _BACKBONE) -> str:
  """The `REGNETS` name of the RegNet whose weights `sd` holds under `prefix` (per-stage blocks,
  widths, group widths and SE read off the keys and shapes)."""
  blocks, widths, group_ws, se = {}, {}, {}, False
  for key in sd:
    match = re.match(rf"^{re.escape(prefix)}s(\d+)\.b(\d+)\.(.+)$", key)
    if not match:
      continue
    stage, i, rest = int(match.group(1)), int(match.group(2)), match.group(3)
    blocks[stage] = max(blocks.get(stage, 0), i)
    se |= rest.startswith("f.se.")
    if i == 1 and rest == "f.c.weight":
      widths[stage] = int(np.shape(sd[key])[0])
    if i == 1 and rest == "f.b.weight":
      group_ws[stage] = int(np.shape(sd[key])[1])
  stages = sorted(blocks)
  found = (
      tuple((blocks[s], widths.get(s), group_ws.get(s)) for s in stages),
      se,
  )
  for name, params in REGNETS.items():
    if _regnet_signature(regnet_stages(params), params.se_r > 0) == found:
      return name
  raise ConversionError(
      f"RegNet weights with (blocks, width, group width) per stage {found[0]} and "
      f"{'' if se else 'no '}SE are none of the known RegNets {sorted(REGNETS)}"
  )


def _infer_resnet(sd) -> Dict[str, Any]:
  """depth and backbone_width of a centerX (torchvision-named) ResNet backbone."""
  blocks = {}
  bottleneck = False
  for key in sd:
    match = re.match(r"^backbone\.layer([1-4])\.(\d+)\.(conv3)?", key)
    if match:
      stage, i = int(match.group(1)), int(match.group(2))
      blocks[stage] = max(blocks.get(stage, 0), i + 1)
      bottleneck |= match.group(3) is not None
  counts = tuple(blocks.get(stage, 0) for stage in (1, 2, 3, 4))
  kind = "bottleneck" if bottleneck else "basic"
  depth = [candidate for candidate, spec in BLOCKS_BY_DEPTH.items() if spec == (kind, counts)]
  if not depth:
    raise ConversionError(f"cannot infer the ResNet depth from {kind} blocks {counts}")
  return dict(depth=depth[0], backbone_width=int(np.shape(sd["backbone.conv1.weight"])[0]))


def infer_model_config(sd) -> Dict[str, Any]:
  """Architecture options of `CenterNetOneStage` read off a centerX-named state dict:
  backbone_name (a RegNet; absent for the default ResNet) or depth and backbone_width (ResNet),
  num_classes, deconv_channels, use_deform, modulate_deform, head_conv."""
  if _BACKBONE + "stem.conv.weight" in sd:  # centerX build_regnet
    backbone = dict(backbone_name=infer_regnet(sd))
  else:
    backbone = _infer_resnet(sd)
  channels, deform, modulate = [], None, None
  for i in (1, 2, 3):
    prefix = f"upsample.deconv{i}."
    if prefix + "up_sample.weight" not in sd:
      raise ConversionError(f"{prefix}up_sample.weight missing: not a centerX deconv neck")
    channels.append(int(np.shape(sd[prefix + "up_sample.weight"])[1]))
    has_deform = (
        prefix + "dcn.offset_mask_conv.weight" in sd or prefix + "dcn.offset_conv.weight" in sd
    )
    has_modulate = prefix + "dcn.offset_mask_conv.weight" in sd
    deform = has_deform if deform is None else deform
    modulate = has_modulate if modulate is None else modulate
  if "head.cls_head.out_conv.weight" not in sd:
    raise ConversionError("head.cls_head.out_conv.weight missing")
  return dict(
      **backbone,
      num_classes=int(np.shape(sd["head.cls_head.out_conv.weight"])[0]),
      deconv_channels=tuple(channels),
      use_deform=bool(deform),
      modulate_deform=bool(modulate),
      head_conv=int(np.shape(sd["head.cls_head.feat_conv.weight"])[0]),
  )


def load_onestage_weights(path_or_sd, target_variables, *, backbone_only: Optional[bool] = None):
  """File (or an already loaded dict) -> (variables, report). torchvision weights are
  backbone-only (then `target_variables` must hold real arrays for the rest)."""
  if isinstance(path_or_sd, (str, Path)):
    sd = load_checkpoint_file(path_or_sd)  # also unwraps xingyizhou's {'state_dict': ...}
  else:
    sd = path_or_sd
  fmt = detect_format(sd)
  sd = to_centerx_names(sd, fmt)
  if backbone_only is None:
    backbone_only = fmt in ("torchvision", "pycls")
  if fmt in ("torchvision", "pycls") and not backbone_only:
    raise ConversionError(
        f"{fmt} ImageNet weights hold a backbone only: pass " "backbone_only=True"
    )
  return convert_onestage(sd, target_variables, backbone_only=backbone_only)


if __name__ == "__main__":  # the one-stage converter is part of the one CLI now
  sys.exit(
      "python -m cn2_jax.weights.onestage is now python -m cn2_jax.convert (it detects centerX / "
      "xingyizhou/CenterNet weights; --family onestage for torchvision ones)"
  )
