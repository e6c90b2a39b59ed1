"""Model weights for eval, predict and initialisation: which file or run `--config.weights` means,
reading it onto the model's variables, and a one-line error naming the config field when a
checkpoint does not fit the model.

  load_weights_file(path, variables)    official .pkl/.pth, a converted Orbax dir, a run or one
                                        of its checkpoints -> {'params', 'frozen'}
  restore_model_variables(cfg, workdir) `cfg.weights` if set, else the run's newest checkpoint
  weights_run_dir / latest_checkpoint_dir / orbax_weights_dir   locating runs and checkpoints
  check_weights_fit                      shape check before any Orbax restore
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Optional

import jax
import numpy as np
from etils import epath

from cn2_jax.config import family_reads, get_field, jsonable, show_value
from cn2_jax.errors import InputFileError, WeightsError, one_line
from cn2_jax.modeling import detector
from cn2_jax.modeling import meta_arch
from cn2_jax.weights.reader import load_checkpoint_file

# The model's variable collections a checkpoint or weights file carries (docs/DESIGN.md).
VARIABLE_COLLECTIONS = ("params", "frozen", "batch_stats")

log = logging.getLogger(__name__)


def _run_of_step(step_dir: str) -> Optional[str]:
  ckpts = os.path.dirname(step_dir)
  return os.path.dirname(ckpts) if os.path.basename(ckpts) == "checkpoints" else None


def weights_run_dir(path: str) -> Optional[str]:
  """The run directory that `--config.weights=path` belongs to (the path itself, its parent for
  `checkpoints/`, its grandparent for `checkpoints/<step>`, ...), or None (a file, a converted
  Orbax directory)."""
  abs_path = os.path.abspath(path)
  if os.path.isdir(os.path.join(abs_path, "checkpoints")):
    return abs_path
  if os.path.basename(abs_path) == "checkpoints" and os.path.isdir(abs_path):
    return os.path.dirname(abs_path)
  if os.path.basename(abs_path).isdigit() and os.path.isdir(os.path.join(abs_path, "default")):
    return _run_of_step(abs_path)
  if (
      os.path.basename(abs_path) == "default"
      and os.path.basename(os.path.dirname(abs_path)).isdigit()
  ):
    return _run_of_step(os.path.dirname(abs_path))
  return None


def latest_checkpoint_dir(run: str) -> Optional[str]:
  """The Orbax item directory of the run's newest finished checkpoint, or None."""
  if not os.path.isdir(os.path.join(run, "checkpoints")):
    return None
  # Start-up time: orbax (~0.3 s) only once a checkpoint is read (the Predictor imports this).
  from cn2_jax.engine import checkpoint as ckpt_lib

  with ckpt_lib.Checkpointer(run) as ckpt:
    step = ckpt.latest_step()
    return None if step is None else os.path.join(ckpt.directory, str(step), "default")


def orbax_weights_dir(path: str) -> str:
  """The Orbax directory to read for `--config.weights=DIR`: a run directory or its
  `checkpoints/` folder (newest checkpoint), a `checkpoints/<step>` folder, or an Orbax directory
  as written by `python -m cn2_jax.convert`."""
  abs_path = os.path.abspath(path)
  if os.path.basename(abs_path).isdigit() and os.path.isdir(os.path.join(abs_path, "default")):
    return os.path.join(abs_path, "default")
  run = weights_run_dir(abs_path)
  if run is not None and os.path.basename(abs_path) != "default":
    item = latest_checkpoint_dir(run)
    if item is None:
      raise WeightsError(f"{path}: no finished checkpoint in {os.path.join(run, 'checkpoints')}")
    return item
  return abs_path


def _tree_shapes(tree, collections=VARIABLE_COLLECTIONS) -> dict:
  """{'params/backbone/fpn_lateral3/kernel': shape, ...} of the model collections of `tree`."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      {coll: tree[coll] for coll in collections if coll in tree}
  )[0]:
    key = "/".join(str(getattr(entry, "key", getattr(entry, "idx", entry))) for entry in path)
    out[key] = tuple(int(dim) for dim in leaf.shape)
  return out


def _implied_model_fields(shapes: dict) -> dict:
  """Values of the shape-defining model fields as the checkpoint's shapes imply them."""
  out = {}
  lateral = shapes.get("params/backbone/fpn_lateral3/kernel")
  if lateral:
    out["fpn_channels"] = lateral[-1]
  # the first cascade stage (box_predictor.0) or the one stage of CustomROIHeads (box_predictor)
  cls_bias = shapes.get("params/roi_heads/box_predictor.0/cls_score/bias") or shapes.get(
      "params/roi_heads/box_predictor/cls_score/bias"
  )
  if cls_bias:
    out["num_classes"] = cls_bias[0] - 1  # + background
  fc1 = shapes.get("params/roi_heads/box_head.0/fc1/kernel") or shapes.get(
      "params/roi_heads/box_head/fc1/kernel"
  )
  if fc1:
    out["roi_heads.fc_dim"] = fc1[-1]
    if lateral:  # fc1 reads the pooled [C, R, R] features of the FPN channels
      res = math.isqrt(fc1[0] // lateral[-1])
      if res * res * lateral[-1] == fc1[0]:
        out["roi_heads.pooler_resolution"] = res
  stem = shapes.get("params/backbone/bottom_up/stem/conv1/kernel")
  if stem:
    out["resnet_width"] = stem[-1]

  def count(pattern):  # distinct indices of the numbered modules matching `pattern`
    return len({m.group(1) for p in shapes if (m := re.fullmatch(pattern, p))})

  tower = count(r"params/proposal_generator/centernet_head/bbox_tower\.(\d+)/kernel")
  if tower:
    out["centernet.num_convs"] = tower
  num_fc = count(r"params/roi_heads/box_head(?:\.0)?/fc(\d+)/kernel")
  if num_fc:
    out["roi_heads.num_fc"] = num_fc
  res4 = count(r"(?:params|frozen)/backbone/bottom_up/res4/(\d+)/.*")
  bottleneck = any("/bottom_up/res4/0/conv3/" in path for path in shapes)
  depth = {(2, False): 18, (6, False): 34, (6, True): 50, (23, True): 101}.get((res4, bottleneck))
  if depth:
    out["resnet_depth"] = depth
  if any(path.startswith("frozen/backbone/bottom_up/stem/conv1/norm/") for path in shapes):
    out["resnet_norm"] = "FrozenBN"
  elif "params/backbone/bottom_up/stem/conv1/norm/scale" in shapes:
    out["resnet_norm"] = "GN"
  return out


def fields_of_path(arch: str, name: str) -> str:
  """The config fields that shape the variable `name` ('/'-joined) of family `arch` (its
  registry entry's `weights.fields_by_path`; first match)."""
  table = meta_arch.family(arch).weights.fields_by_path
  return next((f for key, f in table if key in f"/{name}"), "the model fields")


def check_weights_fit(saved: dict, expected: dict, source: str, model_cfg=None) -> None:
  """Raises a one-line WeightsError when the variable shapes `saved` (of a checkpoint) do not fit
  `expected` (of the model), naming the first offending parameter and the config field(s) that
  explain it (values read off the checkpoint, compared with `model_cfg`)."""
  mismatched = [
      (path, saved[path], shape)
      for path, shape in expected.items()
      if path in saved and saved[path] != shape
  ]
  missing = [path for path in expected if path not in saved]
  extra = [path for path in saved if path not in expected]
  problems = len(mismatched) + len(missing) + len(extra)
  if not problems:
    return
  if mismatched:
    first, in_ckpt, in_model = mismatched[0]
    what = f"{first} is {in_ckpt} in the checkpoint but {in_model} in the model"
  elif missing:
    first = missing[0]
    what = f"{first} is missing from the checkpoint"
  else:
    first = extra[0]
    what = f"the checkpoint has {first}, which the model does not"
  more = f" (and {problems - 1} more)" if problems > 1 else ""
  implied = _implied_model_fields(saved)
  differ, fixes = [], []
  if model_cfg is not None:
    for field, value in implied.items():
      have = get_field(model_cfg, field)
      if jsonable(have) != jsonable(value):
        differ.append(
            f"model.{field}={show_value(value)} (this config: {show_value(jsonable(have))})"
        )
        fixes.append(f"--config.model.{field}={show_value(value)}")
  if differ:
    hint = f"it was trained with {', '.join(differ)}: use {' '.join(fixes)}"
  else:
    arch = model_cfg.arch if model_cfg is not None else "centernet2"
    hint = f"check {fields_of_path(arch, first)}"
  raise WeightsError(f"{source} does not fit the model of this config: {what}{more}; {hint}")


def checkpoint_metadata_tree(path: str, source: str):
  """The tree metadata of an Orbax directory (shapes and dtypes; no array is read)."""
  import orbax.checkpoint as ocp  # start-up time, as in latest_checkpoint_dir

  try:
    # The handler (not a Checkpointer) reads the tree metadata without warning that a
    # checkpoint item has no step metadata of its own.
    meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path))
  except Exception as e:  # noqa: BLE001 - anything unreadable is the same user error
    raise WeightsError(
        f"{source}: cannot read it as an Orbax checkpoint (expected a run "
        f"directory, its checkpoints/<step> folder, or a directory written by "
        f"`python -m cn2_jax.convert`): {one_line(e)}"
    ) from e
  return getattr(meta, "tree", meta)


def _checkpoint_shapes(path: str, source: str) -> dict:
  """`_tree_shapes` of an Orbax directory, from its metadata (no array is read)."""
  return _tree_shapes(checkpoint_metadata_tree(path, source))


def check_checkpoint_fits(path: str, expected: dict, source: str, model_cfg=None) -> None:
  """One-line WeightsError unless the Orbax checkpoint at `path` has `expected`'s shapes."""
  check_weights_fit(_checkpoint_shapes(path, source), _tree_shapes(expected), source, model_cfg)


def restore_orbax_variables(
    path: str, expected: dict, *, source: Optional[str] = None, model_cfg=None
) -> dict:
  """`{'params', 'frozen'}` (numpy) from an Orbax directory (a TrainState checkpoint item or a
  converted model), after checking its shapes against `expected` (abstract variables)."""
  import orbax.checkpoint as ocp  # start-up time, as in latest_checkpoint_dir

  source = source or path
  check_weights_fit(_checkpoint_shapes(path, source), _tree_shapes(expected), source, model_cfg)
  item = {coll: expected[coll] for coll in VARIABLE_COLLECTIONS if coll in expected}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  # partial_restore: a TrainState checkpoint also holds the step, rng and optimizer state.
  with ocp.PyTreeCheckpointer() as ckptr:
    return ckptr.restore(
        path,
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
    )


def load_weights_file(path: str, variables: dict, *, backbone_only: bool, model_cfg=None) -> dict:
  """Official .pkl/.pth (detectron2/CenterNet2, MSRA R-50, torchvision R-50) or an Orbax directory
  (`orbax_weights_dir`: a run, one of its checkpoints, or the output of `python -m
  cn2_jax.convert`), mapped onto `variables` (strict; see convert.py). `variables` may be abstract
  (ShapeDtypeStruct) unless `backbone_only`, which keeps the rest."""
  if os.path.isdir(path):
    if backbone_only:
      raise WeightsError(
          f"{path}: backbone-only initialisation reads an ImageNet .pkl/.pth file "
          f"(R-50.pkl or resnet50-*.pth), not an Orbax directory"
      )
    return restore_orbax_variables(
        orbax_weights_dir(path), variables, source=path, model_cfg=model_cfg
    )
  arch = model_cfg.arch if model_cfg is not None else "centernet2"
  variables, report = convert_state_dict(
      load_checkpoint_file(path), variables, backbone_only=backbone_only, arch=arch
  )
  log.info("loaded %s: %s", path, report.summary())
  return variables


def convert_state_dict(sd, variables: dict, *, backbone_only: bool, arch: str):
  """An official state dict (as read by `load_checkpoint_file`) mapped onto `variables` by the
  converter of the family `arch` (its registry entry's `weights.convert`). Returns (variables,
  the converter's report)."""
  return meta_arch.family(arch).weights.convert(sd, variables, backbone_only=backbone_only)


def _warn_inexact_official_eval(cfg) -> None:
  """Official weights are only reproduced with the official (adaptive) ROIAlign sampling; any
  padding is exact (modeling/canvas.py)."""
  roi_heads = cfg.model.roi_heads
  if (
      family_reads(cfg.model.arch, "model.roi_heads.sampling_ratio")
      and roi_heads.sampling_ratio != 0
  ):
    log.warning(
        "--config.weights with model.roi_heads.sampling_ratio=%d: ROIAlign samples a "
        "fixed grid, so detections differ from the official model's (use 0, the "
        "default, to reproduce them)",
        roi_heads.sampling_ratio,
    )


def restore_model_variables(cfg, workdir: str) -> dict:
  """Model variables for eval/predict: `cfg.weights` if set, else the workdir's latest checkpoint.
  A checkpoint of one of our runs (the workdir's, or `cfg.weights` naming a run / checkpoint)
  gives its EMA weights when `ema.use_for_eval` and `ema.decay > 0`. A checkpoint that does not fit the config's model is a one-line WeightsError naming the
  field(s) responsible."""
  abstract = detector.abstract_variables(cfg.model)
  if cfg.weights:
    if weights_run_dir(cfg.weights) is None:  # official or converted weights, not one of our runs
      _warn_inexact_official_eval(cfg)
      return load_weights_file(cfg.weights, abstract, backbone_only=False, model_cfg=cfg.model)
    item = orbax_weights_dir(cfg.weights)  # a checkpoint of one of our runs: EMA rule below
    source = f"--config.weights {cfg.weights}"
  else:
    item = latest_checkpoint_dir(workdir)
    if item is None:
      raise InputFileError(
          f"No checkpoint in {workdir}/checkpoints and no --config.weights: "
          f"train first or pass weights"
      )
    source = f"checkpoint {os.path.dirname(item)}"
  variables = restore_orbax_variables(item, abstract, model_cfg=cfg.model, source=source)
  from cn2_jax.engine import swa as swa_lib  # start-up time: orbax and optax (the Predictor)

  if "ema" in cfg and swa_lib.use_ema_for_eval(cfg):  # the EMA weights (config ema.use_for_eval)
    variables = swa_lib.restore_ema_variables(item, variables)
    log.info("restored %s (EMA weights)", os.path.dirname(item))
    return variables
  log.info("restored %s", os.path.dirname(item))
  return variables
