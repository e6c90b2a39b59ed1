"""Parity of the official zoo models with the official code (../shared/oracle_zoo, its README).

Each architecture runs the DEFAULT user path: `configs/zoo/<official yaml name>.py` unchanged, the
official state dict (regenerated from the oracle's weight rule) converted strictly by
`cn2_jax.convert`, and the notebook `Predictor` on the original JPEG (official resize, official
canvas). Compared, to the oracle README's tolerances: the resized image and padded canvas, the
neck levels, the CenterNet head maps, the proposals, every ROI stage and the final detections
(matched as sets by box, README §8).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cn2_jax.testing.zoo_oracle import (
    compare_map,
    dev_image_path,
    match_rows,
    zoo_dir,
    zoo_outputs,
    zoo_state_dict,
)

REPO = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.large_memory,
    pytest.mark.skipif(zoo_dir() is None, reason="../shared/oracle_zoo not found"),
]

# architecture -> (number of ROI stages, converted tensors, learnable parameters)
TWO_STAGE = {
    "CenterNet2-F_R50_1x": (1, None, None),
}


def _collect(tree, flat):
  for k, v in tree.items():
    if isinstance(v, dict):
      _collect(v, flat)
    else:
      flat[k] = np.asarray(v[0] if isinstance(v, tuple) else v)[0]  # drop the batch axis
  return flat


@pytest.fixture(scope="module", params=sorted(TWO_STAGE))
def run(request):
  import jax

  from cn2_jax.config import load_config_file
  from cn2_jax.convert import convert_to_flax
  from cn2_jax.modeling.detector import abstract_variables
  from cn2_jax.predictor import Predictor

  arch = request.param
  cfg = load_config_file(REPO / "configs" / "zoo" / f"{arch}.py")
  variables, report = convert_to_flax(zoo_state_dict(arch), abstract_variables(cfg.model))
  predictor = Predictor(cfg, variables)
  out = zoo_outputs(arch)
  image = predictor.read_image(str(dev_image_path()))
  batch_image, image_hw, _ = predictor.preprocess(image)
  fn = jax.jit(lambda v, b: predictor.model.apply(v, b, train=False, mutable=["intermediates"]))
  dets, state = fn(predictor.variables, dict(image=batch_image, image_hw=image_hw))
  flat = _collect(state["intermediates"], {})
  dets = {k: np.asarray(v)[0] for k, v in dets.items()}
  return arch, out, batch_image, image_hw, flat, dets, report


def test_input_and_conversion(run):
  arch, out, batch_image, image_hw, _, _, report = run
  assert report.ok, report.summary()
  h, w = (int(v) for v in out["resized_hw"])
  assert tuple(image_hw[0]) == (h, w)
  assert batch_image.shape[1:3] == tuple(int(v) for v in out["input_tensor_shape"][2:])
  assert np.array_equal(batch_image[0, :h, :w], out["resized_image_bgr_uint8"][..., ::-1])


def test_neck_levels(run):
  _, out, _, _, flat, _, _ = run
  for level in range(3, 8):
    compare_map(np.transpose(flat[f"p{level}"], (2, 0, 1)), out, f"p{level}")


def test_head_maps(run):
  _, out, _, _, flat, _, _ = run
  for level in range(3, 8):
    ours = flat[f"head_agn_hm_logits_p{level}"]
    ref = out[f"head_agn_hm_logits_p{level}"]
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max(), level
    for name in ("head_bbox_pred_raw", "head_reg"):
      ours = np.transpose(flat[f"{name}_p{level}"], (2, 0, 1))
      ref = out[f"{name}_p{level}"]
      assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max(), (name, level)


def test_proposals_and_stages(run):
  arch, out, _, _, flat, _, _ = run
  m = match_rows(flat["proposal_boxes"], out["proposal_boxes"], tol=1e-2)
  ok = m >= 0
  assert ok.mean() >= 0.99, ok.mean()
  np.testing.assert_allclose(
      flat["proposal_objectness"][m[ok]], out["proposal_objectness"][ok], atol=1e-5
  )
  for k in range(TWO_STAGE[arch][0]):
    np.testing.assert_allclose(
        flat[f"stage{k}_input_boxes"][m[ok]], out[f"stage{k}_input_boxes"][ok], atol=0.05
    )
    logits = flat[f"stage{k}_cls_logits"].astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(probs[m[ok]], out[f"stage{k}_cls_probs"][ok], atol=1e-4)
    np.testing.assert_allclose(
        flat[f"stage{k}_box_deltas"][m[ok]], out[f"stage{k}_box_deltas"][ok], atol=1e-3
    )
  np.testing.assert_allclose(
      flat["final_scores_all"][m[ok]], out["final_scores_all"][ok], atol=1e-4
  )


def test_final_detections(run):
  _, out, _, _, _, dets, _ = run
  n = int(dets["valid"].sum())
  ref_n = len(out["det_thresh_scores"])
  assert n == ref_n, (n, ref_n)
  # One class-agnostic box may be kept for several classes: match (class, box) jointly.
  ours = np.concatenate([dets["boxes"][:n], 1e6 * dets["classes"][:n, None]], axis=1)
  ref = np.concatenate(
      [out["det_thresh_boxes"], 1e6 * out["det_thresh_classes"].astype(int)[:, None]], axis=1
  )
  m = match_rows(ours, ref, tol=1e-2)
  assert (m >= 0).mean() >= 0.99, (m < 0).sum()
  ok = m >= 0
  np.testing.assert_allclose(dets["scores"][m[ok]], out["det_thresh_scores"][ok], atol=1e-3)
