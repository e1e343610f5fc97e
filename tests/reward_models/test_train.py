"""End to end: `train_reward_model` on the toy world, for each ensemble kind, and the calibration metric.

The slow part is training: each kind trains 2 members for a few steps (a few seconds); one 3-member `seeds` ensemble
with 25% label noise is trained properly (~12 s on one core) and must beat chance clearly on held-out pairs labelled
by the GOLD reward.
"""

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from align import toy_world
from align.errors import AlignError
from align.modeling import ModelConfig
from reward_models.config import load_rm_config
from reward_models.data import build_reward_dataset
from reward_models.ensemble import RewardEnsemble
from reward_models.loss import bradley_terry_loss
from reward_models.train import train_reward_model
from reward_models.trainer import calibration_bins, expected_calibration_error, pair_rewards, reward_metrics

# --- ECE, by hand ---------------------------------------------------------------------------------------------------


def test_ece_hand_computed():
    # Every pair at p = 0.75 and every label "chosen better": the copies (0.75, 1) land in bin 7 and (0.25, 0) in
    # bin 2; ECE = ½·|1 − 0.75| + ½·|0 − 0.25| = 0.25 (under-confident).
    assert expected_calibration_error(torch.full((8,), 0.75)) == pytest.approx(0.25)
    # Three of four pairs right at confidence 0.75: bin 7 holds outcomes 1, 1, 1, 0 at 0.75 → calibrated.
    assert expected_calibration_error(torch.tensor([0.75, 0.75, 0.75, 0.25])) == pytest.approx(0.0, abs=1e-12)
    # Over-confident: p = 0.95 but only half right → ½·|0.5 − 0.95| + ½·|0.5 − 0.05| = 0.45
    assert expected_calibration_error(torch.tensor([0.95, 0.05])) == pytest.approx(0.45)


def test_ece_bins_are_symmetric_and_equal_top_label_ece():
    p = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bins = calibration_bins(p)
    assert [b["count"] for b in bins] == [b["count"] for b in reversed(bins)]
    assert sum(b["count"] for b in bins) == 2000
    # the classic top-label ECE: confidence max(p, 1−p), correct when p > ½, 5 equal bins on [½, 1]
    conf = torch.maximum(p, 1 - p)
    correct = (p > 0.5).double()
    index = torch.clamp(((conf - 0.5) * 10).floor().long(), 0, 4)
    top = sum((index == b).sum() / len(p) * abs(correct[index == b].mean() - conf[index == b].mean())
              for b in range(5) if (index == b).any())
    assert expected_calibration_error(p) == pytest.approx(float(top), abs=1e-9)


def test_reward_metrics_members_and_aggregate():
    chosen = torch.tensor([[2.0, 0.0], [1.0, 3.0], [0.0, 0.0]])
    rejected = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, -4.0]])
    m = reward_metrics(chosen, rejected, aggregation={"method": "wco"})
    assert m["members"]["member_0"]["accuracy"] == pytest.approx(2 / 3)
    assert m["members"]["member_1"]["accuracy"] == pytest.approx(2 / 3)
    # WCO: min(2,0)=0 vs min(1,1)=1 ✗; 1 vs 0 ✓; 0 vs −4 ✓
    assert m["ensemble"]["accuracy"] == pytest.approx(2 / 3) and m["ensemble"]["method"] == "wco"
    p = torch.sigmoid(torch.tensor([0.0 - 1.0, 1.0 - 0.0, 0.0 + 4.0], dtype=torch.float64))
    assert m["ensemble"]["ece"] == pytest.approx(expected_calibration_error(p))
    assert reward_metrics(chosen[:, :1], rejected[:, :1])["ensemble"] is None  # one member: no ensemble entry


# --- end to end -----------------------------------------------------------------------------------------------------


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def toy_rm_data(tmp_path_factory):
    """512 gold-labelled training pairs and 300 held-out ones (toy_world.make_reward_model_splits)."""
    root = tmp_path_factory.mktemp("rm-data")
    train, held_out = toy_world.make_reward_model_splits(512, 300, seed=0)
    return {"train": _write_jsonl(root / "train.jsonl", train), "eval": _write_jsonl(root / "eval.jsonl", held_out)}


def _recipe(model_dir, data, out, **sections) -> dict:
    recipe = {
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "data": {"train": data["train"], "eval": data["eval"], "max_length": 64, "max_prompt_length": None},
        "ensemble": {"kind": "seeds", "members": 2},
        "loss": {},
        "aggregation": {"method": "mean"},
        "training": {"output_dir": str(out), "per_device_train_batch_size": 32, "per_device_eval_batch_size": 64,
                     "learning_rate": 3e-3, "warmup_steps": 2, "logging_steps": 1, "save_strategy": "no",
                     "report_to": "none", "disable_tqdm": True},
        "seed": 0,
    }
    for section, values in sections.items():
        recipe[section].update(values)
    return recipe


def _mean_bt_loss(ensemble, dataset, n=128) -> float:
    subset = torch.utils.data.Subset(dataset, range(n))
    chosen, rejected = pair_rewards(ensemble, subset, pad_token_id=ensemble.tokenizer.pad_token_id)
    return bradley_terry_loss(chosen, rejected)[0].mean().item()


@pytest.mark.parametrize("kind", ["seeds", "multi_head", "lora"])
def test_each_kind_trains_saves_and_reloads(kind, tmp_path, tiny_model_dir, toy_rm_data):
    out = tmp_path / "run"
    recipe = _recipe(tiny_model_dir, toy_rm_data, out, ensemble={"kind": kind}, loss={"label_noise": 0.1},
                     aggregation={"method": "uwo", "lam": 0.5, "normalize": kind == "multi_head"},
                     training={"max_steps": 12, "lr_scheduler_type": "constant", "warmup_steps": 0,
                               "learning_rate": 3e-3})
    config = load_rm_config(None, base=recipe)
    summary = train_reward_model(config)

    # outputs
    assert {p.name for p in out.iterdir()} >= {"ensemble", "rm_config.yaml", "rm_summary.json", "calibration.png"}
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary siblings left
    assert (out / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((out / "ensemble" / "manifest.json").read_text())
    assert manifest["kind"] == kind and manifest["num_members"] == 2 and manifest["seeds"] == [0, 1]
    assert manifest["aggregation"] == {"method": "uwo", "lam": 0.5, "ddof": 0}
    if kind == "multi_head":  # aggregation.normalize: members z-scored on training responses, stored with them
        assert len(manifest["normalization"]["mean"]) == 2 and all(s > 0 for s in manifest["normalization"]["std"])
        assert summary["eval"]["ensemble"]["normalized"] and summary["normalization"] == manifest["normalization"]
    else:
        assert manifest["normalization"] is None and not summary["eval"]["ensemble"]["normalized"]
    assert json.loads((out / "rm_summary.json").read_text())["eval"] == summary["eval"]
    assert load_rm_config(out / "rm_config.yaml") == config  # the resolved recipe reloads as it was
    assert summary["label_noise"] == {"fraction": 0.1, "flipped": 51, "pairs": 512, "seed": 0}
    if kind == "seeds":  # one run per member, each logging its own member
        assert [run["members"] for run in summary["runs"]] == [[0], [1]] and summary["global_steps"] == [12, 12]
        assert "accuracy/member_1" in summary["runs"][1]["log_history"][0]
    else:  # one joint run logging every member and the ensemble
        assert [run["members"] for run in summary["runs"]] == [[0, 1]] and summary["global_steps"] == [12]
        first = summary["runs"][0]["log_history"][0]
        assert {"loss/member_0", "accuracy/member_1", "margin/member_0", "accuracy/ensemble"} <= set(first)

    # the saved ensemble reloads with identical scores: its eval metrics are those computed before saving
    ensemble = RewardEnsemble.load(out / "ensemble", device="cpu")
    assert ensemble.kind == kind and ensemble.num_members == 2
    eval_data, _ = build_reward_dataset(config.data, ensemble.tokenizer, "eval")
    chosen, rejected = pair_rewards(ensemble, eval_data, pad_token_id=ensemble.tokenizer.pad_token_id)
    again = reward_metrics(chosen, rejected, aggregation=ensemble.aggregation, normalization=ensemble.normalization)
    for name, values in summary["eval"]["members"].items():
        for key in ("accuracy", "ece", "mean_margin"):
            assert again["members"][name][key] == pytest.approx(values[key], abs=1e-6), (name, key)
    for key in ("accuracy", "ece", "mean_margin"):
        assert again["ensemble"][key] == pytest.approx(summary["eval"]["ensemble"][key], abs=1e-6), key
    # and the text scoring path gives the training path's rewards (the same tokens)
    per_member, _ = ensemble.score(eval_data.prompts[:16], eval_data.chosen[:16], batch_size=8, normalize=False)
    torch.testing.assert_close(per_member, chosen[:16], atol=1e-5, rtol=1e-5)

    # training moved the members and lowered the Bradley–Terry loss on (clean) training pairs
    train_clean, _ = build_reward_dataset(config.data, ensemble.tokenizer, "train")
    initial = RewardEnsemble.build(kind, ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32"), 2,
                                   seeds=[0, 1])
    before, after = _mean_bt_loss(initial, train_clean), _mean_bt_loss(ensemble, train_clean)
    print(f"\n{kind}: BT loss on training pairs {before:.4f} -> {after:.4f}")
    assert after < before - 0.05, (before, after)


def test_existing_ensemble_is_never_overwritten(tmp_path, tiny_model_dir, toy_rm_data):
    out = tmp_path / "run"
    (out / "ensemble").mkdir(parents=True)
    (out / "ensemble" / "manifest.json").write_text("{}")
    config = load_rm_config(None, base=_recipe(tiny_model_dir, toy_rm_data, out, training={"max_steps": 1}))
    with pytest.raises(AlignError, match="already exists"):
        train_reward_model(config)
    assert sorted(p.name for p in out.iterdir()) == ["ensemble"]  # nothing written next to it
    assert (out / "ensemble" / "manifest.json").read_text() == "{}"


def test_three_member_ensemble_beats_chance_against_gold_labels(tmp_path, tiny_model_dir, toy_rm_data):
    """Coste et al.'s setting on the toy world: 3 independently seeded proxies (own data order each) trained on
    gold-labelled pairs with 25% of the labels flipped; measured on held-out pairs labelled by the gold reward.
    Measured here (512 pairs, 2 epochs, 32 steps per member): members 0.887 / 0.903 / 0.880, ensemble (mean) 0.923;
    ECE 0.18–0.26 (under-confident: the noisy labels cap what σ(r_w − r_l) should say)."""
    out = tmp_path / "run"
    recipe = _recipe(tiny_model_dir, toy_rm_data, out, ensemble={"kind": "seeds", "members": 3},
                     loss={"label_noise": 0.25},
                     training={"num_train_epochs": 2, "warmup_steps": 5, "logging_steps": 10})
    summary = train_reward_model(load_rm_config(None, base=recipe))
    evaluation = summary["eval"]
    members = {name: (round(v["accuracy"], 3), round(v["ece"], 3)) for name, v in evaluation["members"].items()}
    ensemble = (round(evaluation["ensemble"]["accuracy"], 3), round(evaluation["ensemble"]["ece"], 3))
    print(f"\nheld-out accuracy vs gold (accuracy, ECE): members {members}, ensemble {ensemble}")
    assert summary["data_order"] == "per_member" and summary["label_noise"]["flipped"] == 128
    assert evaluation["pairs"] == 300
    assert all(v["accuracy"] >= 0.75 for v in evaluation["members"].values()), members
    assert evaluation["ensemble"]["accuracy"] >= 0.80, ensemble
    assert all(0.0 <= v["ece"] <= 0.5 and not math.isnan(v["ece"]) for v in evaluation["members"].values())
    saved = yaml.safe_load((out / "rm_config.yaml").read_text())
    assert saved["loss"]["label_noise"] == 0.25 and saved["ensemble"]["seeds"] == [0, 1, 2]


def test_each_member_gets_its_own_wandb_run(monkeypatch):
    """transformers' W&B callback never ends its run; kind seeds ends it after each member (wandb is faked here)."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from reward_models.train import OneTrackerRunPerMember

    finished = []
    fake = types.SimpleNamespace(run=object(), finish=lambda: finished.append(True))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    callback = OneTrackerRunPerMember()
    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    callback.on_train_end(args, TrainerState(), TrainerControl())
    assert finished == [True]
    fake.run = None  # no active run: nothing to end
    callback.on_train_end(args, TrainerState(), TrainerControl())
    assert finished == [True]


@pytest.mark.multiprocess
def test_seeds_members_train_one_after_another_under_deepspeed_zero2(tmp_path, tiny_model_dir, toy_rm_data):
    """`align rm train` under torchrun with DeepSpeed ZeRO-2 (launch/zero2.json), 2 processes on CPU with gloo: the
    K sequential member runs each build their own DeepSpeed engine in one process; the main process saves."""
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "run"
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(_recipe(tiny_model_dir, toy_rm_data, out), sort_keys=False))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--standalone",
         "-m", "align.cli", "rm", "train", "--config", str(config), "training.max_steps=2",
         "training.per_device_train_batch_size=4", f"training.deepspeed={repo / 'launch' / 'zero2.json'}"],
        capture_output=True, text=True, env=env, timeout=400, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "rm_summary.json").read_text())
    assert summary["global_steps"] == [2, 2]
    # 512 pairs / (2 processes x 4 pairs) = 64 steps per epoch: each member ran on both processes
    assert summary["runs"][1]["log_history"][-1]["epoch"] == pytest.approx(2 / 64)
    ensemble = RewardEnsemble.load(out / "ensemble", device="cpu")
    initial = RewardEnsemble.build("seeds", ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32"), 2,
                                   seeds=[0, 1])
    for k in range(2):  # both members trained (and saved from the trained weights)
        assert any(not torch.equal(a, b) for a, b in zip(ensemble.members[k].parameters(),
                                                         initial.members[k].parameters()))
