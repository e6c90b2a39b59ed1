"""How the model's ops are traced: for XLA (training, evaluation, the Predictor, the StableHLO
export) or for an ONNX conversion (`python -m cn2_jax.export --format onnx`, jax2onnx 0.12.5).

A few ops convert wrong, or not at all, with jax2onnx 0.12.5. For each there is an equivalent form
that converts right, with the same values (tests/test_export.py checks every pair in JAX). The
form is chosen by a context the ops read when they are traced, never by patching modules:

  with export_mode.onnx_ops():   # export.onnx_friendly_ops is the same context manager
    proto = jax2onnx.to_onnx(fn, ...)

Inside it, code traced afresh takes the ONNX-friendly forms; outside it (the default) every op is
the one training and evaluation use. The mode is a `contextvars.ContextVar`: local to the thread
(and asyncio task) that enters it, and not part of jax's trace caches, so a function jitted
outside the context and called again inside it keeps its cached XLA form (trace a new function).

The modules call the dispatching ops of this file, or define their op with `@onnx_form(form)`:
  top_k          `lax.top_k` -> `top_k_for_onnx` (`lax.approx_max_k`): jax2onnx leaves TopK's
                 int64 indices typed int32, which onnxruntime refuses;
  int_divmod     `a // b, a % b` -> `divmod_for_onnx` (`lax.div`): `lax.rem` fails on a
                 symbolic batch;
  max_pool       a 4-D `reduce_window` max -> `max_pool_for_onnx` (-inf padding + a 2-D flax
                 max_pool): the former becomes a MaxPool with 4 spatial dims, which onnxruntime
                 rejects ("Unsupported pooling size");
  onnx_form      a decorator for ops defined elsewhere, with their forms here:
                 `max_pool_3x3_s2_p1_for_onnx` (ResNet's stem max-pool, a custom_vjp op),
                 `conv_transpose2d_for_onnx` (the one-stage neck's transposed convolution),
                 `depthwise_conv_transpose_for_onnx` (DLA's IDA upsampling),
                 `ops.dcn.deform_conv2d_for_onnx` (the deformable convolution); CenterNet2's,
                 beside their ops: `ops.nms.nms_for_onnx` (batched, two stable single-key
                 sorts, no vmap / scatter), `ops.boxes.no_fma_for_onnx` (no bitcast),
                 `ops.roi_align.assign_boxes_to_levels_for_onnx` (no frexp),
                 `ops.roi_align._pool_windows_for_onnx` (adaptive ROIAlign's windows of all
                 boxes at once: no loop over a symbolic box count; read in `_pool_adaptive`),
                 `proposal.decode.generate_proposals_for_onnx` and
                 `roi_heads.cascade.fast_rcnn_inference_batch_for_onnx` (no vmap).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_ONNX_OPS = contextvars.ContextVar("cn2_jax_onnx_ops", default=False)
_NORMALIZED_INPUT = contextvars.ContextVar("cn2_jax_normalized_input", default=False)


@contextlib.contextmanager
def _flag(var: contextvars.ContextVar, enabled: bool) -> Iterator[None]:
  """`var` set to `enabled` while active; the previous value restored on exit."""
  token = var.set(bool(enabled))
  try:
    yield
  finally:
    var.reset(token)


def onnx_ops(enabled: bool = True) -> contextlib.AbstractContextManager:
  """While active, the ops of this file (and those defined with `onnx_form`) trace as their
  ONNX-friendly forms (`enabled=False`: as the XLA ones, e.g. inside an outer `onnx_ops()`). The
  previous mode is restored on exit."""
  return _flag(_ONNX_OPS, enabled)


def onnx_ops_enabled() -> bool:
  """Whether the ops are traced for an ONNX conversion (inside `onnx_ops()`)."""
  return _ONNX_OPS.get()


def normalized_input(enabled: bool = True) -> contextlib.AbstractContextManager:
  """While active, the families' `preprocess` traced afresh takes the image as already normalised
  (float `[B, H, W, 3]` in the model's `input_format` channel order, `(x - pixel_mean) /
  pixel_std` in the model's units: what `preprocess` of a uint8 image returns) and only zeroes it
  outside `image_hw` (`python -m cn2_jax.export --input normalized`). A trace-time context like
  `onnx_ops`: a function jitted outside it keeps its cached form."""
  return _flag(_NORMALIZED_INPUT, enabled)


def normalized_input_enabled() -> bool:
  """Whether the image input is traced as already normalised (inside `normalized_input()`)."""
  return _NORMALIZED_INPUT.get()


def onnx_form(form: Callable) -> Callable:
  """Decorator: the decorated op computes `form(*args, **kwargs)` instead while `onnx_ops()` is
  on (the same arguments and values; a form jax2onnx converts right). Outside it the op itself
  runs (jitted or custom-vjp ops keep their own transformations). The op stays reachable as
  `__wrapped__`, the form as `onnx_form`."""

  def deco(op: Callable) -> Callable:
    @functools.wraps(op, updated=())
    def dispatch(*args, **kwargs):
      return (form if _ONNX_OPS.get() else op)(*args, **kwargs)

    dispatch.onnx_form = form
    return dispatch

  return deco


# --------------------------------------------------------------------------- dispatching ops
def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k` along the last axis (`top_k_for_onnx` inside `onnx_ops()`)."""
  if _ONNX_OPS.get():
    return top_k_for_onnx(x, k)
  return jax.lax.top_k(x, k)


def top_k_for_onnx(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k(x, k)` as `lax.approx_max_k(x, k, recall_target=1)`, for conversion only.
  jax2onnx 0.12.5 lowers both to an ONNX TopK (exact; equal values in index order, as
  `lax.top_k`), but its top_k rule leaves TopK's int64 indices typed as JAX's int32, so the first
  use of an index fails in onnxruntime ("Type parameter (T) of Optype (Add) bound to different
  types (tensor(int64) and tensor(int32))"), while its approx_top_k rule adds the Cast to int32.
  In JAX on CPU / GPU it is an exact sort-based top-k: the same values and indices, except that
  the order of equal values is not specified (TPUs approximate)."""
  return jax.lax.approx_max_k(x, k, recall_target=1.0)


def int_divmod(a: jax.Array, b: int) -> tuple[jax.Array, jax.Array]:
  """`(a // b, a % b)` of a non-negative integer array by a positive int (`divmod_for_onnx`
  inside `onnx_ops()`: the same values)."""
  if _ONNX_OPS.get():
    return divmod_for_onnx(a, b)
  return a // b, a % b


def divmod_for_onnx(a: jax.Array, b: int) -> tuple[jax.Array, jax.Array]:
  """`(a // b, a % b)` of non-negative int32 `a` by `lax.div` (truncation = floor here): jnp's
  `//` and `%` both emit `lax.rem`, whose jax2onnx rule fails on a symbolic batch ("Symbolic
  dimension 'b' used in a context that requires a constant")."""
  q = jax.lax.div(a, np.int32(b))
  return q, a - q * np.int32(b)


def max_pool(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
  """torch `F.max_pool2d(x, window, stride, padding)` on NHWC: -inf padding, floor output size;
  a 4-D `lax.reduce_window` (`max_pool_for_onnx` inside `onnx_ops()`: the same values)."""
  if _ONNX_OPS.get():
    return max_pool_for_onnx(x, window, stride, padding)
  # A concrete (numpy) -inf init lets JAX lower this to reduce_window_max.
  return jax.lax.reduce_window(
      x,
      np.array(-np.inf, x.dtype),
      jax.lax.max,
      (1, window, window, 1),
      (1, stride, stride, 1),
      ((0, 0), (padding, padding), (padding, padding), (0, 0)),
  )


def max_pool_for_onnx(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
  """`max_pool` as -inf padding + a flax max_pool (VALID): the same values, a 2-D MaxPool in
  ONNX (a 4-D `reduce_window` becomes a MaxPool with 4 spatial dims, which onnxruntime rejects:
  "Unsupported pooling size")."""
  edge = (padding, padding)
  pad = jnp.pad(x, ((0, 0), edge, edge, (0, 0)), constant_values=-jnp.inf)
  return nn.max_pool(pad, window_shape=(window, window), strides=(stride, stride), padding="VALID")


# ---------------------------------------------------------------- forms of ops defined elsewhere
def max_pool_3x3_s2_p1_for_onnx(x: jax.Array) -> jax.Array:
  """`backbone.resnet.max_pool_3x3_s2_p1` (a custom-vjp op): `max_pool_for_onnx(x, 3, 2, 1)`."""
  return max_pool_for_onnx(x, 3, 2, 1)


def transpose_for_onnx(x: jax.Array, perm: Sequence[int]) -> jax.Array:
  """`x.transpose(perm)` (perm[0] = 0, the batch), as a reshape when it only moves axes of size 1
  (one offset group): no Transpose node (a copy) in ONNX."""
  moved = [a for a in perm if x.shape[a] != 1 and a != 0]
  if moved == sorted(moved):
    return x.reshape((-1,) + tuple(x.shape[a] for a in perm[1:]))
  return x.transpose(perm)


def conv_transpose2d_for_onnx(
    x,
    kernel,
    *,
    stride: int = 2,
    padding: int = 1,
    output_padding: int = 0,
    precision=None,
    feature_group_count: int = 1,
):
  """`onestage.neck.conv_transpose2d` (with `feature_group_count`, a grouped one such as
  `backbone.dla_up.depthwise_conv_transpose`) as one stride-1 convolution of the input with the
  kernel's stride x stride phases stacked as output channels, then depth-to-space: the same
  values.
  jax2onnx 0.12.5 converts the `lhs_dilation` convolution of the original into a ConvTranspose
  with the window strides (1) instead of the dilation as its strides (the output came out smaller
  than the input); zero-inserting the input explicitly converts right but costs stride**2 times
  the multiply-adds, this form none extra.

  Output pixel Y (one axis) = stride * q + r - padding gets sum_j x[q - j] kernel[r + j stride]
  (j < n = ceil(k / stride); taps past the kernel are zeros): for each phase r a correlation of
  the input, padded by n - 1 - q0 in front, with the phase's taps reversed. Grouped: `kernel
  [kh, kw, Cin / groups, Cout]`, each output channel's phases next to each other, so that every
  group's outputs stay contiguous."""
  kh, kw, cin, cout = kernel.shape
  s, p = stride, padding
  n = -(-max(kh, kw) // s)  # taps per phase and axis
  h, w = x.shape[1], x.shape[2]
  out_h = (h - 1) * s - 2 * p + kh + output_padding
  out_w = (w - 1) * s - 2 * p + kw + output_padding
  q0 = p // s  # first phase index needed (t = Y + p = s q + r)
  qh, qw = (p + out_h - 1) // s - q0 + 1, (p + out_w - 1) // s - q0 + 1
  # kernel[r + j s] for j < n, r < s (zeros past the kernel), reversed in j: [n, n, Cin, Cout*s*s]
  k = jnp.pad(kernel, ((0, n * s - kh), (0, n * s - kw), (0, 0), (0, 0)))
  k = k.reshape(n, s, n, s, cin, cout)[::-1, :, ::-1]
  k = k.transpose(0, 2, 4, 5, 1, 3).reshape(n, n, cin, cout * s * s)
  lo = n - 1 - q0  # >= 0: padding <= k - 1
  hi_h, hi_w = qh + n - 1 - lo - h, qw + n - 1 - lo - w
  x = jnp.pad(x, ((0, 0), (lo, max(hi_h, 0)), (lo, max(hi_w, 0)), (0, 0)))
  x = x[:, : lo + h + hi_h, : lo + w + hi_w]
  y = jax.lax.conv_general_dilated(
      x,
      k.astype(x.dtype),
      window_strides=(1, 1),
      padding="VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=precision,
      feature_group_count=feature_group_count,
  )  # [N, qh, qw, (Cout, r_y, r_x)]
  y = (
      y.reshape(-1, qh, qw, cout, s, s)
      .transpose(0, 1, 4, 2, 5, 3)
      .reshape(-1, qh * s, qw * s, cout)
  )
  return y[:, p - s * q0 : p - s * q0 + out_h, p - s * q0 : p - s * q0 + out_w]


def depthwise_conv_transpose_for_onnx(x: jax.Array, kernel: jax.Array, factor: int) -> jax.Array:
  """`backbone.dla_up.depthwise_conv_transpose` (DLA's IDA upsampling, torch `ConvTranspose2d(C, C,
  2f, stride f, padding f // 2, groups=C)`) as `conv_transpose2d_for_onnx` with C groups: the same
  values; its `lhs_dilation` convolution converts to a ConvTranspose with strides 1 (jax2onnx
  0.12.5), which onnxruntime rejects ("[ShapeInferenceError] Incompatible dimensions")."""
  return conv_transpose2d_for_onnx(
      x, kernel, stride=factor, padding=factor // 2, feature_group_count=x.shape[-1]
  )
