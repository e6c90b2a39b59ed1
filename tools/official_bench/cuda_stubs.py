"""Lets torchvision's own PyPI wheel load beside a CPU-only torch (for bench/vs_official.py).

The torchvision wheels on the package index are CUDA builds: their `_C.so` (which holds
torchvision's C++ CPU kernels: `nms`, `roi_align` forward and backward, ...) lists
`libc10_cuda.so`, `libtorch_cuda.so` and `libcudart.so.13` as NEEDED, which a `+cpu` torch does
not ship, so `import torchvision` silently falls back to "no C++ ops" and `torchvision.ops.nms`
raises. This tool builds, into OUT_DIR:

* one stub shared library per missing NEEDED library that torch does not provide, named by that
  soname (`libc10_cuda.so`, `libtorch_cuda.so`). The first holds every symbol `_C.so` imports that
  neither torch's libraries nor a bundled library define (the CUDA-side c10 / ATen functions,
  16 symbols for torchvision 0.28.0); each stub function prints its name and aborts, so a call
  can never pass unnoticed. Only CUDA code paths reference them; CPU tensors never reach them.
* a link to the CUDA runtime the wheel bundles (`torchvision.libs/libcudart.*.so.13`) under its
  soname, so the versioned `__cudaRegisterFatBinary@libcudart.so.13` imports resolve (the runtime
  is only used to register the wheel's GPU kernels at load time; no device is needed).

`preload(OUT_DIR)` (called by tools/official_bench/official_side.py before `import torchvision`)
dlopens them with RTLD_GLOBAL; torchvision's `_C.so` then loads unchanged and its CPU kernels are
the ones the official code runs. Not needed (and not used) where a CPU build of torchvision is
installed (e.g. from https://download.pytorch.org/whl/cpu).

  python tools/official_bench/cuda_stubs.py OUT_DIR      # with the official-side venv's python

Needs `nm`, `readelf` (binutils) and `gcc`. Writes `OUT_DIR/stubs.json` (what was stubbed).
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import importlib.util
import json
import os
import subprocess
import sys

MANIFEST = "stubs.json"


def _run(cmd: list) -> str:
  return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def _needed(lib: str) -> list:
  """NEEDED entries of a shared library (readelf -d)."""
  out = []
  for line in _run(["readelf", "-d", lib]).splitlines():
    if "(NEEDED)" in line:
      out.append(line.split("[", 1)[1].rstrip("]"))
  return out


def _soname(lib: str) -> str:
  for line in _run(["readelf", "-d", lib]).splitlines():
    if "(SONAME)" in line:
      return line.split("[", 1)[1].rstrip("]")
  return ""


def _defined(libs: list) -> set:
  names = set()
  for lib in libs:
    for line in _run(["nm", "-D", "--defined-only", lib]).splitlines():
      parts = line.split()
      if len(parts) == 3:
        names.add(parts[2].split("@", 1)[0])
  return names


def _undefined(lib: str) -> tuple:
  """(strong unversioned imports, weak imports) of `lib`; versioned ones (`sym@lib`) are left to
  the library that defines that version."""
  strong, weak = [], []
  for line in _run(["nm", "-D", "--undefined-only", lib]).splitlines():
    kind, name = line.split()[-2:]
    if "@" in name:
      continue
    (weak if kind in ("w", "v") else strong).append(name)
  return strong, weak


def torchvision_paths() -> tuple:
  """(`torchvision/_C.so`, `torchvision.libs` folder or '') of the installed torchvision, found
  without importing it."""
  spec = importlib.util.find_spec("torchvision")
  if spec is None or not spec.submodule_search_locations:
    raise SystemExit("torchvision is not installed in this environment")
  pkg = list(spec.submodule_search_locations)[0]
  libs = os.path.join(os.path.dirname(pkg), "torchvision.libs")
  return os.path.join(pkg, "_C.so"), libs if os.path.isdir(libs) else ""


def torch_lib_dir() -> str:
  spec = importlib.util.find_spec("torch")
  if spec is None:
    raise SystemExit("torch is not installed in this environment")
  return os.path.join(list(spec.submodule_search_locations)[0], "lib")


def _stub_source(symbols: list, data_symbols: set) -> str:
  lines = ["#include <stdio.h>", "#include <stdlib.h>", ""]
  for i, s in enumerate(symbols):
    if s in data_symbols:
      lines.append(f'void *cn2_stub_data_{i} __asm__("{s}") = 0;')
      continue
    lines += [
        f'void cn2_stub_{i}(void) __asm__("{s}");',
        f"void cn2_stub_{i}(void) {{",
        f'  fprintf(stderr, "cuda_stubs: {s} called (a CUDA code path on a CPU-only torch)\\n");',
        "  abort();",
        "}",
    ]
  return "\n".join(lines) + "\n"


def _data_symbols(lib: str, names: list) -> set:
  """Imported names that are objects, not functions (nm's symbol table of the importing library
  does not say; the relocation type does: R_X86_64_GLOB_DAT without a PLT entry)."""
  plt = set()
  for line in _run(["readelf", "-rW", lib]).splitlines():
    parts = line.split()
    if len(parts) >= 5 and parts[2] == "R_X86_64_JUMP_SLOT":
      plt.add(parts[4].split("@", 1)[0])
  return {n for n in names if n not in plt}


def build(out_dir: str) -> dict:
  """Writes the stub libraries and links into `out_dir`; returns the manifest."""
  os.makedirs(out_dir, exist_ok=True)
  c_so, bundled_dir = torchvision_paths()
  tlib = torch_lib_dir()
  torch_libs = sorted(glob.glob(os.path.join(tlib, "*.so*")))
  torch_sonames = {_soname(p) or os.path.basename(p) for p in torch_libs}
  bundled = {}
  if bundled_dir:
    for p in sorted(glob.glob(os.path.join(bundled_dir, "*.so*"))):
      bundled[_soname(p) or os.path.basename(p)] = p
  system_ok = set()
  missing_libs, links = [], {}
  for name in _needed(c_so):
    if name in torch_sonames:
      continue
    if name in bundled:
      links[name] = bundled[name]
      continue
    try:  # a system library (libc, libstdc++, ...)
      ctypes.CDLL(name)
      system_ok.add(name)
    except OSError:
      missing_libs.append(name)
  strong, _ = _undefined(c_so)
  known = _defined(torch_libs + list(links.values()))
  missing_syms = sorted(s for s in strong if s not in known)
  if missing_syms and not missing_libs:
    raise SystemExit(f"{len(missing_syms)} unresolved symbols but no missing library to hold them")
  for name, target in links.items():
    dst = os.path.join(out_dir, name)
    if os.path.lexists(dst):
      os.remove(dst)
    os.symlink(target, dst)
  data = _data_symbols(c_so, missing_syms)
  for k, name in enumerate(missing_libs):
    src = os.path.join(out_dir, name + ".c")
    with open(src, "w") as f:
      f.write(_stub_source(missing_syms if k == 0 else [], data))
    subprocess.run(
        [
            "gcc",
            "-shared",
            "-fPIC",
            "-O2",
            f"-Wl,-soname,{name}",
            "-o",
            os.path.join(out_dir, name),
            src,
        ],
        check=True,
    )
  manifest = dict(
      torchvision_C=c_so,
      linked=links,
      stub_libraries=missing_libs,
      stubbed_symbols=missing_syms,
      stubbed_data_symbols=sorted(data),
      # preload order: real bundled libraries first, then the stubs
      preload=list(links) + missing_libs,
  )
  with open(os.path.join(out_dir, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1)
  return manifest


def preload(out_dir: str) -> dict:
  """dlopens the libraries of `build(out_dir)` with RTLD_GLOBAL (call after `import torch`, before
  `import torchvision`); returns the manifest."""
  with open(os.path.join(out_dir, MANIFEST)) as f:
    manifest = json.load(f)
  for name in manifest["preload"]:
    ctypes.CDLL(os.path.join(out_dir, name), mode=ctypes.RTLD_GLOBAL)
  return manifest


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("out_dir")
  args = ap.parse_args()
  m = build(args.out_dir)
  print(
      f"linked {sorted(m['linked'])}; stub libraries {m['stub_libraries']} with "
      f"{len(m['stubbed_symbols'])} symbols ({len(m['stubbed_data_symbols'])} data) -> "
      f"{args.out_dir}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
