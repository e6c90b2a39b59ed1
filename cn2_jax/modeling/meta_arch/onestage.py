"""One-stage CenterNet ("Objects as Points") as centerX builds it, arch "onestage".

torchvision ResNet C5 -> 3 DeconvLayers (DCNv2) -> cls / wh / reg heads -> in-graph decode
(`cn2_jax/modeling/onestage/`; docs/onestage.md §2-§3). Settings: `config.model.onestage` plus the
shared `num_classes`, `resnet_depth`, `resnet_width`, `dtype`. Trainable BatchNorm: variables are
`{'params', 'batch_stats'}`; training applies the model with `mutable=['batch_stats']`. Nothing is
frozen (centerX trains every stage).
"""

from __future__ import annotations

from typing import Optional

from cn2_jax.modeling.meta_arch.build import ClassParams, WeightFormat, register
from cn2_jax.modeling.onestage.model import CenterNetOneStage, model_fields
from cn2_jax.weights import onestage as onestage_weights


@register(
    "onestage",
    frozen_param_prefixes=lambda model_config: (),
    # the last conv of the class heatmap head: one output channel per class
    class_params=ClassParams(r"params/head/cls_head/out_conv/(kernel|bias)", background_last=False),
    display_name="one-stage CenterNet (centerX)",
    # centerX and xingyizhou/CenterNet checkpoints, torchvision ImageNet backbones
    weights=WeightFormat(
        convert=onestage_weights.load_onestage_weights,
        named_tensors=onestage_weights.official_named_tensors,
        fields_by_path=(
            ("/backbone/", "model.resnet_depth or model.resnet_width"),
            ("/upsample/", "model.onestage.deconv_channels, use_deform or modulate_deform"),
            ("/head/", "model.onestage.head_conv or model.onestage.deconv_channels"),
        ),
    ),
    # --format onnx: the whole detector (decode included), or the head maps only
    onnx_parts={"detector": None, "dense": "dense_outputs"},
)
def build(config, axis_name: Optional[str] = None) -> CenterNetOneStage:
  return CenterNetOneStage(**model_fields(config), axis_name=axis_name)
