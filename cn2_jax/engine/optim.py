"""Optimizers and learning-rate schedules (docs/training.md §1, detectron2 `solver/build.py` +
`lr_scheduler.py`; docs/onestage.md §5.1-§5.2: Adam / RangerLars, WarmupCosineAnnealingLR,
schedules in epochs).

Recipe (CenterNet2_R50_1x): SGD, momentum 0.9 (no Nesterov), base lr 0.02, weight decay 1e-4 on every
trainable parameter (conv/FC weights, biases, the CenterNet `Scale` scalars) except GroupNorm
parameters (`WEIGHT_DECAY_NORM = 0`), element-wise gradient *value* clipping to [-1, 1] before the SGD
step, `WarmupMultiStepLR` (linear warm-up over 4000 iterations from factor 0.00025, x0.1 at 60k and
80k, 90k iterations). Frozen parameters (ResNet stem + res2 with FREEZE_AT=2) are not in detectron2's
optimizer at all: here they get exactly zero updates and carry no optimizer state.

Optimizers (`optim.optimizer`). For every one of them: frozen parameters get zero updates and no
state, parameters with `no_decay_fn(path)` (GroupNorm) use `weight_decay_norm` instead of
`weight_decay`, the element-wise value clip (`clip_value`) is applied to each gradient first and the
global-norm clip (`clip_norm`) before that. `lr = lr(step)` is the schedule below, `t = step + 1`.
With `skip_loss_factor` > 0 (centerX SKIP_LOSS), `skip_loss` comes before everything: the
gradients of an iteration are zeroed when its total loss >= factor x the last accepted one.

* "sgd" (default; torch SGD as detectron2 drives it):

      g   = clip(grad, -clip_value, clip_value)          # d2 CLIP_TYPE="value" (before the step)
      d   = g + wd * p                                   # torch SGD adds weight decay to the gradient
      buf = momentum * buf + d                           # torch: first step buf = d (buf starts at 0)
      p   = p - lr * buf                                 # lr applied after momentum (no rescaling)

* "adam" (torch.optim.Adam, centerX OPTIM_NAME "Adam"; L2 weight decay *coupled* to the gradient):

      g = g + wd * p;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
      p = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

* "adamw" (torch.optim.AdamW): the same step without the L2 term, then decoupled decay
  `p = p - lr * wd * p` (applied to the pre-step p, as torch).

* "rangerlars" (centerX OPTIM_NAME "RangerLars" = `torchtools.optim.RangerLars` of
  pabloppp/pytorch-tools, the revision `pip install git+...pytorch-tools` installs, whose optim code
  is unchanged since 2019-11: Lookahead(alpha, k) around Ralamb). One Ralamb step, per tensor:

      m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2             # no weight decay in g
      N = N_max - 2 t b2^t / (1 - b2^t),  N_max = 2 / (1 - b2) - 1
      if N >= radam_threshold (5):  s = sqrt((1 - b2^t) (N - 4)/(N_max - 4) (N - 2)/N
                                            N_max/(N_max - 2)) / (1 - b1^t);  u = m / (sqrt(v) + eps)
      else:                         s = 1 / (1 - b1^t);                       u = m
      p' = p (1 - lr wd)                                          # decoupled decay, first
      trust = min(||p'||, lars_clip) / ||p' - lr s u||            # 1 when either norm is 0
      p = p' - lr s trust u

  (The description "‖w‖/‖update‖ clipped to [0, 10], weight decay added to the update" fits an
  older revision of ralamb.py, docs/onestage.md §5.2; the code centerX installed clamps ‖w‖ to
  [0, 10] and divides by the norm of the would-be new weights, as above.) Lookahead (timm-style,
  `torchtools/optim/lookahead.py`): after every `lookahead_k`-th step the slow copy moves
  `slow += alpha (p - slow)` and p is set to it; the slow copy is created lazily at the first sync
  as a copy of p, so the first sync (step k) changes nothing and the first interpolation happens at
  step 2k. Here the slow weights live in the optimizer state and the sync is emitted as an update
  `slow - p`.

The scalar coefficients (1 - b^t, N) are computed in float32 in a cancellation-free form, matching
torch's double-precision Python scalars to ~1e-7 (optax's `scale_by_adam` computes `1 - b2**t` from
a float32 b2, which is 1e-5 off at b2 = 0.999; hence the own Adam core).

LR schedules (`optim.schedule`), see `make_lr_schedule`: "multistep" (detectron2
WarmupMultiStepLR), "cosine" (detectron2 WarmupCosineLR), "warmup_cosine_annealing" (centerX
WarmupCosineAnnealingLR: linear warm-up, constant lr until `int(max_iter * cosine_decay_iter)`, then
a cosine down to `min_lr` at max_iter). `step` is the number of updates already applied (0 for the
first update), as detectron2's scheduler: the first iteration uses lr = base_lr * warmup_factor.

Schedules in epochs (`optim.epochs > 0`, centerX `auto_scale_hyperparams`, docs/onestage.md §5.1):
`epochs` replaces `max_iter`, and `steps` and `warmup_iters` are read in epochs too;
`resolve_schedule` (used by the train loop, which gets the number of training images from the app)
converts them with `iters_per_epoch = num_train_images // batch_size` and, as centerX, sets
`warmup_factor = 1 / warmup_iters` (see `iterations_from_epochs`). `make_lr_schedule` refuses an
unresolved config.

Config fields read (`config.optim`; the schema in cn2_jax/config.py holds every default): optimizer
('sgd' | 'adam' | 'adamw' | 'rangerlars'), base_lr, reference_batch_size, momentum (sgd),
betas, eps (adam, adamw, rangerlars), lookahead_alpha, lookahead_k, lars_clip, radam_threshold
(rangerlars), weight_decay, weight_decay_norm, warmup_iters, warmup_factor, steps, gamma, max_iter,
epochs, schedule ('multistep' | 'cosine' | 'warmup_cosine_annealing'), cosine_decay_iter, min_lr,
clip_value (<= 0 disables), clip_norm (global L2 norm; <= 0 disables).

Linear LR scaling (`effective_base_lr`): `base_lr` is the LR for a global batch of
`reference_batch_size` images (16 = the official 8 GPUs x 2). When the training batch differs, the
LR used is `base_lr * batch_size / reference_batch_size` (Goyal et al.; detectron2
`DefaultTrainer.auto_scale_workers` with `REFERENCE_WORLD_SIZE`; the CenterNet2 author's advice
for one GPU, docs/training.md §2). `reference_batch_size = 0` disables scaling (base_lr is used as
written; `min_lr` is never scaled). Unlike detectron2, which also divides MAX_ITER, STEPS and
WARMUP_ITERS by the same factor (keeping the number of epochs), max_iter / steps / warmup_iters are
kept exactly as written: a small config's iteration counts are chosen for its run time, and silently
multiplying them by 4 at batch 4 would surprise more than it helps. To reproduce a batch-16 schedule
at a smaller batch, multiply them by reference_batch_size / batch_size yourself, or give the
schedule in epochs.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from cn2_jax import schema
from cn2_jax.errors import ConfigError
from cn2_jax.tree_paths import path_str

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


def _choice(cfg: Any, key: str, allowed: Sequence[str]) -> str:
  value = str(cfg[key])
  if value not in allowed:
    raise ValueError(f"optim.{key} must be one of {tuple(allowed)}, got {value!r}")
  return value


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


# ----------------------------------------------------------------------------------------------
# Schedules in epochs
# ----------------------------------------------------------------------------------------------
def _epochs_to_iters(value: float, iters_per_epoch: int) -> int:
  """ceil(value * iters_per_epoch), ignoring float noise (0.7 * 100 = 70.00000000000001 -> 70)."""
  x = float(value) * iters_per_epoch
  r = round(x)
  return int(r) if abs(x - r) < 1e-6 else int(math.ceil(x))


def iterations_from_epochs(cfg: Any, num_images: Optional[int], batch_size: int) -> dict:
  """The iteration-valued schedule fields of `cfg` (`config.optim`), as plain Python numbers.

  `optim.epochs == 0`: the fields as written, `{'iters_per_epoch': 0, 'max_iter', 'steps',
  'warmup_iters', 'warmup_factor'}` (`num_images` is not needed).

  `optim.epochs > 0` (centerX `CenterTrainer.auto_scale_hyperparams`, docs/onestage.md §5.1):
  `epochs`, `steps` and `warmup_iters` are numbers of epochs. With
  `iters_per_epoch = num_images // batch_size` (at least 1; `num_images` = the training images the
  loader draws from, i.e. after `data.filter_empty`; `batch_size` = the global batch):

      max_iter      = ceil(epochs * iters_per_epoch)
      steps[i]      = ceil(steps[i] * iters_per_epoch)
      warmup_iters  = warmup_iters * iters_per_epoch
      warmup_factor = 1 / warmup_iters   (centerX overrides WARMUP_FACTOR; kept when warmup_iters=0)

  (centerX multiplies whole numbers of epochs, where ceil changes nothing; fractional epochs round
  up.) E.g. 15000 images, batch 64, epochs 80, steps (50, 62), warmup 1 epoch: 234 it/epoch,
  max_iter 18720, steps (11700, 14508), warmup_iters 234, warmup_factor 1/234. The cosine points of
  'cosine' / 'warmup_cosine_annealing' are fractions of max_iter and need no conversion.
  """
  epochs = float(cfg.epochs)
  if epochs < 0:
    raise ValueError(f"optim.epochs must be >= 0 (0 = iterations as written), got {epochs}")
  if epochs == 0:
    return dict(
        iters_per_epoch=0,
        max_iter=int(cfg.max_iter),
        steps=tuple(int(step) for step in cfg.steps),
        warmup_iters=int(cfg.warmup_iters),
        warmup_factor=float(cfg.warmup_factor),
    )
  if num_images is None or int(num_images) <= 0:
    raise ValueError(
        f"optim.epochs={epochs:g} needs the number of training images to count iterations, "
        f"got {num_images!r}"
    )
  if int(batch_size) <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  iters_per_epoch = max(1, int(num_images) // int(batch_size))
  warmup_iters = int(cfg.warmup_iters) * iters_per_epoch
  return dict(
      iters_per_epoch=iters_per_epoch,
      max_iter=_epochs_to_iters(epochs, iters_per_epoch),
      steps=tuple(_epochs_to_iters(step, iters_per_epoch) for step in cfg.steps),
      warmup_iters=warmup_iters,
      warmup_factor=1.0 / warmup_iters if warmup_iters > 0 else float(cfg.warmup_factor),
  )


def resolve_schedule(cfg: Any, num_images: Optional[int], batch_size: int) -> Any:
  """`cfg` (`config.optim`) with the schedule in iterations: `cfg` itself when `epochs == 0`,
  else a copy with max_iter / steps / warmup_iters / warmup_factor from `iterations_from_epochs`
  and `epochs = 0`. `num_images` may be None when `epochs == 0`."""
  if float(cfg.epochs) == 0:
    return cfg
  in_iterations = iterations_from_epochs(cfg, num_images, batch_size)
  out = cfg.copy_and_resolve_references()
  out.max_iter = in_iterations["max_iter"]
  out.steps = in_iterations["steps"]
  out.warmup_iters = in_iterations["warmup_iters"]
  out.warmup_factor = in_iterations["warmup_factor"]
  out.epochs = 0.0
  return out


def schedule_summary(cfg: Any) -> str:
  """One log line of a resolved schedule, e.g. 'max_iter 18720, warmup 234, steps (11700,)'."""
  return (
      f"{cfg.schedule} schedule: max_iter {int(cfg.max_iter)}, warmup_iters "
      f"{int(cfg.warmup_iters)} (factor {float(cfg.warmup_factor):g}), steps "
      f"{tuple(int(step) for step in cfg.steps)}"
  )


# ----------------------------------------------------------------------------------------------
# LR schedule
# ----------------------------------------------------------------------------------------------
def make_lr_schedule(cfg: Any, batch_size: Optional[int] = None) -> optax.Schedule:
  """lr(step) for step = number of updates already applied (0-based iteration).

  `base_lr` below is `effective_base_lr(cfg, batch_size)` (scaled to the global batch).

  multistep (detectron2 WarmupMultiStepLR):
      lr = base_lr * warmup(step) * gamma ** bisect_right(steps, step)
  cosine (detectron2 WarmupCosineLR):
      lr = base_lr * warmup(step) * 0.5 * (1 + cos(pi * min(step, max_iter) / max_iter))
  warmup_cosine_annealing (centerX WarmupCosineAnnealingLR, delay = int(max_iter * cosine_decay_iter),
  which must be >= warmup_iters as centerX asserts):
      lr = base_lr * warmup(step)                                              for step <= delay
         = min_lr + (base_lr - min_lr) * (1 + cos(pi * (t - delay) / (max_iter - delay))) / 2
           with t = min(step, max_iter)                                        otherwise
  (centerX does not clamp t; the loop never goes past max_iter.)
  with the linear warm-up factor
      warmup(step) = warmup_factor * (1 - a) + a,  a = step / warmup_iters   for step < warmup_iters
                   = 1                                                     otherwise.
  (For cosine this is the legacy d2 product form; d2's newer WarmupParamScheduler ramps to 1 and only
  then applies the cosine, a difference of < 1 - cos(pi * warmup_iters / max_iter) / 2 relative.)

  Needs a schedule in iterations: a config with `optim.epochs > 0` raises ValueError (convert it
  with `resolve_schedule` first).
  """
  if float(cfg.epochs) != 0:
    raise ValueError(
        f"optim.epochs={float(cfg.epochs):g}: the schedule is in epochs; convert it with "
        "optim.resolve_schedule(cfg, num_train_images, batch_size) first"
    )
  base_lr = effective_base_lr(cfg, batch_size)
  warmup_iters = int(cfg.warmup_iters)
  warmup_factor = float(cfg.warmup_factor)
  kind = _choice(cfg, "schedule", LR_SCHEDULES)
  milestones = tuple(int(step) for step in cfg.steps)
  gamma = float(cfg.gamma)
  max_iter = int(cfg.max_iter)
  if list(milestones) != sorted(milestones):
    raise ValueError(f"optim.steps must be increasing, got {milestones}")
  if kind != "multistep" and max_iter <= 0:
    raise ValueError(f"the {kind} schedule needs optim.max_iter > 0")
  delay = 0
  min_lr = 0.0
  if kind == "warmup_cosine_annealing":
    delay = int(max_iter * float(cfg.cosine_decay_iter))  # as centerX's build_lr_scheduler
    min_lr = float(cfg.min_lr)
    if delay < warmup_iters:
      raise ValueError(
          f"warmup_cosine_annealing: the cosine starts at int(max_iter * cosine_decay_iter) = "
          f"{delay}, before the end of the warm-up (warmup_iters={warmup_iters})"
      )

  def warmup(step):
    if warmup_iters > 0:
      alpha = step / warmup_iters
      return jnp.where(step < warmup_iters, warmup_factor * (1.0 - alpha) + alpha, 1.0)
    return jnp.ones_like(step)

  def schedule(count):
    step = jnp.asarray(count).astype(jnp.float32)
    warm = warmup(step)
    if kind == "warmup_cosine_annealing":
      t = (jnp.minimum(step, max_iter) - delay) / max(max_iter - delay, 1)
      cos_lr = min_lr + (base_lr - min_lr) * (1.0 + jnp.cos(jnp.pi * t)) / 2.0
      return jnp.where(step <= delay, base_lr * warm, cos_lr)
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
  match = _TOWER_GN.search(path)
  return bool(match) and int(match.group(1)) % 3 == 1


def matches_prefix(path: str, prefix: str) -> bool:
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
    path = path_str(kp)
    if any(matches_prefix(path, prefix) for prefix in prefixes):
      return FROZEN
    return NO_DECAY if no_decay_fn(path) else DECAY

  return jax.tree_util.tree_map_with_path(label, params)


# ----------------------------------------------------------------------------------------------
# Optimizer building blocks (torch semantics; module docstring)
# ----------------------------------------------------------------------------------------------
def _one_minus_pow(b: float, t: jax.Array) -> jax.Array:
  """1 - b**t for float32 t, without the cancellation of `1 - b**t` in float32 (b near 1)."""
  if b == 0.0:
    return jnp.ones_like(t)
  return -jnp.expm1(t * math.log(b))


def _radam_n_sma(b2: float, t: jax.Array) -> jax.Array:
  """RAdam's N_sma = N_max - 2 t b2^t / (1 - b2^t), N_max = 2 / (1 - b2) - 1, in float32.

  The direct form subtracts two numbers of ~2/(1 - b2) (1999 at b2 = 0.999) to get ~t; here, with
  c = -log(b2) and y = c t, 2 t b2^t / (1 - b2^t) = (2 / c) * y / expm1(y), so
  N_sma = (N_max - 2 / c) + (2 / c) * (1 - y / expm1(y)), the constant computed in double precision
  and 1 - y / expm1(y) by its Bernoulli series for small y.
  """
  r = 1.0 - b2
  n_max = 2.0 / r - 1.0
  c = -math.log1p(-r)
  y = t * c
  small = y < 0.5
  ys = jnp.where(small, y, 0.0)
  ys2 = ys * ys
  series = ys / 2 - ys2 / 12 + ys2 * ys2 / 720 - ys2**3 / 30240 + ys2**4 / 1209600
  yl = jnp.where(small, 1.0, y)
  direct = 1.0 - yl / jnp.expm1(yl)
  return (n_max - 2.0 / c) + (2.0 / c) * jnp.where(small, series, direct)


class AdamState(NamedTuple):
  """Moments of the torch-style Adam / Ralamb steps."""

  count: jax.Array  # steps taken (int32)
  mu: Any
  nu: Any


def _init_moments(params) -> AdamState:
  zeros = lambda p: jnp.zeros_like(p)  # noqa: E731
  return AdamState(
      jnp.zeros([], jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params)
  )


def _moments(grads, state: AdamState, b1: float, b2: float):
  mu = optax.tree_utils.tree_update_moment(grads, state.mu, b1, 1)
  nu = optax.tree_utils.tree_update_moment_per_elem_norm(grads, state.nu, b2, 2)
  return mu, nu, optax.safe_int32_increment(state.count)


def _scale_by_torch_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
  """torch Adam's step direction before the lr: m / (1 - b1^t) / (sqrt(v) / sqrt(1 - b2^t) + eps).

  optax.scale_by_adam computes the same in exact arithmetic; this one keeps torch's
  double-precision bias corrections (see `_one_minus_pow`)."""

  def update(updates, state, params=None):
    del params
    mu, nu, count = _moments(updates, state, b1, b2)
    t = count.astype(jnp.float32)
    bc1, bc2_sqrt = _one_minus_pow(b1, t), jnp.sqrt(_one_minus_pow(b2, t))
    out = jax.tree.map(lambda m, v: (m / bc1) / (jnp.sqrt(v) / bc2_sqrt + eps), mu, nu)
    return out, AdamState(count, mu, nu)

  return optax.GradientTransformation(_init_moments, update)


def _ralamb(
    schedule: optax.Schedule,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    threshold: float,
    max_weight_norm: float,
) -> optax.GradientTransformation:
  """pytorch-tools `Ralamb.step` (RAdam + decoupled decay + LARS-like trust ratio), lr included.

  Emits `new_p - p` (module docstring has the step); needs `params`."""
  n_max = 2.0 / (1.0 - b2) - 1.0

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("rangerlars needs the params in update()")
    mu, nu, count = _moments(updates, state, b1, b2)
    lr = schedule(state.count)
    t = count.astype(jnp.float32)
    n_sma = _radam_n_sma(b2, t)
    rectify = n_sma >= threshold
    bc1, bc2 = _one_minus_pow(b1, t), _one_minus_pow(b2, t)
    ratio = bc2 * (n_sma - 4) / (n_max - 4) * (n_sma - 2) / n_sma * n_max / (n_max - 2)
    step_size = jnp.where(rectify, jnp.sqrt(jnp.maximum(ratio, 0.0)), 1.0) / bc1

    def leaf(m, v, p):
      u = jnp.where(rectify, m / (jnp.sqrt(v) + eps), m)
      p_dec = p + (-weight_decay * lr) * p if weight_decay != 0 else p
      radam_norm = jnp.sqrt(jnp.sum(jnp.square(p_dec - (step_size * lr) * u)))
      weight_norm = jnp.clip(jnp.sqrt(jnp.sum(jnp.square(p_dec))), 0.0, max_weight_norm)
      bad = (weight_norm == 0) | (radam_norm == 0)
      trust = jnp.where(bad, 1.0, weight_norm / jnp.where(bad, 1.0, radam_norm))
      new_p = p_dec - (step_size * lr * trust) * u
      return (new_p - p).astype(p.dtype)

    return jax.tree.map(leaf, mu, nu, params), AdamState(count, mu, nu)

  return optax.GradientTransformation(_init_moments, update)


class LookaheadState(NamedTuple):
  """`count` steps taken, the `slow` weights (meaningful from the first sync on), inner state."""

  count: jax.Array
  slow: Any
  inner_state: Any


def _lookahead(inner: optax.GradientTransformation, alpha: float, k: int):
  """Lookahead(alpha, k) of pytorch-tools / timm on a plain params pytree (no LookaheadParams).

  After the inner update, every k-th step: slow = fast (first sync: the lazily created slow copy)
  or slow + alpha * (fast - slow) (later syncs), and the emitted update moves the params to slow.
  optax.lookahead keeps (fast, slow) params and interpolates from the initial weights already at
  step k, hence this wrapper."""

  def init(params):
    return LookaheadState(
        jnp.zeros([], jnp.int32), jax.tree.map(jnp.array, params), inner.init(params)
    )

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("lookahead needs the params in update()")
    inner_updates, inner_state = inner.update(updates, state.inner_state, params)
    count = optax.safe_int32_increment(state.count)
    sync = count % k == 0
    first = count == k

    def new_slow(u, s, p):
      fast = (p + u).astype(p.dtype)
      return jnp.where(first, fast, s + alpha * (fast - s)).astype(s.dtype)

    target = jax.tree.map(new_slow, inner_updates, state.slow, params)
    upd = jax.tree.map(
        lambda u, n, p: jnp.where(sync, n - p, u).astype(u.dtype), inner_updates, target, params
    )
    slow = jax.tree.map(lambda n, s: jnp.where(sync, n, s), target, state.slow)
    return upd, LookaheadState(count, slow, inner_state)

  return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------
def validate_frozen_prefixes(params: Any, frozen_prefixes: Iterable[str]) -> None:
  """ValueError if a prefix matches no leaf of `params` (arrays or ShapeDtypeStructs)."""
  paths = [path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for prefix in frozen_prefixes:
    if not any(matches_prefix(path, prefix) for path in paths):
      raise ValueError(
          f"frozen prefix {prefix!r} matches no parameter (paths look like {paths[:3]}...)"
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


def _group_optimizer(
    cfg: Any, name: str, weight_decay: float, schedule: optax.Schedule
) -> optax.GradientTransformation:
  """One parameter group's transformation (value clip first), module docstring formulas."""
  if name == "sgd":
    return _sgd(cfg, weight_decay, schedule)
  clip_value = float(cfg.clip_value)
  clip = [optax.clip(clip_value)] if clip_value > 0 else []
  b1, b2 = (float(b) for b in cfg.betas)
  eps = float(cfg.eps)
  decay = [optax.add_decayed_weights(weight_decay)] if weight_decay > 0 else []
  adam = _scale_by_torch_adam(b1, b2, eps)
  lr = optax.scale_by_learning_rate(schedule)
  if name == "adam":  # L2: wd * p joins the gradient before the moments
    return optax.chain(*clip, *decay, adam, lr)
  if name == "adamw":  # decoupled: -lr * (adam + wd * p)
    return optax.chain(*clip, adam, *decay, lr)
  ralamb = _ralamb(
      schedule, b1, b2, eps, weight_decay, float(cfg.radam_threshold), float(cfg.lars_clip)
  )
  return _lookahead(optax.chain(*clip, ralamb), float(cfg.lookahead_alpha), int(cfg.lookahead_k))


class SkipLossState(NamedTuple):
  history: jax.Array  # the last accepted total loss (float32 scalar)


SKIP_LOSS_INITIAL = 10e8  # centerX's `history_loss = 10e8`


def skip_loss(factor: float) -> optax.GradientTransformationExtraArgs:
  """centerX's "skip loss" (`engine/defaults.py run_step`, docs/onestage.md §3.7): an iteration
  whose total loss `value` (an extra argument of `update`) is >= `factor` x the last accepted total
  gets zero gradients and leaves the history as it is; otherwise its gradients pass and it becomes
  the history (initially 10e8). The later transformations still run on the zero gradients, so
  momentum and weight decay act (centerX still calls `optimizer.step()`). centerX decides per GPU on
  its own loss; the train step passes the device-mean total, so every device decides the same
  (identical on one device)."""
  factor = float(factor)

  def init(params):
    del params
    return SkipLossState(jnp.asarray(SKIP_LOSS_INITIAL, jnp.float32))

  def update(updates, state, params=None, *, value=None, **extra):
    del params, extra
    if value is None:
      raise ValueError("skip_loss needs the total loss: tx.update(..., value=total_loss)")
    value = jnp.asarray(value, jnp.float32)
    accept = state.history * factor > value
    updates = jax.tree.map(lambda g: jnp.where(accept, g, jnp.zeros_like(g)), updates)
    return updates, SkipLossState(jnp.where(accept, value, state.history))

  return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(
    cfg: Any,
    params: Optional[Any] = None,
    frozen_prefixes: Sequence[str] = (),
    no_decay_fn: Callable[[str], bool] = is_norm_param,
    batch_size: Optional[int] = None,
    schedule: Optional[optax.Schedule] = None,
) -> optax.GradientTransformation:
  """[skip loss] -> [global-norm clip] -> per group: value clip -> `optim.optimizer` step with the group's weight
  decay -> -lr(step); frozen -> zero (module docstring).

  `params` (optional) is only used to validate `frozen_prefixes`: a prefix that matches no
  parameter raises ValueError (catches typos that would silently train frozen layers). The labels
  themselves are computed from whatever params `init`/`update` receive. `batch_size` (global)
  scales the LR, see `effective_base_lr`; the optimizer state does not depend on it. The schedule
  must be in iterations (`resolve_schedule`). `schedule` (optional) replaces
  `make_lr_schedule(cfg, batch_size)` (e.g. the SWA phase of `cn2_jax.engine.swa.swa_schedule`).
  """
  frozen_prefixes = tuple(frozen_prefixes)
  if params is not None:
    validate_frozen_prefixes(params, frozen_prefixes)
  name = _choice(cfg, "optimizer", OPTIMIZERS)
  schedule = make_lr_schedule(cfg, batch_size) if schedule is None else schedule
  weight_decay = float(cfg.weight_decay)
  weight_decay_norm = float(cfg.weight_decay_norm)
  transforms = {
      DECAY: _group_optimizer(cfg, name, weight_decay, schedule),
      NO_DECAY: _group_optimizer(cfg, name, weight_decay_norm, schedule),
      FROZEN: optax.set_to_zero(),
  }
  labels = lambda tree: param_labels(tree, frozen_prefixes, no_decay_fn)
  opt = optax.multi_transform(transforms, labels)
  clip_norm = float(cfg.clip_norm)
  if clip_norm > 0:
    # MMDetection's grad_clip=dict(max_norm=35): one global L2 norm over every gradient (frozen
    # ones are zero), before the per-group steps. Not detectron2's per-parameter "norm" type.
    opt = optax.chain(optax.clip_by_global_norm(clip_norm), opt)
  if float(cfg.skip_loss_factor) > 0:
    opt = optax.chain(skip_loss(float(cfg.skip_loss_factor)), opt)
  return opt


# `optim.optimizer` / `optim.schedule` values (implemented below).
OPTIMIZERS = ("sgd", "adam", "adamw", "rangerlars")
LR_SCHEDULES = ("multistep", "cosine", "warmup_cosine_annealing")


def _validate_optim(cfg) -> None:
  """ConfigError naming the first bad `optim` value."""
  optim = cfg.optim
  for key, allowed in (("optimizer", OPTIMIZERS), ("schedule", LR_SCHEDULES)):
    if optim[key] not in allowed:
      raise ConfigError(f"optim.{key} must be one of {allowed}, got {optim[key]!r}")
  betas = tuple(optim.betas)
  if len(betas) != 2 or not all(0.0 <= float(beta) < 1.0 for beta in betas):
    raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {betas}")
  checks = (
      ("eps", optim.eps >= 0, ">= 0"),
      ("lookahead_alpha", 0.0 <= optim.lookahead_alpha <= 1.0, "in [0, 1]"),
      ("lookahead_k", optim.lookahead_k >= 1, ">= 1"),
      ("lars_clip", optim.lars_clip > 0, "> 0"),
      ("epochs", optim.epochs >= 0, ">= 0 (0 = iterations as written)"),
      ("cosine_decay_iter", 0.0 <= optim.cosine_decay_iter <= 1.0, "in [0, 1]"),
      ("min_lr", optim.min_lr >= 0, ">= 0"),
      ("skip_loss_factor", optim.skip_loss_factor >= 0, ">= 0 (0 = off)"),
  )
  for key, ok, want in checks:
    if not ok:
      raise ConfigError(f"optim.{key} must be {want}, got {optim[key]!r}")


CONFIG = schema.group(
    "optim",
    "Optimizer, learning-rate schedule and gradient clipping (docs/training.md §1).",
    schema.Field("base_lr", 0.02, "LR for a global batch of reference_batch_size images"),
    schema.Field(
        "reference_batch_size",
        16,
        "the official batch (8 GPUs x 2): base_lr scales linearly to the global batch, lr = "
        "base_lr * batch / reference_batch_size (detectron2 REFERENCE_WORLD_SIZE; iterations are "
        "NOT rescaled); 0 = off",
    ),
    schema.Field(
        "optimizer",
        "sgd",
        "'sgd' | 'adam' (torch Adam, L2 decay coupled) | 'adamw' | 'rangerlars' (centerX)",
    ),
    schema.Field("momentum", 0.9, "sgd"),
    schema.Field("betas", (0.9, 0.999), "adam / adamw / rangerlars (torch defaults)"),
    schema.Field("eps", 1e-8, "adam / adamw / rangerlars"),
    schema.Field(
        "lookahead_alpha", 0.5, "rangerlars: Lookahead slow-weight step (pytorch-tools RangerLars)"
    ),
    schema.Field("lookahead_k", 6, "rangerlars: Lookahead sync period (steps)"),
    schema.Field(
        "lars_clip",
        10.0,
        "rangerlars: the weight norm in the trust ratio is clamped to [0, lars_clip]",
    ),
    schema.Field("radam_threshold", 5.0, "rangerlars: RAdam rectifies when N_sma >= this"),
    schema.Field("weight_decay", 1e-4, "WEIGHT_DECAY"),
    schema.Field("weight_decay_norm", 0.0, "WEIGHT_DECAY_NORM: decay of normalisation parameters"),
    schema.Field("warmup_iters", 4000, "linear warmup length (in epochs when epochs > 0)"),
    schema.Field(
        "warmup_factor", 0.00025, "LR factor at step 0; epochs > 0: replaced by 1 / warmup_iters"
    ),
    schema.Field("steps", (60000, 80000), "multistep decay points (in epochs when epochs > 0)"),
    schema.Field("gamma", 0.1, "multistep decay factor"),
    schema.Field("max_iter", 90000, "training iterations (ignored when epochs > 0)"),
    schema.Field(
        "epochs",
        0.0,
        "> 0: the schedule is in epochs (centerX): max_iter = epochs * iters_per_epoch, with "
        "iters_per_epoch = training images // the global batch (engine/optim.py "
        "iterations_from_epochs)",
    ),
    schema.Field("schedule", "multistep", "'multistep' | 'cosine' | 'warmup_cosine_annealing'"),
    schema.Field(
        "cosine_decay_iter", 0.7, "warmup_cosine_annealing: cosine from int(max_iter * this) on"
    ),
    schema.Field("min_lr", 1e-8, "warmup_cosine_annealing: lr at max_iter (not batch-scaled)"),
    schema.Field("clip_value", 1.0, "element-wise gradient value clip (d2 CLIP_TYPE=value)"),
    schema.Field("clip_norm", 0.0, "> 0: clip the global gradient L2 norm (MMDet: 35); 0 = off"),
    schema.Field(
        "skip_loss_factor",
        0.0,
        "centerX LOSS.SKIP_LOSS / SKIP_WEIGHT (docs/onestage.md §3.7): > 0 zeroes the gradients "
        "of an iteration whose total loss is >= this x the last accepted total (the optimizer "
        "still steps: momentum and weight decay act); 0 = off",
    ),
    validate=_validate_optim,
)
