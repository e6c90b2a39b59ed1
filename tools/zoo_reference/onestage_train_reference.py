"""Reference training targets, losses and gradients of the OFFICIAL one-stage CenterNet (torch,
CPU) for tests/test_onestage_official_train.py.

Runs the training branch of `CenterNet.forward` (centernet/modeling/dense_heads/centernet.py,
unmodified: `_get_ground_truth`, `_get_label_inds` / `_add_more_pos` + `_get_c33_inds`, `losses`
with `heatmap_focal_loss_jit`, `binary_heatmap_focal_loss_jit`, `IOULoss('giou')`), built by its
`from_config` from the official yamls (detectron2 `get_cfg()` + `centernet.config.
add_centernet_config` + `merge_from_file` + the overrides of each case), with the head replaced by
a stand-in that returns given maps (random class logits, regressions near the GT boxes so that
MORE_POS has something to choose). The arguments of `CenterNet.losses` are recorded (the final
positives, labels, regression targets and class heatmaps) and the gradient of the summed losses
w.r.t. the head's maps is taken.

Cases (NUM_CLASSES 4 everywhere, to keep the files small; the rest as the yaml says):
  fpn   CenterNet-FPN_R50_1x.yaml (P3-P7, default SOI, MORE_POS True, REG_WEIGHT 2): 2 images,
        canvas 160x224; tiny, border, overlapping, same-centre boxes, fractional coordinates.
  s4    CenterNet-S4_DLA_8x.yaml (stride 4, SOI [[0, 1e6]], REG_WEIGHT 1, MORE_POS True): 2
        images, canvas 64x96.
  agn   Base-CenterNet-FPN.yaml, 2 levels (p3, p4; SOI [[0, 48], [40, 1e7]]), MORE_POS False,
        WITH_AGN_HM True, NOT_NORM_REG False, IGNORE_HIGH_FP 0.85, HM_FOCAL_ALPHA -1,
        HM_FOCAL_BETA 3, LOSS_GAMMA 2.5, POS/NEG/REG_WEIGHT 0.5/1.5/1.5, HM_MIN_OVERLAP 0.7,
        MIN_RADIUS 2: 3 images (the middle one without GT), canvas 96x128.
  agn_more  Base-CenterNet-FPN.yaml, 2 levels (SOI [[0, 64], [48, 1e7]]), MORE_POS True with
        MORE_POS_TOPK 5, MORE_POS_THRESH 0.3, WITH_AGN_HM True, NOT_NORM_REG False: 3 images
        (the middle one without GT), canvas 96x128.

Stored per case (`onestage_train_<case>.npz`; NHWC per level, official flattened order for the
targets = level-first over the images, as `_transpose` builds it):
  cls_<l> [B, H, W, C], reg_<l> [B, H, W, 4], agn_<l> [B, H, W] (inputs); gt_boxes [B, M, 4],
  gt_classes [B, M], gt_valid [B, M] (padded, M = 12); hms [N, C], reg_targets [N, 4] (-1e8 /
  stride where invalid), pos_inds [P], labels [P]; loss_<name>; grad_cls_<l>, grad_reg_<l>,
  grad_agn_<l>; meta (JSON: settings, level shapes, versions).

Imports: detectron2 from its source tree without `_C` and with the `torchvision` stand-in of
bifpn_reference.py; `cv2` (imported, unused, by debug.py and dense_heads/utils.py) is stubbed.
The official sources (config.py, modeling/layers/{heatmap_focal_loss, iou_loss, ml_nms,
deform_conv}.py, modeling/debug.py, modeling/dense_heads/{utils, centernet_head, centernet}.py)
are written to a temporary package with empty `__init__.py` files (bypassing the project's
`centernet/__init__.py`) and imported from real files (`torch.jit.script` needs their source).

Run (needs torch, numpy, fvcore, cloudpickle, omegaconf, packaging, pycocotools):
  python tools/zoo_reference/onestage_train_reference.py --centernet2 <CenterNet2 git dir> \
      --detectron2 <detectron2 source tree> [--out tests/data/zoo]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import types
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bifpn_reference import (  # noqa: E402  (this folder is not a package)
    install_torchvision_standin,
    official_commit,
    read_official,
)

PKG = "cn2_official_centernet"
SOURCES = (
    "centernet/config.py",
    "centernet/modeling/debug.py",
    "centernet/modeling/layers/heatmap_focal_loss.py",
    "centernet/modeling/layers/iou_loss.py",
    "centernet/modeling/layers/ml_nms.py",
    "centernet/modeling/layers/deform_conv.py",
    "centernet/modeling/dense_heads/utils.py",
    "centernet/modeling/dense_heads/centernet_head.py",
    "centernet/modeling/dense_heads/centernet.py",
)
CONFIG_FILES = (
    "configs/Base-CenterNet-FPN.yaml",
    "configs/CenterNet-FPN_R50_1x.yaml",
    "configs/Base_S4_DLA.yaml",
    "configs/CenterNet-S4_DLA_8x.yaml",
)
NUM_CLASSES = 4
MAX_BOXES = 12

# Boxes (x1, y1, x2, y2, class) per image; [] = an image without GT.
FPN_GT = [
    [
        (3, 4, 6, 6, 0),  # tiny: its centre grid point lies outside it at every level
        (10, 12, 24, 30, 1),
        (12, 14, 22, 28, 1),  # same class, same centre cell as the previous box
        (13, 15, 21, 27, 2),  # other class, same centre cell
        (40, 30, 110, 90, 2),
        (0, 0, 30, 26, 3),  # top-left border
        (120, 20, 224, 150, 0),  # right border, half-diagonal 82: level 1 only
        (2, 40, 222, 158, 3),  # large
        (150, 60, 230, 110, 1),  # crosses the right border of the canvas
    ],
    [
        (50.5, 60.25, 57.75, 71.5, 1),
        (100, 100, 199.5, 149.5, 2),
        (30, 10, 170, 140, 0),
        (64, 64, 72, 72, 3),  # centre on a cell corner at stride 8
        (0, 100, 8, 149, 1),  # thin, left border
        (70, 2, 142, 70, 0),  # half-diagonal 70: levels 0 and 1
    ],
]
S4_GT = [
    [
        (1, 2, 4, 4, 0),
        (10, 8, 30, 40, 1),
        (50, 5, 96, 60, 2),
        (20, 20, 28, 27, 1),
        (21, 21, 27, 26, 1),
        (60, 40, 70, 64, 3),
    ],
    [(0, 0, 96, 64, 0), (40.5, 30.5, 44.5, 33.5, 2), (5, 50, 20, 63, 3), (70, 3, 73, 9, 1)],
]
SMALL_GT = [
    [
        (2, 3, 9, 8, 0),
        (20, 10, 60, 50, 1),
        (22, 12, 58, 48, 2),
        (70, 40, 128, 96, 3),
        (0, 60, 40, 95, 1),
        (90, 0, 100, 12, 2),
    ],
    [],
    [(10, 10, 90, 80, 0), (33.5, 41.25, 47.75, 52.5, 3), (100, 70, 126, 95, 0), (5, 5, 9, 30, 2)],
]

CASES = {
    "fpn": dict(
        yaml="configs/CenterNet-FPN_R50_1x.yaml",
        overrides=[],
        canvas=(160, 224),
        image_hw=[(160, 224), (150, 200)],
        gt=FPN_GT,
    ),
    "s4": dict(
        yaml="configs/CenterNet-S4_DLA_8x.yaml",
        overrides=[],
        canvas=(64, 96),
        image_hw=[(64, 96), (64, 90)],
        gt=S4_GT,
    ),
    "agn": dict(
        yaml="configs/Base-CenterNet-FPN.yaml",
        overrides=[
            ("IN_FEATURES", ["p3", "p4"]),
            ("FPN_STRIDES", [8, 16]),
            ("SOI", [[0, 48], [40, 10000000]]),
            ("MORE_POS", False),
            ("WITH_AGN_HM", True),
            ("NOT_NORM_REG", False),
            ("IGNORE_HIGH_FP", 0.85),
            ("HM_FOCAL_ALPHA", -1.0),
            ("HM_FOCAL_BETA", 3),
            ("LOSS_GAMMA", 2.5),
            ("POS_WEIGHT", 0.5),
            ("NEG_WEIGHT", 1.5),
            ("REG_WEIGHT", 1.5),
            ("HM_MIN_OVERLAP", 0.7),
            ("MIN_RADIUS", 2),
        ],
        canvas=(96, 128),
        image_hw=[(96, 128), (90, 128), (96, 120)],
        gt=SMALL_GT,
    ),
    "agn_more": dict(
        yaml="configs/Base-CenterNet-FPN.yaml",
        overrides=[
            ("IN_FEATURES", ["p3", "p4"]),
            ("FPN_STRIDES", [8, 16]),
            ("SOI", [[0, 64], [48, 10000000]]),
            ("MORE_POS", True),
            ("MORE_POS_TOPK", 5),
            ("MORE_POS_THRESH", 0.3),
            ("WITH_AGN_HM", True),
            ("NOT_NORM_REG", False),
        ],
        canvas=(96, 128),
        image_hw=[(96, 128), (90, 128), (96, 120)],
        gt=SMALL_GT,
    ),
}

SETTINGS = (  # MODEL.CENTERNET keys the JAX side needs (recorded in meta)
    "NUM_CLASSES",
    "IN_FEATURES",
    "FPN_STRIDES",
    "SOI",
    "HM_MIN_OVERLAP",
    "MIN_RADIUS",
    "MORE_POS",
    "MORE_POS_THRESH",
    "MORE_POS_TOPK",
    "HM_FOCAL_ALPHA",
    "HM_FOCAL_BETA",
    "LOSS_GAMMA",
    "SIGMOID_CLAMP",
    "IGNORE_HIGH_FP",
    "POS_WEIGHT",
    "NEG_WEIGHT",
    "REG_WEIGHT",
    "NOT_NORM_REG",
    "WITH_AGN_HM",
    "ONLY_PROPOSAL",
    "NO_REDUCE",
    "LOC_LOSS_TYPE",
)


def level_shapes(canvas, strides):
  """Feature map sizes of the official backbones on a canvas (a multiple of 32): H / s for the
  strides up to 32, then stride-2 convs with padding 1 (P6, P7: ceil halving)."""
  shapes, (h, w) = [], canvas
  for s in strides:
    if s <= 32:
      shapes.append((h // s, w // s))
    else:
      ph, pw = shapes[-1]
      shapes.append(((ph + 1) // 2, (pw + 1) // 2))
  return shapes


def make_inputs(case, spec, shapes, strides, with_agn):
  """Head maps (NHWC float32 per level): class logits N(-3, 1.5), larger at the GT centres
  (some above logit(0.85)); regressions U(0.2, 6) (5% exactly 0, as after the ReLU), replaced
  with 80% probability by the 3x3-cell targets of a GT times exp(N(0, 0.12)), so that MORE_POS
  costs spread around its threshold."""
  rs = np.random.RandomState(zlib.crc32(f"onestage_train_reference.{case}".encode("utf-8")))
  b = len(spec["gt"])
  cls, reg, agn = [], [], []
  for h, w in shapes:
    cls.append(rs.normal(-3.0, 1.5, size=(b, h, w, NUM_CLASSES)))
    r = rs.uniform(0.2, 6.0, size=(b, h, w, 4))
    r[rs.uniform(size=r.shape) < 0.05] = 0.0
    reg.append(r)
    agn.append(rs.normal(-2.5, 1.5, size=(b, h, w)))
  for i, boxes in enumerate(spec["gt"]):
    for x1, y1, x2, y2, c in boxes:
      cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
      for l, ((h, w), s) in enumerate(zip(shapes, strides)):
        ix, iy = int(cx / s), int(cy / s)
        if 0 <= iy < h and 0 <= ix < w:
          cls[l][i, iy, ix, c] = rs.normal(0.5, 1.5)
          agn[l][i, iy, ix] = rs.normal(0.5, 1.5)
        for dy in (-1, 0, 1):
          for dx in (-1, 0, 1):
            jx, jy = ix + dx, iy + dy
            if not (0 <= jy < h and 0 <= jx < w) or rs.uniform() > 0.8:
              continue
            gx, gy = jx * s + s // 2, jy * s + s // 2
            t = np.array([gx - x1, gy - y1, x2 - gx, y2 - gy]) / s
            reg[l][i, jy, jx] = np.maximum(t, 0.05) * np.exp(rs.normal(0.0, 0.12, size=4))
  f = lambda xs: [np.asarray(x, np.float32) for x in xs]  # noqa: E731
  return f(cls), f(reg), f(agn) if with_agn else None


def install_official(cn2_root: str, tmpdir: str):
  """Write the official sources as package PKG under tmpdir; import and return its modules."""
  import detectron2  # noqa: F401  (its environment setup looks for a real cv2 first)

  sys.modules.setdefault("cv2", types.ModuleType("cv2"))  # imported by debug.py / utils.py only
  for path in SOURCES:
    rel = path.replace("centernet/", f"{PKG}/", 1)
    dst = os.path.join(tmpdir, rel)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(dst, "w") as f:
      f.write(read_official(cn2_root, path))
  for d in (PKG, f"{PKG}/modeling", f"{PKG}/modeling/layers", f"{PKG}/modeling/dense_heads"):
    open(os.path.join(tmpdir, d, "__init__.py"), "w").close()
  for path in CONFIG_FILES:  # merge_from_file resolves _BASE_ next to the yaml
    dst = os.path.join(tmpdir, path)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(dst, "w") as f:
      f.write(read_official(cn2_root, path))
  sys.path.insert(0, tmpdir)
  import importlib

  config = importlib.import_module(f"{PKG}.config")
  centernet = importlib.import_module(f"{PKG}.modeling.dense_heads.centernet")
  return config, centernet


def run_case(case, spec, config_mod, centernet_mod, tmpdir):
  import torch
  from detectron2.config import get_cfg
  from detectron2.layers import ShapeSpec
  from detectron2.structures import Boxes, Instances

  cfg = get_cfg()
  config_mod.add_centernet_config(cfg)
  cfg.merge_from_file(os.path.join(tmpdir, spec["yaml"]))
  opts = [("NUM_CLASSES", NUM_CLASSES)] + list(spec["overrides"])
  cfg.merge_from_list([x for k, v in opts for x in (f"MODEL.CENTERNET.{k}", v)])
  cn = cfg.MODEL.CENTERNET
  strides = list(cn.FPN_STRIDES)
  in_features = list(cn.IN_FEATURES)
  input_shape = {f: ShapeSpec(channels=32, stride=s) for f, s in zip(in_features, strides)}
  model = centernet_mod.CenterNet(cfg, input_shape)
  model.train()

  shapes = level_shapes(spec["canvas"], strides)
  cls, reg, agn = make_inputs(case, spec, shapes, strides, cn.WITH_AGN_HM)

  def leaf(x):  # NHWC numpy -> NCHW leaf tensor
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).requires_grad_()

  cls_t = [leaf(x) for x in cls]
  reg_t = [leaf(x) for x in reg]
  agn_t = [leaf(x[..., None]) for x in agn] if agn is not None else None

  class StandInHead(torch.nn.Module):

    def forward(self, features):
      return cls_t, reg_t, (agn_t if agn_t is not None else [None] * len(features))

  model.centernet_head = StandInHead()
  recorded = {}
  official_losses = model.losses

  def recording_losses(pos_inds, labels, reg_targets, flattened_hms, *rest):
    recorded.update(
        pos_inds=pos_inds.detach().clone(),
        labels=labels.detach().clone(),
        reg_targets=reg_targets.detach().clone(),
        hms=flattened_hms.detach().clone(),
    )
    return official_losses(pos_inds, labels, reg_targets, flattened_hms, *rest)

  model.losses = recording_losses
  b = len(spec["gt"])
  features = {
      f: torch.zeros(b, 1, h, w) for f, (h, w) in zip(in_features, shapes)
  }  # only their sizes are read (compute_grids)
  gt_instances = []
  gt_boxes = np.zeros((b, MAX_BOXES, 4), np.float32)
  gt_classes = np.zeros((b, MAX_BOXES), np.int32)
  gt_valid = np.zeros((b, MAX_BOXES), bool)
  for i, (boxes, hw) in enumerate(zip(spec["gt"], spec["image_hw"])):
    inst = Instances(hw)
    arr = np.array([bx[:4] for bx in boxes], np.float32).reshape(-1, 4)
    inst.gt_boxes = Boxes(torch.from_numpy(arr))
    inst.gt_classes = torch.tensor([bx[4] for bx in boxes], dtype=torch.int64)
    gt_instances.append(inst)
    gt_boxes[i, : len(boxes)] = arr
    gt_classes[i, : len(boxes)] = [bx[4] for bx in boxes]
    gt_valid[i, : len(boxes)] = True
    # padded rows: garbage the JAX side must ignore
    gt_boxes[i, len(boxes) :] = [5.0, 5.0, 60.0, 50.0]
    gt_classes[i, len(boxes) :] = 1
  _, losses = model(None, features, gt_instances)
  total = sum(losses.values())
  total.backward()

  arrays = dict(gt_boxes=gt_boxes, gt_classes=gt_classes, gt_valid=gt_valid)
  for l in range(len(shapes)):
    arrays[f"cls_{l}"] = cls[l]
    arrays[f"reg_{l}"] = reg[l]
    arrays[f"grad_cls_{l}"] = cls_t[l].grad.numpy().transpose(0, 2, 3, 1)
    arrays[f"grad_reg_{l}"] = reg_t[l].grad.numpy().transpose(0, 2, 3, 1)
    if agn is not None:
      arrays[f"agn_{l}"] = agn[l]
      arrays[f"grad_agn_{l}"] = agn_t[l].grad.numpy()[:, 0]
  arrays["hms"] = recorded["hms"].numpy().astype(np.float32)
  arrays["reg_targets"] = recorded["reg_targets"].numpy().astype(np.float32)
  arrays["pos_inds"] = recorded["pos_inds"].numpy().astype(np.int64)
  arrays["labels"] = recorded["labels"].numpy().astype(np.int64)
  for k, v in losses.items():
    arrays[k] = np.float32(v.detach().item())
  settings = {k: cn[k] for k in SETTINGS}
  info = dict(
      yaml=spec["yaml"],
      overrides=[[k, v] for k, v in spec["overrides"]],
      settings=settings,
      canvas=list(spec["canvas"]),
      level_shapes=[list(s) for s in shapes],
      losses={k: float(v.detach().item()) for k, v in losses.items()},
      num_pos=int(recorded["pos_inds"].numel()),
      num_reg=int((recorded["reg_targets"].max(dim=1)[0] >= 0).sum().item()),
  )
  return arrays, info


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--centernet2", default="/work/.mirror/xingyizhou+CenterNet2/repo")
  ap.add_argument("--detectron2", default="/tmp/zoo/d2_bifpn", help="source tree (no _C needed)")
  ap.add_argument("--out", default=os.path.join("tests", "data", "zoo"))
  args = ap.parse_args()

  sys.path.insert(0, args.detectron2)
  install_torchvision_standin()
  import torch

  torch.set_num_threads(2)
  os.makedirs(args.out, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmpdir:
    config_mod, centernet_mod = install_official(args.centernet2, tmpdir)
    for case, spec in CASES.items():
      arrays, info = run_case(case, spec, config_mod, centernet_mod, tmpdir)
      info.update(
          centernet2_commit=official_commit(args.centernet2),
          detectron2_source=args.detectron2,
          torch=torch.__version__,
          numpy=np.__version__,
      )
      arrays["meta"] = np.array(json.dumps(info, sort_keys=True))
      path = os.path.join(args.out, f"onestage_train_{case}.npz")
      np.savez_compressed(path, **arrays)
      print(case, json.dumps(info["losses"]), "pos", info["num_pos"], "reg", info["num_reg"])
      print("  wrote", path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
  main()
