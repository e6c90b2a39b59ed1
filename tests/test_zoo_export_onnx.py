"""Every detector exports to ONNX (issue 26 item 3): the whole detector (`--onnx-part detector`) of
each distinct architecture of configs/zoo (narrowed as in test_zoo_export, 256x256 canvas, random
weights) and of the one-stage centerX family's RegNet backbones (its ResNet with and without DCN:
test_export.py), converted by `export.export_onnx` with a symbolic batch, gives the Predictor's
forward's detections in onnxruntime for a batch of 2 images of different sizes: per image the
same valid detections under `--check`'s matching (export_check.compare: same class, boxes within
1e-3 px, scores within 1e-4). Runs in the ONNX venv only: `bash scripts/test_onnx.sh -m zoo`
(skipped without jax2onnx / onnxruntime)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from cn2_jax import export, export_check
from cn2_jax.config import load_config_file
from cn2_jax.modeling import detector
from cn2_jax.modeling.backbone import regnet
from cn2_jax.predictor import Predictor
from tests.test_export import REPO, _image
from tests.test_zoo_export import ARCHITECTURES
from tests.test_zoo_train import _narrow

HAS_ONNX = all(importlib.util.find_spec(m) for m in ("jax2onnx", "onnxruntime"))
pytestmark = [
    pytest.mark.zoo,
    pytest.mark.skipif(not HAS_ONNX, reason="needs jax2onnx + onnxruntime (scripts/test_onnx.sh)"),
]

CANVAS = (256, 256)  # a multiple of the BiFPN models' size_divisibility (128)
ONESTAGE_CANVAS = (64, 64)
# A RegNetY small enough for the test (SE, grouped convs), as tests/test_regnet.py registers it.
TINY_REGNETY = regnet.RegNetParams(depth=5, w0=8, wa=12.0, wm=2.0, group_w=8, se_r=0.25, stem_w=8)


@pytest.fixture(scope="module", autouse=True)
def _fast(fast_compile):
  yield


def _zoo_predictor(name: str) -> Predictor:
  cfg = _narrow(name)
  cfg.data.min_size_test, cfg.data.max_size_test, cfg.data.pad_hw_test = 128, 192, CANVAS
  # random weights: keep detections to compare
  cfg.model.roi_heads.score_thresh_test = cfg.model.centernet.inference_thresh = 0.0
  cd = cfg.model.centernet_detector  # CenterNet alone (arch "centernet")
  cd.inference_thresh, cd.post_nms_topk_test = 0.0, 50
  # S4: 1024 valid candidates, the per-class NMS loop of torchvision_cpu (4 * 1024 > 4000
  # coordinates); FPN: 5 levels of <= 256, its coordinate-offset NMS.
  cd.pre_nms_topk_test = 1024 if "S4" in name else 256
  return Predictor(cfg, detector.init_variables(cfg.model, seed=5))


def _onestage_predictor(backbone: str) -> Predictor:
  cfg = load_config_file(f"{REPO}/configs/centernet_demo.py")
  cfg.data.min_size_test, cfg.data.max_size_test, cfg.data.pad_hw_test = 48, 64, ONESTAGE_CANVAS
  cfg.model.onestage.backbone = backbone
  cfg.model.onestage.mask_canvas = True  # the family's default (the demo config turns it off)
  return Predictor(cfg, detector.init_variables(cfg.model, seed=1))


def _check_onnx(predictor: Predictor, canvas, image_hw) -> list:
  """Converts the whole detector (symbolic batch), runs it in onnxruntime on two images of sizes
  `image_hw` and matches each image's detections with the Predictor's forward's."""
  import onnxruntime as ort

  proto, names = export.export_onnx(predictor)
  assert names == list(export.OUTPUT_KEYS)
  sig = export.onnx_signature(proto)
  assert sig["inputs"] == {
      "image": f"uint8[b,{canvas[0]},{canvas[1]},3]",
      "image_hw": "int32[b,2]",
  }, sig
  pre = [predictor.preprocess(_image(i, h, w)) for i, (h, w) in enumerate(image_hw)]
  padded, hw = np.concatenate([p[0] for p in pre]), np.concatenate([p[1] for p in pre])
  assert padded.shape[1:3] == tuple(canvas) and hw[0].tolist() != hw[1].tolist()
  sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
  got = dict(zip(names, sess.run(None, {"image": padded, "image_hw": hw})))
  want = {
      k: np.asarray(v) for k, v in predictor._apply(predictor.variables, padded, hw, hw).items()
  }
  results = []
  for i in range(len(image_hw)):
    pick = lambda out: {  # noqa: E731
        k: out[k][i][out["valid"][i]] for k in ("boxes", "scores", "classes")
    }
    result = export_check.compare(pick(got), pick(want))
    assert result.ok, (i, result)
    print(result.line(f"image {i}"))  # the differences, shown with pytest -s
    results.append(result)
  assert sum(r.matched for r in results) > 0
  return results


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_zoo_architecture_exports_to_onnx(name):
  _check_onnx(_zoo_predictor(name), CANVAS, [(100, 140), (100, 110)])


@pytest.mark.parametrize("backbone", ["RegNetX-200MF", "RegNetY-tiny"])
def test_onestage_regnet_exports_to_onnx(backbone, monkeypatch):
  monkeypatch.setitem(regnet.REGNETS, "RegNetY-tiny", TINY_REGNETY)
  _check_onnx(_onestage_predictor(backbone), ONESTAGE_CANVAS, [(40, 60), (40, 40)])
