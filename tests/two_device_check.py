"""Run as a script (needs XLA_FLAGS=--xla_force_host_platform_device_count=2 set before jax is
imported): one train step of a tiny CenterNet2 on a 2-device mesh vs a 1-device mesh with the same
global batch. Prints a JSON dict of max differences."""

import json
import sys

import jax
import numpy as np

sys.path.insert(0, ".")
from cn2_jax.engine import optim, step as step_lib  # noqa: E402
from cn2_jax.modeling import detector  # noqa: E402
from tests.test_detector import tiny_batch, tiny_config  # noqa: E402


def main():
  assert jax.device_count() == 2, jax.devices()
  jax.config.update("jax_disable_most_optimizations", True)  # compile time dominates
  cfg = tiny_config()
  cfg.optim.warmup_iters = 1
  model = detector.build_model(cfg.model)
  batch = tiny_batch(b=2)
  batch = {k: batch[k] for k in ("image", "image_hw", "gt_boxes", "gt_classes", "gt_valid")}
  init = detector.init_fn(model)
  prefixes = detector.frozen_param_prefixes(cfg.model)
  out = {}
  for n in (1, 2):
    mesh = step_lib.make_mesh(jax.devices()[:n])
    tx = optim.make_optimizer(cfg.optim, None, prefixes)
    state = step_lib.init_train_state(init, tx, jax.random.PRNGKey(0), mesh)
    train_step = step_lib.make_train_step(model, tx, mesh, frozen_prefixes=prefixes)
    state, metrics = train_step(state, step_lib.shard_batch(batch, mesh))
    out[n] = (jax.device_get(metrics), jax.device_get(state.params))
  (m1, p1), (m2, p2) = out[1], out[2]
  loss_diff = max(abs(float(m1[k]) - float(m2[k])) for k in m1 if k not in ("grad_norm",))
  param_diff = max(
      float(np.abs(a - b).max())
      for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2))
  )
  print(
      json.dumps(
          dict(
              loss_diff=loss_diff,
              param_diff=param_diff,
              grad_norm=[float(m1["grad_norm"]), float(m2["grad_norm"])],
              total_loss=float(m1["total_loss"]),
          )
      )
  )


if __name__ == "__main__":
  main()
