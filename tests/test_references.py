"""align.references: the frozen and peft-disabled reference kinds, `auto`, and their config errors."""

import gc

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.data import tokenize_preference_rows
from align.errors import ConfigError
from align.logps import SharedPromptCollator, pair_logps
from align.modeling import LoraSection, ModelConfig, is_peft_model, load_causal_lm, load_policy
from align.references import (
    REFERENCES,
    FrozenReference,
    PeftDisabledReference,
    build_reference,
    reference_params,
    resolve_kind,
)
from align.toy_world import save_base_model




@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def batch(toy_tokenizer, toy_preference_rows):
    dataset, _ = tokenize_preference_rows(toy_preference_rows[:6], toy_tokenizer)
    return SharedPromptCollator(toy_tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])


def model_config(model_dir, **kwargs):
    return ModelConfig(name_or_path=str(model_dir), dtype="float32", **kwargs)


def lora_config(model_dir):
    return model_config(model_dir, lora=LoraSection(r=4, lora_alpha=8))


def sums(logps):
    return torch.stack([logps.chosen_sum(), logps.rejected_sum()])


def assert_same(a, b, atol=0.0):
    for got, want in ((a.chosen, b.chosen), (a.rejected, b.rejected)):
        torch.testing.assert_close(got, want, rtol=0, atol=atol)
    assert a.chosen_mask.equal(b.chosen_mask) and a.rejected_mask.equal(b.rejected_mask)


def train_steps(model, batch, steps=3, lr=1e-2):
    """A few Adam steps that raise log π(chosen) − log π(rejected) (every trainable parameter moves)."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        logps = pair_logps(model, batch)
        loss = -(logps.chosen_sum() - logps.rejected_sum()).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def live_causal_lms():
    """Number of live `LlamaForCausalLM` objects (full models) in this process."""
    from transformers import LlamaForCausalLM

    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, LlamaForCausalLM))


# --------------------------------------------------------------------------------------------- frozen


def test_frozen_reference_stays_at_the_initial_policy(tiny_model_dir, batch, accelerator):
    config = model_config(tiny_model_dir)
    policy = load_policy(config)
    reference = build_reference("frozen", {}, policy=policy, model_config=config)
    assert isinstance(reference, FrozenReference) and reference.kind == "frozen"
    reference.prepare(accelerator)
    assert reference.model is not policy and not reference.model.training
    assert all(not p.requires_grad for p in reference.model.parameters())
    assert all(p.requires_grad for p in policy.parameters())

    with torch.no_grad():
        initial_policy = pair_logps(policy, batch)
    before = reference.logps(policy, batch)
    assert not before.chosen.requires_grad and before.chosen.dtype == torch.float32
    assert_same(before, initial_policy)  # same weights, same computation: bit for bit

    train_steps(policy, batch)
    with torch.no_grad():
        trained_policy = pair_logps(policy, batch)
    after = reference.logps(policy, batch)
    assert_same(after, before)
    assert (sums(trained_policy) - sums(after)).abs().max() > 0.1
    # The steps pushed the policy's margin up relative to the reference's.
    margin = lambda lp: lp.chosen_sum() - lp.rejected_sum()  # noqa: E731
    assert (margin(trained_policy) - margin(after)).mean() > 0.1
    assert reference.state_dict() == {}
    reference.load_state_dict({})


def test_frozen_reference_from_another_model(tiny_model_dir, tmp_path, batch, accelerator):
    other_dir = save_base_model(tmp_path / "other", seed=1)
    config = model_config(tiny_model_dir)
    policy = load_policy(config)
    reference = build_reference("frozen", {"name_or_path": str(other_dir)}, policy=policy, model_config=config)
    reference.prepare(accelerator)
    other = AutoModelForCausalLM.from_pretrained(other_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want, policy_logps = pair_logps(other, batch), pair_logps(policy, batch)
    got = reference.logps(policy, batch)
    assert_same(got, want, atol=1e-6)
    assert (sums(got) - sums(policy_logps)).abs().max() > 1e-3


def test_frozen_reference_bad_path_is_a_config_error(tiny_model_dir, tmp_path):
    config = model_config(tiny_model_dir)
    with pytest.raises(ConfigError, match=r"^reference\.name_or_path: '.*missing' does not exist"):
        build_reference("frozen", {"name_or_path": str(tmp_path / "missing")}, policy=None, model_config=config)
    (tmp_path / "empty").mkdir()  # exists but holds no model: transformers' own reason, in one line
    with pytest.raises(ConfigError, match=r"^reference\.name_or_path: cannot load model '.*empty'"):
        build_reference("frozen", {"name_or_path": str(tmp_path / "empty")}, policy=None, model_config=config)


# --------------------------------------------------------------------------------------------- peft_disabled


def test_peft_disabled_reference_is_the_base_model(tiny_model_dir, batch, accelerator):
    config = lora_config(tiny_model_dir)
    policy = load_policy(config)
    assert is_peft_model(policy)
    models_before = live_causal_lms()
    reference = build_reference("peft_disabled", {}, policy=policy, model_config=config)
    reference.prepare(accelerator)
    # No second model: the reference holds no module, and no new causal LM came into existence.
    assert isinstance(reference, PeftDisabledReference)
    assert not [v for v in vars(reference).values() if isinstance(v, torch.nn.Module)]
    assert live_causal_lms() == models_before

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logps = pair_logps(base, batch)
    policy.eval()
    # A fresh adapter is zero (lora_B = 0): policy, reference and base all agree.
    assert_same(reference.logps(policy, batch), base_logps, atol=1e-6)

    train_steps(policy, batch)
    lora_b = [p for n, p in policy.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)  # the adapter is non-zero now
    with torch.no_grad():
        adapted = pair_logps(policy, batch)
    got = reference.logps(policy, batch)
    assert not got.chosen.requires_grad
    assert_same(got, base_logps, atol=1e-6)
    assert (sums(adapted) - sums(base_logps)).abs().max() > 0.1
    # The adapter is switched back on after the reference pass.
    with torch.no_grad():
        assert_same(pair_logps(policy, batch), adapted)


def test_peft_disabled_reference_without_accelerator(tiny_model_dir, batch):
    config = lora_config(tiny_model_dir)
    policy = load_policy(config)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    reference = build_reference("auto", {}, policy=policy, model_config=config)
    assert isinstance(reference, PeftDisabledReference)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    policy.eval()
    with torch.no_grad():
        want, adapted = pair_logps(base, batch), pair_logps(policy, batch)
    got = reference.logps(policy, batch)
    assert_same(got, want, atol=1e-6)
    assert (sums(adapted) - sums(want)).abs().max() > 0.1


def test_frozen_reference_is_a_second_model(tiny_model_dir):
    """Contrast with peft_disabled: the frozen kind does load a second causal LM."""
    config = model_config(tiny_model_dir)
    policy = load_policy(config)
    before = live_causal_lms()
    reference = build_reference("auto", {}, policy=policy, model_config=config)
    assert isinstance(reference, FrozenReference)
    assert live_causal_lms() == before + 1
    assert sum(p.numel() for p in reference.model.parameters()) == sum(p.numel() for p in policy.parameters())


# --------------------------------------------------------------------------------------------- kinds and errors


def test_auto_resolves_by_policy_type(tiny_model_dir):
    plain = load_policy(model_config(tiny_model_dir))
    peft = load_policy(lora_config(tiny_model_dir))
    assert resolve_kind("auto", peft) == "peft_disabled"
    assert resolve_kind("auto", plain) == "frozen"
    assert resolve_kind("frozen", peft) == "frozen"  # an explicit kind is kept
    assert {"frozen", "peft_disabled"} <= set(REFERENCES)
    assert "auto" not in REFERENCES


def test_peft_disabled_needs_a_peft_policy(tiny_model_dir):
    config = model_config(tiny_model_dir)
    policy = load_policy(config)
    with pytest.raises(ConfigError, match=r"reference\.kind.*peft_disabled.*lora"):
        build_reference("peft_disabled", {}, policy=policy, model_config=config)


def test_unknown_kind_and_unknown_param_name_the_key():
    with pytest.raises(ConfigError, match=r"^reference\.kind: unknown kind 'tr_dop'"):
        reference_params("tr_dop", {})
    with pytest.raises(ConfigError, match=r"^reference\.beta: unknown key of reference kind 'frozen' \(known: name_or_path\)"):
        reference_params("frozen", {"beta": 0.1})
    with pytest.raises(ConfigError, match=r"^reference\.name_or_path: .*'peft_disabled'.*known: none"):
        reference_params("peft_disabled", {"name_or_path": "x"})
    assert reference_params("frozen", {"name_or_path": "x"}).name_or_path == "x"
    assert reference_params("frozen", {}).name_or_path is None


def test_build_reference_unknown_param_names_the_key(tiny_model_dir):
    config = lora_config(tiny_model_dir)
    policy = load_policy(config)
    # `auto` resolves to peft_disabled here, which takes no parameters.
    with pytest.raises(ConfigError, match=r"^reference\.name_or_path"):
        build_reference("auto", {"name_or_path": str(tiny_model_dir)}, policy=policy, model_config=config)


def test_build_reference_unknown_kind_is_a_config_error(tiny_model_dir):
    config = model_config(tiny_model_dir)
    with pytest.raises(ConfigError, match=r"^reference\.kind: unknown kind 'tr_dop'"):
        build_reference("tr_dop", {}, policy=None, model_config=config)


# --- TR-DPO update rule (METHODS §2) --------------------------------------------------------------------------------


def test_soft_update_reference_matches_the_formula():
    from align.references import soft_update_reference

    g = torch.Generator().manual_seed(0)
    theta = [torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
    ref0 = [torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
    for alpha in (0.0, 0.1, 0.6, 1.0):
        ref = [r.clone() for r in ref0]
        for k in range(1, 6):  # frozen policy: θ_ref after k updates = θ + (1 − α)^k (θ_ref⁰ − θ)
            soft_update_reference(ref, theta, alpha)
            for r, t, r0 in zip(ref, theta, ref0):
                torch.testing.assert_close(r, t + (1 - alpha) ** k * (r0 - t), rtol=1e-12, atol=1e-12)
        if alpha == 1.0:
            assert all(torch.equal(r, t) for r, t in zip(ref, theta))  # bit-exact
        if alpha == 0.0:
            assert all(torch.equal(r, r0) for r, r0 in zip(ref, ref0))  # never moves


def test_tr_dpo_updates_only_on_multiples_of_tau(tiny_model_dir):
    config = model_config(tiny_model_dir)
    policy = load_causal_lm(config)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.5)
    reference = build_reference("tr_dpo", {"alpha": 0.25, "tau": 3}, policy=policy, model_config=config)
    ref0 = [p.detach().clone() for p in reference.model.parameters()]
    for step in (1, 2, 4, 5):
        reference.on_step_end(policy, step)
        assert all(torch.equal(a, b) for a, b in zip(reference.model.parameters(), ref0))
    reference.on_step_end(policy, 6)
    for r, r0, t in zip(reference.model.parameters(), ref0, policy.parameters()):
        torch.testing.assert_close(r, 0.25 * t + 0.75 * r0)
    buffers = dict(reference.model.named_buffers())
    assert all(torch.equal(b, buffers[n]) for n, b in load_causal_lm(config).named_buffers())  # buffers untouched


def test_tr_dpo_bf16_reference_mixes_in_fp32(tiny_model_dir):
    # A small alpha applied to bf16 weights would round back to the old value; the fp32 master copy accumulates it.
    config = ModelConfig(name_or_path=str(tiny_model_dir), dtype="bfloat16")
    policy = load_causal_lm(config)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)
    reference = build_reference("tr_dpo", {"alpha": 0.001, "tau": 1}, policy=policy, model_config=config)
    ref0 = [p.detach().double() for p in reference.model.parameters()]
    for step in range(1, 201):
        reference.on_step_end(policy, step)
    for master, r0, t, r in zip(reference._master, ref0, policy.parameters(), reference.model.parameters()):
        expected = t.double() + (1 - 0.001) ** 200 * (r0 - t.double())
        torch.testing.assert_close(master.double(), expected, rtol=0, atol=1e-5)
        assert r.dtype == torch.bfloat16 and torch.equal(r, master.to(torch.bfloat16))
    moved = sum(int((r.double() != r0).sum()) for r, r0 in zip(reference.model.parameters(), ref0))
    assert moved > 0.5 * sum(r.numel() for r in ref0)


def test_tr_dpo_bad_parameters_name_the_key(tiny_model_dir):
    config = model_config(tiny_model_dir)
    policy = load_causal_lm(config)
    with pytest.raises(ConfigError, match=r"^reference\.alpha must be in \[0, 1\]"):
        build_reference("tr_dpo", {"alpha": 1.5}, policy=policy, model_config=config)
    with pytest.raises(ConfigError, match=r"^reference\.tau must be an integer >= 1"):
        build_reference("tr_dpo", {"tau": 0}, policy=policy, model_config=config)
    with pytest.raises(ConfigError, match=r"^reference\.rank must be an integer >= 1"):
        build_reference("tr_dpo", {"rank": 0}, policy=policy, model_config=config)
    with pytest.raises(ConfigError, match=r"^reference\.rank: only for a LoRA policy"):
        build_reference("tr_dpo", {"rank": 8}, policy=policy, model_config=config)


# --------------------------------------------------------------------------------------------- generated completions


def test_references_score_groups_of_generated_completions(tiny_model_dir, accelerator):
    """On-policy training asks every kind for log-probs of G sampled completions per prompt (`group_logps`), and
    the `best_of_n` target samples from the reference (`sampling_model`): both are the base model for `frozen` and
    for a trained LoRA policy's `peft_disabled`."""
    from align.logps import group_completion_keys, group_logps
    from align.rollout import HFRollout, SamplingParams

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rollout = HFRollout(base, tok)
    prompts = ["describe the movie .", "review the book ."]
    samples = rollout.generate(prompts, n=3, sampling=SamplingParams(max_new_tokens=6, seed=0))
    keys = group_completion_keys(3)
    prompt_ids = tok(prompts)["input_ids"]
    batch = SharedPromptCollator(tok.pad_token_id, completion_keys=keys)(
        [{"prompt_input_ids": p, **{k: c.token_ids for k, c in zip(keys, group)}}
         for p, group in zip(prompt_ids, samples)])
    with torch.no_grad():
        want = group_logps(base, batch)
    # The sampler's own log-probs of its completions are the same numbers.
    torch.testing.assert_close(want.sums(), torch.tensor([[float(c.logps.sum()) for c in g] for g in samples]),
                               rtol=0, atol=1e-4)

    frozen = build_reference("frozen", {}, policy=base, model_config=model_config(tiny_model_dir))
    frozen.prepare(accelerator)
    got = frozen.group_logps(None, batch)
    torch.testing.assert_close(got.logps, want.logps, rtol=0, atol=1e-6)
    assert got.mask.equal(want.mask)
    with frozen.sampling_model(None) as model:
        assert model is frozen.model

    config = lora_config(tiny_model_dir)
    policy = load_policy(config)
    reference = build_reference("peft_disabled", {}, policy=policy, model_config=config)
    reference.prepare(accelerator)
    pair_batch = SharedPromptCollator(tok.pad_token_id, completion_keys=keys[:2])(
        [{"prompt_input_ids": p, "completion_0_input_ids": g[0].token_ids, "completion_1_input_ids": g[1].token_ids}
         for p, g in zip(prompt_ids, samples)])
    train_steps(policy, {**pair_batch, "chosen_mask": pair_batch["completion_0_mask"],
                         "rejected_mask": pair_batch["completion_1_mask"],
                         "completion_keys": ["chosen_input_ids", "rejected_input_ids"]})
    torch.testing.assert_close(reference.group_logps(policy, batch).logps, want.logps, rtol=0, atol=1e-5)
    with reference.sampling_model(policy) as model, torch.no_grad():
        torch.testing.assert_close(group_logps(model, batch).logps, want.logps, rtol=0, atol=1e-5)
    with torch.no_grad():
        assert (group_logps(policy, batch).sums() - want.sums()).abs().max() > 1e-3  # the adapter is back on
