"""Timing and machine helpers shared by both sides of bench/vs_official.py (standard library only:
the official side runs in its own venv without JAX, this project's side without torch)."""

from __future__ import annotations

import os
import platform
import statistics
import time


def stats(seconds: list) -> dict:
  """Median / min / max and every value (rounded to 0.1 ms) of a list of durations in seconds."""
  return dict(
      median_s=statistics.median(seconds),
      min_s=min(seconds),
      max_s=max(seconds),
      runs_s=[round(s, 4) for s in seconds],
  )


def timed(fn, warmup: int, runs: int) -> tuple:
  """(wall-clock stats, process-CPU stats, last result) of `fn()` over `runs` calls after
  `warmup` untimed calls. Process CPU time counts every thread of the process."""
  for _ in range(warmup):
    fn()
  wall, cpu, out = [], [], None
  for _ in range(runs):
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return stats(wall), stats(cpu), out


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def machine_now() -> dict:
  """CPU model, logical / schedulable CPUs and the load averages (1, 5, 15 min) right now."""
  return dict(
      cpu=cpu_model(),
      logical_cpus=os.cpu_count(),
      schedulable_cpus=len(os.sched_getaffinity(0)),
      loadavg=list(os.getloadavg()),
  )
