"""VLLMRollout: the error where vLLM cannot run (everywhere), the parameter/output mapping against a stand-in `vllm`
module (everywhere), and the real engine against HFRollout (only where vllm and a CUDA GPU are present; reported
skipped otherwise)."""

import builtins
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from _backends import build_backend, vllm_skip_reason
from align.errors import ConfigError
from align.rollout import HFRollout, SamplingParams, build_rollout, logprob_gap, prompt_token_ids

PROMPTS = ["describe the movie .", "what did you think of the song ?", "review the park ."]
needs_vllm = pytest.mark.skipif(vllm_skip_reason() is not None, reason=str(vllm_skip_reason()))


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
    assert message.startswith("rollout.backend: vllm is not installed; pip install 'align[vllm]' (needs a CUDA GPU) "
                              "or use rollout.backend: hf")


def test_importing_align_rollout_does_not_import_vllm():
    import subprocess

    code = "import sys, align.rollout, align.rollout.vllm; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_vllm_extra_is_declared():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert any(req.replace(" ", "").startswith("vllm") for req in pyproject["project"]["optional-dependencies"]["vllm"])
    assert not any(req.startswith("vllm") for req in pyproject["project"].get("dependencies", []))


class _FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in `vllm` module: enough API surface to check align's side of the mapping."""
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)  # import_vllm sets it; undone on teardown
    module = types.ModuleType("vllm")
    module.__version__ = "0.11.0"
    module.SamplingParams = _FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_too_old_vllm_is_a_config_error(fake_vllm):
    from align.rollout.vllm import import_vllm

    fake_vllm.__version__ = "0.9.2"
    with pytest.raises(ConfigError, match=r"rollout\.backend: vllm 0\.9\.2 is too old; align needs vllm >= 0\.10\.2"):
        import_vllm()
    fake_vllm.__version__ = "0.10.1.dev5+g123"
    with pytest.raises(ConfigError, match="too old"):
        import_vllm()
    for ok in ("0.10.2", "0.11.1rc2.dev7+gabc.cu128", "1.0.0"):
        fake_vllm.__version__ = ok
        assert import_vllm() is fake_vllm


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_vllm_without_a_gpu_is_a_config_error(fake_vllm, tiny_model_dir, tokenizer):
    with pytest.raises(ConfigError, match=r"rollout\.backend: vllm needs a CUDA GPU.*use rollout\.backend: hf"):
        build_rollout("vllm", str(tiny_model_dir), tokenizer)


@pytest.mark.parametrize("sampling, expected", [
    (SamplingParams(), dict(temperature=1.0, top_k=0, top_p=1.0, max_tokens=64, seed=None)),
    (SamplingParams(max_new_tokens=7, temperature=0.7, top_k=5, top_p=0.9, seed=3),
     dict(temperature=0.7, top_k=5, top_p=0.9, max_tokens=7, seed=3)),
    # greedy: truncation is irrelevant and left off
    (SamplingParams(max_new_tokens=4, temperature=0.0, top_k=5, top_p=0.5, seed=1),
     dict(temperature=0.0, top_k=0, top_p=1.0, max_tokens=4, seed=1)),
])
def test_sampling_params_map_onto_vllm(fake_vllm, sampling, expected):
    from align.rollout.vllm import to_vllm_sampling_params

    mapped = to_vllm_sampling_params(fake_vllm, sampling, n=4).kwargs
    assert mapped == dict(n=4, logprobs=0, detokenize=False, **expected)


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


# --- only where vllm and a CUDA GPU are present ------------------------------------------------------------------

@pytest.fixture(scope="module")
def vllm_rollout(tiny_model_dir):
    from transformers import AutoTokenizer

    return build_backend("vllm", tiny_model_dir, AutoTokenizer.from_pretrained(tiny_model_dir))


@needs_vllm
def test_vllm_greedy_equals_hf_greedy(vllm_rollout, tiny_model, tokenizer):
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    from_vllm = vllm_rollout.generate(PROMPTS, n=1, sampling=greedy)
    from_hf = HFRollout(tiny_model, tokenizer).generate(PROMPTS, n=1, sampling=greedy)
    assert _ids(from_vllm) == _ids(from_hf)
    for a, b in zip(from_vllm, from_hf):
        torch.testing.assert_close(a[0].logps, b[0].logps, rtol=1e-3, atol=1e-3)


@needs_vllm
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_vllm_logps_are_tempered_like_the_trainers(vllm_rollout, tiny_model, tokenizer, temperature):
    result = vllm_rollout.generate(PROMPTS, n=4, sampling=SamplingParams(max_new_tokens=16, temperature=temperature,
                                                                         seed=0))
    assert [len(g) for g in result] == [4, 4, 4]
    assert all(torch.isfinite(c.logps).all() and (c.logps <= 0).all() for g in result for c in g)
    prompt_ids = prompt_token_ids(tokenizer, PROMPTS)
    assert logprob_gap(result, tiny_model, prompt_ids, temperature=temperature) <= 1e-3


@needs_vllm
def test_vllm_load_weights_samples_from_the_new_weights(vllm_rollout, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    moved = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        torch.manual_seed(0)
        for p in moved.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompt_ids = prompt_token_ids(tokenizer, PROMPTS)
    sampling = SamplingParams(max_new_tokens=12, seed=0)
    try:
        vllm_rollout.load_weights(moved.cuda())
        result = vllm_rollout.generate(PROMPTS, n=2, sampling=sampling)
        assert logprob_gap(result, moved.cpu(), prompt_ids) <= 1e-3
        assert logprob_gap(result, base, prompt_ids) > 1e-3  # stale weights show up in the health metric
    finally:
        vllm_rollout.load_weights(base.cuda())  # the module-scoped engine goes back to the checkpoint's weights
