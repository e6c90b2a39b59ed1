"""The train loop's trainer and hooks (cn2_jax/engine/loop.py `Trainer`, cn2_jax/engine/hooks.py)
on a fake step (no model, no compilation): the order of the calls, one-iteration-late metrics, a
hook that raises, the eval / checkpoint periods, the last step, the guards and the log window.
The same hooks on real training runs: tests/test_engine.py (resume, NaN, divergence, disk full),
tests/test_swa_ema.py (SWA finish), tests/test_app.py (evaluation)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from cn2_jax.config import base_config
from cn2_jax.engine import hooks
from cn2_jax.engine import loop


class FakeCheckpointer:
  """`checkpoint.Checkpointer`'s interface, in memory; `log` records saves and checks."""

  directory = "/run/checkpoints"

  def __init__(self, every=0, log=None):
    self.every = every
    self.saved = {}
    self.log = [] if log is None else log
    self.closed = False

  def should_save(self, step):
    return self.every > 0 and step % self.every == 0

  def save(self, step, state, *, force=False):
    if not (force or self.should_save(step)) or step in self.saved:
      return False
    self.saved[step] = state
    self.log.append(("save", step))
    return True

  def check(self):
    self.log.append(("check",))

  def wait(self):
    pass

  def latest_step(self):
    return max(self.saved) if self.saved else None

  def close(self):
    self.closed = True


class FakeEvents:

  def __init__(self):
    self.scalars = []
    self.flushes = 0
    self.closed = False

  def write(self, prefix, values, step):
    self.scalars += [(f"{prefix}/{k}", step, float(v)) for k, v in values.items()]

  def flush(self):
    self.flushes += 1

  def close(self):
    self.closed = True

  def tag(self, tag):
    return {s: v for t, s, v in self.scalars if t == tag}


def fake_step(loss=lambda k: 1.0):
  """`(state, batch) -> (state + 1, metrics)`: the state is the step count; iteration k's loss
  terms are `loss(k)` and 1.0, its LR 0.1 * k."""

  def step(state, batch):
    k = state
    assert batch["image"].shape == (2, 1)
    m = {"loss_a": loss(k), "loss_b": 1.0, "grad_norm": 1.0, "lr": 0.1 * k, "aux/n": 3.0}
    m["total_loss"] = m["loss_a"] + m["loss_b"]
    return state + 1, {k: np.float32(v) for k, v in m.items()}

  return step


def batches(start=0):
  k = start
  while True:
    yield {"image": jnp.full((2, 1), k)}  # device arrays: no mesh needed
    k += 1


def make_trainer(hook_list, *, start=0, end=6, final=None, every=0, loss=lambda k: 1.0, log=None):
  return loop.Trainer(
      fake_step(loss),
      start,
      batches(start),
      hook_list,
      start_iter=start,
      end_iter=end,
      final_iter=final,
      checkpointer=FakeCheckpointer(every, log),
      events=FakeEvents(),
  )


class Recorder(hooks.HookBase):

  def __init__(self, name, log, fetch_at=(), raise_at=None, raise_in_after_train=False):
    self.name, self.log = name, log
    self.fetch_at, self.raise_at = fetch_at, raise_at
    self.raise_in_after_train = raise_in_after_train

  def before_train(self):
    self.log.append((self.name, "before_train", self.trainer.iter))

  def before_step(self):
    self.log.append((self.name, "before_step", self.trainer.iter))

  def after_step(self):
    t = self.trainer
    self.log.append((self.name, "after_step", t.iter, t.state))
    if t.iter in self.fetch_at:
      t.fetch_metrics()
    if t.iter == self.raise_at:
      raise RuntimeError(f"{self.name} failed at {t.iter}")

  def on_metrics(self, iteration, metrics):
    self.log.append((self.name, "metrics", iteration))

  def after_train(self):
    self.log.append((self.name, "after_train", self.trainer.finished))
    if self.raise_in_after_train:
      raise ValueError(f"{self.name} could not close")


# ------------------------------------------------------------------------------------------------
# The trainer: order of the calls, metrics one iteration late, errors
# ------------------------------------------------------------------------------------------------
def test_hooks_are_called_in_order_with_metrics_one_iteration_late():
  log = []
  t = make_trainer([Recorder("a", log), None, Recorder("b", log)], start=2, end=4)
  assert t.train() == 4 and t.finished
  assert log == [
      ("a", "before_train", 2),
      ("b", "before_train", 2),
      ("a", "before_step", 2),
      ("b", "before_step", 2),
      ("a", "after_step", 2, 3),  # the state after update 2 is step 3
      ("b", "after_step", 2, 3),
      ("a", "before_step", 3),
      ("b", "before_step", 3),
      ("a", "metrics", 2),  # fetched once update 3 is dispatched
      ("b", "metrics", 2),
      ("a", "after_step", 3, 4),
      ("b", "after_step", 3, 4),
      ("a", "metrics", 3),  # the last iteration's: fetched before after_train
      ("b", "metrics", 3),
      ("a", "after_train", True),
      ("b", "after_train", True),
  ]
  assert t.checkpointer.closed and t.events.closed


def test_fetch_metrics_hands_them_over_at_once_and_only_once():
  log = []
  t = make_trainer([Recorder("a", log, fetch_at=(1, 2))], end=4)
  t.train()
  got = [(e[1], e[2]) for e in log if e[1] in ("metrics", "after_step")]
  assert got == [
      ("after_step", 0),
      ("metrics", 0),  # one iteration late, when update 1 is dispatched
      ("after_step", 1),
      ("metrics", 1),  # at once: the hook fetched them in after_step
      ("after_step", 2),
      ("metrics", 2),  # at once again (nothing was left for update 2 to hand over)
      ("after_step", 3),
      ("metrics", 3),  # at the end
  ]


def test_a_hook_that_raises_stops_the_run_and_every_hook_is_closed():
  log = []
  t = make_trainer([Recorder("a", log), Recorder("b", log, raise_at=3), Recorder("c", log)])
  with pytest.raises(RuntimeError, match="b failed at 3"):
    t.train()
  assert not t.finished and t.state == 4
  assert ("c", "after_step", 3, 4) not in log  # the hooks after it did not run
  assert not any(e[1] == "before_step" and e[2] == 4 for e in log)
  assert [e for e in log if e[1] == "after_train"] == [
      ("a", "after_train", False),
      ("b", "after_train", False),
      ("c", "after_train", False),
  ]
  assert ("a", "metrics", 3) not in log  # no metrics are handed over after an error
  assert t.checkpointer.closed and t.events.closed


def test_an_error_in_after_train_is_raised_after_every_hook_ran():
  log = []
  t = make_trainer([Recorder("a", log, raise_in_after_train=True), Recorder("b", log)], end=2)
  with pytest.raises(ValueError, match="a could not close"):
    t.train()
  assert ("b", "after_train", True) in log
  assert t.checkpointer.closed and t.events.closed


def test_loader_exhausted_and_not_a_hook():
  t = loop.Trainer(
      fake_step(),
      0,
      [{"image": jnp.zeros((2, 1))}] * 2,
      start_iter=0,
      end_iter=3,
      checkpointer=FakeCheckpointer(),
      events=FakeEvents(),
  )
  with pytest.raises(RuntimeError, match="loader exhausted at iteration 2 \\(expected 3\\)"):
    t.train()
  with pytest.raises(TypeError, match="HookBase"):
    make_trainer([object()])


def test_train_rejects_hooks_and_metrics_callback_together(tmp_path):
  with pytest.raises(ValueError, match="metrics_callback"):
    loop.train(base_config(), str(tmp_path), None, None, None, hooks=[], metrics_callback=print)


# ------------------------------------------------------------------------------------------------
# Periods and the last step
# ------------------------------------------------------------------------------------------------
def _eval_run(period, end, final):
  seen = []
  calls = []

  def eval_fn(state, step):
    calls.append((step, state, max(seen)))  # every metric up to this step was fetched first
    return {"AP": step / 10, "per_class": [1, 2], "count": np.float32(2)}

  ev = hooks.EvalHook(eval_fn, period)
  t = make_trainer([hooks.MetricsCallback(lambda s, m: seen.append(s)), ev], end=end, final=final)
  t.train()
  return calls, ev, t


def test_eval_every_period_and_at_the_last_step_of_the_schedule():
  calls, ev, t = _eval_run(period=3, end=8, final=8)
  assert calls == [(3, 3, 3), (6, 6, 6), (8, 8, 8)]
  assert t.events.tag("eval/AP") == {3: 0.3, 6: 0.6, 8: 0.8}
  assert t.events.tag("eval/count") == {3: 2.0, 6: 2.0, 8: 2.0}
  assert not t.events.tag("eval/per_class")  # only numbers go to TensorBoard
  assert sorted(ev.results) == [3, 6, 8] and ev.results[8]["per_class"] == [1, 2]
  # a run stopped early (stop_at_step) does not evaluate at its own last step
  calls, _, _ = _eval_run(period=3, end=5, final=8)
  assert [c[0] for c in calls] == [3]
  calls, _, _ = _eval_run(period=0, end=8, final=8)
  assert calls == []


def test_checkpoint_every_period_and_forced_at_the_end_of_the_run():
  log = []
  t = make_trainer([hooks.PeriodicCheckpointer()], end=5, final=8, every=2, log=log)
  t.train()
  assert t.checkpointer.saved == {2: 2, 4: 4, 5: 5}  # the state after the update of that step
  assert t.events.flushes == 3  # the scalars up to each checkpoint are flushed
  # the asynchronous-save check before every update
  assert [e for e in log if e[0] == "check"] == [("check",)] * 5
  t = make_trainer([hooks.PeriodicCheckpointer()], end=5, every=0)
  t.train()
  assert list(t.checkpointer.saved) == [5]


def test_a_checkpoint_waits_while_the_guard_is_suspicious():
  class SuspectAt(hooks.HookBase):
    factor = 20.0

    def __init__(self, iters):
      self.iters, self.suspect = iters, False

    def on_metrics(self, iteration, metrics):
      self.suspect = iteration in self.iters

  guard = SuspectAt({3})
  t = make_trainer([guard, hooks.PeriodicCheckpointer(guard)], end=8, every=2)
  t.train()
  assert list(t.checkpointer.saved) == [2, 5, 6, 8]  # step 4 (after suspect iteration 3) -> 5
  guard = SuspectAt({7})
  t = make_trainer([guard, hooks.PeriodicCheckpointer(guard)], end=8, every=2)
  t.train()
  assert list(t.checkpointer.saved) == [2, 4, 6]  # no final checkpoint from a suspect state


def test_swa_finish_at_the_last_step_of_the_schedule_only(monkeypatch):
  calls = []

  def finalize(config, state, model, mesh, batches):
    first = next(batches)  # the loader's next batches, on the devices
    calls.append((state, int(first["image"][0, 0])))
    return -state

  monkeypatch.setattr(hooks.swa_lib, "finalize", finalize)
  cfg = base_config()
  for end, final, want in ((6, 6, [(6, 6)]), (4, 6, [])):
    calls.clear()
    t = make_trainer([hooks.SWAFinish(cfg), hooks.PeriodicCheckpointer()], end=end, final=final)
    t.train()
    assert calls == want
    # the averaged state is what the last checkpoint holds
    assert t.checkpointer.saved == ({6: -6} if want else {4: 4})


# ------------------------------------------------------------------------------------------------
# Guards and the log window
# ------------------------------------------------------------------------------------------------
def test_non_finite_guard_stops_before_the_other_hooks_see_the_iteration():
  seen = []
  t = make_trainer(
      [
          hooks.NonFiniteGuard(),
          hooks.MetricsCallback(lambda s, m: seen.append(s)),
          hooks.PeriodicCheckpointer(),
      ],
      end=8,
      every=2,
      loss=lambda k: math.nan if k == 3 else 1.0,
  )
  with pytest.raises(hooks.NonFiniteLossError) as ei:
    t.train()
  err = ei.value
  assert err.iteration == 3 and err.last_checkpoint == 2
  assert set(err.terms) == {"loss_a", "total_loss"}
  assert seen == [1, 2, 3] and list(t.checkpointer.saved) == [2]
  assert "last good checkpoint is step 2 in /run/checkpoints" in str(err)


def test_divergence_hook_writes_the_window_then_stops():
  writer = hooks.PeriodicWriter(100)
  guard = hooks.DivergenceHook(20, 10, 2, 4, lr_note="lr 0.1", writer=writer)
  t = make_trainer(
      [hooks.NonFiniteGuard(), writer, guard, hooks.PeriodicCheckpointer(guard)],
      end=20,
      every=4,
      loss=lambda k: 1e4 if k >= 6 else 1.0,
  )
  with pytest.raises(hooks.DivergenceError) as ei:
    t.train()
  err = ei.value
  assert err.iteration == 7 and err.report["first"] == 6 and list(err.terms) == ["loss_a"]
  assert err.last_checkpoint == 4 and err.lr == pytest.approx(0.7)
  assert "lr 0.1" in str(err)
  # the window up to the tripping iteration reached TensorBoard, at its step
  assert list(t.events.tag("train/total_loss")) == [8]
  assert list(t.checkpointer.saved) == [4]
  with pytest.raises(ValueError, match="divergence_factor"):
    hooks.DivergenceHook(0.5)


def test_periodic_writer_means_lr_and_images_per_second():
  writer = hooks.PeriodicWriter(2)
  t = make_trainer([writer], end=5, loss=lambda k: float(k))
  t.train()
  ev = t.events
  assert ev.tag("train/loss_a") == {2: 0.5, 4: 2.5, 5: 4.0}  # means of (0, 1), (2, 3), (4)
  assert ev.tag("train/lr") == pytest.approx({2: 0.1, 4: 0.3, 5: 0.4})  # the newest value
  assert ev.tag("train/aux/n") == {2: 3.0, 4: 3.0, 5: 3.0}
  ips = ev.tag("train/images_per_sec")
  assert sorted(ips) == [2, 4, 5] and all(v > 0 for v in ips.values())


# ------------------------------------------------------------------------------------------------
# The hooks from the config
# ------------------------------------------------------------------------------------------------
def test_default_hooks_order():
  cfg = base_config()
  cfg.train.progress_bar = False

  def names(hs):
    return [type(h).__name__ for h in hs]

  assert names(hooks.default_hooks(cfg)) == [
      "NonFiniteGuard",
      "PeriodicWriter",
      "DivergenceHook",
      "PeriodicCheckpointer",
  ]
  cfg.train.progress_bar = True
  cfg.swa.iters = 4
  ev = hooks.EvalHook(lambda s, k: {}, 2)
  hs = hooks.default_hooks(cfg, eval_hook=ev, metrics_callback=print)
  assert names(hs) == [
      "SWAFinish",
      "NonFiniteGuard",
      "PeriodicWriter",
      "MetricsCallback",
      "DivergenceHook",
      "PeriodicCheckpointer",
      "EvalHook",
      "ProgressBar",
  ]
  assert hs[6] is ev and hs[5].guard is hs[4] and hs[4].writer is hs[2]
  assert hs[2].progress is hs[7]
