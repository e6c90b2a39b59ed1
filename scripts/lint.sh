#!/usr/bin/env bash
# Format and static checks (CI runs this after the tests): pyink (Google style, 2 spaces; fix with
# `.venv/bin/pyink .`) and ruff's pyflakes rules (unused imports, undefined names, dead locals).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/pyink --check --quiet .
.venv/bin/ruff check --quiet .
echo "lint: ok"
