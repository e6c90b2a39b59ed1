"""The official canvas: what the official code pads a batch to, and masks that make any larger
canvas (a training bucket, a fixed `pad_hw`) compute exactly the official values on it.

detectron2's `ImageList.from_tensors` pads a batch (per GPU) to its largest image rounded up to
the backbone's size divisibility (32). Convs then see zeros beyond that canvas (their own zero
padding), GroupNorm and the CenterNet loss/candidates cover the whole canvas, and ROIAlign clamps
at its border. Here a batch may sit on a larger canvas; the model recovers the official
computation by
  * zeroing the input of every conv / pool that mixes neighbours off the canvas
    (`zero_outside_canvas`; 1x1 convs and pointwise ops need nothing),
  * restricting GroupNorm statistics, CenterNet candidates and the negative focal sum to it
    (`canvas_masks`), and
  * clamping ROIAlign samples at the canvas border (`roi_align.multilevel_roi_align(valid_hw=)`).
On the official canvas itself every mask is all-True and changes nothing.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from cn2_jax.modeling import export_mode

# The backbone's size divisibility (detectron2 `backbone.size_divisibility`): the official
# `ImageList.from_tensors` pads a batch to its largest image rounded up to this.
SIZE_DIVISIBILITY = 32


def _ceil_div(a: jax.Array, d: int) -> jax.Array:
  """`ceil(a / d)` of a non-negative integer array by a positive int, by `lax.div` (truncation =
  floor here): jnp's `//` emits `lax.rem`, which the ONNX export cannot convert
  (`export_mode.int_divmod`)."""
  a = jnp.asarray(a)
  return jax.lax.div(a + (d - 1), jnp.asarray(d, a.dtype))


def official_canvas(image_hw: jax.Array, size_divisibility: int = SIZE_DIVISIBILITY) -> jax.Array:
  """`[2]` int32: the canvas the official code pads this batch to (`ImageList.from_tensors`):
  the largest image of `image_hw` `[B, 2]`, rounded up to `size_divisibility`. Under
  `shard_map` the batch is the per-device batch, like the official per-GPU padding."""
  hw = jnp.max(image_hw, axis=0).astype(jnp.int32)
  return _ceil_div(hw, size_divisibility) * size_divisibility


def canvas_masks(
    image_hw: jax.Array, level_shapes, strides, size_divisibility: int = SIZE_DIVISIBILITY
) -> list:
  """Per level `[B, H_l, W_l]` bool: the locations on the official canvas (`official_canvas`),
  `ceil(canvas / stride)` rows/columns at each level (stride-2 convs round up).

  The model zeroes conv inputs off this canvas (`zero_outside_canvas`), restricts
  the CenterNet GroupNorm statistics, candidates and negative focal sum to it, and clamps ROIAlign
  at its border, so a canvas (bucket, fixed pad_hw) larger than the official one gives the
  official results.
  """
  canvas = official_canvas(image_hw, size_divisibility)
  return [
      jnp.broadcast_to(canvas_mask(hw, canvas, s), (image_hw.shape[0],) + tuple(hw))
      for hw, s in zip(level_shapes, strides)
  ]


def canvas_mask(hw, canvas_hw: Optional[jax.Array], stride: int) -> Optional[jax.Array]:
  """`[H, W]` bool: the locations of an `hw` map at `stride` that lie on the official canvas
  `canvas_hw` (`[2]` int pixels, a multiple of 32; see `official_canvas`), i.e. the
  first `ceil(canvas / stride)` rows and columns (stride-2 convs with padding 1 round up).
  None when `canvas_hw` is None (no masking)."""
  if canvas_hw is None:
    return None
  # i < ceil(c / s) <=> i * s < c: no integer division (jax2onnx turns one by 2 into an ONNX
  # Mean, which onnxruntime rejects for integers)
  rows = jnp.arange(hw[0]) * stride < canvas_hw[0]
  cols = jnp.arange(hw[1]) * stride < canvas_hw[1]
  return rows[:, None] & cols[None, :]


def zero_outside_canvas(x: jax.Array, canvas_hw: Optional[jax.Array], stride: int) -> jax.Array:
  """Zeroes `[N, H, W, C]` outside the official canvas, so that a conv with spatial extent sees
  there exactly the zero padding it would see on the official canvas. Applied to the input of
  every conv/pool that mixes neighbours, this makes a larger canvas (a bucket, a fixed pad_hw)
  give the official values everywhere on the official canvas."""
  m = canvas_mask(x.shape[1:3], canvas_hw, stride)
  return x if m is None else jnp.where(m[None, :, :, None], x, jnp.zeros((), x.dtype))


def level_extents(
    image_hw: jax.Array, strides, size_divisibility: int = SIZE_DIVISIBILITY
) -> jax.Array:
  """`[L, 2]` int32: rows/columns of the official canvas at each level (ROIAlign's border)."""
  canvas = official_canvas(image_hw, size_divisibility)
  return jnp.stack([_ceil_div(canvas, s) for s in strides]).astype(jnp.int32)


def normalized_images(
    image: jax.Array, image_hw: jax.Array, input_format: str, pixel_mean, pixel_std
) -> jax.Array:
  """detectron2's preprocessing: `[B, H, W, 3]` uint8 RGB -> float32 `(x - pixel_mean) /
  pixel_std` in `input_format` ("BGR" flips the channels; mean / std in that order), zero outside
  each image's `image_hw` (`ImageList.from_tensors` pads after normalising). Inside
  `export_mode.normalized_input()` the image is that normalised tensor already: only the zeroing."""
  if export_mode.normalized_input_enabled():
    return zero_outside(image.astype(jnp.float32), image_hw)
  x = image.astype(jnp.float32)
  if input_format == "BGR":
    x = x[..., ::-1]
  x = (x - jnp.asarray(pixel_mean, jnp.float32)) / jnp.asarray(pixel_std, jnp.float32)
  return zero_outside(x, image_hw)


def zero_outside(x: jax.Array, image_hw: jax.Array) -> jax.Array:
  """`x [B, H, W, C]` with 0 outside each image's valid `image_hw [B, 2]` (top-left) region."""
  h, w = x.shape[1], x.shape[2]
  inside = (jnp.arange(h)[None, :, None] < image_hw[:, 0, None, None]) & (
      jnp.arange(w)[None, None, :] < image_hw[:, 1, None, None]
  )
  return jnp.where(inside[..., None], x, jnp.zeros((), x.dtype))
