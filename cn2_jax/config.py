"""The configuration schema: every key the project reads, with the official defaults.

`base_config()` is the single source of defaults (CenterNet2_R50_1x: docs/centernet2.md §2-§6,
docs/training.md §1). Config files in `configs/` start from it and override values;
`validate_config` rejects keys the schema does not know (a misspelled key is an error naming it,
never silently ignored) and checks a few invariants.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import ml_collections

from cn2_jax.data import catalog, sampling
from cn2_jax.errors import ConfigError

# Detector families with a registered meta-architecture (cn2_jax/modeling/meta_arch/).
ARCHS = ("centernet2", "centernet", "onestage")

# The backbone settings of the CenterNet2 code base's detectors (modeling/backbone/).
_BACKBONE_KEYS = (
    "backbone",
    "resnet_num_groups",
    "resnet_width_per_group",
    "resnet_deform_on_per_stage",
    "resnet_deform_modulated",
    "resnet_deform_num_groups",
    "stride_in_1x1",
    "freeze_at",
    "resnet_norm",
    "input_format",
    "pixel_mean",
    "pixel_std",
    "fpn_channels",
    "fpn_norm",
    "bifpn",
    "dla",
)
# The per-family part of the `model` schema: the keys (values or groups) a family reads beyond
# the shared ones (arch, num_classes, dtype, resnet_depth, resnet_width). validate_config rejects
# a change to a key that only other families read (it would be silently ignored).
FAMILY_MODEL_KEYS = {
    "centernet2": _BACKBONE_KEYS + ("centernet", "roi_heads"),
    "centernet": _BACKBONE_KEYS + ("centernet_detector",),
    "onestage": ("onestage",),
}


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Initial weights of a fresh training run (weights/finetune.py): an ImageNet backbone (.pkl/.pth:
  # the backbone is loaded, the rest initialised), or a whole detector of this family: an official
  # .pkl/.pth (CenterNet2, centerX, xingyizhou/CenterNet), a `python -m cn2_jax.convert` folder, a
  # run directory (its newest checkpoint; its EMA weights when that run evaluates with them) or
  # DIR/checkpoints/<step>. What was loaded: <workdir>/init_report.json. Unused when resuming.
  c.init_from = ""  # ImageNet backbone .pkl/.pth, or a detector: official file, Orbax dir, run
  # Class rows of a detector's class-dependent tensors (cls_score per cascade stage / the class
  # heatmap's last conv): "auto" = target classes matched to the source's by name (case, spaces,
  # "_" and "-" ignored), unmatched ones initialised as a new head; "target:source,..." = these
  # pairs, the others by "auto"; "none" = every class row initialised (a background row is kept).
  c.init_class_map = "auto"  # "auto" (by name) | "none" | "target:source,target:source"
  # Glob patterns of tensors that init_from does not load (initialised instead): matched against
  # the model's names ("params/roi_heads/box_head.0/fc1/kernel") and the '.'-joined parameter path
  # ("roi_heads.box_head.0.fc1.kernel"); also the source tensors they leave unused.
  c.init_skip = ()  # globs of tensors init_from leaves at init, e.g. ("roi_heads.box_head.*",)
  c.weights = ""  # full-model weights (Orbax dir or official .pkl/.pth) for eval/predict
  # JAX persistent compilation cache: each padded shape (train bucket, eval canvas) is compiled
  # once, lazily, and reused by later runs. "" disables it.
  c.compilation_cache_dir = "~/.cache/cn2_jax/xla"

  # ---------------------------------------------------------------- model
  m = c.model = ml_collections.ConfigDict()
  m.arch = "centernet2"  # detector family (modeling/meta_arch/): one of ARCHS
  m.num_classes = 80
  m.dtype = "float32"  # compute dtype: "float32" or "bfloat16" (params stay f32)
  # The image -> feature levels network, bottom-up + neck (modeling/backbone/build.py; official
  # MODEL.BACKBONE.NAME values): build_p67_resnet_fpn_backbone = ResNet (resnet_*) + FPN P3-P7.
  m.backbone = "build_p67_resnet_fpn_backbone"
  m.resnet_depth = 50
  m.stride_in_1x1 = True  # MSRA/caffe style (official); False for torchvision weights
  m.freeze_at = 2  # stem + res2 frozen
  m.resnet_width = 64  # stem/res2 width (64 official; smaller for tiny models)
  # ResNeXt / deformable stages (detectron2 MODEL.RESNETS.*; ResNet and Res2Net backbones)
  m.resnet_num_groups = 1  # NUM_GROUPS (32 for X101-32x8d)
  m.resnet_width_per_group = 0  # WIDTH_PER_GROUP; 0 = resnet_width (8 for X101, 26 for R2-101)
  m.resnet_deform_on_per_stage = (False, False, False, False)  # DEFORM_ON_PER_STAGE, res2..res5
  m.resnet_deform_modulated = False  # DEFORM_MODULATED: DCNv2 (mask) instead of DCNv1
  m.resnet_deform_num_groups = 1  # DEFORM_NUM_GROUPS (offset groups)
  m.resnet_norm = "FrozenBN"  # "FrozenBN" (official), "GN" (training from scratch) or ""
  m.input_format = "BGR"  # official MSRA weights expect BGR; pipeline yields RGB
  m.pixel_mean = (103.530, 116.280, 123.675)  # in input_format order
  m.pixel_std = (1.0, 1.0, 1.0)
  m.fpn_channels = 256
  m.fpn_norm = ""  # FPN lateral/output conv norm: "" (official: convs with bias), "GN", "FrozenBN"
  # BiFPN neck (MODEL.BIFPN; backbones build_p37_dla_bifpn_backbone, build_res2net_bifpn_backbone)
  bf = m.bifpn = ml_collections.ConfigDict()
  bf.out_channels = 160
  bf.num_levels = 5  # P3-P7 (the only node graph the official BiFPN has)
  bf.num_bifpn = 6  # BiFPN cells (3 for DLA-BiFPN-P5, 7 for R2-101-BiFPN)
  bf.norm = "GN"
  bf.separable_conv = False
  # DLA-34 (MODEL.DLA; build_p37_dla_bifpn_backbone, build_dla_backbone): "BN" (official; used in
  # inference mode: running statistics, as FrozenBN), "SyncBN" or "FrozenBN"
  m.dla = ml_collections.ConfigDict()
  m.dla.norm = "BN"

  cn = m.centernet = ml_collections.ConfigDict()
  cn.num_convs = 4
  cn.use_deformable = False  # last bbox-tower conv a modulated DCN (CENTERNET.USE_DEFORMABLE)
  cn.prior_prob = 0.01
  cn.bbox_bias_init = 8.0
  cn.soi = ((0, 80), (64, 160), (128, 320), (256, 640), (512, 10000000))
  cn.hm_min_overlap = 0.8
  cn.min_radius = 4.0
  cn.dedup_positives = False  # True = MMDet reproduction's deduplicated positives
  # True = official: a GT's heatmap peak (hm = 1, ignored as a negative) on every level; False =
  # only on its cared levels (the MMDet reproduction's "revised" distance map),
  # docs/centernet2.md §3.7.
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
  # ROI_HEADS.IN_FEATURES: the consecutive levels boxes are pooled from (clamped to them)
  r.in_features = ("p3", "p4", "p5", "p6", "p7")
  # ROI_HEADS.NAME: True = CustomCascadeROIHeads (one stage per iou_thresholds entry); False =
  # CustomROIHeads (CenterNet2-F: one Fast R-CNN stage; iou_thresholds / box_weights of length 1)
  r.cascade = True
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
  # LVIS (ROI_BOX_HEAD.*, roi_heads/fed_loss.py): sigmoid CE instead of softmax (cls_score bias
  # -log((1 - prior_prob) / prior_prob); sigmoid class probabilities at inference) and the
  # federated loss (the batch's classes + classes drawn by image_count ** fed_loss_freq_weight
  # from cat_freq_path, an LVIS cat_info json, up to fed_loss_num_cat; sigmoid CE only changes)
  r.use_sigmoid_ce = False
  r.prior_prob = 0.01
  r.use_fed_loss = False
  r.cat_freq_path = ""  # e.g. datasets/lvis/lvis_v1_train_cat_info.json
  r.fed_loss_num_cat = 50
  r.fed_loss_freq_weight = 0.5
  r.score_thresh_test = 0.05
  r.nms_thresh_test = 0.7
  r.detections_per_image = 100

  # The official one-stage CenterNet (arch "centernet": CenterNetDetector with the CenterNet head
  # in one-stage mode, ONLY_PROPOSAL False; CenterNet-FPN_R50_1x, CenterNet-S4_DLA_8x). Defaults =
  # the official MODEL.CENTERNET defaults (centernet/config.py).
  cd = m.centernet_detector = ml_collections.ConfigDict()
  cd.in_features = ("p3", "p4", "p5", "p6", "p7")  # levels the head reads (("dla2",) for S4)
  cd.num_cls_convs = 4
  cd.num_box_convs = 4
  cd.num_share_convs = 0
  cd.norm = "GN"  # tower norm: "GN" (GroupNorm(32), or (25) when channels % 32 != 0) or ""
  cd.use_deformable = False  # last conv of each tower a modulated DCN
  cd.with_agn_hm = False  # an agnostic heatmap multiplied into the class scores
  cd.prior_prob = 0.01
  cd.bbox_bias_init = 8.0
  cd.inference_thresh = 0.05  # INFERENCE_TH: class-probability candidates
  cd.pre_nms_topk_test = 1000  # per level
  cd.post_nms_topk_test = 100
  cd.nms_thresh_test = 0.6  # per-class NMS
  cd.center_nms = False
  cd.not_nms = False
  # Training (MODEL.CENTERNET.*; proposal/onestage_targets.py, proposal/onestage_losses.py)
  # SOI: inclusive half-diagonal range per in_feature (((0, 1000000),) for S4)
  cd.soi = ((0, 80), (64, 160), (128, 320), (256, 640), (512, 10000000))
  cd.hm_min_overlap = 0.8  # HM_MIN_OVERLAP: heatmap radius^2 = 2 ((1 - o) / (1 + o))^2 area
  cd.min_radius = 4.0  # MIN_RADIUS: radius^2 >= min_radius^2
  # MORE_POS: positives = the 3x3 cells around each GT centre (all levels) whose GIoU cost is below
  # min(k-th smallest cost (more_pos_topk), more_pos_thresh); False: the centre cell per SOI level
  cd.more_pos = False
  cd.more_pos_thresh = 0.2  # MORE_POS_THRESH
  cd.more_pos_topk = 9  # MORE_POS_TOPK
  cd.focal_alpha = 0.25  # HM_FOCAL_ALPHA (< 0: no alpha weighting)
  cd.focal_beta = 4.0  # HM_FOCAL_BETA: negatives weighted by (1 - heatmap)^beta
  cd.loss_gamma = 2.0  # LOSS_GAMMA
  cd.sigmoid_clamp = 1e-4  # SIGMOID_CLAMP
  cd.ignore_high_fp = -1.0  # IGNORE_HIGH_FP: > 0 drops negatives with probability >= it
  cd.pos_weight = 1.0  # POS_WEIGHT
  cd.neg_weight = 1.0  # NEG_WEIGHT
  cd.reg_weight = 2.0  # REG_WEIGHT (1 in Base_S4_DLA)
  cd.not_norm_reg = True  # NOT_NORM_REG; False: GIoU terms weighted by the agnostic heatmap

  # One-stage CenterNet as centerX builds it (arch "onestage", modeling/onestage/;
  # docs/onestage.md §2-§3; defaults = centerX `centernet_res18_coco_0.5.yaml`). Shared with
  # CenterNet2: num_classes, dtype, resnet_depth, resnet_width; no other top-level model key is
  # read by this family.
  os_ = m.onestage = ml_collections.ConfigDict()
  os_.input_format = "RGB"  # torchvision / centerX weights; "BGR" for xingyizhou/CenterNet
  os_.pixel_mean = (0.485, 0.456, 0.406)  # [0, 1] units: (x / 255 - mean) / std
  os_.pixel_std = (0.229, 0.224, 0.225)
  os_.deconv_channels = (256, 128, 64)  # outputs of the 3 DeconvLayers (stride 32 -> 4)
  os_.deconv_kernels = (4, 4, 4)
  os_.use_deform = True  # DCN in the DeconvLayers ("resdcn"); False: plain 3x3 conv
  os_.modulate_deform = True  # DCNv2 (mask); False: DCNv1
  os_.dcn_zero_init_offset = False  # True = xingyizhou/CenterNet (zeroed offset conv)
  os_.head_conv = 0  # head branch width; 0 = the neck's channels (centerX)
  os_.bias_value = -2.19  # cls head bias
  os_.head_init = "centerx"  # "centerx" (torch default wh/reg init) | "centernet" (std 0.001)
  os_.down_scale = 4  # output stride
  os_.min_overlap = 0.3  # Gaussian radius overlap (0.7 with radius_formula "cornernet")
  os_.radius_formula = "fixed"  # "fixed" (corrected CornerNet radius) | "cornernet" (original)
  os_.tensor_dim = 128  # max objects per image in the regression targets (truncation)
  os_.cls_weight = 1.0
  os_.wh_weight = 0.1
  os_.reg_weight = 1.0
  os_.norm_wh = ""  # "" | "centerx" | "per_object" (wh loss norm, docs/onestage.md §3.4)
  os_.focal_clamp = (1e-12, None)  # (lo, hi) clamp of the heatmap in the focal loss; CN: 1e-4
  # centerX LOSS.IGNORE_UNLABEL (docs/onestage.md §4.5): no negatives on an (image, class)
  # channel whose GT heatmap is all zero (partially labelled mixed datasets)
  os_.ignore_unlabel = False
  # centerX LOSS.COMMUNISM (docs/onestage.md §3.6): every cls / wh / off term (KD too) rescaled
  # to the target value (cls, wh, off) by target / stop_gradient(term); centerX's defaults
  os_.communism = False
  os_.communism_targets = (1.5, 0.3, 0.1)
  os_.max_detections = 100  # K of the decode
  # False = official: decoded w/h are used as predicted, so some boxes come out inverted
  # (x2 < x1); True clamps w/h at 0 (README "departures").
  os_.clamp_wh = True
  os_.bn_momentum = 0.9  # Flax convention (torch momentum 0.1)
  os_.bn_eps = 1e-5
  # BatchNorm statistics across the devices of the data axis (SyncBN); False = per device (centerX
  # yamls: BN_TYPE "BN"); running statistics are averaged over devices after each step either way.
  os_.sync_bn = False

  # ---------------------------------------------------------------- data
  d = c.data = ml_collections.ConfigDict()
  # "crowdhuman" (.odgt), "wider_face" (wider_face_*_bbx_gt.txt) and "voc" (VOC XML folder) are
  # converted to COCO json first (cn2_jax/data/sources.py); "image_folder": every image below
  # data.root (recursive), no annotations, training only (woGT KD; set data.eval_split="").
  # coco/2017 coco_json lvis_v1 objects365 synthetic crowdhuman wider_face voc image_folder
  d.dataset = "coco/2017"
  d.name = ""  # tfds dataset name (default derived from the dataset, its box type and classes)
  d.root = ""  # COCO root (coco/2017) or dataset folder (all others)
  # Annotation files, relative to root or absolute. coco_json: the instances jsons. crowdhuman,
  # wider_face, voc ("{split}" = the split name; "" = default): annotation_{split}.odgt,
  # wider_face_split/wider_face_{split}_bbx_gt.txt, ImageSets/Main/{split}.txt (image id list).
  d.train_json = ""  # train split annotation file ("" = the format's default: data/sources.py)
  d.val_json = ""  # annotation file of the eval split
  # Image folder, relative to root. "" = coco_json: root; crowdhuman: Images; wider_face:
  # WIDER_{split}/images; voc: JPEGImages (its xml files: always root/Annotations).
  d.image_root = ""  # image folder ("" = the format's default: data/sources.py)
  d.data_dir = ""  # where prepared array_record files go (default <workdir>/tfds)
  d.train_split = "train"
  d.eval_split = "val"
  d.min_size_train = (640, 672, 704, 736, 768, 800)
  d.max_size_train = 1333
  d.min_size_test = 800  # 0 = no resize (original resolution, as centerX evaluates COCO)
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
  # CenterNet2 INPUT.CUSTOM_AUG (centernet/data/custom_build_augmentation.py): "" or
  # "ResizeShortestEdge" = the shortest-edge resize above; "EfficientDetResizeCrop" = random scale
  # uniform(scale_range) * train_size (aspect kept, fit inside), random crop to train_size, then
  # flip (cn2_jax/data/efficientdet_aug.py); every batch on one train_size square (rounded up to
  # size_divisibility). Not with lsj, crop_relative_range or center_affine. Eval is unchanged (the
  # official TEST_INPUT_TYPE 'default' uses min/max_size_test).
  d.custom_aug = ""
  d.train_size = 640  # INPUT.TRAIN_SIZE
  d.scale_range = (0.1, 2.0)  # INPUT.SCALE_RANGE
  # Training sampler (detectron2 / CenterNet2 DATALOADER.SAMPLER_TRAIN; cn2_jax/data/sampling.py):
  # "TrainingSampler" (each image once per epoch), "RepeatFactorTrainingSampler" (LVIS configs:
  # an image repeats max over its categories of max(1, sqrt(repeat_threshold / f(c))) times,
  # f(c) = fraction of training images holding c) or "ClassAwareSampler" (Objects365 config:
  # images drawn with probability ~ sum over their categories of 1 / #images of the category).
  # Not with data.mixture.
  d.sampler_train = "TrainingSampler"
  d.repeat_threshold = 0.001  # RepeatFactorTrainingSampler: DATALOADER.REPEAT_THRESHOLD
  d.flip = True
  d.filter_empty = True
  d.max_boxes = 100
  d.num_workers = 4
  d.synthetic_num_train = 0  # synthetic dataset size (0 = generator default)
  d.synthetic_num_val = 0
  d.synthetic_image_size = 0
  # Class subset of any dataset: category names kept, in label order, e.g. ("person", "car");
  # () = all. Training drops images without them, evaluation keeps every image.
  d.classes = ()  # class subset (names, in label order); () = every class
  # crowdhuman: the box trained and evaluated: "vbox" (visible, as centerX), "fbox" (full body,
  # the official benchmark's) or "hbox" (head). "mask" regions and extra.ignore boxes are
  # ignore regions (like COCO crowd boxes; centerX dropped them).
  d.crowdhuman_box = "vbox"  # "vbox" (centerX), "fbox" (official benchmark) or "hbox"
  # wider_face: folder of the official kit's wider_face_val.mat and wider_{easy,medium,hard}_val.mat
  # (absolute or relative to the working directory); set, eval adds the official easy / medium /
  # hard AP (evaluation/wider_eval.py) to the COCO-style metrics. "" = COCO-style AP only.
  d.wider_eval_gt = ""
  # Several datasets in one run (cn2_jax/data/mixture.py). The dataset above is dataset 0 of the
  # training mixture; each data.mixture entry is a dict of DATA_SOURCE_KEYS (unset keys take the
  # defaults of this schema, not the values above; "dataset" is required) plus "weight" and
  # "channel_offset", e.g. ({"dataset": "wider_face", "root": "/data/WIDER_FACE", "weight": 1.0,
  # "channel_offset": 1},). Examples are drawn per image with probability proportional to the
  # weights (grain MapDataset.mix); a dataset's label i is the student's class channel_offset + i.
  # An epoch of a mixture (optim.epochs) = the training images of all its datasets together.
  d.mix_weight = 1.0  # sampling weight of the dataset above in a mixture
  d.channel_offset = 0  # its label i -> model class channel_offset + i
  d.mixture = ()  # more training datasets: dicts of DATA_SOURCE_KEYS + weight, channel_offset
  # More evaluations after the main one: dicts of DATA_SOURCE_KEYS + channel_offset, with "name"
  # the label of their metrics ("{name}/AP" ... in eval/metrics.json and TensorBoard); each is
  # evaluated on its eval_split with the model's classes [channel_offset, channel_offset + its
  # classes) as its labels (centerX coco_car_val: car at channel 1).
  d.extra_eval = ()  # more evaluations: dicts of DATA_SOURCE_KEYS + channel_offset, name = label
  # One-stage train augmentation (cn2_jax/data/augment.py), all off by default (CenterNet2 path
  # unchanged). Order: crop -> resize (or center_affine) -> affine/perspective -> flip -> colour.
  # (h, w) minimum fractions: centerX's RandomCrop "relative_range" (each side uniform(s, 1) of
  # its length, window holding a random GT box centre; centerX COCO: (0.6, 0.6)); () = off.
  # On, every batch is padded to one max_size_train square (pad_hw_train, if set, must hold it).
  d.crop_relative_range = ()
  # "" = off; "centerx" = detectron2 RandomBrightness/Contrast/Saturation then RandomLighting
  # (ImageNet PCA on 0-255 pixels), fixed order, as centerX / CenterNet-better; "centernet" =
  # CenterNet's color_aug (the three in random order on 0-1 floats, PCA lighting of its COCO stats).
  d.color_aug = ""
  d.color_aug_range = (0.6, 1.4)  # brightness / contrast / saturation factor range
  d.color_aug_lighting = 0.1  # std of the PCA lighting weights
  # Random affine about the image centre after the resize, boxes moved (not in centerX).
  d.affine = False
  d.affine_scale = (0.5, 1.5)  # zoom factor range
  d.affine_rotate = 0.0  # max rotation, degrees
  d.affine_translate = 0.1  # max shift, fraction of the width / height
  d.affine_shear = 0.0  # max shear angle (x and y), degrees
  d.perspective = 0.0  # > 0: image corners moved by up to this fraction of the side; 0 = off
  # affine/perspective box rule: the box enclosing the warped corners, clipped to the image, is
  # dropped if narrower / shorter than warp_min_size px or keeping < warp_min_visible of its area.
  d.warp_min_size = 1.0
  d.warp_min_visible = 0.1
  # CenterNet-better CenterAffine, replacing the resize: a square window of max(h, w) * scale
  # around a random centre (border center_affine_border px) warped to a center_affine_size square
  # canvas; scale from lo, lo + step, ..., hi (CNB: np.arange(0.6, 1.4, 0.1)); step 0 = uniform.
  d.center_affine = False
  d.center_affine_size = 512
  d.center_affine_scale = (0.6, 1.3)
  d.center_affine_scale_step = 0.1
  d.center_affine_border = 128

  # ---------------------------------------------------------------- knowledge distillation
  # (model.arch "onestage" only; cn2_jax/modeling/onestage/kd.py, docs/onestage.md §4). Off while
  # teacher_workdirs is empty. Each teacher is a run workdir of this project (its config.json and
  # `weights` or latest checkpoint), frozen, run inside the train step on the student's batch.
  # The per-teacher tuples below take 1 value (used for every teacher) or one per teacher;
  # defaults are centerX's (KD_WEIGHT 10, KD_CLS_WEIGHT 1, KD_WH_WEIGHT 1, KD_REG_WEIGHT 0.1,
  # NORM_WH False); its configs use e.g. weight 1, cls_weight 1e3 (dense MSE), norm_wh True.
  k = c.kd = ml_collections.ConfigDict()
  k.teacher_workdirs = ()  # e.g. ("runs/teacher",)
  # KD_CLS_INDEX: the end of each teacher's student channels ((3, 7): teacher 0 -> 0:3,
  # teacher 1 -> 3:7); () = the teachers' num_classes concatenated in order
  k.cls_index = ()
  k.weight = (10.0,)
  k.cls_weight = (1.0,)  # heatmap MSE
  k.wh_weight = (1.0,)  # wh L1 at the teacher's peaks
  k.reg_weight = (0.1,)  # offset L1 at the teacher's peaks
  k.norm_wh = (False,)  # divide the wh terms by the teacher's (w + h) / 2 per pixel
  k.without_label = False  # woGT: only the KD terms (the GT losses are dropped)
  # CenterNet2 teachers (a run with model.arch "centernet2"): their final detections are rendered
  # into soft heatmaps (peak = score) and wh / offset maps at the student's stride with the
  # student's model.onestage min_overlap / radius_formula (modeling/onestage/kd_render.py).
  # Detections scoring below this are not drawn. 0.05 = CenterNet2's own output threshold
  # (roi_heads.score_thresh_test), so by default every detection the teacher outputs is drawn:
  # the heatmap MSE is dense and a weak detection drawn at its low score is a soft target, like a
  # one-stage teacher's low heatmap values; a pseudo-label threshold (0.3) would instead pull the
  # student to 0 on the teacher's uncertain objects. In [0, 1]; unused by one-stage teachers.
  k.render_score_thresh = 0.05

  # ---------------------------------------------------------------- optimisation
  o = c.optim = ml_collections.ConfigDict()
  o.base_lr = 0.02  # LR for a global batch of reference_batch_size images
  # base_lr scales linearly to train.batch_size: lr = base_lr * batch_size / reference_batch_size
  # (detectron2 REFERENCE_WORLD_SIZE; iterations are NOT rescaled, see engine/optim.py); 0 = off.
  o.reference_batch_size = 16  # the official batch (8 GPUs x 2)
  # OPTIMIZERS: "sgd" | "adam" (torch Adam, L2 decay coupled) | "adamw" | "rangerlars" (centerX)
  o.optimizer = "sgd"
  o.momentum = 0.9  # sgd
  o.betas = (0.9, 0.999)  # adam / adamw / rangerlars (torch defaults)
  o.eps = 1e-8  # adam / adamw / rangerlars
  o.lookahead_alpha = 0.5  # rangerlars: Lookahead slow-weight step (pytorch-tools RangerLars)
  o.lookahead_k = 6  # rangerlars: Lookahead sync period (steps)
  o.lars_clip = 10.0  # rangerlars: the weight norm in the trust ratio is clamped to [0, lars_clip]
  o.radam_threshold = 5.0  # rangerlars: RAdam rectifies when N_sma >= this
  o.weight_decay = 1e-4
  o.weight_decay_norm = 0.0
  o.warmup_iters = 4000  # in epochs when epochs > 0
  o.warmup_factor = 0.00025  # epochs > 0: replaced by 1 / warmup_iters (centerX)
  o.steps = (60000, 80000)  # in epochs when epochs > 0
  o.gamma = 0.1
  o.max_iter = 90000  # ignored when epochs > 0
  # > 0: the schedule is in epochs (centerX): max_iter = epochs * iters_per_epoch, with
  # iters_per_epoch = training images // train.batch_size (engine/optim.py iterations_from_epochs)
  o.epochs = 0.0
  o.schedule = "multistep"  # LR_SCHEDULES: "multistep" | "cosine" | "warmup_cosine_annealing"
  o.cosine_decay_iter = 0.7  # warmup_cosine_annealing: cosine from int(max_iter * this) on
  o.min_lr = 1e-8  # warmup_cosine_annealing: lr at max_iter (not batch-scaled)
  o.clip_value = 1.0  # element-wise gradient value clip (d2 CLIP_TYPE=value)
  o.clip_norm = 0.0  # > 0: clip the global gradient L2 norm (MMDet: 35); 0 = off
  # centerX LOSS.SKIP_LOSS / SKIP_WEIGHT (docs/onestage.md §3.7): > 0 zeroes the gradients of an
  # iteration whose total loss is >= this x the last accepted total (the optimizer still steps:
  # momentum and weight decay act); 0 = off
  o.skip_loss_factor = 0.0

  # ---------------------------------------------------------------- weight averaging
  # (engine/swa.py). EMA of the parameters, updated after every step:
  #   ema = d * ema + (1 - d) * params,  d = min(decay, (1 + t) / (10 + t)) with warmup, t = step
  e = c.ema = ml_collections.ConfigDict()
  e.decay = 0.0  # 0 = off; e.g. 0.9998
  e.warmup = True  # the (1 + t) / (10 + t) ramp (timm / TF ExponentialMovingAverage)
  e.batch_stats = "average"  # BatchNorm running statistics: "average" (timm) | "copy"
  e.use_for_eval = True  # eval / predict / Predictor use the EMA weights (when decay > 0)
  # SWA (docs/onestage.md §5.3): swa.iters more updates after optim.max_iter at the SWA LR, an
  # equal-weight mean of the params every `period` of them; at the end params = mean and the
  # BatchNorm statistics are recomputed over bn_batches training batches. iters and period are
  # iterations, or epochs when optim.epochs > 0 (centerX SWA.ITER / SWA.PERIOD); bn_batches are
  # batches.
  sw = c.swa = ml_collections.ConfigDict()
  sw.iters = 0  # 0 = off
  sw.period = 100  # average every this many SWA iterations (epochs with optim.epochs > 0)
  sw.lr_start = 0.002  # SWA LR (not batch-scaled); centerX crowd_human_res18_swa.yaml
  sw.eta_min = 1e-4  # lr_sched "cosine": CosineAnnealingWarmRestarts(T_0=period, eta_min)
  sw.lr_sched = "constant"  # "constant" (lr_start) | "cosine"
  sw.bn_batches = 100  # batches of the BatchNorm recompute (torch update_bn); 0 = keep

  # ---------------------------------------------------------------- loop
  t = c.train = ml_collections.ConfigDict()
  t.batch_size = 16  # global
  # Parameter-path prefixes kept unchanged in training (no update, no weight decay, no optimizer
  # state), e.g. ("backbone",) or ("backbone.bottom_up.res3", "proposal_generator"); on top of the
  # family's own rule (model.freeze_at). BatchNorm running statistics still update.
  t.freeze = ()  # parameter-path prefixes never updated, e.g. ("backbone",)
  t.eval_batch_size = 8
  t.log_every = 20
  t.checkpoint_every = 5000
  t.keep_checkpoints = 3
  t.eval_at_end = True
  t.eval_every = 0  # > 0: evaluate every this many steps during training (TensorBoard eval/*)
  t.async_checkpoint = True  # Orbax saves in the background; the next step checks the result
  t.check_vma = False  # shard_map varying-axis checks (engine/step.py docstring)
  t.progress_bar = True
  # Divergence guard (engine/hooks.py): stop when the total loss or gradient norm exceeds
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


def _changed_fields(cfg, ref, prefix: str) -> list:
  if isinstance(ref, ml_collections.ConfigDict):
    return [f for k in ref.keys() for f in _changed_fields(cfg[k], ref[k], f"{prefix}.{k}")]
  return [] if jsonable(cfg) == jsonable(ref) else [prefix]


def _check_family_keys(m: ml_collections.ConfigDict) -> None:
  """ConfigError naming a changed `model` key that the selected family does not read."""
  ref = base_config().model
  for family, keys in FAMILY_MODEL_KEYS.items():
    if family == m.arch:
      continue
    own = set(FAMILY_MODEL_KEYS[m.arch])
    changed = [f for k in keys if k not in own for f in _changed_fields(m[k], ref[k], f"model.{k}")]
    if changed:
      raise ConfigError(
          f"{changed[0]} is a setting of the {family!r} family; model.arch={m.arch!r} does not "
          f"read it (its own settings: {', '.join(FAMILY_MODEL_KEYS[m.arch])})"
      )


# `optim.optimizer` / `optim.schedule` values (cn2_jax/engine/optim.py implements them).
OPTIMIZERS = ("sgd", "adam", "adamw", "rangerlars")
LR_SCHEDULES = ("multistep", "cosine", "warmup_cosine_annealing")


def _validate_optim(o: ml_collections.ConfigDict) -> None:
  """ConfigError (a ValueError) naming the first bad `optim` value."""
  for key, allowed in (("optimizer", OPTIMIZERS), ("schedule", LR_SCHEDULES)):
    if o[key] not in allowed:
      raise ConfigError(f"optim.{key} must be one of {allowed}, got {o[key]!r}")
  betas = tuple(o.betas)
  if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
    raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {betas}")
  checks = (
      ("eps", o.eps >= 0, ">= 0"),
      ("lookahead_alpha", 0.0 <= o.lookahead_alpha <= 1.0, "in [0, 1]"),
      ("lookahead_k", o.lookahead_k >= 1, ">= 1"),
      ("lars_clip", o.lars_clip > 0, "> 0"),
      ("epochs", o.epochs >= 0, ">= 0 (0 = iterations as written)"),
      ("cosine_decay_iter", 0.0 <= o.cosine_decay_iter <= 1.0, "in [0, 1]"),
      ("min_lr", o.min_lr >= 0, ">= 0"),
      ("skip_loss_factor", o.skip_loss_factor >= 0, ">= 0 (0 = off)"),
  )
  for key, ok, want in checks:
    if not ok:
      raise ConfigError(f"optim.{key} must be {want}, got {o[key]!r}")


def _validate_averaging(e: ml_collections.ConfigDict, s: ml_collections.ConfigDict) -> None:
  """The `ema` / `swa` groups (engine/swa.py)."""
  checks = (
      ("ema.decay", e.decay, 0.0 <= e.decay < 1.0, "in [0, 1) (0 = off)"),
      (
          "ema.batch_stats",
          e.batch_stats,
          e.batch_stats in ("average", "copy"),
          "'average' | 'copy'",
      ),
      ("swa.iters", s.iters, s.iters >= 0, ">= 0 (0 = off)"),
      ("swa.period", s.period, s.period >= 1, ">= 1"),
      ("swa.lr_sched", s.lr_sched, s.lr_sched in ("constant", "cosine"), "'constant' | 'cosine'"),
      ("swa.lr_start", s.lr_start, math.isfinite(s.lr_start) and s.lr_start >= 0, ">= 0"),
      ("swa.eta_min", s.eta_min, math.isfinite(s.eta_min) and s.eta_min >= 0, ">= 0"),
      ("swa.bn_batches", s.bn_batches, s.bn_batches >= 0, ">= 0 (0 = keep the statistics)"),
  )
  for key, value, ok, want in checks:
    if not ok:
      raise ConfigError(f"{key} must be {want}, got {value!r}")


def _validate_kd(k: ml_collections.ConfigDict, m: ml_collections.ConfigDict) -> None:
  """The `kd` group (knowledge distillation, modeling/onestage/kd.py)."""
  t = k.render_score_thresh
  if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
    raise ConfigError(f"kd.render_score_thresh must be a number in [0, 1], got {t!r}")
  n = len(tuple(k.teacher_workdirs))
  if not n:
    return
  if m.arch != "onestage":
    raise ConfigError("kd.teacher_workdirs: knowledge distillation needs model.arch='onestage'")
  if not all(isinstance(w, str) and w for w in k.teacher_workdirs):
    raise ConfigError(f"kd.teacher_workdirs must be a tuple of paths, got {k.teacher_workdirs!r}")
  for key in ("weight", "cls_weight", "wh_weight", "reg_weight", "norm_wh"):
    if len(tuple(k[key])) not in (1, n):
      raise ConfigError(f"kd.{key} has {len(tuple(k[key]))} values for {n} teachers (1 or {n})")
    if key != "norm_wh" and not all(math.isfinite(v) and v >= 0 for v in k[key]):
      raise ConfigError(f"kd.{key} must be >= 0, got {tuple(k[key])}")
  ends = tuple(k.cls_index)
  if ends and (len(ends) != n or any(b <= a for a, b in zip((0,) + ends, ends))):
    raise ConfigError(f"kd.cls_index must be () or {n} increasing channel ends, got {ends}")
  if ends and ends[-1] > m.num_classes:
    raise ConfigError(f"kd.cls_index={ends} ends past model.num_classes={m.num_classes}")


# The `data` keys that describe one dataset: what a data.mixture / data.extra_eval entry may set
# (with "weight" / "channel_offset" resp. "channel_offset"; in data.extra_eval "name" labels the
# metrics, and the prepared dataset takes its default name).
DATA_SOURCE_KEYS = (
    "dataset",
    "name",
    "root",
    "train_json",
    "val_json",
    "image_root",
    "train_split",
    "eval_split",
    "classes",
    "crowdhuman_box",
    "synthetic_num_train",
    "synthetic_num_val",
    "synthetic_image_size",
)
MIXTURE_KEYS = DATA_SOURCE_KEYS + ("weight", "channel_offset")
EXTRA_EVAL_KEYS = DATA_SOURCE_KEYS + ("channel_offset",)


def _check_classes(where: str, classes) -> None:
  if (
      isinstance(classes, str)
      or not isinstance(classes, (tuple, list))
      or not all(isinstance(c, str) and c and "," not in c for c in classes)
      or len(set(classes)) != len(tuple(classes))
  ):
    raise ConfigError(
        f"{where}.classes must be a tuple of distinct class names, e.g. ('person', 'car'), "
        f"got {classes!r}"
    )


def _check_source(where: str, src, num_classes: int, *, evaluated: bool) -> None:
  """One dataset description (`data`, or an entry merged onto the schema defaults)."""
  kind = catalog.get(src["dataset"], field=f"{where}.dataset")
  if src["crowdhuman_box"] not in ("vbox", "fbox", "hbox"):
    raise ConfigError(
        f"{where}.crowdhuman_box must be 'vbox', 'fbox' or 'hbox', got {src['crowdhuman_box']!r}"
    )
  _check_classes(where, src["classes"])
  offset = src["channel_offset"]
  if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
    raise ConfigError(f"{where}.channel_offset must be an integer >= 0, got {offset!r}")
  if not kind.labelled:
    if tuple(src["classes"]):
      raise ConfigError(f"{where}.classes: an {kind.name} dataset has no classes (no labels)")
    if evaluated and src["eval_split"]:
      raise ConfigError(
          f"{where}.eval_split={src['eval_split']!r}: an {kind.name} dataset has no annotations "
          f"to evaluate; set {where}.eval_split='' (evaluate other datasets with data.extra_eval)"
      )
  n = len(tuple(src["classes"])) or kind.fixed_num_classes or 0
  if offset + n > num_classes:
    raise ConfigError(
        f"{where}.channel_offset={offset} + its {n} classes exceed model.num_classes={num_classes}"
    )


def _entry_source(where: str, entry, allowed, defaults) -> dict:
  """A data.mixture / data.extra_eval entry merged onto the schema's `data` defaults."""
  if not isinstance(entry, (dict, ml_collections.ConfigDict)):
    raise ConfigError(f"{where} must be a dict of {', '.join(allowed)}, got {entry!r}")
  for key in entry.keys():
    if key not in allowed:
      raise ConfigError(f"{where}.{key} is not a key of this entry (keys: {', '.join(allowed)})")
  if "dataset" not in entry:
    raise ConfigError(f"{where} needs a 'dataset' (one of {catalog.names()})")
  src = {k: defaults[k] for k in DATA_SOURCE_KEYS}
  src["channel_offset"] = 0
  for key, value in entry.items():
    want = type(defaults[key]) if key in defaults else None
    if key == "classes":
      pass  # checked by _check_classes
    elif key == "weight":
      ok = isinstance(value, (int, float)) and not isinstance(value, bool)
      if not (ok and math.isfinite(value) and value > 0):
        raise ConfigError(f"{where}.weight must be a number > 0, got {value!r}")
    elif want is not None and (
        isinstance(value, bool) != (want is bool) or not isinstance(value, want)
    ):
      raise ConfigError(f"{where}.{key} must be a {want.__name__}, got {value!r}")
    src[key] = value
  return src


def _validate_data_sources(d: ml_collections.ConfigDict, num_classes: int) -> None:
  """`data` as dataset 0 of a mixture, data.mixture and data.extra_eval (data/mixture.py)."""
  defaults = base_config().data
  main = {k: d[k] for k in DATA_SOURCE_KEYS}
  main["channel_offset"] = d.channel_offset
  _check_source("data", main, num_classes, evaluated=True)
  if not (isinstance(d.mix_weight, (int, float)) and d.mix_weight > 0):
    raise ConfigError(f"data.mix_weight must be a number > 0, got {d.mix_weight!r}")
  for key in ("mixture", "extra_eval"):
    if not isinstance(d[key], (tuple, list)):
      raise ConfigError(f"data.{key} must be a tuple of dicts, got {d[key]!r}")
  for i, entry in enumerate(d.mixture):
    where = f"data.mixture[{i}]"
    src = _entry_source(where, entry, MIXTURE_KEYS, defaults)
    _check_source(where, src, num_classes, evaluated=False)
    if not src["train_split"]:
      raise ConfigError(f"{where}.train_split is empty: a mixture entry is trained on")
  names = set()
  for i, entry in enumerate(d.extra_eval):
    where = f"data.extra_eval[{i}]"
    src = _entry_source(where, entry, EXTRA_EVAL_KEYS, defaults)
    _check_source(where, src, num_classes, evaluated=True)
    name = entry.get("name", "")
    if not name or "/" in name or name in names:
      raise ConfigError(
          f"{where}.name must be a distinct non-empty label without '/' (its metrics are "
          f"'<name>/AP', ...), got {name!r}"
      )
    names.add(name)
    if not catalog.get(src["dataset"]).labelled or not src["eval_split"]:
      raise ConfigError(f"{where} needs an eval_split with annotations to evaluate")


def validate_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Raises KeyError naming any key unknown to the schema, ValueError on bad values."""
  _check_keys(cfg, base_config())
  _validate_kd(cfg.kd, cfg.model)
  _validate_optim(cfg.optim)
  _validate_averaging(cfg.ema, cfg.swa)
  m = cfg.model
  if m.arch not in ARCHS:
    raise ConfigError(f"model.arch must be one of {ARCHS}, got {m.arch!r}")
  _check_family_keys(m)
  if not isinstance(cfg.init_class_map, str) or not cfg.init_class_map.strip():
    raise ConfigError(
        f"init_class_map must be 'auto', 'none' or 'target:source,...', got {cfg.init_class_map!r}"
    )
  for name, value in (("init_skip", cfg.init_skip), ("train.freeze", cfg.train.freeze)):
    if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
      raise ConfigError(f"{name} must be a tuple of non-empty strings, got {value!r}")
  if m.arch == "onestage":
    for key, allowed in (
        ("input_format", ("RGB", "BGR")),
        ("radius_formula", ("fixed", "cornernet")),
        ("norm_wh", ("", "centerx", "per_object")),
        ("head_init", ("centerx", "centernet")),
    ):
      if m.onestage[key] not in allowed:
        raise ValueError(f"model.onestage.{key} must be one of {allowed}, got {m.onestage[key]!r}")
    ct = tuple(m.onestage.communism_targets)
    if len(ct) != 3 or not all(math.isfinite(float(v)) and float(v) > 0 for v in ct):
      raise ConfigError(
          f"model.onestage.communism_targets must be 3 positive numbers (cls, wh, off), got {ct}"
      )
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
  if "backbone" in FAMILY_MODEL_KEYS[m.arch]:
    # The model pads its canvas to its backbone's divisibility; the data must pad to a multiple.
    # (Imported here: the modeling package imports this module.)
    from cn2_jax.modeling.backbone.build import backbone_size_divisibility

    need = backbone_size_divisibility(m)
    if div % need:
      raise ConfigError(
          f"data.size_divisibility={div} must be a multiple of {need}, the size divisibility of "
          f"model.backbone={m.backbone!r}"
      )
  if len(m.centernet_detector.soi) != len(m.centernet_detector.in_features):
    raise ConfigError(
        f"model.centernet_detector.soi has {len(m.centernet_detector.soi)} ranges for "
        f"{len(m.centernet_detector.in_features)} in_features (one per level)"
    )
  if m.roi_heads.use_fed_loss and not m.roi_heads.cat_freq_path:
    raise ConfigError("model.roi_heads.use_fed_loss needs model.roi_heads.cat_freq_path")
  if cfg.data.sampler_train not in sampling.SAMPLERS:
    raise ConfigError(
        f"data.sampler_train must be one of {sampling.SAMPLERS}, got {cfg.data.sampler_train!r}"
    )
  if cfg.data.repeat_threshold <= 0:
    raise ConfigError(f"data.repeat_threshold must be > 0, got {cfg.data.repeat_threshold}")
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
  catalog.get(cfg.data.dataset)  # a ConfigError naming the registered kinds
  if cfg.data.crowdhuman_box not in ("vbox", "fbox", "hbox"):
    raise ValueError(
        f"data.crowdhuman_box must be 'vbox', 'fbox' or 'hbox', got {cfg.data.crowdhuman_box!r}"
    )
  wider_gt = cfg.data.wider_eval_gt
  if wider_gt:
    if not isinstance(wider_gt, str):
      raise ConfigError(f"data.wider_eval_gt must be a folder path, got {wider_gt!r}")
    if cfg.data.dataset != "wider_face":
      raise ConfigError(
          f"data.wider_eval_gt is read only with data.dataset='wider_face', not "
          f"{cfg.data.dataset!r}"
      )
    if not Path(wider_gt).expanduser().is_dir():
      raise ConfigError(
          f"data.wider_eval_gt={wider_gt!r} is not a folder (it must hold the official "
          f"wider_face_val.mat and wider_{{easy,medium,hard}}_val.mat)"
      )
  classes = cfg.data.classes
  if (
      isinstance(classes, str)
      or not all(isinstance(c, str) and c and "," not in c for c in classes)
      or len(set(classes)) != len(tuple(classes))
  ):
    raise ValueError(
        f"data.classes must be a tuple of distinct class names, e.g. "
        f"--config.data.classes=\"('person', 'car')\", got {classes!r}"
    )
  _validate_data_sources(cfg.data, m.num_classes)
  from cn2_jax.data.augment import AugmentSettings  # numpy + PIL only

  try:
    aug = AugmentSettings.from_config(cfg.data).check()
  except (ValueError, TypeError) as e:
    raise ValueError(f"data augmentation settings: {e}") from e
  if cfg.data.lsj and (aug.crop or aug.center_affine):
    raise ValueError(
        "data.crop_relative_range / data.center_affine replace the resize: not with lsj"
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


def _from_json(v):
  """A config.json value as the schema holds it: lists become tuples, at any depth (also in the
  dicts of data.mixture / data.extra_eval)."""
  if isinstance(v, list):
    return tuple(_from_json(x) for x in v)
  if isinstance(v, dict):
    return {k: _from_json(x) for k, x in v.items()}
  return v


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
        dst[k] = _from_json(v)

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
