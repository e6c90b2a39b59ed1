"""The markdown table of bench/RESULTS.md, and the merge of several result files into one."""

from __future__ import annotations

import json
import os

from bench.measure import write_json

SCHEMA = "cn2_jax-bench-v1"


def _f(v, fmt="{:.1f}"):
  return "—" if v is None else fmt.format(v)


def _notes(r: dict) -> str:
  """The notes column: errors, what differs from the request, and the secondary numbers."""
  notes = []
  if r.get("error"):
    notes.append(f"ERROR: {str(r['error'])[:80]}")
  if (
      r.get("requested_batch")
      and r.get("batch") != r.get("requested_batch")
      and r["framework"] == "torch"
  ):
    notes.append(f"requested batch {r['requested_batch']}")
  if (
      r["framework"] == "jax"
      and r.get("requested_batch")
      and r.get("batch_per_device") != r.get("requested_batch")
  ):
    notes.append(f"requested {r['requested_batch']}/device")
  if "model" in r and r["framework"] == "torch":
    notes.append(r["model"].replace("torchvision fasterrcnn_resnet50_fpn", "tv FRCNN"))
  if r.get("first_iter_s") is not None:
    notes.append(f"first iter {r['first_iter_s']:.1f} s")
  if r.get("e2e_median_ms") is not None:
    notes.append(f"e2e {r['e2e_median_ms']:.1f} ms")
  if r.get("detections_per_image") is not None:
    notes.append(f"{r['detections_per_image']:.0f} dets/img")
  if r.get("xla_tflop_per_s") is not None:
    notes.append(f"{r['xla_tflop_per_s']:.3g} TFLOP/s (XLA flops)")
  if r.get("loss_finite") is False:
    notes.append("loss not finite")
  if r.get("torch_padded"):
    notes.append(f"padded {r['torch_padded']}")
  cached = r.get("cached") or {}
  if cached.get("cache_events"):
    hits = cached["cache_events"].get("cache_hits", 0)
    notes.append(f"cache hits {hits}")
  if (
      r.get("peak_mem_gib") is None
      and (r.get("memory_analysis") or {}).get("temp_size_gib") is not None
  ):
    notes.append(f"XLA temp {r['memory_analysis']['temp_size_gib']:.2f} GiB")
  return "; ".join(notes)


def table(out: dict) -> str:
  """Header lines (date, git, versions, devices) and one table row per result row."""
  lines = []
  envs = [w.get("env") or {} for w in out.get("workers", [])]
  jenv = next((e for e in envs if "jax" in e), {})
  tenv = next((e for e in envs if "torch" in e), {})
  meta = out.get("meta", {})
  lines.append(
      f"date {meta.get('date')}, host {meta.get('host')}, git {meta.get('git')}"
      + (", SMALL config" if meta.get("small") else "")
  )
  if jenv:
    lines.append(
        f"JAX {jenv.get('jax')} (flax {jenv.get('flax')}) on {jenv.get('backend')}: "
        f"{jenv.get('num_devices')} x {jenv.get('device_kind')}"
    )
  if tenv:
    lines.append(
        f"torch {tenv.get('torch')}, torchvision {tenv.get('torchvision')} on "
        f"{tenv.get('device')} (cudnn.benchmark, TF32 conv {tenv.get('cudnn_allow_tf32')},"
        f" TF32 matmul {tenv.get('matmul_allow_tf32')})"
    )
  if meta.get("torch_skipped"):
    lines.append(f"torchvision: skipped ({meta['torch_skipped']})")
  if meta.get("nvidia_smi"):
    lines.append(f"nvidia-smi: {meta['nvidia_smi']}")
  lines.append("")
  lines.append(
      "| framework | task | precision | image@padded | batch | median ms | img/s "
      "| img/s pipelined | lower s | compile s cold | compile s cached | peak GiB "
      "| notes |"
  )
  lines.append("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
  for r in out.get("rows", []):
    cached = r.get("cached") or {}
    lines.append(
        f"| {r['framework']} | {r['task']} | {r['precision']} | {r['size']} | {r['batch']} "
        f"| {_f(r.get('median_ms'))} | {_f(r.get('img_per_s'))} "
        f"| {_f(r.get('img_per_s_pipelined'))} | {_f(r.get('lower_s'))} "
        f"| {_f(r.get('compile_s'))} | {_f(cached.get('compile_s'))} "
        f"| {_f(r.get('peak_mem_gib'), '{:.2f}')} | {_notes(r)} |"
    )
  return "\n".join(lines)


def write_table(out: dict, json_path: str, md: bool = True) -> str:
  """The table as text; with `md`, also written next to `json_path` as .md."""
  text = table(out)
  if not md:
    return text
  md = os.path.splitext(json_path)[0] + ".md"
  with open(md, "w") as f:
    f.write(text + "\n")
  return text


def merge(paths: list, out_path: str) -> dict:
  """Several result files (e.g. one per GPU call) as one, written to `out_path`: rows and workers
  concatenated, the first file's meta (plus a later file's torchvision 'skipped' note while no
  worker so far ran torch)."""
  merged = {"schema": SCHEMA, "meta": {}, "rows": [], "workers": [], "merged_from": []}
  for path in paths:
    with open(path) as f:
      o = json.load(f)
    merged["meta"] = merged["meta"] or o.get("meta", {})
    merged["rows"].extend(o.get("rows", []))
    merged["workers"].extend(o.get("workers", []))
    merged["merged_from"].append({"path": path, "meta": o.get("meta")})
    if o.get("meta", {}).get("torch_skipped") and not any(
        "torch" in (w.get("env") or {}) for w in merged["workers"]
    ):
      merged["meta"]["torch_skipped"] = o["meta"]["torch_skipped"]
  write_json(out_path, merged)
  return merged
