"""The family-agnostic detector API: build the model of `config.model.arch`, initialise or
describe its variables, a dummy batch, and mapping detections back to the original image.

The detector families live in `modeling/meta_arch/` (CenterNet2: `meta_arch/centernet2.py`).
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


def build_model(
    model_config: ml_collections.ConfigDict, axis_name: Optional[str] = None
) -> nn.Module:
  """The detector of `model_config.arch` (modeling/meta_arch/), e.g. `CenterNet2`."""
  return meta_arch.build_model(model_config, axis_name)


def dummy_batch(batch_size: int = 1, hw: tuple[int, int] = (64, 64), max_boxes: int = 4) -> dict:
  """A minimal batch obeying the batch contract (for init / shape inference)."""
  import numpy as np

  h, w = hw
  return dict(
      image=np.zeros((batch_size, h, w, 3), np.uint8),
      image_hw=np.tile(np.array([[h, w]], np.int32), (batch_size, 1)),
      gt_boxes=np.zeros((batch_size, max_boxes, 4), np.float32),
      gt_classes=np.zeros((batch_size, max_boxes), np.int32),
      gt_valid=np.zeros((batch_size, max_boxes), bool),
      gt_crowd=np.zeros((batch_size, max_boxes), bool),
      batch_mask=np.ones((batch_size,), bool),
  )


def init_fn(model: CenterNet2):
  """`key -> {'params', 'frozen'}` (official init rules); pure, so jit / eval_shape-able.
  Parameter shapes do not depend on the image size, so a tiny dummy batch is used."""
  return lambda key: model.init(key, dummy_batch(), train=False)


def init_variables(model_config: ml_collections.ConfigDict, seed: int = 0) -> dict:
  """Randomly initialised {'params', 'frozen'}."""
  return jax.jit(init_fn(build_model(model_config)))(jax.random.PRNGKey(seed))


def abstract_variables(model_config: ml_collections.ConfigDict) -> dict:
  """The variable structure as a pytree of jax.ShapeDtypeStruct (no computation)."""
  return jax.eval_shape(init_fn(build_model(model_config)), jax.random.PRNGKey(0))


def frozen_param_prefixes(model_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """'.'-joined param path prefixes that receive no update (FREEZE_AT)."""
  from cn2_jax.modeling.backbone.resnet import frozen_param_prefixes as resnet_prefixes

  return tuple(f"backbone.bottom_up.{p}" for p in resnet_prefixes(model_config.freeze_at))


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
