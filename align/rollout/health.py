"""Rollout health: do the sampler's log-probs agree with the trainer's on the very tokens it sampled?

Off-policy drift between a rollout engine and the trainer (stale weights after a missed `load_weights`, bf16
kernels in vLLM vs fp32 in the trainer, a different tokenization of the prompt) shows up as a gap between
`Completion.logps` and the trainer's `score_completions` of the same tokens after the same prompt ids. Its mean is
logged as a health metric: ~0 for `HFRollout` on the trained model, small (~1e-3 to 1e-2 in bf16) for an in-sync
vLLM engine, large when weights are stale.
"""

from __future__ import annotations

import torch

from align.logps import score_completions
from align.rollout.base import Completion


def logprob_gap(result: list[list[Completion]], model, prompt_ids: list[list[int]], *, temperature: float = 1.0,
                batch_size: int = 64) -> float:
    """Mean over all sampled tokens of |log π_sampler(y_t) − log π_trainer(y_t)|.

    Args:
        result: a `generate` result (`result[i]` are the completions of prompt i).
        model: the trainer's model; scored in eval mode under `torch.no_grad` (its mode is restored).
        prompt_ids: the token ids of each prompt as the backend saw them (`prompt_token_ids(tokenizer, prompts)`).
        temperature: the sampling temperature of the call (0, greedy, scores at 1 like the backends do).

    Returns 0.0 when there are no tokens.
    """
    flat = [c for group in result for c in group if c.token_ids]
    if not flat:
        return 0.0
    was_training = model.training
    model.eval()
    try:
        trainer = score_completions(model, [prompt_ids[c.prompt_index] for c in flat], [c.token_ids for c in flat],
                                    temperature=temperature or 1.0, batch_size=batch_size)
    finally:
        model.train(was_training)
    sampler = torch.cat([c.logps.float().cpu() for c in flat])
    return float((sampler - torch.cat(trainer)).abs().mean())
