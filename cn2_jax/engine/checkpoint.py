"""Orbax checkpoints of the TrainState in `<workdir>/checkpoints/<step>/`.

Thin wrapper around `orbax.checkpoint.CheckpointManager` (the stable v0 API):
* `save(step, state, force=False)` saves when `step % every == 0` (or `force`, used for the final
  step); saves are asynchronous (the device->host copy happens before `save` returns, so the donated
  state can be reused right away); `wait()` / `close()` block until they are on disk.
* keeps the newest `max_to_keep` checkpoints;
* `restore(abstract_state, step=None)` restores the latest (or given) step into the structure,
  dtypes and shardings of `abstract_state` (`step.abstract_train_state`: `jax.eval_shape` of the
  state with replicated `NamedSharding`s), so the restored arrays are already placed on the mesh.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import orbax.checkpoint as ocp


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

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Save `state` as `step` if due (or forced); returns whether a save was started."""
    step = int(step)
    if not (force or self.should_save(step)) or step in self._mngr.all_steps():
      return False
    return bool(self._mngr.save(step, args=ocp.args.StandardSave(state), force=True))

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> Any:
    """Restore `step` (default: latest) into `abstract_state`'s structure/dtypes/shardings."""
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return self._mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def wait(self) -> None:
    """Block until pending asynchronous saves are finished."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False
