"""`bench/rm_scoring.py --quick`: the four ensemble kinds score the same toy rows, twice each in rotating order; at
init member k computes the same function in every kind (the bench's sanity checks), and the JSON carries rows/s and
the ratios with their spreads. No timing target is asserted."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("single", "multi_head", "seeds", "lora")


def test_quick_rm_scoring(tmp_path):
    output = tmp_path / "rm.json"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "rm_scoring.py"), "--quick", "--output",
                           str(output)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(output.read_text())
    assert results["sanity"] and all(results["sanity"].values()), results["sanity"]
    repeats = results["spec"]["repeats"]
    assert repeats >= 2
    for v in VARIANTS:
        assert len(results["runs"][v]) == repeats
        for s in (results["rows_per_s"][v], results["ratios"][v]["vs_single"], results["ratios"][v]["vs_seeds"]):
            assert s["n"] == repeats and s["spread"] >= 0 and 0 < s["min"] <= s["median"] <= s["max"]
            assert all(math.isfinite(x) for x in s["values"])
    assert results["ratios"]["single"]["vs_single"]["median"] == pytest.approx(1.0)
    params = results["parameters"]  # K heads on one backbone hold about one model; K seeds hold K
    assert params["multi_head"] < 1.1 * params["single"] and params["seeds"] == pytest.approx(4 * params["single"])
    assert results["backbone_forwards_per_batch"] == {"single": 1, "multi_head": 1, "seeds": 4, "lora": 4}
    for v in VARIANTS:
        assert f"| {v} |" in proc.stdout
