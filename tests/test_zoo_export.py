"""Every zoo architecture exports (issue 26 item 3): the StableHLO file of each distinct
architecture of configs/zoo (narrowed as in test_zoo_train, small canvas, random weights), with a
symbolic batch, computes the Predictor's forward on an image preprocessed as the Predictor does
(every output row, padding and empty boxes included: random weights give few valid detections),
and `--check`'s comparison of the valid detections passes. nuImages_CenterNet2_DLA_640_8x is left
out: the CenterNet2 family cannot build it (test_zoo_configs.NOT_BUILDABLE). The one-stage centerX
family's export tests are in test_export.py. An export compile per architecture:
scripts/test_zoo.sh."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from cn2_jax import export, export_check
from cn2_jax.modeling import detector
from cn2_jax.predictor import Predictor
from tests.test_export import _image_file
from tests.test_zoo_train import _narrow

pytestmark = pytest.mark.zoo

CANVAS = (256, 256)  # a multiple of the BiFPN models' size_divisibility (128)

# One config per distinct architecture (family, backbone, ROI heads, ResNeXt / Res2Net / DCN).
ARCHITECTURES = (
    "CenterNet-FPN_R50_1x",  # CenterNet alone (proposal-only detector), R50-FPN
    "CenterNet-S4_DLA_8x",  # CenterNet alone, DLA-34 stride 4
    "CenterNet2-F_R50_1x",  # one ROI stage (CustomROIHeads)
    "CenterNet2_R50_1x",
    "CenterNet2_X101-DCN_2x",  # ResNeXt with modulated DCN
    "CenterNet2_R2-101-DCN_896_4x",  # Res2Net with DCN, FPN
    "CenterNet2_R2-101-DCN-BiFPN_1280_4x",  # Res2Net with DCN, BiFPN
    "CenterNet2_DLA-BiFPN-P3_4x",
    "CenterNet2_DLA-fcosBiFPN-P5_640_16x_ST",
    "LVIS_CenterNet2_R50_Fed_1x",  # sigmoid classifier of the federated loss
)


@pytest.fixture(scope="module", autouse=True)
def _fast(fast_compile):
  yield


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_zoo_architecture_exports(tmp_path, name):
  cfg = _narrow(name)
  cfg.data.min_size_test, cfg.data.max_size_test, cfg.data.pad_hw_test = 128, 192, CANVAS
  # random weights: keep detections to compare
  cfg.model.roi_heads.score_thresh_test = cfg.model.centernet.inference_thresh = 0.0
  predictor = Predictor(cfg, detector.init_variables(cfg.model, seed=5))
  exported = export.export_stablehlo(predictor, platforms=("cpu",))
  assert str(exported.in_avals[0]) == f"uint8[b,{CANVAS[0]},{CANVAS[1]},3]"
  image = _image_file(tmp_path, seed=3, h=100, w=140)
  padded, hw, _ = predictor.preprocess(predictor.read_image(image))
  got = exported.call(padded, hw)
  want = jax.device_get(predictor._apply(predictor.variables, padded, hw, hw))
  for key in ("classes", "valid"):
    np.testing.assert_array_equal(np.asarray(got[key]), want[key], err_msg=key)
  np.testing.assert_allclose(np.asarray(got["scores"]), want["scores"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(got["boxes"]), want["boxes"], atol=1e-3, rtol=0)
  result = export_check.check_export(
      predictor, "stablehlo", export.serialize(exported), CANVAS, image
  )
  assert result.ok, result
