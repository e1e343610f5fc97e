"""TR-DPO with a LoRA policy (align/references/tr_dpo_lora.py): the reference is a second adapter on the same base.

Numbers checked against the merged-weight definition Δ = s·B·A of every LoRA layer (METHODS §2): a hard update
copies the adapter bit-exactly (reference log-probs == policy log-probs); a soft update gives α·Δ_p + (1−α)·Δ_r⁰
exactly when the reference rank holds it, and otherwise the best rank-r approximation (Eckart–Young, checked against
a dense SVD) with the error it logs; k updates with a frozen policy give Δ_p + (1−α)^k (Δ_r⁰ − Δ_p). In training:
the loss stays log 2 under hard every-step updates, the reference adapter gets no gradient and no optimizer slot, the
base weights never move, a resumed run restores the moved reference exactly, and the saved policy adapter loads back.
"""

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from align import toy_world
from align.data import tokenize_preference_rows
from align.errors import AlignError, ConfigError
from align.logps import SharedPromptCollator, pair_logps
from align.modeling import LoraSection, ModelConfig, load_policy, load_tokenizer
from align.objectives import get_objective
from align.references import build_reference
from align.references.tr_dpo_lora import REFERENCE_ADAPTER, LoraTRDPOReference, mix_lora_factors
from align.trainer import PreferenceTrainer, disable_dropout, training_arguments

LOG2 = math.log(2.0)
RANK = 4


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))


@pytest.fixture(scope="module")
def train_set(tokenizer):
    return tokenize_preference_rows(toy_world.make_preference_rows(64, seed=0), tokenizer)[0]


@pytest.fixture(scope="module")
def batch(train_set, tokenizer):
    return SharedPromptCollator(tokenizer.pad_token_id)([train_set[i] for i in range(6)])


def lora_config(model_dir, r=RANK):
    return ModelConfig(name_or_path=str(model_dir), dtype="float32", lora=LoraSection(r=r, lora_alpha=2 * r))


def lora_policy(model_dir, seed, r=RANK):
    """A LoRA policy whose adapter is random (B ≠ 0), so Δ_p has full rank r in every layer."""
    policy = load_policy(lora_config(model_dir, r))
    disable_dropout(policy)
    perturb(policy, seed)
    return policy


@torch.no_grad()
def perturb(policy, seed, scale=0.1):
    generator = torch.Generator().manual_seed(seed)
    for name, p in policy.named_parameters():
        if ".default." in name:
            p.add_(scale * torch.randn(p.shape, generator=generator))


def factors(module, adapter):
    return module.lora_B[adapter].weight, module.lora_A[adapter].weight


def deltas(reference, adapter):
    """Merged delta s·B·A `[d_out, d_in]` (fp64) of every LoRA layer, by module path."""
    out = {}
    for name, module in reference._layers:
        B, A = factors(module, adapter)
        out[name] = module.scaling[adapter] * (B.detach().double() @ A.detach().double())
    return out


def rel_fro(a: dict, b: dict) -> float:
    """‖a − b‖_F / ‖b‖_F over all layers."""
    num = sum(float((a[k] - b[k]).square().sum()) for k in b)
    return math.sqrt(num / sum(float(b[k].square().sum()) for k in b))


def make_trainer(out, model_dir, tokenizer, train_set, *, reference, objective="fdpo", **training):
    config = lora_config(model_dir)
    policy = load_policy(config)
    disable_dropout(policy)
    reference = build_reference("tr_dpo", reference, policy=policy, model_config=config)
    section = {"output_dir": str(out), "per_device_train_batch_size": 8, "learning_rate": 1e-2, "logging_steps": 1,
               "save_strategy": "no", "disable_tqdm": True, "dataloader_pin_memory": False, **training}
    return PreferenceTrainer(model=policy, args=training_arguments(section, seed=0),
                             objective=get_objective(objective, seed=0), reference=reference,
                             train_dataset=train_set, processing_class=tokenizer)


def train_logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


# --- the update rule, on a policy whose adapter we move by hand ---------------------------------------------------


def test_build_adds_one_adapter_and_no_second_base_model(tiny_model_dir):
    policy = lora_policy(tiny_model_dir, seed=0)
    before = sum(p.numel() for p in policy.parameters())
    reference = build_reference("tr_dpo", {"alpha": 0.5, "tau": 1, "rank": 2 * RANK}, policy=policy,
                                model_config=lora_config(tiny_model_dir))
    assert isinstance(reference, LoraTRDPOReference) and reference.kind == "tr_dpo"
    assert set(policy.peft_config) == {"default", REFERENCE_ADAPTER}
    assert policy.active_adapter == "default"
    adapter_size = sum(2 * RANK * (m.in_features + m.out_features) for _, m in reference._layers)
    assert sum(p.numel() for p in policy.parameters()) == before + adapter_size  # rank 8: 2·RANK per factor
    assert len(reference._layers) == 14  # 7 linear layers × 2 decoder layers, all adapted
    for name, p in policy.named_parameters():
        assert p.requires_grad == (".default." in name), name
    # The initial reference is the initial policy: factors copied into the first RANK slots, zeros after.
    for _, module in reference._layers:
        (B_p, A_p), (B_r, A_r) = factors(module, "default"), factors(module, REFERENCE_ADAPTER)
        assert module.scaling[REFERENCE_ADAPTER] == module.scaling["default"]
        assert torch.equal(B_r[:, :RANK], B_p) and torch.equal(A_r[:RANK], A_p)
        assert not B_r[:, RANK:].any() and not A_r[RANK:].any()


def test_hard_update_copies_the_adapter_bit_exactly(tiny_model_dir, batch):
    policy = lora_policy(tiny_model_dir, seed=0)
    reference = build_reference("tr_dpo", {"alpha": 1.0, "tau": 1}, policy=policy,
                                model_config=lora_config(tiny_model_dir))
    perturb(policy, seed=1)
    moved = [B_r.clone() for B_r, _ in (factors(m, REFERENCE_ADAPTER) for _, m in reference._layers)]
    reference.on_step_end(policy, 1)
    for (_, module), old in zip(reference._layers, moved):
        (B_p, A_p), (B_r, A_r) = factors(module, "default"), factors(module, REFERENCE_ADAPTER)
        assert torch.equal(B_r, B_p) and torch.equal(A_r, A_p)
        assert not torch.equal(B_r, old)
    assert reference.metrics() == {"reference/updates": 1.0, "reference/update_rel_error": 0.0}
    with torch.no_grad():
        policy_logps = pair_logps(policy, batch)
    reference_logps = reference.logps(policy, batch)
    assert torch.equal(reference_logps.chosen, policy_logps.chosen)
    assert torch.equal(reference_logps.rejected, policy_logps.rejected)
    # ... and the reference forward leaves the policy adapter active.
    assert all(m.active_adapters == ["default"] for _, m in reference._layers)


def test_soft_update_is_the_merged_weight_formula_when_the_rank_holds_it(tiny_model_dir):
    # Δ_r⁰ = Δ_p⁰ has rank 4 and the policy moves in another rank-4 direction: α·Δ_p + (1−α)·Δ_r⁰ has rank 8,
    # exactly what a rank-8 reference holds.
    alpha = 0.3
    policy = lora_policy(tiny_model_dir, seed=0)
    reference = build_reference("tr_dpo", {"alpha": alpha, "tau": 1, "rank": 2 * RANK}, policy=policy,
                                model_config=lora_config(tiny_model_dir))
    ref0 = deltas(reference, REFERENCE_ADAPTER)
    perturb(policy, seed=1)
    target = {k: alpha * p + (1 - alpha) * ref0[k] for k, p in deltas(reference, "default").items()}
    reference.on_step_end(policy, 1)
    assert rel_fro(deltas(reference, REFERENCE_ADAPTER), target) < 1e-6
    for name, delta in deltas(reference, REFERENCE_ADAPTER).items():
        torch.testing.assert_close(delta, target[name], rtol=0, atol=1e-6 * float(target[name].abs().max()))
    assert reference.metrics()["reference/update_rel_error"] < 1e-6


def test_first_soft_update_from_a_standard_init_is_exact_at_the_policy_rank(tiny_model_dir):
    # LoRA starts with B = 0, so Δ_r⁰ = 0 and α·Δ_p has the policy's rank: no truncation at rank r_p.
    policy = load_policy(lora_config(tiny_model_dir))
    reference = build_reference("tr_dpo", {"alpha": 0.6, "tau": 1}, policy=policy,
                                model_config=lora_config(tiny_model_dir))
    assert all(not d.any() for d in deltas(reference, REFERENCE_ADAPTER).values())
    perturb(policy, seed=2)
    target = {k: 0.6 * p for k, p in deltas(reference, "default").items()}
    reference.on_step_end(policy, 1)
    assert rel_fro(deltas(reference, REFERENCE_ADAPTER), target) < 1e-6


def test_truncated_soft_update_logs_its_true_error_which_is_optimal(tiny_model_dir):
    # Rank-4 reference, rank-8 target: the update keeps the best rank-4 part and reports what it dropped.
    alpha = 0.5
    policy = lora_policy(tiny_model_dir, seed=0)
    reference = build_reference("tr_dpo", {"alpha": alpha, "tau": 1}, policy=policy,
                                model_config=lora_config(tiny_model_dir))
    ref0 = deltas(reference, REFERENCE_ADAPTER)
    factors0 = {name: [x.detach().double().clone() for x in factors(m, REFERENCE_ADAPTER)]
                for name, m in reference._layers}
    perturb(policy, seed=1)
    target = {k: alpha * p + (1 - alpha) * ref0[k] for k, p in deltas(reference, "default").items()}
    reference.on_step_end(policy, 1)
    moved = deltas(reference, REFERENCE_ADAPTER)
    true_error = rel_fro(moved, target)
    logged = reference.metrics()["reference/update_rel_error"]
    assert true_error > 0.05  # truncation really happened
    assert logged == pytest.approx(true_error, rel=1e-5)
    # Eckart–Young: per layer, no rank-4 matrix is closer to the target than its truncated dense SVD.
    for name, t in target.items():
        S = torch.linalg.svdvals(t)
        best = float(S[RANK:].square().sum().sqrt())
        assert float(torch.linalg.matrix_norm(moved[name] - t)) == pytest.approx(best, rel=1e-5, abs=1e-9), name
    # Separate mixing of the factors (the wrong rule, METHODS §2) is much further from the target.
    wrong = {}
    for name, module in reference._layers:
        B_p, A_p = (x.detach().double() for x in factors(module, "default"))
        B_0, A_0 = factors0[name]
        wrong[name] = module.scaling["default"] * (alpha * B_p + (1 - alpha) * B_0) @ (alpha * A_p + (1 - alpha) * A_0)
    assert rel_fro(wrong, target) > true_error


def test_k_updates_with_a_frozen_policy_converge_geometrically(tiny_model_dir):
    alpha, k = 0.3, 5
    policy = lora_policy(tiny_model_dir, seed=0)
    reference = build_reference("tr_dpo", {"alpha": alpha, "tau": 1, "rank": 2 * RANK}, policy=policy,
                                model_config=lora_config(tiny_model_dir))
    ref0 = deltas(reference, REFERENCE_ADAPTER)
    perturb(policy, seed=1)
    theta = deltas(reference, "default")
    for step in range(1, k + 1):
        reference.on_step_end(policy, step)
        expected = {n: t + (1 - alpha) ** step * (ref0[n] - t) for n, t in theta.items()}
        assert rel_fro(deltas(reference, REFERENCE_ADAPTER), expected) < 1e-6, step
        assert reference.metrics()["reference/update_rel_error"] < 1e-6
    assert reference.updates == k


def test_alpha_zero_never_moves_and_only_multiples_of_tau_update(tiny_model_dir):
    policy = lora_policy(tiny_model_dir, seed=0)
    config = lora_config(tiny_model_dir)
    still = build_reference("tr_dpo", {"alpha": 0.0, "tau": 1}, policy=policy, model_config=config)
    policy_b = lora_policy(tiny_model_dir, seed=0)
    scheduled = build_reference("tr_dpo", {"alpha": 0.5, "tau": 3}, policy=policy_b, model_config=config)
    perturb(policy, seed=1)
    perturb(policy_b, seed=1)

    def snapshot(reference):
        return [t.clone() for _, m in reference._layers for t in factors(m, REFERENCE_ADAPTER)]

    still0, scheduled0 = snapshot(still), snapshot(scheduled)
    for step in (1, 2, 3, 4, 5):
        still.on_step_end(policy, step)
        scheduled.on_step_end(policy_b, step)
        assert all(torch.equal(a, b) for a, b in zip(snapshot(still), still0))
        if step < 3:
            assert all(torch.equal(a, b) for a, b in zip(snapshot(scheduled), scheduled0))
    assert still.updates == 5 and scheduled.updates == 1
    assert any(not torch.equal(a, b) for a, b in zip(snapshot(scheduled), scheduled0))  # step 3 moved it
    at3 = snapshot(scheduled)
    assert all(torch.equal(a, b) for a, b in zip(at3, snapshot(scheduled)))  # steps 4, 5: unchanged


def test_mix_lora_factors_pads_when_the_layer_is_narrower_than_the_rank():
    # d_out = 3 < rank: the mix has at most 3 singular values; the extra columns/rows are zero, nothing is dropped.
    g = torch.Generator().manual_seed(0)
    B_p, A_p = torch.randn(1, 3, 2, generator=g, dtype=torch.float64), torch.randn(1, 2, 5, generator=g,
                                                                                   dtype=torch.float64)
    B_r, A_r = torch.randn(1, 3, 4, generator=g, dtype=torch.float64), torch.randn(1, 4, 5, generator=g,
                                                                                   dtype=torch.float64)
    B, A, dropped, total = mix_lora_factors(B_p, A_p, B_r, A_r, 0.25, 4)
    target = 0.25 * B_p @ A_p + 0.75 * B_r @ A_r
    torch.testing.assert_close(B @ A, target, rtol=0, atol=1e-12)
    assert B.shape == (1, 3, 4) and A.shape == (1, 4, 5) and not B[..., 3:].any() and not A[:, 3:].any()
    assert float(dropped) == 0.0 and float(total) == pytest.approx(float(target.square().sum()), rel=1e-12)


# --- the reference forward inside a training step -----------------------------------------------------------------


def test_reference_forward_gives_the_merged_reference_and_leaves_gradients_alone(tiny_model_dir, batch):
    policy = lora_policy(tiny_model_dir, seed=0)
    reference = build_reference("tr_dpo", {"alpha": 0.5, "tau": 1}, policy=policy,
                                model_config=lora_config(tiny_model_dir))
    perturb(policy, seed=1)
    reference.on_step_end(policy, 1)  # the reference is now neither the base model nor the policy
    objective = get_objective("fdpo", seed=0)
    trained = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    base = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" not in n}
    policy.train()

    def grads(reference_logps_fn, before=False):
        policy.zero_grad(set_to_none=True)
        ref = reference_logps_fn() if before else None
        logps = pair_logps(policy, batch)  # the policy graph is alive while the reference forward runs
        ref = ref if before else reference_logps_fn()
        objective(logps, ref)[0].mean().backward()
        return ref, {n: p.grad.clone() for n, p in trained.items()}

    # (1) as the trainer does it: policy forward, then the adapter-switched reference forward, then backward
    ref_live, g_live = grads(lambda: reference.logps(policy, batch))
    # (2) the same reference log-probs computed before the policy graph exists
    ref_before, g_before = grads(lambda: reference.logps(policy, batch), before=True)
    assert torch.equal(ref_live.chosen, ref_before.chosen) and torch.equal(ref_live.rejected, ref_before.rejected)
    for name in trained:
        assert torch.equal(g_live[name], g_before[name]), name
    # (3) a separate frozen model holding the merged reference weights W₀ + s·B_r·A_r gives the same log-probs
    frozen = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    frozen_modules = dict(frozen.named_modules())
    with torch.no_grad():
        for name, delta in deltas(reference, REFERENCE_ADAPTER).items():
            frozen_modules[name.removeprefix("base_model.model.")].weight += delta.float()
        ref_frozen = pair_logps(frozen, batch)
    torch.testing.assert_close(ref_live.chosen, ref_frozen.chosen, rtol=0, atol=2e-5)
    torch.testing.assert_close(ref_live.rejected, ref_frozen.rejected, rtol=0, atol=2e-5)
    _, g_frozen = grads(lambda: ref_frozen, before=True)
    for name in trained:
        torch.testing.assert_close(g_live[name], g_frozen[name], rtol=1e-4, atol=1e-7)
    # The reference adapter never takes part in autograd; the base weights never change.
    for name, p in policy.named_parameters():
        if f".{REFERENCE_ADAPTER}." in name:
            assert not p.requires_grad and p.grad is None, name
        if "lora_" not in name:
            assert torch.equal(p, base[name]), name
    assert all(p.requires_grad for p in trained.values())


# --- errors ---------------------------------------------------------------------------------------------------


def test_unsupported_setups_are_config_errors(tiny_model_dir):
    config = lora_config(tiny_model_dir)
    with pytest.raises(ConfigError, match=r"^reference\.name_or_path: not available with a LoRA policy"):
        build_reference("tr_dpo", {"name_or_path": str(tiny_model_dir)}, policy=load_policy(config),
                        model_config=config)
    reference = build_reference("tr_dpo", {}, policy=load_policy(config), model_config=config)
    zero3 = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)))
    with pytest.raises(ConfigError, match=r"^training\.deepspeed: .*ZeRO-3"):
        reference.prepare(zero3)
    state = reference.state_dict()
    state["factors"].popitem()
    with pytest.raises(AlignError, match="does not match"):
        reference.load_state_dict(state)

    from peft import LoraConfig, get_peft_model

    dora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ConfigError, match=r"^model\.lora: .*use_dora"):
        build_reference("tr_dpo", {}, policy=dora, model_config=config)
    with warnings.catch_warnings():  # PEFT warns that the tiny model's embedding is tied to its LM head
        warnings.simplefilter("ignore")
        embedding = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                   LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(ConfigError, match=r"^model\.lora\.target_modules: tr_dpo supports LoRA on linear layers"):
        build_reference("tr_dpo", {}, policy=embedding, model_config=config)
    assert set(embedding.peft_config) == {"default"}  # refused before the policy is touched
    assert not any(f".{REFERENCE_ADAPTER}." in name for name, _ in embedding.named_parameters())


# --- training -------------------------------------------------------------------------------------------------


def test_hard_update_every_step_keeps_the_loss_at_log2(tmp_path, tiny_model_dir, tokenizer, train_set):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, train_set, max_steps=5,
                           reference={"alpha": 1.0, "tau": 1})
    policy, reference = trainer.model, trainer.reference
    start = {n: p.detach().clone() for n, p in policy.named_parameters()}
    trainer.train()
    logs = train_logs(trainer)
    assert len(logs) == 5 and all(entry["loss"] == pytest.approx(LOG2, abs=1e-6) for entry in logs)
    assert [entry["reference/updates"] for entry in logs] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert all(entry["reference/update_rel_error"] == 0.0 for entry in logs)
    for _, module in reference._layers:
        (B_p, A_p), (B_r, A_r) = factors(module, "default"), factors(module, REFERENCE_ADAPTER)
        assert torch.equal(B_p, B_r) and torch.equal(A_p, A_r)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    for name, p in policy.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, start[name]), name  # the shared base model never moves
        if f".{REFERENCE_ADAPTER}." in name:
            assert not p.requires_grad and p.grad is None and id(p) not in optimized, name
    assert any(not torch.equal(p, start[n]) for n, p in policy.named_parameters() if ".default." in n)


@pytest.mark.parametrize("objective", ["fdpo", "sampo"])
def test_soft_updates_train_with_each_objective(tmp_path, tiny_model_dir, tokenizer, train_set, objective):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, train_set, max_steps=4, objective=objective,
                           reference={"alpha": 0.5, "tau": 2})
    trainer.train()
    logs = train_logs(trainer)
    assert all(math.isfinite(entry["loss"]) for entry in logs)
    assert [entry["reference/updates"] for entry in logs] == [0.0, 1.0, 1.0, 2.0]
    assert "reference/update_rel_error" not in logs[0]
    assert 0.0 <= logs[-1]["reference/update_rel_error"] < 1.0
    reference = trainer.reference
    moved = deltas(reference, REFERENCE_ADAPTER)
    assert all(d.any() for d in moved.values())  # moved off the initial (B = 0) adapter
    assert rel_fro(moved, deltas(reference, "default")) > 1e-3  # ... but not onto the policy


def test_resume_restores_the_moved_reference_and_the_saved_policy_loads_back(tmp_path, tiny_model_dir, tokenizer,
                                                                             train_set):
    def run(out, resume=None):
        trainer = make_trainer(out, tiny_model_dir, tokenizer, train_set, max_steps=8, save_strategy="steps",
                               save_steps=4, reference={"alpha": 0.5, "tau": 2})
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "a")
    checkpoint = tmp_path / "a" / "checkpoint-4"
    state = torch.load(checkpoint / "align_reference.pt", weights_only=False)
    assert state["updates"] == 2 and state["last_rel_error"] is not None
    resumed = run(tmp_path / "b", resume=str(checkpoint))
    assert resumed.reference.updates == full.reference.updates == 4
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name  # both adapters, and the base
    for a, b in zip(full.reference._B + full.reference._A, resumed.reference._B + resumed.reference._A):
        assert torch.equal(a, b)
    assert resumed.reference.metrics() == full.reference.metrics()
    assert all(not p.requires_grad for n, p in resumed.model.named_parameters() if f".{REFERENCE_ADAPTER}." in n)

    # The saved model: the policy adapter at the top level (loads back as the trained policy), the moved reference
    # adapter in `reference/`.
    from peft import PeftModel

    final = tmp_path / "final"
    full.save_model(str(final))
    assert (final / "adapter_model.safetensors").is_file()
    assert (final / REFERENCE_ADAPTER / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                       str(final))
    assert set(loaded.peft_config) == {"default"}
    trained = {n: p for n, p in full.model.named_parameters() if f".{REFERENCE_ADAPTER}." not in n}
    assert len(trained) == sum(1 for _ in loaded.named_parameters())
    for name, p in loaded.named_parameters():
        assert torch.equal(p, trained[name]), name
    loaded.load_adapter(str(final / REFERENCE_ADAPTER), REFERENCE_ADAPTER)
    loaded_modules = dict(loaded.named_modules())
    for name, module in full.reference._layers:
        other = loaded_modules[name]
        assert other.scaling[REFERENCE_ADAPTER] == pytest.approx(module.scaling[REFERENCE_ADAPTER], rel=1e-12)
        for a, b in zip(factors(module, REFERENCE_ADAPTER), factors(other, REFERENCE_ADAPTER)):
            assert torch.equal(a, b), name
