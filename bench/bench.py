#!/usr/bin/env python
"""One-command benchmark of cn2_jax CenterNet2 (R50) against torchvision Faster R-CNN R50-FPN.

Measures, with random weights on synthetic images (uniform-noise pixels, ~10 random GT boxes per
image, zero padding at the bottom/right exactly as the data pipeline pads):

* JAX training throughput (the project's `make_train_step`: jit + shard_map, SGD recipe of
  `cn2_jax.engine.optim`), per training size (default 1024x1024 and 800x1333 padded to 832x1344)
  at `--batch` images per device (default 16; an out-of-memory run is retried at half the batch);
* JAX inference (`make_eval_step` = the full `model.apply(train=False)`: backbone, CenterNet
  proposals with their NMS, 3 cascade stages, per-class final NMS) at 800x1333 padded to 832x1344:
  batch-1 latency and batch-8/16 throughput, on device-resident inputs (plus an end-to-end time
  that includes host->device transfer of the uint8 batch and the device->host copy of the results);
* cold compile time: `jitted.lower(...)` (trace + lowering) and `.compile()` timed separately in a
  fresh process, then the same in a second fresh process with the same JAX persistent compilation
  cache directory (cache hits are counted from jax.monitoring events);
* peak device memory (`device.memory_stats()['peak_bytes_in_use']`, one process per case, so the
  number belongs to that case) and XLA's `compiled.memory_analysis()`;
* each for `model.dtype` float32 and bfloat16;
* torchvision `fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)` on the same device,
  same image sizes (its transform is set so that it neither resizes nor pads differently: min/max
  size = the image's short/long side, size_divisible chosen to reach the same padded size where
  possible): training under AMP (autocast fp16 + GradScaler, SGD) and inference in fp32 and fp16
  (autocast). Also a `frozen` variant (FrozenBatchNorm + 3 trainable stages, i.e. the
  ImageNet-initialised recipe, the workload that matches cn2_jax's FrozenBN / freeze_at=2).

Timing: warm-up iterations first, then each timed iteration is synchronised
(`block_until_ready` / `torch.cuda.synchronize`) and the median is reported; a second "pipelined"
pass enqueues the same number of iterations and synchronises once (what a training loop sees).

Every case runs in its own subprocess (`--worker`), so compile times are cold, peak memory is per
case and a crash or OOM does not end the run. Results are written after every case (`--out`), a
markdown table is printed at the end (and written next to the JSON as .md).

  PYTHONPATH=. python bench/bench.py --out bench/out/bench.json              # GPU, everything
  JAX_PLATFORMS=cpu PYTHONPATH=. python bench/bench.py --small --skip-torch --out /tmp/b.json
  python bench/bench.py --merge a.json b.json --out merged.json              # one table of several

`bench/run_gpu.sh` is the command a GPU session runs; `bench/RESULTS.md` has the results.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

PROCESS_T0 = time.perf_counter()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = "cn2_jax-bench-v1"
TRAIN_KEYS = ("image", "image_hw", "gt_boxes", "gt_classes", "gt_valid")
INFER_KEYS = ("image", "image_hw")
OOM_EXIT = 3
GIB = 2.0 ** 30


# ================================================================================================
# Sizes, synthetic data (numpy only: shared by the JAX and the torch workers)
# ================================================================================================
def ceil_to(v: int, m: int) -> int:
  return int(math.ceil(v / m) * m)


def parse_size(text: str) -> dict:
  """'HxW' (padded to multiples of 32) or 'HxW@PHxPW' -> {h, w, ph, pw, name}."""
  text = text.strip().lower()
  img, _, pad = text.partition("@")
  try:
    h, w = (int(v) for v in img.split("x"))
    ph, pw = (int(v) for v in pad.split("x")) if pad else (ceil_to(h, 32), ceil_to(w, 32))
  except ValueError:
    raise SystemExit(f"bad size {text!r}: expected HxW or HxW@PHxPW (e.g. 800x1333@832x1344)")
  if ph % 32 or pw % 32:
    raise SystemExit(f"bad size {text!r}: padded size {ph}x{pw} must be a multiple of 32 "
                     f"(FPN size divisibility)")
  if ph < h or pw < w:
    raise SystemExit(f"bad size {text!r}: padded size smaller than the image")
  name = f"{h}x{w}" + (f"@{ph}x{pw}" if (ph, pw) != (h, w) else "")
  return dict(h=h, w=w, ph=ph, pw=pw, name=name)


def synth_images(rng, batch: int, size: dict):
  """uint8 `[B, PH, PW, 3]` RGB noise inside the image, zero padding outside; image_hw `[B, 2]`."""
  import numpy as np
  image = np.zeros((batch, size["ph"], size["pw"], 3), np.uint8)
  image[:, :size["h"], :size["w"]] = rng.integers(0, 256, (batch, size["h"], size["w"], 3),
                                                  dtype=np.uint8)
  image_hw = np.tile(np.array([[size["h"], size["w"]]], np.int32), (batch, 1))
  return image, image_hw


def synth_gt(rng, batch: int, size: dict, gt_per_image: float, max_boxes: int,
             num_classes: int):
  """~Poisson(gt_per_image) boxes per image (1..max_boxes), log-uniform sizes 16 px .. 0.6 of the
  short side, aspect 1/3..3, inside the image. Returns padded arrays of the batch contract."""
  import numpy as np
  h, w = size["h"], size["w"]
  counts = np.clip(rng.poisson(gt_per_image, batch), 1, max_boxes)
  boxes = np.zeros((batch, max_boxes, 4), np.float32)
  classes = np.zeros((batch, max_boxes), np.int32)
  valid = np.zeros((batch, max_boxes), bool)
  hi = max(17.0, 0.6 * min(h, w))
  for b in range(batch):
    n = int(counts[b])
    s = np.exp(rng.uniform(np.log(16.0), np.log(hi), n))
    a = np.exp(rng.uniform(np.log(1 / 3), np.log(3.0), n))
    bw = np.minimum(s * np.sqrt(a), w - 1.0)
    bh = np.minimum(s / np.sqrt(a), h - 1.0)
    x1 = rng.uniform(0, w - bw)
    y1 = rng.uniform(0, h - bh)
    boxes[b, :n] = np.stack([x1, y1, x1 + bw, y1 + bh], -1)
    classes[b, :n] = rng.integers(0, num_classes, n)
    valid[b, :n] = True
  return boxes, classes, valid


def synth_batch(seed: int, batch: int, size: dict, gt_per_image: float, max_boxes: int,
                num_classes: int, with_gt: bool = True) -> dict:
  import numpy as np
  rng = np.random.default_rng(seed)
  image, image_hw = synth_images(rng, batch, size)
  out = dict(image=image, image_hw=image_hw)
  if with_gt:
    out["gt_boxes"], out["gt_classes"], out["gt_valid"] = synth_gt(
        rng, batch, size, gt_per_image, max_boxes, num_classes)
  return out


def stats_ms(times_s) -> dict:
  import numpy as np
  t = np.asarray(times_s, np.float64) * 1e3
  return dict(median_ms=float(np.median(t)), min_ms=float(t.min()), max_ms=float(t.max()),
              mean_ms=float(t.mean()), n=int(t.size))


def is_oom(text: str) -> bool:
  t = text.lower()
  return ("resource_exhausted" in t or "out of memory" in t or "outofmemory" in t
          or "resource exhausted" in t)


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
  return dict(resnet_depth=m.resnet_depth, resnet_width=m.resnet_width, resnet_norm=m.resnet_norm,
              freeze_at=m.freeze_at, fpn_channels=m.fpn_channels, num_classes=m.num_classes,
              centernet_convs=m.centernet.num_convs,
              proposals_train=(m.centernet.pre_nms_topk_train, m.centernet.post_nms_topk_train),
              proposals_test=(m.centernet.pre_nms_topk_test, m.centernet.post_nms_topk_test),
              rois_per_image=m.roi_heads.batch_size_per_image, fc_dim=m.roi_heads.fc_dim,
              sampling_ratio=m.roi_heads.sampling_ratio,
              detections_per_image=m.roi_heads.detections_per_image, dtype=m.dtype)


# ================================================================================================
# Worker plumbing
# ================================================================================================
class Result:
  """The worker's result file, rewritten (atomically) after every measurement."""

  def __init__(self, path: str, spec: dict):
    self.path = path
    self.data = {"spec": spec, "rows": [], "env": {}, "error": None}

  def save(self):
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.data, f, indent=1, default=str)
    os.replace(tmp, self.path)


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
  return dict(jax=jax.__version__, jaxlib=getattr(jax.lib, "__version__", None) or
              _pkg_version("jaxlib"), flax=flax.__version__, optax=optax.__version__,
              backend=jax.default_backend(), device_kind=dev.device_kind,
              num_devices=jax.device_count(), platform=dev.platform,
              default_matmul_precision=str(jax.config.jax_default_matmul_precision),
              xla_flags=os.environ.get("XLA_FLAGS", ""),
              python=platform.python_version())


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
  for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "alias_size_in_bytes", "generated_code_size_in_bytes", "peak_memory_in_bytes"):
    v = getattr(m, k, None)
    if v is not None:
      out[k.replace("_in_bytes", "_gib")] = v / GIB
  return out


# ================================================================================================
# JAX workers
# ================================================================================================
def run_jax_train(spec: dict, res: Result):
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
  row = dict(framework="jax", model="cn2_jax CenterNet2" + (" (small)" if spec["small"] else " R50"),
             task="train", precision=spec["dtype"], size=size["name"], batch=gbatch,
             batch_per_device=spec["batch"], n_devices=ndev, run=spec["run"])
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

  host = [synth_batch(spec["seed"] + 1 + i, gbatch, size, spec["gt_per_image"],
                      spec["max_boxes"], cfg.model.num_classes) for i in range(2)]
  row["gt_per_image_mean"] = float(np.mean([h["gt_valid"].sum(1).mean() for h in host]))
  batches = [step_lib.shard_batch(h, mesh, keys=TRAIN_KEYS) for h in host]
  train_step = step_lib.make_train_step(model, tx, mesh, frozen_prefixes=frozen,
                                        lr_schedule=sched)
  before = dict(counters)
  t0 = time.perf_counter()
  lowered = train_step.lower(state, batches[0])
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  row.update(lower_s=t1 - t0, compile_s=t2 - t1, process_to_compiled_s=t2 - PROCESS_T0,
             cache_events={k: v - before.get(k, 0) for k, v in counters.items()},
             init_cache_events=before, memory_analysis=memory_analysis(compiled),
             xla_flops=xla_flops(compiled))
  res.save()
  if spec["compile_only"]:
    return

  for i in range(spec["warmup"]):
    state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready(metrics)
  row["loss_first"] = float(metrics["total_loss"]) if spec["warmup"] else None
  times = []
  for i in range(spec["steps"]):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  row.update(stats_ms(times))
  t0 = time.perf_counter()
  for i in range(spec["steps"]):
    state, metrics = compiled(state, batches[i % 2])
  jax.block_until_ready(metrics)
  pipelined = (time.perf_counter() - t0) / spec["steps"]
  loss = float(metrics["total_loss"])
  row.update(img_per_s=gbatch / (row["median_ms"] / 1e3), pipelined_ms=pipelined * 1e3,
             img_per_s_pipelined=gbatch / pipelined, loss_last=loss,
             xla_tflop_per_s=(row["xla_flops"] / (row["median_ms"] / 1e3) / 1e12
                              if row.get("xla_flops") else None),
             loss_finite=bool(np.isfinite(loss)), peak_mem_gib=device_peak_gib())
  res.save()
  if spec.get("profile_dir"):
    pdir = os.path.join(spec["profile_dir"], f"jax_train_{spec['dtype']}_{size['name']}")
    with jax.profiler.trace(pdir):
      for i in range(3):
        with jax.profiler.StepTraceAnnotation("train", step_num=i):
          state, metrics = compiled(state, batches[i % 2])
          jax.block_until_ready(metrics)
    row["profile_dir"] = pdir
    res.save()


def run_jax_infer(spec: dict, res: Result):
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
  variables = jax.jit(detector.init_fn(model))(
      jax.random.PRNGKey(spec["seed"]))
  variables = step_lib.replicate(variables, mesh)
  jax.block_until_ready(variables)
  init_s = time.perf_counter() - t0
  eval_step = step_lib.make_eval_step(model, mesh)
  name = "cn2_jax CenterNet2" + (" (small)" if spec["small"] else " R50")
  for bsz in spec["infer_batches"]:
    row = dict(framework="jax", model=name, task="infer", precision=spec["dtype"],
               size=size["name"], batch=bsz, n_devices=ndev, run=spec["run"], init_s=init_s)
    res.data["rows"].append(row)
    if bsz % ndev:
      row["error"] = f"batch {bsz} not divisible by {ndev} devices"
      res.save()
      continue
    try:
      host = synth_batch(spec["seed"] + 100 + bsz, bsz, size, 0, 1, 1, with_gt=False)
      dbatch = step_lib.shard_batch(host, mesh, keys=INFER_KEYS)
      before = dict(counters)
      t0 = time.perf_counter()
      lowered = eval_step.lower(variables, dbatch)
      t1 = time.perf_counter()
      compiled = lowered.compile()
      t2 = time.perf_counter()
      row.update(lower_s=t1 - t0, compile_s=t2 - t1, process_to_compiled_s=t2 - PROCESS_T0,
                 cache_events={k: v - before.get(k, 0) for k, v in counters.items()},
                 memory_analysis=memory_analysis(compiled), xla_flops=xla_flops(compiled))
      res.save()
      if spec["compile_only"]:
        continue
      for _ in range(spec["warmup"]):
        out = compiled(variables, dbatch)
        jax.block_until_ready(out)
      times = []
      for _ in range(spec["infer_iters"]):
        t0 = time.perf_counter()
        out = compiled(variables, dbatch)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
      row.update(stats_ms(times))
      t0 = time.perf_counter()
      for _ in range(spec["infer_iters"]):
        out = compiled(variables, dbatch)
      jax.block_until_ready(out)
      pipelined = (time.perf_counter() - t0) / spec["infer_iters"]
      e2e = []
      for _ in range(max(3, spec["infer_iters"] // 2)):
        t0 = time.perf_counter()
        db = step_lib.shard_batch(host, mesh, keys=INFER_KEYS)
        o = jax.device_get(compiled(variables, db))
        e2e.append(time.perf_counter() - t0)
      valid = np.asarray(o["valid"])
      row.update(img_per_s=bsz / (row["median_ms"] / 1e3), pipelined_ms=pipelined * 1e3,
                 img_per_s_pipelined=bsz / pipelined,
                 e2e_median_ms=float(np.median(e2e)) * 1e3,
                 detections_per_image=float(valid.sum(-1).mean()),
                 scores_finite=bool(np.isfinite(np.asarray(o["scores"])).all()),
                 xla_tflop_per_s=(row["xla_flops"] / (row["median_ms"] / 1e3) / 1e12
                                  if row.get("xla_flops") else None),
                 peak_mem_gib=device_peak_gib())
      res.save()
      if spec.get("profile_dir") and bsz in (spec["infer_batches"][0], spec["infer_batches"][-1]):
        pdir = os.path.join(spec["profile_dir"], f"jax_infer_{spec['dtype']}_b{bsz}")
        with jax.profiler.trace(pdir):
          for i in range(3):
            with jax.profiler.StepTraceAnnotation("infer", step_num=i):
              jax.block_until_ready(compiled(variables, dbatch))
        row["profile_dir"] = pdir
        res.save()
    except Exception as e:  # noqa: BLE001: record and go on (an OOM stops the larger batches)
      text = f"{type(e).__name__}: {e}"
      row["error"] = "oom" if is_oom(text) else text[-2000:]
      res.save()
      if is_oom(text):
        break


# ================================================================================================
# torch / torchvision worker
# ================================================================================================
def _torch_size_divisible(size: dict) -> tuple[int, bool]:
  """The size_divisible that makes torchvision pad HxW to exactly PHxPW (32 if none does)."""
  for d in (32, 64, 128, 256):
    if ceil_to(size["h"], d) == size["ph"] and ceil_to(size["w"], d) == size["pw"]:
      return d, True
  return 32, False


def _tv_model(variant: str, size: dict):
  import torch
  from torchvision.models.detection import fasterrcnn_resnet50_fpn
  d, _ = _torch_size_divisible(size)
  kw = dict(min_size=min(size["h"], size["w"]), max_size=max(size["h"], size["w"]),
            size_divisible=d)
  if variant == "default":  # the literal call: BatchNorm2d (train mode), all 5 stages trainable
    return fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, **kw)
  # "frozen": what fasterrcnn_resnet50_fpn builds with an ImageNet backbone (FrozenBatchNorm2d,
  # trainable_backbone_layers=3), with random weights.
  from torchvision.models import resnet50
  from torchvision.models.detection import FasterRCNN
  from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
  from torchvision.ops import FrozenBatchNorm2d
  backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), 3)
  torch.manual_seed(0)
  return FasterRCNN(backbone, num_classes=91, **kw)


def run_torch(spec: dict, res: Result):
  try:
    import torch
    import torchvision
  except Exception as e:  # noqa: BLE001
    res.data["skipped"] = f"torch/torchvision not importable ({type(e).__name__}: {e})"
    print("torch benchmark skipped:", res.data["skipped"], flush=True)
    return
  if not torch.cuda.is_available() and not spec.get("torch_cpu"):
    res.data["skipped"] = "torch.cuda is not available (no GPU)"
    print("torch benchmark skipped:", res.data["skipped"], flush=True)
    return
  import numpy as np
  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  cuda = dev.type == "cuda"
  torch.backends.cudnn.benchmark = True  # fixed shapes; the counterpart of XLA's autotuning
  res.data["env"] = dict(
      torch=torch.__version__, torchvision=torchvision.__version__,
      cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
      device=torch.cuda.get_device_name(0) if cuda else "cpu",
      cudnn_benchmark=True, matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
      cudnn_allow_tf32=torch.backends.cudnn.allow_tf32, python=platform.python_version())
  res.save()

  def sync():
    if cuda:
      torch.cuda.synchronize()

  def reset_peak():
    if cuda:
      torch.cuda.empty_cache()
      torch.cuda.reset_peak_memory_stats()

  def peak():
    return torch.cuda.max_memory_allocated() / GIB if cuda else None

  def to_torch(host, n):
    h, w = host["image_hw"][0]
    imgs = [torch.from_numpy(host["image"][i, :h, :w].transpose(2, 0, 1).copy()).to(dev)
            .float().div_(255.0) for i in range(n)]
    return imgs

  def timed(fn, warmup, iters):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
      fn()
    sync()
    times = []
    for _ in range(iters):
      t0 = time.perf_counter()
      out = fn()
      sync()
      times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(iters):
      out = fn()
    sync()
    return first, times, (time.perf_counter() - t0) / iters, out

  # ---------------------------------------------------------------- training (AMP)
  for size in spec["train_sizes"]:
    for variant in spec["torch_variants"]:
      bsz = spec["batch"]
      while True:
        row = dict(framework="torch", model=f"torchvision fasterrcnn_resnet50_fpn [{variant}]",
                   task="train", precision="amp-fp16" if cuda else "fp32 (cpu, no amp)",
                   size=size["name"], batch=bsz,
                   requested_batch=spec["batch"], run="cold")
        d, exact = _torch_size_divisible(size)
        row["torch_padded"] = (f"{ceil_to(size['h'], d)}x{ceil_to(size['w'], d)}"
                               + ("" if exact else " (differs from the JAX padding)"))
        res.data["rows"].append(row)
        model = opt = None
        try:
          reset_peak()
          torch.manual_seed(0)
          t0 = time.perf_counter()
          model = _tv_model(variant, size).to(dev).train()
          row["build_s"] = time.perf_counter() - t0
          params = [p for p in model.parameters() if p.requires_grad]
          row["params_trainable"] = int(sum(p.numel() for p in params))
          # lr = the recipe's first warm-up lr (0.02 * 0.00025) so random weights stay finite.
          opt = torch.optim.SGD(params, lr=0.02 * 0.00025, momentum=0.9, weight_decay=1e-4)
          scaler = torch.amp.GradScaler(dev.type, enabled=cuda)
          host = synth_batch(spec["seed"] + 1, bsz, size, spec["gt_per_image"],
                             spec["max_boxes"], 90)
          images = to_torch(host, bsz)
          targets = []
          for i in range(bsz):
            v = host["gt_valid"][i]
            targets.append(dict(boxes=torch.from_numpy(host["gt_boxes"][i][v]).to(dev),
                                labels=torch.from_numpy(host["gt_classes"][i][v] + 1)
                                .long().to(dev)))

          def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=torch.float16, enabled=cuda):
              losses = model(images, targets)
              loss = sum(losses.values())
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            return loss

          first, times, pipelined, loss = timed(step, spec["warmup"], spec["steps"])
          row.update(stats_ms(times))
          loss = float(loss.detach().float().item())
          row.update(first_iter_s=first, img_per_s=bsz / (row["median_ms"] / 1e3),
                     pipelined_ms=pipelined * 1e3, img_per_s_pipelined=bsz / pipelined,
                     loss_last=loss, loss_finite=bool(math.isfinite(loss)), peak_mem_gib=peak())
          res.save()
          break
        except Exception as e:  # noqa: BLE001
          text = f"{type(e).__name__}: {e}"
          row["error"] = "oom" if is_oom(text) else text[-2000:]
          res.save()
          model = opt = None
          if cuda:
            torch.cuda.empty_cache()
          if is_oom(text) and bsz > 1:
            bsz //= 2
            continue
          break
      model = opt = None
      if cuda:
        torch.cuda.empty_cache()

  # ---------------------------------------------------------------- inference (fp32, fp16)
  if not spec["infer_batches"]:
    return
  size = spec["infer_size"]
  reset_peak()
  torch.manual_seed(0)
  model = _tv_model("default", size).to(dev).eval()
  for precision in ("fp32", "fp16"):
    for bsz in spec["infer_batches"]:
      row = dict(framework="torch", model="torchvision fasterrcnn_resnet50_fpn",
                 task="infer", precision=precision if precision == "fp32" else
                 ("fp16-autocast" if cuda else "fp32 (cpu, no autocast)"),
                 size=size["name"], batch=bsz, run="cold")
      res.data["rows"].append(row)
      try:
        reset_peak()
        host = synth_batch(spec["seed"] + 100 + bsz, bsz, size, 0, 1, 1, with_gt=False)
        images = to_torch(host, bsz)

        def infer():
          with torch.inference_mode(), torch.autocast(
              dev.type, dtype=torch.float16, enabled=cuda and precision == "fp16"):
            return model(images)

        first, times, pipelined, out = timed(infer, spec["warmup"], spec["infer_iters"])
        row.update(stats_ms(times))
        row.update(first_iter_s=first, img_per_s=bsz / (row["median_ms"] / 1e3),
                   pipelined_ms=pipelined * 1e3, img_per_s_pipelined=bsz / pipelined,
                   detections_per_image=float(np.mean([len(o["boxes"]) for o in out])),
                   peak_mem_gib=peak())
        res.save()
      except Exception as e:  # noqa: BLE001
        text = f"{type(e).__name__}: {e}"
        row["error"] = "oom" if is_oom(text) else text[-2000:]
        res.save()
        if cuda:
          torch.cuda.empty_cache()
        if is_oom(text):
          break


def worker_main(spec_json: str, result_path: str) -> int:
  spec = json.loads(spec_json)
  res = Result(result_path, spec)
  res.save()
  try:
    {"jax_train": run_jax_train, "jax_infer": run_jax_infer, "torch": run_torch}[spec["kind"]](
        spec, res)
  except Exception as e:  # noqa: BLE001
    text = f"{type(e).__name__}: {e}"
    res.data["error"] = "oom" if is_oom(text) else text[-3000:]
    res.data["traceback"] = traceback.format_exc()[-6000:]
    if res.data["rows"] and "error" not in res.data["rows"][-1] and \
        "median_ms" not in res.data["rows"][-1]:
      res.data["rows"][-1]["error"] = res.data["error"]
    res.save()
    traceback.print_exc()
    return OOM_EXIT if is_oom(text) else 1
  res.save()
  return 0


# ================================================================================================
# Orchestrator
# ================================================================================================
def placeholder_rows(spec: dict, note: str) -> list:
  """Table rows for a case that did not run, so the table shows what is missing."""
  kind = spec["kind"]
  if kind == "jax_train":
    return [dict(framework="jax", task="train", precision=spec["dtype"], size=spec["size"]["name"],
                 batch=spec["batch"], error=note)]
  if kind == "jax_infer":
    return [dict(framework="jax", task="infer", precision=spec["dtype"], size=spec["size"]["name"],
                 batch=b, error=note) for b in spec["infer_batches"]]
  return [dict(framework="torch", task="train+infer", precision="amp/fp32/fp16",
               size=",".join(s["name"] for s in spec["train_sizes"]), batch=spec["batch"],
               error=note)]


class Runner:
  def __init__(self, args):
    self.args = args
    self.t0 = time.monotonic()
    self.out = {"schema": SCHEMA, "meta": self._meta(), "rows": [], "workers": []}

  def remaining(self) -> float:
    if not self.args.budget_s:
      return float("inf")
    return self.args.budget_s - (time.monotonic() - self.t0)

  def _meta(self) -> dict:
    a = self.args
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                argv=sys.argv, host=platform.node(), python=platform.python_version(),
                small=a.small, git=_git_describe(), nvidia_smi=_nvidia_smi(),
                jax_platforms=os.environ.get("JAX_PLATFORMS", ""),
                settings=dict(steps=a.steps, warmup=a.warmup, infer_iters=a.infer_iters,
                              batch=a.batch, gt_per_image=a.gt_per_image,
                              max_boxes=a.max_boxes, seed=a.seed, budget_s=a.budget_s))
    return meta

  def save(self):
    path = self.args.out
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.out, f, indent=1, default=str)
    os.replace(tmp, path)

  def run_worker(self, spec: dict, label: str) -> dict:
    """Runs one case in a fresh process; returns its result dict (with 'rc')."""
    remaining = self.remaining()
    if remaining < self.args.min_case_s:
      print(f"[bench] SKIP {label}: {remaining:.0f} s of the budget left", flush=True)
      self.out["workers"].append({"spec": spec, "skipped": "time budget exhausted"})
      rows = [] if spec.get("run") == "cached" else placeholder_rows(spec, "not run (time budget)")
      return {"spec": spec, "rows": rows, "skipped": "time budget exhausted", "rc": None}
    fd, path = tempfile.mkstemp(prefix="cn2_bench_", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec),
           "--result", path]
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    print(f"[bench] RUN  {label} (budget left {remaining:.0f} s)", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True)
    timeout = None if remaining == float("inf") else max(1.0, remaining)
    try:
      rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)  # our own child's process group
      proc.wait()
      rc = "timeout"
    wall = time.monotonic() - t0
    try:
      with open(path) as f:
        result = json.load(f)
    except Exception:  # noqa: BLE001
      result = {"spec": spec, "rows": [], "error": f"worker left no result (rc={rc})"}
    finally:
      for p in (path, path + ".tmp"):
        if os.path.exists(p):
          os.remove(p)
    result["rc"] = rc
    result["wall_s"] = wall
    if rc == "timeout":
      result["error"] = result.get("error") or "killed at the time budget"
      for row in result["rows"]:
        if "median_ms" not in row and "compile_s" not in row:
          row.setdefault("error", "killed at the time budget")
    print(f"[bench] DONE {label}: rc={rc}, {wall:.1f} s"
          + (f", error: {str(result.get('error'))[:300]}" if result.get("error") else ""),
          flush=True)
    self.out["workers"].append({k: result.get(k) for k in
                                ("spec", "env", "error", "skipped", "rc", "wall_s")})
    return result

  def base_spec(self, kind: str, **kw) -> dict:
    a = self.args
    spec = dict(kind=kind, small=a.small, seed=a.seed, steps=a.steps, warmup=a.warmup,
                infer_iters=a.infer_iters, gt_per_image=a.gt_per_image, max_boxes=a.max_boxes,
                compile_only=False, cache_dir=None, profile_dir=a.profile, run="cold")
    spec.update(kw)
    return spec

  def add_rows(self, rows):
    self.out["rows"].extend(rows)
    self.save()

  def cached_rerun(self, spec: dict, rows: list):
    """The same case's compile in a second fresh process sharing the persistent cache dir."""
    s2 = dict(spec, compile_only=True, run="cached", profile_dir=None)
    if spec["kind"] == "jax_infer":
      s2["infer_batches"] = [row["batch"] for row in rows if "compile_s" in row]
    label = (f"jax {'train' if spec['kind'] == 'jax_train' else 'infer'} {spec['dtype']} "
             f"{spec['size']['name']}: compile again with the persistent cache")
    r = self.run_worker(s2, label)
    by_batch = {row["batch"]: row for row in r["rows"]}
    for row in rows:
      c = by_batch.get(row["batch"])
      if c is not None:
        row["cached"] = {k: c.get(k) for k in ("lower_s", "compile_s", "init_s",
                                                "process_to_compiled_s", "cache_events",
                                                "error")}
    self.save()

  def jax_train(self, dtype: str, size: dict, cache_root: str):
    a = self.args
    bsz = a.batch
    while True:
      cdir = os.path.join(cache_root, f"train_{dtype}_{size['name']}_b{bsz}")
      spec = self.base_spec("jax_train", dtype=dtype, size=size, batch=bsz, cache_dir=cdir)
      r = self.run_worker(spec, f"jax train {dtype} {size['name']} batch/device {bsz}")
      rows = r["rows"]
      for row in rows:
        row["requested_batch"] = a.batch
      self.add_rows(rows)
      oom = r.get("error") == "oom" or r.get("rc") == OOM_EXIT
      if oom and bsz > 1 and not a.no_oom_retry:
        bsz //= 2
        continue
      if a.cache_runs and rows and "compile_s" in rows[-1] and not r.get("error"):
        self.cached_rerun(spec, rows)
      return

  def jax_infer(self, dtype: str, cache_root: str):
    a = self.args
    cdir = os.path.join(cache_root, f"infer_{dtype}_{a.infer_size['name']}")
    spec = self.base_spec("jax_infer", dtype=dtype, size=a.infer_size,
                          infer_batches=a.infer_batches, cache_dir=cdir)
    r = self.run_worker(spec, f"jax infer {dtype} {a.infer_size['name']} "
                              f"batches {a.infer_batches}")
    done = {row["batch"] for row in r["rows"]}
    missing = [b for b in a.infer_batches if b not in done]
    if missing and not r.get("skipped"):
      why = "not run (" + ("time budget" if r.get("rc") == "timeout" else "worker ended early") + ")"
      r["rows"] += placeholder_rows(dict(spec, infer_batches=missing), why)
    self.add_rows(r["rows"])
    if a.cache_runs and any("compile_s" in row for row in r["rows"]):
      self.cached_rerun(spec, r["rows"])

  def run(self):
    """Per dtype: train at the first size, inference, train at the other sizes; each cold case is
    followed by its persistent-cache re-run; then torchvision. (Order = priority under a budget.)"""
    a = self.args
    cache_root = a.cache_dir or tempfile.mkdtemp(prefix="cn2_bench_cache_")
    os.makedirs(cache_root, exist_ok=True)
    self.out["meta"]["cache_root"] = cache_root
    if not a.skip_jax:
      for dtype in a.dtypes:
        if a.sizes:
          self.jax_train(dtype, a.sizes[0], cache_root)
        if a.infer_batches:
          self.jax_infer(dtype, cache_root)
        for size in a.sizes[1:]:
          self.jax_train(dtype, size, cache_root)
    if not a.skip_torch:
      spec = self.base_spec("torch", batch=a.batch, train_sizes=a.sizes,
                            infer_size=a.infer_size, infer_batches=a.infer_batches,
                            torch_variants=a.torch_variants, torch_cpu=a.torch_cpu,
                            profile_dir=None)
      r = self.run_worker(spec, "torchvision Faster R-CNN (train AMP, infer fp32/fp16)")
      if r.get("skipped"):
        self.out["meta"]["torch_skipped"] = r["skipped"]
      self.add_rows(r["rows"])
    if not a.cache_dir and not a.keep_cache:
      shutil.rmtree(cache_root, ignore_errors=True)
    self.out["meta"]["total_s"] = time.monotonic() - self.t0
    self.save()
    return self.out


def _git_describe():
  try:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                         text=True, timeout=10)
    if rev.returncode:
      return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return rev.stdout.strip() + ("-dirty" if dirty else "")
  except Exception:  # noqa: BLE001
    return None


def _nvidia_smi():
  if not shutil.which("nvidia-smi"):
    return None
  try:
    r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,"
                        "clocks.max.sm,power.limit", "--format=csv,noheader"],
                       capture_output=True, text=True, timeout=20)
    return r.stdout.strip() or None
  except Exception:  # noqa: BLE001
    return None


# ================================================================================================
# Table
# ================================================================================================
def _f(v, fmt="{:.1f}"):
  return "—" if v is None else fmt.format(v)


def table(out: dict) -> str:
  lines = []
  envs = [w.get("env") or {} for w in out.get("workers", [])]
  jenv = next((e for e in envs if "jax" in e), {})
  tenv = next((e for e in envs if "torch" in e), {})
  meta = out.get("meta", {})
  lines.append(f"date {meta.get('date')}, host {meta.get('host')}, git {meta.get('git')}"
               + (", SMALL config" if meta.get("small") else ""))
  if jenv:
    lines.append(f"JAX {jenv.get('jax')} (flax {jenv.get('flax')}) on {jenv.get('backend')}: "
                 f"{jenv.get('num_devices')} x {jenv.get('device_kind')}")
  if tenv:
    lines.append(f"torch {tenv.get('torch')}, torchvision {tenv.get('torchvision')} on "
                 f"{tenv.get('device')} (cudnn.benchmark, TF32 conv {tenv.get('cudnn_allow_tf32')},"
                 f" TF32 matmul {tenv.get('matmul_allow_tf32')})")
  if meta.get("torch_skipped"):
    lines.append(f"torchvision: skipped ({meta['torch_skipped']})")
  if meta.get("nvidia_smi"):
    lines.append(f"nvidia-smi: {meta['nvidia_smi']}")
  lines.append("")
  lines.append("| framework | task | precision | image@padded | batch | median ms | img/s "
               "| img/s pipelined | lower s | compile s cold | compile s cached | peak GiB "
               "| notes |")
  lines.append("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
  for r in out.get("rows", []):
    notes = []
    if r.get("error"):
      notes.append(f"ERROR: {str(r['error'])[:80]}")
    if r.get("requested_batch") and r.get("batch") != r.get("requested_batch") and \
        r["framework"] == "torch":
      notes.append(f"requested batch {r['requested_batch']}")
    if r["framework"] == "jax" and r.get("requested_batch") and \
        r.get("batch_per_device") != r.get("requested_batch"):
      notes.append(f"requested {r['requested_batch']}/device")
    if "model" in r and r["framework"] == "torch":
      notes.append(r["model"].replace("torchvision fasterrcnn_resnet50_fpn", "tv FRCNN"))
    if r.get("first_iter_s") is not None:
      notes.append(f"first iter {r['first_iter_s']:.1f} s")
    if r.get("e2e_median_ms") is not None:
      notes.append(f"e2e {r['e2e_median_ms']:.1f} ms")
    if r.get("detections_per_image") is not None:
      notes.append(f"{r['detections_per_image']:.0f} dets/img")
    if r.get("xla_tflop_per_s") is not None:
      notes.append(f"{r['xla_tflop_per_s']:.3g} TFLOP/s (XLA flops)")
    if r.get("loss_finite") is False:
      notes.append("loss not finite")
    if r.get("torch_padded"):
      notes.append(f"padded {r['torch_padded']}")
    cached = (r.get("cached") or {})
    if cached.get("cache_events"):
      hits = cached["cache_events"].get("cache_hits", 0)
      notes.append(f"cache hits {hits}")
    mem = r.get("peak_mem_gib")
    if mem is None and (r.get("memory_analysis") or {}).get("temp_size_gib") is not None:
      ma = r["memory_analysis"]
      notes.append(f"XLA temp {ma['temp_size_gib']:.2f} GiB")
    lines.append(
        f"| {r['framework']} | {r['task']} | {r['precision']} | {r['size']} | {r['batch']} "
        f"| {_f(r.get('median_ms'))} | {_f(r.get('img_per_s'))} "
        f"| {_f(r.get('img_per_s_pipelined'))} | {_f(r.get('lower_s'))} "
        f"| {_f(r.get('compile_s'))} | {_f(cached.get('compile_s'))} "
        f"| {_f(mem, '{:.2f}')} | {'; '.join(notes)} |")
  return "\n".join(lines)


def write_table(out: dict, json_path: str, md: bool = True) -> str:
  text = table(out)
  if not md:
    return text
  md = os.path.splitext(json_path)[0] + ".md"
  with open(md, "w") as f:
    f.write(text + "\n")
  return text


# ================================================================================================
# CLI
# ================================================================================================
def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--small", action="store_true",
                 help="tiny model (R18 width 16, FPN 32) and small images, for CPU smoke runs")
  p.add_argument("--skip-torch", action="store_true", help="do not run torchvision")
  p.add_argument("--skip-jax", action="store_true", help="only torchvision")
  p.add_argument("--dtypes", default="float32,bfloat16", help="cn2_jax model.dtype values")
  p.add_argument("--sizes", default=None,
                 help="training sizes, comma separated HxW or HxW@PHxPW "
                      "(default 800x1333@832x1344,1024x1024; --small: 100x150@128x160,128x128); "
                      "the first runs before inference, the others after it; 'none' = no training cases")
  p.add_argument("--infer-size", default=None,
                 help="inference size (default 800x1333@832x1344; --small: 100x150@128x160)")
  p.add_argument("--batch", type=int, default=None,
                 help="training batch per device (default 16; --small: 2); halved on OOM")
  p.add_argument("--infer-batches", default=None,
                 help="default 1,8,16 (--small: 1,2); 'none' = no inference cases")
  p.add_argument("--steps", type=int, default=None, help="timed training steps (default 20; "
                 "--small 3); the same number again for the pipelined pass")
  p.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 3; "
                 "--small 1)")
  p.add_argument("--infer-iters", type=int, default=None,
                 help="timed inference iterations (default 30; --small 3)")
  p.add_argument("--gt-per-image", type=float, default=10.0, help="mean GT boxes per image")
  p.add_argument("--max-boxes", type=int, default=None,
                 help="padded GT slots (default data.max_boxes=100; --small 16)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--torch-variants", default="default,frozen",
                 help="torchvision training variants: default = the literal "
                      "fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None) (BatchNorm, "
                      "all stages trainable); frozen = FrozenBatchNorm + 3 trainable stages")
  p.add_argument("--torch-cpu", action="store_true", help="run torchvision on the CPU if no GPU")
  p.add_argument("--out", default=os.path.join(REPO, "bench", "out", "bench.json"),
                 help="result JSON (a .md table is written next to it)")
  p.add_argument("--profile", default=None, metavar="DIR",
                 help="capture jax.profiler traces of 3 train steps / inference calls per case")
  p.add_argument("--cache-dir", default=None,
                 help="persistent compilation cache root (default: a fresh temp dir, removed)")
  p.add_argument("--keep-cache", action="store_true")
  p.add_argument("--no-cache-run", action="store_true",
                 help="skip the second (persistent-cache) compile process of each JAX case")
  p.add_argument("--no-md", action="store_true",
                 help="do not write the .md table next to --out (it is still printed)")
  p.add_argument("--no-oom-retry", action="store_true")
  p.add_argument("--budget-s", type=float, default=0.0,
                 help="wall-clock budget for the whole run (0 = none): cases that would start "
                      "with less than --min-case-s left are skipped, a running one is killed "
                      "at the budget; results so far are always written")
  p.add_argument("--min-case-s", type=float, default=None,
                 help="least budget left to start a case (default 60; --small 10)")
  p.add_argument("--merge", nargs="+", metavar="JSON",
                 help="merge result files into --out and print one table (runs nothing)")
  p.add_argument("--worker", help=argparse.SUPPRESS)
  p.add_argument("--result", help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  small = a.small
  sizes = a.sizes or ("100x150@128x160,128x128" if small else "800x1333@832x1344,1024x1024")
  a.sizes = [] if sizes.strip().lower() == "none" else \
      [parse_size(s) for s in sizes.split(",") if s.strip()]
  a.infer_size = parse_size(a.infer_size or ("100x150@128x160" if small else
                                             "800x1333@832x1344"))
  a.batch = a.batch or (2 if small else 16)
  ib = a.infer_batches or ("1,2" if small else "1,8,16")
  a.infer_batches = [] if ib.strip().lower() in ("none", "0") else \
      sorted(int(b) for b in ib.split(",") if b.strip())
  a.steps = a.steps or (3 if small else 20)
  a.warmup = a.warmup if a.warmup is not None else (1 if small else 3)
  a.infer_iters = a.infer_iters or (3 if small else 30)
  a.max_boxes = a.max_boxes or (16 if small else 100)
  a.min_case_s = a.min_case_s if a.min_case_s is not None else (10.0 if small else 60.0)
  a.dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
  for d in a.dtypes:
    if d not in ("float32", "bfloat16"):
      raise SystemExit(f"--dtypes: {d!r} is not float32 or bfloat16")
  a.cache_runs = not a.no_cache_run
  a.torch_variants = [v.strip() for v in a.torch_variants.split(",") if v.strip()]
  for v in a.torch_variants:
    if v not in ("default", "frozen"):
      raise SystemExit(f"--torch-variants: {v!r} is not default or frozen")
  if a.profile:
    a.profile = os.path.abspath(a.profile)
  return a


def main(argv=None) -> int:
  raw = sys.argv[1:] if argv is None else argv
  if "--worker" in raw:
    a = argparse.ArgumentParser()
    a.add_argument("--worker")
    a.add_argument("--result")
    w, _ = a.parse_known_args(raw)
    return worker_main(w.worker, w.result)
  args = parse_args(raw)
  if args.merge:
    merged = {"schema": SCHEMA, "meta": {}, "rows": [], "workers": [], "merged_from": []}
    for path in args.merge:
      with open(path) as f:
        o = json.load(f)
      merged["meta"] = merged["meta"] or o.get("meta", {})
      merged["rows"].extend(o.get("rows", []))
      merged["workers"].extend(o.get("workers", []))
      merged["merged_from"].append({"path": path, "meta": o.get("meta")})
      if o.get("meta", {}).get("torch_skipped") and not any(
          "torch" in (w.get("env") or {}) for w in merged["workers"]):
        merged["meta"]["torch_skipped"] = o["meta"]["torch_skipped"]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(merged, f, indent=1, default=str)
    print(write_table(merged, args.out, md=not args.no_md))
    return 0
  runner = Runner(args)
  out = runner.run()
  text = write_table(out, args.out, md=not args.no_md)
  print("\n" + text, flush=True)
  print(f"\n[bench] results: {args.out}"
        + ("" if args.no_md else f" (+ {os.path.splitext(args.out)[0]}.md)") + ", "
        f"{out['meta']['total_s']:.0f} s", flush=True)
  failed = [r for r in out["rows"] if r.get("error")]
  return 1 if failed and not any("median_ms" in r for r in out["rows"]) else 0


if __name__ == "__main__":
  sys.exit(main())
