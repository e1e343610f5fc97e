"""`align rm train | score | toy-data` through `align.cli.main` (in process), plus one real console-script run.

Bad input: exit status 2, one `align: error:` line naming the file/row/field or the dotted key, no traceback, and
nothing written or overwritten.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from align import toy_world
from align.cli import main

REPO = Path(__file__).resolve().parents[2]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("align: error:")]


def assert_one_line_error(code: int, err: str, *parts: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1, err
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe(toy: Path, out: str, **sections) -> dict:
    """configs/rm/toy-ensemble.yaml pointed at `toy`, 2 members, a few steps."""
    raw = yaml.safe_load((REPO / "configs" / "rm" / "toy-ensemble.yaml").read_text())
    raw["model"]["name_or_path"] = str(toy / "base")
    raw["data"]["train"], raw["data"]["eval"] = str(toy / "train.jsonl"), str(toy / "eval.jsonl")
    raw["ensemble"]["members"] = 2
    raw["training"].update(output_dir=out, max_steps=2, logging_steps=1, report_to="none", disable_tqdm=True)
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """`align rm toy-data` output and a 2-member ensemble trained from it with `align rm train`."""
    root = tmp_path_factory.mktemp("rm-cli")
    toy = root / "toy"
    assert main(["rm", "toy-data", "--out", str(toy), "--train-pairs", "96", "--eval-pairs", "48"]) == 0
    config = root / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe(toy, str(root / "run")), sort_keys=False))
    code = main(["rm", "train", "--config", str(config), "training.learning_rate=1.0e-3", "loss.label_noise=0.25"])
    assert code == 0
    return {"root": root, "toy": toy, "config": config, "run": root / "run", "ensemble": root / "run" / "ensemble"}


@pytest.fixture
def rows_file(tmp_path):
    rows = [{"id": i, "prompt": r["prompt"], "response": r["chosen"]}
            for i, r in enumerate(toy_world.make_preference_rows(5, seed=7))]
    rows.append({"id": 5, "prompt": [{"role": "user", "content": "describe the movie ."}],
                 "response": "the movie was great .", "note": "chat row"})
    return write_jsonl(tmp_path / "rows.jsonl", rows), rows


# --- toy-data and train ----------------------------------------------------------------------------------------------


def test_toy_data_writes_what_the_recipe_reads(world, capsys):
    toy = world["toy"]
    assert {p.name for p in toy.iterdir()} == {"base", "train.jsonl", "eval.jsonl"}
    assert (toy / "base" / "config.json").is_file() and (toy / "base" / "tokenizer.json").is_file()
    train = [json.loads(line) for line in (toy / "train.jsonl").read_text().splitlines()]
    held_out = [json.loads(line) for line in (toy / "eval.jsonl").read_text().splitlines()]
    assert len(train) == 96 and len(held_out) == 48
    assert all(toy_world.gold_reward(r["chosen"]) > toy_world.gold_reward(r["rejected"]) for r in train + held_out)
    before = listing(toy)
    code, _, err = run(capsys, "rm", "toy-data", "--out", str(toy))
    assert_one_line_error(code, err, str(toy), "already exists", "--overwrite")
    assert listing(toy) == before


def test_train_writes_the_ensemble_and_reports(world):
    run_dir = world["run"]
    assert {"ensemble", "rm_config.yaml", "rm_summary.json", "calibration.png"} <= {p.name for p in run_dir.iterdir()}
    summary = json.loads((run_dir / "rm_summary.json").read_text())
    assert summary["kind"] == "seeds" and summary["num_members"] == 2 and summary["global_steps"] == [2, 2]
    assert summary["label_noise"]["flipped"] == 24  # 25% of 96
    assert set(summary["eval"]["members"]) == {"member_0", "member_1"} and summary["eval"]["ensemble"]
    resolved = yaml.safe_load((run_dir / "rm_config.yaml").read_text())
    assert resolved["training"]["learning_rate"] == 1e-3 and resolved["loss"]["label_noise"] == 0.25


def test_train_prints_one_summary_line(world, capsys, tmp_path):
    code, out, err = run(capsys, "rm", "train", "--config", str(world["config"]),
                         f"training.output_dir={tmp_path / 'again'}", "ensemble.kind=multi_head", "training.max_steps=1")
    assert code == 0, err
    line = out.strip().splitlines()[-1]
    assert line.startswith("trained 2 reward member(s) (multi_head, 1 steps); ensemble in ")
    assert "eval accuracy per member" in line and "ensemble (mean) accuracy" in line


# --- score -----------------------------------------------------------------------------------------------------------


def test_score_writes_every_field_member_rewards_and_the_aggregate(world, rows_file, capsys, tmp_path):
    path, rows = rows_file
    output = tmp_path / "scored.jsonl"
    code, out, err = run(capsys, "rm", "score", "--ensemble", str(world["ensemble"]), "--input", str(path),
                         "--output", str(output), "--batch-size", "4")
    assert code == 0, err
    assert f"scored 6 rows with 2 member(s), aggregation mean; wrote {output}" in out
    scored = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(scored) == 6
    for row, result in zip(rows, scored):
        assert {k: result[k] for k in row} == row  # every input field, unchanged
        assert len(result["rewards"]) == 2
        assert result["reward"] == pytest.approx(sum(result["rewards"]) / 2, abs=1e-6)
    assert len({tuple(r["rewards"]) for r in scored}) == 6  # the rows really were scored one by one

    # another aggregation: UWO (λ = 0.5, population variance), same member rewards
    uwo = tmp_path / "uwo.jsonl"
    code, out, err = run(capsys, "rm", "score", "--ensemble", str(world["ensemble"]), "--input", str(path),
                         "--output", str(uwo), "--aggregation", "uwo", "--lam", "0.5")
    assert code == 0, err
    assert "aggregation uwo (lam=0.5, ddof=0)" in out
    for before, after in zip(scored, (json.loads(line) for line in uwo.read_text().splitlines())):
        a, b = after["rewards"]
        assert after["rewards"] == pytest.approx(before["rewards"], abs=1e-5)  # other batches: other padding
        assert after["reward"] == pytest.approx((a + b) / 2 - 0.5 * ((a - b) / 2) ** 2, abs=1e-6)


def test_score_never_overwrites_without_the_flag(world, rows_file, capsys, tmp_path):
    path, _ = rows_file
    output = tmp_path / "scored.jsonl"
    output.write_text("keep me\n")
    code, _, err = run(capsys, "rm", "score", "--ensemble", str(world["ensemble"]), "--input", str(path),
                       "--output", str(output))
    assert_one_line_error(code, err, str(output), "already exists", "--overwrite")
    assert output.read_text() == "keep me\n"
    code, _, err = run(capsys, "rm", "score", "--ensemble", str(world["ensemble"]), "--input", str(path),
                       "--output", str(output), "--overwrite")
    assert code == 0, err
    assert len(output.read_text().splitlines()) == 6


@pytest.mark.parametrize("mutate, parts", [
    (lambda rows: rows[1].pop("response"), ("row 2", "'response'", "missing")),
    (lambda rows: rows[2].update(response=""), ("row 3", "'response'", "empty")),
    (lambda rows: rows[0].update(prompt=7), ("row 1", "'prompt'", "must be a string")),
    (lambda rows: rows[5]["prompt"][0].update(role="robot"), ("row 6", "prompt[0].role", "'robot'")),
])
def test_score_bad_rows_name_file_row_and_field(world, rows_file, capsys, tmp_path, mutate, parts):
    _, rows = rows_file
    mutate(rows)
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    output = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "rm", "score", "--ensemble", str(world["ensemble"]), "--input", str(path),
                       "--output", str(output))
    assert_one_line_error(code, err, str(path), *parts)
    assert not output.exists()


def test_score_refuses_a_broken_ensemble(world, rows_file, capsys, tmp_path):
    path, _ = rows_file
    output = tmp_path / "out.jsonl"
    missing = tmp_path / "missing-member"
    shutil.copytree(world["ensemble"], missing)
    shutil.rmtree(missing / "member-1")
    code, _, err = run(capsys, "rm", "score", "--ensemble", str(missing), "--input", str(path), "--output",
                       str(output))
    assert_one_line_error(code, err, str(missing), "member-1", "missing")

    changed = tmp_path / "changed-weights"
    shutil.copytree(world["ensemble"], changed)
    with open(changed / "member-0" / "model.safetensors", "ab") as f:
        f.write(b"\0")
    code, _, err = run(capsys, "rm", "score", "--ensemble", str(changed), "--input", str(path), "--output",
                       str(output))
    assert_one_line_error(code, err, str(changed), "model.safetensors", "does not match manifest.json")
    assert not output.exists()


def test_score_refuses_bad_aggregation_flags(world, rows_file, capsys, tmp_path):
    path, _ = rows_file
    output = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "rm", "score", "--ensemble", str(world["ensemble"]), "--input", str(path),
                       "--output", str(output), "--aggregation", "uwo", "--lam", "-0.5")
    assert_one_line_error(code, err, "--lam", "must be >= 0")
    code, _, err = run(capsys, "rm", "score", "--ensemble", str(world["ensemble"]), "--input", str(path),
                       "--output", str(output), "--aggregation", "median")
    assert_one_line_error(code, err, "--aggregation", "'median'")
    assert not output.exists()


def test_score_refuses_bad_flags_before_any_member_loads(world, rows_file, capsys, tmp_path, monkeypatch):
    from reward_models.ensemble import RewardEnsemble

    def refuse(*args, **kwargs):
        raise AssertionError("the ensemble was loaded before the flags were checked")

    monkeypatch.setattr(RewardEnsemble, "load", refuse)
    path, _ = rows_file
    output = tmp_path / "out.jsonl"
    base = ["rm", "score", "--ensemble", str(world["ensemble"]), "--input", str(path), "--output", str(output)]
    for flags, parts in [(["--aggregation", "wcoo"], ("--aggregation", "'wcoo'", "mean, uwo, wco")),
                         (["--aggregation", "uwo", "--lam", "nan"], ("--lam", "finite")),
                         (["--aggregation", "uwo", "--lam", "-1"], ("--lam", ">= 0")),
                         (["--lam", "0.5"], ("--lam", "unknown parameter for 'mean'")),  # the saved method: mean
                         (["--aggregation", "uwo", "--ddof", "2"], ("--ddof", "0 (population variance)"))]:
        code, _, err = run(capsys, *base, *flags)
        assert_one_line_error(code, err, *parts)
    assert not output.exists()


def test_score_refuses_an_output_in_a_folder_that_does_not_exist(world, rows_file, capsys, tmp_path):
    path, _ = rows_file
    output = tmp_path / "no-such-folder" / "scored.jsonl"
    code, _, err = run(capsys, "rm", "score", "--ensemble", str(world["ensemble"]), "--input", str(path),
                       "--output", str(output))
    assert_one_line_error(code, err, "--output", str(output.parent), "does not exist")
    assert not output.parent.exists()  # not created


def test_score_truncates_rows_longer_than_the_trained_length_and_says_so(world, capsys, tmp_path, caplog):
    from align.data import tokenize_pairs
    from reward_models.ensemble import RewardEnsemble

    long_response = " ".join(["the movie was great ."] * 20)  # 100 words: longer than data.max_length 64
    rows = [{"prompt": "write a review of the movie .", "response": long_response},
            {"prompt": "write a review of the movie .", "response": "the movie was great ."}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    output = tmp_path / "scored.jsonl"
    with caplog.at_level(logging.WARNING, logger="align.reward_models"):
        code, _, err = run(capsys, "rm", "score", "--ensemble", str(world["ensemble"]), "--input", str(path),
                           "--output", str(output))
    assert code == 0, err
    said = [r.getMessage() for r in caplog.records if "longer than" in r.getMessage()]
    assert said == [(f"{path}: 1 of 2 rows are longer than the ensemble's trained max_length (64 tokens) and were "
                     "scored on their last 64 tokens")]
    ensemble = RewardEnsemble.load(world["ensemble"], device="cpu")
    ids = tokenize_pairs(ensemble.tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows])
    expected, _ = ensemble.score_ids([ids[0][-64:], ids[1]])
    scored = [json.loads(line) for line in output.read_text().splitlines()]
    for row, want in zip(scored, expected.tolist(), strict=True):
        assert row["rewards"] == pytest.approx(want, abs=1e-6)
    whole, _ = ensemble.score_ids([ids[0]])
    assert scored[0]["rewards"] != pytest.approx(whole[0].tolist(), abs=1e-6)  # the cut changed the reward
    # an explicit --max-length wins
    caplog.clear()
    wide = tmp_path / "wide.jsonl"
    code, _, err = run(capsys, "rm", "score", "--ensemble", str(world["ensemble"]), "--input", str(path),
                       "--output", str(wide), "--max-length", "200")
    assert code == 0, err
    assert json.loads(wide.read_text().splitlines()[0])["rewards"] == pytest.approx(whole[0].tolist(), abs=1e-6)
    assert not [r for r in caplog.records if "longer than" in r.getMessage()]


# --- train: bad input, nothing written -------------------------------------------------------------------------------


def _train_bad(capsys, tmp_path, raw: dict, *overrides: str) -> tuple[str, Path]:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    before = listing(tmp_path)
    code, _, err = run(capsys, "rm", "train", "--config", str(config), *overrides)
    line = assert_one_line_error(code, err)
    assert listing(tmp_path) == before  # no output_dir, no temporary sibling
    return line, config


def test_train_wco_with_one_member_is_refused(world, capsys, tmp_path):
    raw = recipe(world["toy"], str(tmp_path / "out"), ensemble={"members": 1}, aggregation={"method": "wco"})
    line, config = _train_bad(capsys, tmp_path, raw)
    assert str(config) in line and "aggregation.method" in line and "at least 2" in line


def test_train_negative_lambda_is_refused(world, capsys, tmp_path):
    raw = recipe(world["toy"], str(tmp_path / "out"), aggregation={"method": "uwo"})
    line, config = _train_bad(capsys, tmp_path, raw, "aggregation.lam=-0.1")
    assert str(config) in line and "aggregation.lam" in line and ">= 0" in line


def test_train_unknown_key_and_bad_values_name_the_dotted_key(world, capsys, tmp_path):
    raw = recipe(world["toy"], str(tmp_path / "out"))
    line, _ = _train_bad(capsys, tmp_path, raw, "ensemble.membres=3")
    assert "ensemble.membres" in line and "unknown key" in line
    line, _ = _train_bad(capsys, tmp_path, raw, "loss.label_noise=0.6")
    assert "loss.label_noise" in line
    line, _ = _train_bad(capsys, tmp_path, raw, "ensemble.kind=multi_head", "ensemble.data_order=per_member")
    assert "ensemble.data_order" in line


def test_train_bad_data_row_names_file_row_and_field(world, capsys, tmp_path):
    rows = [json.loads(line) for line in (world["toy"] / "train.jsonl").read_text().splitlines()][:8]
    rows[4]["rejected"] = ""
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    raw = recipe(world["toy"], str(tmp_path / "out"), data={"train": str(data)})
    line, _ = _train_bad(capsys, tmp_path, raw)
    assert str(data) in line and "row 5" in line and "'rejected'" in line and "empty" in line


def test_train_missing_model_is_refused_before_writing(world, capsys, tmp_path):
    raw = recipe(world["toy"], str(tmp_path / "out"), model={"name_or_path": str(tmp_path / "no-model")})
    line, _ = _train_bad(capsys, tmp_path, raw)
    assert "model.name_or_path" in line


def test_train_failing_once_the_trainer_exists_leaves_no_folder(world, capsys, tmp_path):
    # Refused in RewardTrainer's constructor, after transformers.Trainer has set up its output folder: the set-up
    # guard removes what the run created, so the same command, corrected, is not refused for a non-empty folder.
    raw = recipe(world["toy"], str(tmp_path / "out"))
    line, _ = _train_bad(capsys, tmp_path, raw, "training.activation_checkpointing=true",
                         "training.activation_checkpointing_kwargs={every_n_layers: 2}")
    assert "training.activation_checkpointing_kwargs" in line


# --- the console script, as a user runs it --------------------------------------------------------------------------


def test_console_script_error_is_one_clean_line(world, tmp_path):
    rows = [{"prompt": "describe the movie .", "response": " the movie was great ."}, {"prompt": "review the book ."}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    align = Path(sys.executable).with_name("align")
    proc = subprocess.run([str(align), "rm", "score", "--ensemble", str(world["ensemble"]), "--input", str(path),
                           "--output", str(tmp_path / "out.jsonl")], capture_output=True, text=True, timeout=300,
                          env={"PATH": str(align.parent), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                               "DS_ACCELERATOR": "cpu"}, check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"align: error: {path}: row 2: field 'response': is missing"]
    assert proc.stdout == "" and not (tmp_path / "out.jsonl").exists()


def test_rm_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["rm", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: align rm") and all(cmd in out for cmd in ("train", "score", "toy-data"))
