"""The official CenterNet2 R50 oracle (../shared/oracle, see its README.md).

* `oracle_dir()`: where the oracle files are (or None).
* `regenerate_oracle_state_dict(json_path)`: the deterministic weights of README §4, checked
  against every per-tensor checksum of the JSON.
* `oracle_expected_flax_paths(json_path)` / `expected_flax_entries(spec)`: the Flax variable each
  detectron2 key becomes under the naming contract of docs/DESIGN.md; `build_target_tree` turns
  them into a `{'params': ..., 'frozen': ...}` tree (for converter tests without the model).
* `cn2_r50_state_dict_spec()`: the official R50 CenterNet2 state-dict keys and torch shapes, in
  state-dict order, synthesised from the architecture (equal to the oracle JSON's list).
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

ORACLE_JSON = "cn2_r50_oracle_weights.json"


class OracleMismatch(ValueError):
  """Regenerated oracle weights do not match the JSON checksums."""


def oracle_dir() -> Optional[Path]:
  """$CN2_ORACLE_DIR, else `<repo>/../shared/oracle`; None when that folder does not exist."""
  env = os.environ.get("CN2_ORACLE_DIR")
  if env:
    path = Path(env)
    return path if path.is_dir() else None
  path = Path(__file__).resolve().parents[2].parent / "shared" / "oracle"
  return path if path.is_dir() else None


def oracle_json_path() -> Optional[Path]:
  folder = oracle_dir()
  if folder is None or not (folder / ORACLE_JSON).is_file():
    return None
  return folder / ORACLE_JSON


def _entries(json_path) -> list:
  if json_path is None:
    json_path = oracle_json_path()
    if json_path is None:
      raise FileNotFoundError("oracle JSON not found (set CN2_ORACLE_DIR)")
  with open(json_path) as f:
    return json.load(f)["entries"]


def _generate(entry: dict) -> np.ndarray:
  key, shape, rule = entry["key"], tuple(entry["shape"]), entry["init_rule"]
  if rule == "keep_init":
    kept = np.asarray(entry["kept_value"], dtype=np.float64)
    dtype = np.dtype(entry.get("dtype", "float32"))  # e.g. BatchNorm's int64 step counters
    if kept.size == int(np.prod(shape, dtype=np.int64)):
      return kept.reshape(shape).astype(dtype)
    return np.broadcast_to(kept, shape).astype(dtype)
  rng = np.random.RandomState(zlib.crc32(key.encode("utf-8")))
  a, b = entry["rule_params"]
  if rule == "normal":
    x = rng.normal(a, b, size=shape)
  elif rule == "uniform":
    x = rng.uniform(a, b, size=shape)
  else:
    raise OracleMismatch(f"{key}: unknown init rule {rule!r}")
  return np.asarray(x, dtype=np.float64).astype(np.float32)


def check_entry(entry: dict, x: np.ndarray) -> Optional[str]:
  """None if `x` matches the entry's shape, dtype and checksums, else what differs."""
  key = entry["key"]
  if tuple(x.shape) != tuple(entry["shape"]) or x.dtype != np.dtype(entry["dtype"]):
    return f"{key}: shape/dtype {x.shape}/{x.dtype} != {entry['shape']}/{entry['dtype']}"
  x64 = x.astype(np.float64)
  s, sa = float(x64.sum()), float(np.abs(x64).sum())
  tol = 1e-9 * max(1.0, entry["check_abs_sum"])  # float64 summation-order differences only
  if abs(s - entry["check_sum"]) > tol or abs(sa - entry["check_abs_sum"]) > tol:
    return (
        f"{key}: sum {s!r} / abs sum {sa!r} != {entry['check_sum']!r} / "
        f"{entry['check_abs_sum']!r}"
    )
  first = x.reshape(-1)[:3].astype(np.float64).tolist()
  if first != [float(np.float32(value)) for value in entry["check_first3"]]:
    return f"{key}: first values {first} != {entry['check_first3']}"
  return None


def regenerate_oracle_state_dict(json_path=None) -> dict:
  """README §4: numpy legacy RandomState(crc32(key)), one normal/uniform call of size=shape in
  float64, cast to float32; 'keep' entries use the JSON's constants. Raises `OracleMismatch`
  listing every entry whose checksums differ. Returns `{key: float32 array}` in JSON order."""
  out, bad = {}, []
  for e in _entries(json_path):
    x = _generate(e)
    err = check_entry(e, x)
    if err:
      bad.append(err)
    out[e["key"]] = x
  if bad:
    raise OracleMismatch(
        f"{len(bad)} regenerated oracle tensors differ from the JSON:\n  " + "\n  ".join(bad[:30])
    )
  return out


def expected_flax_entries(spec: Sequence) -> list:
  """[(collection, '.'-joined Flax path, Flax shape)] for [(detectron2 key, torch shape)], by the
  DESIGN.md naming rule. FrozenBatchNorm modules are those with a `running_mean` entry."""
  keys = [key for key, _ in spec]
  frozen_modules = {key[: -len(".running_mean")] for key in keys if key.endswith(".running_mean")}
  out = []
  for key, shape in spec:
    shape = tuple(int(s) for s in shape)
    prefix, _, leaf = key.rpartition(".")
    if prefix in frozen_modules and leaf in ("weight", "bias", "running_mean", "running_var"):
      out.append(("frozen", key, shape))
    elif leaf == "weight" and len(shape) == 4:
      o, i, h, w = shape
      out.append(("params", prefix + ".kernel", (h, w, i, o)))
    elif leaf == "weight" and len(shape) == 2:
      out.append(("params", prefix + ".kernel", (shape[1], shape[0])))
    elif leaf == "weight" and len(shape) == 1:  # GroupNorm
      out.append(("params", prefix + ".scale", shape))
    elif leaf in ("bias", "scale"):
      out.append(("params", key, shape))
    else:
      raise ValueError(f"no naming rule for {key} {shape}")
  return out


def oracle_expected_flax_paths(json_path=None) -> list:
  """`expected_flax_entries` of the oracle JSON's keys, in JSON order."""
  return expected_flax_entries([(e["key"], e["shape"]) for e in _entries(json_path)])


def build_target_tree(
    entries: Sequence, *, abstract: bool = True, dtype=np.float32, fill=None
) -> dict:
  """Nested dict {collection: {path parts...}} from `expected_flax_entries` rows. Paths are split
  on every '.' (the converter compares '.'-joined paths, so nesting does not matter). Leaves are
  `jax.ShapeDtypeStruct` (abstract) or arrays from `fill(collection, path, shape)` (default 0)."""
  # Kept local: tools/official_bench/official_side.py loads this file by path in a torch
  # environment without jax (the weight regeneration above is numpy only).
  import jax

  tree: dict = {}
  for coll, path, shape in entries:
    node = tree.setdefault(coll, {})
    parts = path.split(".")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    if abstract:
      node[parts[-1]] = jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))
    else:
      node[parts[-1]] = (
          np.zeros(shape, dtype) if fill is None else np.asarray(fill(coll, path, shape), dtype)
      )
  return tree


def cn2_r50_state_dict_spec(num_classes: int = 80, depth_blocks=(3, 4, 6, 3)) -> list:
  """[(key, torch shape)] of CenterNet2_R50_1x (FPN P3-P7, CenterNet head with 4 GN tower convs,
  3-stage cascade with class-agnostic boxes), in the official state-dict order."""
  spec = []
  for lvl, cin in zip((3, 4, 5), (512, 1024, 2048)):
    spec += [
        (f"backbone.fpn_lateral{lvl}.weight", (256, cin, 1, 1)),
        (f"backbone.fpn_lateral{lvl}.bias", (256,)),
        (f"backbone.fpn_output{lvl}.weight", (256, 256, 3, 3)),
        (f"backbone.fpn_output{lvl}.bias", (256,)),
    ]
  for level in ("p6", "p7"):
    spec += [
        (f"backbone.top_block.{level}.weight", (256, 256, 3, 3)),
        (f"backbone.top_block.{level}.bias", (256,)),
    ]
  spec += resnet_bottleneck_spec("backbone.bottom_up.", depth_blocks)
  head = "proposal_generator.centernet_head."
  for i in range(4):
    spec += [
        (f"{head}bbox_tower.{3 * i}.weight", (256, 256, 3, 3)),
        (f"{head}bbox_tower.{3 * i}.bias", (256,)),
        (f"{head}bbox_tower.{3 * i + 1}.weight", (256,)),
        (f"{head}bbox_tower.{3 * i + 1}.bias", (256,)),
    ]
  spec += [(f"{head}bbox_pred.weight", (4, 256, 3, 3)), (f"{head}bbox_pred.bias", (4,))]
  spec += [(f"{head}scales.{level}.scale", (1,)) for level in range(5)]
  spec += [(f"{head}agn_hm.weight", (1, 256, 3, 3)), (f"{head}agn_hm.bias", (1,))]
  for stage in range(3):
    spec += [
        (f"roi_heads.box_head.{stage}.fc1.weight", (1024, 256 * 7 * 7)),
        (f"roi_heads.box_head.{stage}.fc1.bias", (1024,)),
        (f"roi_heads.box_head.{stage}.fc2.weight", (1024, 1024)),
        (f"roi_heads.box_head.{stage}.fc2.bias", (1024,)),
    ]
  for stage in range(3):
    spec += [
        (f"roi_heads.box_predictor.{stage}.cls_score.weight", (num_classes + 1, 1024)),
        (f"roi_heads.box_predictor.{stage}.cls_score.bias", (num_classes + 1,)),
        (f"roi_heads.box_predictor.{stage}.bbox_pred.weight", (4, 1024)),
        (f"roi_heads.box_predictor.{stage}.bbox_pred.bias", (4,)),
    ]
  return spec


def resnet_bottleneck_spec(prefix: str = "backbone.bottom_up.", depth_blocks=(3, 4, 6, 3)):
  """[(key, torch shape)] of a detectron2 bottleneck ResNet (FrozenBN, no conv biases)."""

  def conv_bn(name, cout, cin, k):
    return [(f"{prefix}{name}.weight", (cout, cin, k, k))] + [
        (f"{prefix}{name}.norm.{leaf}", (cout,))
        for leaf in ("weight", "bias", "running_mean", "running_var")
    ]

  spec = conv_bn("stem.conv1", 64, 3, 7)
  cin = 64
  for stage, num_blocks in enumerate(depth_blocks):
    mid, cout = 64 * 2**stage, 256 * 2**stage
    for block in range(num_blocks):
      blk = f"res{stage + 2}.{block}"
      if block == 0:
        spec += conv_bn(f"{blk}.shortcut", cout, cin, 1)
      spec += conv_bn(f"{blk}.conv1", mid, cin if block == 0 else cout, 1)
      spec += conv_bn(f"{blk}.conv2", mid, mid, 3)
      spec += conv_bn(f"{blk}.conv3", cout, mid, 1)
    cin = cout
  return spec
