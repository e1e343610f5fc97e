"""Kill-and-resume of on-policy training (f-DPG) in real processes.

Run A is `align train` with an f-DPG recipe, uninterrupted. Run B is the same command, killed with SIGKILL after its
first complete checkpoint, then relaunched with `training.resume_from_checkpoint=latest`. B must end with A's policy
and A's logged losses. The recipe makes every piece of on-policy state matter: the best_of_n target's per-prompt
reward samples (fitted lazily, as prompts are first seen), the log Z table, the moving baseline's window, the
sampling seeds (a per-process call count) and attention dropout (torch's global RNG).

A checkpoint records the objective, reference and target parameters it was written with; resuming it with changed
ones is refused, naming each (`test_changed_target_or_objective_parameters_are_named`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from align.errors import AlignError
from align.trainer import CHECKPOINT_MARKER

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "fdpg-toy.yaml"
MAX_STEPS, SAVE_STEPS = 40, 8
TIMEOUT_S = 300


def start(model: Path, out: Path, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "align.cli", "train", "--config", str(RECIPE), f"model.name_or_path={model}",
           f"training.output_dir={out}", "training.report_to=none", "training.disable_tqdm=true",
           f"training.max_steps={MAX_STEPS}", "training.save_strategy=steps", f"training.save_steps={SAVE_STEPS}",
           "training.logging_steps=1", "training.per_device_train_batch_size=4", "disable_dropout=false",
           "target={kind: best_of_n, n: 4, samples: 8}", "objective.baseline_window=64", "evaluation.prompts=null",
           "prompts.toy_world=512", "seed=5", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def finish(proc: subprocess.Popen) -> None:
    proc.wait(timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.log.read_text()[-3000:]


def complete_steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / CHECKPOINT_MARKER).is_file())


def losses(out: Path) -> dict[int, float]:
    history = json.loads((out / "summary.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def test_killed_and_resumed_run_equals_the_uninterrupted_one(toy_sft_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(toy_sft_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["attention_dropout"] = 0.1  # training draws from torch's global RNG too
    (model / "config.json").write_text(json.dumps(config))
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    started = []
    try:
        started.append(proc_a := start(model, out_a, tmp_path / "a.log"))
        started.append(proc_b := start(model, out_b, tmp_path / "b.log"))
        deadline = time.monotonic() + TIMEOUT_S
        while not complete_steps(out_b):
            assert proc_b.poll() is None, proc_b.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "run B wrote no complete checkpoint in time"
            time.sleep(0.002)
        os.kill(proc_b.pid, signal.SIGKILL)
        proc_b.wait(timeout=TIMEOUT_S)
        killed_at = complete_steps(out_b)[-1]
        assert killed_at < MAX_STEPS and not (out_b / "final").exists()
        started.append(resumed := start(model, out_b, tmp_path / "b2.log", "training.resume_from_checkpoint=latest"))
        finish(resumed)
        finish(proc_a)
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
    state = torch.load(out_b / f"checkpoint-{killed_at}" / "align_state_0.pt", weights_only=False)
    marker = json.loads((out_b / f"checkpoint-{killed_at}" / CHECKPOINT_MARKER).read_text())
    assert marker["target"] == "best_of_n" and marker["model_only"] is False
    assert {key: marker["parameters"][key] for key in ("target.n", "target.samples", "objective.baseline_window")} == {
        "target.n": 4, "target.samples": 8, "objective.baseline_window": 64}  # what a resume is checked against
    assert state["target"]["sorted_rewards"] and state["objective"]["log_z"]["count"]  # the state that must survive
    assert len(state["objective"]["moving_baseline"]["values"]) == 64
    assert state["generate_calls"] == killed_at  # one sampling call per optimizer step
    a = AutoModelForCausalLM.from_pretrained(out_a / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(out_b / "final").state_dict()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key
    la, lb = losses(out_a), losses(out_b)
    assert max(la) == MAX_STEPS and len(lb) >= MAX_STEPS - killed_at
    assert all(lb[s] == la[s] for s in lb if s > killed_at)


def test_changed_target_or_objective_parameters_are_named(caplog):
    """The on-policy trainer records the target's parameters beside the objective's and the reference's: the log Z
    table and the fitted target state estimate one target, and continuing them under another β would mix two runs.
    (The trainer's parameter check alone, on a trainer holding only its components; the SIGKILL test above resumes
    a real checkpoint through it.)"""
    from types import SimpleNamespace

    from align.objectives import FDPG
    from align.onpolicy_trainer import OnPolicyTrainer
    from align.references import FrozenReference
    from align.targets import ExponentialTarget

    def trainer(beta: float, baseline: str, override: bool = False) -> OnPolicyTrainer:
        t = object.__new__(OnPolicyTrainer)  # no model, sampler or reward: only what the check reads
        t.objective = FDPG(FDPG.Params(baseline=baseline))
        t.reference = SimpleNamespace(params=FrozenReference.Params())
        t.target = ExponentialTarget(ExponentialTarget.Params(beta=beta))
        t.resume_with_changed_parameters = override
        return t

    written = trainer(0.1, "moving")._checkpoint_parameters()
    assert written["target.beta"] == 0.1 and written["objective.baseline"] == "moving"
    assert written["objective.divergence"] == "reverse_kl" and "reference.name_or_path" in written
    trainer(0.1, "moving")._check_parameters("ckpt", {"parameters": written})  # the same recipe resumes

    with pytest.raises(AlignError) as e:
        trainer(0.05, "leave_one_out")._check_parameters("ckpt", {"parameters": written})
    assert str(e.value).startswith("ckpt: written with other parameters (objective.baseline: moving → "
                                   "leave_one_out; target.beta: 0.1 → 0.05); ")
    with caplog.at_level("WARNING", logger="align.trainer"):
        trainer(0.05, "leave_one_out", override=True)._check_parameters("ckpt", {"parameters": written})
    assert "target.beta: 0.1 → 0.05" in caplog.text
