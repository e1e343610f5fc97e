"""`align train` with an on-policy objective (f-DPG): the toy recipe raises the gold reward with each rollout
backend, every target runs, a LoRA policy trains, the summary and plot are written, and bad input is one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from align.cli import main
from align.config import OnPolicyTrainConfig, load_train_config
from align.recipes.train import train

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "fdpg-toy.yaml"


def overrides(sft: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.name_or_path={sft}", f"training.output_dir={out}", "training.report_to=none",
            "training.disable_tqdm=true", "evaluation.prompts.toy_world=64", *extra]


def run(sft: Path, out: Path, *extra: str) -> dict:
    config = load_train_config(RECIPE, overrides(sft, out, *extra))
    assert isinstance(config, OnPolicyTrainConfig)
    return train(config)


def test_fdpg_toy_recipe_raises_the_gold_reward(toy_sft_dir, tmp_path):
    """The shipped recipe, shortened: reverse-KL f-DPG to the exponential target with HF rollouts."""
    summary = run(toy_sft_dir, tmp_path / "run", "training.max_steps=120", "training.learning_rate=2e-4")
    assert summary["gold_reward_after"] > summary["gold_reward_before"] + 0.5, summary
    assert 0 < summary["kl_to_reference"] < 16
    assert abs(summary["kl_to_reference_before"]) < 1e-4  # the policy starts at the frozen reference
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("gold_reward_before", "gold_reward_after", "kl_to_reference", "samples", "global_step"):
        assert key in written
    assert written["samples"] == 120 * 8 * 4
    assert (tmp_path / "run" / "training_curves.png").stat().st_size > 10_000
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    logged = [h for h in written["log_history"] if "reward" in h]
    for key in ("gold_reward", "reward/toy_world", "kl/sampled", "fdpg/log_z", "fdpg/baseline", "fdpg/divergence",
                "fdpg/pseudo_reward", "importance_weight/mean", "entropy/token", "completion/distinct_2",
                "length/completion", "time/generate_s", "throughput/generated_tokens_per_s"):
        assert key in logged[-1], key
    # hf samples from the live policy: the importance weights are exactly 1 and none is truncated
    assert all(h["importance_weight/mean"] == 1 and h["importance_weight/truncated"] == 0 for h in logged)
    assert yaml.safe_load((tmp_path / "run" / "align_config.yaml").read_text())["objective"]["name"] == "fdpg"


@pytest.mark.vllm
def test_fdpg_toy_recipe_raises_the_gold_reward_with_vllm(toy_sft_dir, tmp_path):
    """The same recipe sampled by vLLM's CPU engine, synced with the policy every step."""
    summary = run(toy_sft_dir, tmp_path / "run", "training.max_steps=120", "training.learning_rate=2e-4",
                  "rollout.backend=vllm", "rollout.engine_kwargs={kv_cache_memory_bytes: 67108864}")
    assert summary["gold_reward_after"] > summary["gold_reward_before"] + 0.5, summary
    logged = [h for h in summary["log_history"] if "reward" in h]
    # vLLM in fp32 synced every step: its log-probs agree with the trainer's, the weights are ~1
    assert all(h["sampler/logprob_gap"] < 1e-3 for h in logged)
    assert all(abs(h["importance_weight/mean"] - 1) < 1e-2 for h in logged)


@pytest.mark.parametrize("target", [
    ["target={kind: best_of_n, n: 4, samples: 16}"],
    ["target={kind: constraint, threshold: 1.0}", "objective.divergence=forward_kl"],
    ["objective.divergence=js", "objective.baseline=leave_one_out"],
], ids=["best_of_n", "constraint", "js_loo"])
def test_every_target_trains(toy_sft_dir, tmp_path, target):
    summary = run(toy_sft_dir, tmp_path / "run", "training.max_steps=60", "training.learning_rate=2e-4",
                  "evaluation.prompts.toy_world=32", *target)
    assert summary["gold_reward_after"] > summary["gold_reward_before"], summary
    logged = [h for h in summary["log_history"] if "reward" in h]
    assert all(math.isfinite(h["loss"]) for h in logged)
    if "best_of_n" in target[0]:
        n = 4
        assert summary["target/kl_bound"] == pytest.approx(math.log(n) - (n - 1) / n)
        assert 0 < summary["target/kl_to_reference"] <= summary["target/kl_bound"] + 1e-9


def test_lora_policy_with_its_base_as_reference(toy_sft_dir, tmp_path):
    summary = run(toy_sft_dir, tmp_path / "run", "training.max_steps=40", "training.learning_rate=3e-3",
                  "model.lora={r: 8, lora_alpha: 16}", "reference.kind=auto", "evaluation.prompts.toy_world=32")
    assert summary["gold_reward_after"] > summary["gold_reward_before"], summary
    assert (tmp_path / "run" / "final" / "adapter_config.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["target.beta=0"], "target.beta must be > 0"),
    (["target={kind: best_of_n, n: 1}"], "target.n must be an integer >= 2"),
    (["target={kind: best_of_n}", "reference.kind=tr_dpo"], "target.kind: best_of_n is fitted to the reference once"),
    (["target={kind: constraint}"], "objective.divergence: reverse_kl to a constraint target with zeros"),
    (["objective.divergence=hellinger"], "objective.divergence: unknown divergence 'hellinger'"),
    (["generation.sync_every=4"], "generation.sync_every: hf samples from the live policy"),
    (["data.train=x.jsonl"], "data: unknown key"),
    (["reward.kind=ensemble"], "reward.ensemble: required by reward kind 'ensemble'"),
    (["reward.kind=callable", "reward.callable=math:nope"], "reward.callable: module 'math' has no 'nope'"),
])
def test_bad_recipes_are_one_line(toy_sft_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    status = main(["train", "--config", str(RECIPE), *overrides(toy_sft_dir, out, *extra)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert message in err[0], err[0]
    assert not out.exists()  # nothing half-written


def test_bad_prompts_and_rewards_name_the_file_or_callable(toy_sft_dir, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "describe the movie ."}\n{"prompt": "  "}\n')
    out = tmp_path / "run"
    status = main(["train", "--config", str(RECIPE), *overrides(toy_sft_dir, out, f"prompts={{file: {prompts}}}")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and str(prompts) in err[0] and "row 2" in err[0] and "prompt" in err[0], err
    assert not out.exists()

    module = tmp_path / "bad_reward.py"
    module.write_text("def nan(prompts, completions):\n    return [float('nan')] * len(completions)\n"
                      "def short(prompts, completions):\n    return [0.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, words in (("nan", "non-finite"), ("short", "shape")):
        status = main(["train", "--config", str(RECIPE),
                       *overrides(toy_sft_dir, tmp_path / name, "reward.kind=callable",
                                  f"reward.callable=bad_reward:{name}", "training.max_steps=2",
                                  "evaluation.prompts=null")])
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and f"reward bad_reward:{name}" in err[-1] and words in err[-1], err


def test_conversational_prompt_dataset(toy_sft_dir, tmp_path, capsys):
    """`prompts.dataset`: TRL's prompt-only format with chat-message prompts, rendered by the chat template."""
    data = tmp_path / "prompts.jsonl"
    rows = [{"prompt": [{"role": "user", "content": p}]} for p in ("describe the movie .", "review the book .")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    summary = run(toy_sft_dir, tmp_path / "run", f"prompts={{dataset: {data}}}", "training.max_steps=3",
                  "evaluation.prompts=null")
    assert summary["global_step"] == 3 and "gold_reward_after" not in summary
    (tmp_path / "bad.jsonl").write_text('{"text": "describe the movie ."}\n')
    status = main(["train", "--config", str(RECIPE),
                   *overrides(toy_sft_dir, tmp_path / "bad-run", f"prompts={{dataset: {tmp_path / 'bad.jsonl'}}}")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and "bad.jsonl" in err[-1] and "no `prompt` column" in err[-1], err


def test_several_steps_per_generation(toy_sft_dir, tmp_path, capsys):
    """`generation.steps_per_generation=4`: one sampling call per 4 optimizer steps; the later steps are off-policy
    and their importance weights move away from 1 (the first step of each group is on-policy: weight 1)."""
    summary = run(toy_sft_dir, tmp_path / "run", "training.max_steps=40", "training.learning_rate=2e-4",
                  "generation.steps_per_generation=4", "training.logging_steps=1", "evaluation.prompts.toy_world=32")
    logged = {h["step"]: h for h in summary["log_history"] if "reward" in h}
    assert summary["global_step"] == 40 and summary["samples"] == 40 * 8 * 4
    on_policy = [abs(logged[s]["importance_weight/mean"] - 1) for s in range(1, 41, 4)]
    off_policy = [abs(logged[s]["importance_weight/mean"] - 1) for s in range(2, 41) if s % 4 != 1]
    assert max(on_policy) < 1e-4 < max(off_policy)
    assert summary["gold_reward_after"] > summary["gold_reward_before"]
    bad = overrides(toy_sft_dir, tmp_path / "bad", "generation.steps_per_generation=3", "training.save_strategy=steps",
                    "training.save_steps=10")
    status = main(["train", "--config", str(RECIPE), *bad])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and "training.save_steps: 10 is not a multiple of generation.steps_per_generation" in err[-1]
