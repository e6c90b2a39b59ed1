"""Settings of the CenterNet2 modules and functions for tests that build or call them directly.

The config schema (`cn2_jax.config.base_config()`) is the only place a default value lives: the
modules and functions have no defaults of their own. These helpers hand a test the schema's values
under each callee's argument names (the same mapping as `meta_arch/centernet2.py` and
`proposal/centernet.py`), so a test states only what it changes: `fpn_kwargs(depth=18)`.
An override the callee does not take is a TypeError, not a silently ignored keyword.
"""

from __future__ import annotations

import jax.numpy as jnp

from cn2_jax.config import base_config, model_kwargs
from cn2_jax.modeling.backbone.fpn import FPN

MODEL = model_kwargs(base_config().model)  # plain python (tuples), as the detector reads it
CENTERNET = MODEL["centernet"]
ROI_HEADS = MODEL["roi_heads"]
DTYPE = getattr(jnp, MODEL["dtype"])  # jnp.float32, as the detector maps it
RESNET_CONV_INIT = "c2_msra"  # detectron2's ResNet init, what the FPN builders pass


def _with(base: dict, overrides: dict, callee: str) -> dict:
  unknown = sorted(set(overrides) - set(base))
  if unknown:
    raise TypeError(f"{callee} takes no setting {unknown} (settings: {sorted(base)})")
  return {**base, **overrides}


def resnet_kwargs(**overrides) -> dict:
  """`ResNet` (the FPN's bottom-up) from `config.model`."""
  base = dict(
      depth=MODEL["resnet_depth"],
      stride_in_1x1=MODEL["stride_in_1x1"],
      norm=MODEL["resnet_norm"],
      conv_init=RESNET_CONV_INIT,
      freeze_at=MODEL["freeze_at"],
      out_features=FPN.in_features,
      width=MODEL["resnet_width"],
      num_groups=MODEL["resnet_num_groups"],
      width_per_group=MODEL["resnet_width_per_group"],
      deform_on_per_stage=MODEL["resnet_deform_on_per_stage"],
      deform_modulated=MODEL["resnet_deform_modulated"],
      deform_num_groups=MODEL["resnet_deform_num_groups"],
      dtype=DTYPE,
  )
  return _with(base, overrides, "ResNet")


def fpn_kwargs(**overrides) -> dict:
  """`FPN` from `config.model`."""
  base = dict(
      depth=MODEL["resnet_depth"],
      stride_in_1x1=MODEL["stride_in_1x1"],
      freeze_at=MODEL["freeze_at"],
      norm=MODEL["resnet_norm"],
      out_channels=MODEL["fpn_channels"],
      fpn_norm=MODEL["fpn_norm"],
      width=MODEL["resnet_width"],
      num_groups=MODEL["resnet_num_groups"],
      width_per_group=MODEL["resnet_width_per_group"],
      deform_on_per_stage=MODEL["resnet_deform_on_per_stage"],
      deform_modulated=MODEL["resnet_deform_modulated"],
      deform_num_groups=MODEL["resnet_deform_num_groups"],
      dtype=DTYPE,
  )
  return _with(base, overrides, "FPN")


def block_kwargs(**overrides) -> dict:
  """The norm and dtype of a ResNet stem or block (`config.model`)."""
  base = dict(norm=MODEL["resnet_norm"], conv_init=RESNET_CONV_INIT, dtype=DTYPE)
  return _with(base, overrides, "a ResNet block")


def bottleneck_kwargs(**overrides) -> dict:
  """The norm, dtype and groups of a ResNet bottleneck block (`config.model`)."""
  base = dict(
      norm=MODEL["resnet_norm"],
      conv_init=RESNET_CONV_INIT,
      dtype=DTYPE,
      num_groups=MODEL["resnet_num_groups"],
  )
  return _with(base, overrides, "a ResNet bottleneck block")


def head_kwargs(**overrides) -> dict:
  """`CenterNetHead` from `config.model` (`centernet`, `fpn_channels`, P3..P7)."""
  base = dict(
      num_levels=len(FPN.strides),
      num_convs=CENTERNET["num_convs"],
      channels=MODEL["fpn_channels"],
      prior_prob=CENTERNET["prior_prob"],
      bbox_bias_init=CENTERNET["bbox_bias_init"],
      use_deformable=CENTERNET["use_deformable"],
      dtype=DTYPE,
  )
  return _with(base, overrides, "CenterNetHead")


def targets_kwargs(**overrides) -> dict:
  """`proposal.targets.centernet_targets` settings from `config.model.centernet`."""
  base = dict(
      strides=FPN.strides,
      soi=CENTERNET["soi"],
      hm_min_overlap=CENTERNET["hm_min_overlap"],
      min_radius=CENTERNET["min_radius"],
      dedup_positives=CENTERNET["dedup_positives"],
      all_level_peaks=CENTERNET["all_level_peaks"],
  )
  return _with(base, overrides, "centernet_targets")


def losses_kwargs(**overrides) -> dict:
  """`proposal.losses.centernet_losses` settings from `config.model.centernet`."""
  base = dict(
      alpha=CENTERNET["focal_alpha"],
      beta=CENTERNET["focal_beta"],
      gamma=CENTERNET["loss_gamma"],
      sigmoid_clamp=CENTERNET["sigmoid_clamp"],
      ignore_high_fp=CENTERNET["ignore_high_fp"],
      pos_weight=CENTERNET["pos_weight"],
      neg_weight=CENTERNET["neg_weight"],
      reg_weight=CENTERNET["reg_weight"],
  )
  return _with(base, overrides, "centernet_losses")


def proposals_kwargs(train: bool = False, **overrides) -> dict:
  """`proposal.decode.generate_proposals` settings of the train or test mode."""
  mode = "train" if train else "test"
  base = dict(
      strides=FPN.strides,
      pre_nms_topk=CENTERNET[f"pre_nms_topk_{mode}"],
      post_nms_topk=CENTERNET[f"post_nms_topk_{mode}"],
      nms_thresh=CENTERNET[f"nms_thresh_{mode}"],
      score_thresh=CENTERNET["inference_thresh"],
  )
  return _with(base, overrides, "generate_proposals")


def pooler_kwargs(**overrides) -> dict:
  """`ops.roi_align.multilevel_roi_align` settings as the cascade passes them."""
  base = dict(
      min_level=FPN.min_level,
      output_size=ROI_HEADS["pooler_resolution"],
      sampling_ratio=ROI_HEADS["sampling_ratio"],
      aligned=True,  # ROIAlignV2, the architecture
      canonical_box_size=ROI_HEADS["canonical_box_size"],
      canonical_level=ROI_HEADS["canonical_level"],
      max_adaptive_samples=ROI_HEADS["max_adaptive_samples"],
  )
  return _with(base, overrides, "multilevel_roi_align")


def level_kwargs(num_levels: int = len(FPN.strides), **overrides) -> dict:
  """`ops.roi_align.assign_boxes_to_levels` settings of the pooler (P3..P7 unless given)."""
  base = dict(
      min_level=FPN.min_level,
      max_level=FPN.min_level + num_levels - 1,
      canonical_box_size=ROI_HEADS["canonical_box_size"],
      canonical_level=ROI_HEADS["canonical_level"],
  )
  return _with(base, overrides, "assign_boxes_to_levels")


def roi_heads_kwargs(**overrides) -> dict:
  """`CascadeROIHeads` from `config.model.roi_heads` plus the detector's wiring."""
  base = dict(
      num_classes=MODEL["num_classes"],
      min_level=FPN.min_level,
      size_divisibility=FPN.size_divisibility,
      dtype=DTYPE,
      **ROI_HEADS,
  )
  return _with(base, overrides, "CascadeROIHeads")
