"""The offline best-of-n study (eval/bon.py, `align bon`): plumbing on a tiny untrained base and ensemble."""

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from align import toy_world
from align.errors import AlignError, ConfigError, DataError
from align.modeling import ModelConfig
from eval.best_of_n import expected_best_of_n
from eval.bon import check_tokenizers, load_bon_config, run_bon
from reward_models import RewardEnsemble
from reward_models.aggregate import aggregate

N, P = 8, 4
LABELS = ["mean", "wco", "uwo(lam=0.5)"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bon")
    base = toy_world.save_base_model(root / "base", seed=0)
    ensemble = RewardEnsemble.build("multi_head", ModelConfig(name_or_path=str(base), dtype="float32"), 3,
                                    seeds=[1, 2, 3])
    ensemble.save(root / "ensemble")
    return root


def raw(world, **changes):
    cfg = {"model": {"name_or_path": str(world / "base"), "dtype": "float32"},
           "prompts": {"toy_world": P, "seed": 5},
           "ensemble": str(world / "ensemble"),
           "num_samples": N,
           "sampling": {"max_new_tokens": 8},
           "gold": "toy_world",
           "output_dir": str(world / "out"),
           "batch_size": 32,
           "progress": False}
    cfg.update(changes)
    return cfg


@pytest.fixture(scope="module")
def study(world):
    results = run_bon(load_bon_config(None, base=raw(world)))
    return results, world / "out"


def test_rows_cover_every_aggregation_and_n(study):
    results, _ = study
    assert results["ns"] == [1, 2, 4, 8]
    assert [(r["aggregation"], r["n"]) for r in results["rows"]] == [(a, n) for a in LABELS for n in [1, 2, 4, 8]]
    on_disk = json.loads((study[1] / "results.json").read_text())
    assert on_disk["rows"] == results["rows"] and on_disk["num_prompts"] == P and on_disk["num_samples"] == N
    for r in results["rows"]:
        assert r["kl_bound"] == pytest.approx(math.log(r["n"]) - (r["n"] - 1) / r["n"])
        assert -1e-12 <= r["kl_estimate"] <= r["kl_bound"] + 1e-12
        assert set(r) >= {"aggregation", "n", "proxy_reward", "gold_reward", "kl_bound", "kl_estimate"}
    assert all(r["kl_estimate"] == 0 for r in results["rows"] if r["n"] == 1)


def test_numbers_match_the_samples(study):
    results, out = study
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == P * N
    members = torch.tensor([s["rewards"] for s in samples], dtype=torch.float64)
    gold = torch.tensor([s["gold"] for s in samples], dtype=torch.float64).reshape(P, N)
    assert gold.flatten().tolist() == toy_world.gold_rewards([s["response"] for s in samples])
    assert all(s["log_eps"] <= 0 for s in samples)
    rows = {(r["aggregation"], r["n"]): r for r in results["rows"]}
    for label, method, params in [("mean", "mean", {}), ("wco", "wco", {}), ("uwo(lam=0.5)", "uwo", {"lam": 0.5})]:
        proxy = aggregate(members, method, **params).reshape(P, N)
        assert rows[(label, 1)]["proxy_reward"] == pytest.approx(float(proxy.mean()), abs=1e-9)
        assert rows[(label, N)]["proxy_reward"] == pytest.approx(float(proxy.max(dim=1).values.mean()), abs=1e-9)
        assert rows[(label, 4)]["proxy_reward"] == pytest.approx(float(expected_best_of_n(proxy, 4).mean()), abs=1e-9)
        assert rows[(label, 1)]["gold_reward"] == pytest.approx(float(gold.mean()), abs=1e-9)
        best = proxy.argmax(dim=1)
        assert rows[(label, N)]["gold_reward"] == pytest.approx(float(gold[torch.arange(P), best].mean()), abs=1e-9)
    assert rows[("wco", 1)]["proxy_reward"] <= rows[("mean", 1)]["proxy_reward"] + 1e-12


def test_csv_and_plots(study):
    _, out = study
    with open(out / "per_prompt.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(LABELS) * 4 * P
    assert set(rows[0]) == {"aggregation", "n", "prompt_index", "proxy_reward", "gold_reward", "kl_estimate"}
    for name in ("gold_vs_kl.png", "proxy_vs_kl.png"):
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_existing_results_not_overwritten(world, study):
    before = (study[1] / "results.json").read_text()
    with pytest.raises(AlignError, match="overwrite=true"):
        run_bon(load_bon_config(None, base=raw(world)))
    assert (study[1] / "results.json").read_text() == before


def test_scoring_cuts_rows_at_the_ensembles_trained_length(world, study, tmp_path):
    """An ensemble whose manifest says it was trained on rows of at most 6 tokens scores every sample on its last 6
    tokens (the study above, run with a copy of its ensemble that only differs in that key); `max_length` in the
    config wins."""
    import shutil

    from align.data import tokenize_pairs

    ensemble_dir = tmp_path / "ensemble"
    shutil.copytree(world / "ensemble", ensemble_dir)
    manifest = json.loads((ensemble_dir / "manifest.json").read_text())
    assert manifest["max_length"] is None  # built, never trained: no limit recorded
    manifest["max_length"] = 6
    (ensemble_dir / "manifest.json").write_text(json.dumps(manifest))
    cut = run_bon(load_bon_config(None, base=raw(world, ensemble=str(ensemble_dir), output_dir=str(tmp_path / "o"))))
    assert cut["scoring_max_length"] == 6 and study[0]["scoring_max_length"] is None
    samples = [json.loads(line) for line in (tmp_path / "o" / "samples.jsonl").read_text().splitlines()]
    ensemble = RewardEnsemble.load(ensemble_dir, device="cpu")
    ids = tokenize_pairs(ensemble.tokenizer, [s["prompt"] for s in samples], [s["response"] for s in samples])
    assert max(len(row) for row in ids) > 6
    expected, _ = ensemble.score_ids([row[-6:] for row in ids])
    torch.testing.assert_close(torch.tensor([s["rewards"] for s in samples]), expected, atol=1e-5, rtol=0)
    # the same samples (same seed) as the uncut study: only the scoring differs
    uncut = [json.loads(line) for line in (study[1] / "samples.jsonl").read_text().splitlines()]
    assert [s["response"] for s in uncut] == [s["response"] for s in samples]
    assert [s["rewards"] for s in uncut] != [s["rewards"] for s in samples]
    wide = run_bon(load_bon_config(None, base=raw(world, ensemble=str(ensemble_dir), output_dir=str(tmp_path / "w"),
                                                  max_length=256)))
    assert wide["scoring_max_length"] == 256


@pytest.mark.parametrize("changes, match", [
    ({"num_samples": 0}, "num_samples: must be an integer >= 1"),
    ({"sampling": {"temperature": 0.7}}, "sampling.temperature: must be 1"),
    ({"sampling": {"top_k": 5}}, "sampling.top_k: must be 0"),
    ({"aggregations": [{"method": "uwo", "lam": -1}]}, r"aggregations\[0\]"),
    ({"prompts": {"toy_world": 2, "file": "x.jsonl"}}, "exactly one"),
    ({"gold": "human"}, "gold"),
    ({"nope": 1}, "nope: unknown key"),
])
def test_config_errors(world, changes, match):
    with pytest.raises(ConfigError, match=match):
        load_bon_config(None, base=raw(world, **changes))


def test_empty_prompt_names_file_row_field(world, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "tell me about the movie ."}) + "\n" + json.dumps({"prompt": "  "}) + "\n")
    config = load_bon_config(None, base=raw(world, prompts={"file": str(path)}, output_dir=str(tmp_path / "o")))
    with pytest.raises(DataError, match=r"prompts.jsonl: row 2: field 'prompt': is empty"):
        run_bon(config)


def test_missing_ensemble(world, tmp_path):
    config = load_bon_config(None, base=raw(world, ensemble=str(tmp_path / "none"), output_dir=str(tmp_path / "o")))
    with pytest.raises(AlignError, match="directory not found"):
        run_bon(config)
    assert not (tmp_path / "o").exists()


def test_rollout_backend_is_chosen_in_config(world, tmp_path, monkeypatch):
    # An unknown backend, and vllm where it cannot run (not installed, or no GPU): one error naming the key, with
    # what to do, before anything is written.
    with pytest.raises(ConfigError, match=r"rollout\.backend: must be one of \['hf', 'vllm'\], got 'tgi'"):
        load_bon_config(None, base=raw(world, output_dir=str(tmp_path / "o")), overrides=["rollout.backend=tgi"])
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError even where vllm is installed
    config = load_bon_config(None, base=raw(world, output_dir=str(tmp_path / "o")), overrides=["rollout.backend=vllm"])
    with pytest.raises(ConfigError, match=r"^rollout\.backend: vllm is not installed; pip install 'align\[vllm\]'"):
        run_bon(config)
    assert not (tmp_path / "o").exists()


def test_tokenizer_mismatch_refused(toy_tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(w for w in toy_world.vocabulary() if w != "great")}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    check_tokenizers(toy_tokenizer, other, ["the movie was fun ."], what="responses", ensemble_dir="E")
    with pytest.raises(AlignError, match="tokenizer does not match.*1 of 2 responses"):
        check_tokenizers(toy_tokenizer, other, ["the movie was great .", "it was fun ."], what="responses",
                         ensemble_dir="E")


def test_cli_end_to_end(world, tmp_path, capsys):
    from align.cli import main

    config = tmp_path / "bon.yaml"
    import yaml

    config.write_text(yaml.safe_dump(raw(world, output_dir=str(tmp_path / "cli"))))
    assert main(["bon", "--config", str(config), "num_samples=2", "aggregations=[{method: wco}]"]) == 0
    printed = capsys.readouterr().out
    assert "wco proxy" in printed and str(tmp_path / "cli") in printed
    results = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert [(r["aggregation"], r["n"]) for r in results["rows"]] == [("wco", 1), ("wco", 2)]
    assert main(["bon", "--config", str(config), "num_samples=0"]) == 2
    assert "num_samples: must be an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "configs" / "bon").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_bon_recipes_validate(path):
    from eval.bon import load_bon_config

    config = load_bon_config(path)
    assert config.num_samples >= 2 and config.sampling.temperature == 1.0
    assert {a["method"] for a in config.aggregations} == {"mean", "wco", "uwo"}


# --- align bon with rollout.backend=vllm (vLLM's CPU build in CI) -------------------------------------------------

VLLM_ROLLOUT = {"backend": "vllm", "dtype": "float32", "enforce_eager": True, "max_model_len": 256,
                "engine_kwargs": {"kv_cache_memory_bytes": 64 << 20}}


def _gold_and_log_eps(out):
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return (torch.tensor([s["gold"] for s in samples], dtype=torch.float64),
            torch.tensor([s["log_eps"] for s in samples], dtype=torch.float64), samples)


@pytest.mark.vllm
def test_cli_with_the_vllm_backend_gives_the_hf_study(world, tmp_path, capsys):
    import yaml

    from align.cli import main

    # The same study (16 prompts x 32 samples of the untrained base) with each backend, the vLLM one as a user runs it.
    changes = dict(prompts={"toy_world": 16, "seed": 5}, num_samples=32, sampling={"max_new_tokens": 12})
    run_bon(load_bon_config(None, base=raw(world, output_dir=str(tmp_path / "hf"), **changes)))
    config = tmp_path / "bon.yaml"
    config.write_text(yaml.safe_dump(raw(world, output_dir=str(tmp_path / "vllm"), rollout=VLLM_ROLLOUT, **changes)))
    assert main(["bon", "--config", str(config)]) == 0
    assert "wco proxy" in capsys.readouterr().out

    hf, vllm = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("hf", "vllm"))
    assert set(hf) == set(vllm) and [set(r) for r in hf["rows"]] == [set(r) for r in vllm["rows"]]
    assert [(r["aggregation"], r["n"]) for r in hf["rows"]] == [(r["aggregation"], r["n"]) for r in vllm["rows"]]
    for name in ("per_prompt.csv", "gold_vs_kl.png", "proxy_vs_kl.png"):
        assert (tmp_path / "vllm" / name).stat().st_size > 0
    gold_hf, log_eps_hf, samples_hf = _gold_and_log_eps(tmp_path / "hf")
    gold_vllm, log_eps_vllm, samples_vllm = _gold_and_log_eps(tmp_path / "vllm")
    assert [set(s) for s in samples_hf] == [set(s) for s in samples_vllm] and len(samples_vllm) == 16 * 32
    assert samples_hf != samples_vllm  # different samplers, different draws ...
    for a, b in [(gold_hf, gold_vllm), (log_eps_hf, log_eps_vllm)]:  # ... from the same distribution
        standard_error = math.sqrt(a.var() / len(a) + b.var() / len(b))
        assert abs(float(a.mean() - b.mean())) < 4 * standard_error, (float(a.mean()), float(b.mean()))


def test_plot_draws_one_curve_where_the_kl_estimate_equals_the_bound(tmp_path):
    """Issue 12, noise: on the toy world the estimate and the bound agree to 1e-6, so six legend entries showed
    three curves. Where they agree, each aggregation is one curve and the legend says so; where not, both."""
    from eval.bon import _plot
    from eval.kl import bon_kl_bound

    def rows(gap):
        return [{"aggregation": a, "n": n, "proxy_reward": float(n), "kl_bound": bon_kl_bound(n),
                 "kl_estimate": max(bon_kl_bound(n) - gap * (n > 1), 0.0)} for a in ("mean", "wco") for n in (1, 2, 4)]

    legend = _plot(rows(1e-6), "proxy_reward", "proxy", "t", tmp_path / "same.png")
    assert legend == ["mean (KL estimate = bound within 0.01)", "wco (KL estimate = bound within 0.01)"]
    legend = _plot(rows(0.3), "proxy_reward", "proxy", "t", tmp_path / "apart.png")
    assert legend == ["mean (KL estimate)", "mean (KL bound)", "wco (KL estimate)", "wco (KL bound)"]
    assert (tmp_path / "same.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
