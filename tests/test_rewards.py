"""The core's reward interface (`align.rewards`): callables, the toy world's gold reward and reward ensembles all
implement it; bad callables are one error naming the callable."""

import math
import sys
import types

import pytest
import torch

from align import toy_world
from align.errors import AlignError, ConfigError
from align.rewards import CallableReward, RewardFunction, load_callable_reward

PROMPTS = ["describe the movie .", "review the park ."]
COMPLETIONS = ["it was great and fun .", "it was bad ."]


def test_gold_reward_is_a_reward_function():
    gold = toy_world.gold_reward_function()
    assert isinstance(gold, RewardFunction) and gold.name == "toy_world"
    scores = gold(PROMPTS, COMPLETIONS)
    expected = torch.tensor(toy_world.gold_rewards(COMPLETIONS))
    assert scores.members.shape == (2, 1) and torch.equal(scores.reward, expected)
    assert torch.equal(scores.members[:, 0], expected) and gold.member_names == ["toy_world"]


def test_callable_with_members_is_averaged():
    reward = CallableReward(lambda p, c: [[1.0, 3.0], [0.0, -1.0]], name="two")
    scores = reward(PROMPTS, COMPLETIONS)
    assert scores.members.tolist() == [[1.0, 3.0], [0.0, -1.0]] and scores.reward.tolist() == [2.0, -0.5]
    assert reward.member_names == ["two[0]", "two[1]"]


@pytest.mark.parametrize("returned, match", [
    ([1.0, math.nan], r"^reward bad: returned a non-finite reward \(\[nan\]\) for completion 1 \('it was bad \.'\)$"),
    ([1.0, 2.0, 3.0], r"^reward bad: returned shape \(3,\) for 2 completions; expected \[2\] or \[2, K\]$"),
    ("high", r"^reward bad: returned something that is not numbers"),
])
def test_bad_callable_output_names_the_callable(returned, match):
    with pytest.raises(AlignError, match=match):
        CallableReward(lambda p, c: returned, name="bad")(PROMPTS, COMPLETIONS)


def test_module_function_specs(monkeypatch):
    module = types.ModuleType("my_rewards")
    module.length = lambda prompts, completions: [len(c.split()) for c in completions]
    module.not_callable = 3
    monkeypatch.setitem(sys.modules, "my_rewards", module)
    reward = load_callable_reward("my_rewards:length")
    assert reward.name == "my_rewards:length" and reward(PROMPTS, COMPLETIONS).reward.tolist() == [6.0, 4.0]
    for spec, match in [("my_rewards", "expected 'module:function'"), ("nope_mod:f", "cannot import module 'nope_mod'"),
                        ("my_rewards:missing", "has no 'missing'"), ("my_rewards:not_callable", "is not callable")]:
        with pytest.raises(ConfigError, match=rf"^reward\.callable: .*{match}"):
            load_callable_reward(spec)


def test_ensemble_reward_scores_members_and_its_aggregation(tiny_model_dir):
    from align.modeling import ModelConfig
    from reward_models import RewardEnsemble
    from reward_models.aggregate import aggregate
    from reward_models.reward import EnsembleReward

    ensemble = RewardEnsemble.build("multi_head", ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32"), 3,
                                    seeds=[1, 2, 3])
    members, _ = ensemble.score(PROMPTS, COMPLETIONS)
    for spec in ({"method": "mean"}, {"method": "wco"}, {"method": "uwo", "lam": 0.5}):
        reward = EnsembleReward(ensemble, spec)
        scores = reward(PROMPTS, COMPLETIONS)
        assert isinstance(reward, RewardFunction) and reward.name == f"ensemble:{spec['method']}"
        torch.testing.assert_close(scores.members, members)
        params = {k: v for k, v in spec.items() if k != "method"}
        torch.testing.assert_close(scores.reward, aggregate(members, spec["method"], **params))
    assert reward.member_names == ["member_0", "member_1", "member_2"]

    # Sampled token ids are scored as ids when the policy shares the ensemble's tokenizer: the same rows, so the same
    # scores, with a cut completion (no EOS) scored at an appended EOS exactly as align.data.tokenize_pairs does for its text.
    from transformers import AutoTokenizer

    from align.data import tokenize_prompts

    policy_tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    shared = EnsembleReward(ensemble, {"method": "mean"}, policy_tokenizer=policy_tokenizer)
    assert shared.shares_tokenizer
    prompt_ids = tokenize_prompts(policy_tokenizer, PROMPTS)
    completion_ids = [policy_tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in COMPLETIONS]
    completion_ids[0].append(policy_tokenizer.eos_token_id)  # one finished completion, one cut
    scored = shared.score_tokens(prompt_ids, completion_ids, PROMPTS, COMPLETIONS)
    torch.testing.assert_close(scored.members, members, rtol=0, atol=1e-6)
    assert not scored.reward.requires_grad and not scored.members.requires_grad  # no reward-model graph in the loss
    shared.ensemble.score = None  # the id path does not go through text scoring
    shared.score_tokens(prompt_ids, completion_ids, PROMPTS, COMPLETIONS)
    del shared.ensemble.score
    other = toy_world.build_tokenizer()
    other.add_tokens(["zebra"])
    assert not EnsembleReward(ensemble, None, policy_tokenizer=other).shares_tokenizer
