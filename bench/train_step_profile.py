"""Where the CenterNet2 training step spends its time on CPU: forward and forward + gradient of each
part, on the training oracle's batch (2 images, 800x1216 canvas, converted oracle weights, the
default config's 512 ROI rows per image and adaptive ROIAlign), float32.

  JAX_PLATFORMS=cpu PYTHONPATH=. .venv/bin/python bench/train_step_profile.py [--runs 3] [--parts ...]

Each part is jitted on its own with the inputs the full step gives it (the features, proposals
and GT of the oracle iteration 0) and timed as the minimum of `--runs` calls after a warm-up:

  backbone        ResNet-50 (FrozenBN, res2+ trained) + FPN P3-P7: image -> features;
                  gradient w.r.t. the parameters (cotangent: ones / feature count)
  cn_head         CenterNet head (4+4 GN towers, shared over 5 levels); gradient w.r.t. the
                  features and the parameters
  cn_targets      CenterNet targets (heatmaps, regression targets; no gradient)
  cn_losses       the three first-stage losses from the head maps; gradient w.r.t. the maps
  proposals       proposal decode + NMS (training settings; no gradient)
  roi_align       multi-level ROIAlign of one stage's 2 x 512 boxes (adaptive, cap 24);
                  gradient w.r.t. the features
  box_head        one stage's 2FC head + predictor on pooled features; gradient w.r.t. its input
                  and parameters
  roi_heads       the whole cascade in training (matching, sampling, 3 x pooling + heads, losses);
                  gradient w.r.t. the features and the parameters
  full_step       the training loss of the whole model and its gradient (what engine/step.py
                  differentiates)

The "bwd / fwd" column is (forward + gradient) / forward: about 2-3 for a convolution network;
far above that marks a gradient that costs more than its forward allows. Needs ~12 GB memory.

`--conv` instead times one 3x3 convolution (stride 1, SAME) at the sizes of the CenterNet head on
P3 and of ResNet stages: the forward, the input gradient and the weight gradient as XLA derives
them, and the weight gradient as `layers.conv2d` computes it on CPU (nine 2-D matrix products, sum
over b, h, w of x[b, h + i, w + j, :]^T g[b, h, w, :]), with their largest relative difference.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from cn2_jax.engine.step import total_loss
from cn2_jax.modeling import layers
from cn2_jax.modeling.detector import build_model
from cn2_jax.modeling.ops.roi_align import multilevel_roi_align
from cn2_jax.modeling.proposal.centernet import flatten_levels
from cn2_jax.modeling.proposal.losses import centernet_losses
from cn2_jax.modeling.proposal.targets import centernet_targets
from cn2_jax.testing import train_oracle
from cn2_jax.testing.oracle import oracle_dir

PARTS = (
    "backbone",
    "cn_head",
    "cn_targets",
    "cn_losses",
    "proposals",
    "roi_align",
    "box_head",
    "roi_heads",
    "full_step",
)


def best_of(fn, *args, runs: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(min(times))


def _sum_all(tree) -> jax.Array:
  """A scalar that depends on every output (mean of each leaf, so scales stay moderate)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return sum(jnp.mean(x.astype(jnp.float32)) for x in leaves)


def conv_weight_gradients(runs: int) -> None:
  rng = np.random.default_rng(0)
  dims = ("NHWC", "HWIO", "NHWC")
  print(
      "| x [B, H, W, C] -> K | forward | input grad | weight grad (XLA) | weight grad (layers.conv2d) |"
  )
  print("|---|---|---|---|---|")
  for b, h, w, c, k in ((2, 100, 152, 256, 256), (2, 200, 304, 128, 128), (2, 50, 76, 512, 512)):
    x = jnp.asarray(rng.standard_normal((b, h, w, c), np.float32))
    kernel = jnp.asarray(rng.standard_normal((3, 3, c, k), np.float32) * 0.01)
    g = jnp.asarray(rng.standard_normal((b, h, w, k), np.float32))

    def conv(x_, kernel_):
      return jax.lax.conv_general_dilated(x_, kernel_, (1, 1), "SAME", dimension_numbers=dims)

    fwd = jax.jit(conv)
    dx = jax.jit(lambda x_, k_, g_: jax.vjp(lambda v: conv(v, k_), x_)[1](g_)[0])
    dw = jax.jit(lambda x_, k_, g_: jax.vjp(lambda v: conv(x_, v), k_)[1](g_)[0])
    # what the models run (layers.conv2d's rule at these sizes)
    dw9 = jax.jit(lambda x_, k_, g_: jax.vjp(lambda v: layers.conv2d(x_, v, 1, 1), k_)[1](g_)[0])
    ref, alt = dw(x, kernel, g), dw9(x, kernel, g)
    err = float(jnp.abs(ref - alt).max() / jnp.abs(ref).max())
    print(
        f"| [{b}, {h}, {w}, {c}] -> {k} | {best_of(fwd, x, kernel, runs=runs):.3f} | "
        f"{best_of(dx, x, kernel, g, runs=runs):.3f} | {best_of(dw, x, kernel, g, runs=runs):.3f} | "
        f"{best_of(dw9, x, kernel, g, runs=runs):.3f} (rel. diff {err:.1e}) |",
        flush=True,
    )


def op_table(fn, inputs, top: int, name: str) -> None:
  """Profiles one call of `fn` and prints its `top` costliest thunks (time summed over threads)."""
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      jax.block_until_ready(fn(*inputs))
    (xplane,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    profile = jax.profiler.ProfileData.from_file(xplane)
  per_op = collections.Counter()
  for plane in profile.planes:
    if plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      if not line.name.startswith("tf_XLAEigen"):  # XLA's compute threads (not python/executor)
        continue
      for event in line.events:
        per_op[event.name] += event.duration_ns / 1e9
  shapes = {}  # op name -> "result shape <- operand shapes" from the optimised HLO
  for line in fn.lower(*inputs).compile().as_text().splitlines():
    found = re.match(r"\s*(?:ROOT )?%?([\w.-]+) = (\S+) (\w[\w-]*)\((.*?)\)", line)
    if found:
      operands = re.findall(r"(\w+\[[\d,]*\]\{[\d,]*\})", found.group(4))
      shapes[found.group(1)] = f"{found.group(2)} <- {' '.join(operands)}"
  total = sum(per_op.values())
  print(f"\n  {name}: costliest XLA ops of one gradient call (thread-seconds, {total:.2f} in all)")
  for op, seconds in per_op.most_common(top):
    print(f"  {seconds:8.3f}  {op}  {shapes.get(op, '')}")
  print(flush=True)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--parts", default=",".join(PARTS))
  ap.add_argument("--conv", action="store_true", help="the 3x3 convolution gradients only")
  ap.add_argument(
      "--ops",
      type=int,
      default=0,
      metavar="N",
      help="also profile one call of each part's gradient (jax.profiler) and print its N costliest "
      "XLA ops (thunks) by time summed over threads",
  )
  args = ap.parse_args()
  if args.conv:
    conv_weight_gradients(args.runs)
    return
  parts = args.parts.split(",")
  if oracle_dir() is None:
    raise SystemExit("error: the training oracle (shared/oracle) is needed for this benchmark")
  npz = train_oracle.load_npz(str(oracle_dir() / "train_outputs_dev.npz"))
  runner = train_oracle.TrainRunner(npz, cap=(24, 24), log=print)
  cfg = runner.cfg
  cfg.model.roi_heads.batch_size_per_image = 512  # the default config's (the oracle used 512 too)
  model = build_model(cfg.model)
  params, frozen, batch = runner.params0, runner.frozen, runner.batch
  variables = {"params": params, "frozen": frozen}
  rng = jax.random.PRNGKey(0)
  print(
      f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} cpus; batch "
      f"{tuple(batch['image'].shape)}, ROI rows/image {cfg.model.roi_heads.batch_size_per_image}, "
      f"sampling_ratio {cfg.model.roi_heads.sampling_ratio}, cap {runner.cap}"
  )

  def apply(method, params_, *a, **kw):
    return model.apply({"params": params_, "frozen": frozen}, *a, method=method, **kw)

  # The inputs each part gets in the full step.
  features, masks = jax.jit(
      lambda v, img, hw: model.apply(v, img, hw, method=lambda m, i, h: m.backbone_features(i, h))
  )(variables, batch["image"], batch["image_hw"])
  gt = dict(gt_boxes=batch["gt_boxes"], gt_valid=batch["gt_valid"])
  pg_losses, proposals = jax.jit(
      lambda v, f, ms: model.apply(
          v,
          f,
          ms,
          method=lambda m, f_, ms_: m.proposal_generator(
              f_, train=True, masks=ms_, image_hw=batch["image_hw"], **gt
          ),
      )
  )(variables, features, masks)
  head = jax.jit(
      lambda v, f, ms: model.apply(
          v, f, ms, method=lambda m, f_, ms_: m.proposal_generator.centernet_head(f_, ms_)
      )
  )(variables, features, masks)
  pg = model.bind(variables).proposal_generator
  rh = cfg.model.roi_heads
  level_shapes = tuple((f.shape[1], f.shape[2]) for f in features)

  def targets_fn(gt_boxes, gt_valid):
    return jax.vmap(
        lambda b, v: centernet_targets(
            b,
            v,
            level_shapes=level_shapes,
            strides=tuple(pg.strides),
            soi=tuple(tuple(s) for s in pg.soi),
            hm_min_overlap=pg.hm_min_overlap,
            min_radius=pg.min_radius,
            dedup_positives=pg.dedup_positives,
            all_level_peaks=pg.all_level_peaks,
        )
    )(gt_boxes, gt_valid)

  targets = jax.jit(targets_fn)(batch["gt_boxes"].astype(jnp.float32), batch["gt_valid"])

  def cn_losses(hm, reg):
    losses = centernet_losses(
        flatten_levels(hm),
        flatten_levels(reg),
        targets,
        alpha=pg.focal_alpha,
        beta=pg.focal_beta,
        gamma=pg.loss_gamma,
        sigmoid_clamp=pg.sigmoid_clamp,
        ignore_high_fp=pg.ignore_high_fp,
        pos_weight=pg.pos_weight,
        neg_weight=pg.neg_weight,
        reg_weight=pg.reg_weight,
        axis_name=None,
        location_mask=flatten_levels(masks),
    )
    return total_loss(losses)

  pool_levels = [int(n[1:]) for n in rh.in_features]
  pool_feats = features[pool_levels[0] - 3 : pool_levels[-1] - 2]
  boxes = proposals["boxes"][:, : rh.batch_size_per_image]

  def pool(feats):
    return multilevel_roi_align(
        feats,
        boxes,
        min_level=pool_levels[0],
        output_size=rh.pooler_resolution,
        sampling_ratio=rh.sampling_ratio,
        aligned=True,
        canonical_box_size=rh.canonical_box_size,
        canonical_level=rh.canonical_level,
        max_adaptive_samples=rh.max_adaptive_samples,
        valid_hw=None,
    )

  pooled = jax.jit(pool)(pool_feats)

  def roi_heads_loss(params_, feats):
    losses = apply(
        lambda m, f, p: m.roi_heads(
            f, p, batch["image_hw"], train=True, **gt, gt_classes=batch["gt_classes"]
        ),
        params_,
        feats,
        proposals,
        rngs={"sampling": rng},
    )
    return total_loss(losses)

  def box_head(params_, x):
    return apply(
        lambda m, x_: m.roi_heads.box_predictor[0](m.roi_heads.box_head[0](x_)), params_, x
    )

  def full_loss(params_):
    losses = model.apply(
        {"params": params_, "frozen": frozen}, batch, train=True, rngs={"sampling": rng}
    )
    return total_loss(losses)

  def backbone(params_):
    return apply(
        lambda m, i, h: m.backbone_features(i, h)[0], params_, batch["image"], batch["image_hw"]
    )

  def cn_head(params_, feats):
    return apply(lambda m, f: m.proposal_generator.centernet_head(f, masks), params_, feats)

  def with_grad(fn, argnums=0):
    return jax.jit(jax.grad(lambda *a: _sum_all(fn(*a)), argnums=argnums))

  cases = {
      "backbone": (jax.jit(backbone), with_grad(backbone), (params,)),
      "cn_head": (jax.jit(cn_head), with_grad(cn_head, (0, 1)), (params, features)),
      "cn_targets": (
          jax.jit(targets_fn),
          None,
          (batch["gt_boxes"].astype(jnp.float32), batch["gt_valid"]),
      ),
      "cn_losses": (
          jax.jit(cn_losses),
          with_grad(cn_losses, (0, 1)),
          (head["hm_logits"], head["reg"]),
      ),
      "proposals": (
          jax.jit(
              lambda v, f, ms: model.apply(
                  v,
                  f,
                  ms,
                  method=lambda m, f_, ms_: m.proposal_generator(
                      f_, train=False, masks=ms_, image_hw=batch["image_hw"]
                  ),
              )
          ),
          None,
          (variables, features, masks),
      ),
      "roi_align": (jax.jit(pool), with_grad(pool), (pool_feats,)),
      "box_head": (jax.jit(box_head), with_grad(box_head, (0, 1)), (params, pooled)),
      "roi_heads": (
          jax.jit(roi_heads_loss),
          with_grad(roi_heads_loss, (0, 1)),
          (params, features),
      ),
      "full_step": (jax.jit(full_loss), with_grad(full_loss), (params,)),
  }
  del pg_losses
  print("| part | forward (s) | forward + gradient (s) | bwd / fwd |")
  print("|---|---|---|---|")
  for name in parts:
    fwd_fn, grad_fn, inputs = cases[name]
    fwd = best_of(fwd_fn, *inputs, runs=args.runs)
    if grad_fn is None:
      print(f"| {name} | {fwd:.3f} | (no gradient) | |", flush=True)
      continue
    both = best_of(grad_fn, *inputs, runs=args.runs)
    print(f"| {name} | {fwd:.3f} | {both:.3f} | {both / fwd:.1f} |", flush=True)
    if args.ops:
      op_table(grad_fn, inputs, args.ops, name)


if __name__ == "__main__":
  main()
