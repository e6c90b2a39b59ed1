"""CenterNet2: ResNet-FPN backbone -> CenterNet proposals -> 3-stage cascade -> detections.

Paper-to-module map (Zhou, Koltun, Krähenbühl 2021, "Probabilistic two-stage detection"):
  backbone (ResNet + FPN P3-P7)      modeling/backbone/{resnet,fpn}.py
  first stage: P(O_k) via CenterNet  modeling/proposal/{centernet_head,targets,losses,decode}.py
  second stage: P(C_k | O_k)         modeling/roi_heads/{cascade,box_head}.py, ops/roi_align.py
  probabilistic score                roi_heads/cascade.py (sqrt(mean_k softmax_k * sqrt(P(O))))

Sub-modules are named `backbone`, `proposal_generator`, `roi_heads` so that variable paths equal
the official detectron2 state-dict keys (docs/DESIGN.md). Registered as `model.arch =
"centernet2"`.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cn2_jax.config import model_kwargs
from cn2_jax.modeling.backbone.fpn import FPN
from cn2_jax.modeling.canvas import canvas_masks, official_canvas
from cn2_jax.modeling.meta_arch.build import ClassParams, register
from cn2_jax.modeling.proposal.centernet import CenterNet
from cn2_jax.modeling.roi_heads.cascade import CascadeROIHeads

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _frozen_param_prefixes(model_config) -> tuple:
  """FREEZE_AT: the ResNet stages that receive no update."""
  from cn2_jax.modeling.backbone.resnet import frozen_param_prefixes as resnet_prefixes

  return tuple(f"backbone.bottom_up.{p}" for p in resnet_prefixes(model_config.freeze_at))


@register(
    "centernet2",
    frozen_param_prefixes=_frozen_param_prefixes,
    # each cascade stage's classifier: num_classes + 1 logits, background last
    class_params=ClassParams(
        r"params/roi_heads/box_predictor\.\d+/cls_score/(kernel|bias)", background_last=True
    ),
)
class CenterNet2(nn.Module):
  """The detector. `config` is `config.model` (cn2_jax/config.py), as a FrozenConfigDict.

  See docs/DESIGN.md "Model API" for the call contract; `batch` follows its batch contract.
  """

  config: Any
  axis_name: Optional[str] = None

  def setup(self):
    # Every setting comes from the config (cn2_jax/config.py holds all defaults); the rest is
    # wiring: the FPN levels' strides (P3..P7) and the level of the first one.
    m = model_kwargs(self.config)
    dtype = _DTYPES[m["dtype"]]
    self.backbone = FPN(
        depth=m["resnet_depth"],
        stride_in_1x1=m["stride_in_1x1"],
        freeze_at=m["freeze_at"],
        norm=m["resnet_norm"],
        width=m["resnet_width"],
        out_channels=m["fpn_channels"],
        fpn_norm=m["fpn_norm"],
        dtype=dtype,
    )
    self.proposal_generator = CenterNet(
        strides=FPN.strides,
        channels=m["fpn_channels"],
        axis_name=self.axis_name,
        dtype=dtype,
        **m["centernet"],
    )
    self.roi_heads = CascadeROIHeads(
        num_classes=m["num_classes"],
        min_level=FPN.min_level,
        axis_name=self.axis_name,
        dtype=dtype,
        **m["roi_heads"],
    )

  def preprocess(self, image: jax.Array, image_hw: jax.Array) -> jax.Array:
    """`[B, H, W, 3]` uint8 RGB -> normalised `[B, H, W, 3]` in input_format, padding = 0."""
    m = self.config
    x = image.astype(jnp.float32)
    if m.input_format == "BGR":
      x = x[..., ::-1]
    x = (x - jnp.asarray(m.pixel_mean, jnp.float32)) / jnp.asarray(m.pixel_std, jnp.float32)
    h, w = image.shape[1], image.shape[2]
    inside = (jnp.arange(h)[None, :, None] < image_hw[:, 0, None, None]) & (
        jnp.arange(w)[None, None, :] < image_hw[:, 1, None, None]
    )
    return jnp.where(inside[..., None], x, 0.0).astype(_DTYPES[m.dtype])

  def __call__(self, batch: dict, train: bool = False):
    images = self.preprocess(batch["image"], batch["image_hw"])
    canvas = official_canvas(batch["image_hw"])
    features = self.backbone(images, canvas)
    for i, f in enumerate(features):
      self.sow("intermediates", f"p{i + 3}", f)
    masks = canvas_masks(
        batch["image_hw"], [f.shape[1:3] for f in features], self.proposal_generator.strides
    )
    if not train:
      proposals = self.proposal_generator(
          features, train=False, masks=masks, image_hw=batch["image_hw"]
      )
      return self.roi_heads(features, proposals, batch["image_hw"], train=False)
    losses, proposals = self.proposal_generator(
        features,
        train=True,
        gt_boxes=batch["gt_boxes"],
        gt_valid=batch["gt_valid"],
        masks=masks,
        image_hw=batch["image_hw"],
    )
    losses.update(
        self.roi_heads(
            features,
            proposals,
            batch["image_hw"],
            train=True,
            gt_boxes=batch["gt_boxes"],
            gt_classes=batch["gt_classes"],
            gt_valid=batch["gt_valid"],
        )
    )
    return losses
