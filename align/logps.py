"""Per-token log-probabilities of preference pairs: the tensors that cross every seam.

`PairLogps` is what the policy forward and every reference kind return, and what every objective consumes.
Log-probs are fp32 whatever the model's dtype (METHODS.md §0).
"""

from __future__ import annotations

import contextlib
import math
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
# computed twice in the policy forward and backward and twice again in the reference forward, and every row is
# padded to the longest. We instead write each example ONCE as one segment, [prompt | completion 0 | completion 1 …],
# and pack segments into rows (first-fit decreasing):
#
#   row 0:  [ prompt_3 | chosen_3 | rejected_3 | prompt_0 | chosen_0 | rejected_0 | pad ]
#   row 1:  [ prompt_1 | chosen_1 | rejected_1 | prompt_2 | chosen_2 | rejected_2 | pad pad pad ]
#
# (Rows may be wider than the longest segment when that places fewer tokens: `_pack_rows`.)
# A 4D attention mask keeps segments and completions apart: a query may attend to an earlier (or the same) key of
# its own example that is a prompt token or lies in its own completion. Position ids restart at len(prompt) for
# every completion, so each completion sees exactly the positions it would see alone. Logits are computed only at
# the positions that predict a completion token (a pre-hook on the output embedding gathers those hidden states),
# so prompt tokens, padding and the other completions cost no vocabulary projection. The model is called through
# its top-level forward, so DDP / DeepSpeed / PEFT wrappers behave as usual. With variable lengths this removes the
# padding of aligned blocks (measured in bench/dpo_vs_trl.py, workload `short`).
# ---------------------------------------------------------------------------------------------------------------

PAD_SEGMENT, PROMPT_SEGMENT = 0, 1  # completion k (0-based) has segment id k + 2

#: Attention implementations that accept an arbitrary 4D mask.
MASKABLE_ATTENTION = ("sdpa", "eager")


class SharedPromptCollator:
    """Packs examples `{"prompt_input_ids": [...], <completion key>: [...], ...}` into shared-prompt rows.

    Args:
        pad_token_id: id written into padding positions (never attended to, never scored).
        completion_keys: the example fields holding completions, in block order.
        pad_to_multiple_of: round the row width up to a multiple of this (helps tensor cores on GPU).

    Returns a batch dict for N examples packed into R rows of width W:
        input_ids `[R, W]` long, position_ids `[R, W]` long,
        segment_ids `[R, W]` long (0 pad, 1 prompt, k+2 completion k),
        example_ids `[R, W]` long (the example a token belongs to, -1 on padding),
        completion_keys: list[str], the completion keys in block order,
        block_widths: list[int], C_k = the longest completion of block k (at least 1),
        `{key}_mask` `[N, C_k]` bool: True on the real tokens of example n's completion k,
        target_index `[T]` long: flat position (row * W + column) of every completion token, block by block, example
            by example, in token order (the order of the True entries of the masks),
        source_index `[T]` long: flat position of the token that predicts it (the last prompt token for a
            completion's first token),
        block_tokens: list[int], how many of the T tokens each block has.
    """

    def __init__(self, pad_token_id: int, completion_keys=("chosen_input_ids", "rejected_input_ids"),
                 pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.completion_keys = tuple(completion_keys)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict]) -> dict:
        N = len(examples)
        prompts = [ex["prompt_input_ids"] for ex in examples]
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (its last position predicts the first "
                             "completion token)")
        blocks = [[ex[k] for ex in examples] for k in self.completion_keys]
        lengths = [len(p) + sum(len(block[n]) for block in blocks) for n, p in enumerate(prompts)]
        row_of, start_of, W = _pack_rows(lengths, self.pad_to_multiple_of)
        R = max(row_of) + 1
        input_ids = torch.full((R, W), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((R, W), dtype=torch.long)
        segment_ids = torch.zeros((R, W), dtype=torch.long)
        example_ids = torch.full((R, W), -1, dtype=torch.long)
        block_starts = []  # [n][k] column where example n's completion k starts
        for n, prompt in enumerate(prompts):
            r, col, p = row_of[n], start_of[n], len(prompt)
            input_ids[r, col:col + p] = torch.tensor(prompt, dtype=torch.long)
            position_ids[r, col:col + p] = torch.arange(p)
            segment_ids[r, col:col + p] = PROMPT_SEGMENT
            example_ids[r, col:col + lengths[n]] = n
            col += p
            starts = []
            for k, block in enumerate(blocks):
                c = len(block[n])
                input_ids[r, col:col + c] = torch.tensor(block[n], dtype=torch.long)
                position_ids[r, col:col + c] = torch.arange(p, p + c)
                segment_ids[r, col:col + c] = k + 2
                starts.append(col)
                col += c
            block_starts.append(starts)
        batch, targets, sources, block_tokens, widths = {}, [], [], [], []
        for k, (key, block) in enumerate(zip(self.completion_keys, blocks)):
            width = max(1, max(len(c) for c in block))
            mask = torch.zeros((N, width), dtype=torch.bool)
            count = 0
            for n, completion in enumerate(block):
                c = len(completion)
                mask[n, :c] = True
                first = row_of[n] * W + block_starts[n][k]
                last_prompt = row_of[n] * W + start_of[n] + len(prompts[n]) - 1
                targets.extend(range(first, first + c))
                sources.extend([last_prompt, *range(first, first + c - 1)][:c])
                count += c
            batch[key.removesuffix("_input_ids") + "_mask"] = mask
            block_tokens.append(count)
            widths.append(width)
        batch.update(input_ids=input_ids, position_ids=position_ids, segment_ids=segment_ids, example_ids=example_ids,
                     completion_keys=list(self.completion_keys), block_widths=widths, block_tokens=block_tokens,
                     target_index=torch.tensor(targets, dtype=torch.long),
                     source_index=torch.tensor(sources, dtype=torch.long))
        return batch


#: Row widths tried by the packer, as multiples of the longest segment. Wider rows hold more short segments and waste
#: less padding when lengths vary (responses of 8-48 words: 734 -> 684 placed tokens per batch of 8), but attention
#: over a row costs W^2 and equal lengths pack no better, so the packer keeps the width that places fewest tokens.
_ROW_WIDTH_FACTORS = (1.0, 1.25, 1.5, 1.75, 2.0)


def _pack_rows(lengths: list[int], multiple: int | None) -> tuple[list[int], list[int], int]:
    """First-fit decreasing packing of segments of `lengths` tokens into rows → (row of each segment, its start column,
    the row width W). Each width W in `_ROW_WIDTH_FACTORS` x the longest segment (rounded up to `multiple`) is tried
    and the one with the fewest placed tokens (rows x W) is kept, the narrowest on a tie. Deterministic."""
    best = None
    order = sorted(range(len(lengths)), key=lambda n: -lengths[n])
    for factor in _ROW_WIDTH_FACTORS:
        W = math.ceil(max(lengths) * factor)
        if multiple:
            W = -(-W // multiple) * multiple
        row_of, start_of, fill = [0] * len(lengths), [0] * len(lengths), []
        for n in order:
            r = next((r for r, used in enumerate(fill) if used + lengths[n] <= W), len(fill))
            if r == len(fill):
                fill.append(0)
            row_of[n], start_of[n] = r, fill[r]
            fill[r] += lengths[n]
        if best is None or len(fill) * W < best[0]:
            best = len(fill) * W, (row_of, start_of, W)
    return best[1]


def shared_prompt_attention_mask(segment_ids: torch.Tensor, example_ids: torch.Tensor) -> torch.Tensor:
    """`[R, 1, W, W]` bool mask, True where query i may attend key j (see the layout note above).

    Padding queries attend to themselves only, so no softmax row is empty (no NaN).
    """
    W = segment_ids.shape[1]
    q, k = segment_ids[:, :, None], segment_ids[:, None, :]
    causal = torch.ones(W, W, dtype=torch.bool, device=segment_ids.device).tril_()
    same_example = (example_ids[:, :, None] == example_ids[:, None, :]) & (example_ids[:, None, :] >= 0)
    allowed = causal & same_example & ((k == PROMPT_SEGMENT) | (k == q))
    allowed |= torch.eye(W, dtype=torch.bool, device=segment_ids.device)
    return allowed[:, None]


def packed_examples(batch: dict) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """The token ids of every example of a `SharedPromptCollator` batch, read back from its rows:
    N × `(prompt ids [p], [completion k ids [c_k] for each block k])` (on the batch's device)."""
    ids = batch["input_ids"].reshape(-1)
    segments, owners = batch["segment_ids"].reshape(-1), batch["example_ids"].reshape(-1)
    keys = batch_completion_keys(batch)
    masks = [batch[key.removesuffix("_input_ids") + "_mask"] for key in keys]
    completions, start = [], 0
    for mask, count in zip(masks, batch["block_tokens"]):
        tokens = ids[batch["target_index"][start:start + count]]
        completions.append(tokens.split(mask.sum(-1).tolist()))
        start += count
    return [(ids[(owners == n) & (segments == PROMPT_SEGMENT)], [block[n] for block in completions])
            for n in range(masks[0].shape[0])]


def _attention_implementation(model) -> str:
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "module"):
        config = model.module.config
    return getattr(config, "_attn_implementation", None) or "eager"


def _output_embeddings(model) -> torch.nn.Module | None:
    """The module that maps hidden states to logits, through DDP / DeepSpeed / PEFT wrappers; None if unknown."""
    while not hasattr(model, "get_output_embeddings") and hasattr(model, "module"):
        model = model.module
    get = getattr(model, "get_output_embeddings", None)
    return get() if get is not None else None


@contextlib.contextmanager
def _logits_only_at(model, index: torch.Tensor):
    """Within the block, the model's vocabulary projection sees only the hidden states at flat positions `index`
    `[T]` of its `[R, W, d]` input (as `[1, T, d]`): logits are computed for the T scored positions and nothing else.
    Yields a list that holds True once the projection ran this way (False: the model computed logits some other
    way, and the caller gathers from full `[R, W, V]` logits)."""
    head, fired = _output_embeddings(model), [False]

    def gather(module, args):
        hidden = args[0]
        fired[0] = True
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)[None], *args[1:])

    handle = head.register_forward_pre_hook(gather) if head is not None else None
    try:
        yield fired
    finally:
        if handle is not None:
            handle.remove()


def completion_token_logps(model, batch: dict, completion_keys=("chosen_input_ids", "rejected_input_ids"),
                           temperature: float = 1.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Runs one forward over a shared-prompt batch and returns, per completion block k, `(logps [N, C_k], mask [N, C_k])`.

    `logps` are fp32 log π(y_t | x, y_<t) at the block's tokens (0 where the mask is False). Logits are computed only
    at the T positions that predict a completion token; the log-softmax is done in fp32 chunks of tokens so the
    full-vocab fp32 copy never exists for all T at once.
    """
    segment_ids, input_ids = batch["segment_ids"], batch["input_ids"]
    allowed = shared_prompt_attention_mask(segment_ids, batch["example_ids"])
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
    source, target = batch["source_index"], batch["target_index"]
    with _logits_only_at(model, source) as gathered:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=batch["position_ids"],
                       use_cache=False).logits
    V = logits.shape[-1]
    # [1, T, V] -> [T, V] as a view (its backward is free, unlike indexing [0]); else gather from the full logits.
    logits = logits.view(-1, V) if gathered[0] else logits.reshape(-1, V).index_select(0, source)  # [T, V]
    labels = input_ids.reshape(-1)[target]  # [T]
    parts = []
    # `split` (not indexing): its backward is a single cat. Chunks bound the fp32 copy of half-precision logits.
    for chunk, chunk_labels in zip(logits.split(_LOGPS_TOKENS_PER_CHUNK), labels.split(_LOGPS_TOKENS_PER_CHUNK)):
        chunk = chunk.float()
        if temperature != 1.0:
            chunk = chunk / temperature
        parts.append(chunk.gather(1, chunk_labels[:, None])[:, 0] - torch.logsumexp(chunk, dim=-1))
    token_logps = torch.cat(parts) if parts else logits.new_zeros(0, dtype=torch.float32)  # [T]
    out, start = [], 0
    for key, count in zip(completion_keys, batch["block_tokens"]):
        mask = batch[key.removesuffix("_input_ids") + "_mask"]
        logps = token_logps.new_zeros(mask.shape).masked_scatter(mask, token_logps[start:start + count])
        out.append((logps, mask))
        start += count
    return out


_LOGPS_TOKENS_PER_CHUNK = 1024


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
