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

import math
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax

from cn2_jax.modeling.backbone.build import build_backbone
from cn2_jax.modeling.backbone.build import frozen_param_prefixes as backbone_frozen_prefixes
from cn2_jax.modeling.canvas import canvas_masks, normalized_images, official_canvas
from cn2_jax.modeling.layers import COMPUTE_DTYPES
from cn2_jax.modeling.meta_arch.build import ClassParams, WeightFormat, build_model, register
from cn2_jax.modeling.onestage import teachers
from cn2_jax.modeling.proposal.build import build_proposal_generator
from cn2_jax.modeling.roi_heads.build import build_roi_heads
from cn2_jax.modeling.variables import abstract_module_variables, init_module_variables
from cn2_jax.weights import flax_mapping, rename


def convert_checkpoint(sd, fmt: str, *, seed: int, backbone_only: bool, model_config):
  """`python -m cn2_jax.convert` for the families named like the official state dict (CenterNet2,
  the official one-stage CenterNet): detectron2 / MSRA / torchvision weights onto the model of
  `model_config`. Returns (variables, report summary)."""
  sd = rename.to_detectron2_names(sd, fmt)
  target = (
      init_module_variables(build_model(model_config), seed)
      if backbone_only
      else abstract_module_variables(build_model(model_config))
  )
  variables, report = flax_mapping.convert_to_flax(sd, target, backbone_only=backbone_only)
  report.notes.extend(f"WARNING: {w}" for w in rename.config_warnings(model_config, fmt))
  return variables, report.summary()


@register(
    "centernet2",
    frozen_param_prefixes=backbone_frozen_prefixes,  # FREEZE_AT of the backbone
    # each cascade stage's classifier: num_classes + 1 logits, background last
    class_params=ClassParams(
        r"params/roi_heads/box_predictor(\.\d+)?/cls_score/(kernel|bias)", background_last=True
    ),
    display_name="CenterNet2",
    # detectron2 / CenterNet2 checkpoints, MSRA and torchvision ImageNet backbones
    weights=WeightFormat(
        convert=flax_mapping.convert_official,
        named_tensors=flax_mapping.official_named_tensors,
        convert_checkpoint=convert_checkpoint,
        default_config="configs/cn2_r50.py",
        fields_by_path=(
            ("/backbone/bottom_up/", "model.resnet_depth, model.resnet_width or model.resnet_norm"),
            ("/backbone/", "model.fpn_channels or model.fpn_norm"),
            ("/proposal_generator/", "model.centernet.num_convs or model.fpn_channels"),
            ("/roi_heads/box_predictor", "model.num_classes or model.roi_heads.fc_dim"),
            (
                "/roi_heads/",
                "model.roi_heads.* (fc_dim, num_fc, pooler_resolution, iou_thresholds)",
            ),
        ),
    ),
    # --format onnx: the whole detector (its NMS, proposal decode, level assignment and final
    # inference trace as ONNX-friendly forms, cn2_jax/export.py), or its first parts
    onnx_parts={
        "detector": None,
        "candidates": "proposal_candidates",
        "dense": "dense_outputs",
    },
    # its detections, rendered as one-stage targets at the student's stride
    distillation_teacher=teachers.centernet2_teacher,
)
class CenterNet2(nn.Module):
  """The detector. `config` is `config.model` (cn2_jax/config.py), as a FrozenConfigDict.

  See docs/DESIGN.md "Model API" for the call contract; `batch` follows its batch contract.
  """

  config: Any
  axis_name: Optional[str] = None

  def setup(self):
    # The three parts come from their registries (model.backbone, model.proposal_generator,
    # model.roi_heads.name) with their config settings; the rest is wiring: the levels' strides
    # and channels, the level of the first one and the backbone's size divisibility.
    dtype = COMPUTE_DTYPES[self.config.dtype]
    self.backbone = build_backbone(self.config, dtype)
    self.proposal_generator = build_proposal_generator(
        self.config,
        strides=self.backbone.strides,
        channels=self.backbone.out_channels,
        dtype=dtype,
        axis_name=self.axis_name,
    )
    self.roi_heads = build_roi_heads(
        self.config,
        num_classes=self.config.num_classes,
        min_level=int(math.log2(self.backbone.strides[0])),
        size_divisibility=self.backbone.size_divisibility,
        dtype=dtype,
        axis_name=self.axis_name,
    )

  def preprocess(self, image: jax.Array, image_hw: jax.Array) -> jax.Array:
    """`[B, H, W, 3]` uint8 RGB -> normalised `[B, H, W, 3]` in input_format, padding = 0."""
    m = self.config
    x = normalized_images(image, image_hw, m.input_format, m.pixel_mean, m.pixel_std)
    return x.astype(COMPUTE_DTYPES[m.dtype])

  def backbone_features(self, image: jax.Array, image_hw: jax.Array) -> Tuple[list, list]:
    """The first half of every forward: preprocessing, the backbone on the official canvas (the
    batch's largest image_hw rounded up to the backbone's size divisibility) -> FPN features P3..P7 `[B, H_l, W_l, C]` (sown
    as intermediates p3..p7) and each level's canvas mask `[B, H_l, W_l]` bool."""
    images = self.preprocess(image, image_hw)
    divisibility = self.backbone.size_divisibility
    features = self.backbone(images, official_canvas(image_hw, divisibility))
    for i, f in enumerate(features):
      self.sow("intermediates", f"p{i + 3}", f)
    masks = canvas_masks(
        image_hw, [f.shape[1:3] for f in features], self.proposal_generator.strides, divisibility
    )
    return features, masks

  def _export(
      self, image: jax.Array, image_hw: jax.Array, candidates: bool
  ) -> Dict[str, jax.Array]:
    features, masks = self.backbone_features(image, image_hw)
    out = {f"p{i + 3}": f for i, f in enumerate(features)}
    pg_hw = image_hw if candidates else None
    out.update(self.proposal_generator.export_outputs(features, masks, pg_hw))
    return out

  def dense_outputs(self, image: jax.Array, image_hw: jax.Array) -> Dict[str, jax.Array]:
    """The dense part (no proposals, no ROI heads): the FPN features `p3..p7` and the proposal
    generator's head maps (CenterNet: `hm_logits_p3..p7 [B, H_l, W_l]` objectness logits,
    `reg_p3..p7 [B, H_l, W_l, 4]` ltrb distances in stride units), as the full forward computes
    them (`--onnx-part dense`)."""
    return self._export(image, image_hw, candidates=False)

  def proposal_candidates(self, image: jax.Array, image_hw: jax.Array) -> Dict[str, jax.Array]:
    """`dense_outputs` plus the test-mode proposal decode up to its NMS (CenterNet:
    `cand_boxes`, `cand_scores`, `cand_valid`; `--onnx-part candidates`,
    `export.centernet2_proposals` does the rest)."""
    return self._export(image, image_hw, candidates=True)

  def pre_nms_detections(self, image: jax.Array, image_hw: jax.Array) -> Dict[str, jax.Array]:
    """The eval forward up to the final per-class NMS (`--nms=plugin`, TensorRT's EfficientNMS
    does it): `boxes [B, R, 4]` clipped final boxes, `scores [B, R, K]` class scores, 0 for the
    pairs the model's NMS would not consider (ROI heads' `pre_nms_detections`)."""
    features, masks = self.backbone_features(image, image_hw)
    proposals = self.proposal_generator(features, train=False, masks=masks, image_hw=image_hw)
    return self.roi_heads.pre_nms_detections(features, proposals, image_hw)

  def __call__(self, batch: dict, train: bool = False):
    features, masks = self.backbone_features(batch["image"], batch["image_hw"])
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
