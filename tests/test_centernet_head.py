"""Tests for cn2_jax.modeling.proposal.centernet_head (spec §2.4, §8 item 6)."""

from __future__ import annotations

import json
import math
import os
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cn2_jax.modeling.proposal.centernet_head import CenterNetHead
from tests.schema_settings import head_kwargs

ORACLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "oracle"
)
PREFIX = "proposal_generator.centernet_head."


class _Wrap(nn.Module):
  """Mimics the caller's nesting: proposal_generator/centernet_head."""

  @nn.compact
  def __call__(self, feats):
    return _PG(name="proposal_generator")(feats)


class _PG(nn.Module):

  @nn.compact
  def __call__(self, feats):
    return CenterNetHead(**head_kwargs(), name="centernet_head")(feats)


def _flax_to_d2(path, leaf_shape):
  """'.'-joined Flax path -> detectron2 key (DESIGN.md leaf renames), plus torch shape."""
  *mods, leaf = path
  owner = mods[-1]
  if leaf == "kernel":
    name = "weight"
    shape = (leaf_shape[3], leaf_shape[2], leaf_shape[0], leaf_shape[1])  # HWIO -> OIHW
  elif leaf == "scale" and not owner.startswith("scales."):
    name, shape = "weight", leaf_shape  # GroupNorm
  else:
    name, shape = leaf, leaf_shape
  return ".".join(list(mods) + [name]), tuple(shape)


def _oracle_entries():
  with open(os.path.join(ORACLE, "cn2_r50_oracle_weights.json")) as f:
    d = json.load(f)
  return [e for e in d["entries"] if e["key"].startswith(PREFIX)]


def _tiny_feats(c=256, batch=1, sizes=((4, 5), (3, 3), (2, 2), (1, 2), (1, 1)), dtype=jnp.float32):
  return [jnp.zeros((batch, h, w, c), dtype) for h, w in sizes]


def test_param_names_and_shapes_match_oracle_keys():
  if not os.path.isdir(ORACLE):
    pytest.skip(f"oracle directory {ORACLE} absent")
  shapes = jax.eval_shape(lambda: _Wrap().init(jax.random.key(0), _tiny_feats()))
  assert set(shapes.keys()) == {"params"}
  flat = jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
  ours = {}
  for kp, leaf in flat:
    path = tuple(k.key for k in kp)
    key, shp = _flax_to_d2(path, leaf.shape)
    assert leaf.dtype == jnp.float32
    ours[key] = shp
  theirs = {e["key"]: tuple(e["shape"]) for e in _oracle_entries()}
  assert len(theirs) == 25
  assert ours == theirs


def test_param_names_without_oracle():
  """Names checked against a literal list, so this runs even without the oracle."""
  shapes = jax.eval_shape(
      lambda: CenterNetHead(**head_kwargs()).init(jax.random.key(0), _tiny_feats())
  )
  names = {
      ".".join(k.key for k in kp)
      for kp, _ in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
  }
  expect = set()
  for i in (0, 3, 6, 9):
    expect |= {f"bbox_tower.{i}.kernel", f"bbox_tower.{i}.bias"}
  for i in (1, 4, 7, 10):
    expect |= {f"bbox_tower.{i}.scale", f"bbox_tower.{i}.bias"}
  expect |= {"agn_hm.kernel", "agn_hm.bias", "bbox_pred.kernel", "bbox_pred.bias"}
  expect |= {f"scales.{l}.scale" for l in range(5)}
  assert names == expect


def test_init_values_and_output_shapes():
  c = 32  # GN(32) needs C % 32 == 0; small width keeps the test cheap
  sizes = ((6, 7), (3, 4), (2, 2), (1, 1), (1, 1))
  head = CenterNetHead(**head_kwargs(channels=c))
  x = [jax.random.normal(jax.random.key(i), (2, h, w, c)) for i, (h, w) in enumerate(sizes)]
  variables = head.init(jax.random.key(1), x)
  p = variables["params"]
  np.testing.assert_allclose(
      np.asarray(p["agn_hm"]["bias"]), [-math.log((1 - 0.01) / 0.01)], rtol=0, atol=1e-6
  )
  np.testing.assert_allclose(np.asarray(p["agn_hm"]["bias"]), [-4.59512], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(p["bbox_pred"]["bias"]), np.full(4, 8.0, np.float32))
  for l in range(5):
    np.testing.assert_array_equal(np.asarray(p[f"scales.{l}"]["scale"]), [1.0])
  for i in (0, 3, 6, 9):
    assert p[f"bbox_tower.{i}"]["kernel"].shape == (3, 3, c, c)
    np.testing.assert_array_equal(np.asarray(p[f"bbox_tower.{i}"]["bias"]), 0.0)
  for i in (1, 4, 7, 10):
    np.testing.assert_array_equal(np.asarray(p[f"bbox_tower.{i}"]["scale"]), 1.0)
    np.testing.assert_array_equal(np.asarray(p[f"bbox_tower.{i}"]["bias"]), 0.0)
  # N(0, 0.01) weights (loose statistical check on the tower kernels: 4 * 9216 draws).
  ws = np.concatenate([np.asarray(p[f"bbox_tower.{i}"]["kernel"]).ravel() for i in (0, 3, 6, 9)])
  assert abs(ws.std() - 0.01) < 0.0005 and abs(ws.mean()) < 0.0005

  out = head.apply(variables, x)
  assert set(out) == {"hm_logits", "reg", "reg_raw"}
  for l, (h, w) in enumerate(sizes):
    assert out["hm_logits"][l].shape == (2, h, w) and out["hm_logits"][l].dtype == jnp.float32
    assert out["reg"][l].shape == (2, h, w, 4) and out["reg"][l].dtype == jnp.float32
    assert out["reg_raw"][l].shape == (2, h, w, 4) and out["reg_raw"][l].dtype == jnp.float32
    # With the N(0, 0.01) init the raw regression is close to its bias 8.
    assert np.all(np.abs(np.asarray(out["reg_raw"][l]) - 8.0) < 1.0)

  # Per-level Scale and ReLU: reg = relu(scale_l * raw), shared tower weights across levels.
  p2 = jax.tree_util.tree_map(lambda a: a, p)
  p2["scales.2"] = {"scale": jnp.array([-0.5], jnp.float32)}
  p2["scales.3"] = {"scale": jnp.array([2.0], jnp.float32)}
  out2 = head.apply({"params": p2}, x)
  for l, s in enumerate([1.0, 1.0, -0.5, 2.0, 1.0]):
    raw = np.asarray(out2["reg_raw"][l])
    np.testing.assert_allclose(np.asarray(out2["reg"][l]), np.maximum(s * raw, 0), rtol=1e-6)
    np.testing.assert_array_equal(raw, np.asarray(out["reg_raw"][l]))

  # bfloat16 compute still returns float32 outputs.
  out_bf = CenterNetHead(**head_kwargs(channels=c, dtype=jnp.bfloat16)).apply(variables, x)
  assert all(a.dtype == jnp.float32 for a in out_bf["hm_logits"] + out_bf["reg"])
  np.testing.assert_allclose(
      np.asarray(out_bf["reg_raw"][0]), np.asarray(out["reg_raw"][0]), atol=0.1
  )


def _np_conv3x3(x, w, b):
  """Plain numpy 3x3 conv, padding 1. x [H,W,Ci], w OIHW."""
  h, wd, _ = x.shape
  xp = np.pad(x, ((1, 1), (1, 1), (0, 0)))
  y = np.zeros((h, wd, w.shape[0]), np.float64)
  for dy in range(3):
    for dx in range(3):
      y += xp[dy : dy + h, dx : dx + wd] @ w[:, :, dy, dx].T
  return y + b


def _np_gn(x, g, b, groups=32, eps=1e-5):
  h, w, c = x.shape
  xg = x.reshape(h, w, groups, c // groups)
  m = xg.mean(axis=(0, 1, 3), keepdims=True)
  v = ((xg - m) ** 2).mean(axis=(0, 1, 3), keepdims=True)
  return ((xg - m) / np.sqrt(v + eps)).reshape(h, w, c) * g + b


def test_head_matches_numpy_reference():
  """Independent numpy forward (float64) for one small random head."""
  c = 32
  sizes = ((5, 6), (3, 3), (2, 3), (1, 2), (1, 1))
  rng = np.random.RandomState(3)
  x = [rng.randn(1, h, w, c).astype(np.float32) for h, w in sizes]
  head = CenterNetHead(**head_kwargs(channels=c))
  v = head.init(jax.random.key(0), [jnp.asarray(a) for a in x])
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), v["params"])
  # randomise GN affine / biases / scales so every parameter matters
  for i in (1, 4, 7, 10):
    p[f"bbox_tower.{i}"]["scale"] = rng.uniform(0.8, 1.2, c)
    p[f"bbox_tower.{i}"]["bias"] = rng.normal(0, 0.05, c)
  for i in (0, 3, 6, 9):
    p[f"bbox_tower.{i}"]["kernel"] = rng.normal(0, 0.1, (3, 3, c, c))
    p[f"bbox_tower.{i}"]["bias"] = rng.normal(0, 0.05, c)
  p["bbox_pred"]["kernel"] = rng.normal(0, 0.1, (3, 3, c, 4))
  p["agn_hm"]["kernel"] = rng.normal(0, 0.1, (3, 3, c, 1))
  scales = [1.0, 0.7, -1.3, 2.0, 0.5]
  for l in range(5):
    p[f"scales.{l}"]["scale"] = np.array([scales[l]])
  pj = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), p)
  out = head.apply({"params": pj}, [jnp.asarray(a) for a in x])
  hwio2oihw = lambda k: np.transpose(k, (3, 2, 0, 1))
  for l in range(5):
    y = x[l][0].astype(np.float64)
    for i in range(4):
      y = _np_conv3x3(
          y, hwio2oihw(p[f"bbox_tower.{3 * i}"]["kernel"]), p[f"bbox_tower.{3 * i}"]["bias"]
      )
      y = np.maximum(
          _np_gn(y, p[f"bbox_tower.{3 * i + 1}"]["scale"], p[f"bbox_tower.{3 * i + 1}"]["bias"]), 0
      )
    hm = _np_conv3x3(y, hwio2oihw(p["agn_hm"]["kernel"]), p["agn_hm"]["bias"])[..., 0]
    raw = _np_conv3x3(y, hwio2oihw(p["bbox_pred"]["kernel"]), p["bbox_pred"]["bias"])
    np.testing.assert_allclose(np.asarray(out["hm_logits"][l][0]), hm, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["reg_raw"][l][0]), raw, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(out["reg"][l][0]), np.maximum(scales[l] * raw, 0), rtol=1e-4, atol=1e-4
    )


def _regen_oracle_head_params():
  """Oracle weight rule (README §4) for the head keys -> Flax params of CenterNetHead."""
  params = {}
  for e in _oracle_entries():
    key, shape = e["key"], tuple(e["shape"])
    if e["init_rule"] == "keep_init":
      arr = np.asarray(e["kept_value"], np.float32).reshape(shape)
    else:
      rs = np.random.RandomState(zlib.crc32(key.encode("utf-8")))
      a, b = e["rule_params"]
      if e["init_rule"] == "normal":
        arr = rs.normal(a, b, size=shape).astype(np.float32)
      elif e["init_rule"] == "uniform":
        arr = rs.uniform(a, b, size=shape).astype(np.float32)
      else:
        raise AssertionError(e["init_rule"])
    # checksums published with the oracle
    np.testing.assert_allclose(arr.astype(np.float64).sum(), e["check_sum"], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.abs(arr.astype(np.float64)).sum(), e["check_abs_sum"], rtol=1e-9)
    np.testing.assert_array_equal(arr.ravel()[:3], np.asarray(e["check_first3"], np.float32))
    rel = key[len(PREFIX) :]
    mod, leaf = rel.rsplit(".", 1)
    if leaf == "weight" and arr.ndim == 4:
      leaf, arr = "kernel", np.transpose(arr, (2, 3, 1, 0))  # OIHW -> HWIO
    elif leaf == "weight":
      leaf = "scale"  # GroupNorm
    params.setdefault(mod, {})[leaf] = jnp.asarray(arr)
  return params


def test_head_reproduces_oracle_p4_to_p7():
  if not os.path.isdir(ORACLE):
    pytest.skip(f"oracle directory {ORACLE} absent")
  params = _regen_oracle_head_params()
  d = np.load(os.path.join(ORACLE, "outputs_000000000009.npz"))
  # p3 is only stored as crops; a dummy p3 is passed (levels are independent: per-level GN).
  feats = [jnp.zeros((1, 2, 2, 256), jnp.float32)]
  for k in ("p4", "p5", "p6", "p7"):
    feats.append(jnp.asarray(np.transpose(d[k], (1, 2, 0))[None]))
  out = jax.jit(CenterNetHead(**head_kwargs()).apply)({"params": params}, feats)
  for l, name in enumerate(("p4", "p5", "p6", "p7"), start=1):
    checks = [
        (out["hm_logits"][l][0], d[f"head_agn_hm_logits_{name}"]),
        (out["reg_raw"][l][0], np.transpose(d[f"head_bbox_pred_raw_{name}"], (1, 2, 0))),
        (out["reg"][l][0], np.transpose(d[f"head_reg_{name}"], (1, 2, 0))),
    ]
    for got, ref in checks:
      got = np.asarray(got)
      assert got.shape == ref.shape
      err = np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-12)
      assert err < 1e-4, (name, err)
      np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.max(np.abs(ref)))
