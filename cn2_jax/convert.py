"""`python -m cn2_jax.convert`: official checkpoints of every detector family (and ImageNet ResNet
initialisations) to a cn2_jax Orbax directory. The libraries behind it are `cn2_jax.weights`
(CenterNet2 / detectron2) and `cn2_jax.weights.onestage` (one-stage CenterNet).

Usage:
  python -m cn2_jax.convert --src model_final.pth --out /ckpt/cn2_r50 [--config configs/cn2_r50.py]
  python -m cn2_jax.convert --src R-50.pkl --out /ckpt/r50_imagenet --backbone-only
  python -m cn2_jax.convert --src centerx_r18.pth --out /ckpt/centerx_r18
  python -m cn2_jax.convert --src resnet18.pth --out /ckpt/r18 --config CFG --backbone-only
  python -m cn2_jax.convert --src RegNetX-400MF_dds_8gpu.pyth --out /ckpt/rx400 --config CFG \
      --backbone-only        (CFG: model.arch='onestage', model.onestage.backbone='RegNetX-400MF')

The checkpoint's format is detected from its keys (`detect_checkpoint`) and picks the family
(`FORMATS`); `--family` checks it, and chooses the family of torchvision ImageNet weights (which
both families take; otherwise `--config`'s model.arch does). Each family's converter (its
registry entry's `weights.convert_checkpoint`, modeling/meta_arch/):
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
from typing import Tuple


from cn2_jax.config import base_config
from cn2_jax.weights import (
    ConversionError,
    detect_format,
    load_checkpoint_file,
    save_variables,
)
from cn2_jax.modeling import meta_arch
from cn2_jax.weights import onestage as onestage_weights
from cn2_jax.weights.rename import find_setting

# The library names, re-exported for code written against the single-module converter.
from cn2_jax.weights import (  # noqa: F401
    ConversionReport,
    StateDict,
    convert_to_flax,
    format_expectations,
    to_detectron2_names,
)
from cn2_jax.weights import restore_saved_variables as restore_variables  # noqa: F401
from cn2_jax.weights.flax_mapping import _kernel_layout  # noqa: F401

__all__ = ["FORMATS", "detect_checkpoint", "main"]


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
    "pycls": Format(("onestage",), True, "pycls ImageNet RegNet"),
}
_ONESTAGE_PREFIXES = ("upsample.", "head.", "deconv_layers.", "hm.")


def detect_checkpoint(sd) -> str:
  """The checkpoint's format (a key of `FORMATS`) from its key names."""
  if onestage_weights.is_pycls(sd) or any(key.startswith(_ONESTAGE_PREFIXES) for key in sd):
    return onestage_weights.detect_format(sd)  # pycls | centerx | xingyizhou
  try:
    return detect_format(sd)  # detectron2 | msra_c2 | torchvision
  except ConversionError as e:
    raise ConversionError(
        f"{e}; nor centerX (backbone./upsample./head.), xingyizhou/CenterNet resdcn "
        "(deconv_layers./hm./wh./reg.) or pycls RegNet (stem.conv./s1.b1.) one-stage names"
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


def _model_arch(model_config) -> str:
  arch = find_setting(model_config, "arch")
  if arch is None:  # a config without the key: the schema's value
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
  parser = argparse.ArgumentParser(
      prog="python -m cn2_jax.convert",
      description="Convert official weights to a cn2_jax Orbax checkpoint: detectron2 / "
      "CenterNet2 and ImageNet ResNet (MSRA, torchvision) weights for CenterNet2; centerX, "
      "xingyizhou/CenterNet resdcn, torchvision ResNet and pycls RegNet weights for the one-stage "
      "CenterNet. "
      "The format (and with it the family) is detected from the checkpoint's keys.",
  )
  parser.add_argument("--src", required=True, help=".pth / .pkl checkpoint")
  parser.add_argument("--out", required=True, help="Orbax checkpoint directory to write")
  parser.add_argument(
      "--family",
      default="auto",
      choices=("auto",) + tuple(meta_arch.META_ARCHS),
      help="detector family of the weights (default: from the checkpoint's keys; torchvision "
      "ImageNet weights fit both: then --config's model.arch decides)",
  )
  parser.add_argument(
      "--config",
      default=None,
      help="config file with get_config(): the model to convert onto (default: the family's "
      "weights.default_config, configs/cn2_r50.py for CenterNet2; one-stage: the architecture "
      "read off the checkpoint)",
  )
  parser.add_argument(
      "--backbone-only",
      action="store_true",
      help="fill only the backbone (ImageNet initialisation); the rest keeps its initial values",
  )
  parser.add_argument("--seed", type=int, default=0, help="init seed for --backbone-only")
  parser.add_argument("--force", action="store_true", help="overwrite --out")
  args = parser.parse_args(argv)
  try:
    state_dict = load_checkpoint_file(args.src)
    fmt = detect_checkpoint(state_dict)
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
    weights = meta_arch.family(family).weights
    if model_config is None and weights.default_config:
      model_config = _load_config(weights.default_config)
    variables, summary = weights.convert_checkpoint(
        state_dict, fmt, seed=args.seed, backbone_only=args.backbone_only, model_config=model_config
    )
    print(summary)
    save_variables(variables, args.out, overwrite=args.force)
    print(f"wrote {Path(args.out).absolute()}")
    return 0
  except ConversionError as e:
    print(f"conversion failed: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
