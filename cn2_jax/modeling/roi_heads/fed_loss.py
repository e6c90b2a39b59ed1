"""LVIS federated loss and the classification losses of CenterNet2's `CustomFastRCNNOutputLayers`.

Follows the official `centernet/modeling/roi_heads/fed_loss.py` (`load_class_freq`,
`get_fed_loss_inds`) and `centernet/modeling/roi_heads/custom_fast_rcnn.py`
(`sigmoid_cross_entropy_loss`, `softmax_cross_entropy_loss`, the USE_SIGMOID_CE prior bias),
settings `MODEL.ROI_BOX_HEAD.*` of `centernet/config.py`:

  USE_SIGMOID_CE        False  (configs/LVIS_CenterNet2_R50_Fed_1x.yaml: True)
  PRIOR_PROB            0.01   (cls_score bias init when USE_SIGMOID_CE)
  USE_FED_LOSS          False  (LVIS_CenterNet2_R50_Fed_1x.yaml: True; LVIS_CenterNet2_R50_1x.yaml:
                                plain softmax CE, no fed loss)
  CAT_FREQ_PATH         'datasets/lvis/lvis_v1_train_cat_info.json'
  FED_LOSS_NUM_CAT      50
  FED_LOSS_FREQ_WEIGHT  0.5

Official semantics (what this module reproduces):

* `load_class_freq`: the categories sorted by `id`, `image_count ** FED_LOSS_FREQ_WEIGHT` in
  float32 (position i = the i-th smallest id = contiguous class i).
* `get_fed_loss_inds(gt_classes, 50, C, freq_weight)`: `appeared = unique(gt_classes)` over ALL
  proposals the call sees (every image on the GPU), background label C included when present.
  If `len(appeared) < 50`, it draws `50 - len(appeared)` more classes with
  `torch.multinomial(prob, n, replacement=False)`, prob = freq_weight with the appeared classes
  (and the background) set to 0. NOTE the background counts in `len(appeared)`: with background
  proposals in the batch (always, in practice) the loss covers 49 foreground classes, not 50.
  With `len(appeared) >= 50` nothing is sampled and only the appeared classes are used.
* sigmoid CE: `sum_{r, c < C} fed[c] * BCE(logit[r, c], onehot(gt[r])[c]) / B`, B = number of
  proposals; the background logit (column C) gets no loss; background rows have all-zero targets.
* softmax CE: `F.cross_entropy(logits, gt, weight=w, reduction='mean')` with
  `w = [fed mask over C, 1 for background]`, i.e. `sum_r w[gt_r] * ce_r / sum_r w[gt_r]`. Since
  the fed set always contains every class of `gt_classes` and the background weight is 1, every
  `w[gt_r]` is 1 and the weighted CE equals the plain mean CE (value and gradient): with softmax
  the federated loss is a no-op in the official code. It is reproduced anyway (general formula).

Sampling (the only deviation: torch.multinomial's random stream cannot be reproduced, so the
JAX sampler has the same DISTRIBUTION, deterministic per `rng`, with static shapes):

  Gumbel-top-k. With keys `g_i = log w_i + G_i`, G_i i.i.d. standard Gumbel, the indices of the
  k largest keys, in decreasing order, have exactly the law of k sequential draws without
  replacement with probabilities proportional to w (the Plackett-Luce law that torch.multinomial
  with replacement=False samples): P(argmax_i g_i = j) = w_j / sum_i w_i (the Gumbel-max trick),
  and conditioned on the argmax being j, the remaining keys are again independent Gumbels shifted
  by log w_i (the memoryless property of the exponential race exp(-g_i) ~ Exp(w_i)), so the next
  largest is distributed as a draw proportional to w over the rest, and so on. Zero-weight classes
  get key -inf and are never drawn. The number of draws `n = num_sample_cats - #appeared` is
  data-dependent, so the k = min(num_sample_cats, C) largest keys are taken with a static
  `lax.top_k` and the first n of them are kept: the output is a bool mask over the C classes.
  float32 Gumbels (uniforms on (tiny, 1)) truncate the key distribution's tails at probabilities
  around 1e-7, a bias far below anything measurable. Where fewer classes than n have a positive
  weight, all of them are taken (torch.multinomial raises there; with LVIS it cannot happen
  unless nearly every category has image_count 0).

How to call from `CascadeROIHeads._stage_losses` (cascade.py; the lead's to wire):

  freq_weight = load_class_freq(CAT_FREQ_PATH, FED_LOSS_FREQ_WEIGHT, num_classes)  # once, host
  ...
  # in _stage_losses(k, logits, deltas, boxes, valid, labels, matched), per stage k:
  fed_mask = None
  if use_fed_loss:
    key = jax.random.fold_in(self.make_rng("sampling"), k)   # its own draw per stage
    if self.axis_name:  # each device samples its own set, like each official GPU
      key = jax.random.fold_in(key, jax.lax.axis_index(self.axis_name))
    fed_mask = sample_fed_classes(key, labels, valid, jnp.asarray(freq_weight), fed_loss_num_cat)
  loss_fn = sigmoid_ce_loss if use_sigmoid_ce else softmax_ce_loss
  loss_cls = loss_fn(logits, labels, valid, fed_mask)

  * The mask is computed once PER STAGE, from that stage's `labels` / `valid` (`[B, R]`, after
    stage k's re-matching and the empty-box filter): the official computes it inside each stage
    predictor's `losses()` call, so every cascade stage samples its own classes, and stage k > 0's
    appeared set can differ (re-matched labels). Not once per step.
  * The appeared set is over every proposal of the per-device batch (all images), as the official
    per-GPU call. Under one jit over a global batch with no `axis_name`, it is the whole batch.
    Unlike the ROI sampling, the result depends on how the batch is split over devices (by design
    of the official loss).
  * `softmax_ce_loss(..., fed_mask=None)` equals `_stage_losses`' current softmax CE (sum over
    valid ROIs / max(#valid, 1)); the sigmoid CE uses the same normalisation (official B = number
    of proposals, i.e. the valid ones here; padded slots and empty boxes are not proposals).
  * With USE_SIGMOID_CE: init every `cls_score` bias (all C + 1) to `sigmoid_prior_bias(
    PRIOR_PROB)`, and inference uses `sigmoid(logits)` instead of softmax (official
    `predict_probs`) in `probabilistic_scores`; the background column is then unused.
  * The official LVIS Fed checkpoints carry a `roi_heads.box_predictor.{k}.freq_weight` buffer
    (registered with `register_buffer`), which a strict conversion must map or drop.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np


def load_class_freq(
    path: Union[str, Path], freq_weight: float, num_classes: Optional[int] = None
) -> np.ndarray:
  """`[C]` float32 `image_count ** freq_weight` of an LVIS-style cat_info JSON, sorted by id.

  The file is a JSON list of `{"id": int, "image_count": int, ...}` (official
  `lvis_v1_train_cat_info.json`, made by `tools/get_lvis_cat_info.py`). `num_classes`, when
  given, must equal the number of categories. Raises FileNotFoundError / ValueError with a
  one-line message on a missing file, a corrupt one or a count mismatch.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(
        f"fed loss: category-frequency file {path} not found (ROI_BOX_HEAD.CAT_FREQ_PATH)"
    )
  try:
    cat_info = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"fed loss: {path} is not valid JSON: {e}") from None
  if not isinstance(cat_info, list) or not cat_info:
    raise ValueError(f"fed loss: {path} must hold a non-empty JSON list of categories")
  ids, counts = [], []
  for i, c in enumerate(cat_info):
    if not (
        isinstance(c, dict)
        and type(c.get("id")) is int
        and isinstance(c.get("image_count"), (int, float))
        and not isinstance(c.get("image_count"), bool)
        and c["image_count"] >= 0
    ):
      raise ValueError(
          f"fed loss: {path} entry {i} needs an int 'id' and a non-negative 'image_count', "
          f"got {str(c)[:80]}"
      )
    ids.append(c["id"])
    counts.append(c["image_count"])
  if len(set(ids)) != len(ids):
    raise ValueError(f"fed loss: {path} has duplicate category ids")
  if num_classes is not None and len(ids) != num_classes:
    raise ValueError(
        f"fed loss: {path} has {len(ids)} categories but the model has {num_classes} classes"
    )
  order = np.argsort(np.asarray(ids), kind="stable")
  # torch: int64 tensor .float() -> float32, then `** freq_weight` in float32 (for 0.5 a sqrt that
  # torch's vectorised CPU kernel rounds within 1 ulp, not always to nearest); here the correctly
  # rounded float32 result: at most 1 ulp from torch's.
  counts = np.asarray(counts, dtype=np.float64)[order].astype(np.float32)
  if freq_weight == 0.5:
    return np.sqrt(counts)
  return (counts.astype(np.float64) ** float(freq_weight)).astype(np.float32)


def appeared_classes(gt_classes: jax.Array, gt_valid: jax.Array, num_classes: int) -> jax.Array:
  """`[C + 1]` bool: which labels (background = C) occur among the valid entries (torch.unique)."""
  labels = jnp.where(gt_valid, gt_classes, num_classes + 1).reshape(-1)  # out of range -> dropped
  return jnp.zeros(num_classes + 1, bool).at[labels].set(True, mode="drop")


def sample_fed_classes(
    rng: jax.Array,
    gt_classes: jax.Array,
    gt_valid: jax.Array,
    freq_weight: jax.Array,
    num_sample_cats: int,
) -> jax.Array:
  """`[C]` bool mask of the classes the federated loss covers (official `get_fed_loss_inds`).

  Args:
    rng: PRNG key; the mask is a deterministic function of it and the inputs.
    gt_classes: int labels of the proposals, any shape (`[B, R]`: the whole per-device batch),
      in [0, C], background = C.
    gt_valid: bool, same shape; invalid entries (padding, dropped boxes) do not count.
    freq_weight: `[C]` float sampling weights (`load_class_freq`).
    num_sample_cats: FED_LOSS_NUM_CAT (50).
  Returns:
    the appeared foreground classes, plus, when the appeared labels (background included) number
    fewer than `num_sample_cats`, `num_sample_cats - #appeared` classes drawn without replacement
    proportionally to `freq_weight` among the others (Gumbel-top-k, see the module docstring).
  """
  num_classes = freq_weight.shape[0]
  appeared = appeared_classes(gt_classes, gt_valid, num_classes)
  num_more = jnp.maximum(num_sample_cats - appeared.sum(), 0)
  weight = jnp.where(appeared[:num_classes], 0.0, freq_weight.astype(jnp.float32))
  gumbel = jax.random.gumbel(rng, (num_classes,), jnp.float32)
  keys = jnp.where(weight > 0, jnp.log(jnp.where(weight > 0, weight, 1.0)) + gumbel, -jnp.inf)
  k = min(num_sample_cats, num_classes)
  top_keys, top_idx = jax.lax.top_k(keys, k)  # descending: the order of sequential draws
  take = (jnp.arange(k) < num_more) & jnp.isfinite(top_keys)
  sampled = jnp.zeros(num_classes, bool).at[top_idx].max(take)
  return appeared[:num_classes] | sampled


def _flatten(logits, gt_classes, valid):
  c1 = logits.shape[-1]
  return (
      logits.reshape(-1, c1).astype(jnp.float32),
      gt_classes.reshape(-1).astype(jnp.int32),
      valid.reshape(-1),
  )


def sigmoid_ce_loss(
    logits: jax.Array,
    gt_classes: jax.Array,
    valid: jax.Array,
    fed_mask: Optional[jax.Array] = None,
) -> jax.Array:
  """Official `sigmoid_cross_entropy_loss`: per-class BCE over the C foreground logits.

  Args:
    logits: `[..., C + 1]` class logits, background last (its column gets no loss).
    gt_classes: `[...]` labels in [0, C], background = C.
    valid: `[...]` bool; only valid rows are proposals (B = their number).
    fed_mask: `[C]` bool (`sample_fed_classes`) or None (all classes).
  Returns:
    float32 scalar `sum_{valid r, c} fed[c] * BCE(logits[r, c], onehot(gt_r)[c]) / max(B, 1)`
    (0 with no valid row, as the official empty case).
  """
  logits, gt_classes, valid = _flatten(logits, gt_classes, valid)
  num_classes = logits.shape[-1] - 1
  x = logits[:, :num_classes]
  target = (gt_classes[:, None] == jnp.arange(num_classes)[None, :]).astype(jnp.float32)
  # torch's binary_cross_entropy_with_logits: (1 - t) * x - log_sigmoid(x).
  bce = (1.0 - target) * x - jax.nn.log_sigmoid(x)
  weight = valid[:, None].astype(jnp.float32)
  if fed_mask is not None:
    weight = weight * fed_mask.astype(jnp.float32)[None, :]
  b = jnp.maximum(valid.sum().astype(jnp.float32), 1.0)
  return jnp.where(weight > 0, bce * weight, 0.0).sum() / b


def softmax_ce_loss(
    logits: jax.Array,
    gt_classes: jax.Array,
    valid: jax.Array,
    fed_mask: Optional[jax.Array] = None,
) -> jax.Array:
  """Official `softmax_cross_entropy_loss`: `F.cross_entropy(weight=w, reduction='mean')`.

  `w` = `[fed_mask (C), 1 (background)]`, or all ones without `fed_mask`; the loss is
  `sum_{valid r} w[gt_r] * ce_r / sum_{valid r} w[gt_r]` (0 when that sum is 0). Shapes as in
  `sigmoid_ce_loss`. Without `fed_mask` this is the mean over valid rows (cascade.py's CE).
  """
  if fed_mask is None:
    # The plain mean over valid rows, written as the cascade always computed it (unflattened),
    # so that runs without the federated loss stay bit-identical to before it existed.
    logp = jax.nn.log_softmax(logits, axis=-1)
    labels = jnp.clip(gt_classes, 0, logits.shape[-1] - 1)
    ce = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    return jnp.where(valid, ce, 0.0).sum() / jnp.maximum(valid.sum().astype(jnp.float32), 1.0)
  logits, gt_classes, valid = _flatten(logits, gt_classes, valid)
  num_classes = logits.shape[-1] - 1
  logp = jax.nn.log_softmax(logits, axis=-1)
  labels = jnp.clip(gt_classes, 0, num_classes)  # invalid rows may hold anything
  ce = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
  class_w = jnp.concatenate([fed_mask.astype(jnp.float32), jnp.ones((1,), jnp.float32)])
  w = jnp.where(valid, class_w[labels], 0.0)
  # The weights are 0 / 1, so max(sum, 1) is the sum whenever the numerator can be non-zero.
  return jnp.where(w > 0, w * ce, 0.0).sum() / jnp.maximum(w.sum(), 1.0)


def sigmoid_prior_bias(prior_prob: float) -> float:
  """USE_SIGMOID_CE's `cls_score` bias init, all C + 1 entries: `-log((1 - p) / p)`."""
  return -math.log((1 - prior_prob) / prior_prob)
