"""ONNX export of the one-stage R18 detector and of CenterNet2 R50: file sizes, and onnxruntime CPU
latency against jitted JAX on the same CPU (prints a markdown table; not part of the test suite).

`--model onestage` (default): centerX's R18 (`model.resnet_depth=18`, ResNet width 64, neck (256, 128, 64), 80
classes, K = 100 detections) with random weights, on a 512x512 canvas at batch 1, with the DCNv2
neck (`model.onestage.use_deform=True`, centerX's default) and with plain 3x3 convs. For each:
  * the sizes of the ONNX file (`export.export_onnx`: the whole detector, preprocessing to
    decoded boxes) and of the StableHLO file (`export.export_stablehlo`, lowered for cpu + cuda);
  * the median (and min) latency over `--runs` calls of onnxruntime's CPUExecutionProvider
    (intra-op threads = `--threads`) and of the Predictor's jitted forward
    (`Predictor._apply`, XLA's CPU backend, which uses every core), after two warm-up calls,
    the two alternating call by call so that both see the same background load;
  * parity of the two: the largest |difference| of boxes and scores over the K rows, and whether
    the classes are equal row for row.

`--model cn2_r50`: CenterNet2 R50 (configs/cn2_r50.py, adaptive ROIAlign) with the regenerated
official CenterNet2_R50_1x oracle weights (cn2_jax/testing/oracle.py; random weights when
../shared/oracle is absent) on the oracle's COCO image (640x480, resized to 800x1067, canvas
800x1088), batch 1: the same measurements, the whole detector (preprocessing to the final
per-class NMS and top 100) in both files; parity also as `--check` matches detections
(export_check: same class, box within 1e-3 px, score within 1e-4).

Needs the ONNX extra (jax2onnx, onnxruntime), e.g. the venv scripts/test_onnx.sh makes:
  JAX_PLATFORMS=cpu PYTHONPATH=. ../onnxvenv/bin/python bench/onnx_latency.py [--runs 20] \\
      [--threads N] [--out-dir DIR] [--model onestage|cn2_r50] [--deform both|on|off]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np


def build_predictor(use_deform: bool, side: int):
  from cn2_jax.config import base_config
  from cn2_jax.modeling import detector
  from cn2_jax.predictor import Predictor

  cfg = base_config()
  m = cfg.model
  m.arch = "onestage"
  m.num_classes = 80
  m.resnet_depth = 18
  m.resnet_width = 64
  m.onestage.deconv_channels = (256, 128, 64)
  m.onestage.use_deform = use_deform
  m.onestage.max_detections = 100
  cfg.data.min_size_test, cfg.data.max_size_test = side, side
  cfg.data.pad_hw_test = (side, side)
  return Predictor(cfg, detector.init_variables(cfg.model, seed=0))


def test_image(side: int) -> np.ndarray:
  """Blocks of colour on noise, the whole canvas valid."""
  rng = np.random.default_rng(0)
  img = rng.integers(0, 60, (side, side, 3), dtype=np.uint8)
  for _ in range(12):
    y, x = rng.integers(0, side - 80, 2)
    h, w = rng.integers(30, 200, 2)
    img[y : y + h, x : x + w] = rng.integers(80, 255, 3)
  return img[None]


def build_cn2_r50():
  """CenterNet2 R50 with the oracle weights (random without the oracle), the oracle image as the
  Predictor preprocesses it, and a label for the weights."""
  from cn2_jax.config import load_config_file, validate_config
  from cn2_jax.convert import convert_to_flax
  from cn2_jax.modeling import detector
  from cn2_jax.predictor import Predictor
  from cn2_jax.testing.oracle import oracle_dir, oracle_json_path, regenerate_oracle_state_dict

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cfg = validate_config(load_config_file(os.path.join(repo, "configs", "cn2_r50.py")))
  json_path = oracle_json_path()
  if json_path is None:
    variables, label = detector.init_variables(cfg.model, seed=0), "random weights"
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
  else:
    variables, report = convert_to_flax(
        regenerate_oracle_state_dict(json_path), detector.abstract_variables(cfg.model)
    )
    assert report.ok, report
    label = "official oracle weights"
    image = Predictor.read_image(str(oracle_dir() / "000000000009.jpg"))
  predictor = Predictor(cfg, variables)
  padded, image_hw, _ = predictor.preprocess(image)
  return predictor, padded, image_hw, label


def measure(use_deform: bool, args) -> dict:
  if args.model == "cn2_r50":
    predictor, image, hw, label = build_cn2_r50()
    tag = "cn2_r50"
  else:
    predictor = build_predictor(use_deform, args.size)
    image = test_image(args.size)
    hw = np.array([[args.size, args.size]], np.int32)
    label = "random weights"
    tag = "dcn" if use_deform else "plain"
  return measure_predictor(predictor, image, hw, tag, args, label)


def measure_predictor(predictor, image, hw, tag, args, label="") -> dict:
  import onnxruntime as ort

  from cn2_jax import export, export_check

  canvas = tuple(int(v) for v in image.shape[1:3])
  n_params = sum(int(np.size(v)) for v in jax.tree_util.tree_leaves(predictor.variables))
  t0 = time.perf_counter()
  proto, names = export.export_onnx(predictor, batch=1, hw=canvas)
  convert_s = time.perf_counter() - t0
  stem = tag if tag == "cn2_r50" else f"onestage_r18_{tag}"
  onnx_path = os.path.join(args.out_dir, f"{stem}.onnx")
  with open(onnx_path, "wb") as f:
    f.write(proto.SerializeToString())
  del proto
  hlo_path = os.path.join(args.out_dir, f"{stem}.stablehlo")
  with open(hlo_path, "wb") as f:
    f.write(export.serialize(export.export_stablehlo(predictor, batch=1, hw=canvas)))

  so = ort.SessionOptions()
  so.intra_op_num_threads = args.threads
  so.inter_op_num_threads = 1
  so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
  sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
  feed = {"image": image, "image_hw": hw}

  def run_jax():
    return jax.device_get(predictor._apply(predictor.variables, image, hw, hw))

  def run_ort():
    return dict(zip(names, sess.run(None, feed)))

  want, got = run_jax(), run_ort()  # first calls (compile / session warm-up), not timed
  run_jax(), run_ort()
  times = {"jax": [], "ort": []}
  for _ in range(args.runs):
    for name, fn in (("jax", run_jax), ("ort", run_ort)):
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  # --check's matching of the valid detections (in input pixels here)
  match = export_check.compare(
      export_check.to_original_pixels(got, hw, hw), export_check.to_original_pixels(want, hw, hw)
  )
  return dict(
      tag=tag,
      label=label,
      canvas=canvas,
      matched=f"{match.matched}/{max(match.exported, match.reference)}",
      params=n_params,
      onnx_mib=os.path.getsize(onnx_path) / 2**20,
      hlo_mib=os.path.getsize(hlo_path) / 2**20,
      convert_s=convert_s,
      ort_ms=1e3 * float(np.median(times["ort"])),
      ort_min_ms=1e3 * float(np.min(times["ort"])),
      jax_ms=1e3 * float(np.median(times["jax"])),
      jax_min_ms=1e3 * float(np.min(times["jax"])),
      d_boxes=float(np.abs(got["boxes"] - want["boxes"]).max()),
      d_scores=float(np.abs(got["scores"] - want["scores"]).max()),
      classes_equal=bool(np.array_equal(got["classes"], want["classes"])),
      top_score=float(want["scores"][0, 0]),
  )


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--runs", type=int, default=20)
  ap.add_argument("--threads", type=int, default=os.cpu_count())
  ap.add_argument("--size", type=int, default=512, help="onestage: canvas side")
  ap.add_argument("--model", choices=("onestage", "cn2_r50"), default="onestage")
  ap.add_argument("--deform", choices=("both", "on", "off"), default="both", help="onestage")
  ap.add_argument("--out-dir", default=None, help="where the files go (default: a temp dir)")
  args = ap.parse_args()
  from importlib.metadata import version

  import onnxruntime

  from cn2_jax import export

  export.import_jax2onnx()  # (quiet logs)

  tmp = None
  if args.out_dir is None:
    tmp = tempfile.TemporaryDirectory()
    args.out_dir = tmp.name
  os.makedirs(args.out_dir, exist_ok=True)
  if args.model == "cn2_r50":
    rows = [measure(False, args)]
    what = (
        f"CenterNet2 R50 (configs/cn2_r50.py), {rows[0]['label']}, the oracle image at canvas "
        f"{rows[0]['canvas'][0]}x{rows[0]['canvas'][1]}"
    )
  else:
    necks = {"both": (False, True), "on": (True,), "off": (False,)}[args.deform]
    rows = [measure(d, args) for d in necks]
    what = f"one-stage R18, {args.size}x{args.size}, random weights"
  print(
      f"{what}, batch 1; {os.cpu_count()} CPU cores, onnxruntime {onnxruntime.__version__} "
      f"({args.threads} intra-op threads), jax {jax.__version__} (XLA: every core), jax2onnx "
      f"{version('jax2onnx')}; median (min) of {args.runs} runs"
  )
  print()
  print(
      "| model | parameters | ONNX file | StableHLO file | onnxruntime CPU | JAX CPU (jit) | "
      "ORT / JAX | max abs diff boxes / scores (row by row) | classes equal | matched |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  names = {"dcn": "R18 DCNv2 neck", "plain": "R18 3x3-conv neck", "cn2_r50": "CenterNet2 R50"}
  for r in rows:
    print(
        f"| {names[r['tag']]} | {r['params'] / 1e6:.2f} M "
        f"| {r['onnx_mib']:.1f} MiB | {r['hlo_mib']:.1f} MiB "
        f"| {r['ort_ms']:.0f} ms ({r['ort_min_ms']:.0f}) "
        f"| {r['jax_ms']:.0f} ms ({r['jax_min_ms']:.0f}) "
        f"| {r['ort_ms'] / r['jax_ms']:.2f} | {r['d_boxes']:.1e} px / {r['d_scores']:.1e} "
        f"| {'yes' if r['classes_equal'] else 'no'} | {r['matched']} |"
    )
  print()
  for r in rows:
    print(f"{r['tag']}: jax2onnx conversion {r['convert_s']:.0f} s, top score {r['top_score']:.3f}")
  if tmp is not None:
    tmp.cleanup()


if __name__ == "__main__":
  main()
