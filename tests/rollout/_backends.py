"""Which rollout backends can run here, for tests parametrised over backends."""

import importlib.util

import pytest
import torch


def vllm_skip_reason() -> str | None:
    """None when the vLLM backend can run here, else why it cannot."""
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install 'align[vllm]', CUDA only)"
    if not torch.cuda.is_available():
        return "vllm needs a CUDA GPU and none is visible"
    return None


#: `pytest.param`s over every backend: hf always runs, vllm is reported skipped with its reason where it cannot.
BACKEND_PARAMS = [
    pytest.param("hf", id="hf"),
    pytest.param("vllm", id="vllm", marks=pytest.mark.skipif(vllm_skip_reason() is not None,
                                                             reason=str(vllm_skip_reason()))),
]


def build_backend(name, tiny_model_dir, tokenizer):
    """A backend on the tiny Llama, fp32 both ways so it can be compared with the fp32 trainer."""
    from transformers import AutoModelForCausalLM

    from align.rollout import build_rollout

    if name == "hf":
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        return build_rollout("hf", model, tokenizer, batch_size=8)
    return build_rollout("vllm", str(tiny_model_dir), tokenizer, dtype="float32", gpu_memory_utilization=0.2,
                         max_model_len=256, enforce_eager=True, seed=0)
