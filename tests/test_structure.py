"""Package structure: no import circles in cn2_jax (module-level or inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "cn2_jax"


def _module_name(path: Path) -> str:
  rel = path.relative_to(PKG.parent).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _imports(path: Path, modules: set) -> set:
  """cn2_jax modules imported anywhere in `path` (`from a.b import c` counts a.b.c when it is a
  module, else a.b)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("cn2_jax")}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cn2_jax"):
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        out.add(sub if sub in modules else node.module)
  return {m for m in out if m in modules}


def import_graph() -> dict:
  files = {_module_name(p): p for p in PKG.rglob("*.py")}
  modules = set(files)
  return {m: _imports(p, modules) - {m} for m, p in files.items()}


def find_cycle(graph: dict):
  state, stack = {}, []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for n in sorted(graph.get(m, ())):
      if n.startswith(m + "."):  # a package importing its own submodule is not a circle
        continue
      if state.get(n) == 1:
        return stack[stack.index(n) :] + [n]
      if n not in state:
        found = visit(n)
        if found:
          return found
    stack.pop()
    state[m] = 2
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def test_no_import_cycles():
  graph = import_graph()
  assert len(graph) > 30
  cycle = find_cycle(graph)
  assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_config_built_modules_take_every_setting_from_the_schema():
  """A module built from a config section has no setting of its own: each of its fields is either
  a key of that schema section (so the config value is always passed) or wiring the parent sets
  (channels, axis_name, dtype, ...). A new field with a default that the schema lacks fails here."""
  import dataclasses

  from cn2_jax.config import base_config
  from cn2_jax.modeling.proposal.centernet import CenterNet
  from cn2_jax.modeling.roi_heads.cascade import CascadeROIHeads

  m = base_config().model
  wiring = {
      "parent",
      "name",
      "axis_name",
      "dtype",
      "channels",
      "num_classes",
      "strides",
      "min_level",
  }
  for cls, section in ((CenterNet, m.centernet), (CascadeROIHeads, m.roi_heads)):
    fields = {f.name for f in dataclasses.fields(cls)}
    missing_in_schema = fields - set(section.keys()) - wiring
    assert not missing_in_schema, (cls.__name__, sorted(missing_in_schema))
    unknown_to_module = set(section.keys()) - fields
    assert not unknown_to_module, (cls.__name__, sorted(unknown_to_module))
