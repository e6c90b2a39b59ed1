"""Package structure: no import circles in cn2_jax (module-level or inside functions); the config
schema is the one source of settings (no defaults outside it, no undeclared key read)."""

from __future__ import annotations

import ast
import re
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


# ----------------------------------------------------------------------------------------------
# Imports inside functions say why they are not at the module top.
# ----------------------------------------------------------------------------------------------
# Files (relative to the repository) whose function-level imports do not all say why yet. This
# set may only shrink: a file that passes must leave it (the test below fails on stale entries).
_IMPORTS_TO_REVIEW: set = set()
_NOQA = re.compile(r"noqa(:\s*[A-Z]+[0-9]+(\s*,\s*[A-Z]+[0-9]+)*)?")


def _says_why(line: str) -> bool:
  """Whether `line` has a comment with words besides `noqa` codes."""
  if "#" not in line:
    return False
  return re.search(r"[A-Za-z]", _NOQA.sub("", line.split("#", 1)[1])) is not None


def unexplained_function_imports(source: str) -> list:
  """Line numbers of the imports inside functions of `source` that have no reason: a comment on
  one of their lines, or on the line above them or above the run of imports they end."""
  lines = source.splitlines()
  found = set()
  for fn in ast.walk(ast.parse(source)):
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
      continue
    for node in ast.walk(fn):
      for body in (getattr(node, f, None) for f in ("body", "orelse", "finalbody")):
        if not isinstance(body, list):
          continue
        covered = False  # by the comment above a run of adjacent imports
        for i, stmt in enumerate(body):
          if not isinstance(stmt, (ast.Import, ast.ImportFrom)):
            covered = False
            continue
          adjacent = i > 0 and body[i - 1].end_lineno == stmt.lineno - 1
          if not (covered and adjacent):
            above = lines[stmt.lineno - 2].strip() if stmt.lineno > 1 else ""
            covered = above.startswith("#") and _says_why(above)
          own = any(_says_why(lines[n - 1]) for n in range(stmt.lineno, stmt.end_lineno + 1))
          if not (own or covered):
            found.add(stmt.lineno)
  return sorted(found)


def test_import_reason_finder():
  source = """
import os


def f():
  import json
  # start-up time: heavy
  import a
  import b

  import c  # optional extra
  import d  # noqa: PLC0415
  # noqa: F401
  import e
  if os:
    from g import (  # import cycle: g -> here
        h,
    )
"""
  assert unexplained_function_imports(source) == [6, 12, 14]


def test_function_level_imports_say_why():
  """Imports sit at the module top unless an optional extra, start-up time or an import cycle
  needs them inside a function; then a comment says which (issue 22, item 7)."""
  root = PKG.parent
  missing = {}
  for path in sorted(PKG.rglob("*.py")):
    rel = path.relative_to(root).as_posix()
    lines = unexplained_function_imports(path.read_text())
    if lines and rel not in _IMPORTS_TO_REVIEW:
      missing[rel] = lines
  assert not missing, f"function-level imports without a reason (file: lines): {missing}"
  stale = sorted(
      rel
      for rel in _IMPORTS_TO_REVIEW
      if not (root / rel).is_file() or not unexplained_function_imports((root / rel).read_text())
  )
  assert not stale, f"remove from _IMPORTS_TO_REVIEW (they pass now): {stale}"


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
      "size_divisibility",
      "remat",  # model.remat, which the detector passes on
      "cascade",  # from the registered model.roi_heads.name
  }
  for cls, section in ((CenterNet, m.centernet), (CascadeROIHeads, m.roi_heads)):
    fields = {f.name for f in dataclasses.fields(cls)}
    missing_in_schema = fields - set(section.keys()) - wiring
    assert not missing_in_schema, (cls.__name__, sorted(missing_in_schema))
    unknown_to_module = set(section.keys()) - fields
    assert not unknown_to_module, (cls.__name__, sorted(unknown_to_module))


def test_centernet2_family_has_no_setting_defaults():
  """The schema is the only place a default lives: the CenterNet2 modules and the functions they
  call with settings take every setting explicitly. A default is allowed only as None ("not
  given": axis_name, optional inputs such as masks) or for a pure performance knob."""
  import dataclasses
  import inspect

  from cn2_jax.modeling.backbone import fpn, resnet
  from cn2_jax.modeling.meta_arch.centernet2 import CenterNet2
  from cn2_jax.modeling.ops import boxes, roi_align
  from cn2_jax.modeling.proposal import centernet, centernet_head, decode, losses, targets
  from cn2_jax.modeling.roi_heads import box_head, cascade

  modules = (
      CenterNet2,
      fpn.FPN,
      fpn.LastLevelP6P7_P5,
      resnet.ResNet,
      resnet.ResNetStage,
      resnet.BottleneckBlock,
      resnet.BasicBlock,
      resnet.BasicStem,
      centernet.CenterNet,
      centernet_head.CenterNetHead,
      cascade.CascadeROIHeads,
      box_head.FastRCNNConvFCHead,
      box_head.FastRCNNOutputLayers,
  )
  bad = []
  performance_fields = {"ResNet": {"remat"}}  # memory for compute, values unchanged
  for cls in modules:
    for f in dataclasses.fields(cls):
      if f.name in ("parent", "name") or f.name in performance_fields.get(cls.__name__, ()):
        continue
      factory = f.default_factory is not dataclasses.MISSING
      if factory or (f.default is not dataclasses.MISSING and f.default is not None):
        bad.append(f"{cls.__name__}.{f.name} = {f.default!r}")
  functions = (
      targets.centernet_targets,
      losses.centernet_losses,
      losses.loss_normalisers,
      decode.generate_proposals,
      cascade.probabilistic_scores,
      cascade.fast_rcnn_inference,
      boxes.encode_boxes,
      boxes.decode_boxes,
      roi_align.roi_align,
      roi_align.multilevel_roi_align,
      roi_align.assign_boxes_to_levels,
      roi_align.required_adaptive_samples,
  )
  performance_knobs = {"generate_proposals": {"nms_tile_size"}}
  for fn in functions:
    for name, p in inspect.signature(fn).parameters.items():
      if p.default is inspect.Parameter.empty or p.default is None:
        continue
      if name not in performance_knobs.get(fn.__name__, ()):
        bad.append(f"{fn.__module__}.{fn.__name__}({name}={p.default!r})")
  assert not bad, "settings with a default outside cn2_jax/config.py:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------------------------
# Config reads: every key the code reads is declared in the schema.
# ----------------------------------------------------------------------------------------------
# A name holds a config (a ConfigDict or its `model_kwargs` dict view) when it is called like one
# (`cfg`, `config`, `model_config`, `optim_cfg`, `self.cfg`, `runner.config`, ...), is the result
# of a config factory, or is assigned from a config expression (`d = cfg.data`, `cn = m.centernet`,
# `m = model_kwargs(self.config)`, `r = cfg.model["roi_heads"]`).
_CONFIG_NAME = re.compile(r"^_?([a-z0-9]+_)*(cfg|config)$")
_CONFIG_ATTRS = ("cfg", "config")  # `self.cfg`, `runner.config` (not `self.builder_config`)
_CONFIG_FACTORIES = {
    "base_config",
    "get_config",
    "validate_config",
    "load_config_file",
    "config_from_json",
}
_CONFIG_VIEWS = {"model_kwargs", "FrozenConfigDict", "ConfigDict", "dict"}  # same keys as the arg
_FUNCTION_NODES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def _configdict_api() -> set:
  import ml_collections

  return set(dir(ml_collections.ConfigDict)) | set(dir(ml_collections.FrozenConfigDict))


class ConfigReadScanner:
  """Collects the key chains read (or written) through config objects in a module's source.

  Each chain is relative to an unknown section: `self.config.centernet.min_radius` in the
  detector (whose `config` is `config.model`) and `cfg.model.centernet.min_radius` in the app are
  both checked against the schema, by finding a section where the chain exists."""

  def __init__(self, source: str, skip_functions=()):
    self.tree = ast.parse(source)
    self.skip_functions = set(skip_functions)
    self.modules = set()
    for node in ast.walk(self.tree):
      if isinstance(node, ast.Import):
        self.modules |= {(a.asname or a.name).split(".")[0] for a in node.names}
      elif isinstance(node, ast.ImportFrom):
        self.modules |= {a.asname or a.name for a in node.names}
    self.api = _configdict_api()
    self.reads = []  # (line, chain of keys)

  def scan(self) -> list:
    body = [
        n
        for n in self.tree.body
        if not (isinstance(n, ast.FunctionDef) and n.name in self.skip_functions)
    ]
    self._scope(body, {})
    return self.reads

  def chain(self, node, aliases):
    """The key chain `node` reads from a config object, () for the object itself, None if `node`
    is not (or not statically known to be) a config read."""
    if isinstance(node, ast.Name):
      if node.id in aliases:
        return aliases[node.id]
      if _CONFIG_NAME.match(node.id) and node.id not in self.modules:
        return ()
      return None
    if isinstance(node, ast.Attribute):
      base = self.chain(node.value, aliases)
      if base is None:
        module = isinstance(node.value, ast.Name) and node.value.id in self.modules
        return () if node.attr in _CONFIG_ATTRS and not module else None  # `jax.config` is not
      return None if node.attr in self.api else base + (node.attr,)  # `.get`, `.to_dict`, ...
    if isinstance(node, ast.Subscript):
      base = self.chain(node.value, aliases)
      key = node.slice
      if base is not None and isinstance(key, ast.Constant) and isinstance(key.value, str):
        return base + (key.value,)
      return None  # a computed key: not checked statically (ConfigDict raises at run time)
    if isinstance(node, ast.Call):
      f = node.func
      name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
      if name in _CONFIG_VIEWS and node.args:
        return self.chain(node.args[0], aliases)
      if name == "to_dict" and isinstance(f, ast.Attribute):
        return self.chain(f.value, aliases)
      return () if name in _CONFIG_FACTORIES else None
    return None

  @staticmethod
  def _own_nodes(nodes):
    """The nodes of a scope, not descending into nested functions and classes."""
    stack = list(nodes)
    while stack:
      n = stack.pop()
      yield n
      if not isinstance(n, _FUNCTION_NODES + (ast.ClassDef,)):
        stack.extend(ast.iter_child_nodes(n))

  def _scope(self, nodes, aliases, params=()):
    aliases = {k: v for k, v in aliases.items() if k not in params}  # shadowed by a parameter
    own = list(self._own_nodes(nodes))
    for _ in range(3):  # aliases of aliases, whatever the statement order
      for n in own:
        if isinstance(n, ast.Assign):
          c = self.chain(n.value, aliases)
          if c is not None:
            aliases.update({t.id: c for t in n.targets if isinstance(t, ast.Name)})
    for n in own:
      if isinstance(n, (ast.Attribute, ast.Subscript)):
        c = self.chain(n, aliases)
        if c:
          self.reads.append((n.lineno, c))
      elif isinstance(n, _FUNCTION_NODES):
        a = n.args
        names = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs}
        names |= {x.arg for x in (a.vararg, a.kwarg) if x is not None}
        body = n.body if isinstance(n.body, list) else [n.body]
        extra = a.defaults + [d for d in a.kw_defaults if d is not None]
        self._scope(body + extra + list(getattr(n, "decorator_list", [])), aliases, names)
      elif isinstance(n, ast.ClassDef):
        self._scope(n.body + n.decorator_list, aliases)


def _schema_index(cfg):
  """(every path, the group paths) of a ConfigDict, as tuples of keys (() = the root)."""
  import ml_collections

  paths, groups = {()}, {()}

  def walk(c, prefix):
    for k in c.keys():
      p = prefix + (k,)
      paths.add(p)
      if isinstance(c[k], ml_collections.ConfigDict):
        groups.add(p)
        walk(c[k], p)

  walk(cfg, ())
  return paths, groups


def undeclared_config_reads(source: str, schema, skip_functions=()) -> list:
  """`'line: a.b.c'` for each config read in `source` whose keys the schema lacks."""
  paths, groups = _schema_index(schema)

  def declared(chain):
    for g in groups:
      for i in range(1, len(chain) + 1):
        p = g + chain[:i]
        if p not in paths:
          break
        if p not in groups:  # a value: what follows (`.split`, `[0]`) is the value's own
          return True
      else:
        return True
    return False

  reads = ConfigReadScanner(source, skip_functions).scan()
  return [f"{ln}: {'.'.join(c)}" for ln, c in sorted(set(reads)) if not declared(c)]


def _config_reading_sources():
  root = PKG.parent
  files = sorted(PKG.rglob("*.py")) + [root / "main.py"] + sorted((root / "configs").glob("*.py"))
  for path in files:
    yield path, path.read_text(), ()


def test_every_config_read_is_declared_in_the_schema():
  """Every config key the code reads or sets is declared in `cn2_jax.config.base_config()`.

  Static (AST) scan of cn2_jax/, main.py and configs/, chosen over a run-time recording proxy
  because it sees every branch (train, eval, predict, conversion, each family, error paths) without
  running them; a proxy only sees the reads of the code a test happens to execute. The scanner
  (`ConfigReadScanner`) follows config objects by name (`cfg`, `config`, `model_config`,
  `self.cfg`, ...), through config factories (`base_config()`, `get_config()`, ...), dict views
  (`model_kwargs(...)`) and local aliases (`d = cfg.data; d.root`, `m["centernet"]["soi"]`),
  attribute and constant-subscript reads alike. Because a function may hold any section
  (`CenterNet2.config` is `config.model`, `make_lr_schedule(cfg)` gets `config.optim`), a chain is
  declared when it exists below some group of the schema (`data.root` below the root,
  `centernet.soi` below `model`); at a value the chain ends (`images.split`).
  Not checked statically: computed keys (`cfg[name]`, `getattr(cfg, name)`) and a section handed
  over under an unrelated name; ConfigDict raises on those at run time, and `validate_config`
  rejects undeclared keys in config files and on the command line.
  """
  from cn2_jax.config import base_config

  schema = base_config()
  keys = {p[-1] for p in _schema_index(schema)[0] if p}
  assert not keys & _configdict_api(), "a schema key named like a ConfigDict method is not scanned"
  total, bad = 0, []
  for path, source, skip in _config_reading_sources():
    total += len(ConfigReadScanner(source, skip).scan())
    bad += [
        f"{path.relative_to(PKG.parent)}:{r}" for r in undeclared_config_reads(source, schema, skip)
    ]
  assert total > 300, f"the scan found only {total} config reads: is it still following them?"
  assert not bad, "config keys read but not declared in cn2_jax/config.py:\n" + "\n".join(bad)


def test_config_read_scanner_flags_undeclared_keys():
  """The scan can fail: misspelled or missing keys in each form it follows are reported, the
  declared ones and non-config objects are not."""
  from cn2_jax.config import base_config

  source = """
import jax
from cn2_jax.config import base_config, model_kwargs

def train(cfg):
  ok = cfg.model.centernet.min_radius + cfg.data.max_size_train + cfg.predict.images.count(",")
  bad = cfg.model.nonexistent

class Detector:
  def setup(self):
    m = model_kwargs(self.config)
    ok = m["centernet"]["soi"], self.config.roi_heads.fc_dim, m["dtype"]
    bad = m["centernet"]["min_radus"]

def loop(runner, args):
  d = runner.cfg.data
  bad = d.roots
  tc = base_config().train
  tc.log_everry = 5  # a write to an undeclared key
  ok = jax.config.read("jax_enable_x64"), args.learning_rate, d.get("anything")
"""
  bad = undeclared_config_reads(source, base_config())
  assert bad == [
      "7: model.nonexistent",
      "13: centernet.min_radus",
      "17: data.roots",
      "19: train.log_everry",
  ], bad
  assert (
      undeclared_config_reads("def f(cfg):\n  return cfg.model.fpn_channels\n", base_config()) == []
  )


# ------------------------------------------------------------------------------------------------
# Documentation citations: the code cites the repository's own docs (docs/*.md), never documents
# outside the repository.

ROOT = PKG.parent
DOCS = ROOT / "docs"
# Forbidden in the package, main.py and configs/: the old citation forms of documents that a clone
# does not have.
FORBIDDEN_CITATIONS = (
    re.compile(r"spec §", re.IGNORECASE),
    re.compile(r"centernet2_spec", re.IGNORECASE),
    re.compile(r"centerx_spec", re.IGNORECASE),
    re.compile(r"shared/docs"),
)
_SECTION = r"\d+(?:\.\d+)*"
# `docs/<name>.md §N`, optionally continued by a list / range of sections: "§3.1-§3.3, §3.5",
# "§2.2 and §5.5", "§5.1-5.2".
_DOC_CITATION = re.compile(
    rf"docs/([\w-]+)\.md((?:\s*(?:,|-|–|and)?\s*§{_SECTION}(?:\s*[-–]\s*§?{_SECTION})?)+)"
)


def cited_source_files() -> list:
  """The files whose citations must point into docs/: the package (except its testing oracles),
  main.py and configs/."""
  files = [p for p in PKG.rglob("*.py") if "testing" not in p.relative_to(PKG).parts[:1]]
  files += [ROOT / "main.py"] + sorted((ROOT / "configs").rglob("*.py"))
  return sorted(files)


def doc_citations(text: str) -> list:
  """`[(doc name, section), ...]` of every `docs/<name>.md §N` citation in `text` (each section of
  a list or range separately)."""
  out = []
  for m in _DOC_CITATION.finditer(text):
    out += [(m.group(1), s) for s in re.findall(_SECTION, m.group(2))]
  return out


def doc_sections(path: Path) -> set:
  """Section numbers of the markdown headings of `path` ("## 3. Targets" -> "3", "### 3.4 X" ->
  "3.4")."""
  return set(re.findall(rf"^#+ ({_SECTION})\.?\s", path.read_text(), re.MULTILINE))


def unresolved_citations(citations, docs_dir: Path = DOCS) -> list:
  """The `(doc, section)` pairs whose docs file is missing or has no heading with that number."""
  sections = {}
  bad = []
  for doc, sec in citations:
    path = docs_dir / f"{doc}.md"
    if doc not in sections:
      sections[doc] = doc_sections(path) if path.is_file() else None
    if sections[doc] is None:
      bad.append(f"docs/{doc}.md (no such file) §{sec}")
    elif sec not in sections[doc]:
      bad.append(f"docs/{doc}.md has no section §{sec}")
  return bad


def test_code_cites_no_document_outside_the_repository():
  files = cited_source_files()
  assert len(files) > 50, [str(p) for p in files]
  found = []
  for path in files:
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
      if any(p.search(line) for p in FORBIDDEN_CITATIONS):
        found.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
  assert not found, "citations of documents outside the repository:\n" + "\n".join(found)


def test_every_doc_citation_names_an_existing_section():
  total, bad = 0, []
  for path in cited_source_files():
    cites = doc_citations(path.read_text())
    total += len(cites)
    bad += [f"{path.relative_to(ROOT)}: {b}" for b in unresolved_citations(cites)]
  assert total > 30, f"only {total} docs/<name>.md §N citations found: is the scan still working?"
  assert not bad, "citations without a matching docs section:\n" + "\n".join(bad)


def test_docs_cross_references_resolve():
  """Links between the docs ("[training.md §1.4](training.md)") name existing sections."""
  cites = []
  for path in sorted(DOCS.glob("*.md")):
    cites += re.findall(rf"\[([\w-]+)\.md §({_SECTION})\]", path.read_text())
  assert len(cites) > 10, cites
  assert not unresolved_citations(cites)


def test_citation_scanner_can_fail():
  """The parser finds lists and ranges, and a wrong file or section is reported."""
  text = (
      "targets (docs/centernet2.md §3.1-§3.3, §3.5 and §3.7); norm (docs/onestage.md §2.2 and\n"
      "§5.5); see docs/training.md §2). Not a citation: docs/DESIGN.md, spec section 3."
  )
  assert doc_citations(text) == [
      ("centernet2", "3.1"),
      ("centernet2", "3.3"),
      ("centernet2", "3.5"),
      ("centernet2", "3.7"),
      ("onestage", "2.2"),
      ("onestage", "5.5"),
      ("training", "2"),
  ]
  assert unresolved_citations(doc_citations(text)) == []
  assert unresolved_citations([("centernet2", "99.1"), ("no_such_doc", "1")]) == [
      "docs/centernet2.md has no section §99.1",
      "docs/no_such_doc.md (no such file) §1",
  ]
  assert any(p.search("see Spec §5 (pooler)") for p in FORBIDDEN_CITATIONS)
  assert any(p.search("../shared/docs/centerx_spec.md") for p in FORBIDDEN_CITATIONS)


# ---------------------------------------------------------------------------------------------
# Registries: a family or dataset is named only where it is registered
# ---------------------------------------------------------------------------------------------
# A comparison with a family / dataset kind, or a table keyed by one, is a branch that belongs in
# that family's or dataset's registry entry (modeling/meta_arch/, data/datasets/).
# ("centernet", the official one-stage family, is left out: the same word is a value of centerX
# settings, onestage.head_init and the augmentation style, which are not family branches.)
_REGISTERED_NAMES = {"centernet2", "onestage", "coco/2017", "coco_json"} | {
    "synthetic",
    "crowdhuman",
    "wider_face",
    "voc",
    "image_folder",
    "lvis_v1",
    "objects365",
}
_REGISTRY_HOMES = ("modeling/meta_arch/", "data/datasets/", "data/catalog.py", "testing/")
# Branches not moved into a registry yet (issue 22): this list may only shrink. Each entry is
# (file: number of branching expressions).
_KNOWN_BRANCHES = {}


def _named(node) -> bool:
  if isinstance(node, ast.Constant):
    return node.value in _REGISTERED_NAMES
  if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
    return any(_named(e) for e in node.elts)
  return False


def _family_branches(source: str):
  """(line, expression) of each comparison with a registered family / dataset name, and of each
  dict literal keyed by one."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Compare) and any(_named(n) for n in [node.left, *node.comparators]):
      found.append((node.lineno, ast.unparse(node)))
    elif isinstance(node, ast.Dict) and any(k is not None and _named(k) for k in node.keys):
      found.append((node.lineno, ast.unparse(node)[:80]))
  return found


def test_family_and_dataset_branches_live_in_their_registries():
  found = {}
  for path in sorted(PKG.rglob("*.py")):
    rel = path.relative_to(PKG).as_posix()
    if rel.startswith(_REGISTRY_HOMES):
      continue
    branches = _family_branches(path.read_text())
    if branches:
      found[rel] = branches
  new = {f: b for f, b in found.items() if len(b) > _KNOWN_BRANCHES.get(f, 0)}
  assert not new, f"family / dataset branches outside the registries: {new}"
  shrunk = {
      f: len(found.get(f, ())) for f, n in _KNOWN_BRANCHES.items() if len(found.get(f, ())) < n
  }
  assert not shrunk, f"fewer branches than _KNOWN_BRANCHES says: lower it to {shrunk}"


def test_branch_scanner_can_fail():
  assert _family_branches('if cfg.model.arch == "onestage":\n  pass\n')
  assert _family_branches('TABLE = {"centernet2": 1}\n')
  assert _family_branches('if part.dataset == "crowdhuman":\n  pass\n')
  assert not _family_branches('x = catalog.get(part.dataset).labelled  # dataset == "voc"\n')
  assert not _family_branches('"""A docstring: data.dataset == "voc"."""\n')
