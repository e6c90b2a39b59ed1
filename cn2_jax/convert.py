"""`python -m cn2_jax.convert`: official checkpoints of every detector family (and ImageNet ResNet
initialisations) to a cn2_jax Orbax directory. The libraries behind it are `cn2_jax.weights`
(CenterNet2 / detectron2) and `cn2_jax.weights.onestage` (one-stage CenterNet).

Usage:
  python -m cn2_jax.convert --src model_final.pth --out /ckpt/cn2_r50 [--config configs/cn2_r50.py]
  python -m cn2_jax.convert --src R-50.pkl --out /ckpt/r50_imagenet --backbone-only
  python -m cn2_jax.convert --src centerx_r18.pth --out /ckpt/centerx_r18
  python -m cn2_jax.convert --src resnet18.pth --out /ckpt/r18 --config CFG --backbone-only

The checkpoint's format is detected from its keys (`detect_checkpoint`) and picks the family
(`FORMATS`); `--family` checks it, and chooses the family of torchvision ImageNet weights (which
both families take; otherwise `--config`'s model.arch does). Each family's converter (`FAMILIES`):
  centernet2, centernet: `to_detectron2_names` -> `convert_to_flax` onto the `--config` model
              (strict report; every zoo config of configs/zoo)
  onestage:   `to_centerx_names` -> `convert_onestage` onto the model whose architecture is read
              off the checkpoint (`infer_model_config`), or the `--config` model (strict report)
then `save_variables`. Any missing, unexpected or mis-shaped key fails the conversion (exit 1, the
report on stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from pathlib import Path
from typing import Callable, Optional, Tuple

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
from cn2_jax.weights import onestage as onestage_weights

# The library names, re-exported for code written against the single-module converter.
from cn2_jax.weights import ConversionReport, StateDict  # noqa: F401
from cn2_jax.weights import restore_saved_variables as restore_variables  # noqa: F401
from cn2_jax.weights.flax_mapping import _kernel_layout  # noqa: F401

__all__ = ["FAMILIES", "FORMATS", "detect_checkpoint", "main"]

_DEFAULT_CONFIG = "configs/cn2_r50.py"  # the CenterNet2 model converted onto without --config


@dataclasses.dataclass(frozen=True)
class Format:
  families: Tuple[str, ...]  # the detector families whose weights these can be
  backbone_only: bool  # ImageNet classification weights: --backbone-only
  what: str


# Checkpoint format (`detect_checkpoint`) -> what it holds.
FORMATS = {
    "detectron2": Format(("centernet2", "centernet"), False, "detectron2 / CenterNet2 model"),
    "msra_c2": Format(("centernet2", "centernet"), True, "MSRA caffe2 ImageNet ResNet"),
    "torchvision": Format(
        ("centernet2", "centernet", "onestage"), True, "torchvision ImageNet ResNet"
    ),
    "centerx": Format(("onestage",), False, "centerX one-stage CenterNet"),
    "xingyizhou": Format(("onestage",), False, "xingyizhou/CenterNet resdcn"),
}
_ONESTAGE_PREFIXES = ("upsample.", "head.", "deconv_layers.", "hm.")


def detect_checkpoint(sd) -> str:
  """The checkpoint's format (a key of `FORMATS`) from its key names."""
  if any(k.startswith(_ONESTAGE_PREFIXES) for k in sd):
    return onestage_weights.detect_format(sd)  # centerx | xingyizhou
  try:
    return detect_format(sd)  # detectron2 | msra_c2 | torchvision
  except ConversionError as e:
    raise ConversionError(
        f"{e}; nor centerX (backbone./upsample./head.) or xingyizhou/CenterNet resdcn "
        "(deconv_layers./hm./wh./reg.) one-stage names"
    ) from None


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


def _convert_centernet2(sd, fmt: str, args, model_config) -> Tuple[dict, str]:
  """detectron2 / MSRA / torchvision weights onto the model of `model_config` (CenterNet2 or
  the official one-stage CenterNet: both are named like the official state dict)."""
  sd = to_detectron2_names(sd, fmt)
  from cn2_jax.modeling import detector

  target = (
      detector.init_variables(model_config, args.seed)
      if args.backbone_only
      else detector.abstract_variables(model_config)
  )
  variables, report = convert_to_flax(sd, target, backbone_only=args.backbone_only)
  report.notes.extend(f"WARNING: {w}" for w in _config_warnings(model_config, fmt))
  return variables, report.summary()


def _convert_onestage(sd, fmt: str, args, model_config) -> Tuple[dict, str]:
  """centerX / xingyizhou / torchvision weights onto the one-stage model: `model_config`'s if
  given, else the architecture read off the checkpoint (schema values for the other settings).
  --backbone-only needs `model_config`: a backbone alone does not name the rest of the model."""
  sd = onestage_weights.to_centerx_names(sd, fmt)
  if args.backbone_only and model_config is None:
    raise ConversionError(
        "one-stage --backbone-only needs --config (a model.arch='onestage' config: the model "
        "whose backbone the weights fill)"
    )
  if model_config is not None:
    from cn2_jax.modeling import detector

    target = (
        detector.init_variables(model_config, args.seed)
        if args.backbone_only
        else detector.abstract_variables(model_config)
    )
  else:
    from cn2_jax.modeling.onestage.model import build_onestage_model
    from cn2_jax.modeling.variables import abstract_module_variables

    model = build_onestage_model(onestage_weights.infer_model_config(sd))
    target = abstract_module_variables(model)
  variables, report = onestage_weights.convert_onestage(
      sd, target, backbone_only=args.backbone_only
  )
  return variables, report.summary(max_list=50, show_mapped=False)


@dataclasses.dataclass(frozen=True)
class Family:
  convert: Callable  # (state dict, format, args, model config or None) -> (variables, report)
  default_config: Optional[str]  # model config file used without --config (None: none needed)


# Detector family (config `model.arch`) -> its converter.
FAMILIES = {
    "centernet2": Family(_convert_centernet2, _DEFAULT_CONFIG),
    # the official one-stage CenterNet of the CenterNet2 code base: the same detectron2 names
    "centernet": Family(_convert_centernet2, "configs/zoo/CenterNet-FPN_R50_1x.py"),
    "onestage": Family(_convert_onestage, None),
}


def _model_arch(model_config) -> str:
  arch = _find_setting(model_config, "arch")
  if arch is None:  # a config without the key: the schema's value
    from cn2_jax.config import base_config

    arch = base_config().model.arch
  return arch


def _family_of(fmt: str, requested: str, model_config, src: str) -> str:
  """The family to convert `fmt` weights for: `--family` if given (checked against the
  checkpoint), else the only one the format fits, else `--config`'s model.arch."""
  fits = FORMATS[fmt].families
  if requested != "auto":
    if requested not in fits:
      raise ConversionError(
          f"{src} holds {FORMATS[fmt].what} weights ({fmt}), which are not "
          f"{requested} weights (they fit: {', '.join(fits)})"
      )
    return requested
  if len(fits) == 1:
    return fits[0]
  arch = _model_arch(model_config if model_config is not None else {})
  if arch not in fits:
    raise ConversionError(
        f"{src} holds {FORMATS[fmt].what} weights, which model.arch={arch!r} does not take: "
        f"pass --family ({' or '.join(fits)})"
    )
  return arch


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(
      prog="python -m cn2_jax.convert",
      description="Convert official weights to a cn2_jax Orbax checkpoint: detectron2 / "
      "CenterNet2 and ImageNet ResNet (MSRA, torchvision) weights for CenterNet2; centerX, "
      "xingyizhou/CenterNet resdcn and torchvision ResNet weights for the one-stage CenterNet. "
      "The format (and with it the family) is detected from the checkpoint's keys.",
  )
  ap.add_argument("--src", required=True, help=".pth / .pkl checkpoint")
  ap.add_argument("--out", required=True, help="Orbax checkpoint directory to write")
  ap.add_argument(
      "--family",
      default="auto",
      choices=("auto",) + tuple(FAMILIES),
      help="detector family of the weights (default: from the checkpoint's keys; torchvision "
      "ImageNet weights fit both: then --config's model.arch decides)",
  )
  ap.add_argument(
      "--config",
      default=None,
      help=f"config file with get_config(): the model to convert onto (CenterNet2 default: "
      f"{_DEFAULT_CONFIG}; one-stage default: the architecture read off the checkpoint)",
  )
  ap.add_argument(
      "--backbone-only",
      action="store_true",
      help="fill only the backbone (ImageNet initialisation); the rest keeps its initial values",
  )
  ap.add_argument("--seed", type=int, default=0, help="init seed for --backbone-only")
  ap.add_argument("--force", action="store_true", help="overwrite --out")
  args = ap.parse_args(argv)
  try:
    sd = load_checkpoint_file(args.src)
    fmt = detect_checkpoint(sd)
    model_config = _load_config(args.config) if args.config else None
    family = _family_of(fmt, args.family, model_config, args.src)
    if model_config is not None and _model_arch(model_config) != family:
      raise ConversionError(
          f"{args.config} builds model.arch={_model_arch(model_config)!r}, but {args.src} holds "
          f"{family} weights ({FORMATS[fmt].what})"
      )
    if FORMATS[fmt].backbone_only and not args.backbone_only:
      raise ConversionError(
          f"{args.src} holds {fmt} ImageNet weights (backbone only): pass --backbone-only"
      )
    spec = FAMILIES[family]
    if model_config is None and spec.default_config:
      model_config = _load_config(spec.default_config)
    variables, summary = spec.convert(sd, fmt, args, model_config)
    print(summary)
    save_variables(variables, args.out, overwrite=args.force)
    print(f"wrote {Path(args.out).absolute()}")
    return 0
  except ConversionError as e:
    print(f"conversion failed: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
