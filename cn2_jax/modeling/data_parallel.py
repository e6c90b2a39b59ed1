"""The data-parallel axis as the model sees it: the device's index and batch-wide means that stay
exact when the train step runs each device's batch as several micro-batches.

The train step (engine/step.py) runs the model once per device with `axis_name='data'`. Two things
in the model look across devices: a loss normaliser that counts over the whole batch is averaged
over the axis (`device_mean`: the official all-reduce sum / world size, e.g. CenterNet's N̄), and
per-image random keys come from the image's global index (`device_index(axis_name) × per-device
batch + i`, the cascade's ROI sampling), so that sampling does not depend on the device count.

Gradient accumulation (`train.grad_accum_steps = k`) runs each device's batch as k micro-batches
one after the other (a `lax.scan`). Micro-batch j of device d then plays the part of device
d·k + j of n·k devices (n = mesh size), so that k micro-batches of b images on n devices are
exactly one step of n·k devices with b images each:
  * `device_index` returns d·k + j;
  * `device_mean` must average over all n·k: the step first runs the forward of every
    micro-batch recording the values given to `device_mean` (`micro_batch(..., record=True)`;
    XLA keeps of that pass only what the recorded values need, which for the count normalisers
    is the targets), averages them over micro-batches and devices, and replays those means, in
    call order, in the pass that computes the gradients (`micro_batch(..., replay=means)`).
    A value given to `device_mean` must not depend on the result of another `device_mean` (the
    recording pass returns the per-micro-batch means).
Outside `micro_batch` both are the plain collectives. The context is a `contextvars.ContextVar`
read when the model is traced (as `export_mode`), not part of jax's trace caches.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Iterator, List, Optional, Sequence

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class MicroBatch:
  """The micro-batch being traced: `index` (traced int32 scalar j), `count` (k, static), and
  either `recorded` (recording: the values given to `device_mean`, in call order) or `replay`
  (the means to return, in call order; `calls` counts them)."""

  index: jax.Array
  count: int
  recorded: Optional[List[jax.Array]] = None
  replay: Optional[Sequence[jax.Array]] = None
  calls: int = 0


_MICRO_BATCH = contextvars.ContextVar("cn2_jax_micro_batch", default=None)


@contextlib.contextmanager
def micro_batch(
    index: jax.Array,
    count: int,
    *,
    record: bool = False,
    replay: Optional[Sequence[jax.Array]] = None,
) -> Iterator[MicroBatch]:
  """While active, the model is traced as micro-batch `index` of `count` (see module docstring):
  `record=True` collects the `device_mean` inputs in `.recorded`; `replay` = the means to return
  instead (exactly one per `device_mean` call, else ValueError on exit)."""
  if record == (replay is not None):
    raise ValueError("micro_batch: give record=True or replay=..., not both / neither")
  state = MicroBatch(jnp.asarray(index, jnp.int32), int(count), [] if record else None, replay)
  token = _MICRO_BATCH.set(state)
  try:
    yield state
  finally:
    _MICRO_BATCH.reset(token)
  if replay is not None and state.calls != len(replay):
    raise ValueError(
        f"micro_batch: {len(replay)} recorded device_mean value(s) but {state.calls} call(s) in "
        "the replayed pass (the model must make the same calls in both passes)"
    )


def device_mean(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
  """Mean of `x` over the data axis (`lax.pmean`; `x` itself when `axis_name` is None); inside a
  micro-batch pass the mean over all micro-batches of all devices (module docstring)."""
  if axis_name is None:
    return x
  state = _MICRO_BATCH.get()
  if state is None or state.recorded is not None:
    if state is not None:
      state.recorded.append(x)
    return jax.lax.pmean(x, axis_name)
  if state.calls >= len(state.replay):
    raise ValueError(
        f"micro_batch: more device_mean calls than the {len(state.replay)} recorded ones"
    )
  value = state.replay[state.calls]
  state.calls += 1
  if jnp.shape(value) != jnp.shape(x):
    raise ValueError(f"device_mean: replayed shape {jnp.shape(value)} != {jnp.shape(x)}")
  return jnp.asarray(value, jnp.result_type(x))


def device_index(axis_name: Optional[str]) -> jax.Array:
  """This device's index on the data axis (0 when `axis_name` is None); inside a micro-batch pass
  the index of the micro-batch among all devices' micro-batches, d·k + j."""
  if axis_name is None:
    return jnp.int32(0)
  index = jax.lax.axis_index(axis_name)
  state = _MICRO_BATCH.get()
  if state is None:
    return index
  return index * state.count + state.index
