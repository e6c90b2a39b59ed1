"""`layers.conv2d` (on XLA:CPU: 1x1 convolutions as matrix products, 3x3 weight gradients as k*k
matrix products) has the values and gradients of `lax.conv_general_dilated`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cn2_jax.modeling import export_mode, layers


@pytest.fixture(autouse=True)
def _every_size(monkeypatch):
  """The rule applies from a size on; these tests use small maps."""
  monkeypatch.setattr(layers, "MATMUL_FORMS_MIN_MACS", 0)


def reference(x, kernel, strides, padding, groups=1):
  return jax.lax.conv_general_dilated(
      x,
      kernel,
      (strides, strides),
      ((padding, padding), (padding, padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups,
  )


def numpy_weight_grad(x, g, k, strides, padding):
  """dW[i, j, c, o] = sum_{b, h, w} x_pad[b, s h + i, s w + j, c] g[b, h, w, o], as loops."""
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  g = np.asarray(g, np.float64)
  out = np.zeros((k, k, x.shape[-1], g.shape[-1]))
  for i in range(k):
    for j in range(k):
      for h in range(g.shape[1]):
        for w in range(g.shape[2]):
          out[i, j] += xp[:, strides * h + i, strides * w + j].T @ g[:, h, w]
  return out


@pytest.mark.parametrize(
    "k, strides, padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (1, 2, 0), (3, 1, 0), (3, 2, 0)]
)
def test_values_and_gradients_equal_lax(k, strides, padding):
  rng = np.random.default_rng(k * 10 + strides)
  x = jnp.asarray(rng.standard_normal((2, 9, 11, 5), np.float32))
  kernel = jnp.asarray(rng.standard_normal((k, k, 5, 7), np.float32))
  y = layers.conv2d(x, kernel, strides, padding)
  np.testing.assert_allclose(y, reference(x, kernel, strides, padding), rtol=1e-6, atol=1e-5)
  g = jnp.asarray(rng.standard_normal(y.shape, np.float32))
  _, vjp_new = jax.vjp(lambda a, b: layers.conv2d(a, b, strides, padding), x, kernel)
  _, vjp_ref = jax.vjp(lambda a, b: reference(a, b, strides, padding), x, kernel)
  (dx, dw), (dx_ref, dw_ref) = vjp_new(g), vjp_ref(g)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dw, numpy_weight_grad(x, g, k, strides, padding), rtol=1e-5, atol=1e-4)
  # second order (e.g. a gradient penalty) still works through the custom rule
  jax.grad(
      lambda b: jnp.sum(jax.grad(lambda a: jnp.sum(layers.conv2d(a, b, strides, padding) ** 2))(x))
  )(kernel)


def test_bfloat16_and_grouped_convolutions():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 4), np.float32))
  kernel = jnp.asarray(rng.standard_normal((3, 3, 4, 6), np.float32))
  grad = jax.grad(
      lambda b: jnp.sum(
          layers.conv2d(x.astype(jnp.bfloat16), b.astype(jnp.bfloat16), 1, 1).astype(jnp.float32)
          ** 2
      )
  )
  grad_ref = jax.grad(
      lambda b: jnp.sum(
          reference(x.astype(jnp.bfloat16), b.astype(jnp.bfloat16), 1, 1).astype(jnp.float32) ** 2
      )
  )
  new, ref = grad(kernel), grad_ref(kernel)
  assert new.dtype == jnp.float32
  np.testing.assert_allclose(new, ref, rtol=3e-2, atol=3e-2 * float(jnp.abs(ref).max()))
  grouped = jnp.asarray(rng.standard_normal((3, 3, 2, 6), np.float32))  # 2 channels: lax's rule
  y = layers.conv2d(x, grouped, 1, 1, groups=2)
  np.testing.assert_array_equal(y, reference(x, grouped, 1, 1, groups=2))


@pytest.mark.parametrize("k, strides, padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0)])
def test_grouped_convolutions_split_per_group(k, strides, padding):
  """ResNeXt-style grouped convolutions (4 groups of 4 channels) as one convolution per group:
  values and both gradients equal lax's grouped convolution and a numpy loop per group."""
  rng = np.random.default_rng(k + strides)
  groups = 4
  x = jnp.asarray(rng.standard_normal((2, 9, 11, 16), np.float32))
  kernel = jnp.asarray(rng.standard_normal((k, k, 4, 8), np.float32))
  assert _form(x, kernel, strides, padding, groups) != "lax"
  y = layers.conv2d(x, kernel, strides, padding, groups)
  np.testing.assert_allclose(
      y, reference(x, kernel, strides, padding, groups), rtol=1e-5, atol=1e-5
  )
  g = jnp.asarray(rng.standard_normal(y.shape, np.float32))
  _, vjp_new = jax.vjp(lambda a, b: layers.conv2d(a, b, strides, padding, groups), x, kernel)
  _, vjp_ref = jax.vjp(lambda a, b: reference(a, b, strides, padding, groups), x, kernel)
  (dx, dw), (dx_ref, dw_ref) = vjp_new(g), vjp_ref(g)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-4)
  for group in range(groups):  # group g: input channels 4g..4g+3 -> output channels 2g, 2g+1
    np.testing.assert_allclose(
        dw[..., 2 * group : 2 * group + 2],
        numpy_weight_grad(
            x[..., 4 * group : 4 * group + 4],
            g[..., 2 * group : 2 * group + 2],
            k,
            strides,
            padding,
        ),
        rtol=1e-5,
        atol=1e-4,
    )


def _form(x, kernel, strides=1, padding=0, groups=1) -> str:
  """Which form `conv2d` traces: "matmul" (1x1 as a 2-D product), "custom" (3x3 with the k*k
  product weight gradient) or "lax"."""
  jaxpr = str(jax.make_jaxpr(lambda a, b: layers.conv2d(a, b, strides, padding, groups))(x, kernel))
  if "custom_vjp_call" in jaxpr:
    return "custom"
  return "lax" if "conv_general_dilated" in jaxpr else "matmul"


def test_the_matmul_forms_are_what_runs_on_cpu():
  """On XLA:CPU the ungrouped unpadded 1x1 convs are matrix products and the ungrouped 3x3 ones
  use the custom weight gradient (what the tests above check against lax); padded 1x1, other
  kernel sizes and grouped ones keep lax's convolution."""
  x = jnp.zeros((1, 4, 4, 2))
  assert jax.default_backend() == "cpu"
  assert _form(x, jnp.zeros((1, 1, 2, 2))) == "matmul"
  assert _form(x, jnp.zeros((1, 1, 2, 2)), strides=2) == "matmul"
  assert _form(x, jnp.zeros((3, 3, 2, 2)), padding=1) == "custom"
  assert _form(x, jnp.zeros((3, 3, 2, 2)), strides=2, padding=1) == "custom"
  assert _form(x, jnp.zeros((1, 1, 2, 2)), padding=1) == "lax"
  assert _form(x, jnp.zeros((2, 2, 2, 2))) == "lax"
  assert _form(x, jnp.zeros((1, 1, 1, 2)), groups=2) == "lax"  # 1 channel per group: lax
  wide = jnp.zeros((1, 4, 4, 8))
  assert "concatenate" in str(
      jax.make_jaxpr(lambda a: layers.conv2d(a, jnp.zeros((3, 3, 4, 4)), 1, 1, 2))(wide)
  )
  with export_mode.onnx_ops():  # inference graphs for ONNX: lax's convolution
    assert _form(x, jnp.zeros((1, 1, 2, 2))) == "lax"
    assert _form(x, jnp.zeros((3, 3, 2, 2)), padding=1) == "lax"


def test_small_convolutions_keep_xla_rule(monkeypatch):
  """Below MATMUL_FORMS_MIN_MACS multiply-adds lax's own convolution and rule."""
  x = jnp.zeros((2, 4, 4, 2))
  monkeypatch.setattr(layers, "MATMUL_FORMS_MIN_MACS", 4 * 4 * 2 * 2 + 1)
  assert _form(x, jnp.zeros((1, 1, 2, 2))) == "lax"
  monkeypatch.setattr(layers, "MATMUL_FORMS_MIN_MACS", 4 * 4 * 2 * 2)
  assert _form(x, jnp.zeros((1, 1, 2, 2))) == "matmul"
  monkeypatch.setattr(layers, "MATMUL_FORMS_MIN_MACS", 4 * 4 * 9 * 2 * 2 + 1)
  assert _form(x, jnp.zeros((3, 3, 2, 2)), padding=1) == "lax"
