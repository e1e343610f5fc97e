"""The toy world: gold reward numbers, its known optimum, the grammar, the word-level tokenizer, the tiny Llama."""

import random

import pytest
import torch

from align import toy_world as tw


# --- gold reward -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("response, expected", [
    ("", 0.0),
    ("the movie was great .", 1.0),
    ("the movie was awful .", -1.0),
    ("the movie was long .", 0.0),  # neutral adjectives count for nothing
    ("the movie was really great and it was awful .", 0.0),
    ("the story was great and the food was lovely and it was quite dull .", 1.0),
    ("great great great", 3.0),  # no grammar needed: it is a count
    ("the view was very superb and the staff was wonderful and the food was excellent .", 3.0),
    ("great <eos>", 1.0),  # special tokens are not words
    ("<bos> great great <eos> <pad>", 2.0),
    ("great " * 16, 16.0),  # exactly FREE_LENGTH words: no cost
    ("great " * 17, 17 - 1.5),  # one word past FREE_LENGTH costs LENGTH_COST
    ("great " * 20, 20 - 1.5 * 4),
    ("awful " * 18, -18 - 1.5 * 2),
    ("great great " + "the " * 18, 2 - 1.5 * 4),  # 20 words, 2 positive
    (" ".join(["great"] * 16 + ["<eos>"] * 5), 16.0),  # specials do not count towards the length either
])
def test_gold_reward_hand_computed(response, expected):
    assert tw.gold_reward(response) == pytest.approx(expected)
    assert isinstance(tw.gold_reward(response), float)


def test_gold_rewards_is_elementwise():
    texts = ["great", "awful awful", "the movie was fun ."]
    assert tw.gold_rewards(texts) == [1.0, -2.0, 1.0]


def test_num_words_ignores_special_tokens():
    assert tw.num_words("the movie was great . <eos>") == 5
    assert tw.num_words("<bos> <eos>") == 0
    assert tw.num_words("  spaced   out  ") == 2


def test_constants_agree():
    assert tw.GOLD_OPTIMUM == float(tw.FREE_LENGTH) == 16.0
    assert tw.LENGTH_COST > 1  # so no extra positive word pays for itself
    assert not set(tw.POSITIVE) & set(tw.NEGATIVE)
    assert not (set(tw.POSITIVE) | set(tw.NEGATIVE)) & set(tw.NEUTRAL)


def test_gold_optimum_is_attained_by_free_length_positive_words():
    for word in tw.POSITIVE:
        assert tw.gold_reward(" ".join([word] * tw.FREE_LENGTH)) == tw.GOLD_OPTIMUM
    mixed = " ".join(tw.POSITIVE[i % len(tw.POSITIVE)] for i in range(tw.FREE_LENGTH))
    assert tw.gold_reward(mixed) == tw.GOLD_OPTIMUM


def test_any_one_word_change_of_the_optimum_lowers_the_reward():
    best = [tw.POSITIVE[i % len(tw.POSITIVE)] for i in range(tw.FREE_LENGTH)]
    vocab = [w for w in tw.vocabulary() if not (w.startswith("<") and w.endswith(">"))]
    for i in range(len(best)):
        # deletion
        assert tw.gold_reward(" ".join(best[:i] + best[i + 1:])) == tw.GOLD_OPTIMUM - 1
        for word in vocab:
            # insertion of any word (a positive one included: 17 - 1.5 < 16)
            assert tw.gold_reward(" ".join(best[:i] + [word] + best[i:])) < tw.GOLD_OPTIMUM
            # substitution by any non-positive word; another positive word keeps the optimum
            changed = tw.gold_reward(" ".join(best[:i] + [word] + best[i + 1:]))
            if word in tw.POSITIVE:
                assert changed == tw.GOLD_OPTIMUM
            else:
                assert changed < tw.GOLD_OPTIMUM


def test_no_string_beats_the_optimum():
    rng = random.Random(0)
    vocab = tw.vocabulary()
    for _ in range(3000):
        words = rng.choices(vocab, k=rng.randint(0, 40))
        assert tw.gold_reward(" ".join(words)) <= tw.GOLD_OPTIMUM
    # the best of each length: all positive, peaking at FREE_LENGTH
    best_by_length = [tw.gold_reward("great " * n) for n in range(40)]
    assert max(best_by_length) == tw.GOLD_OPTIMUM
    assert best_by_length.index(tw.GOLD_OPTIMUM) == tw.FREE_LENGTH


# --- grammar -----------------------------------------------------------------------------------------------------


def test_make_functions_are_deterministic_under_a_seed():
    assert tw.make_sft_rows(50, seed=3) == tw.make_sft_rows(50, seed=3)
    assert tw.make_prompts(50, seed=3) == tw.make_prompts(50, seed=3)
    assert tw.make_preference_rows(50, seed=3) == tw.make_preference_rows(50, seed=3)
    assert tw.make_sft_rows(50, seed=3) != tw.make_sft_rows(50, seed=4)
    assert tw.make_prompts(50, seed=3) != tw.make_prompts(50, seed=4)
    assert tw.make_preference_rows(50, seed=3) != tw.make_preference_rows(50, seed=4)
    # a prefix of a longer draw is the shorter draw (one RNG stream per call)
    assert tw.make_prompts(100, seed=3)[:50] == tw.make_prompts(50, seed=3)


def test_make_functions_do_not_touch_the_global_rng():
    random.seed(123)
    expected = random.random()
    random.seed(123)
    tw.make_preference_rows(20, seed=0)
    tw.make_sft_rows(20, seed=0)
    assert random.random() == expected


def test_preference_rows_are_ordered_by_gold_reward():
    rows = tw.make_preference_rows(300, seed=1)
    assert len(rows) == 300
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert tw.gold_reward(row["chosen"]) > tw.gold_reward(row["rejected"])
        assert row["chosen"].startswith(" ") and row["rejected"].startswith(" ")
        assert row["chosen"].endswith(" .") and row["rejected"].endswith(" .")


def test_sft_rows_follow_the_grammar():
    prompts = {t.format(topic=topic) for t in tw.PROMPT_TEMPLATES for topic in tw.TOPICS}
    rows = tw.make_sft_rows(300, seed=2)
    assert len(rows) == 300
    for row in rows:
        assert set(row) == {"prompt", "completion"}
        assert row["prompt"] in prompts
        assert row["completion"].startswith(" ") and row["completion"].endswith(" .")
        clauses = row["completion"].strip().removesuffix(" .").split(" and ")
        assert 1 <= len(clauses) <= 3
        for clause in clauses:
            assert " was " in clause
    # the SFT distribution has room to move: both signs of reward occur, and the mean is near zero
    gold = tw.gold_rewards([r["completion"] for r in rows])
    assert min(gold) < 0 < max(gold)
    assert abs(sum(gold) / len(gold)) < 0.3


def test_sample_prompt_returns_its_topic():
    rng = random.Random(0)
    for _ in range(50):
        prompt, topic = tw.sample_prompt(rng)
        assert topic in tw.TOPICS and topic in prompt.split()


# --- tokenizer ---------------------------------------------------------------------------------------------------


def test_vocabulary_layout(toy_tokenizer):
    vocab = tw.vocabulary()
    assert vocab[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert len(vocab) == len(set(vocab)) == len(toy_tokenizer) == 70
    assert toy_tokenizer.pad_token_id == 0
    assert toy_tokenizer.unk_token_id == 1
    assert toy_tokenizer.bos_token_id == 2
    assert toy_tokenizer.eos_token_id == 3
    for i, word in enumerate(vocab):
        assert toy_tokenizer.convert_tokens_to_ids(word) == i


def _grammar_texts():
    texts = tw.make_prompts(100, seed=0)
    for row in tw.make_preference_rows(100, seed=0):
        texts += [row["prompt"], row["chosen"], row["rejected"]]
    texts += [row["completion"] for row in tw.make_sft_rows(100, seed=0)]
    return texts


def test_grammar_samples_have_no_unknown_tokens(toy_tokenizer):
    texts = _grammar_texts()
    ids = toy_tokenizer(texts, add_special_tokens=False)["input_ids"]
    unk = toy_tokenizer.unk_token_id
    for text, row in zip(texts, ids):
        assert unk not in row, text
        assert len(row) == len(text.split())  # one token per word


def test_unknown_words_map_to_unk(toy_tokenizer):
    assert toy_tokenizer("hello the world", add_special_tokens=False)["input_ids"] == [1, tw.vocabulary().index("the"), 1]


def test_tokenizer_round_trip_and_bos(toy_tokenizer):
    bos = toy_tokenizer.bos_token_id
    for text in _grammar_texts():
        plain = toy_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert toy_tokenizer.decode(plain) == text.strip()  # words joined by single spaces
        with_special = toy_tokenizer(text)["input_ids"]
        assert with_special == [bos] + plain  # BOS prepended, no EOS appended
        assert toy_tokenizer.decode(with_special, skip_special_tokens=True) == text.strip()
    assert toy_tokenizer.decode(toy_tokenizer("the movie was fun .")["input_ids"]) == "<bos> the movie was fun ."
    # a normalised text round-trips exactly
    text = "what did you think of the song ?"
    assert toy_tokenizer.decode(toy_tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_chat_template(toy_tokenizer):
    messages = [{"role": "system", "content": "describe the movie ."},
                {"role": "user", "content": "review the book ."},
                {"role": "assistant", "content": "it was fun ."}]
    assert (toy_tokenizer.apply_chat_template(messages, tokenize=False)
            == "<system> describe the movie . <user> review the book . <assistant> it was fun . ")
    prompt = toy_tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<user> review the book . <assistant> "
    ids = toy_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert toy_tokenizer.convert_ids_to_tokens(ids) == ["<user>", "review", "the", "book", ".", "<assistant>"]
    # role tokens are special: skipped on decode
    assert toy_tokenizer.decode(ids, skip_special_tokens=True) == "review the book ."


# --- model -------------------------------------------------------------------------------------------------------


def test_saved_model_loads_with_expected_config(tiny_model_dir, toy_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert isinstance(model, LlamaForCausalLM)
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size) == (70, 64, 256)
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (2, 2, 1)
    assert c.hidden_size // c.num_attention_heads == 32  # a head_dim vLLM's CPU attention has a kernel for
    assert c.max_position_embeddings == 256
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (2, 3, 0)
    assert c.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 150_000
    assert model.dtype == torch.float32

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.get_vocab() == toy_tokenizer.get_vocab()
    assert tokenizer.chat_template == tw.CHAT_TEMPLATE
    assert tokenizer("describe the game .")["input_ids"] == toy_tokenizer("describe the game .")["input_ids"]

    ids = torch.tensor([tokenizer("describe the game .")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 70)
    assert torch.isfinite(logits).all()


def test_saved_model_weights_equal_the_seeded_build(tiny_model_dir, toy_tokenizer):
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    built = tw.build_tiny_model(toy_tokenizer, seed=0).state_dict()
    other = tw.build_tiny_model(toy_tokenizer, seed=1).state_dict()
    assert set(built) <= set(loaded) | {"lm_head.weight"}
    for key, value in built.items():
        if key in loaded:
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    assert not torch.equal(built["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_build_tiny_model_leaves_the_global_torch_rng_alone(toy_tokenizer):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    tw.build_tiny_model(toy_tokenizer, seed=0, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
    assert torch.equal(torch.rand(3), expected)


# --- reward-model data ---------------------------------------------------------------------------------------------


def _pair_key(row):
    return row["prompt"], frozenset((row["chosen"], row["rejected"]))


def test_reward_model_splits_are_gold_labelled_held_out_and_seeded():
    train, held_out = tw.make_reward_model_splits(300, 120, seed=5)
    assert len(train) == 300 and len(held_out) == 120
    assert train == tw.make_preference_rows(300, seed=5)  # the training pairs are the usual stream
    assert not {_pair_key(r) for r in train} & {_pair_key(r) for r in held_out}  # no pair is in both
    for row in train + held_out:
        assert tw.gold_reward(row["chosen"]) > tw.gold_reward(row["rejected"])
    assert tw.make_reward_model_splits(300, 120, seed=5) == (train, held_out)
    assert tw.make_reward_model_splits(300, 120, seed=6)[1] != held_out


def test_reward_model_splits_leave_out_pairs_seen_in_training(monkeypatch):
    # Make the held-out stream the training stream itself: every one of its first pairs was seen in training and
    # must be skipped, so the held-out rows are the stream's continuation.
    original = tw.make_preference_rows
    monkeypatch.setattr(tw, "make_preference_rows", lambda n, seed=0: original(n, seed=0))
    train, held_out = tw.make_reward_model_splits(30, 12, seed=0)
    assert train == original(30, seed=0)
    assert held_out == original(42, seed=0)[30:]


def test_save_reward_model_world_writes_base_and_pairs(tmp_path):
    import json

    out = tw.save_reward_model_world(tmp_path / "rm-toy", n_train=20, n_eval=8, seed=0)
    assert sorted(p.name for p in out.iterdir()) == ["base", "eval.jsonl", "train.jsonl"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # written atomically
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    held_out = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert (train, held_out) == tw.make_reward_model_splits(20, 8, seed=0)
    assert {"config.json", "tokenizer.json"} <= {p.name for p in (out / "base").iterdir()}
