"""Runs a test's multi-device part in a subprocess with 2 fake CPU devices (XLA_FLAGS must be set
before jax is imported, so it cannot run in the pytest process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_on_two_devices(module: str, function: str) -> dict:
  """Calls `module.function()` in a 2-device subprocess; it must print one `RESULT<json>` line."""
  env = dict(
      os.environ,
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
      JAX_PLATFORMS="cpu",
      JAX_DISABLE_MOST_OPTIMIZATIONS="1",
      PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  code = f"from {module} import {function}; {function}()"
  p = subprocess.run(
      [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert p.returncode == 0, p.stderr[-4000:]
  line = [l for l in p.stdout.splitlines() if l.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT") :])
