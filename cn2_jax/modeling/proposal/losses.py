"""CenterNet first-stage losses (docs/centernet2.md §3.4-§3.6).

* Binary heatmap focal loss (official `binary_heatmap_focal_loss`), with the positive index list
  replaced by dense per-location counts (duplicates included; docs/centernet2.md §3.7).
* ltrb GIoU loss (official `IOULoss('giou')`): +1 smoothing in the IoU, no epsilon in the
  enclosing area, computed on stride-normalised ltrb.

Everything is computed in float32 regardless of the input dtype (official "FP16 compatibility"
commit e0bca13).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import jax
import jax.numpy as jnp

from cn2_jax.modeling import data_parallel

f32 = jnp.float32


def _pow(x: jax.Array, e: float) -> jax.Array:
  """x ** e; integer exponents via repeated multiplication (torch special-cases 2)."""
  if float(e).is_integer() and 0 <= e <= 16:
    return jax.lax.integer_pow(x, int(e))
  return jnp.power(x, jnp.asarray(e, x.dtype))


def ltrb_giou_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Official CenterNet `IOULoss('giou')` per element: `[..., 4]` ltrb -> `[...]` float32.

  area_t = (l_t + r_t)(t_t + b_t), area_p likewise; I = [min l + min r][min t + min b];
  U = area_t + area_p - I; IoU = (I + 1)/(U + 1); C = [max l + max r][max t + max b];
  loss = 1 - (IoU - (C - U)/C). C must be > 0 (true when the target is strictly positive).
  """
  pred = pred.astype(f32)
  target = target.astype(f32)
  pl, pt, pr, pb = pred[..., 0], pred[..., 1], pred[..., 2], pred[..., 3]
  tl, tt, tr, tb = target[..., 0], target[..., 1], target[..., 2], target[..., 3]
  target_area = (tl + tr) * (tt + tb)
  pred_area = (pl + pr) * (pt + pb)
  w_inter = jnp.minimum(pl, tl) + jnp.minimum(pr, tr)
  h_inter = jnp.minimum(pb, tb) + jnp.minimum(pt, tt)
  g_w = jnp.maximum(pl, tl) + jnp.maximum(pr, tr)
  g_h = jnp.maximum(pb, tb) + jnp.maximum(pt, tt)
  enclose = g_w * g_h
  inter = w_inter * h_inter
  union = target_area + pred_area - inter
  ious = (inter + 1.0) / (union + 1.0)
  gious = ious - (enclose - union) / enclose
  return 1.0 - gious


def loss_normalisers(
    pos_count: jax.Array, reg_valid: jax.Array, axis_name: Optional[str] = None
) -> tuple[jax.Array, jax.Array]:
  """(N̄, R̄) of `centernet_losses` from `[B, L]` pos_count / reg_valid, no gradient.

  N̄ = max(mean_devices(Σ pos_count), 1) counts the positives of the whole batch (one normaliser
  for all images, duplicates included); R̄ = max(mean_devices(#reg_valid), 1).
  """
  num_pos = jax.lax.stop_gradient(jnp.sum(pos_count.astype(f32)))
  num_reg = jax.lax.stop_gradient(jnp.sum(reg_valid.astype(f32)))
  return (
      jnp.maximum(data_parallel.device_mean(num_pos, axis_name), 1.0),
      jnp.maximum(data_parallel.device_mean(num_reg, axis_name), 1.0),
  )


def centernet_losses(
    hm_logits: jax.Array,
    reg_pred: jax.Array,
    targets: Mapping[str, jax.Array],
    *,
    alpha: float,
    beta: float,
    gamma: float,
    sigmoid_clamp: float,
    ignore_high_fp: float,
    pos_weight: float,
    neg_weight: float,
    reg_weight: float,
    axis_name: Optional[str] = None,
    location_mask: Optional[jax.Array] = None,
) -> Dict[str, jax.Array]:
  """CenterNet2 first-stage losses.

  The weights and focal parameters are required: `CenterNet` passes `config.model.centernet`
  (focal_alpha, focal_beta, loss_gamma, sigmoid_clamp, ignore_high_fp, pos/neg/reg_weight).

  Args:
    hm_logits: `[B, L]` objectness logits (all levels, level-major per image).
    reg_pred: `[B, L, 4]` head regression (relu(scale * bbox_pred)), stride units.
    targets: batched `centernet_targets` output: heatmap `[B, L]`, pos_count `[B, L]`,
      reg_target `[B, L, 4]`, reg_valid `[B, L]`.
    axis_name: if set, the normalisers are averaged over this mapped axis (jax.lax.pmean),
      i.e. the official all-reduce sum / num_gpus.
    location_mask: optional `[B, L]` bool; the negative sum runs over these locations only (the
      official canvas; positives and regression locations lie inside the images anyway).

  Returns:
    loss_centernet_agn_pos = pos_weight * alpha * (-Σ c_m log p_m (1-p_m)^γ) / N̄
    loss_centernet_agn_neg = neg_weight * (1-alpha) * (-Σ_m log(1-p_m) p_m^γ (1-hm_m)^β [p_m<thr]) / N̄
    loss_centernet_loc     = reg_weight * Σ_{reg_valid} giou_loss / R̄
    with N̄ = max(mean_devices(Σ pos_count), 1), R̄ = max(mean_devices(Σ reg_valid), 1).
  """
  logits = hm_logits.astype(f32)
  hm = targets["heatmap"].astype(f32)
  counts = targets["pos_count"].astype(f32)
  reg_valid = targets["reg_valid"].astype(bool)
  reg_target = targets["reg_target"].astype(f32)

  p = jnp.clip(jax.nn.sigmoid(logits), sigmoid_clamp, 1.0 - sigmoid_clamp)
  neg_weights = _pow(1.0 - hm, beta)
  pos_term = jnp.log(p) * _pow(1.0 - p, gamma)
  neg_term = jnp.log(1.0 - p) * _pow(p, gamma) * neg_weights
  if ignore_high_fp > 0:
    neg_term = jnp.where(p < ignore_high_fp, neg_term, jnp.zeros((), f32))
  if location_mask is not None:
    neg_term = jnp.where(location_mask, neg_term, jnp.zeros((), f32))
  pos_loss = -jnp.sum(counts * pos_term)
  neg_loss = -jnp.sum(neg_term)
  if alpha >= 0:
    pos_loss = alpha * pos_loss
    neg_loss = (1.0 - alpha) * neg_loss

  num_pos_avg, reg_norm = loss_normalisers(counts, reg_valid, axis_name)

  # Invalid locations get a harmless stand-in (ltrb of ones) so neither the value nor the gradient
  # of the masked-out GIoU can be NaN; they are then excluded with `where`.
  safe_t = jnp.where(reg_valid[..., None], reg_target, jnp.ones((), f32))
  safe_p = jnp.where(reg_valid[..., None], reg_pred.astype(f32), jnp.ones((), f32))
  giou = ltrb_giou_loss(safe_p, safe_t)
  reg_sum = jnp.sum(jnp.where(reg_valid, giou, jnp.zeros((), f32)))

  return dict(
      loss_centernet_agn_pos=pos_weight * pos_loss / num_pos_avg,
      loss_centernet_agn_neg=neg_weight * neg_loss / num_pos_avg,
      loss_centernet_loc=reg_weight * reg_sum / reg_norm,
  )
