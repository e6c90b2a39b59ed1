"""The official one-stage CenterNet inference (`CenterNetDetector` with the `CenterNet` proposal
generator, ONLY_PROPOSAL False), static shapes.

Official path (`centernet/modeling/dense_heads/centernet.py`: `CenterNet.inference` ->
`predict_instances` -> `predict_single_level` per level -> `nms_and_topK` -> `ml_nms`), per image:
  1. heatmap = sigmoid(cls_logits) `[H W, C]` (locations row-major, classes inner); with
     WITH_AGN_HM the candidates are chosen on this heatmap but ranked and scored by
     heatmap * sigmoid(agn_hm). (CENTER_NMS: the heatmap is first kept only at its 3x3 maxima.)
  2. candidates: every (location, class) with heatmap > score_thresh (INFERENCE_TH, 0.05);
  3. per level at most pre_nms_topk (1000) of them, the largest (`topk(sorted=False)`);
  4. grid point (x s + s // 2, y s + s // 2); box = (gx - l s, gy - t s, gx + r s, gy + b s) with
     (l, t, r, b) = reg * s; x2 = max(x2, x1 + 0.01), y2 = max(y2, y1 + 0.01); not clipped;
     score = the heatmap value (sqrt of it with WITH_AGN_HM); class = the heatmap channel;
  5. levels concatenated; per-class NMS (`ml_nms` -> detectron2 `batched_nms` -> torchvision
     `batched_nms`) at nms_thresh (0.6), which returns the kept boxes by descending score;
     skipped with NOT_NMS / CENTER_NMS;
  6. if more than post_nms_topk (100) remain, those with score >= the post_nms_topk-th largest
     (`kthvalue`), kept in their order.
The boxes are in resized-image pixels; `detector_postprocess` (rescaling to the original image)
is the caller's business (`cn2_jax.modeling.detector.postprocess_detections`).

Static shapes: the candidates are a validity mask over a fixed top-k per level, the NMS is the
fixed-size `ops.nms.batched_nms`, and the output has exactly post_nms_topk slots. Deviations:
  * step 6 keeps exactly post_nms_topk boxes (score ties with the cut can make the official code
    keep a few more); with NMS this is the first post_nms_topk of the NMS output, i.e. the
    official set and order;
  * without NMS (NOT_NMS / CENTER_NMS) the official output keeps the concatenation order; here
    the post_nms_topk are sorted by descending score (same set);
  * ties at the per-level top-k cut may select a different candidate of equal score (the official
    `topk(sorted=False)` order is unspecified), as may NMS among equal scores.
Which torchvision `batched_nms` strategy is emulated is a setting (`nms_mode`): torchvision picks
its per-class loop for more than 4000 box coordinates on the CPU (20000 on CUDA) and the
coordinate-offset trick otherwise; both give the same boxes up to float rounding of the IoU.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from cn2_jax.modeling import export_mode
from cn2_jax.modeling.ops.nms import DEFAULT_TILE_SIZE, batched_nms_batch


def _level_candidates(
    logits: jax.Array,
    ltrb: jax.Array,
    mask: Optional[jax.Array],
    agn_logits: Optional[jax.Array],
    stride: int,
    pre_nms_topk: int,
    score_thresh: float,
    center_nms: bool,
):
  """One level of one batch (steps 1-4): `logits [B, H, W, C]`, `ltrb [B, H, W, 4]` ->
  boxes `[B, k, 4]`, scores `[B, k]`, classes `[B, k]` int32, valid `[B, k]` bool,
  k = min(pre_nms_topk, H W C)."""
  b, h, w, c = logits.shape
  heat = jax.nn.sigmoid(logits.astype(jnp.float32))
  if mask is not None:  # off-canvas locations never become candidates (and are no 3x3 maxima)
    heat = jnp.where(mask[..., None], heat, 0.0)
  if center_nms:
    # max_pool2d(3, stride 1, padding 1) over (H, W) per class; -inf padding as torch.
    peak = export_mode.max_pool(heat, 3, 1, 1)
    heat = heat * (peak == heat).astype(heat.dtype)
  heat = heat.reshape(b, h * w * c)  # official order: location-major, class inner
  cand = heat > score_thresh
  rank = heat
  if agn_logits is not None:
    agn = jax.nn.sigmoid(agn_logits.astype(jnp.float32)).reshape(b, h * w)
    rank = (heat.reshape(b, h * w, c) * agn[..., None]).reshape(b, h * w * c)
  k = min(int(pre_nms_topk), h * w * c)
  # Candidates first (a rank below every real one), then the largest heatmap values.
  top, idx = export_mode.top_k(jnp.where(cand, rank, -1.0), k)
  valid = jnp.take_along_axis(cand, idx, axis=1)
  loc, cls = export_mode.int_divmod(idx, c)
  cls = cls.astype(jnp.int32)
  s = int(stride)
  row, col = export_mode.int_divmod(loc, w)
  gx = (col * s + s // 2).astype(jnp.float32)
  gy = (row * s + s // 2).astype(jnp.float32)
  d = ltrb.astype(jnp.float32).reshape(b, h * w, 4) * jnp.float32(s)  # pixels, as official
  d = jnp.take_along_axis(d, loc[..., None], axis=1)  # [B, k, 4]
  x1 = gx - d[..., 0]
  y1 = gy - d[..., 1]
  x2 = jnp.maximum(gx + d[..., 2], x1 + 0.01)
  y2 = jnp.maximum(gy + d[..., 3], y1 + 0.01)
  boxes = jnp.stack([x1, y1, x2, y2], axis=-1)
  scores = jnp.where(valid, top, 0.0)
  if agn_logits is not None:
    scores = jnp.sqrt(scores)
  return boxes, scores, cls, valid


def onestage_candidates(
    cls_logits: Sequence[jax.Array],
    reg: Sequence[jax.Array],
    masks: Optional[Sequence[jax.Array]] = None,
    *,
    strides: Sequence[int],
    pre_nms_topk: int,
    score_thresh: float,
    agn_hm_logits: Optional[Sequence[jax.Array]] = None,
    center_nms: bool = False,
) -> dict:
  """Steps 1-4 for a batch: the candidates that enter the NMS, levels concatenated.

  Args:
    cls_logits: per level `[B, H_l, W_l, C]` class heatmap logits.
    reg: per level `[B, H_l, W_l, 4]` (l, t, r, b) in stride units (the head's `reg`, i.e. after
      the Scale and the ReLU).
    masks: optional per level `[B, H_l, W_l]` bool, the official canvas (off it nothing is a
      candidate).
    strides: per-level strides (`CENTERNET.FPN_STRIDES`).
    pre_nms_topk: per-level cap (`PRE_NMS_TOPK_TEST`, 1000).
    score_thresh: candidates need heatmap > score_thresh (`INFERENCE_TH`, 0.05).
    agn_hm_logits: per level `[B, H_l, W_l]` (only with WITH_AGN_HM; None otherwise).
    center_nms: `CENTER_NMS` (keep only the 3x3 maxima of each class heatmap).
  Returns:
    dict `cand_boxes [B, N, 4]` float32 (xyxy resized-image pixels, unclipped), `cand_scores
    [B, N]` float32 (0 where invalid), `cand_classes [B, N]` int32, `cand_valid [B, N]` bool,
    N = sum_l min(pre_nms_topk, H_l W_l C); per level in descending score order.
  """
  n = len(cls_logits)
  if not (len(reg) == len(strides) == n) or (agn_hm_logits is not None and len(agn_hm_logits) != n):
    raise ValueError("onestage_candidates: one cls_logits, reg (and agn_hm) map per stride")
  parts = [
      _level_candidates(
          jax.lax.stop_gradient(cls_logits[l]),
          jax.lax.stop_gradient(reg[l]),
          None if masks is None else masks[l],
          None if agn_hm_logits is None else jax.lax.stop_gradient(agn_hm_logits[l]),
          strides[l],
          pre_nms_topk,
          score_thresh,
          center_nms,
      )
      for l in range(n)
  ]
  boxes, scores, classes, valid = [jnp.concatenate(p, axis=1) for p in zip(*parts)]
  return dict(cand_boxes=boxes, cand_scores=scores, cand_classes=classes, cand_valid=valid)


def onestage_detections(
    candidates: dict,
    *,
    nms_thresh: float,
    post_nms_topk: int,
    apply_nms: bool = True,
    nms_mode: str = "torchvision_cpu",
    nms_tile_size: int = DEFAULT_TILE_SIZE,
) -> dict:
  """Steps 5-6: per-class NMS and the top post_nms_topk, per image.

  Args:
    candidates: `onestage_candidates`' dict.
    nms_thresh: IoU threshold (`NMS_TH_TEST`, 0.6); `apply_nms=False` (NOT_NMS or CENTER_NMS)
      skips the NMS, as does nms_thresh <= 0 (`ml_nms` returns its input then).
    post_nms_topk: output length K (`POST_NMS_TOPK_TEST`, 100).
    nms_mode: which torchvision `batched_nms` strategy `ops.nms.batched_nms` emulates:
      "torchvision_cpu" (the oracle's CPU run: per-class loop above 4000 coordinates, offset trick
      below), "torchvision_cuda" (threshold 20000), "per_class" or "offset".
    nms_tile_size: tile length of the NMS (performance only).
  Returns:
    dict `boxes [B, K, 4]`, `scores [B, K]`, `classes [B, K]` int32, `valid [B, K]` bool, by
    descending score; padding slots hold zeros (class 0) and valid False.
  """
  boxes = candidates["cand_boxes"]
  scores = candidates["cand_scores"]
  classes = candidates["cand_classes"]
  valid = candidates["cand_valid"]
  k = int(post_nms_topk)

  if apply_nms and nms_thresh > 0:
    keep, keep_valid = batched_nms_batch(
        boxes, scores, classes, valid, nms_thresh, k, mode=nms_mode, tile_size=nms_tile_size
    )
  else:
    n = scores.shape[1]
    _, keep = export_mode.top_k(jnp.where(valid, scores, -1.0), min(k, n))
    keep_valid = jnp.take_along_axis(valid, keep, axis=1)
    if n < k:
      keep = jnp.pad(keep, ((0, 0), (0, k - n)))
      keep_valid = jnp.pad(keep_valid, ((0, 0), (0, k - n)))

  take = lambda a: jnp.take_along_axis(a, keep, axis=1)  # noqa: E731
  return dict(
      boxes=jnp.where(keep_valid[..., None], jnp.take_along_axis(boxes, keep[..., None], 1), 0.0),
      scores=jnp.where(keep_valid, take(scores), 0.0),
      classes=jnp.where(keep_valid, take(classes), 0).astype(jnp.int32),
      valid=keep_valid,
  )


def predict_instances(
    cls_logits: Sequence[jax.Array],
    reg: Sequence[jax.Array],
    masks: Optional[Sequence[jax.Array]] = None,
    *,
    strides: Sequence[int],
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_thresh: float,
    score_thresh: float,
    agn_hm_logits: Optional[Sequence[jax.Array]] = None,
    center_nms: bool = False,
    not_nms: bool = False,
    nms_mode: str = "torchvision_cpu",
    nms_tile_size: int = DEFAULT_TILE_SIZE,
    return_candidates: bool = False,
) -> dict:
  """The whole official one-stage inference (steps 1-6; arguments as in `onestage_candidates`
  and `onestage_detections`; CENTER_NMS implies NOT_NMS, as in the official constructor).
  Returns the detections dict, plus the candidates' entries with `return_candidates`."""
  cands = onestage_candidates(
      cls_logits,
      reg,
      masks,
      strides=strides,
      pre_nms_topk=pre_nms_topk,
      score_thresh=score_thresh,
      agn_hm_logits=agn_hm_logits,
      center_nms=center_nms,
  )
  dets = onestage_detections(
      cands,
      nms_thresh=nms_thresh,
      post_nms_topk=post_nms_topk,
      apply_nms=not (not_nms or center_nms),
      nms_mode=nms_mode,
      nms_tile_size=nms_tile_size,
  )
  if return_candidates:
    dets.update(cands)
  return dets
