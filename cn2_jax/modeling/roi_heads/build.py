"""The ROI-heads registry: `model.roi_heads.name` -> the second stage of a two-stage detector
(detectron2 `ROI_HEADS_REGISTRY`, `MODEL.ROI_HEADS.NAME`).

    @ROI_HEADS.register("CustomCascadeROIHeads")
    def build(model_config, *, num_classes, min_level, size_divisibility, dtype, axis_name): ...

`model_config` is the frozen `config.model` (the heads' settings are `model.roi_heads`); the
detector passes the wiring: `num_classes`, `min_level` (the level of its first feature map,
P3 -> 3), `size_divisibility` (the backbone's: the official canvas), the compute `dtype` and the
train step's data `axis_name`. The detector names the module `roi_heads`. Contract:
`__call__(features, proposals, image_hw, *, train, gt_boxes=None, gt_classes=None,
gt_valid=None)` with `features` the list of levels `[B, H_l, W_l, C]` from `min_level` on and
`proposals` the proposal generator's; returns the detections (docs/DESIGN.md "Model API") or,
with `train`, the float32 scalar losses.

Adding ROI heads is one new file in this folder with one `register` call (imported in
`modeling/roi_heads/__init__.py`).
"""

from __future__ import annotations

from cn2_jax.registry import Registry

# The built-in heads register themselves on import of the package.
ROI_HEADS = Registry("ROI heads", "model.roi_heads.name", builtins="cn2_jax.modeling.roi_heads")


def build_roi_heads(model_config, **wiring):
  """The `model_config.roi_heads.name` module; `wiring` = num_classes, min_level,
  size_divisibility, dtype, axis_name (see the module docstring)."""
  return ROI_HEADS.lookup(model_config.roi_heads.name)(model_config, **wiring)
