"""The proposal-generator registry: `model.proposal_generator` -> the first stage of a two-stage
detector (detectron2 `PROPOSAL_GENERATOR_REGISTRY`, `MODEL.PROPOSAL_GENERATOR.NAME`).

    @PROPOSAL_GENERATORS.register("CenterNet")
    def build_centernet(model_config, *, strides, channels, dtype, axis_name) -> nn.Module: ...

`model_config` is the frozen `config.model`; the detector passes the wiring: the `strides` and
`channels` of the feature levels its backbone returns, the compute `dtype` and the train step's
data `axis_name`. The detector names the module `proposal_generator` (the official state-dict
prefix). Contract of the built module:
  * `strides`: the per-level strides it was built with.
  * `__call__(features, *, train, gt_boxes=None, gt_valid=None, masks=None, image_hw=None)`:
    `features` a list of `[B, H_l, W_l, C]`, `masks` their canvas masks `[B, H_l, W_l]` bool,
    `image_hw` `[B, 2]`, GT `[B, M, 4]` / `[B, M]` in training. Returns the proposals
    `{"boxes" [B, K, 4], "scores" [B, K], "valid" [B, K]}` (float32, no gradient) and, with
    `train`, `(losses, proposals)` (float32 scalar losses, `aux/` metrics).
  * `export_outputs(features, masks, image_hw=None)`: its dense maps by name and, given
    `image_hw`, its test-mode decode up to the NMS (what an exported graph computes).

Adding a proposal generator is one new file in this folder with one `register` call (imported in
`modeling/proposal/__init__.py`) and, if it has settings, a `schema.group` beside it.
"""

from __future__ import annotations

from cn2_jax import schema
from cn2_jax.registry import Registry

# The built-in generators register themselves on import of the package.
PROPOSAL_GENERATORS = Registry(
    "proposal generator", "model.proposal_generator", builtins="cn2_jax.modeling.proposal"
)


def build_proposal_generator(model_config, **wiring):
  """The `model_config.proposal_generator` module; `wiring` = strides, channels, dtype,
  axis_name (see the module docstring)."""
  return PROPOSAL_GENERATORS.lookup(model_config.proposal_generator)(model_config, **wiring)


def _validate(cfg) -> None:
  PROPOSAL_GENERATORS.lookup(cfg.model.proposal_generator)


CONFIG = schema.group(
    "model",
    "The first stage of the two-stage detector.",
    schema.Field(
        "proposal_generator",
        "CenterNet",
        "PROPOSAL_GENERATOR.NAME (the registry of modeling/proposal/build.py): 'CenterNet' = "
        "CenterNet with ONLY_PROPOSAL (settings: model.centernet)",
    ),
    families=("centernet2",),
    validate=_validate,
)
