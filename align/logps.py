"""Per-token log-probabilities of preference pairs: the tensors that cross every seam.

`PairLogps` is what the policy forward and every reference kind return, and what every objective consumes.
Log-probs are fp32 whatever the model's dtype (METHODS.md §0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PairLogps:
    """Token log-probs of the chosen and rejected completions of a batch of B pairs.

    Attributes:
        chosen: `[B, Tc]` fp32, log π(y_t | x, y_<t) at each chosen completion token; 0 where `chosen_mask` is False.
        chosen_mask: `[B, Tc]` bool, True on real completion tokens (prompt and padding are never included).
        rejected: `[B, Tr]` fp32, the same for the rejected completion.
        rejected_mask: `[B, Tr]` bool.
    """

    chosen: torch.Tensor
    chosen_mask: torch.Tensor
    rejected: torch.Tensor
    rejected_mask: torch.Tensor

    def chosen_sum(self) -> torch.Tensor:
        """`[B]` sequence log-prob log π(y_w | x) (sum over completion tokens)."""
        return (self.chosen * self.chosen_mask).sum(-1)

    def rejected_sum(self) -> torch.Tensor:
        """`[B]` sequence log-prob log π(y_l | x)."""
        return (self.rejected * self.rejected_mask).sum(-1)

    @classmethod
    def from_blocks(cls, blocks: list[tuple[torch.Tensor, torch.Tensor]]) -> "PairLogps":
        """The two `(logps, mask)` blocks of `completion_token_logps` (chosen first) as a `PairLogps`."""
        (chosen, chosen_mask), (rejected, rejected_mask) = blocks
        return cls(chosen, chosen_mask, rejected, rejected_mask)


@dataclass
class GroupLogps:
    """Token log-probs of G completions of each of B prompts (a pair is G = 2; on-policy training samples G).

    Attributes:
        logps: `[B, G, T]` fp32, log π(y_t | x, y_<t) at each completion token; 0 where `mask` is False.
        mask: `[B, G, T]` bool, True on real completion tokens. T is the widest completion block.
    """

    logps: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def from_blocks(cls, blocks: list[tuple[torch.Tensor, torch.Tensor]]) -> "GroupLogps":
        """G `(logps [B, C_k], mask [B, C_k])` blocks (as `completion_token_logps` returns them) → `[B, G, max C_k]`."""
        T = max(logps.shape[1] for logps, _ in blocks)
        pad = torch.nn.functional.pad
        logps = torch.stack([pad(lp, (0, T - lp.shape[1])) for lp, _ in blocks], dim=1)
        mask = torch.stack([pad(m, (0, T - m.shape[1])) for _, m in blocks], dim=1)
        return cls(logps, mask)

    def sums(self) -> torch.Tensor:
        """`[B, G]` sequence log-probs log π(y | x)."""
        return (self.logps * self.mask).sum(-1)

    def lengths(self) -> torch.Tensor:
        """`[B, G]` completion lengths in tokens."""
        return self.mask.sum(-1)


def group_completion_keys(num_completions: int) -> tuple[str, ...]:
    """The example fields of a group of G completions: `completion_0_input_ids`, …, `completion_{G-1}_input_ids`
    (`SharedPromptCollator(pad, completion_keys=group_completion_keys(G))`)."""
    return tuple(f"completion_{k}_input_ids" for k in range(num_completions))


# ---------------------------------------------------------------------------------------------------------------
# Shared-prompt packing.
#
# TRL's DPO forward concatenates [prompt+chosen ; prompt+rejected] along the batch, so every prompt token is
# computed twice in the policy forward and backward and twice again in the reference forward. We instead pack each
# pair into ONE row and let a custom 4D attention mask keep the two completions apart:
#
#   row i:  [pad ... pad | prompt_i | chosen_i  pad... | rejected_i  pad... ]
#           <-- P_max ----------------><-- C_1 max ------><-- C_2 max --------->
#
# Prompts are left-padded so that every prompt ends at column P_max − 1 and every completion block starts at the same
# column in every row. Then the logits we need (the last prompt position and the completion blocks) are the trailing
# `L − P_max + 1` columns, which `logits_to_keep` gives us without computing logits for prompt tokens. Position ids
# restart after the prompt for every completion, so each completion sees exactly the positions it would see alone.
# Mask rule: a query may attend to an earlier (or the same) key that is a prompt token or lies in its own segment.
# The model is called through its top-level forward, so DDP / DeepSpeed / PEFT wrappers behave as usual.
# ---------------------------------------------------------------------------------------------------------------

PAD_SEGMENT, PROMPT_SEGMENT = 0, 1  # completion k (0-based) has segment id k + 2

#: Attention implementations that accept an arbitrary 4D mask.
MASKABLE_ATTENTION = ("sdpa", "eager")


class SharedPromptCollator:
    """Packs examples `{"prompt_input_ids": [...], <completion key>: [...], ...}` into shared-prompt rows.

    Args:
        pad_token_id: id written into padding positions (never attended to, never scored).
        completion_keys: the example fields holding completions, in block order.
        pad_to_multiple_of: round each block's width up to a multiple of this (helps tensor cores on GPU).

    Returns a batch dict:
        input_ids `[B, L]` long, position_ids `[B, L]` long, segment_ids `[B, L]` long (0 pad, 1 prompt, k+2 block k),
        prompt_width: int P_max, block_widths: list[int] widths C_k of the completion blocks,
        completion_keys: list[str], the completion keys in block order,
        `{key}_mask` `[B, C_k]` bool: True on the real tokens of block k.
    """

    def __init__(self, pad_token_id: int, completion_keys=("chosen_input_ids", "rejected_input_ids"),
                 pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.completion_keys = tuple(completion_keys)
        self.pad_to_multiple_of = pad_to_multiple_of

    def _width(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return n if not m else -(-n // m) * m

    def __call__(self, examples: list[dict]) -> dict:
        B = len(examples)
        prompts = [ex["prompt_input_ids"] for ex in examples]
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (its last position predicts the first "
                             "completion token)")
        P = max(len(p) for p in prompts)
        blocks = [[ex[k] for ex in examples] for k in self.completion_keys]
        widths = [self._width(max(1, max(len(c) for c in block))) for block in blocks]
        L = P + sum(widths)
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((B, L), dtype=torch.long)
        segment_ids = torch.zeros((B, L), dtype=torch.long)
        batch = {}
        for i, prompt in enumerate(prompts):
            n = len(prompt)
            input_ids[i, P - n:P] = torch.tensor(prompt)
            position_ids[i, P - n:P] = torch.arange(n)
            segment_ids[i, P - n:P] = PROMPT_SEGMENT
        start = P
        for k, (key, block, width) in enumerate(zip(self.completion_keys, blocks, widths)):
            mask = torch.zeros((B, width), dtype=torch.bool)
            for i, completion in enumerate(block):
                n, p = len(completion), len(prompts[i])
                input_ids[i, start:start + n] = torch.tensor(completion, dtype=torch.long)
                position_ids[i, start:start + n] = torch.arange(p, p + n)
                segment_ids[i, start:start + n] = k + 2
                mask[i, :n] = True
            batch[key.removesuffix("_input_ids") + "_mask"] = mask
            start += width
        batch.update(input_ids=input_ids, position_ids=position_ids, segment_ids=segment_ids,
                     prompt_width=P, block_widths=widths, completion_keys=list(self.completion_keys))
        return batch


def shared_prompt_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """`[B, 1, L, L]` bool mask, True where query i may attend key j (see the layout note above).

    Padding queries attend to themselves only, so no softmax row is empty (no NaN).
    """
    L = segment_ids.shape[1]
    q, k = segment_ids[:, :, None], segment_ids[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool, device=segment_ids.device).tril_()
    allowed = causal & (k != PAD_SEGMENT) & ((k == PROMPT_SEGMENT) | (k == q))
    allowed |= torch.eye(L, dtype=torch.bool, device=segment_ids.device)
    return allowed[:, None]


def _attention_implementation(model) -> str:
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "module"):
        config = model.module.config
    return getattr(config, "_attn_implementation", None) or "eager"


def completion_token_logps(model, batch: dict, completion_keys=("chosen_input_ids", "rejected_input_ids"),
                           temperature: float = 1.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Runs one forward over a shared-prompt batch and returns, per completion block k, `(logps [B, C_k], mask [B, C_k])`.

    `logps` are fp32 log π(y_t | x, y_<t) at the block's tokens (0 where the mask is False). The forward computes
    logits only for the trailing completion columns; the log-softmax is done row by row in fp32 so the full-vocab
    fp32 copy never exists for the whole batch at once.
    """
    segment_ids, input_ids = batch["segment_ids"], batch["input_ids"]
    allowed = shared_prompt_attention_mask(segment_ids)
    impl = _attention_implementation(model)
    if impl == "eager":
        dtype = next(iter(model.parameters())).dtype if hasattr(model, "parameters") else torch.float32
        attention_mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        attention_mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    elif impl == "sdpa":
        attention_mask = allowed
    else:
        raise ValueError(f"attn_implementation '{impl}' cannot take align's shared-prompt attention mask; "
                         f"use one of {MASKABLE_ATTENTION}")
    P, widths = batch["prompt_width"], batch["block_widths"]
    n_keep = input_ids.shape[1] - P + 1  # last prompt column + all completion blocks
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=batch["position_ids"],
                   logits_to_keep=n_keep, use_cache=False).logits  # [B, n_keep, V]
    V = logits.shape[-1]
    # Every completion token of every block at once: token t of a block is predicted from kept column start + t,
    # token 0 from the last prompt column (kept column 0).
    srcs, start = [], 0
    for width in widths:
        src = torch.arange(start, start + width, device=logits.device)
        src[0] = 0
        srcs.append(src)
        start += width
    src = torch.cat(srcs)  # [T]
    flat_index = src * V + input_ids[:, P:P + start]  # [B, T] into each row's flattened [n_keep * V] logits
    parts = []
    # `split` (not per-row indexing): its backward is a single cat, where indexing row i would zero-fill and
    # accumulate a full [B, n_keep, V] gradient for every row. Chunks bound the fp32 copy of half-precision logits.
    for chunk, index in zip(logits.split(_LOGPS_ROWS_PER_CHUNK), flat_index.split(_LOGPS_ROWS_PER_CHUNK)):
        chunk = chunk.float()
        if temperature != 1.0:
            chunk = chunk / temperature
        lse = torch.logsumexp(chunk, dim=-1)  # [c, n_keep]
        parts.append(chunk.reshape(chunk.shape[0], -1).gather(1, index) - lse[:, src])
    token_logps = torch.cat(parts)  # [B, T]
    out, start = [], 0
    for key, width in zip(completion_keys, widths):
        mask = batch[key.removesuffix("_input_ids") + "_mask"]
        out.append((token_logps[:, start:start + width].masked_fill(~mask, 0.0), mask))
        start += width
    return out


_LOGPS_ROWS_PER_CHUNK = 8


def pair_logps(model, batch: dict) -> PairLogps:
    """Policy or reference token log-probs of a preference batch built by `SharedPromptCollator`."""
    return PairLogps.from_blocks(completion_token_logps(model, batch))


def group_logps(model, batch: dict, temperature: float = 1.0) -> GroupLogps:
    """Token log-probs of a group batch (`SharedPromptCollator` with `group_completion_keys(G)`): one forward, one
    prompt copy per row, G completion blocks."""
    return GroupLogps.from_blocks(completion_token_logps(model, batch, batch_completion_keys(batch), temperature))


def batch_completion_keys(batch: dict) -> tuple[str, ...]:
    """The completion keys of a collated batch, in block order (recorded by `SharedPromptCollator`)."""
    return tuple(batch["completion_keys"])


@torch.no_grad()
def score_completions(model, prompts: list[list[int]], completions: list[list[int]], *, batch_size: int = 64,
                      temperature: float = 1.0) -> list[torch.Tensor]:
    """Per-token log-probs (fp32, on CPU) of `completions[i]` after `prompts[i]` under `model`, one tensor per pair.

    Uses the shared-prompt layout with a single completion block, so it is the exact computation the trainer does.
    """
    collate = SharedPromptCollator(_pad_id(model), completion_keys=("completion_input_ids",))
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for start in range(0, len(prompts), batch_size):
        examples = [{"prompt_input_ids": p, "completion_input_ids": c}
                    for p, c in zip(prompts[start:start + batch_size], completions[start:start + batch_size])]
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(examples).items()}
        [(logps, mask)] = completion_token_logps(model, batch, ("completion_input_ids",), temperature)
        out.extend(row[m].cpu() for row, m in zip(logps, mask))
    return out


def _pad_id(model) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)
