"""How well-conditioned are the centerX oracle's gradient checksums? (issue 16)

Runs the oracle's training step in float64 (exact arithmetic for this purpose) on the official
weights, then again with every parameter multiplied by (1 + eps * N(0, 1)), and prints, per BN
mode, the largest and the 90th-percentile relative change of the gradient abs-sum checksums over
the 99 parameter tensors. A change far above eps means the checksum is ill-conditioned: float32
rounding (relative 6e-8 per operation, accumulated over the network) then moves it by that much
in any implementation, which bounds the tolerance a float32 port can be held to.

  JAX_PLATFORMS=cpu PYTHONPATH=. python bench/centerx_grad_sensitivity.py [--eps 1e-9 1e-7]
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np

from cn2_jax.testing import centerx_oracle as co

ORACLE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "oracle_centerx")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--train", default=os.path.join(ORACLE, "centerx_train_dev.npz"))
  ap.add_argument("--weights", default=os.path.join(ORACLE, "centerx_r18_weights_spec.json"))
  ap.add_argument("--eps", type=float, nargs="+", default=[1e-9, 1e-7])
  args = ap.parse_args()
  sd = co.load_state_dict(args.weights)
  batch = co._train_batch(np.load(args.train), 128)
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    sd64 = {k: (v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in sd.items()}
    model, variables, _ = co.build(sd64, dtype="float64")
    variables = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables)
    for bn_train in (True, False):
      g0 = co.train_step(model, variables, batch, bn_train)[2]
      for eps in args.eps:
        params = jax.tree_util.tree_map(
            lambda a: a * (1.0 + eps * rng.standard_normal(a.shape)), variables["params"]
        )
        g = co.train_step(model, {**variables, "params": params}, batch, bn_train)[2]
        # zero gradient before a training-mode BN: the dcnv2 biases are rounding noise
        rel = {
            k: abs(np.abs(g[k]).sum() - np.abs(g0[k]).sum()) / max(np.abs(g0[k]).sum(), 1e-30)
            for k in g0
            if ".dcnv2.bias" not in k
        }
        worst = max(rel, key=rel.get)
        values = np.array(list(rel.values()))
        print(
            f"{'bntrain' if bn_train else 'bneval'} eps {eps:.0e}: checksum change max "
            f"{rel[worst]:.2e} ({worst}), p90 {np.percentile(values, 90):.2e}, amplification "
            f"{rel[worst] / eps:.1e}"
        )


if __name__ == "__main__":
  main()
