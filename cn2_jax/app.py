"""Train / eval / predict / pseudo_label entry points behind `main.py` (importable, flag-free).

Workdir layout:
  config.json               the resolved config of the run (eval / predict start from it)
  config.<time>.json        earlier config.json of a run resumed with a changed config
  dataset_info.json         class names and label -> category id mapping
  checkpoints/<step>/       Orbax TrainState checkpoints
  events.out.tfevents.*     TensorBoard scalars (train/*, eval/*)
  tfds/                     prepared array_record dataset (unless data.data_dir is set)
  synthetic/                the generated demo dataset (data.dataset == "synthetic")
  eval/coco_results.json    detections in COCO results format (original-image coordinates)
  eval/metrics.json         the 12 COCO metrics as fractions (+ crowdhuman_AP50, crowdhuman_MR-2,
                            crowdhuman_JI for data.dataset == "crowdhuman"; wider_easy_ap,
                            wider_medium_ap, wider_hard_ap with data.wider_eval_gt set), then
                            "<name>/AP", ... of each data.extra_eval dataset (data/mixture.py)
  eval/<name>/coco_results.json  the detections of data.extra_eval dataset <name> (its labels)
  predict/detections.json   --mode=predict results; predict/<image>.png drawn copies
  pseudo_label/<folder>.json  --mode=pseudo_label output (unless pseudo_label.output is set)
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from cn2_jax.config import (
    config_from_json,
    flatten_fields,
    get_field,
    jsonable,
    set_field,
    show_value,
    validate_config,
)
from cn2_jax.errors import (ConfigError, DataError, InputFileError, is_user_error, one_line)
from cn2_jax import pseudo_label as pseudo_label_lib
from cn2_jax.data import catalog
from cn2_jax.data import mixture
from cn2_jax.data import pipeline
from cn2_jax.engine import distributed
from cn2_jax.engine import hooks as hooks_lib
from cn2_jax.engine import loop
from cn2_jax.engine import optim
from cn2_jax.engine import step as step_lib
from cn2_jax.engine import swa as swa_lib
from cn2_jax.evaluation import protocol as eval_protocol
from cn2_jax.evaluation import wider_eval
from cn2_jax.modeling import detector
from cn2_jax.tree_paths import path_str
from cn2_jax.weights import finetune
from cn2_jax.weights.loading import (
    check_checkpoint_fits,
    latest_checkpoint_dir,
    restore_model_variables,
    weights_run_dir,
)

log = logging.getLogger(__name__)

EVAL_KEYS = ("image", "image_hw")
EVAL_META_KEYS = ("image_id", "image_hw", "orig_hw", "batch_mask")  # gathered to every process


# ------------------------------------------------------------------------------------- data
def prepare_dataset(cfg: ml_collections.ConfigDict, workdir: str, data=None):
  """Builds (once) and returns the tfds builder of `cfg.data` (array_record, no TensorFlow), or of
  `data`, a `data` section describing another dataset (`mixture.source_config`); what each
  `data.dataset` means is registered in cn2_jax/data/catalog.py."""
  d = cfg.data if data is None else data
  data_dir = d.data_dir or os.path.join(workdir, "tfds")
  kind = catalog.get(d.dataset)
  # Several processes: process 0 prepares (writes) while the others wait, then they open its copy
  # (which must be on a filesystem they share); one process: just this call.
  return distributed.main_process_first(
      f"prepare dataset {d.dataset} in {data_dir}",
      lambda: kind.prepare(d, data_dir, workdir, cfg.seed),
      written=lambda builder: os.fspath(builder.data_dir),
  )


def _write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def _save_run_files(cfg, workdir: str, info: pipeline.DetectionInfo) -> None:
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "config.json")
  new = json.loads(cfg.to_json_best_effort())
  if os.path.isfile(path):
    _keep_previous_config(path, new)
  _write_json(path, new)
  _write_json(
      os.path.join(workdir, "dataset_info.json"),
      dict(
          class_names=list(info.class_names),
          label_to_category_id=[
              int(x) for x in info.label_to_category_id(np.arange(info.num_classes))
          ],
      ),
  )


def _keep_previous_config(path: str, new: dict) -> None:
  """A resumed run whose config changed: warns naming the fields, keeps the old config.json as
  config.<time it was written>.json next to it (so the run's history stays readable)."""
  with open(path) as f:
    old = json.load(f)
  flat_new = flatten_fields(new)
  changes = [
      (k, v, flat_new[k])
      for k, v in flatten_fields(old).items()
      if k in flat_new and v != flat_new[k]
  ]
  if not changes:
    return
  stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(path)))
  keep, n = os.path.join(os.path.dirname(path), f"config.{stamp}.json"), 1
  while os.path.exists(keep):  # two resumes within a second
    n += 1
    keep = os.path.join(os.path.dirname(path), f"config.{stamp}-{n}.json")
  shutil.copy2(path, keep)
  shown = ", ".join(f"{k} {show_value(a)} → {show_value(b)}" for k, a, b in changes[:6])
  more = f" (+{len(changes) - 6} more)" if len(changes) > 6 else ""
  log.warning(
      "%s: the config differs from the run's previous one: %s%s; previous config kept " "as %s",
      path,
      shown,
      more,
      os.path.basename(keep),
  )


def _check_num_classes(cfg, info: pipeline.DetectionInfo) -> None:
  if mixture.is_mixed(cfg.data):  # several datasets / an offset: `data` only has to fit
    _check_channels(cfg, "data", cfg.data.dataset, info, cfg.data.channel_offset)
    return
  if cfg.model.num_classes != info.num_classes:
    raise ConfigError(
        f"model.num_classes={cfg.model.num_classes} but the dataset has "
        f"{info.num_classes} classes {list(info.class_names)[:10]}...; set "
        f"--config.model.num_classes={info.num_classes}"
    )


def _check_channels(cfg, where: str, dataset: str, info, offset: int) -> None:
  """A dataset of a mixture (or an extra evaluation) must fit the model's classes at its offset."""
  n = mixture.num_labels(dataset, info)
  if int(offset) + n > cfg.model.num_classes:
    raise ConfigError(
        f"{where}: its {n} classes {list(info.class_names)[:10]} at channel_offset={offset} "
        f"exceed model.num_classes={cfg.model.num_classes}"
    )


def _prepared_entries(cfg, workdir: str, key: str) -> list:
  """`[(entry, its data section, builder)]` of `data.<key>` ("mixture" or "extra_eval"), each
  dataset prepared once and checked to fit the model's classes at its channel offset."""
  out = []
  for i, entry in enumerate(cfg.data[key]):
    part = mixture.source_config(cfg.data, entry, label_is_name=key == "extra_eval")
    b = prepare_dataset(cfg, workdir, data=part)
    _check_channels(
        cfg, f"data.{key}[{i}]", part.dataset, pipeline.DetectionInfo.from_builder(b),
        part.channel_offset,
    )  # fmt: skip
    out.append((entry, part, b))
  return out


def _mixture_builders(cfg, workdir: str) -> list:
  """`[(entry, its data section, builder)]` of data.mixture."""
  return _prepared_entries(cfg, workdir, "mixture")


def _extra_eval_builders(cfg, workdir: str) -> list:
  """`[(name, its data section, builder)]` of data.extra_eval."""
  return [(str(e["name"]), part, b) for e, part, b in _prepared_entries(cfg, workdir, "extra_eval")]


def _teacher_class_names(cfg) -> list:
  """`[(start channel, class names)]` of the KD teachers whose dataset_info.json is readable."""
  out, start = [], 0
  ends = tuple(cfg.kd.cls_index)
  for i, wd in enumerate(cfg.kd.teacher_workdirs):
    if ends:
      start = 0 if i == 0 else int(ends[i - 1])
    try:
      with open(os.path.join(wd, "dataset_info.json")) as f:
        names = list(json.load(f)["class_names"])
    except (OSError, ValueError, KeyError, TypeError):
      if not ends:
        break  # the next teachers' start channels are unknown
      continue
    out.append((start, names))
    start += len(names)
  return out


def _run_info(cfg, info, parts) -> pipeline.DetectionInfo:
  """The model's classes (dataset_info.json): `data`'s, or for a mixed run the name of each
  channel from the datasets `[(dataset, info, offset)]` labelling it, else from the teachers."""
  d = cfg.data
  n = mixture.num_labels(d.dataset, info)
  if d.channel_offset == 0 and n == cfg.model.num_classes:  # `data` labels every class
    return info
  names = mixture.run_class_names(cfg.model.num_classes, parts, _teacher_class_names(cfg))
  return pipeline.DetectionInfo(
      class_names=tuple(names), category_ids=tuple(range(1, len(names) + 1))
  )


# ------------------------------------------------------------------------------------- run config
# Fields that steer one eval / predict invocation (where the weights are, what to draw, how to
# batch) rather than describe the trained model: overriding them is expected, so no warning.
_INVOCATION_FIELDS = (
    "weights",
    "compilation_cache_dir",
    "predict.",
    "train.eval_batch_size",
    "data.num_workers",
    "data.data_dir",
    "data.extra_eval",  # more datasets to evaluate the model on
    "eval.",  # how the model is evaluated (protocol, WIDER prediction files)
    "pseudo_label.",
)


def saved_config_path(cfg, workdir: str) -> Optional[str]:
  """config.json of the run the model comes from: that of the run `cfg.weights` names (a run
  directory or one of its checkpoints), else the workdir's; None when there is none."""
  run = weights_run_dir(cfg.weights) if cfg.weights else None
  for d in (run, workdir):
    if d and os.path.isfile(os.path.join(d, "config.json")):
      return os.path.join(d, "config.json")
  return None


def run_config(
    cfg: ml_collections.ConfigDict, workdir: str, overridden: Iterable[str] = ()
) -> ml_collections.ConfigDict:
  """The config of `--mode=eval|predict`: the run's saved config.json (`saved_config_path`), with
  the fields named in `overridden` (dotted paths; main.py passes those given as --config.FIELD on
  the command line, whatever their value) taken from `cfg`. Every other value of `cfg` (its
  config file) is ignored, so training overrides need not be repeated; an override that changes a
  field of the trained model is logged as a warning. Without a config.json, `cfg` as it is."""
  path = saved_config_path(cfg, workdir)
  if path is None:
    return validate_config(cfg)
  saved = config_from_json(path)
  overridden = list(dict.fromkeys(overridden))
  for field in overridden:
    value = get_field(cfg, field)
    before = get_field(saved, field)
    set_field(saved, field, value)
    if jsonable(before) != jsonable(value) and not field.startswith(_INVOCATION_FIELDS):
      log.warning(
          "--config.%s=%s differs from the run's %s (%s); using %s",
          field,
          show_value(jsonable(value)),
          path,
          show_value(jsonable(before)),
          show_value(jsonable(value)),
      )
  log.info(
      "config: %s%s",
      path,
      f" with command-line overrides {', '.join(overridden)}" if overridden else "",
  )
  try:
    return validate_config(saved)
  except (KeyError, ValueError) as e:
    raise ConfigError(f"{path} with the command-line overrides: {one_line(e)}") from e


# ------------------------------------------------------------------------------------- weights
# ------------------------------------------------------------------------------------- modes
def enable_compilation_cache(cfg) -> None:
  """Turns on JAX's persistent compilation cache at `cfg.compilation_cache_dir` (every padded
  shape is one program: compiled lazily on first use, then read from the cache by later runs)."""
  path = cfg.compilation_cache_dir
  if not path:
    return
  path = os.path.expanduser(path)
  os.makedirs(path, exist_ok=True)
  if jax.config.jax_compilation_cache_dir != path:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    log.info("persistent compilation cache: %s", path)


def _check_resumable(cfg, workdir: str, abstract: dict) -> Optional[str]:
  """The newest checkpoint of the workdir (None: a fresh start), which must fit the config's model
  (`abstract`: its abstract variables; a one-line WeightsError naming the changed field, instead
  of Orbax's restore errors)."""
  item = latest_checkpoint_dir(workdir)
  if item is not None:
    source = f"cannot resume: checkpoint {os.path.dirname(item)}"
    check_checkpoint_fits(item, abstract, source, cfg.model)
  return item


def _frozen_prefixes(cfg, abstract: dict) -> tuple:
  """The parameter-path prefixes that receive no update: the family's rule (model.freeze_at) and
  train.freeze, each of which must name parameters of the model."""
  paths = [path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(abstract["params"])[0]]
  for prefix in cfg.train.freeze:
    if not any(optim.matches_prefix(p, prefix) for p in paths):
      tops = sorted({p.split(".")[0] for p in paths})
      raise ConfigError(
          f"train.freeze: {prefix!r} is the prefix of no parameter; parameter paths are "
          f"'.'-joined, e.g. {paths[0]!r}, under {tops}"
      )
  return tuple(detector.frozen_param_prefixes(cfg.model)) + tuple(cfg.train.freeze)


def train(
    cfg: ml_collections.ConfigDict,
    workdir: str,
    *,
    stop_at_step: Optional[int] = None,
    metrics_callback=None,
):
  """Trains (resuming if the workdir has checkpoints); evaluates at the end if configured.

  `stop_at_step` ends this call early (checkpoint saved) without changing the schedule;
  `metrics_callback(step, metrics)` receives every step's host metrics. Returns (state, metrics).
  """
  validate_config(cfg)
  enable_compilation_cache(cfg)
  os.makedirs(workdir, exist_ok=True)
  abstract = detector.abstract_variables(cfg.model)
  resume_from = _check_resumable(cfg, workdir, abstract)
  b = prepare_dataset(cfg, workdir)
  info = pipeline.DetectionInfo.from_builder(b)
  _check_num_classes(cfg, info)
  d = cfg.data
  mixed = _mixture_builders(cfg, workdir)  # data.mixture: more training datasets
  extra_evals = _extra_eval_builders(cfg, workdir)
  labelled = [(d.dataset, info, d.channel_offset)] + [
      (part.dataset, pipeline.DetectionInfo.from_builder(mb), part.channel_offset)
      for _, part, mb in mixed + extra_evals
  ]
  run_info = _run_info(cfg, info, labelled)
  frozen_prefixes = _frozen_prefixes(cfg, abstract)
  init_plan = None
  if cfg.init_from and resume_from is None:  # unused when resuming
    init_plan = finetune.plan_init(cfg, run_info.class_names, abstract)  # raises before writing
  _save_run_files(cfg, workdir, run_info)
  # train.batch_size images per process and step: the global batch is batch_size x processes
  loader_settings = pipeline.TrainLoaderSettings.from_config(
      cfg, process_index=jax.process_index(), process_count=jax.process_count()
  )
  parts = [  # an image folder has nothing to filter
      pipeline.TrainPart(
          pipeline.open_split(mb, part.train_split),
          weight=float(entry.get("weight", 1.0)),
          channel_offset=int(part.channel_offset),
          filter_empty=None if catalog.get(part.dataset).labelled else False,
      )
      for entry, part, mb in [({"weight": d.mix_weight}, d, b)] + mixed
  ]
  # a schedule in epochs (optim.epochs > 0) counts iterations from the images the loader draws
  # (a mixture: of all its datasets together; woGT keeps every image, docs/onestage.md §4.3)
  n_train = (
      pipeline.num_train_images(parts, loader_settings.filter_empty)
      if cfg.optim.epochs > 0
      else None
  )

  def loader_fn(start_step: int):
    return pipeline.make_train_loader(parts, loader_settings, start_step)

  def train_batches(start_step: int):
    for batch in loader_fn(start_step):
      # gt_crowd: ignore regions (the one-stage heatmap loss leaves them out of its negatives)
      keys = ("image", "image_hw", "gt_boxes", "gt_classes", "gt_valid", "gt_crowd")
      yield {k: batch[k] for k in keys if k in batch}

  model = detector.build_model(cfg.model)
  load_pretrained = None
  if init_plan is not None:

    def load_pretrained(variables):  # on a fresh start only (loop.train)
      variables = init_plan.apply(variables)
      if jax.process_index() == 0:
        _write_json(os.path.join(workdir, finetune.REPORT_NAME), init_plan.report())
      return variables

  def run_eval(state, step):  # the eval hook writes the numbers to TensorBoard as eval/*
    return evaluate(
        cfg,
        workdir,
        variables=swa_lib.eval_variables(cfg, state),
        builder=b,
        extra_builders=extra_evals,
    )

  has_eval = bool(d.eval_split) or bool(d.extra_eval)
  eval_hook = None
  if cfg.train.eval_every > 0 and has_eval:  # periodic evaluation, and at the last step
    eval_hook = hooks_lib.EvalHook(run_eval, cfg.train.eval_every)
  hooks = hooks_lib.default_hooks(cfg, eval_hook=eval_hook, metrics_callback=metrics_callback)
  loss = None
  if cfg.kd.teacher_workdirs:  # knowledge distillation (modeling/onestage/kd.py)
    from cn2_jax.modeling.onestage import kd as kd_lib  # start-up: only distillation runs

    loss = kd_lib.make_distillation(cfg)
  state = loop.train(
      cfg,
      workdir,
      model,
      detector.init_fn(model),
      train_batches,
      hooks=hooks,
      frozen_prefixes=frozen_prefixes,
      load_pretrained_fn=load_pretrained,
      loss=loss,
      stop_at_step=stop_at_step,
      num_train_images=n_train,
  )
  metrics = None
  step = int(jax.device_get(state.step))
  max_iter = optim.resolve_schedule(cfg.optim, n_train, loop.global_batch_size(cfg)).max_iter
  if cfg.train.eval_at_end and has_eval and step >= swa_lib.total_iters(cfg, max_iter):
    # already evaluated at the last step by the eval hook?
    metrics = eval_hook.results.get(step) if eval_hook is not None else None
    if metrics is None:
      metrics = evaluate(
          cfg,
          workdir,
          variables=swa_lib.eval_variables(cfg, state),
          builder=b,
          extra_builders=extra_evals,
      )
      _write_eval_scalars(workdir, step, metrics)
  return state, metrics


def _scalars(metrics: dict) -> dict:
  """The numeric COCO metrics (AP, AP50, ...) of an evaluation, for TensorBoard."""
  return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.floating))}


def _write_eval_scalars(workdir: str, step: int, metrics: dict) -> None:
  """eval/* TensorBoard scalars of the end-of-training evaluation (process 0)."""
  if jax.process_index() != 0:
    return
  from tensorboardX import SummaryWriter  # start-up: only runs that write TensorBoard

  with SummaryWriter(workdir) as writer:
    for name, v in _scalars(metrics).items():
      writer.add_scalar(f"eval/{name}", v, step)


def evaluate(
    cfg: ml_collections.ConfigDict,
    workdir: str,
    *,
    variables=None,
    builder=None,
    extra_builders=None,
) -> dict:
  """COCO evaluation of the eval split, then of each data.extra_eval dataset on its channels
  (data/mixture.py); writes eval/coco_results.json (eval/<name>/coco_results.json) and
  eval/metrics.json (the extra datasets' metrics as "<name>/AP", ...). `extra_builders`: the
  prepared extra datasets (`_extra_eval_builders`), else prepared here."""
  validate_config(cfg)
  enable_compilation_cache(cfg)
  d = cfg.data
  if not d.eval_split and not d.extra_eval:
    raise ConfigError("nothing to evaluate: data.eval_split is '' and data.extra_eval is empty")
  b = builder if builder is not None else prepare_dataset(cfg, workdir)
  info = pipeline.DetectionInfo.from_builder(b)
  _check_num_classes(cfg, info)
  if extra_builders is None:
    extra_builders = _extra_eval_builders(cfg, workdir)
  if variables is None:
    variables = restore_model_variables(cfg, workdir)
  mesh = step_lib.make_mesh()
  if cfg.eval.protocol != "official":
    log.info("eval.protocol=%r (cn2_jax/evaluation/protocol.py)", cfg.eval.protocol)
  model = detector.build_model(eval_protocol.eval_model_config(cfg.model, cfg.eval.protocol))
  eval_step = step_lib.make_eval_step(model, mesh)
  variables = step_lib.replicate(variables, mesh)
  run = functools.partial(_eval_split, cfg, eval_step, variables, mesh)
  metrics, counts = {}, {}
  if d.eval_split:
    metrics, evaluator = _evaluate_dataset(
        run,
        b,
        d,
        os.path.join(workdir, "eval", "coco_results.json"),
        wider_eval_gt=d.wider_eval_gt,
        protocol=cfg.eval.protocol,
        wider_pred_dir=cfg.eval.wider_pred_dir,
    )
    counts = dict(num_images=evaluator.num_images, num_detections=evaluator.num_detections)
  for name, part, eb in extra_builders:
    em, ev = _evaluate_dataset(
        run,
        eb,
        part,
        os.path.join(workdir, "eval", name, "coco_results.json"),
        name=name,
        protocol=cfg.eval.protocol,
    )
    metrics.update({f"{name}/{k}": v for k, v in em.items()})
    counts.update(
        {f"{name}/num_images": ev.num_images, f"{name}/num_detections": ev.num_detections}
    )
  if jax.process_index() == 0:
    out = {str(k): float(v) for k, v in metrics.items()}
    out.update({k: int(v) for k, v in counts.items()})
    _write_json(os.path.join(workdir, "eval", "metrics.json"), out)
  return metrics


def _evaluate_dataset(
    run,
    builder,
    part,
    results_path: str,
    *,
    name="",
    wider_eval_gt="",
    protocol="official",
    wider_pred_dir="",
):
  """COCO evaluation of `part.eval_split` of a prepared dataset (`data`, or a data.extra_eval
  entry's data section) on the model's classes [part.channel_offset, + its classes), plus the
  dataset's own metrics (its `extra_metrics` in data/catalog.py: CrowdHuman AP50 / MR^-2 / JI;
  WIDER Face easy / medium / hard AP with `wider_eval_gt`); writes the detections to
  `results_path` (and in the WIDER FACE kit's layout to `wider_pred_dir` when set). `protocol`
  (eval.protocol) may replace the ground truth (evaluation/protocol.py). Returns (metrics,
  evaluator)."""
  info = pipeline.DetectionInfo.from_builder(builder)
  ann = info.annotation_file(part.eval_split)
  if ann is None:
    raise FileNotFoundError(f"No annotation file recorded for split {part.eval_split!r}")
  evaluator = eval_protocol.make_evaluator(
      part.dataset,
      ann,
      [int(x) for x in info.label_to_category_id(np.arange(info.num_classes))],
      protocol,
  )
  if name:
    log.info(
        "data.extra_eval %r: %s split %r, model classes [%d, %d)",
        name,
        part.dataset,
        part.eval_split,
        part.channel_offset,
        part.channel_offset + info.num_classes,
    )
  run(
      pipeline.open_split(builder, part.eval_split),
      evaluator,
      part.channel_offset,
      info.num_classes,
  )
  metrics = evaluator.evaluate()
  official = catalog.get(part.dataset).extra_metrics  # e.g. CrowdHuman's, WIDER Face's
  if official is not None:
    metrics.update(official(ann, evaluator, {"wider_eval_gt": wider_eval_gt}))
  if jax.process_index() == 0:
    evaluator.write_results(results_path)
    if wider_pred_dir:
      pred = wider_eval.pred_from_coco(ann, evaluator.results, evaluator.image_ids)
      if not pred:
        log.warning(
            "eval.wider_pred_dir: no evaluated image of %s has an <event>/ folder in its file "
            "name (WIDER Face's <event>/<image>.jpg); nothing written",
            part.dataset,
        )
      else:
        n = wider_eval.write_pred_dir(os.path.expanduser(wider_pred_dir), pred)
        log.info("wrote %d WIDER FACE prediction files to %s", n, wider_pred_dir)
  return metrics, evaluator


def _eval_split(cfg, eval_step, variables, mesh, split, evaluator, offset: int, num: int) -> int:
  """Runs the model over `split` and adds its detections to `evaluator`, model classes [offset,
  offset + num) as the dataset's labels 0..num-1 (`mixture.channel_slice`; the identity for a
  plain run); returns the number of images."""
  d = cfg.data
  t0, n = time.perf_counter(), 0
  for batch in pipeline.make_eval_loader(
      split,
      batch_size=cfg.train.eval_batch_size,
      short_size=d.min_size_test,
      max_size=d.max_size_test,
      pad_hw=tuple(d.pad_hw_test) or None,
      max_boxes=d.max_boxes,
      size_divisibility=d.size_divisibility,
      num_workers=d.num_workers,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      resize_type=d.resize_type,
  ):
    dets = eval_step(variables, step_lib.shard_batch({k: batch[k] for k in EVAL_KEYS}, mesh))
    if jax.process_count() > 1:
      # Every process scores the whole eval set: the detections (global arrays) and the batch
      # metadata, sharded the same way so that its rows stay aligned with theirs whatever the
      # mesh's device order, gathered from every process (each image once: eval_plan).
      meta = step_lib.shard_batch({k: batch[k] for k in EVAL_META_KEYS}, mesh)
      dets, batch = multihost_utils.process_allgather((dets, meta), tiled=True)
    dets = _to_original_image(cfg.eval.protocol, jax.device_get(dets), batch)
    classes, valid = mixture.channel_slice(dets["classes"], dets["valid"], offset, num)
    evaluator.add(
        batch["image_id"],
        dets["boxes"],
        dets["scores"],
        classes,
        valid,
        batch["batch_mask"],
    )
    n += int(batch["batch_mask"].sum())
  dt = time.perf_counter() - t0
  log.info("evaluated %d images in %.1f s", n, dt)
  return n


def _to_original_image(protocol: str, dets: dict, batch: dict) -> dict:
  """Host detections of a batch in original-image pixels: clipped and empty ones dropped
  (`detector.postprocess_detections`, the official protocol), or only rescaled (centerx)."""
  if protocol == "centerx":
    out = dict(dets)
    out["boxes"] = eval_protocol.rescale_without_clipping(
        dets["boxes"], batch["image_hw"], batch["orig_hw"]
    )
    return out
  return jax.device_get(detector.postprocess_detections(dets, batch["image_hw"], batch["orig_hw"]))


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def expand_images(paths: Sequence[str]) -> list:
  """Image files of `paths`: a folder stands for its images (common extensions, sorted by name,
  not recursive); repeated files count once. Missing files are one InputFileError naming them."""
  out, missing = [], []
  for p in paths:
    if os.path.isdir(p):
      found = sorted(
          f
          for f in os.listdir(p)
          if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(p, f))
      )
      if not found:
        raise InputFileError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {p}")
      out += [os.path.join(p, f) for f in found]
    elif os.path.isfile(p):
      out.append(p)
    else:
      missing.append(p)
  if missing:
    raise InputFileError(f"image file(s) not found: {', '.join(missing)}")
  unique, seen = [], set()
  for p in out:
    if os.path.abspath(p) not in seen:
      seen.add(os.path.abspath(p))
      unique.append(p)
  return unique


def output_names(paths: Sequence[str]) -> list:
  """Distinct, deterministic PNG names for the drawn copies: `<stem>.png`; inputs whose stems
  collide (a/1.png, b/1.jpg) are named by their path below the folder they share (a_1.png,
  b_1.png), keeping the extension when only it differs (1.jpg.png, 1.png.png)."""
  stems = [Path(p).stem for p in paths]
  names = list(stems)
  groups = {}
  for i, stem in enumerate(stems):
    groups.setdefault(stem.casefold(), []).append(i)  # casefold: macOS/Windows file names
  for idx in groups.values():
    if len(idx) < 2:
      continue
    full = [os.path.abspath(paths[i]) for i in idx]
    common = os.path.commonpath([os.path.dirname(f) for f in full])
    rels = [os.path.relpath(f, common) for f in full]
    for i, rel in zip(idx, rels):
      rel_stem = os.path.splitext(rel)[0]
      # Keep the extension only when another file differs from this one by it alone.
      same_stem = len({r for r in rels if os.path.splitext(r)[0] == rel_stem})
      names[i] = (rel if same_stem > 1 else rel_stem).replace(os.sep, "_")
  taken, unique = set(), []
  for name in names:  # a disambiguated name may still meet another input's stem
    base, k = name, 1
    while name.casefold() in taken:
      k += 1
      name = f"{base}-{k}"
    taken.add(name.casefold())
    unique.append(name + ".png")
  return unique


def _failure_line(path: str, e: BaseException) -> str:
  msg = one_line(e)
  return msg if path in msg else f"{path}: {msg}"  # decode errors already name the file


def predict(cfg: ml_collections.ConfigDict, workdir: str, images: Sequence[str]) -> list:
  """Runs the model on image files (or folders of images); writes predict/detections.json and a
  drawn copy predict/<name>.png of each (`output_names`), logging one line per image and a summary.

  An image that fails (e.g. an undecodable file) is logged and skipped; the others are written,
  then a DataError names the failures. Returns the records of detections.json. Several processes:
  each runs the model on every image (the checkpoint restore is collective), process 0 alone
  writes.
  """
  # start-up: only --mode=predict draws (PIL drawing, the Predictor's jit)
  from cn2_jax import visualize
  from cn2_jax.predictor import Predictor

  if not images:
    raise ConfigError(
        "--mode=predict needs image paths (--images=a.jpg,b.png or " "--config.predict.images=...)"
    )
  paths = expand_images(images)
  enable_compilation_cache(cfg)
  predictor = Predictor.from_workdir(workdir, cfg)
  out_dir = os.path.join(workdir, "predict")
  writes = jax.process_index() == 0
  if writes:
    os.makedirs(out_dir, exist_ok=True)
  thresh = float(cfg.predict.score_thresh)
  results, failures = [], []
  n_dets = n_drawn = 0
  best = -math.inf
  for path, name in zip(paths, output_names(paths)):
    try:
      image = predictor.read_image(path)
      det = predictor(image)
    except Exception as e:  # noqa: BLE001 - reported below, after the others are written
      failures.append((path, e))
      log.error("%s", _failure_line(path, e))
      continue
    scores = np.asarray(det["scores"], np.float64)
    k, drawn_k = len(scores), int((scores >= thresh).sum())
    top = float(scores.max()) if k else None
    png = os.path.join(out_dir, name)
    if writes:
      drawn = visualize.draw_detections(
          image, det["boxes"], scores, det["classes"], predictor.class_names, score_thresh=thresh
      )
      visualize.save_png(png, drawn)
    log.info(
        "%s: %d detections, %d drawn ≥ %.2f (%s) → %s",
        path,
        k,
        drawn_k,
        thresh,
        f"max score {top:.2f}" if k else "none",
        png,
    )
    n_dets, n_drawn = n_dets + k, n_drawn + drawn_k
    best = max(best, top) if k else best
    records = []
    for bx, sc, c in zip(det["boxes"], scores, det["classes"]):
      r = dict(
          box=[round(float(v), 2) for v in bx],
          score=round(float(sc), 5),
          label=int(c),
          class_name=predictor.class_name(int(c)),
      )
      cat = predictor.category_id(int(c))
      if cat is not None:
        r["category_id"] = cat
      records.append(r)
    results.append(dict(image=path, drawn=png, detections=records))
  if writes:
    _write_json(os.path.join(out_dir, "detections.json"), results)
  log.info(
      "predict: %d of %d images, %d detections, %d drawn ≥ %.2f → %s",
      len(results),
      len(paths),
      n_dets,
      n_drawn,
      thresh,
      out_dir,
  )
  if n_dets and not n_drawn:
    # Typical of an under-trained model: say why the PNGs show no boxes, and what to change.
    log.warning(
        "no detection reached predict.score_thresh=%.2f (highest score %.3f): lower it, "
        "e.g. --config.predict.score_thresh=%.2f",
        thresh,
        best,
        math.floor(best * 100) / 100,
    )
  _raise_image_failures(failures, len(paths), f"the results of the other {len(results)}", out_dir)
  return results


def _raise_image_failures(failures, total: int, others: str, written_to: str) -> None:
  """After the other images' results are written: a bug (not the input's fault) re-raised with
  its traceback, else one DataError naming every failed image."""
  if not failures:
    return
  bugs = [e for _, e in failures if not is_user_error(e)]
  if bugs:
    raise bugs[0]
  listed = "; ".join(_failure_line(p, e) for p, e in failures)
  raise DataError(
      f"{len(failures)} of {total} images failed: {listed}; {others} are in {written_to}"
  )


def pseudo_label(cfg: ml_collections.ConfigDict, workdir: str, images: Sequence[str]) -> str:
  """`--mode=pseudo_label`: the model's detections with score >= pseudo_label.score_thresh on the
  images of one folder (and its subfolders), written as a COCO instances json that trains as a
  `coco_json` dataset (cn2_jax/pseudo_label.py describes the file). An image that fails is
  logged and skipped; a DataError names the failures after the json of the others is written.
  Several processes: each runs the model on every image, process 0 alone writes. Returns the
  json's path."""
  # start-up: only --mode=predict / pseudo_label run the Predictor (its jit)
  from cn2_jax.predictor import Predictor

  if len(images) != 1:
    raise ConfigError(
        f"--mode=pseudo_label takes one folder of images (--images=FOLDER), got {list(images)}"
    )
  folder = images[0]
  names = pseudo_label_lib.folder_images(folder, IMAGE_EXTENSIONS)
  enable_compilation_cache(cfg)
  predictor = Predictor.from_workdir(workdir, cfg)
  thresh = float(cfg.pseudo_label.score_thresh)
  done, failures = [], []
  for name in names:
    path = os.path.join(folder, name)
    try:
      image = predictor.read_image(path)
      det = predictor(image)
    except Exception as e:  # noqa: BLE001 - reported below, after the others are written
      failures.append((path, e))
      log.error("%s", _failure_line(path, e))
      continue
    done.append((name, image.shape[0], image.shape[1], det))
  cats = pseudo_label_lib.categories(cfg.model.num_classes, predictor)
  coco = pseudo_label_lib.coco_pseudo_labels(done, cats, [c["id"] for c in cats], thresh)
  out = pseudo_label_lib.output_path(cfg, workdir, folder)
  if jax.process_index() == 0:
    _write_json(out, coco)
  log.info(
      "pseudo_label: %d boxes with score >= %.2f on %d of %d images → %s",
      len(coco["annotations"]),
      thresh,
      len(done),
      len(names),
      out,
  )
  _raise_image_failures(failures, len(names), f"the pseudo-labels of the other {len(done)}", out)
  return out
