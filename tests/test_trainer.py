"""align.trainer (and the `align.recipes.train.train` recipe): short training runs on the toy world.

Every run uses the tiny Llama from the fixtures and at most a few dozen optimizer steps. The numbers checked:
the first step's loss is log 2 (the reference is the initial policy), training lowers the loss and raises the
margins and accuracies, the first SGD update equals the analytic DPO gradient at π = π_ref (β/2 times the mean
gradient of the log-prob margin), gradient accumulation does not change it, and a resumed run ends with exactly
the weights of an uninterrupted one.
"""

import json
import logging
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from align import toy_world
from align.config import config_to_dict, load_train_config
from align.data import tokenize_preference_rows
from align.errors import AlignError
from align.logps import SharedPromptCollator, pair_logps
from align.modeling import LoraSection, ModelConfig, load_policy, load_tokenizer
from align.objectives import SamPO, get_objective
from align.references import PeftDisabledReference, build_reference
from align.recipes.train import train
from align.trainer import (
    CHECKPOINT_MARKER,
    PreferenceTrainer,
    disable_dropout,
    latest_checkpoint,
    training_arguments,
)

LOG2 = math.log(2.0)
METRIC_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logratios/mean",
               "logps/chosen", "logps/rejected", "length/chosen", "length/rejected")




@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))


@pytest.fixture(scope="module")
def train_rows():
    return toy_world.make_preference_rows(128, seed=0)


@pytest.fixture(scope="module")
def train_set(train_rows, tokenizer):
    return tokenize_preference_rows(train_rows, tokenizer)[0]


@pytest.fixture(scope="module")
def eval_set(tokenizer):
    return tokenize_preference_rows(toy_world.make_preference_rows(32, seed=1), tokenizer)[0]


def make_trainer(tmp_path, model_dir, tokenizer, train_dataset, *, objective="fdpo", objective_params=None,
                 lora=None, eval_dataset=None, seed=0, reference=("auto", {}), resume_with_changed_parameters=False,
                 **training):
    config = ModelConfig(name_or_path=str(model_dir), dtype="float32", lora=lora)
    policy = load_policy(config)
    disable_dropout(policy)
    reference = build_reference(*reference, policy=policy, model_config=config)
    section = {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 8,
               "per_device_eval_batch_size": 16, "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no",
               "disable_tqdm": True, "dataloader_pin_memory": False, **training}
    args = training_arguments(section, seed=seed)
    return PreferenceTrainer(model=policy, args=args, objective=get_objective(objective, seed=seed,
                                                                              **(objective_params or {})),
                             reference=reference, train_dataset=train_dataset, eval_dataset=eval_dataset,
                             processing_class=tokenizer, resume_with_changed_parameters=resume_with_changed_parameters)


def train_logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def mean(values):
    values = list(values)
    return sum(values) / len(values)


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# --------------------------------------------------------------------------------------------- learning


def test_dpo_training_lowers_loss_and_raises_margins(tmp_path, tiny_model_dir, tokenizer, train_set, eval_set):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, train_set, eval_dataset=eval_set,
                           num_train_epochs=2)
    initial = snapshot(trainer.model)
    before = trainer.evaluate(eval_dataset=train_set)
    trainer.train()
    after = trainer.evaluate(eval_dataset=train_set)
    logs = train_logs(trainer)
    assert len(logs) == 32  # 128 pairs / 8 per step × 2 epochs, one log per step

    # Step 1: the reference is the initial policy, so every log-ratio is 0 and the loss is log 2.
    first = logs[0]
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(LOG2, abs=1e-3)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logratios/mean"):
        assert first[key] == pytest.approx(0.0, abs=1e-6), key
    assert before["eval_loss"] == pytest.approx(LOG2, abs=1e-6)

    for entry in logs:
        assert set(METRIC_KEYS) <= set(entry), set(METRIC_KEYS) - set(entry)
        assert not any(key.startswith("eval_") for key in entry)
        # Identities of the logged means (reverse KL: reward = β·log-ratio; logratios/mean = mean of the two).
        assert entry["rewards/margins"] == pytest.approx(entry["rewards/chosen"] - entry["rewards/rejected"],
                                                         abs=1e-5)
        assert entry["rewards/chosen"] == pytest.approx(0.1 * entry["logratios/chosen"], abs=1e-5)
        assert entry["logratios/mean"] == pytest.approx(
            0.5 * (entry["logratios/chosen"] + entry["logratios/rejected"]), abs=1e-4)
        assert entry["logps/chosen"] < 0 and entry["logps/rejected"] < 0
        assert 0.0 <= entry["rewards/accuracies"] <= 1.0
    # Each epoch sees every pair once, 8 per step: the epoch mean of the logged lengths is the data's mean length.
    chosen_len = mean(len(train_set[i]["chosen_input_ids"]) for i in range(len(train_set)))
    rejected_len = mean(len(train_set[i]["rejected_input_ids"]) for i in range(len(train_set)))
    for epoch in (logs[:16], logs[16:]):
        assert mean(e["length/chosen"] for e in epoch) == pytest.approx(chosen_len, abs=1e-4)
        assert mean(e["length/rejected"] for e in epoch) == pytest.approx(rejected_len, abs=1e-4)

    early, late = logs[:8], logs[-8:]
    assert mean(e["loss"] for e in late) < mean(e["loss"] for e in early) - 0.05
    assert mean(e["rewards/margins"] for e in late) > mean(e["rewards/margins"] for e in early) + 0.1
    assert mean(e["rewards/accuracies"] for e in late) > mean(e["rewards/accuracies"] for e in early) + 0.1
    assert after["eval_loss"] < LOG2 - 0.05
    assert after["eval_rewards/margins"] > 0.1 and after["eval_rewards/accuracies"] > 0.7
    assert any(not torch.equal(p, initial[n]) for n, p in trainer.model.named_parameters())


def test_eval_metrics_are_prefixed(tmp_path, tiny_model_dir, tokenizer, train_set, eval_set):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, train_set, eval_dataset=eval_set, max_steps=4,
                           logging_steps=2, eval_strategy="steps", eval_steps=2)
    trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [2, 4]
    for entry in evals:
        assert {"eval_" + key for key in METRIC_KEYS} <= set(entry)
        assert not set(METRIC_KEYS) & set(entry)  # no unprefixed (train) metrics in an eval log
        assert entry["eval_length/chosen"] == pytest.approx(
            mean(len(eval_set[i]["chosen_input_ids"]) for i in range(len(eval_set))), abs=1e-4)
    trains = train_logs(trainer)
    assert [e["step"] for e in trains] == [2, 4]
    for entry in trains:
        assert set(METRIC_KEYS) <= set(entry) and not any(k.startswith("eval_") for k in entry)
    metrics = trainer.evaluate()
    assert {"eval_loss", *("eval_" + key for key in METRIC_KEYS)} <= set(metrics)


def test_eval_metrics_are_per_pair_means_with_a_ragged_last_batch(tmp_path, tiny_model_dir, tokenizer, eval_set):
    twenty = torch.utils.data.Subset(eval_set, range(20))  # eval batches of 16 and 4
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, twenty, per_device_eval_batch_size=16)
    metrics = trainer.evaluate(eval_dataset=twenty)
    want = mean(len(twenty[i]["chosen_input_ids"]) for i in range(20))
    assert metrics["eval_length/chosen"] == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("objective, params", [("sampo", {}), ("fdpo", {"divergence": "js"})], ids=["sampo", "js"])
def test_other_objectives_train(tmp_path, tiny_model_dir, tokenizer, train_set, objective, params):
    subset = torch.utils.data.Subset(train_set, range(64))
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, subset, objective=objective,
                           objective_params=params, learning_rate=3e-3, num_train_epochs=2)
    before = trainer.evaluate(eval_dataset=subset)
    trainer.train()
    after = trainer.evaluate(eval_dataset=subset)
    logs = train_logs(trainer)
    assert logs[0]["loss"] == pytest.approx(LOG2, abs=1e-3)  # every f-DPO variant gives log 2 at π = π_ref
    assert before["eval_loss"] == pytest.approx(LOG2, abs=1e-6)
    assert after["eval_loss"] < LOG2 - 0.03
    assert after["eval_rewards/accuracies"] > 0.6
    for entry in logs:
        assert set(METRIC_KEYS) <= set(entry)
    if objective == "sampo":
        assert all(0.0 < e["sampo/kept_fraction"] <= 1.0 for e in logs)
        assert min(e["sampo/kept_fraction"] for e in logs) < 1.0  # some pairs have unequal lengths


def test_lora_training_changes_only_the_adapter(tmp_path, tiny_model_dir, tokenizer, train_set):
    subset = torch.utils.data.Subset(train_set, range(64))
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, subset, lora=LoraSection(r=4, lora_alpha=8),
                           learning_rate=2e-2, max_steps=8)
    assert isinstance(trainer.reference, PeftDisabledReference)
    initial = snapshot(trainer.model)
    trainer.train()
    after = trainer.evaluate(eval_dataset=subset)
    logs = train_logs(trainer)
    assert logs[0]["loss"] == pytest.approx(LOG2, abs=1e-3)
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, initial[n])}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)
    assert after["eval_loss"] < LOG2 - 0.02 and after["eval_rewards/accuracies"] > 0.6


# --------------------------------------------------------------------------------------------- the update itself


def first_update(tmp_path, tiny_model_dir, tokenizer, dataset, **training):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, dataset, optim="sgd", learning_rate=0.5,
                           max_grad_norm=0.0, max_steps=1, lr_scheduler_type="constant", **training)
    initial = snapshot(trainer.model)
    trainer.train()
    delta = {n: p.detach() - initial[n] for n, p in trainer.model.named_parameters()}
    return delta, train_logs(trainer)[0]


def test_gradient_accumulation_matches_one_big_batch(tmp_path, tiny_model_dir, tokenizer, train_set):
    """2 micro-batches × 4 pairs give the same first SGD update as 1 × 8, and both equal the analytic DPO
    gradient at π = π_ref: ∂L/∂θ = −(β/2) · mean_i ∇[log π(y_w,i) − log π(y_l,i)] (METHODS §1 test 1)."""
    eight = torch.utils.data.Subset(train_set, range(8))
    accumulated, log_a = first_update(tmp_path / "a", tiny_model_dir, tokenizer, eight,
                                      per_device_train_batch_size=4, gradient_accumulation_steps=2)
    single, log_b = first_update(tmp_path / "b", tiny_model_dir, tokenizer, eight, per_device_train_batch_size=8)
    assert log_a["loss"] == pytest.approx(LOG2, abs=1e-6) and log_b["loss"] == pytest.approx(LOG2, abs=1e-6)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = SharedPromptCollator(tokenizer.pad_token_id)([eight[i] for i in range(8)])
    logps = pair_logps(model, batch)
    margin = (logps.chosen_sum() - logps.rejected_sum()).mean()
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(margin, [p for _, p in model.named_parameters()])
    expected = {n: 0.5 * (0.1 / 2) * g for n, g in zip(names, grads)}  # −lr · ∂L/∂θ, lr = 0.5, β = 0.1

    assert set(accumulated) == set(single) == set(expected)
    for name in names:
        scale = expected[name].abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(single[name], expected[name], rtol=1e-3, atol=1e-4 * scale, msg=name)
        torch.testing.assert_close(accumulated[name], single[name], rtol=1e-3, atol=1e-4 * scale, msg=name)


# --------------------------------------------------------------------------------------------- train() and resume


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def recipe(tmp_path, tiny_model_dir, output_dir, **training):
    return {
        "model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl")},
        "objective": {"name": "sampo", "beta": 0.1},
        "training": {"output_dir": str(output_dir), "per_device_train_batch_size": 8, "learning_rate": 1e-3,
                     "max_steps": 8, "save_steps": 4, "logging_steps": 2, "disable_tqdm": True,
                     "dataloader_pin_memory": False, **training},
        "seed": 3,
    }


def final_weights(output_dir):
    model = AutoModelForCausalLM.from_pretrained(output_dir / "final", dtype=torch.float32)
    return model.state_dict()


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_train_outputs_and_exact_resume(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "train.jsonl", toy_world.make_preference_rows(64, seed=0))
    write_jsonl(tmp_path / "eval.jsonl", toy_world.make_preference_rows(16, seed=1))

    # --- an uninterrupted run of 8 steps with checkpoints at 4 and 8
    out_a = tmp_path / "a"
    config = load_train_config(None, base=recipe(tmp_path, tiny_model_dir, out_a))
    summary = train(config)
    assert sorted(p.name for p in out_a.iterdir()) == ["align_config.yaml", "checkpoint-4", "checkpoint-8", "final",
                                                       "train_summary.json"]  # no .final.tmp-* or other leftovers
    for checkpoint in ("checkpoint-4", "checkpoint-8"):
        state = torch.load(out_a / checkpoint / "align_state_0.pt", weights_only=False)
        assert set(state) == {"objective"} and set(state["objective"]) == {"generator"}
        assert torch.load(out_a / checkpoint / "align_reference.pt", weights_only=False) == {}  # frozen: no state
    written = json.loads((out_a / "train_summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["global_step"] == 8 and written["data"]["kept"] == 64
    assert math.isfinite(written["train_loss"]) and written["train_loss"] < LOG2
    assert written["final_model"] == str(out_a / "final")
    last_train_log = [h for h in written["log_history"] if "loss" in h][-1]
    assert last_train_log["step"] == 8 and "rewards/margins" in last_train_log
    assert "eval_loss" in written["eval"] and "eval_rewards/accuracies" in written["eval"]
    # The resolved recipe reloads to the same config.
    reloaded = load_train_config(out_a / "align_config.yaml")
    assert config_to_dict(reloaded) == config_to_dict(config)
    # final/ is a plain HF model folder, equal to the last checkpoint and different from the start.
    final_a = final_weights(out_a)
    last = AutoModelForCausalLM.from_pretrained(out_a / "checkpoint-8", dtype=torch.float32).state_dict()
    assert_same_weights(final_a, last)
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    assert any(not torch.equal(final_a[k], start[k]) for k in start)
    assert (out_a / "final" / "tokenizer.json").is_file()

    # --- resuming from checkpoint-4 ends with exactly the same weights
    out_b = tmp_path / "b"
    resumed = recipe(tmp_path, tiny_model_dir, out_b, resume_from_checkpoint=str(out_a / "checkpoint-4"))
    summary_b = train(load_train_config(None, base=resumed))
    assert summary_b["global_step"] == 8
    assert_same_weights(final_weights(out_b), final_a)

    # --- `resume_from_checkpoint: latest` picks the newest checkpoint in output_dir
    out_e = tmp_path / "e"
    out_e.mkdir()
    shutil.copytree(out_a / "checkpoint-4", out_e / "checkpoint-4")
    train(load_train_config(None, base=recipe(tmp_path, tiny_model_dir, out_e, resume_from_checkpoint="latest")))
    assert_same_weights(final_weights(out_e), final_a)

    # --- power check: the same resume with SamPO's generator back at its seed draws other subsets
    stale = tmp_path / "stale-checkpoint"
    shutil.copytree(out_a / "checkpoint-4", stale)
    fresh = SamPO(SamPO.Params(), seed=3)
    torch.save({"objective": fresh.state_dict()}, stale / "align_state_0.pt")
    out_c = tmp_path / "c"
    train(load_train_config(None, base=recipe(tmp_path, tiny_model_dir, out_c, resume_from_checkpoint=str(stale))))
    final_c = final_weights(out_c)
    assert any(not torch.equal(final_c[k], final_a[k]) for k in final_a)

    # --- a checkpoint without align's state cannot be resumed exactly: an error, not a silent divergence
    (stale / "align_state_0.pt").unlink()
    out_d = tmp_path / "d"
    with pytest.raises(AlignError, match="align_state_0.pt"):
        train(load_train_config(None, base=recipe(tmp_path, tiny_model_dir, out_d, resume_from_checkpoint=str(stale))))


# --- TR-DPO -------------------------------------------------------------------------------------------------------


def test_tr_dpo_hard_update_every_step_keeps_the_loss_at_log2(tmp_path, tiny_model_dir, tokenizer, train_set):
    # alpha = 1, tau = 1: after every optimizer step the reference is the policy, so the next batch has log-ratios
    # of exactly 0 and every logged loss is log 2 (METHODS §2, test 1), while the policy itself keeps moving.
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, train_set, max_steps=5,
                           reference=("tr_dpo", {"alpha": 1.0, "tau": 1}))
    start = snapshot(trainer.model)
    trainer.train()
    losses = [log["loss"] for log in train_logs(trainer)]
    assert len(losses) == 5 and all(loss == pytest.approx(LOG2, abs=1e-6) for loss in losses)
    assert trainer.reference.updates == 5
    for (name, p), r in zip(trainer.model.named_parameters(), trainer.reference.model.parameters()):
        assert torch.equal(p, r), name
    assert any(not torch.equal(p, start[n]) for n, p in trainer.model.named_parameters())


def test_tr_dpo_with_sampo_and_tau_schedule(tmp_path, tiny_model_dir, tokenizer, train_set):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, train_set, max_steps=5, objective="sampo",
                           reference=("tr_dpo", {"alpha": 0.5, "tau": 2}))
    trainer.train()
    assert trainer.reference.updates == 2  # steps 2 and 4; step 5 is not a multiple of tau
    losses = [log["loss"] for log in train_logs(trainer)]
    assert all(math.isfinite(loss) for loss in losses)


def test_tr_dpo_resume_restores_the_moved_reference(tmp_path, tiny_model_dir, tokenizer, train_set):
    def run(out, resume=None):
        trainer = make_trainer(out, tiny_model_dir, tokenizer, train_set, max_steps=8, save_strategy="steps",
                               save_steps=4, reference=("tr_dpo", {"alpha": 0.5, "tau": 2}))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "a")
    state = torch.load(tmp_path / "a" / "out" / "checkpoint-4" / "align_reference.pt", weights_only=False)
    assert state["updates"] == 2
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "out" / "checkpoint-4"))
    assert resumed.reference.updates == full.reference.updates == 4
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), f"policy {name}"
    for (name, a), b in zip(full.reference.model.named_parameters(), resumed.reference.model.parameters()):
        assert torch.equal(a, b), f"reference {name}"  # the moved reference, not the SFT model
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert any(not torch.equal(a, b) for a, b in zip(initial.parameters(), resumed.reference.model.parameters()))


# ----------------------------------------------------------------- what a resumed checkpoint's state means (issue 12)


def test_resume_refuses_changed_parameters_unless_overridden(tmp_path, tiny_model_dir, tokenizer, train_set, caplog):
    """A checkpoint's state (TR-DPO's moved reference, the optimizer) belongs to the parameters it was trained with:
    resuming it under another β, divergence or τ would silently continue one run as another. Every changed key is
    named with its old and new value; `resume_with_changed_parameters` resumes anyway, with one warning."""
    def trainer(out, max_steps, beta=0.1, divergence="reverse_kl", tau=2, **kwargs):
        return make_trainer(out, tiny_model_dir, tokenizer, train_set, max_steps=max_steps, save_strategy="steps",
                            save_steps=2, objective_params={"beta": beta, "divergence": divergence},
                            reference=("tr_dpo", {"alpha": 0.5, "tau": tau}), **kwargs)

    trainer(tmp_path / "a", 2).train()
    checkpoint = tmp_path / "a" / "out" / "checkpoint-2"
    marker = json.loads((checkpoint / CHECKPOINT_MARKER).read_text())
    assert marker["model_only"] is False
    assert {key: marker["parameters"][key] for key in ("objective.beta", "objective.divergence", "reference.alpha",
                                                       "reference.tau")} == {
        "objective.beta": 0.1, "objective.divergence": "reverse_kl", "reference.alpha": 0.5, "reference.tau": 2}

    changed = {"beta": 0.2, "divergence": "js", "tau": 4}
    refused = trainer(tmp_path / "b", 3, **changed)
    with pytest.raises(AlignError) as e:
        refused.train(resume_from_checkpoint=str(checkpoint))
    message = str(e.value)
    assert message.startswith(f"{checkpoint}: written with other parameters (objective.beta: 0.1 → 0.2; "
                              "objective.divergence: reverse_kl → js; reference.tau: 2 → 4); ")
    assert "resume_with_changed_parameters=true" in message and "\n" not in message
    assert refused.state.global_step == 0 and refused.reference.updates == 0  # nothing was loaded or trained

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="align.trainer"):
        allowed = trainer(tmp_path / "c", 3, resume_with_changed_parameters=True, **changed)
        allowed.train(resume_from_checkpoint=str(checkpoint))
    warnings = [r.getMessage() for r in caplog.records if "changed parameters" in r.getMessage()]
    assert warnings == [(f"{checkpoint}: resuming with changed parameters (resume_with_changed_parameters=true): "
                         "objective.beta: 0.1 → 0.2; objective.divergence: reverse_kl → js; reference.tau: 2 → 4")]
    assert allowed.state.global_step == 3
    assert allowed.reference.updates == 1  # step 2's update, from the checkpoint (τ = 4 makes none at step 3)
    assert allowed.objective.params.beta == 0.2

    # A marker written before parameters were recorded: only the objective name and reference kind are compared.
    del marker["parameters"], marker["model_only"]
    (checkpoint / CHECKPOINT_MARKER).write_text(json.dumps(marker))
    old = trainer(tmp_path / "d", 3, **changed)
    old.train(resume_from_checkpoint=str(checkpoint))
    assert old.state.global_step == 3 and old.reference.updates == 1


def test_model_only_checkpoints_are_never_resumed(tmp_path, tiny_model_dir, caplog):
    """`save_only_model: true` checkpoints hold no optimizer, scheduler or RNG state (nor align's): `latest` skips
    them (and with nothing else, starts from scratch saying why); naming one is one error line."""
    write_jsonl(tmp_path / "train.jsonl", toy_world.make_preference_rows(32, seed=0))
    write_jsonl(tmp_path / "eval.jsonl", toy_world.make_preference_rows(8, seed=1))

    def run(out, **training):
        base = recipe(tmp_path, tiny_model_dir, out, max_steps=4, save_steps=2, save_only_model=True, **training)
        return train(load_train_config(None, base=base))

    out = tmp_path / "model-only"
    run(out)
    for step in (2, 4):
        checkpoint = out / f"checkpoint-{step}"
        assert json.loads((checkpoint / CHECKPOINT_MARKER).read_text())["model_only"] is True
        assert not (checkpoint / "optimizer.pt").exists() and not (checkpoint / "align_state_0.pt").exists()
    first = final_weights(out)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        summary = run(out, resume_from_checkpoint="latest")
    assert (f"{out}: skipping checkpoint-4, checkpoint-2: written with training.save_only_model=true (the model only: "
            "no optimizer, scheduler or RNG state to resume from)") in caplog.text
    assert f"no complete checkpoint in {out}; training from the start" in caplog.text
    assert summary["global_step"] == 4
    assert_same_weights(final_weights(out), first)  # the same 4 steps from the start, not a continuation

    with pytest.raises(AlignError) as e:
        run(tmp_path / "explicit", resume_from_checkpoint=str(out / "checkpoint-2"))
    assert str(e.value).startswith(f"{out / 'checkpoint-2'}: written with training.save_only_model=true")
    assert "\n" not in str(e.value) and not (tmp_path / "explicit" / "final").exists()

    # A resumable checkpoint older than model-only ones is the one `latest` picks.
    marker = json.loads((out / "checkpoint-2" / CHECKPOINT_MARKER).read_text())
    (out / "checkpoint-2" / CHECKPOINT_MARKER).write_text(json.dumps({**marker, "model_only": False}))
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-2")


# --------------------------------------------------------------------------------------------- safe state loading


class _Payload:
    """A pickled object whose loading would run code: creates `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.path),))


def test_state_files_load_plain_data_and_refuse_pickled_code(tmp_path):
    """align's checkpoint state files are read with weights_only=True: tensors, numbers and strings come back; a
    pickled payload is refused with one line naming the file, and does not run; a truncated file is refused too."""
    from align.errors import AlignError
    from align.trainer import _atomic_torch_save, load_state_file

    good = tmp_path / "align_state_0.pt"
    state = {"objective": {"log_z": {"log_sum": {"k": 1.5}, "count": {"k": 3}}, "generator": torch.arange(4)},
             "generate_calls": 7, "target": {"sorted_rewards": {"k": torch.tensor([0.5, 1.0])}}}
    _atomic_torch_save(state, str(good))
    loaded = load_state_file(str(good))
    assert loaded["generate_calls"] == 7 and torch.equal(loaded["objective"]["generator"], torch.arange(4))

    marker = tmp_path / "payload-ran"
    evil = tmp_path / "align_reference.pt"
    torch.save({"objective": _Payload(marker)}, evil)
    with pytest.raises(AlignError) as e:
        load_state_file(str(evil))
    assert str(evil) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()  # refused, not executed
    torch.load(evil, weights_only=False)  # power check: the unsafe load the trainer used to do runs the payload
    assert marker.exists()

    truncated = tmp_path / "align_state_1.pt"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(AlignError) as e:
        load_state_file(str(truncated))
    assert str(truncated) in str(e.value)
