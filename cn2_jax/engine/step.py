"""Data-parallel train / eval steps: `jax.jit` + `jax.shard_map` over a 1-D `'data'` mesh.

Written "the pmap way": the body is per-device code (per-device batch, per-device rng, the model's
loss normalisers `pmean` over `axis_name='data'`), wrapped in `jax.shard_map` (batch leaves
`P('data')` on the leading axis, train state replicated `P()`) inside `jax.jit` with the state
donated. No `jax.pmap`, no `device_put_sharded/replicated`.

Gradient averaging and `check_vma`. With `check_vma=True`, JAX tracks which values vary across the
mesh; the transpose of the implicit broadcast of a replicated (`P()`) parameter is a `psum`, so
`jax.grad` w.r.t. replicated params comes back ALREADY summed over devices and a further `pmean`
would give gradients n_devices times too large. `check_vma=True` also requires every
`while_loop`/`scan`/`cond` carry in the model to be vma-consistent (an invariant `jnp.zeros` carry
that becomes data-dependent is a TypeError), which detection code (NMS loops, sampling) trips over
and which the model cannot fix without knowing it runs under shard_map.
Choice: **`check_vma=False` by default** (exactly pmap semantics: per-device gradients, then an
explicit `lax.pmean`). `check_vma=True` is supported too: the already-summed gradients are divided
by the axis size instead. Both are tested against a 1-device run on the same global batch.

Gradient accumulation (`train.grad_accum_steps = k`, `make_train_step(grad_accum_steps=k)`).
`train.batch_size` stays the optimizer batch of each process (detectron2's IMS_PER_BATCH: the LR
scaling by `optim.reference_batch_size` and the epochs count it, and the loader delivers it in one
piece); the step splits each device's share into k micro-batches of b = per-device batch / k
images (contiguous: micro-batch j holds images j·b .. j·b + b - 1) and runs them one after the
other in a `lax.scan`, adding their float32 gradients, then applies one optimizer update. Only the
activations of one micro-batch are live at a time; the compiled step is one program (one compile
per input shape, as without accumulation).
The contract: **k micro-batches of b images on n devices are one step of n·k devices with b images
each**, exactly (micro-batch j of device d is "device" d·k + j, modeling/data_parallel.py):
  * losses and gradients are averaged over the n·k micro-batches, as over devices;
  * a loss normaliser that counts over the whole batch (`data_parallel.device_mean`: CenterNet2's
    proposal N̄ and R̄, the official one-stage CenterNet's) is the mean over all n·k micro-batches,
    as the official all-reduce over n·k GPUs: a first pass runs the forward of every micro-batch
    for those counts (XLA keeps of it only what they need: the targets, or the whole forward for
    a count that depends on the predictions, e.g. MORE_POS), the second pass computes the
    gradients with them;
  * what is normalised per device stays per micro-batch, as per GPU officially: the cascade's ROI
    losses (per sampled row), the centerX losses (per-device N_pos), the official canvas (the
    micro-batch's largest image, modeling/canvas.py), the federated loss's class set;
  * per-image random keys follow the global image index (d·k + j)·b + i, so ROI sampling equals
    that of one device holding the whole per-device batch;
  * trainable BatchNorm (the one-stage family) normalises each micro-batch with its own
    statistics ("BN": b images, as each official GPU; "SyncBN": the n·b images of micro-batch j
    on every device, not n·k·b), and the running statistics are updated once per step: each
    micro-batch's update is computed from the same running values and the k results averaged
    (then over devices), which equals n·k devices exactly.
Hence k × b equals one device with k·b images exactly (to float rounding) where the per-device
normalisations agree: micro-batches with the same number of sampled ROI rows and the same
official canvas (e.g. every image on the same canvas and at least `batch_size_per_image` rows per
image), no trainable BatchNorm in training mode, equal per-micro-batch centerX positives.
`grad_accum_steps = 1` is the plain step, bit-identical to before.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import flax
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cn2_jax import schema
from cn2_jax.engine.optim import FROZEN, param_labels
from cn2_jax.errors import ConfigError
from cn2_jax.modeling import data_parallel

DATA_AXIS = "data"
AUX_PREFIX = "aux/"


# ----------------------------------------------------------------------------------------------
# Mesh and host -> device transfer
# ----------------------------------------------------------------------------------------------
def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """1-D mesh `('data',)` over `devices` (default: all devices of all processes), Auto axis type.

  (`jax.make_mesh` would default to Explicit axes; a plain `Mesh` with Auto is what data-parallel
  `shard_map` code wants.)
  """
  devs = np.asarray(jax.devices() if devices is None else list(devices))
  return Mesh(devs, (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def _num_local_devices(mesh: Mesh) -> int:
  pid = jax.process_index()
  return sum(1 for d in mesh.devices.flat if d.process_index == pid)


def shard_batch(
    batch: Mapping[str, Any], mesh: Mesh, keys: Optional[Sequence[str]] = None
) -> dict[str, jax.Array]:
  """Host (numpy) batch -> global `jax.Array`s sharded `P('data')` on the leading axis.

  Each process passes its own local slice (leading dim = per-process batch); the global batch is
  the concatenation over processes (`jax.make_array_from_process_local_data`), so this is correct
  for multi-host too. `keys` selects a subset (e.g. leave `image_id` / `orig_hw` on the host).
  64-bit leaves are narrowed to 32 bits when `jax_enable_x64` is off (COCO ids fit in int32).
  Raises ValueError when a leaf's leading dim is not divisible by this process's device count.
  """
  n_local = _num_local_devices(mesh)
  sharding = data_sharding(mesh)
  out = {}
  for k in (batch.keys() if keys is None else keys):
    x = np.asarray(batch[k])
    if x.ndim == 0 or x.shape[0] % n_local:
      raise ValueError(
          f"shard_batch: leaf {k!r} has shape {x.shape}; its leading (batch) dim must be divisible "
          f"by the {n_local} local device(s) of the mesh (per-device batch must be an integer)"
      )
    if not jax.config.jax_enable_x64 and x.dtype.itemsize == 8:
      x = x.astype({"i": np.int32, "u": np.uint32, "f": np.float32}.get(x.dtype.kind, x.dtype))
    out[k] = jax.make_array_from_process_local_data(sharding, x)
  return out


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Put a (host or device) pytree on every device of `mesh` (sharding `P()`)."""
  return jax.device_put(tree, replicated(mesh))


def _check_divisible(batch: Any, n: int, what: str, grad_accum_steps: int = 1) -> None:
  for kp, x in jax.tree_util.tree_flatten_with_path(batch)[0]:
    shape = np.shape(x)
    if len(shape) == 0 or shape[0] % (n * grad_accum_steps):
      accum = (
          f" x {grad_accum_steps} micro-batches (grad_accum_steps)" if grad_accum_steps > 1 else ""
      )
      raise ValueError(
          f"{what}: batch leaf {jax.tree_util.keystr(kp)} has shape {tuple(shape)}; the leading "
          f"(global batch) dim must be divisible by the {n} device(s) of the 'data' mesh "
          f"axis{accum}"
      )


# ----------------------------------------------------------------------------------------------
# Train state
# ----------------------------------------------------------------------------------------------
@flax.struct.dataclass
class TrainState:
  """Everything that is checkpointed. `step` = number of updates applied so far (int32 scalar).

  `rng` is a raw uint32[2] key, constant over training; the per-step key is
  `fold_in(rng, step)`, the same on every device, so a resumed run draws the same keys. The model
  derives per-image keys from the *global* image index (device index x per-device batch + i), so
  random sampling does not depend on how the batch is split over devices.
  """

  step: jax.Array
  params: Any
  frozen: Any
  opt_state: Any
  rng: jax.Array
  # Running statistics of trainable BatchNorm (the one-stage family), updated by every train step
  # and averaged over devices; {} for a family without them (CenterNet2: FrozenBN or GN).
  batch_stats: Any = flax.struct.field(default_factory=dict)
  # Weight averages (engine/swa.py), {} when off (config ema.decay=0 / swa.iters=0): `ema` =
  # {'params', 'batch_stats'}, `swa` = {'params': running mean, 'n': snapshots}.
  ema: Any = flax.struct.field(default_factory=dict)
  swa: Any = flax.struct.field(default_factory=dict)

  @property
  def variables(self) -> dict:
    """`{'params', 'frozen' | 'batch_stats'}` for `model.apply` (eval / export)."""
    return _variables(self.params, self.frozen, self.batch_stats)


def _variables(params, frozen, batch_stats=None) -> dict:
  v = {"params": params}
  if frozen is not None and jax.tree_util.tree_leaves(frozen):
    v["frozen"] = frozen
  if batch_stats is not None and jax.tree_util.tree_leaves(batch_stats):
    v["batch_stats"] = batch_stats
  return v


def _raw_key(rng) -> jax.Array:
  rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  return rng


def make_train_state_fn(
    init_variables_fn: Callable[[jax.Array], Mapping[str, Any]], tx: optax.GradientTransformation
) -> Callable[[jax.Array], TrainState]:
  """`rng -> TrainState` (pure, jit/eval_shape-able): `init_variables_fn(init_key)` then `tx.init`."""

  def fn(rng):
    rng = _raw_key(rng)
    init_key, state_key = jax.random.split(rng)
    variables = dict(init_variables_fn(init_key))
    params = variables.pop("params")
    frozen = variables.pop("frozen", {})
    batch_stats = variables.pop("batch_stats", {})
    if variables:
      raise ValueError(
          f"unexpected variable collections {sorted(variables)} "
          "(the Model API has only 'params', 'frozen' and 'batch_stats')"
      )
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        frozen=frozen,
        opt_state=tx.init(params),
        rng=state_key,
        batch_stats=batch_stats,
    )

  return fn


def init_train_state(init_variables_fn, tx, rng, mesh: Mesh) -> TrainState:
  """Initialise the state directly replicated on `mesh` (jit with replicated out_shardings)."""
  fn = make_train_state_fn(init_variables_fn, tx)
  return jax.jit(fn, out_shardings=replicated(mesh))(_raw_key(rng))


def state_from_variables(variables: Mapping[str, Any], tx, rng, mesh: Mesh) -> TrainState:
  """TrainState from given (e.g. pretrained, host numpy) variables, replicated on `mesh`."""
  variables = replicate(dict(variables), mesh)
  fn = make_train_state_fn(lambda _: variables, tx)
  return jax.jit(fn, out_shardings=replicated(mesh))(replicate(_raw_key(rng), mesh))


def abstract_train_state(init_variables_fn, tx, mesh: Mesh) -> TrainState:
  """`jax.eval_shape` of the state with replicated shardings attached (Orbax restore target)."""
  fn = make_train_state_fn(init_variables_fn, tx)
  shapes = jax.eval_shape(fn, jax.ShapeDtypeStruct((2,), jnp.uint32))
  repl = replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), shapes)


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------
def _validate_grad_accum(cfg) -> None:
  k = cfg.train.grad_accum_steps
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ConfigError(f"train.grad_accum_steps must be an integer >= 1, got {k!r}")
  if int(cfg.train.batch_size) % k:
    raise ConfigError(
        f"train.batch_size={cfg.train.batch_size} (the optimizer batch of each process) must be "
        f"divisible by train.grad_accum_steps={k}: each device's share is split into {k} "
        "micro-batches of equal size"
    )


CONFIG = schema.group(
    "train",
    "Gradient accumulation in the train step (engine/step.py).",
    schema.Field(
        "grad_accum_steps",
        1,
        "k micro-batches per optimizer step: each device's share of train.batch_size (still the "
        "optimizer batch, detectron2's IMS_PER_BATCH, which the LR scaling counts) runs as k "
        "micro-batches in sequence, their gradients summed, then one update; activation memory "
        "is that of one micro-batch. k micro-batches on n devices equal n*k devices exactly "
        "(batch-wide loss normalisers included; BatchNorm statistics per micro-batch); "
        "1 = no accumulation",
    ),
    validate=_validate_grad_accum,
)


def total_loss(losses: Mapping[str, jax.Array]) -> jax.Array:
  """Sum of the loss terms (keys not starting with 'aux/'), in float32."""
  terms = [jnp.asarray(v, jnp.float32) for k, v in losses.items() if not k.startswith(AUX_PREFIX)]
  if not terms:
    raise ValueError(f"model returned no loss terms (keys: {sorted(losses)})")
  return sum(terms)


# `loss_fn(model, batch, loss_inputs) -> apply`: see make_train_step.
LossFn = Callable[[Any, Mapping[str, Any], Any], Callable[..., Any]]


@dataclasses.dataclass(frozen=True)
class LossWrapper:
  """The student's training loss replaced (`make_train_step(loss_fn=fn)`), with the inputs every
  step receives (`train_step(state, batch, inputs)`, e.g. frozen teacher variables): built
  before the loop (`loop.train(loss=...)`), which replicates `inputs` once; never constants of
  the compiled step, never checkpointed, no gradient."""

  fn: LossFn
  inputs: Any = ()


def distillation_loss(
    teachers: Sequence[Callable[[Any, Any], Any]], kd_loss_fn: Callable[..., Any]
) -> LossFn:
  """Knowledge distillation as a `loss_fn` (`cn2_jax.modeling.onestage.kd`): `teachers[i](
  variables_i, batch)` is frozen teacher i's forward, run on the same per-device batch with
  `loss_inputs[i]` as its variables, inputs and outputs under `stop_gradient` (outside the
  gradient); `kd_loss_fn(model, variables, batch, teacher_outputs, **apply_kwargs)` then replaces
  `model.apply(variables, batch, train=True, **apply_kwargs)` for the student."""
  teachers = tuple(teachers)

  def loss_fn(model, batch, teacher_variables):
    t_out = tuple(
        jax.lax.stop_gradient(t(jax.lax.stop_gradient(tv), batch))
        for t, tv in zip(teachers, teacher_variables, strict=True)
    )
    return lambda v, b, train, **kw: kd_loss_fn(model, v, b, t_out, **kw)

  return loss_fn


def make_train_step(
    model: flax.linen.Module,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    frozen_prefixes: Sequence[str] = (),
    lr_schedule: Optional[optax.Schedule] = None,
    check_vma: bool = False,
    donate: bool = True,
    post_update: Optional[Callable[[TrainState], TrainState]] = None,
    loss_fn: Optional[LossFn] = None,
    teachers: Sequence[Callable[[Any, Any], Any]] = (),
    kd_loss_fn: Optional[Callable[..., Any]] = None,
    grad_accum_steps: int = 1,
):
  """Returns jitted `train_step(state, batch) -> (state, metrics)`.

  * `batch`: dict of arrays with the global batch on the leading axis (use `shard_batch`); the
    global batch must be divisible by the mesh size (ValueError at trace time otherwise).
  * `state`: TrainState replicated on `mesh` (donated: do not reuse the argument).
  * The per-device body applies `model.clone(axis_name='data')` with
    `rngs={'sampling': fold_in(state.rng, state.step)}` (see TrainState), sums the non-`aux/`
    losses, averages the gradients over devices (see module docstring), applies `tx`.
  * Parameters under `frozen_prefixes` get zero gradients *before* the all-reduce, so XLA drops
    their weight-gradient computation and communication (the optimizer zeroes them anyway).
  * `metrics` (replicated device scalars, averaged over devices, no host sync): every model output
    key, `total_loss`, `grad_norm` (global L2 norm of the averaged, unclipped, trainable
    gradients) and, when `lr_schedule` is given, `lr` (the lr used by this update).
  * `post_update(new_state) -> new_state` (optional, traced into the step): EMA / SWA averaging
    after the optimizer update (`cn2_jax.engine.swa.make_post_update`).
  * `loss_fn(model, batch, loss_inputs) -> apply` (optional, a `LossWrapper`'s `fn`): replaces the
    student's `model.apply(variables, batch, train=True, **apply_kwargs)` by the `apply` it returns
    (called per device, outside the gradient); `loss_inputs` is the step's third argument,
    `train_step(state, batch, loss_inputs)` (replicated, not in the state, no gradient).
  * Knowledge distillation (`cn2_jax.modeling.onestage.kd`): `teachers=` / `kd_loss_fn=` are
    shorthand for `loss_fn=distillation_loss(teachers, kd_loss_fn)`, the teachers' variables
    being `loss_inputs`.
  * `grad_accum_steps` (k, `config.train.grad_accum_steps`): each device's batch (divisible by k,
    ValueError at trace time otherwise) runs as k micro-batches with one update (module
    docstring); the teachers run per micro-batch; `metrics` are the means over micro-batches.
  """
  n_dev = mesh.shape[DATA_AXIS]
  accum = int(grad_accum_steps)
  if accum < 1:
    raise ValueError(f"make_train_step: grad_accum_steps must be >= 1, got {grad_accum_steps}")
  model_d = model.clone(axis_name=DATA_AXIS)
  tx = optax.with_extra_args_support(tx)  # update() gets value= (optim.skip_loss reads it)
  frozen_prefixes = tuple(frozen_prefixes)
  if teachers:  # knowledge distillation, the shorthand
    if loss_fn is not None:
      raise ValueError("make_train_step: give loss_fn or teachers / kd_loss_fn, not both")
    loss_fn = distillation_loss(teachers, kd_loss_fn)
  make_apply = loss_fn

  def per_device(state: TrainState, batch, loss_inputs=()):
    rng = jax.random.fold_in(state.rng, state.step)
    has_bn = bool(jax.tree_util.tree_leaves(state.batch_stats))

    def loss_fn(params, batch, apply):
      """(total, (losses, new batch_stats)) of one (micro-)batch; `apply`: see `apply_for`."""
      variables = _variables(params, state.frozen, state.batch_stats)
      if has_bn:
        losses, updates = apply(
            variables, batch, train=True, rngs={"sampling": rng}, mutable=["batch_stats"]
        )
        return total_loss(losses), (losses, updates["batch_stats"])
      losses = apply(variables, batch, train=True, rngs={"sampling": rng})
      return total_loss(losses), (losses, state.batch_stats)

    def apply_for(batch):
      """The student's forward for `batch` (with the `loss_fn` wrapper: the teachers run on it,
      outside the gradient)."""
      return model_d.apply if make_apply is None else make_apply(model_d, batch, loss_inputs)

    labels = param_labels(state.params, frozen_prefixes)
    if accum == 1:
      (total, (losses, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params, batch, apply_for(batch)
      )
    else:
      total, losses, batch_stats, grads = _accumulate(
          loss_fn, apply_for, state.params, batch, labels
      )
    # Per-device running statistics (BatchNorm without SyncBN) are averaged over the devices so the
    # replicated state stays one value (Flax's cross-replica mean; torch DDP with
    # broadcast_buffers=False, as centerX runs it, would keep rank 0's). Identity under SyncBN.
    batch_stats = jax.lax.pmean(batch_stats, DATA_AXIS)

    def reduce(g, label):
      if label == FROZEN:
        return jnp.zeros_like(g)
      if check_vma:  # already psum-ed by the transpose of the replicated->varying broadcast
        return g / n_dev
      return jax.lax.pmean(g, DATA_AXIS)

    grads = jax.tree.map(reduce, grads, labels)
    trainable = [g for g, l in zip(jax.tree.leaves(grads), jax.tree.leaves(labels)) if l != FROZEN]
    # value: the device-mean total loss, the same on every device (optim.skip_loss)
    mean_total = jax.lax.pmean(total, DATA_AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, value=mean_total)
    params = optax.apply_updates(state.params, updates)

    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in losses.items()}
    metrics["total_loss"] = total
    metrics = jax.lax.pmean(metrics, DATA_AXIS)
    metrics["grad_norm"] = (
        jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in trainable))
        if trainable
        else jnp.float32(0)
    )
    if lr_schedule is not None:
      metrics["lr"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, batch_stats=batch_stats
    )
    if post_update is not None:  # EMA / SWA running mean of the new params (engine/swa.py)
      new_state = post_update(new_state)
    return new_state, metrics

  def _accumulate(loss_fn, apply_for, params, batch, labels):
    """`loss_fn(params, micro_batch, apply_for(micro_batch))` and its gradient over the `accum`
    micro-batches of the per-device `batch` -> (total, losses, batch_stats, grads), each the mean
    over micro-batches (float32 gradient sums; frozen gradients are never added, so XLA drops
    their computation)."""
    micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)
    index = jnp.arange(accum, dtype=jnp.int32)

    # Pass 1: every micro-batch's inputs to the model's batch-wide means (data_parallel.py),
    # then their means over micro-batches and devices. Only what they depend on is computed.
    def record(_, xs):
      mb, j = xs
      with data_parallel.micro_batch(j, accum, record=True) as ctx:
        loss_fn(params, mb, apply_for(mb))  # the forward, for the recorded values only
      return None, tuple(jax.lax.stop_gradient(v) for v in ctx.recorded)

    _, recorded = jax.lax.scan(record, None, (micro, index))
    means = tuple(jax.lax.pmean(jnp.mean(r, axis=0), DATA_AXIS) for r in recorded)

    # Pass 2: gradients, with the means replayed.
    def step(acc, xs):
      mb, j = xs
      with data_parallel.micro_batch(j, accum, replay=means):
        apply = apply_for(mb)
        (total, (losses, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, mb, apply
        )
      acc = jax.tree.map(
          lambda a, g, label: a if label == FROZEN else a + g.astype(jnp.float32),
          acc,
          grads,
          labels,
      )
      return acc, (total, losses, stats)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    acc, (totals, losses, stats) = jax.lax.scan(step, zeros, (micro, index))
    mean = lambda t: jax.tree.map(lambda x: jnp.mean(x, axis=0), t)  # noqa: E731
    grads = jax.tree.map(lambda a, p: (a / accum).astype(p.dtype), acc, params)
    return mean(totals), mean(losses), mean(stats), grads

  sharded = jax.shard_map(
      per_device,
      mesh=mesh,
      in_specs=(P(), P(DATA_AXIS), P()),
      out_specs=(P(), P()),
      check_vma=check_vma,
  )

  def train_step(state, batch, loss_inputs=()):
    _check_divisible(batch, n_dev, "train_step", accum)
    return sharded(state, batch, loss_inputs)

  return jax.jit(train_step, donate_argnums=(0,) if donate else ())


def make_eval_step(model: flax.linen.Module, mesh: Mesh, *, check_vma: bool = False):
  """Returns jitted `eval_step(variables, batch) -> detections`.

  `variables` = `{'params', 'frozen' | 'batch_stats'}` (e.g. `state.variables`), replicated; `batch` sharded on the
  leading axis (global batch divisible by the mesh size). Outputs (e.g. `boxes [B,100,4]`,
  `scores`, `classes`, `valid`) keep the global batch on the leading axis, sharded `P('data')`.
  """
  n_dev = mesh.shape[DATA_AXIS]
  model_d = model.clone(axis_name=DATA_AXIS)

  def per_device(variables, batch):
    return model_d.apply(variables, batch, train=False)

  sharded = jax.shard_map(
      per_device,
      mesh=mesh,
      in_specs=(P(), P(DATA_AXIS)),
      out_specs=P(DATA_AXIS),
      check_vma=check_vma,
  )

  def eval_step(variables, batch):
    _check_divisible(batch, n_dev, "eval_step")
    return sharded(variables, batch)

  return jax.jit(eval_step)
