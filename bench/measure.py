"""What the JAX and the torch workers measure with: result file, timing loops, stats, errors."""

from __future__ import annotations

import json
import os
import time

# Start of the worker process as near as an import gets (the CLI imports the bench package before
# anything heavy): `process_to_compiled_s` is counted from here.
PROCESS_T0 = time.perf_counter()
OOM_EXIT = 3  # a worker's exit code when it ended on out-of-memory (the runner halves the batch)
GIB = 2.0**30


def write_json(path: str, data: dict):
  """Writes `data` via a temp file + rename, so a killed process never leaves half a file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1, default=str)
  os.replace(tmp, path)


class Result:
  """The worker's result file, rewritten after every measurement."""

  def __init__(self, path: str, spec: dict):
    self.path = path
    self.data = {"spec": spec, "rows": [], "env": {}, "error": None}

  def save(self):
    write_json(self.path, self.data)


def stats_ms(times_s) -> dict:
  import numpy as np

  t = np.asarray(times_s, np.float64) * 1e3
  return dict(
      median_ms=float(np.median(t)),
      min_ms=float(t.min()),
      max_ms=float(t.max()),
      mean_ms=float(t.mean()),
      n=int(t.size),
  )


def is_oom(text: str) -> bool:
  t = text.lower()
  return (
      "resource_exhausted" in t
      or "out of memory" in t
      or "outofmemory" in t
      or "resource exhausted" in t
  )


def record_error(record: dict, exc: BaseException, keep: int = 2000) -> bool:
  """Sets record['error'] ('oom', or the message's last `keep` chars); returns whether OOM."""
  text = f"{type(exc).__name__}: {exc}"
  oom = is_oom(text)
  record["error"] = "oom" if oom else text[-keep:]
  return oom


def warm_up(fn, n: int, sync):
  """`n` calls `fn(i)`, each synchronised; returns (seconds of the first call or None, last out)."""
  first, out = None, None
  for i in range(n):
    t0 = time.perf_counter()
    out = fn(i)
    sync(out)
    if i == 0:
      first = time.perf_counter() - t0
  return first, out


def time_calls(fn, iters: int, sync):
  """`iters` calls `fn(i)` synchronised one by one (latency), then `iters` enqueued with one sync
  at the end (what a loop sees). Returns (per-call seconds, pipelined seconds per call, last
  output)."""
  times = []
  out = None
  for i in range(iters):
    t0 = time.perf_counter()
    out = fn(i)
    sync(out)
    times.append(time.perf_counter() - t0)
  t0 = time.perf_counter()
  for i in range(iters):
    out = fn(i)
  sync(out)
  return times, (time.perf_counter() - t0) / iters, out


def throughput(row: dict, batch: int, pipelined_s: float) -> dict:
  """Images/s from the median (already in `row`) and from the pipelined pass."""
  return dict(
      img_per_s=batch / (row["median_ms"] / 1e3),
      pipelined_ms=pipelined_s * 1e3,
      img_per_s_pipelined=batch / pipelined_s,
  )
