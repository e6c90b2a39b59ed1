"""Orbax I/O of converted variables: `save_variables` / `restore_saved_variables` write and read
`{'params': ..., 'frozen': ...}` with Orbax's StandardCheckpointer (what `python -m
cn2_jax.convert` writes; training checkpoints are `cn2_jax/engine/checkpoint.py`'s)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cn2_jax.errors import ConversionError

# ----------------------------------------------------------------------------------------------
# Orbax.
# ----------------------------------------------------------------------------------------------


def save_variables(variables, out_dir, *, overwrite: bool = False) -> Path:
  """Saves `{'params': ..., 'frozen': ...}` with Orbax's StandardCheckpointer at `out_dir`."""
  # Start-up time: jax and orbax (~2 s) are only needed here; reading official checkpoints
  # (reader.py, rename.py) does without them.
  import jax
  import orbax.checkpoint as ocp

  out_dir = Path(out_dir).absolute()
  tree = jax.tree_util.tree_map(np.asarray, variables)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(out_dir, tree, force=overwrite)
    ckptr.wait_until_finished()
  return out_dir


def restore_saved_variables(ckpt_dir, target=None):
  """Restores what `save_variables` wrote. `target` (arrays or ShapeDtypeStruct) fixes the
  structure / dtypes / shardings; without it the tree is restored as saved (numpy leaves)."""
  import jax  # start-up time, as in save_variables
  import orbax.checkpoint as ocp  # start-up time, as in save_variables

  ckpt_dir = Path(ckpt_dir).absolute()
  if not ckpt_dir.exists():
    raise ConversionError(f"{ckpt_dir}: no such checkpoint directory")
  abstract = None
  if target is not None:

    def to_abstract(x):
      if isinstance(x, jax.ShapeDtypeStruct):
        return x
      return jax.ShapeDtypeStruct(np.shape(x), getattr(x, "dtype", None) or np.asarray(x).dtype)

    abstract = jax.tree_util.tree_map(to_abstract, target)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(ckpt_dir, abstract) if abstract is not None else ckptr.restore(ckpt_dir)
