"""`bench/onpolicy_vs_trl.py --quick` end to end: align's f-DPG recipe and TRL's RLOOTrainer each train the toy model
(one sampling call per step, and one per 4 steps) for 3 steps in their own worker processes, and the JSON has a
timed, measured row for each (about 40 s on 2 cores)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_quick_bench_writes_both_frameworks(tmp_path):
    output = tmp_path / "x.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "onpolicy_vs_trl.py"), "--quick",
                           "--output", str(output)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(output.read_text())
    toy = results["models"]["toy"]
    for framework in ("align", "align_k", "trl"):
        best, quality = toy["best"][framework], toy["quality"][framework]
        assert best["framework"] == framework
        assert best["samples_per_s"] > 0 and best["steps_per_s"] > 0
        assert best["samples_per_s"] == pytest.approx(32 * best["steps_per_s"])  # 8 prompts x 4 samples per step
        assert best["peak_rss_mib"] > 0
        assert math.isfinite(quality["gold"]) and math.isfinite(quality["kl"])
        assert toy["runs"][framework][0]["optimizer_steps"] == results["spec"]["quality_steps"]
    assert toy["sanity"]["same prompt token ids on both sides"]
    for framework in ("align", "align_k"):  # ratios to TRL: median over repeats, with min, max and spread
        for name in ("samples_per_s", "peak_rss", "cpu_s_per_step"):
            ratio = toy["ratios"][framework][name]
            assert ratio["n"] == results["spec"]["repeats"] and ratio["spread"] >= 0
            assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"] and math.isfinite(ratio["max"])
        assert math.isfinite(toy["ratios"][framework]["best_of_k_samples_per_s"])
        assert toy["samples_per_s"][framework]["median"] > 0
    assert "| toy | align |" in proc.stdout and "| toy | trl |" in proc.stdout
