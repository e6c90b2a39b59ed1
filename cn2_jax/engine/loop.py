"""Training loop: restore-or-init, jitted data-parallel steps, and the hooks (engine/hooks.py)
that log, checkpoint, evaluate and guard against NaN and divergence between them.

Model and data are built by the caller (cn2_jax/app.py) and passed in:

    from cn2_jax.engine import loop
    loop.maybe_initialize_distributed()          # first thing in main(), before any other JAX call
                                                 # (engine/distributed.py: several processes)
    state = loop.train(config, workdir, model, init_variables_fn, train_loader_fn,
                       frozen_prefixes=detector.frozen_param_prefixes(config.model))

* `config.optim`: optimizer / schedule fields; `config.train`: loop fields; `config.seed`. All are
  declared, with their defaults, in the schema (`cn2_jax.config.base_config()`), the only place
  defaults live. `train.batch_size` is the batch of each process; the global batch
  (`global_batch_size`: `train.batch_size × jax.process_count()`) scales the LR by
  `global batch / optim.reference_batch_size` (`optim.effective_base_lr`; logged at start as e.g.
  "lr 0.02 × batch 4/16 = 0.005") and counts the iterations of an epoch. N processes with batch b
  train exactly as one process with N devices and batch N·b (same data order, same updates).
* `init_variables_fn(rng) -> {'params', 'frozen'}`: pure (jit / eval_shape-able), e.g.
  `cn2_jax.modeling.detector.init_fn(model)`.
* `load_pretrained_fn(variables) -> variables` (optional, host side): applied only on a fresh start
  (e.g. merge converted ImageNet weights); never on resume.
* `train_loader_fn(start_step) -> iterable of batches`: batch k (0-based) feeds update k; on resume
  the loop calls it with the restored step, so the loader must skip exactly that many batches (i.e.
  yield the same sequence an uninterrupted run would from there). Batches are per-process host
  numpy dicts (DESIGN.md batch contract; the global batch is the concatenation over processes) or
  already-sharded `jax.Array`s. Every leaf is sent to the devices: drop host-only keys first.
* `hooks`: what runs between updates (`hooks.default_hooks(config)` when not given; the order
  matters, see engine/hooks.py). `loss` (`step.LossWrapper`): the student's loss replaced, e.g.
  knowledge distillation (`cn2_jax.modeling.onestage.kd.make_distillation`), built before the
  loop; its inputs (teacher variables) are replicated once and passed to every step.

The loop itself is `Trainer.train` (detectron2's `TrainerBase`): for each iteration, the hooks'
`before_step`, one update (`run_step`), the hooks' `after_step`; its state (TrainState, iteration,
loader, checkpointer, TensorBoard writer, pending metrics) lives in the `Trainer` object.

Step numbering: `state.step` counts applied updates. Iteration k (0-based) consumes loader batch k
and takes the state from step k to k+1. Checkpoints, TensorBoard scalars and the progress bar use
the step *after* the update (k+1); a checkpoint at step s resumes with loader batch s.

Host syncs: the metrics of iteration k are fetched (a few scalars) after iteration k+1 has been
dispatched, so the device queue never drains; they are fetched immediately only on log / checkpoint
/ eval steps (`Trainer.fetch_metrics`). Every iteration's loss terms, total loss and gradient norm
are checked for finiteness before any later checkpoint is written (`hooks.NonFiniteGuard`): a
non-finite value raises `NonFiniteLossError` naming the iteration and the offending terms, after
waiting for pending (good) saves, so the newest checkpoint on disk is always from a finite state.

Divergence guard (`DivergenceGuard`, `hooks.DivergenceHook`, `train.divergence_*`): a run whose
loss explodes without ever becoming NaN (issue 9: 2 -> 2e6 in 100 steps at too high an LR) is
stopped too. Once `divergence_min_steps` iterations have been seen, an iteration is *suspect* when
its total loss or gradient norm exceeds `divergence_factor` x its running median over the previous
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

import functools
import logging
import os
import weakref
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax

from cn2_jax import schema
from cn2_jax.engine import checkpoint as ckpt_lib
from cn2_jax.engine import distributed
from cn2_jax.engine import hooks as hooks_lib
from cn2_jax.engine import optim
from cn2_jax.engine import step as step_lib
from cn2_jax.engine import swa as swa_lib
from cn2_jax.engine.hooks import (  # noqa: F401  (re-exported: loop.DivergenceError, ...)
    DivergenceError,
    DivergenceGuard,
    HookBase,
    NonFiniteLossError,
)
from cn2_jax.errors import ConfigError

log = logging.getLogger(__name__)


def maybe_initialize_distributed() -> bool:
  """Joins the job of a multi-process launch (`JAX_COORDINATOR_ADDRESS` + `JAX_NUM_PROCESSES` +
  `JAX_PROCESS_ID`, Slurm or Open MPI); must run before any other JAX call. False (nothing done)
  for a single-process run. See `cn2_jax.engine.distributed.initialize`."""
  return distributed.initialize()


def global_batch_size(config) -> int:
  """`train.batch_size` (per process) × the number of processes: the images of one update."""
  return int(config.train.batch_size) * jax.process_count()


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
class TrainerBase:
  """detectron2's `TrainerBase`: runs iterations `[start_iter, end_iter)` with hooks
  (engine/hooks.py) called around each; subclasses implement `run_step`. `final_iter`: the end of the schedule
  (`end_iter` may stop earlier). `finished`: every iteration ran (hooks' `after_train` tells a
  completed run from a failed one by it)."""

  def __init__(
      self,
      hooks: Sequence[Optional[HookBase]] = (),
      *,
      start_iter: int = 0,
      end_iter: int = 0,
      final_iter: Optional[int] = None,
  ):
    self.iter = self.start_iter = int(start_iter)
    self.end_iter = int(end_iter)
    self.final_iter = self.end_iter if final_iter is None else int(final_iter)
    self.finished = False
    self._hooks: list[HookBase] = []
    self.register_hooks(hooks)

  @property
  def step(self) -> int:
    """`state.step` after this iteration's update (iteration k -> step k + 1)."""
    return self.iter + 1

  def register_hooks(self, hooks: Sequence[Optional[HookBase]]) -> None:
    """Appends `hooks` (None entries skipped); they run in this order."""
    for h in hooks:
      if h is None:
        continue
      if not isinstance(h, HookBase):
        raise TypeError(f"{type(h).__name__} is not a hooks.HookBase")
      h.trainer = weakref.proxy(self)  # the trainer owns its hooks, not the reverse
      self._hooks.append(h)

  def train(self) -> None:
    self.iter, self.finished = self.start_iter, False
    try:
      self.before_train()
      for self.iter in range(self.start_iter, self.end_iter):
        self.before_step()
        self.run_step()
        self.after_step()
      self.finished = True
    finally:
      self.after_train()

  def run_step(self) -> None:
    raise NotImplementedError

  def before_train(self) -> None:
    for h in self._hooks:
      h.before_train()

  def before_step(self) -> None:
    for h in self._hooks:
      h.before_step()

  def after_step(self) -> None:
    for h in self._hooks:
      h.after_step()

  def on_metrics(self, iteration: int, metrics: Mapping[str, float]) -> None:
    for h in self._hooks:
      h.on_metrics(iteration, metrics)

  def after_train(self) -> None:
    """Every hook's `after_train`, even when one raises (the first error is raised after all)."""
    error = None
    for h in self._hooks:
      try:
        h.after_train()
      except BaseException as e:  # noqa: BLE001 - re-raised below, once every hook has run
        error = e if error is None else error
    if error is not None:
      raise error


class Trainer(TrainerBase):
  """The train loop (module docstring) and its state: `state` (the TrainState), the iteration,
  `loader` (the batches still to come), `batch` (this iteration's, on the devices), `checkpointer`
  and `events` (TensorBoard), which it closes at the end, and the metrics not yet fetched.
  `train_step(state, batch) -> (state, device metrics)`; `train()` returns the final state."""

  def __init__(
      self,
      train_step: Callable,
      state: step_lib.TrainState,
      loader: Iterable[Mapping[str, Any]],
      hooks: Sequence[Optional[HookBase]] = (),
      *,
      start_iter: int,
      end_iter: int,
      final_iter: Optional[int] = None,
      checkpointer: ckpt_lib.Checkpointer,
      events: hooks_lib.EventWriter,
      model: Any = None,
      mesh=None,
  ):
    super().__init__(hooks, start_iter=start_iter, end_iter=end_iter, final_iter=final_iter)
    self.train_step = train_step
    self.state = state
    self.loader = iter(loader)
    self.batch = None
    self.checkpointer = checkpointer
    self.events = events
    self.model = model
    self.mesh = mesh
    self._pending = None  # (iteration, device metrics) not yet handed to the hooks

  def train(self) -> step_lib.TrainState:
    super().train()
    return self.state

  def to_device(self, batch: Mapping[str, Any]) -> dict:
    return _to_device(batch, self.mesh)

  def run_step(self) -> None:
    """Update `iter`, then the hooks' `on_metrics` of iteration `iter - 1` (whose values are ready
    by now: fetching them does not stall the device queue)."""
    try:
      batch = next(self.loader)
    except StopIteration:
      raise RuntimeError(
          f"train loader exhausted at iteration {self.iter} (expected {self.end_iter})"
      ) from None
    self.batch = self.to_device(batch)
    self.state, metrics = self.train_step(self.state, self.batch)
    previous, self._pending = self._pending, (self.iter, metrics)
    if previous is not None:
      self._hand_over(*previous)

  def fetch_metrics(self) -> None:
    """Hands the newest iteration's metrics to the hooks now, if they have not had them (a host
    sync: hooks call it on the steps where they need every metric so far)."""
    if self._pending is not None:
      pending, self._pending = self._pending, None
      self._hand_over(*pending)

  def _hand_over(self, iteration: int, metrics) -> None:
    self.on_metrics(iteration, {k: float(v) for k, v in jax.device_get(metrics).items()})

  def after_train(self) -> None:
    try:
      if self.finished:
        self.fetch_metrics()  # the last iteration's metrics, when no hook fetched them
    finally:
      try:
        super().after_train()
      finally:
        try:
          self.checkpointer.close()
        finally:
          self.events.close()


def _to_device(batch: Mapping[str, Any], mesh) -> dict:
  if all(isinstance(x, jax.Array) for x in jax.tree.leaves(batch)):
    return dict(batch)
  return step_lib.shard_batch(batch, mesh)


# ----------------------------------------------------------------------------------------------
# Setup: schedule, optimizer, state, step
# ----------------------------------------------------------------------------------------------
def _train_cfg(config):
  """`config.train` (every key declared in cn2_jax/config.py, the only place defaults live)."""
  tc = config.train
  missing = [k for k in _LOOP_KEYS if k not in tc]
  if missing:
    raise KeyError(f"config.train lacks {missing}: start from cn2_jax.config.base_config()")
  return tc


# The config.train keys the loop and its default hooks read (all declared in the schema).
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


def _resolve_schedule(config, num_train_images: Optional[int]):
  """(config, config.optim) with a schedule in epochs (`optim.epochs > 0`) turned into iterations
  (`optim.resolve_schedule`; swa.iters / swa.period too); unchanged otherwise."""
  solver = config.optim
  if float(solver.epochs) <= 0:
    return config, solver
  batch_size = global_batch_size(config)
  ipe = optim.iterations_from_epochs(solver, num_train_images, batch_size)["iters_per_epoch"]
  solver = optim.resolve_schedule(solver, num_train_images, batch_size)
  log.info("optim.epochs=%g: %s", config.optim.epochs, optim.schedule_summary(solver))
  config = swa_lib.in_iterations(config, ipe)  # swa.iters / swa.period in epochs too
  if swa_lib.swa_enabled(config):
    log.info("SWA: %d iterations, period %d", config.swa.iters, config.swa.period)
  return config, solver


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


def _initial_state(config, ckpt, abstract, init_variables_fn, tx, mesh, load_pretrained_fn):
  """The newest checkpoint restored, else a fresh (or pretrained) state with EMA / SWA fields."""
  rng = jax.random.PRNGKey(int(config.seed))
  latest = ckpt.latest_step()
  if latest is not None:
    state = swa_lib.restore_state(config, ckpt, abstract, latest, mesh)
    log.info("resumed from %s/%d", ckpt.directory, latest)
    return state
  if load_pretrained_fn is not None:
    init_key = jax.random.split(rng)[0]
    variables = jax.jit(init_variables_fn)(init_key)
    variables = load_pretrained_fn(jax.device_get(variables))
    state = step_lib.state_from_variables(variables, tx, rng, mesh)
  else:
    state = step_lib.init_train_state(init_variables_fn, tx, rng, mesh)
  return swa_lib.add_averages(config, state, mesh)  # EMA / SWA fields (no-op when off)


def _make_train_step(config, model, tx, mesh, schedule, frozen_prefixes, max_iter, loss):
  """The jitted step (engine/step.py) with EMA / SWA averaging and the `loss` wrapper, whose inputs
  are replicated once here."""
  train_step = step_lib.make_train_step(
      model,
      tx,
      mesh,
      frozen_prefixes=frozen_prefixes,
      lr_schedule=schedule,
      check_vma=config.train.check_vma,
      grad_accum_steps=config.train.grad_accum_steps,
      post_update=swa_lib.make_post_update(config, max_iter),
      loss_fn=None if loss is None else loss.fn,
  )
  if loss is None:
    return train_step
  return functools.partial(train_step, loss_inputs=step_lib.replicate(loss.inputs, mesh))


def train(
    config: Any,
    workdir: str,
    model: Any,
    init_variables_fn: Callable[[jax.Array], Mapping[str, Any]],
    train_loader_fn: Callable[[int], Iterable[Mapping[str, Any]]],
    *,
    hooks: Optional[Sequence[HookBase]] = None,
    mesh=None,
    frozen_prefixes: Sequence[str] = (),
    load_pretrained_fn: Optional[Callable[[Any], Any]] = None,
    loss: Optional[step_lib.LossWrapper] = None,
    stop_at_step: Optional[int] = None,
    num_train_images: Optional[int] = None,
    metrics_callback: Optional[Callable[[int, Mapping[str, float]], None]] = None,
) -> step_lib.TrainState:
  """Train (or resume) until `config.optim.max_iter` (+ `config.swa.iters`, engine/swa.py)
  updates; returns the final state (with SWA: the averaged parameters, BatchNorm recomputed).

  `hooks` (engine/hooks.py): default `hooks.default_hooks(config, metrics_callback=...)`;
  `metrics_callback(step, metrics)` (the host values of every iteration's metrics, step =
  state.step after the update) goes there, so it is given only without `hooks`. `stop_at_step`
  ends this run early at that step (saving a checkpoint there) without changing the schedule,
  e.g. for time-budgeted runs. Raises `NonFiniteLossError` on a NaN/Inf loss and
  `DivergenceError` on an exploding one (see module docstring). `num_train_images` (the images
  the loader draws from) is needed only for a schedule in epochs (`optim.epochs > 0`, see
  `optim.iterations_from_epochs`). `loss`: see the module docstring.
  """
  tc = _train_cfg(config)
  if hooks is None:
    hooks = hooks_lib.default_hooks(config, metrics_callback=metrics_callback)
  elif metrics_callback is not None:
    raise ValueError("with hooks, pass metrics_callback to hooks.default_hooks")
  batch_size = global_batch_size(config)  # LR scaling and epochs count the global batch
  lr_note = optim.lr_scaling_message(config.optim, batch_size)
  mesh = step_lib.make_mesh() if mesh is None else mesh
  frozen_prefixes = tuple(frozen_prefixes)
  os.makedirs(workdir, exist_ok=True)
  config, solver = _resolve_schedule(config, num_train_images)
  max_iter = int(solver.max_iter)
  # SWA (engine/swa.py): swa.iters more updates after max_iter at the SWA LR; identity when off
  schedule = swa_lib.swa_schedule(optim.make_lr_schedule(solver, batch_size), config, max_iter)
  no_decay_fn = _with_batchnorm_params(optim.is_norm_param, init_variables_fn)
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
  state = _initial_state(config, ckpt, abstract, init_variables_fn, tx, mesh, load_pretrained_fn)
  final = swa_lib.total_iters(config, max_iter)  # max_iter + swa.iters
  end = final if stop_at_step is None else min(final, int(stop_at_step))
  start = int(jax.device_get(state.step))
  if start >= end:
    log.info("nothing to do: state.step=%d >= %d", start, end)
    ckpt.close()
    return state
  log.info("%s", lr_note)
  train_step = _make_train_step(config, model, tx, mesh, schedule, frozen_prefixes, max_iter, loss)
  trainer = Trainer(
      train_step,
      state,
      train_loader_fn(start),
      hooks,
      start_iter=start,
      end_iter=end,
      final_iter=final,
      checkpointer=ckpt,
      events=hooks_lib.EventWriter(workdir, start + 1, enabled=jax.process_index() == 0),
      model=model,
      mesh=mesh,
  )
  return trainer.train()


def _validate_train(cfg) -> None:
  freeze = cfg.train.freeze
  if isinstance(freeze, str) or not all(isinstance(v, str) and v for v in freeze):
    raise ConfigError(f"train.freeze must be a tuple of non-empty strings, got {freeze!r}")


CONFIG = schema.group(
    "train",
    "The training loop, its checkpoints, evaluations and guards (engine/loop.py, "
    "engine/hooks.py).",
    schema.Field(
        "batch_size", 16, "images per step of each process (global batch = this x process count)"
    ),
    schema.Field(
        "freeze",
        (),
        "parameter-path prefixes never updated (no update, no weight decay, no optimizer state), "
        "e.g. ('backbone',) or ('backbone.bottom_up.res3', 'proposal_generator'); on top of the "
        "family's own rule (model.freeze_at); BatchNorm running statistics still update",
    ),
    schema.Field("eval_batch_size", 8, "images per evaluation batch"),
    schema.Field("log_every", 20, "steps between log lines / TensorBoard scalars"),
    schema.Field("checkpoint_every", 5000, "steps between checkpoints"),
    schema.Field("keep_checkpoints", 3, "newest checkpoints kept"),
    schema.Field("eval_at_end", True, "evaluate after the last step"),
    schema.Field(
        "eval_every", 0, "> 0: evaluate every this many steps during training (TensorBoard eval/*)"
    ),
    schema.Field(
        "async_checkpoint", True, "Orbax saves in the background; the next step checks the result"
    ),
    schema.Field("check_vma", False, "shard_map varying-axis checks (engine/step.py docstring)"),
    schema.Field("progress_bar", True, "a progress bar on the terminal"),
    schema.Field(
        "divergence_factor",
        20.0,
        "divergence guard: stop when the total loss or gradient norm exceeds this x its running "
        "median over divergence_window iterations for divergence_patience iterations in a row "
        "(after divergence_min_steps); 0 = off",
    ),
    schema.Field("divergence_window", 100, "iterations of the divergence guard's running median"),
    schema.Field("divergence_patience", 5, "diverged iterations in a row that stop the run"),
    schema.Field("divergence_min_steps", 20, "the divergence guard starts after this many steps"),
    validate=_validate_train,
)
