#!/usr/bin/env bash
# Creates ./.venv with align installed (editable). Usage: scripts/setup.sh [extra]   e.g. scripts/setup.sh dev
#
# torch comes first and on purpose: without a GPU we install the CPU build, so that pip never resolves the
# dependency to the multi-GB CUDA build. Where PyPI itself only serves CUDA wheels, point ALIGN_TORCH_INDEX at
# PyTorch's CPU index (ALIGN_TORCH_INDEX=https://download.pytorch.org/whl/cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRA=${1:-}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found: installing the default (CUDA) torch build"
    "$PY" -m pip install --quiet "torch>=2.4"
  else
    echo "setup: no GPU: installing the CPU build torch==${ALIGN_TORCH_VERSION:-2.13.0}"
    "$PY" -m pip install --quiet "torch==${ALIGN_TORCH_VERSION:-2.13.0}" \
      ${ALIGN_TORCH_INDEX:+--index-url "$ALIGN_TORCH_INDEX" --extra-index-url https://pypi.org/simple}
  fi
fi
echo "setup: installing align${EXTRA:+[$EXTRA]} into $VENV"
"$PY" -m pip install --quiet -e ".${EXTRA:+[$EXTRA]}"
"$PY" -c "import torch, align; print(f'setup: align {align.__version__}, torch {torch.__version__}, cuda={torch.cuda.is_available()}')"
