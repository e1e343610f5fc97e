"""The real `align` console script, run as a subprocess the way a user runs it.

Bad input (a data row, a config key, a missing file) must give exit status 2, exactly one `align: error:` line
naming the file, row and field (or the dotted key), no traceback, and no output directory. All runs are started once
per module, two at a time (they are dominated by importing torch/transformers), and the tests read their results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from align import toy_world

ALIGN = Path(sys.executable).with_name("align")
TIMEOUT_S = 300


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DS_ACCELERATOR="cpu",
               # two runs share two cores: one thread each avoids OpenMP oversubscription
               OMP_NUM_THREADS="1")
    # Show what a user sees: no test-only silencing of transformers' logs or Python warnings.
    for key in ("TRANSFORMERS_VERBOSITY", "PYTHONWARNINGS"):
        env.pop(key, None)
    return env


def run_align(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(ALIGN), *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def _write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _recipe(model_dir: Path, train_file: str, **sections) -> dict:
    recipe = {
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "data": {"train": train_file, "max_length": 24, "max_prompt_length": None},
        "objective": {"name": "fdpo", "divergence": "reverse_kl", "beta": 0.1},
        "reference": {"kind": "frozen"},
        "training": {"output_dir": "out", "max_steps": 1, "report_to": "none", "save_strategy": "no"},
        "seed": 0,
    }
    for section, values in sections.items():
        recipe[section].update(values)
    return recipe


def _rows() -> list[dict]:
    return toy_world.make_preference_rows(4, seed=0)


def _missing_field(d, model):
    rows = _rows()
    del rows[2]["rejected"]
    _write_jsonl(d / "missing_field.jsonl", rows)
    return _recipe(model, "missing_field.jsonl")


def _empty_field(d, model):
    rows = _rows()
    rows[1]["chosen"] = ""
    _write_jsonl(d / "empty_field.jsonl", rows)
    return _recipe(model, "empty_field.jsonl")


def _non_string(d, model):
    rows = _rows()
    rows[2]["chosen"] = 5
    _write_jsonl(d / "non_string.jsonl", rows)
    return _recipe(model, "non_string.jsonl")


def _unknown_role(d, model):
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
             "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]} for r in _rows()]
    rows[1]["chosen"][0]["role"] = "robot"
    _write_jsonl(d / "unknown_role.jsonl", rows)
    return _recipe(model, "unknown_role.jsonl")


def _prompt_too_long(d, model):
    rows = _rows()
    rows[3]["prompt"] = " ".join(["the movie was great ."] * 6)  # 30 words + BOS > max_length 24
    _write_jsonl(d / "long_prompt.jsonl", rows)
    return _recipe(model, "long_prompt.jsonl")  # max_prompt_length: null, so nothing truncates the prompt


def _good_data(d, name="pairs.jsonl"):
    _write_jsonl(d / name, _rows())
    return name


def _unknown_divergence(d, model):
    return _recipe(model, _good_data(d), objective={"divergence": "chi_square_ish"})


def _unknown_objective(d, model):
    return _recipe(model, _good_data(d), objective={"name": "ppo"})


def _unknown_key(d, model):
    recipe = _recipe(model, _good_data(d))
    recipe["data"]["max_lenght"] = 32  # typo
    return recipe


def _missing_data_file(d, model):
    return _recipe(model, "no_such_data.jsonl")


def _missing_model_path(d, model):
    (d / "outputs").mkdir()  # `outputs/nope` is then a local path, not a Hub id (issue 12: no minute of Hub retries)
    return _recipe(Path("outputs/nope"), _good_data(d))


def _bad_resume_path(d, model):
    return _recipe(model, _good_data(d), training={"resume_from_checkpoint": "nowhere"})


def _incomplete_checkpoint(d, model):
    # Refused in Trainer.train, after transformers.Trainer's constructor has created output_dir: the set-up guard must
    # remove it again (issue 12: an error in set-up leaves the output folder as it was).
    (d / "checkpoint-3").mkdir()
    return _recipe(model, _good_data(d), training={"resume_from_checkpoint": "checkpoint-3"})


def _malformed_jsonl(d, model):
    lines = [json.dumps(r) for r in _rows()]
    lines[2] = lines[2][:-5]  # a line cut short
    (d / "cut.jsonl").write_text("\n".join(lines) + "\n")
    return _recipe(model, "cut.jsonl")


def _empty_file(d, model):
    (d / "empty.jsonl").write_text("")
    return _recipe(model, "empty.jsonl")


def _bad_data_and_missing_model(d, model):
    # The README's `data.train=bad.jsonl` example on a fresh clone: the data error comes first, before any model.
    recipe = _missing_field(d, model)
    recipe["model"]["name_or_path"] = "./no-model-here"
    return recipe


@dataclass
class Case:
    name: str
    setup: object  # (case dir, model dir) -> recipe dict, or None for no config file
    must_contain: tuple[str, ...]  # in the error line
    config_name: str = "recipe.yaml"
    quiet: bool = True  # stderr is the error line alone (False: it fails after align's own progress lines)


CASES = [
    Case("missing_field", _missing_field, ("missing_field.jsonl", "row 3", "'rejected'")),
    Case("empty_field", _empty_field, ("empty_field.jsonl", "row 2", "'chosen'", "empty")),
    Case("non_string_completion", _non_string, ("non_string.jsonl", "row 3", "'chosen'", "must be a string")),
    Case("unknown_chat_role", _unknown_role, ("unknown_role.jsonl", "row 2", "chosen[0].role", "'robot'")),
    Case("prompt_longer_than_max_length", _prompt_too_long, ("long_prompt.jsonl", "row 4", "'prompt'", "max_length")),
    Case("unknown_divergence", _unknown_divergence, ("divergence.yaml", "objective.divergence", "chi_square_ish"),
         config_name="divergence.yaml"),
    Case("unknown_objective", _unknown_objective, ("objective.yaml", "objective.name", "'ppo'"),
         config_name="objective.yaml"),
    Case("unknown_config_key", _unknown_key, ("typo.yaml", "data.max_lenght", "unknown key"), config_name="typo.yaml"),
    Case("missing_config_file", lambda d, model: None, ("missing.yaml",), config_name="missing.yaml"),
    Case("missing_data_file", _missing_data_file, ("no_such_data.jsonl", "not found")),
    Case("missing_model_path", _missing_model_path, ("model.name_or_path", "'outputs/nope'", "does not exist")),
    Case("bad_resume_path", _bad_resume_path, ("training.resume_from_checkpoint", "'nowhere'", "not a checkpoint")),
    Case("incomplete_checkpoint", _incomplete_checkpoint, ("checkpoint-3", "missing align_state_0.pt"), quiet=False),
    Case("malformed_jsonl", _malformed_jsonl, ("cut.jsonl", "line 3", "not valid JSON")),
    Case("empty_data_file", _empty_file, ("empty.jsonl", "file is empty (no rows)")),
    Case("bad_data_before_missing_model", _bad_data_and_missing_model, ("missing_field.jsonl", "row 3", "'rejected'")),
]
CASE_IDS = [c.name for c in CASES]


@dataclass
class Outcome:
    case: Case
    cwd: Path
    before: list[str]
    after: list[str]
    proc: subprocess.CompletedProcess

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.proc.stderr.splitlines() if line.startswith("align: error:")]


def _listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def _run_case(case: Case, root: Path, model_dir: Path) -> Outcome:
    d = root / case.name
    d.mkdir()
    recipe = case.setup(d, model_dir)
    if recipe is not None:
        (d / case.config_name).write_text(yaml.safe_dump(recipe, sort_keys=False))
    before = _listing(d)
    proc = run_align("train", "--config", case.config_name, cwd=d)
    return Outcome(case, d, before, _listing(d), proc)


def _run_success(root: Path, model_dir: Path) -> Outcome:
    d = root / "success"
    d.mkdir()
    _write_jsonl(d / "pairs.jsonl", toy_world.make_preference_rows(32, seed=0))
    recipe = _recipe(model_dir, "pairs.jsonl", data={"max_length": 48, "max_prompt_length": 16})
    (d / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    before = _listing(d)
    proc = run_align("train", "--config", "recipe.yaml", "training.output_dir=run", "training.max_steps=2",
                     "training.per_device_train_batch_size=16", "training.learning_rate=1.0e-3",
                     "training.logging_steps=1", "objective.beta=0.2", cwd=d)
    return Outcome(None, d, before, _listing(d), proc)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, tiny_model_dir) -> dict[str, Outcome]:
    assert ALIGN.exists(), f"console script not installed at {ALIGN}"
    root = tmp_path_factory.mktemp("cli")
    with ThreadPoolExecutor(max_workers=2) as pool:
        success = pool.submit(_run_success, root, tiny_model_dir)  # the longest first
        futures = {case.name: pool.submit(_run_case, case, root, tiny_model_dir) for case in CASES}
        results = {name: f.result() for name, f in futures.items()}
        results["success"] = success.result()
    return results


def _describe(o: Outcome) -> str:
    return f"exit {o.proc.returncode}\n--- stdout\n{o.proc.stdout[-3000:]}\n--- stderr\n{o.proc.stderr[-3000:]}"


# --- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_IDS)
def test_bad_input_exits_2_without_traceback_or_output(outcomes, name):
    o = outcomes[name]
    assert o.proc.returncode == 2, _describe(o)
    assert "Traceback" not in o.proc.stdout + o.proc.stderr, _describe(o)
    assert o.after == o.before  # no output_dir, no temp sibling, nothing else written
    assert not (o.cwd / "out").exists()


@pytest.mark.parametrize("name", CASE_IDS)
def test_bad_input_error_line_names_file_row_and_field(outcomes, name):
    o = outcomes[name]
    assert len(o.error_lines) == 1, _describe(o)
    line = o.error_lines[0]
    for part in o.case.must_contain:
        assert part in line, f"{part!r} not in {line!r}"


@pytest.mark.parametrize("name", [c.name for c in CASES if c.quiet])
def test_stderr_is_only_the_error_line(outcomes, name):
    o = outcomes[name]
    assert o.proc.stderr.splitlines() == o.error_lines, _describe(o)
    assert o.proc.stdout == ""


def test_unknown_divergence_error_line_names_divergence_and_value(outcomes):
    # the looser check: the word and the value are there even where the dotted key is not
    line = outcomes["unknown_divergence"].error_lines[0]
    assert "objective" in line and "divergence" in line and "'chi_square_ish'" in line


# --- a successful run ----------------------------------------------------------------------------------------------


def test_train_runs_and_writes_its_outputs(outcomes):
    o = outcomes["success"]
    assert o.proc.returncode == 0, _describe(o)
    assert "Traceback" not in o.proc.stdout + o.proc.stderr
    assert "align: error" not in o.proc.stderr
    assert "trained 2 steps; final model in run/final" in o.proc.stdout.splitlines()
    # Quiet by default: align's own lines and the training bar, no transformers load bars or reports.
    for noise in ("Loading weights", "Writing model shards", "FutureWarning", "MISSING"):
        assert noise not in o.proc.stderr, noise
    assert "100%" in o.proc.stderr  # the training bar is the one bar shown

    run = o.cwd / "run"
    assert {"final", "align_config.yaml", "train_summary.json"} <= {p.name for p in run.iterdir()}
    assert not [p.name for p in o.cwd.iterdir() if p.name.startswith(".")]  # no temp siblings of run/
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # nor of final/
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (run / "final").iterdir()}

    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["global_step"] == 2
    assert summary["final_model"] == "run/final"
    assert summary["data"]["rows"] == summary["data"]["kept"] == 32
    assert summary["data"]["dropped"] == 0
    assert 0.0 < summary["train_loss"] < 2.0

    resolved = yaml.safe_load((run / "align_config.yaml").read_text())
    assert resolved["objective"] == {"name": "fdpo", "divergence": "reverse_kl", "beta": 0.2}
    assert resolved["training"]["max_steps"] == 2
    assert resolved["training"]["learning_rate"] == 1e-3
    assert resolved["training"]["output_dir"] == "run"
    assert resolved["data"]["max_length"] == 48


def test_trained_model_loads_and_moved(outcomes, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = outcomes["success"].cwd / "run" / "final"
    trained = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert trained.config.vocab_size == initial.config.vocab_size
    delta = max((a - b).abs().max().item() for a, b in zip(trained.parameters(), initial.parameters()))
    assert delta > 1e-4  # two steps at lr 1e-3 changed the weights
    assert AutoTokenizer.from_pretrained(final).get_vocab() == AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()


# --- help ----------------------------------------------------------------------------------------------------------


def test_help(tmp_path):
    proc = run_align("--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: align")
    assert "train" in proc.stdout and "quickstart" in proc.stdout
    assert proc.stderr == ""


def test_train_help(tmp_path):
    proc = run_align("train", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: align train")
    assert "--config" in proc.stdout and "key=value" in proc.stdout and "objective.beta=0.2" in proc.stdout


def test_train_without_config_is_a_usage_error(tmp_path):
    proc = run_align("train", cwd=tmp_path)
    assert proc.returncode == 2
    assert "the following arguments are required: --config" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_no_command_is_a_usage_error(tmp_path):
    proc = run_align(cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: align")


def test_a_second_train_into_a_finished_run_is_refused(outcomes):
    """Nothing lost (issue 12, finding 1): the same command again refuses to write over the finished run, in one
    line and before anything is loaded; `overwrite=true` writes into it; resuming from it stays allowed."""
    o = outcomes["success"]
    run = o.cwd / "run"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    proc = run_align("train", "--config", "recipe.yaml", "training.output_dir=run", "training.max_steps=2", cwd=o.cwd)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("align: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "training.output_dir: 'run' already holds files (align_config.yaml, final, train_summary.json)" in errors[0]
    assert "overwrite=true" in errors[0] and "Traceback" not in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # untouched
    proc = run_align("train", "--config", "recipe.yaml", "training.output_dir=run", "training.max_steps=1",
                     "overwrite=true", cwd=o.cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run / "train_summary.json").read_text())["global_step"] == 1


def test_main_leaves_a_process_group_it_did_not_start(tmp_path):
    """`align.cli.main` in a process that already has a process group (a notebook, a test session holding an
    in-process vLLM engine) must not destroy it on success; it ends only a group its command started."""
    import torch.distributed as dist

    from align.cli import main

    started_here = not dist.is_initialized()  # in .venv-vllm the session's in-process vLLM engine already holds one
    if started_here:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert main(["rm", "toy-data", "--out", str(tmp_path / "toy"), "--train-pairs", "8", "--eval-pairs", "4"]) == 0
        assert dist.is_initialized()
    finally:
        if started_here:
            dist.destroy_process_group()
