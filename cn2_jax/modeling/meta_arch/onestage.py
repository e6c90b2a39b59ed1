"""One-stage CenterNet ("Objects as Points") as centerX builds it, arch "onestage".

torchvision ResNet C5 (or a pycls RegNet's s4, `model.onestage.backbone`) -> 3 DeconvLayers
(DCNv2) -> cls / wh / reg heads -> in-graph decode (`cn2_jax/modeling/onestage/`;
docs/onestage.md §2-§3). Settings: `config.model.onestage` plus the
shared `num_classes`, `resnet_depth`, `resnet_width`, `dtype`. Trainable BatchNorm: variables are
`{'params', 'batch_stats'}`; training applies the model with `mutable=['batch_stats']`. Nothing is
frozen (centerX trains every stage).
"""

from __future__ import annotations

import math
from typing import Optional

from cn2_jax import schema
from cn2_jax.errors import ConfigError, ConversionError
from cn2_jax.modeling.backbone.regnet import REGNETS
from cn2_jax.modeling.meta_arch.build import ClassParams, WeightFormat, build_model, register
from cn2_jax.modeling.onestage import teachers
from cn2_jax.modeling.onestage.model import (
    CenterNetOneStage,
    build_onestage_model,
    model_fields,
)
from cn2_jax.modeling.variables import abstract_module_variables, init_module_variables
from cn2_jax.weights import onestage as onestage_weights


def convert_checkpoint(sd, fmt: str, *, seed: int, backbone_only: bool, model_config):
  """`python -m cn2_jax.convert` for the one-stage family: centerX / xingyizhou / torchvision
  weights onto the model of `model_config` if given, else the architecture read off the checkpoint
  (schema values for the other settings). --backbone-only needs `model_config`: a backbone alone
  does not name the rest of the model. Returns (variables, report summary)."""
  sd = onestage_weights.to_centerx_names(sd, fmt)
  if backbone_only and model_config is None:
    raise ConversionError(
        "one-stage --backbone-only needs --config (a model.arch='onestage' config: the model "
        "whose backbone the weights fill)"
    )
  if model_config is None:
    target = abstract_module_variables(
        build_onestage_model(onestage_weights.infer_model_config(sd))
    )
  elif backbone_only:
    target = init_module_variables(build_model(model_config), seed)
  else:
    target = abstract_module_variables(build_model(model_config))
  variables, report = onestage_weights.convert_onestage(sd, target, backbone_only=backbone_only)
  return variables, report.summary(max_list=50, show_mapped=False)


@register(
    "onestage",
    frozen_param_prefixes=lambda model_config: (),
    # the last conv of the class heatmap head: one output channel per class
    class_params=ClassParams(r"params/head/cls_head/out_conv/(kernel|bias)", background_last=False),
    display_name="one-stage CenterNet (centerX)",
    # centerX and xingyizhou/CenterNet checkpoints, torchvision / pycls ImageNet backbones
    weights=WeightFormat(
        convert=onestage_weights.load_onestage_weights,
        named_tensors=onestage_weights.official_named_tensors,
        convert_checkpoint=convert_checkpoint,
        fields_by_path=(
            (
                "/backbone/",
                "model.onestage.backbone (a RegNet), model.resnet_depth or model.resnet_width",
            ),
            ("/upsample/", "model.onestage.deconv_channels, use_deform or modulate_deform"),
            ("/head/", "model.onestage.head_conv or model.onestage.deconv_channels"),
        ),
    ),
    # --format onnx: the whole detector (decode included), or the head maps only
    onnx_parts={"detector": None, "dense": "dense_outputs"},
    distillation_teacher=teachers.onestage_teacher,
)
def build(config, axis_name: Optional[str] = None) -> CenterNetOneStage:
  return CenterNetOneStage(**model_fields(config), axis_name=axis_name)


def _validate_onestage(cfg) -> None:
  o = cfg.model.onestage
  for key, allowed in (
      ("backbone", ("resnet",) + tuple(REGNETS)),
      ("input_format", ("RGB", "BGR")),
      ("radius_formula", ("fixed", "cornernet")),
      ("norm_wh", ("", "centerx", "per_object")),
      ("head_init", ("centerx", "centernet")),
      ("hm_loss", ("focal", "mse")),
  ):
    if o[key] not in allowed:
      raise ConfigError(f"model.onestage.{key} must be one of {allowed}, got {o[key]!r}")
  if o.hm_loss == "mse" and o.ignore_unlabel:
    raise ConfigError(
        "model.onestage.ignore_unlabel is a focal-loss option; it cannot be combined with "
        "hm_loss='mse'"
    )
  targets = tuple(o.communism_targets)
  if len(targets) != 3 or not all(math.isfinite(float(v)) and float(v) > 0 for v in targets):
    raise ConfigError(
        f"model.onestage.communism_targets must be 3 positive numbers (cls, wh, off), got {targets}"
    )


CONFIG = schema.group(
    "model.onestage",
    "One-stage CenterNet as centerX builds it (arch 'onestage', modeling/onestage/; "
    "docs/onestage.md §2-§3; defaults = centerX `centernet_res18_coco_0.5.yaml`). Of the other "
    "model keys this family reads num_classes, dtype, resnet_depth and resnet_width.",
    schema.Field(
        "backbone",
        "resnet",
        "'resnet' (model.resnet_depth / resnet_width, torchvision style) or a pycls RegNet "
        f"({', '.join(REGNETS)}; centerX build_regnet, docs/onestage.md §2.6)",
    ),
    schema.Field(
        "input_format", "RGB", "torchvision / centerX weights; 'BGR' for xingyizhou/CenterNet"
    ),
    schema.Field("pixel_mean", (0.485, 0.456, 0.406), "[0, 1] units: (x / 255 - mean) / std"),
    schema.Field("pixel_std", (0.229, 0.224, 0.225), "[0, 1] units"),
    schema.Field(
        "deconv_channels", (256, 128, 64), "outputs of the 3 DeconvLayers (stride 32 -> 4)"
    ),
    schema.Field("deconv_kernels", (4, 4, 4), "kernel sizes of the 3 transposed convs"),
    schema.Field("use_deform", True, "DCN in the DeconvLayers ('resdcn'); False: plain 3x3 conv"),
    schema.Field("modulate_deform", True, "DCNv2 (mask); False: DCNv1"),
    schema.Field("dcn_zero_init_offset", False, "True = xingyizhou/CenterNet (zeroed offset conv)"),
    schema.Field("head_conv", 0, "head branch width; 0 = the neck's channels (centerX)"),
    schema.Field("bias_value", -2.19, "cls head bias"),
    schema.Field(
        "head_init", "centerx", "'centerx' (torch default wh/reg init) | 'centernet' (std 0.001)"
    ),
    schema.Field("down_scale", 4, "output stride"),
    schema.Field(
        "min_overlap", 0.3, "Gaussian radius overlap (0.7 with radius_formula 'cornernet')"
    ),
    schema.Field(
        "radius_formula", "fixed", "'fixed' (corrected CornerNet radius) | 'cornernet' (original)"
    ),
    schema.Field("tensor_dim", 128, "max objects per image in the regression targets (truncation)"),
    schema.Field("cls_weight", 1.0, "heatmap focal-loss weight"),
    schema.Field("wh_weight", 0.1, "size L1 weight"),
    schema.Field("reg_weight", 1.0, "offset L1 weight"),
    schema.Field(
        "norm_wh", "", "'' | 'centerx' | 'per_object' (wh loss norm, docs/onestage.md §3.4)"
    ),
    schema.Field(
        "hm_loss",
        "focal",
        "heatmap loss: 'focal' (CornerNet's modified focal loss) | 'mse' (centerX LOSS.MSE: the "
        "mean squared error over every heatmap element; docs/onestage.md §3.3)",
    ),
    schema.Field(
        "focal_clamp", (1e-12, None), "(lo, hi) clamp of the heatmap in the focal loss; CN: 1e-4"
    ),
    schema.Field(
        "ignore_unlabel",
        False,
        "centerX LOSS.IGNORE_UNLABEL (docs/onestage.md §4.5): no negatives on an (image, class) "
        "channel whose GT heatmap is all zero (partially labelled mixed datasets)",
    ),
    schema.Field(
        "communism",
        False,
        "centerX LOSS.COMMUNISM (docs/onestage.md §3.6): every cls / wh / off term (KD too) "
        "rescaled to communism_targets by target / stop_gradient(term)",
    ),
    schema.Field("communism_targets", (1.5, 0.3, 0.1), "(cls, wh, off); centerX's defaults"),
    schema.Field("max_detections", 100, "K of the decode"),
    schema.Field(
        "clamp_wh",
        True,
        "False = official: decoded w/h are used as predicted, so some boxes come out inverted "
        "(x2 < x1); True clamps w/h at 0 (README 'departures')",
    ),
    schema.Field("bn_momentum", 0.9, "Flax convention (torch momentum 0.1)"),
    schema.Field("bn_eps", 1e-5, "BatchNorm epsilon"),
    schema.Field(
        "sync_bn",
        False,
        "BatchNorm statistics across the devices of the data axis (SyncBN); False = per device "
        "(centerX yamls: BN_TYPE 'BN'); running statistics are averaged over devices after each "
        "step either way",
    ),
    schema.Field(
        "mask_canvas",
        True,
        "restrict the model to each (per-device) batch's official canvas, its largest image "
        "rounded up to 32 (centerX's padding): convs read zeros off it, BatchNorm statistics, the "
        "heatmap loss's negatives / MSE mean and the KD heatmap terms cover only it, no detection "
        "off it; so a larger input canvas (the crop's max_size^2, a bucket) gives centerX's values "
        "(modeling/onestage/model.py). False = the whole input canvas counts (its padding adds "
        "BatchNorm samples and negatives)",
    ),
    families=("onestage",),
    validate=_validate_onestage,
)
