"""VLLMRollout. Everywhere: the errors where vLLM cannot run, the parameter/output mapping and the sleep-mode order
against stand-ins. Marked `vllm` (run in make test's vLLM environment, on vLLM's CPU build): the real engine against
the trainer, fp32 both ways: greedy tokens, sampled log-probs, and weight sync after an optimizer step, for a full
and a LoRA policy (ZeRO-3: tests/rollout/test_vllm_zero3.py)."""

import builtins
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from align.errors import ConfigError
from align.logps import score_completions
from align.rollout import HFRollout, SamplingParams, build_rollout, prompt_token_ids

PROMPTS = ["describe the movie .", "what did you think of the song ?", "review the park .",
           "tell me about the book ."]


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _ids(result):
    return [[c.token_ids for c in group] for group in result]


# --- runs everywhere ---------------------------------------------------------------------------------------------

@pytest.fixture
def no_vllm(monkeypatch):
    """Makes `import vllm` fail even where vllm is installed."""
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ModuleNotFoundError("No module named 'vllm'", name="vllm")
        return real_import(name, *args, **kwargs)

    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_asking_for_vllm_without_vllm_is_a_config_error_saying_what_to_do(no_vllm, tiny_model_dir, tokenizer):
    with pytest.raises(ConfigError) as info:
        build_rollout("vllm", str(tiny_model_dir), tokenizer)
    message = str(info.value)
    assert message.startswith("rollout.backend: vllm is not installed; pip install 'align[vllm]' on a CUDA machine, "
                              "or vLLM's CPU build on CPU (README, 'Installing'), or use rollout.backend: hf")


def test_importing_align_rollout_does_not_import_vllm():
    import subprocess

    code = "import sys, align.rollout, align.rollout.vllm; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_vllm_extra_is_declared():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["optional-dependencies"]["vllm"] == ["vllm>=0.16"]
    assert not any(req.startswith("vllm") for req in pyproject["project"].get("dependencies", []))


class _FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in `vllm` module: enough API surface to check align's side of the mapping."""
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)  # import_vllm sets it; undone on teardown
    module = types.ModuleType("vllm")
    module.__version__ = "0.16.0"
    module.SamplingParams = _FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_too_old_vllm_is_a_config_error(fake_vllm):
    from align.rollout.vllm import import_vllm

    fake_vllm.__version__ = "0.15.1"
    with pytest.raises(ConfigError, match=r"rollout\.backend: vllm 0\.15\.1 is too old; align needs vllm >= 0\.16\.0 "
                                          r"\(in-place weight reload\)"):
        import_vllm()
    fake_vllm.__version__ = "0.10.2"
    with pytest.raises(ConfigError, match="too old"):
        import_vllm()
    for ok in ("0.16.0", "0.32.0+cpu", "0.33.1rc2.dev7+gabc.cu128", "1.0.0"):
        fake_vllm.__version__ = ok
        assert import_vllm() is fake_vllm


@pytest.mark.parametrize("sampling, expected", [
    (SamplingParams(), dict(temperature=1.0, top_k=0, top_p=1.0, max_tokens=64, seed=None)),
    (SamplingParams(max_new_tokens=7, temperature=0.7, top_k=5, top_p=0.9, seed=3),
     dict(temperature=0.7, top_k=5, top_p=0.9, max_tokens=7, seed=3)),
    # greedy: truncation is irrelevant and left off, and one sample stands for all n (vLLM refuses n > 1)
    (SamplingParams(max_new_tokens=4, temperature=0.0, top_k=5, top_p=0.5, seed=1),
     dict(n=1, temperature=0.0, top_k=0, top_p=1.0, max_tokens=4, seed=1)),
])
def test_sampling_params_map_onto_vllm(fake_vllm, sampling, expected):
    from align.rollout.vllm import to_vllm_sampling_params

    mapped = to_vllm_sampling_params(fake_vllm, sampling, n=4, seed=sampling.seed).kwargs
    assert mapped == {"n": 4, "logprobs": 0, "detokenize": False, **expected}


def test_each_prompt_gets_its_own_request_seed():
    from align.rollout.vllm import request_seed

    seeds = [request_seed(0, i) for i in range(1000)] + [request_seed(1, i) for i in range(1000)]
    assert len(set(seeds)) == 2000 and all(0 <= s < 2**63 for s in seeds)
    assert request_seed(0, 7) == request_seed(0, 7) and request_seed(None, 7) is None


def test_vllm_outputs_become_completions(tokenizer):
    from align.rollout.vllm import completions_from_outputs

    eos = tokenizer.eos_token_id
    great, fun = tokenizer.convert_tokens_to_ids(["great", "fun"])

    def out(index, ids, lps):
        return SimpleNamespace(index=index, token_ids=ids, finish_reason="stop" if ids[-1] == eos else "length",
                               logprobs=[{t: SimpleNamespace(logprob=lp)} for t, lp in zip(ids, lps)])

    outputs = [SimpleNamespace(outputs=[out(1, [fun, fun], [-0.5, -0.25]), out(0, [great, eos], [-1.0, -2.0])]),
               SimpleNamespace(outputs=[out(0, [great], [-3.0])])]
    result = completions_from_outputs(outputs, tokenizer, eos)
    assert _ids(result) == [[[great, eos], [fun, fun]], [[great]]]  # ordered by the sample index
    first = result[0][0]
    assert (first.prompt_index, first.finished, first.text) == (0, True, "great")
    torch.testing.assert_close(first.logps, torch.tensor([-1.0, -2.0]))
    assert not result[0][1].finished and result[0][1].text == "fun fun"
    assert result[1][0].prompt_index == 1
    with pytest.raises(RuntimeError, match="logprobs=0"):
        completions_from_outputs([SimpleNamespace(outputs=[SimpleNamespace(index=0, token_ids=[great], logprobs=None)])],
                                 tokenizer, eos)


class _RecordingLLM:
    """Stands in for `vllm.LLM`: records the calls `VLLMRollout` makes, in order."""

    def __init__(self):
        self.calls = []

    def generate(self, requests, params, use_tqdm=False):
        self.calls.append("generate")
        return [SimpleNamespace(outputs=[]) for _ in requests]

    def sleep(self, level):
        self.calls.append(f"sleep({level})")

    def wake_up(self, tags=None):
        self.calls.append(f"wake_up({','.join(tags) if tags else 'all'})")

    def collective_rpc(self, method, kwargs=None):
        list(kwargs["weights_iterator"])
        self.calls.append(method)

    def apply_model(self, fn):
        self.calls.append("apply_model")

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")


@pytest.mark.parametrize("sleep_mode", [False, True])
def test_sleep_mode_follows_vllms_documented_order(fake_vllm, tokenizer, tiny_model, sleep_mode):
    from align.rollout.vllm import VLLMRollout

    rollout = object.__new__(VLLMRollout)
    rollout._vllm, rollout._tokens_prompt = fake_vllm, lambda prompt_token_ids: prompt_token_ids
    rollout.tokenizer, rollout.progress, rollout.sleep_mode, rollout.asleep = tokenizer, False, sleep_mode, False
    rollout.llm = llm = _RecordingLLM()
    rollout.generate(PROMPTS[:1])
    rollout.load_weights(tiny_model)
    rollout.generate(PROMPTS[:1])
    rollout.generate(PROMPTS[:1])
    sync = ["reload_weights", "apply_model"]
    if sleep_mode:  # sleep after sampling; wake the weights, reload, then the KV cache; a plain wake before sampling
        assert llm.calls == ["generate", "sleep(1)", "wake_up(weights)", *sync, "wake_up(kv_cache)",
                             "reset_prefix_cache", "generate", "sleep(1)", "wake_up(all)", "generate", "sleep(1)"]
    else:
        assert llm.calls == ["generate", *sync, "reset_prefix_cache", "generate", "generate"]


def test_rollout_section_validates_and_passes_engine_options():
    from align.config import from_dict
    from align.rollout import RolloutConfig

    config = from_dict(RolloutConfig, {"backend": "vllm", "enforce_eager": True, "max_model_len": 128,
                                       "engine_kwargs": {"swap_space": 1}}, "rollout.")
    assert config.backend_options() == dict(dtype="auto", gpu_memory_utilization=None, enforce_eager=True,
                                            max_model_len=128, tensor_parallel_size=1, enable_prefix_caching=True,
                                            enable_sleep_mode=False, engine_kwargs={"swap_space": 1})
    assert from_dict(RolloutConfig, {"backend": "hf", "enforce_eager": True}, "rollout.").backend_options() == {}
    for bad, match in [({"gpu_memory_utilization": 1.5}, r"rollout\.gpu_memory_utilization: must be in \(0, 1\]"),
                       ({"tensor_parallel_size": 0}, r"rollout\.tensor_parallel_size: must be >= 1"),
                       ({"backend": "tgi"}, r"rollout\.backend: must be one of \['hf', 'vllm'\]"),
                       ({"enforce_eagre": True}, r"rollout\.enforce_eagre: unknown key")]:
        with pytest.raises(ConfigError, match=match):
            from_dict(RolloutConfig, bad, "rollout.")


# --- the real engine (vLLM's CPU build in CI) --------------------------------------------------------------------

def _teacher_forced_max_gap(result, model, prompt_ids, temperature):
    flat = [c for group in result for c in group if c.token_ids]
    with torch.no_grad():
        trainer = score_completions(model.eval(), [prompt_ids[c.prompt_index] for c in flat],
                                    [c.token_ids for c in flat], temperature=temperature)
    return max(float((c.logps - t).abs().max()) for c, t in zip(flat, trainer))


def _perturbed(model, scale=0.3, seed=0):
    """`model` moved far from the checkpoint (so stale weights show): every parameter + scale·N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def _optimizer_step(model, tokenizer, lr=0.05):
    """One Adam step of next-token NLL on a toy sentence: the trainer's weights change as in training."""
    model.train()
    ids = torch.tensor([tokenizer("the movie was great and fun .")["input_ids"]])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    return model.eval()


def _assert_engine_samples_from(rollout, model, tokenizer):
    """Greedy tokens equal HF greedy on `model`, and sampled log-probs equal its teacher-forced ones (fp32, 1e-4)."""
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    from_vllm = rollout.generate(PROMPTS, n=1, sampling=greedy)
    from_hf = HFRollout(model, tokenizer).generate(PROMPTS, n=1, sampling=greedy)
    assert _ids(from_vllm) == _ids(from_hf)
    prompt_ids = prompt_token_ids(tokenizer, PROMPTS)
    assert _teacher_forced_max_gap(from_vllm, model, prompt_ids, 1.0) <= 1e-4
    for temperature in (1.0, 0.7):
        sampled = rollout.generate(PROMPTS, n=4, sampling=SamplingParams(max_new_tokens=16, temperature=temperature,
                                                                         seed=1))
        assert sum(len(c.token_ids) for g in sampled for c in g) > 4 * len(PROMPTS)
        assert _teacher_forced_max_gap(sampled, model, prompt_ids, temperature) <= 1e-4


@pytest.mark.vllm
def test_greedy_and_sampled_logps_equal_the_trainers(vllm_rollout, tiny_model, tokenizer):
    _assert_engine_samples_from(vllm_rollout, tiny_model, tokenizer)


@pytest.mark.vllm
def test_load_weights_after_an_optimizer_step_samples_from_the_new_weights(vllm_rollout, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    policy = _perturbed(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    try:
        vllm_rollout.load_weights(policy)
        _assert_engine_samples_from(vllm_rollout, policy, tokenizer)
        _optimizer_step(policy, tokenizer)
        stale = vllm_rollout.generate(PROMPTS, n=2, sampling=SamplingParams(max_new_tokens=12, seed=0))
        assert _teacher_forced_max_gap(stale, policy, prompt_token_ids(tokenizer, PROMPTS), 1.0) > 1e-2
        vllm_rollout.load_weights(policy)
        _assert_engine_samples_from(vllm_rollout, policy, tokenizer)
    finally:
        vllm_rollout.load_weights(base)  # the session's engine goes back to the checkpoint's weights
    _assert_engine_samples_from(vllm_rollout, base, tokenizer)


def _reload_warnings_shown(layers, during=None) -> list[str]:
    """The "<layer>: Failed to load weights" lines vLLM's reload logger lets through (its filters applied) for a
    warning about each of `layers`, plus any it logs while `during()` runs."""
    import logging

    from align.rollout.vllm import _RELOAD_LOGGER

    logger = logging.getLogger(_RELOAD_LOGGER)
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        if during is not None:
            during()
        for layer in layers:
            logger.handle(logger.makeRecord(logger.name, logging.WARNING, __file__, 0, "%s: Failed to load weights",
                                            (layer,), None))
    finally:
        logger.removeHandler(handler)
    return seen


@pytest.mark.vllm
def test_the_rotary_cache_reload_warning_is_filtered(vllm_rollout):
    """vLLM warns "RotaryEmbedding: Failed to load weights" on an in-place reload (the layer holds only its cos/sin
    cache, which no state dict carries, and vLLM restores it): align filters that one line on vLLM's own logger once
    vLLM is imported (issue 12, noise); the same warning for a layer with real weights still shows."""
    import logging

    from align.rollout.vllm import _RELOAD_LOGGER, _RELOAD_NOISE_FILTER

    assert _RELOAD_NOISE_FILTER in logging.getLogger(_RELOAD_LOGGER).filters
    assert _reload_warnings_shown(("RotaryEmbedding", "QKVParallelLinear")) == [
        "QKVParallelLinear: Failed to load weights"]


@pytest.mark.vllm
def test_a_sync_of_a_tied_model_does_not_warn_about_its_tied_head(vllm_rollout, tiny_model_dir):
    """The tiny Llama ties its embeddings: every sync made vLLM warn "ParallelLMHead: Failed to load weights" (the
    streamed weights carry the embedding only; the head shares it and is refreshed after the sync; seen when this
    test ran alone before the filter). The engine's tied layer classes, found in the engine itself, are filtered on
    vLLM's reload logger, and only those: the same line for an untied layer still shows."""
    from transformers import AutoModelForCausalLM

    from align.rollout.vllm import _RELOAD_NOISE_FILTER, _tied_layers

    tied = vllm_rollout.llm.apply_model(lambda model: sorted({type(m).__name__ for m in _tied_layers(model)}))
    assert tied == [["ParallelLMHead"]] and _RELOAD_NOISE_FILTER.layers == {"RotaryEmbedding", "ParallelLMHead"}
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert _reload_warnings_shown(("ParallelLMHead", "QKVParallelLinear"),
                                  during=lambda: vllm_rollout.load_weights(policy)) == [
        "QKVParallelLinear: Failed to load weights"]


@pytest.mark.vllm
def test_lora_policy_is_synced_as_merged_weights(vllm_rollout, tiny_model_dir, tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                            LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    try:
        vllm_rollout.load_weights(policy)
        _assert_engine_samples_from(vllm_rollout, policy, tokenizer)
        _optimizer_step(policy, tokenizer, lr=0.1)  # only the adapters move
        vllm_rollout.load_weights(policy)
        _assert_engine_samples_from(vllm_rollout, policy, tokenizer)
    finally:
        vllm_rollout.load_weights(base)


@pytest.mark.vllm
def test_engine_built_from_a_model_loads_its_in_memory_weights(tiny_model_dir, tokenizer, vllm_rollout):
    # `build_rollout("vllm", model)` reads the engine's shape from model.name_or_path, then syncs the weights; the
    # session engine is reused here to stay within memory: load_weights is exactly that second half.
    from transformers import AutoModelForCausalLM

    policy = _perturbed(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), seed=3)
    from align.rollout.vllm import _name_or_path

    assert _name_or_path(policy) == str(tiny_model_dir)
    try:
        vllm_rollout.load_weights(policy)
        _assert_engine_samples_from(vllm_rollout, policy, tokenizer)
    finally:
        vllm_rollout.load_weights(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))


@pytest.mark.vllm
def test_bad_engine_input_is_one_config_error_before_the_engine_starts(tmp_path, tokenizer, tiny_model_dir):
    from align import toy_world

    with pytest.raises(ConfigError, match=r"^rollout\.swap_spaec: not an option of vLLM .*engine \(vllm\.EngineArgs\)"):
        build_rollout("vllm", str(tiny_model_dir), tokenizer, engine_kwargs={"swap_spaec": 4})
    with pytest.raises(ConfigError, match=r"^rollout\.engine_kwargs\.max_model_len: set rollout\.max_model_len instead"):
        build_rollout("vllm", str(tiny_model_dir), tokenizer, engine_kwargs={"max_model_len": 64})
    with pytest.raises(ConfigError, match=r"^rollout\.engine_kwargs\.logprobs_mode: align needs processed_logprobs"):
        build_rollout("vllm", str(tiny_model_dir), tokenizer, engine_kwargs={"logprobs_mode": "raw_logprobs"})
    with pytest.raises(ConfigError, match=r"^rollout\.enforce_eagre: not an option of rollout\.backend 'vllm'"):
        build_rollout("vllm", str(tiny_model_dir), tokenizer, enforce_eagre=True)
    with pytest.raises(ConfigError, match=r"^rollout\.enable_sleep_mode: sleep mode frees GPU memory"):
        build_rollout("vllm", str(tiny_model_dir), tokenizer, enable_sleep_mode=True)
    narrow = toy_world.save_base_model(tmp_path / "head16", num_heads=4, num_kv_heads=2)
    with pytest.raises(ConfigError) as info:
        build_rollout("vllm", str(narrow), tokenizer)
    assert str(info.value).startswith(f"model '{narrow}': vLLM's CPU attention has no kernel for head_dim=16 "
                                      f"(hidden_size 64 / 4 heads); it runs head_dim 32, 64, ")
    assert str(info.value).endswith(": use a model of such a shape, or rollout.backend: hf")


@pytest.mark.vllm
def test_seeded_samples_are_independent_across_prompts_and_follow_the_model(vllm_rollout, tiny_model, tokenizer):
    # One call's seed must not replay the same draws in every prompt (vLLM seeds each request on its own).
    same_prompt_twice = ["describe the movie .", "describe the movie ."]
    result = vllm_rollout.generate(same_prompt_twice, n=256, sampling=SamplingParams(max_new_tokens=1, seed=0))
    first = [[c.token_ids[0] for c in group] for group in result]
    agree = sum(a == b for a, b in zip(*first)) / 256
    ids = torch.tensor([prompt_token_ids(tokenizer, same_prompt_twice[:1])[0]])
    with torch.no_grad():
        logp = torch.log_softmax(tiny_model(ids).logits[0, -1].float(), -1)
    collision = float(logp.exp().pow(2).sum())  # P(two independent draws agree)
    assert agree < collision + 0.1, (agree, collision)
    # and the draws follow the model: the mean sampled log-prob estimates −entropy (4 standard errors)
    sampled = torch.tensor([logp[t] for group in first for t in group], dtype=torch.float64)
    negative_entropy = float((logp.exp() * logp).sum())
    assert abs(float(sampled.mean()) - negative_entropy) < 4 * float(sampled.std()) / len(sampled) ** 0.5
