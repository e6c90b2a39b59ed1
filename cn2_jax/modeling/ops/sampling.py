"""Fixed-count foreground/background sampling: static-shape detectron2 `subsample_labels`.

detectron2 (`modeling/sampling.py`): positives = fg among valid, negatives = bg among valid;
num_pos = min(int(num_samples * positive_fraction), #pos),
num_neg = min(num_samples - num_pos, #neg); each drawn uniformly without replacement (`randperm`),
returned as [positives; negatives]. Here the output always has `num_samples` slots; unused slots
are padding (`sample_valid` False, index 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def subsample_labels(
    key: jax.Array, is_fg: jax.Array, valid: jax.Array, num_samples: int, positive_fraction: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Samples up to `num_samples` indices (one image; vmap for a batch, one key per image).

  Args:
    key: PRNG key.
    is_fg: `[N]` bool foreground flag.
    valid: `[N]` bool, which entries may be sampled at all.
    num_samples: static number of output slots (detectron2 BATCH_SIZE_PER_IMAGE).
    positive_fraction: static; the positive cap is int(num_samples * positive_fraction).
  Returns:
    indices: `[num_samples]` int32 indices into the N inputs: first the sampled positives (in random
      order), then the sampled negatives (random order), then padding (index 0).
    sample_valid: `[num_samples]` bool, False for padding slots.
    sample_is_fg: `[num_samples]` bool, True exactly for the positive slots.
  """
  n = is_fg.shape[0]
  valid = jnp.asarray(valid).astype(bool)
  is_fg = jnp.asarray(is_fg).astype(bool)
  pos = is_fg & valid
  neg = ~is_fg & valid
  max_pos = int(num_samples * positive_fraction)
  num_pos = jnp.minimum(max_pos, jnp.sum(pos, dtype=jnp.int32))
  num_neg = jnp.minimum(num_samples - num_pos, jnp.sum(neg, dtype=jnp.int32))
  slot = jnp.arange(num_samples, dtype=jnp.int32)
  if n == 0:
    zeros = jnp.zeros((num_samples,), jnp.int32)
    return zeros, jnp.zeros((num_samples,), bool), jnp.zeros((num_samples,), bool)

  # One uniform random order of all N entries; the positives (negatives) taken in that order form a
  # uniform random ordering of the positives (negatives), independent of each other. top_k on
  # "earlier in the random order" (unique keys, no ties) picks the first k of each class.
  perm = jax.random.permutation(key, n).astype(jnp.int32)
  k = min(num_samples, n)
  rank_key = n - jnp.arange(n, dtype=jnp.int32)  # > 0, larger = earlier in perm

  def first_k(mask):
    _, where = jax.lax.top_k(jnp.where(mask[perm], rank_key, 0), k)
    idx = perm[where]
    if k < num_samples:
      idx = jnp.concatenate([idx, jnp.zeros((num_samples - k,), jnp.int32)])
    return idx

  pos_idx = first_k(pos)
  neg_idx = first_k(neg)
  is_pos_slot = slot < num_pos
  is_neg_slot = (slot >= num_pos) & (slot < num_pos + num_neg)
  neg_take = neg_idx[jnp.clip(slot - num_pos, 0, num_samples - 1)]
  indices = jnp.where(is_pos_slot, pos_idx, jnp.where(is_neg_slot, neg_take, 0))
  return indices.astype(jnp.int32), is_pos_slot | is_neg_slot, is_pos_slot
