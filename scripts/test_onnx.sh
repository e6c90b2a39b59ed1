#!/usr/bin/env bash
# The optional ONNX export (`python -m cn2_jax.export --format onnx`, jax2onnx) and its
# onnxruntime parity test, in a separate venv: jax2onnx and onnxruntime are not in
# requirements.txt (see requirements-onnx.txt). The venv is $ONNX_VENV, by default `onnxvenv`
# beside the repository; it is created on first use and reused. Runs tests/test_export.py
# (the StableHLO tests too; `-k onnx` for the ONNX ones only: the whole one-stage detector with
# and without DCN, the whole CenterNet2 and its parts) and tests/test_zoo_export_onnx.py; extra
# arguments go to pytest. The tests marked zoo are left out unless asked for
# (`bash scripts/test_onnx.sh -m zoo`): the full-size oracle parity (CenterNet2 R50 with the
# official oracle weights, ~40 s, needs ../shared/oracle) and every zoo architecture's whole
# detector at small size (tests/test_zoo_export_onnx.py).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${ONNX_VENV:-$(dirname "$ROOT")/onnxvenv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q -r requirements.txt -r requirements-onnx.txt
# cn2_jax is imported from this checkout (the current directory), not installed into the venv.
export JAX_PLATFORMS=cpu
exec "$VENV/bin/python" -m pytest -q -p no:logging -m "not zoo" tests/test_export.py tests/test_zoo_export_onnx.py "$@"
