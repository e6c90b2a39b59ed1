"""Losses of the official one-stage CenterNet (class heatmaps, ONLY_PROPOSAL False).

Official: `centernet/modeling/dense_heads/centernet.py`, `CenterNet.losses`, with
`layers/heatmap_focal_loss.py` (`heatmap_focal_loss`, `binary_heatmap_focal_loss`) and
`layers/iou_loss.py` (`IOULoss('giou')`, here `losses.ltrb_giou_loss`):

  p = clamp(sigmoid(logits), SIGMOID_CLAMP, 1 - SIGMOID_CLAMP)               [B, L, C]
  pos = -Σ_{positive entries e} log p[loc_e, cls_e] (1 - p[loc_e, cls_e])^γ   (duplicates counted)
  neg = -Σ_{loc, c} log(1 - p) p^γ (1 - hm)^β [p < IGNORE_HIGH_FP when > 0]
  (× α and × (1 - α) when HM_FOCAL_ALPHA >= 0)
  loss_centernet_pos = POS_WEIGHT * pos / N̄,  loss_centernet_neg = NEG_WEIGHT * neg / N̄
  loss_centernet_loc = REG_WEIGHT * Σ_{reg_valid} w giou(reg_pred, reg_target) / R̄
    w = 1 (NOT_NORM_REG True, the default) or the agnostic heatmap (max over classes),
  WITH_AGN_HM: loss_centernet_agn_pos / _neg = the same focal loss on the agnostic logits with the
    agnostic heatmap and the same positive locations (class ignored), weights and N̄.
  N̄ = max(Σ positive entries / devices, 1), R̄ = max(Σ w / devices, 1): sums over the whole
  batch and all devices (`jax.lax.pmean` over `axis_name`), no gradient.

Everything in float32 whatever the head's dtype. The positive term gathers the entries from the
clamped probabilities, so its gradient is the official one (clamped entries get none).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from cn2_jax.modeling import data_parallel
from cn2_jax.modeling.proposal.losses import _pow, ltrb_giou_loss

f32 = jnp.float32


def heatmap_focal_sums(
    logits: jax.Array,
    heatmap: jax.Array,
    pos_index: jax.Array,
    pos_label: jax.Array,
    pos_valid: jax.Array,
    *,
    alpha: float,
    beta: float,
    gamma: float,
    sigmoid_clamp: float,
    ignore_high_fp: float,
    location_mask: Optional[jax.Array] = None,
) -> Tuple[jax.Array, jax.Array]:
  """Official `heatmap_focal_loss` (reduction 'sum'): (pos, neg), both >= 0, float32.

  Args:
    logits / heatmap: `[B, L, C]` (C = 1: `binary_heatmap_focal_loss`).
    pos_index / pos_label / pos_valid: `[B, P]` positive entries (location in [0, L), class in
      [0, C), mask); invalid entries contribute nothing.
    location_mask: optional `[B, L]` bool: the negative sum runs over these locations only (the
      official canvas).
  """
  b, num_loc, c = logits.shape
  p = jnp.clip(jax.nn.sigmoid(logits.astype(f32)), sigmoid_clamp, 1.0 - sigmoid_clamp)
  neg = jnp.log(1.0 - p) * _pow(p, gamma) * _pow(1.0 - heatmap.astype(f32), beta)
  if ignore_high_fp > 0:
    neg = jnp.where(p < ignore_high_fp, neg, jnp.zeros((), f32))
  if location_mask is not None:
    neg = jnp.where(location_mask[..., None], neg, jnp.zeros((), f32))
  flat = jnp.clip(pos_index, 0, num_loc - 1) * c + jnp.clip(pos_label, 0, c - 1)
  pp = jnp.take_along_axis(p.reshape(b, num_loc * c), flat, axis=1)  # [B, P]
  pos = jnp.log(pp) * _pow(1.0 - pp, gamma)
  pos_loss = -jnp.sum(jnp.where(pos_valid, pos, jnp.zeros((), f32)))
  neg_loss = -jnp.sum(neg)
  if alpha >= 0:
    pos_loss = alpha * pos_loss
    neg_loss = (1.0 - alpha) * neg_loss
  return pos_loss, neg_loss


def onestage_loss_normalisers(
    targets: Mapping[str, jax.Array], not_norm_reg: bool, axis_name: Optional[str] = None
) -> Tuple[jax.Array, jax.Array]:
  """(N̄, R̄) of `onestage_losses`, no gradient (see the module docstring)."""
  num_pos = jnp.sum(targets["pos_valid"].astype(f32))
  reg_w = _reg_weights(targets, not_norm_reg)
  return (
      jnp.maximum(data_parallel.device_mean(jax.lax.stop_gradient(num_pos), axis_name), 1.0),
      jnp.maximum(data_parallel.device_mean(jax.lax.stop_gradient(jnp.sum(reg_w)), axis_name), 1.0),
  )


def _reg_weights(targets: Mapping[str, jax.Array], not_norm_reg: bool) -> jax.Array:
  """`[B, L]` regression weight, 0 off the regression locations."""
  reg_valid = targets["reg_valid"].astype(bool)
  w = jnp.ones(reg_valid.shape, f32) if not_norm_reg else targets["agn_heatmap"].astype(f32)
  return jnp.where(reg_valid, w, jnp.zeros((), f32))


def onestage_losses(
    cls_logits: jax.Array,
    reg_pred: jax.Array,
    targets: Mapping[str, jax.Array],
    *,
    agn_hm_logits: Optional[jax.Array] = None,
    alpha: float,
    beta: float,
    gamma: float,
    sigmoid_clamp: float,
    ignore_high_fp: float,
    pos_weight: float,
    neg_weight: float,
    reg_weight: float,
    not_norm_reg: bool,
    axis_name: Optional[str] = None,
    location_mask: Optional[jax.Array] = None,
) -> Dict[str, jax.Array]:
  """The official one-stage CenterNet losses (module docstring).

  Args:
    cls_logits: `[B, L, C]` class heatmap logits, all levels flattened level-major.
    reg_pred: `[B, L, 4]` relu(scale * bbox_pred), stride units.
    targets: batched `onestage_targets` output (heatmap `[B, L, C]`, agn_heatmap `[B, L]`,
      reg_target `[B, L, 4]`, reg_valid `[B, L]`, pos_index / pos_label / pos_valid `[B, P]`).
    agn_hm_logits: `[B, L]` agnostic heatmap logits (WITH_AGN_HM), else None.
    axis_name: the data axis; the normalisers are averaged over it (the official all-reduce sum
      / world size).
    location_mask: optional `[B, L]` bool: the official canvas (negatives only run over it).

  Returns loss_centernet_pos, loss_centernet_neg, loss_centernet_loc (and with agn_hm_logits
  loss_centernet_agn_pos, loss_centernet_agn_neg), float32 scalars.
  """
  focal = dict(
      alpha=alpha,
      beta=beta,
      gamma=gamma,
      sigmoid_clamp=sigmoid_clamp,
      ignore_high_fp=ignore_high_fp,
      location_mask=location_mask,
  )
  pos_index, pos_valid = targets["pos_index"], targets["pos_valid"].astype(bool)
  num_pos_avg, reg_norm = onestage_loss_normalisers(targets, not_norm_reg, axis_name)
  pos, neg = heatmap_focal_sums(
      cls_logits, targets["heatmap"], pos_index, targets["pos_label"], pos_valid, **focal
  )
  losses = dict(
      loss_centernet_pos=pos_weight * pos / num_pos_avg,
      loss_centernet_neg=neg_weight * neg / num_pos_avg,
  )

  reg_valid = targets["reg_valid"].astype(bool)
  # Off the regression locations a harmless stand-in (ltrb of ones) keeps the masked-out GIoU
  # and its gradient finite; `where` then drops it.
  safe_t = jnp.where(reg_valid[..., None], targets["reg_target"].astype(f32), jnp.ones((), f32))
  safe_p = jnp.where(reg_valid[..., None], reg_pred.astype(f32), jnp.ones((), f32))
  giou = ltrb_giou_loss(safe_p, safe_t) * _reg_weights(targets, not_norm_reg)
  reg_sum = jnp.sum(jnp.where(reg_valid, giou, jnp.zeros((), f32)))
  losses["loss_centernet_loc"] = reg_weight * reg_sum / reg_norm

  if agn_hm_logits is not None:
    agn_pos, agn_neg = heatmap_focal_sums(
        agn_hm_logits[..., None],
        targets["agn_heatmap"][..., None],
        pos_index,
        jnp.zeros_like(pos_index),
        pos_valid,
        **focal,
    )
    losses["loss_centernet_agn_pos"] = pos_weight * agn_pos / num_pos_avg
    losses["loss_centernet_agn_neg"] = neg_weight * agn_neg / num_pos_avg
  return losses
