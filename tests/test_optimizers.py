"""Adam / AdamW / RangerLars and the centerX schedule extras of cn2_jax/engine/optim.py.

Each optimizer is checked against an independent float64 numpy transcription of the torch code
(torch.optim.Adam / AdamW; pabloppp/pytorch-tools `Ralamb` + `Lookahead` as `RangerLars`) over 20
steps: past RAdam's rectification threshold (step 6) and past three Lookahead syncs (steps 6, 12,
18; the first one is a no-op, pytorch-tools creates the slow copy there).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cn2_jax.config import base_config, validate_config
from cn2_jax.errors import ConfigError
from cn2_jax.engine import optim

FROZEN_PREFIXES = ("backbone.stem",)
STEPS = 20


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
  """XLA compile time dominates these tiny tests (as tests/test_engine.py)."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


# ------------------------------------------------------------------------------------------------
# numpy transcriptions of the torch optimizers (float64; lr given per step)
# ------------------------------------------------------------------------------------------------
def _np_adam(p, grads, lrs, wd, b1, b2, eps, decoupled):
  """torch.optim.Adam (decoupled=False: L2 added to the gradient) / torch.optim.AdamW."""
  p = np.array(p, np.float64)
  m = np.zeros_like(p)
  v = np.zeros_like(p)
  for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
    g = np.asarray(g, np.float64)
    if decoupled:
      p = p * (1 - lr * wd)
    elif wd != 0:
      g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    denom = np.sqrt(v) / math.sqrt(bc2) + eps
    p = p - lr / bc1 * m / denom
  return p


def _np_rangerlars(p, grads, lrs, wd, b1, b2, eps, alpha, k, threshold=5.0, max_norm=10.0):
  """pytorch-tools RangerLars = Lookahead(Ralamb(params), alpha, k), one tensor."""
  p = np.array(p, np.float64)
  m = np.zeros_like(p)
  v = np.zeros_like(p)
  slow = None
  for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
    g = np.asarray(g, np.float64)
    # Ralamb.step
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    beta2_t = b2**t
    n_sma_max = 2 / (1 - b2) - 1
    n_sma = n_sma_max - 2 * t * beta2_t / (1 - beta2_t)
    if n_sma >= threshold:
      step_size = math.sqrt(
          (1 - beta2_t)
          * (n_sma - 4)
          / (n_sma_max - 4)
          * (n_sma - 2)
          / n_sma
          * n_sma_max
          / (n_sma_max - 2)
      ) / (1 - b1**t)
    else:
      step_size = 1.0 / (1 - b1**t)
    if wd != 0:
      p = p + (-wd * lr) * p
    direction = m / (np.sqrt(v) + eps) if n_sma >= threshold else m
    radam_step = p - step_size * lr * direction
    radam_norm = np.sqrt(np.sum(radam_step**2))
    weight_norm = min(max(np.sqrt(np.sum(p**2)), 0.0), max_norm)
    trust = 1.0 if weight_norm == 0 or radam_norm == 0 else weight_norm / radam_norm
    p = p - step_size * lr * trust * direction
    # Lookahead.step
    if t % k == 0:
      if slow is None:
        slow = p.copy()
      slow = slow + alpha * (p - slow)
      p = slow.copy()
  return p


# ------------------------------------------------------------------------------------------------
# Fixture: a small pytree with a frozen leaf, a no-decay (GroupNorm) leaf, a zero leaf and a leaf
# whose norm is above RangerLars' clamp of 10
# ------------------------------------------------------------------------------------------------
def _params(r):
  return {
      "backbone": {"stem": {"kernel": r.normal(size=(3, 3))}},
      "neck": {
          "conv": {"kernel": r.normal(size=(4, 6)), "bias": np.zeros(6)},
          "norm": {"scale": 1 + 0.1 * r.normal(size=6), "bias": 0.1 * r.normal(size=6)},
      },
      "head": {"big": {"kernel": 3.0 * r.normal(size=(5, 5))}},  # ||w|| ~ 15 > lars_clip
      "scales.0": r.normal(size=(1,)),
  }


def _cfg(optimizer, **kw):
  cfg = base_config().optim
  cfg.update(
      dict(
          optimizer=optimizer,
          base_lr=0.05,
          reference_batch_size=0,
          warmup_iters=3,
          warmup_factor=0.1,
          steps=(14,),
          gamma=0.5,
          max_iter=STEPS,
          weight_decay=0.05,
          weight_decay_norm=0.0,
          clip_value=0.0,
          clip_norm=0.0,
      )
  )
  cfg.update(kw)
  return cfg


def _run(cfg, params, grads_seq):
  tx = optim.make_optimizer(cfg, params, frozen_prefixes=FROZEN_PREFIXES)
  state = tx.init(params)
  update = jax.jit(tx.update)
  p = params
  for g in grads_seq:
    upd, state = update(g, state, p)
    p = jax.tree.map(lambda a, b: a + b, p, upd)
  return p, state


def _flat(tree):
  return {
      optim.path_str(kp): np.asarray(x) for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _clip_grads(grads_seq, clip_value, clip_norm):
  out = []
  for g in grads_seq:
    g = {k: np.asarray(x, np.float64) for k, x in g.items()}
    if clip_norm > 0:
      norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
      g = {k: x * min(1.0, clip_norm / norm) for k, x in g.items()}
    if clip_value > 0:
      g = {k: np.clip(x, -clip_value, clip_value) for k, x in g.items()}
    out.append(g)
  return out


@pytest.mark.parametrize(
    "optimizer,clip",
    [
        ("adam", "none"),
        ("adamw", "none"),
        ("rangerlars", "none"),
        ("adam", "value"),
        ("rangerlars", "value"),
        ("adam", "norm"),
        ("rangerlars", "norm"),
    ],
)
def test_optimizer_matches_numpy_torch_transcription(optimizer, clip):
  clip_value = 0.5 if clip == "value" else 0.0
  clip_norm = 4.0 if clip == "norm" else 0.0
  cfg = _cfg(optimizer, clip_value=clip_value, clip_norm=clip_norm)
  r = np.random.default_rng(1)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _params(r))
  grads_seq = [
      jax.tree.map(lambda x: jnp.asarray(r.normal(size=x.shape) * 2, jnp.float32), params)
      for _ in range(STEPS)
  ]
  got, state = _run(cfg, params, grads_seq)
  sched = optim.make_lr_schedule(cfg)
  lrs = [float(sched(i)) for i in range(STEPS)]
  assert lrs[0] == pytest.approx(0.005) and lrs[-1] == pytest.approx(0.025)

  p0 = _flat(params)
  gseq = _clip_grads([_flat(g) for g in grads_seq], clip_value, clip_norm)
  got = _flat(got)
  b1, b2 = cfg.betas
  for name, p in p0.items():
    if name.startswith("backbone.stem"):
      np.testing.assert_array_equal(got[name], p)  # frozen: exactly unchanged
      continue
    wd = 0.0 if ".norm." in name else 0.05
    g = [x[name] for x in gseq]
    if optimizer == "rangerlars":
      ref = _np_rangerlars(p, g, lrs, wd, b1, b2, cfg.eps, 0.5, 6)
    else:
      ref = _np_adam(p, g, lrs, wd, b1, b2, cfg.eps, decoupled=optimizer == "adamw")
    moved = np.max(np.abs(ref - p))
    assert moved > 1e-3, name
    # ~1e-6 of the value (float32 rounding of |p| ~ 5) and 2e-6 of how far the parameter moved
    np.testing.assert_allclose(got[name], ref, rtol=1e-6, atol=2e-6 * moved, err_msg=name)

  # frozen params carry no optimizer state: mu, nu (+ Lookahead's slow copy) per trainable value
  n_train = sum(x.size for x in p0.values()) - 9
  n_state = sum(x.size for x in jax.tree.leaves(state) if np.ndim(x) > 0)
  assert n_state == (3 if optimizer == "rangerlars" else 2) * n_train


def test_rangerlars_lookahead_and_trust_ratio_pieces():
  """Lookahead syncs move the params to the slow weights only at multiples of k (first: no-op);
  the trust ratio uses min(||p||, lars_clip)."""
  cfg = _cfg("rangerlars", weight_decay=0.0, lookahead_k=2, lookahead_alpha=0.5)
  params = {"w": jnp.full((4,), 20.0)}  # ||w|| = 40 > lars_clip = 10
  tx = optim.make_optimizer(cfg, params)
  update = jax.jit(tx.update)
  state, p, traj = tx.init(params), params, []
  for _ in range(4):
    upd, state = update({"w": jnp.ones((4,))}, state, p)
    p = jax.tree.map(lambda a, b: a + b, p, upd)
    traj.append(np.asarray(p["w"], np.float64))
  sched = optim.make_lr_schedule(cfg)
  lrs = [float(sched(i)) for i in range(4)]

  def ref(n, alpha):
    return _np_rangerlars(
        np.full(4, 20.0), [np.ones(4)] * n, lrs[:n], 0.0, 0.9, 0.999, 1e-8, alpha, 2
    )

  for n, got in enumerate(traj, start=1):
    np.testing.assert_allclose(got, ref(n, 0.5), rtol=1e-6)
  np.testing.assert_allclose(traj[1], ref(2, 1.0), rtol=1e-6)  # step 2: the first sync is a no-op
  # step 4: halfway between the step-2 slow copy and the fast weights (alpha = 1: no lookahead)
  np.testing.assert_allclose(traj[3], 0.5 * (traj[1] + ref(4, 1.0)), rtol=1e-4)


def test_ralamb_scalars_match_double_precision():
  """N_sma and 1 - b^t in float32 agree with torch's double-precision Python scalars."""
  t = np.array([1, 2, 5, 6, 7, 50, 500, 5000, 50000], np.float64)
  for b2 in (0.999, 0.99, 0.9999):
    n_max = 2 / (1 - b2) - 1
    ref = n_max - 2 * t * b2**t / (1 - b2**t)
    got = jax.jit(optim._radam_n_sma, static_argnums=0)(b2, jnp.asarray(t, jnp.float32))
    got = np.asarray(got, np.float64)
    np.testing.assert_allclose(got, ref, rtol=5e-7)
  for b in (0.9, 0.999):
    got = jax.jit(optim._one_minus_pow, static_argnums=0)(b, jnp.asarray(t, jnp.float32))
    got = np.asarray(got, np.float64)
    np.testing.assert_allclose(got, 1 - b**t, rtol=5e-7)


def test_sgd_state_structure_unchanged_by_new_keys():
  """'sgd' (default) is still clip -> decay -> trace -> lr; the new keys are not read by it."""
  cfg = _cfg("sgd", betas=(0.5, 0.5), eps=1.0, lookahead_k=1)
  params = {"w": jnp.ones(3)}
  state = optim.make_optimizer(cfg, params).init(params)
  kinds = {
      type(x).__name__ for x in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "_fields"))
  }
  assert not kinds & {"LookaheadState", "AdamState"}, kinds
  with pytest.raises(ValueError, match="optim.optimizer must be one of"):
    optim.make_optimizer(_cfg("lamb"), params)


# ------------------------------------------------------------------------------------------------
# WarmupCosineAnnealingLR
# ------------------------------------------------------------------------------------------------
def _centerx_wca(it, base_lr, max_iters, delay_iters, eta_min, warmup_factor, warmup_iters):
  """centerX solver/lr_scheduler.py WarmupCosineAnnealingLR.get_lr at last_epoch = it."""
  if it <= warmup_iters:
    if it >= warmup_iters:
      f = 1.0
    else:
      a = it / warmup_iters
      f = warmup_factor * (1 - a) + a
    return base_lr * f
  if it <= delay_iters:
    return base_lr
  return (
      eta_min
      + (base_lr - eta_min)
      * (1 + math.cos(math.pi * (it - delay_iters) / (max_iters - delay_iters)))
      / 2
  )


@pytest.mark.parametrize("decay,warmup,batch", [(0.7, 1000, None), (0.1, 0, None), (0.5, 300, 4)])
def test_warmup_cosine_annealing_matches_centerx(decay, warmup, batch):
  cfg = base_config().optim
  cfg.update(
      dict(
          schedule="warmup_cosine_annealing",
          base_lr=0.02,
          max_iter=10000,
          warmup_iters=warmup,
          warmup_factor=0.001,
          cosine_decay_iter=decay,
          min_lr=1e-6,
      )
  )
  sched = jax.jit(optim.make_lr_schedule(cfg, batch))
  base = optim.effective_base_lr(cfg, batch)
  delay = int(10000 * decay)
  edges = {0, 1, warmup - 1, warmup, warmup + 1, delay, delay + 1, 9999, 10000}
  its = sorted((set(range(0, 10001, 37)) | edges) - {-1})
  for it in its:
    ref = _centerx_wca(it, base, 10000, delay, 1e-6, 0.001, warmup)
    np.testing.assert_allclose(float(sched(it)), ref, rtol=2e-5, atol=1e-9, err_msg=str(it))
  assert float(sched(10000)) == pytest.approx(1e-6, rel=1e-3)
  assert float(sched(20000)) == pytest.approx(1e-6, rel=1e-3)  # clamped after max_iter
  cfg.cosine_decay_iter = 0.05  # the cosine would start inside the warm-up: centerX asserts
  cfg.warmup_iters = 1000
  with pytest.raises(ValueError, match="warm-up"):
    optim.make_lr_schedule(cfg)


# ------------------------------------------------------------------------------------------------
# Schedules in epochs
# ------------------------------------------------------------------------------------------------
def test_iterations_from_epochs_hand_computed():
  cfg = base_config().optim
  cfg.update(dict(epochs=80.0, steps=(50, 62), warmup_iters=1))
  # CrowdHuman: 15000 images at batch 64 -> 234 iterations per epoch (spec §5.1)
  it = optim.iterations_from_epochs(cfg, 15000, 64)
  assert it == dict(
      iters_per_epoch=234,
      max_iter=18720,
      steps=(11700, 14508),
      warmup_iters=234,
      warmup_factor=1 / 234,
  )
  # COCO: 117266 non-empty images -> 1832 it/epoch; 140 epochs, warm-up 3 epochs
  cfg.update(dict(epochs=140.0, steps=(90, 120), warmup_iters=3))
  it = optim.iterations_from_epochs(cfg, 117266, 64)
  assert (it["iters_per_epoch"], it["max_iter"], it["steps"]) == (1832, 256480, (164880, 219840))
  assert (it["warmup_iters"], it["warmup_factor"]) == (5496, 1 / 5496)
  # fractional epochs round up; float noise does not (0.7 * 10 = 7.000000000000001)
  cfg.update(dict(epochs=2.5, steps=(0.7, 1.25), warmup_iters=0, warmup_factor=0.3))
  it = optim.iterations_from_epochs(cfg, 105, 10)  # 10 it/epoch
  assert (it["max_iter"], it["steps"], it["warmup_iters"]) == (25, (7, 13), 0)
  assert it["warmup_factor"] == 0.3  # no warm-up: kept as written
  cfg.epochs = 0.25
  assert optim.iterations_from_epochs(cfg, 105, 10)["max_iter"] == 3  # ceil(2.5)
  assert optim.iterations_from_epochs(cfg, 5, 16)["iters_per_epoch"] == 1  # at least one
  with pytest.raises(ValueError, match="number of training images"):
    optim.iterations_from_epochs(cfg, None, 16)
  # epochs = 0: iterations as written
  cfg = base_config().optim
  it = optim.iterations_from_epochs(cfg, None, 16)
  assert it["max_iter"] == 90000 and it["steps"] == (60000, 80000) and it["iters_per_epoch"] == 0


def test_resolve_schedule_and_unresolved_refusal():
  cfg = base_config().optim
  assert optim.resolve_schedule(cfg, None, 16) is cfg  # epochs = 0: untouched
  cfg.update(dict(epochs=80.0, steps=(50, 62), warmup_iters=1, schedule="multistep"))
  with pytest.raises(ValueError, match="resolve_schedule"):
    optim.make_lr_schedule(cfg)
  with pytest.raises(ValueError, match="resolve_schedule"):
    optim.make_optimizer(cfg)
  res = optim.resolve_schedule(cfg, 15000, 64)
  assert cfg.epochs == 80.0 and cfg.max_iter == 90000  # the input is not modified
  got = (res.epochs, res.max_iter, tuple(res.steps), res.warmup_iters)
  assert got == (0, 18720, (11700, 14508), 234)
  sched = optim.make_lr_schedule(res)
  assert float(sched(0)) == pytest.approx(0.02 / 234, rel=1e-6)
  assert float(sched(234)) == pytest.approx(0.02, rel=1e-6)
  assert float(sched(11700)) == pytest.approx(0.002, rel=1e-5)
  assert "max_iter 18720" in optim.schedule_summary(res)


# ------------------------------------------------------------------------------------------------
# Config schema
# ------------------------------------------------------------------------------------------------
def test_config_defaults_and_validation():
  c = validate_config(base_config())
  o = c.optim
  assert (o.optimizer, tuple(o.betas), o.eps) == ("sgd", (0.9, 0.999), 1e-8)
  assert (o.lookahead_alpha, o.lookahead_k, o.lars_clip, o.radam_threshold) == (0.5, 6, 10.0, 5.0)
  assert (o.schedule, o.cosine_decay_iter, o.min_lr, o.epochs) == ("multistep", 0.7, 1e-8, 0.0)
  for key, bad, match in (
      ("optimizer", "lamb", r"optim.optimizer must be one of \('sgd', 'adam', 'adamw', 'rangerl"),
      ("schedule", "poly", r"optim.schedule must be one of \('multistep', 'cosine', 'warmup_c"),
      ("betas", (0.9, 1.0), "optim.betas"),
      ("lookahead_k", 0, "optim.lookahead_k"),
      ("epochs", -1.0, "optim.epochs"),
      ("cosine_decay_iter", 1.5, "optim.cosine_decay_iter"),
  ):
    c = base_config()
    c.optim[key] = bad
    with pytest.raises(ValueError, match=match):
      validate_config(c)
    assert issubclass(ConfigError, ValueError)
  c = base_config()
  c.optim.epochs = 12  # an int is accepted by the float field
  validate_config(c)


# ------------------------------------------------------------------------------------------------
# The train loop: RangerLars state in the train step and checkpoints, schedule in epochs
# ------------------------------------------------------------------------------------------------
def test_loop_trains_rangerlars_with_a_schedule_in_epochs(tmp_path):
  from cn2_jax.engine import loop
  from tests.test_engine import FROZEN_PREFIXES as TINY_FROZEN
  from tests.test_engine import TinyDet, _config, _loader, init_fn

  cfg = _config(max_iter=1000, checkpoint_every=1000)
  cfg.optim.update(
      dict(
          optimizer="rangerlars",
          base_lr=1e-3,
          reference_batch_size=0,
          epochs=1.5,
          steps=(1,),
          warmup_iters=1,
      )
  )
  cfg.optim.lookahead_k = 2
  model, lrs = TinyDet(), {}
  kw = dict(frozen_prefixes=TINY_FROZEN, metrics_callback=lambda s, m: lrs.setdefault(s, m["lr"]))
  with pytest.raises(ValueError, match="number of training images"):
    loop.train(cfg, str(tmp_path / "x"), model, init_fn(model), _loader(), **kw)
  # 5 images at batch 2: 2 iterations per epoch -> max_iter 3, warm-up 2 (factor 1/2), step 2
  state = loop.train(
      cfg, str(tmp_path / "a"), model, init_fn(model), _loader(), num_train_images=5, **kw
  )
  assert int(state.step) == 3 and sorted(lrs) == [1, 2, 3]
  # lr(0) = 1e-3 * 1/2, lr(1) = 1e-3 * (1/2 * 1/2 + 1/2), lr(2) = 1e-3 * gamma
  np.testing.assert_allclose([lrs[s] for s in (1, 2, 3)], [5e-4, 7.5e-4, 1e-4], rtol=1e-5)
