"""State-dict specs of the OFFICIAL CenterNet2 zoo models (torch, CPU) for tests/test_zoo_configs.py.

For every non-base yaml of the official `configs/` folder, builds the model exactly as the
official code does (detectron2 `get_cfg()` + `centernet.config.add_centernet_config` +
`merge_from_file(<yaml>)`, `MODEL.DEVICE = "cpu"`, `MODEL.WEIGHTS = ""`, detectron2
`build_model`, eval mode) and writes `<out>/<yaml name>.json`: the state dict's entries
`[key, shape, dtype]` in state-dict order, with a few lines of metadata. No values: the test
builds zeros of these shapes and converts them strictly, so the files stay small.

Imports (no network, no compiled extensions):
  * detectron2 from its source tree without `_C`, with the minimal `torchvision` stand-in of
    bifpn_reference.py (`install_torchvision_standin`: detectron2 imports `torchvision.ops` names
    at import time; model construction calls none of them), its `__version__` set to
    "0.28.0+standin" (detectron2's `ROIAlign.__init__` parses it).
  * The CenterNet2 package is materialised from the repository (a checkout or `git show HEAD:`
    of a git dir) into a temporary folder and imported as is (`centernet/__init__.py`
    registers every official backbone, head and dataset). Without opencv a stand-in `cv2`
    module is installed (only `centernet/modeling/debug.py` imports it; construction never
    calls it).
  * Deformable convolutions: without `_C`, detectron2 replaces `DeformConv` /
    `ModulatedDeformConv` by classes that raise on construction. Before any model code is
    imported they are replaced (in `detectron2.layers.deform_conv` and `detectron2.layers`) by
    stand-ins with the official constructor signature, parameter names and shapes (`weight`
    [out, in / groups, kh, kw], `bias` [out] when bias=True, the `norm` sub-module), as
    shared/oracle_zoo README §3.2 does; their forward raises (never called here).
  * DLA ImageNet weights: both official DLA classes download them inside `__init__`.
    `dlafpn.DLA.load_pretrained_model` becomes a no-op; `dla.DLA.load_pretrained_model` only
    creates what the official method creates besides loading: `self.fc = nn.Conv2d(512, 1000,
    1)` (the ImageNet DLA-34 classifier, so `backbone.base.fc.{weight,bias}` are official keys;
    oracle README §3.3).
  * Federated loss (`ROI_BOX_HEAD.USE_FED_LOSS`): `CustomFastRCNNOutputLayers` reads
    `ROI_BOX_HEAD.CAT_FREQ_PATH` (datasets/lvis/lvis_v1_train_cat_info.json) in `__init__` and
    registers its `freq_weight` buffer ([1203] float32, persistent: an official checkpoint key).
    The path is pointed at a made-up 1203-category file (ids 1..1203, image_count 1): only the
    shape matters here.

Run (torch, numpy, fvcore, iopath, omegaconf, pycocotools, pillow, packaging; opencv optional):
  python tools/zoo_reference/state_dict_specs.py \
      --centernet2 /work/.mirror/xingyizhou+CenterNet2/repo --detectron2 <detectron2 source tree> \
      [--out tests/data/zoo/specs] [YAML_NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bifpn_reference import install_torchvision_standin, official_commit, read_official  # noqa: E402

# The yamls that are only bases of others (folded into their children; no spec of their own).
BASE_YAMLS = ("Base-CenterNet-FPN", "Base-CenterNet2", "Base_S4_DLA")
LVIS_NUM_CATEGORIES = 1203


def list_official(root: str, folder: str) -> list:
  """Paths of the files below `folder` in the CenterNet2 repository (checkout or git dir)."""
  import subprocess

  if os.path.isdir(os.path.join(root, folder)):
    out = []
    for dirpath, _, files in os.walk(os.path.join(root, folder)):
      out += [os.path.relpath(os.path.join(dirpath, f), root) for f in files]
    return sorted(out)
  listing = subprocess.run(
      ["git", "-C", root, "ls-tree", "-r", "--name-only", "HEAD", folder],
      check=True,
      capture_output=True,
      text=True,
  ).stdout
  return sorted(p for p in listing.splitlines() if p)


def materialise(root: str, dst: str) -> None:
  """Writes the official `centernet/` package and `configs/` yamls under `dst`."""
  for path in list_official(root, "centernet") + list_official(root, "configs"):
    if not path.endswith((".py", ".yaml")):
      continue
    target = os.path.join(dst, path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "w") as f:
      f.write(read_official(root, path))


def install_cv2_standin() -> None:
  try:
    import cv2  # noqa: F401
  except ImportError:
    sys.modules["cv2"] = types.ModuleType("cv2")  # centernet/modeling/debug.py only


def install_dcn_standins() -> None:
  """detectron2's DeformConv / ModulatedDeformConv replaced by parameter-only stand-ins."""
  import torch
  from torch import nn

  import detectron2.layers as d2_layers
  import detectron2.layers.deform_conv as d2_deform

  def pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

  class _StandInDeformConvBase(nn.Module):

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        deformable_groups=1,
        bias=False,
        norm=None,
        activation=None,
    ):
      super().__init__()
      kh, kw = pair(kernel_size)
      self.in_channels, self.out_channels = in_channels, out_channels
      self.kernel_size, self.stride = (kh, kw), pair(stride)
      self.padding, self.dilation = pair(padding), pair(dilation)
      self.groups, self.deformable_groups = groups, deformable_groups
      self.with_bias = bias
      self.norm, self.activation = norm, activation
      self.weight = nn.Parameter(torch.zeros(out_channels, in_channels // groups, kh, kw))
      self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, *args, **kwargs):
      raise RuntimeError("DCN stand-in of state_dict_specs.py: shapes only, no forward")

  class StandInDeformConv(_StandInDeformConvBase):

    def __init__(self, *args, bias=False, **kwargs):
      assert not bias  # as detectron2's DeformConv
      super().__init__(*args, bias=False, **kwargs)

  class StandInModulatedDeformConv(_StandInDeformConvBase):

    def __init__(self, *args, bias=True, **kwargs):
      super().__init__(*args, bias=bias, **kwargs)

  for mod in (d2_deform, d2_layers):
    mod.DeformConv = StandInDeformConv
    mod.ModulatedDeformConv = StandInModulatedDeformConv


def import_centernet(pkg_root: str):
  """The official package (its `__init__` registers everything) and its config module."""
  sys.path.insert(0, pkg_root)
  import centernet  # noqa: F401  (registers the official backbones, heads, datasets)
  import centernet.modeling.backbone.dla as dla
  import centernet.modeling.backbone.dlafpn as dlafpn
  from centernet.config import add_centernet_config
  from torch import nn

  def no_download(self, *args, **kwargs):
    del self, args, kwargs

  def declare_fc_only(self, *args, **kwargs):
    del args, kwargs
    self.fc = nn.Conv2d(self.channels[-1], 1000, kernel_size=1, stride=1, padding=0, bias=True)

  dlafpn.DLA.load_pretrained_model = no_download
  dla.DLA.load_pretrained_model = declare_fc_only
  return add_centernet_config


def spec_of(yaml_name: str, pkg_root: str, add_centernet_config, cat_info: str) -> dict:
  import torch
  from detectron2.config import get_cfg
  from detectron2.layers import FrozenBatchNorm2d
  from detectron2.modeling import build_model

  cfg = get_cfg()
  add_centernet_config(cfg)
  cfg.merge_from_file(os.path.join(pkg_root, "configs", f"{yaml_name}.yaml"))
  cfg.MODEL.DEVICE = "cpu"
  cfg.MODEL.WEIGHTS = ""
  notes = []
  if cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS:
    cfg.MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH = cat_info
    notes.append(
        "ROI_BOX_HEAD.CAT_FREQ_PATH -> a made-up 1203-category cat_info (freq_weight shape only)"
    )
    notes.append(
        "USE_FED_LOSS is also read by detectron2's own FastRCNNOutputLayers (detectron2 >= v0.6),"
        " which registers fed_loss_cls_weights (class_image_count ** FED_LOSS_FREQ_WEIGHT_POWER"
        " of the built-in LVIS metadata) beside CenterNet2's freq_weight; a checkpoint saved"
        " with an older detectron2 has freq_weight only"
    )
  torch.manual_seed(0)
  model = build_model(cfg)
  model.eval()
  state = model.state_dict()
  entries = [[key, list(v.shape), str(v.dtype).replace("torch.", "")] for key, v in state.items()]
  # Persistent buffers that are not norm statistics (what a converter may have to drop).
  modules = dict(model.named_modules())
  norms = (torch.nn.modules.batchnorm._NormBase, FrozenBatchNorm2d)
  params = dict(model.named_parameters())
  buffers = [
      key
      for key in state
      if key not in params and not isinstance(modules.get(key.rpartition(".")[0]), norms)
  ]
  return dict(
      yaml=f"configs/{yaml_name}.yaml",
      meta_architecture=cfg.MODEL.META_ARCHITECTURE,
      backbone=cfg.MODEL.BACKBONE.NAME,
      roi_heads=cfg.MODEL.ROI_HEADS.NAME
      if cfg.MODEL.META_ARCHITECTURE != "CenterNetDetector"
      else "",
      mask_on=bool(cfg.MODEL.MASK_ON),
      notes=notes,
      non_parameter_buffers=buffers,
      num_entries=len(entries),
      entries=entries,
  )


def dump(spec: dict, path: str) -> None:
  """JSON with one state-dict entry per line (small, diff-friendly)."""
  head = {k: v for k, v in spec.items() if k != "entries"}
  lines = [json.dumps(e) for e in spec["entries"]]
  with open(path, "w") as f:
    f.write(json.dumps(head, indent=1)[:-2] + ',\n "entries": [\n  ')
    f.write(",\n  ".join(lines))
    f.write("\n ]\n}\n")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--centernet2", default="/work/.mirror/xingyizhou+CenterNet2/repo")
  ap.add_argument("--detectron2", default="/tmp/zoo/d2_bifpn", help="source tree (no _C needed)")
  ap.add_argument("--out", default=os.path.join("tests", "data", "zoo", "specs"))
  ap.add_argument("yamls", nargs="*", help="yaml names (default: every non-base yaml)")
  args = ap.parse_args()

  sys.path.insert(0, args.detectron2)
  install_torchvision_standin()
  # detectron2's ROIAlign parses the first two version fields (and wants >= 0.7 for `aligned`).
  sys.modules["torchvision"].__version__ = "0.28.0+standin"
  install_cv2_standin()
  import torch

  torch.set_num_threads(2)
  install_dcn_standins()
  import detectron2

  commit = official_commit(args.centernet2)
  os.makedirs(args.out, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    pkg_root = os.path.join(tmp, "cn2")
    materialise(args.centernet2, pkg_root)
    add_centernet_config = import_centernet(pkg_root)
    cat_info = os.path.join(tmp, "lvis_v1_train_cat_info.json")
    with open(cat_info, "w") as f:
      json.dump([{"id": i + 1, "image_count": 1} for i in range(LVIS_NUM_CATEGORIES)], f)
    names = args.yamls or [
        os.path.basename(p)[: -len(".yaml")]
        for p in list_official(args.centernet2, "configs")
        if p.endswith(".yaml")
    ]
    for name in names:
      if name in BASE_YAMLS:
        continue
      spec = spec_of(name, pkg_root, add_centernet_config, cat_info)
      spec = dict(
          centernet2_commit=commit,
          detectron2=detectron2.__version__,
          torch=torch.__version__,
          generator="tools/zoo_reference/state_dict_specs.py",
          **spec,
      )
      path = os.path.join(args.out, f"{name}.json")
      dump(spec, path)
      print(f"{name}: {spec['num_entries']} entries, {spec['backbone']}, {spec['roi_heads']}")


if __name__ == "__main__":
  main()
