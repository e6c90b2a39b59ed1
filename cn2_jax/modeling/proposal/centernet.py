"""CenterNet as a class-agnostic proposal generator (official `CenterNet` with ONLY_PROPOSAL).

Holds the shared head (`centernet_head`, docs/centernet2.md §2.4); in training it computes the
targets (docs/centernet2.md §3.1-§3.3, §3.5) and the three first-stage losses (docs/centernet2.md
§3.4-§3.6); in both modes it produces fixed-size proposals (docs/centernet2.md §4) without
gradient.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cn2_jax import schema
from cn2_jax.config import model_kwargs
from cn2_jax.modeling.proposal.build import PROPOSAL_GENERATORS
from cn2_jax.modeling.proposal.centernet_head import CenterNetHead
from cn2_jax.modeling.proposal.decode import generate_proposals, proposal_candidates
from cn2_jax.modeling.proposal.losses import centernet_losses, loss_normalisers
from cn2_jax.modeling.proposal.targets import centernet_targets

Dtype = Any


def flatten_levels(xs: Sequence[jax.Array]) -> jax.Array:
  """list of `[B, H_l, W_l, ...]` -> `[B, sum_l H_l W_l, ...]` (level-major, row-major)."""
  return jnp.concatenate([x.reshape(x.shape[0], -1, *x.shape[3:]) for x in xs], axis=1)


class CenterNet(nn.Module):
  """Attributes mirror `config.model.centernet` (see cn2_jax/config.py, the only place their
  defaults live) and are all required; the detector adds the wiring: `strides` (of the FPN
  levels), `channels` (`fpn_channels`), `dtype` and `axis_name` (set by the train step)."""

  strides: Sequence[int]
  channels: int
  num_convs: int
  use_deformable: bool
  prior_prob: float
  bbox_bias_init: float
  soi: Sequence[Sequence[float]]
  hm_min_overlap: float
  min_radius: float
  dedup_positives: bool
  all_level_peaks: bool
  focal_alpha: float
  focal_beta: float
  loss_gamma: float
  sigmoid_clamp: float
  ignore_high_fp: float
  pos_weight: float
  neg_weight: float
  reg_weight: float
  pre_nms_topk_train: int
  post_nms_topk_train: int
  pre_nms_topk_test: int
  post_nms_topk_test: int
  nms_thresh_train: float
  nms_thresh_test: float
  inference_thresh: float
  clip_proposals: bool
  dtype: Dtype
  axis_name: Optional[str] = None  # wiring (the data axis of the train step), not a setting

  def setup(self):
    self.centernet_head = CenterNetHead(
        num_levels=len(self.strides),
        num_convs=self.num_convs,
        channels=self.channels,
        prior_prob=self.prior_prob,
        bbox_bias_init=self.bbox_bias_init,
        use_deformable=self.use_deformable,
        dtype=self.dtype,
    )

  def export_outputs(self, features, masks, image_hw=None) -> dict:
    """The head maps as an exported graph names them: `hm_logits_p3..p7 [B, H_l, W_l]`
    (objectness logits), `reg_p3..p7 [B, H_l, W_l, 4]` (ltrb distances in stride units), as the
    full forward computes them; given `image_hw` `[B, 2]`, also the test-mode decode up to its
    NMS (`decode.proposal_candidates`: `cand_boxes`, `cand_scores`, `cand_valid`)."""
    head = self.centernet_head(features, masks)
    out = {f"hm_logits_p{i + 3}": h for i, h in enumerate(head["hm_logits"])}
    out.update({f"reg_p{i + 3}": r for i, r in enumerate(head["reg"])})
    if image_hw is not None:
      out.update(
          proposal_candidates(
              head["hm_logits"],
              head["reg"],
              masks,
              strides=tuple(self.strides),
              pre_nms_topk=int(self.pre_nms_topk_test),
              score_thresh=float(self.inference_thresh),
              clip_hw=image_hw if self.clip_proposals else None,
          )
      )
    return out

  def __call__(
      self, features, *, train: bool, gt_boxes=None, gt_valid=None, masks=None, image_hw=None
  ):
    """Args:
      features: list of `[B, H_l, W_l, C]` P3..P7.
      gt_boxes / gt_valid: `[B, M, 4]` / `[B, M]` (training only).
      image_hw: `[B, 2]` image sizes (only read with `clip_proposals`).
      masks: optional list of `[B, H_l, W_l]` bool: the locations on the official canvas
        (`canvas.canvas_masks`). Locations outside take no part in the GroupNorm statistics,
        the proposals or the losses, exactly as if the batch had the official padding.
    Returns:
      eval: proposals dict boxes `[B, K, 4]`, scores `[B, K]` (= sqrt(sigmoid)), valid `[B, K]`;
      train: (losses dict, proposals dict).
    """
    out = self.centernet_head(features, masks)
    for i, (hm, reg, raw) in enumerate(zip(out["hm_logits"], out["reg"], out["reg_raw"])):
      self.sow("intermediates", f"head_agn_hm_logits_p{i + 3}", hm)
      self.sow("intermediates", f"head_reg_p{i + 3}", reg)
      self.sow("intermediates", f"head_bbox_pred_raw_p{i + 3}", raw)
    cand = out["hm_logits"]
    if masks is not None:  # off-canvas locations are never candidates (sigmoid(-inf) = 0)
      cand = [jnp.where(m, h, -jnp.inf) for h, m in zip(cand, masks)]
    proposals = generate_proposals(  # float32, no gradient (decode.py casts and stops it)
        cand,
        out["reg"],
        strides=tuple(self.strides),
        pre_nms_topk=self.pre_nms_topk_train if train else self.pre_nms_topk_test,
        post_nms_topk=self.post_nms_topk_train if train else self.post_nms_topk_test,
        nms_thresh=self.nms_thresh_train if train else self.nms_thresh_test,
        score_thresh=self.inference_thresh,
        clip_hw=image_hw if self.clip_proposals else None,
    )
    self.sow("intermediates", "proposal_boxes", proposals["boxes"])
    self.sow("intermediates", "proposal_objectness", proposals["scores"])
    self.sow("intermediates", "proposal_valid", proposals["valid"])
    if not train:
      return proposals

    level_shapes = tuple((f.shape[1], f.shape[2]) for f in features)
    targets_fn = functools.partial(
        centernet_targets,
        level_shapes=level_shapes,
        strides=tuple(self.strides),
        soi=tuple(tuple(size_range) for size_range in self.soi),
        hm_min_overlap=self.hm_min_overlap,
        min_radius=self.min_radius,
        dedup_positives=self.dedup_positives,
        all_level_peaks=self.all_level_peaks,
    )
    targets = jax.vmap(targets_fn)(gt_boxes.astype(jnp.float32), gt_valid)
    # Training targets and normalisers, for the training-step oracle (cn2_jax/testing).
    for name in ("heatmap", "pos_count", "reg_target", "reg_valid"):
      self.sow("intermediates", f"train_cn_{name}", targets[name])
    num_pos_avg, reg_norm = loss_normalisers(
        targets["pos_count"], targets["reg_valid"], self.axis_name
    )
    self.sow("intermediates", "train_cn_num_pos_avg", num_pos_avg)
    self.sow("intermediates", "train_cn_reg_norm", reg_norm)
    losses = centernet_losses(
        flatten_levels(out["hm_logits"]),
        flatten_levels(out["reg"]),
        targets,
        alpha=self.focal_alpha,
        beta=self.focal_beta,
        gamma=self.loss_gamma,
        sigmoid_clamp=self.sigmoid_clamp,
        ignore_high_fp=self.ignore_high_fp,
        pos_weight=self.pos_weight,
        neg_weight=self.neg_weight,
        reg_weight=self.reg_weight,
        axis_name=self.axis_name,
        location_mask=None if masks is None else flatten_levels(masks),
    )
    losses["aux/num_pos_per_image"] = targets["pos_count"].sum() / gt_boxes.shape[0]
    return losses, proposals


@PROPOSAL_GENERATORS.register("CenterNet")
def build_centernet(model_config, *, strides, channels, dtype, axis_name=None) -> CenterNet:
  """CenterNet2's first stage: `model.centernet` settings on the detector's levels."""
  return CenterNet(
      strides=tuple(strides),
      channels=channels,
      dtype=dtype,
      axis_name=axis_name,
      **model_kwargs(model_config)["centernet"],
  )


CONFIG = schema.group(
    "model.centernet",
    "The CenterNet proposal network of CenterNet2 (MODEL.CENTERNET, ONLY_PROPOSAL; "
    "docs/centernet2.md §3).",
    schema.Field("num_convs", 4, "NUM_CLS_CONVS = NUM_BOX_CONVS: depth of the two towers"),
    schema.Field(
        "use_deformable", False, "last bbox-tower conv a modulated DCN (CENTERNET.USE_DEFORMABLE)"
    ),
    schema.Field("prior_prob", 0.01, "PRIOR_PROB: initial objectness probability"),
    schema.Field("bbox_bias_init", 8.0, "initial bias of the ltrb regression"),
    schema.Field(
        "soi",
        ((0, 80), (64, 160), (128, 320), (256, 640), (512, 10000000)),
        "SOI: inclusive half-diagonal range of the GT boxes each level is responsible for",
    ),
    schema.Field(
        "hm_min_overlap", 0.8, "HM_MIN_OVERLAP: heatmap radius^2 = 2 ((1 - o) / (1 + o))^2 area"
    ),
    schema.Field("min_radius", 4.0, "MIN_RADIUS: radius^2 >= min_radius^2"),
    schema.Field("dedup_positives", False, "True = MMDet reproduction's deduplicated positives"),
    schema.Field(
        "all_level_peaks",
        True,
        "True = official: a GT's heatmap peak (hm = 1, ignored as a negative) on every level; "
        "False = only on its cared levels (the MMDet reproduction's 'revised' distance map), "
        "docs/centernet2.md §3.7",
    ),
    schema.Field("focal_alpha", 0.25, "HM_FOCAL_ALPHA"),
    schema.Field("focal_beta", 4.0, "HM_FOCAL_BETA: negatives weighted by (1 - heatmap)^beta"),
    schema.Field("loss_gamma", 2.0, "LOSS_GAMMA of the heatmap focal loss"),
    schema.Field("sigmoid_clamp", 1e-4, "SIGMOID_CLAMP of the heatmap probabilities in the loss"),
    schema.Field(
        "ignore_high_fp", 0.85, "IGNORE_HIGH_FP: negatives with probability >= it dropped"
    ),
    schema.Field("pos_weight", 0.5, "POS_WEIGHT of the heatmap loss"),
    schema.Field("neg_weight", 0.5, "NEG_WEIGHT of the heatmap loss"),
    schema.Field("reg_weight", 1.0, "REG_WEIGHT of the GIoU loss"),
    schema.Field("pre_nms_topk_train", 4000, "PRE_NMS_TOPK_TRAIN: candidates per level"),
    schema.Field("post_nms_topk_train", 2000, "POST_NMS_TOPK_TRAIN: proposals per image"),
    schema.Field("pre_nms_topk_test", 1000, "PRE_NMS_TOPK_TEST: candidates per level"),
    schema.Field("post_nms_topk_test", 256, "POST_NMS_TOPK_TEST: proposals per image"),
    schema.Field("nms_thresh_train", 0.9, "NMS_TH_TRAIN of the proposals"),
    schema.Field("nms_thresh_test", 0.9, "NMS_TH_TEST of the proposals"),
    schema.Field("inference_thresh", 1e-4, "INFERENCE_TH: proposal candidates' minimum score"),
    schema.Field(
        "clip_proposals", False, "True: clip proposals to the image before NMS (MMDet port)"
    ),
    families=("centernet2",),
)
