#!/usr/bin/env bash
# Sets up ./.venv and runs the whole test suite on the CPU (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export JAX_PLATFORMS=cpu
# The full-size zoo oracle checks (marker `zoo`) have their own script: scripts/test_zoo.sh; the
# CenterNet2 / zoo ONNX op-form checks (marker `onnx_step`) run in scripts/test_onnx.sh.
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile --durations=15 -m "not zoo and not onnx_step" tests "$@"
