"""Training-step parity with the official CenterNet2 R50 oracle (../shared/oracle/TRAIN_README.md).

One step (`compare_one_step`, TRAIN_README §2-§8): the oracle batch is fed exactly as the official
run fed it, with the oracle's one config change (`BATCH_SIZE_PER_IMAGE = 8192`: the stage-0
sampler keeps every row) and the official adaptive ROIAlign (`sampling_ratio = 0`, with a
`max_adaptive_samples` cap computed from the boxes so that no box is capped). This project's
training forward and `jax.grad` run in float32 with the converted oracle weights, and the result
is compared stage by stage: CenterNet targets and normalisers, train-time proposals (as sets),
the appended GT, the matching / foreground / empty-box drop of every cascade stage, the 9 loss
terms, every parameter's gradient checksums and the 30 full gradient tensors.

Three steps (`run_and_compare_steps`, TRAIN_README §10): the same batch for three iterations through this
project's optimizer (`engine/optim.py`, built as the train loop builds it) with the oracle's solver
settings; compared per TRAIN_README §10.7: static settings, row counts, losses, per-parameter
checksums of the raw / clipped gradients, deltas, parameters and momentum buffers, and the 30
full parameter / buffer tensors after step 3.

Shapes, sizes and keys are read from the files (any batch in the oracle's format works).

    python -m cn2_jax.testing.train_oracle --npz F --grads G [--steps S --steps-json J]

prints the report as a table and exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from cn2_jax.config import base_config
from cn2_jax.testing.oracle import ORACLE_JSON, oracle_json_path, regenerate_oracle_state_dict

# The oracle's config change (TRAIN_README §2): the stage-0 sampler keeps every row.
ORACLE_BATCH_SIZE_PER_IMAGE = 8192
LOSS_NAMES = (
    "loss_cls_stage0",
    "loss_box_reg_stage0",
    "loss_cls_stage1",
    "loss_box_reg_stage1",
    "loss_cls_stage2",
    "loss_box_reg_stage2",
    "loss_centernet_loc",
    "loss_centernet_agn_pos",
    "loss_centernet_agn_neg",
)
PROPOSAL_MATCH_TOL_PX = 1e-2  # proposal boxes "agree to ~1e-3 px" (TRAIN_README §8)
# Gradients below this are float32-underflow noise (see `add_grad_rows`).
UNDERFLOW = 1e-30


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
  """One compared quantity: `diff` is the largest difference, in the measure the quantity names
  (relative, px, count of mismatched rows, ...); `ok` is normally diff <= tol."""

  section: str
  quantity: str
  diff: float
  tol: float
  ok: bool
  note: str = ""


@dataclasses.dataclass
class Report:
  title: str
  rows: list = dataclasses.field(default_factory=list)
  details: dict = dataclasses.field(default_factory=dict)  # per-item arrays for debugging

  def add(
      self, section: str, quantity: str, diff, tol: float, note: str = "", ok: Optional[bool] = None
  ) -> Row:
    diff = float(diff)
    if ok is None:
      ok = bool(np.isfinite(diff) and diff <= tol)
    row = Row(section, quantity, diff, float(tol), bool(ok), note)
    self.rows.append(row)
    return row

  @property
  def ok(self) -> bool:
    return all(row.ok for row in self.rows)

  def failures(self) -> list:
    return [row for row in self.rows if not row.ok]

  def table(self) -> str:
    w_s = max([len(row.section) for row in self.rows] + [7])
    w_q = max([len(row.quantity) for row in self.rows] + [8])
    lines = [
        self.title,
        f"{'section':<{w_s}}  {'quantity':<{w_q}}  {'largest diff':>12}  "
        f"{'tolerance':>9}  ok   note",
    ]
    for row in self.rows:
      lines.append(
          f"{row.section:<{w_s}}  {row.quantity:<{w_q}}  {row.diff:>12.3e}  {row.tol:>9.1e}  "
          f"{'yes' if row.ok else 'NO ':<3}  {row.note}"
      )
    n_bad = len(self.failures())
    lines.append(f"{len(self.rows)} rows, {n_bad} mismatch{'es' if n_bad != 1 else ''}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Oracle files -> batch, config, weights
# ----------------------------------------------------------------------------------------------
def load_npz(path) -> dict:
  with np.load(path, allow_pickle=False) as npz_file:
    return {key: npz_file[key] for key in npz_file.files}


def num_images(npz: dict) -> int:
  return int(len(npz["image_ids"]))


def build_batch(npz: dict) -> dict:
  """The oracle batch under the DESIGN.md batch contract: RGB uint8 NHWC zero-padded to the
  oracle's padded shape (`padded_input_shape` is NCHW), the GT as fed (after crowd drop, resize,
  clip), padded to the largest GT count. The model normalises and re-zeroes the padding itself
  (official: padding is 0 after normalisation)."""
  b = num_images(npz)
  _, _, ph, pw = (int(v) for v in npz["padded_input_shape"])
  n_gt = [len(npz[f"gt{i}_classes"]) for i in range(b)]
  m = max(max(n_gt), 1)
  image = np.zeros((b, ph, pw, 3), np.uint8)
  image_hw = np.zeros((b, 2), np.int32)
  gt_boxes = np.zeros((b, m, 4), np.float32)
  gt_classes = np.zeros((b, m), np.int32)
  gt_valid = np.zeros((b, m), bool)
  for i in range(b):
    bgr = npz[f"img{i}_resized_bgr_uint8"]
    h, w = bgr.shape[:2]
    if (h, w) != tuple(int(v) for v in npz[f"img{i}_resized_hw"]):
      raise ValueError(f"image {i}: stored image {h}x{w} != img{i}_resized_hw")
    image[i, :h, :w] = bgr[..., ::-1]  # stored BGR HWC; the batch contract is RGB
    image_hw[i] = (h, w)
    n = n_gt[i]
    gt_boxes[i, :n] = npz[f"gt{i}_boxes_xyxy"]
    gt_classes[i, :n] = npz[f"gt{i}_classes"]
    gt_valid[i, :n] = True
  return dict(
      image=image,
      image_hw=image_hw,
      gt_boxes=gt_boxes,
      gt_classes=gt_classes,
      gt_valid=gt_valid,
      gt_crowd=np.zeros((b, m), bool),
      batch_mask=np.ones((b,), bool),
  )


def pooled_boxes(npz: dict) -> np.ndarray:
  """Every box the oracle pooled (all stages), `[R, 4]`."""
  k, out = 0, []
  while f"stage{k}_boxes" in npz:
    out.append(npz[f"stage{k}_boxes"])
    k += 1
  return np.concatenate(out, 0)


def required_samples(boxes: np.ndarray, model_config) -> tuple:
  """Per-axis adaptive ROIAlign samples the boxes need (ops/roi_align.required_adaptive_samples
  with the pooler's level assignment), for the pooler of `model_config` (`config.model`)."""
  # Kept local: main() sets JAX_PLATFORMS, which jax reads when it is imported.
  from cn2_jax.modeling.backbone.fpn import FPN
  from cn2_jax.modeling.ops.roi_align import required_adaptive_samples

  if len(boxes) == 0:
    return (1, 1)
  roi_heads = model_config.roi_heads
  need = np.asarray(
      required_adaptive_samples(
          np.asarray(boxes, np.float32),
          spatial_scale=None,
          output_size=roi_heads.pooler_resolution,
          aligned=True,
          min_level=FPN.min_level,
          max_level=FPN.min_level + len(FPN.strides) - 1,
          canonical_box_size=roi_heads.canonical_box_size,
          canonical_level=roi_heads.canonical_level,
      )
  )
  return (max(int(need[0]), 1), max(int(need[1]), 1))


def oracle_config(npz: dict, cap: Optional[tuple] = None):
  """`base_config()` with the oracle's config change and the official adaptive ROIAlign; the cap
  is the per-axis number of samples the oracle's pooled boxes need unless given."""
  cfg = base_config()
  model_cfg = cfg.model
  model_cfg.dtype = "float32"
  model_cfg.roi_heads.batch_size_per_image = ORACLE_BATCH_SIZE_PER_IMAGE
  model_cfg.roi_heads.sampling_ratio = 0
  set_cap(
      cfg,
      tuple(cap) if cap else required_samples(pooled_boxes(npz), model_cfg),
  )
  return cfg


def set_cap(cfg, cap: tuple) -> None:
  """Per-axis (cap_h, cap_w) adaptive-sample cap (the schema's default is one int for both)."""
  with cfg.model.roi_heads.ignore_type():
    cfg.model.roi_heads.max_adaptive_samples = (int(cap[0]), int(cap[1]))


# ----------------------------------------------------------------------------------------------
# Parameter mapping: detectron2 key <-> Flax path
# ----------------------------------------------------------------------------------------------
def _path(kp) -> str:
  # Kept local: main() sets JAX_PLATFORMS, which jax reads when it is imported.
  from cn2_jax.engine.optim import path_str

  return path_str(kp)


@dataclasses.dataclass
class KeyMap:
  """detectron2 key -> ('.'-joined path in the `params` tree, layout) from the converter report;
  layout 'kernel' means OIHW -> HWIO (conv) or (out, in) -> (in, out) (linear)."""

  path: dict
  how: dict

  @classmethod
  def from_report(cls, report) -> "KeyMap":
    path, how = {}, {}
    for key, coll, p, _, _, h in report.mapped:
      if coll == "params":
        path[key], how[key] = p, h
    return cls(path, how)

  def to_flax(self, key: str, a: np.ndarray) -> np.ndarray:
    """A torch-layout array of `key` (weight, gradient, momentum) in its Flax layout."""
    a = np.asarray(a)
    if self.how[key] != "kernel":
      return a
    if a.ndim == 4:  # conv OIHW -> HWIO
      return np.transpose(a, (2, 3, 1, 0))
    if a.ndim == 2:  # linear (out, in) -> (in, out)
      return a.T
    raise ValueError(f"{key}: no kernel layout for shape {a.shape}")


def flat_params(tree) -> dict:
  # Kept local: main() sets JAX_PLATFORMS, which jax reads when it is imported.
  import jax

  return {_path(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ----------------------------------------------------------------------------------------------
# Running this project's training step
# ----------------------------------------------------------------------------------------------
def _flat_intermediates(inter) -> dict:
  out = {}

  def walk(t):
    for k, v in t.items():
      if isinstance(v, dict):
        walk(v)
      else:
        if k in out:
          raise ValueError(f"intermediate {k!r} sown twice")
        out[k] = v[0] if isinstance(v, tuple) else v

  walk(inter)
  return out


class TrainRunner:
  """Converted oracle weights + one compiled `(params) -> (losses, intermediates, grads)`.

  `step(params, t)` runs the training forward and `jax.grad` of the summed loss (exactly as
  `engine/step.py`: `total_loss` of the model's loss dict) on the oracle batch; the compiled
  function is reused for every iteration (same shapes). If the boxes of an iteration need more
  adaptive ROIAlign samples than the cap, the function is rebuilt with a larger cap and the
  iteration rerun, so no box is ever sampled with a capped grid.
  """

  def __init__(self, npz: dict, oracle_json=None, cap: Optional[tuple] = None, log=print):
    # Kept local: main() sets JAX_PLATFORMS, which jax reads when it is imported.
    from cn2_jax.convert import convert_to_flax
    from cn2_jax.modeling.detector import abstract_variables, frozen_param_prefixes

    self.npz = npz
    self.log = log
    self.cfg = oracle_config(npz, cap)
    self.batch = build_batch(npz)
    json_path = oracle_json or oracle_json_path()
    if json_path is None:
      raise FileNotFoundError("oracle weights JSON not found (set CN2_ORACLE_DIR)")
    self.state_dict = regenerate_oracle_state_dict(json_path)
    variables, self.conversion = convert_to_flax(
        self.state_dict, abstract_variables(self.cfg.model)
    )
    self.keymap = KeyMap.from_report(self.conversion)
    self.params0 = variables["params"]
    self.frozen = variables.get("frozen", {})
    self.frozen_prefixes = frozen_param_prefixes(self.cfg.model)
    self.seconds = []  # wall time of every call: (iteration, compiled now?, seconds)
    self._fn = None

  @property
  def cap(self) -> tuple:
    return tuple(self.cfg.model.roi_heads.max_adaptive_samples)

  def _build(self):
    # Kept local: main() sets JAX_PLATFORMS, which jax reads when it is imported.
    import jax
    from cn2_jax.engine.step import total_loss
    from cn2_jax.modeling.detector import build_model

    model = build_model(self.cfg.model)
    self._fresh = True

    def loss_fn(params, frozen, batch, rng):
      losses, state = model.apply(
          {"params": params, "frozen": frozen},
          batch,
          train=True,
          rngs={"sampling": rng},
          mutable=["intermediates"],
      )
      return total_loss(losses), (losses, _flat_intermediates(state["intermediates"]))

    def fn(params, frozen, batch, rng):
      (total, (losses, inter)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, frozen, batch, rng
      )
      return total, losses, inter, grads

    self._fn = jax.jit(fn)

  def step(self, params, t: int = 0) -> dict:
    """Runs iteration t at `params`; returns host numpy {'total', 'losses', 'inter' (sown
    intermediates by name), 'grads' ('.'-joined path -> array), 'grads_tree', 'needed_cap'}."""
    # Kept local: main() sets JAX_PLATFORMS, which jax reads when it is imported.
    import jax

    while True:
      if self._fn is None:
        self._build()
      t0 = time.perf_counter()
      rng = jax.random.fold_in(jax.random.PRNGKey(0), t)
      out = self._fn(params, self.frozen, self.batch, rng)
      out = jax.device_get(out)
      dt = time.perf_counter() - t0
      self.seconds.append((t, self._fresh, dt))
      self._fresh = False
      total, losses, inter, grads = out
      need = self._needed_cap(inter)
      if need[0] <= self.cap[0] and need[1] <= self.cap[1]:
        break
      new = (max(need[0], self.cap[0]), max(need[1], self.cap[1]))
      self.log(
          f"iteration {t}: boxes need {need} adaptive samples > cap {self.cap}; "
          f"rebuilding with cap {new}"
      )
      set_cap(self.cfg, new)
      self._fn = None
    return dict(
        total=np.asarray(total),
        losses={k: np.asarray(v) for k, v in losses.items()},
        inter={k: np.asarray(v) for k, v in inter.items()},
        grads=flat_params(grads),
        grads_tree=grads,
        needed_cap=need,
    )

  def _needed_cap(self, inter: dict) -> tuple:
    boxes = []
    k = 0
    while f"train_stage{k}_boxes" in inter:
      b = np.asarray(inter[f"train_stage{k}_boxes"])
      v = np.asarray(inter[f"train_stage{k}_valid"])
      boxes.append(b[v])
      k += 1
    return required_samples(np.concatenate(boxes, 0), self.cfg.model)


# ----------------------------------------------------------------------------------------------
# Comparison helpers
# ----------------------------------------------------------------------------------------------
def _rel(a, b, floor=1e-30) -> float:
  """max |a - b| / max |b| (relative error in max norm)."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.size == 0 and b.size == 0:
    return 0.0
  return float(np.abs(a - b).max() / max(np.abs(b).max(), floor))


def to_oracle_order(x: np.ndarray, level_hw: Sequence) -> np.ndarray:
  """`[B, L, ...]` per image, level-major (ours) -> `[B * L, ...]` level-first, then image, then
  row-major (the official flattening, TRAIN_README §3.2)."""
  b = x.shape[0]
  out, start = [], 0
  for h, w in level_hw:
    n = int(h) * int(w)
    out.append(x[:, start : start + n].reshape((b * n,) + x.shape[2:]))
    start += n
  return np.concatenate(out, 0)


def match_rows(ours: np.ndarray, ref: np.ndarray, tol: float) -> np.ndarray:
  """For each row of `ref`, the index of the nearest row of `ours` (max-abs distance) if within
  `tol`, else -1. Boxes are matched as sets: top-k / NMS / kthvalue may reorder near-ties."""
  if len(ours) == 0 or len(ref) == 0:
    return np.full((len(ref),), -1, np.int64)
  out = np.empty((len(ref),), np.int64)
  for s in range(0, len(ref), 512):
    d = np.abs(ours[None, :, :] - ref[s : s + 512, None, :]).max(-1)  # [r, A]
    best = d.argmin(1)
    ok = d[np.arange(len(best)), best] <= tol
    out[s : s + 512] = np.where(ok, best, -1)
  return out


def _counts_str(a) -> str:
  return "+".join(str(int(v)) for v in a)


# ----------------------------------------------------------------------------------------------
# One training step (TRAIN_README §2-§8)
# ----------------------------------------------------------------------------------------------
def compare_one_step(npz: dict, grads_json: dict, out: dict, runner: TrainRunner) -> Report:
  rep = Report("One training step vs the official oracle (TRAIN_README §8)")
  inter, losses, grads = out["inter"], out["losses"], out["grads"]
  b = num_images(npz)
  level_hw = [tuple(int(v) for v in hw) for hw in npz["cn_level_hw"]]
  sec = "centernet"

  model_cfg = runner.cfg.model
  norm = max(
      np.abs(np.asarray(model_cfg.pixel_mean) - npz["pixel_mean"]).max(),
      np.abs(np.asarray(model_cfg.pixel_std) - npz["pixel_std"]).max(),
  )
  # The oracle's mean / std are in BGR order: the model must flip the RGB batch to BGR.
  rep.add(
      "input",
      "pixel mean / std (BGR) as the oracle's",
      norm,
      1e-4,
      f"input_format {model_cfg.input_format}; batch {tuple(runner.batch['image'].shape)} RGB uint8",
      ok=bool(norm <= 1e-4 and model_cfg.input_format == "BGR"),
  )

  # -- CenterNet targets and normalisers --------------------------------------------------------
  ours_levels = [tuple(inter[f"p{l + 3}"].shape[1:3]) for l in range(len(level_hw))]
  rep.add(
      sec, "level sizes (padded maps)", 0 if ours_levels == level_hw else 1, 0, f"{ours_levels}"
  )
  counts = to_oracle_order(inter["train_cn_pos_count"], level_hw)
  ours_pos = np.repeat(np.arange(len(counts)), np.rint(counts).astype(np.int64))
  ref_pos = np.sort(npz["cn_pos_inds"])
  same = len(ours_pos) == len(ref_pos) and np.array_equal(ours_pos, ref_pos)
  rep.add(
      sec,
      "positive indices (multiset)",
      0 if same else 1,
      0,
      f"{len(ours_pos)} vs {len(ref_pos)} positives"
      + ("" if same else f"; sym. diff {len(np.setxor1d(ours_pos, ref_pos))}"),
  )
  rep.add(
      sec,
      "num_pos_avg",
      abs(float(inter["train_cn_num_pos_avg"]) - float(npz["cn_num_pos_avg"])),
      0,
      f"{float(inter['train_cn_num_pos_avg']):g} vs {float(npz['cn_num_pos_avg']):g}",
  )
  hm = to_oracle_order(inter["train_cn_heatmap"], level_hw)
  rep.add(
      sec,
      "heatmap targets, all levels (abs)",
      np.abs(hm - npz["cn_flattened_hms"]).max(),
      1e-6,
      f"{len(hm)} locations",
  )
  reg_valid = to_oracle_order(inter["train_cn_reg_valid"], level_hw)
  ours_reg = np.nonzero(reg_valid)[0]
  ref_reg = np.sort(npz["cn_reg_inds"])
  same = np.array_equal(ours_reg, ref_reg)
  rep.add(
      sec,
      "regression locations (set)",
      0 if same else len(np.setxor1d(ours_reg, ref_reg)),
      0,
      f"{len(ours_reg)} vs {len(ref_reg)}",
  )
  ref_t = npz["cn_reg_targets"]
  # Where there is no target the official value is -INF/stride; ours is 0 with reg_valid False.
  no_t = np.setdiff1d(np.arange(len(ref_t)), ref_reg)
  rep.add(sec, "no-target locations hold -1e8/stride", 0 if (ref_t[no_t] < -1e5).all() else 1, 0)
  if same:
    tgt = to_oracle_order(inter["train_cn_reg_target"], level_hw)
    rep.add(sec, "regression targets on reg_inds (rel)", _rel(tgt[ref_reg], ref_t[ref_reg]), 1e-6)
  rep.add(
      sec,
      "reg_norm",
      abs(float(inter["train_cn_reg_norm"]) - float(npz["cn_reg_norm"])),
      0,
      f"{float(inter['train_cn_reg_norm']):g} vs {float(npz['cn_reg_norm']):g}",
  )
  logits = np.concatenate(
      [inter[f"head_agn_hm_logits_p{l + 3}"].reshape(-1) for l in range(len(level_hw))]
  )
  regp = np.concatenate([inter[f"head_reg_p{l + 3}"].reshape(-1, 4) for l in range(len(level_hw))])
  rep.add(sec, "agn heatmap logits (rel)", _rel(logits, npz["cn_agn_hm_logits"]), 1e-4)
  rep.add(sec, "regression output relu(scale*conv) (rel)", _rel(regp, npz["cn_reg_pred"]), 1e-4)

  need, cap = out["needed_cap"], runner.cap
  rep.add(
      "roi_align",
      "adaptive samples needed <= cap (no box capped)",
      0 if need[0] <= cap[0] and need[1] <= cap[1] else 1,
      0,
      f"needed (h, w) {tuple(need)}, cap {tuple(cap)}",
  )

  # -- proposals ---------------------------------------------------------------------------------
  sec = "proposals"
  p_boxes, p_valid = inter["proposal_boxes"], inter["proposal_valid"]
  p_score = inter["proposal_objectness"]
  n_ours = p_valid.sum(1)
  n_ref = np.array([len(npz[f"proposals{i}_boxes"]) for i in range(b)])
  rep.add(
      sec,
      "proposals per image",
      np.abs(n_ours - n_ref).max(),
      0,
      f"{_counts_str(n_ours)} vs {_counts_str(n_ref)}",
  )
  # ours_to_ref[i][slot] = oracle proposal index (or -1)
  ours_to_ref, worst_frac, box_d, obj_d, dup = [], 1.0, 0.0, 0.0, 0
  for i in range(b):
    ref = npz[f"proposals{i}_boxes"]
    slots = np.nonzero(p_valid[i])[0]
    m = match_rows(p_boxes[i][slots], ref, PROPOSAL_MATCH_TOL_PX)
    ok = m >= 0
    worst_frac = min(worst_frac, ok.mean() if len(ref) else 1.0)
    dup += len(m[ok]) - len(np.unique(m[ok]))
    o2r = np.full((p_boxes.shape[1],), -1, np.int64)
    o2r[slots[m[ok]]] = np.nonzero(ok)[0]
    ours_to_ref.append(o2r)
    if ok.any():
      box_d = max(box_d, np.abs(p_boxes[i][slots[m[ok]]] - ref[ok]).max())
      obj_d = max(
          obj_d, np.abs(p_score[i][slots[m[ok]]] - npz[f"proposals{i}_objectness"][ok]).max()
      )
  rep.add(
      sec,
      "proposals matched as sets (fraction unmatched)",
      1 - worst_frac,
      0.01,
      f"box tol {PROPOSAL_MATCH_TOL_PX} px; {dup} duplicate matches",
      ok=(1 - worst_frac <= 0.01 and dup == 0),
  )
  rep.add(sec, "matched proposal boxes (px)", box_d, PROPOSAL_MATCH_TOL_PX)
  rep.add(sec, "matched objectness sqrt(p) (abs)", obj_d, 1e-5)

  # -- GT appended as proposals, stage-0 matching before sampling ---------------------------------
  sec = "stage0 GT rows"
  num_p = p_boxes.shape[1]
  pre_boxes = inter["train_stage0_prematch_boxes"]
  pre_valid = inter["train_stage0_prematch_valid"]
  pre_lab = inter["train_stage0_prematch_labels"]
  gt_d, gt_lab_bad = 0.0, 0
  for i in range(b):
    gt = npz[f"gt{i}_boxes_xyxy"]
    name = len(gt)
    rows = num_p + np.arange(name)
    if not pre_valid[i, rows].all() or pre_valid[i, num_p + name :].any():
      gt_lab_bad += 1
    gt_d = max(gt_d, np.abs(pre_boxes[i, rows] - gt).max() if name else 0.0)
    # Each appended GT has IoU 1 with itself: foreground with its own class.
    gt_lab_bad += int((pre_lab[i, rows] != npz[f"gt{i}_classes"]).sum())
  rep.add(sec, "appended GT boxes (px)", gt_d, 0)
  rep.add(sec, "appended GT rows valid and labelled with their class", gt_lab_bad, 0)

  # canonical row id: (image, position j in the oracle's [proposals_i ; gt_i]); -1 = unmatched
  def ours_pos_to_j(i, pos):
    pos = np.asarray(pos)
    j = np.where(pos < num_p, ours_to_ref[i][np.minimum(pos, num_p - 1)], n_ref[i] + (pos - num_p))
    return j

  # prematch labels over [proposals; gt] (TRAIN_README §6 stage0_prematch_*)
  offs = np.concatenate(
      [[0], np.cumsum(n_ref + np.array([len(npz[f"gt{i}_classes"]) for i in range(b)]))]
  )
  bad_lab, bad_idx, n_cmp = 0, 0, 0
  for i in range(b):
    ref_lab = npz["stage0_prematch_match_label"][offs[i] : offs[i + 1]]
    ref_idx = npz["stage0_prematch_matched_gt_idx"][offs[i] : offs[i + 1]]
    pos = np.nonzero(pre_valid[i])[0]
    j = ours_pos_to_j(i, pos)
    keep = j >= 0
    ofg = pre_lab[i, pos[keep]] < runner.cfg.model.num_classes
    rfg = ref_lab[j[keep]] == 1
    bad_lab += int((ofg != rfg).sum())
    both = ofg & rfg
    bad_idx += int(
        (
            inter["train_stage0_prematch_matched_idx"][i, pos[keep]][both] != ref_idx[j[keep]][both]
        ).sum()
    )
    n_cmp += int(keep.sum())
  rep.add(
      "stage0 matching",
      "fg/bg label before sampling (mismatched rows)",
      bad_lab,
      0,
      f"{n_cmp} rows compared",
  )
  rep.add("stage0 matching", "matched GT index of fg rows (mismatched rows)", bad_idx, 0)

  # -- cascade stages ------------------------------------------------------------------------------
  num_classes = runner.cfg.model.num_classes
  num_stages = len(runner.cfg.model.roi_heads.iou_thresholds)
  # oracle stage-k row -> canonical id (image, j)
  ref_ids = []
  r_img = npz["stage0_image_index"]
  r_j = npz["stage0_sampled_idx"]
  ref_ids.append(list(zip(r_img.tolist(), r_j.tolist())))
  for k in range(1, num_stages):
    src = npz[f"stage{k}_src_row_in_prev_stage"]
    ref_ids.append([ref_ids[k - 1][s] for s in src])
  sampled = inter["train_stage0_sampled_idx"]  # [B, S] positions
  ours_id = [[(i, int(j)) for j in ours_pos_to_j(i, sampled[i])] for i in range(b)]
  prev_valid = None
  for k in range(num_stages):
    sec = f"stage{k}"
    valid = inter[f"train_stage{k}_valid"]
    rows_ours = valid.sum(1)
    rows_ref = npz[f"stage{k}_num_per_image"]
    rep.add(
        sec,
        "rows per image",
        np.abs(rows_ours - rows_ref).max(),
        0,
        f"{_counts_str(rows_ours)} vs {_counts_str(rows_ref)}",
    )
    labels = inter[f"train_stage{k}_labels"]
    fg_ours = ((labels < num_classes) & valid).sum(1)
    fg_ref = np.array(
        [(npz[f"stage{k}_fg"] & (npz[f"stage{k}_image_index"] == i)).sum() for i in range(b)]
    )
    rep.add(
        sec,
        "foreground rows per image",
        np.abs(fg_ours - fg_ref).max(),
        0,
        f"{_counts_str(fg_ours)} vs {_counts_str(fg_ref)}",
    )
    ref_row = {cid: r for r, cid in enumerate(ref_ids[k])}
    ours_row = {
        ours_id[i][s]: (i, s)
        for i in range(b)
        for s in np.nonzero(valid[i])[0]
        if ours_id[i][s][1] >= 0
    }
    common = [c for c in ours_row if c in ref_row]
    missing = len(set(ref_row) - set(ours_row)) + len(set(ours_row) - set(ref_row))
    rep.add(
        sec, "rows present in only one implementation", missing, 0, f"{len(common)} rows in common"
    )
    if k > 0:
      dropped_ours = {
          ours_id[i][s] for i in range(b) for s in np.nonzero(prev_valid[i] & ~valid[i])[0]
      }
      keep_ref = npz[f"stage{k}_keep_mask_over_prev"]
      dropped_ref = {ref_ids[k - 1][r] for r in np.nonzero(~keep_ref)[0]}
      rep.add(
          sec,
          "rows dropped as empty (set difference)",
          len(dropped_ours ^ dropped_ref),
          0,
          f"{len(dropped_ours)} vs {len(dropped_ref)} dropped",
      )
    prev_valid = valid
    if not common:
      continue
    oi = np.array([ours_row[c] for c in common])
    ri = np.array([ref_row[c] for c in common])
    o_lab = labels[oi[:, 0], oi[:, 1]]
    r_lab = npz[f"stage{k}_gt_classes"][ri]
    rep.add(sec, "matched labels (mismatched rows)", int((o_lab != r_lab).sum()), 0)
    fg = (o_lab < num_classes) & (r_lab < num_classes)
    o_idx = inter[f"train_stage{k}_matched_idx"][oi[:, 0], oi[:, 1]]
    rep.add(
        sec,
        "matched GT index of fg rows (mismatched rows)",
        int((o_idx[fg] != npz[f"stage{k}_matched_gt_idx"][ri][fg]).sum()),
        0,
    )
    o_box = inter[f"train_stage{k}_boxes"][oi[:, 0], oi[:, 1]]
    rep.add(sec, "pooled boxes (px)", np.abs(o_box - npz[f"stage{k}_boxes"][ri]).max(), 0.05)
    rep.add(
        sec,
        "class logits (rel)",
        _rel(
            inter[f"train_stage{k}_cls_logits"][oi[:, 0], oi[:, 1]], npz[f"stage{k}_cls_logits"][ri]
        ),
        1e-4,
    )
    rep.add(
        sec,
        "box deltas (rel)",
        _rel(
            inter[f"train_stage{k}_box_deltas"][oi[:, 0], oi[:, 1]], npz[f"stage{k}_box_deltas"][ri]
        ),
        1e-4,
    )

  # -- losses --------------------------------------------------------------------------------------
  sec = "loss"
  names = [str(name) for name in npz.get("loss_names", LOSS_NAMES)]
  for name in names:
    ref = float(npz[name])
    rep.add(
        sec,
        name,
        abs(float(losses[name]) - ref) / max(abs(ref), 1e-30),
        1e-4,
        f"{float(losses[name]):.8g} vs {ref:.8g}",
    )
  rep.add(
      sec,
      "total",
      abs(float(out["total"]) - float(npz["loss_total"])) / abs(float(npz["loss_total"])),
      1e-4,
      f"{float(out['total']):.8g} vs {float(npz['loss_total']):.8g}",
  )
  extra = sorted(key for key in losses if not key.startswith("aux/") and key not in names)
  rep.add(sec, "loss terms (set)", len(extra), 0, f"extra: {extra}" if extra else "9 terms")

  # -- gradients -----------------------------------------------------------------------------------
  add_grad_rows(rep, "grad", grads_json["params"], grads, runner, tol=1e-3)
  sec = "grad full"
  full_keys = [str(key) for key in npz["grad_full_keys"]]
  worst, worst_key = 0.0, ""
  rel = {}
  for key in full_keys:
    g = grads[runner.keymap.path[key]]
    ref = runner.keymap.to_flax(key, npz[f"grad__{key}"])
    if g.shape != ref.shape:
      rel[key] = np.inf
    else:
      rel[key] = _rel(g, ref)
    if rel[key] >= worst:
      worst, worst_key = rel[key], key
  rep.details["grad_full_rel"] = rel
  rep.add(
      sec,
      f"{len(full_keys)} full gradient tensors (rel, max norm)",
      worst,
      1e-3,
      f"worst {worst_key}",
  )
  return rep


def add_grad_rows(
    rep: Report,
    sec: str,
    ref_params: Sequence[dict],
    grads: dict,
    runner: TrainRunner,
    tol: float,
    sum_key="grad_sum",
    abs_key="grad_abs_sum",
    max_key: Optional[str] = None,
    tiny_key: Optional[str] = None,
    check_set: bool = True,
) -> None:
  """Per-parameter gradient checksums: abs-sum to relative `tol`, signed sum within `tol` x the
  abs-sum (sums can cancel towards 0: TRAIN_README §8). One row each, worst tensor named.

  Tensors whose oracle gradient is below `UNDERFLOW` everywhere (max |g| from `tiny_key` or
  `max_key`, else the abs-sum) are float32-underflow noise: XLA on CPU flushes subnormals to zero where torch
  keeps them, so their checksums differ by O(1) relative while neither can move a weight
  (lr * 1e-30 is far below a float32 ulp of any weight). They get their own row: ours must be
  below `UNDERFLOW` too."""
  if check_set:
    trainable = _trainable_paths(runner)
    ref_keys = [param["key"] for param in ref_params]
    unknown = [key for key in ref_keys if key not in runner.keymap.path]
    ours_only = sorted(set(trainable) - {runner.keymap.path.get(key) for key in ref_keys})
    rep.add(
        sec,
        "trainable tensors (set)",
        len(unknown) + len(ours_only),
        0,
        f"{len(ref_keys)} oracle keys; "
        + (f"unmapped {unknown[:3]} " if unknown else "")
        + (f"ours only {ours_only[:3]}" if ours_only else "all mapped"),
    )
  e_abs, e_sum, e_max, tiny = {}, {}, {}, {}
  for param in ref_params:
    key = param["key"]
    if key not in runner.keymap.path:
      continue
    g = np.asarray(grads[runner.keymap.path[key]], np.float64)
    a = float(param[abs_key])
    ours_max = float(np.abs(g).max()) if g.size else 0.0
    size_key = tiny_key or max_key or abs_key
    if float(param[size_key]) < UNDERFLOW:
      tiny[key] = ours_max
      continue
    e_abs[key] = abs(float(np.abs(g).sum()) - a) / max(a, 1e-30)
    e_sum[key] = abs(float(g.sum()) - float(param[sum_key])) / max(a, 1e-30)
    if max_key:
      e_max[key] = abs(ours_max - float(param[max_key])) / float(param[max_key])
  rep.details[f"{sec}_{abs_key}_rel"] = e_abs
  rep.details[f"{sec}_{sum_key}_err"] = e_sum
  rows = [(abs_key, e_abs, "relative"), (sum_key, e_sum, f"|diff| / {abs_key}")]
  if max_key:
    rows.append((max_key, e_max, "relative"))
  for name, e, what in rows:
    worst = max(e, key=e.get) if e else ""
    bad = sum(v > tol for v in e.values())
    rep.add(
        sec,
        f"{name} ({len(e)} tensors)",
        e.get(worst, 0.0),
        tol,
        f"{what}; worst {worst}" + (f"; {bad} over" if bad else ""),
    )
  if tiny:
    worst = max(tiny, key=tiny.get)
    rep.add(
        sec,
        f"{len(tiny)} tensors with oracle |g| < {UNDERFLOW:g}: ours max |g|",
        tiny[worst],
        UNDERFLOW,
        f"float32 underflow, excluded above; worst {worst}",
    )


def _trainable_paths(runner: TrainRunner) -> list:
  # Kept local: main() sets JAX_PLATFORMS, which jax reads when it is imported.
  from cn2_jax.engine.optim import FROZEN, param_labels

  labels = flat_params(param_labels(runner.params0, runner.frozen_prefixes))
  return [p for p, l in labels.items() if l != FROZEN]


# ----------------------------------------------------------------------------------------------
# Three SGD iterations (TRAIN_README §10)
# ----------------------------------------------------------------------------------------------
def solver_config(steps_json: dict):
  """`config.optim` from the oracle's merged solver settings (JSON `solver`); raises on settings
  this project's optimizer does not have (so a different oracle cannot silently pass)."""
  solver = steps_json["solver"]
  if (
      solver.get("NESTEROV")
      or float(solver.get("BIAS_LR_FACTOR", 1.0)) != 1.0
      or solver.get("WEIGHT_DECAY_BIAS") is not None
      or solver.get("AMP")
  ):
    raise ValueError(f"oracle solver settings not supported: {solver}")
  clip = solver.get("CLIP_GRADIENTS", {})
  if clip.get("ENABLED") and clip.get("CLIP_TYPE") != "value":
    raise ValueError(f"only value clipping is supported, got {clip}")
  if (
      solver.get("LR_SCHEDULER_NAME") != "WarmupMultiStepLR"
      or solver.get("WARMUP_METHOD") != "linear"
  ):
    raise ValueError(f"unsupported lr scheduler {solver.get('LR_SCHEDULER_NAME')}")
  optim_cfg = base_config().optim
  optim_cfg.base_lr = float(solver["BASE_LR"])
  optim_cfg.momentum = float(solver["MOMENTUM"])
  optim_cfg.weight_decay = float(solver["WEIGHT_DECAY"])
  optim_cfg.weight_decay_norm = float(solver["WEIGHT_DECAY_NORM"])
  optim_cfg.warmup_iters = int(solver["WARMUP_ITERS"])
  optim_cfg.warmup_factor = float(solver["WARMUP_FACTOR"])
  optim_cfg.steps = tuple(int(v) for v in solver["STEPS"])
  optim_cfg.gamma = float(solver["GAMMA"])
  optim_cfg.max_iter = int(solver["MAX_ITER"])
  optim_cfg.schedule = "multistep"
  optim_cfg.clip_value = float(clip.get("CLIP_VALUE", 0.0)) if clip.get("ENABLED") else 0.0
  return optim_cfg


class Optimizer:
  """This project's optimizer as the train loop builds it (`engine/loop.py`: `make_lr_schedule`
  and `make_optimizer(config.optim, None, frozen_prefixes)`), applied as `engine/step.py` does:
  frozen gradients zeroed, `tx.update`, `optax.apply_updates`."""

  def __init__(self, optim_cfg, frozen_prefixes):
    # Kept local: main() sets JAX_PLATFORMS, which jax reads when it is imported.
    import jax
    import jax.numpy as jnp
    import optax
    from cn2_jax.engine import optim

    self.cfg = optim_cfg
    self.schedule = optim.make_lr_schedule(optim_cfg)
    self.tx = optim.make_optimizer(optim_cfg, None, frozen_prefixes)
    self.frozen_prefixes = tuple(frozen_prefixes)

    def update(params, opt_state, grads):
      labels = optim.param_labels(grads, self.frozen_prefixes)
      grads = jax.tree.map(
          lambda g, l: jnp.zeros_like(g) if l == optim.FROZEN else g, grads, labels
      )
      updates, opt_state = self.tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    self.update = jax.jit(update)

  def init(self, params):
    return self.tx.init(params)


def momentum_buffers(opt_state) -> dict:
  """'.'-joined param path -> momentum buffer, merged over the optimizer's groups (the `trace`
  of every `optax.TraceState` in the state; masked-out leaves are `MaskedNode`s)."""
  # Kept local: main() sets JAX_PLATFORMS, which jax reads when it is imported.
  import jax
  import optax

  out = {}
  states = jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.TraceState))
  for st in states:
    if not isinstance(st, optax.TraceState):
      continue
    leaves = jax.tree_util.tree_flatten_with_path(
        st.trace, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
    )[0]
    for kp, v in leaves:
      if isinstance(v, optax.MaskedNode):
        continue
      p = _path(kp)
      if p in out:
        raise ValueError(f"{p}: momentum buffer in two groups")
      out[p] = np.asarray(v)
  return out


def _sums(x) -> tuple:
  x = np.asarray(x, np.float64)
  return float(x.sum()), float(np.abs(x).sum())


def iteration_counts(inter: dict, num_classes: int) -> dict:
  """The JSON `iterations[t].counts` of this project's run."""
  k, rows, fg = 0, [], []
  while f"train_stage{k}_valid" in inter:
    v = inter[f"train_stage{k}_valid"]
    rows.append(v.sum(1).tolist())
    fg.append(((inter[f"train_stage{k}_labels"] < num_classes) & v).sum(1).tolist())
    k += 1
  return dict(
      proposals=inter["proposal_valid"].sum(1).tolist(),
      stage_rows=rows,
      stage_fg=fg,
      cn_num_pos=int(np.rint(inter["train_cn_pos_count"].sum())),
      cn_num_reg=int(inter["train_cn_reg_valid"].sum()),
  )


def _loss_terms_comparable(counts_ours: dict, counts_ref: dict) -> dict:
  """Which loss terms a count mismatch leaves comparable (TRAIN_README §10.7.3): CenterNet terms
  need the positives / regression locations; a stage's terms need that stage's rows and fg rows
  and the proposals."""
  same = lambda k: counts_ours[k] == counts_ref[k]
  cn = same("cn_num_pos") and same("cn_num_reg")
  out = {"loss_centernet_agn_pos": cn, "loss_centernet_agn_neg": cn, "loss_centernet_loc": cn}
  for k in range(len(counts_ref["stage_rows"])):
    ok = (
        same("proposals")
        and counts_ours["stage_rows"][: k + 1] == counts_ref["stage_rows"][: k + 1]
        and counts_ours["stage_fg"][: k + 1] == counts_ref["stage_fg"][: k + 1]
    )
    out[f"loss_cls_stage{k}"] = out[f"loss_box_reg_stage{k}"] = ok
  return out


# TRAIN_README §10.7 tolerances, per iteration t (index of the (3, N) arrays).
def _tols(t: int) -> dict:
  if t == 0:
    return dict(loss=1e-4, grad=1e-3, update=1e-3, param=1e-6)
  return dict(loss=1e-3 if t == 1 else 1e-2, grad=2e-2, update=1e-2, param=1e-5)


def run_and_compare_steps(
    npz_steps: dict, steps_json: dict, runner: TrainRunner, first: Optional[dict] = None, log=print
) -> Report:
  """Three (or T) iterations of forward, backward and this project's optimizer step on the
  oracle batch; `first` = the already computed iteration-0 output of `runner.step`."""
  # Kept local: main() sets JAX_PLATFORMS, which jax reads when it is imported.
  import jax
  import jax.numpy as jnp
  from cn2_jax.engine.optim import DECAY, FROZEN, NO_DECAY, param_labels

  rep = Report("Three SGD iterations vs the official oracle (TRAIN_README §10.7)")
  keys = [str(key) for key in npz_steps["param_keys"]]
  keymap = runner.keymap
  paths = [keymap.path[key] for key in keys]
  opt_cfg = solver_config(steps_json)
  opt = Optimizer(opt_cfg, runner.frozen_prefixes)
  num_iters = int(npz_steps["lr_used"].shape[0])

  # -- 1. static settings --------------------------------------------------------------------------
  sec = "settings"
  labels = flat_params(param_labels(runner.params0, runner.frozen_prefixes))
  wd_of = {DECAY: opt_cfg.weight_decay, NO_DECAY: opt_cfg.weight_decay_norm, FROZEN: None}
  ours_wd = np.array([np.nan if wd_of[labels[p]] is None else wd_of[labels[p]] for p in paths])
  bad = np.nonzero(~np.isclose(ours_wd, npz_steps["param_weight_decay"], rtol=0, atol=0))[0]
  rep.add(
      sec,
      "weight-decay group of every key (mismatches)",
      len(bad),
      0,
      f"{int((npz_steps['param_weight_decay'] == 0).sum())} keys without decay"
      + (f"; e.g. {keys[bad[0]]}" if len(bad) else ""),
  )
  trainable = set(_trainable_paths(runner))
  rep.add(
      sec,
      "trainable set == oracle param_keys",
      len(trainable ^ set(paths)),
      0,
      f"{len(trainable)} vs {len(paths)}",
  )
  lr = np.array([float(opt.schedule(t)) for t in range(num_iters)])
  rep.add(
      sec,
      "lr at each step (rel)",
      np.abs(lr[:, None] - npz_steps["lr_used"]).max() / np.abs(npz_steps["lr_used"]).max(),
      1e-6,
      f"{lr.tolist()}",
  )
  rep.add(sec, "momentum", abs(opt_cfg.momentum - float(npz_steps["momentum"])), 0)
  rep.add(
      sec,
      "clip value (per element, raw gradient)",
      abs(opt_cfg.clip_value - float(npz_steps["clip_value"])),
      0,
  )
  groups = steps_json.get("param_groups", [])
  rep.add(
      sec,
      "nesterov False, dampening 0 (oracle groups)",
      sum(bool(g.get("nesterov")) or float(g.get("dampening", 0)) != 0 for g in groups),
      0,
      "this project's SGD: optax.trace(nesterov=False), no dampening",
  )

  # -- 2. iterations -------------------------------------------------------------------------------
  params = jax.tree.map(jnp.asarray, runner.params0)
  opt_state = opt.init(params)
  p0 = {p: np.asarray(v) for p, v in flat_params(runner.params0).items()}
  prev = p0
  for t in range(num_iters):
    tol = _tols(t)
    sec = f"iter {t}"
    t0 = time.perf_counter()
    out = first if (t == 0 and first is not None) else runner.step(params, t)
    counts = iteration_counts(out["inter"], runner.cfg.model.num_classes)
    ref_counts = steps_json["iterations"][t]["counts"]
    cmp = {k: counts[k] == ref_counts[k] for k in ref_counts}
    rep.add(
        sec,
        "counts (proposals, stage rows, fg rows, CN pos/reg)",
        sum(not v for v in cmp.values()),
        0,
        f"ours {counts}"
        if not all(cmp.values())
        else f"proposals {ref_counts['proposals']}, rows {ref_counts['stage_rows']}, "
        f"fg {ref_counts['stage_fg']}",
    )
    comparable = _loss_terms_comparable(counts, ref_counts)
    loss_names = [str(name) for name in npz_steps["loss_names"]]
    worst, worst_k, skipped = 0.0, "", []
    for loss_name in loss_names:
      ref = (
          float(npz_steps[f"loss_{loss_name}"][t])
          if f"loss_{loss_name}" in npz_steps
          else float(npz_steps[loss_name][t])
      )
      if not comparable[loss_name]:
        skipped.append(loss_name)
        continue
      ours = float(out["losses"][loss_name])
      if ref == 0.0:  # the exact 0.0 terms (TRAIN_README §10.7.3): absolute 1e-6
        e = abs(ours) / 1e-6 * tol["loss"]
      else:
        e = abs(ours - ref) / abs(ref)
      if e >= worst:
        worst, worst_k = e, loss_name
    rep.add(
        sec,
        f"{len(loss_names) - len(skipped)} loss terms (rel; 0.0 terms abs 1e-6)",
        worst,
        tol["loss"],
        f"worst {worst_k}" + (f"; not comparable (counts differ): {skipped}" if skipped else ""),
    )
    if all(comparable.values()):
      ref_tot = float(npz_steps["loss_total"][t])
      rep.add(
          sec,
          "total loss (rel)",
          abs(float(out["total"]) - ref_tot) / abs(ref_tot),
          tol["loss"],
          f"{float(out['total']):.8g} vs {ref_tot:.8g}",
      )

    grads = out["grads"]
    fields = (
        "grad_raw_sum",
        "grad_raw_abs_sum",
        "grad_raw_max_abs",
        "grad_clipped_sum",
        "grad_clipped_abs_sum",
    )
    ref_steps = [
        dict(key=k, **{f: float(npz_steps[f][t, i]) for f in fields}) for i, k in enumerate(keys)
    ]
    add_grad_rows(
        rep,
        sec,
        ref_steps,
        grads,
        runner,
        tol["grad"],
        "grad_raw_sum",
        "grad_raw_abs_sum",
        "grad_raw_max_abs",
        check_set=False,
    )
    clip = opt_cfg.clip_value
    n_clip = np.array([int((np.abs(grads[p]) > clip).sum()) for p in paths])
    ref_clip = npz_steps["grad_num_clipped"][t]
    # Only |g| within rounding of the clip value can flip: allow a few elements per tensor at
    # step 1, and the gradients' own tolerance (as a fraction of the count) later.
    allow = np.maximum(3, np.ceil(tol["grad"] * ref_clip))
    d = np.abs(n_clip - ref_clip)
    rep.add(
        sec,
        "clipped elements |g| > clip (per tensor count diff)",
        d.max(),
        float(allow[int(d.argmax())]),
        f"total {int(n_clip.sum())} vs {int(ref_clip.sum())}",
        ok=bool((d <= allow).all()),
    )
    clipped = {p: np.clip(grads[p], -clip, clip) for p in paths}
    add_grad_rows(
        rep,
        sec,
        ref_steps,
        clipped,
        runner,
        tol["grad"] if t else tol["update"],
        "grad_clipped_sum",
        "grad_clipped_abs_sum",
        tiny_key="grad_raw_max_abs",
        check_set=False,
    )

    # This project's optimizer step on the raw gradient pytree.
    params, opt_state = opt.update(params, opt_state, out["grads_tree"])
    new = {p: np.asarray(v) for p, v in flat_params(params).items()}
    bufs = momentum_buffers(opt_state)
    frozen_moved = [p for p in new if p not in trainable and not np.array_equal(new[p], p0[p])]
    rep.add(sec, "frozen (stem/res2) tensors unchanged", len(frozen_moved), 0)

    for name, ours_fn, ref_s, ref_a, tl in (
        ("param", lambda p: new[p], "param_sum", "param_abs_sum", tol["param"]),
        (
            "delta",
            lambda p: new[p].astype(np.float64) - prev[p].astype(np.float64),
            "delta_sum",
            "delta_abs_sum",
            tol["update"],
        ),
        ("momentum", lambda p: bufs[p], "momentum_sum", "momentum_abs_sum", tol["update"]),
    ):
      e_abs, e_sum = np.zeros(len(keys)), np.zeros(len(keys))
      for i, path in enumerate(paths):
        s, a = _sums(ours_fn(path))
        ra = float(npz_steps[ref_a][t, i])
        e_abs[i] = abs(a - ra) / max(ra, 1e-30)
        e_sum[i] = abs(s - float(npz_steps[ref_s][t, i])) / max(ra, 1e-30)
      rep.add(sec, f"{ref_a} (rel)", e_abs.max(), tl, f"worst {keys[int(e_abs.argmax())]}")
      rep.add(
          sec, f"{ref_s} (|diff| / abs-sum)", e_sum.max(), tl, f"worst {keys[int(e_sum.argmax())]}"
      )
    dm = np.array([float(np.abs(new[p].astype(np.float64) - prev[p]).max()) for p in paths])
    e = np.abs(dm - npz_steps["delta_max_abs"][t]) / np.maximum(
        npz_steps["delta_max_abs"][t], 1e-30
    )
    rep.add(sec, "delta_max_abs (rel)", e.max(), tol["update"], f"worst {keys[int(e.argmax())]}")
    prev = new
    log(f"iteration {t}: {time.perf_counter() - t0:.1f} s")

  # -- 3. full tensors after the last step ---------------------------------------------------------
  sec = f"after step {num_iters}"
  full = [str(key) for key in npz_steps["full_keys"]]
  l2_p, l2_b, ac_p, ac_b = {}, {}, {}, {}
  for key in full:
    path = keymap.path[key]
    ref_p = keymap.to_flax(key, npz_steps[f"param_after3__{key}"]).astype(np.float64)
    ref_b = keymap.to_flax(key, npz_steps[f"momentum_after3__{key}"]).astype(np.float64)
    init = p0[path].astype(np.float64)
    dp_ours, dp_ref = new[path].astype(np.float64) - init, ref_p - init
    l2_p[key] = np.linalg.norm(dp_ours - dp_ref) / max(np.linalg.norm(dp_ref), 1e-30)
    l2_b[key] = np.linalg.norm(bufs[path] - ref_b) / max(np.linalg.norm(ref_b), 1e-30)
    # allclose as a ratio: max |a - b| / (atol + rtol |b|) <= 1
    ac_p[key] = float(
        (np.abs(dp_ours - dp_ref) / (2e-2 * np.abs(dp_ref).max() + 2e-2 * np.abs(dp_ref))).max()
    )
    ac_b[key] = float(
        (np.abs(bufs[path] - ref_b) / (5e-2 * np.abs(ref_b).max() + 5e-2 * np.abs(ref_b))).max()
    )
  rep.details.update(l2_param_change=l2_p, l2_momentum=l2_b)
  for name, d, tl in (
      ("p3 - p0 relative L2", l2_p, 1e-2),
      ("momentum relative L2", l2_b, 1e-2),
      ("p3 - p0 allclose(2e-2, 2e-2 max) ratio", ac_p, 1.0),
      ("momentum allclose(5e-2, 5e-2 max) ratio", ac_b, 1.0),
  ):
    worst_name = max(d, key=d.get)
    rep.add(sec, f"{name} ({len(d)} tensors)", d[worst_name], tl, f"worst {worst_name}")
  return rep


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------
def run(
    npz_path,
    grads_path,
    steps_path=None,
    steps_json_path=None,
    oracle_json=None,
    cap: Optional[tuple] = None,
    log=print,
    runner: Optional[TrainRunner] = None,
):
  """Returns (one_step_report, steps_report or None, runner). The oracle weights JSON defaults
  to the one beside `npz_path`, then to `oracle.oracle_json_path()`; `cap` (cap_h, cap_w) starts
  the adaptive ROIAlign at that cap instead of the one the oracle's boxes need (the runner still
  raises it whenever a later iteration's boxes need more)."""
  npz = load_npz(npz_path)
  with open(grads_path) as f:
    grads_json = json.load(f)
  if oracle_json is None and (Path(npz_path).parent / ORACLE_JSON).is_file():
    oracle_json = Path(npz_path).parent / ORACLE_JSON
  if runner is None:
    runner = TrainRunner(npz, oracle_json, cap=cap, log=log)
  log(f"batch {tuple(runner.batch['image'].shape)}, ROIAlign cap {runner.cap}")
  t0 = time.perf_counter()
  first = runner.step(runner.params0, 0)
  log(f"iteration 0 (compile + run): {time.perf_counter() - t0:.1f} s")
  one = compare_one_step(npz, grads_json, first, runner)
  steps = None
  if steps_path is not None:
    npz_s = load_npz(steps_path)
    with open(steps_json_path) as f:
      steps_json = json.load(f)
    changes = steps_json.get("config_changes", [])
    if "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE" in changes:
      value = changes[changes.index("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE") + 1]
      if int(value) != ORACLE_BATCH_SIZE_PER_IMAGE:
        raise ValueError(f"steps oracle used BATCH_SIZE_PER_IMAGE {value}")
    steps = run_and_compare_steps(npz_s, steps_json, runner, first=first, log=log)
  return one, steps, runner


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--npz", required=True, help="train_outputs_*.npz (one official step)")
  parser.add_argument("--grads", required=True, help="train_grads_*.json (gradient checksums)")
  parser.add_argument("--steps", help="train_steps_*.npz (three official SGD iterations)")
  parser.add_argument("--steps-json", help="train_steps_*.json")
  parser.add_argument("--weights-json", help="oracle weights JSON (default: beside --npz)")
  parser.add_argument(
      "--cap",
      help="initial adaptive ROIAlign cap 'H,W' (default: what the "
      "oracle's pooled boxes need; raised automatically when an iteration needs more)",
  )
  args = parser.parse_args(argv)
  if (args.steps is None) != (args.steps_json is None):
    parser.error("--steps and --steps-json go together")
  # The oracle is a float32 CPU run; on accelerators matmuls may run at reduced precision.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
  cap = tuple(int(part) for part in args.cap.split(",")) if args.cap else None
  one, steps, _ = run(
      args.npz, args.grads, args.steps, args.steps_json, args.weights_json, cap, log
  )
  print(one.table())
  ok = one.ok
  if steps is not None:
    print()
    print(steps.table())
    ok = ok and steps.ok
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
