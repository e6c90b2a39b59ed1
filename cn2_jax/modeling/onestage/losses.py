"""centerX losses (`modeling/losses/det_loss.py`; docs/onestage.md §3.3-§3.5).

* `modified_focal_loss(pred, gt)`: CornerNet's variant with alpha = 2, beta = 4 on the
  **sigmoided** heatmap. centerX clamps p to >= 1e-12 only (`clamp=(1e-12, None)`, default);
  CN clamps the sigmoid to [1e-4, 1 - 1e-4] (`clamp=(1e-4, 1 - 1e-4)`). Positives are pixels
  with gt == 1 exactly (peaks, not objects); N_pos counts them over the whole array given (the
  per-device batch, as centerX's per-GPU loss). N_pos = 0 gives -sum(neg term).
  The masks are applied with `where` rather than centerX's multiplication: equal values where
  centerX is finite, but a positive pixel predicted at exactly 1.0 (log(1 - p) = -inf times a
  zero weight) no longer turns the loss or its gradient into NaN.
  `ignore_unlabel=True` is centerX's `ignore_unlabel_focal_loss` (docs/onestage.md §4.5): every
  (image, class) channel whose GT heatmap sums to 0 contributes no negative terms (positives
  unchanged), so a dataset labelled only for some classes does not teach "background" on the others.
  (It also ignores the negatives of a fully labelled image's absent classes, as centerX does.)
  `ignore` (the targets' `hm_ignore`, docs/onestage.md §3.8): the pixels where it is 1 contribute
  no negative term (ignore regions; positives unchanged). None (or all zeros) = centerX.
* `mse_heatmap_loss(pred, gt, ignore)`: centerX `LOSS.MSE` (`det_loss.mse_loss`,
  `torch.nn.MSELoss()(pred, gt)`): the mean over every element of (p - gt)^2 on the sigmoided
  heatmap (no clamp). With `ignore`, the ignored elements are left out of the sum and of the count
  (the mean over the others; the same value when nothing is ignored).
* `reg_l1_loss(pred_map, index, mask, target)`: gather the prediction at `index`,
  sum |pred m / n - tgt m / n| / (sum(m) + 1e-4), m broadcast to both channels (so the
  denominator is 2 N_obj). `norm_wh` selects n: "" (1), "centerx" (the official code:
  `torch.sum(target, dim=1, keepdim=True) / 2 + 1e-4` over the *object* axis, i.e. per image and
  per channel, half the sum of all targets' w (resp. h)), or "per_object" ((w + h) / 2 + 1e-4 per
  object, the option's stated intent: docs/onestage.md §3.4).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

NORM_WH_MODES = ("", "centerx", "per_object")
COMMUNISM_KINDS = ("cls", "wh", "off")
CENTERX_CLAMP = (1e-12, None)
CENTERNET_CLAMP = (1e-4, 1.0 - 1e-4)


def modified_focal_loss(
    pred: jax.Array,
    gt: jax.Array,
    clamp: Tuple[Optional[float], Optional[float]] = CENTERX_CLAMP,
    ignore_unlabel: bool = False,
    ignore: Optional[jax.Array] = None,
) -> Tuple[jax.Array, jax.Array]:
  """Args:
    pred: sigmoided heatmap, any shape (e.g. `[B, H, W, C]`).
    gt: target heatmap of the same shape (peaks exactly 1).
    clamp: (lo, hi) applied to pred (None = no bound).
    ignore_unlabel: drop the negatives of all-zero GT channels (`gt` must be `[B, H, W, C]`).
    ignore: same shape as `gt`, nonzero = no negative term there (ignore regions); None = none.
  Returns:
    (loss, num_pos): float32 scalars.
  """
  f = jnp.promote_types(pred.dtype, jnp.float32)  # float64 only for an x64 reference
  p = pred.astype(f)
  gt = gt.astype(f)
  lo, hi = clamp
  if lo is not None:
    p = jnp.maximum(p, jnp.asarray(lo, f))
  if hi is not None:
    p = jnp.minimum(p, jnp.asarray(hi, f))
  pos = gt == 1.0
  neg = gt < 1.0
  if ignore_unlabel:
    if gt.ndim != 4:
      raise ValueError(f"ignore_unlabel needs a [B, H, W, C] heatmap, got shape {gt.shape}")
    neg = neg & (gt.sum(axis=(1, 2), keepdims=True) != 0)
  if ignore is not None:
    neg = neg & (ignore == 0)
  # Feed each log only the pixels whose term is used (a 0.5 elsewhere keeps it finite, so the
  # masked-out branch has a finite, zero-weighted gradient).
  p_pos = jnp.where(pos, p, 0.5)
  p_neg = jnp.where(neg, p, 0.5)
  pos_term = jnp.where(pos, jnp.log(p_pos) * jnp.square(1 - p_pos), 0.0)
  neg_w = jnp.square(jnp.square(1 - gt))
  neg_term = jnp.where(neg, jnp.log(1 - p_neg) * jnp.square(p_neg) * neg_w, 0.0)
  num_pos = pos.astype(f).sum()
  pos_sum = pos_term.sum()
  neg_sum = neg_term.sum()
  loss = jnp.where(num_pos > 0, -(pos_sum + neg_sum) / jnp.maximum(num_pos, 1.0), -neg_sum)
  return loss, num_pos


def mse_heatmap_loss(
    pred: jax.Array, gt: jax.Array, ignore: Optional[jax.Array] = None
) -> jax.Array:
  """centerX `mse_loss`: mean of (pred - gt)^2 over the elements not ignored (module docstring).

  Args:
    pred: sigmoided heatmap, any shape; gt: target of the same shape.
    ignore: same shape, nonzero = left out; None = none.
  Returns:
    float32 scalar.
  """
  f = jnp.promote_types(pred.dtype, jnp.float32)
  sq = jnp.square(pred.astype(f) - gt.astype(f))
  if ignore is None:
    return sq.mean()
  keep = (ignore == 0).astype(f)
  return (sq * keep).sum() / jnp.maximum(keep.sum(), 1.0)


def gather_feature(fmap: jax.Array, index: jax.Array) -> jax.Array:
  """`fmap [B, H, W, D]`, `index [B, T]` (y * W + x) -> `[B, T, D]` (indices clipped into
  range; centerX would fail on an out-of-range index)."""
  b, h, w, d = fmap.shape
  flat = fmap.reshape(b, h * w, d)
  idx = jnp.clip(index.astype(jnp.int32), 0, h * w - 1)
  return jnp.take_along_axis(flat, idx[:, :, None], axis=1)


def reg_l1_loss(
    pred_map: jax.Array, index: jax.Array, mask: jax.Array, target: jax.Array, norm_wh: str = ""
) -> jax.Array:
  """Args:
    pred_map: `[B, H, W, 2]` head output.
    index: `[B, T]` int flat indices; mask: `[B, T]` float (reg_mask); target: `[B, T, 2]`.
    norm_wh: "", "centerx" or "per_object" (module docstring).
  Returns:
    float32 scalar.
  """
  if norm_wh not in NORM_WH_MODES:
    raise ValueError(f"norm_wh must be one of {NORM_WH_MODES}, got {norm_wh!r}")
  f = jnp.promote_types(pred_map.dtype, jnp.float32)
  pred = gather_feature(pred_map.astype(f), index)
  m = jnp.broadcast_to(mask.astype(f)[:, :, None], pred.shape)
  tgt = target.astype(f)
  if norm_wh == "centerx":
    n = tgt.sum(axis=1, keepdims=True) / 2.0 + 1e-4  # [B, 1, 2]
  elif norm_wh == "per_object":
    n = tgt.sum(axis=2, keepdims=True) / 2.0 + 1e-4  # [B, T, 1]
  else:
    n = None
  a, t = pred * m, tgt * m
  if n is not None:
    a, t = a / n, t / n
  return jnp.abs(a - t).sum() / (m.sum() + 1e-4)


def communism_kind(name: str) -> Optional[str]:
  """Which communism target a loss term takes: centerX tests 'cls', then 'wh', then 'off' in the
  name; this project's KD offset terms are called `loss_kd_reg_t{i}` (centerX `kd_off_loss{i}`),
  so 'reg' counts as 'off'. None: the term is left as it is."""
  for kind in COMMUNISM_KINDS:
    if kind in name:
      return kind
  return "off" if "reg" in name else None


def communism(losses: Mapping[str, jax.Array], targets: Sequence[float]) -> Dict[str, jax.Array]:
  """centerX's "communism loss" (`engine/defaults.py run_step`, docs/onestage.md §3.6): each cls /
  wh / off term L becomes `target * L / stop_gradient(L)` (`targets` = (cls, wh, off), centerX
  defaults 1.5 / 0.3 / 0.1), so its value is pinned to the target and its gradient is `target * grad
  log L`; every static weight on it, KD weights included, cancels. Keys starting with 'aux/' pass
  through; the unscaled values are added as `aux/raw_{name}` (the progress a user wants to see). A
  term equal to 0 (e.g. wh with no object) stays 0, where centerX's 0 / 0 would give NaN."""
  tgt = dict(zip(COMMUNISM_KINDS, (float(t) for t in targets)))
  out = {}
  for name, value in losses.items():
    kind = None if name.startswith("aux/") else communism_kind(name)
    if kind is None:
      out[name] = value
      continue
    v = jnp.asarray(value, jnp.float32)
    d = jax.lax.stop_gradient(v)
    out[name] = jnp.where(d != 0, tgt[kind] * v / jnp.where(d != 0, d, 1.0), 0.0 * v)
    out[f"aux/raw_{name}"] = d
  return out
