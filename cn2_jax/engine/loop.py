"""Training loop: restore-or-init, jitted data-parallel steps, logging, checkpoints, NaN guard.

Model and data are built by the caller (main.py) and passed in:

    from cn2_jax.engine import loop
    loop.maybe_initialize_distributed()          # first thing in main(), before any other JAX call
    state = loop.train(config, workdir, model, init_variables_fn, train_loader_fn,
                       frozen_prefixes=optim.resnet_frozen_prefixes(2))

* `config.optim` (or `config.solver`): optimizer / schedule fields (`optim.default_solver_config()`);
  `config.train`: loop fields (`default_train_config()`; missing fields take those defaults, other
  fields such as `batch_size` are ignored here); `config.seed` (if present) overrides `train.seed`.
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
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np

from cn2_jax.engine import checkpoint as ckpt_lib
from cn2_jax.engine import optim
from cn2_jax.engine import step as step_lib

log = logging.getLogger(__name__)


def default_train_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      seed=0,
      log_every=20,            # TensorBoard scalars (means over the window) + progress-bar postfix
      checkpoint_every=5000,   # also saved at the last step of the run
      keep_checkpoints=3,      # Orbax max_to_keep (alias: max_to_keep)
      async_checkpoint=True,
      eval_every=0,            # 0: never call eval_fn during training
      check_vma=False,         # see step.py docstring
      progress_bar=True,
  ))


class NonFiniteLossError(FloatingPointError):
  """Raised when a loss term, the total loss or the gradient norm is NaN/Inf."""

  def __init__(self, iteration: int, terms: Mapping[str, float], last_checkpoint: Optional[int],
               directory: str):
    self.iteration = iteration
    self.terms = dict(terms)
    self.last_checkpoint = last_checkpoint
    bad = ", ".join(f"{k}={v}" for k, v in self.terms.items())
    where = (f"the last good checkpoint is step {last_checkpoint} in {directory}"
             if last_checkpoint is not None else f"no checkpoint exists in {directory}")
    super().__init__(
        f"Non-finite loss at iteration {iteration} (0-based loader batch {iteration}; update "
        f"state.step {iteration} -> {iteration + 1}): {bad}. Training stopped; no checkpoint was "
        f"written from this state; {where}.")


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
    jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(num) if num else None,
                               process_id=int(pid) if pid else None)
    return True
  if int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    jax.distributed.initialize()
    return True
  return False


def _train_cfg(config) -> ml_collections.ConfigDict:
  tc = default_train_config()
  user = getattr(config, "train", None)
  if user is not None:
    for k in (user.keys() if hasattr(user, "keys") else vars(user)):
      tc[k] = user[k] if hasattr(user, "keys") else getattr(user, k)
  if "max_to_keep" in tc:
    tc.keep_checkpoints = tc.max_to_keep
  if getattr(config, "seed", None) is not None:
    tc.seed = int(config.seed)
  return tc


def _solver_cfg(config):
  for name in ("optim", "solver"):
    sub = getattr(config, name, None)
    if sub is not None:
      return sub
  raise ValueError("config needs an `optim` (or `solver`) section, see optim.default_solver_config()")


def _is_loss_term(k: str) -> bool:
  return not k.startswith(step_lib.AUX_PREFIX) and k != "lr"


def _batch_size(batch: Mapping[str, Any]) -> int:
  x = batch["image"] if "image" in batch else jax.tree.leaves(batch)[0]
  return int(x.shape[0])


def _to_device(batch: Mapping[str, Any], mesh) -> dict:
  if all(isinstance(x, jax.Array) for x in jax.tree.leaves(batch)):
    return dict(batch)
  return step_lib.shard_batch(batch, mesh)


def train(config: Any, workdir: str, model: Any,
          init_variables_fn: Callable[[jax.Array], Mapping[str, Any]],
          train_loader_fn: Callable[[int], Iterable[Mapping[str, Any]]], *,
          mesh=None,
          frozen_prefixes: Sequence[str] = (),
          no_decay_fn: Callable[[str], bool] = optim.is_norm_param,
          load_pretrained_fn: Optional[Callable[[Any], Any]] = None,
          eval_fn: Optional[Callable[[step_lib.TrainState, int], Mapping[str, float]]] = None,
          metrics_callback: Optional[Callable[[int, Mapping[str, float]], None]] = None,
          stop_at_step: Optional[int] = None) -> step_lib.TrainState:
  """Train (or resume) until `config.optim.max_iter` updates; returns the final state.

  `stop_at_step` ends this run early at that step (saving a checkpoint there) without changing the
  schedule, e.g. for time-budgeted runs. `metrics_callback(step, metrics)` receives the host values
  of every iteration's metrics (step = state.step after the update). `eval_fn(state, step)` runs
  every `config.train.eval_every` steps and at `max_iter`; its returned scalars go to TensorBoard
  under `eval/`. Raises `NonFiniteLossError` on a NaN/Inf loss (see module docstring).
  """
  solver = _solver_cfg(config)
  tc = _train_cfg(config)
  mesh = step_lib.make_mesh() if mesh is None else mesh
  frozen_prefixes = tuple(frozen_prefixes)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)

  schedule = optim.make_lr_schedule(solver)
  tx = optim.make_optimizer(solver, None, frozen_prefixes, no_decay_fn)
  abstract = step_lib.abstract_train_state(init_variables_fn, tx, mesh)
  optim.validate_frozen_prefixes(abstract.params, frozen_prefixes)

  ckpt = ckpt_lib.Checkpointer(workdir, every=tc.checkpoint_every, max_to_keep=tc.keep_checkpoints,
                               async_save=tc.async_checkpoint)
  rng = jax.random.PRNGKey(tc.seed)
  latest = ckpt.latest_step()
  if latest is not None:
    state = ckpt.restore(abstract, latest)
    log.info("resumed from %s/%d", ckpt.directory, latest)
  elif load_pretrained_fn is not None:
    init_key = jax.random.split(rng)[0]
    variables = jax.jit(init_variables_fn)(init_key)
    variables = load_pretrained_fn(jax.device_get(variables))
    state = step_lib.state_from_variables(variables, tx, rng, mesh)
  else:
    state = step_lib.init_train_state(init_variables_fn, tx, rng, mesh)

  max_iter = int(solver.max_iter)
  end = max_iter if stop_at_step is None else min(max_iter, int(stop_at_step))
  start = int(jax.device_get(state.step))
  if start >= end:
    log.info("nothing to do: state.step=%d >= %d", start, end)
    ckpt.close()
    return state

  train_step = step_lib.make_train_step(model, tx, mesh, frozen_prefixes=frozen_prefixes,
                                        lr_schedule=schedule, check_vma=tc.check_vma)
  writer = None
  if is_main:
    from tensorboardX import SummaryWriter
    writer = SummaryWriter(logdir=workdir, purge_step=start + 1)
  pbar = None
  if is_main and tc.progress_bar:
    from tqdm import tqdm
    pbar = tqdm(total=max_iter, initial=start, desc="train", dynamic_ncols=True, smoothing=0.1)

  window: list[dict] = []
  state_ = {"t": time.perf_counter(), "images": 0}

  def consume(it_k: int, metrics) -> dict:
    """Fetch iteration it_k's metrics, check them, record them."""
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = {k: v for k, v in m.items() if _is_loss_term(k) and not math.isfinite(v)}
    if bad:
      bad.update({k: v for k, v in m.items() if k.startswith(step_lib.AUX_PREFIX)
                  and not math.isfinite(v)})
      ckpt.wait()
      raise NonFiniteLossError(it_k, bad, ckpt.latest_step(), ckpt.directory)
    window.append(m)
    if metrics_callback is not None:
      metrics_callback(it_k + 1, m)
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
      pbar.set_postfix(loss=f"{means['total_loss']:.4f}", lr=f"{means['lr']:.2e}",
                       img_s=f"{ips:.1f}", refresh=False)

  loader = iter(train_loader_fn(start))
  pending = None
  try:
    for k in range(start, end):
      try:
        batch = next(loader)
      except StopIteration:
        raise RuntimeError(f"train loader exhausted at iteration {k} (expected {end})") from None
      batch = _to_device(batch, mesh)
      state, metrics = train_step(state, batch)
      done = k + 1
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
      eval_now = eval_fn is not None and tc.eval_every > 0 and (
          done % tc.eval_every == 0 or done == max_iter)
      if pending is not None and (log_now or save_now or eval_now):
        consume(*pending)
        pending = None
      if log_now and window:
        write_logs(done)
      if save_now:
        ckpt.save(done, state, force=done == end)
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
    ckpt.close()
    if writer is not None:
      writer.close()
    if pbar is not None:
      pbar.close()
  return state
