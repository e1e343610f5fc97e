"""A saved ensemble's manifest: how it tokenizes (max_length, truncation side) and the file checks that run before
any weight is read (tampered, truncated, foreign or unrecorded files; a manifest that is not JSON or lacks keys)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from align import toy_world
from align.errors import AlignError
from align.modeling import ModelConfig
from align.data import tokenize_pairs
from reward_models import RewardEnsemble, load_ensemble
from reward_models.reward import EnsembleReward

MAX_LENGTH = 12
#: A row of 3 + 25 tokens with BOS and EOS: longer than MAX_LENGTH.
LONG_PROMPT = "write a review of the movie ."
LONG_RESPONSE = " ".join(["the movie was great ."] * 5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model_dir):
    """A perturbed 2-member seeds ensemble trained (say) with data.max_length = MAX_LENGTH, saved once."""
    ensemble = RewardEnsemble.build("seeds", ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32"), 2,
                                    seeds=[3, 4], aggregation={"method": "uwo", "lam": 0.5})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ensemble.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ensemble.set_tokenization(MAX_LENGTH, "left")
    directory = tmp_path_factory.mktemp("ensemble") / "ens"
    ensemble.save(directory)
    return directory


def copy(saved, tmp_path):
    target = tmp_path / "ens"
    shutil.copytree(saved, target)
    return target


def rewrite_manifest(directory, change):
    manifest = json.loads((directory / "manifest.json").read_text())
    change(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


# --- tokenization settings --------------------------------------------------------------------------------------


def test_tokenization_round_trips_and_long_rows_score_as_their_truncated_form(saved):
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["max_length"] == MAX_LENGTH and manifest["truncation_side"] == "left"
    ensemble = load_ensemble(saved, device="cpu")
    assert ensemble.max_length == MAX_LENGTH and ensemble.truncation_side == "left"

    ids = tokenize_pairs(ensemble.tokenizer, [LONG_PROMPT], [LONG_RESPONSE])[0]
    assert len(ids) > MAX_LENGTH + 10
    by_default = ensemble.score([LONG_PROMPT], [LONG_RESPONSE])
    truncated = ensemble.score_ids([ids[-MAX_LENGTH:]])
    whole = ensemble.score_ids([ids])
    assert torch.equal(by_default[0], truncated[0]) and torch.equal(by_default[1], truncated[1])
    assert not torch.equal(by_default[0], whole[0])  # the cut matters: the test can tell the two apart
    # an explicit max_length wins over the manifest's
    explicit = ensemble.score([LONG_PROMPT], [LONG_RESPONSE], max_length=len(ids))
    assert torch.equal(explicit[0], whole[0])
    # the on-policy reward (text and token-id paths) cuts as the manifest says, unless told otherwise
    reward = EnsembleReward(ensemble, policy_tokenizer=ensemble.tokenizer)
    assert reward.max_length == MAX_LENGTH
    assert torch.equal(reward([LONG_PROMPT], [LONG_RESPONSE]).members, truncated[0])
    split = len(tokenize_pairs(ensemble.tokenizer, [LONG_PROMPT], [""])[0]) - 1  # the prompt's ids (without EOS)
    assert torch.equal(reward.score_tokens([ids[:split]], [ids[split:]], None, None).members, truncated[0])
    assert EnsembleReward(ensemble, max_length=len(ids)).max_length == len(ids)


def test_an_old_manifest_without_the_keys_loads_without_truncation(saved, tmp_path):
    directory = copy(saved, tmp_path)
    rewrite_manifest(directory, lambda m: (m.pop("max_length"), m.pop("truncation_side")))
    ensemble = load_ensemble(directory, device="cpu")
    assert ensemble.max_length is None and ensemble.truncation_side == "left"
    ids = tokenize_pairs(ensemble.tokenizer, [LONG_PROMPT], [LONG_RESPONSE])[0]
    assert torch.equal(ensemble.score([LONG_PROMPT], [LONG_RESPONSE])[0], ensemble.score_ids([ids])[0])


@pytest.mark.parametrize("key, value, match", [
    ("max_length", "12", "max_length must be null or a positive integer, got '12'"),
    ("max_length", 0, "max_length must be null or a positive integer, got 0"),
    ("truncation_side", "right", "truncation_side must be one of left, got 'right'"),
])
def test_bad_tokenization_keys_are_one_line_naming_the_manifest(saved, tmp_path, key, value, match):
    directory = copy(saved, tmp_path)
    rewrite_manifest(directory, lambda m: m.update({key: value}))
    with pytest.raises(AlignError, match=match) as info:
        load_ensemble(directory)
    assert "manifest.json" in str(info.value) and "\n" not in str(info.value)


# --- file checks before any weight is read ------------------------------------------------------------------------


def _no_reading(monkeypatch):
    """Any attempt to load a model or a tokenizer from the directory fails the test (not with an AlignError)."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a weight or tokenizer file was read before the manifest checks failed")

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


def _flip_a_byte(d):
    path = d / "member-1" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one weight byte changed
    path.write_bytes(bytes(data))


def _truncate(d):
    path = d / "member-0" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])


def _foreign_weights(d):
    shutil.copy(d / "member-0" / "model.safetensors", d / "member-1" / "model.safetensors")


def _foreign_tokenizer_file(d):
    (d / "special_tokens_map.json").write_text('{"eos_token": "<bos>"}')


def _garbage_manifest(d):
    (d / "manifest.json").write_bytes(b"\x00\x01 not json {")


def _manifest_without(key):
    def change(d):
        rewrite_manifest(d, lambda m: m.pop(key))
    return change


def _record(rel, record):
    def change(d):
        rewrite_manifest(d, lambda m: m["files"].update({rel: record}))
    return change


def _pickle_weights(d):
    (d / "member-0" / "pytorch_model.bin").write_bytes(b"pickle")
    rewrite_manifest(d, lambda m: m["files"].update(
        {"member-0/pytorch_model.bin": {"sha256": "0" * 64, "bytes": 6}}))


@pytest.mark.parametrize("mutate, match", [
    (_flip_a_byte, r"member-1/model.safetensors does not match manifest.json \(sha256 differs\)"),
    (_truncate, r"member-0/model.safetensors does not match manifest.json \(size \d+ bytes, recorded \d+\)"),
    (_foreign_weights, r"member-1/model.safetensors does not match manifest.json \(sha256 differs\)"),
    (_foreign_tokenizer_file, r"special_tokens_map.json is not recorded in manifest.json"),
    (_garbage_manifest, r"manifest.json is not valid JSON"),
    (_manifest_without("files"), r"manifest.json: 'files' is missing"),
    (_manifest_without("seeds"), r"manifest.json: 'seeds' is missing"),
    (_record("member-0/config.json", "abc"), r"manifest.json: files: 'member-0/config.json' must be recorded as"),
    (_record("../outside.json", {"sha256": "0" * 64, "bytes": 1}),
     r"manifest.json: files: '../outside.json' is not a path inside the ensemble directory"),
    (_pickle_weights, r"manifest.json: files: 'member-0/pytorch_model.bin' is a pickle file"),
])
def test_bad_files_are_refused_before_anything_is_read(saved, tmp_path, monkeypatch, mutate, match):
    directory = copy(saved, tmp_path)
    mutate(directory)
    _no_reading(monkeypatch)
    with pytest.raises(AlignError, match=match) as info:
        load_ensemble(directory)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"reward ensemble '{directory}': "), message


def test_the_untouched_copy_loads(saved, tmp_path):
    """The mutations above are the only difference: the same copy, unchanged, loads and scores."""
    directory = copy(saved, tmp_path)
    prompts, responses = zip(*[(r["prompt"], r["chosen"]) for r in toy_world.make_preference_rows(3, seed=1)])
    assert load_ensemble(directory, device="cpu").score(list(prompts), list(responses))[0].shape == (3, 2)
