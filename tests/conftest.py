"""Shared fixtures: the toy world's tokenizer, a tiny Llama saved to disk, and toy preference data.

Models are saved with `save_pretrained` and loaded back with `from_pretrained`, the same path a Hub model takes.
No test touches the network.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

from align import toy_world

# Tiny-model forwards are dominated by thread synchronisation: one thread is several times faster than two (much
# more so when other processes share the cores), and no result depends on it.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def toy_tokenizer():
    """The toy world's word-level tokenizer (one token per word; `<bos>` prepended by add_special_tokens)."""
    return toy_world.build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Directory with an untrained tiny Llama and the toy tokenizer, written with `save_pretrained`."""
    return toy_world.save_base_model(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture
def tiny_model(tiny_model_dir):
    """A fresh fp32 copy of the tiny Llama, loaded from disk like a Hub model."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


#: vLLM engine options for the tiny fp32 Llama: eager (starts in seconds), a fixed 64 MiB KV cache (on CPU a memory
#: fraction would depend on what the test process already holds), fp32 so it agrees with the fp32 trainer.
VLLM_TEST_OPTIONS = dict(dtype="float32", enforce_eager=True, max_model_len=256, seed=0,
                         engine_kwargs={"kv_cache_memory_bytes": 64 << 20})


@pytest.fixture(scope="session")
def vllm_rollout(tiny_model_dir):
    """One `VLLMRollout` engine on the tiny Llama for the session (tests marked `vllm`). A test that loads other
    weights into it loads `tiny_model_dir`'s back before it ends."""
    from transformers import AutoTokenizer

    from align.rollout import build_rollout

    return build_rollout("vllm", str(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir),
                         **VLLM_TEST_OPTIONS)


@pytest.fixture(scope="session")
def toy_sft_dir(tmp_path_factory, tiny_model_dir):
    """The quickstart's SFT model (`align.recipes.quickstart.train_toy_sft`: TRL's SFTTrainer on grammar samples),
    trained once per session: the starting policy and prior of the on-policy tests, which need a policy that speaks
    the toy grammar for the gold reward to move."""
    from align.recipes.quickstart import train_toy_sft

    out = tmp_path_factory.mktemp("toy-sft") / "sft"
    train_toy_sft(tiny_model_dir, out, seed=0)
    return out


@pytest.fixture(scope="session")
def toy_preference_rows():
    """64 prompt/chosen/rejected rows from the toy grammar, ordered by the gold reward."""
    return toy_world.make_preference_rows(64, seed=0)


def pytest_collection_modifyitems(config, items):
    """Every test under tests/bench is marked `bench` (the `--quick` smoke run of one benchmark script)."""
    bench_dir = os.path.join(os.path.dirname(__file__), "bench") + os.sep
    for item in items:
        if str(item.fspath).startswith(bench_dir):
            item.add_marker(pytest.mark.bench)
