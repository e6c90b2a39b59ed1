"""One registry type for every extension point (detectron2's `fvcore.common.registry.Registry`).

Each extension point is a module-level `Registry` beside its contract; an implementation
registers itself in its own file:

    PROPOSAL_GENERATORS = Registry("proposal generator", "model.proposal_generator",
                                   builtins="cn2_jax.modeling.proposal")
    PROPOSAL_GENERATORS.add("CenterNet", entry)
    PROPOSAL_GENERATORS.lookup(cfg.model.proposal_generator)   # the entry, or a ConfigError

The registries of the package: backbones (`modeling/backbone/build.py`, `model.backbone`),
proposal generators (`modeling/proposal/build.py`, `model.proposal_generator`), ROI heads
(`modeling/roi_heads/build.py`, `model.roi_heads.name`), detector families
(`modeling/meta_arch/build.py`, `model.arch`) and dataset kinds (`data/catalog.py`,
`data.dataset`; a kind carries its evaluator's extra metrics).
"""

from __future__ import annotations

import importlib
from typing import Any, Optional, Tuple

from cn2_jax.errors import ConfigError


class Registry(dict):
  """name -> entry (a dict, so `in`, iteration and `.values()` work as usual).

  `what` names the extension point in messages; `field` is the config field that selects an
  entry; `builtins` is the package whose import registers the built-in entries (imported on the
  first `lookup`, so that reading the config schema does not import every model).
  """

  def __init__(self, what: str, field: str, builtins: Optional[str] = None):
    super().__init__()
    self.what, self.field, self.builtins = what, field, builtins

  def add(self, name: str, entry: Any) -> Any:
    if name in self:
      raise ValueError(f"{self.what} {name!r} is registered twice")
    self[name] = entry
    return entry

  def register(self, name: str):
    """Decorator form of `add`: `@REGISTRY.register("Name")` registers the decorated object."""
    return lambda entry: self.add(name, entry)

  def names(self) -> Tuple[str, ...]:
    """The registered names, built-ins included, in registration order."""
    if self.builtins:
      importlib.import_module(self.builtins)
    return tuple(self)

  def lookup(self, name: str, field: Optional[str] = None) -> Any:
    """The entry registered as `name`; otherwise a one-line ConfigError naming the config field
    (`field`, default the registry's) and the known names."""
    known = self.names()
    if name not in self:
      raise ConfigError(
          f"{field or self.field} must be one of {known}, got {name!r} (not a known {self.what})"
      )
    return self[name]
