"""`align rm train` resumes exactly: a SIGKILLed run relaunched with `training.resume_from_checkpoint=latest` ends
with the uninterrupted run's ensemble and evaluation, bit for bit; and the output folder's rules around it.

Run A is uninterrupted (in this process). Run B is a real process (forked from this one, so it needs no imports)
killed with SIGKILL once member 1 of its 2-member `seeds` ensemble has written a complete checkpoint (member 0 has
finished by then), then relaunched in this process with the same command plus
`training.resume_from_checkpoint=latest`: member 0 resumes from the checkpoint of its last
step (no further step), member 1 from its newest complete one. Attention dropout is on, members shuffle with their
own data seed and 25% of the labels are flipped, so the RNG states, data position and label noise must all survive.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from align import toy_world
from align.cli import main
from align.trainer import CHECKPOINT_MARKER

MAX_STEPS, SAVE_STEPS = 14, 2  # 64 pairs / 4 = 16 steps an epoch: the last step is mid-epoch
TIMEOUT_S = 300


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_model_dir):
    """A 2-member seeds recipe on the tiny Llama with attention dropout on (its config edited in a copy)."""
    import shutil

    root = tmp_path_factory.mktemp("rm-resume")
    model = root / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["attention_dropout"] = 0.1  # training draws from torch's global RNG
    (model / "config.json").write_text(json.dumps(config))
    train, held_out = toy_world.make_reward_model_splits(64, 16, seed=0)
    raw = {
        "model": {"name_or_path": str(model), "dtype": "float32"},
        "data": {"train": write_jsonl(root / "train.jsonl", train), "eval": write_jsonl(root / "eval.jsonl", held_out),
                 "max_length": 64, "max_prompt_length": None},
        "ensemble": {"kind": "seeds", "members": 2},
        "loss": {"label_noise": 0.25},
        "aggregation": {"method": "uwo", "lam": 0.5},
        "training": {"output_dir": str(root / "unused"), "per_device_train_batch_size": 4,
                     "per_device_eval_batch_size": 16, "learning_rate": 3e-3, "warmup_steps": 2,
                     "max_steps": MAX_STEPS, "logging_steps": 1, "save_strategy": "steps", "save_steps": SAVE_STEPS,
                     "report_to": "none", "disable_tqdm": True},
        "disable_dropout": False,
        "seed": 0,
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _train_quietly(argv: list[str], log: Path) -> None:
    """The child: `align rm train` with its output in `log` (exits with the command's status)."""
    with open(log, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        os._exit(main(argv))


def complete_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*") if (p / CHECKPOINT_MARKER).is_file())


def member_losses(out: Path, k: int) -> dict[int, float]:
    history = json.loads((out / "rm_summary.json").read_text())["runs"][k]["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def ensemble_tensors(out: Path) -> dict[str, dict]:
    return {k: load_file(out / "ensemble" / f"member-{k}" / "model.safetensors") for k in range(2)}


def test_killed_and_resumed_rm_run_equals_the_uninterrupted_one(recipe, tmp_path):
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    # A forked process (the modules this one imported come with it, so it starts in no time), killed for real.
    proc = multiprocessing.get_context("fork").Process(
        target=_train_quietly, args=(["rm", "train", "--config", str(recipe), f"training.output_dir={out_b}"],
                                     tmp_path / "b.log"))
    proc.start()
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not complete_steps(out_b / "member-1"):
            assert proc.is_alive(), (tmp_path / "b.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "run B wrote no complete checkpoint of member 1 in time"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=TIMEOUT_S)
    finally:
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == -signal.SIGKILL
    killed_at = complete_steps(out_b / "member-1")[-1]
    assert killed_at < MAX_STEPS and not (out_b / "ensemble").exists()
    assert complete_steps(out_b / "member-0")[-1] == MAX_STEPS  # member 0 had finished

    # Without resuming, the killed run's folder is refused (nothing is overwritten), before anything loads.
    assert main(["rm", "train", "--config", str(recipe), f"training.output_dir={out_b}"]) == 2

    assert main(["rm", "train", "--config", str(recipe), f"training.output_dir={out_a}"]) == 0
    # What the relaunch must not redo: member 0's run and member 1's steps up to the checkpoint (a run that trained
    # from scratch would end equal too, but would rewrite these files).
    kept = {p: p.stat().st_mtime_ns for p in [*(out_b / "member-0").rglob("*"),
                                                *(out_b / "member-1" / f"checkpoint-{killed_at}").rglob("*")]}
    assert main(["rm", "train", "--config", str(recipe), f"training.output_dir={out_b}",
                 "training.resume_from_checkpoint=latest"]) == 0
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert sorted(p.name for p in (out_b / "member-0").iterdir()) == sorted(
        p.name for p in (out_a / "member-0").iterdir())  # no checkpoint added to member 0

    a, b = ensemble_tensors(out_a), ensemble_tensors(out_b)
    for k in range(2):
        assert a[k].keys() == b[k].keys()
        for name, tensor in a[k].items():
            assert tensor.equal(b[k][name]), (k, name)
    summary_a = json.loads((out_a / "rm_summary.json").read_text())
    summary_b = json.loads((out_b / "rm_summary.json").read_text())
    assert summary_b["eval"] == summary_a["eval"]  # every member's and the ensemble's accuracy, ECE, margin, bins
    assert summary_b["global_steps"] == summary_a["global_steps"] == [MAX_STEPS, MAX_STEPS]
    assert summary_a["resumed_from"] == [None, None]
    assert [r["steps_this_launch"] for r in summary_a["runs"]] == [MAX_STEPS, MAX_STEPS]
    assert [r["steps_this_launch"] for r in summary_b["runs"]] == [0, MAX_STEPS - killed_at]
    assert summary_b["runs"][0]["train_loss"] is None and summary_b["runs"][1]["train_loss"] > 0
    assert summary_b["resumed_from"] == [str(out_b / "member-0" / f"checkpoint-{MAX_STEPS}"),
                                         str(out_b / "member-1" / f"checkpoint-{killed_at}")]
    # member 1's steps after the checkpoint were trained again, with the uninterrupted run's losses
    la, lb = member_losses(out_a, 1), member_losses(out_b, 1)
    assert max(la) == MAX_STEPS and all(lb[s] == la[s] for s in range(killed_at + 1, MAX_STEPS + 1))
    # the resumed (finished) run is never resumed into again: its ensemble/ stays
    assert main(["rm", "train", "--config", str(recipe), f"training.output_dir={out_b}",
                 "training.resume_from_checkpoint=latest"]) == 2


def test_latest_without_a_checkpoint_starts_from_scratch_with_a_warning(recipe, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="align.reward_models"):
        code = main(["rm", "train", "--config", str(recipe), f"training.output_dir={out}", "training.max_steps=2",
                     "training.save_steps=1", "training.save_total_limit=1", "training.resume_from_checkpoint=latest"])
    assert code == 0
    assert any("no complete checkpoint" in r.getMessage() and "training from the start" in r.getMessage()
               for r in caplog.records)
    summary = json.loads((out / "rm_summary.json").read_text())
    assert summary["global_steps"] == [2, 2] and summary["resumed_from"] == [None, None]
    for k in range(2):  # rotation (save_total_limit 1) ran after each new checkpoint was marked complete
        assert [p.name for p in (out / f"member-{k}").glob("checkpoint-*")] == ["checkpoint-2"]
        marker = json.loads((out / f"member-{k}" / "checkpoint-2" / CHECKPOINT_MARKER).read_text())
        assert marker == {"global_step": 2, "ensemble_kind": "seeds", "members": [f"member_{k}"], "seeds": [k],
                          "model_only": False}
    manifest = json.loads((out / "ensemble" / "manifest.json").read_text())
    assert manifest["max_length"] == 64 and manifest["truncation_side"] == "left"


def test_output_dir_with_files_is_refused_unless_resuming_or_overwriting(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "rm_config.yaml").write_text("kept: true\n")
    code = main(["rm", "train", "--config", str(recipe), f"training.output_dir={out}"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("align: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "training.output_dir" in lines[0] and "resume_from_checkpoint=latest" in lines[0]
    assert "overwrite=true" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["rm_config.yaml"]
    assert (out / "rm_config.yaml").read_text() == "kept: true\n"
    # overwrite=true writes into it (one step, no checkpoints)
    assert main(["rm", "train", "--config", str(recipe), f"training.output_dir={out}", "training.max_steps=1",
                 "training.save_strategy=no", "overwrite=true"]) == 0
    assert (out / "ensemble" / "manifest.json").is_file()


def test_a_checkpoint_written_by_another_recipe_is_refused(recipe, tmp_path, capsys):
    """The marker records kind, members and seeds: resumed with other seeds, the weights would be another
    ensemble's. A multi_head run that checkpointed and died before saving its ensemble (removed here)."""
    import shutil

    out = tmp_path / "run"
    common = ["rm", "train", "--config", str(recipe), f"training.output_dir={out}", "ensemble.kind=multi_head",
              "training.max_steps=2", "training.save_steps=2"]
    assert main(common) == 0
    shutil.rmtree(out / "ensemble")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    code = main([*common, "ensemble.seeds=[5, 6]", "training.resume_from_checkpoint=latest"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("align: error:")]
    assert code == 2 and len(lines) == 1, err
    assert f"{out / 'checkpoint-2'}: written with seeds [0, 1] (this run: [5, 6])" in lines[0]
    # the refused resume left the folder as it was: rm_config.yaml still holds the recipe that wrote the checkpoint
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # a model-only checkpoint (training.save_only_model) holds no optimizer or RNG state: refused when named
    marker_path = out / "checkpoint-2" / CHECKPOINT_MARKER
    marker = json.loads(marker_path.read_text())
    marker_path.write_text(json.dumps({**marker, "model_only": True}))
    code = main([*common, f"training.resume_from_checkpoint={out / 'checkpoint-2'}"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("align: error:")]
    assert code == 2 and len(lines) == 1 and "training.save_only_model=true" in lines[0], lines
    marker_path.write_text(json.dumps(marker))
    # the same recipe resumes it (its last step: nothing more to train) and saves the ensemble
    assert main([*common, f"training.resume_from_checkpoint={out / 'checkpoint-2'}"]) == 0
    assert json.loads((out / "rm_summary.json").read_text())["resumed_from"] == [str(out / "checkpoint-2")]
