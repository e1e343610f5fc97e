"""`align study NAME --quick` (eval/studies/): each study runs end to end in quick mode from the session's SFT policy
and writes results.json (the documented structure, finite numbers), results.md and its PNG; one cheap behavioural
check per study; a bad study name is one line on the CLI's error path."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import time

import pytest

from align.cli import main
from eval.studies import STUDIES, run_study

pytestmark = pytest.mark.slow


def finite_numbers(obj, path="results"):
    """Every number in a JSON value, with its path; asserts none is missing (null) or non-finite."""
    if isinstance(obj, bool) or obj is None:
        assert obj is not None, f"{path} is null"
        return
    if isinstance(obj, (int, float)):
        assert math.isfinite(obj), f"{path} = {obj}"
    elif isinstance(obj, dict):
        for k, v in obj.items():
            finite_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            finite_numbers(v, f"{path}[{i}]")


def run_quick(name, tmp_path, sft):
    start = time.perf_counter()
    results = run_study(name, output_dir=tmp_path / name, quick=True, sft_dir=sft)
    elapsed = time.perf_counter() - start
    out = tmp_path / name
    written = json.loads((out / "results.json").read_text())
    assert written == json.loads(json.dumps(results))
    for key in ("study", "command", "quick", "seeds", "spread", "settings", "wall_time_s", "outputs", "findings",
                "deviations"):
        assert key in written, key
    assert written["study"] == name and written["quick"] is True and written["seeds"] == [0]
    assert "std" in written["spread"]
    finite_numbers({k: v for k, v in written.items() if k != "examples"})
    assert (out / f"{name}.png").stat().st_size > 10_000
    assert "|" in (out / "results.md").read_text()
    assert elapsed < 90, f"quick {name} took {elapsed:.0f} s"
    return written


def test_fdpg_divergences_quick(tmp_path, toy_sft_dir):
    r = run_quick("fdpg_divergences", tmp_path, toy_sft_dir)
    assert list(r["table"]) == ["sft", "reverse_kl", "forward_kl", "js", "tv"]
    for row in r["table"].values():
        for metric in ("gold_reward", "kl_to_sft", "distinct_2", "entropy_per_token"):
            assert set(row[metric]) >= {"mean", "std", "min", "max", "values"}
            assert row[metric]["min"] <= row[metric]["mean"] <= row[metric]["max"]
    # the measurement is consistent: the SFT policy's sampled log-probs and its teacher-forced score agree (KL 0)
    assert abs(r["table"]["sft"]["kl_to_sft"]["mean"]) < 1e-3
    assert all(0 < row["distinct_2"]["mean"] <= 1 for row in r["table"].values())
    assert r["curves"]["js"]["gold_reward"]["steps"] == [2, 4]


def test_overoptimisation_quick(tmp_path, toy_sft_dir):
    r = run_quick("overoptimisation", tmp_path, toy_sft_dir)
    assert len(r["proxy_accuracy"]["members"]) == 3
    assert 0 <= r["proxy_accuracy"]["ensemble_mean"] <= 1
    assert set(r["verdict"]["overoptimised"]) == {"mean", "wco", "uwo(λ=0.5)"}
    assert isinstance(r["verdict"]["paper_direction_shown"], bool)
    curves = r["curves"]
    # the optimised aggregate under mean IS the mean of the members; under wco it is below it
    assert curves["mean"]["proxy_optimised"]["mean"] == pytest.approx(curves["mean"]["proxy_mean_of_members"]["mean"],
                                                                      abs=1e-5)
    assert all(w <= m + 1e-6 for w, m in zip(curves["wco"]["proxy_optimised"]["mean"],
                                              curves["wco"]["proxy_mean_of_members"]["mean"]))


def test_frontier_quick(tmp_path, toy_sft_dir):
    r = run_quick("frontier", tmp_path, toy_sft_dir)
    methods = [(p["method"], p["param"]) for p in r["points"]]
    assert methods == [("sft", ""), ("fdpg_exponential", "β=0.1"), ("fdpg_best_of_n", "n=4"), ("rloo", "β=0.1")]
    bon = r["best_of_n_sampling"]
    assert [b["n"] for b in bon] == [1, 2, 4, 8]
    # best-of-n with gold as its own selector: gold never falls with n; KL is 0 at n = 1 and within the bound
    gold = [b["gold_reward"]["mean"] for b in bon]
    assert all(a <= b + 1e-9 for a, b in itertools.pairwise(gold))
    assert bon[0]["kl_exact_ties"]["mean"] == pytest.approx(0, abs=1e-9)
    for b in bon:
        assert b["kl_exact_ties"]["mean"] <= b["kl_bound"]["mean"] + 1e-9
        assert b["kl_estimate"]["mean"] <= b["kl_bound"]["mean"] + 1e-9
    best_of_n_target = r["points"][2]
    assert 0 < best_of_n_target["target_kl"]["mean"] <= best_of_n_target["target_kl_bound"]["mean"] + 1e-9


def test_cli_runs_a_study_with_a_cached_sft(tmp_path, toy_sft_dir, capsys):
    """`align study frontier --quick --output-dir DIR` reuses an SFT policy cached in DIR/work/sft/model."""
    out = tmp_path / "out"
    shutil.copytree(toy_sft_dir, out / "work" / "sft" / "model")
    assert main(["study", "frontier", "--quick", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| method |" in printed and str(out / "results.json") in printed
    assert json.loads((out / "results.json").read_text())["command"] == "align study frontier --quick"


def test_unknown_study_is_one_line(capsys):
    assert main(["study", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("align: error: study: unknown study 'nope'; known: ")
    assert all(name in err[-1] for name in STUDIES)
