"""SALSA model soups: `align soup` and the `soup` reference kind (METHODS §3)."""

import os
import subprocess
import sys

import pytest
import torch
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
