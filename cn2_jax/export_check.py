"""`python -m cn2_jax.export ... --check IMAGE [--check-out FILE]`: run the file just exported on
one image and compare its detections with the `Predictor`'s.

The image is preprocessed exactly as the Predictor does (`Predictor.preprocess`: resize, paste at
the top-left of the Predictor's canvas) and pasted at the top-left of the export's zero H x W
canvas; the file runs with onnxruntime (ONNX, CPU) or `jax.export` (StableHLO). Its boxes come
back in input pixels (or original pixels with `--orig-hw`) and are rescaled as the Predictor's
post-processing does. Matching: in the export's score order, each detection takes the unused
Predictor detection of the same class whose box is closest (largest coordinate difference); a pair
matches when that difference is <= `box_tol` px and the scores differ by <= `score_tol`. The check
passes when every detection of both sides is matched.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional, Sequence

import jax
import numpy as np

from cn2_jax.errors import ConfigError
from cn2_jax.modeling import detector

OUTPUT_KEYS = ("boxes", "scores", "classes", "valid")  # every export's detection outputs


@dataclasses.dataclass
class CheckResult:
  matched: int
  exported: int  # valid detections of the exported file
  reference: int  # the Predictor's
  max_box_diff: float  # px, over matched pairs
  max_score_diff: float
  box_tol: float
  score_tol: float

  @property
  def ok(self) -> bool:
    return self.matched == self.exported == self.reference

  def line(self, image: str) -> str:
    verdict = "ok" if self.ok else "MISMATCH"
    return (
        f"check {image}: {self.matched}/{max(self.exported, self.reference)} detections matched "
        f"(export {self.exported}, Predictor {self.reference}); largest differences of matched "
        f"pairs: box {self.max_box_diff:.2e} px (tolerance {self.box_tol:g}), score "
        f"{self.max_score_diff:.2e} (tolerance {self.score_tol:g}): {verdict}"
    )


def export_inputs(predictor, image: np.ndarray, hw: Sequence[int], with_orig_hw: bool) -> tuple:
  """(image uint8 [1, H, W, 3], image_hw [1, 2], orig_hw [1, 2]) for an export of canvas `hw`, from
  the Predictor's own preprocessing; the file takes all three with `with_orig_hw`, else the first
  two."""
  batch_image, image_hw, orig_hw = predictor.preprocess(image)
  h, w = (int(v) for v in hw)
  rh, rw = (int(v) for v in image_hw[0])
  if rh > h or rw > w:
    raise ConfigError(
        f"--check: the image resized for the Predictor ({rh}x{rw}) does not fit the export's "
        f"canvas {h}x{w} (--height/--width)"
    )
  canvas = np.zeros((1, h, w, 3), np.uint8)
  ch, cw = min(h, batch_image.shape[1]), min(w, batch_image.shape[2])
  canvas[:, :ch, :cw] = batch_image[:, :ch, :cw]
  return canvas, np.asarray(image_hw, np.int32), np.asarray(orig_hw, np.int32)


def image_input_array(
    predictor, image: np.ndarray, image_hw: np.ndarray, image_input: str = "uint8", layout="nhwc"
) -> np.ndarray:
  """The file's `image` input from the uint8 RGB canvas `image [N, H, W, 3]`: itself, or (with
  `image_input` "normalized") the family's own preprocessing of it (float32, 0 outside
  `image_hw`); transposed to [N, 3, H, W] with `layout` "nchw"."""
  x = np.asarray(image)
  if image_input == "normalized":
    x = model_preprocess(predictor, x, image_hw)
  return x.transpose(0, 3, 1, 2) if layout == "nchw" else x


def model_preprocess(predictor, image: np.ndarray, image_hw: np.ndarray) -> np.ndarray:
  """The family's own `preprocess` of a uint8 RGB canvas `[N, H, W, 3]` (normalised float32, 0
  outside `image_hw [N, 2]`), as numpy."""
  out = jax.jit(
      lambda im, hw: predictor.model.apply(predictor.variables, im, hw, method="preprocess")
  )(image, np.asarray(image_hw, np.int32))
  return np.asarray(out, np.float32)


def run_exported(fmt: str, data: bytes, inputs: tuple, input_names: Sequence[str]) -> dict:
  """The exported file's outputs (numpy) on `inputs`: onnxruntime (CPU) or jax.export."""
  if fmt == "onnx":
    try:
      import onnxruntime  # optional extra (requirements-onnx.txt), only for --check of ONNX
    except ImportError as e:
      raise ConfigError(
          "--check of an ONNX file needs onnxruntime (pip install -r requirements-onnx.txt)"
      ) from e
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    values = session.run(None, dict(zip(input_names, inputs)))
    return dict(zip(names, values))
  exported = jax.export.deserialize(bytearray(data))
  return {key: np.asarray(value) for key, value in exported.call(*inputs).items()}


def to_original_pixels(out: dict, image_hw: np.ndarray, orig_hw: np.ndarray) -> dict:
  """Valid detections of image 0 in original pixels: the Predictor's post-processing
  (`detector.postprocess_detections`: rescale, clip, drop empty boxes) applied to the file's
  outputs."""
  missing = [key for key in OUTPUT_KEYS if key not in out]
  if missing:
    raise ConfigError(
        f"--check compares detections; the exported file has no {', '.join(missing)} output "
        f"(outputs: {', '.join(out)}): export the whole detector"
    )
  dets = detector.postprocess_detections(
      {key: np.asarray(out[key]) for key in OUTPUT_KEYS}, image_hw, orig_hw
  )
  keep = np.asarray(dets["valid"][0])
  return dict(
      boxes=np.asarray(dets["boxes"][0], np.float32)[keep],
      scores=np.asarray(dets["scores"][0], np.float32)[keep],
      classes=np.asarray(dets["classes"][0]).astype(np.int64)[keep],
  )


def compare(got: dict, want: dict, box_tol: float = 1e-3, score_tol: float = 1e-4) -> CheckResult:
  """Greedy matching of `got` to `want` (module docstring); both {boxes [K, 4], scores, classes}."""
  used = np.zeros(len(want["scores"]), bool)
  matched, max_box, max_score = 0, 0.0, 0.0
  for i in np.argsort(-np.asarray(got["scores"]), kind="stable"):
    same_class = np.flatnonzero((np.asarray(want["classes"]) == got["classes"][i]) & ~used)
    if same_class.size == 0:
      continue
    box_diffs = np.abs(np.asarray(want["boxes"])[same_class] - got["boxes"][i]).max(axis=1)
    j = same_class[int(np.argmin(box_diffs))]
    box_diff = float(box_diffs.min())
    score_diff = abs(float(want["scores"][j]) - float(got["scores"][i]))
    if box_diff <= box_tol and score_diff <= score_tol:
      used[j] = True
      matched += 1
      max_box, max_score = max(max_box, box_diff), max(max_score, score_diff)
  return CheckResult(
      matched, len(got["scores"]), len(want["scores"]), max_box, max_score, box_tol, score_tol
  )


def write_detections(path: str, dets: dict) -> None:
  """A JSON list of {"box": [x1, y1, x2, y2] (original pixels), "score", "label"} (label: the
  contiguous class index 0..C-1; names in the export's .json), highest score first."""
  order = np.argsort(-dets["scores"], kind="stable")
  rows = [
      dict(
          box=[float(v) for v in dets["boxes"][i]],
          score=float(dets["scores"][i]),
          label=int(dets["classes"][i]),
      )
      for i in order
  ]
  with open(path, "w") as f:
    json.dump(rows, f, indent=1)


def check_export(
    predictor,
    fmt: str,
    data: bytes,
    hw: Sequence[int],
    image_path: str,
    *,
    with_orig_hw: bool = False,
    out_path: Optional[str] = None,
    box_tol: float = 1e-3,
    score_tol: float = 1e-4,
    image_input: str = "uint8",
    layout: str = "nhwc",
) -> CheckResult:
  """Runs the exported `data` on `image_path` and compares with `predictor` (module docstring);
  writes the exported file's detections to `out_path` when given."""
  image = predictor.read_image(image_path)  # a missing / corrupt file: a one-line DataError
  inputs = export_inputs(predictor, image, hw, with_orig_hw)
  inputs = (image_input_array(predictor, inputs[0], inputs[1], image_input, layout), *inputs[1:])
  used = inputs if with_orig_hw else inputs[:2]
  out = run_exported(fmt, data, used, ("image", "image_hw", "orig_hw")[: len(used)])
  image_hw, orig_hw = inputs[1:]
  # with --orig-hw the file's boxes are already in original pixels (a scale of 1 below)
  got = to_original_pixels(out, orig_hw if with_orig_hw else image_hw, orig_hw)
  reference = predictor(image)
  want = {key: np.asarray(reference[key]) for key in ("boxes", "scores", "classes")}
  if out_path:
    write_detections(out_path, got)
  return compare(got, want, box_tol, score_tol)
