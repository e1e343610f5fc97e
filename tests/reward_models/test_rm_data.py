"""Reward-model data (reward_models/data.py): label noise, tokenization shared with scoring, bad rows, the collator.

(Named test_rm_data.py, not test_data.py: tests/ has no __init__.py files, so two test modules with one basename
would collide in pytest's default import mode.)
"""

import json

import pytest
import torch

from align import toy_world
from align.data import DataConfig, tokenize_pairs
from align.errors import DataError
from reward_models.data import RewardCollator, build_reward_dataset, inject_label_noise, tokenize_reward_pairs


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --- label noise ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, fraction, expected", [
    (1000, 0.25, 250), (2000, 0.25, 500), (7, 0.25, 2), (2, 0.25, 1), (10, 0.0, 0), (3, 1.0, 3), (5, 0.1, 1),
    (6, 0.25, 2),  # 1.5 rounds up (half up, not Python's half-to-even)
])
def test_noise_flips_exactly_the_requested_fraction(n, fraction, expected):
    indices = inject_label_noise(n, fraction, seed=0)
    assert len(indices) == expected
    assert len(set(indices)) == expected and indices == sorted(indices)
    assert all(0 <= i < n for i in indices)


def test_noise_is_seeded_and_reproducible():
    assert inject_label_noise(500, 0.25, seed=3) == inject_label_noise(500, 0.25, seed=3)
    assert inject_label_noise(500, 0.25, seed=3) != inject_label_noise(500, 0.25, seed=4)
    with pytest.raises(ValueError):
        inject_label_noise(10, 1.5, seed=0)


def test_flip_swaps_chosen_and_rejected(toy_tokenizer):
    rows = toy_world.make_preference_rows(8, seed=0)
    pairs, _ = tokenize_reward_pairs(rows, toy_tokenizer, max_length=None)
    before_c, before_r = list(pairs.chosen_input_ids), list(pairs.rejected_input_ids)
    flipped = inject_label_noise(len(pairs), 0.25, seed=1)
    pairs.flip(flipped)
    assert pairs.flipped == tuple(flipped) and len(flipped) == 2
    for i in range(len(pairs)):
        if i in flipped:
            assert pairs[i] == {"chosen_input_ids": before_r[i], "rejected_input_ids": before_c[i]}
            assert pairs.chosen[i] == rows[i]["rejected"]
        else:
            assert pairs[i] == {"chosen_input_ids": before_c[i], "rejected_input_ids": before_r[i]}
    pairs.flip(flipped)  # twice restores
    assert pairs.chosen_input_ids == before_c and pairs.flipped == ()


# --- tokens: exactly what scoring feeds the model ------------------------------------------------------------------


def test_rows_are_the_scoring_tokens(toy_tokenizer):
    rows = toy_world.make_preference_rows(10, seed=2)
    pairs, report = tokenize_reward_pairs(rows, toy_tokenizer, max_length=None)
    prompts = [r["prompt"] for r in rows]
    assert pairs.chosen_input_ids == tokenize_pairs(toy_tokenizer, prompts, [r["chosen"] for r in rows])
    assert pairs.rejected_input_ids == tokenize_pairs(toy_tokenizer, prompts, [r["rejected"] for r in rows])
    first = toy_tokenizer.convert_ids_to_tokens(pairs.chosen_input_ids[0])
    assert first[0] == "<bos>" and first[-1] == "<eos>"  # BOS before the prompt, EOS where the reward is read
    assert report.rows == report.kept == 10 and not report.changed


def test_truncation_is_the_scoring_rule_and_is_counted(toy_tokenizer):
    rows = toy_world.make_preference_rows(20, seed=3)
    pairs, report = tokenize_reward_pairs(rows, toy_tokenizer, max_length=12)
    prompts = [r["prompt"] for r in rows]
    assert pairs.chosen_input_ids == tokenize_pairs(toy_tokenizer, prompts, [r["chosen"] for r in rows], 12)
    assert pairs.rejected_input_ids == tokenize_pairs(toy_tokenizer, prompts, [r["rejected"] for r in rows], 12)
    full = tokenize_pairs(toy_tokenizer, prompts, [r["chosen"] for r in rows])
    assert report.chosen_truncated == sum(len(ids) > 12 for ids in full) > 0
    assert all(ids[-1] == toy_tokenizer.eos_token_id for ids in pairs.chosen_input_ids)  # the end is kept


def test_drop_policy_leaves_out_long_pairs(toy_tokenizer):
    rows = toy_world.make_preference_rows(20, seed=3)
    pairs, report = tokenize_reward_pairs(rows, toy_tokenizer, max_length=20, length_policy="drop")
    assert report.dropped > 0 and report.kept == len(pairs) == 20 - report.dropped
    assert all(len(ids) <= 20 for ids in pairs.chosen_input_ids + pairs.rejected_input_ids)
    with pytest.raises(DataError, match="all 20 pairs were dropped"):
        tokenize_reward_pairs(rows, toy_tokenizer, max_length=3, length_policy="drop")


def test_conversational_rows_use_the_chat_template(toy_tokenizer):
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
             "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]}
            for r in toy_world.make_preference_rows(4, seed=0)]
    pairs, _ = tokenize_reward_pairs(rows, toy_tokenizer, max_length=None)
    tokens = toy_tokenizer.convert_ids_to_tokens(pairs.chosen_input_ids[0])
    assert tokens[0] == "<user>" and "<assistant>" in tokens and tokens[-1] == "<eos>"
    assert pairs.chosen_input_ids == tokenize_pairs(toy_tokenizer, [r["prompt"] for r in rows],
                                                  [r["chosen"] for r in rows])


def test_implicit_prompt_rows_are_accepted(toy_tokenizer):
    rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
            for r in toy_world.make_preference_rows(4, seed=0)]
    pairs, _ = tokenize_reward_pairs(rows, toy_tokenizer, max_length=None)
    assert len(pairs) == 4


# --- bad rows: file, row and field ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mutate, parts", [
    (lambda rows: rows[2].pop("rejected"), ("row 3", "'rejected'", "missing")),
    (lambda rows: rows[1].update(chosen=""), ("row 2", "'chosen'", "empty")),
    (lambda rows: rows[3].update(rejected="   "), ("row 4", "'rejected'", "whitespace")),
    (lambda rows: rows[0].update(prompt=None), ("row 1", "'prompt'", "null")),
    (lambda rows: rows[1].update(chosen=5), ("row 2", "'chosen'", "must be a string")),
])
def test_bad_rows_name_file_row_and_field(tmp_path, toy_tokenizer, mutate, parts):
    rows = toy_world.make_preference_rows(5, seed=0)
    mutate(rows)
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        build_reward_dataset(DataConfig(train=path, max_prompt_length=None), toy_tokenizer)
    message = str(info.value)
    assert message.startswith(path)
    for part in parts:
        assert part in message, message


def test_eval_split_and_missing_file(tmp_path, toy_tokenizer):
    path = _write_jsonl(tmp_path / "pairs.jsonl", toy_world.make_preference_rows(6, seed=0))
    config = DataConfig(train=path, eval=path, max_length=32)
    train, _ = build_reward_dataset(config, toy_tokenizer, "train")
    held_out, _ = build_reward_dataset(config, toy_tokenizer, "eval")
    assert train.chosen_input_ids == held_out.chosen_input_ids
    with pytest.raises(DataError, match="not found"):
        build_reward_dataset(DataConfig(train=str(tmp_path / "nope.jsonl")), toy_tokenizer)


# --- the collator --------------------------------------------------------------------------------------------------


def test_collator_puts_chosen_rows_first_right_padded():
    features = [{"chosen_input_ids": [5, 6, 7], "rejected_input_ids": [5, 8]},
                {"chosen_input_ids": [9], "rejected_input_ids": [9, 10, 11, 12]}]
    batch = RewardCollator(pad_token_id=0)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [9, 0, 0, 0], [5, 8, 0, 0], [9, 10, 11, 12]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["input_ids"].dtype == torch.long
