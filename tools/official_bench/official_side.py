"""The official side of bench/vs_official.py: CenterNet2_R50_1x run by the OFFICIAL code (detectron2
+ xingyizhou/CenterNet2 from their source trees, torch on the CPU), timed.

Run by bench/vs_official.py with the official side's python (environment: tools/official_bench/
setup_env.sh; bench/RESULTS.md, "CenterNet2_R50_1x vs the official code"); one case per process;
writes a JSON result (--out).

  python tools/official_bench/official_side.py --case infer|train|check-train \
      --detectron2 D2_SRC --centernet2 CN2_SRC --weights-json W.json \
      (--image IMG.jpg | --train-npz train_outputs_dev.npz) [--cuda-stubs DIR] \
      [--runs 5 --warmup 2 --threads N] --out RESULT.json

Nothing here is reimplemented: the model is built by detectron2's `build_model` from the official
yaml (`get_cfg()` + `centernet.config.add_centernet_config` + `merge_from_file`, `MODEL.DEVICE =
cpu`), the weights are the oracle's deterministic weights (`cn2_jax/testing/oracle.py`, numpy
only, loaded by file path so that neither JAX nor the cn2_jax package is imported here) loaded
with `load_state_dict(strict=True)`.

* `infer`: eval mode, `torch.no_grad()`, batch 1; times `model([{"image", "height", "width"}])`
  on the test-resized image (what `DefaultPredictor` runs after its resize: normalisation, padding
  to 32, backbone, CenterNet proposals, 3-stage cascade, `fast_rcnn_inference`,
  `detector_postprocess`) and, as `e2e`, the whole `DefaultPredictor.__call__` on the decoded BGR
  image (ResizeShortestEdge(800, 1333) + the above). Returns the detections.
* `train`: train mode, the official config unchanged (ROI_HEADS.BATCH_SIZE_PER_IMAGE 512, official
  solver: `build_optimizer` = SGD momentum 0.9, weight decay 1e-4, value clip 1.0;
  `build_lr_scheduler` = warm-up from 0.02 x 0.00025), the iteration of CenterNet2's
  `train_net.py` `do_train` (forward, loss sum, finiteness assert, `reduce_dict`, `zero_grad`,
  `backward`, `optimizer.step`, `scheduler.step`) on the oracle's dev batch (2 images, padded
  2x3x800x1216, its GT) fed as detectron2's DatasetMapper feeds it. Forward, backward and step are
  timed separately too.
* `check-train`: one forward of the oracle's exact setting (BATCH_SIZE_PER_IMAGE 8192, seed 0);
  returns the 9 loss terms to compare with the oracle's, which checks this
  environment (weights, torchvision's kernels, sources) against the one that made the oracle.

torchvision: its C++ ops (`nms`, `roi_align`) must load; with `--cuda-stubs DIR` (built by
tools/official_bench/cuda_stubs.py) the CUDA libraries its wheel links against are preloaded first.
The run refuses to start without torchvision's C++ ops.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

# siblings in tools/official_bench (the script's folder is sys.path[0]; standard library only)
import cuda_stubs as cuda_stubs_lib
import vs_official_common as common

REPO = Path(__file__).resolve().parents[2]
YAML = "configs/CenterNet2_R50_1x.yaml"
ORACLE_BATCH_SIZE_PER_IMAGE = 8192  # the training oracle's one config change


def _load_oracle_module():
  """cn2_jax/testing/oracle.py by path (numpy only; the cn2_jax package imports JAX)."""
  spec = importlib.util.spec_from_file_location(
      "cn2_oracle_weights", REPO / "cn2_jax" / "testing" / "oracle.py"
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _git_commit(src: str) -> str:
  """The source tree's commit: the OFFICIAL_COMMIT file of a `git archive` export
  (tools/official_bench/setup_env.sh writes it), else `git rev-parse HEAD` of a checkout."""
  p = Path(src) / "OFFICIAL_COMMIT"
  if p.is_file():
    return p.read_text().strip()
  if not (Path(src) / ".git").exists():
    return "unknown"
  try:
    out = subprocess.run(
        ["git", "-C", src, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()
  except (subprocess.CalledProcessError, FileNotFoundError):
    return "unknown"


def import_official(detectron2_src: str, centernet2_src: str, cuda_stubs: str | None) -> dict:
  """Makes torchvision (with its C++ ops), detectron2 and CenterNet2's `centernet` importable;
  returns their versions. torchvision must be imported after the stub preload, hence imports
  inside this function."""
  stub_manifest = cuda_stubs_lib.preload(cuda_stubs) if cuda_stubs else None
  no_ops = (
      "torchvision's C++ ops did not load (its wheel is a CUDA build?): build the CUDA stubs with "
      "tools/official_bench/cuda_stubs.py and pass --cuda-stubs, or install a CPU build"
  )
  try:
    import torchvision
    from torchvision.extension import _has_ops
  except RuntimeError as e:  # 0.28 registers fake kernels of ops that did not load
    raise SystemExit(f"{no_ops} ({e})") from e
  if not _has_ops():
    raise SystemExit(no_ops)
  sys.path[:0] = [detectron2_src, centernet2_src]
  import centernet  # noqa: F401  (registers CenterNet2's meta-arch, heads and backbones)
  import detectron2

  return dict(
      torch=torch.__version__,
      torchvision=torchvision.__version__,
      torchvision_ops="C++ (torchvision._C)",
      torchvision_file=torchvision.__file__,
      cuda_stubs=(
          dict(dir=cuda_stubs, symbols=len(stub_manifest["stubbed_symbols"]))
          if stub_manifest
          else None
      ),
      detectron2=detectron2.__version__,
      detectron2_commit=_git_commit(detectron2_src),
      centernet2_commit=_git_commit(centernet2_src),
      numpy=np.__version__,
      python=platform.python_version(),
  )


def build_official_model(centernet2_src: str, weights_json: str, batch_size_per_image=None):
  """(model, cfg): the official CenterNet2_R50_1x with the oracle weights (strict load)."""
  from centernet.config import add_centernet_config
  from detectron2.config import get_cfg
  from detectron2.modeling import build_model

  cfg = get_cfg()
  add_centernet_config(cfg)
  cfg.merge_from_file(os.path.join(centernet2_src, YAML))
  cfg.MODEL.DEVICE = "cpu"
  if batch_size_per_image is not None:
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = int(batch_size_per_image)
  cfg.freeze()
  model = build_model(cfg)
  state_dict = _load_oracle_module().regenerate_oracle_state_dict(weights_json)
  model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()})
  return model, cfg


def infer_case(args) -> dict:
  """Batch-1 inference on the image (see the module docstring)."""
  import detectron2.data.transforms as T
  from detectron2.data.detection_utils import read_image

  model, cfg = build_official_model(args.centernet2, args.weights_json)
  model.eval()
  original = read_image(args.image, format=cfg.INPUT.FORMAT)  # BGR HWC uint8
  h, w = original.shape[:2]
  aug = T.ResizeShortestEdge(
      [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
  )

  def to_input(image):
    resized = aug.get_transform(image).apply_image(image)
    tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
    return {"image": tensor, "height": h, "width": w}, resized.shape[:2]

  inputs, resized_hw = to_input(original)

  def model_only():
    with torch.no_grad():
      return model([inputs])[0]["instances"]

  def predictor():  # DefaultPredictor.__call__ (BGR input format: no channel flip)
    with torch.no_grad():
      return model([to_input(original)[0]])[0]["instances"]

  wall, cpu, inst = common.timed(model_only, args.warmup, args.runs)
  e2e_wall, _, _ = common.timed(predictor, 1, args.runs)
  return dict(
      case="infer",
      image=os.path.basename(args.image),
      orig_hw=[h, w],
      resized_hw=list(resized_hw),
      padded_hw=list(_padded_hw(resized_hw, model.backbone.size_divisibility)),
      model=dict(wall=wall, cpu=cpu),
      e2e=dict(wall=e2e_wall),
      detections=dict(
          boxes=inst.pred_boxes.tensor.numpy().tolist(),
          scores=inst.scores.numpy().tolist(),
          classes=inst.pred_classes.numpy().tolist(),
      ),
  )


def _padded_hw(hw, divisibility: int) -> tuple:
  d = max(int(divisibility), 1)
  return tuple(-(-int(v) // d) * d for v in hw)


def train_batch(npz_path: str) -> list:
  """The oracle's dev batch as detectron2's DatasetMapper hands it to the model: per image a CHW
  uint8 BGR tensor of the resized image and its `Instances` (gt_boxes, gt_classes)."""
  from detectron2.structures import Boxes, Instances

  z = np.load(npz_path)
  out = []
  for i in range(len(z["image_ids"])):
    bgr = z[f"img{i}_resized_bgr_uint8"]
    inst = Instances(bgr.shape[:2])
    inst.gt_boxes = Boxes(torch.as_tensor(z[f"gt{i}_boxes_xyxy"], dtype=torch.float32))
    inst.gt_classes = torch.as_tensor(z[f"gt{i}_classes"], dtype=torch.int64)
    out.append(
        dict(
            image=torch.as_tensor(np.ascontiguousarray(bgr.transpose(2, 0, 1))),
            instances=inst,
            height=int(z[f"img{i}_orig_hw"][0]),
            width=int(z[f"img{i}_orig_hw"][1]),
        )
    )
  return out


def train_case(args) -> dict:
  """Training iterations at the official sampling (see the module docstring)."""
  from detectron2.solver import build_lr_scheduler, build_optimizer
  from detectron2.utils import comm
  from detectron2.utils.events import EventStorage

  model, cfg = build_official_model(args.centernet2, args.weights_json)
  model.train()
  optimizer = build_optimizer(cfg, model)
  scheduler = build_lr_scheduler(cfg, optimizer)
  data = train_batch(args.train_npz)
  phases = dict(forward=[], backward=[], step=[])
  losses_seen = []

  def iteration():
    t0 = time.perf_counter()
    loss_dict = model(data)
    losses = sum(loss for loss in loss_dict.values())
    assert torch.isfinite(losses).all(), loss_dict
    reduced = {k: v.item() for k, v in comm.reduce_dict(loss_dict).items()}
    t1 = time.perf_counter()
    optimizer.zero_grad()
    losses.backward()
    t2 = time.perf_counter()
    optimizer.step()
    scheduler.step()
    t3 = time.perf_counter()
    for k, v in zip(("forward", "backward", "step"), (t1 - t0, t2 - t1, t3 - t2)):
      phases[k].append(v)
    losses_seen.append(dict(total=sum(reduced.values()), **reduced))
    return None

  with EventStorage(0) as storage:

    def step():
      storage.step()
      return iteration()

    wall, cpu, _ = common.timed(step, args.warmup, args.runs)
  timed = slice(args.warmup, None)
  roi = cfg.MODEL.ROI_HEADS
  return dict(
      case="train",
      batch=len(data),
      image_hw=[list(d["image"].shape[1:]) for d in data],
      padded_hw=list(
          _padded_hw(
              (max(d["image"].shape[1] for d in data), max(d["image"].shape[2] for d in data)),
              model.backbone.size_divisibility,
          )
      ),
      batch_size_per_image=int(roi.BATCH_SIZE_PER_IMAGE),
      positive_fraction=float(roi.POSITIVE_FRACTION),
      solver=dict(
          optimizer=type(optimizer).__name__,
          base_lr=cfg.SOLVER.BASE_LR,
          momentum=cfg.SOLVER.MOMENTUM,
          weight_decay=cfg.SOLVER.WEIGHT_DECAY,
          clip=dict(cfg.SOLVER.CLIP_GRADIENTS),
          warmup_iters=cfg.SOLVER.WARMUP_ITERS,
          lr_timed=[round(float(x), 10) for x in _lrs(cfg, args.warmup, args.runs)],
      ),
      iteration=dict(wall=wall, cpu=cpu),
      phases={k: common.stats(v[timed]) for k, v in phases.items()},
      losses=losses_seen,
  )


def _lrs(cfg, warmup: int, runs: int) -> list:
  """The official warm-up lr at the timed iterations (WarmupMultiStepLR, linear)."""
  s = cfg.SOLVER
  out = []
  for it in range(warmup, warmup + runs):
    a = it / s.WARMUP_ITERS
    factor = s.WARMUP_FACTOR * (1 - a) + a if it < s.WARMUP_ITERS else 1.0
    out.append(s.BASE_LR * factor)
  return out


def check_train_case(args) -> dict:
  """One training forward in the oracle's exact setting (8192 rows, seed 0): the 9 loss terms."""
  from detectron2.utils.events import EventStorage

  model, _ = build_official_model(
      args.centernet2, args.weights_json, batch_size_per_image=ORACLE_BATCH_SIZE_PER_IMAGE
  )
  model.train()
  data = train_batch(args.train_npz)
  torch.manual_seed(0)
  with EventStorage(0), torch.no_grad():
    loss_dict = model(data)
  return dict(case="check-train", losses={k: float(v) for k, v in loss_dict.items()})


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--case", choices=("infer", "train", "check-train"), required=True)
  ap.add_argument("--detectron2", required=True, help="detectron2 source tree")
  ap.add_argument("--centernet2", required=True, help="xingyizhou/CenterNet2 source tree")
  ap.add_argument("--weights-json", required=True, help="cn2_r50_oracle_weights.json")
  ap.add_argument("--image", help="infer: the image (COCO 000000000009.jpg)")
  ap.add_argument("--train-npz", help="train: train_outputs_dev.npz (the dev batch)")
  ap.add_argument("--cuda-stubs", help="folder built by tools/official_bench/cuda_stubs.py")
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
  ap.add_argument("--out", required=True)
  args = ap.parse_args()
  if args.threads > 0:
    torch.set_num_threads(args.threads)
  versions = import_official(args.detectron2, args.centernet2, args.cuda_stubs)
  start = common.machine_now()
  t0 = time.perf_counter()
  fn = dict(infer=infer_case, train=train_case, **{"check-train": check_train_case})[args.case]
  result = fn(args)
  result.update(
      side="official",
      versions=versions,
      threads=dict(
          torch_intra_op=torch.get_num_threads(),
          torch_inter_op=torch.get_num_interop_threads(),
          deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
      ),
      machine=dict(start=start, end_loadavg=list(os.getloadavg())),
      process_s=time.perf_counter() - t0,
      warmup=args.warmup,
      runs=args.runs,
  )
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
