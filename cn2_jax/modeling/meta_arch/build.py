"""The meta-architecture registry: `model.arch` -> the Linen module class of that detector family.

A family registers its top-level module with `@register("name")`; `build_model(config.model)`
instantiates it with the frozen model config. Every registered module follows the Model API of
docs/DESIGN.md (`apply(variables, batch, train=False)` -> detections dict; `train=True` -> losses),
so the data pipeline, training loop, evaluation, predict and export work for every family.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import ml_collections

META_ARCHS: Dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
  def deco(cls: type) -> type:
    if name in META_ARCHS:
      raise ValueError(f"meta-architecture {name!r} is registered twice")
    META_ARCHS[name] = cls
    return cls

  return deco


def build_model(model_config: ml_collections.ConfigDict, axis_name: Optional[str] = None):
  """The detector module of `model_config.arch` (a registered family)."""
  arch = model_config.arch
  if arch not in META_ARCHS:
    from cn2_jax.errors import ConfigError

    raise ConfigError(
        f"model.arch={arch!r} is not a known detector family " f"(known: {sorted(META_ARCHS)})"
    )
  return META_ARCHS[arch](ml_collections.FrozenConfigDict(model_config), axis_name=axis_name)
