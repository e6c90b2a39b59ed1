"""configs/centerx/<yaml stem>.py against the centerX yamls they reproduce (docs/onestage.md §7).

YAMLS below is typed from CPFLAME/centerX's yamls (`_BASE_` merged, as dict spreading; keys the
yaml leaves alone at centerX's `configs/config.py` / detectron2 defaults), in the yaml's own terms.
`expected_fields` translates them into this project's config fields, independently of the config
files; every recipe must then hold those values, have a comment on every field it sets, and pass
`validate_config` (skipped, naming the field, while a field the recipe uses is not in
`base_config()` yet: the issue 25 item 3 names are added separately).
"""

from __future__ import annotations

import importlib.util
import re

import pytest

from cn2_jax.config import base_config, validate_config
from configs import centerx
from configs.centerx import HERE, load, stems

# Fields of issue 25 item 3 that some recipes use before they exist in base_config().
NEW_FIELDS = (
    "model.onestage.hm_loss",
    "data.resize_type",
    "data.box_min_size",
    "data.crowdhuman_ignore_as",
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# ---- the yamls, in their own terms ----------------------------------------------------------
COCO_R18_05 = {  # yamls/coco/centernet_res18_coco_0.5.yaml
    "BACKBONE.DEPTH": 18,
    "BN_TYPE": "BN",
    "PIXEL_MEAN": MEAN,
    "PIXEL_STD": STD,
    "DECONV_CHANNEL": (512, 256, 128, 64),
    "DECONV_KERNEL": (4, 4, 4),
    "NUM_CLASSES": 80,
    "MODULATE_DEFORM": True,
    "USE_DEFORM": True,  # centerX default
    "BIAS_VALUE": -2.19,
    "DOWN_SCALE": 4,
    "MIN_OVERLAP": 0.3,
    "TENSOR_DIM": 128,
    "LOSS.CLS_WEIGHT": 1.0,  # defaults
    "LOSS.WH_WEIGHT": 0.1,
    "LOSS.REG_WEIGHT": 1.0,
    "LOSS.NORM_WH": False,
    "LOSS.IGNORE_UNLABEL": False,
    "LOSS.SKIP_LOSS": False,
    "LOSS.SKIP_WEIGHT": 1.0,
    "LOSS.COMMUNISM": None,  # ENABLE False
    "IMGAUG_PROB": 2.0,
    "KD": None,  # ENABLED False
    "MODEL.WEIGHTS": None,  # ImageNet backbone (PRETRAIN True)
    "DATASETS.TRAIN": ("coco_2017_train",),
    "SOLVER.IMS_PER_BATCH": 64,
    "SOLVER.WARMUP_ITERS": 1,
    "SOLVER.STEPS": (50, 62),
    "SOLVER.MAX_ITER": 70,
    "SOLVER.BASE_LR": 0.02,
    "SOLVER.LR_SCHEDULER_NAME": "WarmupCosineAnnealingLR",
    "SOLVER.COSINE_DECAY_ITER": 0.5,
    "SOLVER.OPTIM_NAME": "SGD",
    "SOLVER.CLIP_GRADIENTS": None,  # commented out: ENABLED False
    "SOLVER.SWA": None,
    "INPUT.FORMAT": "RGB",
    "INPUT.MIN_SIZE_TEST": 0,
    "INPUT.MAX_SIZE_TEST": 1333,  # detectron2 default, unused with MIN_SIZE_TEST 0
    "INPUT.MIN_SIZE_TRAIN": (384, 448, 512),
    "INPUT.MAX_SIZE_TRAIN": 512,
    "INPUT.CROP.SIZE": (0.6, 0.6),  # ENABLED True, TYPE relative_range
}
COCO_R50_05 = {  # yamls/coco/centernet_res50_coco_0.5.yaml
    **COCO_R18_05,
    "BACKBONE.DEPTH": 50,
    "DECONV_CHANNEL": (2048, 256, 128, 64),
    "SOLVER.BASE_LR": 0.01,
    "SOLVER.COSINE_DECAY_ITER": 0.6,
    "SOLVER.CLIP_GRADIENTS": 1.0,  # ENABLED True, CLIP_TYPE value, CLIP_VALUE 1.0
}
CH_R18 = {  # yamls/crowd_human/crowd_human_res18.yaml
    **COCO_R18_05,
    "NUM_CLASSES": 1,
    "TENSOR_DIM": 512,
    "DATASETS.TRAIN": ("crowd_human_train",),
    "SOLVER.MAX_ITER": 80,
    "SOLVER.LR_SCHEDULER_NAME": "WarmupMultiStepLR",
    "SOLVER.COSINE_DECAY_ITER": None,
    "SOLVER.CLIP_GRADIENTS": 1.0,
    "INPUT.MIN_SIZE_TEST": 512,
    "INPUT.MAX_SIZE_TEST": 512,
    "INPUT.MIN_SIZE_TRAIN": (512,),
    "INPUT.CROP.SIZE": (0.75, 0.75),
}
CH_KD_SOLVER = {  # crowd_human_res18_KD.yaml / res18_multi_KD.yaml SOLVER
    "SOLVER.STEPS": (90, 120),
    "SOLVER.MAX_ITER": 140,
    "SOLVER.BASE_LR": 0.02,
    "SOLVER.LR_SCHEDULER_NAME": "WarmupMultiStepLR",
    "SOLVER.OPTIM_NAME": "SGD",
    "SOLVER.CLIP_GRADIENTS": 1.0,
}
PERSON_FACE = {  # the person_face yamls' shared values
    **COCO_R18_05,
    "NUM_CLASSES": 2,
    "DATASETS.TRAIN": ("crowd_human_face_train", "widerface_crowdhuman_train"),
    "SOLVER.OPTIM_NAME": "Adam",
    "SOLVER.COSINE_DECAY_ITER": 0.6,
    "INPUT.MIN_SIZE_TEST": 384,
    "INPUT.MAX_SIZE_TEST": 640,
    "INPUT.MIN_SIZE_TRAIN": (384,),
    "INPUT.MAX_SIZE_TRAIN": 640,
    "INPUT.CROP.SIZE": (0.6, 0.6),
}

YAMLS = {
    "centernet_res18_coco_0.5": COCO_R18_05,
    "centernet_res18_coco": {**COCO_R18_05, "SOLVER.MAX_ITER": 140},
    "centernet_res50_coco_0.5": COCO_R50_05,
    "centernet_res50_coco": {**COCO_R50_05, "SOLVER.MAX_ITER": 140},
    "centernet_res18_KD": {
        **COCO_R18_05,
        "LOSS.COMMUNISM": (1.2, 0.4, 0.1),
        "KD": {
            "TEACHER_CFG": ("centernet_res50_coco_0.5",),
            "KD_WEIGHT": (5.0,),
            "KD_CLS_WEIGHT": (100000.0,),
            "KD_WH_WEIGHT": (1.0,),
            "KD_REG_WEIGHT": (0.1,),
            "KD_CLS_INDEX": (80,),
            "NORM_WH": (True,),
            "KD_WITHOUT_LABEL": False,
        },
        "MODEL.WEIGHTS": "centernet_res18_coco_0.5",  # its trained model
        "SOLVER.BASE_LR": 5e-4,
        "SOLVER.COSINE_DECAY_ITER": 0.1,
        "SOLVER.OPTIM_NAME": "Adam",
        "INPUT.CROP.SIZE": (0.75, 0.75),
    },
    "centernet_res18_coco_communism": {
        **COCO_R18_05,
        "TENSOR_DIM": 512,
        "LOSS.COMMUNISM": (1.5, 0.3, 0.1),
        "SOLVER.COSINE_DECAY_ITER": 0.1,
    },
    "crowd_human_res18": CH_R18,
    "crowd_human_res50": {**CH_R18, "BACKBONE.DEPTH": 50, "DECONV_CHANNEL": (2048, 256, 128, 64)},
    "crowd_human_res18_SyncBN": {**CH_R18, "BN_TYPE": "SyncBN"},
    "crowd_human_res18_imgaug": {**CH_R18, "IMGAUG_PROB": 0.5},
    "crowd_human_res18_swa": {
        **CH_R18,
        "SOLVER.MAX_ITER": 70,
        "SOLVER.SWA": {"ITER": 10, "PERIOD": 1, "LR_START": 0.002, "ETA_MIN_LR": 1e-4,
                       "LR_SCHED": True},
    },  # fmt: skip
    "crowd_human_res18_rangerlars": {
        **CH_R18,
        "SOLVER.BASE_LR": 0.001,
        "SOLVER.LR_SCHEDULER_NAME": "WarmupCosineAnnealingLR",
        "SOLVER.COSINE_DECAY_ITER": 0.7,  # centerX default
        "SOLVER.OPTIM_NAME": "RangerLars",
    },
    "crowd_human_res18_communism": {
        **CH_R18,
        "LOSS.COMMUNISM": (1.2, 0.4, 0.1),
        "SOLVER.MAX_ITER": 70,
        "SOLVER.BASE_LR": 5e-4,
        "SOLVER.LR_SCHEDULER_NAME": "WarmupCosineAnnealingLR",
        "SOLVER.COSINE_DECAY_ITER": 0.1,
        "SOLVER.OPTIM_NAME": "Adam",
        "SOLVER.CLIP_GRADIENTS": None,
    },
    "crowd_human_res18_KD": {
        **CH_R18,
        **CH_KD_SOLVER,
        "KD": {
            "TEACHER_CFG": ("centernet_r_18_C4_0.5x_coco_person",),
            "KD_WEIGHT": (1.0,),
            "KD_CLS_WEIGHT": (1000.0,),
            "KD_WH_WEIGHT": (1.0,),
            "KD_REG_WEIGHT": (0.1,),
            "KD_CLS_INDEX": (1,),  # centerX default
            "NORM_WH": (True,),
            "KD_WITHOUT_LABEL": True,
        },
    },
    "res18_multi_KD": {
        **CH_R18,
        **CH_KD_SOLVER,
        "KD": {
            "TEACHER_CFG": ("crowd_human_res50",),
            "KD_WEIGHT": (1.0,),
            "KD_CLS_WEIGHT": (1000.0,),
            "KD_WH_WEIGHT": (1.0,),
            "KD_REG_WEIGHT": (0.1,),
            "KD_CLS_INDEX": (1,),
            "NORM_WH": (True,),
            "KD_WITHOUT_LABEL": True,
        },
    },
    "person_face_res18_ignore_unlabel": {
        **PERSON_FACE,
        "LOSS.IGNORE_UNLABEL": True,
        "SOLVER.MAX_ITER": 140,
        "SOLVER.BASE_LR": 2.5e-5,
        "SOLVER.CLIP_GRADIENTS": 0.6,
    },
    "person_face_res18_multi_KD": {
        **PERSON_FACE,
        "DATASETS.TRAIN": ("face_train", "crowd_human_train"),
        "LOSS.SKIP_LOSS": True,
        "LOSS.SKIP_WEIGHT": 1.3,
        "KD": {
            "TEACHER_CFG": ("centernet_r_50_C4_0.5x_coco_person", "face_res18"),
            "KD_WEIGHT": (1.0, 1.0),
            "KD_CLS_WEIGHT": (1000.0, 2000.0),
            "KD_WH_WEIGHT": (1.0, 2.0),
            "KD_REG_WEIGHT": (0.1, 0.1),
            "KD_CLS_INDEX": (1, 2),
            "NORM_WH": (True, True),
            "KD_WITHOUT_LABEL": True,
        },
        "SOLVER.STEPS": (90, 120),
        "SOLVER.MAX_ITER": 140,
        "SOLVER.BASE_LR": 1.25e-4,
        "SOLVER.CLIP_GRADIENTS": 0.5,
    },
}

# centerX dataset names -> (data.dataset, data.mixture datasets)
DATASETS = {
    ("coco_2017_train",): ("coco/2017", ()),
    ("crowd_human_train",): ("crowdhuman", ()),
    ("crowd_human_face_train", "widerface_crowdhuman_train"): ("crowdhuman", ("wider_face",)),
    ("face_train", "crowd_human_train"): ("crowdhuman", ("wider_face",)),
}
OPTIMIZERS = {"SGD": "sgd", "Adam": "adam", "RangerLars": "rangerlars"}
SCHEDULES = {"WarmupCosineAnnealingLR": "warmup_cosine_annealing", "WarmupMultiStepLR": "multistep"}
OLD_NAMES = {
    "centernet_r18_coco": "centernet_res18_coco_0.5",
    "centernet_r50_coco": "centernet_res50_coco_0.5",
    "centernet_r18_crowdhuman": "crowd_human_res18",
    "person_face_mix_ignore_unlabel": "person_face_res18_ignore_unlabel",
    "person_face_multi_kd": "person_face_res18_multi_KD",
}


def expected_fields(y: dict) -> dict:
  """{config path: value} that a recipe of the yaml `y` must hold."""
  c5 = {18: 512, 50: 2048}[y["BACKBONE.DEPTH"]]
  assert y["DECONV_CHANNEL"][0] == c5  # the yaml's neck input is the backbone's C5 width
  comm, kd, swa, clip = y["LOSS.COMMUNISM"], y["KD"], y["SOLVER.SWA"], y["SOLVER.CLIP_GRADIENTS"]
  dataset, mixture = DATASETS[y["DATASETS.TRAIN"]]
  e = {
      "model.arch": "onestage",
      "model.resnet_depth": y["BACKBONE.DEPTH"],
      "model.num_classes": y["NUM_CLASSES"],
      "model.onestage.sync_bn": y["BN_TYPE"] == "SyncBN",
      "model.onestage.input_format": y["INPUT.FORMAT"],
      "model.onestage.pixel_mean": y["PIXEL_MEAN"],
      "model.onestage.pixel_std": y["PIXEL_STD"],
      "model.onestage.deconv_channels": y["DECONV_CHANNEL"][1:],
      "model.onestage.deconv_kernels": y["DECONV_KERNEL"],
      "model.onestage.use_deform": y["USE_DEFORM"],
      "model.onestage.modulate_deform": y["MODULATE_DEFORM"],
      "model.onestage.bias_value": y["BIAS_VALUE"],
      "model.onestage.down_scale": y["DOWN_SCALE"],
      "model.onestage.min_overlap": y["MIN_OVERLAP"],
      "model.onestage.tensor_dim": y["TENSOR_DIM"],
      "model.onestage.cls_weight": y["LOSS.CLS_WEIGHT"],
      "model.onestage.wh_weight": y["LOSS.WH_WEIGHT"],
      "model.onestage.reg_weight": y["LOSS.REG_WEIGHT"],
      "model.onestage.norm_wh": "centerx" if y["LOSS.NORM_WH"] else "",
      "model.onestage.ignore_unlabel": y["LOSS.IGNORE_UNLABEL"],
      "model.onestage.communism": comm is not None,
      "optim.skip_loss_factor": y["LOSS.SKIP_WEIGHT"] if y["LOSS.SKIP_LOSS"] else 0.0,
      "data.dataset": dataset,
      "data.min_size_train": y["INPUT.MIN_SIZE_TRAIN"],
      "data.max_size_train": y["INPUT.MAX_SIZE_TRAIN"],
      "data.min_size_test": y["INPUT.MIN_SIZE_TEST"],
      "data.crop_relative_range": y["INPUT.CROP.SIZE"],
      "data.flip": True,  # TRAIN_PIPELINES default
      "data.color_aug": "centerx",
      "optim.optimizer": OPTIMIZERS[y["SOLVER.OPTIM_NAME"]],
      "optim.base_lr": y["SOLVER.BASE_LR"],
      "optim.reference_batch_size": y["SOLVER.IMS_PER_BATCH"],
      "train.batch_size": y["SOLVER.IMS_PER_BATCH"],
      "optim.epochs": y["SOLVER.MAX_ITER"],
      "optim.warmup_iters": y["SOLVER.WARMUP_ITERS"],
      "optim.schedule": SCHEDULES[y["SOLVER.LR_SCHEDULER_NAME"]],
      "optim.steps": y["SOLVER.STEPS"],
      "optim.weight_decay": 1e-4,  # detectron2 default
      "optim.clip_value": 0.0 if clip is None else clip,
      "optim.clip_norm": 0.0,
      "kd.teacher_workdirs": () if kd is None else tuple(f"runs/{t}" for t in kd["TEACHER_CFG"]),
      "swa.iters": 0 if swa is None else swa["ITER"],
  }
  if y["INPUT.MIN_SIZE_TEST"]:  # 0: no test resize, MAX_SIZE_TEST unused
    e["data.max_size_test"] = y["INPUT.MAX_SIZE_TEST"]
  if e["optim.schedule"] == "warmup_cosine_annealing":
    e["optim.cosine_decay_iter"] = y["SOLVER.COSINE_DECAY_ITER"]
    e["optim.min_lr"] = 1e-8  # centerX SOLVER.MIN_LR default
  if comm is not None:
    e["model.onestage.communism_targets"] = comm
  if kd is not None:
    e.update(
        {
            "kd.weight": kd["KD_WEIGHT"],
            "kd.cls_weight": kd["KD_CLS_WEIGHT"],
            "kd.wh_weight": kd["KD_WH_WEIGHT"],
            "kd.reg_weight": kd["KD_REG_WEIGHT"],
            "kd.cls_index": kd["KD_CLS_INDEX"],
            "kd.norm_wh": kd["NORM_WH"],
            "kd.without_label": kd["KD_WITHOUT_LABEL"],
        }
    )
  if y["MODEL.WEIGHTS"] is not None:
    e["init_from"] = f"runs/{y['MODEL.WEIGHTS']}"
  if swa is not None:
    e.update(
        {
            "swa.period": swa["PERIOD"],
            "swa.lr_start": swa["LR_START"],
            "swa.eta_min": swa["ETA_MIN_LR"],
            "swa.lr_sched": "cosine" if swa["LR_SCHED"] else "constant",
            "swa.bn_batches": 0,  # centerX does not recompute the BN statistics
        }
    )
  if dataset == "crowdhuman":
    e["data.crowdhuman_box"] = "vbox"
    e["data.crowdhuman_ignore_as"] = "person"  # centerX reads every tag 'person' box
  e["_mixture"] = mixture
  e["_imgaug"] = y["IMGAUG_PROB"] <= 1.0
  return e


def _get(c, path):
  for key in path.split("."):
    c = c[key]
  return c


def _plain(v):
  return tuple(_plain(x) for x in v) if isinstance(v, (list, tuple)) else v


def _paths(c, prefix=""):
  out = set()
  for key in c.keys():
    v = c[key]
    out |= _paths(v, f"{prefix}{key}.") if hasattr(v, "keys") else {f"{prefix}{key}"}
  return out


def test_one_recipe_per_yaml():
  assert sorted(YAMLS) == stems()


@pytest.mark.parametrize("stem", sorted(YAMLS))
def test_recipe_values_are_the_yaml(stem):
  c = load(stem)
  expected = expected_fields(YAMLS[stem])
  mixture, imgaug = expected.pop("_mixture"), expected.pop("_imgaug")
  wrong = {
      path: (_plain(_get(c, path)), value)
      for path, value in expected.items()
      if _plain(_get(c, path)) != value
  }
  assert not wrong, f"{stem}: (config, yaml) differ: {wrong}"
  assert c.data.max_boxes >= c.model.onestage.tensor_dim  # no GT box dropped before TENSOR_DIM
  assert tuple(m["dataset"] for m in c.data.mixture) == mixture
  if mixture:  # person = channel 0 (CrowdHuman), face = channel 1 (WIDER)
    assert c.data.channel_offset == 0 and c.data.mixture[0]["channel_offset"] == 1
    assert c.data.extra_eval[0]["channel_offset"] == 1
  assert (c.data.perspective > 0) == imgaug  # box-correct stand-in for imgaug


@pytest.mark.parametrize("stem", sorted(YAMLS))
def test_recipe_fields_are_traced(stem):
  """Every field the recipe sets has a comment (on its line or the lines just above) naming the
  yaml or the default it comes from, and the docstring names the yaml."""
  text = (HERE / f"{stem}.py").read_text()
  assert f"{stem}.yaml`" in text.split('"""')[1]
  lines = text.splitlines()
  for i, line in enumerate(lines):
    m = re.match(r"\s+c\.([\w.]+) = ", line)
    if not m:
      continue
    comment = line.split("#", 1)[1] if "#" in line else ""
    j = i - 1
    while not comment.strip() and j >= 0 and lines[j].strip().startswith("#"):
      while j >= 0 and lines[j].strip().startswith("#"):  # the whole comment block above
        comment = lines[j] + comment
        j -= 1
    assert re.search(r"\.yaml|default|project|centerX", comment), f"{stem}: {line.strip()}"


@pytest.mark.parametrize("stem", sorted(YAMLS))
def test_recipe_validates(stem):
  c = load(stem)
  unknown = _paths(c) - _paths(base_config())
  missing = sorted(f for f in NEW_FIELDS if f in unknown)
  assert not unknown - set(missing), f"{stem}: fields not in the schema: {unknown}"
  if missing:
    pytest.skip(f"needs {', '.join(missing)} (issue 25 item 3)")
  validate_config(c)


@pytest.mark.parametrize("old", sorted(OLD_NAMES))
def test_old_config_names_are_the_recipes(old):
  arg = ("/data/ch,/data/wider",) if "person_face" in old else ()
  spec = importlib.util.spec_from_file_location(f"old_{old}", HERE.parent / f"{old}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.get_config(*arg).to_dict() == load(OLD_NAMES[old], *arg).to_dict()


def test_person_face_roots():
  assert centerx.roots("") == centerx.PLACEHOLDER_ROOTS
  assert centerx.roots("/a,/b") == ("/a", "/b")
  c = load("person_face_res18_multi_KD", "/data/ch,/data/wider")
  assert c.data.root == "/data/ch" and c.data.mixture[0]["root"] == "/data/wider"
  with pytest.raises(ValueError):
    centerx.roots("/a,/b,/c")
