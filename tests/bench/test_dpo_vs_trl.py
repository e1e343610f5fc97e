"""`bench/dpo_vs_trl.py --quick` end to end: the three workloads (normal and long: steps/s of align's and TRL's
trainers; short: whole `align train` and TRL processes), each once, on a 2-layer d=64 Llama. The bench's sanity
checks hold (it exits non-zero otherwise) and the JSON carries the figures and their spreads; no timing target is
asserted (a smoke run's timings mean nothing)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]


def assert_spread(s: dict, positive: bool = True):
    assert set(s) >= {"n", "median", "min", "max", "spread", "values"}
    assert s["n"] == len(s["values"]) >= 1
    assert all(math.isfinite(v) for v in s["values"])
    assert s["min"] <= s["median"] <= s["max"] and s["spread"] >= 0
    if positive:
        assert s["min"] > 0


def test_quick_dpo_vs_trl(tmp_path):
    output = tmp_path / "dpo.json"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "dpo_vs_trl.py"), "--quick", "--threads", "1",
                           "--output", str(output)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(output.read_text())
    assert results["all_sane"] and results["spec"]["quick"]
    workloads = results["workloads"]
    assert list(workloads) == ["normal", "long", "short"]
    for name, w in workloads.items():
        assert all(w["sanity"].values()), (name, w["sanity"])
        assert_spread(w["ratio"])
        assert_spread(w["peak_rss_ratio"])
        assert math.isfinite(w["best_of_k_ratio"]) and w["best_of_k_ratio"] > 0
        assert w["target"] == {"normal": 1.5, "long": 2.0, "short": 1.3}[name]
        assert w["speed_target_met"] == (w["ratio"]["median"] >= w["target"])
        assert set(w["runs"]) == {"align", "trl"} and all(len(rs) == 1 for rs in w["runs"].values())
        for fw in ("align", "trl"):
            for figure in w["figures"][fw].values():
                assert_spread(figure)
    for name in ("normal", "long"):
        a, t = (workloads[name]["runs"][fw][0] for fw in ("align", "trl"))
        for run in (a, t):  # policy = reference before the first update: DPO's loss is log 2
            assert run["initial_loss"] == pytest.approx(math.log(2), abs=1e-4)
            assert run["steps_per_s"] > 0 and run["peak_rss_mib"] > 0
        # align's packed shared-prompt forward agrees with TRL's plain forward on the same batch
        assert a["initial_chosen_logps"] == pytest.approx(t["initial_chosen_logps"], rel=1e-4)
        assert a["ids_digest"] == t["ids_digest"]
    short = workloads["short"]
    assert short["tokenization"]["align"]["ids_digest"] == short["tokenization"]["trl"]["ids_digest"]
    tokens = short["mean_tokens"]
    assert 13 <= tokens["prompt"] <= 21 and 9 <= tokens["chosen"] <= 49  # 12-20 words + BOS, 8-48 words + EOS
    for fw in ("align", "trl"):
        run = short["runs"][fw][0]
        assert run["global_step"] == results["spec"]["short_steps"]
        assert run["first_logged_loss"] == pytest.approx(math.log(2), abs=1e-3)
        assert run["process_wall_s"] > 0 and run["peak_rss_mib"] > 0
    for name in ("normal", "long", "short"):
        assert f"| {name} |" in proc.stdout
    assert "sanity ok" in proc.stdout
