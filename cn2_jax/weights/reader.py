"""Reading checkpoint files without torch: torch `.pth` (zip format of torch >= 1.6, or the legacy
pre-1.6 format) through a restricted unpickler, and `.pkl` files (pickled dicts of numpy arrays:
detectron2 model-zoo or caffe2 / MSRA blobs). `load_checkpoint_file(path)` returns a flat
`{name: np.ndarray}` `StateDict` that also carries `.info` about the file (format, module
versions). Unreadable files raise `ConversionError` naming the file.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
from numpy._core import multiarray, numeric  # numpy >= 2 (pickled arrays name these modules)

from cn2_jax.errors import ConversionError


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
    _OPAQUE_CLASSES[key] = type("Opaque_" + re.sub(r"\W", "_", key), (_Opaque,), {"_qualname": key})
  return _OPAQUE_CLASSES[key]


# torch storage class name -> numpy dtype ('bfloat16' is decoded by hand).
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
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


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _StorageRef):
    raise pickle.UnpicklingError(f"tensor storage is {type(storage).__name__}, not a storage")
  return _LazyTensor(
      storage, int(storage_offset), tuple(int(dim) for dim in size), tuple(int(s) for s in stride)
  )


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
  return {
      "_reconstruct": multiarray._reconstruct,
      "scalar": multiarray.scalar,
      "_frombuffer": numeric._frombuffer,
  }[name]


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
    if module in ("builtins", "__builtin__") and name in (
        "set",
        "frozenset",
        "slice",
        "complex",
        "bytearray",
    ):
      return {
          "set": set,
          "frozenset": frozenset,
          "slice": slice,
          "complex": complex,
          "bytearray": bytearray,
      }[name]
    if module == "torch._utils":
      fn = {
          "_rebuild_tensor_v2": _rebuild_tensor_v2,
          "_rebuild_tensor": _rebuild_tensor,
          "_rebuild_parameter": _rebuild_parameter,
          "_rebuild_parameter_with_state": _rebuild_parameter,
          "_rebuild_from_type_v2": _rebuild_from_type_v2,
      }.get(name)
      if fn is not None:
        return fn
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in (
        "_reconstruct",
        "scalar",
    ):
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
    start, length = t.storage.view
    flat = flat[start : start + length]
  if any(dim < 0 for dim in t.size) or any(stride < 0 for stride in t.stride) or t.offset < 0:
    raise pickle.UnpicklingError("negative tensor size / stride / offset")
  numel = int(np.prod(t.size, dtype=np.int64))
  if numel == 0:
    return np.zeros(t.size, dtype=flat.dtype.newbyteorder("="))
  last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride))
  if last >= flat.size:
    raise pickle.UnpicklingError(
        f"tensor (offset {t.offset}, size {t.size}, stride {t.stride}) exceeds its storage of "
        f"{flat.size} elements"
    )
  base = flat[t.offset :]
  view = np.lib.stride_tricks.as_strided(
      base, shape=t.size, strides=tuple(s * flat.itemsize for s in t.stride), writeable=False
  )
  return np.array(view, dtype=view.dtype.newbyteorder("="), order="C", copy=True)


def _read_torch_zip(path: Path):
  """torch >= 1.6 zip format: <archive>/data.pkl + <archive>/data/<key> raw storages."""
  with zipfile.ZipFile(path) as archive:
    names = set(archive.namelist())
    pkl = sorted(name for name in names if name == "data.pkl" or name.endswith("/data.pkl"))
    if not pkl:
      raise ConversionError(
          f"{path}: a zip file, but not a torch checkpoint (no data.pkl; "
          f"entries: {sorted(names)[:5]})"
      )
    prefix = pkl[0][: -len("data.pkl")]
    big_endian = False
    if prefix + "byteorder" in names:
      big_endian = archive.read(prefix + "byteorder").decode().strip() == "big"
    refs: dict = {}

    def load_storage(pid):
      if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
      _, storage_type, key, _location, numel = pid[:5]
      key = str(key)
      if key not in refs:
        refs[key] = _StorageRef(key, _storage_dtype_name(storage_type), int(numel))
      return refs[key]

    obj = _RestrictedUnpickler(io.BytesIO(archive.read(pkl[0])), load_storage).load()

    def read_storages(needed: Iterable[str]) -> dict:
      out = {}
      for key in needed:
        name = f"{prefix}data/{key}"
        if name not in names:
          raise ConversionError(f"{path}: storage {name} is missing from the archive")
        ref = refs[key]
        arr = _decode_storage(archive.read(name), ref.dtype_name, big_endian)
        if ref.numel is not None and arr.size < ref.numel:
          raise ConversionError(
              f"{path}: storage {name} holds {arr.size} elements, "
              f"{ref.numel} expected (truncated?)"
          )
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
      return _StorageRef(
          root_key, refs[root_key].dtype_name, int(view_size), (int(offset), int(view_size))
      )
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
    itemsize = (
        2
        if ref.dtype_name == "BFloat16Storage"
        else np.dtype(_STORAGE_DTYPES[ref.dtype_name]).itemsize
    )
    start, nbytes = f.tell(), numel * itemsize
    if numel < 0 or start + nbytes > file_size:
      raise ConversionError(
          f"{path}: truncated (storage {key} needs {nbytes} bytes at {start}, "
          f"file has {file_size})"
      )
    where[key] = (start, nbytes)
    f.seek(start + nbytes)

  def read_storages(needed):
    out = {}
    for key in needed:
      if key not in where:
        raise ConversionError(f"{path}: storage {key} is missing")
      start, length = where[key]
      f.seek(start)
      out[key] = _decode_storage(f.read(length), refs[key].dtype_name, big_endian)
    return out

  return _finish_torch(path, obj, read_storages, "torch_legacy")


def _select_state_dict(path: Path, obj: Any) -> tuple[Any, dict]:
  """The weights dict inside a loaded checkpoint object, as detectron2 picks it."""
  if not isinstance(obj, dict):
    raise ConversionError(f"{path}: top-level object is a {type(obj).__name__}, not a dict")
  info = {
      "author": obj.get("__author__"),
      "matching_heuristics": bool(obj.get("matching_heuristics", False)),
  }
  if "model" in obj and isinstance(obj["model"], dict):
    return obj["model"], info
  if "blobs" in obj and isinstance(obj["blobs"], dict):  # caffe2 Detectron detection models
    return obj["blobs"], info
  if "state_dict" in obj and isinstance(obj["state_dict"], dict):  # xingyizhou/CenterNet files
    return obj["state_dict"], info
  if "model_state" in obj and isinstance(obj["model_state"], dict):  # pycls .pyth files
    return obj["model_state"], info
  return obj, info


def _finish_torch(path, obj, read_storages, container):
  sd, info = _select_state_dict(path, obj)
  needed = {value.storage.key for value in sd.values() if isinstance(value, _LazyTensor)}
  storages = read_storages(sorted(needed))
  out = {}
  for key, tensor in sd.items():
    out[key] = _materialise(tensor, storages) if isinstance(tensor, _LazyTensor) else tensor
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

  The format is detected from the file content, not the suffix. A `model` (or caffe2 `blobs`,
  xingyizhou/CenterNet `state_dict`, pycls `model_state`) entry is used when present; `__author__` / `matching_heuristics` go to `.info`. A common
  `module.` prefix (DataParallel) is stripped. Non-array entries raise `ConversionError`, and so
  does any unreadable file; the message names the file.
  """
  path = Path(path)
  try:
    size = path.stat().st_size
    with open(path, "rb") as file:
      head = file.read(4)
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
    raise ConversionError(
        f"{path}: not a readable pickle / torch checkpoint, truncated or "
        f"corrupt ({type(e).__name__}: {e})"
    ) from e
  except Exception as e:  # noqa: BLE001 -- garbage bytes can raise nearly anything in pickle
    raise ConversionError(
        f"{path}: cannot parse as a checkpoint " f"({type(e).__name__}: {e})"
    ) from e

  # Keep weight entries; reject anything else in the weights dict.
  out, bad = {}, []
  for key, value in raw.items():
    if isinstance(value, np.ndarray):
      out[str(key)] = value
    elif isinstance(value, np.generic):
      out[str(key)] = np.asarray(value)
    else:
      bad.append(f"{key} ({type(value).__name__})")
  if bad:
    raise ConversionError(
        f"{path}: {len(bad)} entries of the weights dict are not tensors / " f"arrays: {bad[:20]}"
    )
  if not out:
    raise ConversionError(f"{path}: no tensors found")
  if all(key.startswith("module.") for key in out):
    out = {key[len("module.") :]: value for key, value in out.items()}
    info["module_versions"] = {
        (prefix[len("module.") :] if prefix.startswith("module.") else prefix): version
        for prefix, version in info.get("module_versions", {}).items()
    }
  info["path"] = str(path)
  return StateDict(out, info=info)
