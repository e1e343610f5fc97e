"""Reward-model ensembles: the three kinds, forward/score, gradients, save/load and its checks (METHODS §8)."""

import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from align import toy_world
from align.data import tokenize_pairs
from align.errors import AlignError, ConfigError
from align.modeling import LoraSection, ModelConfig
from reward_models import ENSEMBLE_KINDS, RewardEnsemble, load_ensemble
from reward_models.manifest import sha256
from reward_models.modeling import pad_right

K = 3
SEEDS = [11, 22, 33]
LORA = LoraSection(r=8, lora_alpha=16)


@pytest.fixture(scope="module")
def model_config(tiny_model_dir):
    return ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32")


def build(kind, model_config, k=K, seeds=None, **kwargs):
    if kind == "lora":
        kwargs.setdefault("lora", LORA)
    return RewardEnsemble.build(kind, model_config, k, seeds=seeds or SEEDS[:k], **kwargs)


def perturb(ensemble, seed=0, scale=0.05):
    """Moves every trainable parameter (LoRA B factors start at 0), so tests do not run on an untouched init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ensemble.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return ensemble


def head_rows(ensemble) -> torch.Tensor:
    """`[K, H]`: the K reward heads' weights."""
    if ensemble.kind == "seeds":
        return torch.cat([m.score.weight for m in ensemble.members])
    if ensemble.kind == "multi_head":
        return ensemble.model.score.weight
    copies = ensemble.model.get_base_model().score.modules_to_save
    return torch.cat([copies[f"member-{k}"].weight for k in range(ensemble.num_members)])


def toy_pairs(n=6, seed=3):
    rows = toy_world.make_preference_rows(n, seed=seed)
    return [r["prompt"] for r in rows], [r["chosen"] for r in rows]


def batch(ensemble, prompts, responses):
    return pad_right(tokenize_pairs(ensemble.tokenizer, prompts, responses), ensemble.tokenizer.pad_token_id)


def member_parameter_names(ensemble, k) -> set[str]:
    """The trainable parameters member k's reward depends on, from the layout each kind documents: `members[k]`
    (seeds), the shared model (multi_head: backbone and the whole head, of which member k owns row k), the parameters
    named after adapter `member-k` (lora)."""
    trainable = {n for n, p in ensemble.named_parameters() if p.requires_grad}
    if ensemble.kind == "seeds":
        return {n for n in trainable if n.startswith(f"members.{k}.")}
    if ensemble.kind == "multi_head":
        return trainable
    return {n for n in trainable if re.search(rf"\.member-{k}(\.|$)", n)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model_config):
    """One saved ensemble per kind (perturbed, with uwo and normalisation) and its scores on toy pairs."""
    out = {}
    prompts, responses = toy_pairs(10)
    for kind in ENSEMBLE_KINDS:
        ensemble = perturb(build(kind, model_config, aggregation={"method": "uwo", "lam": 0.3, "ddof": 1}))
        ensemble.fit_normalization(prompts, responses)
        directory = tmp_path_factory.mktemp("ensembles") / kind
        ensemble.save(directory)
        out[kind] = (directory, ensemble.score(prompts, responses, batch_size=4), ensemble.normalization)
    return out


# --- building -----------------------------------------------------------------------------------------------------


def test_one_class_per_kind():
    assert sorted(cls.kind for cls in RewardEnsemble.__subclasses__()) == sorted(ENSEMBLE_KINDS)


@pytest.mark.parametrize("kind", ENSEMBLE_KINDS)
def test_build_gives_k_distinct_heads(kind, model_config):
    ensemble = build(kind, model_config)
    assert ensemble.kind == kind and ensemble.num_members == K and ensemble.seeds == SEEDS
    assert ensemble.aggregation == {"method": "mean"} and ensemble.normalization is None
    rows = head_rows(ensemble)
    assert rows.shape == (K, 64)
    for i in range(K):  # METHODS §8 test 4: K seeds give K distinct head initialisations
        for j in range(i):
            assert not torch.equal(rows[i], rows[j])
    # A seed gives the same head in every kind (drawn from its own generator), and building is deterministic.
    reference = head_rows(build("multi_head", model_config))
    assert torch.equal(rows, reference)
    # Members disagree from the start.
    per_member, _ = ensemble.score(*toy_pairs())
    assert per_member.shape == (6, K) and len({tuple(per_member[:, k].tolist()) for k in range(K)}) == K
    assert all(member_parameter_names(ensemble, k) for k in range(K))
    assert ensemble.tokenizer.pad_token_id is not None
    for model in ensemble._pretrained_models():
        assert model.config.pad_token_id == ensemble.tokenizer.pad_token_id


def test_lora_adapters_distinct_and_base_frozen(model_config):
    ensemble = build("lora", model_config)
    lora_a = [dict(ensemble.model.named_parameters())[
        f"base_model.model.model.layers.0.self_attn.q_proj.lora_A.member-{k}.weight"] for k in range(K)]
    assert not torch.equal(lora_a[0], lora_a[1]) and not torch.equal(lora_a[1], lora_a[2])
    trainable = {n for n, p in ensemble.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or ".modules_to_save." in n for n in trainable)
    # Every trainable parameter belongs to exactly one member's adapter.
    per_member = [member_parameter_names(ensemble, k) for k in range(K)]
    assert set().union(*per_member) == trainable and sum(len(s) for s in per_member) == len(trainable)


def test_single_member(model_config):
    ensemble = build("seeds", model_config, k=1)
    per_member, agg = ensemble.score(*toy_pairs())
    assert per_member.shape == (6, 1) and torch.equal(agg, per_member[:, 0])
    with pytest.raises(ConfigError, match="'wco' needs at least 2 ensemble members, got 1"):
        build("seeds", model_config, k=1, aggregation={"method": "wco"})
    with pytest.raises(ConfigError, match="'uwo' needs at least 2"):
        ensemble.set_aggregation({"method": "uwo"})


@pytest.mark.parametrize("args, kwargs, match", [
    (("mixture", 3), {"seeds": [1, 2, 3]}, r"kind: unknown reward ensemble kind 'mixture'; known: seeds, multi_head"),
    (("seeds", 0), {"seeds": []}, r"num_members: must be an integer >= 1, got 0"),
    (("seeds", 3), {"seeds": [1, 2]}, r"seeds: need one seed per member \(3\), got 2"),
    (("multi_head", 2), {"seeds": [5, 5]}, r"seeds: must be distinct"),
    (("multi_head", 2), {"seeds": [1, 2.5]}, r"seeds: must be integers"),
    (("seeds", 2), {"seeds": [1, 2], "lora": LoraSection()}, r"lora: LoRA settings are for kind 'lora' only"),
    (("seeds", 2), {"seeds": [1, 2], "aggregation": {"method": "max"}}, r"aggregation.method: unknown aggregation 'max'"),
    (("seeds", 2), {"seeds": [1, 2], "aggregation": {"lam": 1}}, r"aggregation: must be a mapping with a 'method'"),
    (("seeds", 2), {"seeds": [1, 2], "aggregation": {"method": "uwo", "lam": -1}}, r"aggregation.lam: must be >= 0"),
])
def test_build_errors(model_config, args, kwargs, match):
    with pytest.raises(ConfigError, match=match) as info:
        RewardEnsemble.build(args[0], model_config, args[1], **kwargs)
    assert "\n" not in str(info.value)


def test_build_missing_base(tmp_path):
    # One line naming the key and the path (align.modeling words the reason).
    with pytest.raises(ConfigError, match=r"^model\.name_or_path:? '[^\n]*nothing'[^\n]*$"):
        RewardEnsemble.build("lora", ModelConfig(name_or_path=str(tmp_path / "nothing")), 2, seeds=[1, 2])


# --- forward ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ENSEMBLE_KINDS)
def test_forward_shapes_and_padding(kind, model_config):
    ensemble = perturb(build(kind, model_config)).eval()
    prompts, responses = toy_pairs()
    input_ids, attention_mask = batch(ensemble, prompts, responses)
    rewards = ensemble(input_ids, attention_mask)
    assert rewards.shape == (6, K) and rewards.dtype == torch.float32
    # Each row's reward is read at its own last token: padding changes nothing.
    for i in range(6):
        alone = ensemble(*batch(ensemble, prompts[i:i + 1], responses[i:i + 1]))
        torch.testing.assert_close(alone[0], rewards[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind, calls", [("seeds", [1, 1, 1]), ("multi_head", [1]), ("lora", [K])])
def test_backbone_forwards(kind, calls, model_config):
    """multi_head: ONE backbone forward for K heads; seeds: one per member; lora: K on the shared backbone."""
    ensemble = build(kind, model_config)
    backbones = ensemble.backbones()
    counts = [0] * len(backbones)
    handles = []
    for i, backbone in enumerate(backbones):
        def hook(module, args, output, i=i):
            counts[i] += 1
        handles.append(backbone.register_forward_hook(hook))
    try:
        ensemble(*batch(ensemble, *toy_pairs()))
    finally:
        for handle in handles:
            handle.remove()
    assert counts == calls
    if kind == "multi_head":
        assert ensemble.model.score.weight.shape == (K, 64)  # K heads from that one forward


@pytest.mark.parametrize("kind", ENSEMBLE_KINDS)
def test_gradients_reach_only_member_k(kind, model_config):
    ensemble = perturb(build(kind, model_config), seed=1)
    inputs = batch(ensemble, *toy_pairs())
    before = {n: p.requires_grad for n, p in ensemble.named_parameters()}
    for k in range(K):
        ensemble.zero_grad(set_to_none=True)
        ensemble(*inputs)[:, k].sum().backward()
        own = member_parameter_names(ensemble, k)
        for name, p in ensemble.named_parameters():
            grad = p.grad
            if kind == "multi_head" and name.endswith("score.weight"):
                # The shared head: member k's reward reaches row k only.
                assert grad[k].abs().sum() > 0
                assert torch.all(grad[torch.arange(K) != k] == 0)
            elif name in own:
                assert grad is not None and grad.abs().sum() > 0, name
            else:
                assert grad is None or torch.all(grad == 0), name
    # The adapter switch leaves requires_grad alone (PEFT's set_adapter would not).
    assert before == {n: p.requires_grad for n, p in ensemble.named_parameters()}


def test_lora_refuses_activation_checkpointing(model_config):
    ensemble = build("lora", model_config, k=2)
    with pytest.raises(ConfigError, match="^activation checkpointing: not available for a LoRA ensemble with more "
                                          "than one member"):
        ensemble.gradient_checkpointing_enable()
    build("lora", model_config, k=1).gradient_checkpointing_enable()  # one adapter: nothing to mix up


@pytest.mark.parametrize("kind", ENSEMBLE_KINDS)
def test_score_equals_forward(kind, model_config):
    ensemble = perturb(build(kind, model_config), seed=2)
    ensemble.set_aggregation({"method": "wco"})
    prompts, responses = toy_pairs(7, seed=5)
    ensemble.train()
    per_member, agg = ensemble.score(prompts, responses, batch_size=3)
    assert ensemble.training  # mode restored
    assert per_member.shape == (7, K) and agg.shape == (7,) and per_member.device.type == "cpu"
    with torch.no_grad():
        expected = ensemble.eval()(*batch(ensemble, prompts, responses))
    torch.testing.assert_close(per_member, expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(agg, per_member.min(dim=-1).values)
    assert ensemble.score([], [])[0].shape == (0, K)


def test_score_normalisation(model_config):
    ensemble = perturb(build("multi_head", model_config), seed=3)
    prompts, responses = toy_pairs(12, seed=7)
    raw, _ = ensemble.score(prompts, responses, progress=True)
    with pytest.raises(AlignError, match="no normalization statistics"):
        ensemble.score(prompts, responses, normalize=True)
    stats = ensemble.fit_normalization(prompts, responses)
    z, _ = ensemble.score(prompts, responses)  # normalised by default once statistics exist
    torch.testing.assert_close(z.mean(dim=0), torch.zeros(K), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=0, correction=0), torch.ones(K), atol=1e-4, rtol=0)
    torch.testing.assert_close(z * torch.tensor(stats["std"]) + torch.tensor(stats["mean"]), raw, atol=1e-5, rtol=0)
    assert torch.equal(ensemble.score(prompts, responses, normalize=False)[0], raw)
    with pytest.raises(AlignError, match="needs 3 means and stds"):
        ensemble.set_normalization([0.0], [1.0])


# --- saving and loading -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ENSEMBLE_KINDS)
def test_save_load_round_trip(kind, saved):
    directory, (per_member, agg), normalization = saved[kind]
    loaded = load_ensemble(directory)
    assert loaded.kind == kind and loaded.num_members == K and loaded.seeds == SEEDS
    assert loaded.aggregation == {"method": "uwo", "lam": 0.3, "ddof": 1}
    assert loaded.normalization == normalization
    again = loaded.score(*toy_pairs(10), batch_size=4)
    assert torch.equal(again[0], per_member) and torch.equal(again[1], agg)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["kind"] == kind and manifest["num_members"] == K and manifest["dtype"] == "float32"
    assert [m["name"] for m in manifest["members"]] == ["member-0", "member-1", "member-2"]
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    layout = {"seeds": ["member-0", "member-1", "member-2"], "multi_head": ["model"],
              "lora": ["base", "adapters/member-0", "adapters/member-1", "adapters/member-2"]}[kind]
    assert all((directory / p).is_dir() for p in layout)


def test_save_refuses_existing_directory(saved):
    directory = saved["seeds"][0]
    ensemble = load_ensemble(directory)
    with pytest.raises(AlignError, match="already exists and is not empty"):
        ensemble.save(directory)


def _copy(saved, kind, tmp_path):
    target = tmp_path / kind
    shutil.copytree(saved[kind][0], target)
    return target


def _rewrite_manifest(directory, change):
    manifest = json.loads((directory / "manifest.json").read_text())
    change(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def _mutations(model_config):
    def remove_member(d):
        shutil.rmtree(d / "member-1")

    def extra_member(d):
        shutil.copytree(d / "member-0", d / "member-3")

    def changed_file(d):
        # Same size, other bytes: member 0's weights in member 1's place.
        shutil.copy(d / "member-0" / "model.safetensors", d / "member-1" / "model.safetensors")

    def fewer_members(d):
        _rewrite_manifest(d, lambda m: m.update(num_members=2))

    def unrecorded_file(d):
        (d / "member-2" / "extra.safetensors").write_bytes(b"0")

    def two_heads(d):
        # A consistent manifest (digests updated) over a model with the wrong number of heads.
        shutil.rmtree(d / "model")
        build("multi_head", model_config, k=2).model.save_pretrained(d / "model")

        def update(m):
            for rel in list(m["files"]):
                if rel.startswith("model/"):
                    m["files"][rel] = {"sha256": sha256(d / rel), "bytes": (d / rel).stat().st_size}
        _rewrite_manifest(d, update)

    def no_base(d):
        shutil.rmtree(d / "base")

    def remove_adapter(d):
        shutil.rmtree(d / "adapters" / "member-2")

    def no_manifest(d):
        (d / "manifest.json").unlink()

    def bad_aggregation(d):
        _rewrite_manifest(d, lambda m: m.update(aggregation={"method": "uwo", "lam": -2}))

    return [
        ("seeds", remove_member, r"member 'member-1' is missing \(expected folder member-1/; the manifest lists 3"),
        ("seeds", extra_member, r"unexpected member folder 'member-3' \(the manifest lists 3 members\)"),
        ("seeds", changed_file, r"member-1/model.safetensors does not match manifest.json \(sha256 differs\)"),
        ("seeds", fewer_members, r"num_members is 2 but 3 members are listed"),
        ("seeds", unrecorded_file, r"member-2/extra.safetensors is not recorded in manifest.json"),
        ("multi_head", two_heads, r"model/ has 2 reward heads but the manifest lists 3 members"),
        ("lora", no_base, r"base/ is missing"),
        ("lora", remove_adapter, r"member 'member-2' is missing \(expected folder adapters/member-2/"),
        ("multi_head", no_manifest, r"no manifest.json \(not a directory written by RewardEnsemble.save\)"),
        ("lora", bad_aggregation, r"manifest.json: aggregation.lam: must be >= 0"),
    ]


def test_load_mismatches(saved, model_config, tmp_path):
    for i, (kind, mutate, match) in enumerate(_mutations(model_config)):
        directory = _copy(saved, kind, tmp_path / str(i))
        mutate(directory)
        with pytest.raises(AlignError, match=match) as info:
            load_ensemble(directory)
        message = str(info.value)
        assert "\n" not in message and f"reward ensemble '{directory}'" in message, mutate.__name__


def test_load_missing_directory(tmp_path):
    with pytest.raises(AlignError, match=r"reward ensemble '.*nowhere': directory not found"):
        load_ensemble(tmp_path / "nowhere")


def test_load_dtype(saved):
    loaded = load_ensemble(saved["multi_head"][0], dtype="bfloat16", device="cpu", verify=False)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    per_member, _ = loaded.score(*toy_pairs(3))
    assert per_member.dtype == torch.float32


# --- a few optimizer steps raise the Bradley-Terry accuracy ------------------------------------------------------


@pytest.mark.parametrize("kind, lr, steps", [("seeds", 5e-3, 10), ("multi_head", 5e-3, 10), ("lora", 1e-2, 20)])
def test_training_raises_accuracy(kind, lr, steps, model_config):
    rows = toy_world.make_preference_rows(32, seed=1)
    torch.manual_seed(0)
    ensemble = build(kind, model_config)
    n = len(rows)
    input_ids, attention_mask = pad_right(
        tokenize_pairs(ensemble.tokenizer, [r["prompt"] for r in rows] * 2,
                       [r["chosen"] for r in rows] + [r["rejected"] for r in rows]),
        ensemble.tokenizer.pad_token_id)

    def accuracy():
        with torch.no_grad():
            rewards = ensemble(input_ids, attention_mask)
        return (rewards[:n] > rewards[n:]).float().mean().item()  # over pairs and members

    start = accuracy()
    optimizer = torch.optim.Adam([p for p in ensemble.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        rewards = ensemble(input_ids, attention_mask)
        # Bradley-Terry, summed over members: each member gets the gradient it would get trained alone.
        loss = -F.logsigmoid(rewards[:n] - rewards[n:]).mean(dim=0).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    end = accuracy()
    assert end >= 0.8 and end >= start + 0.2, (start, end)
