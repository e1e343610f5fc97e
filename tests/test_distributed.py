"""`align train` under DeepSpeed ZeRO-2 and ZeRO-3 across 2 CPU processes (torchrun, gloo)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from align import toy_world

pytestmark = pytest.mark.multiprocess


def _zero_config(stage: int) -> dict:
    return {
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": stage == 3},
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
    }


def _torchrun_align_train(root, model_dir, stage: int, out, *overrides: str) -> None:
    """`align train` on 2 CPU processes under DeepSpeed ZeRO-`stage` (torchrun, gloo) on 32 toy pairs."""
    pairs = root / "pairs.jsonl"
    if not pairs.exists():
        pairs.write_text("".join(json.dumps(r) + "\n" for r in toy_world.make_preference_rows(32, seed=0)))
    ds_config = root / f"zero{stage}.json"
    ds_config.write_text(json.dumps(_zero_config(stage)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",  # a free port
           "-m", "align.cli", "train", "--config", "/dev/null",
           f"model.name_or_path={model_dir}", "model.dtype=float32",
           f"data.train={pairs}", "data.max_length=48", "data.max_prompt_length=16",
           "objective.name=fdpo", "objective.beta=0.1",
           f"training.output_dir={out}", "training.per_device_train_batch_size=4", "training.max_steps=8",
           "training.learning_rate=0.001", "training.logging_steps=1", "training.save_strategy=no",
           f"training.deepspeed={ds_config}", *overrides]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _losses(out) -> list[float]:
    summary = json.loads((out / "train_summary.json").read_text())
    return [h["loss"] for h in summary["log_history"] if "loss" in h]


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("zero")
    results = {}
    for stage in (2, 3):
        results[stage] = root / f"out{stage}"
        _torchrun_align_train(root, tiny_model_dir, stage, results[stage])
    return results


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_from_log2_and_saves_a_full_model(zero_runs, tiny_model_dir, stage):
    out = zero_runs[stage]
    losses = _losses(out)
    assert len(losses) == 8  # 32 pairs / (2 ranks x 4) = 4 steps per epoch, 2 epochs
    assert losses[0] == pytest.approx(0.693147, abs=1e-4)  # policy == (sharded) frozen reference at step 0
    assert sum(losses[4:]) < sum(losses[:4])  # the second pass over the same pairs has a lower loss
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert sum(p.numel() for p in final.parameters()) == sum(p.numel() for p in initial.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(initial.parameters(), final.parameters()))


def test_zero2_and_zero3_agree(zero_runs):
    z2 = AutoModelForCausalLM.from_pretrained(zero_runs[2] / "final")
    z3 = AutoModelForCausalLM.from_pretrained(zero_runs[3] / "final")
    for (name, a), b in zip(z2.named_parameters(), z3.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


# --- TR-DPO under ZeRO-2 and ZeRO-3 ------------------------------------------------------------------------------


def _rank_partition(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s ZeRO-3 partition of a tensor: flat, ceil(numel / world) long, zero-padded at the end."""
    size = -(-full.numel() // world)
    piece = full.reshape(-1)[rank * size:(rank + 1) * size]
    return torch.cat([piece, piece.new_zeros(size - piece.numel())])


@pytest.mark.parametrize("stage", [2, 3])
def test_tr_dpo_reference_moves_exactly_as_a_single_process_replay(tmp_path, tiny_model_dir, stage):
    """Soft updates (α = 0.5 every 2 steps) on 2 ranks: the reference each rank holds after steps 2 and 4 equals,
    bit for bit, the update replayed in this (single) process from the policy saved at those steps. Under ZeRO-3
    each rank holds only its partition and the test checks each one."""
    from align.references import soft_update_reference

    out = tmp_path / "out"
    _torchrun_align_train(tmp_path, tiny_model_dir, stage, out, "reference.kind=tr_dpo", "reference.alpha=0.5",
                          "reference.tau=2", "training.max_steps=4", "training.save_strategy=steps",
                          "training.save_steps=2")
    reference = {n: p.detach().clone() for n, p in
                 AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).named_parameters()}
    for step in (2, 4):
        checkpoint = out / f"checkpoint-{step}"
        policy = dict(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).named_parameters())
        names = list(reference)
        soft_update_reference([reference[n] for n in names], [policy[n].detach() for n in names], 0.5)
        if stage == 3:
            files = sorted(checkpoint.glob("align_reference_*.pt"))
            assert [f.name for f in files] == ["align_reference_0.pt", "align_reference_1.pt"]
            for rank, path in enumerate(files):
                state = torch.load(path, weights_only=False)
                assert state["updates"] == step // 2 and state["zero3_partitions"]
                assert list(state["weights"]) == names
                for name in names:
                    assert torch.equal(state["weights"][name], _rank_partition(reference[name], rank, 2)), (rank, name)
        else:
            assert not list(checkpoint.glob("align_reference_*.pt"))  # same on every rank: saved once
            state = torch.load(checkpoint / "align_reference.pt", weights_only=False)
            assert state["updates"] == step // 2 and not state["zero3_partitions"]
            for name in names:
                assert torch.equal(state["weights"][name], reference[name]), name
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert any(not torch.equal(reference[n], p) for n, p in initial.named_parameters())  # it did move


@pytest.mark.parametrize("stage", [2, 3])
def test_tr_dpo_hard_update_every_step_is_used_by_the_next_forward(tmp_path, tiny_model_dir, stage):
    """α = 1, τ = 1: after every step the reference IS the policy, so every logged loss is log 2. Under ZeRO-3 this
    shows the reference forward sees the updated partitions, including the small parameters DeepSpeed keeps
    gathered between forwards."""
    out = tmp_path / "out"
    _torchrun_align_train(tmp_path, tiny_model_dir, stage, out, "reference.kind=tr_dpo", "reference.alpha=1.0",
                          "reference.tau=1", "training.max_steps=3")
    losses = _losses(out)
    assert len(losses) == 3 and all(loss == pytest.approx(0.693147, abs=1e-5) for loss in losses), losses
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    final = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    assert any(not torch.equal(a, b) for a, b in zip(initial.parameters(), final.parameters()))


# --- on-policy f-DPG under ZeRO-2 and ZeRO-3 ----------------------------------------------------------------------


@pytest.mark.parametrize("stage, target", [(2, "{kind: exponential, beta: 0.1}"),
                                           (3, "{kind: best_of_n, n: 4, samples: 8}")])
def test_fdpg_under_zero(tmp_path, toy_sft_dir, stage, target):
    """f-DPG on 2 processes: HF generation gathers the ZeRO-3 shards, the log Z table and the baseline are built from
    both ranks' samples (the same on each), the frozen reference is sharded like the policy (and gathered to draw
    the best_of_n target's reference samples, on every rank whenever any rank needs them), and gold rises."""
    from pathlib import Path

    recipe = Path(__file__).resolve().parent.parent / "configs" / "fdpg-toy.yaml"
    ds_config = tmp_path / f"zero{stage}.json"
    ds_config.write_text(json.dumps(_zero_config(stage)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "align.cli", "train", "--config", str(recipe), f"model.name_or_path={toy_sft_dir}",
           f"training.output_dir={out}", "training.report_to=none", "training.disable_tqdm=true",
           "training.max_steps=60", "training.learning_rate=2e-4", "training.per_device_train_batch_size=4",
           "training.save_strategy=steps", "training.save_steps=60", f"training.deepspeed={ds_config}",
           "evaluation.prompts.toy_world=32", f"target={target}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gold_reward_after"] > summary["gold_reward_before"] + 0.2, summary
    assert summary["samples"] == 60 * 4 * 2 * 4
    states = [torch.load(out / "checkpoint-60" / f"align_state_{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert states[0]["objective"] == states[1]["objective"]  # log Z table and baseline window agree across ranks
    assert states[0]["objective"]["log_z"]["count"]
    fitted = [state["target"].get("sorted_rewards", {}) for state in states]
    assert fitted[0].keys() == fitted[1].keys()  # best_of_n: every rank fitted every rank's prompts, alike
    assert all(torch.equal(fitted[0][key], fitted[1][key]) for key in fitted[0])
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    initial = AutoModelForCausalLM.from_pretrained(toy_sft_dir)
    assert sum(p.numel() for p in final.parameters()) == sum(p.numel() for p in initial.parameters())
