"""The family-agnostic detector API: build the model of `config.model.arch`, initialise or
describe its variables, a dummy batch, and mapping detections back to the original image.

The detector families live in `modeling/meta_arch/` (CenterNet2: `meta_arch/centernet2.py`,
one-stage CenterNet: `meta_arch/onestage.py`).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cn2_jax.modeling.ops import boxes as box_ops
from cn2_jax.modeling import meta_arch
from cn2_jax.modeling.meta_arch.centernet2 import CenterNet2  # noqa: F401  (the class, for users)
from cn2_jax.modeling.variables import (  # noqa: F401  (dummy_batch, init_fn: re-exported)
    abstract_module_variables,
    dummy_batch,
    init_fn,
    init_module_variables,
)


def build_model(
    model_config: ml_collections.ConfigDict, axis_name: Optional[str] = None
) -> nn.Module:
  """The detector of `model_config.arch` (modeling/meta_arch/), e.g. `CenterNet2`."""
  return meta_arch.build_model(model_config, axis_name)


def init_variables(model_config: ml_collections.ConfigDict, seed: int = 0) -> dict:
  """Randomly initialised variables of `model_config.arch`."""
  return init_module_variables(build_model(model_config), seed)


def abstract_variables(model_config: ml_collections.ConfigDict) -> dict:
  """The variable structure as a pytree of jax.ShapeDtypeStruct (no computation)."""
  return abstract_module_variables(build_model(model_config))


def frozen_param_prefixes(model_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """'.'-joined param path prefixes that receive no update (the family's rule, e.g. FREEZE_AT)."""
  return meta_arch.frozen_param_prefixes(model_config)


def postprocess_detections(dets: dict, image_hw: jax.Array, orig_hw: jax.Array) -> dict:
  """detectron2 `detector_postprocess`: rescale `[B, K, 4]` boxes from the resized image to the
  original image (x by orig_w/resized_w, y by orig_h/resized_h), clip, drop empty boxes."""
  hw = image_hw.astype(jnp.float32)
  ohw = orig_hw.astype(jnp.float32)
  sy = ohw[:, 0] / hw[:, 0]
  sx = ohw[:, 1] / hw[:, 1]
  scale = jnp.stack([sx, sy, sx, sy], axis=-1)[:, None, :]
  boxes = box_ops.clip_boxes(dets["boxes"] * scale, ohw[:, None, :])
  out = dict(dets)
  out["boxes"] = boxes
  out["valid"] = dets["valid"] & box_ops.nonempty(boxes)
  return out
