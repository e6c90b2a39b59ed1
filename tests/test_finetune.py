"""`init_from` with whole detectors (cn2_jax/weights/finetune.py): class rows by name, every other
tensor checked, `init_skip`, `train.freeze`, init_report.json, and one-line errors that write
nothing. Sources: our runs (with and without EMA, a checkpoint step folder), official-format
files of both families (the regenerated oracle weights; small models written in the official
layouts for the training runs) and `python -m cn2_jax.convert` folders."""

from __future__ import annotations

import json
import os
import pickle

import jax
import numpy as np
import pytest

from cn2_jax import app
from cn2_jax.config import load_config_file, validate_config
from cn2_jax.data.coco_classes import COCO_CLASS_NAMES
from cn2_jax.errors import ConfigError, InputFileError, UserError, WeightsError
from cn2_jax.modeling import detector
from cn2_jax.tree_paths import key_str
from cn2_jax.weights import finetune, save_variables
from cn2_jax.weights.loading import restore_model_variables
from tests.test_app import small_demo_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_NAMES = ("rectangle", "Ellipse", "kangaroo")  # two source classes (case differs) + one new
CLS = "params/roi_heads/box_predictor.{}/cls_score/{}"


@pytest.fixture(scope="module", autouse=True)
def _fast(fast_compile):
  yield


def _flat(variables) -> dict:
  return {
      "/".join(key_str(k) for k in kp): np.asarray(v)
      for kp, v in jax.tree_util.tree_flatten_with_path(jax.device_get(variables))[0]
  }


def _source_config(**train):
  c = small_demo_config()
  c.compilation_cache_dir = ""
  c.train.eval_at_end = False
  for k, v in train.items():
    c.train[k] = v
  return c


def _write_target(src_synthetic: str, out: str, names=TARGET_NAMES, num_images=2) -> str:
  """A COCO folder of `num_images` synthetic images whose classes 1..3 are renamed `names`."""
  with open(os.path.join(src_synthetic, "instances_train.json")) as f:
    d = json.load(f)
  anns = [a for a in d["annotations"] if a["category_id"] <= len(names)]
  ids = sorted({a["image_id"] for a in anns})[:num_images]
  d["images"] = [im for im in d["images"] if im["id"] in ids]
  d["annotations"] = [a for a in anns if a["image_id"] in ids]
  d["categories"] = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
  os.makedirs(out, exist_ok=True)
  for split in ("train", "val"):
    with open(os.path.join(out, f"instances_{split}.json"), "w") as f:
      json.dump(d, f)
  return out


def _target_config(root: str, image_root: str, init_from: str, **changes):
  c = _source_config()
  c.data.dataset = "coco_json"
  c.data.root = root
  c.data.image_root = image_root
  c.data.train_json = "instances_train.json"
  c.data.val_json = "instances_val.json"
  c.model.num_classes = 3
  c.init_from = init_from
  c.optim.max_iter = 6
  c.optim.steps = (5,)
  for k, v in changes.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return validate_config(c)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A CenterNet2 run on the 4 synthetic classes (rectangle, ellipse, triangle, cross), one with
  EMA weights evaluated, and the 3-class target folder."""
  root = tmp_path_factory.mktemp("finetune")
  plain, ema = str(root / "src"), str(root / "src_ema")
  app.train(_source_config(), plain)
  cfg = _source_config()
  cfg.ema.decay = 0.9
  app.train(cfg, ema)
  synthetic = os.path.join(plain, "synthetic")
  target = _write_target(synthetic, str(root / "target"))
  return dict(root=root, plain=plain, ema=ema, synthetic=synthetic, target=target)


def _plan(cfg, names=TARGET_NAMES):
  return finetune.plan_init(cfg, names, detector.abstract_variables(cfg.model))


def _losses_fall(metrics: dict) -> bool:
  total = [metrics[s]["total_loss"] for s in sorted(metrics)]
  return np.mean(total[-2:]) < np.mean(total[:2])


def _assert_nothing_written(workdir: str) -> None:
  if os.path.isdir(workdir):
    left = set(os.listdir(workdir)) - {"tfds"}  # the prepared dataset is a cache, not run output
    assert not left, left


# ------------------------------------------------------------------------------------- our runs
def test_run_directory_rows_kept_by_name_frozen_backbone_and_report(source, tmp_path):
  cfg = _target_config(
      source["target"], source["synthetic"], source["plain"], **{"train.freeze": ("backbone",)}
  )
  src_cfg = validate_config(_source_config())
  src = _flat(restore_model_variables(src_cfg, source["plain"]))
  fresh = _flat(detector.init_variables(cfg.model, seed=3))
  init = _flat(_plan(cfg).apply(detector.init_variables(cfg.model, seed=3)))
  for stage in range(3):
    kernel, bias = CLS.format(stage, "kernel"), CLS.format(stage, "bias")
    # rectangle <- rectangle (0), Ellipse <- ellipse (1), kangaroo new, background kept
    np.testing.assert_array_equal(init[kernel][:, :2], src[kernel][:, :2])
    np.testing.assert_array_equal(init[bias][:2], src[bias][:2])
    np.testing.assert_array_equal(init[kernel][:, 3], src[kernel][:, 4])
    np.testing.assert_array_equal(init[bias][3], src[bias][4])
    np.testing.assert_array_equal(init[kernel][:, 2], fresh[kernel][:, 2])
    assert init[bias][2] == 0.0  # the official new-head rule: N(0, 0.01) weight, zero bias
    assert 0.004 < np.std(init[kernel][:, 2]) < 0.02
  others = [n for n in init if "cls_score" not in n]
  assert len(others) > 50
  for name in others:
    np.testing.assert_array_equal(init[name], src[name], err_msg=name)

  losses = {}
  workdir = str(tmp_path / "ft")
  state, _ = app.train(cfg, workdir, metrics_callback=losses.__setitem__)
  assert sorted(losses) == list(range(1, 7)) and _losses_fall(losses), losses
  after = _flat({"params": state.params})
  frozen = [n for n in after if n.startswith("params/backbone/")]
  assert frozen
  for name in frozen:  # train.freeze: bit-identical after 6 SGD steps
    np.testing.assert_array_equal(after[name], src[name], err_msg=name)
  assert any(not np.array_equal(after[n], init[n]) for n in after if n not in frozen)
  # no optimizer state for frozen parameters: the momentum buffers cover the others only
  trained = sum(a.size for n, a in after.items() if n not in frozen)
  held = sum(np.size(x) for x in jax.tree.leaves(state.opt_state))
  assert trained <= held < trained + 16, (trained, held)

  with open(os.path.join(workdir, "init_report.json")) as f:
    report = json.load(f)
  assert report["source"] == os.path.abspath(source["plain"]) and report["source_step"] == 4
  assert report["class_rows"] == [
      {"target": "rectangle", "source": "rectangle", "source_index": 0},
      {"target": "Ellipse", "source": "ellipse", "source_index": 1},
  ]
  assert sorted(report["reinitialized"]) == sorted(
      f"{CLS.format(s, leaf)}[2]" for s in range(3) for leaf in ("kernel", "bias")
  )
  assert set(report["loaded"]) == set(others) and report["skipped"] == []


def test_run_directory_with_ema_gives_its_ema_weights(source):
  cfg = _target_config(source["target"], source["synthetic"], source["ema"])
  plan = _plan(cfg)
  assert plan.source.ema and "EMA" in plan.report()["source_what"]
  src_cfg = validate_config(_source_config())
  src_cfg.ema.decay = 0.9
  ema = _flat(restore_model_variables(src_cfg, source["ema"]))  # use_for_eval: the EMA weights
  src_cfg.ema.use_for_eval = False
  raw = _flat(restore_model_variables(src_cfg, source["ema"]))
  init = _flat(plan.apply(detector.init_variables(cfg.model)))
  name = "params/backbone/fpn_output3/kernel"
  assert not np.array_equal(ema[name], raw[name])
  np.testing.assert_array_equal(init[name], ema[name])


def test_checkpoint_step_folder_and_class_map_pairs(source):
  step_dir = os.path.join(source["plain"], "checkpoints", "2")
  cfg = _target_config(
      source["target"], source["synthetic"], step_dir, init_class_map="kangaroo:Cross"
  )
  report = _plan(cfg).report()
  assert report["source_step"] == 2
  assert [(r["target"], r["source"]) for r in report["class_rows"]] == [
      ("rectangle", "rectangle"),
      ("Ellipse", "ellipse"),
      ("kangaroo", "cross"),
  ]
  none = _plan(_target_config(source["target"], source["synthetic"], step_dir,
                              init_class_map="none")).report()  # fmt: skip
  assert none["class_rows"] == [] and len(none["reinitialized"]) == 6 * 3


# ------------------------------------------------------------------------ official-format files
def _detectron2_state_dict(variables) -> dict:
  """Our CenterNet2 variables in detectron2's names and torch layouts (the official checkpoint
  layout), written independently of the converter from docs/DESIGN.md's naming contract."""
  out = {}
  for name, a in _flat(variables).items():
    coll, path = name.split("/", 1)
    key = path.replace("/", ".")
    if coll == "params" and key.endswith(".kernel"):
      key = key[: -len("kernel")] + "weight"
      a = np.transpose(a, (3, 2, 0, 1)) if a.ndim == 4 else a.T
    elif coll == "params" and key.endswith(".scale"):
      key = key[: -len("scale")] + "weight"
    out[key] = np.ascontiguousarray(a)
  return out


def _write_pkl(path, state_dict) -> str:
  with open(path, "wb") as f:
    pickle.dump({"model": state_dict, "__author__": "test"}, f)
  return str(path)


def test_official_r50_weights_rows_by_coco_name(tmp_path):
  from cn2_jax.testing import oracle

  if oracle.oracle_json_path() is None:
    pytest.skip("../shared/oracle not found")
  sd = oracle.regenerate_oracle_state_dict()
  path = _write_pkl(tmp_path / "cn2_r50.pkl", sd)
  cfg = load_config_file(os.path.join(ROOT, "configs", "cn2_r50.py"))
  cfg.model.num_classes = 3
  cfg.init_from = path
  cfg = validate_config(cfg)
  names = ("dog", "Cat", "kangaroo")
  plan = _plan(cfg, names)
  abstract = detector.abstract_variables(cfg.model)
  fresh = jax.tree.map(
      lambda s: np.random.default_rng(0).normal(size=s.shape).astype(s.dtype), abstract
  )
  init = _flat(plan.apply(fresh))
  fresh = _flat(fresh)
  dog, cat = COCO_CLASS_NAMES.index("dog"), COCO_CLASS_NAMES.index("cat")
  for stage in range(3):
    w = sd[f"roi_heads.box_predictor.{stage}.cls_score.weight"]  # [81, 1024], background last
    b = sd[f"roi_heads.box_predictor.{stage}.cls_score.bias"]
    kernel, bias = init[CLS.format(stage, "kernel")], init[CLS.format(stage, "bias")]
    np.testing.assert_array_equal(kernel[:, 0], w[dog])
    np.testing.assert_array_equal(kernel[:, 1], w[cat])
    np.testing.assert_array_equal(kernel[:, 3], w[80])
    np.testing.assert_array_equal(bias[[0, 1, 3]], b[[dog, cat, 80]])
    np.testing.assert_array_equal(kernel[:, 2], fresh[CLS.format(stage, "kernel")][:, 2])
    np.testing.assert_array_equal(bias[2], fresh[CLS.format(stage, "bias")][2])
  # every other tensor as the strict official converter maps it onto the 80-class model
  cfg80 = validate_config(load_config_file(os.path.join(ROOT, "configs", "cn2_r50.py")))
  from cn2_jax.weights import convert_to_flax, detect_format, to_detectron2_names

  ref, _ = convert_to_flax(
      to_detectron2_names(sd, detect_format(sd)), detector.abstract_variables(cfg80.model)
  )
  ref = _flat(ref)
  others = [n for n in init if "cls_score" not in n]
  assert len(others) == len(ref) - 6
  for name in others:
    np.testing.assert_array_equal(init[name], ref[name], err_msg=name)
  assert plan.report()["source_step"] is None


def test_official_format_detector_and_converted_folder_fine_tune(source, tmp_path):
  """A small 80-class CenterNet2 written as an official detectron2 .pkl: fine-tuned onto the
  target with explicit pairs; the same weights as a `cn2_jax.convert` folder load the same."""
  c80 = _source_config()
  c80.model.num_classes = 80
  v80 = detector.init_variables(validate_config(c80).model, seed=1)
  path = _write_pkl(tmp_path / "model_final.pkl", _detectron2_state_dict(v80))
  cfg = _target_config(
      source["target"], source["synthetic"], path, init_class_map="rectangle:tv,Ellipse:clock"
  )
  report = _plan(cfg).report()
  assert [(r["target"], r["source"], r["source_index"]) for r in report["class_rows"]] == [
      ("rectangle", "tv", COCO_CLASS_NAMES.index("tv")),
      ("Ellipse", "clock", COCO_CLASS_NAMES.index("clock")),
  ]
  converted = str(save_variables(v80, tmp_path / "converted"))
  from_file = _flat(_plan(cfg).apply(detector.init_variables(cfg.model)))
  cfg_dir = _target_config(source["target"], source["synthetic"], converted,
                           init_class_map="rectangle:tv,Ellipse:clock")  # fmt: skip
  from_dir = _flat(_plan(cfg_dir).apply(detector.init_variables(cfg.model)))
  assert from_file.keys() == from_dir.keys()
  for name in from_file:
    np.testing.assert_array_equal(from_file[name], from_dir[name], err_msg=name)
  losses = {}
  app.train(cfg, str(tmp_path / "ft"), metrics_callback=losses.__setitem__)
  assert _losses_fall(losses), losses


# ---------------------------------------------------------------------------- one-stage family
def _onestage_config(root: str, image_root: str, init_from: str, **onestage):
  c = load_config_file(os.path.join(ROOT, "configs", "centernet_demo.py"))
  c.compilation_cache_dir = ""
  c.model.resnet_width = 8
  c.model.onestage.deconv_channels = (16, 8, 8)
  c.model.onestage.use_deform = False
  c.model.onestage.update(onestage)
  c.data.dataset = "coco_json"
  c.data.root = root
  c.data.image_root = image_root
  c.data.train_json = "instances_train.json"
  c.data.val_json = "instances_val.json"
  for k in ("min_size_train", "max_size_train", "min_size_test", "max_size_test"):
    c.data[k] = (128,) if k == "min_size_train" else 128
  c.data.pad_hw_train = c.data.pad_hw_test = (128, 128)
  c.model.num_classes = 3
  c.train.batch_size = 2
  c.train.eval_at_end = False
  c.optim.max_iter = 6
  c.optim.warmup_iters = 2
  c.optim.steps = (5,)
  c.init_from = init_from
  return validate_config(c)


def test_centerx_oracle_weights_rows_by_coco_name(tmp_path):
  from cn2_jax.testing import centerx_oracle
  from cn2_jax.testing.centerx_oracle_dcn import centerx_oracle_dir

  spec = (centerx_oracle_dir() or tmp_path) / "centerx_r18_weights_spec.json"
  if not spec.is_file():
    pytest.skip("../shared/oracle_centerx not found")
  sd = centerx_oracle.regenerate_weights(spec)
  path = _write_pkl(tmp_path / "centerx_r18.pkl", sd)
  cfg = load_config_file(os.path.join(ROOT, "configs", "centernet_r18_coco.py"))
  cfg.model.num_classes = 3
  cfg.init_from = path
  cfg = validate_config(cfg)
  plan = _plan(cfg, ("Person", "dog", "kangaroo"))
  fresh = detector.init_variables(cfg.model)
  init = _flat(plan.apply(fresh))
  fresh = _flat(fresh)
  person, dog = COCO_CLASS_NAMES.index("person"), COCO_CLASS_NAMES.index("dog")
  w, b = sd["head.cls_head.out_conv.weight"], sd["head.cls_head.out_conv.bias"]  # [80, C, 1, 1]
  kernel = init["params/head/cls_head/out_conv/kernel"]  # [1, 1, C, 3]
  bias = init["params/head/cls_head/out_conv/bias"]
  np.testing.assert_array_equal(kernel[0, 0, :, 0], w[person, :, 0, 0])
  np.testing.assert_array_equal(kernel[0, 0, :, 1], w[dog, :, 0, 0])
  np.testing.assert_array_equal(bias[:2], b[[person, dog]])
  np.testing.assert_array_equal(
      kernel[..., 2], fresh["params/head/cls_head/out_conv/kernel"][..., 2]
  )
  np.testing.assert_allclose(bias[2], cfg.model.onestage.bias_value)  # the heatmap's prior bias
  # every other tensor (BatchNorm statistics included) as the centerX converter maps it
  from cn2_jax.weights import onestage as onestage_weights

  ref, _ = onestage_weights.load_onestage_weights(
      sd, detector.abstract_variables(validate_config(
          load_config_file(os.path.join(ROOT, "configs", "centernet_r18_coco.py"))).model)
  )  # fmt: skip
  ref = _flat(ref)
  others = [n for n in init if "cls_head/out_conv" not in n]
  assert len(others) == len(ref) - 2 and any(n.startswith("batch_stats/") for n in others)
  for name in others:
    np.testing.assert_array_equal(init[name], ref[name], err_msg=name)


def test_onestage_centerx_format_file_fine_tunes(source, tmp_path):
  """A small 80-class one-stage model written as a centerX checkpoint, fine-tuned by COCO name
  ('Person' <- person is absent from the target, so: 'rectangle:person' and auto)."""
  from cn2_jax.weights.onestage import export_state_dict

  cfg80 = _onestage_config(source["target"], source["synthetic"], "")
  cfg80.model.num_classes = 80
  v80 = detector.init_variables(cfg80.model, seed=2)
  path = _write_pkl(tmp_path / "centerx.pkl", export_state_dict(v80))
  cfg = _onestage_config(source["target"], source["synthetic"], path)
  cfg.init_class_map = "rectangle:person"
  losses = {}
  workdir = str(tmp_path / "ft")
  app.train(cfg, workdir, metrics_callback=losses.__setitem__)
  assert _losses_fall(losses), losses
  with open(os.path.join(workdir, "init_report.json")) as f:
    report = json.load(f)
  assert report["family"] == "onestage"
  assert report["class_rows"] == [{"target": "rectangle", "source": "person", "source_index": 0}]
  assert report["class_params"] == [
      "params/head/cls_head/out_conv/bias",
      "params/head/cls_head/out_conv/kernel",
  ]


# ------------------------------------------------------------------------------- bad input
def _fails(cfg, workdir, error, *needles):
  with pytest.raises(error) as e:
    app.train(cfg, workdir)
  message = str(e.value)
  assert "\n" not in message, message
  for needle in needles:
    assert needle in message, message
  _assert_nothing_written(workdir)
  return message


def test_bad_sources_are_one_line_errors_that_write_nothing(source, tmp_path):
  target, images = source["target"], source["synthetic"]
  _fails(_target_config(target, images, str(tmp_path / "nope.pkl")), str(tmp_path / "w1"),
         InputFileError, "nope.pkl")  # fmt: skip
  corrupt = tmp_path / "corrupt.pth"
  corrupt.write_bytes(b"PK\x03\x04 not a zip at all")
  _fails(_target_config(target, images, str(corrupt)), str(tmp_path / "w2"), UserError,
         "corrupt.pth")  # fmt: skip
  centerx = _write_pkl(tmp_path / "centerx.pkl", {
      "backbone.conv1.weight": np.zeros((8, 3, 7, 7), np.float32),
      "head.cls_head.out_conv.weight": np.zeros((80, 8, 1, 1), np.float32),
  })  # fmt: skip
  _fails(_target_config(target, images, centerx), str(tmp_path / "w3"), WeightsError,
         "one-stage", "CenterNet2", "model.arch")  # fmt: skip
  empty_run = tmp_path / "empty_run"
  (empty_run / "checkpoints").mkdir(parents=True)
  _fails(_target_config(target, images, str(empty_run)), str(tmp_path / "w4"), WeightsError,
         "no finished checkpoint")  # fmt: skip


def test_shape_mismatch_names_tensor_shapes_and_field_and_init_skip(source, tmp_path):
  target, images, src = source["target"], source["synthetic"], source["plain"]
  msg = _fails(_target_config(target, images, src, **{"model.fpn_channels": 64}),
               str(tmp_path / "w1"), WeightsError, "model.fpn_channels=32", "init_skip")  # fmt: skip
  assert "fpn_lateral3/bias is (32,) there but (64,) in this model" in msg
  _fails(_target_config(target, images, src, **{"model.roi_heads.fc_dim": 32}),
         str(tmp_path / "w2"), WeightsError, "box_head", "model.roi_heads.fc_dim=64")  # fmt: skip
  # init_skip: the box head and predictors re-initialised, the rest loaded
  cfg = _target_config(
      target, images, src,
      **{"model.roi_heads.fc_dim": 32, "init_skip": ("roi_heads.box_head.*",
                                                     "params/roi_heads/box_predictor*")},
  )  # fmt: skip
  report = _plan(cfg).report()
  assert report["class_rows"] == [] or all(
      "box_predictor" not in n for n in report["loaded"]
  )  # fmt: skip
  assert any("box_head.0/fc1/kernel" in n for n in report["reinitialized"])
  assert any("box_head.0/fc1/kernel" in n for n in report["skipped"])
  assert any(n.startswith("params/backbone/") for n in report["loaded"])
  deeper = _target_config(target, images, src, **{"model.centernet.num_convs": 2})
  _fails(deeper, str(tmp_path / "w3"), WeightsError, "missing there", "centernet")


def test_bad_class_maps_and_freeze_prefixes(source, tmp_path):
  target, images, src = source["target"], source["synthetic"], source["plain"]
  msg = _fails(_target_config(target, images, src, init_class_map="wombat:cross"),
               str(tmp_path / "w1"), ConfigError, "'wombat'", "kangaroo")  # fmt: skip
  msg = _fails(_target_config(target, images, src, init_class_map="kangaroo:dingo"),
               str(tmp_path / "w2"), ConfigError, "'dingo'", "triangle", "cross")  # fmt: skip
  _fails(_target_config(target, images, src, init_class_map="kangaroo"), str(tmp_path / "w3"),
         ConfigError, "target:source")  # fmt: skip
  _fails(_target_config(target, images, src, **{"train.freeze": ("backbone.res2",)}),
         str(tmp_path / "w4"), ConfigError, "train.freeze", "backbone.res2")  # fmt: skip
  del msg


def test_imagenet_backbone_file_loads_the_backbone_only(source, tmp_path):
  """A torchvision ImageNet ResNet (with its classifier `fc`) initialises the one-stage backbone
  as before; the neck and heads keep their initial values."""
  from cn2_jax.weights.onestage import export_state_dict

  cfg = _onestage_config(source["target"], source["synthetic"], "")
  imagenet = detector.init_variables(cfg.model, seed=5)
  state_dict = {
      key[len("backbone.") :]: value
      for key, value in export_state_dict(imagenet).items()
      if key.startswith("backbone.")
  }
  state_dict["fc.weight"] = np.zeros((1000, 64), np.float32)
  state_dict["fc.bias"] = np.zeros((1000,), np.float32)
  cfg.init_from = _write_pkl(tmp_path / "resnet.pkl", state_dict)
  fresh = detector.init_variables(cfg.model, seed=6)
  plan = _plan(cfg)
  init = _flat(plan.apply(fresh))
  imagenet, fresh = _flat(imagenet), _flat(fresh)
  for name in init:
    want = imagenet if "/backbone/" in name else fresh
    np.testing.assert_array_equal(init[name], want[name], err_msg=name)
  report = plan.report()
  assert "backbone only" in report["source_what"] and report["class_rows"] == []
  assert set(report["loaded"]) == {n for n in init if "/backbone/" in n}
  assert {"fc.weight", "fc.bias"} <= set(report["skipped"])
