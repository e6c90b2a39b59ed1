"""Train / eval / predict entry points behind `main.py` (importable, flag-free, for tests).

Workdir layout:
  config.json               the resolved config of the run
  dataset_info.json         class names and label -> category id mapping
  checkpoints/<step>/       Orbax TrainState checkpoints
  events.out.tfevents.*     TensorBoard scalars (train/*, eval/*)
  tfds/                     prepared array_record dataset (unless data.data_dir is set)
  synthetic/                the generated demo dataset (data.dataset == "synthetic")
  eval/coco_results.json    detections in COCO results format (original-image coordinates)
  eval/metrics.json         the 12 COCO metrics as fractions
  predict/detections.json   --mode=predict results; predict/<image>.png drawn copies
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import jax
import ml_collections
import numpy as np

from cn2_jax.config import validate_config
from cn2_jax.data import builder as builder_lib
from cn2_jax.data import pipeline
from cn2_jax.data import synthetic
from cn2_jax.engine import loop
from cn2_jax.engine import step as step_lib
from cn2_jax.evaluation.coco_eval import CocoEvaluator
from cn2_jax.modeling import detector

log = logging.getLogger(__name__)

EVAL_KEYS = ("image", "image_hw")


# ------------------------------------------------------------------------------------- data
def _resolve(root: str, p: str) -> str:
  return p if not p or os.path.isabs(p) else os.path.join(root, p)


def prepare_dataset(cfg: ml_collections.ConfigDict, workdir: str):
  """Builds (once) and returns the tfds builder of `cfg.data` (array_record, no TensorFlow)."""
  d = cfg.data
  data_dir = d.data_dir or os.path.join(workdir, "tfds")
  if d.dataset == "synthetic":
    root = d.root or os.path.join(workdir, "synthetic")
    train_json = os.path.join(root, "instances_train.json")
    if not os.path.exists(train_json):
      kwargs = {}
      if d.synthetic_num_train:
        kwargs["num_train"] = d.synthetic_num_train
      if d.synthetic_num_val:
        kwargs["num_val"] = d.synthetic_num_val
      if d.synthetic_image_size:
        kwargs["image_size"] = d.synthetic_image_size
      splits = synthetic.write_synthetic_coco(root, seed=cfg.seed, **kwargs)
    else:
      splits = {"train": (train_json, root),
                "val": (os.path.join(root, "instances_val.json"), root)}
    return builder_lib.build_coco_json_dataset(d.name or "synthetic", splits, data_dir)
  if d.dataset == "coco_json":
    if not d.root:
      raise ValueError("data.root must name the dataset folder for data.dataset='coco_json'")
    image_root = _resolve(d.root, d.image_root) if d.image_root else d.root
    splits = {}
    for split, jpath in ((d.train_split, d.train_json), (d.eval_split, d.val_json)):
      if jpath:
        splits[split] = (_resolve(d.root, jpath), image_root)
    if not splits:
      raise ValueError("data.train_json and/or data.val_json must be set for 'coco_json'")
    name = d.name or Path(d.root).resolve().name
    return builder_lib.build_coco_json_dataset(name, splits, data_dir)
  return builder_lib.build_coco2017_dataset(d.root, data_dir)


def _write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def _save_run_files(cfg, workdir: str, info: pipeline.DetectionInfo) -> None:
  if jax.process_index() != 0:
    return
  _write_json(os.path.join(workdir, "config.json"), json.loads(cfg.to_json_best_effort()))
  _write_json(os.path.join(workdir, "dataset_info.json"), dict(
      class_names=list(info.class_names),
      label_to_category_id=[int(x) for x in info.label_to_category_id(
          np.arange(info.num_classes))]))


def _check_num_classes(cfg, info: pipeline.DetectionInfo) -> None:
  if cfg.model.num_classes != info.num_classes:
    raise ValueError(f"model.num_classes={cfg.model.num_classes} but the dataset has "
                     f"{info.num_classes} classes {list(info.class_names)[:10]}...; set "
                     f"--config.model.num_classes={info.num_classes}")


# ------------------------------------------------------------------------------------- weights
def load_weights_file(path: str, variables: dict, *, backbone_only: bool) -> dict:
  """Official .pkl/.pth (detectron2/CenterNet2, MSRA R-50, torchvision R-50) or an Orbax dir
  written by `python -m cn2_jax.convert`, mapped onto `variables` (strict; see convert.py).
  `variables` may be abstract (ShapeDtypeStruct) unless `backbone_only`, which keeps the rest."""
  from cn2_jax import convert
  if os.path.isdir(path):
    if backbone_only:
      raise ValueError(f"{path}: backbone-only initialisation reads an ImageNet .pkl/.pth file "
                       f"(R-50.pkl or resnet50-*.pth), not an Orbax directory")
    return convert.restore_variables(path, target=variables)
  sd = convert.load_checkpoint_file(path)
  fmt = convert.detect_format(sd)
  sd = convert.to_detectron2_names(sd, fmt)
  variables, report = convert.convert_to_flax(sd, variables, backbone_only=backbone_only)
  log.info("loaded %s (%s): %s", path, fmt, report.summary())
  return variables


def restore_variables(cfg, workdir: str) -> dict:
  """Model variables for eval/predict: `cfg.weights` if set, else the workdir's latest checkpoint."""
  if cfg.weights:
    return load_weights_file(cfg.weights, detector.abstract_variables(cfg.model),
                             backbone_only=False)
  from cn2_jax.engine import checkpoint as ckpt_lib
  from cn2_jax.engine import optim
  ckpt = ckpt_lib.Checkpointer(workdir)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints and no --config.weights: "
                            f"train first or pass official weights")
  model = detector.build_model(cfg.model)
  tx = optim.make_optimizer(cfg.optim, None, detector.frozen_param_prefixes(cfg.model))
  abstract = step_lib.abstract_train_state(detector.init_fn(model), tx, step_lib.make_mesh())
  state = ckpt.restore(abstract, step)
  ckpt.close()
  log.info("restored checkpoint step %d from %s", step, ckpt.directory)
  return state.variables


# ------------------------------------------------------------------------------------- modes
def train(cfg: ml_collections.ConfigDict, workdir: str, *, stop_at_step: Optional[int] = None,
          metrics_callback=None):
  """Trains (resuming if the workdir has checkpoints); evaluates at the end if configured.

  `stop_at_step` ends this call early (checkpoint saved) without changing the schedule;
  `metrics_callback(step, metrics)` receives every step's host metrics. Returns (state, metrics).
  """
  validate_config(cfg)
  os.makedirs(workdir, exist_ok=True)
  b = prepare_dataset(cfg, workdir)
  info = pipeline.DetectionInfo.from_builder(b)
  _check_num_classes(cfg, info)
  _save_run_files(cfg, workdir, info)
  d = cfg.data
  split = pipeline.open_split(b, d.train_split)
  nproc = jax.process_count()
  if cfg.train.batch_size % nproc:
    raise ValueError(f"train.batch_size={cfg.train.batch_size} must divide by the "
                     f"{nproc} processes")
  lsj = pipeline.LSJ(output_size=d.lsj_size, scale_range=tuple(d.lsj_scale_range)) if d.lsj \
      else None

  def loader_fn(start_step: int):
    return pipeline.make_train_loader(
        split, batch_size=cfg.train.batch_size // nproc, short_sizes=tuple(d.min_size_train),
        max_size=d.max_size_train, pad_hw=tuple(d.pad_hw_train), max_boxes=d.max_boxes,
        seed=cfg.seed, start_step=start_step, num_workers=d.num_workers,
        filter_empty=d.filter_empty, lsj=lsj, hflip_prob=0.5 if d.flip else 0.0,
        process_index=jax.process_index(), process_count=nproc)

  def train_batches(start_step: int):
    for batch in loader_fn(start_step):
      yield {k: batch[k] for k in ("image", "image_hw", "gt_boxes", "gt_classes", "gt_valid")}

  model = detector.build_model(cfg.model)
  load_pretrained = None
  if cfg.init_from:
    load_pretrained = lambda v: load_weights_file(cfg.init_from, v, backbone_only=True)  # noqa
  state = loop.train(cfg, workdir, model, detector.init_fn(model), train_batches,
                     frozen_prefixes=detector.frozen_param_prefixes(cfg.model),
                     load_pretrained_fn=load_pretrained, stop_at_step=stop_at_step,
                     metrics_callback=metrics_callback)
  metrics = None
  finished = int(jax.device_get(state.step)) >= cfg.optim.max_iter
  if cfg.train.eval_at_end and d.eval_split and finished:
    metrics = evaluate(cfg, workdir, variables=state.variables, builder=b)
  return state, metrics


def evaluate(cfg: ml_collections.ConfigDict, workdir: str, *, variables=None,
             builder=None) -> dict:
  """COCO evaluation of the eval split; writes eval/coco_results.json and eval/metrics.json."""
  validate_config(cfg)
  b = builder if builder is not None else prepare_dataset(cfg, workdir)
  info = pipeline.DetectionInfo.from_builder(b)
  _check_num_classes(cfg, info)
  d = cfg.data
  if variables is None:
    variables = restore_variables(cfg, workdir)
  split = pipeline.open_split(b, d.eval_split)
  ann = info.annotation_file(d.eval_split)
  if ann is None:
    raise FileNotFoundError(f"No annotation file recorded for split {d.eval_split!r}")
  evaluator = CocoEvaluator(ann, [int(x) for x in info.label_to_category_id(
      np.arange(info.num_classes))])
  mesh = step_lib.make_mesh()
  model = detector.build_model(cfg.model)
  eval_step = step_lib.make_eval_step(model, mesh)
  variables = step_lib.replicate(variables, mesh)
  t0, n = time.perf_counter(), 0
  for batch in pipeline.make_eval_loader(
      split, batch_size=cfg.train.eval_batch_size, short_size=d.min_size_test,
      max_size=d.max_size_test, pad_hw=tuple(d.pad_hw_test), max_boxes=d.max_boxes,
      num_workers=d.num_workers, process_index=jax.process_index(),
      process_count=jax.process_count()):
    dets = eval_step(variables, step_lib.shard_batch({k: batch[k] for k in EVAL_KEYS}, mesh))
    if jax.process_count() > 1:
      # Every process scores the whole eval set: gather detections (global arrays) and each
      # process's batch metadata (host arrays) in process order.
      from jax.experimental import multihost_utils
      dets = multihost_utils.process_allgather(dets, tiled=True)
      batch = multihost_utils.process_allgather(
          {k: batch[k] for k in ("image_id", "image_hw", "orig_hw", "batch_mask")}, tiled=True)
    dets = jax.device_get(detector.postprocess_detections(
        jax.device_get(dets), batch["image_hw"], batch["orig_hw"]))
    evaluator.add(batch["image_id"], dets["boxes"], dets["scores"], dets["classes"],
                  dets["valid"], batch["batch_mask"])
    n += int(batch["batch_mask"].sum())
  dt = time.perf_counter() - t0
  log.info("evaluated %d images in %.1f s", n, dt)
  metrics = evaluator.evaluate()
  if jax.process_index() == 0:
    evaluator.write_results(os.path.join(workdir, "eval", "coco_results.json"))
    evaluator.write_metrics(os.path.join(workdir, "eval", "metrics.json"), metrics)
  return metrics


def predict(cfg: ml_collections.ConfigDict, workdir: str, images: Sequence[str]) -> list:
  """Runs the model on image files; writes predict/detections.json and predict/<name>.png."""
  from cn2_jax.predictor import Predictor
  from cn2_jax import visualize
  if not images:
    raise ValueError("--mode=predict needs image paths (--images=a.jpg,b.png or "
                     "--config.predict.images=...)")
  missing = [p for p in images if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f"Image file(s) not found: {missing}")
  predictor = Predictor.from_workdir(workdir, cfg)
  out_dir = os.path.join(workdir, "predict")
  os.makedirs(out_dir, exist_ok=True)
  results = []
  for path in images:
    image = predictor.read_image(path)
    det = predictor(image)
    drawn = visualize.draw_detections(image, det["boxes"], det["scores"], det["classes"],
                                      predictor.class_names, score_thresh=cfg.predict.score_thresh)
    png = os.path.join(out_dir, Path(path).stem + ".png")
    visualize.save_png(png, drawn)
    results.append(dict(
        image=path, drawn=png,
        detections=[dict(box=[round(float(v), 2) for v in bx], score=round(float(s), 5),
                         label=int(c), class_name=predictor.class_name(int(c)))
                    for bx, s, c in zip(det["boxes"], det["scores"], det["classes"])]))
  _write_json(os.path.join(out_dir, "detections.json"), results)
  return results
