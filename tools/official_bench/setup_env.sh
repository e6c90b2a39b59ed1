#!/usr/bin/env bash
# The official side's environment for bench/vs_official.py, in DIR (default /tmp/official_bench):
#
#   DIR/venv             python venv: bench/requirements-official.txt + torchvision 0.28.0
#   DIR/venv/cuda_stubs  only when torchvision's wheel is a CUDA build (tools/official_bench/
#                        cuda_stubs.py: lets its C++ CPU kernels load beside the CPU torch)
#   DIR/src/detectron2   facebookresearch/detectron2 at the oracle's commit (imported from the
#                        source tree; its C++ extension is not built: this model never calls it)
#   DIR/src/CenterNet2   xingyizhou/CenterNet2 at the oracle's commit
#
#   bash tools/official_bench/setup_env.sh [DIR]
#
# Environment: PYTHON (default python3; must match the torch wheels, 3.11 here); D2_GIT_DIR /
# CN2_GIT_DIR: existing git directories (a bare mirror is fine) to export the sources from instead
# of cloning them from GitHub. Ends by printing the bench/vs_official.py command.
set -euo pipefail
DIR=${1:-/tmp/official_bench}
PYTHON=${PYTHON:-python3}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
D2_COMMIT=02b5c4e295e990042a714712c21dc79b731e8833
CN2_COMMIT=bfc8b72e4e2a1612b4aa4c12f7b3db9cdd7b34c4
TV_VERSION=0.28.0

mkdir -p "$DIR/src"

export_source() {  # name url commit git_dir
  local name=$1 url=$2 commit=$3 git_dir=${4:-}
  local dst="$DIR/src/$name"
  if [ -f "$dst/OFFICIAL_COMMIT" ] && [ "$(cat "$dst/OFFICIAL_COMMIT")" = "$commit" ]; then
    return
  fi
  rm -rf "$dst" && mkdir -p "$dst"
  if [ -z "$git_dir" ]; then
    git_dir="$DIR/src/$name.git"
    [ -d "$git_dir" ] || git clone --bare --quiet "$url" "$git_dir"
  fi
  git --git-dir="$git_dir" archive "$commit" | tar -x -C "$dst"
  echo "$commit" > "$dst/OFFICIAL_COMMIT"
}
export_source detectron2 https://github.com/facebookresearch/detectron2 "$D2_COMMIT" "${D2_GIT_DIR:-}"
export_source CenterNet2 https://github.com/xingyizhou/CenterNet2 "$CN2_COMMIT" "${CN2_GIT_DIR:-}"

[ -x "$DIR/venv/bin/python" ] || "$PYTHON" -m venv "$DIR/venv"
PIP="$DIR/venv/bin/python -m pip"
$PIP install --quiet -r "$REPO/bench/requirements-official.txt"
# torchvision: the CPU build if its index is reachable, else the package index's wheel + stubs
if ! $PIP install --quiet --no-deps --retries 0 --timeout 15 \
    --index-url https://download.pytorch.org/whl/cpu "torchvision==$TV_VERSION+cpu" 2>/dev/null; then
  echo "torchvision $TV_VERSION+cpu not reachable; installing the package index's wheel" >&2
  $PIP install --quiet --no-deps "torchvision==$TV_VERSION"
fi
STUBS=""
if ! "$DIR/venv/bin/python" -c "import torchvision, sys; sys.exit(0 if torchvision.extension._has_ops() else 1)" 2>/dev/null; then
  "$DIR/venv/bin/python" "$REPO/tools/official_bench/cuda_stubs.py" "$DIR/venv/cuda_stubs"
  STUBS="--cuda-stubs $DIR/venv/cuda_stubs"
fi

echo
echo "official side ready. Run from $REPO:"
echo "  PYTHONPATH=. JAX_PLATFORMS=cpu .venv/bin/python bench/vs_official.py \\"
echo "      --official-python $DIR/venv/bin/python --detectron2 $DIR/src/detectron2 \\"
echo "      --centernet2 $DIR/src/CenterNet2 $STUBS --check --out /tmp/vs_official.json"
