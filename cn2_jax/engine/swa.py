"""Weight averaging: an EMA of the parameters and SWA (stochastic weight averaging,
docs/onestage.md §5.3, done with the BatchNorm statistics recomputed). Both are off by default;
when off the train state, the checkpoints and the training are exactly as before
(`TrainState.ema == {}`, `TrainState.swa == {}`).

EMA (`config.ema`, on when `ema.decay > 0`). After every optimizer update (inside the jitted train
step, `make_post_update`):

    d_t = min(decay, (1 + t) / (10 + t))   if ema.warmup (timm ModelEmaV2 / TF
                                            ExponentialMovingAverage(num_updates=t))
    d_t = decay                            otherwise
    ema = d_t * ema + (1 - d_t) * params_new

with `t` = the number of updates applied before this one (`state.step` before the update: 0 for
the first, so `d_0 = 0.1`). The EMA starts as a copy of the initial (or pretrained) parameters.
BatchNorm running statistics (`batch_stats`, the one-stage family): `ema.batch_stats = "average"`
averages them with the same formula (timm: buffers are averaged too), `"copy"` takes the model's
current statistics. `TrainState.ema = {'params', 'batch_stats'}`; the checkpoint holds both the
raw and the EMA weights. With `ema.use_for_eval` the evaluation during / at the end of training,
`app.evaluate`, `--mode=predict` and `Predictor` use `{'params': ema.params, 'batch_stats':
ema.batch_stats}` (plus the raw `frozen` collection, which never changes) - see `eval_variables`
and `restore_ema_variables`.

SWA (`config.swa`, on when `swa.iters > 0`; `swa.iters` and `swa.period` are iterations, or
epochs when `optim.epochs > 0`, as centerX's SWA.ITER / SWA.PERIOD: `in_iterations` multiplies
them by the iterations per epoch). Training runs `optim.max_iter + swa.iters` updates. From update `max_iter`
(0-based) on, the LR of the base schedule is replaced (`swa_schedule`) by

    "constant": lr = swa.lr_start
    "cosine":   lr = eta_min + (lr_start - eta_min) * (1 + cos(pi * (t mod period) / period)) / 2,
                t = step - max_iter   (torch CosineAnnealingWarmRestarts(T_0=period, eta_min))

(`lr_start` / `eta_min` are used as written: not scaled by the batch size). The optimizer state
carries over. After every update that brings `state.step` to `max_iter + j * period` (j >= 1) the
parameters enter an equal-weight running mean (torchcontrib SWA):

    buf = buf + (params - buf) / (n + 1);  n = n + 1

`TrainState.swa = {'params': buf, 'n': int32}` is checkpointed, so a resume inside the SWA phase is
exact. At the last update (`state.step == max_iter + swa.iters`) `finalize` replaces the
parameters by `buf` (when n > 0) and RECOMPUTES the BatchNorm running statistics for them
(`recompute_batch_stats`), before the final checkpoint and the final evaluation.

BatchNorm recompute (`torch.optim.swa_utils.update_bn`, i.e. momentum=None): the model is applied
in train mode (no parameter update) to `swa.bn_batches` training batches (the loader's batches
`max_iter + swa.iters`, `+ 1`, ...: the same ones after a resume) and every BatchNorm layer's
running statistics become the arithmetic mean over those batches of its batch statistics: the
batch mean and the UNBIASED batch variance n/(n-1) * var (torch's running_var), where per-device
BN (no SyncBN) averages the per-device statistics over the devices as the train step does. The
layers run in train mode normalise with batch statistics, so one forward per batch gives every
layer's statistics for the averaged weights. Implemented with the model cloned with
`bn_momentum=0` (running = batch statistic) and a cumulative mean on the device.
`swa.bn_batches = 0` keeps the running statistics of the last training step. A family without
trainable BatchNorm (CenterNet2: FrozenBN / GN) has nothing to recompute.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import PartitionSpec as P

from cn2_jax import schema
from cn2_jax.engine.step import DATA_AXIS, _check_divisible, replicated
from cn2_jax.errors import ConfigError, InputFileError

log = logging.getLogger(__name__)

SWA_LR_SCHEDS = ("constant", "cosine")
EMA_BATCH_STATS = ("average", "copy")


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------
def ema_enabled(config) -> bool:
  return "ema" in config and float(config.ema.decay) > 0


def swa_enabled(config) -> bool:
  return "swa" in config and int(config.swa.iters) > 0


def in_iterations(config, iters_per_epoch: int):
  """`config` with `swa.iters` / `swa.period` in iterations: itself when `optim.epochs == 0` or SWA
  is off, else a copy with both multiplied by `iters_per_epoch` (centerX
  `auto_scale_hyperparams`: SWA.ITER and SWA.PERIOD are epochs, like the main schedule)."""
  if float(config.optim.epochs) <= 0 or not swa_enabled(config):
    return config
  ipe = int(iters_per_epoch)
  if ipe <= 0:
    raise ValueError(f"iters_per_epoch must be positive, got {iters_per_epoch}")
  out = config.copy_and_resolve_references()
  out.swa.iters = int(config.swa.iters) * ipe
  out.swa.period = int(config.swa.period) * ipe
  return out


def swa_iters(config) -> int:
  return int(config.swa.iters) if swa_enabled(config) else 0


def total_iters(config, max_iter: int) -> int:
  """The number of updates of the whole run: `max_iter + swa.iters`."""
  return int(max_iter) + swa_iters(config)


def use_ema_for_eval(config) -> bool:
  return ema_enabled(config) and bool(config.ema.use_for_eval)


# ----------------------------------------------------------------------------------------------
# Train state
# ----------------------------------------------------------------------------------------------
def _add_averages(state, ema: bool, swa: bool):
  repl = {}
  if ema:
    repl["ema"] = {
        "params": jax.tree.map(jnp.copy, state.params),
        "batch_stats": jax.tree.map(jnp.copy, state.batch_stats),
    }
  if swa:
    repl["swa"] = {
        "params": jax.tree.map(jnp.zeros_like, state.params),
        "n": jnp.zeros((), jnp.int32),
    }
  return state.replace(**repl)


def add_averages(config, state, mesh):
  """`state` with fresh `ema` (copy of the params) / `swa` (zero buffer, n=0) fields, replicated;
  unchanged when both are off."""
  ema, swa = ema_enabled(config), swa_enabled(config)
  if not (ema or swa):
    return state
  return jax.jit(lambda s: _add_averages(s, ema, swa), out_shardings=replicated(mesh))(state)


def abstract_with_averages(config, abstract, mesh):
  """The Orbax restore target of a state with the configured `ema` / `swa` fields."""
  ema, swa = ema_enabled(config), swa_enabled(config)
  if not (ema or swa):
    return abstract
  shapes = jax.eval_shape(lambda s: _add_averages(s, ema, swa), abstract)
  repl = replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), shapes)


def _partial_restore(item: str, target: dict) -> dict:
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  with ocp.PyTreeCheckpointer() as ckptr:
    return ckptr.restore(
        item,
        args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
    )


def restore_state(config, ckpt, abstract_base, step: int, mesh):
  """Restores checkpoint `step` into a state with the configured `ema` / `swa` fields.

  Compatibility: a checkpoint whose averages differ from the config's (written before these fields
  existed, with EMA / SWA off - e.g. SWA switched on to extend a finished run -, or with them on and
  resumed with them off) is restored field by field (Orbax partial restore): everything else
  exactly, the averages that the checkpoint has and the config wants, and fresh ones (EMA = the
  restored params, empty SWA mean) for the others."""
  target = abstract_with_averages(config, abstract_base, mesh)
  try:
    return ckpt.restore(target, step)
  except Exception as e:  # noqa: BLE001 - Orbax's tree-structure mismatch (ValueError et al.)
    first = e
  item = os.path.join(ckpt.directory, str(int(step)), "default")
  names = [field.name for field in dataclasses.fields(target)]
  base = {name: getattr(target, name) for name in names if name not in ("ema", "swa")}
  try:
    restored = _partial_restore(item, base)
  except Exception:  # noqa: BLE001 - not an averages mismatch: report the original error
    raise first from None
  state = type(target)(**restored, ema={}, swa={})
  fresh = add_averages(config, state, mesh)  # fresh averages for what the checkpoint lacks
  kept = {}
  for name in ("ema", "swa"):
    want = getattr(target, name)
    if not jax.tree.leaves(want):
      continue
    try:
      got = _partial_restore(item, {name: want})[name]
    except Exception:  # noqa: BLE001 - the checkpoint has no (matching) average of this kind
      got = None
    # (a subtree missing on disk comes back as the abstract target itself)
    if got is not None and all(isinstance(x, jax.Array) for x in jax.tree.leaves(got)):
      kept[name] = got
    else:
      log.warning("checkpoint %d has no %s state: starting it now", step, name.upper())
  return fresh.replace(**kept)


# ----------------------------------------------------------------------------------------------
# LR schedule
# ----------------------------------------------------------------------------------------------
def swa_schedule(base: Callable, config, max_iter: int) -> Callable:
  """`base` for steps < max_iter, the SWA LR (module docstring) from there on. `base` itself when
  SWA is off."""
  if not swa_enabled(config):
    return base
  swa_cfg = config.swa
  kind = str(swa_cfg.lr_sched)
  lr0, eta, period = float(swa_cfg.lr_start), float(swa_cfg.eta_min), int(swa_cfg.period)
  max_iter = int(max_iter)

  def schedule(count):
    step = jnp.asarray(count)
    t = jnp.maximum(step - max_iter, 0)
    if kind == "cosine":
      swa_lr = eta + (lr0 - eta) * 0.5 * (1 + jnp.cos(jnp.pi * (t % period) / period))
    else:
      swa_lr = jnp.full((), lr0, jnp.float32)
    return jnp.where(step < max_iter, jnp.asarray(base(count), jnp.float32), swa_lr)

  return schedule


# ----------------------------------------------------------------------------------------------
# In-step updates
# ----------------------------------------------------------------------------------------------
def ema_decay(decay: float, warmup: bool, t):
  """EMA decay used by the update after `t` earlier updates."""
  if not warmup:
    return jnp.float32(decay)
  t = jnp.asarray(t, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))


def ema_update(ema: dict, params, batch_stats, decay, copy_batch_stats: bool) -> dict:
  mix = lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype)  # noqa: E731
  out = {"params": jax.tree.map(mix, ema["params"], params)}
  if copy_batch_stats:
    out["batch_stats"] = jax.tree.map(jnp.copy, batch_stats)
  else:
    out["batch_stats"] = jax.tree.map(mix, ema["batch_stats"], batch_stats)
  return out


def swa_update(swa: dict, params, do) -> dict:
  """buf + (p - buf) / (n + 1) where `do`, unchanged elsewhere."""
  n = swa["n"]
  w = 1.0 / (n.astype(jnp.float32) + 1.0)
  buf = jax.tree.map(
      lambda b, p: jnp.where(do, b + (p - b) * w, b).astype(b.dtype), swa["params"], params
  )
  return {"params": buf, "n": n + jnp.asarray(do, jnp.int32)}


def make_post_update(config, max_iter: int) -> Optional[Callable]:
  """`new_state -> new_state` applied by the train step after the optimizer update (EMA, SWA
  running mean); None when both are off."""
  ema, swa = ema_enabled(config), swa_enabled(config)
  if not (ema or swa):
    return None
  if ema:
    decay, warmup = float(config.ema.decay), bool(config.ema.warmup)
    copy_bs = str(config.ema.batch_stats) == "copy"
  period, max_iter = (int(config.swa.period), int(max_iter)) if swa else (1, 0)

  def post_update(state):
    repl = {}
    if ema:
      d = ema_decay(decay, warmup, state.step - 1)
      repl["ema"] = ema_update(state.ema, state.params, state.batch_stats, d, copy_bs)
    if swa:
      t = state.step - max_iter
      repl["swa"] = swa_update(state.swa, state.params, (t > 0) & (t % period == 0))
    return state.replace(**repl)

  return post_update


# ----------------------------------------------------------------------------------------------
# End of SWA: swap in the average, recompute BatchNorm statistics
# ----------------------------------------------------------------------------------------------
def make_batch_stats_fn(model, mesh):
  """Jitted `(variables, batch, rng) -> batch_stats`: every BatchNorm layer's statistics of this
  batch (mean, unbiased variance; averaged over devices like the train step), model in train
  mode."""
  if not hasattr(model, "bn_momentum"):
    raise ValueError(
        f"{type(model).__name__} has trainable BatchNorm but no bn_momentum field: cannot "
        "recompute its statistics (swa.bn_batches=0 skips the recompute)"
    )
  model_d = model.clone(axis_name=DATA_AXIS, bn_momentum=0.0)
  n_dev = mesh.shape[DATA_AXIS]

  def per_device(variables, batch, rng):
    _, upd = model_d.apply(
        variables, batch, train=True, rngs={"sampling": rng}, mutable=["batch_stats"]
    )
    return jax.lax.pmean(upd["batch_stats"], DATA_AXIS)

  sharded = jax.shard_map(
      per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P()), out_specs=P(), check_vma=False
  )

  def fn(variables, batch, rng):
    _check_divisible(batch, n_dev, "recompute_batch_stats")
    return sharded(variables, batch, rng)

  return jax.jit(fn)


def recompute_batch_stats(
    model, mesh, variables: dict, batches: Iterator, num_batches: int, rng
) -> tuple[Any, int]:
  """torch `update_bn` (module docstring): the mean over `num_batches` batches of every BatchNorm
  layer's batch statistics for `variables`. Returns (batch_stats, number of batches used)."""
  stats_fn = make_batch_stats_fn(model, mesh)
  acc, used = None, 0
  for i in range(int(num_batches)):
    try:
      batch = next(batches)
    except StopIteration:
      log.warning("BatchNorm recompute: the loader ended after %d of %d batches", i, num_batches)
      break
    stats = stats_fn(variables, batch, jax.random.fold_in(rng, i))
    mean = lambda a, x: a + (x - a) / (used + 1.0)  # noqa: E731  (running mean)
    acc = stats if acc is None else jax.tree.map(mean, acc, stats)
    used += 1
  return (variables.get("batch_stats", {}) if acc is None else acc), used


def finalize(config, state, model, mesh, batches: Iterator):
  """End of SWA: params <- SWA average (when it has snapshots), BatchNorm statistics recomputed.
  `batches` yields device batches (sharded)."""
  num_snapshots = int(jax.device_get(state.swa["n"]))
  if num_snapshots == 0:
    log.warning("SWA: no snapshot was taken (swa.period > swa.iters?): parameters unchanged")
    return state
  state = jax.jit(
      lambda s: s.replace(params=jax.tree.map(jnp.copy, s.swa["params"])),
      out_shardings=replicated(mesh),
  )(state)
  num_bn_batches = int(config.swa.bn_batches)
  if jax.tree.leaves(state.batch_stats) and num_bn_batches > 0:
    rng = jax.random.fold_in(state.rng, np.int32(2**31 - 1))
    batch_stats, used = recompute_batch_stats(
        model, mesh, state.variables, batches, num_bn_batches, rng
    )
    state = state.replace(batch_stats=jax.device_put(batch_stats, replicated(mesh)))
    log.info(
        "SWA: averaged %d snapshots; BatchNorm statistics recomputed over %d batches",
        num_snapshots,
        used,
    )
  else:
    log.info("SWA: averaged %d snapshots", num_snapshots)
  return state


# ----------------------------------------------------------------------------------------------
# Eval / predict
# ----------------------------------------------------------------------------------------------
def eval_variables(config, state) -> dict:
  """The variables evaluation uses: the EMA ones with `ema.use_for_eval`, else `state.variables`."""
  if not use_ema_for_eval(config) or not jax.tree.leaves(getattr(state, "ema", {})):
    return state.variables
  variables = dict(state.variables)
  variables["params"] = state.ema["params"]
  if "batch_stats" in variables:
    variables["batch_stats"] = state.ema["batch_stats"]
  return variables


def restore_ema_variables(item: str, variables: dict) -> dict:
  """`variables` (restored from the TrainState checkpoint item `item`) with params / batch_stats
  replaced by the checkpoint's EMA ones."""
  target = {"params": variables["params"]}
  if "batch_stats" in variables:
    target["batch_stats"] = variables["batch_stats"]
  target = {"ema": jax.tree.map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), target)}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      ema = ckptr.restore(
          item,
          args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
      )["ema"]
  except Exception as e:  # noqa: BLE001
    raise InputFileError(
        f"{item}: ema.use_for_eval but the checkpoint has no EMA weights (trained with "
        f"ema.decay=0?); set --config.ema.use_for_eval=False ({type(e).__name__})"
    ) from None
  out = dict(variables)
  out.update(ema)
  return out


def _validate_averaging(cfg) -> None:
  ema, swa = cfg.ema, cfg.swa
  checks = (
      ("ema.decay", ema.decay, 0.0 <= ema.decay < 1.0, "in [0, 1) (0 = off)"),
      (
          "ema.batch_stats",
          ema.batch_stats,
          ema.batch_stats in ("average", "copy"),
          "'average' | 'copy'",
      ),
      ("swa.iters", swa.iters, swa.iters >= 0, ">= 0 (0 = off)"),
      ("swa.period", swa.period, swa.period >= 1, ">= 1"),
      (
          "swa.lr_sched",
          swa.lr_sched,
          swa.lr_sched in ("constant", "cosine"),
          "'constant' | 'cosine'",
      ),
      ("swa.lr_start", swa.lr_start, math.isfinite(swa.lr_start) and swa.lr_start >= 0, ">= 0"),
      ("swa.eta_min", swa.eta_min, math.isfinite(swa.eta_min) and swa.eta_min >= 0, ">= 0"),
      ("swa.bn_batches", swa.bn_batches, swa.bn_batches >= 0, ">= 0 (0 = keep the statistics)"),
  )
  for key, value, ok, want in checks:
    if not ok:
      raise ConfigError(f"{key} must be {want}, got {value!r}")


EMA_CONFIG = schema.group(
    "ema",
    "EMA of the parameters, updated after every step: ema = d * ema + (1 - d) * params, "
    "d = min(decay, (1 + t) / (10 + t)) with warmup, t = step.",
    schema.Field("decay", 0.0, "0 = off; e.g. 0.9998"),
    schema.Field(
        "warmup", True, "the (1 + t) / (10 + t) ramp (timm / TF ExponentialMovingAverage)"
    ),
    schema.Field(
        "batch_stats", "average", "BatchNorm running statistics: 'average' (timm) | 'copy'"
    ),
    schema.Field(
        "use_for_eval", True, "eval / predict / Predictor use the EMA weights (when decay > 0)"
    ),
)

SWA_CONFIG = schema.group(
    "swa",
    "SWA (docs/onestage.md §5.3): swa.iters more updates after optim.max_iter at the SWA LR, an "
    "equal-weight mean of the params every `period` of them; at the end params = mean and the "
    "BatchNorm statistics are recomputed over bn_batches training batches. iters and period are "
    "iterations, or epochs when optim.epochs > 0 (centerX SWA.ITER / SWA.PERIOD).",
    schema.Field("iters", 0, "0 = off"),
    schema.Field(
        "period", 100, "average every this many SWA iterations (epochs with optim.epochs > 0)"
    ),
    schema.Field(
        "lr_start", 0.002, "SWA LR (not batch-scaled); centerX crowd_human_res18_swa.yaml"
    ),
    schema.Field(
        "eta_min", 1e-4, "lr_sched 'cosine': CosineAnnealingWarmRestarts(T_0=period, eta_min)"
    ),
    schema.Field("lr_sched", "constant", "'constant' (lr_start) | 'cosine'"),
    schema.Field(
        "bn_batches", 100, "batches of the BatchNorm recompute (torch update_bn); 0 = keep"
    ),
    validate=_validate_averaging,
)
