#!/usr/bin/env python
"""cn2_jax ROIAlign and NMS against torchvision.ops on random COCO-sized inputs.

* ROIAlign: `cn2_jax.modeling.ops.roi_align.roi_align` (one feature map, aligned=True) against
  `torchvision.ops.roi_align(aligned=True)` with sampling_ratio=2 (the fixed mode the model trains
  with) and sampling_ratio=0 (official adaptive mode; the JAX side gets a cap per axis equal to what
  the boxes need, from `required_adaptive_samples`, so it must be exact). Feature 200x336x256 at
  spatial scale 1/4 (P2 of an 800x1344 input), 512 boxes: mostly inside the image with log-uniform
  sizes, plus border-crossing, tiny, zero-size and outside boxes. Prints max abs / relative
  differences; fails above --roi-atol (max abs) or --roi-rtol (||d|| / ||ref||).
* NMS: `nms` and `batched_nms` against `torchvision.ops.nms` / `batched_nms` on 5000 clustered
  boxes (distinct scores, 80 classes) at IoU 0.5 / 0.7 / 0.9. The JAX batched mode follows the
  torchvision kernel it is compared with ('torchvision_cpu' for the CPU, 'torchvision_cuda' for
  CUDA, which differ in when they use the coordinate-offset trick); 'per_class' is compared with
  the CPU result too. Prints whether the kept lists are identical (same indices, same order) and
  the number of differing kept indices; fails when more than --nms-max-diff differ.

torchvision runs on the CPU (its reference kernels, which cn2_jax transcribes) and on CUDA when
available; JAX runs on its default backend. Exits 0 when everything matches, 1 on a mismatch,
0 with a SKIP message when torch/torchvision cannot be imported.

  PYTHONPATH=. python bench/parity_torchvision.py [--json out.json] [--small]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Leave GPU memory to torch: JAX would otherwise preallocate 75% of it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


# ------------------------------------------------------------------------------------- inputs
def make_roi_inputs(seed: int, h: int, w: int, c: int, r: int, scale: float, max_side: float):
  """Feature `[H, W, C]` ~ N(0, 1) and `[R, 4]` boxes in pixels of an (H/scale)x(W/scale) image."""
  import numpy as np

  rng = np.random.default_rng(seed)
  feat = rng.standard_normal((h, w, c)).astype(np.float32)
  img_h, img_w = h / scale, w / scale
  n_main = r - 16
  s = np.exp(rng.uniform(np.log(4.0), np.log(max_side), n_main))
  a = np.exp(rng.uniform(np.log(1 / 3), np.log(3.0), n_main))
  bw, bh = s * np.sqrt(a), s / np.sqrt(a)
  cx, cy = rng.uniform(0, img_w, n_main), rng.uniform(0, img_h, n_main)
  boxes = [np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)]
  extra = []
  for _ in range(4):  # crossing the borders
    x, y = rng.uniform(-40, img_w - 10), rng.uniform(-40, img_h - 10)
    extra.append([x, y, x + rng.uniform(20, 60), y + rng.uniform(20, 60)])
  extra.append([img_w - 30, img_h - 30, img_w + 20, img_h + 25])  # past bottom-right
  extra.append([-80.0, 10.0, -50.0, 40.0])  # left of the image
  extra.append([10.0, img_h + 30, 50.0, img_h + 60])  # below the image
  for _ in range(4):  # tiny (< 1 feature cell)
    x, y = rng.uniform(0, img_w), rng.uniform(0, img_h)
    extra.append([x, y, x + rng.uniform(0.1, 3.0), y + rng.uniform(0.1, 3.0)])
  x, y = rng.uniform(0, img_w), rng.uniform(0, img_h)
  extra.append([x, y, x, y + 20.0])  # zero width
  extra.append([x, y, x, y])  # a point
  extra.append([0.0, 0.0, img_w, img_h])  # the whole image
  extra.append([0.0, 0.0, 4.0 / scale, 4.0 / scale])  # corner
  extra.append([img_w - 1.0, img_h - 1.0, img_w, img_h])  # last pixel
  boxes.append(np.asarray(extra[: r - n_main], np.float64))
  return feat, np.concatenate(boxes, 0).astype(np.float32)


def make_nms_inputs(
    seed: int, n: int, img_h: float, img_w: float, n_clusters: int, num_classes: int
):
  """Clustered boxes (many overlaps at all IoUs), distinct scores, random classes."""
  import numpy as np

  rng = np.random.default_rng(seed)
  centers = np.stack([rng.uniform(0, img_w, n_clusters), rng.uniform(0, img_h, n_clusters)], -1)
  sizes = np.exp(rng.uniform(np.log(12.0), np.log(400.0), (n_clusters, 1))) * np.exp(
      rng.uniform(np.log(0.5), np.log(2.0), (n_clusters, 2))
  )
  k = rng.integers(0, n_clusters, n)
  ctr = centers[k] + rng.normal(0, 1, (n, 2)) * sizes[k] * 0.15
  wh = sizes[k] * np.exp(rng.normal(0, 0.15, (n, 2)))
  boxes = np.concatenate([ctr - wh / 2, ctr + wh / 2], -1).astype(np.float32)
  boxes = np.clip(boxes, 0, [img_w, img_h, img_w, img_h]).astype(np.float32)
  # Distinct scores: a random permutation of (i + jitter) / n, so no ties decide the order.
  scores = ((rng.permutation(n) + rng.uniform(0.2, 0.8, n)) / n).astype(np.float32)
  classes = rng.integers(0, num_classes, n).astype(np.int64)
  return boxes, scores, classes


# ------------------------------------------------------------------------------------- JAX side
class JaxOps:

  def __init__(self):
    import functools

    import jax
    from cn2_jax.modeling.ops import nms as nms_ops
    from cn2_jax.modeling.ops import roi_align as ra

    self.jax = jax
    self.ra = ra
    self.nms_ops = nms_ops
    self.cache = functools.lru_cache(maxsize=None)(self._build)

  def _build(self, what, *static):
    jax, ra, nms_ops = self.jax, self.ra, self.nms_ops
    if what == "roi":
      scale, sr, cap = static
      return jax.jit(lambda f, b: ra.roi_align(f, b, scale, 7, sr, True, cap))
    if what == "need":
      (scale,) = static
      return jax.jit(lambda b: ra.required_adaptive_samples(b, scale, 7, True))
    if what == "nms":
      thr, n = static
      return jax.jit(lambda b, s, v: nms_ops.nms(b, s, v, thr, n))
    thr, n, mode = static
    return jax.jit(lambda b, s, c, v: nms_ops.batched_nms(b, s, c, v, thr, n, mode=mode))

  def required_cap(self, boxes, scale):
    """(cap, need): the per-axis adaptive grid the boxes need, computed under jit as in the model
    (eager and jitted float32 division can round differently)."""
    import numpy as np

    fn = self.cache("need", float(scale))
    need = np.asarray(fn(boxes))
    return tuple(int(max(v, 1)) for v in need), tuple(int(v) for v in need)

  def roi_align(self, feat, boxes, scale, sr, cap):
    import numpy as np

    fn = self.cache("roi", float(scale), int(sr), cap)
    out = np.asarray(self.jax.block_until_ready(fn(feat, boxes)))  # [R, 7, 7, C]
    return out.transpose(0, 3, 1, 2)  # torchvision [R, C, 7, 7]

  def nms(self, boxes, scores, thr):
    import numpy as np

    n = len(boxes)
    idx, ok = self.cache("nms", float(thr), n)(boxes, scores, np.ones(n, bool))
    return np.asarray(idx)[np.asarray(ok)].astype(np.int64)

  def batched_nms(self, boxes, scores, classes, thr, mode):
    import numpy as np

    n = len(boxes)
    idx, ok = self.cache("bnms", float(thr), n, mode)(
        boxes, scores, classes.astype(np.int32), np.ones(n, bool)
    )
    return np.asarray(idx)[np.asarray(ok)].astype(np.int64)


# ------------------------------------------------------------------------------------- torch side
class TorchOps:

  def __init__(self, torch, tvops):
    self.torch = torch
    self.tvops = tvops

  def roi_align(self, feat, boxes, scale, sr, device):
    t = self.torch
    x = t.from_numpy(feat.transpose(2, 0, 1).copy())[None].to(device)
    b = t.from_numpy(boxes).to(device)
    out = self.tvops.roi_align(
        x, [b], output_size=(7, 7), spatial_scale=scale, sampling_ratio=sr, aligned=True
    )
    return out.cpu().numpy()

  def nms(self, boxes, scores, thr, device):
    t = self.torch
    keep = self.tvops.nms(t.from_numpy(boxes).to(device), t.from_numpy(scores).to(device), thr)
    return keep.cpu().numpy().astype("int64")

  def batched_nms(self, boxes, scores, classes, thr, device):
    t = self.torch
    keep = self.tvops.batched_nms(
        t.from_numpy(boxes).to(device),
        t.from_numpy(scores).to(device),
        t.from_numpy(classes).to(device),
        thr,
    )
    return keep.cpu().numpy().astype("int64")


# ------------------------------------------------------------------------------------- compare
def compare_roi(got, ref) -> dict:
  import numpy as np

  d = np.abs(got.astype(np.float64) - ref.astype(np.float64))
  ref_norm = float(np.linalg.norm(ref.astype(np.float64)))
  return dict(
      max_abs=float(d.max()),
      max_abs_ref=float(np.abs(ref).max()),
      max_rel=float(d.max() / max(float(np.abs(ref).max()), 1e-30)),
      rel_l2=float(np.linalg.norm(d) / max(ref_norm, 1e-30)),
      finite=bool(np.isfinite(got).all()),
  )


def worst_boxes(jops, got, ref, boxes, scale, k=3) -> list:
  """The k boxes with the largest difference, with the adaptive grid (samples per bin and axis)
  torchvision computes (float32 `ceil(roi / 7)`, a true division) and the one cn2_jax uses."""
  import numpy as np

  d = np.abs(got.astype(np.float64) - ref.astype(np.float64)).reshape(len(boxes), -1).max(1)
  out = []
  f = np.float32
  for i in np.argsort(-d)[:k]:
    b = boxes[i].astype(np.float32)
    start = b * f(scale) - f(0.5)
    roi_w, roi_h = f(start[2] - start[0]), f(start[3] - start[1])
    grid_tv = (int(np.ceil(f(roi_h / f(7)))), int(np.ceil(f(roi_w / f(7)))))
    _, grid_jax = jops.required_cap(b[None], scale)
    out.append(
        dict(
            index=int(i),
            box=[round(float(v), 3) for v in b],
            max_abs=float(d[i]),
            grid_torchvision=grid_tv,
            grid_jax=grid_jax,
        )
    )
  return out


def compare_keep(got, ref) -> dict:
  sg, sr = set(got.tolist()), set(ref.tolist())
  return dict(
      kept_jax=int(len(got)),
      kept_torch=int(len(ref)),
      identical=bool(len(got) == len(ref) and (got == ref).all()),
      same_set=sg == sr,
      differing=int(len(sg ^ sr)),
  )


def run(args, torch, tvops) -> dict:
  import jax

  jops, tops = JaxOps(), TorchOps(torch, tvops)
  devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
  report = dict(
      jax=jax.__version__,
      jax_backend=jax.default_backend(),
      jax_device=jax.devices()[0].device_kind,
      torch=torch.__version__,
      torchvision=sys.modules["torchvision"].__version__,
      torch_devices=devices,
      roi=[],
      nms=[],
      failures=[],
  )
  if args.small:
    h, w, c, r, max_side, n_nms = 50, 84, 16, 64, 96.0, 600
  else:
    h, w, c, r, max_side, n_nms = 200, 336, 256, 512, 256.0, 5000
  scale = 0.25

  # ---------------- ROIAlign
  for seed in range(args.seeds):
    feat, boxes = make_roi_inputs(args.seed + seed, h, w, c, r, scale, max_side)
    cap, need = jops.required_cap(boxes, scale)
    for sr in (2, 0):
      t0 = time.perf_counter()
      got = jops.roi_align(feat, boxes, scale, sr, cap if sr == 0 else 8)
      t_jax = time.perf_counter() - t0
      for dev in devices:
        ref = tops.roi_align(feat, boxes, scale, sr, dev)
        cmp = compare_roi(got, ref)
        ok = cmp["finite"] and cmp["max_abs"] <= args.roi_atol and cmp["rel_l2"] <= args.roi_rtol
        entry = dict(
            seed=args.seed + seed,
            sampling_ratio=sr,
            torch_device=dev,
            feature=f"{h}x{w}x{c}",
            boxes=r,
            adaptive_cap=cap if sr == 0 else None,
            adaptive_need=need,
            jax_s=t_jax,
            ok=ok,
            **cmp,
        )
        report["roi"].append(entry)
        print(
            f"roi_align sr={sr} seed={entry['seed']} vs torchvision[{dev}]: "
            f"max abs {cmp['max_abs']:.3e} (|ref| <= {cmp['max_abs_ref']:.2f}), "
            f"max rel {cmp['max_rel']:.3e}, ||d||/||ref|| {cmp['rel_l2']:.3e}"
            + (f", cap {cap} (need {need})" if sr == 0 else "")
            + ("" if ok else "   <-- MISMATCH"),
            flush=True,
        )
        if not ok:
          report["failures"].append(f"roi_align sr={sr} seed={entry['seed']} {dev}")
          entry["worst_boxes"] = worst_boxes(jops, got, ref, boxes, scale)
          for wb in entry["worst_boxes"]:
            print(
                f"    box {wb['index']} {wb['box']}: max abs {wb['max_abs']:.3e}, adaptive grid "
                f"(h, w) torchvision {wb['grid_torchvision']} / cn2_jax {wb['grid_jax']}",
                flush=True,
            )

  # ---------------- NMS
  for seed in range(args.seeds):
    boxes, scores, classes = make_nms_inputs(
        args.seed + 1000 + seed, n_nms, 800.0, 1344.0, max(4, n_nms // 20), 80
    )
    for thr in (0.5, 0.7, 0.9):
      got = jops.nms(boxes, scores, thr)
      for dev in devices:
        cmp = compare_keep(got, tops.nms(boxes, scores, thr, dev))
        ok = cmp["differing"] <= args.nms_max_diff
        report["nms"].append(
            dict(
                op="nms",
                seed=args.seed + 1000 + seed,
                thr=thr,
                boxes=n_nms,
                torch_device=dev,
                jax_mode=None,
                ok=ok,
                **cmp,
            )
        )
        _print_keep("nms", thr, dev, None, cmp, ok)
        if not ok:
          report["failures"].append(f"nms thr={thr} {dev}")
      for dev in devices:
        ref = tops.batched_nms(boxes, scores, classes, thr, dev)
        modes = ["torchvision_cpu", "per_class"] if dev == "cpu" else ["torchvision_cuda"]
        for mode in modes:
          cmp = compare_keep(jops.batched_nms(boxes, scores, classes, thr, mode), ref)
          ok = cmp["differing"] <= args.nms_max_diff
          report["nms"].append(
              dict(
                  op="batched_nms",
                  seed=args.seed + 1000 + seed,
                  thr=thr,
                  boxes=n_nms,
                  torch_device=dev,
                  jax_mode=mode,
                  ok=ok,
                  **cmp,
              )
          )
          _print_keep("batched_nms", thr, dev, mode, cmp, ok)
          if not ok:
            report["failures"].append(f"batched_nms thr={thr} {dev} mode={mode}")
  return report


def _print_keep(op, thr, dev, mode, cmp, ok):
  print(
      f"{op} thr={thr} vs torchvision[{dev}]"
      + (f" (jax mode {mode})" if mode else "")
      + f": kept {cmp['kept_jax']} / {cmp['kept_torch']}, "
      + (
          "identical (indices and order)"
          if cmp["identical"]
          else f"{'same set, different order' if cmp['same_set'] else 'DIFFERENT'}, "
          f"{cmp['differing']} differing kept indices"
      )
      + ("" if ok else "   <-- MISMATCH"),
      flush=True,
  )


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--json", default=None, help="write the report here")
  p.add_argument("--small", action="store_true", help="small sizes (CPU)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--seeds", type=int, default=2, help="random cases per check")
  p.add_argument("--roi-atol", type=float, default=1e-4, help="max |jax - torchvision|")
  p.add_argument("--roi-rtol", type=float, default=1e-5, help="max ||d|| / ||ref||")
  p.add_argument("--nms-max-diff", type=int, default=0, help="differing kept indices allowed")
  args = p.parse_args(argv)
  try:
    import torch
    import torchvision  # noqa: F401
    from torchvision import ops as tvops
  except Exception as e:  # noqa: BLE001
    msg = f"SKIP: torch/torchvision not importable ({type(e).__name__}: {e}); nothing compared"
    print(msg, flush=True)
    if args.json:
      _write(args.json, {"skipped": msg})
    return 0
  t0 = time.perf_counter()
  report = run(args, torch, tvops)
  report["wall_s"] = time.perf_counter() - t0
  n_checks = len(report["roi"]) + len(report["nms"])
  status = "PASS" if not report["failures"] else "FAIL"
  print(
      f"\nparity {status}: {n_checks - len(report['failures'])}/{n_checks} checks within "
      f"tolerance (roi atol {args.roi_atol:g}, rtol {args.roi_rtol:g}; nms max differing "
      f"{args.nms_max_diff}); jax {report['jax']} on {report['jax_device']}, torch "
      f"{report['torch']} / torchvision {report['torchvision']} on {report['torch_devices']}; "
      f"{report['wall_s']:.0f} s",
      flush=True,
  )
  for f in report["failures"]:
    print("  mismatch:", f)
  report["status"] = status
  if args.json:
    _write(args.json, report)
  return 0 if not report["failures"] else 1


def _write(path, obj):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=1, default=str)


if __name__ == "__main__":
  sys.exit(main())
