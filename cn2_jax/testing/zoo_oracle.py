"""The official model-zoo oracles (`../shared/oracle_zoo`): outputs of the official CenterNet2 code
for further zoo architectures on the dev image, under the deterministic weight rule of the
CenterNet2_R50_1x oracle (`testing/oracle.py`).

* `zoo_dir()`, `dev_image_path()`: where the files are (None when absent).
* `zoo_state_dict(arch)`: the regenerated official state dict (checked against the checksums).
* `zoo_outputs(arch)`: the official arrays (`outputs_<arch>_000000000009.npz`).
* `compare_map(ours, outputs, name)`: our `[C, H, W]` map against however the oracle stored
  that map (whole float32, float16, or per-channel statistics + 16x16 crops); returns the
  measured differences and raises AssertionError beyond the oracle's tolerances.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from cn2_jax.testing.oracle import oracle_dir, regenerate_oracle_state_dict

DEV_IMAGE = "000000000009"


def zoo_dir() -> Optional[Path]:
  """$CN2_ORACLE_ZOO_DIR, else `oracle_zoo` beside the R50 oracle folder; None if absent."""
  env = os.environ.get("CN2_ORACLE_ZOO_DIR")
  if env:
    return Path(env) if Path(env).is_dir() else None
  base = oracle_dir()
  if base is None or not (base.parent / "oracle_zoo").is_dir():
    return None
  return base.parent / "oracle_zoo"


def dev_image_path() -> Optional[Path]:
  base = oracle_dir()
  return None if base is None else base / f"{DEV_IMAGE}.jpg"


def zoo_state_dict(arch: str) -> dict:
  return regenerate_oracle_state_dict(zoo_dir() / f"{arch}_weights.json")


def zoo_outputs(arch: str) -> dict:
  return dict(np.load(zoo_dir() / f"outputs_{arch}_{DEV_IMAGE}.npz"))


def zoo_summary(arch: str) -> dict:
  with open(zoo_dir() / f"summary_{arch}_{DEV_IMAGE}.json") as f:
    return json.load(f)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.abs(a.astype(np.float64) - b).max() / max(float(np.abs(b).max()), 1e-12))


def compare_map(ours: np.ndarray, out: dict, name: str, rtol: float = 1e-4) -> dict:
  """`ours` `[C, H, W]` float32 against the oracle's stored form of map `name`.

  Whole float32 maps: max |diff| <= rtol * max |X|. float16 maps: |diff| <= 2e-3 |X| +
  2e-3 max |X| (the storage rounding). Crops (tl / center / br, where stored): rtol of the
  crop's max. Per-channel float64 sums: |diff| <= rtol * the channel's abs-sum.
  Returns {measure: relative difference}."""
  shape = tuple(int(dim) for dim in out[f"{name}_shape"][1:])
  if ours.shape != shape:
    raise AssertionError(f"{name}: shape {ours.shape} != official {shape}")
  diffs = {}
  if name in out:
    diffs["whole"] = _rel(ours, out[name])
  elif f"{name}_f16" in out:
    ref = out[f"{name}_f16"].astype(np.float32)
    bound = 2e-3 * np.abs(ref) + 2e-3 * np.abs(ref).max()
    excess = np.abs(ours - ref) - bound
    diffs["f16_excess"] = float(excess.max() / np.abs(ref).max())
    if excess.max() > 0:
      raise AssertionError(f"{name}: differs from the float16 map beyond its rounding")
  cy, cx = (int(v) for v in out[f"{name}_crop_center_origin_yx"])
  crops = {
      "crop_center": ours[:, cy : cy + 16, cx : cx + 16],
      "crop_tl": ours[:, :16, :16],
      "crop_br": ours[:, -16:, -16:],
  }
  for crop, value in crops.items():
    if f"{name}_{crop}" in out:
      diffs[crop] = _rel(value, out[f"{name}_{crop}"])
  sums = ours.astype(np.float64).sum((1, 2))
  abssum = np.maximum(out[f"{name}_chan_abssum"], 1e-12)
  diffs["chan_sum"] = float((np.abs(sums - out[f"{name}_chan_sum"]) / abssum).max())
  bad = {key: value for key, value in diffs.items() if key != "f16_excess" and value > rtol}
  if bad:
    raise AssertionError(f"{name}: relative differences {bad} above {rtol}")
  return diffs


def match_rows(ours: np.ndarray, ref: np.ndarray, tol: float) -> np.ndarray:
  """For each row of `ref`, the index of the row of `ours` within max |diff| <= tol, else -1
  (the oracles' sets are compared by position, not by row order)."""
  if len(ours) == 0 or len(ref) == 0:
    return -np.ones(len(ref), np.int64)
  d = np.abs(ours[:, None, :] - ref[None, :, :]).max(-1)
  best = d.argmin(0)
  return np.where(d[best, np.arange(len(ref))] <= tol, best, -1)
