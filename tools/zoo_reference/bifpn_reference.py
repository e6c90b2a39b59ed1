"""Reference outputs of the OFFICIAL CenterNet2 BiFPN (torch, CPU) for tests/test_zoo_bifpn.py.

Runs `centernet/modeling/backbone/bifpn.py` (class `BiFPN`) unmodified, built by the official
builders `build_p37_dla_bifpn_backbone` (bifpn.py) and `build_res2net_bifpn_backbone`
(res2net.py) from the official yamls (detectron2 `get_cfg()` + `centernet.config.
add_centernet_config` + `merge_from_file`), with the bottom-up network replaced by a stand-in
`Backbone` that returns given tensors (the builders' `dla34(cfg)` / `build_res2net_backbone(cfg,
input_shape)` return it). A third case builds `BiFPN` directly with `separable_conv=True`,
`norm=''` and two in_features (not a zoo config; it covers the remaining code paths).

Cases (image sizes are small; every level is an exact halving, as with the official
size_divisibility 128):
  dla : CenterNet2_DLA-BiFPN-P5_640_16x.yaml, 128x256 image: dla3 16x32x128, dla4 8x16x256,
        dla5 4x8x512 -> 160 ch, 3 cells, GN.
  r2  : CenterNet2_R2-101-DCN-BiFPN_1280_4x.yaml, 128x128 image: res3 16x16x512, res4 8x8x1024,
        res5 4x4x2048 -> 288 ch, 7 cells, GN.
  sep : BiFPN(in_features res3/res4 (32, 96 ch), 64 ch, 2 cells, norm='', separable_conv=True),
        128x128 image.
  fcos: bifpn_fcos.py (AdelaiDet BiFPN), CenterNet2_DLA-fcosBiFPN-P5_640_16x_ST.yaml
        (build_p37_fcos_dla_bifpn_backbone: 160 ch, 3 cells, 2 top levels, GN), 128x128, DLA maps.
  fcos3: bifpn_fcos.py, CenterNet2_DLA-BiFPN-P3_4x.yaml (build_p35_fcos_dla_bifpn_backbone:
        P3-P5 only, 160 ch, 4 cells, GN), 128x128, DLA maps.

Weights: the oracle_zoo README §4 rule (numpy legacy RandomState(crc32("backbone." + key)); GN
weight U(0.8, 1.2), GN bias N(0, 0.05), edge_weights (fcos: weights_f*) U(0.5, 1.5), conv weights
N(0, sqrt(2 / fan_in)), conv biases N(0, 0.01)), so for the zoo configs they equal the zoo oracle's
BiFPN weights key for key. They are not stored (160-288 ch convs are tens of MB): each case gets a
weight-spec JSON in the oracle format (`bifpn_reference_<case>_weights.json`, regenerated and
checked by `cn2_jax.testing.oracle.regenerate_oracle_state_dict`).
Inputs: per level, RandomState(crc32("bifpn_reference.<case>.<name>")): channel means
N(1.5 + 0.5 i, 2 + i), channel stds U(0.5, 1.5), values mean + std * N(0, 1) drawn as NHWC
float64, cast to float32 (the magnitudes of the zoo oracle's bottom-up maps); not stored either,
their float64 sums are (`<case>_input_<name>_sum`, `_abssum`).
Stored (`bifpn_reference.npz`): `<case>_p3` ... `<case>_p7` (NHWC float32, the official outputs
transposed from NCHW), input checksums, and `meta` (JSON: versions, case attributes, the official
module's output strides / features / size_divisibility).

Imports: detectron2 from its source tree without `_C` (the BiFPN path never calls it), with a
minimal `torchvision` stand-in in sys.modules (detectron2.layers imports `torchvision.ops` names
at import time; every stand-in function raises, none is on the BiFPN path). CenterNet2's
`centernet/__init__.py` (which imports the whole project) is bypassed: config.py, fpn_p5.py,
bifpn.py, res2net.py and bifpn_fcos.py are executed from the official sources as modules of a stand-in package
whose `dlafpn` module only holds the stand-in `dla34`.

Run (needs torch, numpy, fvcore, cloudpickle, omegaconf, packaging, pycocotools):
  python tools/zoo_reference/bifpn_reference.py --centernet2 <CenterNet2 git dir or checkout> \
      --detectron2 <detectron2 source tree> [--out tests/data/zoo]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import types
import zlib

import numpy as np

CONFIG_FILES = (
    "configs/Base-CenterNet2.yaml",
    "configs/CenterNet2_DLA-BiFPN-P5_640_16x.yaml",
    "configs/CenterNet2_R2-101-DCN-BiFPN_1280_4x.yaml",
    "configs/CenterNet2_DLA-fcosBiFPN-P5_640_16x_ST.yaml",
    "configs/CenterNet2_DLA-BiFPN-P3_4x.yaml",
)
OFFICIAL_MODULES = ("fpn_p5", "bifpn", "res2net", "bifpn_fcos")
SOURCES = ("centernet/config.py",) + tuple(
    f"centernet/modeling/backbone/{m}.py" for m in OFFICIAL_MODULES
)
PKG = "cn2_official_backbone"  # stand-in package for the official backbone modules

CASES = {
    "dla": dict(
        yaml="configs/CenterNet2_DLA-BiFPN-P5_640_16x.yaml",
        builder="build_p37_dla_bifpn_backbone",
        image_hw=(128, 256),
        bottom_up={"dla3": (128, 8), "dla4": (256, 16), "dla5": (512, 32)},
    ),
    "r2": dict(
        yaml="configs/CenterNet2_R2-101-DCN-BiFPN_1280_4x.yaml",
        builder="build_res2net_bifpn_backbone",
        image_hw=(128, 128),
        bottom_up={"res3": (512, 8), "res4": (1024, 16), "res5": (2048, 32)},
    ),
    "sep": dict(
        yaml=None,
        builder=None,
        image_hw=(128, 128),
        bottom_up={"res3": (32, 8), "res4": (96, 16)},
        bifpn=dict(out_channels=64, norm="", num_levels=5, num_bifpn=2, separable_conv=True),
    ),
    "fcos": dict(
        yaml="configs/CenterNet2_DLA-fcosBiFPN-P5_640_16x_ST.yaml",
        builder="build_p37_fcos_dla_bifpn_backbone",
        image_hw=(128, 128),
        bottom_up={"dla3": (128, 8), "dla4": (256, 16), "dla5": (512, 32)},
    ),
    "fcos3": dict(
        yaml="configs/CenterNet2_DLA-BiFPN-P3_4x.yaml",
        builder="build_p35_fcos_dla_bifpn_backbone",
        image_hw=(128, 128),
        bottom_up={"dla3": (128, 8), "dla4": (256, 16), "dla5": (512, 32)},
    ),
}


# ----------------------------------------------------------------------------------------------
# Deterministic inputs and weights (numpy only).
# ----------------------------------------------------------------------------------------------
def make_input(case: str, name: str, level: int, hw, channels: int) -> np.ndarray:
  """`[1, H, W, C]` float32 (see the module docstring)."""
  rs = np.random.RandomState(zlib.crc32(f"bifpn_reference.{case}.{name}".encode("utf-8")))
  mean = rs.normal(1.5 + 0.5 * level, 2.0 + level, size=channels)
  std = rs.uniform(0.5, 1.5, size=channels)
  x = mean + std * rs.normal(0.0, 1.0, size=(1, hw[0], hw[1], channels))
  return x.astype(np.float32)


def weight_rule(key: str, shape, module_class: str):
  """(init_rule, rule_params) of oracle_zoo README §4 for a BiFPN state-dict key."""
  leaf = key.rsplit(".", 1)[1]
  if leaf == "edge_weights" or leaf.startswith("weights_f"):  # bifpn / bifpn_fcos fusion weights
    return "uniform", [0.5, 1.5]
  if module_class == "GroupNorm":
    return ("uniform", [0.8, 1.2]) if leaf == "weight" else ("normal", [0.0, 0.05])
  if len(shape) >= 2:
    return "normal", [0.0, float(np.sqrt(2.0 / int(np.prod(shape[1:]))))]
  return "normal", [0.0, 0.01]


def generate(key: str, shape, rule: str, params) -> np.ndarray:
  rs = np.random.RandomState(zlib.crc32(key.encode("utf-8")))
  draw = rs.normal if rule == "normal" else rs.uniform
  return np.asarray(draw(params[0], params[1], size=tuple(shape)), np.float64).astype(np.float32)


def spec_entry(key, shape, module_class) -> tuple:
  rule, params = weight_rule(key, shape, module_class)
  x = generate(key, shape, rule, params)
  x64 = x.astype(np.float64)
  entry = dict(
      key=key,
      shape=list(shape),
      dtype="float32",
      numel=int(x.size),
      is_parameter=True,
      module_class=module_class,
      init_rule=rule,
      rule_params=params,
      check_sum=float(x64.sum()),
      check_abs_sum=float(np.abs(x64).sum()),
      check_first3=[float(v) for v in x.reshape(-1)[:3]],
  )
  return entry, x


# ----------------------------------------------------------------------------------------------
# Importing the official code.
# ----------------------------------------------------------------------------------------------
def read_official(root: str, path: str) -> str:
  """A file of the CenterNet2 repository: from a checkout, or `git show HEAD:path` of a git dir."""
  if os.path.isfile(os.path.join(root, path)):
    with open(os.path.join(root, path)) as f:
      return f.read()
  return subprocess.run(
      ["git", "-C", root, "show", f"HEAD:{path}"], check=True, capture_output=True, text=True
  ).stdout


def official_commit(root: str) -> str:
  try:
    return subprocess.run(
        ["git", "-C", root, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
  except (subprocess.CalledProcessError, FileNotFoundError):
    return "unknown"


def install_torchvision_standin() -> None:
  """detectron2.layers / modeling import these names at import time; nothing here calls them."""

  def unavailable(*args, **kwargs):
    raise RuntimeError("torchvision stand-in: not available (not on the BiFPN path)")

  tv = types.ModuleType("torchvision")
  tv.__version__ = "0.0+standin"
  ops = types.ModuleType("torchvision.ops")
  boxes = types.ModuleType("torchvision.ops.boxes")
  for name in ("deform_conv2d", "roi_align", "nms", "batched_nms"):
    setattr(ops, name, unavailable)
  for name in ("nms", "batched_nms", "box_area", "box_iou"):
    setattr(boxes, name, unavailable)

  class RoIPool:  # noqa: D401 (stand-in)

    def __init__(self, *args, **kwargs):
      unavailable()

  ops.RoIPool = RoIPool
  ops.boxes = boxes
  tv.ops = ops
  sys.modules.update({"torchvision": tv, "torchvision.ops": ops, "torchvision.ops.boxes": boxes})


def load_official(cn2_root: str):
  """(config module, {name: official backbone module}, stand-in holder) from the sources."""
  import torch  # noqa: F401  (before detectron2)
  from detectron2.modeling.backbone import Backbone
  from detectron2.layers import ShapeSpec

  class StandInBottomUp(Backbone):
    """Returns `features` (NCHW tensors set by the caller) whatever its input."""

    def __init__(self, spec):
      super().__init__()
      self._out_features = list(spec)
      self._out_feature_channels = {k: c for k, (c, _) in spec.items()}
      self._out_feature_strides = {k: s for k, (_, s) in spec.items()}
      self.features = None

    def forward(self, x):
      return dict(self.features)

    def output_shape(self):
      return {
          k: ShapeSpec(channels=self._out_feature_channels[k], stride=self._out_feature_strides[k])
          for k in self._out_features
      }

  holder = types.SimpleNamespace(spec=None, StandIn=StandInBottomUp)

  pkg = types.ModuleType(PKG)
  pkg.__path__ = []
  sys.modules[PKG] = pkg
  dlafpn = types.ModuleType(f"{PKG}.dlafpn")
  dlafpn.dla34 = lambda cfg, pretrained=None: StandInBottomUp(holder.spec)
  sys.modules[f"{PKG}.dlafpn"] = dlafpn

  def exec_module(name, path):
    mod = types.ModuleType(name)
    mod.__package__ = PKG if name.startswith(PKG + ".") else None
    mod.__file__ = path
    sys.modules[name] = mod
    exec(compile(read_official(cn2_root, path), path, "exec"), mod.__dict__)
    return mod

  config = exec_module("cn2_official_config", "centernet/config.py")
  mods = {}
  for m in OFFICIAL_MODULES:
    mods[m] = exec_module(f"{PKG}.{m}", f"centernet/modeling/backbone/{m}.py")
  # build_res2net_bifpn_backbone looks this name up in its module globals at call time.
  mods["res2net"].build_res2net_backbone = lambda cfg, input_shape: StandInBottomUp(holder.spec)
  return config, mods, holder


def official_cfg(config_mod, cn2_root: str, yaml_path: str, tmpdir: str):
  from detectron2.config import get_cfg

  for path in CONFIG_FILES:  # merge_from_file resolves _BASE_ next to the yaml
    dst = os.path.join(tmpdir, path)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(dst, "w") as f:
      f.write(read_official(cn2_root, path))
  cfg = get_cfg()
  config_mod.add_centernet_config(cfg)
  cfg.merge_from_file(os.path.join(tmpdir, yaml_path))
  return cfg


# ----------------------------------------------------------------------------------------------
def run_case(case, spec, config_mod, mods, holder, cn2_root, tmpdir):
  import torch
  from detectron2.layers import ShapeSpec

  holder.spec = spec["bottom_up"]
  if spec["builder"] is not None:
    cfg = official_cfg(config_mod, cn2_root, spec["yaml"], tmpdir)
    module = next(m for m in mods.values() if spec["builder"] in vars(m))
    model = getattr(module, spec["builder"])(cfg, ShapeSpec(channels=3))
    attrs = dict(
        in_features=list(cfg.MODEL.FPN.IN_FEATURES),
        out_channels=cfg.MODEL.BIFPN.OUT_CHANNELS,
        norm=cfg.MODEL.BIFPN.NORM,
        num_bifpn=cfg.MODEL.BIFPN.NUM_BIFPN,
    )
    if module is mods["bifpn_fcos"]:  # the fcos builders ignore NUM_LEVELS / SEPARABLE_CONV
      attrs["num_top_levels"] = model.bottom_up.num_top_levels
    else:
      attrs.update(
          num_levels=cfg.MODEL.BIFPN.NUM_LEVELS, separable_conv=cfg.MODEL.BIFPN.SEPARABLE_CONV
      )
  else:
    attrs = dict(in_features=list(spec["bottom_up"]), **spec["bifpn"])
    model = mods["bifpn"].BiFPN(cfg=None, bottom_up=holder.StandIn(holder.spec), **attrs)
  attrs["in_channels"] = [spec["bottom_up"][f][0] for f in attrs["in_features"]]
  model.eval()

  modules = dict(model.named_modules())
  entries, state = [], {}
  for key, value in model.state_dict().items():
    module_class = type(modules[key.rsplit(".", 1)[0]]).__name__
    entry, x = spec_entry("backbone." + key, tuple(value.shape), module_class)
    entries.append(entry)
    state[key] = torch.from_numpy(x)
  model.load_state_dict(state, strict=True)

  h, w = spec["image_hw"]
  inputs, arrays = {}, {}
  for i, (name, (channels, stride)) in enumerate(spec["bottom_up"].items()):
    x = make_input(case, name, i, (h // stride, w // stride), channels)
    inputs[name] = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    arrays[f"{case}_input_{name}_sum"] = np.float64(x.astype(np.float64).sum())
    arrays[f"{case}_input_{name}_abssum"] = np.float64(np.abs(x.astype(np.float64)).sum())
  standin = model.bottom_up
  while not isinstance(standin, holder.StandIn):  # bifpn_fcos wraps it (BackboneWithTopLevels)
    standin = standin.backbone
  standin.features = inputs
  with torch.no_grad():
    out = model(torch.zeros(1, 3, h, w))
  for name, y in out.items():
    arrays[f"{case}_{name}"] = np.ascontiguousarray(y.numpy().transpose(0, 2, 3, 1))
  info = dict(
      attrs=attrs,
      image_hw=[h, w],
      bottom_up={k: list(v) for k, v in spec["bottom_up"].items()},
      official_out_features=list(model._out_features),
      official_out_strides=dict(model._out_feature_strides),
      official_size_divisibility=model.size_divisibility,
      yaml=spec["yaml"],
      builder=spec["builder"] or "BiFPN(...) directly",
      max_abs={k: float(np.abs(v).max()) for k, v in arrays.items() if v.ndim == 4},
  )
  weights = dict(
      seed_rule="numpy.random.RandomState(zlib.crc32(key.encode('utf-8'))); float64 draw of "
      "size=shape, cast to float32 (oracle_zoo README §4 rules); tools/zoo_reference/"
      "bifpn_reference.py",
      num_entries=len(entries),
      entries=entries,
  )
  return arrays, info, weights


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
  config_mod, mods, holder = load_official(args.centernet2)
  os.makedirs(args.out, exist_ok=True)
  arrays, meta = {}, dict(
      centernet2_commit=official_commit(args.centernet2),
      detectron2_source=args.detectron2,
      torch=torch.__version__,
      numpy=np.__version__,
      cases={},
  )
  with tempfile.TemporaryDirectory() as tmpdir:
    for case, spec in CASES.items():
      a, info, weights = run_case(case, spec, config_mod, mods, holder, args.centernet2, tmpdir)
      arrays.update(a)
      meta["cases"][case] = info
      with open(os.path.join(args.out, f"bifpn_reference_{case}_weights.json"), "w") as f:
        json.dump(weights, f, indent=0)
      print(case, json.dumps(info["attrs"]), "max|out|", info["max_abs"])
  arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
  path = os.path.join(args.out, "bifpn_reference.npz")
  np.savez_compressed(path, **arrays)
  print("wrote", path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
  main()
