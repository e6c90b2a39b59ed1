"""`python -m cn2_jax.export`: a trained model as one self-contained file for deployment.

Usage:
  python -m cn2_jax.export --workdir runs/demo --out demo.stablehlo        # --format stablehlo
  python -m cn2_jax.export --workdir DIR --config configs/cn2_r50.py --weights W.pth \
      --out cn2_r50.stablehlo --batch 1 --height 800 --width 1088
  python -m cn2_jax.export --workdir runs/demo --format onnx --out demo.onnx   # optional extra

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
  onnxruntime), best in a separate venv; scripts/test_onnx.sh makes one and runs the tests):
  jax2onnx converts the dense part only, preprocessing + backbone + heads, as centerX's ONNX
  export does (spec §6); decode, NMS and ROIAlign then run on the host. The full detector does
  not convert: jax2onnx 0.17.1 stops in the NMS while-loop at "Unhandled internal op in Gather:
  {'op': 'general_gather', ... 'mode': 'batched' ...}", 0.12.5 earlier, in its vmap rule for
  jnp.where ("module 'jax.interpreters.batching' has no attribute 'not_mapped'", removed in jax
  0.10). Inputs as above (batch symbolic by default, `--batch N` fixes it); outputs, NHWC float32,
  in this order:
    centernet2: hm_logits_p3..p7 [N, H/s, W/s] objectness logits, p3..p7 [N, H/s, W/s,
                fpn_channels] the FPN features the ROI heads pool, reg_p3..p7 [N, H/s, W/s, 4]
                ltrb box distances in units of s (s = 8, 16, 32, 64, 128)
    onestage:   cls [N, H/4, W/4, C] sigmoid heatmap, reg [N, H/4, W/4, 2] centre offsets,
                wh [N, H/4, W/4, 2] box sizes; only without DCN (model.onestage.use_deform=False,
                like centerX's export; a DCN model is refused in one line)
  Two ops are traced in an equivalent form while converting (`onnx_friendly_ops`), because
  jax2onnx mis-converts them: ResNet's 3x3/2 max-pool (a 4-D reduce_window becomes a 4-D MaxPool
  that onnxruntime rejects: "Unsupported pooling size") and the one-stage neck's transposed
  convolution (lhs_dilation dropped). Opset 18 by default (jax2onnx writes ReduceMax with an axes
  input even at opset 17). onnxruntime matches JAX to 1e-4 (of the output's magnitude for the
  unnormalised FPN features), tests/test_export.py. TensorRT, UNTESTED (no GPU here):
    trtexec --onnx=demo.onnx --saveEngine=demo.plan \
        --minShapes=image:1x160x160x3,image_hw:1x2 --optShapes=image:4x160x160x3,image_hw:4x2 \
        --maxShapes=image:8x160x160x3,image_hw:8x2 [--fp16]
  (no --*Shapes with --batch N; uint8 network inputs need TensorRT >= 8.6).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import ml_collections

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
def _centernet2_dense(m, image, image_hw) -> dict:
  """CenterNet2 without proposals / ROI heads: the FPN features and CenterNet head maps, on the
  official canvas exactly as `CenterNet2.__call__` computes them."""
  from cn2_jax.modeling.canvas import canvas_masks, official_canvas

  images = m.preprocess(image, image_hw)
  canvas = official_canvas(image_hw)
  feats = m.backbone(images, canvas)
  masks = canvas_masks(image_hw, [f.shape[1:3] for f in feats], m.proposal_generator.strides)
  head = m.proposal_generator.centernet_head(feats, masks)
  out = {f"p{i + 3}": f for i, f in enumerate(feats)}
  out.update({f"hm_logits_p{i + 3}": h for i, h in enumerate(head["hm_logits"])})
  out.update({f"reg_p{i + 3}": r for i, r in enumerate(head["reg"])})
  return out


def _onestage_dense(m, image, image_hw) -> dict:
  """One-stage CenterNet without the peak decode: the cls (sigmoid) / wh / reg head maps."""
  maps = m.maps(m.preprocess(image, image_hw))
  return {k: maps[k] for k in ("cls", "wh", "reg")}


# model.arch -> (module, image, image_hw) -> {name: array}, the part jax2onnx converts.
DENSE_PARTS = {"centernet2": _centernet2_dense, "onestage": _onestage_dense}


def dense_fn(predictor) -> tuple[Callable, list]:
  """`(image, image_hw) -> tuple of arrays` (the dense part, variables closed over) and the
  output names, in order."""
  from cn2_jax.errors import ConfigError

  arch = predictor.config.model.arch
  if arch not in DENSE_PARTS:
    raise ConfigError(
        f"--format onnx has no dense part for model.arch={arch!r} (export.DENSE_PARTS has "
        f"{sorted(DENSE_PARTS)})"
    )
  part, model, variables = DENSE_PARTS[arch], predictor.model, predictor.variables
  shapes = jax.eval_shape(
      lambda i, h: model.apply(variables, i, h, method=part), *input_specs(1, (64, 64))
  )
  names = list(shapes)  # sorted by name: jax flattens (and eval_shape rebuilds) dicts by key

  def fn(image, image_hw):
    out = model.apply(variables, image, image_hw, method=part)
    return tuple(out[k].astype(jnp.float32) for k in names)

  return fn, names


def _pool_for_onnx(x: jax.Array) -> jax.Array:
  """`resnet.max_pool_3x3_s2_p1` as -inf padding + flax max_pool (VALID): the same values, as
  a 2-D MaxPool in ONNX."""
  import flax.linen as nn

  pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  return nn.max_pool(pad, window_shape=(3, 3), strides=(2, 2), padding="VALID")


def _dilate(x: jax.Array, s: int, axis: int) -> jax.Array:
  """s-1 zeros between neighbours along `axis` (1 or 2 of NHWC), by stack + reshape."""
  n = x.shape[axis]
  x = jnp.stack([x] + [jnp.zeros_like(x)] * (s - 1), axis=axis + 1)
  shape = list(x.shape[:axis]) + [n * s] + list(x.shape[axis + 2 :])
  shape[0] = -1  # the batch may be symbolic
  return jax.lax.slice_in_dim(x.reshape(shape), 0, (n - 1) * s + 1, axis=axis)


def _conv_transpose_for_onnx(
    x, kernel, *, stride: int = 2, padding: int = 1, output_padding: int = 0, precision=None
):
  """`onestage.neck.conv_transpose2d` with the input dilated explicitly (zeros inserted) and a
  plain convolution: the same values; jax2onnx drops the `lhs_dilation` of a convolution (the
  output came out smaller than the input)."""
  kh, kw = kernel.shape[0], kernel.shape[1]
  x = _dilate(_dilate(x, stride, 1), stride, 2)
  pad_h = (kh - 1 - padding, kh - 1 - padding + output_padding)
  pad_w = (kw - 1 - padding, kw - 1 - padding + output_padding)
  return jax.lax.conv_general_dilated(
      x,
      kernel[::-1, ::-1].astype(x.dtype),
      window_strides=(1, 1),
      padding=(pad_h, pad_w),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=precision,
  )


def _onnx_replacements() -> list:
  """(original function, replacement) pairs for `onnx_friendly_ops`."""
  from cn2_jax.modeling.backbone import resnet

  out = [(resnet.max_pool_3x3_s2_p1, _pool_for_onnx)]
  try:
    from cn2_jax.modeling.onestage import neck
  except ImportError:  # a checkout without the one-stage family
    return out
  return out + [(neck.conv_transpose2d, _conv_transpose_for_onnx)]


@contextlib.contextmanager
def onnx_friendly_ops():
  """While converting, every cn2_jax module's reference to a function that jax2onnx (0.12.5 ..
  0.17.1) mis-converts traces as an equivalent one it converts right:
    resnet.max_pool_3x3_s2_p1 -> _pool_for_onnx: a 4-D `reduce_window` becomes a MaxPool with 4
      spatial dims, which onnxruntime rejects ("Unsupported pooling size");
    onestage.neck.conv_transpose2d -> _conv_transpose_for_onnx: `lhs_dilation` is dropped.
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
  return jax2onnx


def export_onnx(
    predictor, *, batch: Batch = "b", hw: Optional[Sequence[int]] = None, opset: int = 18
):
  """jax2onnx conversion of the dense part (`DENSE_PARTS`): an `onnx.ModelProto` and its output
  names."""
  from cn2_jax.errors import ConfigError

  jax2onnx = import_jax2onnx()
  m = predictor.config.model
  if m.arch == "onestage" and m.onestage.use_deform:
    raise ConfigError(
        "--format onnx: the one-stage model has deformable convolutions "
        "(model.onestage.use_deform=True), which jax2onnx does not convert and ONNX / TensorRT "
        "have no op for; export a use_deform=False model (as centerX does)"
    )
  hw = _check_hw(predictor.config, hw or default_hw(predictor.config))
  fn, names = dense_fn(predictor)
  with onnx_friendly_ops():
    proto = jax2onnx.to_onnx(
        fn,
        list(input_specs(batch, hw)),
        model_name=f"cn2_jax_{predictor.config.model.arch}_dense",
        opset=opset,
        input_names=["image", "image_hw"],
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


def _metadata(predictor, fmt: str, signature: dict, hw, batch, weights: str) -> dict:
  d, m = predictor.config.data, predictor.config.model
  return dict(
      format=fmt,
      arch=m.arch,
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
      "the whole detector, weights inside) or ONNX (backbone + heads, needs "
      f"`{ONNX_INSTALL}`). See the docstring of cn2_jax/export.py.",
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
      help="stablehlo: a third input orig_hw [N, 2]; boxes come back in original pixels",
  )
  ap.add_argument(
      "--platforms",
      default=",".join(DEFAULT_PLATFORMS),
      help="stablehlo: comma-separated platforms to lower for",
  )
  ap.add_argument("--opset", type=int, default=18, help="onnx: opset version")
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
    if args.orig_hw:
      from cn2_jax.errors import ConfigError

      raise ConfigError("--orig-hw is for --format stablehlo (ONNX outputs no boxes)")
    import_jax2onnx()  # fail before loading anything
  cfg = load_config(args.workdir, args.weights, args.config)
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
    proto, _ = export_onnx(predictor, batch=batch, hw=hw, opset=args.opset)
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
    json.dump(_metadata(predictor, args.format, signature, hw, batch, weights), f, indent=2)
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
  sys.exit(main())
