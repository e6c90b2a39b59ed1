"""`python -m cn2_jax.export`: a trained model as one self-contained file for deployment.

Usage:
  python -m cn2_jax.export --workdir runs/demo --out demo.stablehlo        # --format stablehlo
  python -m cn2_jax.export --workdir DIR --config configs/cn2_r50.py --weights W.pth \
      --out cn2_r50.stablehlo --batch 1 --height 800 --width 1088
  python -m cn2_jax.export --workdir runs/demo --format onnx --out demo.onnx   # optional extra
  python -m cn2_jax.export --workdir runs/centernet_demo --format onnx --out det.onnx [--batch 1]

The model is the one `--mode=predict` (cn2_jax.predictor.Predictor) runs: the run's config.json
(that of the run `--weights` belongs to, else DIR's; `--config FILE` when there is none) and
`--weights`, else DIR's newest checkpoint. It is built by `detector.build_model(config.model)`, so
every registered family (`model.arch`: centernet2, onestage) exports. Besides FILE the CLI writes
FILE.json (signature, class names, resize settings, jax version) and prints the file size and the
signature.

StableHLO (`--format stablehlo`, the default): `jax.export` of the Predictor's whole forward:
  preprocessing (uint8 -> float, channel order, mean/std, zeros outside image_hw), backbone,
  heads, then CenterNet2's proposal decode + NMS, ROIAlign, cascade and final NMS, or the
  one-stage peak decode. The weights are baked in as constants, so the file is self-contained:
  4 bytes per parameter plus ~0.1 MB (the tiny model of tests/test_export.py, 3.2 M parameters:
  12.4 MiB; CenterNet2 R-50 / configs/cn2_r50.py, 71.8 M parameters: 273.4 MiB).
  Signature:
    inputs   image     uint8 [N, H, W, 3]  RGB, the (resized) image at the top-left, zeros at
                                           the bottom/right
             image_hw  int32 [N, 2]        valid (height, width) of each image
             orig_hw   int32 [N, 2]        only with --orig-hw: each image's size before resizing
    outputs  a dict (flat order by sorted key: boxes, classes, scores, valid):
             boxes     float32 [N, K, 4]   xyxy in input pixels (the pixels of `image`), clipped
                                           to image_hw; with --orig-hw, in original pixels
                                           (exactly what the Predictor returns)
             scores    float32 [N, K]      highest first
             classes   int32   [N, K]      contiguous labels 0..C-1 (names in FILE.json)
             valid     bool    [N, K]      False for padding rows and empty boxes
    K = model.roi_heads.detections_per_image (centernet2) or model.onestage.max_detections.
  Shapes: N is symbolic by default (`--batch b`, jax.export.symbolic_shape("b")): one file serves
  every batch size, each new size compiling once when called. `--batch N` fixes it. H and W are
  fixed (`--height/--width`, multiples of 32; default `data.pad_hw_test`, else
  `data.max_size_test` rounded up to 32 for both): CenterNet2's proposal decode takes the top
  min(pre_nms_topk, H_l * W_l) locations of each FPN level (modeling/proposal/decode.py), a count
  that must be static, so a symbolic H or W does not export. CenterNet2 computes on the batch's
  official canvas (its largest image_hw rounded up to 32, canvas.py), as the Predictor and eval
  do, so a larger H x W changes nothing, and the images of one batch share that canvas (call with
  N = 1 for the Predictor's per-image results). The one-stage model computes on the whole H x W
  (as centerX on its padded batch), so it gives the Predictor's detections when H x W is the
  Predictor's canvas (`data.pad_hw_test`, the default H x W when set).
  Should a family not export with a symbolic batch, the CLI says so in one line and exports a
  batch of 1.
  Not in the file: decoding and resizing. Resize as the Predictor does (shortest edge
  `data.min_size_test`, long side <= `data.max_size_test`, both in FILE.json), paste the result
  at the top-left of a zero H x W canvas, and divide the boxes by the resize factor (or pass
  orig_hw to a file exported with --orig-hw).
  Platforms: lowered for both cpu and cuda (`--platforms`); the same file runs on either.
  Loading and running it needs only jax (and flatbuffers), not cn2_jax or flax:
    import jax, numpy as np
    with open("demo.stablehlo", "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    out = exported.call(image_uint8_nhwc, np.array([[h, w]], np.int32))    # a dict of arrays
    keep = np.asarray(out["valid"][0])
    boxes, scores, classes = (np.asarray(out[k][0])[keep] for k in ("boxes", "scores", "classes"))
  jax.export keeps files loadable by later jax versions (its ~6-month compatibility window); the
  exporting version is in FILE.json.

ONNX (`--format onnx`, optional: `pip install -r requirements-onnx.txt` (jax2onnx 0.12.5,
  onnxruntime), best in a separate venv; scripts/test_onnx.sh makes one and runs the tests).
  What converts depends on the family (`--onnx-part`, `ONNX_PARTS`; inputs image, image_hw as
  above, batch symbolic by default, `--batch N` fixes it):
    onestage, `detector` (default): the whole detector, the StableHLO file's graph and outputs
      (boxes, scores, classes, valid, in that order; `--orig-hw` adds the orig_hw input):
      preprocessing, backbone, neck (with DCN: model.onestage.use_deform=True converts),
      heads, the pseudo-NMS, top-K per class then top-K overall, boxes, clipping.
    centernet2, `candidates` (default): the dense part (below) plus the proposal decode up to
      its NMS: per FPN level the top min(pre_nms_topk_test, H_l W_l) locations by
      sigmoid(logit) (off-canvas ones and those <= inference_thresh excluded) decoded into boxes:
        cand_boxes [N, Kc, 4] float32  xyxy in input pixels (clipped only with clip_proposals)
        cand_scores [N, Kc] float32    sqrt(p), 0 where invalid
        cand_valid [N, Kc] bool        Kc = sum_l min(pre_nms_topk_test, H_l W_l)
      The host runs the rest: the class-agnostic NMS and top post_nms_topk_test
      (`centernet2_proposals` gives the model's proposals from these), ROIAlign on p3..p7, the
      cascade and the final NMS.
    both, `dense`: preprocessing + backbone + heads, as centerX's ONNX export does (spec §6):
      centernet2: hm_logits_p3..p7 [N, H/s, W/s] objectness logits, p3..p7 [N, H/s, W/s,
        fpn_channels] the FPN features the ROI heads pool, reg_p3..p7 [N, H/s, W/s, 4] ltrb
        box distances in units of s (s = 8, 16, 32, 64, 128);
      onestage: cls [N, H/4, W/4, C] sigmoid heatmap, reg [N, H/4, W/4, 2] centre offsets,
        wh [N, H/4, W/4, 2] box sizes.
  Outputs are listed by name (sorted, for the parts other than `detector`).
  What does not convert with jax2onnx 0.12.5 (hence CenterNet2 stops at its proposal NMS):
    the NMS (ops/nms.py; proposals and final detections): "lax.sort with num_keys > 1 is not
      supported yet" (its sort by validity, score, index), and inside the proposal decode's
      vmap, earlier, "module 'jax.interpreters.batching' has no attribute 'not_mapped'" (the
      vmap rule of jnp.where; not_mapped was removed in jax 0.10); 0.17.1 stops in the NMS
      while-loop at "Unhandled internal op in Gather: {'op': 'general_gather', ... 'mode':
      'batched' ...}";
    ROIAlign converts, but its level assignment's frexp becomes a BitCast node that onnxruntime
      1.32 rejects at opset 18 ("No Op registered for BitCast with domain_version of 18").
  Ops traced in an equivalent form while converting (`onnx_friendly_ops`; each pair is checked
  for equal values in JAX by tests/test_export.py): ResNet's 3x3/2 max-pool and the pseudo-NMS's
  3x3 max-pool (a 4-D reduce_window becomes a MaxPool with 4 spatial dims, which onnxruntime
  rejects: "Unsupported pooling size"), the one-stage neck's transposed convolution (jax2onnx
  gives the ConvTranspose the window strides; replaced by a stride-1 conv of the kernel's phases
  + depth-to-space), lax.top_k (TopK's int64 indices left typed int32: onnxruntime refuses the
  graph, "Type parameter (T) of Optype (Add) bound to different types (tensor(int64) and
  tensor(int32))"; converted through approx_max_k, which jax2onnx gives the Cast), integer // and
  % (lax.rem fails on a symbolic batch: "Symbolic dimension 'b' used in a context that requires a
  constant"), and the deformable convolution (inside its jit: "No plugins registered for
  primitive 'stack' inside jit body"; its arange over a symbolic batch: "'_DynamicDimSentinel'
  object has no attribute 'rmax'"). The pseudo-NMS stays an equality with the 3x3 max-pooled
  heatmap (Equal + Mul): fp16-safe, unlike a 1e-9 / 1e9 trick (fp16 flushes 1e-9 to 0 and
  overflows 1e9 to inf); the pooled max is one of its inputs, bit for bit, in any precision.
  Opset 18 by default (jax2onnx writes ReduceMax with an axes input even at opset 17).
  onnxruntime (CPU) matches JAX: the one-stage detections are identical (same classes and
  order; boxes within 1e-3 px, scores within 1e-4; measured 4e-6 px / 7e-8), the dense maps
  within 1e-4 (of the output's magnitude for the unnormalised FPN features), CenterNet2's
  candidates and the proposals after the host NMS the same up to the order of scores equal
  within 1e-6 (tests/test_export.py). File sizes (the weights are constants, float32) and
  onnxruntime vs JAX CPU latency of the one-stage R18 at 512x512: bench/RESULTS.md
  (bench/onnx_latency.py). TensorRT, UNTESTED (no GPU here):
    trtexec --onnx=demo.onnx --saveEngine=demo.plan \
        --minShapes=image:1x160x160x3,image_hw:1x2 --optShapes=image:4x160x160x3,image_hw:4x2 \
        --maxShapes=image:8x160x160x3,image_hw:8x2 [--fp16]
  (no --*Shapes with --batch N; uint8 network inputs need TensorRT >= 8.6; TopK's K must stay
  <= 3840 in TensorRT: max_detections, and pre_nms_topk_test for CenterNet2's candidates).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

OUTPUT_KEYS = ("boxes", "scores", "classes", "valid")
DEFAULT_PLATFORMS = ("cpu", "cuda")
ONNX_INSTALL = "pip install -r requirements-onnx.txt"

Batch = Union[int, str]  # a fixed batch size or the name of a symbolic dimension


# ------------------------------------------------------------------------------ model to export
def load_config(
    workdir: str, weights: str = "", config_file: Optional[str] = None
) -> ml_collections.ConfigDict:
  """The config `--mode=predict` would use: the run's config.json (that of the run `weights`
  belongs to, else `workdir`'s) with `weights` set; `config_file` (or the schema defaults) when
  there is no config.json."""
  from cn2_jax import app
  from cn2_jax.config import base_config, load_config_file

  cfg = load_config_file(config_file) if config_file else base_config()
  if weights:
    cfg.weights = weights
  return app.run_config(cfg, workdir, ["weights"] if weights else [])


def default_hw(cfg: ml_collections.ConfigDict) -> tuple[int, int]:
  """The exported canvas: `data.pad_hw_test` if set, else `max_size_test` rounded up to the size
  divisibility for both sides (every resized image fits, whatever its orientation)."""
  d = cfg.data
  if tuple(d.pad_hw_test):
    return tuple(int(v) for v in d.pad_hw_test)
  div = int(d.size_divisibility) or 1
  side = -(-int(d.max_size_test) // div) * div
  return side, side


def _check_hw(cfg, hw: Sequence[int]) -> tuple[int, int]:
  from cn2_jax.errors import ConfigError

  div = int(cfg.data.size_divisibility) or 1
  h, w = (int(v) for v in hw)
  if h <= 0 or w <= 0 or h % div or w % div:
    raise ConfigError(f"--height/--width must be positive multiples of {div}, got {h}x{w}")
  return h, w


def _batch_dim(batch: Batch):
  if isinstance(batch, str):
    (b,) = jax.export.symbolic_shape(batch)
    return b
  if batch < 1:
    raise ValueError(f"batch must be >= 1 or a symbolic name, got {batch}")
  return int(batch)


def input_specs(batch: Batch, hw: Sequence[int], orig_hw: bool = False) -> tuple:
  """ShapeDtypeStructs of (image, image_hw[, orig_hw]); `batch` a size or a symbolic name."""
  n = _batch_dim(batch)
  h, w = hw
  specs = [jax.ShapeDtypeStruct((n, h, w, 3), jnp.uint8), jax.ShapeDtypeStruct((n, 2), jnp.int32)]
  if orig_hw:
    specs.append(jax.ShapeDtypeStruct((n, 2), jnp.int32))
  return tuple(specs)


def detection_fn(predictor, orig_hw: bool = False) -> Callable:
  """The Predictor's forward with its variables closed over (they become constants):
  `(image, image_hw[, orig_hw]) -> {boxes, scores, classes, valid}`. Without `orig_hw` the boxes
  stay in input pixels (the Predictor's postprocessing with orig_hw = image_hw: clip, drop empty
  boxes)."""
  variables = predictor.variables

  def pick(out):
    return {k: out[k] for k in OUTPUT_KEYS}

  if orig_hw:
    return lambda image, image_hw, orig: pick(predictor._forward(variables, image, image_hw, orig))
  return lambda image, image_hw: pick(predictor._forward(variables, image, image_hw, image_hw))


def export_stablehlo(
    predictor,
    *,
    batch: Batch = "b",
    hw: Optional[Sequence[int]] = None,
    orig_hw: bool = False,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
) -> jax.export.Exported:
  """`jax.export` of the Predictor's detections (see the module docstring for the signature)."""
  hw = _check_hw(predictor.config, hw or default_hw(predictor.config))
  fn = jax.jit(detection_fn(predictor, orig_hw))
  return jax.export.export(fn, platforms=tuple(platforms))(*input_specs(batch, hw, orig_hw))


def serialize(exported: jax.export.Exported) -> bytes:
  try:
    return bytes(exported.serialize())
  except ImportError as e:  # jax's serializer needs the flatbuffers package
    from cn2_jax.errors import UserError

    raise UserError(f"{e} (pip install flatbuffers)") from e


def _aval(a) -> str:
  dims = ",".join(str(d) for d in a.shape)
  return f"{a.dtype}[{dims}]"


def stablehlo_signature(exported: jax.export.Exported, orig_hw: bool = False) -> dict:
  names = ["image", "image_hw"] + (["orig_hw"] if orig_hw else [])
  outs = jax.tree_util.tree_unflatten(exported.out_tree, [_aval(a) for a in exported.out_avals])
  return dict(
      inputs={n: _aval(a) for n, a in zip(names, exported.in_avals)},
      outputs={k: outs[k] for k in OUTPUT_KEYS},
      platforms=list(exported.platforms),
  )


# ------------------------------------------------------------------------------------------ ONNX
def _centernet2_maps(m, image, image_hw) -> tuple:
  """CenterNet2's FPN features, canvas masks and CenterNet head maps, on the official canvas
  exactly as `CenterNet2.__call__` computes them."""
  from cn2_jax.modeling.canvas import canvas_masks, official_canvas

  images = m.preprocess(image, image_hw)
  canvas = official_canvas(image_hw)
  feats = m.backbone(images, canvas)
  masks = canvas_masks(image_hw, [f.shape[1:3] for f in feats], m.proposal_generator.strides)
  return feats, masks, m.proposal_generator.centernet_head(feats, masks)


def _centernet2_named(feats, head) -> dict:
  out = {f"p{i + 3}": f for i, f in enumerate(feats)}
  out.update({f"hm_logits_p{i + 3}": h for i, h in enumerate(head["hm_logits"])})
  out.update({f"reg_p{i + 3}": r for i, r in enumerate(head["reg"])})
  return out


def _centernet2_dense(m, image, image_hw) -> dict:
  """CenterNet2 without proposals / ROI heads: the FPN features and CenterNet head maps."""
  feats, _, head = _centernet2_maps(m, image, image_hw)
  return _centernet2_named(feats, head)


def _centernet2_candidates(m, image, image_hw) -> dict:
  """The dense part plus the proposal decode before its NMS (`proposal_candidates`)."""
  feats, masks, head = _centernet2_maps(m, image, image_hw)
  out = _centernet2_named(feats, head)
  pg = m.proposal_generator
  out.update(
      proposal_candidates(
          head["hm_logits"],
          head["reg"],
          masks,
          strides=tuple(pg.strides),
          pre_nms_topk=int(pg.pre_nms_topk_test),
          score_thresh=float(pg.inference_thresh),
          clip_hw=image_hw if pg.clip_proposals else None,
      )
  )
  return out


def _onestage_dense(m, image, image_hw) -> dict:
  """One-stage CenterNet without the peak decode: the cls (sigmoid) / wh / reg head maps."""
  maps = m.maps(m.preprocess(image, image_hw))
  return {k: maps[k] for k in ("cls", "wh", "reg")}


# model.arch -> (module, image, image_hw) -> {name: array}: the dense part (backbone + heads).
DENSE_PARTS = {"centernet2": _centernet2_dense, "onestage": _onestage_dense}
# What --format onnx exports (`--onnx-part`; the first of each family is the default):
#   detector    the whole detector, the outputs of the StableHLO file (one-stage only);
#   candidates  CenterNet2's dense part + its proposal decode up to the NMS;
#   dense       the dense part only (DENSE_PARTS; the host decodes).
ONNX_PARTS = {"onestage": ("detector", "dense"), "centernet2": ("candidates", "dense")}
_MODULE_PARTS = {"dense": DENSE_PARTS, "candidates": {"centernet2": _centernet2_candidates}}


def _top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k` along the last axis; `onnx_friendly_ops` swaps in `_top_k_for_onnx`."""
  return jax.lax.top_k(x, k)


def _top_k_for_onnx(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k(x, k)` as `lax.approx_max_k(x, k, recall_target=1)`, for conversion only.
  jax2onnx 0.12.5 lowers both to an ONNX TopK (exact; equal values in index order, as
  `lax.top_k`), but its top_k rule leaves TopK's int64 indices typed as JAX's int32, so the first
  use of an index fails in onnxruntime ("Type parameter (T) of Optype (Add) bound to different
  types (tensor(int64) and tensor(int32))"), while its approx_top_k rule adds the Cast to int32.
  In JAX on CPU / GPU it is an exact sort-based top-k: the same values and indices, except that
  the order of equal values is not specified (TPUs approximate)."""
  return jax.lax.approx_max_k(x, k, recall_target=1.0)


def _divmod_for_onnx(a: jax.Array, b: int) -> tuple[jax.Array, jax.Array]:
  """`(a // b, a % b)` of non-negative int32 `a` by `lax.div` (truncation = floor here): jnp's
  `//` and `%` both emit `lax.rem`, whose jax2onnx rule fails on a symbolic batch ("Symbolic
  dimension 'b' used in a context that requires a constant")."""
  q = jax.lax.div(a, np.int32(b))
  return q, a - q * np.int32(b)


def proposal_candidates(
    hm_logits: Sequence[jax.Array],
    reg: Sequence[jax.Array],
    masks: Optional[Sequence[jax.Array]],
    *,
    strides: Sequence[int],
    pre_nms_topk: int,
    score_thresh: float,
    clip_hw: Optional[jax.Array] = None,
) -> dict:
  """Steps 1-3 of CenterNet2's proposal decode (modeling/proposal/decode.py) for a batch, in a
  form jax2onnx converts: per level the top min(pre_nms_topk, H_l W_l) locations by sigmoid(logit)
  (off-canvas locations and those <= score_thresh excluded), decoded into boxes, levels
  concatenated. `centernet2_proposals` (NMS, top post_nms_topk) turns them into the model's
  proposals.

  Returns `cand_boxes [B, Kc, 4]` float32 (unclipped xyxy pixels unless clip_hw), `cand_scores
  [B, Kc]` float32 = sqrt(p) (0 where invalid), `cand_valid [B, Kc]` bool, Kc = sum_l k_l.
  """
  boxes, scores, valid = [], [], []
  for lvl, (logits, ltrb, s) in enumerate(zip(hm_logits, reg, strides)):
    h, w = logits.shape[1], logits.shape[2]
    logits = logits.astype(jnp.float32)
    if masks is not None:  # off-canvas locations are never candidates (sigmoid(-inf) = 0)
      logits = jnp.where(masks[lvl], logits, -jnp.inf)
    p = jax.nn.sigmoid(logits.reshape(-1, h * w))
    top_p, idx = _top_k(jnp.where(p > score_thresh, p, -1.0), min(int(pre_nms_topk), h * w))
    ok = top_p > score_thresh
    s = int(s)
    ys, xs = _divmod_for_onnx(idx, w)
    gx = (xs * s + s // 2).astype(jnp.float32)
    gy = (ys * s + s // 2).astype(jnp.float32)
    d = ltrb.astype(jnp.float32).reshape(-1, h * w, 4) * jnp.float32(s)
    d = jnp.take_along_axis(d, idx[..., None], axis=1)  # [B, k, 4] pixels
    x1 = gx - d[..., 0]
    y1 = gy - d[..., 1]
    x2 = jnp.maximum(gx + d[..., 2], x1 + 0.01)
    y2 = jnp.maximum(gy + d[..., 3], y1 + 0.01)
    box = jnp.stack([x1, y1, x2, y2], axis=-1)
    if clip_hw is not None:
      hw = clip_hw.astype(jnp.float32)
      box = jnp.clip(box, 0.0, jnp.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], -1)[:, None])
    boxes.append(box)
    scores.append(jnp.sqrt(jnp.where(ok, top_p, 0.0)))
    valid.append(ok)
  return dict(
      cand_boxes=jnp.concatenate(boxes, axis=1),
      cand_scores=jnp.concatenate(scores, axis=1),
      cand_valid=jnp.concatenate(valid, axis=1),
  )


def centernet2_proposals(candidates: dict, centernet_config) -> dict:
  """The host's half of the proposal decode: class-agnostic NMS at `nms_thresh_test` and the top
  `post_nms_topk_test` of `proposal_candidates`' output (numpy or jax arrays), as
  `generate_proposals` does: `boxes [B, K, 4]`, `scores [B, K]`, `valid [B, K]` (padding zero).
  `centernet_config` is `config.model.centernet`."""
  from cn2_jax.modeling.ops.nms import nms

  c = centernet_config

  def single(boxes, scores, valid):
    keep, ok = nms(boxes, scores, valid, c.nms_thresh_test, int(c.post_nms_topk_test))
    return dict(
        boxes=jnp.where(ok[:, None], boxes[keep], 0.0),
        scores=jnp.where(ok, scores[keep], 0.0),
        valid=ok,
    )

  args = (candidates[k] for k in ("cand_boxes", "cand_scores", "cand_valid"))
  return jax.jit(jax.vmap(single))(*(jnp.asarray(a) for a in args))


def _check_part(arch: str, part: Optional[str]) -> str:
  from cn2_jax.errors import ConfigError

  if arch not in ONNX_PARTS:
    raise ConfigError(
        f"--format onnx has nothing to export for model.arch={arch!r} (export.ONNX_PARTS has "
        f"{sorted(ONNX_PARTS)})"
    )
  part = part or ONNX_PARTS[arch][0]
  if part not in ONNX_PARTS[arch]:
    raise ConfigError(
        f"--onnx-part {part} is not available for model.arch={arch!r}: "
        f"{', '.join(ONNX_PARTS[arch])}"
    )
  return part


def part_fn(predictor, part: Optional[str] = None, orig_hw: bool = False) -> tuple[Callable, list]:
  """`(image, image_hw[, orig_hw]) -> tuple of arrays` of an ONNX part (`ONNX_PARTS`; None = the
  family's default), the variables closed over, and its output names in order. Float outputs are
  float32; `orig_hw` only for the detector."""
  arch = predictor.config.model.arch
  part = _check_part(arch, part)
  if part == "detector":
    det = detection_fn(predictor, orig_hw)

    def detections(*args):
      out = det(*args)
      return tuple(out[k] for k in OUTPUT_KEYS)

    return detections, list(OUTPUT_KEYS)
  if orig_hw:
    from cn2_jax.errors import ConfigError

    raise ConfigError(f"--orig-hw needs the boxes of --onnx-part detector, not {part}")
  method, model, variables = _MODULE_PARTS[part][arch], predictor.model, predictor.variables
  shapes = jax.eval_shape(
      lambda i, h: model.apply(variables, i, h, method=method), *input_specs(1, (64, 64))
  )
  names = list(shapes)  # sorted by name: jax flattens (and eval_shape rebuilds) dicts by key

  def fn(image, image_hw):
    out = model.apply(variables, image, image_hw, method=method)
    return tuple(
        out[k].astype(jnp.float32) if jnp.issubdtype(out[k].dtype, jnp.floating) else out[k]
        for k in names
    )

  return fn, names


def dense_fn(predictor) -> tuple[Callable, list]:
  """`part_fn(predictor, "dense")`: backbone + heads (DENSE_PARTS), all outputs float32."""
  return part_fn(predictor, "dense")


def _pool_for_onnx(x: jax.Array) -> jax.Array:
  """`resnet.max_pool_3x3_s2_p1` as -inf padding + flax max_pool (VALID): the same values, as
  a 2-D MaxPool in ONNX."""
  import flax.linen as nn

  pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  return nn.max_pool(pad, window_shape=(3, 3), strides=(2, 2), padding="VALID")


def _pseudo_nms_for_onnx(heat: jax.Array, pool_size: int = 3) -> jax.Array:
  """`onestage.decode.pseudo_nms` with its 3x3 max-pool as -inf padding + a 2-D flax max_pool
  (VALID, stride 1): the same values. The suppression stays an equality with the pooled max
  (Equal + Mul in ONNX), safe in fp16: the pooled max is one of the inputs, bit for bit, and no
  1e-9 / 1e9 constant (which fp16 flushes to 0 / inf) is involved."""
  import flax.linen as nn

  p = (pool_size - 1) // 2
  pad = jnp.pad(heat, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-jnp.inf)
  hmax = nn.max_pool(pad, window_shape=(pool_size, pool_size), strides=(1, 1), padding="VALID")
  return heat * (hmax == heat).astype(heat.dtype)


def _topk_score_for_onnx(heat: jax.Array, k: int = 100):
  """`onestage.decode.topk_score` (per-class top-K, then top-K overall) with `_top_k` (converted
  as `_top_k_for_onnx`) and `_divmod_for_onnx`, the batch as -1 in reshapes: the same values and
  indices."""
  _, h, w, c = heat.shape
  per_class = jnp.transpose(heat, (0, 3, 1, 2)).reshape(-1, c, h * w)
  k1 = min(k, h * w)
  cls_scores, cls_inds = _top_k(per_class, k1)  # [B, C, K1]
  scores, idx = _top_k(cls_scores.reshape(-1, c * k1), min(k, c * k1))
  classes, _ = _divmod_for_onnx(idx, k1)
  pix = jnp.take_along_axis(cls_inds.reshape(-1, c * k1), idx, axis=1)
  ys, xs = _divmod_for_onnx(pix, w)
  return scores, pix, classes, ys, xs


def _transpose(x: jax.Array, perm: Sequence[int]) -> jax.Array:
  """`x.transpose(perm)` (perm[0] = 0, the batch), as a reshape when it only moves axes of size 1
  (one offset group): no Transpose node (a copy) in ONNX."""
  moved = [a for a in perm if x.shape[a] != 1 and a != 0]
  if moved == sorted(moved):
    return x.reshape((-1,) + tuple(x.shape[a] for a in perm[1:]))
  return x.transpose(perm)


def _deform_conv2d_for_onnx(
    x,
    offset,
    mask,
    kernel,
    bias=None,
    *,
    stride=1,
    padding=1,
    dilation=1,
    offset_groups=None,
    deformable_groups=None,
    precision=None,
):
  """`ops.dcn.deform_conv2d` (same arguments and semantics: zero-padded table, the four
  floor/floor+1 corners, validity and mask folded into the bilinear weights) in a form jax2onnx
  converts, with the same values up to float rounding:
    * not jitted: inside the op's `jax.jit` jax2onnx fails at "No plugins registered for
      primitive 'stack' inside jit body";
    * with a symbolic batch, a batched gather (`take_along_axis` on a `[B, G, Hp*Wp, Cg]`
      table) instead of a flat table indexed with `arange(B)`, which fails there
      ("'_DynamicDimSentinel' object has no attribute 'rmax'"); the batch is -1 in reshapes;
      with a static batch (`--batch N`) the op's flat gather (one Gather on axis 0: jax2onnx
      wraps the batched one in two full-size Transposes);
    * the corners weighted by batched [1, 4] x [4, Cg] matmuls and the columns contracted by a
      2-D matmul (MatMul nodes), where the op's einsum / dot give ONNX Einsum nodes;
    * size-1 group axes moved by reshapes, not transposes (`_transpose`)."""
  from cn2_jax.modeling.ops import dcn

  _, height, width, cin = x.shape
  kh, kw, _, cout = kernel.shape
  (sh, sw), (ph, pw), (dh, dw) = dcn._pair(stride), dcn._pair(padding), dcn._pair(dilation)
  ho, wo = dcn.deform_conv_output_size((height, width), (kh, kw), (sh, sw), (ph, pw), (dh, dw))
  taps = kh * kw
  groups = offset_groups if offset_groups is not None else deformable_groups
  groups = int(groups if groups is not None else offset.shape[-1] // (2 * taps))
  cg = cin // groups
  dtype = jnp.result_type(x.dtype, kernel.dtype)
  cdtype = jnp.promote_types(offset.dtype, jnp.float32)
  off = offset.astype(cdtype).reshape(-1, ho, wo, groups, taps, 2)
  tap_i, tap_j = np.repeat(np.arange(kh), kw), np.tile(np.arange(kw), kh)  # row-major taps
  base_y = (np.arange(ho) * sh - ph)[:, None] + tap_i[None, :] * dh  # [Ho, K]
  base_x = (np.arange(wo) * sw - pw)[:, None] + tap_j[None, :] * dw  # [Wo, K]
  py = jnp.asarray(base_y[None, :, None, None, :], cdtype) + off[..., 0]  # [B, Ho, Wo, G, K]
  px = jnp.asarray(base_x[None, None, :, None, :], cdtype) + off[..., 1]
  valid = (py > -1) & (py < height) & (px > -1) & (px < width)
  py = jnp.where(valid, py, jnp.zeros_like(py))
  px = jnp.where(valid, px, jnp.zeros_like(px))
  y0f, x0f = jnp.floor(py), jnp.floor(px)
  ly, lx = py - y0f, px - x0f
  hy, hx = 1 - ly, 1 - lx
  scale = valid.astype(cdtype)
  if mask is not None:
    scale = scale * mask.astype(cdtype).reshape(-1, ho, wo, groups, taps)
  weights = jnp.stack([hy * hx, hy * lx, ly * hx, ly * lx], axis=-1) * scale[..., None]
  hp, wp = height + 2, width + 2
  xp = jnp.pad(x.astype(dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
  table = _transpose(xp.reshape(-1, hp * wp, groups, cg), (0, 2, 1, 3))  # [B, G, Hp*Wp, Cg]
  r00 = (y0f.astype(jnp.int32) + 1) * wp + x0f.astype(jnp.int32) + 1  # [B, Ho, Wo, G, K]
  rows = r00[..., None] + jnp.asarray([0, 1, wp, wp + 1], jnp.int32)  # [B, Ho, Wo, G, K, 4]
  rows = _transpose(rows, (0, 3, 1, 2, 4, 5)).reshape(-1, groups, ho * wo * taps * 4)
  bsz = x.shape[0]
  if isinstance(bsz, (int, np.integer)):  # a static batch: one flat table, one plain Gather
    rows = rows + np.arange(bsz * groups, dtype=np.int32).reshape(bsz, groups, 1) * (hp * wp)
    corners = jnp.take(table.reshape(-1, cg), rows.reshape(-1), axis=0, mode="clip")
  else:  # per image (a batched gather), where the batch is symbolic
    corners = jnp.take_along_axis(table, rows[..., None], axis=2)  # [B, G, Ho*Wo*K*4, Cg]
  wts = _transpose(weights.astype(dtype), (0, 3, 1, 2, 4, 5))  # [B, G, Ho, Wo, K, 4]
  # The four corners weighted and summed as [1, 4] x [4, Cg] matmuls (MatMul in ONNX).
  cols = jnp.matmul(
      wts.reshape(-1, groups, ho * wo * taps, 1, 4),
      corners.reshape(-1, groups, ho * wo * taps, 4, cg),
      precision=jax.lax.Precision.HIGHEST,
  ).reshape(-1, groups, ho, wo, taps, cg)
  cols = _transpose(cols, (0, 2, 3, 4, 1, 5))  # [B, Ho, Wo, K, G, Cg]
  out = jnp.dot(
      cols.reshape(-1, taps * cin),
      kernel.astype(dtype).reshape(taps * cin, cout),
      precision=precision,
  ).reshape(-1, ho, wo, cout)
  if bias is not None:
    out = out + jnp.asarray(bias).astype(dtype)
  return out


def _conv_transpose_for_onnx(
    x, kernel, *, stride: int = 2, padding: int = 1, output_padding: int = 0, precision=None
):
  """`onestage.neck.conv_transpose2d` as one stride-1 convolution of the input with the kernel's
  stride x stride phases stacked as output channels, then depth-to-space: the same values.
  jax2onnx 0.12.5 converts the `lhs_dilation` convolution of the original into a ConvTranspose
  with the window strides (1) instead of the dilation as its strides (the output came out smaller
  than the input); zero-inserting the input explicitly converts right but costs stride**2 times
  the multiply-adds, this form none extra.

  Output pixel Y (one axis) = stride * q + r - padding gets sum_j x[q - j] kernel[r + j stride]
  (j < n = ceil(k / stride); taps past the kernel are zeros): for each phase r a correlation of
  the input, padded by n - 1 - q0 in front, with the phase's taps reversed."""
  kh, kw, cin, cout = kernel.shape
  s, p = stride, padding
  n = -(-max(kh, kw) // s)  # taps per phase and axis
  h, w = x.shape[1], x.shape[2]
  out_h = (h - 1) * s - 2 * p + kh + output_padding
  out_w = (w - 1) * s - 2 * p + kw + output_padding
  q0 = p // s  # first phase index needed (t = Y + p = s q + r)
  qh, qw = (p + out_h - 1) // s - q0 + 1, (p + out_w - 1) // s - q0 + 1
  # kernel[r + j s] for j < n, r < s (zeros past the kernel), reversed in j: [n, n, Cin, s*s*Cout]
  k = jnp.pad(kernel, ((0, n * s - kh), (0, n * s - kw), (0, 0), (0, 0)))
  k = k.reshape(n, s, n, s, cin, cout)[::-1, :, ::-1]
  k = k.transpose(0, 2, 4, 1, 3, 5).reshape(n, n, cin, s * s * cout)
  lo = n - 1 - q0  # >= 0: padding <= k - 1
  hi_h, hi_w = qh + n - 1 - lo - h, qw + n - 1 - lo - w
  x = jnp.pad(x, ((0, 0), (lo, max(hi_h, 0)), (lo, max(hi_w, 0)), (0, 0)))
  x = x[:, : lo + h + hi_h, : lo + w + hi_w]
  y = jax.lax.conv_general_dilated(
      x,
      k.astype(x.dtype),
      window_strides=(1, 1),
      padding="VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=precision,
  )  # [N, qh, qw, (r_y, r_x, Cout)]
  y = (
      y.reshape(-1, qh, qw, s, s, cout)
      .transpose(0, 1, 3, 2, 4, 5)
      .reshape(-1, qh * s, qw * s, cout)
  )
  return y[:, p - s * q0 : p - s * q0 + out_h, p - s * q0 : p - s * q0 + out_w]


def _onnx_replacements() -> list:
  """(original function, replacement) pairs for `onnx_friendly_ops`."""
  from cn2_jax.modeling.backbone import resnet
  from cn2_jax.modeling.ops import dcn

  out = [
      (_top_k, _top_k_for_onnx),
      (resnet.max_pool_3x3_s2_p1, _pool_for_onnx),
      (dcn.deform_conv2d, _deform_conv2d_for_onnx),
  ]
  try:
    from cn2_jax.modeling.onestage import decode, neck
  except ImportError:  # a checkout without the one-stage family
    return out
  return out + [
      (neck.conv_transpose2d, _conv_transpose_for_onnx),
      (decode.pseudo_nms, _pseudo_nms_for_onnx),
      (decode.topk_score, _topk_score_for_onnx),
  ]


@contextlib.contextmanager
def onnx_friendly_ops():
  """While converting, every cn2_jax module's reference to a function that jax2onnx 0.12.5
  mis-converts or rejects traces as an equivalent one it converts right (tests/test_export.py
  checks each pair for equal values in JAX):
    resnet.max_pool_3x3_s2_p1 -> _pool_for_onnx and onestage.decode.pseudo_nms ->
      _pseudo_nms_for_onnx: a 4-D `reduce_window` becomes a MaxPool with 4 spatial dims, which
      onnxruntime rejects ("Unsupported pooling size");
    onestage.neck.conv_transpose2d -> _conv_transpose_for_onnx: a convolution's `lhs_dilation`
      becomes a ConvTranspose with the wrong strides;
    export._top_k (lax.top_k) -> _top_k_for_onnx: TopK's int64 indices are typed int32;
    onestage.decode.topk_score -> _topk_score_for_onnx: `_top_k`, and no `lax.rem` (it fails on
      a symbolic batch);
    ops.dcn.deform_conv2d -> _deform_conv2d_for_onnx: a `stack` inside the op's jit, `arange(B)`
      on a symbolic batch.
  The originals are restored on exit."""
  patched = []
  for original, replacement in _onnx_replacements():
    name = original.__name__
    for mod_name, mod in list(sys.modules.items()):
      if mod_name.startswith("cn2_jax.") and getattr(mod, name, None) is original:
        setattr(mod, name, replacement)
        patched.append((mod, name, original))
  try:
    yield
  finally:
    for mod, name, original in patched:
      setattr(mod, name, original)


def import_jax2onnx():
  """jax2onnx, or a one-line UserError naming the install command."""
  from cn2_jax.errors import UserError

  try:
    import jax2onnx
  except ImportError as e:
    raise UserError(
        f"--format onnx needs jax2onnx ({e}): {ONNX_INSTALL} (a separate venv; see "
        f"scripts/test_onnx.sh)"
    ) from None
  # jax2onnx 0.12.5 on jax 0.10 logs a traceback for each plugin it skips (dm_pix, unused here)
  # and onnx_ir a warning per untyped shape constant: noise, not errors.
  for name in ("jax2onnx.plugins.plugin_system", "onnx_ir.serde"):
    logging.getLogger(name).setLevel(logging.ERROR)
  return jax2onnx


def export_onnx(
    predictor,
    *,
    batch: Batch = "b",
    hw: Optional[Sequence[int]] = None,
    opset: int = 18,
    part: Optional[str] = None,
    orig_hw: bool = False,
):
  """jax2onnx conversion of an ONNX part (`ONNX_PARTS`; None = the family's default: the whole
  one-stage detector, CenterNet2's dense part + proposal candidates): an `onnx.ModelProto` and
  its output names."""
  jax2onnx = import_jax2onnx()
  arch = predictor.config.model.arch
  part = _check_part(arch, part)
  hw = _check_hw(predictor.config, hw or default_hw(predictor.config))
  fn, names = part_fn(predictor, part, orig_hw)
  # stderr: jax2onnx 0.12.5 prints "DEBUG: conv_dtype_enum=..." for every convolution.
  with onnx_friendly_ops(), contextlib.redirect_stdout(sys.stderr):
    proto = jax2onnx.to_onnx(
        fn,
        list(input_specs(batch, hw, orig_hw)),
        model_name=f"cn2_jax_{arch}_{part}",
        opset=opset,
        input_names=["image", "image_hw"] + (["orig_hw"] if orig_hw else []),
        output_names=names,
    )
  return proto, names


def onnx_signature(proto) -> dict:
  def show(v):
    t = v.type.tensor_type
    dims = ",".join(
        str(d.dim_value) if d.HasField("dim_value") else d.dim_param for d in t.shape.dim
    )
    import onnx

    return f"{onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)}[{dims}]"

  return dict(
      inputs={v.name: show(v) for v in proto.graph.input},
      outputs={v.name: show(v) for v in proto.graph.output},
  )


# ------------------------------------------------------------------------------------------- CLI
def _parse_batch(s: str) -> Batch:
  s = s.strip()
  if s.isdigit() and int(s) >= 1:
    return int(s)
  if s.isidentifier():
    return s
  raise argparse.ArgumentTypeError(f"expected a batch size >= 1 or a name (e.g. b), got {s!r}")


def _metadata(
    predictor, fmt: str, signature: dict, hw, batch, weights: str, onnx_part: Optional[str] = None
) -> dict:
  d, m = predictor.config.data, predictor.config.model
  return dict(
      format=fmt,
      arch=m.arch,
      **({"onnx_part": onnx_part} if onnx_part else {}),
      signature=signature,
      batch=batch if isinstance(batch, str) else int(batch),
      canvas_hw=list(hw),
      num_classes=int(m.num_classes),
      class_names=predictor.class_names,
      category_ids=predictor.category_ids,
      preprocess=dict(
          image="RGB uint8 at the top-left of a zero canvas",
          min_size_test=int(d.min_size_test),
          max_size_test=int(d.max_size_test),
      ),
      weights=weights,
      jax_version=jax.__version__,
  )


def _size(n: int) -> str:
  return f"{n / 2**20:.1f} MiB ({n} bytes)"


def main(argv: Optional[Sequence[str]] = None) -> int:
  ap = argparse.ArgumentParser(
      prog="python -m cn2_jax.export",
      description="Export the model of a run as one self-contained file: StableHLO (jax.export, "
      "the whole detector, weights inside) or ONNX (the whole one-stage detector, CenterNet2 up "
      f"to its proposal NMS; needs `{ONNX_INSTALL}`). See the docstring of cn2_jax/export.py.",
  )
  ap.add_argument("--workdir", required=True, help="the run (its config.json, checkpoints)")
  ap.add_argument("--weights", default="", help="weights instead of the newest checkpoint")
  ap.add_argument("--config", default=None, help="config file, for a workdir without config.json")
  ap.add_argument("--format", default="stablehlo", choices=("stablehlo", "onnx"))
  ap.add_argument("--out", required=True, help="file to write (+ a .json beside it)")
  ap.add_argument(
      "--batch",
      default=None,
      type=_parse_batch,
      help="batch size, or a name for a symbolic batch dimension (default: b)",
  )
  ap.add_argument("--height", type=int, default=None, help="canvas height (multiple of 32)")
  ap.add_argument("--width", type=int, default=None, help="canvas width (multiple of 32)")
  ap.add_argument(
      "--orig-hw",
      action="store_true",
      help="a third input orig_hw [N, 2]; boxes come back in original pixels (stablehlo, and "
      "onnx --onnx-part detector)",
  )
  ap.add_argument(
      "--platforms",
      default=",".join(DEFAULT_PLATFORMS),
      help="stablehlo: comma-separated platforms to lower for",
  )
  ap.add_argument("--opset", type=int, default=18, help="onnx: opset version")
  ap.add_argument(
      "--onnx-part",
      default=None,
      choices=sorted({p for parts in ONNX_PARTS.values() for p in parts}),
      help="onnx: what to convert (default: detector for onestage, candidates for centernet2; "
      "dense = backbone + heads only)",
  )
  ap.add_argument(
      "--random-weights",
      action="store_true",
      help="randomly initialised weights (for size / speed measurements only)",
  )
  args = ap.parse_args(argv)
  from cn2_jax import errors

  try:
    return _run(args)
  except Exception as e:  # noqa: BLE001 - user errors are one line, the rest re-raises
    if not errors.is_user_error(e):
      raise
    print(f"error: {errors.one_line(e)}", file=sys.stderr)
    return 1


def _run(args) -> int:
  from cn2_jax.modeling import detector
  from cn2_jax.predictor import Predictor

  if args.format == "onnx":
    import_jax2onnx()  # fail before loading anything
  cfg = load_config(args.workdir, args.weights, args.config)
  onnx_part = None
  if args.format == "onnx":  # fail before loading weights or converting anything
    onnx_part = _check_part(cfg.model.arch, args.onnx_part)
    if args.orig_hw and onnx_part != "detector":
      from cn2_jax.errors import ConfigError

      raise ConfigError(
          f"--orig-hw needs the boxes of --onnx-part detector; model.arch={cfg.model.arch!r} "
          f"exports {onnx_part}"
      )
  if args.random_weights:
    from cn2_jax.predictor import _dataset_info  # class names as Predictor.from_workdir finds them

    cfg.weights = ""
    predictor = Predictor(
        cfg, detector.init_variables(cfg.model), *_dataset_info(args.workdir, cfg)
    )
  else:
    predictor = Predictor.from_workdir(args.workdir, cfg)
  hw = _check_hw(cfg, (args.height or default_hw(cfg)[0], args.width or default_hw(cfg)[1]))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  if args.format == "stablehlo":
    batch = "b" if args.batch is None else args.batch
    platforms = tuple(p for p in args.platforms.split(",") if p)
    try:
      exported = export_stablehlo(
          predictor, batch=batch, hw=hw, orig_hw=args.orig_hw, platforms=platforms
      )
    except Exception as e:  # noqa: BLE001 - a family whose ops need a static batch
      if not isinstance(batch, str):
        raise
      from cn2_jax.errors import one_line

      print(
          f"warning: a symbolic batch does not export for model.arch={cfg.model.arch!r} "
          f"({type(e).__name__}: {one_line(e)[:300]}); exporting batch 1",
          file=sys.stderr,
      )
      batch = 1
      exported = export_stablehlo(
          predictor, batch=batch, hw=hw, orig_hw=args.orig_hw, platforms=platforms
      )
    data = serialize(exported)
    signature = stablehlo_signature(exported, args.orig_hw)
  else:
    batch = "b" if args.batch is None else args.batch
    proto, _ = export_onnx(
        predictor, batch=batch, hw=hw, opset=args.opset, part=onnx_part, orig_hw=args.orig_hw
    )
    data = proto.SerializeToString()
    signature = onnx_signature(proto)
  with open(args.out, "wb") as f:
    f.write(data)
  with open(args.out + ".json", "w") as f:
    weights = (
        "random (--random-weights)"
        if args.random_weights
        else cfg.weights or f"newest checkpoint of {os.path.abspath(args.workdir)}"
    )
    meta = _metadata(predictor, args.format, signature, hw, batch, weights, onnx_part)
    json.dump(meta, f, indent=2)
  print(f"wrote {args.out}: {_size(len(data))}")
  for kind in ("inputs", "outputs"):
    print(f"  {kind}:")
    for name, aval in signature[kind].items():
      print(f"    {name:<14} {aval}")
  if "platforms" in signature:
    print(f"  platforms: {', '.join(signature['platforms'])}")
  print(f"  metadata: {args.out}.json")
  return 0


if __name__ == "__main__":
  # Run the module proper, not this second copy (`python -m` executes the file as __main__):
  # onnx_friendly_ops patches the functions of the cn2_jax.* modules.
  from cn2_jax import export as _export

  sys.exit(_export.main())
