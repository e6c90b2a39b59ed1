"""Detector families (meta-architectures), side by side as in detectron2's `meta_arch/`.

  build.py        the registry: `model.arch` -> module class; `build_model(config.model)`
  centernet2.py   CenterNet2 (CenterNet proposals + cascade ROI heads), arch "centernet2"
  centernet_onestage.py  the official one-stage CenterNet (CenterNetDetector), arch "centernet"
  onestage.py     one-stage CenterNet as centerX builds it (modeling/onestage/), arch "onestage"

A new family adds `meta_arch/<name>.py` with `@register("<name>")` and its config group
(`schema.group("model.<name>", ..., families=("<name>",))`), imports it here and lists the module
in `config.SCHEMA_MODULES`; it reuses `backbone/`, `ops/` and the shared heads where they are the
same.
"""

from cn2_jax.modeling.meta_arch import (
    centernet2,  # noqa: F401  (registers "centernet2")
    centernet_onestage,  # noqa: F401  (registers "centernet")
    onestage,  # noqa: F401  (registers "onestage")
)
from cn2_jax.modeling.meta_arch.build import (
    META_ARCHS,
    build_model,
    family,
    frozen_param_prefixes,
    register,
)

__all__ = ["META_ARCHS", "build_model", "family", "frozen_param_prefixes", "register"]
