"""Training loop: restore-or-init, jitted data-parallel steps, logging, checkpoints, NaN and
divergence guards.

Model and data are built by the caller (main.py) and passed in:

    from cn2_jax.engine import loop
    loop.maybe_initialize_distributed()          # first thing in main(), before any other JAX call
    state = loop.train(config, workdir, model, init_variables_fn, train_loader_fn,
                       frozen_prefixes=detector.frozen_param_prefixes(config.model))

* `config.optim`: optimizer / schedule fields; `config.train`: loop fields; `config.seed`. All are
  declared, with their defaults, in the schema (`cn2_jax.config.base_config()`), the only place
  defaults live. `train.batch_size` (the global batch) scales the LR by `batch_size / optim.reference_batch_size` (`optim.effective_base_lr`;
  logged at start as e.g. "lr 0.02 × batch 4/16 = 0.005").
* `init_variables_fn(rng) -> {'params', 'frozen'}`: pure (jit / eval_shape-able), e.g.
  `cn2_jax.modeling.detector.init_fn(model)`.
* `load_pretrained_fn(variables) -> variables` (optional, host side): applied only on a fresh start
  (e.g. merge converted ImageNet weights); never on resume.
* `train_loader_fn(start_step) -> iterable of batches`: batch k (0-based) feeds update k; on resume
  the loop calls it with the restored step, so the loader must skip exactly that many batches (i.e.
  yield the same sequence an uninterrupted run would from there). Batches are per-process host
  numpy dicts (DESIGN.md batch contract; the global batch is the concatenation over processes) or
  already-sharded `jax.Array`s. Every leaf is sent to the devices: drop host-only keys first.

Step numbering: `state.step` counts applied updates. Iteration k (0-based) consumes loader batch k
and takes the state from step k to k+1. Checkpoints, TensorBoard scalars and the progress bar use
the step *after* the update (k+1); a checkpoint at step s resumes with loader batch s.

Host syncs: the metrics of iteration k are fetched (a few scalars) after iteration k+1 has been
dispatched, so the device queue never drains; they are fetched immediately only on log / checkpoint
/ eval steps. Every iteration's loss terms, total loss and gradient norm are checked for finiteness
before any later checkpoint is written: a non-finite value raises `NonFiniteLossError` naming the
iteration and the offending terms, after waiting for pending (good) saves, so the newest checkpoint
on disk is always from a finite state.

Divergence guard (`DivergenceGuard`, `train.divergence_*`): a run whose loss explodes without ever
becoming NaN (issue 9: 2 -> 2e6 in 100 steps at too high an LR) is stopped too. Once
`divergence_min_steps` iterations have been seen, an iteration is *suspect* when its total loss or
gradient norm exceeds `divergence_factor` x its running median over the previous
`divergence_window` iterations; `divergence_patience` suspect iterations in a row raise
`DivergenceError` naming the iteration, the loss terms that exceed their own running median by the
factor, the LR and the last good checkpoint. Checkpoints due while the current iteration is suspect
are deferred to the next non-suspect iteration (and skipped at the end of the run), so no
checkpoint is ever written from a state the guard is unsure about. The check runs on the same
one-iteration-late host values as the NaN guard (no extra host sync, except that a deferred save
fetches every iteration until it is written). `divergence_factor = 0` disables it. The guard's
history starts empty on resume.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np

from cn2_jax.engine import checkpoint as ckpt_lib
from cn2_jax.engine import optim
from cn2_jax.engine import step as step_lib
from cn2_jax.engine import swa as swa_lib

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """Raised when a loss term, the total loss or the gradient norm is NaN/Inf."""

  def __init__(
      self,
      iteration: int,
      terms: Mapping[str, float],
      last_checkpoint: Optional[int],
      directory: str,
  ):
    self.iteration = iteration
    self.terms = dict(terms)
    self.last_checkpoint = last_checkpoint
    bad = ", ".join(f"{k}={v}" for k, v in self.terms.items())
    where = (
        f"the last good checkpoint is step {last_checkpoint} in {directory}"
        if last_checkpoint is not None
        else f"no checkpoint exists in {directory}"
    )
    super().__init__(
        f"Non-finite loss at iteration {iteration} (0-based loader batch {iteration}; update "
        f"state.step {iteration} -> {iteration + 1}): {bad}. Training stopped; no checkpoint was "
        f"written from this state; {where}."
    )


class DivergenceError(FloatingPointError):
  """Raised when the loss or gradient norm explodes (finite) for several iterations in a row."""

  def __init__(
      self,
      iteration: int,
      report: Mapping[str, Any],
      last_checkpoint: Optional[int],
      directory: str,
      lr: Optional[float],
      lr_note: str,
  ):
    self.iteration = iteration
    self.report = dict(report)
    self.terms = dict(report["terms"])  # exploding loss terms: name -> (value, median)
    self.last_checkpoint = last_checkpoint
    self.lr = lr
    f = report["factor"]
    watched = ", ".join(
        f"{k}={v:.4g} (median {med:.4g})" for k, (v, med) in report["watched"].items()
    )
    if self.terms:
      terms = ", ".join(f"{k}={v:.4g} (median {med:.4g})" for k, (v, med) in self.terms.items())
    else:
      terms = f"none (no single loss term exceeds {f:g}x its median)"
    where = (
        f"the last good checkpoint is step {last_checkpoint} in {directory}"
        if last_checkpoint is not None
        else f"no checkpoint exists in {directory}"
    )
    lr_txt = f"{lr:.4g}" if lr is not None and math.isfinite(lr) else "unknown"
    rerun = (
        f"rerun to resume from step {last_checkpoint}"
        if last_checkpoint is not None
        else "rerun (from scratch)"
    )
    super().__init__(
        f"Training diverged at iteration {iteration} (update state.step {iteration} -> "
        f"{iteration + 1}): for {report['patience']} iterations in a row (since iteration "
        f"{report['first']}) the total loss or gradient norm exceeded {f:g}x its running median "
        f"over the last {report['window']} iterations: {watched}. Exploding loss terms: {terms}. "
        f"Training stopped; no checkpoint was written from the diverged state; {where}. "
        f"The learning rate at this iteration was {lr_txt} ({lr_note}): lower optim.base_lr, "
        f"check optim.reference_batch_size or lengthen optim.warmup_iters, then {rerun} "
        f"(train.divergence_factor=0 disables this check)."
    )


class DivergenceGuard:
  """Running-median explosion detector over the host metrics of consecutive iterations.

  `update(iteration, metrics)` returns None, or (after `patience` suspect iterations in a row) a
  report dict for `DivergenceError`. `suspect` tells whether the last iteration seen was suspect.
  Watched: `total_loss` and `grad_norm`; every other loss term is tracked only to name the
  exploding ones. Values are compared with the median of the *previous* `window` values, so the
  exploding value itself never raises its own threshold; exploding values do enter the history,
  but `patience` of them cannot move a median over `min_steps` or more values far.
  """

  WATCHED = ("total_loss", "grad_norm")

  def __init__(
      self, factor: float = 20.0, window: int = 100, patience: int = 5, min_steps: int = 20
  ):
    self.factor = float(factor)
    self.window = int(window)
    self.patience = max(int(patience), 1)
    self.min_steps = max(int(min_steps), 1)
    if self.factor < 0 or (self.factor and self.factor <= 1):
      raise ValueError(f"train.divergence_factor must be 0 (off) or > 1, got {factor}")
    if self.enabled and self.window < self.min_steps:
      raise ValueError(
          f"train.divergence_window={window} must be >= divergence_min_steps=" f"{min_steps}"
      )
    self._hist: dict[str, collections.deque] = {}
    self.streak = 0
    self._first = None

  @property
  def enabled(self) -> bool:
    return self.factor > 0

  @property
  def suspect(self) -> bool:
    return self.streak > 0

  def _median(self, k: str) -> Optional[float]:
    h = self._hist.get(k)
    return float(np.median(h)) if h is not None and len(h) >= self.min_steps else None

  def update(self, iteration: int, metrics: Mapping[str, float]) -> Optional[dict]:
    if not self.enabled:
      return None
    keys = [k for k in metrics if k in self.WATCHED or _is_loss_term(k)]
    med = {k: self._median(k) for k in keys}
    watched = {
        k: (float(metrics[k]), med[k])
        for k in self.WATCHED
        if k in metrics and med.get(k) is not None
    }
    flagged = any(v > self.factor * m for v, m in watched.values())
    for k in keys:
      self._hist.setdefault(k, collections.deque(maxlen=self.window)).append(float(metrics[k]))
    if not flagged:
      self.streak, self._first = 0, None
      return None
    self.streak += 1
    self._first = iteration if self._first is None else self._first
    if self.streak < self.patience:
      return None
    # Exploding terms, largest increase first (the term that blew up leads the message).
    terms = {
        k: (float(metrics[k]), med[k])
        for k in keys
        if k not in self.WATCHED and med[k] is not None and float(metrics[k]) > self.factor * med[k]
    }
    terms = dict(sorted(terms.items(), key=lambda kv: kv[1][1] - kv[1][0]))
    return dict(
        watched=watched,
        terms=terms,
        first=self._first,
        factor=self.factor,
        window=self.window,
        patience=self.patience,
    )


def maybe_initialize_distributed() -> bool:
  """Call `jax.distributed.initialize()` when a multi-process launch is detected.

  Must run before any other JAX call. Detected launches:
  * `JAX_COORDINATOR_ADDRESS` (host:port of process 0) with `JAX_NUM_PROCESSES` and
    `JAX_PROCESS_ID` (optional when the cluster is auto-detected);
  * Slurm (`SLURM_NTASKS` > 1) or Open MPI (`OMPI_COMM_WORLD_SIZE` > 1): JAX auto-detects
    coordinator, process count and id.
  Single-process runs (nothing set) do nothing and return False.
  """
  if jax.distributed.is_initialized():
    return True
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    num = env.get("JAX_NUM_PROCESSES")
    pid = env.get("JAX_PROCESS_ID")
    jax.distributed.initialize(
        coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(num) if num else None,
        process_id=int(pid) if pid else None,
    )
    return True
  if int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    jax.distributed.initialize()
    return True
  return False


def _train_cfg(config):
  """`config.train` (every key declared in cn2_jax/config.py, the only place defaults live)."""
  tc = config.train
  missing = [k for k in _LOOP_KEYS if k not in tc]
  if missing:
    raise KeyError(f"config.train lacks {missing}: start from cn2_jax.config.base_config()")
  return tc


# The config.train keys the loop reads (all declared in the schema).
_LOOP_KEYS = (
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "async_checkpoint",
    "eval_every",
    "check_vma",
    "progress_bar",
    "divergence_factor",
    "divergence_window",
    "divergence_patience",
    "divergence_min_steps",
)


def _is_loss_term(k: str) -> bool:
  return not k.startswith(step_lib.AUX_PREFIX) and k != "lr"


def _batch_size(batch: Mapping[str, Any]) -> int:
  x = batch["image"] if "image" in batch else jax.tree.leaves(batch)[0]
  return int(x.shape[0])


def _to_device(batch: Mapping[str, Any], mesh) -> dict:
  if all(isinstance(x, jax.Array) for x in jax.tree.leaves(batch)):
    return dict(batch)
  return step_lib.shard_batch(batch, mesh)


def _with_batchnorm_params(no_decay_fn: Callable[[str], bool], init_variables_fn) -> Callable:
  """`no_decay_fn` that also counts the scale/bias of every trainable BatchNorm (a module with
  running statistics in `batch_stats`) as norm parameters: detectron2 applies WEIGHT_DECAY_NORM to
  all norm layers, centerX's BN included."""
  shapes = jax.eval_shape(init_variables_fn, jax.random.PRNGKey(0))
  bn_modules = {
      ".".join(str(getattr(k, "key", k)) for k in path[:-1])
      for path, _ in jax.tree_util.tree_flatten_with_path(shapes.get("batch_stats", {}))[0]
  }
  if not bn_modules:
    return no_decay_fn

  def fn(path: str) -> bool:
    module, _, leaf = path.rpartition(".")
    return (leaf in ("scale", "bias") and module in bn_modules) or no_decay_fn(path)

  return fn


def train(
    config: Any,
    workdir: str,
    model: Any,
    init_variables_fn: Callable[[jax.Array], Mapping[str, Any]],
    train_loader_fn: Callable[[int], Iterable[Mapping[str, Any]]],
    *,
    mesh=None,
    frozen_prefixes: Sequence[str] = (),
    no_decay_fn: Callable[[str], bool] = optim.is_norm_param,
    load_pretrained_fn: Optional[Callable[[Any], Any]] = None,
    eval_fn: Optional[Callable[[step_lib.TrainState, int], Mapping[str, float]]] = None,
    metrics_callback: Optional[Callable[[int, Mapping[str, float]], None]] = None,
    stop_at_step: Optional[int] = None,
    num_train_images: Optional[int] = None,
    teachers: Sequence[tuple] = (),
    kd_loss_fn: Optional[Callable[..., Any]] = None,
) -> step_lib.TrainState:
  """Train (or resume) until `config.optim.max_iter` (+ `config.swa.iters`, engine/swa.py)
  updates; returns the final state (with SWA: the averaged parameters, BatchNorm recomputed).

  `stop_at_step` ends this run early at that step (saving a checkpoint there) without changing the
  schedule, e.g. for time-budgeted runs. `metrics_callback(step, metrics)` receives the host values
  of every iteration's metrics (step = state.step after the update). `eval_fn(state, step)` runs
  every `config.train.eval_every` steps and at the last step; its returned scalars go to TensorBoard
  under `eval/`. Raises `NonFiniteLossError` on a NaN/Inf loss and `DivergenceError` on an
  exploding one (see module docstring). `num_train_images` (the images the loader draws from) is
  needed only for a schedule in epochs (`optim.epochs > 0`, see `optim.iterations_from_epochs`).
  `teachers` ((forward_fn, variables) pairs) and `kd_loss_fn`: knowledge distillation
  (`cn2_jax.modeling.onestage.kd`, `step.make_train_step`); the teacher variables are replicated
  once and passed to every step, never checkpointed.
  """
  solver = config.optim
  tc = _train_cfg(config)
  seed = int(config.seed)
  batch_size = int(tc.batch_size)
  lr_note = optim.lr_scaling_message(solver, batch_size)
  guard = DivergenceGuard(
      tc.divergence_factor, tc.divergence_window, tc.divergence_patience, tc.divergence_min_steps
  )
  mesh = step_lib.make_mesh() if mesh is None else mesh
  frozen_prefixes = tuple(frozen_prefixes)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)

  if float(solver.epochs) > 0:  # schedule in epochs -> iterations (optim.resolve_schedule)
    ipe = optim.iterations_from_epochs(solver, num_train_images, batch_size)["iters_per_epoch"]
    solver = optim.resolve_schedule(solver, num_train_images, batch_size)
    log.info("optim.epochs=%g: %s", config.optim.epochs, optim.schedule_summary(solver))
    config = swa_lib.in_iterations(config, ipe)  # swa.iters / swa.period in epochs too
    if swa_lib.swa_enabled(config):
      log.info("SWA: %d iterations, period %d", config.swa.iters, config.swa.period)
  max_iter = int(solver.max_iter)
  # SWA (engine/swa.py): swa.iters more updates after max_iter at the SWA LR; identity when off
  schedule = swa_lib.swa_schedule(optim.make_lr_schedule(solver, batch_size), config, max_iter)
  no_decay_fn = _with_batchnorm_params(no_decay_fn, init_variables_fn)
  tx = optim.make_optimizer(
      solver, None, frozen_prefixes, no_decay_fn, batch_size=batch_size, schedule=schedule
  )
  abstract = step_lib.abstract_train_state(init_variables_fn, tx, mesh)
  optim.validate_frozen_prefixes(abstract.params, frozen_prefixes)

  ckpt = ckpt_lib.Checkpointer(
      workdir,
      every=tc.checkpoint_every,
      max_to_keep=tc.keep_checkpoints,
      async_save=tc.async_checkpoint,
  )
  rng = jax.random.PRNGKey(seed)
  latest = ckpt.latest_step()
  if latest is not None:
    state = swa_lib.restore_state(config, ckpt, abstract, latest, mesh)
    log.info("resumed from %s/%d", ckpt.directory, latest)
  elif load_pretrained_fn is not None:
    init_key = jax.random.split(rng)[0]
    variables = jax.jit(init_variables_fn)(init_key)
    variables = load_pretrained_fn(jax.device_get(variables))
    state = step_lib.state_from_variables(variables, tx, rng, mesh)
  else:
    state = step_lib.init_train_state(init_variables_fn, tx, rng, mesh)
  if latest is None:
    state = swa_lib.add_averages(config, state, mesh)  # EMA / SWA fields (no-op when off)

  final = swa_lib.total_iters(config, max_iter)  # max_iter + swa.iters
  end = final if stop_at_step is None else min(final, int(stop_at_step))
  start = int(jax.device_get(state.step))
  if start >= end:
    log.info("nothing to do: state.step=%d >= %d", start, end)
    ckpt.close()
    return state

  log.info("%s", lr_note)
  train_step = step_lib.make_train_step(
      model,
      tx,
      mesh,
      frozen_prefixes=frozen_prefixes,
      lr_schedule=schedule,
      check_vma=tc.check_vma,
      post_update=swa_lib.make_post_update(config, max_iter),
      teachers=tuple(fn for fn, _ in teachers),
      kd_loss_fn=kd_loss_fn,
  )
  if teachers:  # knowledge distillation: frozen teacher variables, an input of every step
    train_step = functools.partial(
        train_step, teacher_variables=step_lib.replicate(tuple(v for _, v in teachers), mesh)
    )
  writer = None
  if is_main:
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(logdir=workdir, purge_step=start + 1)
  pbar = None
  if is_main and tc.progress_bar:
    from tqdm import tqdm

    pbar = tqdm(total=final, initial=start, desc="train", dynamic_ncols=True, smoothing=0.1)

  window: list[dict] = []
  state_ = {"t": time.perf_counter(), "images": 0}

  def consume(it_k: int, metrics) -> dict:
    """Fetch iteration it_k's metrics, check them, record them."""
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = {k: v for k, v in m.items() if _is_loss_term(k) and not math.isfinite(v)}
    if bad:
      bad.update(
          {k: v for k, v in m.items() if k.startswith(step_lib.AUX_PREFIX) and not math.isfinite(v)}
      )
      ckpt.wait()
      raise NonFiniteLossError(it_k, bad, ckpt.latest_step(), ckpt.directory)
    window.append(m)
    if metrics_callback is not None:
      metrics_callback(it_k + 1, m)
    report = guard.update(it_k, m)
    if report is not None:
      write_logs(it_k + 1)  # the exploding values reach TensorBoard too
      ckpt.wait()
      raise DivergenceError(it_k, report, ckpt.latest_step(), ckpt.directory, m.get("lr"), lr_note)
    return m

  def write_logs(step: int) -> None:
    now = time.perf_counter()
    ips = state_["images"] / max(now - state_["t"], 1e-9)
    state_["t"], state_["images"] = now, 0
    means = {k: float(np.mean([w[k] for w in window if k in w])) for k in window[-1]}
    means["lr"] = window[-1].get("lr", float("nan"))
    window.clear()
    if writer is not None:
      for k, v in means.items():
        writer.add_scalar(f"train/{k}", v, step)
      writer.add_scalar("train/images_per_sec", ips, step)
      writer.flush()
    if pbar is not None:
      pbar.set_postfix(
          loss=f"{means['total_loss']:.4f}",
          lr=f"{means['lr']:.2e}",
          img_s=f"{ips:.1f}",
          refresh=False,
      )

  loader = iter(train_loader_fn(start))
  pending = None
  deferred_save = False  # a checkpoint came due while the guard was suspicious
  try:
    for k in range(start, end):
      try:
        batch = next(loader)
      except StopIteration:
        raise RuntimeError(f"train loader exhausted at iteration {k} (expected {end})") from None
      batch = _to_device(batch, mesh)
      state, metrics = train_step(state, batch)
      ckpt.check()  # a failed background save stops the run at once, with one line
      done = k + 1
      if done == final and swa_lib.swa_enabled(config):
        # params <- SWA average, BatchNorm statistics recomputed, before the last save and eval
        bn_batches = (_to_device(b, mesh) for b in loader)
        state = swa_lib.finalize(config, state, model, mesh, bn_batches)
      state_["images"] += _batch_size(batch)
      if pending is not None:
        consume(*pending)
      pending = (k, metrics)
      if k == start:  # exclude compilation from images/s
        consume(*pending)
        pending = None
        state_["t"], state_["images"] = time.perf_counter(), 0
      log_now = done % tc.log_every == 0 or done == end
      save_now = ckpt.should_save(done) or done == end
      eval_now = (
          eval_fn is not None and tc.eval_every > 0 and (done % tc.eval_every == 0 or done == final)
      )
      if pending is not None and (log_now or save_now or eval_now or deferred_save):
        consume(*pending)
        pending = None
      if log_now and window:
        write_logs(done)
      if save_now or deferred_save:
        # The state after update k is saved only when iteration k was not suspect (its loss and
        # gradient norm looked normal); otherwise the save waits for a normal iteration.
        if guard.suspect:
          if not deferred_save:
            log.warning(
                "iteration %d: loss or gradient norm > %gx its running median; "
                "checkpoint of step %d deferred",
                k,
                guard.factor,
                done,
            )
          deferred_save = True
          if done == end:
            log.warning(
                "run ended while the loss looked diverging: no final checkpoint; the "
                "newest checkpoint is step %s",
                ckpt.latest_step(),
            )
        else:
          if ckpt.save(done, state, force=done == end or deferred_save) and writer is not None:
            writer.flush()  # the scalars up to a checkpoint survive a crash after it
          deferred_save = False
      if eval_now:
        results = eval_fn(state, done) or {}
        if writer is not None:
          for name, v in results.items():
            writer.add_scalar(f"eval/{name}", float(v), done)
          writer.flush()
      if pbar is not None:
        pbar.update(1)
    if pending is not None:
      consume(*pending)
  finally:
    try:
      ckpt.close()
    finally:
      if writer is not None:
        try:
          writer.close()
        except OSError as e:  # e.g. the disk is full: the run's own error says more
          log.warning("could not flush TensorBoard events: %s", e)
      if pbar is not None:
        pbar.close()
  return state
