"""Padding like the official code: aspect groups, train buckets, the grouped schedule, eval
canvases, the padding overhead target, and the canvas-masked GroupNorm."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cn2_jax.data import buckets as Bk
from cn2_jax.data import pipeline as P
from cn2_jax.data import schedule
from cn2_jax.data import transforms as T

COCO_SHORT = (640, 672, 704, 736, 768, 800)


def test_aspect_groups():
  h = np.array([480, 640, 427, 500, 1000, 360, 640])
  w = np.array([640, 480, 640, 500, 200, 640, 360])
  # 4:3 landscape, 4:3 portrait, 3:2 landscape, square (portrait side), 1:5 portrait, 16:9
  # landscape (wide bin), 9:16 portrait (wide bin)
  np.testing.assert_array_equal(Bk.aspect_group(h, w), [0, 3, 1, 3, 5, 2, 5])
  assert Bk.num_groups() == 6


def test_train_buckets_hold_every_image_of_their_group():
  table = Bk.train_buckets(COCO_SHORT, 1333)
  assert len(Bk.bucket_shapes(table)) == 6 * 6 + 1
  assert table[(800, 0)] == (800, 1088) and table[(800, 1)] == (800, 1216)
  assert table[(640, 3)] == (864, 640) and table[(800, -1)] == (1344, 1344)
  rng = np.random.default_rng(0)
  hs, ws = rng.integers(50, 3000, 3000), rng.integers(50, 3000, 3000)
  hs[:4], ws[:4] = [480, 427, 480, 640], [640, 640, 480, 480]  # exact 4:3 / 3:2 shapes
  groups = Bk.aspect_group(hs, ws)
  for s in COCO_SHORT:
    nh, nw = T.resize_shortest_edge_shape_np(hs, ws, s, 1333)
    for g in range(Bk.num_groups()):
      sel = groups == g
      bh, bw = table[(s, g)]
      assert (nh[sel] <= bh).all() and (nw[sel] <= bw).all(), (s, g)
      assert bh % 32 == 0 and bw % 32 == 0
      # and the bucket is tight: the official canvas of some image of the group reaches it
      # (checked on the common shapes, which sit at the bin bounds)
  assert table[(800, 0)] == Bk.official_pad_hw(*T.resize_shortest_edge_shape(480, 640, 800, 1333))
  assert table[(800, 1)] == Bk.official_pad_hw(*T.resize_shortest_edge_shape(427, 640, 800, 1333))


def _sched(n_land=23, n_port=9, gb=4, seed=0):
  groups = np.array([0] * n_land + [3] * n_port)
  order = np.arange(len(groups)) * 10  # source indices need not be 0..n-1
  return schedule._GroupedSchedule(order, groups, gb, seed), order, groups


def test_grouped_schedule_pure_function_of_step():
  s, order, groups = _sched()
  assert s.steps_per_epoch == 23 // 4 + 9 // 4 + (3 + 1) // 4  # 5 + 2 + 1
  group_of = dict(zip(order, groups))
  mixed = 0
  for e in range(3):
    seen = []
    for j in range(s.steps_per_epoch):
      idx = s.indices(e * s.steps_per_epoch + j)
      assert idx.shape == (4,)
      mixed += len({group_of[i] for i in idx}) > 1
      seen += idx.tolist()
    assert len(seen) == len(set(seen))  # no image twice in an epoch
    assert len(seen) >= len(order) - 3  # at most one batch's worth skipped
  assert mixed <= 3  # only the remainder batch can mix groups
  # a fresh object (a resumed run / another worker) gives the same batches at any step
  fresh, _, _ = _sched()
  for step in (0, 7, 8, 13, 22):
    np.testing.assert_array_equal(fresh.indices(step), s.indices(step))
  other, _, _ = _sched(seed=1)
  assert any((other.indices(k) != s.indices(k)).any() for k in range(8))


def _png(h, w, seed):
  arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG")
  return buf.getvalue()


@pytest.fixture(scope="module")
def split():
  sizes = [
      (30, 40),
      (40, 30),
      (30, 45),
      (30, 40),
      (45, 30),
      (36, 48),
      (48, 36),
      (30, 40),
      (40, 30),
      (30, 60),
      (32, 32),
      (30, 40),
  ]
  recs = []
  for i, (h, w) in enumerate(sizes):
    recs.append(
        {
            "image": _png(h, w, i),
            "image/id": i,
            "image/filename": f"{i}.png",
            "objects": {
                "bbox": np.array([[2, 2, w - 3, h - 3]], np.float32),
                "label": np.array([0]),
                "is_crowd": np.array([False]),
            },
        }
    )
  hw = np.array(sizes)
  return P.DetectionSplit(
      recs,
      height=hw[:, 0],
      width=hw[:, 1],
      num_instances=np.ones(len(sizes)),
      image_id=np.arange(len(sizes)),
  )


KW = dict(batch_size=2, short_sizes=(64, 96), max_size=128, max_boxes=2, seed=3)


def test_train_loader_buckets_and_processes_agree(split):
  table = Bk.train_buckets((64, 96), 128)
  it = P.make_train_loader(split, P.TrainLoaderSettings(**KW))
  procs = [
      P.make_train_loader(
          split, P.TrainLoaderSettings(**dict(KW, batch_size=1), process_index=p, process_count=2)
      )
      for p in range(2)
  ]
  for step in range(8):
    bt = next(it)
    canvas = bt["image"].shape[1:3]
    assert canvas in set(table.values())
    hw = bt["image_hw"]
    assert (hw[:, 0] <= canvas[0]).all() and (hw[:, 1] <= canvas[1]).all()
    assert len(set(hw.min(1))) == 1 or min(hw.max(1)) == 128  # one short side per batch
    parts = [next(p) for p in procs]
    assert parts[0]["image"].shape[1:] == parts[1]["image"].shape[1:] == bt["image"].shape[1:]
    np.testing.assert_array_equal(np.concatenate([q["image_id"] for q in parts]), bt["image_id"])
    np.testing.assert_array_equal(np.concatenate([q["image"] for q in parts]), bt["image"])
  resumed = next(P.make_train_loader(split, P.TrainLoaderSettings(**KW), 5))
  again = P.make_train_loader(split, P.TrainLoaderSettings(**KW))
  for _ in range(5):
    next(again)
  ref = next(again)
  for k in ("image", "image_hw", "gt_boxes", "image_id"):
    np.testing.assert_array_equal(resumed[k], ref[k])


def test_eval_loader_official_canvas_every_image_once(split):
  batches = list(P.make_eval_loader(split, batch_size=3, short_size=64, max_size=128, max_boxes=2))
  ids = np.concatenate([b["image_id"][b["batch_mask"]] for b in batches])
  assert sorted(ids.tolist()) == list(range(12))
  assert len(batches) == P.num_eval_batches(split, 3, short_size=64, max_size=128)
  for b in batches:
    for hw in b["image_hw"][b["batch_mask"]]:
      assert b["image"].shape[1:3] == Bk.official_pad_hw(*hw)
  # two processes: same canvas at every step, together every image once
  per = [
      list(
          P.make_eval_loader(
              split,
              batch_size=2,
              short_size=64,
              max_size=128,
              max_boxes=2,
              process_index=p,
              process_count=2,
          )
      )
      for p in range(2)
  ]
  assert len(per[0]) == len(per[1])
  for a, b in zip(*per):
    assert a["image"].shape == b["image"].shape
  ids = np.concatenate([b["image_id"][b["batch_mask"]] for p in per for b in p])
  assert sorted(ids.tolist()) == list(range(12))


def test_padding_overhead_coco_mix():
  # Before: every image on the 1344x1344 canvas (about 2.1x for 4:3 images).
  for gb in (2, 16):
    ratio, _ = P.train_padding_overhead(
        Bk.coco_size_mix(2000), global_batch=gb, short_sizes=COCO_SHORT, max_size=1333, steps=400
    )
    print(f"COCO mix, global batch {gb}: padded / image pixels = {ratio:.3f}")
    assert ratio <= 1.15, gb


def test_masked_group_norm_equals_group_norm_of_the_crop():
  import jax
  import jax.numpy as jnp
  from cn2_jax.modeling.layers import GroupNorm
  from cn2_jax.modeling.canvas import canvas_masks

  x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 16, 64)) * 3 + 1
  gn = GroupNorm(num_groups=8)
  v = gn.init(jax.random.PRNGKey(1), x)
  v = jax.tree_util.tree_map(lambda a: a + 0.3, v)
  image_hw = jnp.array([[70, 100], [50, 60]])  # canvas: max rounded up to 32 = 96 x 128
  (mask,) = canvas_masks(image_hw, [(12, 16)], [8])
  assert mask.shape == (2, 12, 16) and int(mask[0].sum()) == 12 * 16
  (mask,) = canvas_masks(image_hw, [(24, 32)], [4])  # a bucket larger than the canvas
  assert int(mask[1].sum()) == 24 * 32
  (mask,) = canvas_masks(image_hw, [(6, 8)], [32])
  assert (
      bool(mask[0, :3, :4].all()) and not bool(mask[0, 3:].any()) and not bool(mask[0, :, 4:].any())
  )
  # masked GN over a larger array == plain GN of the masked region
  big = jnp.zeros((2, 20, 24, 64)).at[:, :12, :16].set(x) + 5.0 * (
      jnp.arange(20)[None, :, None, None] >= 12
  )
  m = (jnp.arange(20)[:, None] < 12) & (jnp.arange(24)[None, :] < 16)
  got = gn.apply(v, big, m[None])[:, :12, :16]
  np.testing.assert_allclose(np.asarray(got), np.asarray(gn.apply(v, x)), atol=2e-5)
  np.testing.assert_allclose(
      np.asarray(gn.apply(v, x, jnp.ones((12, 16), bool)[None])),
      np.asarray(gn.apply(v, x)),
      atol=1e-6,
  )
