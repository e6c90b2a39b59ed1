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
from typing import Any, Callable, Dict

import jax.numpy as jnp

from cn2_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class BackboneEntry:
  build: Callable  # (FrozenConfigDict model config, dtype) -> flax.linen.Module
  frozen_param_prefixes: Callable  # (model config) -> tuple[str, ...], relative to the backbone


BACKBONES: Dict[str, BackboneEntry] = {}


def register(name: str, *, frozen_param_prefixes: Callable) -> Callable:
  def deco(build: Callable) -> Callable:
    if name in BACKBONES:
      raise ValueError(f"backbone {name!r} is registered twice")
    BACKBONES[name] = BackboneEntry(build, frozen_param_prefixes)
    return build

  return deco


def get(name: str) -> BackboneEntry:
  # The built-in backbones register themselves on import of the package's modules.
  import cn2_jax.modeling.backbone  # noqa: F401  (registration side effect)

  if name not in BACKBONES:
    raise ConfigError(
        f"model.backbone={name!r} is not a known backbone (known: {sorted(BACKBONES)})"
    )
  return BACKBONES[name]


def build_backbone(model_config: Any, dtype: Any):
  """The backbone module of `model_config.backbone` (frozen config `config.model`)."""
  return get(model_config.backbone).build(model_config, dtype)


def frozen_param_prefixes(model_config: Any, prefix: str = "backbone.") -> tuple:
  return tuple(prefix + p for p in get(model_config.backbone).frozen_param_prefixes(model_config))


def backbone_size_divisibility(model_config: Any) -> int:
  """The size divisibility of `model_config.backbone` (the official canvas multiple)."""
  return int(build_backbone(model_config, jnp.float32).size_divisibility)
