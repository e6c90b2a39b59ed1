"""Mapping a detectron2-named state dict onto this project's Flax variables, strictly.

`convert_to_flax(sd, target_variables)` follows the naming contract of docs/DESIGN.md (conv OIHW ->
HWIO, linear (out, in) -> (in, out), GroupNorm weight -> scale, FrozenBatchNorm in the `frozen`
collection) and returns `(variables, ConversionReport)`; unknown, missing, ambiguous or mis-shaped
keys raise `ConversionError` with the full report.

FrozenBatchNorm statistics follow detectron2's `FrozenBatchNorm2d._load_from_state_dict`: when a
module's state-dict version is unknown (a plain dict, e.g. every `.pkl`) or < 2 and both its
`running_mean` and `running_var` are absent (MSRA caffe2 weights carry only the folded `_bn_s`,
`_bn_b`), they are filled with 0 and 1 (not 1 - eps); when a version < 3 is recorded in a torch
checkpoint's metadata, eps is subtracted from `running_var`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from cn2_jax.errors import ConversionError
from cn2_jax.tree_paths import key_str as _key_str
from cn2_jax.weights.rename import (
    BACKBONE_PREFIX,
    FROZEN_BN_EPS,
    detect_format,
    to_detectron2_names,
)

# ----------------------------------------------------------------------------------------------
# Mapping onto the Flax variables.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ConversionReport:
  """Everything `convert_to_flax` did, and everything that went wrong."""

  source_format: str = "detectron2"
  backbone_only: bool = False
  num_source_tensors: int = 0
  mapped: list = dataclasses.field(
      default_factory=list
  )  # (src, coll, path, src_shape, flax_shape, how)
  unknown_keys: list = dataclasses.field(default_factory=list)  # source keys with no target
  missing_keys: list = dataclasses.field(default_factory=list)  # target paths with no source
  shape_mismatches: list = dataclasses.field(
      default_factory=list
  )  # (key, src_shape, expected_torch, flax_shape)
  dtype_problems: list = dataclasses.field(default_factory=list)  # (key, dtype)
  ambiguous_keys: list = dataclasses.field(default_factory=list)  # (key, [candidates])
  skipped_keys: list = dataclasses.field(default_factory=list)  # backbone_only: outside bottom_up
  dropped_keys: list = dataclasses.field(default_factory=list)  # (key, reason) by the renaming
  left_at_init: list = dataclasses.field(default_factory=list)  # backbone_only: 'coll/path'
  abstract_left: list = dataclasses.field(default_factory=list)  # left at init but not arrays
  filled_defaults: list = dataclasses.field(default_factory=list)  # FrozenBN stats (d2 rule)
  eps_adjusted: list = dataclasses.field(default_factory=list)  # running_var -= eps (version < 3)
  cast: list = dataclasses.field(default_factory=list)  # (key, src dtype, dst dtype)
  notes: list = dataclasses.field(default_factory=list)
  num_target_tensors: int = 0
  num_target_elements: int = 0

  @property
  def ok(self) -> bool:
    return not (
        self.unknown_keys
        or self.missing_keys
        or self.shape_mismatches
        or self.dtype_problems
        or self.ambiguous_keys
        or self.abstract_left
    )

  def _count(self, coll=None):
    rows = [row for row in self.mapped if coll is None or row[1] == coll]
    return len(rows), int(sum(int(np.prod(row[4], dtype=np.int64)) for row in rows))

  @property
  def num_mapped_tensors(self) -> int:
    return self._count()[0]

  @property
  def num_mapped_elements(self) -> int:
    return self._count()[1]

  @property
  def num_mapped_params(self) -> int:
    """Elements mapped into the learnable `params` collection (= official parameter count)."""
    return self._count("params")[1]

  @property
  def num_mapped_frozen(self) -> int:
    """Elements mapped into the `frozen` collection (FrozenBatchNorm weight/bias/stats)."""
    return self._count("frozen")[1]

  def counts(self) -> dict:
    t_p, e_p = self._count("params")
    t_f, e_f = self._count("frozen")
    return dict(
        source_tensors=self.num_source_tensors,
        mapped_tensors=self.num_mapped_tensors,
        mapped_elements=self.num_mapped_elements,
        params_tensors=t_p,
        params_elements=e_p,
        frozen_tensors=t_f,
        frozen_elements=e_f,
        target_tensors=self.num_target_tensors,
        target_elements=self.num_target_elements,
        left_at_init=len(self.left_at_init),
        skipped=len(self.skipped_keys),
        dropped=len(self.dropped_keys),
        filled_defaults=len(self.filled_defaults),
    )

  def mapped_variables(self) -> list:
    """(collection, '.'-joined path) of every variable filled from the checkpoint."""
    return [(coll, path) for _, coll, path, *_ in self.mapped]

  def unused_source_keys(self) -> list:
    """Source keys not loaded: outside the backbone (backbone-only) or dropped by the renaming."""
    return list(self.skipped_keys) + [key for key, _ in self.dropped_keys]

  def to_dict(self) -> dict:
    fields = dataclasses.asdict(self)
    fields["counts"] = self.counts()
    fields["ok"] = self.ok
    return fields

  def summary(self, max_list: int = 50) -> str:
    counts = self.counts()
    lines = [
        f"conversion of a {self.source_format} checkpoint"
        f"{' (backbone only)' if self.backbone_only else ''}: "
        f"{'OK' if self.ok else 'FAILED'}",
        f"  source: {counts['source_tensors']} tensors ({counts['dropped']} dropped by the renaming, "
        f"{counts['skipped']} skipped, {counts['filled_defaults']} FrozenBN statistics filled)",
        f"  mapped {counts['mapped_tensors']} tensors onto {counts['target_tensors']} target variables "
        f"({counts['left_at_init']} left at init): params {counts['params_tensors']} tensors / "
        f"{counts['params_elements']:,} elements, frozen {counts['frozen_tensors']} tensors / "
        f"{counts['frozen_elements']:,} elements",
    ]

    def block(title, items):
      if items:
        lines.append(f"  {title} ({len(items)}):")
        for item in items[:max_list]:
          lines.append(f"    {item}")
        if len(items) > max_list:
          lines.append(f"    ... and {len(items) - max_list} more")

    block("UNKNOWN source keys (no matching model variable)", self.unknown_keys)
    block("MISSING model variables (absent from the checkpoint)", self.missing_keys)
    block(
        "SHAPE mismatches (key, checkpoint shape, expected torch shape, flax shape)",
        self.shape_mismatches,
    )
    block("DTYPE problems", self.dtype_problems)
    block("AMBIGUOUS keys", self.ambiguous_keys)
    block(
        "left at initial values but the target is abstract (pass real arrays)", self.abstract_left
    )
    block("dropped by the renaming", [f"{key}: {reason}" for key, reason in self.dropped_keys])
    block("skipped (outside backbone.bottom_up, backbone-only mode)", self.skipped_keys)
    block("left at initial values", self.left_at_init)
    block(
        "FrozenBN statistics filled as detectron2 does (running_mean 0, running_var 1)",
        self.filled_defaults,
    )
    block("FrozenBN running_var -= eps (module version < 3)", self.eps_adjusted)
    if self.cast:
      lines.append(f"  cast {len(self.cast)} tensors to the model dtype " f"(e.g. {self.cast[0]})")
    for note in self.notes:
      lines.append(f"  NOTE: {note}")
    return "\n".join(lines)


def _leaf_shape_dtype(leaf):
  shape = leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)
  dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
  return tuple(int(dim) for dim in shape), np.dtype(dtype)


def _candidates(key: str):
  """(collection, '.'-path) a detectron2 key may map to, with the layout change to apply."""
  prefix, _, leaf = key.rpartition(".")
  dotted_prefix = prefix + "." if prefix else ""
  if leaf == "weight":
    return [
        ("params", dotted_prefix + "kernel", "kernel"),
        ("params", dotted_prefix + "scale", "copy"),
        ("frozen", dotted_prefix + "weight", "copy"),
        ("params", dotted_prefix + "weight", "copy"),
    ]
  if leaf == "bias":
    return [("params", dotted_prefix + "bias", "copy"), ("frozen", dotted_prefix + "bias", "copy")]
  if leaf in ("running_mean", "running_var"):
    return [("frozen", key, "copy")]
  return [("params", key, "copy"), ("frozen", key, "copy")]


def _kernel_layout(a: np.ndarray) -> Optional[np.ndarray]:
  if a.ndim == 4:  # conv OIHW -> HWIO
    return np.transpose(a, (2, 3, 1, 0))
  if a.ndim == 2:  # linear (out, in) -> (in, out)
    return a.T
  return None


def _torch_shape_of_kernel(shape: tuple) -> tuple:
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2:
    return (shape[1], shape[0])
  return shape


def _with_frozen_bn_statistics(d2_state_dict, info, index, in_scope, report) -> dict:
  """A copy of the state dict with detectron2's FrozenBatchNorm2d._load_from_state_dict rules
  applied to the modules that are FrozenBN in the target (`index`)."""
  src = dict(d2_state_dict)
  versions = info.get("module_versions", {}) or {}
  for (coll, path), _ in index.items():
    if coll != "frozen" or not path.endswith(".running_mean") or not in_scope(path):
      continue
    mod = path[: -len(".running_mean")]
    if not (mod + ".weight" in src or mod + ".bias" in src):
      continue  # the whole module is absent: reported as missing below
    version = versions.get(mod)
    weight_shape = np.shape(src.get(mod + ".weight", src.get(mod + ".bias")))
    # Only when both statistics are absent (caffe2 blobs carry none): a lone missing one is an
    # incomplete checkpoint and stays an error.
    if (version is None or version < 2) and not (
        mod + ".running_mean" in src or mod + ".running_var" in src
    ):
      src[mod + ".running_mean"] = np.zeros(weight_shape, np.float32)
      src[mod + ".running_var"] = np.ones(weight_shape, np.float32)
      report.filled_defaults += [mod + ".running_mean", mod + ".running_var"]
    if version is not None and version < 3 and mod + ".running_var" in src:
      src[mod + ".running_var"] = np.asarray(src[mod + ".running_var"]) - np.float32(FROZEN_BN_EPS)
      report.eps_adjusted.append(mod + ".running_var")
  return src


def _resolve(key: str, index, report):
  """(collection, '.'-path, how) of the one target variable `key` names, or None (recorded in
  `report` as unknown or ambiguous)."""
  hits = [(coll, path, how) for coll, path, how in _candidates(key) if (coll, path) in index]
  if not hits:
    report.unknown_keys.append(key)
    return None
  if len(hits) > 1:
    report.ambiguous_keys.append((key, [f"{coll}/{path}" for coll, path, _ in hits]))
    return None
  return hits[0]


def _index(target_variables):
  """(leaves with paths, treedef, {(collection, '.'-joined path): leaf position})."""
  import jax  # start-up time: keeps the file-reading half importable without jax

  leaves, treedef = jax.tree_util.tree_flatten_with_path(target_variables)
  index = {}
  for i, (kp, _) in enumerate(leaves):
    names = [_key_str(key) for key in kp]
    index[(names[0], ".".join(names[1:]))] = i
  return leaves, treedef, index


def named_flax_tensors(d2_state_dict, target_variables):
  """The tensors of a detectron2-named state dict in this project's names and layouts, whatever
  their shapes (fine-tuning compares the shapes itself, weights/finetune.py).

  Returns ({(collection, '.'-joined path): array}, report); `target_variables` (arrays or
  ShapeDtypeStructs) only supplies the names. Keys with no target variable are in
  `report.unknown_keys`; ambiguous ones raise ConversionError."""
  info = dict(getattr(d2_state_dict, "info", {}))
  report = ConversionReport(
      source_format=info.get("source_format", "detectron2"),
      num_source_tensors=len(d2_state_dict),
      dropped_keys=list(info.get("dropped", [])),
  )
  _, _, index = _index(target_variables)
  src = _with_frozen_bn_statistics(d2_state_dict, info, index, lambda _: True, report)
  out = {}
  for key, value in src.items():
    hit = _resolve(key, index, report)
    if hit is None:
      continue
    coll, path, how = hit
    array = np.asarray(value)
    flax_array = _kernel_layout(array) if how == "kernel" else array
    floating = np.issubdtype(array.dtype, np.floating)
    out[(coll, path)] = np.array(
        array if flax_array is None else flax_array, np.float32 if floating else array.dtype
    )
  if report.ambiguous_keys:
    raise ConversionError(report.summary(), report)
  return out, report


def convert_to_flax(d2_state_dict, target_variables, *, backbone_only: bool = False):
  """Maps a detectron2-named state dict onto `target_variables`.

  Args:
    d2_state_dict: `{detectron2 key: array}` (torch layout), e.g. from `to_detectron2_names`.
    target_variables: the model's variables pytree (`{'params': ..., 'frozen': ...}`) of arrays or
      `jax.ShapeDtypeStruct`; it fixes the structure, shapes and dtypes of the result.
    backbone_only: fill only `backbone.bottom_up.*`; other source keys are skipped and other
      target variables keep their values from `target_variables` (which must then be arrays).
  Returns:
    (variables, report): `variables` has the treedef of `target_variables`, numpy leaves.
  Raises:
    ConversionError (with `.report`) on any unknown, missing, ambiguous or mis-shaped key.
  """
  import jax  # start-up time: keeps the file-reading half importable without jax

  info = dict(getattr(d2_state_dict, "info", {}))
  report = ConversionReport(
      source_format=info.get("source_format", "detectron2"),
      backbone_only=backbone_only,
      num_source_tensors=len(d2_state_dict),
      dropped_keys=list(info.get("dropped", [])),
      notes=list(info.get("notes", [])),
  )
  leaves, treedef, index = _index(target_variables)  # (collection, '.'-path) -> leaf position
  report.num_target_tensors = len(leaves)
  report.num_target_elements = int(
      sum(int(np.prod(_leaf_shape_dtype(leaf)[0], dtype=np.int64)) for _, leaf in leaves)
  )

  def in_scope(path: str) -> bool:
    return (not backbone_only) or path.startswith(BACKBONE_PREFIX)

  src = _with_frozen_bn_statistics(d2_state_dict, info, index, in_scope, report)
  out = [None] * len(leaves)
  for key, value in src.items():
    if not in_scope(key):
      report.skipped_keys.append(key)
      continue
    hit = _resolve(key, index, report)
    if hit is None:
      continue
    coll, path, how = hit
    i = index[(coll, path)]
    if out[i] is not None:
      report.ambiguous_keys.append((key, [f"{coll}/{path} (already filled)"]))
      continue
    want_shape, want_dtype = _leaf_shape_dtype(leaves[i][1])
    array = np.asarray(value)
    if not (np.issubdtype(array.dtype, np.floating) or array.dtype == want_dtype):
      report.dtype_problems.append((key, str(array.dtype)))
      continue
    flax_array = _kernel_layout(array) if how == "kernel" else array
    if flax_array is None or tuple(flax_array.shape) != want_shape:
      expect = _torch_shape_of_kernel(want_shape) if how == "kernel" else want_shape
      report.shape_mismatches.append((key, tuple(array.shape), tuple(expect), want_shape))
      continue
    if flax_array.dtype != want_dtype:
      report.cast.append((key, str(array.dtype), str(want_dtype)))
    out[i] = np.array(flax_array, dtype=want_dtype, order="C", copy=True)
    report.mapped.append((key, coll, path, tuple(array.shape), want_shape, how))

  for i, (kp, leaf) in enumerate(leaves):
    if out[i] is not None:
      continue
    coll, path = _key_str(kp[0]), ".".join(_key_str(key) for key in kp[1:])
    if in_scope(path):
      report.missing_keys.append(f"{coll}/{path}")
    else:
      report.left_at_init.append(f"{coll}/{path}")
      if isinstance(leaf, jax.ShapeDtypeStruct) or not hasattr(leaf, "__array__"):
        report.abstract_left.append(f"{coll}/{path}")
      else:
        out[i] = np.asarray(leaf)
  if not report.ok:
    raise ConversionError(report.summary(), report)
  return jax.tree_util.tree_unflatten(treedef, out), report


def convert_official(state_dict, variables, *, backbone_only: bool = False):
  """A detectron2 / CenterNet2 checkpoint or an MSRA / torchvision ImageNet ResNet (format
  detected from the keys, renamed to detectron2 names) mapped strictly onto `variables`:
  (variables, ConversionReport)."""
  renamed = to_detectron2_names(state_dict, detect_format(state_dict))
  return convert_to_flax(renamed, variables, backbone_only=backbone_only)


def official_named_tensors(state_dict, abstract):
  """Every tensor of an official checkpoint in this project's names and layouts (any shapes):
  ({(collection, '.'-path): array}, unmapped source keys, keys dropped by the renaming)."""
  named, report = named_flax_tensors(
      to_detectron2_names(state_dict, detect_format(state_dict)), abstract
  )
  return named, list(report.unknown_keys), [key for key, _ in report.dropped_keys]
