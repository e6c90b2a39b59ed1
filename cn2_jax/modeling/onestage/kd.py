"""Knowledge distillation of one-stage CenterNets (centerX `modeling/losses/centernet_kdloss.py`,
`modeling/meta_arch/centernet.py`; docs/onestage.md §4.1). Off by default
(`config.kd.teacher_workdirs=()`).

Every teacher is a full, frozen `CenterNetOneStage` (or a CenterNet2, below) with its own config
and weights. Inside the train step it runs on the student's batch (the same uint8 image and
`image_hw`; its own preprocessing), BatchNorm in eval mode (running statistics), outputs under
`stop_gradient`. What is imitated: the three head outputs (sigmoid heatmap, wh, offset) at the
student's stride (`model.onestage.down_scale`, 4).

Loss of teacher i (student maps `P_s, WH_s, OFF_s`, teacher maps `P_t, WH_t, OFF_t`, NHWC):
  * channels: the student's `[s_i, e_i)` with `e_i = cls_index[i]`, `s_i = cls_index[i - 1]`
    (0 for i = 0); the teacher must have `e_i - s_i` classes (centerX KD_CLS_INDEX, e.g. [3, 7]:
    teacher 0 -> student channels 0:3, teacher 1 -> 3:7).
  * `loss_kd_cls_t{i}` = w * w_cls * mean over (N, H, W, C_t) of (P_s[..., s:e] - P_t)^2. The
    elements in the batch's ignore regions (the GT targets' `hm_ignore[..., s:e]`, targets.py;
    docs/onestage.md §3.8) and, with the student's `mask_canvas`, off the batch's official canvas
    (model.py) are left out of the sum and of the count, as in the GT heatmap loss (none:
    centerX's plain mean). The teacher's maps are zeroed off that canvas too, so the peak mask
    below has no peak there.
  * soft peak mask: `m = max_c pseudo_nms3x3(P_t)` (peak scores, 0 elsewhere) `[N, H, W, 1]`,
    `Z = sum(m) + 1e-4`; `D = (WH_t,x + WH_t,y) / 2 + 1e-4` per pixel when `norm_wh`, else 1.
  * `loss_kd_wh_t{i}` = w * w_wh * sum |m WH_s / D - m WH_t / D| / Z.
  * `loss_kd_reg_t{i}` = w * w_reg * sum |m OFF_s - m OFF_t| / Z.
With `without_label` (woGT) the student's loss dict holds only these terms.

CenterNet2 teachers (issue 13; `model.arch = "centernet2"` in the teacher's workdir): the teacher
runs in inference mode on the student's batch (same uint8 image and `image_hw`, its own
preprocessing), and its final detections (per-class boxes and probabilistic scores after its
per-class NMS and top-k, `roi_heads.score_thresh_test` applied) are rendered into `cls`, `wh`,
`reg` maps at the student's stride by `kd_render.render_detections` (the rule is in that module's
docstring): a Gaussian per detection like the student's GT, scaled by the score
(`kd.render_score_thresh` drops the weaker ones), wh / offset of the strongest detection per
pixel. The boxes are used in the frame the model returns them, the resized-image pixels of the
batch canvas, which is the student's input-pixel frame (the frame of its GT boxes); they are
not mapped to original-image pixels (`detector.postprocess_detections` is not applied). The
teacher's class count is its `model.num_classes`; the class-slice mapping above applies.

Engine hooks: `make_distillation(cfg)` -> the `step.LossWrapper` the train loop takes
(`loop.train(loss=...)`), built before the loop from the teachers (`load_teachers`) and the KD
terms: `step.distillation_loss(forwards, make_kd_loss_fn(settings, without_label))`, the teachers'
variables being the inputs of every step. Its parts: `teacher_forward(module)` (one-stage) or
`centernet2_teacher_forward(module, ...)` -> `(variables, batch) -> maps`;
`make_kd_loss_fn(settings, without_label)` -> a drop-in for `model.apply(variables, batch,
train=True, **kw)` that also receives the teachers' maps (`step.make_train_step(teachers=...,
kd_loss_fn=...)` takes them directly).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from cn2_jax import schema
from cn2_jax.config import config_from_json
from cn2_jax.engine import step as step_lib
from cn2_jax.errors import ConfigError
from cn2_jax.modeling.meta_arch import build as meta_arch_build
from cn2_jax.modeling.onestage.losses import mse_heatmap_loss
from cn2_jax.modeling.onestage.teachers import (  # noqa: F401  (re-exported)
    MAP_KEYS,
    centernet2_teacher_forward,
    teacher_forward,
)
from cn2_jax.weights.loading import restore_model_variables

EPS = 1e-4


@dataclasses.dataclass(frozen=True)
class TeacherKD:
  """One teacher's loss settings: student channels `[start, end)` and the weights."""

  start: int
  end: int
  weight: float = 10.0
  cls_weight: float = 1.0
  wh_weight: float = 1.0
  reg_weight: float = 0.1
  norm_wh: bool = False


# ------------------------------------------------------------------------------------- losses
def pseudo_nms(heat: jax.Array, kernel: int = 3) -> jax.Array:
  """centerX `pseudo_nms`: keep the values equal to their `kernel` x `kernel` max (NHWC), else 0."""
  hmax = jax.lax.reduce_window(
      heat, -jnp.inf, jax.lax.max, (1, kernel, kernel, 1), (1, 1, 1, 1), "SAME"
  )
  return jnp.where(hmax == heat, heat, jnp.zeros_like(heat))


def peak_mask(teacher_cls: jax.Array) -> jax.Array:
  """Soft peak weights `[N, H, W, 1]`: the max over classes of the pseudo-NMS-ed heatmap."""
  return pseudo_nms(teacher_cls).max(axis=-1, keepdims=True)


def kd_teacher_losses(
    student: Mapping[str, jax.Array],
    teacher: Mapping[str, jax.Array],
    s: TeacherKD,
    i: int = 0,
    ignore: Optional[jax.Array] = None,
) -> Dict[str, jax.Array]:
  """KD terms of one teacher. `student` / `teacher`: `cls [N, H, W, C]`, `wh`, `reg` `[N, H, W, 2]`
  (the teacher's `cls` has `s.end - s.start` channels); `ignore`: None or the student's
  `[N, H, W, C]` ignore map (nonzero = no heatmap term). Returns `loss_kd_{cls,wh,reg}_t{i}`."""
  f = jnp.float32
  ps = student["cls"].astype(f)[..., s.start : s.end]
  pt = teacher["cls"].astype(f)
  if ps.shape != pt.shape:
    raise ValueError(
        f"teacher {i}: heatmap {pt.shape} does not fit the student's channels "
        f"[{s.start}, {s.end}) of {student['cls'].shape}"
    )
  loss_cls = mse_heatmap_loss(ps, pt, None if ignore is None else ignore[..., s.start : s.end])
  m = peak_mask(pt)
  z = m.sum() + EPS
  wh_s, wh_t = student["wh"].astype(f), teacher["wh"].astype(f)
  d = (wh_t.sum(axis=-1, keepdims=True) / 2.0 + EPS) if s.norm_wh else 1.0
  loss_wh = jnp.abs(m * wh_s / d - m * wh_t / d).sum() / z
  loss_reg = jnp.abs(m * student["reg"].astype(f) - m * teacher["reg"].astype(f)).sum() / z
  return {
      f"loss_kd_cls_t{i}": s.weight * s.cls_weight * loss_cls,
      f"loss_kd_wh_t{i}": s.weight * s.wh_weight * loss_wh,
      f"loss_kd_reg_t{i}": s.weight * s.reg_weight * loss_reg,
  }


def kd_losses(
    student: Mapping[str, jax.Array],
    teachers: Sequence[Mapping[str, jax.Array]],
    settings: Sequence[TeacherKD],
    ignore: Optional[jax.Array] = None,
) -> Dict[str, jax.Array]:
  """The KD terms of every teacher (see `kd_teacher_losses`)."""
  if len(teachers) != len(settings):
    raise ValueError(f"{len(teachers)} teacher outputs for {len(settings)} teacher settings")
  out = {}
  for i, (teacher, setting) in enumerate(zip(teachers, settings)):
    out.update(kd_teacher_losses(student, teacher, setting, i, ignore))
  return out


def _student_losses(module, batch, teacher_maps, settings, without_label):
  images = module.preprocess(batch["image"], batch["image_hw"])
  canvas_hw = module.canvas(batch["image_hw"])
  maps = module.maps(images, True, canvas_hw)
  # woGT: only the targets' ignore map is used, when the batch has GT (crowd) rows at all
  has_crowd = "gt_crowd" in batch and "gt_boxes" in batch
  gt = module.targets(batch) if not without_label or has_crowd else None
  losses = {} if without_label else dict(module.losses(maps, gt, canvas_hw))
  ignore = module.heatmap_ignore(
      None if gt is None else gt["hm_ignore"], canvas_hw, maps["cls"].shape
  )
  keep = module.map_canvas(canvas_hw, maps["cls"].shape[1:3])
  if keep is not None:  # a teacher's maps off the student's canvas (its own setting) count not
    teacher_maps = [
        {k: jnp.where(keep[None, :, :, None], v, jnp.zeros((), v.dtype)) for k, v in t.items()}
        for t in teacher_maps
    ]
  losses.update(kd_losses(maps, teacher_maps, settings, ignore))
  return module.finish_losses(losses)  # communism (when on) rescales the KD terms too, as centerX


def make_kd_loss_fn(settings: Sequence[TeacherKD], without_label: bool = False) -> Callable:
  """`kd_loss_fn(model, variables, batch, teacher_outputs, **apply_kwargs)`: the student's
  training losses (GT terms unless `without_label`) plus the KD terms; returns what
  `model.apply(variables, batch, train=True, **apply_kwargs)` returns ((losses, updates) with
  `mutable`)."""
  settings = tuple(settings)

  def fn(model, variables, batch, teacher_outputs, **apply_kwargs):
    return model.apply(
        variables,
        batch,
        tuple(teacher_outputs),
        settings,
        bool(without_label),
        method=_student_losses,
        **apply_kwargs,
    )

  return fn


# ------------------------------------------------------------------------------------- config
WEIGHT_KEYS = ("weight", "cls_weight", "wh_weight", "reg_weight")


def _per_teacher(kd_cfg, key: str, n: int) -> Tuple:
  values = tuple(kd_cfg[key])
  if len(values) == 1:
    return values * n
  if len(values) != n:
    raise ValueError(f"kd.{key} has {len(values)} values for {n} teachers (give 1 or {n})")
  return values


def teacher_settings(kd_cfg, teacher_num_classes: Sequence[int]) -> Tuple[TeacherKD, ...]:
  """Per-teacher `TeacherKD` from `config.kd` and the teachers' class counts (an empty
  `kd.cls_index` = their cumulative sums, i.e. the teachers' classes concatenated in order)."""
  num_teachers = len(teacher_num_classes)
  ends = tuple(int(end) for end in kd_cfg.cls_index) or tuple(
      int(sum(teacher_num_classes[: i + 1])) for i in range(num_teachers)
  )
  if len(ends) != num_teachers:
    raise ValueError(f"kd.cls_index has {len(ends)} values for {num_teachers} teachers")
  out = []
  for i in range(num_teachers):
    start = 0 if i == 0 else ends[i - 1]
    if ends[i] - start != teacher_num_classes[i]:
      raise ValueError(
          f"teacher {i} has {teacher_num_classes[i]} classes but kd.cls_index gives it the "
          f"student channels [{start}, {ends[i]})"
      )
    out.append(
        TeacherKD(
            start,
            ends[i],
            *(float(_per_teacher(kd_cfg, key, num_teachers)[i]) for key in WEIGHT_KEYS),
            norm_wh=bool(_per_teacher(kd_cfg, "norm_wh", num_teachers)[i]),
        )
    )
  return tuple(out)


def load_teachers(cfg) -> Tuple[list, Tuple[TeacherKD, ...]]:
  """`([(forward_fn, variables), ...], settings)` of `cfg.kd.teacher_workdirs`: each teacher's
  config is its workdir's config.json (its `weights` if set, else its latest checkpoint)."""
  teachers, num_classes = [], []
  for workdir in cfg.kd.teacher_workdirs:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
      raise ConfigError(f"kd.teacher_workdirs: {path} not found (train the teacher first)")
    tcfg = config_from_json(path)
    family = meta_arch_build.family(tcfg.model.arch)
    if family.distillation_teacher is None:
      teachable = [
          name for name, fam in meta_arch_build.META_ARCHS.items() if fam.distillation_teacher
      ]
      raise ConfigError(
          f"kd teacher {workdir}: model.arch={tcfg.model.arch!r} cannot teach; teachers are runs of "
          f"{teachable}"
      )
    try:
      forward = family.distillation_teacher(meta_arch_build.build_model(tcfg.model), tcfg, cfg)
    except ConfigError as e:
      raise ConfigError(f"kd teacher {workdir}: {e}") from e
    variables = restore_model_variables(tcfg, workdir)
    teachers.append((forward, variables))
    num_classes.append(int(tcfg.model.num_classes))
  try:
    settings = teacher_settings(cfg.kd, num_classes)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if settings and settings[-1].end > cfg.model.num_classes:
    raise ConfigError(
        f"kd: the teachers' channels end at {settings[-1].end} > model.num_classes="
        f"{cfg.model.num_classes}"
    )
  return teachers, settings


def make_distillation(cfg):
  """The student's loss with knowledge distillation from `cfg.kd.teacher_workdirs`, for
  `loop.train(loss=...)`: a `step.LossWrapper` whose `fn` runs the frozen teachers and adds the KD
  terms (`step.distillation_loss`) and whose `inputs` are the teachers' variables."""
  teachers, settings = load_teachers(cfg)
  return step_lib.LossWrapper(
      step_lib.distillation_loss(
          [forward for forward, _ in teachers], make_kd_loss_fn(settings, cfg.kd.without_label)
      ),
      inputs=tuple(variables for _, variables in teachers),
  )


def _validate_kd(cfg) -> None:
  kd, model = cfg.kd, cfg.model
  thresh = kd.render_score_thresh
  if isinstance(thresh, bool) or not isinstance(thresh, (int, float)) or not 0.0 <= thresh <= 1.0:
    raise ConfigError(f"kd.render_score_thresh must be a number in [0, 1], got {thresh!r}")
  num_teachers = len(tuple(kd.teacher_workdirs))
  if not num_teachers:
    return
  if not all(isinstance(workdir, str) and workdir for workdir in kd.teacher_workdirs):
    raise ConfigError(f"kd.teacher_workdirs must be a tuple of paths, got {kd.teacher_workdirs!r}")
  for key in ("weight", "cls_weight", "wh_weight", "reg_weight", "norm_wh"):
    if len(tuple(kd[key])) not in (1, num_teachers):
      raise ConfigError(
          f"kd.{key} has {len(tuple(kd[key]))} values for {num_teachers} teachers (1 or {num_teachers})"
      )
    if key != "norm_wh" and not all(math.isfinite(value) and value >= 0 for value in kd[key]):
      raise ConfigError(f"kd.{key} must be >= 0, got {tuple(kd[key])}")
  ends = tuple(kd.cls_index)
  if ends and (
      len(ends) != num_teachers or any(end <= start for start, end in zip((0,) + ends, ends))
  ):
    raise ConfigError(
        f"kd.cls_index must be () or {num_teachers} increasing channel ends, got {ends}"
    )
  if ends and ends[-1] > model.num_classes:
    raise ConfigError(f"kd.cls_index={ends} ends past model.num_classes={model.num_classes}")


CONFIG = schema.group(
    "kd",
    "Knowledge distillation (docs/onestage.md §4), off while teacher_workdirs is empty. Each "
    "teacher is a run workdir of this project (its config.json and `weights` or latest "
    "checkpoint), frozen, run inside the train step on the student's batch. The per-teacher "
    "tuples take 1 value (used for every teacher) or one per teacher; defaults are centerX's "
    "(KD_WEIGHT 10, KD_CLS_WEIGHT 1, KD_WH_WEIGHT 1, KD_REG_WEIGHT 0.1, NORM_WH False); its "
    "configs use e.g. weight 1, cls_weight 1e3 (dense MSE), norm_wh True.",
    schema.Field("teacher_workdirs", (), "teacher run folders, e.g. ('runs/teacher',)"),
    schema.Field(
        "cls_index",
        (),
        "KD_CLS_INDEX: the end of each teacher's student channels ((3, 7): teacher 0 -> 0:3, "
        "teacher 1 -> 3:7); () = the teachers' num_classes concatenated in order",
    ),
    schema.Field("weight", (10.0,), "KD_WEIGHT: factor of all KD terms of a teacher"),
    schema.Field("cls_weight", (1.0,), "heatmap MSE"),
    schema.Field("wh_weight", (1.0,), "wh L1 at the teacher's peaks"),
    schema.Field("reg_weight", (0.1,), "offset L1 at the teacher's peaks"),
    schema.Field("norm_wh", (False,), "divide the wh terms by the teacher's (w + h) / 2 per pixel"),
    schema.Field(
        "render_score_thresh",
        0.05,
        "CenterNet2 teachers: their final detections are rendered into soft heatmaps (peak = "
        "score) and wh / offset maps at the student's stride with the student's model.onestage "
        "min_overlap / radius_formula (modeling/onestage/kd_render.py); detections scoring below "
        "this are not drawn. 0.05 = CenterNet2's own output threshold, so every detection the "
        "teacher outputs is drawn as a soft target (a pseudo-label threshold such as 0.3 would "
        "pull the student to 0 on the teacher's uncertain objects). In [0, 1]",
    ),
    families=("onestage",),
    validate=_validate_kd,
)

# Read by the data pipeline of every family (woGT keeps images without boxes), so not restricted
# to the one-stage family like the rest of `kd`.
WITHOUT_LABEL_CONFIG = schema.group(
    "kd",
    "Distillation without labels (woGT, docs/onestage.md §4.3).",
    schema.Field(
        "without_label",
        False,
        "woGT: only the KD terms (the GT losses are dropped); the loaders keep images without "
        "boxes and place the crop uniformly",
    ),
)
