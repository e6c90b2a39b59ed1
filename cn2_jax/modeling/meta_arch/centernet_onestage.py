"""The official one-stage CenterNet of the CenterNet2 code base: `CenterNetDetector` with the
`CenterNet` proposal generator and ONLY_PROPOSAL False (CenterNet-FPN_R50_1x,
CenterNet-S4_DLA_8x).

Official: `centernet/modeling/meta_arch/centernet_detector.py` (preprocess, backbone, proposal
generator, `detector_postprocess`), `centernet/modeling/dense_heads/centernet.py` (`CenterNet`:
head + `inference`), `centernet_head.py`. Here:

  CenterNetDetector
    backbone             the given backbone module (e.g. `backbone.fpn.FPN` for R50-FPN P3-P7,
                         the DLA-34 `DLASeg` for S4); variables under `backbone/...` = the
                         official `backbone.*` keys
    proposal_generator   `CenterNetOneStageGenerator`
      centernet_head     `proposal.centernet_onestage_head.CenterNetOneStageHead`
    decode               `proposal.onestage_decode.predict_instances` (sigmoid class heatmap,
                         candidates > INFERENCE_TH, per-level top-k, per-class NMS, top-k)
    training             `proposal.onestage_targets.onestage_targets` (class heatmaps, regression
                         targets, positives incl. MORE_POS) and `proposal.onestage_losses.
                         onestage_losses` (the official `CenterNet.losses`)

Not the centerX "Objects as Points" family (`meta_arch/onestage.py`, arch "onestage"): that is a
different network (ResNet + deconvs, one output map) and decode.

Output (docs/DESIGN.md "Model API"): detections `boxes [B, K, 4]` (resized-image pixels, the
official output before `detector_postprocess`), `scores [B, K]`, `classes [B, K]` int32, `valid
[B, K]` bool, K = post_nms_topk_test. Training (`train=True`): the official losses
`loss_centernet_pos`, `loss_centernet_neg`, `loss_centernet_loc` (+ `loss_centernet_agn_pos` /
`_neg` with WITH_AGN_HM), float32 scalars, and `aux/` metrics.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cn2_jax import schema
from cn2_jax.errors import ConfigError
from cn2_jax.modeling.backbone.build import build_backbone
from cn2_jax.modeling.backbone.build import frozen_param_prefixes as backbone_frozen_prefixes
from cn2_jax.modeling.canvas import canvas_masks, normalized_images, official_canvas
from cn2_jax.modeling.layers import COMPUTE_DTYPES
from cn2_jax.modeling.meta_arch import centernet2
from cn2_jax.modeling.meta_arch.build import ClassParams, WeightFormat, register
from cn2_jax.modeling.ops.nms import DEFAULT_TILE_SIZE
from cn2_jax.modeling.proposal.centernet import flatten_levels
from cn2_jax.modeling.proposal.centernet_onestage_head import CenterNetOneStageHead
from cn2_jax.modeling.proposal.onestage_decode import predict_instances
from cn2_jax.modeling.proposal.onestage_losses import onestage_loss_normalisers, onestage_losses
from cn2_jax.modeling.proposal.onestage_targets import onestage_targets
from cn2_jax.weights import flax_mapping

Dtype = Any

# The official MODEL.CENTERNET.SOI default (centernet/config.py): inclusive half-diagonal
# ranges of P3-P7.
OFFICIAL_SOI = ((0, 80), (64, 160), (128, 320), (256, 640), (512, 10000000))


class CenterNetOneStageGenerator(nn.Module):
  """The official `CenterNet` proposal generator in one-stage mode (ONLY_PROPOSAL False, not
  AS_PROPOSAL): the head (`centernet_head`) and the test-mode decode.

  Attributes (official `MODEL.CENTERNET.*` names in parentheses; the official defaults of
  `centernet/config.py` where given):
    strides: per-level strides (`FPN_STRIDES`: (8, 16, 32, 64, 128); (4,) for S4).
    channels: input channels of the levels (the head's in_channels: 256 FPN, 64 DLA S4).
    num_classes: (`NUM_CLASSES`, 80).
    num_cls_convs, num_box_convs, num_share_convs, norm, use_deformable, with_agn_hm,
      prior_prob, bbox_bias_init: the head's (`NUM_CLS_CONVS` 4, `NUM_BOX_CONVS` 4,
      `NUM_SHARE_CONVS` 0, `NORM` "GN", `USE_DEFORMABLE` False, `WITH_AGN_HM` False,
      `PRIOR_PROB` 0.01, 8.0), see `CenterNetOneStageHead`.
    score_thresh: (`INFERENCE_TH`, 0.05).
    pre_nms_topk_test, post_nms_topk_test, nms_thresh_test: (`PRE_NMS_TOPK_TEST` 1000,
      `POST_NMS_TOPK_TEST` 100, `NMS_TH_TEST` 0.6).
    center_nms, not_nms: (`CENTER_NMS`, `NOT_NMS`; both False).
    nms_mode: torchvision `batched_nms` strategy emulated (`onestage_decode.onestage_detections`;
      "torchvision_cpu" reproduces the official CPU run exactly).
    nms_tile_size: NMS tile length (performance only).
    dtype: compute dtype of the head.
  Training (`losses`; `onestage_targets` / `onestage_losses`):
    soi: per-level inclusive half-diagonal ranges (`SOI`; `OFFICIAL_SOI`, ((0, 1000000),) for S4).
    hm_min_overlap, min_radius: heatmap radius (`HM_MIN_OVERLAP` 0.8, `MIN_RADIUS` 4).
    more_pos, more_pos_thresh, more_pos_topk: (`MORE_POS` False (True in CenterNet-FPN_R50_1x and
      Base_S4_DLA), `MORE_POS_THRESH` 0.2, `MORE_POS_TOPK` 9).
    focal_alpha, focal_beta, loss_gamma, sigmoid_clamp, ignore_high_fp: (`HM_FOCAL_ALPHA` 0.25,
      `HM_FOCAL_BETA` 4, `LOSS_GAMMA` 2.0, `SIGMOID_CLAMP` 1e-4, `IGNORE_HIGH_FP` -1).
    pos_weight, neg_weight, reg_weight, not_norm_reg: (`POS_WEIGHT` 1, `NEG_WEIGHT` 1,
      `REG_WEIGHT` 2 (1 in Base_S4_DLA), `NOT_NORM_REG` True).
  """

  strides: Sequence[int]
  channels: int
  num_classes: int
  num_cls_convs: int
  num_box_convs: int
  num_share_convs: int = 0
  norm: str = "GN"
  use_deformable: bool = False
  with_agn_hm: bool = False
  prior_prob: float = 0.01
  bbox_bias_init: float = 8.0
  score_thresh: float = 0.05
  pre_nms_topk_test: int = 1000
  post_nms_topk_test: int = 100
  nms_thresh_test: float = 0.6
  center_nms: bool = False
  not_nms: bool = False
  nms_mode: str = "torchvision_cpu"
  nms_tile_size: int = DEFAULT_TILE_SIZE
  dtype: Dtype = jnp.float32
  soi: Sequence[Sequence[float]] = OFFICIAL_SOI
  hm_min_overlap: float = 0.8
  min_radius: float = 4.0
  more_pos: bool = False
  more_pos_thresh: float = 0.2
  more_pos_topk: int = 9
  focal_alpha: float = 0.25
  focal_beta: float = 4.0
  loss_gamma: float = 2.0
  sigmoid_clamp: float = 1e-4
  ignore_high_fp: float = -1.0
  pos_weight: float = 1.0
  neg_weight: float = 1.0
  reg_weight: float = 2.0
  not_norm_reg: bool = True

  def setup(self):
    self.centernet_head = CenterNetOneStageHead(
        num_levels=len(self.strides),
        channels=self.channels,
        num_classes=self.num_classes,
        num_cls_convs=self.num_cls_convs,
        num_box_convs=self.num_box_convs,
        num_share_convs=self.num_share_convs,
        norm=self.norm,
        use_deformable=self.use_deformable,
        with_agn_hm=self.with_agn_hm,
        only_proposal=False,
        prior_prob=self.prior_prob,
        bbox_bias_init=self.bbox_bias_init,
        dtype=self.dtype,
    )

  def decode(self, head: Dict[str, List[jax.Array]], masks=None, return_candidates=False):
    """The official `CenterNet.inference` on the head outputs -> detections (see
    `onestage_decode.predict_instances`)."""
    return predict_instances(
        head["cls_logits"],
        head["reg"],
        masks,
        strides=tuple(int(s) for s in self.strides),
        pre_nms_topk=int(self.pre_nms_topk_test),
        post_nms_topk=int(self.post_nms_topk_test),
        nms_thresh=float(self.nms_thresh_test),
        score_thresh=float(self.score_thresh),
        agn_hm_logits=head.get("agn_hm_logits") if self.with_agn_hm else None,
        center_nms=self.center_nms,
        not_nms=self.not_nms,
        nms_mode=self.nms_mode,
        nms_tile_size=self.nms_tile_size,
        return_candidates=return_candidates,
    )

  def __call__(self, features, masks=None, *, return_candidates: bool = False):
    """`features`: per level `[B, H_l, W_l, channels]`; `masks`: optional per level
    `[B, H_l, W_l]` bool (official canvas). Returns (head outputs, detections)."""
    head = self.centernet_head(features, masks)
    return head, self.decode(head, masks, return_candidates)

  def losses(
      self, features, gt_boxes, gt_classes, gt_valid, masks=None, axis_name: Optional[str] = None
  ) -> Dict[str, jax.Array]:
    """The training branch of the official `CenterNet.forward` (ONLY_PROPOSAL False, not
    AS_PROPOSAL: no proposals): head, targets, losses.

    Args:
      features: per level `[B, H_l, W_l, channels]`.
      gt_boxes / gt_classes / gt_valid: `[B, M, 4]` xyxy input pixels / `[B, M]` int / `[B, M]`
        bool (the batch contract; only valid rows are GT).
      masks: optional per level `[B, H_l, W_l]` bool, the official canvas: GroupNorm statistics
        and the negative focal sum cover it only.
      axis_name: the data axis of the train step: the loss normalisers are averaged over it.
    Returns the loss dict of `onestage_losses` plus `aux/num_pos_per_image` (positive entries,
    duplicates included) and `aux/num_reg_per_image` (regression locations).
    """
    if len(self.soi) != len(self.strides):  # inference does not read it
      raise ValueError(
          f"CenterNetOneStageGenerator: {len(self.soi)} SOI ranges for {len(self.strides)} "
          "levels (model.centernet_detector.soi, MODEL.CENTERNET.SOI: one (lo, hi) per level; "
          "((0, 1000000),) for the S4 models)"
      )
    head = self.centernet_head(features, masks)
    reg = flatten_levels(head["reg"])
    level_shapes = tuple((int(f.shape[1]), int(f.shape[2])) for f in features)
    targets_fn = functools.partial(
        onestage_targets,
        level_shapes=level_shapes,
        strides=tuple(int(s) for s in self.strides),
        soi=tuple(tuple(float(v) for v in r) for r in self.soi),
        num_classes=int(self.num_classes),
        hm_min_overlap=float(self.hm_min_overlap),
        min_radius=float(self.min_radius),
        more_pos=bool(self.more_pos),
        more_pos_thresh=float(self.more_pos_thresh),
        more_pos_topk=int(self.more_pos_topk),
    )
    # MORE_POS chooses positives from the detached regression (the official `torch.no_grad`).
    targets = jax.vmap(targets_fn)(
        gt_boxes.astype(jnp.float32), gt_classes, gt_valid, jax.lax.stop_gradient(reg)
    )
    for name in ("heatmap", "reg_target", "reg_valid", "pos_index", "pos_label", "pos_valid"):
      self.sow("intermediates", f"train_{name}", targets[name])
    num_pos_avg, reg_norm = onestage_loss_normalisers(targets, bool(self.not_norm_reg), axis_name)
    self.sow("intermediates", "train_num_pos_avg", num_pos_avg)
    self.sow("intermediates", "train_reg_norm", reg_norm)
    losses = onestage_losses(
        flatten_levels(head["cls_logits"]),
        reg,
        targets,
        agn_hm_logits=flatten_levels(head["agn_hm_logits"]) if self.with_agn_hm else None,
        alpha=float(self.focal_alpha),
        beta=float(self.focal_beta),
        gamma=float(self.loss_gamma),
        sigmoid_clamp=float(self.sigmoid_clamp),
        ignore_high_fp=float(self.ignore_high_fp),
        pos_weight=float(self.pos_weight),
        neg_weight=float(self.neg_weight),
        reg_weight=float(self.reg_weight),
        not_norm_reg=bool(self.not_norm_reg),
        axis_name=axis_name,
        location_mask=None if masks is None else flatten_levels(masks),
    )
    batch = gt_boxes.shape[0]
    losses["aux/num_pos_per_image"] = jnp.sum(targets["pos_valid"].astype(jnp.float32)) / batch
    losses["aux/num_reg_per_image"] = jnp.sum(targets["reg_valid"].astype(jnp.float32)) / batch
    return losses


class CenterNetDetector(nn.Module):
  """The official `CenterNetDetector`.

  Attributes:
    backbone: the backbone module instance (Flax names it `backbone`, so its variables sit under
      `backbone/`). Called as `backbone(images [B, H, W, 3], canvas_hw [2])`; it returns the
      levels either as a list in `in_features` order or as a dict containing `in_features`.
    proposal_generator: a `CenterNetOneStageGenerator` instance holding the head and decode
      settings (Flax names it `proposal_generator`; its head is
      `proposal_generator/centernet_head`).
    in_features: the level names (`CENTERNET.IN_FEATURES`: ("p3", ..., "p7"), ("dla2",)), one per
      `proposal_generator.strides`; also the suffix of the sown intermediates.
    pixel_mean, pixel_std: (`MODEL.PIXEL_MEAN` / `PIXEL_STD`, in `input_format` channel order).
    input_format: "BGR" or "RGB" (`INPUT.FORMAT`); batches carry RGB images.
    size_divisibility: the backbone's (32 for R50-FPN and DLA S4): the official canvas is the
      batch's largest image rounded up to it. None (default): `backbone.size_divisibility`
      (the backbone contract of modeling/backbone/build.py), else 32.
    axis_name: the data axis of the train step (`model.clone(axis_name=...)`): the official loss
      normalisers (all-reduce sum / world size) are averaged over it.

  Example (CenterNet-FPN_R50_1x; `resnet_fpn` of modeling/backbone/fpn.py):
    CenterNetDetector(
        backbone=resnet_fpn(depth=50, stride_in_1x1=True, freeze_at=2, norm="FrozenBN",
                            width=64, out_channels=256, fpn_norm="", dtype=jnp.float32),
        proposal_generator=CenterNetOneStageGenerator(
            strides=(8, 16, 32, 64, 128), channels=256, num_classes=80, num_cls_convs=4,
            num_box_convs=4),
        in_features=("p3", "p4", "p5", "p6", "p7"),
        pixel_mean=(103.53, 116.28, 123.675), pixel_std=(1.0, 1.0, 1.0), input_format="BGR")

  `__call__(batch, train=True)` -> the official losses (`CenterNetOneStageGenerator.losses`; the
  batch's `gt_boxes`, `gt_classes`, `gt_valid`).
  `__call__(batch, train=False)` -> detections (docs/DESIGN.md Model API); sows the level maps
  (`<name>`), the head maps (`cls_logits_<name>`, `reg_<name>`, `reg_raw_<name>`) and the NMS
  input (`cand_boxes`, `cand_scores`, `cand_classes`, `cand_valid`) as "intermediates".
  """

  backbone: nn.Module
  proposal_generator: CenterNetOneStageGenerator
  in_features: Sequence[str]
  pixel_mean: Sequence[float]
  pixel_std: Sequence[float]
  input_format: str = "BGR"
  size_divisibility: Optional[int] = None
  axis_name: Optional[str] = None  # wiring (the data axis of the train step), not a setting

  def setup(self):
    strides = tuple(int(s) for s in self.proposal_generator.strides)
    if len(self.in_features) != len(strides):
      raise ValueError("CenterNetDetector: one proposal_generator stride per in_feature")
    backbone_strides = getattr(self.backbone, "strides", None)
    if backbone_strides is not None and len(backbone_strides) == len(strides):
      if tuple(int(s) for s in backbone_strides) != strides:
        raise ValueError(
            f"CenterNetDetector: head strides {strides} != backbone strides {backbone_strides}"
        )
    if self.input_format not in ("BGR", "RGB"):
      raise ValueError(f"CenterNetDetector: input_format {self.input_format!r}")

  @property
  def canvas_divisibility(self) -> int:
    """The size divisibility the official canvas is rounded up to."""
    if self.size_divisibility is not None:
      return int(self.size_divisibility)
    return int(getattr(self.backbone, "size_divisibility", 32))

  def preprocess(self, image: jax.Array, image_hw: jax.Array) -> jax.Array:
    """`[B, H, W, 3]` uint8 RGB -> (x - pixel_mean) / pixel_std in `input_format`, float32, zero
    outside each image (the official `ImageList.from_tensors` padding)."""
    return normalized_images(image, image_hw, self.input_format, self.pixel_mean, self.pixel_std)

  def backbone_features(self, image: jax.Array, image_hw: jax.Array):
    """Preprocessing and the backbone on the official canvas -> (levels `[B, H_l, W_l, C]` in
    `in_features` order, their canvas masks `[B, H_l, W_l]` bool)."""
    h, w = image.shape[1], image.shape[2]
    div = self.canvas_divisibility
    if h % div or w % div:
      raise ValueError(f"CenterNetDetector: batch size {(h, w)} is not a multiple of {div}")
    canvas = official_canvas(image_hw, div)
    out = self.backbone(self.preprocess(image, image_hw), canvas)
    if isinstance(out, dict):
      features = [out[name] for name in self.in_features]
    else:
      features = list(out)
      if len(features) != len(self.in_features):
        raise ValueError(
            f"CenterNetDetector: backbone gave {len(features)} levels, "
            f"in_features has {len(self.in_features)}"
        )
    masks = canvas_masks(
        image_hw,
        [f.shape[1:3] for f in features],
        self.proposal_generator.strides,
        div,
    )
    return features, masks

  def dense_outputs(self, image: jax.Array, image_hw: jax.Array) -> Dict[str, jax.Array]:
    """The dense part: the levels `<name>` and the head maps `cls_logits_<name> [B, H, W, C]`,
    `reg_<name> [B, H, W, 4]` (ltrb in stride units)."""
    features, masks = self.backbone_features(image, image_hw)
    head = self.proposal_generator.centernet_head(features, masks)
    out = {}
    for i, name in enumerate(self.in_features):
      out[name] = features[i]
      out[f"cls_logits_{name}"] = head["cls_logits"][i]
      out[f"reg_{name}"] = head["reg"][i]
    return out

  def __call__(self, batch: dict, train: bool = False):
    features, masks = self.backbone_features(batch["image"], batch["image_hw"])
    if train:
      return self.proposal_generator.losses(
          features,
          batch["gt_boxes"],
          batch["gt_classes"],
          batch["gt_valid"],
          masks,
          axis_name=self.axis_name,
      )
    head, dets = self.proposal_generator(features, masks, return_candidates=True)
    for i, name in enumerate(self.in_features):
      self.sow("intermediates", name, features[i])
      for key in ("cls_logits", "reg", "reg_raw", "agn_hm_logits"):
        if key in head:
          self.sow("intermediates", f"{key}_{name}", head[key][i])
    for key in ("cand_boxes", "cand_scores", "cand_classes", "cand_valid"):
      self.sow("intermediates", key, dets.pop(key))
    return dets


# The training keys of `model.centernet_detector` with their official defaults (MODEL.CENTERNET.*,
# centernet/config.py), read with these fallbacks until cn2_jax/config.py declares them.
@register(
    "centernet",
    frozen_param_prefixes=backbone_frozen_prefixes,  # FREEZE_AT of the backbone
    # the class heatmap's last conv: one output channel per class, no background
    class_params=ClassParams(
        r"params/proposal_generator/centernet_head/cls_logits/(kernel|bias)", background_last=False
    ),
    display_name="CenterNet (one-stage, CenterNet2 code base)",
    # the same detectron2-named checkpoints as CenterNet2 (CenterNet-*.pth of the official zoo)
    weights=WeightFormat(
        convert=flax_mapping.convert_official,
        named_tensors=flax_mapping.official_named_tensors,
        convert_checkpoint=centernet2.convert_checkpoint,  # the same detectron2 names
        default_config="configs/zoo/CenterNet-FPN_R50_1x.py",
        fields_by_path=(
            ("/backbone/bottom_up/", "model.resnet_* or model.dla"),
            ("/backbone/", "model.backbone, model.fpn_channels, model.bifpn or model.dla"),
            (
                "/proposal_generator/centernet_head/cls_logits",
                "model.num_classes or model.centernet_detector",
            ),
            ("/proposal_generator/", "model.centernet_detector (tower convs, norm)"),
        ),
    ),
    # --format onnx: the whole detector (its top-k, divmod and per-class NMS trace as ONNX-friendly
    # forms, cn2_jax/export.py), or its dense part
    onnx_parts={"detector": None, "dense": "dense_outputs"},
)
def build_centernet_detector(model_config, axis_name: Optional[str] = None) -> CenterNetDetector:
  """`config.model` (arch "centernet") -> the official one-stage `CenterNetDetector`: the
  registered `model.backbone` and the head / decode of `model.centernet_detector`."""
  dtype = COMPUTE_DTYPES[model_config.dtype]
  backbone = build_backbone(model_config, dtype)
  cd = model_config.centernet_detector
  if len(cd.in_features) != len(backbone.strides):
    raise ValueError(
        f"model.centernet_detector.in_features={tuple(cd.in_features)} names "
        f"{len(cd.in_features)} levels; {model_config.backbone} has strides {backbone.strides}"
    )
  generator = CenterNetOneStageGenerator(
      strides=tuple(backbone.strides),
      channels=backbone.out_channels,
      num_classes=model_config.num_classes,
      num_cls_convs=cd.num_cls_convs,
      num_box_convs=cd.num_box_convs,
      num_share_convs=cd.num_share_convs,
      norm=cd.norm,
      use_deformable=cd.use_deformable,
      with_agn_hm=cd.with_agn_hm,
      prior_prob=cd.prior_prob,
      bbox_bias_init=cd.bbox_bias_init,
      score_thresh=cd.inference_thresh,
      pre_nms_topk_test=cd.pre_nms_topk_test,
      post_nms_topk_test=cd.post_nms_topk_test,
      nms_thresh_test=cd.nms_thresh_test,
      center_nms=cd.center_nms,
      not_nms=cd.not_nms,
      dtype=dtype,
      soi=tuple(tuple(float(v) for v in r) for r in cd.soi),
      hm_min_overlap=cd.hm_min_overlap,
      min_radius=cd.min_radius,
      more_pos=cd.more_pos,
      more_pos_thresh=cd.more_pos_thresh,
      more_pos_topk=cd.more_pos_topk,
      focal_alpha=cd.focal_alpha,
      focal_beta=cd.focal_beta,
      loss_gamma=cd.loss_gamma,
      sigmoid_clamp=cd.sigmoid_clamp,
      ignore_high_fp=cd.ignore_high_fp,
      pos_weight=cd.pos_weight,
      neg_weight=cd.neg_weight,
      reg_weight=cd.reg_weight,
      not_norm_reg=cd.not_norm_reg,
  )
  return CenterNetDetector(
      backbone=backbone,
      proposal_generator=generator,
      in_features=tuple(cd.in_features),
      pixel_mean=tuple(model_config.pixel_mean),
      pixel_std=tuple(model_config.pixel_std),
      input_format=model_config.input_format,
      axis_name=axis_name,
  )


def _validate_detector(cfg) -> None:
  d = cfg.model.centernet_detector
  if len(d.soi) != len(d.in_features):
    raise ConfigError(
        f"model.centernet_detector.soi has {len(d.soi)} ranges for {len(d.in_features)} "
        f"in_features (one per level)"
    )


CONFIG = schema.group(
    "model.centernet_detector",
    "The official one-stage CenterNet (arch 'centernet': CenterNetDetector with the CenterNet "
    "head in one-stage mode, ONLY_PROPOSAL False; CenterNet-FPN_R50_1x, CenterNet-S4_DLA_8x). "
    "Defaults = the official MODEL.CENTERNET defaults.",
    schema.Field(
        "in_features", ("p3", "p4", "p5", "p6", "p7"), "levels the head reads (('dla2',) for S4)"
    ),
    schema.Field("num_cls_convs", 4, "NUM_CLS_CONVS: class tower depth"),
    schema.Field("num_box_convs", 4, "NUM_BOX_CONVS: box tower depth"),
    schema.Field("num_share_convs", 0, "NUM_SHARE_CONVS: convs shared by both towers"),
    schema.Field(
        "norm", "GN", "tower norm: 'GN' (GroupNorm(32), or (25) when channels % 32 != 0) or ''"
    ),
    schema.Field("use_deformable", False, "last conv of each tower a modulated DCN"),
    schema.Field("with_agn_hm", False, "an agnostic heatmap multiplied into the class scores"),
    schema.Field("prior_prob", 0.01, "PRIOR_PROB: initial class probability"),
    schema.Field("bbox_bias_init", 8.0, "initial bias of the ltrb regression"),
    schema.Field("inference_thresh", 0.05, "INFERENCE_TH: class-probability candidates"),
    schema.Field("pre_nms_topk_test", 1000, "PRE_NMS_TOPK_TEST, per level"),
    schema.Field("post_nms_topk_test", 100, "POST_NMS_TOPK_TEST: detections per image"),
    schema.Field("nms_thresh_test", 0.6, "NMS_TH_TEST of the per-class NMS"),
    schema.Field("center_nms", False, "CENTER_NMS: NMS on centre distance instead of IoU"),
    schema.Field("not_nms", False, "NOT_NMS: no NMS (top-k only)"),
    schema.Field(
        "soi",
        ((0, 80), (64, 160), (128, 320), (256, 640), (512, 10000000)),
        "SOI: inclusive half-diagonal range per in_feature (((0, 1000000),) for S4)",
    ),
    schema.Field(
        "hm_min_overlap", 0.8, "HM_MIN_OVERLAP: heatmap radius^2 = 2 ((1 - o) / (1 + o))^2 area"
    ),
    schema.Field("min_radius", 4.0, "MIN_RADIUS: radius^2 >= min_radius^2"),
    schema.Field(
        "more_pos",
        False,
        "MORE_POS: positives = the 3x3 cells around each GT centre (all levels) whose GIoU cost "
        "is below min(k-th smallest cost (more_pos_topk), more_pos_thresh); False: the centre "
        "cell per SOI level",
    ),
    schema.Field("more_pos_thresh", 0.2, "MORE_POS_THRESH"),
    schema.Field("more_pos_topk", 9, "MORE_POS_TOPK"),
    schema.Field("focal_alpha", 0.25, "HM_FOCAL_ALPHA (< 0: no alpha weighting)"),
    schema.Field("focal_beta", 4.0, "HM_FOCAL_BETA: negatives weighted by (1 - heatmap)^beta"),
    schema.Field("loss_gamma", 2.0, "LOSS_GAMMA"),
    schema.Field("sigmoid_clamp", 1e-4, "SIGMOID_CLAMP"),
    schema.Field(
        "ignore_high_fp", -1.0, "IGNORE_HIGH_FP: > 0 drops negatives with probability >= it"
    ),
    schema.Field("pos_weight", 1.0, "POS_WEIGHT"),
    schema.Field("neg_weight", 1.0, "NEG_WEIGHT"),
    schema.Field("reg_weight", 2.0, "REG_WEIGHT (1 in Base_S4_DLA)"),
    schema.Field(
        "not_norm_reg", True, "NOT_NORM_REG; False: GIoU terms weighted by the agnostic heatmap"
    ),
    families=("centernet",),
    validate=_validate_detector,
)
