"""The rollout backends, for tests parametrised over backends."""

import pytest
import torch

#: `pytest.param`s over every backend. The vllm one carries the `vllm` marker: it runs in the environment with vLLM
#: (`make test` runs both environments) and is deselected, not skipped, in the one without.
BACKEND_PARAMS = [
    pytest.param("hf", id="hf"),
    pytest.param("vllm", id="vllm", marks=pytest.mark.vllm),
]


def build_backend(request, name, tiny_model_dir, tokenizer):
    """A backend on the tiny Llama, fp32 both ways so it can be compared with the fp32 trainer. vLLM's is the
    session's engine (`vllm_rollout` in tests/conftest.py): an engine start costs seconds and holds its KV cache."""
    from transformers import AutoModelForCausalLM

    from align.rollout import build_rollout

    if name == "hf":
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        return build_rollout("hf", model, tokenizer, batch_size=8)
    return request.getfixturevalue("vllm_rollout")
