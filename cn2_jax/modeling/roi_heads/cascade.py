"""Cascade ROI heads with probabilistic scoring (CenterNet2 `CustomCascadeROIHeads`,
docs/centernet2.md §5-§6).

Training (per device batch, static shapes):
  stage 0: proposals + appended GT -> match at IoU 0.6 -> sample 512 ROIs/image (<= 25% fg)
  stage k > 0: previous stage's regressed boxes (detached, clipped, empty ones masked out)
               re-matched at IoU 0.7 / 0.8, no re-sampling, no GT re-added
  every stage: multi-level ROIAlign -> gradient x 1/3 into the features -> 2FC head ->
               softmax CE (mean over ROIs) + L1 on fg deltas (sum / #ROIs)
Inference:
  3 stages on the 256 proposals (stage 0 unclipped, later stages clipped), scores =
  sqrt(mean_k softmax_k * proposal_score), boxes = last stage's regression, then
  `fast_rcnn_inference`: clip, score > 0.05, per-class NMS 0.7, top 100.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cn2_jax import schema
from cn2_jax.config import model_kwargs
from cn2_jax.errors import ConfigError
from cn2_jax.modeling import data_parallel, export_mode
from cn2_jax.modeling.canvas import level_extents
from cn2_jax.modeling.ops import boxes as box_ops
from cn2_jax.modeling.ops.matcher import match_boxes
from cn2_jax.modeling.ops.nms import nms, nms_for_onnx
from cn2_jax.modeling.ops.roi_align import multilevel_roi_align
from cn2_jax.modeling.ops.sampling import subsample_labels
from cn2_jax.modeling.roi_heads.box_head import FastRCNNConvFCHead, FastRCNNOutputLayers
from cn2_jax.modeling.roi_heads.build import ROI_HEADS
from cn2_jax.modeling.roi_heads.fed_loss import (
    load_class_freq,
    sample_fed_classes,
    sigmoid_ce_loss,
    sigmoid_prior_bias,
    softmax_ce_loss,
)

Dtype = Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def scale_gradient(x: jax.Array, scale: float) -> jax.Array:
  """Identity forward; multiplies the incoming gradient by `scale` (official `_ScaleGradient`)."""
  return x


def _scale_gradient_fwd(x, scale):
  return x, None


def _scale_gradient_bwd(scale, _, g):
  return (g * scale,)


scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


def probabilistic_scores(
    stage_logits: Sequence[jax.Array],
    proposal_scores: jax.Array,
    mult_proposal_score: bool,
    use_sigmoid_ce: bool,
) -> jax.Array:
  """CenterNet2's final score (docs/centernet2.md §6.1): sqrt(mean_k softmax(logits_k) * s_prop).

  `stage_logits`: per stage `[..., R, K+1]`; `proposal_scores` `[..., R]` = sqrt(sigmoid(agn)),
  so the result is q^(1/2) * sigmoid(agn)^(1/4). Without `mult_proposal_score`: the plain
  cascade average. With `use_sigmoid_ce` the class probabilities are sigmoid(logits) (official
  `predict_probs`; the background column is unused). Returns `[..., R, K+1]` float32.
  """
  to_probs = jax.nn.sigmoid if use_sigmoid_ce else (lambda l: jax.nn.softmax(l, axis=-1))
  probs = sum(to_probs(l.astype(jnp.float32)) for l in stage_logits)
  probs = probs / len(stage_logits)
  if mult_proposal_score:
    probs = jnp.sqrt(probs * proposal_scores[..., None].astype(jnp.float32))
  return probs


def inference_candidates(boxes, scores, valid, image_hw, score_thresh: float):
  """`fast_rcnn_inference`'s inputs to its per-class NMS, for `[..., R]` leading dimensions: the
  boxes clipped to `image_hw [..., 2]` (`[..., R, 4]`), the class scores without the background
  column (`[..., R, K]`) and which (box, class) pairs are candidates (`bool[..., R, K]`: score
  above `score_thresh`, valid proposal, finite box and score)."""
  num_classes = scores.shape[-1] - 1
  boxes = box_ops.clip_boxes(boxes, image_hw.astype(jnp.float32))
  cls_scores = scores[..., :num_classes]
  finite = jnp.all(jnp.isfinite(boxes), axis=-1)[..., None] & jnp.isfinite(cls_scores)
  cand = (cls_scores > score_thresh) & valid[..., None] & finite
  return boxes, cls_scores, cand


def fast_rcnn_inference(
    boxes: jax.Array,
    scores: jax.Array,
    valid: jax.Array,
    image_hw: jax.Array,
    *,
    score_thresh: float,
    nms_thresh: float,
    topk: int,
) -> dict[str, jax.Array]:
  """detectron2 `fast_rcnn_inference_single_image` for class-agnostic boxes, static shapes.

  Args:
    boxes: `[R, 4]` f32 final boxes (unclipped) in resized-image pixels.
    scores: `[R, K+1]` f32 per-class scores, background last.
    valid: `[R]` bool, padded proposals are False.
    image_hw: `[2]` (h, w) used to clip.
  Returns:
    dict boxes `[topk, 4]`, scores `[topk]`, classes `[topk]` int32, valid `[topk]` bool, sorted
    by descending score. Per-class NMS is exact: the boxes are shared by all classes, so NMS runs
    once per class over the R boxes (vmapped), then the best `topk` survivors are kept — the same
    set as torchvision `batched_nms` followed by `keep[:topk]`.
  """
  num_classes = scores.shape[1] - 1
  boxes, cls_scores, cand = inference_candidates(boxes, scores, valid, image_hw, score_thresh)
  per_class_max = min(topk, boxes.shape[0])

  def one_class(s, m):
    idx, keep = nms(boxes, s, m, nms_thresh, per_class_max)
    return idx, keep

  idx, keep = jax.vmap(one_class, in_axes=(1, 1))(cls_scores, cand)  # [K, P]
  cls_ids = jnp.broadcast_to(jnp.arange(num_classes, dtype=jnp.int32)[:, None], idx.shape)
  cand_scores = jnp.where(keep, cls_scores[idx, cls_ids], -jnp.inf).reshape(-1)
  top_scores, top = jax.lax.top_k(cand_scores, topk)
  out_valid = jnp.isfinite(top_scores)
  out_idx = idx.reshape(-1)[top]
  return dict(
      boxes=jnp.where(out_valid[:, None], boxes[out_idx], 0.0),
      scores=jnp.where(out_valid, top_scores, 0.0),
      classes=jnp.where(out_valid, cls_ids.reshape(-1)[top], 0),
      valid=out_valid,
      proposal_index=jnp.where(out_valid, out_idx, -1),
  )


def fast_rcnn_inference_batch_for_onnx(
    boxes: jax.Array,
    scores: jax.Array,
    valid: jax.Array,
    image_hw: jax.Array,
    *,
    score_thresh: float,
    nms_thresh: float,
    topk: int,
) -> dict[str, jax.Array]:
  """`fast_rcnn_inference_batch` without vmap (jax2onnx 0.12.5 fails on vmapped jnp.where): the
  per-class NMS as `nms_for_onnx` over a [B, K] batch of rows (each class's scores on the shared
  boxes, as the vmap over classes), the top-k by `export_mode.top_k`, the gathers as
  `take_along_axis`. The same values."""
  num_classes = scores.shape[-1] - 1
  r = boxes.shape[1]
  boxes, cls_scores, cand = inference_candidates(boxes, scores, valid, image_hw, score_thresh)
  per_class_max = min(topk, r)
  s_k = jnp.swapaxes(cls_scores, 1, 2)  # [B, K, R]
  boxes_k = jnp.zeros_like(s_k)[..., None] + boxes[:, None]  # [B, K, R, 4]: x + 0 = x
  idx, keep = nms_for_onnx(boxes_k, s_k, jnp.swapaxes(cand, 1, 2), nms_thresh, per_class_max)
  kept_scores = jnp.take_along_axis(s_k, idx, axis=2)  # [B, K, P]
  flat_idx = idx.reshape(-1, num_classes * per_class_max)
  cand_scores = jnp.where(keep, kept_scores, -jnp.inf).reshape(-1, num_classes * per_class_max)
  top_scores, top = export_mode.top_k(cand_scores, topk)
  out_valid = jnp.isfinite(top_scores)
  out_idx = jnp.take_along_axis(flat_idx, top, axis=1)
  out_cls, _ = export_mode.int_divmod(top, per_class_max)
  out_boxes = jnp.take_along_axis(boxes, out_idx[:, :, None], axis=1)
  return dict(
      boxes=jnp.where(out_valid[:, :, None], out_boxes, 0.0),
      scores=jnp.where(out_valid, top_scores, 0.0),
      classes=jnp.where(out_valid, out_cls, 0).astype(jnp.int32),
      valid=out_valid,
      proposal_index=jnp.where(out_valid, out_idx, -1),
  )


@export_mode.onnx_form(fast_rcnn_inference_batch_for_onnx)
def fast_rcnn_inference_batch(
    boxes: jax.Array,
    scores: jax.Array,
    valid: jax.Array,
    image_hw: jax.Array,
    *,
    score_thresh: float,
    nms_thresh: float,
    topk: int,
) -> dict[str, jax.Array]:
  """`fast_rcnn_inference` per image of a batch (`[B, ...]` inputs and outputs)."""
  infer = functools.partial(
      fast_rcnn_inference, score_thresh=score_thresh, nms_thresh=nms_thresh, topk=topk
  )
  return jax.vmap(infer)(boxes, scores, valid, image_hw)


@functools.lru_cache(maxsize=4)
def load_class_freq_cached(path: str, freq_weight: float, num_classes: int):
  """The federated loss's class frequencies, read once per (file, weight) and process."""
  return load_class_freq(path, freq_weight, num_classes)


class CascadeROIHeads(nn.Module):
  """Three-stage cascade (sub-modules `box_head.{k}`, `box_predictor.{k}`).

  Attributes mirror `config.model.roi_heads` (its schema group below holds meanings and
  defaults) and are all required; the builders add the wiring: `cascade` (from the registered
  name), `num_classes`,
  `min_level` (the level of the first feature map the detector passes, P3 -> 3),
  `size_divisibility` (the backbone's: the official canvas, ROIAlign's border), `dtype`,
  `axis_name` and `remat` (`config.model.remat`: in training, each stage's ROIAlign and box head
  are recomputed in the backward pass instead of keeping their activations, `nn.remat`).
  `in_features` (ROI_HEADS.IN_FEATURES, e.g. ("p3", "p4")) are the consecutive levels the boxes
  are pooled from; each box goes to its level clamped to them.
  `cascade=False` is CenterNet2-F's `CustomROIHeads`: one Fast R-CNN stage (detectron2
  `StandardROIHeads` with the probabilistic score), which is this cascade with one stage.
  """

  num_classes: int
  min_level: int
  size_divisibility: int
  in_features: Sequence[str]
  cascade: bool
  use_sigmoid_ce: bool
  prior_prob: float
  use_fed_loss: bool
  cat_freq_path: str
  fed_loss_num_cat: int
  fed_loss_freq_weight: float
  iou_thresholds: Sequence[float]
  box_weights: Sequence[Sequence[float]]
  batch_size_per_image: int
  positive_fraction: float
  pooler_resolution: int
  sampling_ratio: int
  max_adaptive_samples: Any  # int or (cap_h, cap_w)
  canonical_box_size: int
  canonical_level: int
  fc_dim: int
  num_fc: int
  scale_clamp: float
  append_gt: bool
  mult_proposal_score: bool
  score_thresh_test: float
  nms_thresh_test: float
  detections_per_image: int
  remat: bool
  dtype: Dtype
  axis_name: Optional[str] = None  # wiring (the data axis of the train step), not a setting

  def setup(self):
    n = len(self.iou_thresholds)
    if not self.cascade and n != 1:
      raise ValueError(f"CustomROIHeads is one stage; got iou_thresholds of {n}")
    # CustomCascadeROIHeads names its stages box_head.{k} / box_predictor.{k}; CustomROIHeads
    # (one stage) has plain box_head / box_predictor.
    suffix = (lambda k: f".{k}") if self.cascade else (lambda k: "")
    self.box_head = [
        FastRCNNConvFCHead(self.fc_dim, self.num_fc, self.dtype, name=f"box_head{suffix(k)}")
        for k in range(n)
    ]
    self.box_predictor = [
        FastRCNNOutputLayers(
            self.num_classes,
            self.dtype,
            sigmoid_prior_bias(self.prior_prob) if self.use_sigmoid_ce else 0.0,
            name=f"box_predictor{suffix(k)}",
        )
        for k in range(n)
    ]

  @property
  def num_stages(self) -> int:
    return len(self.iou_thresholds)

  @property
  def pool_min_level(self) -> int:
    return int(self.in_features[0][1:])

  def _pooled_levels(self, features: list) -> list:
    """The `in_features` levels of `features` (levels min_level, min_level + 1, ...)."""
    levels = [int(name[1:]) for name in self.in_features]
    if levels != list(range(levels[0], levels[0] + len(levels))) or not (
        self.min_level <= levels[0] and levels[-1] < self.min_level + len(features)
    ):
      raise ValueError(
          f"roi_heads.in_features={tuple(self.in_features)} must be consecutive levels among "
          f"p{self.min_level}..p{self.min_level + len(features) - 1}"
      )
    return [features[level - self.min_level] for level in levels]

  def _run_stage(self, k: int, features, boxes, train: bool, valid_hw=None):
    """Pools `boxes` `[B, R, 4]` and runs stage k; returns (logits, deltas, pred_boxes).
    `valid_hw` `[L, 2]`: the official canvas per level (ROIAlign's border)."""
    pool_and_head = _pool_and_head
    if train and self.remat:  # (heads, k, features, boxes, train, valid_hw): k, train static
      pool_and_head = nn.remat(_pool_and_head, static_argnums=(1, 4))
    x = pool_and_head(self, k, features, jax.lax.stop_gradient(boxes), train, valid_hw)
    logits, deltas = self.box_predictor[k](x)
    pred = box_ops.decode_boxes(
        deltas, jax.lax.stop_gradient(boxes), self.box_weights[k], scale_clamp=self.scale_clamp
    )
    return logits, deltas, pred

  def _fed_mask(self, k: int, labels, valid):
    """LVIS federated loss: stage k's `[C]` class mask (the batch's classes + frequency-weighted
    samples up to fed_loss_num_cat), drawn per stage and per device as the official per-GPU,
    per-stage `losses()` call does (roi_heads/fed_loss.py); None without the fed loss."""
    if not self.use_fed_loss:
      return None
    freq = load_class_freq_cached(self.cat_freq_path, self.fed_loss_freq_weight, self.num_classes)
    key = jax.random.fold_in(self.make_rng("sampling"), 1000 + k)
    if self.axis_name:
      key = jax.random.fold_in(key, data_parallel.device_index(self.axis_name))
    return sample_fed_classes(key, labels, valid, jnp.asarray(freq), self.fed_loss_num_cat)

  def _stage_losses(self, k, logits, deltas, boxes, valid, labels, matched_gt):
    """Classification loss (softmax CE, or sigmoid CE with USE_SIGMOID_CE; with the federated
    class mask when use_fed_loss; mean over valid ROIs) and L1 on fg deltas (sum / #valid
    ROIs), float32."""
    n = jnp.maximum(valid.sum().astype(jnp.float32), 1.0)
    loss_fn = sigmoid_ce_loss if self.use_sigmoid_ce else softmax_ce_loss
    loss_cls = loss_fn(logits, labels, valid, self._fed_mask(k, labels, valid))
    fg = valid & (labels < self.num_classes)
    target = box_ops.encode_boxes(boxes, matched_gt, self.box_weights[k])
    target = jnp.where(fg[..., None] & jnp.isfinite(target), target, 0.0)
    l1 = jnp.abs(deltas - target).sum(-1)
    loss_box = jnp.where(fg, l1, 0.0).sum() / n
    pred_cls = jnp.argmax(logits, axis=-1)
    acc = jnp.where(valid, pred_cls == labels, False).sum() / n
    return {
        f"loss_cls_stage{k}": loss_cls,
        f"loss_box_reg_stage{k}": loss_box,
        f"aux/cls_accuracy_stage{k}": acc,
        f"aux/num_fg_stage{k}": fg.sum().astype(jnp.float32) / labels.shape[0],
    }

  def _label(self, k, boxes, valid, gt_boxes, gt_classes, gt_valid):
    """Match `[B, R, 4]` boxes to GT at stage k's IoU; returns (labels, matched_gt_boxes, is_fg,
    matched_gt_idx), each `[B, R, ...]`."""
    thr = self.iou_thresholds[k]
    idx, is_fg, _ = jax.vmap(lambda b, g, gv: match_boxes(b, g, gv, thr))(boxes, gt_boxes, gt_valid)
    is_fg = is_fg & valid
    labels = jnp.where(is_fg, jnp.take_along_axis(gt_classes, idx, axis=1), self.num_classes)
    matched = jnp.take_along_axis(gt_boxes, idx[..., None], axis=1)
    return labels.astype(jnp.int32), matched, is_fg, idx

  def __call__(
      self,
      features,
      proposals: dict,
      image_hw: jax.Array,
      *,
      train: bool,
      gt_boxes=None,
      gt_classes=None,
      gt_valid=None,
  ):
    """Args:
      features: list of `[B, H_l, W_l, C]` for levels min_level.. (P3..P7).
      proposals: dict boxes `[B, P, 4]`, scores `[B, P]`, valid `[B, P]` (no gradient).
      image_hw: `[B, 2]` int32 resized-image (h, w).
      gt_*: `[B, M, ...]` padded GT (training only).
    Returns:
      train: dict of losses (+ `aux/` metrics); eval: detections dict (`fast_rcnn_inference`).
    """
    hw = image_hw.astype(jnp.float32)
    boxes = jax.lax.stop_gradient(proposals["boxes"])
    valid = proposals["valid"]
    features, valid_hw = self._pooled_levels_and_extents(features, image_hw)
    if train:
      return self._forward_train(
          features, boxes, valid, hw, gt_boxes, gt_classes, gt_valid, valid_hw
      )

    pred, scores = self._cascade_eval(features, boxes, proposals["scores"], hw, valid_hw)
    return fast_rcnn_inference_batch(
        pred,
        scores,
        valid,
        image_hw,
        score_thresh=self.score_thresh_test,
        nms_thresh=self.nms_thresh_test,
        topk=self.detections_per_image,
    )

  def pre_nms_detections(self, features, proposals: dict, image_hw: jax.Array) -> dict:
    """The eval forward up to the final per-class NMS (`--nms=plugin`: TensorRT's
    EfficientNMS_TRT does the rest, cn2_jax/export.py): `boxes [B, R, 4]` the final boxes clipped
    to image_hw (0 where not finite), `scores [B, R, K]` the class scores of the (box, class)
    pairs `fast_rcnn_inference` considers (`inference_candidates`), 0 for the others."""
    features, valid_hw = self._pooled_levels_and_extents(features, image_hw)
    hw = image_hw.astype(jnp.float32)
    boxes = jax.lax.stop_gradient(proposals["boxes"])
    pred, scores = self._cascade_eval(features, boxes, proposals["scores"], hw, valid_hw)
    boxes, cls_scores, cand = inference_candidates(
        pred, scores, proposals["valid"], image_hw, self.score_thresh_test
    )
    finite = jnp.all(jnp.isfinite(boxes), axis=-1, keepdims=True)
    return dict(
        boxes=jnp.where(finite, boxes, 0.0),
        scores=jnp.where(cand, cls_scores, 0.0),
    )

  def _pooled_levels_and_extents(self, features, image_hw):
    """The pooled levels and the rows / columns of each that the official map has."""
    features = self._pooled_levels(features)
    valid_hw = level_extents(
        image_hw,
        [2 ** (self.pool_min_level + i) for i in range(len(features))],
        self.size_divisibility,
    )
    return features, valid_hw

  def _cascade_eval(self, features, boxes, proposal_scores, hw, valid_hw):
    """The eval cascade on the proposals: the last stage's boxes `[B, R, 4]` (unclipped) and the
    probabilistic scores `[B, R, K+1]`."""
    stage_logits = []
    pred = boxes  # stage k > 0 refines the previous stage's predicted boxes
    for k in range(self.num_stages):
      if k > 0:
        boxes = box_ops.clip_boxes(jax.lax.stop_gradient(pred), hw[:, None, :])
      self.sow("intermediates", f"stage{k}_input_boxes", boxes)
      logits, deltas, pred = self._run_stage(k, features, boxes, train=False, valid_hw=valid_hw)
      self.sow("intermediates", f"stage{k}_cls_logits", logits)
      self.sow("intermediates", f"stage{k}_box_deltas", deltas)
      stage_logits.append(logits)
    scores = probabilistic_scores(
        stage_logits, proposal_scores, self.mult_proposal_score, self.use_sigmoid_ce
    )
    self.sow("intermediates", "final_scores_all", scores)
    self.sow("intermediates", "final_boxes_all", pred)
    return pred, scores

  def _forward_train(
      self, features, boxes, valid, hw, gt_boxes, gt_classes, gt_valid, valid_hw=None
  ):
    gt_boxes = gt_boxes.astype(jnp.float32)
    if self.append_gt:
      boxes = jnp.concatenate([boxes, gt_boxes], axis=1)
      valid = jnp.concatenate([valid, gt_valid], axis=1)
    # Stage 0: label all candidates at IoU 0.6, then sample a fixed 512 per image.
    labels, matched, is_fg, gt_idx = self._label(0, boxes, valid, gt_boxes, gt_classes, gt_valid)
    # Rows in [proposals; GT] order before sampling (training-step oracle, cn2_jax/testing).
    self.sow("intermediates", "train_stage0_prematch_boxes", boxes)
    self.sow("intermediates", "train_stage0_prematch_valid", valid)
    self.sow("intermediates", "train_stage0_prematch_labels", labels)
    self.sow("intermediates", "train_stage0_prematch_matched_idx", gt_idx)
    # One key per image from its global index (device offset + i): sampling is then the same
    # whatever the number of devices (or micro-batches, data_parallel.py) the batch is split over.
    n = boxes.shape[0]
    offset = data_parallel.device_index(self.axis_name) * n if self.axis_name else 0
    base = self.make_rng("sampling")
    keys = jax.vmap(lambda i: jax.random.fold_in(base, offset + i))(jnp.arange(n))
    idx, s_valid, _ = jax.vmap(
        lambda key, fg, v: subsample_labels(
            key, fg, v, self.batch_size_per_image, self.positive_fraction
        )
    )(keys, is_fg, valid)
    # The valid samples are a prefix of at most N (rows per image) slots, so a sampler budget
    # larger than N (e.g. 8192 to keep every row) needs no more than N slots: the tail would be
    # padding that every stage pools and runs through the box head for nothing.
    num_slots = min(self.batch_size_per_image, boxes.shape[1])
    idx, s_valid = idx[:, :num_slots], s_valid[:, :num_slots]
    self.sow("intermediates", "train_stage0_sampled_idx", idx)
    take = lambda a: jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)
    boxes, valid, labels, matched = take(boxes), s_valid, take(labels), take(matched)
    gt_idx = take(gt_idx)

    losses = {}
    pred = boxes  # stage k > 0 refines the previous stage's predicted boxes
    for k in range(self.num_stages):
      if k > 0:
        boxes = box_ops.clip_boxes(jax.lax.stop_gradient(pred), hw[:, None, :])
        valid = valid & box_ops.nonempty(boxes)
        labels, matched, _, gt_idx = self._label(k, boxes, valid, gt_boxes, gt_classes, gt_valid)
      logits, deltas, pred = self._run_stage(k, features, boxes, train=True, valid_hw=valid_hw)
      # Rows keep their slot in every stage; `valid` drops the padding and the empty boxes.
      for name, v in (
          ("boxes", boxes),
          ("valid", valid),
          ("labels", labels),
          ("matched_idx", gt_idx),
          ("cls_logits", logits),
          ("box_deltas", deltas),
      ):
        self.sow("intermediates", f"train_stage{k}_{name}", v)
      losses.update(self._stage_losses(k, logits, deltas, boxes, valid, labels, matched))
    return losses


def _pool_and_head(heads: CascadeROIHeads, k: int, features, boxes, train: bool, valid_hw):
  """Stage k's multi-level ROIAlign of `boxes` `[B, R, 4]` (no gradient) and box head ->
  `[B, R, fc_dim]`; the part of a stage that `remat` recomputes in the backward pass (its
  activations, `[B, R, S, S, C]` pooled features and ROIAlign's samples, are the large ones)."""
  pooled = multilevel_roi_align(
      features,
      boxes,
      min_level=heads.pool_min_level,
      output_size=heads.pooler_resolution,
      sampling_ratio=heads.sampling_ratio,
      aligned=True,  # ROIAlignV2 (the architecture, not a setting)
      canonical_box_size=heads.canonical_box_size,
      canonical_level=heads.canonical_level,
      max_adaptive_samples=heads.max_adaptive_samples,
      valid_hw=valid_hw,
  )
  if train:
    pooled = scale_gradient(pooled, 1.0 / heads.num_stages)
  else:  # [B, R, 7, 7, C] is large: only the inference oracle compares it
    heads.sow("intermediates", f"stage{k}_pooled", pooled)
  return heads.box_head[k](pooled)


def _roi_heads_builder(cascade: bool):
  def build(model_config, *, num_classes, min_level, size_divisibility, dtype, axis_name=None):
    settings = model_kwargs(model_config)["roi_heads"]
    del settings["name"]  # the registry key, not a module setting
    return CascadeROIHeads(
        cascade=cascade,
        num_classes=num_classes,
        min_level=min_level,
        size_divisibility=size_divisibility,
        dtype=dtype,
        axis_name=axis_name,
        remat=model_config.remat,  # a model-wide setting (model.remat)
        **settings,
    )

  return build


# The official ROI_HEADS.NAME values: the cascade, and CenterNet2-F's single Fast R-CNN stage
# (detectron2 `StandardROIHeads` with the probabilistic score), which is this cascade with one
# stage and unsuffixed parameter names.
ROI_HEADS.add("CustomCascadeROIHeads", _roi_heads_builder(cascade=True))
ROI_HEADS.add("CustomROIHeads", _roi_heads_builder(cascade=False))


def _validate_roi_heads(cfg) -> None:
  r = cfg.model.roi_heads
  ROI_HEADS.lookup(r.name)
  if r.name == "CustomROIHeads" and len(r.iou_thresholds) != 1:
    raise ConfigError(
        "model.roi_heads.name='CustomROIHeads' is one Fast R-CNN stage: iou_thresholds and "
        f"box_weights need one entry, got {len(r.iou_thresholds)}"
    )
  if len(r.iou_thresholds) != len(r.box_weights):
    raise ConfigError("model.roi_heads.iou_thresholds and box_weights must have equal length")
  if r.use_fed_loss and not r.cat_freq_path:
    raise ConfigError("model.roi_heads.use_fed_loss needs model.roi_heads.cat_freq_path")


CONFIG = schema.group(
    "model.roi_heads",
    "The cascade ROI heads of CenterNet2 (MODEL.ROI_HEADS / ROI_BOX_HEAD / ROI_BOX_CASCADE_HEAD; "
    "docs/centernet2.md §5).",
    schema.Field(
        "in_features",
        ("p3", "p4", "p5", "p6", "p7"),
        "ROI_HEADS.IN_FEATURES: the consecutive levels boxes are pooled from (clamped to them)",
    ),
    schema.Field(
        "name",
        "CustomCascadeROIHeads",
        "ROI_HEADS.NAME (the registry of modeling/roi_heads/build.py): 'CustomCascadeROIHeads' = "
        "one stage per iou_thresholds entry; 'CustomROIHeads' = CenterNet2-F's one Fast R-CNN "
        "stage (iou_thresholds / box_weights of length 1)",
    ),
    schema.Field("iou_thresholds", (0.6, 0.7, 0.8), "ROI_BOX_CASCADE_HEAD.IOUS: one per stage"),
    schema.Field(
        "box_weights",
        ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0)),
        "ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS: (wx, wy, ww, wh) per stage",
    ),
    schema.Field("batch_size_per_image", 512, "ROI_HEADS.BATCH_SIZE_PER_IMAGE: sampled rows"),
    schema.Field("positive_fraction", 0.25, "ROI_HEADS.POSITIVE_FRACTION of the sampled rows"),
    schema.Field("pooler_resolution", 7, "ROI_BOX_HEAD.POOLER_RESOLUTION: ROIAlign output side"),
    schema.Field(
        "sampling_ratio",
        0,
        "ROIAlign samples per bin and axis: 0 = official adaptive ceil(roi / 7), computed as "
        "separable window contractions (ops/roi_align.py), exact for every box whose bins need "
        "<= max_adaptive_samples (24 covers a 1333 px side on P3); 2 = a fixed 2x2 grid "
        "(scenic's choice; differs from the official pooled features)",
    ),
    schema.Field(
        "max_adaptive_samples",
        24,
        "cap of the adaptive samples per bin and axis (cheap: no cost " "per unused sample)",
    ),
    schema.Field("canonical_box_size", 224, "ROIPooler canonical box size (level assignment)"),
    schema.Field("canonical_level", 4, "ROIPooler canonical level (level assignment)"),
    schema.Field("fc_dim", 1024, "ROI_BOX_HEAD.FC_DIM"),
    schema.Field("num_fc", 2, "ROI_BOX_HEAD.NUM_FC"),
    schema.Field("scale_clamp", math.log(1000.0 / 16), "clamp of the decoded log(w/h) deltas"),
    schema.Field("append_gt", True, "PROPOSAL_APPEND_GT: GT boxes join the proposals in training"),
    schema.Field(
        "mult_proposal_score",
        True,
        "MULT_PROPOSAL_SCORE: final score = sqrt(cascade score x proposal score)",
    ),
    schema.Field(
        "use_sigmoid_ce",
        False,
        "ROI_BOX_HEAD.USE_SIGMOID_CE (LVIS; roi_heads/fed_loss.py): sigmoid CE instead of "
        "softmax (cls_score bias -log((1 - prior_prob) / prior_prob); sigmoid class "
        "probabilities at inference)",
    ),
    schema.Field("prior_prob", 0.01, "ROI_BOX_HEAD.PRIOR_PROB of the sigmoid cls_score bias"),
    schema.Field(
        "use_fed_loss",
        False,
        "USE_FED_LOSS: the federated loss (the batch's classes + classes drawn by image_count ** "
        "fed_loss_freq_weight from cat_freq_path, up to fed_loss_num_cat; sigmoid CE only)",
    ),
    schema.Field("cat_freq_path", "", "CAT_FREQ_PATH, an LVIS cat_info json"),
    schema.Field("fed_loss_num_cat", 50, "FED_LOSS_NUM_CAT"),
    schema.Field("fed_loss_freq_weight", 0.5, "FED_LOSS_FREQ_WEIGHT"),
    schema.Field("score_thresh_test", 0.05, "ROI_HEADS.SCORE_THRESH_TEST of the detections"),
    schema.Field("nms_thresh_test", 0.7, "ROI_HEADS.NMS_THRESH_TEST (per class)"),
    schema.Field("detections_per_image", 100, "TEST.DETECTIONS_PER_IMAGE"),
    families=("centernet2",),
    validate=_validate_roi_heads,
)
