"""Training that starts from trained weights: `init_from` (an ImageNet backbone, or a whole
detector of the same family, fine-tuned onto this config's classes).

  plan = plan_init(cfg, class_names, abstract_variables)   reads and checks everything; raises a
                                                            one-line error before a run writes
  variables = plan.apply(fresh_variables)                  the merged variables (logs a summary)
  plan.report()                                            what init_report.json holds

What `init_from` may be (`read_source`):
  * an ImageNet ResNet file (MSRA `.pkl`, torchvision `.pth`): the backbone is loaded as the
    converters load it (weights/flax_mapping.py, weights/onestage.py); everything else keeps the
    model's initial values;
  * a detector: an official `.pkl`/`.pth` (detectron2 / CenterNet2, centerX, xingyizhou/CenterNet),
    an Orbax folder written by `python -m cn2_jax.convert`, a run directory (its newest checkpoint;
    the EMA weights when that run's config evaluates with them) or `DIR/checkpoints/<step>`.

For a detector, every tensor of the model is taken from the source, with three exceptions:
  * class-dependent tensors (the family's `ClassParams`: CenterNet2's `cls_score` of each cascade
    stage, the one-stage class heatmap's last conv) get their rows by `init_class_map`: a matched
    class keeps its source row; an unmatched one keeps the model's initial row (the official
    initialisation of a new head: `cls_score` N(0, 0.01) weight and zero bias, the heatmap's
    prior bias); a background row is kept from the source;
  * tensors matching a glob of `init_skip` keep their initial values;
  * nothing else may differ: a tensor whose shape differs, one the source lacks or a source tensor
    the model has no place for is a one-line WeightsError naming it, both shapes and the config
    field that explains it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from cn2_jax import schema
from cn2_jax.config import config_from_json, get_field, jsonable
from cn2_jax.convert import FORMATS, detect_checkpoint
from cn2_jax.data.coco_classes import COCO_CLASS_NAMES
from cn2_jax.engine import swa as swa_lib
from cn2_jax.errors import ConfigError, ConversionError, InputFileError, WeightsError, one_line
from cn2_jax.modeling import meta_arch
from cn2_jax.tree_paths import key_str
from cn2_jax.weights.loading import (
    VARIABLE_COLLECTIONS,
    _implied_model_fields,
    checkpoint_metadata_tree,
    convert_state_dict,
    fields_of_path,
    orbax_weights_dir,
    weights_run_dir,
)
from cn2_jax.weights.reader import load_checkpoint_file

log = logging.getLogger(__name__)

REPORT_NAME = "init_report.json"


def normalized_class_name(name: str) -> str:
  """Class names compare without case, spaces, '_' and '-' ("Traffic light" == "traffic_light")."""
  return re.sub(r"[\s_\-]", "", str(name).lower())


# ----------------------------------------------------------------------------------------------
# Reading the source.
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Source:
  """What `init_from` holds, in this project's names ('/'-joined: `params/backbone/...`)."""

  path: str
  what: str  # e.g. "detectron2 / CenterNet2 model", "run checkpoint (EMA weights)"
  family: Optional[str]  # the detector family; None for an ImageNet backbone
  tensors: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  unmapped: List[str] = dataclasses.field(default_factory=list)  # source keys the model lacks
  dropped: List[str] = dataclasses.field(default_factory=list)  # dropped by the official renaming
  class_names: Optional[Tuple[str, ...]] = None
  step: Optional[int] = None
  ema: bool = False
  state_dict: Optional[dict] = None  # an ImageNet file, converted when applied


def _slash_names(abstract) -> Dict[Tuple[str, str], str]:
  """(collection, '.'-joined path) -> '/'-joined name of every leaf of a variables tree."""
  out = {}
  for kp, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    names = [key_str(key) for key in kp]
    out[(names[0], ".".join(names[1:]))] = "/".join(names)
  return out


def _family_of_tree(names: Sequence[str]) -> Optional[str]:
  tops = {
      name.split("/")[1] for name in names if name.startswith("params/") and name.count("/") > 1
  }
  if tops & {"roi_heads", "proposal_generator"}:
    return "centernet2"
  if tops & {"head", "upsample"}:
    return "onestage"
  return None


def _read_orbax(path: str) -> Source:
  """A run, one of its checkpoints or a converted folder (all collections, any shapes)."""
  item = orbax_weights_dir(path)  # WeightsError when a run has no finished checkpoint
  tree = checkpoint_metadata_tree(item, f"init_from {path}")
  run = weights_run_dir(path)
  run_cfg = None
  if run is not None and os.path.isfile(os.path.join(run, "config.json")):
    run_cfg = config_from_json(os.path.join(run, "config.json"))
  ema = run_cfg is not None and swa_lib.use_ema_for_eval(run_cfg) and "ema" in tree
  wanted = {coll: tree[coll] for coll in VARIABLE_COLLECTIONS if coll in tree}
  if ema:
    wanted["ema"] = tree["ema"]
  target = jax.tree.map(lambda m: np.zeros(tuple(m.shape), np.dtype(m.dtype)), wanted)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(
        item,
        args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
    )
  if ema:  # the weights that run evaluates with (ema.use_for_eval)
    restored.update(restored.pop("ema"))
  tensors = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]:
    tensors["/".join(key_str(key) for key in kp)] = np.asarray(leaf)
  family = run_cfg.model.arch if run_cfg is not None else _family_of_tree(tensors)
  class_names = None
  if run is not None and os.path.isfile(os.path.join(run, "dataset_info.json")):
    with open(os.path.join(run, "dataset_info.json")) as f:
      class_names = tuple(json.load(f)["class_names"])
  step_dir = os.path.basename(os.path.dirname(item))
  return Source(
      path=path,
      what=("run checkpoint" + (" (EMA weights)" if ema else "")) if run else "converted weights",
      family=family,
      tensors=tensors,
      class_names=class_names,
      step=int(step_dir) if run is not None and step_dir.isdigit() else None,
      ema=bool(ema),
  )


def _read_file(path: str, model_cfg, abstract) -> Source:
  """An official .pkl / .pth: a detector of either family or an ImageNet backbone."""
  state_dict = load_checkpoint_file(path)
  try:
    fmt = detect_checkpoint(state_dict)
  except ConversionError as e:
    raise WeightsError(f"init_from {path}: {one_line(e)}") from e
  kind = FORMATS[fmt]
  if kind.backbone_only:
    return Source(path=path, what=kind.what, family=None, state_dict=state_dict)
  family = kind.families[0]
  source = Source(path=path, what=kind.what, family=family)
  if family != model_cfg.arch:
    return source  # plan_init names both families
  named, source.unmapped, source.dropped = meta_arch.family(family).weights.named_tensors(
      state_dict, abstract
  )
  names = _slash_names(abstract)
  source.tensors = {names[key]: value for key, value in named.items()}
  return source


def read_source(path: str, model_cfg, abstract) -> Source:
  """`init_from` read into this project's names (`abstract`: the model's abstract variables)."""
  if not os.path.exists(path):
    raise InputFileError(f"init_from {path}: no such file or directory")
  if os.path.isdir(path):
    return _read_orbax(path)
  return _read_file(path, model_cfg, abstract)


# ----------------------------------------------------------------------------------------------
# Class rows.
# ----------------------------------------------------------------------------------------------
def class_rows(
    spec: str, target_names: Sequence[str], source_names: Optional[Sequence[str]], source: str
) -> List[Optional[int]]:
  """The source class index of each target class (None: a new row) under `init_class_map`."""
  spec = spec.strip()
  rows: List[Optional[int]] = [None] * len(target_names)
  if spec == "none":
    return rows
  by_target = {normalized_class_name(name): i for i, name in enumerate(target_names)}
  by_source = {}
  for j, source_name in enumerate(source_names or ()):
    by_source.setdefault(normalized_class_name(source_name), j)
  explicit = set()
  if spec != "auto":
    for item in spec.split(","):
      target, sep, src = (part.strip() for part in item.partition(":"))
      if not sep or not target or not src:
        raise ConfigError(
            f"init_class_map: {item.strip()!r} is not a 'target:source' pair (the setting is "
            f"'auto', 'none' or pairs like 'kangaroo:dog,scooter:motorcycle')"
        )
      if normalized_class_name(target) not in by_target:
        raise ConfigError(
            f"init_class_map: {target!r} is not a class of this dataset; its classes are "
            f"{list(target_names)}"
        )
      if source_names is None:
        raise ConfigError(
            f"init_class_map: {source} does not name its classes (no dataset_info.json and not "
            f"80 COCO classes), so {src!r} cannot be looked up; use 'auto' or 'none'"
        )
      if normalized_class_name(src) not in by_source:
        raise ConfigError(
            f"init_class_map: {src!r} is not a class of {source}; its classes are "
            f"{list(source_names)}"
        )
      i = by_target[normalized_class_name(target)]
      rows[i] = by_source[normalized_class_name(src)]
      explicit.add(i)
  for i, name in enumerate(target_names):
    if i not in explicit:
      rows[i] = by_source.get(normalized_class_name(name))
  return rows


# ----------------------------------------------------------------------------------------------
# The plan.
# ----------------------------------------------------------------------------------------------
def _matches(patterns: Sequence[str], name: str) -> bool:
  """`name` ('/'-joined with its collection, or a source key) against the init_skip globs, also in
  the '.'-joined parameter-path form (`roi_heads.box_head.0.fc1.kernel`)."""
  dotted = name.split("/", 1)[1].replace("/", ".") if "/" in name else name
  return any(
      fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(dotted, pattern)
      for pattern in patterns
  )


def _field_hint(family: str, name: str, source_shapes: dict, model_cfg) -> str:
  """The config field(s) behind a tensor of another shape: the value the source implies when
  it can be read off its shapes, else the fields that shape that part of the model."""
  # (the implied values are read off CenterNet2's variable names; other families imply none)
  for field, value in _implied_model_fields(source_shapes).items():
    here = get_field(model_cfg, field)
    if field != "num_classes" and jsonable(here) != jsonable(value):
      return f"the checkpoint has model.{field}={value!r}, this config {here!r}"
  return f"check {fields_of_path(family, name)}"


@dataclasses.dataclass
class InitPlan:
  """What `apply` does to freshly initialised variables (built by `plan_init`)."""

  source: Source
  family: str  # the model's family (model.arch)
  loaded: List[str]  # taken whole from the source
  class_params: List[str]  # class-dependent tensors, rows by `rows`
  rows: List[Optional[int]]  # per target class: its source row, or None (initial values)
  background_last: bool
  target_names: Tuple[str, ...]
  reinitialized: List[str]  # init_skip: initial values
  skipped: List[str]  # source tensors not used

  def report(self) -> dict:
    """The init_report.json content (README "Your own classes")."""
    new_rows = [
        f"{name}[{i}]" for name in self.class_params for i, j in enumerate(self.rows) if j is None
    ]
    source_names = self.source.class_names
    return {
        "source": os.path.abspath(self.source.path),
        "source_step": self.source.step,
        "source_what": self.source.what,
        "family": self.source.family,
        "loaded": list(self.loaded),
        "class_params": list(self.class_params),
        "class_rows": [
            {
                "target": self.target_names[i],
                "source": source_names[j] if source_names else None,
                "source_index": int(j),
            }
            for i, j in enumerate(self.rows)
            if j is not None
        ],
        "reinitialized": list(self.reinitialized) + new_rows,
        "skipped": list(self.skipped),
    }

  def apply(self, variables: dict) -> dict:
    """`variables` (freshly initialised) with the source's tensors put in (host arrays); logs a
    one-line summary of `report()`."""
    if self.source.family is None:
      return self._apply_backbone(variables)
    tensors = self.source.tensors
    class_params, reinitialized = set(self.class_params), set(self.reinitialized)

    def merged(kp, leaf):
      name = "/".join(key_str(key) for key in kp)
      value = np.asarray(leaf)
      if name in class_params:
        out = np.array(value, copy=True)
        src = tensors[name]
        for i, j in enumerate(self.rows):
          if j is not None:
            out[..., i] = src[..., j]
        if self.background_last:
          out[..., -1] = src[..., -1]
        return out
      if name in tensors and name not in reinitialized:
        return np.asarray(tensors[name], dtype=value.dtype)
      return value

    out = jax.tree_util.tree_map_with_path(merged, jax.device_get(variables))
    log.info("%s", summary_line(self.report()))
    return out

  def _apply_backbone(self, variables: dict) -> dict:
    """An ImageNet backbone, loaded as before init_from took detectors (loading.py); what the
    converter loaded and left unused becomes `loaded` / `skipped`."""
    host = jax.device_get(variables)
    out, conversion = convert_state_dict(
        self.source.state_dict, host, backbone_only=True, arch=self.family
    )
    log.info("loaded %s: %s", self.source.path, conversion.summary())
    names = _slash_names(host)
    self.loaded = [names[key] for key in conversion.mapped_variables()]
    self.skipped = conversion.unused_source_keys()
    log.info("%s", summary_line(self.report()))
    return out


def summary_line(report: dict) -> str:
  """One log line of an init report."""
  rows = ", ".join(
      f"{row['target']}<-{row['source']}[{row['source_index']}]" for row in report["class_rows"]
  )
  step = f" (step {report['source_step']})" if report["source_step"] is not None else ""
  return (
      f"init_from {report['source']}{step}, {report['source_what']}: loaded "
      f"{len(report['loaded'])} tensors; class rows kept: {rows or 'none'}; initialised: "
      f"{len(report['reinitialized'])} tensors or rows; skipped {len(report['skipped'])} source "
      f"tensors; details in {REPORT_NAME}"
  )


def plan_init(cfg, target_class_names: Sequence[str], abstract: dict) -> InitPlan:
  """Reads `cfg.init_from` and checks it against the model (`abstract`: its abstract variables)
  and the dataset's classes; raises a one-line error (WeightsError / ConfigError /
  InputFileError) for anything that does not fit. Nothing is written."""
  path = cfg.init_from
  model_cfg = cfg.model
  source = read_source(path, model_cfg, abstract)
  family = model_cfg.arch
  target_names = tuple(target_class_names)
  plan = InitPlan(source, family, [], [], [None] * len(target_names), False, target_names, [], [])
  if source.family is None:  # ImageNet backbone
    source.what += " (backbone only)"
    if cfg.init_class_map.strip() not in ("auto", "none") or tuple(cfg.init_skip):
      log.warning("init_from %s is a backbone: init_class_map and init_skip are unused", path)
    return plan
  if source.family != family:
    raise WeightsError(
        f"init_from {path} holds a {meta_arch.family(source.family).display_name} detector "
        f"(model.arch={source.family!r}), but this config builds a "
        f"{meta_arch.family(family).display_name} one (model.arch={family!r}); weights of one family "
        f"cannot initialise the other"
    )
  info = meta_arch.family(family).class_params
  plan.background_last = info.background_last
  skip = tuple(cfg.init_skip)
  target = {  # the model's variables: '/'-joined name -> shape
      "/".join(key_str(key) for key in kp): tuple(int(dim) for dim in leaf.shape)
      for kp, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
      if key_str(kp[0]) in VARIABLE_COLLECTIONS
  }
  tensors = source.tensors
  shapes = {name: tuple(np.shape(array)) for name, array in tensors.items()}

  def mismatch(name, there, here):
    return WeightsError(
        f"init_from {path}: {name} is {there} there but {here} in this model "
        f"({_field_hint(family, name, shapes, model_cfg)}); change the config, or add a pattern "
        f"matching it to init_skip to initialise it instead"
    )

  source_classes = None
  for name, shape in target.items():
    if _matches(skip, name):
      plan.reinitialized.append(name)
    elif re.fullmatch(info.pattern, name):
      if name not in tensors:
        raise WeightsError(
            f"init_from {path}: {name} of this model is missing there "
            f"({_field_hint(family, name, shapes, model_cfg)})"
        )
      there = shapes[name]
      if there[:-1] != shape[:-1]:
        raise mismatch(name, there, shape)
      num_classes = there[-1] - int(info.background_last)
      if source_classes is not None and num_classes != source_classes:
        raise WeightsError(
            f"init_from {path}: {name} has {num_classes} classes, other class tensors "
            f"{source_classes}"
        )
      source_classes = num_classes
      plan.class_params.append(name)
    elif name not in tensors:
      raise WeightsError(
          f"init_from {path}: {name} ({shape}) of this model is missing there "
          f"({_field_hint(family, name, shapes, model_cfg)}); add a pattern matching it to "
          f"init_skip to initialise it instead"
      )
    elif shapes[name] != shape:
      raise mismatch(name, shapes[name], shape)
    else:
      plan.loaded.append(name)
  unused = [tensor_name for tensor_name in tensors if tensor_name not in target]
  for name in unused + list(source.unmapped):
    if not _matches(skip, name):
      raise WeightsError(
          f"init_from {path}: it has {name} {shapes.get(name, '')}, which this model does not "
          f"({_field_hint(family, name, shapes, model_cfg)}); add a pattern matching it to "
          f"init_skip to leave it unused"
      )
    plan.skipped.append(name)
  reinitialized = [tensor_name for tensor_name in plan.reinitialized if tensor_name in tensors]
  plan.skipped += reinitialized + list(source.dropped)
  if source.class_names is None and source_classes == len(COCO_CLASS_NAMES):
    source.class_names = COCO_CLASS_NAMES  # official 80-class weights: COCO's classes
  if source.class_names is not None and len(source.class_names) != source_classes:
    log.warning(
        "init_from %s: %d class names for %s classes; class names not used",
        path, len(source.class_names), source_classes,
    )  # fmt: skip
    source.class_names = None
  if source.class_names is None and cfg.init_class_map.strip() == "auto":
    log.warning(
        "init_from %s does not name its classes (no dataset_info.json, not 80 COCO classes): "
        "every class row is initialised (init_class_map 'target:source' pairs cannot be used)",
        path,
    )
  if plan.class_params:  # (all of them in init_skip: no class row is loaded)
    plan.rows = class_rows(cfg.init_class_map, target_names, source.class_names, path)
  return plan


def _validate_settings(cfg) -> None:
  if not isinstance(cfg.init_class_map, str) or not cfg.init_class_map.strip():
    raise ConfigError(
        f"init_class_map must be 'auto', 'none' or 'target:source,...', got {cfg.init_class_map!r}"
    )
  if isinstance(cfg.init_skip, str) or not all(
      isinstance(value, str) and value for value in cfg.init_skip
  ):
    raise ConfigError(f"init_skip must be a tuple of non-empty strings, got {cfg.init_skip!r}")


CONFIG = schema.group(
    "",
    "Initial weights of a fresh training run (unused when a run resumes from its checkpoint).",
    schema.Field(
        "init_from",
        "",
        "an ImageNet backbone (.pkl/.pth: the backbone is loaded, the rest initialised) or a whole "
        "detector of this family: an official .pkl/.pth (CenterNet2, centerX, xingyizhou/CenterNet),"
        " a `python -m cn2_jax.convert` folder, a run directory (its newest checkpoint; its EMA "
        "weights when that run evaluates with them) or DIR/checkpoints/<step>; what was loaded: "
        "<workdir>/init_report.json",
    ),
    schema.Field(
        "init_class_map",
        "auto",
        "class rows of the class-dependent tensors (cls_score per cascade stage / the class "
        "heatmap's last conv): 'auto' = target classes matched to the source's by name (case, "
        "spaces, '_' and '-' ignored), unmatched ones initialised as a new head; "
        "'target:source,...' = these pairs, the others by 'auto'; 'none' = every class row "
        "initialised (a background row is kept)",
    ),
    schema.Field(
        "init_skip",
        (),
        "globs of tensors init_from does not load (initialised instead), e.g. "
        "('roi_heads.box_head.*',): matched against the model's names "
        "('params/roi_heads/box_head.0/fc1/kernel') and the '.'-joined parameter path "
        "('roi_heads.box_head.0.fc1.kernel'); also the source tensors they leave unused",
    ),
    validate=_validate_settings,
)
