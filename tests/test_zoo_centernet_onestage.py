"""The official one-stage CenterNet (`CenterNetDetector` + `CenterNet`, ONLY_PROPOSAL False):
modeling/meta_arch/centernet_onestage.py, proposal/centernet_onestage_head.py and
proposal/onestage_decode.py.

Without the oracle:
  * the head's parameter paths equal the official state-dict keys for every switch (share tower,
    DFConv2d, GroupNorm(25), NORM "", WITH_AGN_HM);
  * the decode against a NumPy transcription of `predict_single_level` + `ml_nms` +
    `nms_and_topK` (small random maps; with and without the agnostic heatmap, NOT_NMS, canvas).

Against the zoo oracles (../shared/oracle_zoo, README there), weights regenerated and converted
strictly by the generic converter:
  * CenterNet-FPN_R50_1x: the whole detector on the official 800x1088 input: P3-P7, the class
    logits / regression of every level, the candidates (> 0.05) of every level, the NMS input
    (per-level top-1000) and the 100 detections (matched sets);
  * the same image on a canvas 128 px larger: identical values on the official canvas;
  * CenterNet-S4_DLA_8x: the whole detector (DLASeg backbone, 1-conv towers, stride 4), and the
    head alone on the oracle's float16 `dla2` map (looser: that input carries f16 rounding);
  * CenterNet2_X101-DCN_2x: the head in its ONLY_PROPOSAL form with USE_DEFORMABLE (DFConv2d on
    the last bbox-tower conv) on the oracle's P3-P7.

Tolerances (README §7-§8): float32 maps max |diff| <= 1e-4 * max |X| (measured <= 5e-6);
float16-stored maps rtol 2e-3, atol 2e-3 * max|X| (measured <= 4e-4 relative); per-channel
float64 sums within 1e-4 of the channel abs-sum; boxes matched by (class, box) within 1e-2 px,
>= 99% of the oracle rows matched one-to-one, |d score| <= 1e-3 (measured: all rows matched,
boxes <= 2e-3 px, scores <= 5e-6).
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cn2_jax.modeling.meta_arch.centernet_onestage import (
    CenterNetDetector,
    CenterNetOneStageGenerator,
)
from cn2_jax.modeling.proposal.centernet_onestage_head import CenterNetOneStageHead
from cn2_jax.modeling.proposal.onestage_decode import predict_instances
from cn2_jax.modeling.variables import abstract_module_variables
from cn2_jax.testing.oracle import regenerate_oracle_state_dict
from cn2_jax.testing.zoo_oracle import zoo_dir
from cn2_jax.weights.flax_mapping import convert_to_flax
from cn2_jax.weights.rename import to_detectron2_names

# Full-size official-zoo oracle checks: scripts/test_zoo.sh (CI runs it after the suite).
pytestmark = pytest.mark.zoo


ZOO = zoo_dir()
IMAGE = "000000000009"
FPN_ARCH = "CenterNet-FPN_R50_1x"
S4_ARCH = "CenterNet-S4_DLA_8x"
X101_ARCH = "CenterNet2_X101-DCN_2x"
F32_TOL = 1e-4  # max |diff| / max |X|
SUM_TOL = 1e-4  # per-channel |sum diff| / channel abs-sum
BOX_TOL = 1e-2  # px, for matching
SCORE_TOL = 1e-3
FPN_LEVELS = ("p3", "p4", "p5", "p6", "p7")


def _needs(*archs):
  return pytest.mark.skipif(
      ZOO is None or not all((ZOO / f"outputs_{a}_{IMAGE}.npz").is_file() for a in archs),
      reason="../shared/oracle_zoo not found: these tests need the zoo oracle outputs",
  )


# ----------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------
def _storage(arch: str) -> dict:
  return json.loads((ZOO / f"summary_{arch}_{IMAGE}.json").read_text())["storage"]


def _nchw(a) -> np.ndarray:
  """`[H, W, C]` (batch removed) -> `[C, H, W]`."""
  return np.transpose(np.asarray(a), (2, 0, 1))


def _compare_map(out, name: str, ours_chw: np.ndarray, storage: str) -> dict:
  """Our `[C, H, W]` map against the oracle's stored forms (README §7); returns the errors."""
  assert ours_chw.shape == tuple(int(s) for s in out[f"{name}_shape"][1:]), name
  err = {}
  sums = ours_chw.astype(np.float64).sum((1, 2))
  err["sum"] = float(
      np.max(np.abs(sums - out[f"{name}_chan_sum"]) / np.maximum(out[f"{name}_chan_abssum"], 1e-30))
  )
  cy, cx = (int(v) for v in out[f"{name}_crop_center_origin_yx"])
  crops = {
      "crop_tl": np.s_[:, :16, :16],
      "crop_center": np.s_[:, cy : cy + 16, cx : cx + 16],
      "crop_br": np.s_[:, -16:, -16:],
  }
  for crop, sl in crops.items():
    ref = out[f"{name}_{crop}"]
    err[crop] = float(np.abs(ours_chw[sl] - ref).max() / max(np.abs(ref).max(), 1e-30))
  if storage == "f32":
    ref = out[name]
    err["whole"] = float(np.abs(ours_chw - ref).max() / np.abs(ref).max())
  elif storage == "f16":
    ref = out[f"{name}_f16"].astype(np.float32)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(ours_chw, ref, rtol=2e-3, atol=2e-3 * scale, err_msg=name)
    err["f16"] = float(np.abs(ours_chw - ref).max() / scale)
  assert err["sum"] <= SUM_TOL, (name, err)
  for k, v in err.items():
    if k not in ("sum", "f16"):
      assert v <= F32_TOL, (name, k, err)
  print(name, {k: f"{v:.1e}" for k, v in err.items()})
  return err


def _rel(ours, ref) -> float:
  return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def _match(ours_boxes, ours_classes, ref_boxes, ref_classes, tol=BOX_TOL) -> np.ndarray:
  """For each reference row, the index of our row with the same class and every box coordinate
  within `tol` (the closest one), or -1. Class by class (small distance blocks)."""
  ours_classes = np.asarray(ours_classes).astype(np.int64)
  ref_classes = np.asarray(ref_classes).astype(np.int64)
  m = np.full(len(ref_boxes), -1, np.int64)
  for k in np.unique(ref_classes):
    ri = np.nonzero(ref_classes == k)[0]
    oi = np.nonzero(ours_classes == k)[0]
    if len(oi) == 0:
      continue
    d = np.abs(ours_boxes[oi][:, None, :] - ref_boxes[ri][None, :, :]).max(-1)  # [ours, ref]
    best = d.argmin(0)
    ok = d[best, np.arange(len(ri))] <= tol
    m[ri[ok]] = oi[best[ok]]
  return m


def _check_matched_sets(ours_boxes, ours_scores, ours_classes, ref_boxes, ref_scores, ref_classes):
  """>= 99% of the reference rows matched one-to-one; their scores and boxes agree."""
  m = _match(ours_boxes, ours_classes, ref_boxes, ref_classes)
  ok = m >= 0
  assert ok.mean() >= 0.99, (ok.sum(), len(m))
  assert len(set(m[ok].tolist())) == ok.sum()  # one-to-one
  d_score = float(np.abs(ours_scores[m[ok]] - ref_scores[ok]).max())
  d_box = float(np.abs(ours_boxes[m[ok]] - ref_boxes[ok]).max())
  assert d_score <= SCORE_TOL, d_score
  return dict(matched=int(ok.sum()), of=len(m), d_score=d_score, d_box=d_box, m=m)


def _oracle_batch(out):
  """The batch of the Model API (RGB uint8) reproducing README §5: the stored resized BGR image,
  zero-padded bottom/right to the official canvas."""
  hp, wp = (int(v) for v in out["input_tensor_shape"][2:])
  h, w = (int(v) for v in out["resized_hw"])
  image = np.zeros((1, hp, wp, 3), np.uint8)
  image[0, :h, :w] = out["resized_image_bgr_uint8"][..., ::-1]
  return dict(image=image, image_hw=np.array([[h, w]], np.int32))


def _convert(model, arch: str):
  """The regenerated weights of `arch`, detectron2's renaming (drops pixel_mean/std and the
  BatchNorm counters), strict conversion onto `model`'s variables. Returns (variables, report,
  dropped keys, kept keys)."""
  sd = regenerate_oracle_state_dict(ZOO / f"{arch}_weights.json")
  renamed = to_detectron2_names(sd, "detectron2")
  dropped = [k for k, _ in renamed.info.get("dropped", [])]
  variables, report = convert_to_flax(renamed, abstract_module_variables(model))
  return variables, report, dropped, list(renamed)


def _regenerate_prefix(arch: str, prefix: str, tmp_path: Path) -> dict:
  """The regenerated (checksum-checked) weights of `arch` whose keys start with `prefix`, the
  prefix removed; only those entries are drawn (a filtered copy of the weights JSON)."""
  spec = json.loads((ZOO / f"{arch}_weights.json").read_text())
  spec["entries"] = [e for e in spec["entries"] if e["key"].startswith(prefix)]
  path = tmp_path / f"{arch}_{prefix.rstrip('.')}.json"
  path.write_text(json.dumps(spec))
  sd = regenerate_oracle_state_dict(path)
  return {k[len(prefix) :]: v for k, v in sd.items()}


def _flatten_intermediates(state) -> dict:
  flat = {}
  for k, v in state["intermediates"].items():
    flat[k] = np.asarray(v[0])[0]  # sown tuple, batch axis removed
  return flat


def _r50_fpn():
  """This project's R50-FPN P3-P7 with the schema's values (= the official R50: FrozenBN, stride
  in the 1x1, FREEZE_AT 2, 256 FPN channels)."""
  from cn2_jax.modeling.backbone.fpn import resnet_fpn
  from tests.schema_settings import fpn_kwargs

  return resnet_fpn(**fpn_kwargs())


def _fpn_detector(out) -> CenterNetDetector:
  """CenterNet-FPN_R50_1x (configs Base-CenterNet-FPN.yaml + CenterNet-FPN_R50_1x.yaml)."""
  return CenterNetDetector(
      backbone=_r50_fpn(),
      proposal_generator=CenterNetOneStageGenerator(
          strides=(8, 16, 32, 64, 128),
          channels=256,
          num_classes=80,
          num_cls_convs=4,
          num_box_convs=4,
          score_thresh=float(out["centernet_score_thresh"]),
          pre_nms_topk_test=int(out["centernet_pre_nms_topk_test"]),
          post_nms_topk_test=int(out["centernet_post_nms_topk_test"]),
          nms_thresh_test=float(out["centernet_nms_thresh_test"]),
      ),
      in_features=FPN_LEVELS,
      pixel_mean=tuple(float(v) for v in out["pixel_mean"]),
      pixel_std=tuple(float(v) for v in out["pixel_std"]),
      input_format="BGR",
  )


def _apply_fn(model):
  return jax.jit(lambda v, b: model.apply(v, b, train=False, mutable=["intermediates"]))


# ----------------------------------------------------------------------------------------------
# No oracle: parameter names.
# ----------------------------------------------------------------------------------------------
def _head_keys(**kw) -> set:
  head = CenterNetOneStageHead(**kw)
  x = jnp.zeros((1, 8, 8, kw["channels"]), jnp.float32)
  variables = jax.eval_shape(lambda: head.init(jax.random.PRNGKey(0), [x] * kw["num_levels"]))
  return {
      ".".join(getattr(k, "key", str(k)) for k in path)
      for path, _ in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  }


def test_head_parameter_paths_are_the_official_keys():
  """Every switch of the official CenterNetHead, keys as torch names them (weight -> kernel,
  GroupNorm weight -> scale)."""
  keys = _head_keys(
      num_levels=2,
      channels=50,  # not a multiple of 32: GroupNorm(25, 50)
      num_classes=3,
      num_cls_convs=2,
      num_box_convs=2,
      num_share_convs=1,
      norm="GN",
      use_deformable=True,
      with_agn_hm=True,
  )
  conv, gn = ("kernel", "bias"), ("scale", "bias")
  expected = set()
  for tower, n in (("share_tower", 1), ("cls_tower", 2), ("bbox_tower", 2)):
    for i in range(n):
      if i == n - 1:  # DFConv2d on the last conv of every tower
        expected |= {f"{tower}.{3 * i}.offset.{p}" for p in conv}
        expected |= {f"{tower}.{3 * i}.conv.{p}" for p in conv}
      else:
        expected |= {f"{tower}.{3 * i}.{p}" for p in conv}
      expected |= {f"{tower}.{3 * i + 1}.{p}" for p in gn}
  for name in ("cls_logits", "agn_hm", "bbox_pred"):
    expected |= {f"{name}.{p}" for p in conv}
  expected |= {"scales.0.scale", "scales.1.scale"}
  assert keys == expected, sorted(keys ^ expected)

  # NORM "": [conv, ReLU] per tower step; ONLY_PROPOSAL: no cls tower, no cls_logits.
  keys = _head_keys(
      num_levels=1,
      channels=32,
      num_classes=3,
      num_cls_convs=2,
      num_box_convs=2,
      norm="",
      with_agn_hm=True,
      only_proposal=True,
  )
  assert keys == {
      "bbox_tower.0.kernel",
      "bbox_tower.0.bias",
      "bbox_tower.2.kernel",
      "bbox_tower.2.bias",
      "agn_hm.kernel",
      "agn_hm.bias",
      "bbox_pred.kernel",
      "bbox_pred.bias",
      "scales.0.scale",
  }


def test_head_initialisation():
  """Official init: towers and outputs normal(0.01) with bias 0, cls_logits / agn_hm bias
  -log(99), bbox_pred bias 8, scales 1, GroupNorm (1, 0)."""
  head = CenterNetOneStageHead(
      num_levels=2, channels=32, num_classes=5, num_cls_convs=1, num_box_convs=1, with_agn_hm=True
  )
  params = jax.jit(head.init)(jax.random.PRNGKey(0), [jnp.zeros((1, 4, 4, 32))] * 2)["params"]
  prior = -np.log(99.0)
  np.testing.assert_allclose(params["cls_logits"]["bias"], prior, rtol=1e-6)
  np.testing.assert_allclose(params["agn_hm"]["bias"], prior, rtol=1e-6)
  np.testing.assert_array_equal(params["bbox_pred"]["bias"], 8.0)
  np.testing.assert_array_equal(params["scales.1"]["scale"], 1.0)
  np.testing.assert_array_equal(params["cls_tower.1"]["scale"], 1.0)
  assert abs(float(np.std(params["cls_tower.0"]["kernel"])) - 0.01) < 2e-3


# ----------------------------------------------------------------------------------------------
# No oracle: the decode against a NumPy transcription of the official inference.
# ----------------------------------------------------------------------------------------------
def _np_nms(boxes, scores, thr):
  """torchvision `nms` (CPU kernel): descending stable order, float32 IoU > thr suppresses."""
  order = np.argsort(-scores, kind="stable")
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  removed = np.zeros(len(boxes), bool)
  keep = []
  for a, i in enumerate(order):
    if removed[i]:
      continue
    keep.append(i)
    for j in order[a + 1 :]:
      xx1, yy1 = max(boxes[i, 0], boxes[j, 0]), max(boxes[i, 1], boxes[j, 1])
      xx2, yy2 = min(boxes[i, 2], boxes[j, 2]), min(boxes[i, 3], boxes[j, 3])
      inter = np.float32(max(xx2 - xx1, 0)) * np.float32(max(yy2 - yy1, 0))
      if inter / (area[i] + area[j] - inter) > thr:
        removed[j] = True
  return np.asarray(keep, np.int64)


def _np_official(cls_logits, reg, strides, pre, post, nms_thr, thresh, agn=None, nms=True):
  """`predict_single_level` per level, `Instances.cat`, `ml_nms` (per-class loop),
  `nms_and_topK` (kthvalue), for one image. Maps `[H, W, C]` / `[H, W, 4]` / `[H, W]`."""
  boxes, scores, classes = [], [], []
  for l, (lg, rg, s) in enumerate(zip(cls_logits, reg, strides)):
    h, w, c = lg.shape
    heat = (1.0 / (1.0 + np.exp(-lg.astype(np.float64)))).astype(np.float32).reshape(h * w, c)
    cand = heat > thresh
    if agn is not None:
      a = (1.0 / (1.0 + np.exp(-agn[l].astype(np.float64)))).astype(np.float32).reshape(h * w)
      heat = heat * a[:, None]
    loc, cls = np.nonzero(cand)  # row-major (location, class), as torch's nonzero
    val = heat[loc, cls]
    if len(val) > pre:
      top = np.argsort(-val, kind="stable")[:pre]
      loc, cls, val = loc[top], cls[top], val[top]
    gx = (loc % w * s + s // 2).astype(np.float32)
    gy = (loc // w * s + s // 2).astype(np.float32)
    d = rg.reshape(h * w, 4)[loc] * np.float32(s)
    x1, y1 = gx - d[:, 0], gy - d[:, 1]
    x2 = np.maximum(gx + d[:, 2], x1 + np.float32(0.01))
    y2 = np.maximum(gy + d[:, 3], y1 + np.float32(0.01))
    boxes.append(np.stack([x1, y1, x2, y2], 1))
    scores.append(np.sqrt(val) if agn is not None else val)
    classes.append(cls)
  boxes, scores, classes = (np.concatenate(x) for x in (boxes, scores, classes))
  if nms:
    keep = np.concatenate(
        [
            np.nonzero(classes == k)[0][_np_nms(boxes[classes == k], scores[classes == k], nms_thr)]
            for k in np.unique(classes)
        ]
    )
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
  if len(scores) > post:
    kth = np.sort(scores)[len(scores) - post]  # kthvalue(n - post + 1)
    sel = scores >= kth
    boxes, scores, classes = boxes[sel], scores[sel], classes[sel]
  return boxes, scores, classes


@pytest.mark.parametrize(
    "agn, nms, canvas",
    [(False, True, False), (True, True, False), (False, False, False), (False, True, True)],
)
def test_decode_matches_official_transcription(agn, nms, canvas):
  rng = np.random.RandomState(int(agn) + 2 * int(nms) + 4 * int(canvas))
  strides, shapes, c = (8, 16), ((12, 10), (6, 5)), 4
  cls_logits = [rng.normal(-2.0, 1.5, (2, h, w, c)).astype(np.float32) for h, w in shapes]
  reg = [rng.uniform(0.0, 3.0, (2, h, w, 4)).astype(np.float32) for h, w in shapes]
  agn_logits = [rng.normal(0.0, 1.0, (2, h, w)).astype(np.float32) for h, w in shapes]
  pre, post, thr = 30, 12, 0.05
  masks = None
  if canvas:  # the official canvas is the top-left (8, 6) / (4, 3): pad the maps with garbage
    masks = [np.zeros((2, h, w), bool) for h, w in shapes]
    masks[0][:, :8, :6] = True
    masks[1][:, :4, :3] = True
  decode = functools.partial(
      predict_instances,
      strides=strides,
      pre_nms_topk=pre,
      post_nms_topk=post,
      nms_thresh=0.6,
      score_thresh=thr,
      not_nms=not nms,
  )
  dets = jax.jit(lambda lg, rg, m, ag: decode(lg, rg, m, agn_hm_logits=ag))(
      cls_logits, reg, masks, agn_logits if agn else None
  )
  dets = {k: np.asarray(v) for k, v in dets.items()}
  for b in range(2):
    crop = [np.s_[b, :8, :6], np.s_[b, :4, :3]] if canvas else [np.s_[b], np.s_[b]]
    lg = [x[c] for x, c in zip(cls_logits, crop)]
    rg = [x[c] for x, c in zip(reg, crop)]
    ag = [x[c] for x, c in zip(agn_logits, crop)] if agn else None
    ref = _np_official(lg, rg, strides, pre, post, 0.6, thr, ag, nms)
    v = dets["valid"][b]
    assert v.sum() == min(len(ref[1]), post)
    m = _match(dets["boxes"][b][v], dets["classes"][b][v], ref[0], ref[2], tol=1e-5)
    assert (m >= 0).all() and len(set(m.tolist())) == len(m)
    np.testing.assert_allclose(dets["scores"][b][v][m], ref[1], rtol=1e-6)
    assert np.all(np.diff(dets["scores"][b][v]) <= 0)  # descending
    if nms:  # NMS output order = descending score = the official order
      np.testing.assert_array_equal(m, np.arange(len(m)))


# ----------------------------------------------------------------------------------------------
# Oracle: CenterNet-FPN_R50_1x.
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fpn_setup():
  out = dict(np.load(ZOO / f"outputs_{FPN_ARCH}_{IMAGE}.npz"))
  model = _fpn_detector(out)
  variables, report, dropped, kept = _convert(model, FPN_ARCH)
  return out, model, variables, report, dropped, kept, _apply_fn(model)


@pytest.fixture(scope="module")
def fpn_run(fpn_setup):
  out, model, variables, _, _, _, fn = fpn_setup
  batch = _oracle_batch(out)
  # README §5: the network input (BGR, (x - mean) / std, zero padding) has the oracle's sums.
  x = model.apply(variables, batch["image"], batch["image_hw"], method=CenterNetDetector.preprocess)
  np.testing.assert_allclose(
      np.asarray(x, np.float64)[0].sum((0, 1)), out["input_tensor_chan_sum"], rtol=1e-9
  )
  t0 = time.perf_counter()
  dets, state = fn(variables, batch)
  jax.block_until_ready(dets)
  print(f"FPN_R50 800x1088: compile + forward {time.perf_counter() - t0:.1f} s")
  return out, _flatten_intermediates(state), {k: np.asarray(v)[0] for k, v in dets.items()}


@_needs(FPN_ARCH)
def test_fpn_conversion_is_strict(fpn_setup):
  _, _, _, report, dropped, kept, _ = fpn_setup
  assert report.ok, report.summary()
  spec = json.loads((ZOO / f"{FPN_ARCH}_weights.json").read_text())["entries"]
  # the meta-architecture's normalisation buffers are dropped by the renaming, nothing else
  assert sorted(dropped) == ["pixel_mean", "pixel_std"]
  assert sorted(m[0] for m in report.mapped) == sorted(kept)
  assert len(kept) == len(spec) - 2 == report.num_target_tensors == 322
  head_params = sum(
      e["numel"] for e in spec if e["key"].startswith("proposal_generator.") and e["is_parameter"]
  )
  assert report.num_mapped_params == sum(
      e["numel"] for e in spec if e["is_parameter"] and not e["key"].startswith("pixel_")
  )
  assert head_params == 4 * 2 * (256 * 256 * 9 + 256 + 2 * 256) + (80 + 4) * (256 * 9 + 1) + 5


@_needs(FPN_ARCH)
def test_fpn_dense_outputs_shapes(fpn_setup):
  """`dense_outputs` (the export entry point): the levels and head maps, NHWC."""
  out, model, variables, _, _, _, _ = fpn_setup
  batch = _oracle_batch(out)
  shapes = jax.eval_shape(
      lambda v, i, hw: model.apply(v, i, hw, method=CenterNetDetector.dense_outputs),
      variables,
      batch["image"],
      batch["image_hw"],
  )
  for name, (h, w) in zip(FPN_LEVELS, ((100, 136), (50, 68), (25, 34), (13, 17), (7, 9))):
    assert shapes[name].shape == (1, h, w, 256)
    assert shapes[f"cls_logits_{name}"].shape == (1, h, w, 80)
    assert shapes[f"reg_{name}"].shape == (1, h, w, 4)


@_needs(FPN_ARCH)
def test_fpn_levels(fpn_run):
  out, flat, _ = fpn_run
  storage = _storage(FPN_ARCH)
  for name in FPN_LEVELS:
    _compare_map(out, name, _nchw(flat[name]), storage[name])


@_needs(FPN_ARCH)
def test_fpn_head_maps(fpn_run):
  out, flat, _ = fpn_run
  storage = _storage(FPN_ARCH)
  for name in FPN_LEVELS:
    _compare_map(
        out,
        f"head_cls_logits_{name}",
        _nchw(flat[f"cls_logits_{name}"]),
        storage[f"head_cls_logits_{name}"],
    )
    raw = _rel(_nchw(flat[f"reg_raw_{name}"]), out[f"head_bbox_pred_raw_{name}"])
    reg = _rel(_nchw(flat[f"reg_{name}"]), out[f"head_reg_{name}"])
    print(name, f"bbox_pred raw {raw:.1e}, reg {reg:.1e}")
    assert raw <= F32_TOL and reg <= F32_TOL, (name, raw, reg)


@_needs(FPN_ARCH)
def test_fpn_candidates(fpn_run):
  """Every (class, y, x) with sigmoid(logit) > 0.05 (the oracle's `cand_*`): the same set, the
  same logits and probabilities."""
  out, flat, _ = fpn_run
  for name in FPN_LEVELS:
    logits = _nchw(flat[f"cls_logits_{name}"])  # [C, H, W]
    prob = np.asarray(jax.nn.sigmoid(jnp.asarray(logits)))
    ours = np.argwhere(prob > float(out["centernet_score_thresh"]))  # row-major (c, y, x)
    ref = out[f"cand_{name}_cyx"]
    assert ours.shape == ref.shape and np.array_equal(ours, ref), name
    c, y, x = ref.T
    d_logit = float(np.abs(logits[c, y, x] - out[f"cand_{name}_logit"]).max())
    d_prob = float(np.abs(prob[c, y, x] - out[f"cand_{name}_prob"]).max())
    print(name, len(ref), f"candidates, logit {d_logit:.1e}, prob {d_prob:.1e}")
    assert d_logit <= F32_TOL * np.abs(out[f"cand_{name}_logit"]).max() and d_prob <= 1e-5


@_needs(FPN_ARCH)
def test_fpn_nms_input(fpn_run):
  """The candidates entering `ml_nms`: per-level top-1000 of the candidates, decoded."""
  out, flat, _ = fpn_run
  v = flat["cand_valid"]
  assert v.sum() == len(out["nms_in_scores"]) == 3101
  r = _check_matched_sets(
      flat["cand_boxes"][v],
      flat["cand_scores"][v],
      flat["cand_classes"][v],
      out["nms_in_boxes"],
      out["nms_in_scores"],
      out["nms_in_classes"].astype(int),
  )
  print("nms input", {k: v for k, v in r.items() if k != "m"})


@_needs(FPN_ARCH)
def test_fpn_detections(fpn_run):
  out, _, dets = fpn_run
  v = dets["valid"]
  assert v.sum() == len(out["det_scores"]) == 100
  r = _check_matched_sets(
      dets["boxes"][v],
      dets["scores"][v],
      dets["classes"][v],
      out["det_boxes"],
      out["det_scores"],
      out["det_classes"].astype(int),
  )
  print("detections", {k: v for k, v in r.items() if k != "m"})
  # the NMS output order (descending score), as kept by the official kthvalue cut
  assert (r["m"] == np.arange(100)).mean() >= 0.98


@_needs(FPN_ARCH)
def test_fpn_larger_canvas_same_values(fpn_setup, fpn_run):
  """The oracle batch padded by 128 more zero rows and columns (image_hw unchanged, so the
  official canvas stays 800x1088): the head maps on the canvas and the detections are the
  official-canvas ones."""
  _, _, variables, _, _, _, fn = fpn_setup
  out, flat_ref, dets_ref = fpn_run
  batch = _oracle_batch(out)
  h, w = batch["image"].shape[1:3]
  big = np.zeros((1, h + 128, w + 128, 3), np.uint8)
  big[:, :h, :w] = batch["image"]
  dets, state = fn(variables, dict(image=big, image_hw=batch["image_hw"]))
  flat = _flatten_intermediates(state)
  worst = 0.0
  for name in FPN_LEVELS:
    for key in ("cls_logits", "reg"):
      ref = flat_ref[f"{key}_{name}"]
      got = flat[f"{key}_{name}"][: ref.shape[0], : ref.shape[1]]
      worst = max(worst, _rel(got, ref))
  print(f"larger canvas: max rel diff of the head maps on the canvas {worst:.1e}")
  assert worst <= 1e-5
  dets = {k: np.asarray(v)[0] for k, v in dets.items()}
  assert dets["valid"].sum() == 100
  m = _match(dets["boxes"], dets["classes"], dets_ref["boxes"], dets_ref["classes"], tol=1e-3)
  assert (m >= 0).all()
  np.testing.assert_allclose(dets["scores"][m], dets_ref["scores"], atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Oracle: CenterNet-S4_DLA_8x.
# ----------------------------------------------------------------------------------------------
def _s4_proposal_generator(out) -> CenterNetOneStageGenerator:
  """Base_S4_DLA.yaml: IN_FEATURES [dla2], FPN_STRIDES [4], 1-conv towers, NORM GN (default)."""
  return CenterNetOneStageGenerator(
      strides=(4,),
      channels=64,
      num_classes=80,
      num_cls_convs=1,
      num_box_convs=1,
      score_thresh=float(out["centernet_score_thresh"]),
      pre_nms_topk_test=int(out["centernet_pre_nms_topk_test"]),
      post_nms_topk_test=int(out["centernet_post_nms_topk_test"]),
      nms_thresh_test=float(out["centernet_nms_thresh_test"]),
  )


def _check_s4_outputs(out, flat, dets, *, f16_input: bool):
  """Head maps, candidates and detections of S4 against the oracle. With the float16 `dla2` as
  input (`f16_input`) the float32 comparisons get the float16 tolerance and the candidates
  may differ at the 0.05 threshold by that rounding."""
  tol = 2e-3 if f16_input else F32_TOL
  storage = _storage(S4_ARCH)
  ours = _nchw(flat["cls_logits_dla2"])
  if f16_input:  # the crops are float32: compare them at the f16 tolerance
    ref = out["head_cls_logits_dla2_f16"].astype(np.float32)
    err = _rel(ours, ref)
    cy, cx = (int(v) for v in out["head_cls_logits_dla2_crop_center_origin_yx"])
    crop = _rel(ours[:, cy : cy + 16, cx : cx + 16], out["head_cls_logits_dla2_crop_center"])
    print(f"S4 head on f16 dla2: cls logits vs f16 {err:.1e}, centre crop {crop:.1e}")
    assert err <= 2e-3 and crop <= tol
  else:
    _compare_map(out, "head_cls_logits_dla2", ours, storage["head_cls_logits_dla2"])
  raw = _rel(_nchw(flat["reg_raw_dla2"]), out["head_bbox_pred_raw_dla2"])
  reg = _rel(_nchw(flat["reg_dla2"]), out["head_reg_dla2"])
  print(f"S4 bbox_pred raw {raw:.1e}, reg {reg:.1e}")
  assert raw <= tol and reg <= tol
  # candidates: the same set up to flips at the threshold (probabilities within rounding of it)
  prob = np.asarray(jax.nn.sigmoid(jnp.asarray(ours)))
  thr = float(out["centernet_score_thresh"])
  cand = {tuple(r) for r in np.argwhere(prob > thr)}
  ref = {tuple(r) for r in out["cand_dla2_cyx"]}
  flips = cand ^ ref
  print(f"S4 candidates: {len(ref)} official, {len(flips)} flipped at the threshold")
  assert len(flips) <= 1e-3 * len(ref)
  near = 2e-4 if f16_input else 1e-5
  assert all(abs(prob[c, y, x] - thr) <= near for c, y, x in flips)
  v = flat["cand_valid"]
  assert v.sum() == len(out["nms_in_scores"]) == 1000
  r = _check_matched_sets(
      flat["cand_boxes"][v],
      flat["cand_scores"][v],
      flat["cand_classes"][v],
      out["nms_in_boxes"],
      out["nms_in_scores"],
      out["nms_in_classes"].astype(int),
  )
  print("S4 nms input", {k: v for k, v in r.items() if k != "m"})
  v = dets["valid"]
  assert v.sum() == len(out["det_scores"]) == 100
  r = _check_matched_sets(
      dets["boxes"][v],
      dets["scores"][v],
      dets["classes"][v],
      out["det_boxes"],
      out["det_scores"],
      out["det_classes"].astype(int),
  )
  print("S4 detections", {k: v for k, v in r.items() if k != "m"})


@_needs(S4_ARCH)
def test_s4_head_on_the_oracle_dla2(tmp_path):
  """The head + decode alone on the oracle's `dla2` (stored float16 only, README §7), so the
  head outputs carry its rounding: compared at the float16 tolerance."""
  out = dict(np.load(ZOO / f"outputs_{S4_ARCH}_{IMAGE}.npz"))
  assert _storage(S4_ARCH)["dla2"] == "f16"
  pg = _s4_proposal_generator(out)
  x = jnp.asarray(out["dla2_f16"].astype(np.float32).transpose(1, 2, 0)[None])  # [1,152,208,64]
  sd = _regenerate_prefix(S4_ARCH, "proposal_generator.", tmp_path)
  abstract = jax.eval_shape(lambda: pg.init(jax.random.PRNGKey(0), [x]))
  variables, report = convert_to_flax(sd, abstract)
  assert report.ok, report.summary()
  head, dets = jax.jit(lambda v, f: pg.apply(v, f, return_candidates=True))(variables, [x])
  flat = {f"{k}_dla2": np.asarray(head[k][0])[0] for k in ("cls_logits", "reg", "reg_raw")}
  flat.update({k: np.asarray(dets.pop(k))[0] for k in list(dets) if k.startswith("cand_")})
  _check_s4_outputs(out, flat, {k: np.asarray(v)[0] for k, v in dets.items()}, f16_input=True)


def _dla_seg():
  try:
    from cn2_jax.modeling.backbone.dla_up import DLASeg
  except ImportError:
    pytest.skip("modeling/backbone/dla_up.py (DLASeg) not available")
  return DLASeg(norm="BN", imagenet_classes=1000)


@_needs(S4_ARCH)
def test_s4_whole_detector():
  """CenterNet-S4_DLA_8x end to end: DLASeg backbone (official BN, DCN IDA-up) + the 1-conv
  head + the decode on the official 608x832 input (BGR, PIXEL_STD ~58)."""
  out = dict(np.load(ZOO / f"outputs_{S4_ARCH}_{IMAGE}.npz"))
  model = CenterNetDetector(
      backbone=_dla_seg(),
      proposal_generator=_s4_proposal_generator(out),
      in_features=("dla2",),
      pixel_mean=tuple(float(v) for v in out["pixel_mean"]),
      pixel_std=tuple(float(v) for v in out["pixel_std"]),
      input_format="BGR",
      size_divisibility=32,
  )
  variables, report, dropped, kept = _convert(model, S4_ARCH)
  assert report.ok, report.summary()
  assert {"pixel_mean", "pixel_std"} <= set(dropped)
  assert all(k in ("pixel_mean", "pixel_std") or k.endswith("num_batches_tracked") for k in dropped)
  assert sorted(m[0] for m in report.mapped) == sorted(kept)
  batch = _oracle_batch(out)
  dets, state = _apply_fn(model)(variables, batch)
  flat = _flatten_intermediates(state)
  _compare_map(out, "dla2", _nchw(flat["dla2"]), _storage(S4_ARCH)["dla2"])
  _check_s4_outputs(out, flat, {k: np.asarray(v)[0] for k, v in dets.items()}, f16_input=False)


# ----------------------------------------------------------------------------------------------
# Oracle: CenterNet2_X101-DCN_2x's head (ONLY_PROPOSAL, USE_DEFORMABLE: DFConv2d).
# ----------------------------------------------------------------------------------------------
@_needs(X101_ARCH)
def test_deformable_head_on_the_x101_oracle(tmp_path):
  """The DFConv2d path: X101-DCN's CenterNet head (4-conv bbox tower whose last conv is
  DFConv2d, agnostic heatmap) on the oracle's P3-P7 (P4-P7 float32: float32 tolerance; P3 is
  stored float16: its outputs at the float16 tolerance)."""
  out = dict(np.load(ZOO / f"outputs_{X101_ARCH}_{IMAGE}.npz"))
  storage = _storage(X101_ARCH)
  feats = []
  for name in FPN_LEVELS:
    m = out[name] if storage[name] == "f32" else out[f"{name}_f16"].astype(np.float32)
    feats.append(jnp.asarray(m.transpose(1, 2, 0)[None]))
  head = CenterNetOneStageHead(
      num_levels=5,
      channels=256,
      num_classes=80,
      num_cls_convs=4,
      num_box_convs=4,
      norm="GN",
      use_deformable=True,
      with_agn_hm=True,
      only_proposal=True,
  )
  sd = _regenerate_prefix(X101_ARCH, "proposal_generator.centernet_head.", tmp_path)
  assert "bbox_tower.9.offset.weight" in sd and "bbox_tower.9.conv.weight" in sd
  abstract = jax.eval_shape(lambda: head.init(jax.random.PRNGKey(0), feats))
  variables, report = convert_to_flax(sd, abstract)
  assert report.ok, report.summary()
  res = jax.jit(head.apply)(variables, feats)
  for l, name in enumerate(FPN_LEVELS):
    tol = F32_TOL if storage[name] == "f32" else 2e-3
    hm = _rel(np.asarray(res["agn_hm_logits"][l])[0], out[f"head_agn_hm_logits_{name}"])
    reg = _rel(_nchw(np.asarray(res["reg"][l])[0]), out[f"head_reg_{name}"])
    raw = _rel(_nchw(np.asarray(res["reg_raw"][l])[0]), out[f"head_bbox_pred_raw_{name}"])
    print(name, storage[name], f"agn_hm {hm:.1e}, reg {reg:.1e}, raw {raw:.1e}")
    assert max(hm, reg, raw) <= tol, (name, hm, reg, raw)
