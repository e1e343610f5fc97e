"""`bench/tr_dpo_zero3_memory.py --quick`: one TR-DPO reference update under ZeRO-3 on 2 torchrun CPU processes, align's
way and TRL's, each in its own job: both give θ_ref ← α θ + (1 − α) θ_ref on every rank's partition, and align's
peak extra RSS stays below TRL's (which gathers both models on every rank)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_quick_tr_dpo_zero3_memory(tmp_path):
    output = tmp_path / "tr.json"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "tr_dpo_zero3_memory.py"), "--quick",
                           "--output", str(output)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(output.read_text())
    assert results["model"] == "quick" and results["processes"] == 2
    for variant in ("align", "trl"):
        r = results[variant]
        assert r["max_abs_error"] < 1e-5, (variant, r["max_abs_error"])  # the formula, on every rank's partition
        for key in ("update_peak_mib", "first_update_peak_mib", "seconds"):
            s = r[key]
            assert s["n"] == results["repeats"] and s["spread"] >= 0 and s["min"] <= s["median"] <= s["max"]
        assert len(r["jobs"]) == results["repeats"] and len(r["jobs"][0]["per_rank"]) == 2
    ratio = results["peak_ratio_align_over_trl"]
    assert math.isfinite(ratio["median"]) and 0 < ratio["median"] < 1  # TRL's way gathers both models everywhere
    assert not list(tmp_path.glob("tr.*.json"))  # the per-rank parts were collected and removed
    assert "align / trl peak" in proc.stdout
