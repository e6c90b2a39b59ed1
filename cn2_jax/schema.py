"""The config schema as data: groups of fields declared next to the code that reads them.

A module that reads settings declares them once, at module level::

    CONFIG = schema.group(
        "model.roi_heads",
        "Cascade ROI heads (CustomCascadeROIHeads).",
        schema.Field("pooler_resolution", 7, "ROIAlign output size per side"),
        ...,
        families=("centernet2",),
    )

`cn2_jax.config.base_config()` imports the declaring modules (`config.SCHEMA_MODULES`) and
assembles every group into one `ml_collections.ConfigDict`; a field's default lives only in its
declaration. `families` names the detector families (`model.arch`) that read a group; the schema
rejects a change to a group that the selected family does not read (it would be silently
ignored), and runs a group's `validate` only for the families that read it. `--helpconfig` prints
`help_text()`: every field with its default and help, grouped as declared.

This module imports nothing of the project, so any module can declare its group.
"""

from __future__ import annotations

import dataclasses
import sys
import textwrap
from typing import Any, Callable, List, Optional, Tuple

import ml_collections


@dataclasses.dataclass(frozen=True)
class Field:
  """One setting: its key inside the group, its default and a help text for `--helpconfig`."""

  name: str
  default: Any
  help: str = ""


@dataclasses.dataclass(frozen=True)
class Group:
  """Fields under one dotted path ("" = top level, "model", "model.roi_heads", ...).

  Several groups may share a path (e.g. "model" gets the shared keys from the family registry and
  the backbone keys from the backbone registry); a key is declared once. `families` = the
  `model.arch` values that read the group (() = every family). `validate(cfg)` checks the group's
  values in the whole (validated-so-far) config and raises `ConfigError` naming the field.
  """

  path: str
  doc: str
  fields: Tuple[Field, ...]
  families: Tuple[str, ...] = ()
  validate: Optional[Callable[[ml_collections.ConfigDict], None]] = None
  module: str = ""  # the declaring module, for --helpconfig and duplicate-key messages

  def read_by(self, arch: str) -> bool:
    return not self.families or arch in self.families


_GROUPS: List[Group] = []


def group(
    path: str,
    doc: str,
    *fields: Field,
    families: Tuple[str, ...] = (),
    validate: Optional[Callable[[ml_collections.ConfigDict], None]] = None,
) -> Group:
  """Declares (registers) a group of fields; returns it so the module can keep a handle."""
  module = sys._getframe(1).f_globals.get("__name__", "")  # the declaring module, for messages
  names = [f.name for f in fields]
  if len(set(names)) != len(names):
    raise ValueError(f"config group {path!r} declares a key twice: {names}")
  declared = Group(path, doc, tuple(fields), tuple(families), validate, module)
  for other in _GROUPS:
    if other.path == path and other.module == module and other.doc == doc:
      return other  # the same module imported again (e.g. under importlib reload)
    clash = set(names) & {f.name for f in other.fields} if other.path == path else set()
    if clash:
      raise ValueError(
          f"config key {path}.{sorted(clash)[0]} is declared in {other.module or '?'} and "
          f"{module or '?'}"
      )
  _GROUPS.append(declared)
  return declared


def groups() -> Tuple[Group, ...]:
  """Every declared group, in declaration order."""
  return tuple(_GROUPS)


def build(declared: Tuple[Group, ...]) -> ml_collections.ConfigDict:
  """A fresh ConfigDict holding every field of `declared` at its default."""
  root = ml_collections.ConfigDict()
  for g in declared:
    node = root
    for key in g.path.split(".") if g.path else ():
      if key not in node:
        node[key] = ml_collections.ConfigDict()
      node = node[key]
    for f in g.fields:
      node[f.name] = f.default
  return root


def fields_read_by(declared: Tuple[Group, ...], arch: str) -> set:
  """The dotted paths of every field the family `arch` reads."""
  return {
      (f"{g.path}." if g.path else "") + f.name
      for g in declared
      if g.read_by(arch)
      for f in g.fields
  }


def help_text(declared: Tuple[Group, ...], defaults: ml_collections.ConfigDict) -> str:
  """`--helpconfig`: every field as `path = default  # help`, grouped as declared."""
  out = [
      "Config fields: the defaults of the schema (cn2_jax/config.py assembles the groups each "
      "module declares; config files override them); set any with --config.FIELD=VALUE.",
  ]
  for g in declared:
    who = f" [model.arch: {', '.join(g.families)}]" if g.families else ""
    out += ["", f"# {g.path or '(top level)'}{who} ({g.module})"]
    out += (
        textwrap.wrap(
            g.doc, 98, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False
        )
        if g.doc
        else []
    )
    prefix = f"{g.path}." if g.path else ""
    for f in g.fields:
      value = defaults
      for key in (prefix + f.name).split("."):
        value = value[key]
      line = f"{prefix}{f.name} = {value!r}"
      if len(line) + len(f.help) + 4 <= 100:  # short: on the field's line
        out.append(f"{line}  # {f.help}" if f.help else line)
      else:  # long: wrapped below it
        out.append(line)
        out += textwrap.wrap(
            f.help,
            100,
            initial_indent="    # ",
            subsequent_indent="    # ",
            break_on_hyphens=False,  # a help line is read back joined by spaces
        )
  return "\n".join(out)
