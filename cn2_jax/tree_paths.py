"""'.'-joined names of pytree key paths (jax.tree_util key entries: DictKey, GetAttrKey, SequenceKey,
FlattenedIndexKey), shared by the optimizer's parameter groups and the weight mappings."""

from __future__ import annotations


def key_str(k) -> str:
  """The name of one key-path entry: `.key` (dicts), `.name` (attributes) or `.idx` (sequences)."""
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_str(key_path) -> str:
  """'.'-joined variable path (the detectron2 state-dict key convention of docs/DESIGN.md)."""
  return ".".join(key_str(k) for k in key_path)
