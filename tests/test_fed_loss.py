"""cn2_jax/modeling/roi_heads/fed_loss.py against the OFFICIAL CenterNet2 federated loss.

tests/data/zoo/fed_loss_reference.npz holds outputs of the official `fed_loss.py` and of
`CustomFastRCNNOutputLayers.{sigmoid,softmax}_cross_entropy_loss` (torch, CPU), made by
tools/zoo_reference/fed_loss_reference.py, whose input recipes (`make_case`, `make_cat_info`) this
test imports. Besides, an independent numpy float64 transcription of the official formulas checks
the losses on padded / batched inputs, and the sampler's law is checked against the exact
probabilities of sequential weighted sampling without replacement (enumeration), which the stored
torch.multinomial counts are checked against too.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cn2_jax.modeling.roi_heads.fed_loss import (
    load_class_freq,
    sample_fed_classes,
    sigmoid_ce_loss,
    sigmoid_prior_bias,
    softmax_ce_loss,
)

ROOT = Path(__file__).parents[1]
DATA = Path(__file__).parent / "data" / "zoo"
TINY = DATA / "lvis_cat_info_tiny.json"
REF = np.load(DATA / "fed_loss_reference.npz")
LOSS_RTOL = 2e-6  # float32 sums over <= 1024 x 1203 terms, relative to the loss


def _load_generator():
  path = ROOT / "tools" / "zoo_reference" / "fed_loss_reference.py"
  spec = importlib.util.spec_from_file_location("fed_loss_reference", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


GEN = _load_generator()


def case_inputs(case: str):
  logits, labels, _ = GEN.make_case("small" if case == "exclude" else case)
  assert logits.astype(np.float64).sum() == REF[f"{case}_logits_sum"]
  assert labels.sum() == REF[f"{case}_labels_sum"]
  return logits, labels


# ---------------------------------------------------------------- independent numpy reference


def ref_sigmoid_ce(logits, labels, fed_mask):
  """Official sigmoid_cross_entropy_loss in float64: sum(BCE * fed_w) / B over the C columns."""
  x = logits.astype(np.float64)
  b, c = x.shape[0], x.shape[1] - 1
  if b == 0:
    return 0.0
  target = np.zeros((b, c + 1))
  target[np.arange(b), labels] = 1.0
  target = target[:, :c]
  x = x[:, :c]
  bce = np.maximum(x, 0) - x * target + np.log1p(np.exp(-np.abs(x)))
  w = 1.0 if fed_mask is None else fed_mask.astype(np.float64)[None, :]
  return float((bce * w).sum() / b)


def ref_softmax_ce(logits, labels, fed_mask):
  """Official softmax_cross_entropy_loss in float64: CE weighted by w[gt], 'mean' reduction."""
  x = logits.astype(np.float64)
  if x.shape[0] == 0:
    return 0.0
  c = x.shape[1] - 1
  lse = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
  ce = lse - x[np.arange(len(labels)), labels]
  w = np.ones(c + 1) if fed_mask is None else np.append(fed_mask.astype(np.float64), 1.0)
  wr = w[labels]
  return float((wr * ce).sum() / wr.sum()) if wr.sum() > 0 else 0.0


def pad_batch(logits, labels, extra_rows: int, images: int, seed: int = 0):
  """Splits N rows into `images` images padded with `extra_rows` garbage invalid rows each:
  `[images, N / images + extra_rows, ...]` arrays and the valid mask."""
  rs = np.random.RandomState(seed)
  n, c1 = logits.shape
  per = n // images
  lg = rs.standard_normal((images, per + extra_rows, c1)).astype(np.float32) * 50
  lb = rs.randint(0, c1, (images, per + extra_rows))
  valid = np.zeros((images, per + extra_rows), bool)
  lg[:, :per] = logits.reshape(images, per, c1)
  lb[:, :per] = labels.reshape(images, per)
  valid[:, :per] = True
  return jnp.asarray(lg), jnp.asarray(lb, jnp.int32), jnp.asarray(valid)


# ---------------------------------------------------------------------------- load_class_freq


def test_load_class_freq_matches_official(tmp_path):
  freq = load_class_freq(TINY, 0.5)
  assert freq.dtype == np.float32 and freq.shape == (8,)
  np.testing.assert_array_equal(freq, REF["freq_tiny"])
  cats = json.loads(TINY.read_text())
  by_id = sorted(cats, key=lambda c: c["id"])
  np.testing.assert_allclose(freq, [math.sqrt(c["image_count"]) for c in by_id], rtol=1e-7)
  path = tmp_path / "cat_info.json"
  path.write_text(json.dumps(GEN.make_cat_info()))
  freq = load_class_freq(path, 0.5, num_classes=1203)
  # 1203 shuffled ids. torch's vectorised CPU float32 sqrt is off by 1 ulp from the correctly
  # rounded value for 148 of the 1203 counts (its own float64 check shows it); ours is rounded.
  np.testing.assert_array_max_ulp(freq, REF["freq_lvis"], maxulp=1)
  counts = np.array([c["image_count"] for c in sorted(GEN.make_cat_info(), key=lambda c: c["id"])])
  np.testing.assert_array_equal(freq, np.sqrt(counts.astype(np.float64)).astype(np.float32))


@pytest.mark.parametrize(
    "content,num_classes,error,match",
    [
        (None, None, FileNotFoundError, "not found"),
        ("[{", None, ValueError, "not valid JSON"),
        ('{"id": 1}', None, ValueError, "non-empty JSON list"),
        ("[]", None, ValueError, "non-empty JSON list"),
        ('[{"id": 1, "image_count": -3}]', None, ValueError, "entry 0"),
        ('[{"id": "1", "image_count": 3}]', None, ValueError, "entry 0"),
        ('[{"id": 1}]', None, ValueError, "entry 0"),
        ('[{"id": 1, "image_count": 3}, {"id": 1, "image_count": 4}]', None, ValueError, "dupl"),
        ('[{"id": 1, "image_count": 3}]', 1203, ValueError, "1 categories but the model has 1203"),
    ],
)
def test_load_class_freq_errors(tmp_path, content, num_classes, error, match):
  path = tmp_path / "cat_info.json"
  if content is not None:
    path.write_text(content)
  with pytest.raises(error, match=match) as info:
    load_class_freq(path, 0.5, num_classes=num_classes)
  assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------ sampler


def exact_subset_probs(weight, candidates, k):
  """{frozenset: P} of k sequential draws without replacement, P(next = j) = w_j / sum(rest)."""
  probs = {}
  for seq in itertools.permutations(candidates, k):
    p, left = 1.0, float(sum(weight[i] for i in candidates))
    for i in seq:
      p *= weight[i] / left
      left -= weight[i]
    key = frozenset(seq)
    probs[key] = probs.get(key, 0.0) + p
  return probs


def _dist_small():
  w = np.asarray(GEN.DIST_SMALL_WEIGHT, np.float64)
  gt = np.asarray(GEN.DIST_SMALL_GT)
  c = len(w)
  appeared = set(gt.tolist())
  k = GEN.DIST_SMALL_NUM - len(appeared)  # the background label counts in #appeared
  cands = [i for i in range(c) if i not in appeared and w[i] > 0]
  fixed = sum(1 << i for i in appeared if i < c)
  probs = {fixed + sum(1 << i for i in s): p for s, p in exact_subset_probs(w, cands, k).items()}
  return w, gt, probs


def _check_counts(counts, probs, draws, sigmas=5.0):
  """Every subset frequency within `sigmas` binomial standard errors of the exact probability, no
  mass outside the support, and a chi-square below the 1e-4 quantile; returns the worst |z|."""
  assert sum(counts[code] for code in probs) == draws
  z = [(counts[code] - draws * p) / math.sqrt(draws * p * (1 - p)) for code, p in probs.items()]
  chi2 = sum((counts[code] - draws * p) ** 2 / (draws * p) for code, p in probs.items())
  # chi-square with df = 9: P(> 33.7) = 1e-4
  assert len(probs) == 10 and chi2 < 33.7, chi2
  assert max(abs(v) for v in z) < sigmas, z
  return max(abs(v) for v in z), chi2


def test_torch_multinomial_is_sequential_sampling():
  """The stored official draws follow the enumerated law (what the JAX sampler must match)."""
  _, _, probs = _dist_small()
  _check_counts(REF["dist_small_counts"], probs, GEN.DIST_SMALL_DRAWS)


def test_sampler_distribution_exact():
  w, gt, probs = _dist_small()
  draws = 400_000
  keys = jax.random.split(jax.random.PRNGKey(2024), draws)
  sample = jax.jit(
      jax.vmap(
          lambda key: sample_fed_classes(
              key,
              jnp.asarray(gt),
              jnp.ones(gt.shape, bool),
              jnp.asarray(w, jnp.float32),
              GEN.DIST_SMALL_NUM,
          )
      )
  )
  masks = np.asarray(sample(keys))
  codes = (masks.astype(np.int64) << np.arange(len(w))).sum(1)
  counts = np.bincount(codes, minlength=2 ** len(w))
  worst_z, chi2 = _check_counts(counts, probs, draws)
  # Inclusion frequencies per class, against the exact inclusion probabilities.
  incl = masks.mean(0)
  exact = np.zeros(len(w))
  for code, p in probs.items():
    exact += p * ((code >> np.arange(len(w))) & 1)
  assert np.abs(incl - exact).max() < 5 * math.sqrt(0.25 / draws), (incl, exact)
  print(
      f"subset max |z| {worst_z:.2f}, chi2 {chi2:.1f}, incl max diff {np.abs(incl - exact).max()}"
  )


def test_sampler_lvis_scale_vs_official():
  """C=1203, official-like weights, 6 GT classes + background: per-class inclusion frequencies
  of 20k JAX draws vs 50k official torch draws (two-sample z < 5 for every class)."""
  _, labels = case_inputs("lvis")
  freq = jnp.asarray(REF["freq_lvis"])
  draws = 20_000
  keys = jax.random.split(jax.random.PRNGKey(7), draws)
  sample = jax.jit(
      jax.vmap(lambda k: sample_fed_classes(k, jnp.asarray(labels), jnp.ones(1024, bool), freq, 50))
  )
  masks = np.asarray(sample(keys))
  n_fg = len(set(labels.tolist()) - {1203})
  assert n_fg == 6 and (masks.sum(1) == 49).all()  # 6 + (50 - 7): the background counts
  f_jax = masks.mean(0)
  f_torch = REF["dist_lvis_counts"] / GEN.DIST_LVIS_DRAWS
  p = (masks.sum(0) + REF["dist_lvis_counts"]) / (draws + GEN.DIST_LVIS_DRAWS)
  se = np.sqrt(np.maximum(p * (1 - p), 1e-12) * (1 / draws + 1 / GEN.DIST_LVIS_DRAWS))
  z = np.abs(f_jax - f_torch) / se
  assert z.max() < 5, (z.max(), np.argmax(z))
  print(f"lvis inclusion: max |z| {z.max():.2f}, max |diff| {np.abs(f_jax - f_torch).max():.4f}")


def test_sampler_semantics():
  c = 12
  w = jnp.asarray(np.arange(1, c + 1), jnp.float32)
  key = jax.random.PRNGKey(0)
  sample = jax.jit(sample_fed_classes, static_argnums=4)
  # Deterministic per rng, fixed shape, appeared classes always in, count = num - #appeared.
  gt = jnp.array([[1, 12, 12, 5], [5, 12, 0, 0]])
  valid = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)  # the 0s are padding: not appeared
  m = sample(key, gt, valid, w, 6)
  assert m.shape == (c,) and m.dtype == jnp.bool_
  np.testing.assert_array_equal(m, sample(key, gt, valid, w, 6))
  assert m[1] and m[5] and int(m.sum()) == 2 + (6 - 3)  # appeared {1, 5, background}
  others = [sample(jax.random.PRNGKey(i), gt, valid, w, 6) for i in range(1, 30)]
  assert any(not np.array_equal(m, o) for o in others)
  # The padded 0 labels are not appeared: with weight 0, class 0 is never in the mask.
  w_no0 = w.at[0].set(0.0)
  assert not any(bool(sample(jax.random.PRNGKey(i), gt, valid, w_no0, 6)[0]) for i in range(30))
  assert bool(sample(key, gt, jnp.ones_like(valid), w_no0, 6)[0])  # unless valid
  # No background in the batch: all num slots are foreground.
  assert int(sample(key, gt, valid & (gt < c), w, 6).sum()) == 6
  # #appeared >= num: nothing sampled, just the appeared classes (may exceed num).
  gt_many = jnp.arange(c + 1)
  m = sample(key, gt_many[:9], jnp.ones(9, bool), w, 6)
  np.testing.assert_array_equal(m, np.arange(c) < 9)
  # Zero-weight classes are never drawn; too few positive ones -> all of them (torch raises).
  w0 = w.at[jnp.array([2, 3, 4, 7, 8, 9, 10, 11])].set(0.0)
  for i in range(20):
    m = np.asarray(sample(jax.random.PRNGKey(i), gt, valid, w0, 6))
    np.testing.assert_array_equal(m, np.isin(np.arange(c), [0, 1, 5, 6]))
  # Nothing valid: num draws, no appeared class.
  assert int(sample(key, gt, jnp.zeros_like(valid), w, 6).sum()) == 6


# ------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("case", ["small", "exclude", "lvis"])
def test_losses_vs_official_torch(case):
  logits, labels = case_inputs(case)
  mask = jnp.asarray(REF[f"{case}_mask"])
  lg, lb, valid = pad_batch(logits, labels, extra_rows=7, images=2)
  got = {
      "sigmoid": sigmoid_ce_loss(lg, lb, valid, mask),
      "softmax": softmax_ce_loss(lg, lb, valid, mask),
      "sigmoid_nofed": sigmoid_ce_loss(lg, lb, valid, None),
      "softmax_nofed": softmax_ce_loss(lg, lb, valid, None),
  }
  worst = 0.0
  for name, value in got.items():
    assert value.dtype == jnp.float32 and value.shape == ()
    want = REF[f"{case}_{name}"]
    np.testing.assert_allclose(value, want, rtol=LOSS_RTOL, err_msg=name)
    worst = max(worst, abs(float(value) / float(want) - 1))
  print(f"{case}: max relative difference {worst:.2e}")


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_grads_vs_official_torch(kind):
  logits, labels = case_inputs("small")
  mask = jnp.asarray(REF["small_mask"])
  lg, lb, valid = pad_batch(logits, labels, extra_rows=5, images=2)
  fn = sigmoid_ce_loss if kind == "sigmoid" else softmax_ce_loss
  grad = jax.grad(fn)(lg, lb, valid, mask)
  want = REF[f"small_{kind}_grad"]
  got = np.asarray(grad[:, :32]).reshape(want.shape)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
  assert not np.asarray(grad[:, 32:]).any()  # padding rows
  if kind == "sigmoid":
    assert not got[:, -1].any()  # the background logit gets no loss
    assert not got[:, :-1][:, ~REF["small_mask"]].any()  # classes outside the fed set


@pytest.mark.parametrize("case", ["small", "exclude", "lvis"])
def test_losses_vs_numpy_reference(case):
  logits, labels = case_inputs(case)
  rs = np.random.RandomState(3)
  masks = [REF[f"{case}_mask"], None, rs.rand(logits.shape[1] - 1) < 0.5]
  for images, extra in ((1, 0), (2, 3), (4, 11)):
    lg, lb, valid = pad_batch(logits, labels, extra_rows=extra, images=images, seed=images)
    for mask in masks:
      m = None if mask is None else jnp.asarray(mask)
      np.testing.assert_allclose(
          sigmoid_ce_loss(lg, lb, valid, m), ref_sigmoid_ce(logits, labels, mask), rtol=LOSS_RTOL
      )
      np.testing.assert_allclose(
          softmax_ce_loss(lg, lb, valid, m), ref_softmax_ce(logits, labels, mask), rtol=LOSS_RTOL
      )
  # No valid row: 0 (official: numel() == 0 -> 0).
  lg, lb, valid = pad_batch(logits, labels, extra_rows=3, images=2)
  none = jnp.zeros_like(valid)
  assert float(sigmoid_ce_loss(lg, lb, none, jnp.asarray(masks[0]))) == 0.0
  assert float(softmax_ce_loss(lg, lb, none, jnp.asarray(masks[0]))) == 0.0


def test_softmax_fed_loss_is_a_noop_and_matches_cascade():
  """With a sampled mask every gt class has weight 1: softmax + fed = plain CE (value, grad, to
  float32 rounding),
  the plain CE over the valid ROIs (sum / #valid), as cascade.py's stage loss without the fed loss.
  """
  logits, labels = case_inputs("lvis")
  lg, lb, valid = pad_batch(logits, labels, extra_rows=9, images=2)
  mask = sample_fed_classes(jax.random.PRNGKey(5), lb, valid, jnp.asarray(REF["freq_lvis"]), 50)
  assert int(mask.sum()) == 49
  v_fed, g_fed = jax.value_and_grad(softmax_ce_loss)(lg, lb, valid, mask)
  v, g = jax.value_and_grad(softmax_ce_loss)(lg, lb, valid, None)
  # equal up to float32 summation order (the unmasked CE keeps the cascade's own expression)
  np.testing.assert_allclose(float(v_fed), float(v), rtol=1e-6)
  np.testing.assert_allclose(g_fed, g, rtol=1e-5, atol=1e-6 * float(np.abs(g).max()))
  # the plain CE the cascade's stage loss uses without the fed loss: mean over valid ROIs
  lg64, lb64, ok = np.asarray(lg, np.float64), np.asarray(lb), np.asarray(valid)
  logp = lg64 - np.log(np.exp(lg64 - lg64.max(-1, keepdims=True)).sum(-1, keepdims=True))
  logp -= lg64.max(-1, keepdims=True)
  ce = -np.take_along_axis(logp, lb64[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(v), ce[ok].sum() / max(ok.sum(), 1), rtol=1e-5)


def test_sigmoid_prior_bias():
  b = sigmoid_prior_bias(0.01)
  assert b == pytest.approx(-math.log(99.0), rel=1e-15)
  assert float(jax.nn.sigmoid(jnp.float32(b))) == pytest.approx(0.01, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# The federated sigmoid CE inside the detector (CascadeROIHeads, roi_heads.use_fed_loss).
# ----------------------------------------------------------------------------------------------
def test_detector_with_sigmoid_ce_and_fed_loss_trains_and_scores_with_sigmoid(fast_compile):
  """A tiny CenterNet2 with LVIS's ROI losses: the cls_score bias is the sigmoid prior, the
  stage losses are the federated sigmoid CE of each stage's own sampled classes (finite, with
  gradient only to the sampled classes' rows), and inference scores use sigmoid(logits)."""
  from cn2_jax.config import validate_config
  from cn2_jax.modeling import detector
  from tests.test_detector import tiny_batch, tiny_config

  cfg = tiny_config()
  cfg.model.num_classes = 8
  r = cfg.model.roi_heads
  r.use_sigmoid_ce = True
  r.use_fed_loss = True
  r.fed_loss_num_cat = 4
  r.cat_freq_path = str(DATA / "lvis_cat_info_tiny.json")
  validate_config(cfg)
  model = detector.build_model(cfg.model)
  batch = tiny_batch()
  variables = model.init(jax.random.PRNGKey(0), batch, train=False)
  bias = np.asarray(variables["params"]["roi_heads"]["box_predictor.0"]["cls_score"]["bias"])
  np.testing.assert_allclose(bias, -np.log(99.0), rtol=1e-6)

  def loss(params, rng):
    losses = model.apply({**variables, "params": params}, batch, train=True, rngs={"sampling": rng})
    return losses["loss_cls_stage0"], losses

  grad_fn = jax.jit(jax.grad(loss, has_aux=True))
  grads, losses = grad_fn(variables["params"], jax.random.PRNGKey(3))
  assert all(np.isfinite(float(v)) for v in losses.values())
  g = np.abs(np.asarray(grads["roi_heads"]["box_predictor.0"]["cls_score"]["kernel"])).max(0)
  # the GT classes 0 and 2 always count; with 4 classes in all (background included) one more
  # foreground class is drawn; the background column gets no sigmoid loss
  live = set(np.flatnonzero(g > 0).tolist())
  assert {0, 2} <= live and 8 not in live and len(live) == 3, live
  grads2, _ = grad_fn(variables["params"], jax.random.PRNGKey(4))
  g2 = np.abs(np.asarray(grads2["roi_heads"]["box_predictor.0"]["cls_score"]["kernel"])).max(0)
  draws = {frozenset(np.flatnonzero(g > 0).tolist()), frozenset(np.flatnonzero(g2 > 0).tolist())}
  for seed in (5, 6):  # another rng draws another class (of the 6 possible)
    gs, _ = grad_fn(variables["params"], jax.random.PRNGKey(seed))
    draws.add(
        frozenset(
            np.flatnonzero(
                np.abs(np.asarray(gs["roi_heads"]["box_predictor.0"]["cls_score"]["kernel"])).max(0)
                > 0
            ).tolist()
        )
    )
  assert len(draws) > 1

  dets = jax.jit(lambda v, b: model.apply(v, b, train=False, mutable=["intermediates"]))(
      variables, batch
  )[1]["intermediates"]["roi_heads"]
  logits = [np.asarray(dets[f"stage{k}_cls_logits"][0]) for k in range(3)]
  props = np.asarray(dets["final_scores_all"][0])
  mean = np.mean([1 / (1 + np.exp(-l)) for l in logits], axis=0)
  assert props.shape == mean.shape
  # final scores = sqrt(mean sigmoid * objectness): their ratio to sqrt(mean sigmoid) is per-row
  ratio = props[..., :8] ** 2 / mean[..., :8]
  np.testing.assert_allclose(ratio, ratio[..., :1] * np.ones_like(ratio), rtol=1e-4)
