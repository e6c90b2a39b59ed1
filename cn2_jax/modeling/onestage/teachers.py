"""The detector families' knowledge-distillation teachers (the `distillation_teacher` of their
registry entries, modeling/meta_arch/): a frozen teacher run's `(variables, batch) -> {cls, wh,
reg}` at the one-stage student's output stride (docs/onestage.md §4). A one-stage teacher gives
its own maps; a CenterNet2 teacher's detections are rendered into maps by
`kd_render.render_detections`."""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping

import jax
import jax.numpy as jnp

from cn2_jax.errors import ConfigError
from cn2_jax.modeling.onestage.kd_render import render_detections

MAP_KEYS = ("cls", "wh", "reg")


def _teacher_maps(module, batch):
  images = module.preprocess(batch["image"], batch["image_hw"])
  # BatchNorm in eval mode (running statistics); the teacher's own canvas setting
  out = module.maps(images, False, module.canvas(batch["image_hw"]))
  return {k: out[k].astype(jnp.float32) for k in MAP_KEYS}


def teacher_forward(module) -> Callable[[Any, Mapping[str, jax.Array]], Dict[str, jax.Array]]:
  """`(variables, batch) -> {cls, wh, reg}` of a frozen one-stage teacher (nothing mutated)."""

  def fn(variables, batch):
    return module.apply(variables, batch, method=_teacher_maps)

  return fn


def onestage_teacher(module, teacher_cfg, student_cfg):
  """The `distillation_teacher` of the one-stage family: its own maps, at the same stride."""
  if teacher_cfg.model.onestage.down_scale != student_cfg.model.onestage.down_scale:
    raise ConfigError("model.onestage.down_scale differs from the student's")
  return teacher_forward(module)


def centernet2_teacher(module, teacher_cfg, student_cfg):
  """The `distillation_teacher` of CenterNet2: detections rendered at the student's stride."""
  student = student_cfg.model.onestage
  return centernet2_teacher_forward(
      module,
      num_classes=int(teacher_cfg.model.num_classes),
      down_scale=int(student.down_scale),
      min_overlap=float(student.min_overlap),
      radius_formula=str(student.radius_formula),
      score_thresh=float(student_cfg.kd.render_score_thresh),
  )


def centernet2_teacher_forward(
    module,
    *,
    num_classes: int,
    down_scale: int,
    min_overlap: float,
    radius_formula: str,
    score_thresh: float,
) -> Callable[[Any, Mapping[str, jax.Array]], Dict[str, jax.Array]]:
  """`(variables, batch) -> {cls, wh, reg}` of a frozen CenterNet2 teacher: its inference-mode
  detections on the student's batch (`image`, `image_hw` only), in the batch canvas's pixels,
  rendered at the student's output size `image.shape[1:3] // down_scale` by
  `kd_render.render_detections` (student settings `down_scale`, `min_overlap`,
  `radius_formula`; `score_thresh` = `kd.render_score_thresh`). Outputs under stop_gradient."""

  def fn(variables, batch):
    inputs = {"image": batch["image"], "image_hw": batch["image_hw"]}
    dets = module.apply(variables, inputs, train=False)  # canvas pixels, not postprocessed
    h, w = batch["image"].shape[1:3]
    maps = render_detections(
        dets["boxes"].astype(jnp.float32),
        dets["scores"].astype(jnp.float32),
        dets["classes"],
        dets["valid"],
        out_hw=(h // down_scale, w // down_scale),
        num_classes=num_classes,
        stride=down_scale,
        min_overlap=min_overlap,
        radius_formula=radius_formula,
        score_thresh=score_thresh,
    )
    return jax.tree.map(jax.lax.stop_gradient, maps)

  return fn
