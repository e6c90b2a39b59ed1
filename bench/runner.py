"""Runs every case in its own subprocess: cold compiles, per-case peak memory, and a crash or OOM
that ends only its case. Also the time budget, the OOM retry at half the batch, and the second
fresh process per JAX case that compiles again from the persistent compilation cache."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

from bench import jax_side, torch_side
from bench.measure import OOM_EXIT, Result, record_error, write_json
from bench.report import SCHEMA

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(REPO, "bench", "bench.py")  # workers are `bench.py --worker SPEC --result PATH`
CASES = {
    "jax_train": jax_side.run_train,
    "jax_infer": jax_side.run_infer,
    "torch": torch_side.run_torch,
}


# ================================================================================================
# Worker side
# ================================================================================================
def worker_main(spec_json: str, result_path: str) -> int:
  """One case in this process; its result file is rewritten after every measurement."""
  spec = json.loads(spec_json)
  res = Result(result_path, spec)
  res.save()
  try:
    CASES[spec["kind"]](spec, res)
  except Exception as e:  # noqa: BLE001
    oom = record_error(res.data, e, keep=3000)
    res.data["traceback"] = traceback.format_exc()[-6000:]
    if (
        res.data["rows"]
        and "error" not in res.data["rows"][-1]
        and "median_ms" not in res.data["rows"][-1]
    ):
      res.data["rows"][-1]["error"] = res.data["error"]
    res.save()
    traceback.print_exc()
    return OOM_EXIT if oom else 1
  res.save()
  return 0


# ================================================================================================
# Orchestrator
# ================================================================================================
def placeholder_rows(spec: dict, note: str) -> list:
  """Table rows for a case that did not run, so the table shows what is missing."""
  kind = spec["kind"]
  if kind == "jax_train":
    return [
        dict(
            framework="jax",
            task="train",
            precision=spec["dtype"],
            size=spec["size"]["name"],
            batch=spec["batch"],
            error=note,
        )
    ]
  if kind == "jax_infer":
    return [
        dict(
            framework="jax",
            task="infer",
            precision=spec["dtype"],
            size=spec["size"]["name"],
            batch=b,
            error=note,
        )
        for b in spec["infer_batches"]
    ]
  return [
      dict(
          framework="torch",
          task="train+infer",
          precision="amp/fp32/fp16",
          size=",".join(s["name"] for s in spec["train_sizes"]),
          batch=spec["batch"],
          error=note,
      )
  ]


class Runner:
  """The cases of one `bench.py` run, in priority order, with their results in `args.out`."""

  def __init__(self, args):
    self.args = args
    self.t0 = time.monotonic()
    self.out = {"schema": SCHEMA, "meta": self._meta(), "rows": [], "workers": []}

  def remaining(self) -> float:
    if not self.args.budget_s:
      return float("inf")
    return self.args.budget_s - (time.monotonic() - self.t0)

  def _meta(self) -> dict:
    a = self.args
    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        argv=sys.argv,
        host=platform.node(),
        python=platform.python_version(),
        small=a.small,
        git=_git_describe(),
        nvidia_smi=_nvidia_smi(),
        jax_platforms=os.environ.get("JAX_PLATFORMS", ""),
        settings=dict(
            steps=a.steps,
            warmup=a.warmup,
            infer_iters=a.infer_iters,
            batch=a.batch,
            gt_per_image=a.gt_per_image,
            max_boxes=a.max_boxes,
            seed=a.seed,
            budget_s=a.budget_s,
        ),
    )
    return meta

  def save(self):
    write_json(self.args.out, self.out)

  def run_worker(self, spec: dict, label: str) -> dict:
    """Runs one case in a fresh process; returns its result dict (with 'rc')."""
    remaining = self.remaining()
    if remaining < self.args.min_case_s:
      print(f"[bench] SKIP {label}: {remaining:.0f} s of the budget left", flush=True)
      self.out["workers"].append({"spec": spec, "skipped": "time budget exhausted"})
      rows = [] if spec.get("run") == "cached" else placeholder_rows(spec, "not run (time budget)")
      return {"spec": spec, "rows": rows, "skipped": "time budget exhausted", "rc": None}
    fd, path = tempfile.mkstemp(prefix="cn2_bench_", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, CLI, "--worker", json.dumps(spec), "--result", path]
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    print(f"[bench] RUN  {label} (budget left {remaining:.0f} s)", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True)
    timeout = None if remaining == float("inf") else max(1.0, remaining)
    try:
      rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)  # our own child's process group
      proc.wait()
      rc = "timeout"
    wall = time.monotonic() - t0
    try:
      with open(path) as f:
        result = json.load(f)
    except Exception:  # noqa: BLE001
      result = {"spec": spec, "rows": [], "error": f"worker left no result (rc={rc})"}
    finally:
      for p in (path, path + ".tmp"):
        if os.path.exists(p):
          os.remove(p)
    result["rc"] = rc
    result["wall_s"] = wall
    if rc == "timeout":
      result["error"] = result.get("error") or "killed at the time budget"
      for row in result["rows"]:
        if "median_ms" not in row and "compile_s" not in row:
          row.setdefault("error", "killed at the time budget")
    print(
        f"[bench] DONE {label}: rc={rc}, {wall:.1f} s"
        + (f", error: {str(result.get('error'))[:300]}" if result.get("error") else ""),
        flush=True,
    )
    self.out["workers"].append(
        {k: result.get(k) for k in ("spec", "env", "error", "skipped", "rc", "wall_s")}
    )
    return result

  def base_spec(self, kind: str, **kw) -> dict:
    a = self.args
    spec = dict(
        kind=kind,
        small=a.small,
        seed=a.seed,
        steps=a.steps,
        warmup=a.warmup,
        infer_iters=a.infer_iters,
        gt_per_image=a.gt_per_image,
        max_boxes=a.max_boxes,
        compile_only=False,
        cache_dir=None,
        profile_dir=a.profile,
        run="cold",
    )
    spec.update(kw)
    return spec

  def add_rows(self, rows):
    self.out["rows"].extend(rows)
    self.save()

  def cached_rerun(self, spec: dict, rows: list):
    """The same case's compile in a second fresh process sharing the persistent cache dir."""
    s2 = dict(spec, compile_only=True, run="cached", profile_dir=None)
    if spec["kind"] == "jax_infer":
      s2["infer_batches"] = [row["batch"] for row in rows if "compile_s" in row]
    label = (
        f"jax {'train' if spec['kind'] == 'jax_train' else 'infer'} {spec['dtype']} "
        f"{spec['size']['name']}: compile again with the persistent cache"
    )
    r = self.run_worker(s2, label)
    by_batch = {row["batch"]: row for row in r["rows"]}
    for row in rows:
      c = by_batch.get(row["batch"])
      if c is not None:
        row["cached"] = {
            k: c.get(k)
            for k in (
                "lower_s",
                "compile_s",
                "init_s",
                "process_to_compiled_s",
                "cache_events",
                "error",
            )
        }
    self.save()

  def jax_train(self, dtype: str, size: dict, cache_root: str):
    """One training case; again at half the batch per device after an OOM."""
    a = self.args
    bsz = a.batch
    while True:
      # A cache dir per case keeps cold runs cold: a shared one would hand a later case the
      # entries (e.g. the init jit) of an earlier one.
      cdir = os.path.join(cache_root, f"train_{dtype}_{size['name']}_b{bsz}")
      spec = self.base_spec("jax_train", dtype=dtype, size=size, batch=bsz, cache_dir=cdir)
      r = self.run_worker(spec, f"jax train {dtype} {size['name']} batch/device {bsz}")
      rows = r["rows"]
      for row in rows:
        row["requested_batch"] = a.batch
      self.add_rows(rows)
      oom = r.get("error") == "oom" or r.get("rc") == OOM_EXIT
      if oom and bsz > 1 and not a.no_oom_retry:
        bsz //= 2
        continue
      if a.cache_runs and rows and "compile_s" in rows[-1] and not r.get("error"):
        self.cached_rerun(spec, rows)
      return

  def jax_infer(self, dtype: str, cache_root: str):
    """All inference batch sizes in one worker (they share the initialised variables)."""
    a = self.args
    cdir = os.path.join(cache_root, f"infer_{dtype}_{a.infer_size['name']}")
    spec = self.base_spec(
        "jax_infer", dtype=dtype, size=a.infer_size, infer_batches=a.infer_batches, cache_dir=cdir
    )
    r = self.run_worker(
        spec, f"jax infer {dtype} {a.infer_size['name']} " f"batches {a.infer_batches}"
    )
    done = {row["batch"] for row in r["rows"]}
    missing = [b for b in a.infer_batches if b not in done]
    if missing and not r.get("skipped"):
      why = (
          "not run (" + ("time budget" if r.get("rc") == "timeout" else "worker ended early") + ")"
      )
      r["rows"] += placeholder_rows(dict(spec, infer_batches=missing), why)
    self.add_rows(r["rows"])
    if a.cache_runs and any("compile_s" in row for row in r["rows"]):
      self.cached_rerun(spec, r["rows"])

  def run(self):
    """Per dtype: train at the first size, inference, train at the other sizes; each cold case is
    followed by its persistent-cache re-run; then torchvision. (Order = priority under a budget.)"""
    a = self.args
    cache_root = a.cache_dir or tempfile.mkdtemp(prefix="cn2_bench_cache_")
    os.makedirs(cache_root, exist_ok=True)
    self.out["meta"]["cache_root"] = cache_root
    if not a.skip_jax:
      for dtype in a.dtypes:
        if a.sizes:
          self.jax_train(dtype, a.sizes[0], cache_root)
        if a.infer_batches:
          self.jax_infer(dtype, cache_root)
        for size in a.sizes[1:]:
          self.jax_train(dtype, size, cache_root)
    if not a.skip_torch:
      spec = self.base_spec(
          "torch",
          batch=a.batch,
          train_sizes=a.sizes,
          infer_size=a.infer_size,
          infer_batches=a.infer_batches,
          torch_variants=a.torch_variants,
          torch_cpu=a.torch_cpu,
          profile_dir=None,
      )
      r = self.run_worker(spec, "torchvision Faster R-CNN (train AMP, infer fp32/fp16)")
      if r.get("skipped"):
        self.out["meta"]["torch_skipped"] = r["skipped"]
      self.add_rows(r["rows"])
    if not a.cache_dir and not a.keep_cache:
      shutil.rmtree(cache_root, ignore_errors=True)
    self.out["meta"]["total_s"] = time.monotonic() - self.t0
    self.save()
    return self.out


def _git_describe():
  try:
    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=10,
    )
    if rev.returncode:
      return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.strip()
    return rev.stdout.strip() + ("-dirty" if dirty else "")
  except Exception:  # noqa: BLE001
    return None


def _nvidia_smi():
  if not shutil.which("nvidia-smi"):
    return None
  try:
    r = subprocess.run(
        [
            "nvidia-smi",
            "--query-gpu=name,driver_version,memory.total,clocks.sm," "clocks.max.sm,power.limit",
            "--format=csv,noheader",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    return r.stdout.strip() or None
  except Exception:  # noqa: BLE001
    return None
