"""`python -m cn2_jax.export`: a trained model as one self-contained file for deployment.

Usage:
  python -m cn2_jax.export --workdir runs/demo --out demo.stablehlo        # --format stablehlo
  python -m cn2_jax.export --workdir DIR --config configs/cn2_r50.py --weights W.pth \
      --out cn2_r50.stablehlo --batch 1 --height 800 --width 1088
  python -m cn2_jax.export --workdir runs/demo --format onnx --out demo.onnx   # optional extra
  python -m cn2_jax.export --workdir runs/centernet_demo --format onnx --out det.onnx [--batch 1]
  python -m cn2_jax.export --workdir DIR --format onnx --nms plugin --out det_trt.onnx  # TensorRT
  python -m cn2_jax.export --workdir runs/demo --out demo.stablehlo --check IMG.jpg \
      [--check-out dets.json]      # run the written file on IMG.jpg, compare with the Predictor

`--check IMAGE` (cn2_jax/export_check.py): after writing, runs the file (onnxruntime on CPU for
ONNX, jax.export for StableHLO) on IMAGE preprocessed exactly as the Predictor does (pasted on the
export's canvas), matches its detections with the Predictor's by class and box, prints "M/N
detections matched" with the largest box and score differences, and exits 1 unless all match
(--check-box-tol 1e-3 px, --check-score-tol 1e-4). `--check-out FILE` writes the file's
detections as a JSON list of {"box": [x1, y1, x2, y2] in original-image pixels, "score",
"label"} (label: class index 0..C-1; names in FILE.json). Needs the whole detector (not an ONNX
`--onnx-part` other than `detector`).

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
                       (`--input normalized`: float32, the image already normalised as the
                       model's preprocessing does, in the model's channel order: FILE.json
                       "normalization" gives x[..., c] = rgb[..., channels[c]] * multiply[c] +
                       add[c]; the file still zeroes it outside image_hw. `--layout nchw`:
                       [N, 3, H, W] instead, either dtype)
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
  What converts is declared by the family (`--onnx-part`; the `onnx_parts` of its registry
  entry, modeling/meta_arch/: the whole detector, or a module method such as `dense_outputs`
  applied with `model.apply(..., method=...)`; inputs image, image_hw as above, batch symbolic
  by default, `--batch N` fixes it):
    onestage, `detector` (default): the whole detector, the StableHLO file's graph and outputs
      (boxes, scores, classes, valid, in that order; `--orig-hw` adds the orig_hw input):
      preprocessing, backbone, neck (with DCN: model.onestage.use_deform=True converts),
      heads, the pseudo-NMS, top-K per class then top-K overall, boxes, clipping.
    centernet2, `detector` (default): the whole detector as above (the StableHLO file's graph
      and outputs, `--orig-hw` too): preprocessing, backbone, FPN, CenterNet head, the proposal
      decode (per level the top min(pre_nms_topk_test, H_l W_l) locations) and its
      class-agnostic NMS to post_nms_topk_test proposals, ROIAlign on p3..p7 (fixed-ratio or
      adaptive sampling, as configured), the three cascade stages, the per-class NMS and the
      top detections_per_image. Static shapes throughout; both NMS are the model's tiled greedy
      NMS (ONNX Loops; torchvision semantics: equal scores keep the lower index first, IoU
      without +1, invalid rows never kept; per class as a batch of class rows over the shared
      boxes, exactly the model's per-class vmap).
    centernet (CenterNet alone: CenterNet-FPN_R50_1x, CenterNet-S4_DLA_8x), `detector`
      (default): the whole detector as above: preprocessing, backbone, the CenterNet head, the
      per-level top pre_nms_topk_test candidates, the class-aware NMS (the model's
      `ops.nms.batched_nms` in its configured torchvision mode, per image the per-class loop or
      the coordinate-offset trick; `ops.nms.batched_nms_for_onnx`: `nms_for_onnx` with class
      rows, no vmap) and the top post_nms_topk_test.
    centernet2, `detector` with `--nms plugin` (for TensorRT only; onnxruntime cannot run it,
      hence no --check, and no --orig-hw): the graph ends before the final per-class NMS
      (`CenterNet2.pre_nms_detections`: boxes [N, R, 1, 4] float32, the last stage's boxes
      clipped to image_hw, one per proposal shared by the classes; scores [N, R, K] float32, the
      class scores, 0 for the (box, class) pairs the model's NMS would not consider: at or below
      score_thresh_test, padded proposal, non-finite box or score; R = post_nms_topk_test) and
      appends one `EfficientNMS_TRT` node (domain "TRT", plugin_version "1"; attributes from
      model.roi_heads: score_threshold = score_thresh_test, iou_threshold = nms_thresh_test,
      max_output_boxes = detections_per_image, background_class -1, score_activation 0,
      class_agnostic 0, box_coding 0 = corners x1 y1 x2 y2; also in FILE.json under "nms").
      Outputs, as the plugin defines them:
        num_detections    int32   [N, 1]   valid rows per image
        detection_boxes   float32 [N, M, 4] xyxy in input pixels (divide by the resize factor)
        detection_scores  float32 [N, M]   highest first
        detection_classes int32   [N, M]   labels 0..K-1 (names in FILE.json)
      M = detections_per_image. The plugin is the same per-class NMS and top-M as the model's
      up to its own tie order and IoU arithmetic (not tested here: no TensorRT), and it keeps
      only the 4096 best (box, class) pairs above the threshold before its NMS (R * K = 20480
      pairs for R50: where more than 4096 exceed the threshold, the two can differ); the graph
      before it is tested in onnxruntime against the model's pre-NMS boxes and scores, and the
      model's NMS on those gives the Predictor's detections (tests/test_export.py). Build:
        trtexec --onnx=det_trt.onnx --saveEngine=det.plan \
            --minShapes=image:1x800x1088x3,image_hw:1x2 \
            --optShapes=image:1x800x1088x3,image_hw:1x2 \
            --maxShapes=image:4x800x1088x3,image_hw:4x2 [--fp16]
      (TensorRT loads EfficientNMS_TRT from its plugin library, libnvinfer_plugin, which
      trtexec initialises; `--staticPlugins` is not needed.)
    centernet2, `candidates` (`CenterNet2.proposal_candidates`): the dense part (below)
      plus the proposal decode up to its NMS (`proposal.decode.proposal_candidates`):
        cand_boxes [N, Kc, 4] float32  xyxy in input pixels (clipped only with clip_proposals)
        cand_scores [N, Kc] float32    sqrt(p), 0 where invalid
        cand_valid [N, Kc] bool        Kc = sum_l min(pre_nms_topk_test, H_l W_l)
      (`centernet2_proposals` runs the class-agnostic NMS and top post_nms_topk_test on the
      host and gives the model's proposals from these).
    both, `dense` (`dense_outputs`): preprocessing + backbone + heads, as centerX's ONNX export
    (docs/onestage.md §6):
      centernet2: hm_logits_p3..p7 [N, H/s, W/s] objectness logits, p3..p7 [N, H/s, W/s,
        fpn_channels] the FPN features the ROI heads pool, reg_p3..p7 [N, H/s, W/s, 4] ltrb
        box distances in units of s (s = 8, 16, 32, 64, 128);
      onestage: cls [N, H/4, W/4, C] sigmoid heatmap, reg [N, H/4, W/4, 2] centre offsets,
        wh [N, H/4, W/4, 2] box sizes.
  Outputs are listed by name (sorted, for the parts other than `detector`).
  Architectures: every detector the project builds exports its whole detector to ONNX with a
  symbolic batch; tests/test_zoo_export_onnx.py (`bash scripts/test_onnx.sh -m zoo`) converts
  each distinct zoo architecture (narrowed, 256x256 canvas, random weights) and checks
  onnxruntime's detections on a batch of 2 images of different sizes against the Predictor's
  (`--check`'s matching: same classes, boxes within 1e-3 px, scores within 1e-4): CenterNet
  alone (R50-FPN; DLA-34 S4), CenterNet2-F (one ROI stage), CenterNet2 R50, X101-DCN (ResNeXt,
  modulated DCN), Res2Net-DCN FPN and BiFPN, DLA-BiFPN-P3, DLA-fcosBiFPN-P5, the LVIS federated
  (sigmoid) head; and the one-stage centerX family with ResNet (+/- DCN, tests/test_export.py),
  RegNetX-200MF and a small RegNetY (SE). nuImages_CenterNet2_DLA_640_8x is not buildable (see
  tests/test_zoo_configs.py), so it exports in neither format.
  Canvas: `--height/--width` (default the config's test canvas, `data.pad_hw_test`, else
  max_size_test rounded up) is the file's static input size, as for StableHLO: feed every image
  resized as the Predictor does and pasted at the top-left of a zero H x W canvas; the detections
  equal the Predictor's when H x W is the Predictor's canvas (CenterNet2 and CenterNet alone
  compute on the batch's official canvas, so a larger H x W changes nothing: see Shapes above).
  What jax2onnx 0.12.5 does not convert in CenterNet2's own form, and the form traced instead
  (each tested equal to the model's op in JAX, tests/test_export.py):
    the NMS (ops/nms.py, proposals and final detections): "lax.sort with num_keys > 1 is not
      supported yet" (its sort by validity, score, index), and vmap: "module
      'jax.interpreters.batching' has no attribute 'not_mapped'" (jax2onnx's jnp.where under
      vmap; not_mapped was removed in jax 0.10). `nms_for_onnx`: the same tiled algorithm
      batched explicitly over leading dimensions, the order by two stable single-key sorts
      (-score, then validity; each an ONNX TopK, which orders equal keys by index), the kept
      buffer updated by a one-hot comparison instead of a scatter; its while cond reads only its
      carry (jax2onnx misaligns a cond's closed-over arrays with the carry). `no_fma` (bitcasts)
      is the identity there: onnxruntime runs a Mul and the Add it feeds as separate kernels;
    the proposal decode and the final inference, vmapped per image: `decode.
      generate_proposals_for_onnx` (the batched `proposal_candidates` + `nms_for_onnx`) and
      `cascade.fast_rcnn_inference_batch_for_onnx` (the classes as rows of `nms_for_onnx`);
    ROIAlign's level assignment: frexp becomes a BitCast node that onnxruntime 1.32 rejects at
      opset 18 ("No Op registered for BitCast with domain_version of 18");
      `roi_align.assign_boxes_to_levels_for_onnx` counts the level thresholds s >= 2**j reached
      (exact comparisons; the same levels at exact powers of two, inf and NaN areas). ROIAlign's
      jnp.arange / jnp.full over the (symbolic) box count are iotas / full_like in the model
      itself ("'_DynamicDimSentinel' object has no attribute 'rmax'" otherwise);
    adaptive ROIAlign (sampling_ratio 0, the official models'): its loop over steps of boxes
      (lax.map) has no static trip count with a symbolic batch ("Symbolic dimension comparison
      '64*b' <= '163' is inconclusive"); `roi_align._pool_windows_for_onnx` gathers every box's
      window at once (one Gather of explicit cell indices, the same two contractions; bitwise
      equal in JAX; onnxruntime holds R * rows * cols * C float32 windows at once: 0.36 GB per
      image and stage for R50 at 800x1088). In the model itself: its weight scatter sends dead
      samples to a spare slot rather than out of bounds (onnxruntime's ScatterND rejects
      out-of-bounds indices) and divides with lax.div (// and % emit lax.rem, which fails on a
      symbolic box count). Full size: CenterNet2 R50 with the official oracle weights on the
      oracle image (canvas 800x1088, symbolic batch) gives the Predictor's 100/100 detections in
      onnxruntime, boxes within 3.1e-4 px, scores within 3.4e-7 (tests/test_export.py, zoo).
  Ops traced in an equivalent form while converting (inside `onnx_friendly_ops()`, the context
  `modeling/export_mode.onnx_ops` that the ops read; nothing is patched; each pair is checked for
  equal values in JAX by tests/test_export.py): ResNet's 3x3/2 max-pool and the pseudo-NMS's
  3x3 max-pool (a 4-D reduce_window becomes a MaxPool with 4 spatial dims, which onnxruntime
  rejects: "Unsupported pooling size"), the one-stage neck's transposed convolution (jax2onnx
  gives the ConvTranspose the window strides; replaced by a stride-1 conv of the kernel's phases
  + depth-to-space), lax.top_k (TopK's int64 indices left typed int32: onnxruntime refuses the
  graph, "Type parameter (T) of Optype (Add) bound to different types (tensor(int64) and
  tensor(int32))"; converted through approx_max_k, which jax2onnx gives the Cast), integer // and
  % (lax.rem fails on a symbolic batch: "Symbolic dimension 'b' used in a context that requires a
  constant"), and the deformable convolution (inside its jit: "No plugins registered for
  primitive 'stack' inside jit body"; its arange over a symbolic batch: "'_DynamicDimSentinel'
  object has no attribute 'rmax'"), DLA's and BiFPN's MaxPool2d(k) (`layers.max_pool`, a 4-D
  reduce_window as above), DLA's depthwise transposed convolution (its IDA upsampling: the same
  ConvTranspose strides bug, "[ShapeInferenceError] Incompatible dimensions" in onnxruntime;
  `export_mode.depthwise_conv_transpose_for_onnx`, the phase form with C groups) and CenterNet
  alone's vmapped per-class NMS (`ops.nms.batched_nms_batch`, the vmap error above). The
  pseudo-NMS stays an equality with the 3x3 max-pooled
  heatmap (Equal + Mul): fp16-safe, unlike a 1e-9 / 1e9 trick (fp16 flushes 1e-9 to 0 and
  overflows 1e9 to inf); the pooled max is one of its inputs, bit for bit, in any precision.
  Opset 18 by default (jax2onnx writes ReduceMax with an axes input even at opset 17).
  onnxruntime (CPU) matches JAX: the one-stage detections are identical (same classes and
  order; boxes within 1e-3 px, scores within 1e-4; measured 4e-6 px / 7e-8), the dense maps
  within 1e-4 (of the output's magnitude for the unnormalised FPN features), CenterNet2's
  candidates and the proposals after the host NMS the same up to the order of scores equal
  within 1e-6, CenterNet2's whole detector the same detections (tiny model: boxes within 4e-5
  px, scores within 3e-7) (tests/test_export.py). File sizes (the weights are constants, float32) and
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

from cn2_jax import export_check
from cn2_jax.config import base_config, load_config_file
from cn2_jax.errors import ConfigError, UserError, is_user_error, one_line
from cn2_jax.modeling import detector, export_mode
from cn2_jax.modeling.meta_arch import META_ARCHS, family
from cn2_jax.modeling.ops.nms import nms
from cn2_jax.modeling.proposal import decode as proposal_decode
from cn2_jax.predictor import Predictor, _dataset_info

OUTPUT_KEYS = export_check.OUTPUT_KEYS
DEFAULT_PLATFORMS = ("cpu", "cuda")
ONNX_INSTALL = "pip install -r requirements-onnx.txt"

Batch = Union[int, str]  # a fixed batch size or the name of a symbolic dimension
IMAGE_INPUTS = ("uint8", "normalized")  # --input: what the file's `image` holds
LAYOUTS = ("nhwc", "nchw")  # --layout: the axis order of the file's `image`


# ------------------------------------------------------------------------------ model to export
def load_config(
    workdir: str, weights: str = "", config_file: Optional[str] = None
) -> ml_collections.ConfigDict:
  """The config `--mode=predict` would use: the run's config.json (that of the run `weights`
  belongs to, else `workdir`'s) with `weights` set; `config_file` (or the schema defaults) when
  there is no config.json."""
  # Start-up time: app imports the whole training stack (engine.loop, data.loader, orbax, optax),
  # which only this function needs.
  from cn2_jax import app

  cfg = load_config_file(config_file) if config_file else base_config()
  if weights:
    cfg.weights = weights
  return app.run_config(cfg, workdir, ["weights"] if weights else [])


def default_hw(cfg: ml_collections.ConfigDict) -> tuple[int, int]:
  """The exported canvas: `data.pad_hw_test` if set, else `max_size_test` rounded up to the size
  divisibility for both sides (every resized image fits, whatever its orientation)."""
  data_cfg = cfg.data
  if tuple(data_cfg.pad_hw_test):
    return tuple(int(v) for v in data_cfg.pad_hw_test)
  div = int(data_cfg.size_divisibility) or 1
  side = -(-int(data_cfg.max_size_test) // div) * div
  return side, side


def _check_hw(cfg, hw: Sequence[int]) -> tuple[int, int]:
  div = int(cfg.data.size_divisibility) or 1
  h, w = (int(v) for v in hw)
  if h <= 0 or w <= 0 or h % div or w % div:
    raise ConfigError(f"--height/--width must be positive multiples of {div}, got {h}x{w}")
  return h, w


def _batch_dim(batch: Batch):
  if isinstance(batch, str):
    (symbolic_dim,) = jax.export.symbolic_shape(batch)
    return symbolic_dim
  if batch < 1:
    raise ValueError(f"batch must be >= 1 or a symbolic name, got {batch}")
  return int(batch)


def _check_image_input(image_input: str, layout: str) -> None:
  if image_input not in IMAGE_INPUTS:
    raise ConfigError(f"--input must be one of {', '.join(IMAGE_INPUTS)}, got {image_input!r}")
  if layout not in LAYOUTS:
    raise ConfigError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def input_specs(
    batch: Batch,
    hw: Sequence[int],
    orig_hw: bool = False,
    image_input: str = "uint8",
    layout: str = "nhwc",
) -> tuple:
  """ShapeDtypeStructs of (image, image_hw[, orig_hw]); `batch` a size or a symbolic name; image
  uint8 or float32 (`image_input` normalized), [N, H, W, 3] or [N, 3, H, W] (`layout` nchw)."""
  _check_image_input(image_input, layout)
  n = _batch_dim(batch)
  h, w = hw
  shape = (n, h, w, 3) if layout == "nhwc" else (n, 3, h, w)
  dtype = jnp.uint8 if image_input == "uint8" else jnp.float32
  specs = [jax.ShapeDtypeStruct(shape, dtype), jax.ShapeDtypeStruct((n, 2), jnp.int32)]
  if orig_hw:
    specs.append(jax.ShapeDtypeStruct((n, 2), jnp.int32))
  return tuple(specs)


def with_image_input(fn: Callable, image_input: str = "uint8", layout: str = "nhwc") -> Callable:
  """`fn(image uint8 [N, H, W, 3], *rest)` as a function of the export's image input: an NCHW
  image is transposed in the graph, and a normalised one is traced inside
  `export_mode.normalized_input()` (the families' preprocessing then only zeroes the padding)."""
  _check_image_input(image_input, layout)
  if (image_input, layout) == ("uint8", "nhwc"):
    return fn

  def wrapped(image, *rest):
    if layout == "nchw":
      image = jnp.transpose(image, (0, 2, 3, 1))
    with export_mode.normalized_input(image_input == "normalized"):
      return fn(image, *rest)

  return wrapped


def input_normalization(predictor) -> dict:
  """The model's preprocessing of an RGB uint8 image as a per-channel affine map, read off the
  family's own `preprocess` on probe images: `x[..., c] = rgb[..., channels[c]] * multiply[c] +
  add[c]` (`channels` "RGB" or "BGR"), then 0 outside image_hw. What `--input normalized` takes."""
  probes = np.zeros((4, 32, 32, 3), np.uint8)
  for i in range(3):
    probes[i + 1, ..., i] = 255
  out = export_check.model_preprocess(predictor, probes, np.full((4, 2), 32, np.int32))
  out = np.asarray(out[:, 0, 0], np.float64)  # [probe, channel]
  add = out[0]
  slopes = (out[1:] - add) / 255.0  # [input channel, output channel]
  channels = [int(np.argmax(np.abs(slopes[:, c]))) for c in range(3)]
  order = {(0, 1, 2): "RGB", (2, 1, 0): "BGR"}.get(tuple(channels))
  if order is None or np.count_nonzero(np.abs(slopes) > 1e-12) != 3:
    raise ConfigError(f"the model's preprocess is not a per-channel affine map of RGB: {slopes}")
  return dict(
      channels=order,
      multiply=[float(slopes[channels[c], c]) for c in range(3)],
      add=[float(a) for a in add],
  )


def detection_fn(predictor, orig_hw: bool = False) -> Callable:
  """The Predictor's forward with its variables closed over (they become constants):
  `(image, image_hw[, orig_hw]) -> {boxes, scores, classes, valid}`. Without `orig_hw` the boxes
  stay in input pixels (the Predictor's postprocessing with orig_hw = image_hw: clip, drop empty
  boxes)."""
  variables = predictor.variables

  def pick(out):
    return {key: out[key] for key in OUTPUT_KEYS}

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
    image_input: str = "uint8",
    layout: str = "nhwc",
) -> jax.export.Exported:
  """`jax.export` of the Predictor's detections (see the module docstring for the signature)."""
  hw = _check_hw(predictor.config, hw or default_hw(predictor.config))
  fn = jax.jit(with_image_input(detection_fn(predictor, orig_hw), image_input, layout))
  specs = input_specs(batch, hw, orig_hw, image_input, layout)
  return jax.export.export(fn, platforms=tuple(platforms))(*specs)


def serialize(exported: jax.export.Exported) -> bytes:
  try:
    return bytes(exported.serialize())
  except ImportError as e:  # jax's serializer needs the flatbuffers package
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
# What --format onnx converts is declared by each family (`onnx_parts` of its registry entry,
# modeling/meta_arch/build.py; `--onnx-part`, the first the default): a part is either the whole
# detector (None: the Predictor's forward, the outputs of the StableHLO file) or a method of the
# family's module, `(image, image_hw) -> {name: array}` (e.g. `dense_outputs`: backbone + heads,
# the host decodes), applied with `model.apply(variables, ..., method=...)`.
# Ops jax2onnx mis-converts trace as equivalent forms inside `onnx_friendly_ops()`
# (modeling/export_mode.py): the modules read the mode, nothing is patched.
onnx_friendly_ops = export_mode.onnx_ops
proposal_candidates = proposal_decode.proposal_candidates  # CenterNet2's decode before its NMS


def onnx_parts(arch: str) -> dict:
  """`{part: module method name or None (the whole detector)}` of a family, the default first."""
  return dict(family(arch).onnx_parts)


def _all_onnx_parts() -> list:
  return sorted({part for fam in META_ARCHS.values() for part in fam.onnx_parts})


def centernet2_proposals(candidates: dict, centernet_config) -> dict:
  """The host's half of the proposal decode: class-agnostic NMS at `nms_thresh_test` and the top
  `post_nms_topk_test` of `proposal_candidates`' output (numpy or jax arrays), as
  `generate_proposals` does: `boxes [B, K, 4]`, `scores [B, K]`, `valid [B, K]` (padding zero).
  `centernet_config` is `config.model.centernet`."""
  nms_thresh = centernet_config.nms_thresh_test
  topk = int(centernet_config.post_nms_topk_test)

  def single(boxes, scores, valid):
    keep, kept = nms(boxes, scores, valid, nms_thresh, topk)
    return dict(
        boxes=jnp.where(kept[:, None], boxes[keep], 0.0),
        scores=jnp.where(kept, scores[keep], 0.0),
        valid=kept,
    )

  arrays = (candidates[key] for key in ("cand_boxes", "cand_scores", "cand_valid"))
  return jax.jit(jax.vmap(single))(*(jnp.asarray(array) for array in arrays))


def _check_part(arch: str, part: Optional[str]) -> str:
  parts = onnx_parts(arch)
  if not parts:
    raise ConfigError(
        f"--format onnx has nothing to export for model.arch={arch!r} (families with ONNX parts: "
        f"{[name for name in _families() if onnx_parts(name)]})"
    )
  part = part or next(iter(parts))
  if part not in parts:
    raise ConfigError(
        f"--onnx-part {part} is not available for model.arch={arch!r}: {', '.join(parts)}"
    )
  return part


def _families() -> list:
  return sorted(META_ARCHS)


def part_fn(predictor, part: Optional[str] = None, orig_hw: bool = False) -> tuple[Callable, list]:
  """`(image, image_hw[, orig_hw]) -> tuple of arrays` of an ONNX part (`onnx_parts`; None = the
  family's default), the variables closed over, and its output names in order. Float outputs are
  float32; `orig_hw` only for the whole detector."""
  arch = predictor.config.model.arch
  part = _check_part(arch, part)
  method = onnx_parts(arch)[part]
  if method is None:  # the whole detector
    detect = detection_fn(predictor, orig_hw)

    def detections(*args):
      out = detect(*args)
      return tuple(out[key] for key in OUTPUT_KEYS)

    return detections, list(OUTPUT_KEYS)
  if orig_hw:
    raise ConfigError(f"--orig-hw needs the boxes of --onnx-part detector, not {part}")
  model, variables = predictor.model, predictor.variables
  shapes = jax.eval_shape(
      lambda image, image_hw: model.apply(variables, image, image_hw, method=method),
      *input_specs(1, (64, 64)),
  )
  names = list(shapes)  # sorted by name: jax flattens (and eval_shape rebuilds) dicts by key

  def fn(image, image_hw):
    out = model.apply(variables, image, image_hw, method=method)
    return tuple(
        out[name].astype(jnp.float32)
        if jnp.issubdtype(out[name].dtype, jnp.floating)
        else out[name]
        for name in names
    )

  return fn, names


def dense_fn(predictor) -> tuple[Callable, list]:
  """`part_fn(predictor, "dense")`: backbone + heads (the family's `dense_outputs`), all outputs
  float32."""
  return part_fn(predictor, "dense")


def import_jax2onnx():
  """jax2onnx, or a one-line UserError naming the install command."""
  try:
    import jax2onnx  # optional extra (requirements-onnx.txt), only for --format onnx
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
    nms: str = "graph",
    image_input: str = "uint8",
    layout: str = "nhwc",
):
  """jax2onnx conversion of an ONNX part (the family's `onnx_parts`; None = its default: the whole
  detector, for both families), traced inside
  `onnx_friendly_ops()`: an `onnx.ModelProto` and its output names. `nms="plugin"` (CenterNet2's
  whole detector): the graph ends before the final per-class NMS with TensorRT's EfficientNMS_TRT
  (`append_efficient_nms`; outputs `PLUGIN_OUTPUTS`)."""
  jax2onnx = import_jax2onnx()
  arch = predictor.config.model.arch
  part = _check_part(arch, part)
  hw = _check_hw(predictor.config, hw or default_hw(predictor.config))
  if nms not in ("graph", "plugin"):
    raise ConfigError(f"--nms must be graph or plugin, got {nms!r}")
  if nms == "plugin":
    _check_plugin_nms(predictor, part, orig_hw)
    fn, names = pre_nms_fn(predictor)
  else:
    fn, names = part_fn(predictor, part, orig_hw)
  fn = with_image_input(fn, image_input, layout)
  # stderr: jax2onnx 0.12.5 prints "DEBUG: conv_dtype_enum=..." for every convolution.
  with onnx_friendly_ops(), contextlib.redirect_stdout(sys.stderr):
    proto = jax2onnx.to_onnx(
        fn,
        list(input_specs(batch, hw, orig_hw, image_input, layout)),
        model_name=f"cn2_jax_{arch}_{part}",
        opset=opset,
        input_names=["image", "image_hw"] + (["orig_hw"] if orig_hw else []),
        output_names=names,
    )
  if nms == "plugin":
    append_efficient_nms(proto, efficient_nms_attributes(predictor.config.model))
    names = list(PLUGIN_OUTPUTS)
  return proto, names


def onnx_signature(proto) -> dict:
  import onnx  # optional extra (requirements-onnx.txt), only for --format onnx

  def show(value_info):
    tensor_type = value_info.type.tensor_type
    dims = ",".join(
        str(dim.dim_value) if dim.HasField("dim_value") else dim.dim_param
        for dim in tensor_type.shape.dim
    )
    return f"{onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)}[{dims}]"

  return dict(
      inputs={value.name: show(value) for value in proto.graph.input},
      outputs={value.name: show(value) for value in proto.graph.output},
  )


# ---------------------------------------------------------------------------- --nms=plugin (TRT)
# TensorRT's EfficientNMS_TRT plugin (TensorRT's plugin/efficientNMSPlugin): a node of op_type
# EfficientNMS_TRT that TensorRT's ONNX parser hands to the registered plugin of that name
# (domain "TRT", as the PyTorch exporters write it; plugin_version "1").
TRT_NMS_OP = "EfficientNMS_TRT"
TRT_DOMAIN = "TRT"
PLUGIN_OUTPUTS = ("num_detections", "detection_boxes", "detection_scores", "detection_classes")
_PRE_NMS_METHOD = "pre_nms_detections"


def _check_plugin_nms(predictor, part: Optional[str], orig_hw: bool) -> None:
  arch = predictor.config.model.arch
  if getattr(type(predictor.model), _PRE_NMS_METHOD, None) is None:
    raise ConfigError(
        f"--nms plugin needs a detector that ends with a per-class NMS (model.arch=centernet2); "
        f"model.arch={arch!r} has none (the one-stage detector's pseudo-NMS is a 3x3 max-pool)"
    )
  if onnx_parts(arch).get(_check_part(arch, part)) is not None:
    raise ConfigError(f"--nms plugin needs --onnx-part detector, not {part}")
  if orig_hw:
    raise ConfigError("--nms plugin gives boxes in input pixels: no --orig-hw")


def efficient_nms_attributes(model_config) -> dict:
  """EfficientNMS_TRT's attributes from the model's test-time settings (`model.roi_heads`):
  per-class NMS at nms_thresh_test over the scores above score_thresh_test, the top
  detections_per_image of all classes kept; no background class among the K score columns, raw
  scores (no sigmoid), corner (x1, y1, x2, y2) boxes."""
  heads = model_config.roi_heads
  return dict(
      score_threshold=float(heads.score_thresh_test),
      iou_threshold=float(heads.nms_thresh_test),
      max_output_boxes=int(heads.detections_per_image),
      background_class=-1,
      score_activation=0,
      class_agnostic=0,
      box_coding=0,
      plugin_version="1",
  )


def pre_nms_fn(predictor) -> tuple[Callable, list]:
  """`(image, image_hw) -> (boxes [N, R, 1, 4], scores [N, R, K])`: the detector up to its final
  per-class NMS (`pre_nms_detections`), as EfficientNMS_TRT takes them (one box per row shared
  by the K classes; a score of 0 for the (box, class) pairs the model's NMS would not consider,
  which the plugin's score threshold drops)."""
  model, variables = predictor.model, predictor.variables

  def fn(image, image_hw):
    out = model.apply(variables, image, image_hw, method=_PRE_NMS_METHOD)
    return out["boxes"][:, :, None, :], out["scores"]

  return fn, ["nms_boxes", "nms_scores"]


def append_efficient_nms(proto, attributes: dict) -> None:
  """Ends the graph of `pre_nms_fn` (outputs nms_boxes, nms_scores) with an EfficientNMS_TRT node
  whose four outputs become the graph's (`PLUGIN_OUTPUTS`): num_detections int32 [N, 1],
  detection_boxes float32 [N, M, 4], detection_scores float32 [N, M], detection_classes int32
  [N, M], M = max_output_boxes. In place."""
  import onnx  # optional extra (requirements-onnx.txt), only for --format onnx

  graph = proto.graph
  boxes, scores = (value.name for value in graph.output)
  batch = graph.input[0].type.tensor_type.shape.dim[0]
  n = batch.dim_param if batch.HasField("dim_param") else batch.dim_value
  m = int(attributes["max_output_boxes"])
  graph.node.append(
      onnx.helper.make_node(
          TRT_NMS_OP,
          [boxes, scores],
          list(PLUGIN_OUTPUTS),
          name="final_nms",
          domain=TRT_DOMAIN,
          **attributes,
      )
  )
  int32, float32 = onnx.TensorProto.INT32, onnx.TensorProto.FLOAT
  shapes = ((int32, [n, 1]), (float32, [n, m, 4]), (float32, [n, m]), (int32, [n, m]))
  graph.value_info.extend(graph.output)  # the plugin's inputs stay typed (jax2onnx's shapes)
  del graph.output[:]
  for name, (dtype, dims) in zip(PLUGIN_OUTPUTS, shapes):
    graph.output.append(onnx.helper.make_tensor_value_info(name, dtype, dims))
  proto.opset_import.append(onnx.helper.make_opsetid(TRT_DOMAIN, 1))


# ------------------------------------------------------------------------------------------- CLI
def _parse_batch(text: str) -> Batch:
  text = text.strip()
  if text.isdigit() and int(text) >= 1:
    return int(text)
  if text.isidentifier():
    return text
  raise argparse.ArgumentTypeError(f"expected a batch size >= 1 or a name (e.g. b), got {text!r}")


def _metadata(
    predictor,
    fmt: str,
    signature: dict,
    hw,
    batch,
    weights: str,
    onnx_part: Optional[str] = None,
    image_input: str = "uint8",
    layout: str = "nhwc",
) -> dict:
  data_cfg, model_cfg = predictor.config.data, predictor.config.model
  image = dict(
      uint8="RGB uint8 at the top-left of a zero canvas",
      normalized="float32, the RGB uint8 canvas normalised: x[..., c] = rgb[..., channels[c]] * "
      "multiply[c] + add[c] (normalization below), 0 outside image_hw",
  )[image_input] + (", [N, 3, H, W]" if layout == "nchw" else ", [N, H, W, 3]")
  return dict(
      format=fmt,
      arch=model_cfg.arch,
      **({"onnx_part": onnx_part} if onnx_part else {}),
      signature=signature,
      batch=batch if isinstance(batch, str) else int(batch),
      canvas_hw=list(hw),
      num_classes=int(model_cfg.num_classes),
      class_names=predictor.class_names,
      category_ids=predictor.category_ids,
      preprocess=dict(
          image=image,
          input=image_input,
          layout=layout,
          normalization=input_normalization(predictor),
          resize_type=data_cfg.resize_type,
          min_size_test=int(data_cfg.min_size_test),
          max_size_test=int(data_cfg.max_size_test),
      ),
      weights=weights,
      jax_version=jax.__version__,
  )


def _size(n: int) -> str:
  return f"{n / 2**20:.1f} MiB ({n} bytes)"


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m cn2_jax.export",
      description="Export the model of a run as one self-contained file: StableHLO (jax.export, "
      "the whole detector, weights inside) or ONNX (the whole detector too; needs "
      f"`{ONNX_INSTALL}`). See the docstring of cn2_jax/export.py.",
  )
  parser.add_argument("--workdir", required=True, help="the run (its config.json, checkpoints)")
  parser.add_argument("--weights", default="", help="weights instead of the newest checkpoint")
  parser.add_argument(
      "--config", default=None, help="config file, for a workdir without config.json"
  )
  parser.add_argument("--format", default="stablehlo", choices=("stablehlo", "onnx"))
  parser.add_argument("--out", required=True, help="file to write (+ a .json beside it)")
  parser.add_argument(
      "--batch",
      default=None,
      type=_parse_batch,
      help="batch size, or a name for a symbolic batch dimension (default: b)",
  )
  parser.add_argument("--height", type=int, default=None, help="canvas height (multiple of 32)")
  parser.add_argument("--width", type=int, default=None, help="canvas width (multiple of 32)")
  parser.add_argument(
      "--orig-hw",
      action="store_true",
      help="a third input orig_hw [N, 2]; boxes come back in original pixels (stablehlo, and "
      "onnx --onnx-part detector)",
  )
  parser.add_argument(
      "--platforms",
      default=",".join(DEFAULT_PLATFORMS),
      help="stablehlo: comma-separated platforms to lower for",
  )
  parser.add_argument(
      "--input",
      default="uint8",
      choices=IMAGE_INPUTS,
      help="the file's image input: uint8 RGB (default; the file normalises) or float32 already "
      "normalised (FILE.json's normalization)",
  )
  parser.add_argument(
      "--layout", default="nhwc", choices=LAYOUTS, help="the image input's axis order"
  )
  parser.add_argument("--opset", type=int, default=18, help="onnx: opset version")
  parser.add_argument(
      "--onnx-part",
      default=None,
      choices=_all_onnx_parts(),
      help="onnx: what to convert (default: "
      + ", ".join(f"{next(iter(onnx_parts(a)))} for {a}" for a in _families() if onnx_parts(a))
      + "; dense = backbone + heads only)",
  )
  parser.add_argument(
      "--nms",
      default="graph",
      choices=("graph", "plugin"),
      help="onnx, CenterNet2's detector: the final per-class NMS in the graph (default) or left to "
      "TensorRT's EfficientNMS_TRT plugin (outputs num_detections, detection_boxes, "
      "detection_scores, detection_classes; onnxruntime cannot run it)",
  )
  parser.add_argument(
      "--random-weights",
      action="store_true",
      help="randomly initialised weights (for size / speed measurements only)",
  )
  parser.add_argument(
      "--check",
      default="",
      metavar="IMAGE",
      help="run the exported file (onnxruntime / jax) on IMAGE, preprocessed as the Predictor "
      "does, compare its detections with the Predictor's and exit 1 on a mismatch",
  )
  parser.add_argument(
      "--check-out",
      default="",
      metavar="FILE",
      help="with --check: write the exported file's detections as JSON [{box (original pixels), "
      "score, label}]",
  )
  parser.add_argument("--check-box-tol", type=float, default=1e-3, help="--check: px")
  parser.add_argument("--check-score-tol", type=float, default=1e-4, help="--check: score")
  args = parser.parse_args(argv)
  try:
    return _run(args)
  except Exception as e:  # noqa: BLE001 - user errors are one line, the rest re-raises
    if not is_user_error(e):
      raise
    print(f"error: {one_line(e)}", file=sys.stderr)
    return 1


def _run(args) -> int:
  if args.format == "onnx":
    import_jax2onnx()  # fail before loading anything
  cfg = load_config(args.workdir, args.weights, args.config)
  onnx_part = None
  if args.format == "onnx":  # fail before loading weights or converting anything
    onnx_part = _check_part(cfg.model.arch, args.onnx_part)
  # StableHLO files and the ONNX `detector` part give boxes; other ONNX parts give maps
  detections = onnx_part is None or onnx_parts(cfg.model.arch)[onnx_part] is None
  if args.orig_hw and not detections:
    raise ConfigError(
        f"--orig-hw needs the boxes of --onnx-part detector; model.arch={cfg.model.arch!r} "
        f"exports {onnx_part}"
    )
  if args.nms == "plugin" and args.format != "onnx":
    raise ConfigError("--nms plugin is for --format onnx (TensorRT's EfficientNMS_TRT)")
  if args.nms == "plugin" and args.orig_hw:
    raise ConfigError("--nms plugin gives boxes in input pixels: no --orig-hw")
  if args.nms == "plugin" and args.check:
    raise ConfigError("--check runs the file in onnxruntime, which has no EfficientNMS_TRT")
  if args.check_out and not args.check:
    raise ConfigError("--check-out needs --check IMAGE")
  if args.check and not detections:
    raise ConfigError(
        f"--check compares detections; model.arch={cfg.model.arch!r} exports {onnx_part}, not the "
        "whole detector (--onnx-part detector, or --format stablehlo)"
    )
  if args.random_weights:
    cfg.weights = ""
    predictor = Predictor(  # class names as Predictor.from_workdir finds them
        cfg, detector.init_variables(cfg.model), *_dataset_info(args.workdir, cfg)
    )
  else:
    predictor = Predictor.from_workdir(args.workdir, cfg)
  hw = _check_hw(cfg, (args.height or default_hw(cfg)[0], args.width or default_hw(cfg)[1]))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  if args.format == "stablehlo":
    batch = "b" if args.batch is None else args.batch
    platforms = tuple(p for p in args.platforms.split(",") if p)
    kwargs = dict(platforms=platforms, image_input=args.input, layout=args.layout)
    try:
      exported = export_stablehlo(predictor, batch=batch, hw=hw, orig_hw=args.orig_hw, **kwargs)
    except Exception as e:  # noqa: BLE001 - a family whose ops need a static batch
      if not isinstance(batch, str):
        raise
      print(
          f"warning: a symbolic batch does not export for model.arch={cfg.model.arch!r} "
          f"({type(e).__name__}: {one_line(e)[:300]}); exporting batch 1",
          file=sys.stderr,
      )
      batch = 1
      exported = export_stablehlo(predictor, batch=batch, hw=hw, orig_hw=args.orig_hw, **kwargs)
    data = serialize(exported)
    signature = stablehlo_signature(exported, args.orig_hw)
  else:
    batch = "b" if args.batch is None else args.batch
    proto, _ = export_onnx(
        predictor,
        batch=batch,
        hw=hw,
        opset=args.opset,
        part=onnx_part,
        orig_hw=args.orig_hw,
        nms=args.nms,
        image_input=args.input,
        layout=args.layout,
    )
    data = proto.SerializeToString()
    signature = onnx_signature(proto)
  with open(args.out, "wb") as out_file:
    out_file.write(data)
  with open(args.out + ".json", "w") as meta_file:
    weights = (
        "random (--random-weights)"
        if args.random_weights
        else cfg.weights or f"newest checkpoint of {os.path.abspath(args.workdir)}"
    )
    meta = _metadata(
        predictor, args.format, signature, hw, batch, weights, onnx_part, args.input, args.layout
    )
    if args.nms == "plugin":
      meta["nms"] = dict(plugin=TRT_NMS_OP, **efficient_nms_attributes(cfg.model))
    json.dump(meta, meta_file, indent=2)
  print(f"wrote {args.out}: {_size(len(data))}")
  for kind in ("inputs", "outputs"):
    print(f"  {kind}:")
    for name, aval in signature[kind].items():
      print(f"    {name:<14} {aval}")
  if "platforms" in signature:
    print(f"  platforms: {', '.join(signature['platforms'])}")
  print(f"  metadata: {args.out}.json")
  if not args.check:
    return 0
  result = export_check.check_export(
      predictor,
      args.format,
      data,
      hw,
      args.check,
      with_orig_hw=args.orig_hw,
      out_path=args.check_out or None,
      box_tol=args.check_box_tol,
      score_tol=args.check_score_tol,
      image_input=args.input,
      layout=args.layout,
  )
  print(result.line(args.check))
  if args.check_out:
    print(f"  detections of the exported file: {args.check_out}")
  return 0 if result.ok else 1


if __name__ == "__main__":
  sys.exit(main())
