"""`iter_policy_weights`: the policy as a base checkpoint names it, streamed (plain, tied, PEFT merged, DDP-wrapped).
ZeRO-3 streaming is checked on 2 processes in tests/rollout/test_vllm_zero3.py."""

import pytest
import torch

from align.rollout.weights import iter_policy_weights


def test_plain_model_streams_its_parameters_in_order_once_each(tiny_model):
    streamed = list(iter_policy_weights(tiny_model))
    expected = list(tiny_model.named_parameters())  # tied lm_head.weight appears once, as embed_tokens
    assert [n for n, _ in streamed] == [n for n, _ in expected]
    assert "lm_head.weight" not in dict(streamed) and tiny_model.config.tie_word_embeddings
    for (_, a), (_, b) in zip(streamed, expected):
        assert a.data_ptr() == b.data_ptr() and not a.requires_grad  # no copies of an unpartitioned model


def test_wrapped_model_is_unwrapped(tiny_model):
    wrapper = torch.nn.Module()
    wrapper.module = tiny_model  # DDP and DeepSpeed engines keep the model under .module
    assert [n for n, _ in iter_policy_weights(wrapper)] == [n for n, _ in tiny_model.named_parameters()]


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_peft_policy_streams_merged_weights_under_base_names(tiny_model_dir, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_names = [n for n, _ in AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters()]
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                            LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    streamed = dict(iter_policy_weights(policy))
    assert list(streamed) == base_names  # no lora_A/lora_B, no base_model.model. prefix, no .base_layer
    merged = dict(policy.merge_and_unload().named_parameters())  # PEFT's own merge is the oracle
    changed = 0
    for name in base_names:
        torch.testing.assert_close(streamed[name], merged[name], atol=1e-6, rtol=1e-6, msg=name)
        changed += not torch.equal(streamed[name], AutoModelForCausalLM.from_pretrained(tiny_model_dir)
                                   .get_parameter(name)) if name.endswith("q_proj.weight") else 0
    assert changed == 2  # both layers' q_proj carry their adapter's delta


def test_disabled_adapter_streams_the_base_weights(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                            LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    with policy.disable_adapter():
        for name, tensor in iter_policy_weights(policy):
            torch.testing.assert_close(tensor, base[name], atol=0, rtol=0, msg=name)
