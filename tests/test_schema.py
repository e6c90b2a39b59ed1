"""The config schema as data (cn2_jax/schema.py): groups declared next to their code, assembled by
cn2_jax/config.py, strict, with per-family ownership and per-group checks."""

from __future__ import annotations

import pytest

from cn2_jax import config as config_lib
from cn2_jax import schema
from cn2_jax.errors import ConfigError


def test_every_group_comes_from_a_listed_module_and_every_listed_module_is_imported():
  declared = config_lib.declared_groups()
  modules = {g.module for g in declared}
  assert modules <= set(config_lib.SCHEMA_MODULES)
  # every module that declares something is listed; packages listed only register (families,
  # dataset kinds)
  assert {m for m in config_lib.SCHEMA_MODULES if not m.endswith(("meta_arch", "datasets"))} == (
      modules
  )
  # the order of the assembled schema follows SCHEMA_MODULES
  index = [config_lib.SCHEMA_MODULES.index(g.module) for g in declared]
  assert index == sorted(index)


def test_groups_are_next_to_the_code_that_reads_them():
  by_path = {}
  for g in config_lib.declared_groups():
    by_path.setdefault(g.path, set()).add(g.module)
  assert by_path["model.roi_heads"] == {"cn2_jax.modeling.roi_heads.cascade"}
  assert by_path["model.centernet"] == {"cn2_jax.modeling.proposal.centernet"}
  assert by_path["model.onestage"] == {"cn2_jax.modeling.meta_arch.onestage"}
  assert by_path["optim"] == {"cn2_jax.engine.optim"}
  assert "cn2_jax.data.datasets.wider_face" in by_path["data"]


def test_a_key_is_declared_once():
  with pytest.raises(ValueError, match="model.roi_heads.fc_dim is declared in"):
    schema.group("model.roi_heads", "a second home", schema.Field("fc_dim", 1, "no"))
  with pytest.raises(ValueError, match="declares a key twice"):
    schema.group("x_test", "dup", schema.Field("a", 1, ""), schema.Field("a", 2, ""))
  assert all(g.path != "x_test" for g in schema.groups())


def test_a_group_of_an_unlisted_module_is_an_error(monkeypatch):
  stray = schema.Group("stray", "", (schema.Field("a", 1, "help"),), module="somewhere.else")
  monkeypatch.setattr(schema, "_GROUPS", list(schema.groups()) + [stray])
  with pytest.raises(ValueError, match="declared in somewhere.else, which .*SCHEMA_MODULES"):
    config_lib.base_config()


def test_settings_of_other_families_are_rejected_and_shared_ones_accepted():
  cfg = config_lib.base_config()
  cfg.model.arch = "onestage"
  cfg.model.resnet_depth = 18  # shared
  cfg.model.onestage.tensor_dim = 64  # its own
  config_lib.validate_config(cfg)
  cfg.model.roi_heads.fc_dim = 512
  with pytest.raises(ConfigError, match="model.roi_heads.fc_dim is a setting of the 'centernet2'"):
    config_lib.validate_config(cfg)
  cfg = config_lib.base_config()
  cfg.model.onestage.tensor_dim = 64
  with pytest.raises(ConfigError, match="model.onestage.tensor_dim .* 'onestage' family; model"):
    config_lib.validate_config(cfg)
  cfg = config_lib.base_config()
  cfg.model.arch = "centernet"
  cfg.model.fpn_channels = 128  # the backbone group: read by both CenterNet2 code-base families
  config_lib.validate_config(cfg)


def test_a_groups_check_runs_for_the_families_that_read_it():
  cfg = config_lib.base_config()
  cfg.model.roi_heads.box_weights = ((10.0, 10.0, 5.0, 5.0),)
  with pytest.raises(ConfigError, match="iou_thresholds and box_weights"):
    config_lib.validate_config(cfg)
  cfg = config_lib.base_config()
  cfg.model.arch = "not_a_family"
  with pytest.raises(ConfigError, match="not a known detector family"):
    config_lib.validate_config(cfg)
  cfg = config_lib.base_config()
  cfg.model.bogus = 1
  with pytest.raises(KeyError, match="Unknown config key 'model.bogus'"):
    config_lib.validate_config(cfg)


def test_help_text_names_each_group_and_its_families():
  text = config_lib.help_text()
  assert "# model.roi_heads [model.arch: centernet2] (cn2_jax.modeling.roi_heads.cascade)" in text
  assert "model.roi_heads.fc_dim = 1024  # ROI_BOX_HEAD.FC_DIM" in text
