"""The backbone registry: `model.backbone` -> the network from the image to the feature levels.

As in detectron2 (`BACKBONE_REGISTRY`, `MODEL.BACKBONE.NAME`) and with the official CenterNet2
names, a backbone is the bottom-up network together with its neck (FPN, BiFPN, DLA-up), so one
name picks the whole image -> features path of an official config:

    @register("build_p67_resnet_fpn_backbone", frozen_param_prefixes=resnet_fpn_frozen)
    def build_p67_resnet_fpn_backbone(model_config, dtype) -> flax.linen.Module: ...

Contract of the built module (the detector names it `backbone`, so its variable paths are the
official `backbone.*` state-dict keys):
  * `__call__(x, canvas_hw=None) -> [F_0, F_1, ...]`: `x` the normalised image `[N, H, W, 3]`,
    H and W multiples of `size_divisibility`; `canvas_hw` (`[2]` int32 or None) the official
    canvas (modeling/canvas.py): values on it equal the official ones whatever the padding.
    `F_i` `[N, H / strides[i], W / strides[i], C]`, finest level first (a backbone whose
    official outputs are named, such as DLASeg's `dla2`, may return {name: map} instead; the
    detector picks its `in_features`).
  * `strides` (tuple of ints, one per output), `out_channels` (C, the same on every level) and
    `size_divisibility` (int), readable on the unbound module: the detector wires heads and the
    official canvas from them.

`frozen_param_prefixes(model_config)` names the '.'-joined parameter prefixes, relative to the
backbone, that receive no update (detectron2 FREEZE_AT). Adding a backbone is one new file in this
folder with one `register` call, imported in `modeling/backbone/__init__.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp

from cn2_jax import schema
from cn2_jax.errors import ConfigError
from cn2_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class BackboneEntry:
  build: Callable  # (FrozenConfigDict model config, dtype) -> flax.linen.Module
  frozen_param_prefixes: Callable  # (model config) -> tuple[str, ...], relative to the backbone


# The built-in backbones register themselves on import of the package's modules.
BACKBONES = Registry("backbone", "model.backbone", builtins="cn2_jax.modeling.backbone")


def register(name: str, *, frozen_param_prefixes: Callable) -> Callable:
  def deco(build: Callable) -> Callable:
    BACKBONES.add(name, BackboneEntry(build, frozen_param_prefixes))
    return build

  return deco


def get(name: str) -> BackboneEntry:
  return BACKBONES.lookup(name)


def build_backbone(model_config: Any, dtype: Any):
  """The backbone module of `model_config.backbone` (frozen config `config.model`)."""
  return get(model_config.backbone).build(model_config, dtype)


def frozen_param_prefixes(model_config: Any, prefix: str = "backbone.") -> tuple:
  return tuple(prefix + p for p in get(model_config.backbone).frozen_param_prefixes(model_config))


def backbone_size_divisibility(model_config: Any) -> int:
  """The size divisibility of `model_config.backbone` (the official canvas multiple)."""
  return int(build_backbone(model_config, jnp.float32).size_divisibility)


def _validate_resnet(cfg) -> None:
  if cfg.model.resnet_depth not in (18, 34, 50, 101):
    raise ConfigError(f"model.resnet_depth must be 18, 34, 50 or 101, got {cfg.model.resnet_depth}")


def _validate_backbone(cfg) -> None:
  m = cfg.model
  if m.input_format not in ("BGR", "RGB"):
    raise ConfigError(f"model.input_format must be 'BGR' or 'RGB', got {m.input_format!r}")
  # The model pads its canvas to its backbone's divisibility; the data must pad to a multiple.
  div, need = int(cfg.data.size_divisibility), backbone_size_divisibility(m)
  if div % need:
    raise ConfigError(
        f"data.size_divisibility={div} must be a multiple of {need}, the size divisibility of "
        f"model.backbone={m.backbone!r}"
    )


RESNET_CONFIG = schema.group(
    "model",
    "ResNet depth and width (every family's ResNet).",
    schema.Field("resnet_depth", 50, "18, 34, 50 or 101"),
    schema.Field("resnet_width", 64, "stem / res2 width (64 official; smaller for tiny models)"),
    validate=_validate_resnet,
)

CONFIG = schema.group(
    "model",
    "The backbone of the CenterNet2 code base's detectors: bottom-up network + neck, with the "
    "official MODEL.BACKBONE / RESNETS / FPN settings.",
    schema.Field(
        "backbone",
        "build_p67_resnet_fpn_backbone",
        "the image -> feature levels network (an official MODEL.BACKBONE.NAME registered in "
        "modeling/backbone/build.py): build_p67_resnet_fpn_backbone = ResNet (resnet_*) + FPN P3-P7",
    ),
    schema.Field(
        "stride_in_1x1", True, "MSRA/caffe style (official); False for torchvision weights"
    ),
    schema.Field("freeze_at", 2, "RESNETS freeze: 2 = stem + res2 frozen; 0 = nothing"),
    schema.Field("resnet_num_groups", 1, "RESNETS.NUM_GROUPS (ResNeXt: 32 for X101-32x8d)"),
    schema.Field(
        "resnet_width_per_group",
        0,
        "RESNETS.WIDTH_PER_GROUP; 0 = resnet_width (8 for X101, 26 for R2-101)",
    ),
    schema.Field(
        "resnet_deform_on_per_stage",
        (False, False, False, False),
        "RESNETS.DEFORM_ON_PER_STAGE, res2..res5 (deformable 3x3 convs)",
    ),
    schema.Field(
        "resnet_deform_modulated", False, "DEFORM_MODULATED: DCNv2 (mask) instead of DCNv1"
    ),
    schema.Field("resnet_deform_num_groups", 1, "DEFORM_NUM_GROUPS (offset groups)"),
    schema.Field(
        "resnet_norm", "FrozenBN", "'FrozenBN' (official), 'GN' (training from scratch) or ''"
    ),
    schema.Field(
        "input_format", "BGR", "'BGR' (official MSRA weights) or 'RGB'; images arrive RGB"
    ),
    schema.Field("pixel_mean", (103.530, 116.280, 123.675), "in input_format order, 0-255 units"),
    schema.Field("pixel_std", (1.0, 1.0, 1.0), "in input_format order, 0-255 units"),
    schema.Field("fpn_channels", 256, "FPN.OUT_CHANNELS"),
    schema.Field(
        "fpn_norm",
        "",
        "FPN lateral/output conv norm: '' (official: convs with bias), 'GN', 'FrozenBN'",
    ),
    families=("centernet2", "centernet"),
    validate=_validate_backbone,
)
