#!/usr/bin/env bash
# Creates ./.venv with the pinned requirements and installs cn2_jax into it in editable mode, so
# `import cn2_jax` works from any directory (idempotent and quiet; reuses an existing venv).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -r requirements.txt
# The editable install only needs redoing when cn2_jax does not already resolve to this checkout
# (run from / so that the current directory does not put it on sys.path).
if ! (cd / && "$ROOT/.venv/bin/python" -c 'import os, sys, cn2_jax
sys.exit(os.path.dirname(os.path.dirname(os.path.realpath(cn2_jax.__file__))) != sys.argv[1])' \
    "$(realpath "$ROOT")") 2>/dev/null; then
  # setuptools warns on stderr about every editable install: show its output only on failure.
  if ! out=$(.venv/bin/python -m pip install -q -e . --no-deps 2>&1); then
    echo "$out" >&2
    exit 1
  fi
fi
