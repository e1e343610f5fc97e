"""The model pieces of every ensemble kind (reward_models/modeling.py): right padding, the reward read at each row's
last attended token, the seeded head init.

(Named test_rm_modeling.py: tests/ has no __init__.py files, and tests/test_modeling.py already owns the basename.)
"""

import pytest
import torch

from align.errors import ConfigError
from reward_models.modeling import init_head_rows, last_token_hidden, pad_right, score_head


class Echo(torch.nn.Module):
    """A backbone whose hidden state at position t is [t, input_ids[t]] (float): shows which position is read."""

    def forward(self, input_ids, attention_mask, use_cache):
        positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        return (torch.stack([positions, input_ids], dim=-1).float(),)


def test_pad_right():
    input_ids, attention_mask = pad_right([[5, 6, 7], [8]], pad_token_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0]] and attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert input_ids.dtype == attention_mask.dtype == torch.long
    with pytest.raises(ValueError, match="no sequences"):
        pad_right([], pad_token_id=0)


def test_the_reward_is_read_at_the_last_attended_token_even_when_pad_is_eos():
    eos = 2
    input_ids, attention_mask = pad_right([[1, 5, eos], [1, eos]], pad_token_id=eos)
    hidden = last_token_hidden(Echo(), input_ids, attention_mask)  # [N, H]
    assert hidden.tolist() == [[2.0, eos], [1.0, eos]]  # row 1's last token is at position 1, not at the last pad


def test_head_rows_come_from_their_seeds():
    heads = [torch.nn.Linear(8, 3), torch.nn.Linear(8, 1)]
    init_head_rows(heads[0], [11, 22, 33], std=0.02)
    init_head_rows(heads[1], [22], std=0.02)
    assert torch.equal(heads[0].weight[1], heads[1].weight[0])  # a seed gives the same row in any head
    assert not torch.equal(heads[0].weight[0], heads[0].weight[2]) and torch.all(heads[0].bias == 0)
    with pytest.raises(ValueError, match="head has 3 rows for 2 seeds"):
        init_head_rows(heads[0], [1, 2], std=0.02)


def test_a_model_without_a_score_head_is_refused():
    with pytest.raises(ConfigError, match=r"^base: Linear has no linear `score` head"):
        score_head(torch.nn.Linear(2, 2), "base")
