"""`align quickstart` end to end on CPU: SFT → sampled pairs → f-DPO moves the gold reward up, at a positive KL.

One run (about a minute) shared by every test in the module.
"""

import json
import math
import struct

import pytest
import torch

pytestmark = pytest.mark.slow

SUMMARY_KEYS = ("gold_reward_before", "gold_reward_after", "kl_to_reference", "mean_length_before",
                "mean_length_after")


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    from align.recipes.quickstart import run_quickstart

    root = tmp_path_factory.mktemp("quickstart")
    out = root / "qs"
    # The folder as a previous quickstart and its user left it: the quickstart's own entries (stale), plus a run the
    # user trained there and a notes file, which a rerun must keep.
    from align.recipes.quickstart import MARKER

    (out / "sft").mkdir(parents=True)
    (out / "sft" / "stale.bin").write_bytes(b"old")
    (out / "summary.json").write_text("{}")
    (out / MARKER).write_text("{}")
    (out / "dpo-rerun" / "final").mkdir(parents=True)
    (out / "dpo-rerun" / "final" / "model.safetensors").write_bytes(b"user run")
    (out / "notes.md").write_text("my notes")
    returned = run_quickstart(out)
    return root, out, returned


def test_a_rerun_replaces_only_the_quickstarts_own_files(quickstart):
    _, out, _ = quickstart
    assert (out / "notes.md").read_text() == "my notes"
    assert (out / "dpo-rerun" / "final" / "model.safetensors").read_bytes() == b"user run"
    assert not (out / "sft" / "stale.bin").exists()  # the whole old sft/ was replaced, not merged
    assert (out / "sft" / "config.json").is_file()


def test_a_foreign_non_empty_folder_is_refused_before_anything_runs(tmp_path, capsys):
    from align.cli import main

    (tmp_path / "mine.txt").write_text("keep")
    assert main(["quickstart", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already holds files that no quickstart wrote (mine.txt)" in err
    assert "--overwrite" in err
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_summary_has_finite_numbers(quickstart):
    _, out, returned = quickstart
    summary = json.loads((out / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert isinstance(summary[key], (int, float)), key
        assert math.isfinite(summary[key]), key
    # the returned summary is the written one
    assert summary == json.loads(json.dumps(returned))
    assert summary["gold_reward_optimum"] == 16.0
    assert summary["eval_samples"] == 256 * 2
    assert summary["pairs"] > 500  # most of the 1500 sampled pairs are not ties
    assert summary["dpo_steps"] == math.ceil(summary["pairs"] / 32) * 2  # 2 epochs of batch 32
    assert summary["objective"] == {"name": "fdpo", "divergence": "reverse_kl", "beta": 0.1}
    for length in (summary["mean_length_before"], summary["mean_length_after"]):
        assert 1 <= length <= 24  # MAX_NEW_TOKENS words at most


def test_alignment_raises_the_gold_reward_at_a_positive_kl(quickstart):
    _, out, _ = quickstart
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gold_reward_after"] > summary["gold_reward_before"] + 0.5
    assert summary["gold_reward_after"] < summary["gold_reward_optimum"]
    assert summary["kl_to_reference"] > 0


def test_plot_is_a_valid_png(quickstart):
    _, out, _ = quickstart
    data = (out / "gold_reward.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (7 * 120, 4 * 120)  # figsize (7, 4) at dpi 120
    assert data[-8:-4] == b"IEND"


def test_outputs_are_complete(quickstart):
    _, out, _ = quickstart
    names = {p.name for p in out.iterdir()}
    assert {"base", "sft", "pairs.jsonl", "dpo", "summary.json", "gold_reward.png"} <= names
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    from align.toy_world import gold_reward

    for row in pairs[:200]:
        assert gold_reward(row["chosen"]) > gold_reward(row["rejected"])
    assert {"final", "align_config.yaml", "train_summary.json"} <= {p.name for p in (out / "dpo").iterdir()}


def test_dpo_final_loads_and_differs_from_sft(quickstart):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, _ = quickstart
    final = AutoModelForCausalLM.from_pretrained(out / "dpo" / "final", dtype=torch.float32)
    sft = AutoModelForCausalLM.from_pretrained(out / "sft", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out / "dpo" / "final")
    assert final.config.vocab_size == len(tokenizer) == 70
    delta = max((a - b).abs().max().item() for a, b in zip(final.parameters(), sft.parameters()))
    assert delta > 1e-3
    ids = torch.tensor([tokenizer("describe the movie .")["input_ids"]])
    with torch.no_grad():
        assert torch.isfinite(final(input_ids=ids).logits).all()


def test_no_temporary_siblings_left(quickstart):
    root, out, _ = quickstart
    assert [p.name for p in root.iterdir()] == ["qs"]
    from align.recipes.quickstart import MARKER

    hidden = [str(p.relative_to(out)) for p in out.rglob(".*")]
    assert hidden == [MARKER]


def test_saved_recipe_and_summary_name_the_final_paths(quickstart):
    """They were written while the quickstart was built under a temporary name (issue 12, finding 6)."""
    import yaml

    _, out, _ = quickstart
    config = yaml.safe_load((out / "dpo" / "align_config.yaml").read_text())
    assert config["model"]["name_or_path"] == str(out / "sft")
    assert config["training"]["output_dir"] == str(out / "dpo")
    summary = (out / "dpo" / "train_summary.json").read_text()
    assert ".tmp-" not in summary and str(out / "dpo" / "final") in summary
