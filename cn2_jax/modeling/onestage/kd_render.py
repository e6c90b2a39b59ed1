"""Rendering a detector's final detections into one-stage KD targets (issue 13: a CenterNet2
teacher for a one-stage student, `kd.py`).

A CenterNet2 teacher has no stride-4 heatmap: what it gives are per-class boxes and scores (after
its probabilistic scoring, per-class NMS and top-k). `render_detections` turns them into the three
maps a one-stage teacher outputs, `cls [N, H, W, C]`, `wh`, `reg` `[N, H, W, 2]` at the student's
output stride, so the student learns from them with the same KD losses (`kd.kd_teacher_losses`).

Rendering rule (per image; boxes xyxy in the student's input pixels, i.e. the padded batch canvas,
the frame of the student's GT boxes; `s` = stride):
  1. A detection is drawn iff it is `valid` and its score >= `score_thresh`; the others give
     nothing anywhere.
  2. It is mapped to the output grid exactly like a GT box of the student (`targets.py`): the box
     is scaled by 1 / s, c = its centre, wh = (x2 - x1, y2 - y1) in feature units, integer peak
     p = floor(c) (= the targets' trunc(c) since c >= 0 for boxes in the image), radius
     r = `targets.gaussian_radius_int(w, h, min_overlap, radius_formula)` (the student's
     `model.onestage` settings), and the Gaussian of `targets.draw_gaussians` (CN's
     `draw_umich_gaussian`: sigma = (2r + 1) / 6, truncated to the (2r + 1)^2 window around p,
     cropped at the borders).
  3. Its values are multiplied by the detection's score, so its peak value is the score.
  4. `cls[..., k]` = the element-wise max over the drawn detections of class k (0 where none).
  5. `wh` and `reg` at a pixel: the wh (feature units, as the student's wh target) and the
     sub-pixel offset c - p (as the student's reg target) of the drawn detection whose
     score-scaled Gaussian value is the largest there, over all classes (ties: the lower
     detection index, i.e. the higher score for score-sorted detections); 0 where no drawn
     detection has a positive value.
With score 1 a detection renders exactly the student's GT heatmap of that box, and wh / reg at its
peak equal the student's GT wh / reg targets.

Why wh / reg only matter at the peaks: the KD wh / reg losses weight each pixel by
m = max over classes of the per-class 3x3 pseudo-NMS of the teacher heatmap (`kd.peak_mask`), so
a pixel counts only where it is a 3x3 local maximum of some class channel, with that value as its
weight. A rendered Gaussian strictly decreases away from its peak inside its window, so (maps
cropped at the borders aside) a channel's local maxima are the peaks of its drawn detections,
minus those under a stronger same-class Gaussian nearby; the weight there is the detection's
score. At such a peak the wh / reg are the detection's own, unless a detection of another class is
stronger at that very pixel (then that one's, as the class-agnostic student maps can hold one
value). Values away from the peaks have weight 0; they only make the maps dense.

Vectorised: per image every detection's Gaussian is evaluated on the whole map (`[K, H, W]`, fine
for K <= ~100 at stride 4), then a scatter-max per class and an argmax over detections. Static
shapes; jit-able (every argument but the arrays is static).
"""

from __future__ import annotations

import functools
from typing import Dict, Tuple

import jax
import jax.numpy as jnp

from cn2_jax.modeling.onestage.targets import draw_gaussians, gaussian_radius_int


def render_image(
    boxes: jax.Array,
    scores: jax.Array,
    classes: jax.Array,
    valid: jax.Array,
    *,
    out_hw: Tuple[int, int],
    num_classes: int,
    stride: int,
    min_overlap: float,
    radius_formula: str,
    score_thresh: float,
) -> Dict[str, jax.Array]:
  """`render_detections` for one image: `[K, 4]`, `[K]`, `[K]`, `[K]` -> `cls [H, W, C]`,
  `wh`, `reg` `[H, W, 2]` float32."""
  num_boxes = boxes.shape[0]
  grid_boxes = jnp.asarray(boxes, jnp.float32) * jnp.float32(
      1.0 / stride
  )  # as targets.py scales GT
  scores = jnp.asarray(scores, jnp.float32)
  centers = (grid_boxes[:, :2] + grid_boxes[:, 2:]) / jnp.float32(2)
  peaks = jnp.floor(centers).astype(jnp.int32)
  wh = grid_boxes[:, 2:] - grid_boxes[:, :2]
  reg = centers - peaks.astype(jnp.float32)
  radii = gaussian_radius_int(wh[:, 0], wh[:, 1], min_overlap, radius_formula)
  keep = jnp.asarray(valid, bool) & (scores >= jnp.float32(score_thresh))
  # every detection in its own channel: [H, W, K] unit-peak Gaussians (0 for dropped ones)
  gaussians = draw_gaussians(
      out_hw, peaks, radii, jnp.arange(num_boxes, dtype=jnp.int32), keep, num_boxes
  )
  vals = jnp.transpose(gaussians, (2, 0, 1)) * scores[:, None, None]  # [K, H, W], peak = score
  cls = jnp.where(keep, jnp.asarray(classes, jnp.int32), num_classes)  # dropped -> out of range
  heat = jnp.zeros((num_classes,) + tuple(out_hw), jnp.float32).at[cls].max(vals, mode="drop")
  best = jnp.argmax(vals, axis=0)  # [H, W], first (lowest index) of ties
  reached = jnp.max(vals, axis=0) > 0
  pick = lambda x: jnp.where(reached[..., None], x[best], 0.0)  # noqa: E731  [H, W, 2]
  return {"cls": jnp.transpose(heat, (1, 2, 0)), "wh": pick(wh), "reg": pick(reg)}


def render_detections(
    boxes: jax.Array,
    scores: jax.Array,
    classes: jax.Array,
    valid: jax.Array,
    *,
    out_hw: Tuple[int, int],
    num_classes: int,
    stride: int,
    min_overlap: float,
    radius_formula: str,
    score_thresh: float,
) -> Dict[str, jax.Array]:
  """Soft one-stage KD targets from detections (the rule in the module docstring).

  Args:
    boxes: `[N, K, 4]` xyxy in the student's input pixels (the padded batch canvas).
    scores: `[N, K]` detection scores in [0, 1].
    classes: `[N, K]` int class ids 0..num_classes-1.
    valid: `[N, K]` bool.
    out_hw: (H, W) of the output maps (the canvas // stride; static).
    num_classes: C, the teacher's class count (static).
    stride: the student's output stride (`model.onestage.down_scale`).
    min_overlap, radius_formula: the student's Gaussian radius settings (`model.onestage`).
    score_thresh: detections below it are not drawn (`kd.render_score_thresh`).
  Returns:
    `cls [N, H, W, C]`, `wh [N, H, W, 2]` (feature units), `reg [N, H, W, 2]`, float32.
  """
  fn = functools.partial(
      render_image,
      out_hw=tuple(int(x) for x in out_hw),
      num_classes=int(num_classes),
      stride=int(stride),
      min_overlap=float(min_overlap),
      radius_formula=radius_formula,
      score_thresh=float(score_thresh),
  )
  return jax.vmap(fn)(boxes, scores, classes, valid)
