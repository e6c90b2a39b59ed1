"""The meta-architecture registry: `model.arch` -> how to build that detector family.

A family registers a builder `(frozen model config, axis_name) -> Linen module` with
`@register("name", frozen_param_prefixes=fn)`; `build_model(config.model)` calls it. Every
registered module follows the Model API of docs/DESIGN.md (`apply(variables, batch, train=False)`
-> detections dict; `train=True` -> losses, with `mutable=['batch_stats']` when the family has
trainable BatchNorm), so the data pipeline, training loop, evaluation, predict and export work for
every family. `frozen_param_prefixes(config.model)` names the '.'-joined parameter path prefixes
that receive no update (the optimizer's FROZEN label). `class_params` describes the family's
class-dependent parameters (one row per class along the last axis) for fine-tuning onto other
classes (weights/finetune.py). `onnx_parts` declares what `python -m cn2_jax.export --format onnx`
converts for the family (`--onnx-part`): part name -> the name of a module method
`(image, image_hw) -> {output name: array}` that computes it, or None for the whole detector (the
Predictor's forward, as the StableHLO export has it); the first part is the default.
`weights` (a `WeightFormat`) maps the family's official checkpoints onto its variables
(`python -m cn2_jax.convert`, `--config.weights`, `init_from`); `display_name` names the family
in messages. `distillation_teacher(module, teacher config, student config)`, when set, makes a
run of the family usable as a knowledge-distillation teacher (`kd.teacher_workdirs`): it returns
the frozen teacher's `(variables, batch) -> {cls, wh, reg}` at the student's output stride.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional

import ml_collections

from cn2_jax import schema
from cn2_jax.errors import ConfigError
from cn2_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class ClassParams:
  """The class-dependent parameters of a family: their '/'-joined variable names (`params/...`)
  match `pattern` (a regular expression, full match); the class is the last axis; with
  `background_last` the last row is the background (not a class)."""

  pattern: str
  background_last: bool


@dataclasses.dataclass(frozen=True)
class WeightFormat:
  """How a family's official checkpoints (a state dict read by `weights.load_checkpoint_file`)
  map onto its variables."""

  # (state dict, variables, *, backbone_only) -> (variables, report): strict conversion
  convert: Callable
  # (state dict, abstract variables) -> ({(collection, '.'-path): array}, unmapped source keys,
  # source keys dropped by the official renaming): every tensor in this project's names and
  # layouts, whatever its shape (fine-tuning compares the shapes itself)
  named_tensors: Callable
  # ((variable-name fragment, the config fields that shape it), ...) for mismatch messages
  fields_by_path: tuple
  # `python -m cn2_jax.convert`: (state dict, checkpoint format, *, seed, backbone_only,
  # model_config or None) -> (variables, report summary)
  convert_checkpoint: Callable
  # the model config converted onto when the command has no --config (None: none needed)
  default_config: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Family:
  build: Callable  # (FrozenConfigDict model config, axis_name) -> flax.linen.Module
  frozen_param_prefixes: Callable  # (model config) -> tuple[str, ...]
  class_params: ClassParams
  weights: WeightFormat
  display_name: str
  # --format onnx: part -> module method name (None: the whole detector); the first is the default
  onnx_parts: Mapping[str, Optional[str]] = dataclasses.field(default_factory=dict, hash=False)
  # (teacher module, teacher config, student config) -> (variables, batch) -> {cls, wh, reg}
  distillation_teacher: Optional[Callable] = None


# The families register themselves in their modules, which the package imports.
META_ARCHS = Registry("detector family", "model.arch", builtins="cn2_jax.modeling.meta_arch")


def register(
    name: str,
    *,
    frozen_param_prefixes: Callable,
    class_params: ClassParams,
    weights: WeightFormat,
    display_name: str,
    onnx_parts: Optional[Mapping[str, Optional[str]]] = None,
    distillation_teacher: Optional[Callable] = None,
) -> Callable:
  def deco(build: Callable) -> Callable:
    META_ARCHS.add(
        name,
        Family(
            build,
            frozen_param_prefixes,
            class_params,
            weights,
            display_name,
            dict(onnx_parts or {}),
            distillation_teacher,
        ),
    )
    return build

  return deco


def family(arch: str) -> Family:
  return META_ARCHS.lookup(arch)


def build_model(model_config: ml_collections.ConfigDict, axis_name: Optional[str] = None):
  """The detector module of `model_config.arch` (a registered family)."""
  return family(model_config.arch).build(
      ml_collections.FrozenConfigDict(model_config), axis_name=axis_name
  )


def frozen_param_prefixes(model_config: ml_collections.ConfigDict) -> tuple:
  return tuple(family(model_config.arch).frozen_param_prefixes(model_config))


def _validate_model(cfg) -> None:
  family(cfg.model.arch)  # a ConfigError naming the registered families
  if cfg.model.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"model.dtype must be 'float32' or 'bfloat16', got {cfg.model.dtype!r}")


CONFIG = schema.group(
    "model",
    "The detector: its family and the settings every family reads.",
    schema.Field(
        "arch",
        "centernet2",
        "detector family (the registry of modeling/meta_arch/build.py): 'centernet2', 'centernet' "
        "(the official one-stage CenterNet) or 'onestage' (centerX)",
    ),
    schema.Field("num_classes", 80, "number of object classes (no background)"),
    schema.Field(
        "dtype", "float32", "compute dtype: 'float32' or 'bfloat16' (params stay float32)"
    ),
    schema.Field(
        "remat",
        False,
        "rematerialisation (memory for compute, values unchanged): in training, every ResNet "
        "block of the trained stages (and the stem when trained), and with CenterNet2 each "
        "cascade stage's ROIAlign + box head, keep only their inputs and recompute their "
        "activations in the backward pass (nn.remat); other backbones (DLA, Res2Net, BiFPN "
        "layers) are not rematerialised. bench/memory.py measures the saving",
    ),
    validate=_validate_model,
)
