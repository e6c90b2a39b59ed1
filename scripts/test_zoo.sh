#!/usr/bin/env bash
# The full-size official-zoo oracle checks (tests marked `zoo`: parity of every zoo architecture
# with the official code on the dev image, the zoo backbones against the oracles' feature maps,
# and a few compile-heavy whole-model checks such as the one-stage canvas exactness), and the
# full-size CenterNet2 R50 training-step oracle (one step and three SGD steps).
# They need ../shared/oracle_zoo and take a few minutes on 2 CPU cores; CI runs them after the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export JAX_PLATFORMS=cpu
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile --durations=10 -m zoo tests "$@"
