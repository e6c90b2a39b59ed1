"""CenterNet proposal generation (docs/centernet2.md §4), static shapes.

Official path (`CenterNet.inference` -> `predict_instances` -> `predict_single_level` ->
`nms_and_topK`), per image:
  1. p = sigmoid(agn_hm logit); candidates are locations with p > score_thresh (1e-4);
  2. per level, the top k = min(pre_nms_topk, H_l * W_l) candidates by p (fewer if fewer pass);
  3. grid point (x * s + s // 2, y * s + s // 2); box = (gx - l*s, gy - t*s, gx + r*s, gy + b*s);
     then x2 = max(x2, x1 + 0.01), y2 = max(y2, y1 + 0.01); boxes are NOT clipped;
  4. score = sqrt(p); levels concatenated; class-agnostic NMS at nms_thresh (torchvision semantics);
  5. the top post_nms_topk by score, in descending order.
Everything is under `stop_gradient` (the official code runs under `no_grad`).

Static-shape deviation: the official step 5 keeps every score >= the k-th largest (`kthvalue`), so
exact score ties at the cut can keep more than k boxes; here exactly the first k (ties by index).
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from cn2_jax.modeling import export_mode
from cn2_jax.modeling.ops.nms import DEFAULT_TILE_SIZE, nms, nms_for_onnx


def _single_image(
    hm_logits: Sequence[jax.Array],
    reg: Sequence[jax.Array],
    strides: Sequence[int],
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_thresh: float,
    score_thresh: float,
    nms_tile_size: int,
    clip_hw=None,
):
  all_boxes, all_scores, all_valid = [], [], []
  for logits, ltrb, s in zip(hm_logits, reg, strides):
    h, w = logits.shape
    p = jax.nn.sigmoid(logits.reshape(-1))
    k = min(int(pre_nms_topk), h * w)
    top_p, idx = jax.lax.top_k(jnp.where(p > score_thresh, p, -1.0), k)
    valid = top_p > score_thresh
    s_i = int(s)
    gx = ((idx % w) * s_i + s_i // 2).astype(jnp.float32)
    gy = ((idx // w) * s_i + s_i // 2).astype(jnp.float32)
    d = (ltrb.reshape(h * w, 4) * jnp.float32(s_i))[idx]  # [k, 4] pixels
    x1 = gx - d[:, 0]
    y1 = gy - d[:, 1]
    x2 = jnp.maximum(gx + d[:, 2], x1 + 0.01)
    y2 = jnp.maximum(gy + d[:, 3], y1 + 0.01)
    box = jnp.stack([x1, y1, x2, y2], axis=-1)
    if clip_hw is not None:  # the MMDet port's clip (not official), before NMS
      hw = clip_hw.astype(jnp.float32)
      box = jnp.clip(box, 0.0, jnp.stack([hw[1], hw[0], hw[1], hw[0]]))
    all_boxes.append(box)
    all_scores.append(jnp.sqrt(jnp.where(valid, top_p, 0.0)))
    all_valid.append(valid)
  boxes = jnp.concatenate(all_boxes, axis=0)
  scores = jnp.concatenate(all_scores, axis=0)
  valid = jnp.concatenate(all_valid, axis=0)
  keep, keep_valid = nms(boxes, scores, valid, nms_thresh, post_nms_topk, tile_size=nms_tile_size)
  out_boxes = jnp.where(keep_valid[:, None], boxes[keep], 0.0)
  out_scores = jnp.where(keep_valid, scores[keep], 0.0)
  return dict(boxes=out_boxes, scores=out_scores, valid=keep_valid)


def generate_proposals_for_onnx(
    hm_logits: Sequence[jax.Array],
    reg: Sequence[jax.Array],
    strides: Sequence[int],
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_thresh: float,
    score_thresh: float,
    *,
    nms_tile_size: int = DEFAULT_TILE_SIZE,
    clip_hw=None,
) -> dict[str, jax.Array]:
  """`generate_proposals` without vmap (jax2onnx 0.12.5 fails on the vmapped jnp.where): the
  batched `proposal_candidates` (the same candidates, `export_mode.top_k` / `int_divmod`) and the
  batched `nms_for_onnx`, the kept rows gathered per image. The same values."""
  cand = proposal_candidates(
      [jax.lax.stop_gradient(h.astype(jnp.float32)) for h in hm_logits],
      [jax.lax.stop_gradient(r.astype(jnp.float32)) for r in reg],
      None,
      strides=strides,
      pre_nms_topk=pre_nms_topk,
      score_thresh=score_thresh,
      clip_hw=clip_hw,
  )
  boxes, scores = cand["cand_boxes"], cand["cand_scores"]
  keep, keep_valid = nms_for_onnx(
      boxes, scores, cand["cand_valid"], nms_thresh, post_nms_topk, tile_size=nms_tile_size
  )
  out_boxes = jnp.take_along_axis(boxes, keep[:, :, None], axis=1)
  return dict(
      boxes=jnp.where(keep_valid[:, :, None], out_boxes, 0.0),
      scores=jnp.where(keep_valid, jnp.take_along_axis(scores, keep, axis=1), 0.0),
      valid=keep_valid,
  )


@export_mode.onnx_form(generate_proposals_for_onnx)
def generate_proposals(
    hm_logits: Sequence[jax.Array],
    reg: Sequence[jax.Array],
    strides: Sequence[int],
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_thresh: float,
    score_thresh: float,
    *,
    nms_tile_size: int = DEFAULT_TILE_SIZE,
    clip_hw=None,
) -> dict[str, jax.Array]:
  """CenterNet2 proposals from the class-agnostic heatmap and the ltrb regression.

  The settings are required (`CenterNet` passes `config.model.centernet`: pre/post_nms_topk and
  nms_thresh of the train or test mode, inference_thresh as `score_thresh`).

  Args:
    hm_logits: per level `[B, H_l, W_l]` heatmap logits (before the sigmoid).
    reg: per level `[B, H_l, W_l, 4]` (l, t, r, b) distances in stride units (already ReLU'd and
      scaled by the per-level Scale, i.e. the head output).
    strides: per-level strides.
    pre_nms_topk: per-level candidate cap (1000 test / 4000 train).
    post_nms_topk: output length K (256 test / 2000 train).
    nms_thresh: NMS IoU threshold (0.9).
    score_thresh: candidates need sigmoid(logit) > score_thresh (1e-4).
    nms_tile_size: tile length of the NMS (performance only).
    clip_hw: optional `[B, 2]` image (h, w): clip the decoded boxes to the image before NMS (the
      MMDet port does; the official code does not, so the default is None).
  Returns:
    dict with `boxes [B, K, 4]` float32 (unclipped xyxy pixels), `scores [B, K]` float32 = sqrt(p)
    in descending order, `valid [B, K]` bool (padding slots have zero boxes and scores).
  """
  if not (len(hm_logits) == len(reg) == len(strides)):
    raise ValueError("generate_proposals: hm_logits, reg and strides must have the same length")
  hm_logits = [jax.lax.stop_gradient(h.astype(jnp.float32)) for h in hm_logits]
  reg = [jax.lax.stop_gradient(r.astype(jnp.float32)) for r in reg]

  def single(hms, regs, hw):
    return _single_image(
        hms,
        regs,
        strides,
        pre_nms_topk,
        post_nms_topk,
        nms_thresh,
        score_thresh,
        nms_tile_size,
        hw,
    )

  if clip_hw is None:
    return jax.vmap(lambda h, r: single(h, r, None))(list(hm_logits), list(reg))
  return jax.vmap(single)(list(hm_logits), list(reg), clip_hw)


def proposal_candidates(
    hm_logits: Sequence[jax.Array],
    reg: Sequence[jax.Array],
    masks: Optional[Sequence[jax.Array]],
    *,
    strides: Sequence[int],
    pre_nms_topk: int,
    score_thresh: float,
    clip_hw: Optional[jax.Array] = None,
) -> dict:
  """Steps 1-3 of the proposal decode (`generate_proposals`: everything before the NMS) for a
  batch, the part `CenterNet2.proposal_candidates` (`--format onnx`) exports: per level the top
  min(pre_nms_topk, H_l W_l) locations by sigmoid(logit) (off-canvas locations, `masks` False,
  and those <= score_thresh excluded), decoded into boxes, levels concatenated. In a form jax2onnx
  converts: batched (the batch is -1 in reshapes), with `export_mode.top_k` / `int_divmod`.
  `export.centernet2_proposals` (NMS, top post_nms_topk) turns them into the model's proposals.

  Returns `cand_boxes [B, Kc, 4]` float32 (unclipped xyxy pixels unless clip_hw), `cand_scores
  [B, Kc]` float32 = sqrt(p) (0 where invalid), `cand_valid [B, Kc]` bool, Kc = sum_l k_l.
  """
  boxes, scores, valid = [], [], []
  for lvl, (logits, ltrb, s) in enumerate(zip(hm_logits, reg, strides)):
    h, w = logits.shape[1], logits.shape[2]
    logits = logits.astype(jnp.float32)
    if masks is not None:  # off-canvas locations are never candidates (sigmoid(-inf) = 0)
      logits = jnp.where(masks[lvl], logits, -jnp.inf)
    p = jax.nn.sigmoid(logits.reshape(-1, h * w))
    k = min(int(pre_nms_topk), h * w)
    top_p, idx = export_mode.top_k(jnp.where(p > score_thresh, p, -1.0), k)
    ok = top_p > score_thresh
    s = int(s)
    ys, xs = export_mode.int_divmod(idx, w)
    gx = (xs * s + s // 2).astype(jnp.float32)
    gy = (ys * s + s // 2).astype(jnp.float32)
    d = ltrb.astype(jnp.float32).reshape(-1, h * w, 4) * jnp.float32(s)
    d = jnp.take_along_axis(d, idx[..., None], axis=1)  # [B, k, 4] pixels
    x1 = gx - d[..., 0]
    y1 = gy - d[..., 1]
    x2 = jnp.maximum(gx + d[..., 2], x1 + 0.01)
    y2 = jnp.maximum(gy + d[..., 3], y1 + 0.01)
    box = jnp.stack([x1, y1, x2, y2], axis=-1)
    if clip_hw is not None:
      hw = clip_hw.astype(jnp.float32)
      box = jnp.clip(box, 0.0, jnp.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], -1)[:, None])
    boxes.append(box)
    scores.append(jnp.sqrt(jnp.where(ok, top_p, 0.0)))
    valid.append(ok)
  return dict(
      cand_boxes=jnp.concatenate(boxes, axis=1),
      cand_scores=jnp.concatenate(scores, axis=1),
      cand_valid=jnp.concatenate(valid, axis=1),
  )
