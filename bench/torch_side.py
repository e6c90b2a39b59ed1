"""torchvision Faster R-CNN R50-FPN on the same device, sizes and synthetic data as cn2_jax.

torch and torchvision are imported inside `run_torch`: without them the case records 'skipped'
and the JAX side never needs them.
"""

from __future__ import annotations

import math
import platform
import time

from bench.measure import GIB, Result, record_error, stats_ms, throughput, time_calls, warm_up
from bench.synthetic import ceil_to, infer_batch, synth_batch


def size_divisible(size: dict) -> tuple[int, bool]:
  """The size_divisible that makes torchvision pad HxW to exactly PHxPW (32 if none does)."""
  for d in (32, 64, 128, 256):
    if ceil_to(size["h"], d) == size["ph"] and ceil_to(size["w"], d) == size["pw"]:
      return d, True
  return 32, False


def tv_model(variant: str, size: dict):
  """fasterrcnn_resnet50_fpn whose transform neither resizes nor pads differently from cn2_jax."""
  import torch
  from torchvision.models.detection import fasterrcnn_resnet50_fpn

  d, _ = size_divisible(size)
  kw = dict(
      min_size=min(size["h"], size["w"]), max_size=max(size["h"], size["w"]), size_divisible=d
  )
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
  """Training under AMP per size and variant (batch halved on OOM), then inference fp32 / fp16."""
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
      torch=torch.__version__,
      torchvision=torchvision.__version__,
      cuda=torch.version.cuda,
      cudnn=torch.backends.cudnn.version(),
      device=torch.cuda.get_device_name(0) if cuda else "cpu",
      cudnn_benchmark=True,
      matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
      cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
      python=platform.python_version(),
  )
  res.save()

  def sync(_=None):
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
    imgs = [
        torch.from_numpy(host["image"][i, :h, :w].transpose(2, 0, 1).copy())
        .to(dev)
        .float()
        .div_(255.0)
        for i in range(n)
    ]
    return imgs

  def timed(fn, warmup, iters):
    sync()  # the model and inputs were just put on the device: not part of the first call
    first, _ = warm_up(fn, max(1, warmup), sync)  # the first call is always timed
    times, pipelined, out = time_calls(fn, iters, sync)
    return first, times, pipelined, out

  # ---------------------------------------------------------------- training (AMP)
  for size in spec["train_sizes"]:
    for variant in spec["torch_variants"]:
      bsz = spec["batch"]
      while True:
        row = dict(
            framework="torch",
            model=f"torchvision fasterrcnn_resnet50_fpn [{variant}]",
            task="train",
            precision="amp-fp16" if cuda else "fp32 (cpu, no amp)",
            size=size["name"],
            batch=bsz,
            requested_batch=spec["batch"],
            run="cold",
        )
        d, exact = size_divisible(size)
        row["torch_padded"] = f"{ceil_to(size['h'], d)}x{ceil_to(size['w'], d)}" + (
            "" if exact else " (differs from the JAX padding)"
        )
        res.data["rows"].append(row)
        model = opt = None
        try:
          reset_peak()
          torch.manual_seed(0)
          t0 = time.perf_counter()
          model = tv_model(variant, size).to(dev).train()
          row["build_s"] = time.perf_counter() - t0
          params = [p for p in model.parameters() if p.requires_grad]
          row["params_trainable"] = int(sum(p.numel() for p in params))
          # lr = the recipe's first warm-up lr (0.02 * 0.00025) so random weights stay finite.
          opt = torch.optim.SGD(params, lr=0.02 * 0.00025, momentum=0.9, weight_decay=1e-4)
          scaler = torch.amp.GradScaler(dev.type, enabled=cuda)
          host = synth_batch(
              spec["seed"] + 1, bsz, size, spec["gt_per_image"], spec["max_boxes"], 90
          )
          images = to_torch(host, bsz)
          targets = []
          for i in range(bsz):
            v = host["gt_valid"][i]
            targets.append(
                dict(
                    boxes=torch.from_numpy(host["gt_boxes"][i][v]).to(dev),
                    labels=torch.from_numpy(host["gt_classes"][i][v] + 1).long().to(dev),
                )
            )

          def step(_):
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
          row.update(
              first_iter_s=first,
              **throughput(row, bsz, pipelined),
              loss_last=loss,
              loss_finite=bool(math.isfinite(loss)),
              peak_mem_gib=peak(),
          )
          res.save()
          break
        except Exception as e:  # noqa: BLE001
          oom = record_error(row, e)
          res.save()
          model = opt = None
          if cuda:
            torch.cuda.empty_cache()
          if oom and bsz > 1:
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
  model = tv_model("default", size).to(dev).eval()
  for precision in ("fp32", "fp16"):
    for bsz in spec["infer_batches"]:
      row = dict(
          framework="torch",
          model="torchvision fasterrcnn_resnet50_fpn",
          task="infer",
          precision=precision
          if precision == "fp32"
          else ("fp16-autocast" if cuda else "fp32 (cpu, no autocast)"),
          size=size["name"],
          batch=bsz,
          run="cold",
      )
      res.data["rows"].append(row)
      try:
        reset_peak()
        images = to_torch(infer_batch(spec["seed"], bsz, size), bsz)

        def infer(_):
          with (
              torch.inference_mode(),
              torch.autocast(dev.type, dtype=torch.float16, enabled=cuda and precision == "fp16"),
          ):
            return model(images)

        first, times, pipelined, out = timed(infer, spec["warmup"], spec["infer_iters"])
        row.update(stats_ms(times))
        row.update(
            first_iter_s=first,
            **throughput(row, bsz, pipelined),
            detections_per_image=float(np.mean([len(o["boxes"]) for o in out])),
            peak_mem_gib=peak(),
        )
        res.save()
      except Exception as e:  # noqa: BLE001
        oom = record_error(row, e)
        res.save()
        if cuda:
          torch.cuda.empty_cache()
        if oom:
          break
