"""SALSA model soups: `align soup` and the `soup` reference kind (METHODS §3)."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from align import toy_world
from align.errors import ConfigError
from align.logps import SharedPromptCollator, pair_logps
from align.data import tokenize_preference_rows
from align.modeling import ModelConfig, load_causal_lm
from align.references import build_reference
from align.soup import build_soup, soup_weights, write_soup


@pytest.fixture(scope="module")
def ingredients(tmp_path_factory):
    """Three tiny Llamas of one architecture and tokenizer, with different weights (different init seeds)."""
    root = tmp_path_factory.mktemp("soup")
    return [str(toy_world.save_base_model(root / f"sft{seed}", seed=seed)) for seed in (1, 2, 3)]


def params(path):
    return dict(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).named_parameters())


def test_soup_is_the_weighted_average_of_every_tensor(ingredients):
    weights = [0.2, 0.3, 0.5]
    soup, _ = build_soup(ingredients, weights)
    parts = [params(p) for p in ingredients]
    soup_params = dict(soup.named_parameters())
    assert soup_params.keys() == parts[0].keys()
    for name, value in soup_params.items():  # embeddings, attention, MLP, norms: every tensor
        expected = sum(w * part[name].double() for w, part in zip(weights, parts))
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6, msg=name)
    buffers = dict(AutoModelForCausalLM.from_pretrained(ingredients[0]).named_buffers())
    for name, b in soup.named_buffers():
        assert torch.equal(b, buffers[name]), name  # buffers are not averaged


def test_identity_cases(ingredients):
    first = params(ingredients[0])
    same, _ = build_soup([ingredients[0], ingredients[0]])
    one_hot, _ = build_soup(ingredients[:2], [1.0, 0.0])
    for name, value in first.items():
        assert torch.equal(dict(same.named_parameters())[name], value), name  # soup of identical = checkpoint
        assert torch.equal(dict(one_hot.named_parameters())[name], value), name  # weights (1, 0) = SFT_1


def test_soup_weights_validation():
    assert soup_weights(None, 4) == [0.25] * 4
    for bad, message in (([0.5, 0.6], "sum to 1"), ([1.5, -0.5], ">= 0"), ([1.0], "2 checkpoints")):
        with pytest.raises(ConfigError, match=message):
            soup_weights(bad, len(bad))
    with pytest.raises(ConfigError, match="3 weights for 2 checkpoints"):
        soup_weights([0.2, 0.3, 0.5], 2)


def run_cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", "align.cli", "soup", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_align_soup_cli_writes_a_loadable_checkpoint(ingredients, tmp_path):
    proc = run_cli("--out", str(tmp_path / "soup"), *ingredients[:2], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    written = params(tmp_path / "soup")
    a, b = params(ingredients[0]), params(ingredients[1])
    for name, value in written.items():
        torch.testing.assert_close(value, 0.5 * a[name] + 0.5 * b[name], rtol=0, atol=1e-6)
    assert (tmp_path / "soup" / "tokenizer.json").is_file() and (tmp_path / "soup" / "soup.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["soup"]  # no temp siblings


@pytest.fixture(scope="module")
def odd_ingredients(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    wide = toy_world.save_base_model(root / "wide", hidden_size=32, num_heads=2, num_kv_heads=1)
    tok = toy_world.build_tokenizer()
    model = toy_world.build_tiny_model(tok)
    other_tok_dir = root / "other_tokenizer"
    model.save_pretrained(other_tok_dir)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(reversed(toy_world.vocabulary()))}  # same words, other ids
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>").save_pretrained(other_tok_dir)
    (root / "not_a_checkpoint").mkdir()
    return {"wide": str(wide), "other_tokenizer": str(other_tok_dir), "empty": str(root / "not_a_checkpoint"),
            "missing": str(root / "nope")}


@pytest.mark.parametrize("case, extra, message", [
    ("architecture", ["wide"], "different architecture"),
    ("tokenizer", ["other_tokenizer"], "different tokenizer"),
    ("missing checkpoint", ["missing"], "no such checkpoint directory"),
    ("not a checkpoint", ["empty"], "no config.json"),
    ("negative weight", ["--weights", "1.5", "-0.5"], "must be >= 0"),
    ("weights not summing to 1", ["--weights", "0.5", "0.6"], "must sum to 1"),
    ("one checkpoint", None, "at least 2 checkpoints"),
])
def test_align_soup_bad_input_is_one_line_and_writes_nothing(ingredients, odd_ingredients, tmp_path, case, extra,
                                                             message):
    if extra is None:
        args = [ingredients[0]]
    elif extra[0] == "--weights":
        args = [*ingredients[:2], *extra]
    else:
        args = [ingredients[0], odd_ingredients[extra[0]]]
    proc = run_cli("--out", str(tmp_path / "soup"), *args, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("align: error:") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_align_soup_weights_before_the_checkpoints_as_help_shows(ingredients, tmp_path):
    """`align soup --out X --weights 0.7 0.3 CKPT CKPT`, the order of `--help` (issue 12, finding 7)."""
    proc = run_cli("--out", str(tmp_path / "soup"), "--weights", "0.7", "0.3", *ingredients[:2], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "soup" / "soup.json").read_text())
    assert manifest == {"checkpoints": [str(c) for c in ingredients[:2]], "weights": [0.7, 0.3]}


def test_align_soup_refuses_an_existing_output(ingredients, tmp_path):
    (tmp_path / "soup").mkdir()
    (tmp_path / "soup" / "keep.txt").write_text("mine")
    proc = run_cli("--out", str(tmp_path / "soup"), *ingredients[:2], cwd=tmp_path)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert (tmp_path / "soup" / "keep.txt").read_text() == "mine"


def test_policy_started_from_the_soup_has_zero_kl_to_the_soup_reference(ingredients, tmp_path, toy_tokenizer):
    soup_dir = write_soup(tmp_path / "soup", ingredients[:2])
    config = ModelConfig(name_or_path=str(soup_dir), dtype="float32")
    policy = load_causal_lm(config)
    reference = build_reference("soup", {"checkpoints": ingredients[:2]}, policy=policy, model_config=config)
    dataset, _ = tokenize_preference_rows(toy_world.make_preference_rows(8, seed=0), toy_tokenizer)
    batch = SharedPromptCollator(toy_tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        pol, ref = pair_logps(policy, batch), reference.logps(policy, batch)
    torch.testing.assert_close(pol.chosen_sum(), ref.chosen_sum(), rtol=0, atol=1e-5)  # KL 0 at step 0
    torch.testing.assert_close(pol.rejected_sum(), ref.rejected_sum(), rtol=0, atol=1e-5)
    # ... while a policy started from one ingredient differs from the soup reference
    single = load_causal_lm(ModelConfig(name_or_path=ingredients[0], dtype="float32"))
    with torch.no_grad():
        assert not torch.allclose(pair_logps(single, batch).chosen_sum(), ref.chosen_sum(), atol=1e-3)


def test_soup_reference_bad_params_name_the_key(ingredients):
    config = ModelConfig(name_or_path=ingredients[0], dtype="float32")
    policy = load_causal_lm(config)
    with pytest.raises(ConfigError, match=r"^reference\.checkpoints: .*at least 2"):
        build_reference("soup", {"checkpoints": [ingredients[0]]}, policy=policy, model_config=config)
    with pytest.raises(ConfigError, match=r"^reference\.weights: .*sum to 1"):
        build_reference("soup", {"checkpoints": ingredients[:2], "weights": [0.9, 0.9]}, policy=policy,
                        model_config=config)
    with pytest.raises(ConfigError, match=r"^reference\.checkpoints: .*no such checkpoint"):
        build_reference("soup", {"checkpoints": [ingredients[0], "/nope"]}, policy=policy, model_config=config)


# --- LoRA adapter ingredients: each contributes its merged weights W0 + s·B·A --------------------------------------

LORA_SPECS = {  # two adapters on the same base with different ranks, scales and targets
    "lora1": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},  # s = 8 / 4
    "lora2": {"r": 2, "lora_alpha": 6, "use_rslora": True, "target_modules": ["q_proj", "down_proj"]},  # s = 6 / √2
}


def save_lora_adapter(base_dir, out_dir, seed, *, with_tokenizer=False, **lora_kwargs):
    """A LoRA adapter on `base_dir` with random non-zero A and B (peft initialises B = 0, a no-op delta)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32),
                           LoraConfig(**lora_kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # std 0.1: deltas s·B·A of the size of the base weights (std 0.02)
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(out_dir)
    if with_tokenizer:
        toy_world.build_tokenizer().save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="module")
def lora_adapters(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("lora")
    # lora1 ships no tokenizer (the usual adapter folder: its base's is used); lora2 ships one
    return {name: save_lora_adapter(tiny_model_dir, root / name, seed, with_tokenizer=name == "lora2", **spec)
            for seed, (name, spec) in enumerate(LORA_SPECS.items(), start=1)}


def lora_deltas(adapter_dir) -> dict[str, torch.Tensor]:
    """{base parameter name: s·B·A} computed by hand (fp64) from the saved adapter files."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config["use_rslora"] else config["r"])
    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    deltas = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            deltas[module + ".weight"] = scale * (b.double() @ a.double())
    return deltas


def merged_by_peft(adapter_dir, base_dir):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    return dict(PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().named_parameters())


def assert_lora_soup(soup_params, base, adapters_and_weights, full_and_weight=None):
    """Every LoRA-targeted tensor == Σ_k w_k (W0 + s_k B_k A_k) (+ w_F θ_F); every other tensor == the base exactly
    (all-adapter soups) or the weighted average (mixed soups)."""
    deltas = [(lora_deltas(path), w) for path, w in adapters_and_weights]
    adapter_weight = sum(w for _, w in adapters_and_weights)
    targeted = set().union(*(d for d, _ in deltas))
    assert targeted and soup_params.keys() == base.keys()
    for name, value in soup_params.items():
        expected = adapter_weight * base[name].double() + sum(w * d[name] for d, w in deltas if name in d)
        if full_and_weight is not None:
            full, w_full = full_and_weight
            expected = expected + w_full * full[name].double()
        if name not in targeted and full_and_weight is None:
            assert torch.equal(value, base[name]), name  # untouched by every adapter: bit-exactly W0
        else:
            torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6, msg=name)
    return targeted


def test_lora_soup_averages_the_merged_deltas(lora_adapters, tiny_model_dir):
    soup, tokenizer = build_soup([lora_adapters["lora1"], lora_adapters["lora2"]], [0.3, 0.7])
    base = params(tiny_model_dir)
    targeted = assert_lora_soup(dict(soup.named_parameters()), base,
                                [(lora_adapters["lora1"], 0.3), (lora_adapters["lora2"], 0.7)])
    # q_proj in both adapters, v_proj only in lora1, down_proj only in lora2; the deltas are not negligible
    assert {n.rsplit(".", 2)[-2] for n in targeted} == {"q_proj", "v_proj", "down_proj"}
    name = "model.layers.0.self_attn.q_proj.weight"
    soup_q = dict(soup.named_parameters())[name]
    assert (soup_q - base[name]).abs().max() > 0.01
    assert tokenizer.get_vocab() == toy_world.build_tokenizer().get_vocab()  # lora1 has none: its base's
    assert not hasattr(soup, "peft_config") and type(soup).__name__ == "LlamaForCausalLM"


def test_mixed_full_and_lora_soup(lora_adapters, ingredients, tiny_model_dir):
    # adapter first: the soup starts from a merged model (dtype and buffers from the adapter's base)
    soup, _ = build_soup([lora_adapters["lora2"], ingredients[0]], [0.4, 0.6])
    assert_lora_soup(dict(soup.named_parameters()), params(tiny_model_dir), [(lora_adapters["lora2"], 0.4)],
                     full_and_weight=(params(ingredients[0]), 0.6))
    base_buffers = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_buffers())
    for name, b in soup.named_buffers():
        assert torch.equal(b, base_buffers[name]), name


def test_one_hot_weights_reproduce_the_merged_adapter(lora_adapters, ingredients, tiny_model_dir):
    first = merged_by_peft(lora_adapters["lora1"], tiny_model_dir)
    second = merged_by_peft(lora_adapters["lora2"], tiny_model_dir)
    one_hot, _ = build_soup([lora_adapters["lora1"], ingredients[0]], [1.0, 0.0])
    last_hot, _ = build_soup([ingredients[0], lora_adapters["lora2"]], [0.0, 1.0])
    for name, value in one_hot.named_parameters():
        assert torch.equal(value, first[name]), name  # weights (1, 0) = the merged first ingredient, bit-exactly
    for name, value in last_hot.named_parameters():
        assert torch.equal(value, second[name]), name
    assert any(not torch.equal(first[n], second[n]) for n in first)


def test_align_soup_cli_with_lora_adapters(lora_adapters, tiny_model_dir, tmp_path):
    proc = run_cli("--out", str(tmp_path / "soup"), lora_adapters["lora1"], lora_adapters["lora2"],
                   "--weights", "0.3", "0.7", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "soup"
    assert not (out / "adapter_config.json").exists()  # a normal full-weight save_pretrained checkpoint
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert_lora_soup(params(out), params(tiny_model_dir),
                     [(lora_adapters["lora1"], 0.3), (lora_adapters["lora2"], 0.7)])
    manifest = json.loads((out / "soup.json").read_text())
    assert manifest["weights"] == [0.3, 0.7]
    assert manifest["lora_adapters"][lora_adapters["lora1"]]["base_model_name_or_path"] == str(tiny_model_dir)


def test_soup_reference_with_lora_ingredients(lora_adapters, ingredients, tiny_model_dir, tmp_path):
    config = ModelConfig(name_or_path=ingredients[0], dtype="float32")
    policy = load_causal_lm(config)
    reference = build_reference("soup", {"checkpoints": [lora_adapters["lora1"], ingredients[0]],
                                         "weights": [0.5, 0.5]}, policy=policy, model_config=config)
    assert_lora_soup(dict(reference.model.named_parameters()), params(tiny_model_dir),
                     [(lora_adapters["lora1"], 0.5)], full_and_weight=(params(ingredients[0]), 0.5))
    assert not any(p.requires_grad for p in reference.model.parameters())
    with pytest.raises(ConfigError, match=r"^reference\.checkpoints: soup ingredient '.*nobase'.*does not exist"):
        bad = _edited_adapter(lora_adapters["lora1"], tmp_path / "nobase", base_model_name_or_path="/nonexistent/base")
        build_reference("soup", {"checkpoints": [bad, ingredients[0]]}, policy=policy, model_config=config)


def _edited_adapter(adapter_dir, out_dir, **config_changes):
    """A copy of an adapter folder with adapter_config.json keys changed (None deletes a key)."""
    shutil.copytree(adapter_dir, out_dir)
    path = Path(out_dir) / "adapter_config.json"
    config = json.loads(path.read_text())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return str(out_dir)


@pytest.fixture(scope="module")
def bad_adapters(tmp_path_factory, lora_adapters, odd_ingredients):
    root = tmp_path_factory.mktemp("bad_lora")
    good = lora_adapters["lora1"]
    renamed = _edited_adapter(good, root / "renamed_weights")
    weights_file = Path(renamed) / "adapter_model.safetensors"
    tensors = load_file(weights_file)  # layer 1's tensors renamed to a layer the base lacks: peft only warns
    save_file({k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}, weights_file)
    other_tokenizer = _edited_adapter(good, root / "other_tokenizer")
    shutil.copy(Path(odd_ingredients["other_tokenizer"]) / "tokenizer.json", other_tokenizer)
    shutil.copy(Path(odd_ingredients["other_tokenizer"]) / "tokenizer_config.json", other_tokenizer)
    no_weights = _edited_adapter(good, root / "no_weights")
    (Path(no_weights) / "adapter_model.safetensors").unlink()
    return {
        "missing base": (_edited_adapter(good, root / "missing_base", base_model_name_or_path=str(root / "gone")),
                         "does not exist"),
        "uncached Hub base": (_edited_adapter(good, root / "hub_base", base_model_name_or_path="no-org/no-such-model"),
                              "cannot load the base model"),
        "no base": (_edited_adapter(good, root / "no_base", base_model_name_or_path=None),
                    "no base_model_name_or_path"),
        "base of another architecture": (
            save_lora_adapter(odd_ingredients["wide"], root / "on_wide", 3, r=2, target_modules=["q_proj"]),
            "different architecture"),
        "modules_to_save": (_edited_adapter(good, root / "mts", modules_to_save=["lm_head"]), "modules_to_save"),
        "not LoRA": (_edited_adapter(good, root / "ia3", peft_type="IA3"), "only LoRA adapters"),
        "target not in base": (_edited_adapter(good, root / "bad_target", target_modules=["no_such_proj"]),
                               "cannot load or merge the adapter"),
        "weights for other modules": (renamed, "do not match its base model"),
        "own tokenizer differs": (other_tokenizer, "different tokenizer"),
        "no adapter weights": (no_weights, "no adapter_model.safetensors"),
        "base is an adapter": (_edited_adapter(good, root / "on_adapter", base_model_name_or_path=good),
                               "is itself a LoRA adapter"),
    }


@pytest.mark.parametrize("case", [
    "missing base", "uncached Hub base", "no base", "base of another architecture", "modules_to_save", "not LoRA",
    "target not in base", "weights for other modules", "own tokenizer differs", "no adapter weights",
    "base is an adapter"])
def test_bad_lora_ingredient_is_a_config_error_naming_it(bad_adapters, ingredients, case):
    path, message = bad_adapters[case]
    for checkpoints in ([ingredients[0], path], [path, ingredients[0]]):  # as first or later ingredient
        with pytest.raises(ConfigError) as error:
            build_soup(checkpoints)
        assert f"'{path}'" in str(error.value) and message in str(error.value), str(error.value)


def test_align_soup_cli_bad_lora_ingredient_is_one_line(bad_adapters, ingredients, tmp_path):
    path, message = bad_adapters["missing base"]
    proc = run_cli("--out", str(tmp_path / "soup"), ingredients[0], path, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("align: error:") and message in lines[0], proc.stderr
    assert path in lines[0] and list(tmp_path.iterdir()) == []


# --- the `soup` reference written once per node and loaded like `frozen` (issue 12: soup reference under DeepSpeed)

def _old_soup_reference_model(checkpoints, weights, dtype):
    """What `SoupReference` held before it streamed the soup to disk: `build_soup` in memory, then cast."""
    model, _ = build_soup(checkpoints, weights)
    return model.to(dtype).eval()


def _toy_batch(toy_tokenizer):
    dataset, _ = tokenize_preference_rows(toy_world.make_preference_rows(8, seed=0), toy_tokenizer)
    return SharedPromptCollator(toy_tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])


@pytest.fixture
def soup_tmpdir(tmp_path, monkeypatch):
    """TMPDIR of the soup reference's build folder, checked empty by the tests (the folder is deleted)."""
    import tempfile

    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_soup_reference_is_the_weighted_average_and_the_old_in_memory_soup(ingredients, soup_tmpdir,
                                                                          toy_tokenizer):
    weights = [0.2, 0.3, 0.5]
    config = ModelConfig(name_or_path=ingredients[0], dtype="float32")
    reference = build_reference("soup", {"checkpoints": ingredients, "weights": weights}, policy=None,
                                model_config=config)
    parts = [params(path) for path in ingredients]
    got = dict(reference.model.named_parameters())
    assert got.keys() == parts[0].keys()
    for name, value in got.items():  # Σ_k w_k θ_k, every tensor
        expected = sum(w * part[name].double() for w, part in zip(weights, parts))
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6, msg=name)
    old = _old_soup_reference_model(ingredients, weights, torch.float32)
    for name, value in old.named_parameters():
        assert torch.equal(got[name], value), name  # streamed to disk and loaded = the in-memory soup, bit for bit
    batch = _toy_batch(toy_tokenizer)
    with torch.no_grad():
        new_logps, old_logps = reference.logps(None, batch), pair_logps(old, batch)
    torch.testing.assert_close(new_logps.chosen_sum(), old_logps.chosen_sum(), rtol=0, atol=1e-6)
    torch.testing.assert_close(new_logps.rejected_sum(), old_logps.rejected_sum(), rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in reference.model.parameters()) and not reference.model.training
    assert list(soup_tmpdir.iterdir()) == []  # the written soup is deleted once loaded


def test_bf16_soup_reference_has_zero_kl_to_a_policy_started_from_align_soup(ingredients, tmp_path, soup_tmpdir,
                                                                             toy_tokenizer):
    """The soup is loaded as the policy is (`from_pretrained` in the policy dtype). The old in-memory soup was cast
    with `.to(bf16)`, which also rounded the rotary `inv_freq` buffer to bf16, so its log-probs were off those of
    a bf16 policy started from `align soup`'s output (the same weights) by ~1e-3: a KL that was not 0 at step 0."""
    soup_dir = write_soup(tmp_path / "soup", ingredients[:2])
    config = ModelConfig(name_or_path=str(soup_dir), dtype="bfloat16")
    policy = load_causal_lm(config)
    reference = build_reference("soup", {"checkpoints": ingredients[:2]}, policy=policy, model_config=config)
    old = _old_soup_reference_model(ingredients[:2], None, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in reference.model.parameters())
    for (name, new), value in zip(reference.model.named_parameters(), old.parameters()):
        assert torch.equal(new, value), name  # the same bf16 weights as before
    batch = _toy_batch(toy_tokenizer)
    with torch.no_grad():
        pol, ref, before = pair_logps(policy, batch), reference.logps(policy, batch), pair_logps(old, batch)
    assert torch.equal(pol.chosen_sum(), ref.chosen_sum()) and torch.equal(pol.rejected_sum(), ref.rejected_sum())
    assert (pol.chosen_sum() - before.chosen_sum()).abs().max() > 1e-4  # the old reference's inv_freq rounding
    assert dict(reference.model.named_buffers())["model.rotary_emb.inv_freq"].dtype == torch.float32


@pytest.fixture(scope="module")
def dora_adapter(tmp_path_factory, tiny_model_dir):
    return save_lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("dora") / "dora", 5, r=2, lora_alpha=4,
                             use_dora=True, target_modules=["k_proj", "up_proj"])


@pytest.mark.parametrize("case", ["full", "lora", "lora first", "dora", "zero weights"])
def test_streamed_soup_equals_the_in_memory_soup(case, ingredients, lora_adapters, dora_adapter, tmp_path):
    """`write_soup_weights` streams every mix tensor by tensor (peft merges one adapter layer at a time) and writes
    exactly what `build_soup` computes with whole models."""
    from align.soup import write_soup_weights

    checkpoints, weights = {
        "full": (ingredients, [0.2, 0.3, 0.5]),
        "lora": ([lora_adapters["lora1"], lora_adapters["lora2"]], [0.3, 0.7]),
        "lora first": ([lora_adapters["lora2"], ingredients[0], lora_adapters["lora1"]], [0.4, 0.35, 0.25]),
        "dora": ([ingredients[1], dora_adapter], [0.5, 0.5]),
        "zero weights": ([ingredients[0], lora_adapters["lora1"], ingredients[2]], [0.0, 0.6, 0.4]),
    }[case]
    assert write_soup_weights(tmp_path / "soup", checkpoints, weights) is True  # streamed, no fallback
    assert sorted(p.name for p in (tmp_path / "soup").iterdir()) == ["config.json", "generation_config.json",
                                                                      "model.safetensors"]
    written = params(tmp_path / "soup")
    expected, _ = build_soup(checkpoints, weights)
    for name, value in expected.named_parameters():
        assert torch.equal(written[name], value), name


def test_soup_of_bf16_checkpoints_is_written_in_bf16(ingredients, tmp_path):
    from align.soup import write_soup_weights

    bf16 = []
    for i, path in enumerate(ingredients[:2]):
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(tmp_path / f"bf{i}")
        shutil.copy(Path(path) / "tokenizer.json", tmp_path / f"bf{i}")
        shutil.copy(Path(path) / "tokenizer_config.json", tmp_path / f"bf{i}")
        bf16.append(str(tmp_path / f"bf{i}"))
    assert write_soup_weights(tmp_path / "soup", bf16, [0.3, 0.7])
    with open(tmp_path / "soup" / "model.safetensors", "rb") as f:  # the format safetensors reads, in bf16
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    written = load_file(tmp_path / "soup" / "model.safetensors")
    expected, _ = build_soup(bf16, [0.3, 0.7])
    for name, value in expected.named_parameters():
        assert written[name].dtype == torch.bfloat16 and torch.equal(written[name], value), name


def test_soup_of_checkpoints_stored_under_other_names_falls_back_to_the_in_memory_build(ingredients, tmp_path):
    """A checkpoint whose file names a tensor otherwise than the model does (here an old `gamma` that transformers
    renames to `weight` while loading) cannot be averaged by name from the files: the soup is built in memory (two
    models) by `build_soup`'s code, with the same result."""
    from align.soup import write_soup_weights

    legacy = tmp_path / "legacy"
    shutil.copytree(ingredients[1], legacy)
    tensors = load_file(legacy / "model.safetensors")
    tensors["model.norm.gamma"] = tensors.pop("model.norm.weight")
    save_file(tensors, legacy / "model.safetensors", metadata={"format": "pt"})
    assert torch.equal(params(legacy)["model.norm.weight"], params(ingredients[1])["model.norm.weight"])
    assert write_soup_weights(tmp_path / "soup", [ingredients[0], str(legacy)]) is False
    expected, _ = build_soup(ingredients[:2])
    written = params(tmp_path / "soup")
    for name, value in expected.named_parameters():
        assert torch.equal(written[name], value), name


def test_soup_reference_merge_failure_is_a_config_error_and_leaves_no_files(lora_adapters, ingredients,
                                                                           soup_tmpdir, tmp_path):
    broken = _edited_adapter(lora_adapters["lora1"], tmp_path / "nan_adapter")
    tensors = load_file(Path(broken) / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key] = torch.full_like(tensors[key], float("nan"))  # safe_merge refuses a merge with NaN
    save_file(tensors, Path(broken) / "adapter_model.safetensors")
    config = ModelConfig(name_or_path=ingredients[0], dtype="float32")
    with pytest.raises(ConfigError, match=r"^reference\.checkpoints: soup ingredient '.*nan_adapter'.*cannot load "
                                          r"or merge the adapter \(NaNs detected"):
        build_reference("soup", {"checkpoints": [ingredients[0], broken]}, policy=None, model_config=config)
    assert list(soup_tmpdir.iterdir()) == []


def test_build_soup_loads_whole_models_under_a_live_zero3_config(ingredients, monkeypatch):
    """With a ZeRO-3 `TrainingArguments` alive, transformers' `from_pretrained` partitions while loading; the soup's
    loaders must not (an average of empty placeholders left the old ZeRO-3 soup reference equal to its first
    ingredient, bench/soup_memory.py). `_whole_models` hides the config for the block and puts it back."""
    from transformers.integrations import deepspeed as hf_deepspeed

    from align.soup import _whole_models

    class Zero3:
        def is_zero3(self):
            return True

    name = "model.embed_tokens.weight"
    expected = 0.5 * (params(ingredients[0])[name].double() + params(ingredients[1])[name].double())
    live = Zero3()
    monkeypatch.setattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", lambda: live)
    assert hf_deepspeed.is_deepspeed_zero3_enabled()
    with pytest.raises(AttributeError):  # an unguarded load would go through zero.Init (this stand-in has no config)
        AutoModelForCausalLM.from_pretrained(ingredients[0])
    with _whole_models():
        assert not hf_deepspeed.is_deepspeed_zero3_enabled()
    assert hf_deepspeed.is_deepspeed_zero3_enabled() and hf_deepspeed._hf_deepspeed_config_weak_ref() is live
    soup, _ = build_soup(ingredients[:2])  # loads with the "ZeRO-3" config alive: whole tensors all the same
    assert all(p.numel() > 0 for p in soup.parameters())
    torch.testing.assert_close(dict(soup.named_parameters())[name].double(), expected, rtol=0, atol=1e-6)
    assert hf_deepspeed._hf_deepspeed_config_weak_ref() is live  # put back after the build


def test_soup_with_a_pytorch_model_bin_checkpoint_is_streamed_too(ingredients, tmp_path):
    from align.soup import write_soup_weights

    old_format = tmp_path / "bin"
    shutil.copytree(ingredients[1], old_format, ignore=shutil.ignore_patterns("model.safetensors"))
    torch.save(load_file(Path(ingredients[1]) / "model.safetensors"), old_format / "pytorch_model.bin")
    assert write_soup_weights(tmp_path / "soup", [ingredients[0], str(old_format)], [0.3, 0.7]) is True
    expected, _ = build_soup(ingredients[:2], [0.3, 0.7])
    written = params(tmp_path / "soup")
    for name, value in expected.named_parameters():
        assert torch.equal(written[name], value), name


def test_soup_reference_keeps_the_first_ingredients_generation_config(ingredients, lora_adapters, tmp_path,
                                                                      soup_tmpdir):
    """Sampling from the reference (`best_of_n`) stops where the first ingredient's generation config says (a chat
    model often ends turns with more ids than config.json's eos_token_id), as the in-memory soup did."""
    chat = tmp_path / "chat"
    shutil.copytree(ingredients[0], chat)
    generation = json.loads((chat / "generation_config.json").read_text())
    (chat / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [3, 7]}))
    config = ModelConfig(name_or_path=ingredients[0], dtype="float32")
    for checkpoints, eos in (([str(chat), ingredients[1]], [3, 7]), ([lora_adapters["lora1"], str(chat)], 3)):
        reference = build_reference("soup", {"checkpoints": checkpoints}, policy=None, model_config=config)
        old, _ = build_soup(checkpoints)
        assert reference.model.generation_config.eos_token_id == old.generation_config.eos_token_id == eos
