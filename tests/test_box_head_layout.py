"""Layout convention check (issue: official weights): with the same random torch-layout weights,
the second-stage box head + predictor computed by plain numpy agree with the Flax modules after
conversion by `cn2_jax.convert` (fc1 flattens pooled features in torch's C, H, W order)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cn2_jax.convert import convert_to_flax
from cn2_jax.modeling.roi_heads.box_head import FastRCNNConvFCHead, FastRCNNOutputLayers
from tests.schema_settings import DTYPE, ROI_HEADS


def test_box_head_matches_numpy_from_torch_layout():
  rng = np.random.default_rng(0)
  c, s, fc, k, r = 8, 7, 16, 5, 6
  sd = {
      "roi_heads.box_head.0.fc1.weight": rng.normal(size=(fc, c * s * s)),
      "roi_heads.box_head.0.fc1.bias": rng.normal(size=(fc,)),
      "roi_heads.box_head.0.fc2.weight": rng.normal(size=(fc, fc)) / 4,
      "roi_heads.box_head.0.fc2.bias": rng.normal(size=(fc,)),
      "roi_heads.box_predictor.0.cls_score.weight": rng.normal(size=(k + 1, fc)),
      "roi_heads.box_predictor.0.cls_score.bias": rng.normal(size=(k + 1,)),
      "roi_heads.box_predictor.0.bbox_pred.weight": rng.normal(size=(4, fc)),
      "roi_heads.box_predictor.0.bbox_pred.bias": rng.normal(size=(4,)),
  }
  sd = {key: v.astype(np.float32) for key, v in sd.items()}
  pooled_nchw = rng.normal(size=(r, c, s, s)).astype(np.float32)

  # numpy reference, torch layout: flatten NCHW, y = x W^T + b
  x = pooled_nchw.reshape(r, -1)
  x = np.maximum(
      x @ sd["roi_heads.box_head.0.fc1.weight"].T + sd["roi_heads.box_head.0.fc1.bias"], 0
  )
  x = np.maximum(
      x @ sd["roi_heads.box_head.0.fc2.weight"].T + sd["roi_heads.box_head.0.fc2.bias"], 0
  )
  ref_logits = (
      x @ sd["roi_heads.box_predictor.0.cls_score.weight"].T
      + sd["roi_heads.box_predictor.0.cls_score.bias"]
  )
  ref_deltas = (
      x @ sd["roi_heads.box_predictor.0.bbox_pred.weight"].T
      + sd["roi_heads.box_predictor.0.bbox_pred.bias"]
  )

  head = FastRCNNConvFCHead(fc_dim=fc, num_fc=ROI_HEADS["num_fc"], dtype=DTYPE)
  pred = FastRCNNOutputLayers(num_classes=k, dtype=DTYPE, cls_bias_init=0.0)
  pooled_nhwc = jnp.asarray(pooled_nchw.transpose(0, 2, 3, 1))
  hv = jax.eval_shape(head.init, jax.random.PRNGKey(0), pooled_nhwc)
  pv = jax.eval_shape(pred.init, jax.random.PRNGKey(0), jnp.zeros((r, fc)))
  target = {"params": {"roi_heads": {"box_head.0": hv["params"], "box_predictor.0": pv["params"]}}}
  variables, report = convert_to_flax(sd, target)
  assert report.ok and report.num_mapped_tensors == len(sd)
  p = variables["params"]["roi_heads"]
  feats = head.apply({"params": p["box_head.0"]}, pooled_nhwc)
  logits, deltas = pred.apply({"params": p["box_predictor.0"]}, feats)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(deltas, ref_deltas, rtol=1e-5, atol=1e-4)
