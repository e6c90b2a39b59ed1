"""The zoo backbones train inside CenterNet2: one jitted loss + gradient step of a narrow version of
each registered backbone (the zoo config with smaller widths / fewer cells, a small image), with
finite losses, gradient reaching the backbone's trainable parameters and none reaching its frozen
ones (FREEZE_AT, FrozenBN / DLA's inference-mode BatchNorm in the `frozen` collection)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from cn2_jax.config import load_config_file
from cn2_jax.modeling import detector
from cn2_jax.tree_paths import key_str
from tests.test_detector import tiny_batch

REPO = Path(__file__).resolve().parents[1]
# A full train-step compile per backbone (~1 minute each on 2 cores): scripts/test_zoo.sh.
pytestmark = pytest.mark.zoo


@pytest.fixture(scope="module", autouse=True)
def _fast(fast_compile):
  yield


def _narrow(name: str):
  """The zoo config `name` with the same architecture at a fraction of the width."""
  cfg = load_config_file(REPO / "configs" / "zoo" / f"{name}.py")
  m = cfg.model
  m.num_classes = 3
  m.resnet_depth = 50
  m.resnet_width = 16
  m.fpn_channels = 32
  m.bifpn.out_channels = 32
  m.bifpn.num_bifpn = 1
  m.centernet.num_convs = 2
  m.centernet.pre_nms_topk_train = 64
  m.centernet.post_nms_topk_train = 32
  m.centernet.pre_nms_topk_test = 64
  m.centernet.post_nms_topk_test = 32
  m.roi_heads.batch_size_per_image = 32
  m.roi_heads.fc_dim = 32
  m.roi_heads.detections_per_image = 10
  m.roi_heads.sampling_ratio = 2
  if m.resnet_num_groups > 1:  # ResNeXt: 4 groups of 4 at this width
    m.resnet_num_groups, m.resnet_width_per_group = 4, 4
  elif m.resnet_width_per_group:  # Res2Net: 4 x 4-channel splits
    m.resnet_width_per_group = 4
  return cfg


@pytest.mark.parametrize(
    "name, trained_prefix",
    [
        ("CenterNet2_DLA-BiFPN-P5_640_16x", "backbone.bottom_up.level5"),
        ("CenterNet2_X101-DCN_2x", "backbone.bottom_up.res5.0.conv2_offset"),
        ("CenterNet2_R2-101-DCN-BiFPN_1280_4x", "backbone.bottom_up.res5.0.conv2_offsets"),
        ("CenterNet2-F_R50_1x", "roi_heads.box_predictor.cls_score"),
    ],
)
def test_zoo_backbone_trains_in_centernet2(name, trained_prefix):
  cfg = _narrow(name)
  model = detector.build_model(cfg.model)
  batch = tiny_batch(hw=(128, 128))
  batch["image_hw"][:] = [128, 120]
  variables = model.init(jax.random.PRNGKey(0), batch, train=False)
  frozen = {k: v for k, v in variables.items() if k != "params"}

  def loss_fn(params):
    losses = model.apply(
        {"params": params, **frozen}, batch, train=True, rngs={"sampling": jax.random.PRNGKey(1)}
    )
    return sum(v for k, v in losses.items() if not k.startswith("aux/")), losses

  (total, losses), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
  assert np.isfinite(float(total)) and all(np.isfinite(float(v)) for v in losses.values())
  flat = {
      ".".join(key_str(k) for k in kp): np.asarray(g)
      for kp, g in jax.tree_util.tree_flatten_with_path(grads)[0]
  }
  assert all(np.isfinite(g).all() for g in flat.values())
  live = [p for p, g in flat.items() if p.startswith(trained_prefix) and np.abs(g).max() > 0]
  assert live, f"no gradient reaches {trained_prefix}"
  frozen_prefixes = detector.frozen_param_prefixes(cfg.model)
  for path, g in flat.items():
    if any(path == q or path.startswith(q + ".") for q in frozen_prefixes):
      assert np.abs(g).max() == 0.0, path
