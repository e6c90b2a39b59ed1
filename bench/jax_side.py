"""The cn2_jax cases: training step and full inference, compile times, memory, environment.

JAX, flax and cn2_jax are imported inside the functions, so this module imports without them.
"""

from __future__ import annotations

import os
import platform
import time

from bench.measure import (
    GIB,
    PROCESS_T0,
    Result,
    record_error,
    stats_ms,
    throughput,
    time_calls,
    warm_up,
)
from bench.synthetic import infer_batch, synth_batch

TRAIN_KEYS = ("image", "image_hw", "gt_boxes", "gt_classes", "gt_valid")
INFER_KEYS = ("image", "image_hw")


# ================================================================================================
# Model configuration
# ================================================================================================
def make_config(small: bool, dtype: str):
  """`base_config()` (CenterNet2 R50 1x); `small` = a narrow R18 version for CPU smoke runs."""
  from cn2_jax.config import base_config

  cfg = base_config()
  m = cfg.model
  m.dtype = dtype
  if small:
    # Same structure (FrozenBN ResNet with freeze_at=2, FPN P3-P7, CenterNet head with GN,
    # 3-stage cascade, all NMS/top-k/ROIAlign code paths), toy widths and counts.
    m.resnet_depth = 18
    m.resnet_width = 16
    m.fpn_channels = 32
    m.centernet.num_convs = 1
    m.centernet.pre_nms_topk_train = 128
    m.centernet.post_nms_topk_train = 64
    m.centernet.pre_nms_topk_test = 128
    m.centernet.post_nms_topk_test = 32
    m.roi_heads.batch_size_per_image = 32
    m.roi_heads.fc_dim = 64
    m.roi_heads.detections_per_image = 20
  return cfg


def model_summary(cfg) -> dict:
  m = cfg.model
  return dict(
      resnet_depth=m.resnet_depth,
      resnet_width=m.resnet_width,
      resnet_norm=m.resnet_norm,
      freeze_at=m.freeze_at,
      fpn_channels=m.fpn_channels,
      num_classes=m.num_classes,
      centernet_convs=m.centernet.num_convs,
      proposals_train=(m.centernet.pre_nms_topk_train, m.centernet.post_nms_topk_train),
      proposals_test=(m.centernet.pre_nms_topk_test, m.centernet.post_nms_topk_test),
      rois_per_image=m.roi_heads.batch_size_per_image,
      fc_dim=m.roi_heads.fc_dim,
      sampling_ratio=m.roi_heads.sampling_ratio,
      detections_per_image=m.roi_heads.detections_per_image,
      dtype=m.dtype,
  )


def model_name(small: bool) -> str:
  return "cn2_jax CenterNet2" + (" (small)" if small else " R50")


# ================================================================================================
# Environment, cache, compile and memory probes
# ================================================================================================
def jax_env(spec: dict, counters: dict) -> dict:
  """Imports jax, configures the persistent cache and the cache-hit counters; returns env info."""
  import jax

  if spec.get("cache_dir"):
    jax.config.update("jax_compilation_cache_dir", spec["cache_dir"])
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

  def listener(event, *args, **kwargs):
    if event.startswith("/jax/compilation_cache/"):
      key = event.rsplit("/", 1)[-1]
      counters[key] = counters.get(key, 0) + 1

  try:
    jax.monitoring.register_event_listener(listener)
  except Exception:  # noqa: BLE001 (older/newer API): counters stay empty
    pass
  dev = jax.devices()[0]
  import flax
  import optax

  return dict(
      jax=jax.__version__,
      jaxlib=getattr(jax.lib, "__version__", None) or _pkg_version("jaxlib"),
      flax=flax.__version__,
      optax=optax.__version__,
      backend=jax.default_backend(),
      device_kind=dev.device_kind,
      num_devices=jax.device_count(),
      platform=dev.platform,
      default_matmul_precision=str(jax.config.jax_default_matmul_precision),
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      python=platform.python_version(),
  )


def _pkg_version(name: str):
  try:
    from importlib.metadata import version

    return version(name)
  except Exception:  # noqa: BLE001
    return None


def device_peak_gib():
  """Peak bytes in use on device 0 of this process (None where the backend has no stats)."""
  import jax

  try:
    s = jax.local_devices()[0].memory_stats()
  except Exception:  # noqa: BLE001
    return None
  if not s or "peak_bytes_in_use" not in s:
    return None
  return s["peak_bytes_in_use"] / GIB


def xla_flops(compiled):
  """XLA's flop estimate of one call (`cost_analysis`; a while-loop body counts once)."""
  try:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
      ca = ca[0] if ca else None
    v = (ca or {}).get("flops")
    return float(v) if v is not None and v > 0 else None
  except Exception:  # noqa: BLE001
    return None


def memory_analysis(compiled) -> dict | None:
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001
    return None
  if m is None:
    return None
  out = {}
  for k in (
      "argument_size_in_bytes",
      "output_size_in_bytes",
      "temp_size_in_bytes",
      "alias_size_in_bytes",
      "generated_code_size_in_bytes",
      "peak_memory_in_bytes",
  ):
    v = getattr(m, k, None)
    if v is not None:
      out[k.replace("_in_bytes", "_gib")] = v / GIB
  return out


def lower_and_compile(jitted, args: tuple, counters: dict):
  """`.lower()` and `.compile()` timed apart; returns (compiled, the row's compile fields)."""
  before = dict(counters)
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return compiled, dict(
      lower_s=t1 - t0,
      compile_s=t2 - t1,
      process_to_compiled_s=t2 - PROCESS_T0,
      cache_events={k: v - before.get(k, 0) for k, v in counters.items()},
      memory_analysis=memory_analysis(compiled),
      xla_flops=xla_flops(compiled),
  )


def tflop_per_s(row: dict):
  """XLA flops of one call over the median time (None without a flop estimate)."""
  return row["xla_flops"] / (row["median_ms"] / 1e3) / 1e12 if row.get("xla_flops") else None


def profile(pdir: str, name: str, fn):
  """jax.profiler trace of 3 calls `fn(i)` (each synchronised) into `pdir`."""
  import jax

  with jax.profiler.trace(pdir):
    for i in range(3):
      with jax.profiler.StepTraceAnnotation(name, step_num=i):
        jax.block_until_ready(fn(i))


# ================================================================================================
# Cases
# ================================================================================================
def run_train(spec: dict, res: Result):
  """`make_train_step` (jit + shard_map, the SGD recipe) at spec['batch'] images per device."""
  counters: dict = {}
  res.data["env"] = jax_env(spec, counters)
  import jax
  import numpy as np
  from cn2_jax.engine import optim
  from cn2_jax.engine import step as step_lib
  from cn2_jax.modeling import detector

  cfg = make_config(spec["small"], spec["dtype"])
  res.data["env"]["model"] = model_summary(cfg)
  size = spec["size"]
  mesh = step_lib.make_mesh()
  ndev = mesh.size
  gbatch = spec["batch"] * ndev
  row = dict(
      framework="jax",
      model=model_name(spec["small"]),
      task="train",
      precision=spec["dtype"],
      size=size["name"],
      batch=gbatch,
      batch_per_device=spec["batch"],
      n_devices=ndev,
      run=spec["run"],
  )
  res.data["rows"].append(row)

  model = detector.build_model(cfg.model)
  frozen = detector.frozen_param_prefixes(cfg.model)
  tx = optim.make_optimizer(cfg.optim, None, frozen)
  sched = optim.make_lr_schedule(cfg.optim)
  init_fn = detector.init_fn(model)
  t0 = time.perf_counter()
  state = step_lib.init_train_state(init_fn, tx, jax.random.PRNGKey(spec["seed"]), mesh)
  jax.block_until_ready(state)
  row["init_s"] = time.perf_counter() - t0
  row["params"] = int(sum(x.size for x in jax.tree.leaves(state.params)))

  host = [
      synth_batch(
          spec["seed"] + 1 + i,
          gbatch,
          size,
          spec["gt_per_image"],
          spec["max_boxes"],
          cfg.model.num_classes,
      )
      for i in range(2)
  ]
  row["gt_per_image_mean"] = float(np.mean([h["gt_valid"].sum(1).mean() for h in host]))
  batches = [step_lib.shard_batch(h, mesh, keys=TRAIN_KEYS) for h in host]
  train_step = step_lib.make_train_step(model, tx, mesh, frozen_prefixes=frozen, lr_schedule=sched)
  init_events = dict(counters)  # cache events of the init jit, apart from the step's
  compiled, fields = lower_and_compile(train_step, (state, batches[0]), counters)
  row.update(fields, init_cache_events=init_events)
  res.save()
  if spec["compile_only"]:
    return

  def step(i):
    # Two batches in turn, so the timed steps do not all see the same inputs.
    nonlocal state
    state, metrics = compiled(state, batches[i % 2])
    return metrics

  _, metrics = warm_up(step, spec["warmup"], jax.block_until_ready)
  row["loss_first"] = float(metrics["total_loss"]) if spec["warmup"] else None
  times, pipelined, metrics = time_calls(step, spec["steps"], jax.block_until_ready)
  row.update(stats_ms(times))
  loss = float(metrics["total_loss"])
  row.update(
      throughput(row, gbatch, pipelined),
      loss_last=loss,
      xla_tflop_per_s=tflop_per_s(row),
      loss_finite=bool(np.isfinite(loss)),
      peak_mem_gib=device_peak_gib(),
  )
  res.save()
  if spec.get("profile_dir"):
    pdir = os.path.join(spec["profile_dir"], f"jax_train_{spec['dtype']}_{size['name']}")
    profile(pdir, "train", step)
    row["profile_dir"] = pdir
    res.save()


def run_infer(spec: dict, res: Result):
  """`make_eval_step` (the full model.apply(train=False)) at each of spec['infer_batches']."""
  counters: dict = {}
  res.data["env"] = jax_env(spec, counters)
  import jax
  import numpy as np
  from cn2_jax.engine import step as step_lib
  from cn2_jax.modeling import detector

  cfg = make_config(spec["small"], spec["dtype"])
  res.data["env"]["model"] = model_summary(cfg)
  size = spec["size"]
  mesh = step_lib.make_mesh()
  ndev = mesh.size
  model = detector.build_model(cfg.model)
  t0 = time.perf_counter()
  variables = jax.jit(detector.init_fn(model))(jax.random.PRNGKey(spec["seed"]))
  variables = step_lib.replicate(variables, mesh)
  jax.block_until_ready(variables)
  init_s = time.perf_counter() - t0
  eval_step = step_lib.make_eval_step(model, mesh)
  for bsz in spec["infer_batches"]:
    row = dict(
        framework="jax",
        model=model_name(spec["small"]),
        task="infer",
        precision=spec["dtype"],
        size=size["name"],
        batch=bsz,
        n_devices=ndev,
        run=spec["run"],
        init_s=init_s,
    )
    res.data["rows"].append(row)
    if bsz % ndev:
      row["error"] = f"batch {bsz} not divisible by {ndev} devices"
      res.save()
      continue
    try:
      host = infer_batch(spec["seed"], bsz, size)
      dbatch = step_lib.shard_batch(host, mesh, keys=INFER_KEYS)
      compiled, fields = lower_and_compile(eval_step, (variables, dbatch), counters)
      row.update(fields)
      res.save()
      if spec["compile_only"]:
        continue

      def infer(_):
        return compiled(variables, dbatch)

      warm_up(infer, spec["warmup"], jax.block_until_ready)
      times, pipelined, _ = time_calls(infer, spec["infer_iters"], jax.block_until_ready)
      row.update(stats_ms(times))
      # End to end: host->device transfer of the uint8 batch and device->host copy of the result.
      e2e = []
      for _ in range(max(3, spec["infer_iters"] // 2)):
        t0 = time.perf_counter()
        db = step_lib.shard_batch(host, mesh, keys=INFER_KEYS)
        o = jax.device_get(compiled(variables, db))
        e2e.append(time.perf_counter() - t0)
      valid = np.asarray(o["valid"])
      row.update(
          throughput(row, bsz, pipelined),
          e2e_median_ms=float(np.median(e2e)) * 1e3,
          detections_per_image=float(valid.sum(-1).mean()),
          scores_finite=bool(np.isfinite(np.asarray(o["scores"])).all()),
          xla_tflop_per_s=tflop_per_s(row),
          peak_mem_gib=device_peak_gib(),
      )
      res.save()
      if spec.get("profile_dir") and bsz in (spec["infer_batches"][0], spec["infer_batches"][-1]):
        pdir = os.path.join(spec["profile_dir"], f"jax_infer_{spec['dtype']}_b{bsz}")
        profile(pdir, "infer", infer)
        row["profile_dir"] = pdir
        res.save()
    except Exception as e:  # noqa: BLE001: record and go on (an OOM stops the larger batches)
      oom = record_error(row, e)
      res.save()
      if oom:
        break
