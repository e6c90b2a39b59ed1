"""`python -m cn2_jax.convert`: official detectron2 / CenterNet2 weights (and ImageNet ResNet
initialisations) to a cn2_jax Orbax directory. The library behind it is `cn2_jax.weights`.

Usage:
  python -m cn2_jax.convert --src model_final.pth --out /ckpt/cn2_r50 [--config configs/cn2_r50.py]
  python -m cn2_jax.convert --src R-50.pkl --out /ckpt/r50_imagenet --backbone-only

Steps (each a `cn2_jax.weights` function, tested on its own): `load_checkpoint_file` ->
`detect_format` -> `to_detectron2_names` -> `convert_to_flax` (strict report) -> `save_variables`.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

from cn2_jax.weights import (
    ConversionError,
    convert_to_flax,
    detect_format,
    format_expectations,
    load_checkpoint_file,
    save_variables,
    to_detectron2_names,
)

# The library names, re-exported for code written against the single-module converter.
from cn2_jax.weights import ConversionReport, StateDict  # noqa: F401
from cn2_jax.weights import restore_saved_variables as restore_variables  # noqa: F401
from cn2_jax.weights.flax_mapping import _kernel_layout  # noqa: F401

__all__ = ["main"]


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
    same = (
        np.allclose(np.asarray(got, float), np.asarray(value, float), atol=1e-3)
        if isinstance(value, tuple)
        else got == value
    )
    if not same:
      warnings.append(f"config sets {name}={got!r} but {fmt} weights need {value!r}")
  return warnings


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(
      prog="python -m cn2_jax.convert",
      description="Convert detectron2 / CenterNet2 / ImageNet ResNet weights to a cn2_jax Orbax "
      "checkpoint.",
  )
  ap.add_argument("--src", required=True, help=".pth / .pkl checkpoint")
  ap.add_argument("--out", required=True, help="Orbax checkpoint directory to write")
  ap.add_argument("--config", default="configs/cn2_r50.py", help="config file with get_config()")
  ap.add_argument(
      "--backbone-only",
      action="store_true",
      help="fill only backbone.bottom_up.* (ImageNet initialisation)",
  )
  ap.add_argument("--seed", type=int, default=0, help="init seed for --backbone-only")
  ap.add_argument("--force", action="store_true", help="overwrite --out")
  args = ap.parse_args(argv)
  try:
    sd = load_checkpoint_file(args.src)
    fmt = detect_format(sd)
    sd = to_detectron2_names(sd, fmt)
    if fmt != "detectron2" and not args.backbone_only:
      raise ConversionError(
          f"{args.src} holds {fmt} ImageNet weights (backbone only): " "pass --backbone-only"
      )
    model_config = _load_config(args.config)
    from cn2_jax.modeling import detector

    target = (
        detector.init_variables(model_config, args.seed)
        if args.backbone_only
        else detector.abstract_variables(model_config)
    )
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
