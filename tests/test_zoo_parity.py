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
    pytest.mark.zoo,
    pytest.mark.slow,
    pytest.mark.skipif(zoo_dir() is None, reason="../shared/oracle_zoo not found"),
]

# two-stage architecture -> (number of ROI stages, tolerance of the stage softmax probabilities).
# R2-101-DCN-BiFPN (101 layers, 79 DCNs, 7 BiFPN cells; ROI logits up to 19) carries float32
# rounding into its stage probabilities: 1.1e-4 at most (one of 20736 values), the others 1e-4.
TWO_STAGE = {
    "CenterNet2-F_R50_1x": (1, 1e-4),
    "CenterNet2_DLA-BiFPN-P5_640_16x": (3, 1e-4),
    "CenterNet2_X101-DCN_2x": (3, 1e-4),
    "CenterNet2_R2-101-DCN-BiFPN_1280_4x": (3, 3e-4),
}
# one-stage architecture -> the levels its head reads
ONE_STAGE = {
    "CenterNet-FPN_R50_1x": ("p3", "p4", "p5", "p6", "p7"),
    "CenterNet-S4_DLA_8x": ("dla2",),
}


def _collect(tree, flat):
  for k, v in tree.items():
    if isinstance(v, dict):
      _collect(v, flat)
    else:
      flat[k] = np.asarray(v[0] if isinstance(v, tuple) else v)[0]  # drop the batch axis
  return flat


def _run(arch):
  import jax

  from cn2_jax.config import load_config_file
  from cn2_jax.modeling.detector import abstract_variables
  from cn2_jax.modeling.meta_arch import family
  from cn2_jax.predictor import Predictor

  cfg = load_config_file(REPO / "configs" / "zoo" / f"{arch}.py")
  # what `python -m cn2_jax.convert` and --config.weights do: the family's official converter
  convert = family(cfg.model.arch).weights.convert
  variables, report = convert(zoo_state_dict(arch), abstract_variables(cfg.model))
  predictor = Predictor(cfg, variables)
  out = zoo_outputs(arch)
  image = predictor.read_image(str(dev_image_path()))
  batch_image, image_hw, _ = predictor.preprocess(image)
  fn = jax.jit(lambda v, b: predictor.model.apply(v, b, train=False, mutable=["intermediates"]))
  dets, state = fn(predictor.variables, dict(image=batch_image, image_hw=image_hw))
  flat = _collect(state["intermediates"], {})
  dets = {k: np.asarray(v)[0] for k, v in dets.items()}
  return arch, out, batch_image, image_hw, flat, dets, report


@pytest.fixture(scope="module", params=sorted(TWO_STAGE))
def run(request):
  return _run(request.param)


@pytest.fixture(scope="module", params=sorted(ONE_STAGE))
def run_one_stage(request):
  return _run(request.param)


def _check_input_and_conversion(run):
  arch, out, batch_image, image_hw, _, _, report = run
  assert report.ok, report.summary()
  h, w = (int(v) for v in out["resized_hw"])
  assert tuple(image_hw[0]) == (h, w)
  assert batch_image.shape[1:3] == tuple(int(v) for v in out["input_tensor_shape"][2:])
  assert np.array_equal(batch_image[0, :h, :w], out["resized_image_bgr_uint8"][..., ::-1])


def test_input_and_conversion(run):
  _check_input_and_conversion(run)


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
  # relative: the deep models (101 layers, 79 DCNs, 7 BiFPN cells) accumulate ~1e-5 of float32
  # rounding in the objectness logits
  np.testing.assert_allclose(
      flat["proposal_objectness"][m[ok]], out["proposal_objectness"][ok], rtol=1e-4, atol=1e-6
  )
  num_stages, prob_atol = TWO_STAGE[arch]
  for k in range(num_stages):
    np.testing.assert_allclose(
        flat[f"stage{k}_input_boxes"][m[ok]], out[f"stage{k}_input_boxes"][ok], atol=0.05
    )
    logits = flat[f"stage{k}_cls_logits"].astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(probs[m[ok]], out[f"stage{k}_cls_probs"][ok], atol=prob_atol)
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


def test_one_stage_input_and_conversion(run_one_stage):
  _check_input_and_conversion(run_one_stage)


def test_one_stage_levels_and_head(run_one_stage):
  arch, out, _, _, flat, _, _ = run_one_stage
  for name in ONE_STAGE[arch]:
    compare_map(np.transpose(flat[name], (2, 0, 1)), out, name)
    compare_map(np.transpose(flat[f"cls_logits_{name}"], (2, 0, 1)), out, f"head_cls_logits_{name}")
    for ours_key, ref_key in (("reg_raw", "head_bbox_pred_raw"), ("reg", "head_reg")):
      ours = np.transpose(flat[f"{ours_key}_{name}"], (2, 0, 1))
      ref = out[f"{ref_key}_{name}"]
      assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max(), (ref_key, name)


def test_one_stage_nms_input_and_detections(run_one_stage):
  _, out, _, _, flat, dets, _ = run_one_stage
  valid = flat["cand_valid"]
  ours = np.concatenate([flat["cand_boxes"][valid], 1e6 * flat["cand_classes"][valid, None]], 1)
  ref = np.concatenate([out["nms_in_boxes"], 1e6 * out["nms_in_classes"].astype(int)[:, None]], 1)
  m = match_rows(ours, ref, tol=1e-2)
  assert (m >= 0).mean() >= 0.99, (m < 0).sum()
  ok = m >= 0
  np.testing.assert_allclose(flat["cand_scores"][valid][m[ok]], out["nms_in_scores"][ok], atol=1e-4)
  n = int(dets["valid"].sum())
  assert n == len(out["det_scores"]), (n, len(out["det_scores"]))
  ours = np.concatenate([dets["boxes"][:n], 1e6 * dets["classes"][:n, None]], axis=1)
  ref = np.concatenate([out["det_boxes"], 1e6 * out["det_classes"].astype(int)[:, None]], axis=1)
  m = match_rows(ours, ref, tol=1e-2)
  assert (m >= 0).mean() >= 0.99, (m < 0).sum()
  ok = m >= 0
  np.testing.assert_allclose(dets["scores"][m[ok]], out["det_scores"][ok], atol=1e-3)


@pytest.mark.parametrize("arch", ["CenterNet2_DLA-BiFPN-P5_640_16x", "CenterNet-S4_DLA_8x"])
def test_official_file_through_main_predict(arch, tmp_path):
  """`main.py --mode=predict --config configs/zoo/<arch>.py --config.weights=<official file>`:
  the official checkpoint file (a detectron2 .pkl holding the oracle's state dict) is read and
  converted on the fly, and the written detections are the official ones (original-image
  coordinates, as the official predictor returns them)."""
  import json
  import pickle

  from cn2_jax import app
  from cn2_jax.config import load_config_file

  cfg = load_config_file(REPO / "configs" / "zoo" / f"{arch}.py")
  weights = tmp_path / f"{arch}.pkl"
  with open(weights, "wb") as f:
    pickle.dump({"model": zoo_state_dict(arch), "__author__": "oracle"}, f)
  cfg.weights = str(weights)
  cfg.predict.score_thresh = 0.0
  records = app.predict(cfg, str(tmp_path / "run"), [str(dev_image_path())])
  with open(tmp_path / "run" / "predict" / "detections.json") as f:
    assert json.load(f) == json.loads(json.dumps(records))
  out = zoo_outputs(arch)
  dets = records[0]["detections"]
  boxes = np.array([d["box"] for d in dets], np.float32)
  scores = np.array([d["score"] for d in dets], np.float32)
  classes = np.array([d["label"] for d in dets])
  ref_classes = out["model_output_classes"].astype(int)
  assert len(dets) == len(ref_classes)
  ours = np.concatenate([boxes, 1e6 * classes[:, None]], 1)
  ref = np.concatenate([out["model_output_boxes_orig"], 1e6 * ref_classes[:, None]], 1)
  m = match_rows(ours, ref, tol=2e-2)  # detections.json rounds boxes to 0.01 px
  assert (m >= 0).mean() >= 0.99
  ok = m >= 0
  np.testing.assert_allclose(scores[m[ok]], out["model_output_scores"][ok], atol=1e-3)


@pytest.mark.parametrize("arch", ["CenterNet-S4_DLA_8x", "CenterNet2_X101-DCN_2x"])
def test_convert_cli_with_a_zoo_config(arch, tmp_path, capsys):
  """`python -m cn2_jax.convert --src <official file> --out DIR --config configs/zoo/<arch>.py`
  converts strictly (both families of the CenterNet2 code base) and the written variables equal
  the in-process conversion."""
  import pickle

  import jax

  from cn2_jax import convert
  from cn2_jax.config import load_config_file
  from cn2_jax.modeling.detector import abstract_variables
  from cn2_jax.modeling.meta_arch import family
  from cn2_jax.weights import restore_saved_variables

  sd = zoo_state_dict(arch)
  src = tmp_path / f"{arch}.pkl"
  with open(src, "wb") as f:
    pickle.dump({"model": sd, "__author__": "oracle"}, f)
  config = REPO / "configs" / "zoo" / f"{arch}.py"
  assert (
      convert.main(["--src", str(src), "--out", str(tmp_path / "w"), "--config", str(config)]) == 0
  )
  assert "unknown" not in capsys.readouterr().err
  cfg = load_config_file(config)
  abstract = abstract_variables(cfg.model)
  written = restore_saved_variables(str(tmp_path / "w"), abstract)
  expected, _ = family(cfg.model.arch).weights.convert(sd, abstract)
  for a, b in zip(jax.tree_util.tree_leaves(written), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
