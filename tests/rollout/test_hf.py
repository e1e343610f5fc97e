"""HFRollout: n completions per prompt, EOS handling, log-probs equal to the trainer's scoring, seeding, modes."""

import pytest
import torch

from align.logps import score_completions
from align.rollout import Completion, HFRollout, RolloutBackend, SamplingParams

PROMPTS = ["describe the movie .", "what did you think of the song ?", "review the park ."]


@pytest.fixture(autouse=True)
def _one_thread():
    # Dozens of tiny forwards: one thread avoids OpenMP spin-waiting on a busy 2-core machine (30x slower there).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _prompt_ids(tokenizer, prompts):
    return tokenizer(prompts, add_special_tokens=True)["input_ids"]


def _flat(result):
    return [c for group in result for c in group]


def _ids(result):
    return [[c.token_ids for c in group] for group in result]


def test_is_a_rollout_backend(tiny_model, tokenizer):
    assert isinstance(HFRollout(tiny_model, tokenizer), RolloutBackend)


def test_generate_returns_n_completions_per_prompt_with_consistent_fields(tiny_model, tokenizer):
    max_new = 40
    eos = tokenizer.eos_token_id
    # batch_size 5 does not divide 3 prompts x 4 samples: batches mix prompts of different lengths (left padding)
    rollout = HFRollout(tiny_model, tokenizer, batch_size=5)
    result = rollout.generate(PROMPTS, n=4, sampling=SamplingParams(max_new_tokens=max_new, seed=0))

    assert len(result) == len(PROMPTS)
    assert all(len(group) == 4 for group in result)
    flat = _flat(result)
    for i, group in enumerate(result):
        for c in group:
            assert isinstance(c, Completion)
            assert c.prompt_index == i
            assert 1 <= len(c.token_ids) <= max_new
            assert eos not in c.token_ids[:-1]  # cut at the first EOS
            assert c.finished == (c.token_ids[-1] == eos)
            if not c.finished:
                assert len(c.token_ids) == max_new  # only max_new_tokens stops an unfinished completion
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
            assert "<eos>" not in c.text
            assert c.logps.shape == (len(c.token_ids),)
            assert c.logps.dtype == torch.float32
            assert torch.isfinite(c.logps).all() and (c.logps <= 0).all()
    # the untrained model stops on its own sometimes and runs to the limit other times (seed 0): both paths covered
    assert any(c.finished for c in flat) and not all(c.finished for c in flat)

    # log-probs are exactly the trainer's scoring of the same tokens after the same prompt ids
    prompt_ids = _prompt_ids(tokenizer, PROMPTS)
    expected = score_completions(tiny_model, [prompt_ids[c.prompt_index] for c in flat], [c.token_ids for c in flat])
    for c, e in zip(flat, expected):
        torch.testing.assert_close(c.logps, e)


def test_prompts_are_tokenized_with_bos_like_the_data_pipeline(tiny_model, tokenizer):
    # Scoring against the prompt WITHOUT BOS gives different numbers: the rollout used the BOS-prefixed ids.
    rollout = HFRollout(tiny_model, tokenizer)
    [[c]] = rollout.generate(PROMPTS[:1], n=1, sampling=SamplingParams(max_new_tokens=6, seed=1))
    with_bos = _prompt_ids(tokenizer, PROMPTS[:1])[0]
    assert with_bos[0] == tokenizer.bos_token_id
    torch.testing.assert_close(c.logps, score_completions(tiny_model, [with_bos], [c.token_ids])[0])
    without = score_completions(tiny_model, [with_bos[1:]], [c.token_ids])[0]
    assert not torch.allclose(c.logps, without)


def test_same_seed_same_samples_different_seed_different(tiny_model, tokenizer):
    rollout = HFRollout(tiny_model, tokenizer, batch_size=4)
    a = rollout.generate(PROMPTS, n=2, sampling=SamplingParams(max_new_tokens=12, seed=3))
    b = rollout.generate(PROMPTS, n=2, sampling=SamplingParams(max_new_tokens=12, seed=3))
    c = rollout.generate(PROMPTS, n=2, sampling=SamplingParams(max_new_tokens=12, seed=4))
    assert _ids(a) == _ids(b)
    for x, y in zip(_flat(a), _flat(b)):
        torch.testing.assert_close(x.logps, y.logps, rtol=0, atol=0)
    assert _ids(a) != _ids(c)
    # the n samples of one prompt are distinct draws, not copies
    assert any(group[0] != group[1] for group in _ids(a))


def test_seeded_generate_leaves_the_global_rng_alone(tiny_model, tokenizer):
    rollout = HFRollout(tiny_model, tokenizer)
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(11)
    rollout.generate(PROMPTS[:1], n=2, sampling=SamplingParams(max_new_tokens=5, seed=0))
    assert torch.equal(torch.rand(4), expected)


def test_unseeded_generate_continues_the_global_rng(tiny_model, tokenizer):
    rollout = HFRollout(tiny_model, tokenizer)
    sampling = SamplingParams(max_new_tokens=10, seed=None)
    torch.manual_seed(5)
    a = rollout.generate(PROMPTS, n=1, sampling=sampling)
    torch.manual_seed(5)
    b = rollout.generate(PROMPTS, n=1, sampling=sampling)
    assert _ids(a) == _ids(b)


def test_greedy_is_deterministic_and_takes_the_argmax(tiny_model, tokenizer):
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    batched = HFRollout(tiny_model, tokenizer, batch_size=16).generate(PROMPTS, n=2, sampling=greedy)
    torch.manual_seed(123)  # the global RNG does not matter for greedy decoding
    single = HFRollout(tiny_model, tokenizer, batch_size=1).generate(PROMPTS, n=2, sampling=greedy)
    # left-padded batches decode exactly like one prompt at a time
    assert _ids(batched) == _ids(single)
    for group in batched:
        assert group[0].token_ids == group[1].token_ids  # n greedy samples are identical

    prompt_ids = _prompt_ids(tokenizer, PROMPTS)
    for c in _flat(batched):
        full = torch.tensor([prompt_ids[c.prompt_index] + c.token_ids])
        with torch.no_grad():
            logits = tiny_model(input_ids=full).logits[0]
        P = len(prompt_ids[c.prompt_index])
        predicted = logits[P - 1:P - 1 + len(c.token_ids)].argmax(-1).tolist()
        assert predicted == c.token_ids
        # greedy log-probs are the untempered ones
        expected = torch.log_softmax(logits[P - 1:P - 1 + len(c.token_ids)].float(), -1)
        expected = expected.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(c.logps, expected, rtol=1e-4, atol=1e-4)


def test_top_k_1_sampling_equals_greedy(tiny_model, tokenizer):
    rollout = HFRollout(tiny_model, tokenizer)
    greedy = rollout.generate(PROMPTS, n=1, sampling=SamplingParams(max_new_tokens=6, temperature=0.0))
    top1 = rollout.generate(PROMPTS, n=1, sampling=SamplingParams(max_new_tokens=6, top_k=1, seed=9))
    assert _ids(greedy) == _ids(top1)


def test_logps_use_the_sampling_temperature(tiny_model, tokenizer):
    rollout = HFRollout(tiny_model, tokenizer)
    result = rollout.generate(PROMPTS, n=1, sampling=SamplingParams(max_new_tokens=6, temperature=0.5, seed=2))
    flat = _flat(result)
    prompt_ids = _prompt_ids(tokenizer, PROMPTS)
    prompts = [prompt_ids[c.prompt_index] for c in flat]
    hot = score_completions(tiny_model, prompts, [c.token_ids for c in flat], temperature=0.5)
    plain = score_completions(tiny_model, prompts, [c.token_ids for c in flat])
    for c, h, p in zip(flat, hot, plain):
        torch.testing.assert_close(c.logps, h)
        assert not torch.allclose(c.logps, p)


@pytest.mark.parametrize("max_new_tokens", [1, 3])
def test_max_new_tokens_is_respected(tiny_model, tokenizer, max_new_tokens):
    rollout = HFRollout(tiny_model, tokenizer)
    result = rollout.generate(PROMPTS, n=3, sampling=SamplingParams(max_new_tokens=max_new_tokens, seed=0))
    lengths = [len(c.token_ids) for c in _flat(result)]
    assert max(lengths) == max_new_tokens
    assert all(1 <= n <= max_new_tokens for n in lengths)
    for c in _flat(result):
        assert c.finished == (c.token_ids[-1] == tokenizer.eos_token_id)


@pytest.mark.parametrize("training", [True, False])
def test_generate_restores_train_eval_mode(tiny_model, tokenizer, training):
    tiny_model.train(training)
    HFRollout(tiny_model, tokenizer).generate(PROMPTS[:1], n=1, sampling=SamplingParams(max_new_tokens=3, seed=0))
    assert tiny_model.training is training
    assert all(m.training is training for m in tiny_model.modules())


def test_default_sampling_params():
    s = SamplingParams()
    assert (s.max_new_tokens, s.temperature, s.top_k, s.top_p, s.seed) == (64, 1.0, 0, 1.0, None)


def test_load_weights_switches_the_model(tiny_model, tokenizer, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    rollout = HFRollout(tiny_model, tokenizer)
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(3.0)
    rollout.load_weights(other)
    [[c]] = rollout.generate(PROMPTS[:1], n=1, sampling=SamplingParams(max_new_tokens=5, seed=0))
    prompt = _prompt_ids(tokenizer, PROMPTS[:1])
    torch.testing.assert_close(c.logps, score_completions(other, prompt, [c.token_ids])[0])


def test_logps_of_a_training_model_with_dropout_are_eval_mode_logps(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attention_dropout=0.5)
    model.train()
    result = HFRollout(model, tokenizer).generate(PROMPTS, n=2, sampling=SamplingParams(max_new_tokens=8, seed=0))
    assert model.training
    model.eval()
    flat = _flat(result)
    prompt_ids = _prompt_ids(tokenizer, PROMPTS)
    expected = score_completions(model, [prompt_ids[c.prompt_index] for c in flat], [c.token_ids for c in flat])
    for c, e in zip(flat, expected):
        torch.testing.assert_close(c.logps, e)
