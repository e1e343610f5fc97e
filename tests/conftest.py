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


@pytest.fixture(scope="session")
def toy_preference_rows():
    """64 prompt/chosen/rejected rows from the toy grammar, ordered by the gold reward."""
    return toy_world.make_preference_rows(64, seed=0)
