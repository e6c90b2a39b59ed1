"""The parity table of the zoo models against the official outputs (../shared/oracle_zoo): the
largest differences per compared array and the detections matched, measured through the same
default path as tests/test_zoo_parity.py (configs/zoo + official weights converted + Predictor).

  JAX_PLATFORMS=cpu PYTHONPATH=. .venv/bin/python tools/zoo_parity_table.py
"""

from __future__ import annotations

import numpy as np

from cn2_jax.testing.zoo_oracle import compare_map, match_rows
from tests.test_zoo_parity import ONE_STAGE, TWO_STAGE, _run


def _rel(a, b) -> float:
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _levels(flat, out, names) -> str:
  worst = {}
  for name in names:
    for key, value in compare_map(np.transpose(flat[name], (2, 0, 1)), out, name).items():
      worst[key] = max(worst.get(key, 0.0), value)
  return ", ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items()))


def _dets(ours_boxes, ours_classes, ours_scores, ref_boxes, ref_classes, ref_scores) -> str:
  ours = np.concatenate([ours_boxes, 1e6 * ours_classes[:, None]], 1)
  ref = np.concatenate([ref_boxes, 1e6 * ref_classes.astype(int)[:, None]], 1)
  m = match_rows(ours, ref, tol=1e-2)
  ok = m >= 0
  box = np.abs(ours_boxes[m[ok]] - ref_boxes[ok]).max() if ok.any() else float("nan")
  score = np.abs(ours_scores[m[ok]] - ref_scores[ok]).max() if ok.any() else float("nan")
  return f"{ok.sum()}/{len(ref)} (box {box:.1e} px, score {score:.1e})"


def two_stage(arch: str) -> list:
  _, out, _, _, flat, dets, report = _run(arch)
  head = max(
      _rel(flat[f"head_agn_hm_logits_p{lvl}"], out[f"head_agn_hm_logits_p{lvl}"])
      for lvl in range(3, 8)
  )
  m = match_rows(flat["proposal_boxes"], out["proposal_boxes"], tol=1e-2)
  ok = m >= 0
  obj = np.abs(flat["proposal_objectness"][m[ok]] - out["proposal_objectness"][ok]).max()
  probs = []
  for k in range(TWO_STAGE[arch][0]):
    logits = flat[f"stage{k}_cls_logits"].astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    probs.append(np.abs(p[m[ok]] - out[f"stage{k}_cls_probs"][ok]).max())
  n = int(dets["valid"].sum())
  return [
      arch,
      f"{report.num_mapped_tensors} tensors",
      _levels(flat, out, [f"p{lvl}" for lvl in range(3, 8)]),
      f"{head:.1e}",
      f"{ok.sum()}/{len(m)} (objectness {obj:.1e})",
      f"{max(probs):.1e}",
      _dets(
          dets["boxes"][:n],
          dets["classes"][:n],
          dets["scores"][:n],
          out["det_thresh_boxes"],
          out["det_thresh_classes"],
          out["det_thresh_scores"],
      ),
  ]


def one_stage(arch: str) -> list:
  _, out, _, _, flat, dets, report = _run(arch)
  names = ONE_STAGE[arch]
  head = max(
      compare_map(
          np.transpose(flat[f"cls_logits_{n}"], (2, 0, 1)), out, f"head_cls_logits_{n}"
      ).get("crop_center", 0.0)
      for n in names
  )
  valid = flat["cand_valid"]
  ours = np.concatenate([flat["cand_boxes"][valid], 1e6 * flat["cand_classes"][valid, None]], 1)
  ref = np.concatenate([out["nms_in_boxes"], 1e6 * out["nms_in_classes"].astype(int)[:, None]], 1)
  m = match_rows(ours, ref, tol=1e-2)
  n = int(dets["valid"].sum())
  return [
      arch,
      f"{report.num_mapped_tensors} tensors",
      _levels(flat, out, names),
      f"{head:.1e} (class logits, centre crop)",
      f"NMS input {(m >= 0).sum()}/{len(m)}",
      "-",
      _dets(
          dets["boxes"][:n],
          dets["classes"][:n],
          dets["scores"][:n],
          out["det_boxes"],
          out["det_classes"],
          out["det_scores"],
      ),
  ]


def main():
  print(
      "| architecture | converted | neck levels (max relative difference) | head | proposals "
      "| stage probabilities | final detections matched |"
  )
  print("|---|---|---|---|---|---|---|")
  for arch in TWO_STAGE:
    print("| " + " | ".join(two_stage(arch)) + " |", flush=True)
  for arch in ONE_STAGE:
    print("| " + " | ".join(one_stage(arch)) + " |", flush=True)


if __name__ == "__main__":
  main()
