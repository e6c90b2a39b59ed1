"""The configuration schema: every key the project reads, with the official defaults.

`base_config()` is the single source of defaults (CenterNet2_R50_1x, spec §2-7). Config files in
`configs/` start from it and override values; `validate_config` rejects keys the schema does not
know (a misspelled key is an error naming it, never silently ignored) and checks a few invariants.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import ml_collections

from cn2_jax.errors import ConfigError

# Detector families with a registered meta-architecture (cn2_jax/modeling/meta_arch/).
ARCHS = ("centernet2",)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = ""  # ImageNet backbone checkpoint (Orbax dir or .pkl/.pth), backbone only
  c.weights = ""  # full-model weights (Orbax dir or official .pkl/.pth) for eval/predict
  # JAX persistent compilation cache: each padded shape (train bucket, eval canvas) is compiled
  # once, lazily, and reused by later runs. "" disables it.
  c.compilation_cache_dir = "~/.cache/cn2_jax/xla"

  # ---------------------------------------------------------------- model
  m = c.model = ml_collections.ConfigDict()
  m.arch = "centernet2"  # detector family (modeling/meta_arch/): one of ARCHS
  m.num_classes = 80
  m.dtype = "float32"  # compute dtype: "float32" or "bfloat16" (params stay f32)
  m.resnet_depth = 50
  m.stride_in_1x1 = True  # MSRA/caffe style (official); False for torchvision weights
  m.freeze_at = 2  # stem + res2 frozen
  m.resnet_width = 64  # stem/res2 width (64 official; smaller for tiny models)
  m.resnet_norm = "FrozenBN"  # "FrozenBN" (official), "GN" (training from scratch) or ""
  m.input_format = "BGR"  # official MSRA weights expect BGR; pipeline yields RGB
  m.pixel_mean = (103.530, 116.280, 123.675)  # in input_format order
  m.pixel_std = (1.0, 1.0, 1.0)
  m.fpn_channels = 256

  cn = m.centernet = ml_collections.ConfigDict()
  cn.num_convs = 4
  cn.prior_prob = 0.01
  cn.bbox_bias_init = 8.0
  cn.soi = ((0, 80), (64, 160), (128, 320), (256, 640), (512, 10000000))
  cn.hm_min_overlap = 0.8
  cn.min_radius = 4.0
  cn.dedup_positives = False  # True = MMDet reproduction's deduplicated positives
  # True = official: a GT's heatmap peak (hm = 1, ignored as a negative) on every level; False =
  # only on its cared levels (the MMDet reproduction's "revised" distance map), spec §3.7.
  cn.all_level_peaks = True
  cn.focal_alpha = 0.25
  cn.focal_beta = 4.0
  cn.loss_gamma = 2.0
  cn.sigmoid_clamp = 1e-4
  cn.ignore_high_fp = 0.85
  cn.pos_weight = 0.5
  cn.neg_weight = 0.5
  cn.reg_weight = 1.0
  cn.pre_nms_topk_train = 4000
  cn.post_nms_topk_train = 2000
  cn.pre_nms_topk_test = 1000
  cn.post_nms_topk_test = 256
  cn.nms_thresh_train = 0.9
  cn.nms_thresh_test = 0.9
  cn.inference_thresh = 1e-4
  cn.clip_proposals = False  # True: clip proposals to the image before NMS (MMDet port)

  r = m.roi_heads = ml_collections.ConfigDict()
  r.iou_thresholds = (0.6, 0.7, 0.8)
  r.box_weights = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
  r.batch_size_per_image = 512
  r.positive_fraction = 0.25
  r.pooler_resolution = 7
  # ROIAlign samples per bin and axis: 0 = official adaptive ceil(roi / 7) (ops/roi_align.py),
  # exact for every box whose bins need <= max_adaptive_samples (24 covers a 1333 px side on P3);
  # 2 = a fixed 2x2 grid (faster, scenic's choice; differs from the official pooled features).
  r.sampling_ratio = 0
  r.max_adaptive_samples = 24
  r.canonical_box_size = 224
  r.canonical_level = 4
  r.fc_dim = 1024
  r.num_fc = 2
  r.scale_clamp = math.log(1000.0 / 16)
  r.append_gt = True
  r.mult_proposal_score = True
  r.score_thresh_test = 0.05
  r.nms_thresh_test = 0.7
  r.detections_per_image = 100

  # ---------------------------------------------------------------- data
  d = c.data = ml_collections.ConfigDict()
  d.dataset = "coco/2017"  # "coco/2017", "coco_json" or "synthetic"
  d.name = ""  # tfds dataset name for coco_json / synthetic (default derived)
  d.root = ""  # COCO root (coco/2017) or dataset folder (coco_json/synthetic)
  d.train_json = ""  # coco_json: annotation files, relative to root or absolute
  d.val_json = ""
  d.image_root = ""  # coco_json: image folder (default: root)
  d.data_dir = ""  # where prepared array_record files go (default <workdir>/tfds)
  d.train_split = "train"
  d.eval_split = "val"
  d.min_size_train = (640, 672, 704, 736, 768, 800)
  d.max_size_train = 1333
  d.min_size_test = 800
  d.max_size_test = 1333
  # Padding (cn2_jax/data/buckets.py). Train: () = aspect-grouped batches, each padded to the
  # bucket of its short side and aspect group (one compile per bucket); (H, W) = one fixed canvas.
  # Eval/predict: () = every image on its official canvas (resized size rounded up to 32, as the
  # official test code pads it); (H, W) = one fixed canvas.
  d.pad_hw_train = ()
  d.pad_hw_test = ()
  d.size_divisibility = 32  # FPN: the deepest stride-32 level must tile the canvas
  d.aspect_grouping = True  # detectron2 ASPECT_RATIO_GROUPING (by orientation and aspect)
  d.bucket_aspect_ratios = (4.0 / 3.0, 1.5)  # long/short bounds of the aspect groups
  d.scale_per_batch = True  # one random short side per global batch (False: per image)
  d.lsj = False  # square random resize-and-crop instead of shortest edge
  d.lsj_size = 1024
  d.lsj_scale_range = (0.1, 2.0)
  d.flip = True
  d.filter_empty = True
  d.max_boxes = 100
  d.num_workers = 4
  d.synthetic_num_train = 0  # synthetic dataset size (0 = generator default)
  d.synthetic_num_val = 0
  d.synthetic_image_size = 0

  # ---------------------------------------------------------------- optimisation
  o = c.optim = ml_collections.ConfigDict()
  o.base_lr = 0.02  # LR for a global batch of reference_batch_size images
  # base_lr scales linearly to train.batch_size: lr = base_lr * batch_size / reference_batch_size
  # (detectron2 REFERENCE_WORLD_SIZE; iterations are NOT rescaled, see engine/optim.py); 0 = off.
  o.reference_batch_size = 16  # the official batch (8 GPUs x 2)
  o.momentum = 0.9
  o.weight_decay = 1e-4
  o.weight_decay_norm = 0.0
  o.warmup_iters = 4000
  o.warmup_factor = 0.00025
  o.steps = (60000, 80000)
  o.gamma = 0.1
  o.max_iter = 90000
  o.schedule = "multistep"  # or "cosine"
  o.clip_value = 1.0  # element-wise gradient value clip (d2 CLIP_TYPE=value)
  o.clip_norm = 0.0  # > 0: clip the global gradient L2 norm (MMDet: 35); 0 = off

  # ---------------------------------------------------------------- loop
  t = c.train = ml_collections.ConfigDict()
  t.batch_size = 16  # global
  t.eval_batch_size = 8
  t.log_every = 20
  t.checkpoint_every = 5000
  t.keep_checkpoints = 3
  t.eval_at_end = True
  t.eval_every = 0  # > 0: evaluate every this many steps during training (TensorBoard eval/*)
  t.async_checkpoint = True  # Orbax saves in the background; the next step checks the result
  t.check_vma = False  # shard_map varying-axis checks (engine/step.py docstring)
  t.progress_bar = True
  # Divergence guard (engine/loop.py): stop when the total loss or gradient norm exceeds
  # divergence_factor x its running median over divergence_window iterations for
  # divergence_patience iterations in a row (after divergence_min_steps); 0 = off.
  t.divergence_factor = 20.0
  t.divergence_window = 100
  t.divergence_patience = 5
  t.divergence_min_steps = 20

  p = c.predict = ml_collections.ConfigDict()
  p.images = ""  # comma-separated image paths for --mode=predict
  p.score_thresh = 0.3  # drawing threshold
  return c


def _check_keys(cfg, ref, prefix=""):
  for key in cfg.keys():
    path = f"{prefix}{key}"
    if key not in ref:
      raise KeyError(
          f"Unknown config key '{path}' (not in cn2_jax.config.base_config; " f"misspelled?)"
      )
    if isinstance(cfg[key], ml_collections.ConfigDict):
      if not isinstance(ref[key], ml_collections.ConfigDict):
        raise KeyError(f"Config key '{path}' must be a value, not a group")
      _check_keys(cfg[key], ref[key], path + ".")


def validate_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Raises KeyError naming any key unknown to the schema, ValueError on bad values."""
  _check_keys(cfg, base_config())
  m = cfg.model
  if m.arch not in ARCHS:
    raise ConfigError(f"model.arch must be one of {ARCHS}, got {m.arch!r}")
  if m.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {m.dtype!r}")
  if m.input_format not in ("BGR", "RGB"):
    raise ValueError(f"model.input_format must be 'BGR' or 'RGB', got {m.input_format!r}")
  if m.resnet_depth not in (18, 34, 50, 101):
    raise ValueError(f"model.resnet_depth must be 18, 34, 50 or 101, got {m.resnet_depth}")
  if len(m.roi_heads.iou_thresholds) != len(m.roi_heads.box_weights):
    raise ValueError("model.roi_heads.iou_thresholds and box_weights must have equal length")
  div = int(cfg.data.size_divisibility)
  if div <= 0 or div % 32:
    raise ValueError(f"data.size_divisibility must be a positive multiple of 32, got {div}")
  for name in ("pad_hw_train", "pad_hw_test"):
    hw = tuple(cfg.data[name])
    if hw and (len(hw) != 2 or any(int(v) <= 0 or int(v) % div for v in hw)):
      raise ValueError(
          f"data.{name}={hw} must be () (buckets / official padding) or (H, W), "
          f"multiples of {div} (FPN size divisibility)"
      )
  ar = tuple(cfg.data.bucket_aspect_ratios)
  if any(a < 1.0 for a in ar) or list(ar) != sorted(ar):
    raise ValueError(f"data.bucket_aspect_ratios={ar} must be increasing long/short ratios >= 1")
  if cfg.data.dataset not in ("coco/2017", "coco_json", "synthetic"):
    raise ValueError(
        f"data.dataset must be 'coco/2017', 'coco_json' or 'synthetic', "
        f"got {cfg.data.dataset!r}"
    )
  return cfg


def flatten_fields(tree: dict, prefix: str = "") -> dict:
  """{'model.fpn_channels': 64, ...} of a nested (json) dict; lists stay values."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten_fields(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def jsonable(v):
  """A config value as config.json stores it (tuples become lists)."""
  return json.loads(json.dumps(v))


def show_value(v) -> str:
  """A config value as a user types it on the command line."""
  return json.dumps(v) if isinstance(v, (list, str)) else str(v)


def get_field(cfg, field: str):
  """`cfg` value at a dotted field path (`model.fpn_channels`)."""
  for k in field.split("."):
    cfg = cfg[k]
  return cfg


def set_field(cfg, field: str, value) -> None:
  """Sets `cfg` at a dotted field path."""
  *parents, last = field.split(".")
  for k in parents:
    cfg = cfg[k]
  cfg[last] = value


def config_from_json(path: str) -> ml_collections.ConfigDict:
  """Rebuilds a run's ConfigDict from workdir/config.json on top of the schema defaults."""
  with open(path) as f:
    saved = json.load(f)
  cfg = base_config()

  def merge(dst, src, prefix=""):
    for k, v in src.items():
      if k not in dst:
        raise ConfigError(
            f"{path}: unknown config key '{prefix}{k}' (written by another " f"version of cn2_jax?)"
        )
      if isinstance(dst[k], ml_collections.ConfigDict):
        merge(dst[k], v, f"{prefix}{k}.")
      else:
        dst[k] = (
            tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
        )

  merge(cfg, saved)
  return validate_config(cfg)


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
  """Imports a python config file and returns its validated `get_config()`."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"Config file not found: {path}")
  spec = importlib.util.spec_from_file_location(f"cn2_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return validate_config(module.get_config())


def model_kwargs(m: Any) -> dict:
  """Plain-python view of config.model for building modules (tuples, not ConfigDicts)."""

  def conv(v):
    if isinstance(v, (list, tuple)):
      return tuple(conv(x) for x in v)
    return v

  return {
      k: (model_kwargs(v) if isinstance(v, ml_collections.ConfigDict) else conv(v))
      for k, v in m.items()
  }
