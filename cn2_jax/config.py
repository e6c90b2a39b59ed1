"""The configuration: the schema assembled from the groups modules declare, and its checks.

Each module declares the settings it reads next to its code (`cn2_jax.schema.group`, e.g.
`model.roi_heads` in modeling/roi_heads/cascade.py, `optim` in engine/optim.py);
`base_config()` assembles the groups of `SCHEMA_MODULES` into one `ml_collections.ConfigDict`
with every default (CenterNet2_R50_1x: docs/centernet2.md §2-§6, docs/training.md §1). Config
files in `configs/` start from it and override values; `validate_config` rejects keys the schema
does not know (a misspelled key is an error naming it, never silently ignored), changes to
settings that only other families read, and runs each group's own checks.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Tuple

import ml_collections

from cn2_jax import schema
from cn2_jax.errors import ConfigError

# The modules that declare config groups, in the order the schema (and --helpconfig) lists them.
# They are imported when the schema is first assembled, not at the top of this module: most of
# them read this module's helpers (model_kwargs, config_from_json, ...). The two packages register
# the detector families and dataset kinds that the checks look up.
SCHEMA_MODULES = (
    "cn2_jax.config",
    "cn2_jax.weights.finetune",
    "cn2_jax.modeling.meta_arch",
    "cn2_jax.modeling.meta_arch.build",
    "cn2_jax.modeling.backbone.build",
    "cn2_jax.modeling.backbone.bifpn",
    "cn2_jax.modeling.backbone.dla",
    "cn2_jax.modeling.proposal.build",
    "cn2_jax.modeling.proposal.centernet",
    "cn2_jax.modeling.roi_heads.cascade",
    "cn2_jax.modeling.meta_arch.centernet_onestage",
    "cn2_jax.modeling.meta_arch.onestage",
    "cn2_jax.data.datasets",
    "cn2_jax.data.sources",
    "cn2_jax.data.datasets.crowdhuman",
    "cn2_jax.data.datasets.wider_face",
    "cn2_jax.data.datasets.synthetic",
    "cn2_jax.data.buckets",
    "cn2_jax.data.efficientdet_aug",
    "cn2_jax.data.sampling",
    "cn2_jax.data.batcher",
    "cn2_jax.data.loader",
    "cn2_jax.data.mixture",
    "cn2_jax.data.augment",
    "cn2_jax.modeling.onestage.kd",
    "cn2_jax.engine.optim",
    "cn2_jax.engine.swa",
    "cn2_jax.engine.step",
    "cn2_jax.engine.loop",
    "cn2_jax.predictor",
    "cn2_jax.pseudo_label",
    "cn2_jax.evaluation.protocol",
)

RUN = schema.group(
    "",
    "The run itself.",
    schema.Field("seed", 0, "seed of the initialisation, the data order and the augmentations"),
    schema.Field(
        "weights",
        "",
        "full-model weights for eval / predict: an Orbax folder (a run's checkpoint or a "
        "`python -m cn2_jax.convert` output) or an official .pkl/.pth; '' = the run's newest "
        "checkpoint",
    ),
    schema.Field(
        "compilation_cache_dir",
        "~/.cache/cn2_jax/xla",
        "JAX persistent compilation cache: each padded shape (train bucket, eval canvas) is "
        "compiled once, lazily, and reused by later runs; '' disables it",
    ),
)


def declared_groups() -> Tuple[schema.Group, ...]:
  """Every group of the schema, in `SCHEMA_MODULES` order."""
  for name in SCHEMA_MODULES:
    importlib.import_module(name)
  order = {name: i for i, name in enumerate(SCHEMA_MODULES)}
  for g in schema.groups():
    if g.module not in order:
      raise ValueError(
          f"config group {g.path or '(top level)'!r} is declared in {g.module}, which "
          f"cn2_jax.config.SCHEMA_MODULES does not list"
      )
  return tuple(sorted(schema.groups(), key=lambda g: order[g.module]))


def base_config() -> ml_collections.ConfigDict:
  """A fresh ConfigDict with every field of the schema at its default."""
  return schema.build(declared_groups())


def family_reads(arch: str, field: str) -> bool:
  """Whether the detector family `arch` reads the config field `field` (a dotted path)."""
  return field in schema.fields_read_by(declared_groups(), arch)


def help_text() -> str:
  """`python main.py --helpconfig`: every field, its default and its help, group by group."""
  declared = declared_groups()
  return schema.help_text(declared, schema.build(declared))


def _check_keys(cfg, ref, prefix=""):
  for key in cfg.keys():
    path = f"{prefix}{key}"
    if key not in ref:
      raise KeyError(
          f"Unknown config key '{path}' (not in cn2_jax.config.base_config; misspelled?)"
      )
    if isinstance(cfg[key], ml_collections.ConfigDict):
      if not isinstance(ref[key], ml_collections.ConfigDict):
        raise KeyError(f"Config key '{path}' must be a value, not a group")
      _check_keys(cfg[key], ref[key], path + ".")


def _check_family_fields(cfg, declared, defaults) -> None:
  """ConfigError naming a changed field that only other families than `model.arch` read."""
  arch = cfg.model.arch
  own = schema.fields_read_by(declared, arch)
  for g in declared:
    if g.read_by(arch):
      continue
    prefix = f"{g.path}." if g.path else ""
    for f in g.fields:
      path = prefix + f.name
      if jsonable(get_field(cfg, path)) == jsonable(get_field(defaults, path)):
        continue
      if path in own:
        continue  # also declared by a group this family reads
      who = " / ".join(repr(x) for x in g.families)
      raise ConfigError(
          f"{path} is a setting of the {who} famil{'ies' if len(g.families) > 1 else 'y'}; "
          f"model.arch={arch!r} does not read it"
      )


def validate_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Raises KeyError naming any key unknown to the schema, ConfigError (a ValueError) on a bad
  value: the first failing check of the groups the selected family reads, in schema order."""
  declared = declared_groups()
  defaults = schema.build(declared)
  _check_keys(cfg, defaults)
  model_groups = [g for g in declared if g.path == "model" and not g.families]
  for g in model_groups:  # model.arch (a registered family) first: the checks below need it
    if g.validate is not None:
      g.validate(cfg)
  _check_family_fields(cfg, declared, defaults)
  for g in declared:
    if g.validate is not None and g.read_by(cfg.model.arch) and g not in model_groups:
      g.validate(cfg)
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


# Settings renamed since a run's config.json may have been written: old field -> (new field,
# old value -> new value). Runs written before the rename still evaluate and resume.
RENAMED_FIELDS = {
    "model.roi_heads.cascade": (
        "model.roi_heads.name",
        lambda cascade: "CustomCascadeROIHeads" if cascade else "CustomROIHeads",
    ),
}


def config_from_json(path: str) -> ml_collections.ConfigDict:
  """Rebuilds a run's ConfigDict from workdir/config.json on top of the schema defaults."""
  with open(path) as f:
    saved = json.load(f)
  cfg = base_config()

  def merge(dst, src, prefix=""):
    for k, v in src.items():
      if f"{prefix}{k}" in RENAMED_FIELDS:
        new_field, new_value = RENAMED_FIELDS[f"{prefix}{k}"]
        set_field(cfg, new_field, new_value(v))
        continue
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
