"""Parity with the official CenterNet2_R50_1x implementation (../shared/oracle, README there).

Weights are regenerated from the oracle's deterministic rule and converted with cn2_jax.convert;
everything else is the DEFAULT path a user runs: `configs/cn2_r50.py` unchanged and the notebook
`Predictor`'s preprocessing of the original JPEG (official resize, official 32-rounded canvas
800x1088, official adaptive ROIAlign). Outputs are compared stage by stage; sets of boxes are
matched by position, not by row index (oracle README §9).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cn2_jax.testing.oracle import oracle_dir

ORACLE = oracle_dir()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        ORACLE is None,
        reason="../shared/oracle not found: parity " "test needs the official oracle outputs",
    ),
]


def _rel_err(a, b):
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _match_rows(a_boxes, b_boxes, tol):
  """For each row of b, the index of the row of a with max |diff| <= tol (or -1)."""
  d = np.abs(a_boxes[:, None, :] - b_boxes[None, :, :]).max(-1)  # [A, B]
  best = d.argmin(0)
  ok = d[best, np.arange(len(b_boxes))] <= tol
  return np.where(ok, best, -1)


REPO = Path(__file__).resolve().parents[1]


def _default_setup():
  """configs/cn2_r50.py with nothing changed but the weights, and the notebook Predictor (the
  default eval/predict preprocessing: official resize and the official 32-rounded canvas)."""
  from cn2_jax.config import load_config_file
  from cn2_jax.convert import convert_to_flax
  from cn2_jax.modeling.detector import abstract_variables
  from cn2_jax.predictor import Predictor
  from cn2_jax.testing.oracle import regenerate_oracle_state_dict

  cfg = load_config_file(REPO / "configs" / "cn2_r50.py")
  sd = regenerate_oracle_state_dict(ORACLE / "cn2_r50_oracle_weights.json")
  variables, report = convert_to_flax(sd, abstract_variables(cfg.model))
  return cfg, Predictor(cfg, variables), report


def _apply_with_intermediates(predictor, batch_image, image_hw):
  import jax

  fn = jax.jit(lambda v, b: predictor.model.apply(v, b, train=False, mutable=["intermediates"]))
  dets, state = fn(predictor.variables, dict(image=batch_image, image_hw=image_hw))
  flat = {}

  def collect(tree):
    for k, v in tree.items():
      if isinstance(v, dict):
        collect(v)
      else:
        flat[k] = np.asarray(v[0] if isinstance(v, tuple) else v)[0]  # drop batch axis

  collect(state["intermediates"])
  return {k: np.asarray(v)[0] for k, v in dets.items()}, flat


@pytest.fixture(scope="module")
def setup():
  return _default_setup()


@pytest.fixture(scope="module")
def run(setup):
  cfg, predictor, report = setup
  out = dict(np.load(ORACLE / "outputs_000000000009.npz"))
  image = predictor.read_image(str(ORACLE / "000000000009.jpg"))
  batch_image, image_hw, orig_hw = predictor.preprocess(image)
  # The default preprocessing reproduces the official input: same resized pixels, same canvas.
  h, w = [int(v) for v in out["resized_hw"]]
  assert tuple(image_hw[0]) == (h, w)
  assert batch_image.shape[1:3] == tuple(int(v) for v in out["input_tensor_shape"][2:])
  assert np.array_equal(batch_image[0, :h, :w], out["resized_image_bgr_uint8"][..., ::-1])
  dets, flat = _apply_with_intermediates(predictor, batch_image, image_hw)
  return out, flat, dets, report


def test_conversion_report(run):
  _, _, _, report = run
  assert report.ok
  assert report.num_mapped_tensors == 330
  assert report.num_mapped_params == 71_645_897


def test_fpn_features(run):
  out, flat, _, _ = run
  for lvl in (4, 5, 6, 7):
    ours = np.transpose(flat[f"p{lvl}"], (2, 0, 1))
    assert ours.shape == out[f"p{lvl}"].shape
    assert _rel_err(ours, out[f"p{lvl}"]) <= 1e-4, lvl
  p3 = np.transpose(flat["p3"], (2, 0, 1))
  cy, cx = [int(v) for v in out["p3_crop_center_origin_yx"]]
  assert _rel_err(p3[:, :16, :16], out["p3_crop_tl"]) <= 1e-4
  assert _rel_err(p3[:, cy : cy + 16, cx : cx + 16], out["p3_crop_center"]) <= 1e-4
  assert _rel_err(p3[:, -16:, -16:], out["p3_crop_br"]) <= 1e-4
  np.testing.assert_allclose(
      p3.mean((1, 2)), out["p3_chan_mean"], atol=1e-4 * np.abs(out["p3_chan_mean"]).max()
  )


def test_head_outputs(run):
  out, flat, _, _ = run
  for lvl in range(3, 8):
    assert _rel_err(flat[f"head_agn_hm_logits_p{lvl}"], out[f"head_agn_hm_logits_p{lvl}"]) <= 1e-4
    assert (
        _rel_err(
            np.transpose(flat[f"head_bbox_pred_raw_p{lvl}"], (2, 0, 1)),
            out[f"head_bbox_pred_raw_p{lvl}"],
        )
        <= 1e-4
    )
    assert (
        _rel_err(np.transpose(flat[f"head_reg_p{lvl}"], (2, 0, 1)), out[f"head_reg_p{lvl}"]) <= 1e-4
    )


def test_proposals(run):
  out, flat, _, _ = run
  m = _match_rows(flat["proposal_boxes"], out["proposal_boxes"], tol=1e-2)
  frac = (m >= 0).mean()
  assert frac >= 0.99, frac
  ok = m >= 0
  np.testing.assert_allclose(
      flat["proposal_objectness"][m[ok]], out["proposal_objectness"][ok], atol=1e-5
  )


def test_cascade_stages(run):
  out, flat, _, _ = run
  # Rows are proposals in both implementations; match them once by the proposal boxes and use the
  # same correspondence for every stage (later stages' boxes can nearly coincide).
  m = _match_rows(flat["proposal_boxes"], out["proposal_boxes"], tol=1e-2)
  ok = m >= 0
  assert ok.mean() >= 0.99, ok.mean()
  for k in range(3):
    np.testing.assert_allclose(
        flat[f"stage{k}_input_boxes"][m[ok]], out[f"stage{k}_input_boxes"][ok], atol=0.05
    )
    probs = np.exp(flat[f"stage{k}_cls_logits"])
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(probs[m[ok]], out[f"stage{k}_cls_probs"][ok], atol=1e-4)
    np.testing.assert_allclose(
        flat[f"stage{k}_box_deltas"][m[ok]], out[f"stage{k}_box_deltas"][ok], atol=1e-3
    )
  np.testing.assert_allclose(
      flat["final_scores_all"][m[ok]], out["final_scores_all"][ok], atol=1e-4
  )
  np.testing.assert_allclose(flat["final_boxes_all"][m[ok]], out["final_boxes_all"][ok], atol=0.05)


def test_final_detections(run):
  out, _, dets, _ = run
  n = int(dets["valid"].sum())
  assert n == len(out["det_thresh_scores"]) == 100
  # The same (class-agnostic) box appears once per class: match on (class, box) jointly.
  ours = np.concatenate([dets["boxes"][:n], 1e6 * dets["classes"][:n, None]], axis=1)
  ref = np.concatenate(
      [out["det_thresh_boxes"], 1e6 * out["det_thresh_classes"].astype(int)[:, None]], axis=1
  )
  m = _match_rows(ours, ref, tol=0.5)
  assert (m >= 0).all(), (m < 0).sum()
  assert len(set(m.tolist())) == n
  np.testing.assert_allclose(dets["scores"][m], out["det_thresh_scores"], atol=1e-4)
  np.testing.assert_allclose(dets["boxes"][m], out["det_thresh_boxes"], atol=0.5)


def test_postprocess_to_original(run):
  import jax.numpy as jnp
  from cn2_jax.modeling.detector import postprocess_detections

  out, _, dets, _ = run
  batch_dets = {k: jnp.asarray(v)[None] for k, v in dets.items()}
  post = postprocess_detections(
      batch_dets, jnp.asarray(out["resized_hw"])[None], jnp.asarray(out["orig_hw"])[None]
  )
  post = {k: np.asarray(v)[0] for k, v in post.items()}
  ours = np.concatenate([post["boxes"], 1e6 * post["classes"][:, None]], axis=1)[post["valid"]]
  ref = np.concatenate(
      [out["model_output_boxes_orig"], 1e6 * out["model_output_classes"].astype(int)[:, None]],
      axis=1,
  )
  m = _match_rows(ours, ref, tol=0.5)
  assert (m >= 0).all()
  np.testing.assert_allclose(
      post["scores"][post["valid"]][m], out["model_output_scores"], atol=1e-4
  )


def _match_detections(boxes, classes, ref_boxes, ref_classes, tol):
  ours = np.concatenate([boxes, 1e6 * classes[:, None]], axis=1)
  ref = np.concatenate([ref_boxes, 1e6 * ref_classes.astype(int)[:, None]], axis=1)
  return _match_rows(ours, ref, tol=tol)


def test_predictor_end_to_end(setup, run):
  """`Predictor(path)` as a notebook user calls it: official detections in original pixels."""
  _, predictor, _ = setup
  out = run[0]
  det = predictor(str(ORACLE / "000000000009.jpg"))
  assert len(det["scores"]) == len(out["model_output_scores"])
  m = _match_detections(
      det["boxes"],
      det["classes"],
      out["model_output_boxes_orig"],
      out["model_output_classes"],
      tol=0.5,
  )
  assert (m >= 0).all(), (m < 0).sum()
  np.testing.assert_allclose(det["scores"][m], out["model_output_scores"], atol=1e-4)


def test_larger_canvas_same_detections(setup, run):
  """The same image on a canvas larger than the official one (a training bucket, a fixed
  `pad_hw`): conv inputs are zeroed off the official canvas, GroupNorm/candidates/losses and
  ROIAlign's border follow it (modeling/canvas.py), so every output equals the official one."""
  _, predictor, _ = setup
  out, flat_ref, dets_ref, _ = run
  image = predictor.read_image(str(ORACLE / "000000000009.jpg"))
  batch_image, image_hw, _ = predictor.preprocess(image)
  h, w = batch_image.shape[1:3]
  big = np.zeros((1, h + 224, w + 256, 3), np.uint8)
  big[:, :h, :w] = batch_image
  dets, flat = _apply_with_intermediates(predictor, big, image_hw)
  for lvl in range(3, 8):
    ref = flat_ref[f"head_agn_hm_logits_p{lvl}"]
    got = flat[f"head_agn_hm_logits_p{lvl}"][: ref.shape[0], : ref.shape[1]]
    assert np.abs(got - ref).max() <= 1e-4, lvl
  n = int(dets["valid"].sum())
  assert n == 100
  m = _match_detections(
      dets["boxes"][:n],
      dets["classes"][:n],
      out["det_thresh_boxes"],
      out["det_thresh_classes"],
      tol=0.5,
  )
  assert (m >= 0).all(), (m < 0).sum()
  np.testing.assert_allclose(dets["scores"][m], out["det_thresh_scores"], atol=1e-4)
