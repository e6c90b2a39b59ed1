"""The DCNv2 op reference of the centerX oracle (../shared/oracle_centerx, its README §3 and §6).

* `centerx_oracle_dir()`: where the centerX oracle files are (or None).
* `load_dcn_op_reference(dtype)`: `centerx_dcn_op_dev.npz` converted to this repo's layouts.

The reference was produced by torchvision's CPU `deform_conv2d` kernel (forward and backward)
with stride 1, padding 1, dilation 1, groups 1 and one offset group, on numpy RandomState(0)
inputs; the gradients are those of `sum(output * grad_output)`, once in float64 and once in
float32 (inputs cast from the same float64 arrays).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional

import numpy as np

DCN_OP_NPZ = "centerx_dcn_op_dev.npz"
DCN_CHECKS_JSON = "centerx_dcn_checks_dev.json"
# Op settings of the stored reference (README §6).
DCN_OP_SETTINGS = dict(stride=1, padding=1, dilation=1, offset_groups=1)


def centerx_oracle_dir() -> Optional[Path]:
  """$CN2_CENTERX_ORACLE_DIR, else `<repo>/../shared/oracle_centerx`; None if it does not exist
  (same rule as `cn2_jax.testing.oracle.oracle_dir` for the CenterNet2 oracle)."""
  env = os.environ.get("CN2_CENTERX_ORACLE_DIR")
  if env:
    path = Path(env)
    return path if path.is_dir() else None
  path = Path(__file__).resolve().parents[2].parent / "shared" / "oracle_centerx"
  return path if path.is_dir() else None


def dcn_op_npz_path() -> Optional[Path]:
  folder = centerx_oracle_dir()
  if folder is None or not (folder / DCN_OP_NPZ).is_file():
    return None
  return folder / DCN_OP_NPZ


def _nchw_to_nhwc(a: np.ndarray) -> np.ndarray:
  # Channel order is kept: offset channel 2k = dy, 2k + 1 = dx, mask channel k (README §3).
  return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def load_dcn_op_reference(dtype: str = "float64") -> Dict[str, np.ndarray]:
  """The op reference in NHWC / HWIO layouts.

  Args:
    dtype: "float64" or "float32": which stored outputs and gradients to return; the inputs are
      the stored float64 arrays cast to that dtype (as the oracle did for its float32 run).
  Returns:
    dict with inputs `input [B,H,W,Cin]`, `offset [B,Ho,Wo,2K]`, `mask [B,Ho,Wo,K]`,
    `kernel [kh,kw,Cin,Cout]`, `bias [Cout]`, `grad_output [B,Ho,Wo,Cout]`, and the official
    results `output [B,Ho,Wo,Cout]`, `grad_input`, `grad_offset`, `grad_mask` (NHWC like their
    inputs), `grad_kernel [kh,kw,Cin,Cout]`, `grad_bias [Cout]`.
  Raises:
    FileNotFoundError: the oracle folder or the npz is missing.
  """
  if dtype not in ("float64", "float32"):
    raise ValueError(f"dtype must be float64 or float32, got {dtype!r}")
  path = dcn_op_npz_path()
  if path is None:
    raise FileNotFoundError(f"{DCN_OP_NPZ} not found (set CN2_CENTERX_ORACLE_DIR)")
  suffix = "f64" if dtype == "float64" else "f32"
  with np.load(path) as npz:
    raw = {key: npz[key] for key in npz.files}
  cast = lambda a: np.asarray(a, np.float64).astype(dtype)
  return {
      "input": _nchw_to_nhwc(cast(raw["input"])),
      "offset": _nchw_to_nhwc(cast(raw["offset"])),
      "mask": _nchw_to_nhwc(cast(raw["mask"])),
      "kernel": np.ascontiguousarray(cast(raw["weight"]).transpose(2, 3, 1, 0)),
      "bias": cast(raw["bias"]),
      "grad_output": _nchw_to_nhwc(cast(raw["grad_output"])),
      "output": _nchw_to_nhwc(raw[f"output_{suffix}"]),
      "grad_input": _nchw_to_nhwc(raw[f"grad_input_{suffix}"]),
      "grad_offset": _nchw_to_nhwc(raw[f"grad_offset_{suffix}"]),
      "grad_mask": _nchw_to_nhwc(raw[f"grad_mask_{suffix}"]),
      "grad_kernel": np.ascontiguousarray(raw[f"grad_weight_{suffix}"].transpose(2, 3, 1, 0)),
      "grad_bias": np.asarray(raw[f"grad_bias_{suffix}"]),
  }


def load_dcn_checks() -> Optional[dict]:
  """`centerx_dcn_checks_dev.json` (the oracle's own DCN verification numbers), or None."""
  folder = centerx_oracle_dir()
  if folder is None or not (folder / DCN_CHECKS_JSON).is_file():
    return None
  with open(folder / DCN_CHECKS_JSON) as f:
    return json.load(f)
