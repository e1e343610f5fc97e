"""`bench/rollout_throughput.py --quick`: HF rollout throughput on the toy model (main suite, vLLM not needed), and
with vLLM's CPU build, both backends, their ratio and vLLM's weight-sync time (marked vllm). The JSON holds the
median and spread of every figure; no timing target is asserted."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_bench(tmp_path, *flags) -> tuple[dict, str]:
    output = tmp_path / "rollout.json"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "rollout_throughput.py"), "--quick", "--threads",
                           "1", "--output", str(output), *flags], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(output.read_text()), proc.stdout


def assert_spread(s: dict, n: int):
    assert s["n"] == len(s["values"]) == n and s["spread"] >= 0
    assert 0 < s["min"] <= s["median"] <= s["max"] and all(math.isfinite(v) for v in s["values"])


def test_quick_rollout_throughput_hf(tmp_path):
    results, stdout = run_bench(tmp_path, "--backends", "hf")
    repeats = results["setup"]["repeats"]
    assert repeats >= 2 and results["vllm_unavailable"]  # not asked for
    toy = results["models"]["toy"]
    assert_spread(toy["hf"]["tokens_per_s"], repeats)
    setup = results["setup"]
    for run in toy["hf"]["runs"]:  # every sample runs to max_new_tokens or EOS
        assert 0 < run["tokens"] <= setup["prompts"] * setup["n"] * setup["max_new_tokens"]
    assert "vllm" not in toy and "| toy |" in stdout


@pytest.mark.vllm
def test_quick_rollout_throughput_vllm(tmp_path):
    results, stdout = run_bench(tmp_path)
    assert results["vllm_unavailable"] is None, results["vllm_unavailable"]
    repeats = results["setup"]["repeats"]
    toy = results["models"]["toy"]
    for backend in ("hf", "vllm"):
        assert_spread(toy[backend]["tokens_per_s"], repeats)
    assert_spread(toy["vllm_x_hf"], repeats)
    assert_spread(toy["sync_s"], max(3, repeats))
    assert "| toy |" in stdout
