"""The registries (cn2_jax/registry.py): one type for every extension point; the two-stage
detector builds its proposal generator and ROI heads through theirs, so a new one is a file and a
`register` call."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from cn2_jax import config as config_lib
from cn2_jax.data import catalog
from cn2_jax.errors import ConfigError
from cn2_jax.modeling import detector
from cn2_jax.modeling.backbone.build import BACKBONES
from cn2_jax.modeling.meta_arch.build import META_ARCHS
from cn2_jax.modeling.proposal.build import PROPOSAL_GENERATORS
from cn2_jax.modeling.proposal.centernet import build_centernet
from cn2_jax.modeling.roi_heads.build import ROI_HEADS
from cn2_jax.registry import Registry
from tests.test_detector import tiny_batch, tiny_config


@pytest.fixture(scope="module", autouse=True)
def _fast(fast_compile):
  yield


def test_registry_adds_once_and_names_the_field_on_a_miss():
  reg = Registry("widget", "model.widget")
  assert reg.register("a")(len) is len
  with pytest.raises(ValueError, match="widget 'a' is registered twice"):
    reg.add("a", str)
  with pytest.raises(ConfigError) as err:
    reg.lookup("b")
  msg = str(err.value)
  assert "model.widget must be one of ('a',), got 'b'" in msg and "\n" not in msg
  with pytest.raises(ConfigError, match=r"mixture\[1\].widget must be one of"):
    reg.lookup("b", field="mixture[1].widget")


def test_every_extension_point_is_a_registry_with_its_builtins():
  points = [
      (BACKBONES, "build_p67_resnet_fpn_backbone"),
      (PROPOSAL_GENERATORS, "CenterNet"),
      (ROI_HEADS, "CustomCascadeROIHeads"),
      (META_ARCHS, "centernet2"),
      (catalog.KINDS, "coco_json"),
  ]
  for reg, builtin in points:
    assert isinstance(reg, Registry)
    assert builtin in reg.names(), (reg.what, reg.names())
  assert set(ROI_HEADS.names()) >= {"CustomCascadeROIHeads", "CustomROIHeads"}


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("proposal_generator", "RPN", r"model.proposal_generator must be one of \('CenterNet',\)"),
        ("roi_heads.name", "StandardROIHeads", r"model.roi_heads.name must be one of"),
    ],
)
def test_unknown_names_are_one_config_error(field, value, message):
  cfg = config_lib.base_config()
  config_lib.set_field(cfg.model, field, value)
  with pytest.raises(ConfigError, match=message):
    config_lib.validate_config(cfg)


def test_single_stage_roi_heads_need_one_iou_threshold():
  cfg = config_lib.base_config()
  cfg.model.roi_heads.name = "CustomROIHeads"
  with pytest.raises(ConfigError, match="CustomROIHeads.*one entry, got 3"):
    config_lib.validate_config(cfg)
  cfg.model.roi_heads.iou_thresholds = (0.5,)
  cfg.model.roi_heads.box_weights = ((10.0, 10.0, 5.0, 5.0),)
  config_lib.validate_config(cfg)


@pytest.mark.parametrize(
    "cascade, name", [(True, "CustomCascadeROIHeads"), (False, "CustomROIHeads")]
)
def test_a_run_saved_with_the_old_cascade_flag_still_loads(tmp_path, cascade, name):
  saved = config_lib.jsonable(config_lib.base_config().to_dict())
  del saved["model"]["roi_heads"]["name"]
  saved["model"]["roi_heads"]["cascade"] = cascade
  if not cascade:
    saved["model"]["roi_heads"]["iou_thresholds"] = [0.5]
    saved["model"]["roi_heads"]["box_weights"] = [[10.0, 10.0, 5.0, 5.0]]
  path = tmp_path / "config.json"
  path.write_text(json.dumps(saved))
  assert config_lib.config_from_json(str(path)).model.roi_heads.name == name


def test_the_detector_builds_what_the_registries_name(monkeypatch):
  """A proposal generator registered from outside the package (here: CenterNet with its
  candidate threshold raised to 1, so that no proposal survives) is what the detector runs."""
  built = []

  def no_proposals(model_config, **wiring):
    built.append(sorted(wiring))
    return build_centernet(model_config, **wiring).clone(inference_thresh=1.0)

  monkeypatch.setitem(PROPOSAL_GENERATORS, "NoProposals", no_proposals)
  cfg = tiny_config()
  batch = tiny_batch(b=1, hw=(64, 96))  # small: the model runs op by op, three times
  model = detector.build_model(cfg.model)
  variables = model.init(jax.random.PRNGKey(0), batch, train=False)
  assert np.asarray(model.apply(variables, batch)["valid"]).any()

  cfg.model.proposal_generator = "NoProposals"
  config_lib.validate_config(cfg)
  out = detector.build_model(cfg.model).apply(variables, batch)
  assert built == [["axis_name", "channels", "dtype", "strides"]]
  assert not np.asarray(out["valid"]).any()


def test_custom_roi_heads_is_one_unsuffixed_stage():
  cfg = tiny_config()
  r = cfg.model.roi_heads
  r.name, r.iou_thresholds, r.box_weights = "CustomROIHeads", (0.5,), ((10.0, 10.0, 5.0, 5.0),)
  variables = detector.abstract_variables(cfg.model)
  heads = set(variables["params"]["roi_heads"])
  assert heads == {"box_head", "box_predictor"}, heads
  cfg.model.roi_heads.name = "CustomCascadeROIHeads"
  cfg.model.roi_heads.iou_thresholds = (0.6, 0.7)
  cfg.model.roi_heads.box_weights = ((10.0, 10.0, 5.0, 5.0),) * 2
  heads = set(detector.abstract_variables(cfg.model)["params"]["roi_heads"])
  assert heads == {"box_head.0", "box_head.1", "box_predictor.0", "box_predictor.1"}, heads
