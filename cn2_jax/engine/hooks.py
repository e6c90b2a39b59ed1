"""Training hooks (detectron2 `engine/hooks.py`): everything the train loop does between updates.

A hook is registered with a trainer (`loop.TrainerBase`), which calls, in registration order:

    hook.before_train()
    for trainer.iter in range(trainer.start_iter, trainer.end_iter):
      hook.before_step()
      trainer.run_step()          # dispatches update `iter` (hooks' on_metrics of update iter - 1)
      hook.after_step()
    hook.after_train()            # always: also after an error (`trainer.finished` tells which)

and `hook.on_metrics(iteration, metrics)` with the host values (Python floats) of one iteration's
metrics, once per iteration, in iteration order. The trainer fetches them one iteration late (after
update k+1 has been dispatched, so the device queue never drains), or at once when a hook calls
`trainer.fetch_metrics()` because it needs them (log, checkpoint and eval steps).

What a hook may use of the trainer (`self.trainer`, set by `register_hooks`): `iter` (0-based
iteration), `step` (= iter + 1: `state.step` after this iteration's update, the step that
checkpoints, TensorBoard and the progress bar use), `start_iter`, `end_iter` (this run stops there,
e.g. `stop_at_step`), `final_iter` (the end of the schedule: optim.max_iter + swa.iters),
`finished`, `state` (the TrainState; a hook may replace it), `batch` (this iteration's device
batch), `loader` (the iterator of the next batches), `model`, `mesh`, `to_device(batch)`,
`checkpointer` (`checkpoint.Checkpointer`), `events` (`EventWriter`: TensorBoard) and
`fetch_metrics()`.

`default_hooks(config)` builds the loop's hooks from the config; the order matters and is:

  SWAFinish            end of SWA: params <- the average, BatchNorm recomputed (engine/swa.py)
  NonFiniteGuard       NaN / Inf loss, total loss or gradient norm -> NonFiniteLossError
  PeriodicWriter       train/* TensorBoard scalars (window means, images/s) every log_every steps
  MetricsCallback      metrics_callback(step, metrics) of every iteration (optional)
  DivergenceHook       exploding loss / gradient norm -> DivergenceError (DivergenceGuard)
  PeriodicCheckpointer checkpoint every checkpoint_every steps and at the end, unless suspect
  EvalHook             eval_fn every eval_every steps and at the last step (optional)
  ProgressBar          tqdm bar (process 0, train.progress_bar)

so that every iteration's metrics are checked (NaN guard, divergence guard) before any later
checkpoint is written, the exploding values reach TensorBoard before the divergence error, the
scalars up to a checkpoint are on disk before it is written, and a checkpoint due while the
divergence guard is suspicious waits for a normal iteration (engine/loop.py docstring). EMA and
the SWA running mean have no hook: they are updated inside the jitted step
(`swa.make_post_update`), and evaluation picks the EMA weights itself (`swa.eval_variables`).
"""

from __future__ import annotations

import collections
import logging
import math
import time
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from cn2_jax.engine import optim
from cn2_jax.engine import step as step_lib
from cn2_jax.engine import swa as swa_lib

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Errors and the divergence detector
# ----------------------------------------------------------------------------------------------
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


def is_loss_term(k: str) -> bool:
  """A metric that is a loss term (or the total loss / gradient norm): not `aux/*`, not `lr`."""
  return not k.startswith(step_lib.AUX_PREFIX) and k != "lr"


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
    keys = [k for k in metrics if k in self.WATCHED or is_loss_term(k)]
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


# ----------------------------------------------------------------------------------------------
# TensorBoard
# ----------------------------------------------------------------------------------------------
class EventWriter:
  """The run's TensorBoard scalars (`<logdir>/events.out.tfevents.*`) on process 0, nothing on
  the others. `purge_step`: events at and after it left by an interrupted run are dropped (a
  resumed run passes its first step)."""

  def __init__(self, logdir: str, purge_step: int, enabled: bool = True):
    self._writer = None
    if enabled:
      from tensorboardX import SummaryWriter  # start-up: only when TensorBoard is written

      self._writer = SummaryWriter(logdir=logdir, purge_step=purge_step)

  def write(self, prefix: str, values: Mapping[str, float], step: int) -> None:
    """`<prefix>/<name>` scalars at `step`."""
    if self._writer is not None:
      for name, v in values.items():
        self._writer.add_scalar(f"{prefix}/{name}", float(v), step)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      try:
        self._writer.close()
      except OSError as e:  # e.g. the disk is full: the run's own error says more
        log.warning("could not flush TensorBoard events: %s", e)


# ----------------------------------------------------------------------------------------------
# Hooks
# ----------------------------------------------------------------------------------------------
class HookBase:
  """A hook of the train loop (module docstring): override any of the methods below. `trainer`
  is a weak reference to the trainer, set by `TrainerBase.register_hooks`. Work done in
  `before_step` should be negligible (detectron2's convention); `after_train` runs after an error
  too, so it must not assume the run finished (`trainer.finished`)."""

  trainer: Any = None

  def before_train(self) -> None:
    """Before the first iteration."""

  def before_step(self) -> None:
    """Before each iteration's update."""

  def after_step(self) -> None:
    """After each iteration's update (`trainer.state` holds it)."""

  def on_metrics(self, iteration: int, metrics: Mapping[str, float]) -> None:
    """The host values of iteration `iteration`'s metrics (module docstring)."""

  def after_train(self) -> None:
    """After the last iteration, or after an error."""


class SWAFinish(HookBase):
  """End of SWA (engine/swa.py): at the last step of the schedule the parameters become the SWA
  average and the BatchNorm statistics are recomputed on the loader's next batches, before that
  step's checkpoint and evaluation."""

  def __init__(self, config):
    self.config = config

  def after_step(self):
    t = self.trainer
    if t.step == t.final_iter:
      batches = (t.to_device(b) for b in t.loader)
      t.state = swa_lib.finalize(self.config, t.state, t.model, t.mesh, batches)


class NonFiniteGuard(HookBase):
  """Raises `NonFiniteLossError` (after waiting for pending saves, so that the error names the
  newest checkpoint on disk) when an iteration's loss terms, total loss or gradient norm is not
  finite. Registered before every hook that uses the metrics: a non-finite iteration reaches none
  of them, and no checkpoint is written after it."""

  def on_metrics(self, iteration, metrics):
    bad = {k: v for k, v in metrics.items() if is_loss_term(k) and not math.isfinite(v)}
    if not bad:
      return
    bad.update(
        {
            k: v
            for k, v in metrics.items()
            if k.startswith(step_lib.AUX_PREFIX) and not math.isfinite(v)
        }
    )
    ck = self.trainer.checkpointer
    ck.wait()
    raise NonFiniteLossError(iteration, bad, ck.latest_step(), ck.directory)


class PeriodicWriter(HookBase):
  """`train/<metric>` TensorBoard scalars every `period` steps and at the end of the run: the mean
  of each metric over the iterations since the last write (`lr`: the newest value), and
  `train/images_per_sec` (the first iteration, compilation, excluded); shown on `progress` too."""

  def __init__(self, period: int, progress: Optional["ProgressBar"] = None):
    self.period = int(period)
    self.progress = progress
    self._window: list[dict] = []
    self._t, self._images = time.perf_counter(), 0

  def before_train(self):
    self._window = []
    self._t, self._images = time.perf_counter(), 0

  def on_metrics(self, iteration, metrics):
    self._window.append(metrics)

  def after_step(self):
    t = self.trainer
    self._images += _batch_size(t.batch)
    if t.iter == t.start_iter:  # exclude compilation from images/s
      t.fetch_metrics()
      self._t, self._images = time.perf_counter(), 0
    if t.step % self.period == 0 or t.step == t.end_iter:
      t.fetch_metrics()
      self.write(t.step)

  def write(self, step: int) -> None:
    """Writes (and clears) the window now, at `step` (nothing when it is empty)."""
    if not self._window:
      return
    now = time.perf_counter()
    ips = self._images / max(now - self._t, 1e-9)
    self._t, self._images = now, 0
    window = self._window
    means = {k: float(np.mean([w[k] for w in window if k in w])) for k in window[-1]}
    means["lr"] = window[-1].get("lr", float("nan"))
    window.clear()
    events = self.trainer.events
    events.write("train", means, step)
    events.write("train", {"images_per_sec": ips}, step)
    events.flush()
    if self.progress is not None:
      self.progress.show(means, ips)


class MetricsCallback(HookBase):
  """`fn(step, metrics)` with the host metrics of every iteration (step = iteration + 1)."""

  def __init__(self, fn: Callable[[int, Mapping[str, float]], None]):
    self.fn = fn

  def on_metrics(self, iteration, metrics):
    self.fn(iteration + 1, metrics)


class DivergenceHook(HookBase):
  """Feeds every iteration's metrics to a `DivergenceGuard` (settings as its arguments); raises
  `DivergenceError` when it trips, after `writer` wrote the window (the exploding values reach
  TensorBoard) and the pending saves finished. `suspect`: the last iteration seen looked
  diverging (`PeriodicCheckpointer` defers its saves meanwhile). The history starts empty at
  every `before_train` (on resume too). `lr_note`: the LR scaling line the error quotes."""

  def __init__(
      self,
      factor: float = 20.0,
      window: int = 100,
      patience: int = 5,
      min_steps: int = 20,
      *,
      lr_note: str = "",
      writer: Optional[PeriodicWriter] = None,
  ):
    self._settings = (factor, window, patience, min_steps)
    self.guard = DivergenceGuard(*self._settings)  # invalid settings raise here
    self.lr_note = lr_note
    self.writer = writer

  @property
  def suspect(self) -> bool:
    return self.guard.suspect

  @property
  def factor(self) -> float:
    return self.guard.factor

  def before_train(self):
    self.guard = DivergenceGuard(*self._settings)

  def on_metrics(self, iteration, metrics):
    report = self.guard.update(iteration, metrics)
    if report is None:
      return
    if self.writer is not None:
      self.writer.write(iteration + 1)  # the exploding values reach TensorBoard too
    ck = self.trainer.checkpointer
    ck.wait()
    raise DivergenceError(
        iteration, report, ck.latest_step(), ck.directory, metrics.get("lr"), self.lr_note
    )


class PeriodicCheckpointer(HookBase):
  """Saves `trainer.state` with `trainer.checkpointer` at its period (`should_save`) and at the
  end of the run (forced), after the metrics of every iteration up to it were checked. A save
  due while `guard.suspect` (the iteration that produced the state looked diverging) waits for
  the next normal iteration, and is skipped at the end of the run. Before each iteration: the
  check of the last asynchronous save (a failed one stops the run with one line)."""

  def __init__(self, guard: Optional[DivergenceHook] = None):
    self.guard = guard
    self.deferred = False  # a checkpoint came due while the guard was suspicious

  def before_train(self):
    self.deferred = False

  def before_step(self):
    self.trainer.checkpointer.check()

  def after_step(self):
    t = self.trainer
    ck, step = t.checkpointer, t.step
    if not (ck.should_save(step) or step == t.end_iter or self.deferred):
      return
    t.fetch_metrics()
    # The state after update k is saved only when iteration k was not suspect (its loss and
    # gradient norm looked normal); otherwise the save waits for a normal iteration.
    if self.guard is not None and self.guard.suspect:
      if not self.deferred:
        log.warning(
            "iteration %d: loss or gradient norm > %gx its running median; "
            "checkpoint of step %d deferred",
            t.iter,
            self.guard.factor,
            step,
        )
      self.deferred = True
      if step == t.end_iter:
        log.warning(
            "run ended while the loss looked diverging: no final checkpoint; the "
            "newest checkpoint is step %s",
            ck.latest_step(),
        )
      return
    if ck.save(step, t.state, force=step == t.end_iter or self.deferred):
      t.events.flush()  # the scalars up to a checkpoint survive a crash after it
    self.deferred = False


def _numbers(results: Mapping[str, Any]) -> dict:
  return {k: float(v) for k, v in results.items() if isinstance(v, (int, float, np.floating))}


class EvalHook(HookBase):
  """`eval_fn(state, step) -> metrics` every `period` steps and at the last step of the schedule;
  the numeric metrics go to TensorBoard as `eval/<name>`; `results[step]` keeps what it
  returned."""

  def __init__(self, eval_fn: Callable[[Any, int], Mapping[str, Any]], period: int):
    self.eval_fn = eval_fn
    self.period = int(period)
    self.results: dict[int, Any] = {}

  def after_step(self):
    t = self.trainer
    step = t.step
    if self.period <= 0 or not (step % self.period == 0 or step == t.final_iter):
      return
    t.fetch_metrics()
    results = self.eval_fn(t.state, step) or {}
    self.results[step] = results
    t.events.write("eval", _numbers(results), step)
    t.events.flush()


class ProgressBar(HookBase):
  """A tqdm bar over the whole schedule (`final_iter` steps), with the loss, LR and images/s of
  the last `PeriodicWriter` window."""

  def __init__(self):
    self._bar = None

  def before_train(self):
    from tqdm import tqdm  # start-up: only with train.progress_bar

    t = self.trainer
    self._bar = tqdm(
        total=t.final_iter, initial=t.start_iter, desc="train", dynamic_ncols=True, smoothing=0.1
    )

  def show(self, means: Mapping[str, float], ips: float) -> None:
    if self._bar is not None:
      self._bar.set_postfix(
          loss=f"{means['total_loss']:.4f}",
          lr=f"{means['lr']:.2e}",
          img_s=f"{ips:.1f}",
          refresh=False,
      )

  def after_step(self):
    self._bar.update(1)

  def after_train(self):
    if self._bar is not None:
      self._bar.close()
      self._bar = None


def _batch_size(batch: Mapping[str, Any]) -> int:
  x = batch["image"] if "image" in batch else jax.tree.leaves(batch)[0]
  return int(x.shape[0])


# ----------------------------------------------------------------------------------------------
# The loop's hooks from the config
# ----------------------------------------------------------------------------------------------
def default_hooks(
    config,
    *,
    eval_hook: Optional[EvalHook] = None,
    metrics_callback: Optional[Callable[[int, Mapping[str, float]], None]] = None,
) -> list:
  """The train loop's hooks, in their order (module docstring), from `config.train` (log_every,
  divergence_*, progress_bar), `config.swa` and `config.optim` (the LR line of the divergence
  error). `eval_hook`: periodic evaluation (e.g. `EvalHook(fn, config.train.eval_every)`);
  `metrics_callback(step, metrics)`: every iteration's host metrics."""
  tc = config.train
  progress = ProgressBar() if tc.progress_bar and jax.process_index() == 0 else None
  writer = PeriodicWriter(tc.log_every, progress)
  guard = DivergenceHook(
      tc.divergence_factor,
      tc.divergence_window,
      tc.divergence_patience,
      tc.divergence_min_steps,
      lr_note=optim.lr_scaling_message(config.optim, int(tc.batch_size) * jax.process_count()),
      writer=writer,
  )
  hooks = [
      SWAFinish(config) if swa_lib.swa_enabled(config) else None,
      NonFiniteGuard(),
      writer,
      MetricsCallback(metrics_callback) if metrics_callback is not None else None,
      guard,
      PeriodicCheckpointer(guard),
      eval_hook,
      progress,
  ]
  return [h for h in hooks if h is not None]
