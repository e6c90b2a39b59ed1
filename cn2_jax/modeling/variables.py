"""Initialising a detector module's variables, for every family: a minimal batch obeying the batch
contract of docs/DESIGN.md, and `init` without the sown intermediates.

Variables are `{'params', 'frozen'}` for CenterNet2 and `{'params', 'batch_stats'}` for the
one-stage family. Parameter shapes do not depend on the image size, so a tiny batch is used.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from cn2_jax.modeling.backbone.build import backbone_size_divisibility


def dummy_batch(batch_size: int = 1, hw: tuple[int, int] = (64, 64), max_boxes: int = 4) -> dict:
  """A minimal batch obeying the batch contract (for init / shape inference)."""
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


def _init_side(model: nn.Module) -> int:
  """The smallest square input the model's backbone takes (its size divisibility, >= 64)."""
  if "backbone" in model.__dataclass_fields__:  # a backbone module field (CenterNetDetector)
    divisibility = int(getattr(model.backbone, "size_divisibility", 32))
  elif "backbone" in (getattr(model, "config", None) or {}):  # a registered backbone's name
    divisibility = backbone_size_divisibility(model.config)
  else:
    divisibility = 32
  return max(64, divisibility)


def init_fn(model: nn.Module):
  """`key -> variables` (the modules' official init rules); pure, so jit / eval_shape-able."""
  side = _init_side(model)

  def init(key):
    variables = model.init(key, dummy_batch(hw=(side, side)), train=False)
    return {k: v for k, v in variables.items() if k != "intermediates"}

  return init


def init_module_variables(model: nn.Module, seed: int = 0) -> dict:
  """Randomly initialised variables of `model`."""
  return jax.jit(init_fn(model))(jax.random.PRNGKey(seed))


def abstract_module_variables(model: nn.Module) -> dict:
  """The variable structure of `model` as `jax.ShapeDtypeStruct` leaves (no computation)."""
  return jax.eval_shape(init_fn(model), jax.random.PRNGKey(0))
