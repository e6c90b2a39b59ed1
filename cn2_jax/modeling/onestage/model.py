"""centerX one-stage CenterNet: ResNet C5 (or RegNet s4) -> 3 DeconvLayers (stride 4) -> cls / wh
/ reg heads (docs/onestage.md §2-§3; centerX `modeling/meta_arch/centernet.py`).

Sub-modules are named `backbone` (`backbone_name` "resnet": the shared `modeling/backbone/resnet.py`
ResNet in torchvision style, detectron2 names: `backbone.stem.conv1`, `backbone.res2.0.conv1.norm`,
...; a pycls name such as "RegNetX-400MF": `modeling/backbone/regnet.py` with pycls names,
`backbone.stem.conv`, `backbone.s1.b1.f.a_bn`, ...), `upsample`, `head`;
`cn2_jax/weights/onestage.py` maps centerX's state-dict keys onto these paths.

Call contract (the batch contract of docs/DESIGN.md; `image` is RGB uint8 zero-padded at the
bottom/right, `image_hw` the valid size):
  * `model.init(rng, batch, train=False)` -> `{'params', 'batch_stats'}`;
  * `model.apply(variables, batch, train=False)` -> detections `boxes [B, K, 4]` (resized-image
    pixels, so `detector.postprocess_detections` maps them to the original image), `scores`,
    `classes` int32, `valid` bool (all True), K = `max_detections`;
  * `model.apply(variables, batch, train=True, mutable=['batch_stats'])` -> (losses, updates):
    `loss_cls`, `loss_box_wh`, `loss_off_reg` (already weighted; the total is their sum) and
    `aux/num_pos`. BatchNorm uses batch statistics and updates the running ones;
    `bn_train=False` keeps it in eval mode while training (then nothing is mutated).
Intermediates sown under `intermediates`: `input` (normalised image), `c5`,
`upsample/deconv{1,2,3}_out`, `neck`, `cls`, `wh`, `reg`.

Preprocessing (docs/onestage.md §2.1): RGB (or BGR when `input_format == "BGR"`, e.g.
xingyizhou/CenterNet weights), x / 255, minus `pixel_mean`, divided by `pixel_std` (both in the
model's channel order, in [0, 1] units), then 0 outside `image_hw`.

The official canvas (`mask_canvas`, default): centerX pads each GPU's batch to its largest image
rounded up to 32 (`canvas.official_canvas(image_hw)`; under `shard_map` the per-device batch),
while this project's batches sit on a fixed canvas (`image.shape[1:3]`, e.g. max_size^2 with the
crop, or a bucket). The model restricts itself to the official canvas: every conv that mixes
neighbours (backbone, neck, head) reads its input zeroed off it, BatchNorm statistics (and RegNet's
SE average) cover its positions only, the head maps are zeroed off it (so the decode cannot return
a detection there: scores are >= 0, so zeros act as the peak max-pool's -inf padding) and the
heatmap loss, focal or MSE, and the distillation terms count only its positions. So a batch on any
larger canvas gives the losses, gradients, BatchNorm updates and detections of its official canvas
(tests/test_onestage_canvas.py). Targets are drawn on the whole input canvas (`image.shape[1:3]`,
a multiple of `down_scale`); on the official canvas they are the same. `mask_canvas=False` is the
earlier behaviour: the whole input canvas counts (its padding adds BatchNorm samples and heatmap
negatives), equal to centerX only when the input canvas is the official one.

Ignore regions: the batch's crowd rows (`gt_crowd` and not `gt_valid`) give the targets'
`hm_ignore` (targets.py), where the heatmap loss (focal or MSE) and the distillation heatmap term
(kd.py) have no negative term (docs/onestage.md §3.8). A batch without `gt_crowd` has none.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cn2_jax.modeling.variables import (  # noqa: F401  (re-exported: the family-agnostic helpers)
    abstract_module_variables as abstract_variables,
    dummy_batch,
    init_fn,
    init_module_variables as init_variables,
)
from cn2_jax.modeling.backbone import regnet
from cn2_jax.modeling.backbone.resnet import ResNet
from cn2_jax.modeling import export_mode
from cn2_jax.modeling.canvas import canvas_mask, official_canvas, zero_outside
from cn2_jax.modeling.layers import COMPUTE_DTYPES, BatchNormSettings
from cn2_jax.modeling.onestage import decode as decode_lib
from cn2_jax.modeling.onestage import losses as loss_lib
from cn2_jax.modeling.onestage.head import CenternetHead
from cn2_jax.modeling.onestage.neck import CenternetDeconv
from cn2_jax.modeling.onestage.targets import batch_targets

# "float64" only under jax.enable_x64 (the oracle's double-precision reference).
# centerX's `build_resnet` (a torchvision ResNet) as `ResNet` settings: stride on the 3x3 conv,
# torch's default conv init (centerX relies on the ImageNet checkpoint), nothing frozen, plain
# (no ResNeXt groups, no deformable stage), C5 only.
_TORCHVISION_RESNET = dict(
    stride_in_1x1=False,
    conv_init="torch",
    freeze_at=0,
    out_features=("res5",),
    num_groups=1,
    width_per_group=0,
    deform_on_per_stage=(False, False, False, False),
    deform_modulated=False,
    deform_num_groups=1,
)


class CenterNetOneStage(nn.Module):
  """The model. Every attribute is required; `build_onestage_model` / the `onestage` meta-arch
  fill them from the config schema (`config.model.onestage` plus the shared `num_classes`,
  `resnet_depth` -> `depth`, `resnet_width` -> `backbone_width`, `dtype`), where their defaults
  (centerX `centernet_res18_coco_0.5.yaml`) and meanings are documented.

  Architecture: `num_classes`, `backbone_name` ("resnet" or a `regnet.REGNETS` name; the setting
  `model.onestage.backbone`), `depth` (18/34/50/101), `backbone_width` (both ResNet only),
  `deconv_channels` (outputs of deconv1..3), `deconv_kernels`, `use_deform`, `modulate_deform`,
  `dcn_zero_init_offset`, `head_conv` (0 = neck channels), `bias_value`, `head_init`,
  `down_scale` (output stride). Input: `pixel_mean`, `pixel_std` ([0, 1] units), `input_format`.
  Targets/losses: `min_overlap`, `radius_formula`, `tensor_dim`, `cls_weight`, `wh_weight`,
  `reg_weight`, `norm_wh`, `hm_loss` ("focal" | "mse", centerX LOSS.MSE), `focal_clamp`
  ((lo, hi), None = no bound), `ignore_unlabel`
  (docs/onestage.md §4.5), `communism` / `communism_targets` ((cls, wh, off); `losses.communism`).
  Decoding: `max_detections` (K), `clamp_wh` (False = official inverted boxes).
  `mask_canvas`: restrict the model to the batch's official canvas (module docstring).
  Numerics: `bn_momentum` (Flax convention), `bn_eps`, `dtype` ("float32" | "bfloat16";
  "float64" under `jax.enable_x64` only). `sync_bn`: BatchNorm statistics over `axis_name` (the
  data axis the train step sets with `clone(axis_name=...)`); False = per-device statistics.
  `remat` (the shared `config.model.remat`): the backbone's blocks (and stem) are rematerialised in
  training (`ResNet.remat`, `RegNet.remat`); the neck and head keep their activations.
  """

  num_classes: int
  backbone_name: str
  depth: int
  backbone_width: int
  deconv_channels: Sequence[int]
  deconv_kernels: Sequence[int]
  use_deform: bool
  modulate_deform: bool
  dcn_zero_init_offset: bool
  head_conv: int
  bias_value: float
  head_init: str
  down_scale: int
  pixel_mean: Sequence[float]
  pixel_std: Sequence[float]
  input_format: str
  min_overlap: float
  radius_formula: str
  tensor_dim: int
  cls_weight: float
  wh_weight: float
  reg_weight: float
  norm_wh: str
  hm_loss: str
  focal_clamp: Tuple[Optional[float], Optional[float]]
  ignore_unlabel: bool
  communism: bool
  communism_targets: Sequence[float]
  max_detections: int
  clamp_wh: bool
  bn_momentum: float
  bn_eps: float
  dtype: str
  sync_bn: bool
  remat: bool
  mask_canvas: bool
  axis_name: Optional[str] = None  # set by the train step (model.clone), not a setting

  def setup(self):
    dtype = COMPUTE_DTYPES[self.dtype]
    bn_axis = self.axis_name if self.sync_bn else None
    norm = "SyncBN" if self.sync_bn else "BN"
    batch_norm = BatchNormSettings(self.bn_momentum, self.bn_eps, bn_axis)
    if self.backbone_name == "resnet":
      self.backbone = ResNet(
          depth=self.depth,
          width=self.backbone_width,
          norm=norm,
          batch_norm=batch_norm,
          dtype=dtype,
          remat=self.remat,
          **_TORCHVISION_RESNET,
      )
    else:  # centerX `build_regnet`: the last stage (stride 32) feeds the neck
      self.backbone = regnet.build_regnet(
          self.backbone_name, norm=norm, batch_norm=batch_norm, dtype=dtype, remat=self.remat
      )
    self.upsample = CenternetDeconv(
        tuple(self.deconv_channels),
        tuple(self.deconv_kernels),
        self.use_deform,
        self.modulate_deform,
        self.dcn_zero_init_offset,
        self.bn_momentum,
        self.bn_eps,
        bn_axis,
        dtype,
    )
    self.head = CenternetHead(
        self.num_classes, self.head_conv, self.bias_value, self.head_init, dtype
    )

  def preprocess(self, image: jax.Array, image_hw: jax.Array) -> jax.Array:
    """`[B, H, W, 3]` uint8 RGB -> normalised `[B, H, W, 3]` float32 (float64 for a float64
    model), 0 outside `image_hw` (inside `export_mode.normalized_input()`: the image is that
    normalised tensor already)."""
    f = jnp.promote_types(COMPUTE_DTYPES[self.dtype], jnp.float32)
    if export_mode.normalized_input_enabled():  # export --input normalized: already this tensor
      return zero_outside(image.astype(f), image_hw)
    x = image.astype(f)
    if self.input_format == "BGR":
      x = x[..., ::-1]
    elif self.input_format != "RGB":
      raise ValueError(f"input_format must be 'RGB' or 'BGR', got {self.input_format!r}")
    # centerX order: (x / 255 - mean) / std, all float32.
    x = (x / jnp.asarray(255.0, f) - jnp.asarray(self.pixel_mean, f)) / jnp.asarray(
        self.pixel_std, f
    )
    return zero_outside(x, image_hw)

  def canvas(self, image_hw: jax.Array) -> Optional[jax.Array]:
    """`[2]` int32: the batch's official canvas (`canvas.official_canvas` of `image_hw [B, 2]`),
    or None without `mask_canvas` (the whole input canvas counts)."""
    return official_canvas(image_hw) if self.mask_canvas else None

  def map_canvas(self, canvas_hw: Optional[jax.Array], map_hw) -> Optional[jax.Array]:
    """`[H, W]` bool: the head-map locations (`map_hw`, stride `down_scale`) on the canvas;
    None when `canvas_hw` is None."""
    return canvas_mask(map_hw, canvas_hw, self.down_scale)

  def maps(
      self, images: jax.Array, train_bn: bool = False, canvas_hw: Optional[jax.Array] = None
  ) -> Dict[str, jax.Array]:
    """Normalised images `[B, H, W, 3]` and the official canvas `canvas_hw` (`[2]`, from
    `canvas`; None = the whole input) -> head maps `cls [B, H/4, W/4, C]` (sigmoid), `wh`,
    `reg` `[B, H/4, W/4, 2]` (float32), zero off the canvas."""
    dtype = COMPUTE_DTYPES[self.dtype]
    out = "res5" if self.backbone_name == "resnet" else regnet.OUTPUT
    c5 = self.backbone(images.astype(dtype), canvas_hw, train_bn=train_bn)[out]
    self.sow("intermediates", "c5", c5)
    neck = self.upsample(c5, train_bn, canvas_hw)
    self.sow("intermediates", "neck", neck)
    out = self.head(neck, canvas_hw, self.down_scale)
    keep = self.map_canvas(canvas_hw, out["cls"].shape[1:3])
    if keep is not None:
      # Zero (not arbitrary) off the canvas: no peak or detection there, and no gradient.
      out = {
          k: jnp.where(keep[None, :, :, None], v, jnp.zeros((), v.dtype)) for k, v in out.items()
      }
    for k, v in out.items():
      self.sow("intermediates", k, v)
    return out

  def dense_outputs(
      self, image: jax.Array, image_hw: jax.Array, train_bn: bool = False
  ) -> Dict[str, jax.Array]:
    """The dense part of the forward (no decode): `preprocess` (sown as intermediate `input`),
    then `maps` on the batch's `canvas`: `cls [B, H/4, W/4, C]` (sigmoid), `wh`, `reg`
    `[B, H/4, W/4, 2]` (float32), what `--onnx-part dense` exports."""
    images = self.preprocess(image, image_hw)
    self.sow("intermediates", "input", images)
    return self.maps(images, train_bn, self.canvas(image_hw))

  def targets(self, batch: Mapping[str, jax.Array]) -> Dict[str, jax.Array]:
    """Targets of the batch on its canvas (see `targets.centernet_targets`)."""
    h, w = batch["image"].shape[1:3]
    if h % self.down_scale or w % self.down_scale:
      raise ValueError(f"canvas {h}x{w} is not a multiple of down_scale {self.down_scale}")
    crowd = batch.get("gt_crowd")
    return batch_targets(
        batch["gt_boxes"],
        batch["gt_classes"],
        batch["gt_valid"],
        None if crowd is None else jnp.asarray(crowd, bool) & ~jnp.asarray(batch["gt_valid"], bool),
        out_hw=(h // self.down_scale, w // self.down_scale),
        num_classes=self.num_classes,
        down_scale=self.down_scale,
        min_overlap=self.min_overlap,
        tensor_dim=self.tensor_dim,
        radius_formula=self.radius_formula,
    )

  def heatmap_ignore(
      self, gt_ignore: Optional[jax.Array], canvas_hw: Optional[jax.Array], map_shape
  ) -> Optional[jax.Array]:
    """The heatmap terms' ignore map `[B, H, W, C]` (nonzero = no negative term; the MSE terms
    leave it out of the mean): the targets' `hm_ignore` (None = none) and, with a canvas, every
    location off it."""
    keep = self.map_canvas(canvas_hw, map_shape[1:3])
    if keep is None:
      return gt_ignore
    base = jnp.zeros(map_shape, jnp.float32) if gt_ignore is None else gt_ignore
    return jnp.where(keep[None, :, :, None], base, jnp.ones((), base.dtype))

  def losses(
      self,
      maps: Mapping[str, jax.Array],
      gt: Mapping[str, jax.Array],
      canvas_hw: Optional[jax.Array] = None,
  ) -> Dict[str, jax.Array]:
    """centerX `CenterNet.losses` on head maps and `targets` output (`hm_loss` "mse": centerX
    LOSS.MSE; `aux/num_pos` is still the number of GT peaks); the heatmap loss counts only the
    locations on `canvas_hw` (None = all)."""
    ignore = self.heatmap_ignore(gt.get("hm_ignore"), canvas_hw, maps["cls"].shape)
    if self.hm_loss == "mse":
      loss_cls = loss_lib.mse_heatmap_loss(maps["cls"], gt["score_map"], ignore)
      num_pos = (gt["score_map"] == 1.0).astype(jnp.float32).sum()
    elif self.hm_loss == "focal":
      loss_cls, num_pos = loss_lib.modified_focal_loss(
          maps["cls"],
          gt["score_map"],
          tuple(self.focal_clamp),
          self.ignore_unlabel,
          ignore,
      )
    else:
      raise ValueError(f"hm_loss must be 'focal' or 'mse', got {self.hm_loss!r}")
    loss_wh = loss_lib.reg_l1_loss(maps["wh"], gt["index"], gt["reg_mask"], gt["wh"], self.norm_wh)
    loss_reg = loss_lib.reg_l1_loss(maps["reg"], gt["index"], gt["reg_mask"], gt["reg"])
    return {
        "loss_cls": loss_cls * self.cls_weight,
        "loss_box_wh": loss_wh * self.wh_weight,
        "loss_off_reg": loss_reg * self.reg_weight,
        "aux/num_pos": num_pos,
    }

  def finish_losses(self, losses: Mapping[str, jax.Array]) -> Dict[str, jax.Array]:
    """The whole loss dict (GT and KD terms) -> what the step sums: the communism rescaling when
    `communism` (centerX applies it to every term of the step, KD ones included)."""
    if not self.communism:
      return dict(losses)
    return loss_lib.communism(losses, tuple(self.communism_targets))

  def __call__(
      self, batch: Mapping[str, jax.Array], train: bool = False, bn_train: Optional[bool] = None
  ):
    train_bn = train if bn_train is None else bn_train
    maps = self.dense_outputs(batch["image"], batch["image_hw"], train_bn)
    if train:
      canvas_hw = self.canvas(batch["image_hw"])
      return self.finish_losses(self.losses(maps, self.targets(batch), canvas_hw))
    dets = decode_lib.decode(
        maps["cls"],
        maps["wh"],
        maps["reg"],
        k=self.max_detections,
        down_scale=self.down_scale,
        clamp_wh=self.clamp_wh,
    )
    return {k: dets[k] for k in ("boxes", "scores", "classes", "valid")}


MODEL_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(CenterNetOneStage)
    if f.name not in ("parent", "name", "axis_name")
)
# Attribute <- shared `config.model` key (the others come from `config.model.onestage`).
_SHARED = {
    "num_classes": "num_classes",
    "depth": "resnet_depth",
    "backbone_width": "resnet_width",
    "remat": "remat",
}
# Attribute <- `config.model.onestage` key of another name (`backbone` is the sub-module's name).
_RENAMED = {"backbone_name": "backbone"}
_TUPLES = (
    "deconv_channels",
    "deconv_kernels",
    "pixel_mean",
    "pixel_std",
    "focal_clamp",
    "communism_targets",
)


def model_fields(model_config: Any) -> Dict[str, Any]:
  """The model's attributes from a `config.model` (ConfigDict or its plain dict)."""
  m = model_config
  out = {attr: m[key] for attr, key in _SHARED.items()}
  out["dtype"] = m["dtype"]
  onestage = dict(m["onestage"])
  out.update({k: v for k, v in onestage.items() if k in MODEL_FIELDS})
  out.update({attr: onestage[key] for attr, key in _RENAMED.items()})
  for key in _TUPLES:
    out[key] = tuple(out[key])
  return out


def build_onestage_model(
    model_config: Optional[Mapping[str, Any]] = None, axis_name: Optional[str] = None, **overrides
) -> CenterNetOneStage:
  """A `CenterNetOneStage` from the schema defaults (`config.base_config().model`) updated by a
  flat mapping (dict / ConfigDict) of its attribute names and keyword overrides. Unknown keys
  raise ValueError (a misspelled option must not be ignored)."""
  from cn2_jax.config import base_config  # cycle: config imports the families, which import this

  cfg = dict(model_config.to_dict() if hasattr(model_config, "to_dict") else (model_config or {}))
  cfg.update(overrides)
  unknown = sorted(set(cfg) - set(MODEL_FIELDS))
  if unknown:
    raise ValueError(f"unknown one-stage model option(s) {unknown}; valid: {list(MODEL_FIELDS)}")
  fields = model_fields(base_config().model)
  fields.update(cfg)
  for key in _TUPLES:
    if fields[key] is not None:
      fields[key] = tuple(fields[key])
  return CenterNetOneStage(**fields, axis_name=axis_name)
