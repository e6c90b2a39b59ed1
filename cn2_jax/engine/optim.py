"""Optimizer and learning-rate schedule (spec §7, detectron2 `solver/build.py` + `lr_scheduler.py`).

Recipe (CenterNet2_R50_1x): SGD, momentum 0.9 (no Nesterov), base lr 0.02, weight decay 1e-4 on every
trainable parameter (conv/FC weights, biases, the CenterNet `Scale` scalars) except GroupNorm
parameters (`WEIGHT_DECAY_NORM = 0`), element-wise gradient *value* clipping to [-1, 1] before the SGD
step, `WarmupMultiStepLR` (linear warm-up over 4000 iterations from factor 0.00025, x0.1 at 60k and
80k, 90k iterations). Frozen parameters (ResNet stem + res2 with FREEZE_AT=2) are not in detectron2's
optimizer at all: here they get exactly zero updates and carry no optimizer state.

The update for one trainable leaf, matching torch SGD as detectron2 drives it, is

    g   = clip(grad, -clip_value, clip_value)          # d2 CLIP_TYPE="value" (before the step)
    d   = g + wd * p                                   # torch SGD adds weight decay to the gradient
    buf = momentum * buf + d                           # torch: first step buf = d (buf starts at 0)
    p   = p - lr(step) * buf                           # lr applied after momentum (no rescaling)

with `step` the number of updates already applied (0 for the first update), as detectron2's
scheduler: the first iteration uses lr = base_lr * warmup_factor.

Config fields read (`config.optim`; the schema in cn2_jax/config.py holds every default): base_lr,
reference_batch_size, momentum, weight_decay, weight_decay_norm, warmup_iters, warmup_factor,
steps, gamma, max_iter, schedule ('multistep' | 'cosine'), clip_value (<= 0 disables), clip_norm
(global L2 norm; <= 0 disables).

Linear LR scaling (`effective_base_lr`): `base_lr` is the LR for a global batch of
`reference_batch_size` images (16 = the official 8 GPUs x 2). When the training batch differs, the
LR used is `base_lr * batch_size / reference_batch_size` (Goyal et al.; detectron2
`DefaultTrainer.auto_scale_workers` with `REFERENCE_WORLD_SIZE`; the CenterNet2 author's advice
for 1-GPU runs, spec §8.12-8.13). `reference_batch_size = 0` disables scaling (base_lr is used as
written). Unlike detectron2, which also divides MAX_ITER, STEPS and WARMUP_ITERS by the same
factor (keeping the number of epochs), max_iter / steps / warmup_iters are kept exactly as
written: a small config's iteration counts are chosen for its run time, and silently multiplying
them by 4 at batch 4 would surprise more than it helps. To reproduce a batch-16 schedule at a
smaller batch, multiply them by reference_batch_size / batch_size yourself.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

# Labels produced by `param_labels`.
DECAY = "decay"  # weight_decay
NO_DECAY = "no_decay"  # weight_decay_norm (GroupNorm scale/bias)
FROZEN = "frozen"  # zero update, no optimizer state


def _reference_batch(cfg: Any) -> int:
  ref = cfg.reference_batch_size or 0
  if int(ref) != ref or ref < 0:
    raise ValueError(
        f"optim.reference_batch_size must be a non-negative integer (0 = no LR "
        f"scaling), got {ref!r}"
    )
  return int(ref)


def effective_base_lr(cfg: Any, batch_size: Optional[int] = None) -> float:
  """`base_lr * batch_size / reference_batch_size` (linear scaling rule, module docstring).

  Unscaled when `batch_size` is None or `reference_batch_size` is 0 / absent.
  """
  base_lr = float(cfg.base_lr)
  ref = _reference_batch(cfg)
  if batch_size is None or ref == 0:
    return base_lr
  if int(batch_size) <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  return base_lr * int(batch_size) / ref


def lr_scaling_message(cfg: Any, batch_size: Optional[int] = None) -> str:
  """One log line, e.g. 'lr 0.02 × batch 4/16 = 0.005'."""
  base_lr = float(cfg.base_lr)
  ref = _reference_batch(cfg)
  if batch_size is None:
    return f"lr {base_lr:g} (batch size unknown: not scaled)"
  if ref == 0:
    return f"lr {base_lr:g} at batch {batch_size} (optim.reference_batch_size=0: not scaled)"
  return f"lr {base_lr:g} × batch {batch_size}/{ref} = {effective_base_lr(cfg, batch_size):g}"


def make_lr_schedule(cfg: Any, batch_size: Optional[int] = None) -> optax.Schedule:
  """lr(step) for step = number of updates already applied (0-based iteration).

  `base_lr` below is `effective_base_lr(cfg, batch_size)` (scaled to the global batch).

  multistep (detectron2 WarmupMultiStepLR):
      lr = base_lr * warmup(step) * gamma ** bisect_right(steps, step)
  cosine (detectron2 WarmupCosineLR):
      lr = base_lr * warmup(step) * 0.5 * (1 + cos(pi * min(step, max_iter) / max_iter))
  with the linear warm-up factor
      warmup(step) = warmup_factor * (1 - a) + a,  a = step / warmup_iters   for step < warmup_iters
                   = 1                                                     otherwise.
  (For cosine this is the legacy d2 product form; d2's newer WarmupParamScheduler ramps to 1 and only
  then applies the cosine, a difference of < 1 - cos(pi * warmup_iters / max_iter) / 2 relative.)
  """
  base_lr = effective_base_lr(cfg, batch_size)
  warmup_iters = int(cfg.warmup_iters)
  warmup_factor = float(cfg.warmup_factor)
  kind = str(cfg.schedule)
  milestones = tuple(int(s) for s in cfg.steps)
  gamma = float(cfg.gamma)
  max_iter = int(cfg.max_iter)
  if kind not in ("multistep", "cosine"):
    raise ValueError(f"solver.schedule must be 'multistep' or 'cosine', got {kind!r}")
  if list(milestones) != sorted(milestones):
    raise ValueError(f"solver.steps must be increasing, got {milestones}")
  if kind == "cosine" and max_iter <= 0:
    raise ValueError("cosine schedule needs solver.max_iter > 0")

  def schedule(count):
    step = jnp.asarray(count).astype(jnp.float32)
    if warmup_iters > 0:
      alpha = step / warmup_iters
      warm = jnp.where(step < warmup_iters, warmup_factor * (1.0 - alpha) + alpha, 1.0)
    else:
      warm = jnp.ones_like(step)
    if kind == "multistep":
      n = sum((step >= m).astype(jnp.float32) for m in milestones) if milestones else 0.0
      body = jnp.power(jnp.float32(gamma), n)
    else:
      t = jnp.minimum(step, max_iter) / max_iter
      body = 0.5 * (1.0 + jnp.cos(jnp.pi * t))
    return base_lr * warm * body

  return schedule


# ----------------------------------------------------------------------------------------------
# Parameter groups
# ----------------------------------------------------------------------------------------------
def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_str(key_path) -> str:
  """'.'-joined variable path (the detectron2 state-dict key convention of docs/DESIGN.md)."""
  return ".".join(_key_name(k) for k in key_path)


# A tower built as nn.Sequential([conv, GN, ReLU] * n) has its GroupNorms at indices 1, 4, 7, 10, ...
_TOWER_GN = re.compile(r"(?:^|\.)(?:bbox|cls|share)_tower\.(\d+)\.(?:scale|bias)$")
_NAMED_NORM = re.compile(r"(?:^|\.)norm\.(?:scale|bias)$")


def is_norm_param(path: str) -> bool:
  """True for GroupNorm parameters (weight decay `weight_decay_norm`), decided by module path.

  Rule (on the '.'-joined path inside the `params` collection; nesting vs dotted names is irrelevant):
    * the leaf is `scale` or `bias`, and
    * its module is either named `norm` (the `norm` sub-module of `layers.Conv2d(norm="GN")`; a
      FrozenBN `norm` lives in the `frozen` collection, never in `params`), or is `<x>_tower.<i>` with
      x in {bbox, cls, share} and i % 3 == 1 (GroupNorm slots of the CenterNet towers
      `[conv, GN, ReLU] * n`: `bbox_tower.1/4/7/10`).
  Not norm params: conv/linear `kernel`/`bias` (e.g. `bbox_tower.0.bias`), the CenterNet per-level
  `Scale` scalars (`scales.<l>.scale`, decayed as in detectron2).
  """
  if _NAMED_NORM.search(path):
    return True
  m = _TOWER_GN.search(path)
  return bool(m) and int(m.group(1)) % 3 == 1


def _matches_prefix(path: str, prefix: str) -> bool:
  prefix = prefix.replace("/", ".")
  if prefix.endswith("."):
    return path.startswith(prefix)
  return path == prefix or path.startswith(prefix + ".")


def param_labels(
    params: Any,
    frozen_prefixes: Iterable[str] = (),
    no_decay_fn: Callable[[str], bool] = is_norm_param,
) -> Any:
  """Pytree (same structure as `params`) of labels FROZEN / NO_DECAY / DECAY.

  A leaf is FROZEN when its '.'-joined path equals a prefix or starts with `prefix + '.'` (a
  prefix given with a trailing '.' is matched as a plain string prefix), e.g.
  `backbone.bottom_up.res2` freezes `backbone.bottom_up.res2.0.conv1.kernel` but not `res20`.
  Otherwise NO_DECAY when `no_decay_fn(path)` (GroupNorm params by default), else DECAY.
  """
  prefixes = tuple(frozen_prefixes)

  def label(kp, _):
    p = path_str(kp)
    if any(_matches_prefix(p, f) for f in prefixes):
      return FROZEN
    return NO_DECAY if no_decay_fn(p) else DECAY

  return jax.tree_util.tree_map_with_path(label, params)


# ----------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------
def validate_frozen_prefixes(params: Any, frozen_prefixes: Iterable[str]) -> None:
  """ValueError if a prefix matches no leaf of `params` (arrays or ShapeDtypeStructs)."""
  paths = [path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for f in frozen_prefixes:
    if not any(_matches_prefix(p, f) for p in paths):
      raise ValueError(
          f"frozen prefix {f!r} matches no parameter " f"(paths look like {paths[:3]}...)"
      )


def _sgd(cfg: Any, weight_decay: float, schedule: optax.Schedule) -> optax.GradientTransformation:
  parts = []
  clip_value = float(cfg.clip_value)
  if clip_value > 0:
    parts.append(optax.clip(clip_value))
  if weight_decay > 0:
    parts.append(optax.add_decayed_weights(weight_decay))
  momentum = float(cfg.momentum)
  if momentum > 0:
    parts.append(optax.trace(decay=momentum, nesterov=False))
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts)


def make_optimizer(
    cfg: Any,
    params: Optional[Any] = None,
    frozen_prefixes: Sequence[str] = (),
    no_decay_fn: Callable[[str], bool] = is_norm_param,
    batch_size: Optional[int] = None,
) -> optax.GradientTransformation:
  """clip-by-value -> weight decay (per group) -> SGD momentum -> -lr(step); frozen -> zero.

  `params` (optional) is only used to validate `frozen_prefixes`: a prefix that matches no
  parameter raises ValueError (catches typos that would silently train frozen layers). The labels
  themselves are computed from whatever params `init`/`update` receive. `batch_size` (global)
  scales the LR, see `effective_base_lr`; the optimizer state does not depend on it.
  """
  frozen_prefixes = tuple(frozen_prefixes)
  if params is not None:
    validate_frozen_prefixes(params, frozen_prefixes)
  schedule = make_lr_schedule(cfg, batch_size)
  wd = float(cfg.weight_decay)
  wd_norm = float(cfg.weight_decay_norm)
  transforms = {
      DECAY: _sgd(cfg, wd, schedule),
      NO_DECAY: _sgd(cfg, wd_norm, schedule),
      FROZEN: optax.set_to_zero(),
  }
  labels = lambda p: param_labels(p, frozen_prefixes, no_decay_fn)
  opt = optax.multi_transform(transforms, labels)
  clip_norm = float(cfg.clip_norm)
  if clip_norm > 0:
    # MMDetection's grad_clip=dict(max_norm=35): one global L2 norm over every gradient (frozen
    # ones are zero), before the per-group steps. Not detectron2's per-parameter "norm" type.
    opt = optax.chain(optax.clip_by_global_norm(clip_norm), opt)
  return opt
