#!/usr/bin/env bash
# Sets up ./.venv, then trains and evaluates the demo model on the generated synthetic dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python main.py --config configs/demo.py --workdir "${1:-runs/demo}"
