"""Weights: official checkpoints in, Flax variables out, one module per job.

  reader.py        torch `.pth` / `.pkl` files read without torch -> `StateDict`
  rename.py        format detection and official key renaming (MSRA, torchvision -> detectron2)
  flax_mapping.py  strict mapping onto the Flax variables, `ConversionReport`
  orbax_io.py      save / restore converted variables with Orbax
  onestage.py      the one-stage family's formats and strict mapping (centerX key names)

`python -m cn2_jax.convert` is the one command line on top of these. A new weight format adds a
reader (if the container is new), a renaming rule and an entry in `convert.FORMATS`; a new
detector family adds its own mapping rules next to `flax_mapping.py` and its `WeightFormat`
(converters, default config) in its registry entry (modeling/meta_arch/).
"""

from cn2_jax.errors import ConversionError
from cn2_jax.weights.flax_mapping import ConversionReport, convert_to_flax
from cn2_jax.weights.orbax_io import restore_saved_variables, save_variables
from cn2_jax.weights.reader import StateDict, load_checkpoint_file
from cn2_jax.weights.rename import (
    BACKBONE_PREFIX,
    FORMAT_EXPECTATIONS,
    FROZEN_BN_EPS,
    detect_format,
    format_expectations,
    to_detectron2_names,
)

__all__ = [
    "ConversionError",
    "ConversionReport",
    "StateDict",
    "load_checkpoint_file",
    "detect_format",
    "to_detectron2_names",
    "convert_to_flax",
    "save_variables",
    "restore_saved_variables",
    "format_expectations",
    "BACKBONE_PREFIX",
    "FORMAT_EXPECTATIONS",
    "FROZEN_BN_EPS",
]
