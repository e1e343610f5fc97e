"""Kill-and-resume in real processes, and checkpoints that a crash while saving cannot make unresumable.

Run A is `align train` uninterrupted. Run B is the same command, killed with SIGKILL while it trains on after a
complete checkpoint, then relaunched with `training.resume_from_checkpoint=latest`. B must end with A's policy, A's
moved TR-DPO reference and update count, and A's logged losses. The recipe makes every piece of state matter:
SamPO draws token subsets from its own generator, attention dropout draws from torch's global RNG, TR-DPO moves
the reference every 2 steps, the learning rate decays linearly, and 40 steps of 16 per epoch cross epoch boundaries.

The in-process tests use A's checkpoints for the crash cases: a checkpoint cut short while saving (no completion
marker) is skipped by `latest`, `latest` with no complete checkpoint starts at step 0, a run resumed from the
checkpoint of its last step trains no extra step and keeps its moved reference, and a checkpoint resumed with another
reference kind or objective, or with other objective or reference parameters, is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, Trainer
from transformers.trainer_utils import get_last_checkpoint

from align import toy_world
from align.config import load_train_config
from align.errors import AlignError
from align.recipes.train import train
from align.trainer import CHECKPOINT_MARKER, PreferenceTrainer, latest_checkpoint

MAX_STEPS, SAVE_STEPS = 40, 8  # 64 pairs / 4 per step = 16 steps per epoch
TIMEOUT_S = 300


TR_DPO = ("reference.kind=tr_dpo", "reference.alpha=0.5", "reference.tau=2")


def overrides(root: Path, output_dir: Path, *extra: str, reference=TR_DPO) -> list[str]:
    return [f"model.name_or_path={root / 'model'}", "model.dtype=float32", "disable_dropout=false",
            f"data.train={root / 'pairs.jsonl'}", "data.max_length=48", "data.max_prompt_length=16",
            "objective.name=sampo", "objective.beta=0.1", *reference,
            f"training.output_dir={output_dir}", "training.per_device_train_batch_size=4",
            f"training.max_steps={MAX_STEPS}", "training.learning_rate=0.001", "training.logging_steps=1",
            "training.save_strategy=steps", f"training.save_steps={SAVE_STEPS}", "training.disable_tqdm=true",
            "seed=3", *extra]


def start(root: Path, output_dir: Path, log: str, *extra: str) -> subprocess.Popen:
    """`align train` in its own process; its output goes to `root/log` (a pipe nobody reads could fill and stall it)."""
    cmd = [sys.executable, "-m", "align.cli", "train", "--config", "/dev/null", *overrides(root, output_dir, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    with open(root / log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    proc.log = root / log
    return proc


def finish(proc: subprocess.Popen) -> str:
    proc.wait(timeout=TIMEOUT_S)
    output = proc.log.read_text()
    assert proc.returncode == 0, output[-3000:]
    return output


def train_in_process(root: Path, output_dir: Path, *extra: str, reference=TR_DPO) -> dict:
    return train(load_train_config("/dev/null", overrides(root, output_dir, *extra, reference=reference)))


def complete_steps(output_dir: Path) -> list[int]:
    """Steps of the checkpoints marked complete, i.e. those `latest` may pick."""
    return sorted(int(p.name.split("-")[1]) for p in output_dir.glob("checkpoint-*")
                  if (p / CHECKPOINT_MARKER).is_file())


def policy(model_dir: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()


def reference_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "align_reference.pt", weights_only=False)


def assert_equal_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key, value in a.items():
        assert torch.equal(value, b[key]), f"{what}: {key}"


def train_logs(output_dir: Path) -> dict[int, dict]:
    history = json.loads((output_dir / "train_summary.json").read_text())["log_history"]
    return {entry["step"]: entry for entry in history if "loss" in entry}


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("resume")
    shutil.copytree(tiny_model_dir, root / "model")
    config = json.loads((root / "model" / "config.json").read_text())
    config["attention_dropout"] = 0.1  # training then draws from torch's global RNG, which must be restored too
    (root / "model" / "config.json").write_text(json.dumps(config))
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_world.make_preference_rows(64, seed=0)))
    return root


@pytest.fixture(scope="module")
def runs(root):
    """A (uninterrupted) and B (killed after its first complete checkpoint, then resumed with `latest`)."""
    out_a, out_b = root / "a", root / "b"
    started = []
    try:
        started.append(proc_a := start(root, out_a, "a.log"))  # A and B's first launch run side by side
        started.append(proc_b := start(root, out_b, "b-killed.log"))
        # "Complete" is what `latest` trusts: the marker the trainer writes after every other file of the checkpoint.
        # Kill as soon as the first one appears; the 32 steps and 4 saves still to come leave the poll ample time.
        deadline = time.monotonic() + TIMEOUT_S
        while not complete_steps(out_b):
            assert proc_b.poll() is None, f"run B exited before its first checkpoint:\n{proc_b.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "run B wrote no complete checkpoint in time"
            time.sleep(0.002)
        os.kill(proc_b.pid, signal.SIGKILL)
        proc_b.wait(timeout=TIMEOUT_S)
        assert proc_b.returncode == -signal.SIGKILL
        killed_at = complete_steps(out_b)[-1]
        # The kill interrupted training: B had not reached its last step, let alone written final/.
        assert killed_at < MAX_STEPS and not (out_b / "final").exists()
        started.append(resumed := start(root, out_b, "b-resumed.log", "training.resume_from_checkpoint=latest"))
        resumed_output = finish(resumed)
        finish(proc_a)
    except BaseException:
        for proc in started:  # stop only what this fixture started
            if proc.poll() is None:
                proc.kill()
        raise
    return {"a": out_a, "b": out_b, "killed_at": killed_at, "resumed_output": resumed_output}


def test_killed_run_resumes_to_the_uninterrupted_result(runs, root):
    out_a, out_b, killed_at = runs["a"], runs["b"], runs["killed_at"]
    assert f"resuming from {out_b / f'checkpoint-{killed_at}'}" in runs["resumed_output"]

    final_b = policy(out_b / "final")
    assert_equal_tensors(final_b, policy(out_a / "final"), "final policy")

    last = f"checkpoint-{MAX_STEPS}"
    ref_a, ref_b = reference_state(out_a / last), reference_state(out_b / last)
    assert ref_a["updates"] == ref_b["updates"] == MAX_STEPS // 2
    assert_equal_tensors(ref_b["weights"], ref_a["weights"], "reference")
    # The reference moved: it is neither the SFT model nor (α = 0.5) the policy.
    sft = dict(AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32).named_parameters())
    assert any(not torch.equal(w, sft[name]) for name, w in ref_b["weights"].items())
    assert any(not torch.equal(w, final_b[name]) for name, w in ref_b["weights"].items())

    logs_a, logs_b = train_logs(out_a), train_logs(out_b)
    assert sorted(logs_a) == sorted(logs_b) == list(range(1, MAX_STEPS + 1))
    for step in range(killed_at + 1, MAX_STEPS + 1):  # computed by the resumed process
        assert logs_b[step] == logs_a[step], step  # loss, grad norm, learning rate, rewards, SamPO's kept fraction


def test_half_written_checkpoint_is_skipped_and_nothing_is_lost(runs, root, monkeypatch):
    """A process that dies after writing checkpoint-16's files but before its marker (the state a SIGKILL during
    saving leaves) with `save_total_limit=1`: checkpoint-8 must still be there, `latest` must pick it and not the
    half-written checkpoint-16, and the resumed run must end exactly where the uninterrupted one did."""
    out = root / "crash-while-saving"
    import align.io

    class Killed(BaseException):
        """Like SIGKILL: nothing after the point where it is raised runs (no `except Exception` catches it)."""

    write_json = align.io.atomic_write_json

    def dies_before_marking_16(path, data):
        if Path(path).name == CHECKPOINT_MARKER and data["global_step"] == 16:
            raise Killed
        write_json(path, data)

    monkeypatch.setattr(align.io, "atomic_write_json", dies_before_marking_16)
    with pytest.raises(Killed):
        train_in_process(root, out, "training.save_total_limit=1")
    monkeypatch.undo()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-8"]
    assert (out / "checkpoint-16" / "trainer_state.json").is_file()  # every file but the marker
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-16")  # what transformers would resume
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-8")

    summary = train_in_process(root, out, "training.save_total_limit=1", "training.resume_from_checkpoint=latest")
    assert summary["global_step"] == MAX_STEPS
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{MAX_STEPS}"]  # rotation still applies
    assert_equal_tensors(policy(out / "final"), policy(runs["a"] / "final"), "final policy")
    assert_equal_tensors(reference_state(out / f"checkpoint-{MAX_STEPS}")["weights"],
                         reference_state(runs["a"] / f"checkpoint-{MAX_STEPS}")["weights"], "reference")


def test_latest_without_a_complete_checkpoint_starts_at_step_0(runs, root):
    # Only a checkpoint cut short while saving (truncated optimizer, no trainer state, no marker): nothing to resume,
    # so the run starts from the SFT model and step 1 instead of failing on the truncated files.
    out = root / "nothing-complete"
    partial = out / "checkpoint-8"
    partial.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(runs["a"] / "checkpoint-8" / name, partial / name)
    optimizer = (runs["a"] / "checkpoint-8" / "optimizer.pt").read_bytes()
    (partial / "optimizer.pt").write_bytes(optimizer[: len(optimizer) // 2])
    assert latest_checkpoint(str(out)) is None
    summary = train_in_process(root, out, "training.resume_from_checkpoint=latest")
    logs = [entry for entry in summary["log_history"] if "loss" in entry]
    assert summary["global_step"] == MAX_STEPS and logs[0]["step"] == 1
    assert_equal_tensors(policy(out / "final"), policy(runs["a"] / "final"), "final policy")
    assert complete_steps(out) == list(range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS))  # checkpoint-8 rewritten

    assert latest_checkpoint(str(root / "does-not-exist")) is None


@pytest.mark.parametrize("last_step", [MAX_STEPS, 32], ids=["mid-epoch", "epoch-end"])
def test_resume_from_the_last_steps_checkpoint(runs, root, monkeypatch, last_step):
    """Killed after its last checkpoint but before final/: the relaunch must train no further step (transformers
    trains one more when the last step is mid-epoch) and must restore the moved reference (transformers restores
    state only when it runs an epoch, and at an epoch end it runs none), which the final evaluation uses."""
    out = root / f"killed-before-final-{last_step}"
    out.mkdir()
    shutil.copytree(runs["a"] / f"checkpoint-{last_step}", out / f"checkpoint-{last_step}")
    after_training = {}
    original = PreferenceTrainer.train

    def spy(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        after_training["reference"] = self.reference.state_dict()
        return result

    monkeypatch.setattr(PreferenceTrainer, "train", spy)
    summary = train_in_process(root, out, f"training.max_steps={last_step}", f"data.eval={root / 'pairs.jsonl'}",
                               "training.resume_from_checkpoint=latest")
    assert summary["global_step"] == last_step
    assert_equal_tensors(policy(out / "final"), policy(runs["a"] / f"checkpoint-{last_step}"), "final policy")
    saved = reference_state(runs["a"] / f"checkpoint-{last_step}")
    assert after_training["reference"]["updates"] == saved["updates"] == last_step // 2
    assert_equal_tensors(after_training["reference"]["weights"], saved["weights"], "reference")


def test_a_rewritten_checkpoint_is_unmarked_until_complete(runs, root, monkeypatch):
    # Resuming from checkpoint-32 next to a complete checkpoint-40 (of an earlier attempt) rewrites checkpoint-40:
    # while its files are being replaced it must not be marked complete, or a kill then leaves a mix of two writes
    # that `latest` would trust.
    out = root / "rewrite"
    out.mkdir()
    for step in (32, MAX_STEPS):
        shutil.copytree(runs["a"] / f"checkpoint-{step}", out / f"checkpoint-{step}")
    marked_while_saving = []
    save = Trainer._save_checkpoint

    def watch(self, model, trial):
        marked_while_saving.append((out / f"checkpoint-{self.state.global_step}" / CHECKPOINT_MARKER).exists())
        return save(self, model, trial)

    monkeypatch.setattr(Trainer, "_save_checkpoint", watch)
    train_in_process(root, out, f"training.resume_from_checkpoint={out / 'checkpoint-32'}")
    assert marked_while_saving == [False]
    assert complete_steps(out) == [32, MAX_STEPS]
    assert_equal_tensors(policy(out / "final"), policy(runs["a"] / "final"), "final policy")


@pytest.mark.parametrize("reference, objective, message", [
    (("reference.kind=frozen",), "sampo", "reference 'tr_dpo' (this run: 'frozen')"),
    (TR_DPO, "fdpo", "objective 'sampo' (this run: 'fdpo')"),
], ids=["frozen-reference", "fdpo-objective"])
def test_resume_with_another_reference_kind_or_objective_is_refused(runs, root, reference, objective, message):
    # A frozen reference would silently drop TR-DPO's moved weights and train against the SFT model.
    out = root / f"changed-{objective}-{reference[0].split('=')[1]}"
    out.mkdir()
    shutil.copytree(runs["a"] / "checkpoint-8", out / "checkpoint-8")
    with pytest.raises(AlignError, match=re.escape(message)):
        train_in_process(root, out, f"objective.name={objective}", "training.resume_from_checkpoint=latest",
                         reference=reference)
    assert not (out / "final").exists()


def test_resume_with_changed_parameters_is_refused_naming_each_change(runs, root, capsys):
    # SamPO's β and TR-DPO's α changed between the run that wrote checkpoint-8 and the one resuming it: the moved
    # reference and the optimizer state would continue under another objective. One line from `align train`.
    from align.cli import main

    marker = json.loads((runs["a"] / "checkpoint-8" / CHECKPOINT_MARKER).read_text())
    assert marker["model_only"] is False
    assert {key: marker["parameters"][key] for key in ("objective.beta", "objective.shared_indices",
                                                       "reference.alpha", "reference.tau")} == {
        "objective.beta": 0.1, "objective.shared_indices": True, "reference.alpha": 0.5, "reference.tau": 2}

    out = root / "changed-parameters"
    out.mkdir()
    shutil.copytree(runs["a"] / "checkpoint-8", out / "checkpoint-8")
    (out / "align_config.yaml").write_text("the recipe of the run that wrote checkpoint-8\n")
    listing = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    changed = ("objective.beta=0.2", "reference.alpha=0.25", "training.resume_from_checkpoint=latest")
    status = main(["train", "--config", "/dev/null", *overrides(root, out, *changed)])
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("align: error:")]
    assert status == 2 and "Traceback" not in stderr
    expected = (f"align: error: {out / 'checkpoint-8'}: written with other parameters (objective.beta: 0.1 → 0.2; "
                "reference.alpha: 0.5 → 0.25); resume it with the recipe that wrote it, set "
                "resume_with_changed_parameters=true to continue with the new values, or train into a new output_dir")
    assert errors == [expected]
    assert not (out / "final").exists() and complete_steps(out) == [8]
    # The refused run left the folder as it was: its recipe was not written over the one beside the checkpoint.
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == listing
    assert (out / "align_config.yaml").read_text() == "the recipe of the run that wrote checkpoint-8\n"

    # With the override the recipe resumes under the new values and records them.
    status = main(["train", "--config", "/dev/null", *overrides(root, out, *changed),
                   "resume_with_changed_parameters=true"])
    assert status == 0, capsys.readouterr().err[-2000:]
    assert (out / "final").is_dir()
    resolved = yaml.safe_load((out / "align_config.yaml").read_text())
    assert resolved["objective"]["beta"] == 0.2 and resolved["resume_with_changed_parameters"] is True
