"""Reference kind `precomputed`: cached token log-probs equal the live reference's, the cache hit/miss rules, training
through it matches `frozen` (f-DPO and SamPO), and refused, corrupt, mismatched or incomplete inputs are clear errors.
"""

import gc
import json
import random
import shutil
import weakref

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from align import toy_world
from align.config import load_train_config
from align.data import tokenize_preference_rows
from align.errors import AlignError, ConfigError
from align.logps import SharedPromptCollator, pair_logps
from align.modeling import LoraSection, ModelConfig, load_policy
from align.objectives import get_objective
from align.references import FrozenReference, PrecomputedReference, build_reference, reference_params
from align.trainer import PreferenceTrainer, disable_dropout, training_arguments


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def rows():
    return toy_world.make_preference_rows(24, seed=0)


@pytest.fixture(scope="module")
def dataset(rows, toy_tokenizer):
    return tokenize_preference_rows(rows, toy_tokenizer)[0]


@pytest.fixture(autouse=True)
def no_home_cache(tmp_path, monkeypatch):
    # A test that forgets `cache_dir` must not write into the real ~/.cache.
    monkeypatch.setenv("ALIGN_CACHE_DIR", str(tmp_path / "default-cache"))


def model_config(model_dir, **kwargs):
    return ModelConfig(name_or_path=str(model_dir), **{"dtype": "float32", **kwargs})


def precomputed(accelerator, cache_dir, datasets, config, *, of=None, policy=None, batch_size=8):
    """A `precomputed` reference after its pass over `datasets` ({name: dataset}); `frozen` needs no policy."""
    params = {"cache_dir": str(cache_dir), **({"of": of} if of is not None else {})}
    reference = build_reference("precomputed", params, policy=policy, model_config=config)
    reference.prepare(accelerator)
    reference.precompute(datasets, SharedPromptCollator(0), batch_size)
    return reference


def shuffled_batches(dataset, size=5, seed=0):
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    collate = SharedPromptCollator(0)
    return [collate([dataset[i] for i in order[s:s + size]]) for s in range(0, len(order), size)]


def assert_same(got, want, atol=1e-6):
    for a, b in ((got.chosen, want.chosen), (got.rejected, want.rejected)):
        assert a.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=atol)
    assert got.chosen_mask.equal(want.chosen_mask) and got.rejected_mask.equal(want.rejected_mask)


# --------------------------------------------------------------------------------------------- values


def test_cached_logps_equal_the_frozen_reference_in_any_order(tmp_path, tiny_model_dir, toy_tokenizer, dataset,
                                                              accelerator):
    config = model_config(tiny_model_dir)
    eval_set = tokenize_preference_rows(toy_world.make_preference_rows(9, seed=1), toy_tokenizer)[0]
    policy = load_policy(config)
    reference = build_reference("precomputed", {"cache_dir": str(tmp_path)}, policy=policy, model_config=config)
    assert isinstance(reference.inner, FrozenReference)  # `of` defaults to auto: frozen for a full-weight policy
    inner_model = weakref.ref(reference.inner.model)
    reference.prepare(accelerator)
    reference.precompute({"train": dataset, "eval": eval_set}, SharedPromptCollator(0), 8)

    # The reference model is gone after the pass (the accelerator no longer holds it either).
    gc.collect()
    assert reference.inner is None and inner_model() is None
    frozen = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for data in (dataset, eval_set):
        for batch in shuffled_batches(data):
            with torch.no_grad():
                want = pair_logps(frozen, batch)
            got = reference.logps(policy, batch)
            assert_same(got, want)
            assert got.chosen_mask is batch["chosen_mask"]
            assert (got.chosen[~batch["chosen_mask"]] == 0).all() and (got.rejected[~batch["rejected_mask"]] == 0).all()

    for name, data in (("train", dataset), ("eval", eval_set)):
        path, hit = reference.cache_info[name]
        assert not hit and path.parent == tmp_path
        meta = json.loads((path / "meta.json").read_text())
        assert meta["key"] == path.name and meta["examples"] == len(data) and meta["dataset"] == name
        assert meta["computed_from"] == {"kind": "frozen"}
        assert sorted(p.name for p in path.iterdir()) == ["logps.safetensors", "meta.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p, _ in reference.cache_info.values())


def test_peft_disabled_is_cached_without_the_adapter(tmp_path, tiny_model_dir, dataset, accelerator):
    config = model_config(tiny_model_dir, lora=LoraSection(r=4, lora_alpha=8))
    policy = load_policy(config)
    policy.train()
    reference = precomputed(accelerator, tmp_path, {"train": dataset}, config, policy=policy)
    assert reference.of_kind == "peft_disabled" and policy.training  # auto → peft_disabled; mode restored
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for batch in shuffled_batches(dataset, size=7):
        with torch.no_grad():
            assert_same(reference.logps(policy, batch), pair_logps(base, batch))

    # A policy whose adapter has moved has the same reference (the adapter is off): a hit.
    moved = load_policy(config)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    again = precomputed(accelerator, tmp_path, {"train": dataset}, config, policy=moved)
    assert again.cache_info["train"] == (reference.cache_info["train"][0], True)


# --------------------------------------------------------------------------------------------- hit / miss rules


def test_same_inputs_hit_and_any_changed_input_misses(tmp_path, tiny_model_dir, toy_tokenizer, rows, dataset,
                                                      accelerator, monkeypatch):
    forwards = []
    live_logps = FrozenReference.logps
    monkeypatch.setattr(FrozenReference, "logps", lambda self, policy, batch: forwards.append(1)
                        or live_logps(self, policy, batch))
    cache = tmp_path / "cache"
    config = model_config(tiny_model_dir)

    def run(data=dataset, config=config, **kwargs):
        forwards.clear()
        reference = precomputed(accelerator, cache, {"train": data}, config, **kwargs)
        path, hit = reference.cache_info["train"]
        assert hit == (not forwards)  # a hit runs no forward at all; a miss runs 24 pairs / 8 = 3
        assert hit or len(forwards) == 3
        return path, hit, reference

    first, hit, reference = run()
    assert not hit
    batch = shuffled_batches(dataset)[0]
    second, hit, again = run()
    assert hit and second == first
    assert_same(again.logps(None, batch), reference.logps(None, batch), atol=0)

    # Same weights in another folder: the key hashes the weights, not the path.
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    assert run(of={"kind": "frozen", "name_or_path": str(copy)})[:2] == (first, True)
    # A longer max_length that cuts nothing leaves every token id as it was: still a hit.
    longer = tokenize_preference_rows(rows, toy_tokenizer, max_length=4096, max_prompt_length=None)[0]
    assert run(data=longer)[:2] == (first, True)

    changed_rows = [dict(r) for r in rows]
    changed_rows[5]["chosen"] += " and it was great ."
    spec = json.loads(toy_tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    vocab["great"], vocab["awful"] = vocab["awful"], vocab["great"]
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    swapped = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<bos>",
                                      eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    max_len = max(len(dataset[i]["prompt_input_ids"]) + len(dataset[i]["chosen_input_ids"])
                  for i in range(len(dataset)))
    # One weight nudged by 1e-3 in a copy of the model.
    other_weights = shutil.copytree(tiny_model_dir, tmp_path / "nudged")
    [weights_file] = other_weights.glob("*.safetensors")
    state = load_file(weights_file)
    state["model.norm.weight"][3] += 1e-3
    save_file(state, weights_file, metadata={"format": "pt"})
    variants = {
        "weights": {"of": {"kind": "frozen", "name_or_path": str(other_weights)}},
        "dtype": {"config": model_config(tiny_model_dir, dtype="bfloat16")},
        "attention": {"config": model_config(tiny_model_dir, attn_implementation="eager")},
        "one example": {"data": tokenize_preference_rows(changed_rows, toy_tokenizer)[0]},
        "max_length": {"data": tokenize_preference_rows(rows, toy_tokenizer, max_length=max_len - 2)[0]},
        "tokenizer": {"data": tokenize_preference_rows(rows, swapped)[0]},
    }
    keys = {first}
    for name, kwargs in variants.items():
        path, hit, _ = run(**kwargs)
        assert not hit and path not in keys, name
        keys.add(path)
        assert run(**kwargs)[:2] == (path, True), name  # and that new cache is reused in turn
    assert sorted(p.name for p in cache.iterdir()) == sorted(p.name for p in keys)


# --------------------------------------------------------------------------------------------- training


def make_trainer(out, model_dir, tokenizer, train_set, eval_set, objective, reference):
    config = model_config(model_dir)
    policy = load_policy(config)
    disable_dropout(policy)
    args = training_arguments({"output_dir": str(out), "per_device_train_batch_size": 8,
                               "per_device_eval_batch_size": 16, "learning_rate": 1e-2, "logging_steps": 1,
                               "max_steps": 4, "save_strategy": "no", "disable_tqdm": True}, seed=0)
    return PreferenceTrainer(model=policy, args=args, objective=get_objective(objective, seed=0),
                             reference=build_reference(*reference, policy=policy, model_config=config),
                             train_dataset=train_set, eval_dataset=eval_set, processing_class=tokenizer)


@pytest.mark.parametrize("objective", ["fdpo", "sampo"])
def test_training_with_precomputed_matches_frozen(tmp_path, tiny_model_dir, toy_tokenizer, dataset, objective):
    eval_set = tokenize_preference_rows(toy_world.make_preference_rows(8, seed=1), toy_tokenizer)[0]
    runs = {}
    for kind, params in (("frozen", {}), ("precomputed", {"of": {"kind": "frozen"}, "cache_dir": str(tmp_path)})):
        trainer = make_trainer(tmp_path / kind, tiny_model_dir, toy_tokenizer, dataset, eval_set, objective,
                               (kind, params))
        trainer.train()
        runs[kind] = trainer, [e for e in trainer.state.log_history if "loss" in e], trainer.evaluate()
    (frozen, frozen_logs, frozen_eval), (cached, cached_logs, cached_eval) = runs["frozen"], runs["precomputed"]
    assert [e["step"] for e in cached_logs] == [1, 2, 3, 4]
    assert cached_logs[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert cached_logs[-1]["loss"] < cached_logs[0]["loss"]
    # Relative as well as absolute: logratios/mean is a sum over ~60 tokens (|value| ~ 3.5 after 4 steps) and the
    # cache's log-probs were computed in other packed rows, so they differ from the frozen ones at fp32 rounding.
    for a, b in zip(cached_logs, frozen_logs):
        for key in ("loss", "rewards/margins", "logratios/mean", *(["sampo/kept_fraction"] * (objective == "sampo"))):
            assert a[key] == pytest.approx(b[key], rel=3e-5, abs=1e-5), key
    assert cached_eval["eval_loss"] == pytest.approx(frozen_eval["eval_loss"], abs=1e-5)
    # The weights agree (they moved by up to 2.5e-2): on average to 1e-6, everywhere to 1e-3. Adam's g/√v magnifies
    # the ~1e-7 log-prob differences (the cache was computed in other packed rows) on the few coordinates whose
    # gradient is nearly 0 (measured: mean differences ~6e-8, the largest 2.2e-4).
    for (name, a), b in zip(cached.model.named_parameters(), frozen.model.parameters()):
        assert (a - b).abs().mean() < 1e-6, name
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3, msg=name)


# --------------------------------------------------------------------------------------------- errors


def test_tr_dpo_and_bad_of_sections_are_refused_naming_the_key(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"^reference\.of\.kind: 'tr_dpo' cannot be precomputed: a TR-DPO "
                                          r"reference moves toward the policy during training"):
        reference_params("precomputed", {"of": {"kind": "tr_dpo", "alpha": 0.5}})
    with pytest.raises(ConfigError, match=r"^reference\.of\.kind: 'precomputed' cannot be precomputed"):
        reference_params("precomputed", {"of": {"kind": "precomputed"}})
    with pytest.raises(ConfigError, match=r"^reference\.of\.beta: unknown key of reference kind 'frozen'"):
        reference_params("precomputed", {"of": {"kind": "frozen", "beta": 1}})
    with pytest.raises(ConfigError, match=r"^reference\.of\.name_or_path: kind 'auto' takes no parameters"):
        reference_params("precomputed", {"of": {"name_or_path": "x"}})
    with pytest.raises(ConfigError, match=r"^reference\.of: expected a mapping"):
        reference_params("precomputed", {"of": None})
    with pytest.raises(ConfigError, match=r"^reference\.of\.kind: unknown kind 'frozn'"):
        reference_params("precomputed", {"of": {"kind": "frozn"}})
    # From a recipe, with the file named first (as the CLI prints it).
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": "x.jsonl"},
                                      "reference": {"kind": "precomputed", "of": {"kind": "tr_dpo"}}}))
    with pytest.raises(ConfigError, match=rf"^{recipe}: reference\.of\.kind: 'tr_dpo' cannot be precomputed"):
        load_train_config(recipe)
    # Errors of building the inner reference move under reference.of.
    config = model_config(tiny_model_dir)
    with pytest.raises(ConfigError, match=r"^reference\.of\.kind: 'peft_disabled' needs a LoRA policy"):
        build_reference("precomputed", {"of": {"kind": "peft_disabled"}}, policy=load_policy(config),
                        model_config=config)
    with pytest.raises(ConfigError, match=r"^reference\.of\.name_or_path: .*missing. does not exist"):
        build_reference("precomputed", {"of": {"kind": "frozen", "name_or_path": str(tmp_path / "missing")}},
                        policy=None, model_config=config)


def test_corrupt_or_mismatched_cache_is_an_error_and_left_alone(tmp_path, tiny_model_dir, dataset, accelerator,
                                                                capsys):
    config = model_config(tiny_model_dir)
    cache = tmp_path / "cache"
    path = precomputed(accelerator, cache, {"train": dataset}, config).cache_info["train"][0]
    pristine = tmp_path / "pristine"
    shutil.copytree(path, pristine)

    def edit_meta(**changes):
        meta = json.loads((path / "meta.json").read_text())
        (path / "meta.json").write_text(json.dumps({**meta, **changes}))

    def truncate():
        data = (path / "logps.safetensors").read_bytes()
        (path / "logps.safetensors").write_bytes(data[:len(data) // 2])

    corruptions = {
        "truncated": (truncate, r"logps\.safetensors does not match the sha256 in meta\.json \(truncated"),
        "wrong key": (lambda: edit_meta(key="0" * 64), r"meta\.json does not belong here"),
        "wrong count": (lambda: edit_meta(examples=23), r"meta\.json counts 23 pairs, the data has 24"),
        "no meta": (lambda: (path / "meta.json").unlink(), r"cannot read it \(FileNotFoundError"),
        "bad json": (lambda: (path / "meta.json").write_text("{"), r"cannot read it \(JSONDecodeError"),
    }
    for name, (corrupt, problem) in corruptions.items():
        shutil.rmtree(path)
        shutil.copytree(pristine, path)
        corrupt()
        before = {p.name: p.read_bytes() for p in path.iterdir()}
        with pytest.raises(AlignError, match=rf"^reference cache {path}: {problem}.*; delete this folder"):
            precomputed(accelerator, cache, {"train": dataset}, config)
        assert {p.name: p.read_bytes() for p in path.iterdir()} == before, name  # nothing overwritten
        assert sorted(p.name for p in cache.iterdir()) == [path.name], name  # and nothing written beside it

    # Through the CLI: one error line and exit status 2, before any training output is written.
    from align.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in toy_world.make_preference_rows(24, seed=0)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"}, "data": {"train": str(data)},
        "reference": {"kind": "precomputed", "cache_dir": str(cache)},
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 1, "disable_tqdm": True}}))
    capsys.readouterr()
    assert main(["train", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"align: error: reference cache {path}: meta.json is") or \
        err[-1].startswith(f"align: error: reference cache {path}: cannot read it"), err
    assert list((tmp_path / "out").glob("*")) == []  # transformers.Trainer.__init__ makes the folder, nothing more


def test_a_pair_missing_from_the_cache_is_an_error(tmp_path, tiny_model_dir, toy_tokenizer, dataset, accelerator):
    config = model_config(tiny_model_dir)
    reference = build_reference("precomputed", {"cache_dir": str(tmp_path)}, policy=None, model_config=config)
    batch = shuffled_batches(dataset)[0]
    with pytest.raises(AlignError, match="nothing was precomputed"):
        reference.logps(None, batch)
    reference.prepare(accelerator)
    reference.precompute({"train": dataset, "eval": None}, SharedPromptCollator(0), 8)
    unseen = tokenize_preference_rows(toy_world.make_preference_rows(3, seed=7), toy_tokenizer)[0]
    mixed = SharedPromptCollator(0)([dataset[0], unseen[1]])
    with pytest.raises(AlignError, match=r"batch example 1 \(prompt \d+, chosen \d+, rejected \d+ tokens\) is not among "
                                         r"the precomputed pairs; only the datasets given to the trainer \(train\)"):
        reference.logps(None, mixed)
    assert isinstance(reference, PrecomputedReference)


# --------------------------------------------------------------------------------------------- distributed


@pytest.mark.multiprocess
def test_zero3_pass_over_two_processes_is_reused_by_one(tmp_path, tiny_model_dir, toy_tokenizer, accelerator):
    """ZeRO-3 on 2 CPU processes: the ranks split the pass in lock-step (19 pairs / 4 = 5 batches, so one rank runs
    a discarded extra forward) and the main one writes the cache; a single process then finds the same key (the
    digest hashes the gathered weights, not the shards) and the same values as an unsharded frozen reference."""
    import os
    import subprocess
    import sys

    rows = toy_world.make_preference_rows(19, seed=2)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "zero3.json").write_text(json.dumps({
        "zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto"}))
    cache, out = tmp_path / "cache", tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "align.cli", "train", "--config", "/dev/null", f"model.name_or_path={tiny_model_dir}",
           "model.dtype=float32", f"data.train={tmp_path / 'pairs.jsonl'}", "reference.kind=precomputed",
           f"reference.cache_dir={cache}", f"training.output_dir={out}", "training.per_device_train_batch_size=4",
           "training.per_device_eval_batch_size=4", "training.max_steps=2", "training.logging_steps=1",
           "training.save_strategy=no", f"training.deepspeed={tmp_path / 'zero3.json'}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [h["loss"] for h in json.loads((out / "train_summary.json").read_text())["log_history"] if "loss" in h]
    assert len(losses) == 2 and losses[0] == pytest.approx(0.693147, abs=1e-5)
    [path] = cache.iterdir()
    assert json.loads((path / "meta.json").read_text())["examples"] == 19

    dataset = tokenize_preference_rows(rows, toy_tokenizer)[0]
    reference = precomputed(accelerator, cache, {"train": dataset}, model_config(tiny_model_dir))
    assert reference.cache_info["train"] == (path, True)
    frozen = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for batch in shuffled_batches(dataset, size=6):
        with torch.no_grad():
            assert_same(reference.logps(None, batch), pair_logps(frozen, batch))
