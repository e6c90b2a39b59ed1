"""Convert official detectron2 / CenterNet2 weights (and ImageNet ResNet initialisations) to
cn2_jax Flax variables, and save / restore them with Orbax.

Usage:
  python -m cn2_jax.convert --src model_final.pth --out /ckpt/cn2_r50 [--config configs/cn2_r50.py]
  python -m cn2_jax.convert --src R-50.pkl --out /ckpt/r50_imagenet --backbone-only

Pipeline (each step is a library function, tested on its own):
  1. `load_checkpoint_file(path)`: reads a torch `.pth` (zip format of torch >= 1.6, or the legacy
     pre-1.6 format) with a restricted unpickler -- torch is never imported -- or a `.pkl` (pickled
     dict of numpy arrays; detectron2 model-zoo or caffe2 / MSRA blobs). Returns a flat
     `{name: np.ndarray}` (a `StateDict`, which also carries `.info` about the file).
  2. `detect_format(sd)`: 'detectron2' | 'msra_c2' | 'torchvision'.
  3. `to_detectron2_names(sd, fmt)`: renames the ImageNet formats to `backbone.bottom_up.*` keys,
     exactly as detectron2 does (`c2_model_loading.convert_basic_c2_names`, and the model-zoo
     torchvision conversion), dropping the classifier.
  4. `convert_to_flax(sd, target_variables)`: maps every key onto the target pytree following the
     naming contract of docs/DESIGN.md (conv OIHW -> HWIO, linear (out, in) -> (in, out), GroupNorm
     weight -> scale, FrozenBatchNorm in the `frozen` collection). Strict: unknown, missing,
     ambiguous or mis-shaped keys raise `ConversionError` with the full report.
  5. `save_variables` / `restore_variables`: Orbax StandardCheckpointer of
     `{'params': ..., 'frozen': ...}`.

FrozenBatchNorm statistics follow detectron2's `FrozenBatchNorm2d._load_from_state_dict`: when a
module's state-dict version is unknown (a plain dict, e.g. every `.pkl`) or < 2 and both its
`running_mean` and `running_var` are absent (MSRA caffe2 weights carry only the folded `_bn_s`,
`_bn_b`), they are filled with 0 and 1 (not 1 - eps); when a version < 3 is recorded in a torch
checkpoint's metadata, eps is subtracted from `running_var`.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.util
import io
import pickle
import re
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

__all__ = [
    "ConversionError", "ConversionReport", "StateDict", "load_checkpoint_file", "detect_format",
    "to_detectron2_names", "convert_to_flax", "save_variables", "restore_variables",
    "format_expectations", "main",
]

BACKBONE_PREFIX = "backbone.bottom_up."
FROZEN_BN_EPS = 1e-5

# What the ImageNet initialisations assume about the model (reported to the user).
FORMAT_EXPECTATIONS = {
    "msra_c2": dict(stride_in_1x1=True, input_format="BGR",
                    pixel_mean=(103.530, 116.280, 123.675), pixel_std=(1.0, 1.0, 1.0)),
    "torchvision": dict(stride_in_1x1=False, input_format="RGB",
                        pixel_mean=(123.675, 116.280, 103.530),
                        pixel_std=(58.395, 57.120, 57.375)),
}


class ConversionError(Exception):
  """Raised for unreadable files and for any incomplete / inconsistent conversion.

  `report` is the `ConversionReport` when the failure happened during the mapping.
  """

  def __init__(self, message: str, report: "Optional[ConversionReport]" = None):
    super().__init__(message)
    self.report = report


class StateDict(dict):
  """A `{name: np.ndarray}` dict with `.info` about where it came from.

  info keys: path, container ('torch_zip' | 'torch_legacy' | 'pickle'), author,
  matching_heuristics, module_versions ({module prefix: version} from a torch state-dict's
  `_metadata`, empty when absent), and after `to_detectron2_names`: source_format, dropped
  ([(key, reason)]), renamed ({new: original}), notes ([str]).
  """

  def __init__(self, *args, info: Optional[dict] = None, **kwargs):
    super().__init__(*args, **kwargs)
    self.info = dict(info or {})


# ----------------------------------------------------------------------------------------------
# Restricted unpickling.
# ----------------------------------------------------------------------------------------------

class _Opaque:
  """Stand-in for any global the restricted unpickler does not know (optimizer / scheduler
  objects next to the weights). It only records its arguments; no foreign code runs."""
  _qualname = "?"

  def __init__(self, *args, **kwargs):
    self.args, self.kwargs = args, kwargs

  def __setstate__(self, state):
    self.state = state

  def __call__(self, *args, **kwargs):  # used as a REDUCE callable
    return type(self)(*args, **kwargs)

  def __repr__(self):
    return f"<opaque {self._qualname}>"


_OPAQUE_CLASSES: dict = {}


def _opaque(module: str, name: str):
  key = f"{module}.{name}"
  if key not in _OPAQUE_CLASSES:
    _OPAQUE_CLASSES[key] = type("Opaque_" + re.sub(r"\W", "_", key), (_Opaque,),
                                {"_qualname": key})
  return _OPAQUE_CLASSES[key]


# torch storage class name -> numpy dtype ('bfloat16' is decoded by hand).
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  name: str


@dataclasses.dataclass
class _StorageRef:
  """A torch storage: `key` in the archive, `dtype` name, element count, optional view."""
  key: str
  dtype_name: str
  numel: Optional[int]
  view: Optional[tuple] = None  # legacy format: (offset, size) into the root storage


@dataclasses.dataclass
class _LazyTensor:
  storage: _StorageRef
  offset: int
  size: tuple
  stride: tuple


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _StorageRef):
    raise pickle.UnpicklingError(f"tensor storage is {type(storage).__name__}, not a storage")
  return _LazyTensor(storage, int(storage_offset), tuple(int(s) for s in size),
                     tuple(int(s) for s in stride))


def _rebuild_tensor(storage, storage_offset, size, stride):  # torch < 1.0 name
  return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  del new_type, state
  return func(*args)


def _latin1_encode(obj, encoding="latin1"):
  """`_codecs.encode` as protocol-2 pickles of bytes use it; only latin-1 is accepted."""
  if encoding.lower().replace("-", "") not in ("latin1", "iso88591"):
    raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
  return obj.encode("latin1")


def _numpy_global(name: str):
  from numpy._core import multiarray, numeric  # numpy >= 2
  return {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar,
          "_frombuffer": numeric._frombuffer}[name]


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only the globals needed for weights.

  Allowed: collections.OrderedDict, torch tensor/parameter rebuild functions (replaced by our own
  lazy versions), torch storage classes (as markers), numpy array/dtype/scalar reconstruction.
  Any other global becomes an inert `_Opaque` class.
  """

  def __init__(self, file, storage_loader=None):
    super().__init__(file, encoding="latin1")
    self._storage_loader = storage_loader

  def find_class(self, module, name):
    if module in ("collections", "builtins", "__builtin__") and name == "OrderedDict":
      return collections.OrderedDict
    if module in ("builtins", "__builtin__") and name in ("set", "frozenset", "slice", "complex",
                                                          "bytearray"):
      return {"set": set, "frozenset": frozenset, "slice": slice, "complex": complex,
              "bytearray": bytearray}[name]
    if module == "torch._utils":
      fn = {"_rebuild_tensor_v2": _rebuild_tensor_v2, "_rebuild_tensor": _rebuild_tensor,
            "_rebuild_parameter": _rebuild_parameter,
            "_rebuild_parameter_with_state": _rebuild_parameter,
            "_rebuild_from_type_v2": _rebuild_from_type_v2}.get(name)
      if fn is not None:
        return fn
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in (
        "_reconstruct", "scalar"):
      return _numpy_global(name)
    if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
      return _numpy_global(name)
    if module == "_codecs" and name == "encode":
      return _latin1_encode
    if module == "numpy" and name == "ndarray":
      return np.ndarray
    if module == "numpy" and name == "dtype":
      return np.dtype
    return _opaque(module, name)

  def persistent_load(self, pid):
    if self._storage_loader is None:
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r} in a plain pickle")
    return self._storage_loader(pid)


def _storage_dtype_name(storage_type) -> str:
  if isinstance(storage_type, _StorageType):
    return storage_type.name
  if isinstance(storage_type, str):  # some writers store the dtype name directly
    return storage_type
  raise pickle.UnpicklingError(f"unknown storage type {storage_type!r}")


def _decode_storage(raw: bytes, dtype_name: str, big_endian: bool) -> np.ndarray:
  if dtype_name not in _STORAGE_DTYPES:
    raise pickle.UnpicklingError(f"unsupported storage type {dtype_name}")
  dt = _STORAGE_DTYPES[dtype_name]
  if dt == "bfloat16":
    u16 = np.frombuffer(raw, dtype=">u2" if big_endian else "<u2").astype(np.uint32)
    return (u16 << 16).view(np.float32)
  dt = np.dtype(dt)
  if big_endian and dt.itemsize > 1:
    dt = dt.newbyteorder(">")
  if len(raw) % dt.itemsize:
    raise pickle.UnpicklingError(f"storage of {len(raw)} bytes is not a multiple of {dt}")
  return np.frombuffer(raw, dtype=dt)


def _materialise(t: _LazyTensor, storages: dict) -> np.ndarray:
  flat = storages[t.storage.key]
  if t.storage.view is not None:
    off, n = t.storage.view
    flat = flat[off:off + n]
  if any(s < 0 for s in t.size) or any(s < 0 for s in t.stride) or t.offset < 0:
    raise pickle.UnpicklingError("negative tensor size / stride / offset")
  numel = int(np.prod(t.size, dtype=np.int64))
  if numel == 0:
    return np.zeros(t.size, dtype=flat.dtype.newbyteorder("="))
  last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride))
  if last >= flat.size:
    raise pickle.UnpicklingError(
        f"tensor (offset {t.offset}, size {t.size}, stride {t.stride}) exceeds its storage of "
        f"{flat.size} elements")
  base = flat[t.offset:]
  view = np.lib.stride_tricks.as_strided(
      base, shape=t.size, strides=tuple(s * flat.itemsize for s in t.stride), writeable=False)
  return np.array(view, dtype=view.dtype.newbyteorder("="), order="C", copy=True)


def _read_torch_zip(path: Path):
  """torch >= 1.6 zip format: <archive>/data.pkl + <archive>/data/<key> raw storages."""
  with zipfile.ZipFile(path) as zf:
    names = set(zf.namelist())
    pkl = sorted(n for n in names if n == "data.pkl" or n.endswith("/data.pkl"))
    if not pkl:
      raise ConversionError(f"{path}: a zip file, but not a torch checkpoint (no data.pkl; "
                            f"entries: {sorted(names)[:5]})")
    prefix = pkl[0][:-len("data.pkl")]
    big_endian = False
    if prefix + "byteorder" in names:
      big_endian = zf.read(prefix + "byteorder").decode().strip() == "big"
    refs: dict = {}

    def load_storage(pid):
      if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
      _, storage_type, key, _location, numel = pid[:5]
      key = str(key)
      if key not in refs:
        refs[key] = _StorageRef(key, _storage_dtype_name(storage_type), int(numel))
      return refs[key]

    obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), load_storage).load()

    def read_storages(needed: Iterable[str]) -> dict:
      out = {}
      for key in needed:
        name = f"{prefix}data/{key}"
        if name not in names:
          raise ConversionError(f"{path}: storage {name} is missing from the archive")
        ref = refs[key]
        arr = _decode_storage(zf.read(name), ref.dtype_name, big_endian)
        if ref.numel is not None and arr.size < ref.numel:
          raise ConversionError(f"{path}: storage {name} holds {arr.size} elements, "
                                f"{ref.numel} expected (truncated?)")
        out[key] = arr
      return out

    return _finish_torch(path, obj, read_storages, "torch_zip")


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _read_torch_legacy(path: Path, f, file_size: int):
  """torch < 1.6 format: magic, protocol, sys_info, main pickle, storage keys, then each storage
  as an int64 element count followed by its raw bytes. `f` is positioned after the magic."""
  protocol = _RestrictedUnpickler(f).load()
  if protocol != 1001:
    raise ConversionError(f"{path}: unsupported legacy torch protocol {protocol}")
  sys_info = _RestrictedUnpickler(f).load()
  big_endian = not sys_info.get("little_endian", True) if isinstance(sys_info, dict) else False
  refs: dict = {}

  def load_storage(pid):
    if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
      raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
    _, storage_type, root_key, _location, numel, view_metadata = (tuple(pid) + (None,))[:6]
    root_key = str(root_key)
    if root_key not in refs:
      refs[root_key] = _StorageRef(root_key, _storage_dtype_name(storage_type), int(numel))
    if view_metadata is not None:  # pre-0.4 storage views
      _view_key, offset, view_size = view_metadata
      return _StorageRef(root_key, refs[root_key].dtype_name, int(view_size),
                         (int(offset), int(view_size)))
    return refs[root_key]

  obj = _RestrictedUnpickler(f, load_storage).load()
  keys = _RestrictedUnpickler(f).load()
  if not isinstance(keys, (list, tuple)):
    raise ConversionError(f"{path}: corrupt legacy torch file (no storage key list)")
  where = {}
  for key in keys:
    key = str(key)
    ref = refs.get(key)
    if ref is None:
      raise ConversionError(f"{path}: storage {key} is not referenced by the pickle")
    head = f.read(8)
    if len(head) < 8:
      raise ConversionError(f"{path}: truncated (storage {key} missing)")
    (numel,) = struct.unpack(">q" if big_endian else "<q", head)
    itemsize = 2 if ref.dtype_name == "BFloat16Storage" else np.dtype(
        _STORAGE_DTYPES[ref.dtype_name]).itemsize
    start, nbytes = f.tell(), numel * itemsize
    if numel < 0 or start + nbytes > file_size:
      raise ConversionError(f"{path}: truncated (storage {key} needs {nbytes} bytes at {start}, "
                            f"file has {file_size})")
    where[key] = (start, nbytes)
    f.seek(start + nbytes)

  def read_storages(needed):
    out = {}
    for key in needed:
      if key not in where:
        raise ConversionError(f"{path}: storage {key} is missing")
      start, n = where[key]
      f.seek(start)
      out[key] = _decode_storage(f.read(n), refs[key].dtype_name, big_endian)
    return out

  return _finish_torch(path, obj, read_storages, "torch_legacy")


def _select_state_dict(path: Path, obj: Any) -> tuple[Any, dict]:
  """The weights dict inside a loaded checkpoint object, as detectron2 picks it."""
  if not isinstance(obj, dict):
    raise ConversionError(f"{path}: top-level object is a {type(obj).__name__}, not a dict")
  info = {"author": obj.get("__author__"),
          "matching_heuristics": bool(obj.get("matching_heuristics", False))}
  if "model" in obj and isinstance(obj["model"], dict):
    return obj["model"], info
  if "blobs" in obj and isinstance(obj["blobs"], dict):  # caffe2 Detectron detection models
    return obj["blobs"], info
  return obj, info


def _finish_torch(path, obj, read_storages, container):
  sd, info = _select_state_dict(path, obj)
  needed = {v.storage.key for v in sd.values() if isinstance(v, _LazyTensor)}
  storages = read_storages(sorted(needed))
  out = {}
  for k, v in sd.items():
    out[k] = _materialise(v, storages) if isinstance(v, _LazyTensor) else v
  metadata = getattr(sd, "_metadata", None)
  if metadata is None and isinstance(getattr(sd, "__dict__", None), dict):
    metadata = sd.__dict__.get("_metadata")
  versions = {}
  if isinstance(metadata, dict):
    for prefix, meta in metadata.items():
      if isinstance(meta, dict) and "version" in meta:
        versions[str(prefix)] = meta["version"]
  info.update(container=container, module_versions=versions)
  return out, info


def load_checkpoint_file(path) -> StateDict:
  """Reads a `.pth` (torch zip or legacy format) or `.pkl` checkpoint into `{name: ndarray}`.

  The format is detected from the file content, not the suffix. A `model` (or caffe2 `blobs`)
  entry is used when present; `__author__` / `matching_heuristics` go to `.info`. A common
  `module.` prefix (DataParallel) is stripped. Non-array entries raise `ConversionError`, and so
  does any unreadable file; the message names the file.
  """
  path = Path(path)
  try:
    size = path.stat().st_size
    with open(path, "rb") as fh:
      head = fh.read(4)
  except OSError as e:
    raise ConversionError(f"{path}: cannot read ({e})") from e
  if size == 0:
    raise ConversionError(f"{path}: empty file")
  try:
    if head == b"PK\x03\x04" or zipfile.is_zipfile(path):
      raw, info = _read_torch_zip(path)
    else:
      with open(path, "rb") as f:
        obj = _RestrictedUnpickler(f).load()
        if isinstance(obj, int) and obj == _LEGACY_MAGIC:
          raw, info = _read_torch_legacy(path, f, size)
        else:  # plain pickle of numpy arrays (detectron2 model zoo / caffe2 blobs)
          raw, info = _select_state_dict(path, obj)
          info.update(container="pickle", module_versions={})
  except ConversionError:
    raise
  except zipfile.BadZipFile as e:
    raise ConversionError(f"{path}: corrupt or truncated zip/torch checkpoint ({e})") from e
  except (EOFError, pickle.UnpicklingError) as e:
    raise ConversionError(f"{path}: not a readable pickle / torch checkpoint, truncated or "
                          f"corrupt ({type(e).__name__}: {e})") from e
  except Exception as e:  # noqa: BLE001 -- garbage bytes can raise nearly anything in pickle
    raise ConversionError(f"{path}: cannot parse as a checkpoint "
                          f"({type(e).__name__}: {e})") from e

  # Keep weight entries; reject anything else in the weights dict.
  out, bad = {}, []
  for k, v in raw.items():
    if isinstance(v, np.ndarray):
      out[str(k)] = v
    elif isinstance(v, np.generic):
      out[str(k)] = np.asarray(v)
    else:
      bad.append(f"{k} ({type(v).__name__})")
  if bad:
    raise ConversionError(f"{path}: {len(bad)} entries of the weights dict are not tensors / "
                          f"arrays: {bad[:20]}")
  if not out:
    raise ConversionError(f"{path}: no tensors found")
  if all(k.startswith("module.") for k in out):
    out = {k[len("module."):]: v for k, v in out.items()}
    info["module_versions"] = {
        (p[len("module."):] if p.startswith("module.") else p): v
        for p, v in info.get("module_versions", {}).items()}
  info["path"] = str(path)
  return StateDict(out, info=info)


# ----------------------------------------------------------------------------------------------
# Formats and renaming.
# ----------------------------------------------------------------------------------------------

_D2_HEADS = ("backbone.", "proposal_generator.", "roi_heads.")
_D2_BARE_BACKBONE = re.compile(r"^(stem\.|res[2-5]\.)")
_MSRA_HINT = re.compile(r"^(conv1_w|res_conv1_bn_[sb]|res\d+_\d+_branch(1|2[abc])_)")
_TV_HINT = re.compile(r"^(conv1\.weight|bn1\.|layer[1-4]\.\d+\.)")


def detect_format(state_dict) -> str:
  """'detectron2' (full-model or bare d2 backbone names), 'msra_c2' (caffe2 blob names such as
  `res2_0_branch2a_w`) or 'torchvision' (`conv1.weight`, `layer1.0.bn1.*`)."""
  keys = list(state_dict)
  if any(k.startswith(_D2_HEADS) for k in keys) or (
      keys and all(_D2_BARE_BACKBONE.match(k) for k in keys)):
    return "detectron2"
  if any(_MSRA_HINT.match(k) for k in keys):
    return "msra_c2"
  if "conv1.weight" in state_dict and any(k.startswith("layer1.") for k in keys):
    return "torchvision"
  raise ConversionError(f"unrecognised checkpoint naming ({len(keys)} keys, e.g. {keys[:8]}): "
                        "expected detectron2, MSRA caffe2 or torchvision ResNet names")


_D2_RESNET_KEY = re.compile(
    r"^(stem\.conv1|res[2-9]\.\d+\.(conv[1-3]|shortcut))(\.norm)?\."
    r"(weight|bias|running_mean|running_var)$")


def _msra_name(key: str) -> str:
  """caffe2 blob name -> detectron2 backbone name (the ResNet subset of detectron2's
  convert_basic_c2_names)."""
  k = key.replace("_", ".")
  k = re.sub(r"\.b$", ".bias", k)
  k = re.sub(r"\.w$", ".weight", k)
  k = re.sub(r"bn\.s$", "norm.weight", k)
  k = re.sub(r"bn\.bias$", "norm.bias", k)
  k = re.sub(r"bn\.rm$", "norm.running_mean", k)
  k = re.sub(r"bn\.running\.mean$", "norm.running_mean", k)
  k = re.sub(r"bn\.riv$", "norm.running_var", k)
  k = re.sub(r"bn\.running\.var$", "norm.running_var", k)
  k = re.sub(r"bn\.gamma$", "norm.weight", k)
  k = re.sub(r"bn\.beta$", "norm.bias", k)
  k = re.sub(r"^res\.conv1\.norm\.", "conv1.norm.", k)
  k = re.sub(r"^conv1\.", "stem.conv1.", k)
  for c2, d2 in ((".branch1.", ".shortcut."), (".branch2a.", ".conv1."),
                 (".branch2b.", ".conv2."), (".branch2c.", ".conv3.")):
    k = k.replace(c2, d2)
  return k


def _torchvision_name(key: str) -> str:
  """torchvision ResNet name -> detectron2 backbone name (detectron2's
  tools/convert-torchvision-to-d2.py rules)."""
  k = key
  if "layer" not in k:
    k = "stem." + k
  for t in (1, 2, 3, 4):
    k = k.replace(f"layer{t}", f"res{t + 1}")
  for t in (1, 2, 3):
    k = k.replace(f"bn{t}", f"conv{t}.norm")
  k = k.replace("downsample.0", "shortcut")
  k = k.replace("downsample.1", "shortcut.norm")
  return k


def to_detectron2_names(state_dict, fmt: str) -> StateDict:
  """Renames a state dict to detectron2 keys (ImageNet formats -> `backbone.bottom_up.*`).

  - 'detectron2': unchanged, except that a bare backbone dict (`stem.*`, `res2.*`, ... as written
    by detectron2's torchvision converter) gets the `backbone.bottom_up.` prefix, and non-weight
    entries (`pixel_mean`, `pixel_std`, `*.num_batches_tracked`) are dropped.
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
    bare = bool(keys) and all(_D2_BARE_BACKBONE.match(k) or k.endswith("num_batches_tracked")
                              for k in keys)
    for k, v in state_dict.items():
      if k in ("pixel_mean", "pixel_std") or k.endswith("num_batches_tracked"):
        dropped.append((k, "not a weight (buffer of the meta-architecture / BatchNorm counter)"))
        continue
      if bare and k.startswith("stem.fc."):
        dropped.append((k, "ImageNet classifier"))
        continue
      new = BACKBONE_PREFIX + k if bare else k
      out[new] = v
      if new != k:
        renamed[new] = k
    if bare:
      # detectron2 loads such files by suffix matching onto backbone.bottom_up.*
      versions = info.get("module_versions", {})
      info["module_versions"] = {BACKBONE_PREFIX + p if p else p: v for p, v in versions.items()}
      notes.append("bare detectron2 backbone names prefixed with 'backbone.bottom_up.'")
      if str(info.get("author", "")).lower() == "torchvision":
        notes.append(_expectation_note("torchvision"))
  elif fmt in ("msra_c2", "torchvision"):
    for k, v in state_dict.items():
      if fmt == "msra_c2":
        if k.endswith("_momentum"):
          dropped.append((k, "caffe2 optimizer momentum"))
          continue
        if k.startswith("fc1000_"):
          dropped.append((k, "ImageNet classifier"))
          continue
        new = _msra_name(k)
      else:
        if k.startswith("fc."):
          dropped.append((k, "ImageNet classifier"))
          continue
        if k.endswith("num_batches_tracked"):
          dropped.append((k, "BatchNorm counter"))
          continue
        new = _torchvision_name(k)
      if not _D2_RESNET_KEY.match(new):
        bad.append(f"{k} -> {new}")
        continue
      new = BACKBONE_PREFIX + new
      if new in out:
        bad.append(f"{k} -> {new} (duplicate)")
        continue
      out[new] = v
      renamed[new] = k
    if bad:
      raise ConversionError(f"{len(bad)} {fmt} keys are not ResNet backbone weights "
                            f"(not converted): {bad[:30]}")
    notes.append(_expectation_note(fmt))
  else:
    raise ConversionError(f"unknown format {fmt!r}")
  info.update(source_format=fmt, dropped=dropped, renamed=renamed,
              notes=info.get("notes", []) + notes)
  return StateDict(out, info=info)


def _expectation_note(fmt: str) -> str:
  e = FORMAT_EXPECTATIONS[fmt]
  origin = {"msra_c2": "MSRA caffe2 ResNet", "torchvision": "torchvision ResNet"}[fmt]
  return (f"{origin} weights: the model must use stride_in_1x1={e['stride_in_1x1']}, "
          f"input_format={e['input_format']!r}, pixel_mean={list(e['pixel_mean'])}, "
          f"pixel_std={list(e['pixel_std'])}")


def format_expectations(fmt: str) -> Optional[dict]:
  """The model settings an ImageNet format needs (None for detectron2 checkpoints)."""
  return dict(FORMAT_EXPECTATIONS[fmt]) if fmt in FORMAT_EXPECTATIONS else None


# ----------------------------------------------------------------------------------------------
# Mapping onto the Flax variables.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ConversionReport:
  """Everything `convert_to_flax` did, and everything that went wrong."""
  source_format: str = "detectron2"
  backbone_only: bool = False
  num_source_tensors: int = 0
  mapped: list = dataclasses.field(default_factory=list)  # (src, coll, path, src_shape, flax_shape, how)
  unknown_keys: list = dataclasses.field(default_factory=list)  # source keys with no target
  missing_keys: list = dataclasses.field(default_factory=list)  # target paths with no source
  shape_mismatches: list = dataclasses.field(default_factory=list)  # (key, src_shape, expected_torch, flax_shape)
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
    return not (self.unknown_keys or self.missing_keys or self.shape_mismatches or
                self.dtype_problems or self.ambiguous_keys or self.abstract_left)

  def _count(self, coll=None):
    rows = [m for m in self.mapped if coll is None or m[1] == coll]
    return len(rows), int(sum(int(np.prod(m[4], dtype=np.int64)) for m in rows))

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
    return dict(source_tensors=self.num_source_tensors, mapped_tensors=self.num_mapped_tensors,
                mapped_elements=self.num_mapped_elements, params_tensors=t_p,
                params_elements=e_p, frozen_tensors=t_f, frozen_elements=e_f,
                target_tensors=self.num_target_tensors,
                target_elements=self.num_target_elements,
                left_at_init=len(self.left_at_init), skipped=len(self.skipped_keys),
                dropped=len(self.dropped_keys), filled_defaults=len(self.filled_defaults))

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["counts"] = self.counts()
    d["ok"] = self.ok
    return d

  def summary(self, max_list: int = 50) -> str:
    c = self.counts()
    lines = [
        f"conversion of a {self.source_format} checkpoint"
        f"{' (backbone only)' if self.backbone_only else ''}: "
        f"{'OK' if self.ok else 'FAILED'}",
        f"  source: {c['source_tensors']} tensors ({c['dropped']} dropped by the renaming, "
        f"{c['skipped']} skipped, {c['filled_defaults']} FrozenBN statistics filled)",
        f"  mapped {c['mapped_tensors']} tensors onto {c['target_tensors']} target variables "
        f"({c['left_at_init']} left at init): params {c['params_tensors']} tensors / "
        f"{c['params_elements']:,} elements, frozen {c['frozen_tensors']} tensors / "
        f"{c['frozen_elements']:,} elements",
    ]

    def block(title, items):
      if items:
        lines.append(f"  {title} ({len(items)}):")
        for it in items[:max_list]:
          lines.append(f"    {it}")
        if len(items) > max_list:
          lines.append(f"    ... and {len(items) - max_list} more")

    block("UNKNOWN source keys (no matching model variable)", self.unknown_keys)
    block("MISSING model variables (absent from the checkpoint)", self.missing_keys)
    block("SHAPE mismatches (key, checkpoint shape, expected torch shape, flax shape)",
          self.shape_mismatches)
    block("DTYPE problems", self.dtype_problems)
    block("AMBIGUOUS keys", self.ambiguous_keys)
    block("left at initial values but the target is abstract (pass real arrays)",
          self.abstract_left)
    block("dropped by the renaming", [f"{k}: {r}" for k, r in self.dropped_keys])
    block("skipped (outside backbone.bottom_up, backbone-only mode)", self.skipped_keys)
    block("left at initial values", self.left_at_init)
    block("FrozenBN statistics filled as detectron2 does (running_mean 0, running_var 1)",
          self.filled_defaults)
    block("FrozenBN running_var -= eps (module version < 3)", self.eps_adjusted)
    if self.cast:
      lines.append(f"  cast {len(self.cast)} tensors to the model dtype "
                   f"(e.g. {self.cast[0]})")
    for n in self.notes:
      lines.append(f"  NOTE: {n}")
    return "\n".join(lines)


def _key_str(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _leaf_shape_dtype(leaf):
  shape = leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)
  dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
  return tuple(int(d) for d in shape), np.dtype(dtype)


def _candidates(key: str):
  """(collection, '.'-path) a detectron2 key may map to, with the layout change to apply."""
  prefix, _, leaf = key.rpartition(".")
  p = prefix + "." if prefix else ""
  if leaf == "weight":
    return [("params", p + "kernel", "kernel"), ("params", p + "scale", "copy"),
            ("frozen", p + "weight", "copy"), ("params", p + "weight", "copy")]
  if leaf == "bias":
    return [("params", p + "bias", "copy"), ("frozen", p + "bias", "copy")]
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
  import jax  # local: keeps the file-reading half importable without jax

  info = dict(getattr(d2_state_dict, "info", {}))
  report = ConversionReport(source_format=info.get("source_format", "detectron2"),
                            backbone_only=backbone_only,
                            num_source_tensors=len(d2_state_dict),
                            dropped_keys=list(info.get("dropped", [])),
                            notes=list(info.get("notes", [])))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(target_variables)
  index = {}  # (collection, '.'-joined path) -> leaf position
  for i, (kp, _) in enumerate(leaves):
    names = [_key_str(k) for k in kp]
    index[(names[0], ".".join(names[1:]))] = i
  report.num_target_tensors = len(leaves)
  report.num_target_elements = int(sum(int(np.prod(_leaf_shape_dtype(l)[0], dtype=np.int64))
                                       for _, l in leaves))

  def in_scope(path: str) -> bool:
    return (not backbone_only) or path.startswith(BACKBONE_PREFIX)

  src = dict(d2_state_dict)
  # detectron2 FrozenBatchNorm2d._load_from_state_dict semantics.
  versions = info.get("module_versions", {}) or {}
  for (coll, path), _ in index.items():
    if coll != "frozen" or not path.endswith(".running_mean") or not in_scope(path):
      continue
    mod = path[:-len(".running_mean")]
    if not (mod + ".weight" in src or mod + ".bias" in src):
      continue  # the whole module is absent: reported as missing below
    version = versions.get(mod)
    weight_shape = np.shape(src.get(mod + ".weight", src.get(mod + ".bias")))
    # Only when both statistics are absent (caffe2 blobs carry none): a lone missing one is an
    # incomplete checkpoint and stays an error.
    if (version is None or version < 2) and not (mod + ".running_mean" in src or
                                                 mod + ".running_var" in src):
      src[mod + ".running_mean"] = np.zeros(weight_shape, np.float32)
      src[mod + ".running_var"] = np.ones(weight_shape, np.float32)
      report.filled_defaults += [mod + ".running_mean", mod + ".running_var"]
    if version is not None and version < 3 and mod + ".running_var" in src:
      src[mod + ".running_var"] = np.asarray(src[mod + ".running_var"]) - np.float32(
          FROZEN_BN_EPS)
      report.eps_adjusted.append(mod + ".running_var")

  out = [None] * len(leaves)
  for key, value in src.items():
    if not in_scope(key):
      report.skipped_keys.append(key)
      continue
    hits = [(c, p, how) for c, p, how in _candidates(key) if (c, p) in index]
    if not hits:
      report.unknown_keys.append(key)
      continue
    if len(hits) > 1:
      report.ambiguous_keys.append((key, [f"{c}/{p}" for c, p, _ in hits]))
      continue
    coll, path, how = hits[0]
    i = index[(coll, path)]
    if out[i] is not None:
      report.ambiguous_keys.append((key, [f"{coll}/{path} (already filled)"]))
      continue
    want_shape, want_dtype = _leaf_shape_dtype(leaves[i][1])
    a = np.asarray(value)
    if not (np.issubdtype(a.dtype, np.floating) or a.dtype == want_dtype):
      report.dtype_problems.append((key, str(a.dtype)))
      continue
    b = _kernel_layout(a) if how == "kernel" else a
    if b is None or tuple(b.shape) != want_shape:
      expect = _torch_shape_of_kernel(want_shape) if how == "kernel" else want_shape
      report.shape_mismatches.append((key, tuple(a.shape), tuple(expect), want_shape))
      continue
    if b.dtype != want_dtype:
      report.cast.append((key, str(a.dtype), str(want_dtype)))
    out[i] = np.array(b, dtype=want_dtype, order="C", copy=True)
    report.mapped.append((key, coll, path, tuple(a.shape), want_shape, how))

  for i, (kp, leaf) in enumerate(leaves):
    if out[i] is not None:
      continue
    coll, path = _key_str(kp[0]), ".".join(_key_str(k) for k in kp[1:])
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


# ----------------------------------------------------------------------------------------------
# Orbax.
# ----------------------------------------------------------------------------------------------

def save_variables(variables, out_dir, *, overwrite: bool = False) -> Path:
  """Saves `{'params': ..., 'frozen': ...}` with Orbax's StandardCheckpointer at `out_dir`."""
  import jax
  import orbax.checkpoint as ocp
  out_dir = Path(out_dir).absolute()
  tree = jax.tree_util.tree_map(np.asarray, variables)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(out_dir, tree, force=overwrite)
    ckptr.wait_until_finished()
  return out_dir


def restore_variables(ckpt_dir, target=None):
  """Restores what `save_variables` wrote. `target` (arrays or ShapeDtypeStruct) fixes the
  structure / dtypes / shardings; without it the tree is restored as saved (numpy leaves)."""
  import jax
  import orbax.checkpoint as ocp
  ckpt_dir = Path(ckpt_dir).absolute()
  if not ckpt_dir.exists():
    raise ConversionError(f"{ckpt_dir}: no such checkpoint directory")
  abstract = None
  if target is not None:
    def to_abstract(x):
      if isinstance(x, jax.ShapeDtypeStruct):
        return x
      return jax.ShapeDtypeStruct(np.shape(x), getattr(x, "dtype", None) or np.asarray(x).dtype)
    abstract = jax.tree_util.tree_map(to_abstract, target)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(ckpt_dir, abstract) if abstract is not None else ckptr.restore(ckpt_dir)


# ----------------------------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------------------------

def _load_config(path: str):
  if not Path(path).exists() and (Path(__file__).resolve().parents[1] / path).exists():
    path = str(Path(__file__).resolve().parents[1] / path)  # default, relative to the repo
  if not Path(path).exists():
    raise ConversionError(f"{path}: config file not found")
  spec = importlib.util.spec_from_file_location("_cn2_convert_config", path)
  if spec is None or spec.loader is None:
    raise ConversionError(f"{path}: cannot import config file")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config()
  if isinstance(cfg, dict) and "model" in cfg:
    return cfg["model"]
  return getattr(cfg, "model", cfg)


def _find_setting(cfg, name):
  d = cfg.to_dict() if hasattr(cfg, "to_dict") else cfg
  stack = [d]
  while stack:
    x = stack.pop()
    if isinstance(x, dict):
      if name in x:
        return x[name]
      stack.extend(x.values())
  return None


def _config_warnings(model_config, fmt: str) -> list:
  want = format_expectations(fmt)
  if want is None:
    return []
  warnings = []
  for name, value in want.items():
    got = _find_setting(model_config, name)
    if got is None:
      continue
    same = (np.allclose(np.asarray(got, float), np.asarray(value, float), atol=1e-3)
            if isinstance(value, tuple) else got == value)
    if not same:
      warnings.append(f"config sets {name}={got!r} but {fmt} weights need {value!r}")
  return warnings


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(
      prog="python -m cn2_jax.convert",
      description="Convert detectron2 / CenterNet2 / ImageNet ResNet weights to a cn2_jax Orbax "
                  "checkpoint.")
  ap.add_argument("--src", required=True, help=".pth / .pkl checkpoint")
  ap.add_argument("--out", required=True, help="Orbax checkpoint directory to write")
  ap.add_argument("--config", default="configs/cn2_r50.py", help="config file with get_config()")
  ap.add_argument("--backbone-only", action="store_true",
                  help="fill only backbone.bottom_up.* (ImageNet initialisation)")
  ap.add_argument("--seed", type=int, default=0, help="init seed for --backbone-only")
  ap.add_argument("--force", action="store_true", help="overwrite --out")
  args = ap.parse_args(argv)
  try:
    sd = load_checkpoint_file(args.src)
    fmt = detect_format(sd)
    sd = to_detectron2_names(sd, fmt)
    if fmt != "detectron2" and not args.backbone_only:
      raise ConversionError(f"{args.src} holds {fmt} ImageNet weights (backbone only): "
                            "pass --backbone-only")
    model_config = _load_config(args.config)
    from cn2_jax.modeling import detector
    target = (detector.init_variables(model_config, args.seed) if args.backbone_only
              else detector.abstract_variables(model_config))
    variables, report = convert_to_flax(sd, target, backbone_only=args.backbone_only)
    report.notes.extend(f"WARNING: {w}" for w in _config_warnings(model_config, fmt))
    print(report.summary())
    save_variables(variables, args.out, overwrite=args.force)
    print(f"wrote {Path(args.out).absolute()}")
    return 0
  except ConversionError as e:
    print(f"conversion failed: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
