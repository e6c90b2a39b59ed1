"""Parity with the official centerX one-stage CenterNet (../shared/oracle_centerx, README there),
through `cn2_jax.testing.centerx_oracle`: inference stage by stage, one training step (targets,
losses, gradients with BatchNorm in train and in eval mode), the DCN op. Gradients and detection
scores that miss the README tolerance must be within float32 noise of a float64 run (see the
oracle module's docstring)."""

from __future__ import annotations

import numpy as np
import pytest

from cn2_jax.testing.centerx_oracle_dcn import centerx_oracle_dir

ORACLE = centerx_oracle_dir()
_FILES = (
    "centerx_infer_dev.npz",
    "centerx_train_dev.npz",
    "centerx_dcn_op_dev.npz",
    "centerx_oracle_dev.json",
    "centerx_r18_weights_spec.json",
)
pytestmark = [
    pytest.mark.slow,
    # 6.6 GB resident: never beside the training oracle (tests/conftest.py)
    pytest.mark.large_memory,
    pytest.mark.skipif(
        ORACLE is None or not all((ORACLE / f).is_file() for f in _FILES),
        reason="../shared/oracle_centerx not found: parity test needs the "
        "official centerX oracle outputs",
    ),
]


@pytest.fixture(scope="module")
def oracle():
  from cn2_jax.testing import centerx_oracle as co

  return co


@pytest.fixture(scope="module")
def infer_report(oracle):
  return oracle.run(infer=str(ORACLE / "centerx_infer_dev.npz"))


@pytest.fixture(scope="module")
def train_report(oracle):
  return oracle.run(train=str(ORACLE / "centerx_train_dev.npz"))


def test_weights_regenerate_with_checksums(oracle):
  sd = oracle.regenerate_weights(ORACLE / "centerx_r18_weights_spec.json")
  assert len(sd) == 177 and sd["backbone.bn1.num_batches_tracked"].dtype == np.int64


def test_inference_parity(infer_report):
  print(infer_report.text())
  assert infer_report.ok, infer_report.text()
  # every stage is compared (directly, or within float32 noise of the float64 run: the same
  # model on another CPU rounds differently, e.g. boxes 1.5e-3 px from the official ones)
  for name in (
      "infer/input crop",
      "infer/c5 crop",
      "infer/deconv1 offset_mask_conv",
      "infer/neck crop",
      "infer/heat map",
      "infer/wh map",
      "infer/reg map",
      "infer/det_boxes_input_px",
      "infer/det_boxes_orig_px",
  ):
    assert infer_report.row(name).ok, infer_report.row(name)
  assert "100/100 matched" in infer_report.row("infer/detections matched").detail


def test_training_step_parity(train_report):
  print(train_report.text())
  assert train_report.ok, train_report.text()
  for name in ("train/gt_score_map", "train/gt_index"):  # targets: exact, no float64 rule
    row = train_report.row(name)
    assert row.passed is None and row.ok, row
  for variant in ("bntrain", "bneval"):  # losses: directly or within float32 noise of float64
    for name in ("loss_cls", "loss_box_wh", "loss_off_reg", "total"):
      assert train_report.row(f"{variant}/{name}").ok, train_report.row(f"{variant}/{name}")
  assert train_report.row("bntrain/running stats after step (52)").ok
  assert (
      sum(
          r.name.startswith(("bntrain/grad ", "bneval/grad ")) and "checksums" not in r.name
          for r in train_report.rows
      )
      == 38
  )


def test_dcn_op_parity(oracle):
  report = oracle.run(dcn=str(ORACLE / "centerx_dcn_op_dev.npz"))
  assert report.ok and len(report.rows) == 12, report.text()


def test_oracle_catches_a_wrong_deconv_layout(oracle):
  """Negative control: the ordinary-conv mapping (2, 3, 1, 0) for the transposed conv, which
  has the right shape, must fail the comparison."""
  from cn2_jax.weights import onestage as wo

  sd = oracle.regenerate_weights(ORACLE / "centerx_r18_weights_spec.json")
  model, variables, _ = oracle.build(sd)
  p = variables["params"]["upsample"]["deconv3"]["up_sample"]
  p["kernel"] = wo._to_flax(sd["upsample.deconv3.up_sample.weight"], "conv")
  report = oracle.Report()
  oracle.compare_inference(model, variables, ORACLE / "centerx_infer_dev.npz", None, report)
  assert not report.row("infer/heat map").ok
