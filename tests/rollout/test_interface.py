"""Every rollout backend honours the same interface; `build_rollout`; the log-prob gap health metric."""

import pytest
import torch

from _backends import BACKEND_PARAMS, build_backend
from align.errors import AlignError, ConfigError
from align.logps import score_completions
from align.rollout import (BACKENDS, Completion, HFRollout, RolloutBackend, SamplingParams, build_rollout,
                           logprob_gap, prompt_token_ids)

PROMPTS = ["describe the movie .", "what did you think of the song ?", "review the park ."]


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _ids(result):
    return [[c.token_ids for c in group] for group in result]


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request, tiny_model_dir, tokenizer):
    return build_backend(request, request.param, tiny_model_dir, tokenizer)


def test_backend_honours_the_interface(backend, tokenizer, tiny_model):
    max_new = 24
    eos = tokenizer.eos_token_id
    assert isinstance(backend, RolloutBackend)
    result = backend.generate(PROMPTS, n=3, sampling=SamplingParams(max_new_tokens=max_new, seed=0))
    assert [len(g) for g in result] == [3, 3, 3]
    for i, group in enumerate(result):
        for c in group:
            assert isinstance(c, Completion) and c.prompt_index == i
            assert 1 <= len(c.token_ids) <= max_new
            assert eos not in c.token_ids[:-1]
            assert c.finished == (c.token_ids[-1] == eos)
            assert c.finished or len(c.token_ids) == max_new
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
            assert c.logps.shape == (len(c.token_ids),) and c.logps.dtype == torch.float32
            assert torch.isfinite(c.logps).all() and (c.logps <= 0).all()
    # the sampler's log-probs are the trainer's on the same tokens after the same (BOS-prefixed) prompt ids
    assert logprob_gap(result, tiny_model, prompt_token_ids(tokenizer, PROMPTS)) <= 1e-3


def test_backend_seeding_and_greedy(backend, tokenizer):
    sampling = SamplingParams(max_new_tokens=10, seed=5)
    a, b = backend.generate(PROMPTS, n=2, sampling=sampling), backend.generate(PROMPTS, n=2, sampling=sampling)
    assert _ids(a) == _ids(b)
    assert _ids(a) != _ids(backend.generate(PROMPTS, n=2, sampling=SamplingParams(max_new_tokens=10, seed=6)))
    greedy = backend.generate(PROMPTS, n=2, sampling=SamplingParams(max_new_tokens=6, temperature=0.0))
    assert all(g[0].token_ids == g[1].token_ids for g in greedy)


def test_backend_takes_text_message_and_token_id_prompts(backend, tokenizer):
    # Token ids go in as they are (never decoded and re-tokenized); message lists through the chat template.
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    ids = prompt_token_ids(tokenizer, PROMPTS)
    assert _ids(backend.generate(ids, sampling=greedy)) == _ids(backend.generate(PROMPTS, sampling=greedy))
    messages = [[{"role": "user", "content": p}] for p in PROMPTS]
    chat_ids = prompt_token_ids(tokenizer, messages)
    assert chat_ids != ids and all(tokenizer.bos_token_id not in p for p in chat_ids)
    assert _ids(backend.generate(messages, sampling=greedy)) == _ids(backend.generate(chat_ids, sampling=greedy))


# --- build_rollout -----------------------------------------------------------------------------------------------

def test_build_rollout_hf_from_a_model_or_a_path(tiny_model, tiny_model_dir, tokenizer):
    assert BACKENDS == ("hf", "vllm")
    from_model = build_rollout("hf", tiny_model, tokenizer, batch_size=4)
    assert isinstance(from_model, HFRollout) and from_model.model is tiny_model and from_model.batch_size == 4
    from_path = build_rollout("hf", str(tiny_model_dir), tokenizer)
    greedy = SamplingParams(max_new_tokens=5, temperature=0.0)
    assert _ids(from_model.generate(PROMPTS, sampling=greedy)) == _ids(from_path.generate(PROMPTS, sampling=greedy))


def test_build_rollout_unknown_backend_names_the_config_key(tiny_model, tokenizer):
    with pytest.raises(ConfigError, match=r"rollout\.backend: unknown backend 'sglang'; known: hf, vllm"):
        build_rollout("sglang", tiny_model, tokenizer)


def test_build_rollout_unknown_option_names_the_config_key(tiny_model, tokenizer):
    with pytest.raises(ConfigError, match=r"rollout\.gpu_memory_utilization: not an option of rollout\.backend 'hf'"):
        build_rollout("hf", tiny_model, tokenizer, gpu_memory_utilization=0.5)


def test_config_errors_are_user_errors():
    assert issubclass(ConfigError, AlignError)  # the CLI prints them as one line and exits with status 2


# --- logprob_gap -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_logprob_gap_is_zero_for_the_sampling_model_and_positive_for_another(tiny_model, tiny_model_dir, tokenizer,
                                                                              temperature):
    from transformers import AutoModelForCausalLM

    rollout = HFRollout(tiny_model, tokenizer)
    sampling = SamplingParams(max_new_tokens=12, temperature=temperature, seed=1)
    result = rollout.generate(PROMPTS, n=2, sampling=sampling)
    prompt_ids = prompt_token_ids(tokenizer, PROMPTS)
    same = logprob_gap(result, tiny_model, prompt_ids, temperature=temperature)
    assert same <= 1e-5

    stale = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        torch.manual_seed(0)
        for p in stale.parameters():
            p.add_(0.05 * torch.randn_like(p))
    gap = logprob_gap(result, stale, prompt_ids, temperature=temperature)
    assert gap > 1e-3

    # it is the token-weighted mean |difference|, computed the trainer's way
    flat = [c for g in result for c in g]
    scored = score_completions(stale, [prompt_ids[c.prompt_index] for c in flat], [c.token_ids for c in flat],
                               temperature=temperature or 1.0)
    diffs = torch.cat([(c.logps - s).abs() for c, s in zip(flat, scored)])
    assert gap == pytest.approx(float(diffs.mean()), rel=1e-5)


def test_logprob_gap_sees_a_wrong_temperature(tiny_model, tokenizer):
    result = HFRollout(tiny_model, tokenizer).generate(PROMPTS, n=2, sampling=SamplingParams(max_new_tokens=8,
                                                                                             temperature=0.5, seed=0))
    prompt_ids = prompt_token_ids(tokenizer, PROMPTS)
    assert logprob_gap(result, tiny_model, prompt_ids, temperature=0.5) <= 1e-5
    assert logprob_gap(result, tiny_model, prompt_ids, temperature=1.0) > 1e-2


def test_logprob_gap_restores_the_train_mode_and_handles_no_tokens(tiny_model, tokenizer):
    tiny_model.train()
    assert logprob_gap([[]], tiny_model, [[1]]) == 0.0
    result = HFRollout(tiny_model, tokenizer).generate(PROMPTS[:1], n=1, sampling=SamplingParams(max_new_tokens=3,
                                                                                                 seed=0))
    logprob_gap(result, tiny_model, prompt_token_ids(tokenizer, PROMPTS[:1]))
    assert tiny_model.training
