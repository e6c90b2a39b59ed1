"""Orbax checkpoints of the TrainState in `<workdir>/checkpoints/<step>/`.

Thin wrapper around `orbax.checkpoint.CheckpointManager` (the stable v0 API):
* `save(step, state, force=False)` saves when `step % every == 0` (or `force`, used for the final
  step); saves are asynchronous (the device->host copy happens before `save` returns, so the donated
  state can be reused right away); `wait()` / `close()` block until they are on disk.
* keeps the newest `max_to_keep` checkpoints;
* a failed asynchronous save (disk full, permissions) is noticed at the next `check()` (the loop
  calls it every iteration) and raised as one `CheckpointSaveError` line naming the step, the
  folder, the cause and the last good checkpoint; folders of saves that never finished
  (`*.orbax-checkpoint-tmp*`) are removed when a run starts;
* `restore(abstract_state, step=None)` restores the latest (or given) step into the structure,
  dtypes and shardings of `abstract_state` (`step.abstract_train_state`: `jax.eval_shape` of the
  state with replicated `NamedSharding`s), so the restored arrays are already placed on the mesh.
* several processes (engine/distributed.py): every process creates its `Checkpointer` and calls
  `save` / `restore` / `close` for the same steps in the same order; Orbax writes each process's
  part of the arrays, process 0 the metadata and the final rename that commits a step, with
  barriers through JAX's distributed runtime between them. Process 0 alone removes unfinished
  saves, before the manager's start barrier (the others list the steps after it). The folder must
  be one every process sees. A checkpoint restores whatever the process / device count.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Optional

import orbax.checkpoint as ocp

from cn2_jax.errors import UserError

log = logging.getLogger(__name__)

TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointSaveError(UserError, OSError):
  """A checkpoint could not be written (e.g. no space left on the device)."""


def _root_cause(e: BaseException) -> BaseException:
  while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
    e = e.__cause__ or e.__context__
  return e


def remove_stale_tmp(directory: str) -> list:
  """Removes the folders of saves that never finished (a crash or a full disk mid-save)."""
  removed = []
  if os.path.isdir(directory):
    for name in sorted(os.listdir(directory)):
      if TMP_MARK in name:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        removed.append(name)
  if removed:
    log.warning("removed unfinished checkpoint folders in %s: %s", directory, ", ".join(removed))
  return removed


class Checkpointer:
  """Orbax CheckpointManager wrapper. `every <= 0` saves only when forced."""

  def __init__(
      self,
      workdir: str,
      *,
      every: int = 5000,
      max_to_keep: Optional[int] = 3,
      async_save: bool = True,
      subdir: str = "checkpoints",
  ):
    self.directory = os.path.abspath(os.path.join(workdir, subdir))
    self.every = int(every)
    self._pending_step: Optional[int] = None
    self._failed = False
    import jax  # noqa: PLC0415  (only process 0 cleans up the shared folder)

    if jax.process_index() == 0:
      remove_stale_tmp(self.directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
    )
    self._mngr = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    """Newest finished checkpoint step, or None."""
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def _raise_save_error(self, e: BaseException) -> None:
    self._failed = True
    cause = _root_cause(e)
    good = [s for s in self._mngr.all_steps() if s != self._pending_step]
    last = f"the last good checkpoint is step {max(good)}" if good else "no checkpoint was saved"
    raise CheckpointSaveError(
        f"saving checkpoint step {self._pending_step} to {self.directory} failed: "
        f"{type(cause).__name__}: {cause}; training stopped; {last}"
    ) from e

  def check(self) -> None:
    """Raises `CheckpointSaveError` if the last asynchronous save failed (non-blocking)."""
    if self._pending_step is None:
      return
    try:
      self._mngr.check_for_errors()
    except Exception as e:  # noqa: BLE001 - re-raised as one line naming the step and cause
      self._raise_save_error(e)

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Save `state` as `step` if due (or forced); returns whether a save was started."""
    step = int(step)
    self.check()
    if not (force or self.should_save(step)) or step in self._mngr.all_steps():
      return False
    # The previous save is normally long finished by the next one; waiting here makes any error
    # it had belong to it, not to the new step.
    self.wait()
    try:
      started = bool(self._mngr.save(step, args=ocp.args.StandardSave(state), force=True))
    except Exception as e:  # noqa: BLE001 - a synchronous failure (e.g. no room for the folder)
      self._pending_step = step
      self._raise_save_error(e)
    self._pending_step = step
    return started

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> Any:
    """Restore `step` (default: latest) into `abstract_state`'s structure/dtypes/shardings."""
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return self._mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def wait(self) -> None:
    """Block until pending asynchronous saves are finished (raises `CheckpointSaveError` if the
    last one failed)."""
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      if self._failed:
        return  # already reported
      self._raise_save_error(e)

  def close(self) -> None:
    try:
      self.wait()
    finally:
      try:
        self._mngr.close()
      except Exception:  # noqa: BLE001 - a failed save was already reported as one line
        if not self._failed:
          raise

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False
