"""align.logps: the shared-prompt packing, its attention mask, and exactness of the packed log-probs.

The packed forward (each pair one segment, prompt once, then the chosen and the rejected completion; several
segments per row; a custom 4D mask keeps them apart) must give the same per-token log-probs and gradients as running `prompt + completion` through the model alone.
A freshly initialised tiny Llama has near-uniform outputs (weights of std 0.02), which would let a wrong mask pass
unnoticed, so these tests scale its matrices up (`sharp_model`) and check that a wrong mask *is* detected.
"""

import types

import pytest
import torch
from transformers import AutoModelForCausalLM

from align.logps import (
    PAD_SEGMENT,
    PROMPT_SEGMENT,
    PairLogps,
    SharedPromptCollator,
    completion_token_logps,
    group_completion_keys,
    group_logps,
    packed_examples,
    pair_logps,
    score_completions,
    shared_prompt_attention_mask,
)

TOL = 1e-5
IMPLS = ["sdpa", "eager"]

# (prompt, chosen, rejected) lengths: every prompt length and both completion orders differ across examples; the
# last two are short enough to share a row with another example (segments of 10, 14, 9, 15, 3 and 5 tokens: rows of
# 19 place fewer tokens than rows of 15, [15 3] [14 5] [10 9]).
LENGTHS = [(3, 5, 2), (7, 1, 6), (1, 4, 4), (5, 3, 7), (1, 1, 1), (2, 2, 1)]




def random_ids(n, generator, vocab=70):
    return torch.randint(4, vocab, (n,), generator=generator).tolist()  # ids >= 4: no pad/unk/bos/eos


@pytest.fixture(scope="module")
def examples():
    g = torch.Generator().manual_seed(0)
    return [{"prompt_input_ids": random_ids(p, g), "chosen_input_ids": random_ids(c, g),
             "rejected_input_ids": random_ids(r, g)} for p, c, r in LENGTHS]


def load_sharp(model_dir, impl="sdpa", dtype=torch.float32, scale=6.0):
    """The tiny model with every weight matrix scaled up, so log-probs depend strongly on the context."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=impl)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model.to(dtype).eval()


@pytest.fixture(scope="module", params=IMPLS)
def any_model(request, tiny_model_dir):
    """The sharp model under each attention implementation that takes align's 4D mask."""
    return load_sharp(tiny_model_dir, request.param)


@pytest.fixture(scope="module")
def sharp_model(tiny_model_dir):
    return load_sharp(tiny_model_dir, "sdpa")


def plain_logps(model, prompt, completion, temperature=1.0):
    """log π(completion | prompt) per token from a plain forward of `prompt + completion` alone."""
    logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].float() / temperature
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return logits.log_softmax(-1)[positions, torch.tensor(completion)]


def packed_rows(logps: PairLogps):
    """Per-pair 1-D tensors of the real chosen / rejected tokens."""
    return ([row[m] for row, m in zip(logps.chosen, logps.chosen_mask)],
            [row[m] for row, m in zip(logps.rejected, logps.rejected_mask)])


# --------------------------------------------------------------------------------------------- collator layout


def test_collator_layout():
    examples = [
        {"prompt_input_ids": [11, 12, 13], "chosen_input_ids": [31, 32], "rejected_input_ids": [51]},
        {"prompt_input_ids": [21], "chosen_input_ids": [41, 42, 43], "rejected_input_ids": [61, 62]},
        {"prompt_input_ids": [71], "chosen_input_ids": [81], "rejected_input_ids": [91]},
    ]
    batch = SharedPromptCollator(pad_token_id=0)(examples)
    # Segments of 6, 6 and 3 tokens; rows as wide as the longest (6). First-fit decreasing: example 0 fills row 0,
    # example 1 fills row 1, example 2 opens row 2.
    #                  |- prompt -| chosen | rej |
    expected_ids = [[11, 12, 13, 31, 32, 51],
                    [21, 41, 42, 43, 61, 62],
                    [71, 81, 91, 0, 0, 0]]
    expected_pos = [[0, 1, 2, 3, 4, 3],
                    [0, 1, 2, 3, 1, 2],
                    [0, 1, 1, 0, 0, 0]]  # every completion restarts at len(prompt)
    expected_seg = [[1, 1, 1, 2, 2, 3],
                    [1, 2, 2, 2, 3, 3],
                    [1, 2, 3, 0, 0, 0]]
    assert batch["input_ids"].tolist() == expected_ids
    assert batch["position_ids"].tolist() == expected_pos
    assert batch["segment_ids"].tolist() == expected_seg
    assert batch["example_ids"].tolist() == [[0] * 6, [1] * 6, [2, 2, 2, -1, -1, -1]]
    assert batch["block_widths"] == [3, 2] and batch["block_tokens"] == [6, 4]
    assert batch["chosen_mask"].tolist() == [[True, True, False], [True, True, True], [True, False, False]]
    assert batch["rejected_mask"].tolist() == [[True, False], [True, True], [True, False]]
    # Completion tokens block by block, example by example; each predicted by the token before it in its own
    # completion, the first by the last prompt token.
    assert batch["target_index"].tolist() == [3, 4, 7, 8, 9, 13, 5, 10, 11, 14]
    assert batch["source_index"].tolist() == [2, 3, 6, 7, 8, 12, 2, 6, 10, 12]
    for key in ("input_ids", "position_ids", "segment_ids", "example_ids", "target_index", "source_index"):
        assert batch[key].dtype == torch.long
    assert batch["chosen_mask"].dtype == torch.bool


def test_collator_packs_short_examples_into_shared_rows():
    """Segments that fit together share a row (first-fit decreasing), so variable lengths cost little padding; a
    wider row is taken only when it places fewer tokens (here 3 x 20 = 60: rows of 25 would need 3, of 30 two)."""
    lengths = [(2, 9, 9), (2, 1, 1), (2, 2, 2), (3, 4, 3), (1, 1, 1), (2, 3, 3)]  # 20, 4, 6, 10, 3, 8 tokens
    g = torch.Generator().manual_seed(3)
    examples = [{"prompt_input_ids": random_ids(p, g), "chosen_input_ids": random_ids(c, g),
                 "rejected_input_ids": random_ids(r, g)} for p, c, r in lengths]
    batch = SharedPromptCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].shape == (3, 20)  # rows: [20], [10 8], [6 4 3] - 51 tokens in 60 places, not 6 x 20
    assert (batch["example_ids"] >= 0).sum() == 51
    assert [sorted(set(row.tolist()) - {-1}) for row in batch["example_ids"]] == [[0], [3, 5], [1, 2, 4]]
    for n, (prompt, completions) in enumerate(packed_examples(batch)):
        assert prompt.tolist() == examples[n]["prompt_input_ids"]
        assert [c.tolist() for c in completions] == [examples[n]["chosen_input_ids"], examples[n]["rejected_input_ids"]]


def test_collator_invariants_on_ragged_batch(examples):
    batch = SharedPromptCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].shape == (3, 19)
    assert batch["block_widths"] == [max(c for _, c, _ in LENGTHS), max(r for _, _, r in LENGTHS)]
    ids, pos, seg, owner = (batch[k].reshape(-1) for k in ("input_ids", "position_ids", "segment_ids", "example_ids"))
    for n, ex in enumerate(examples):
        p, c, r = (ex[k] for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"))
        mine = (owner == n).nonzero()[:, 0]
        # One contiguous segment per example: prompt, chosen, rejected.
        assert mine.tolist() == list(range(int(mine[0]), int(mine[0]) + len(p) + len(c) + len(r)))
        assert ids[mine].tolist() == p + c + r
        assert pos[mine].tolist() == list(range(len(p))) + list(range(len(p), len(p) + len(c))) + list(
            range(len(p), len(p) + len(r)))
        assert seg[mine].tolist() == [PROMPT_SEGMENT] * len(p) + [2] * len(c) + [3] * len(r)
        assert batch["chosen_mask"][n].tolist() == [t < len(c) for t in range(batch["block_widths"][0])]
        assert batch["rejected_mask"][n].tolist() == [t < len(r) for t in range(batch["block_widths"][1])]
    assert (ids[owner == -1] == 0).all() and (seg[owner == -1] == PAD_SEGMENT).all()


def test_collator_pad_to_multiple_of(examples):
    plain = SharedPromptCollator(pad_token_id=0)(examples)
    padded = SharedPromptCollator(pad_token_id=0, pad_to_multiple_of=8)(examples)
    assert plain["input_ids"].shape[1] == 19 and padded["input_ids"].shape[1] == 16  # rounded up: 4 x 16 < 3 x 24
    assert padded["block_widths"] == plain["block_widths"] == [5, 7]
    assert padded["chosen_mask"].equal(plain["chosen_mask"]) and padded["rejected_mask"].equal(plain["rejected_mask"])


def test_collator_custom_keys_and_empty_blocks():
    collate = SharedPromptCollator(pad_token_id=9, completion_keys=("completion_input_ids",))
    batch = collate([{"prompt_input_ids": [5], "completion_input_ids": []},
                     {"prompt_input_ids": [6, 7], "completion_input_ids": []}])
    assert batch["block_widths"] == [1]  # an all-empty block still gets one (masked) column
    assert batch["completion_mask"].tolist() == [[False], [False]]
    assert batch["input_ids"].tolist() == [[6, 7, 5]] and batch["target_index"].numel() == 0  # one row of 3, not 2 of 2


def test_collator_rejects_empty_prompt():
    collate = SharedPromptCollator(pad_token_id=0)
    with pytest.raises(ValueError, match="at least one token"):
        collate([{"prompt_input_ids": [4, 5], "chosen_input_ids": [6], "rejected_input_ids": [7]},
                 {"prompt_input_ids": [], "chosen_input_ids": [6], "rejected_input_ids": [7]}])


# --------------------------------------------------------------------------------------------- attention mask


def test_attention_mask_rule(examples):
    batch = SharedPromptCollator(pad_token_id=0)(examples)
    seg, owner = batch["segment_ids"], batch["example_ids"]
    assert (owner.max(-1).values != owner.masked_fill(owner < 0, 99).min(-1).values).any()  # a shared row exists
    allowed = shared_prompt_attention_mask(seg, owner)
    B, L = seg.shape
    assert allowed.shape == (B, 1, L, L) and allowed.dtype == torch.bool
    allowed = allowed[:, 0]
    for b in range(B):
        s, o = seg[b].tolist(), owner[b].tolist()
        for q in range(L):
            for k in range(L):
                want = q == k or (k <= q and s[k] != PAD_SEGMENT and o[k] == o[q]
                                  and (s[k] == PROMPT_SEGMENT or s[k] == s[q]))
                assert bool(allowed[b, q, k]) == want, (b, q, k)
    q_seg, k_seg = seg[:, :, None].expand(B, L, L), seg[:, None, :].expand(B, L, L)
    other = owner[:, :, None] != owner[:, None, :]
    # No example sees another; rejected (segment 3) never sees chosen (segment 2), nor chosen rejected.
    assert not allowed[other].any()
    assert not allowed[(q_seg == 3) & (k_seg == 2)].any()
    assert not allowed[(q_seg == 2) & (k_seg == 3)].any()
    # Nothing attends padding, except each pad position itself (so no softmax row is empty).
    eye = torch.eye(L, dtype=torch.bool).expand(B, L, L)
    assert not allowed[(k_seg == PAD_SEGMENT) & ~eye].any()
    assert allowed[eye].all() and allowed.any(-1).all()
    # Causal, and completions see their whole prompt.
    assert not allowed.triu(1).any()
    assert allowed[(q_seg >= 2) & (k_seg == PROMPT_SEGMENT) & ~other].all()


def test_unsupported_attention_implementation_is_rejected(examples):
    batch = SharedPromptCollator(pad_token_id=0)(examples)
    model = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(ValueError, match="flash_attention_2"):
        completion_token_logps(model, batch)


# --------------------------------------------------------------------------------------------- exactness


def test_pair_logps_equals_separate_forwards(any_model, examples):
    batch = SharedPromptCollator(pad_token_id=0)(examples)
    with torch.no_grad():
        logps = pair_logps(any_model, batch)
        chosen, rejected = packed_rows(logps)
        for i, ex in enumerate(examples):
            want_c = plain_logps(any_model, ex["prompt_input_ids"], ex["chosen_input_ids"])
            want_r = plain_logps(any_model, ex["prompt_input_ids"], ex["rejected_input_ids"])
            torch.testing.assert_close(chosen[i], want_c, rtol=0, atol=TOL)
            torch.testing.assert_close(rejected[i], want_r, rtol=0, atol=TOL)
            torch.testing.assert_close(logps.chosen_sum()[i], want_c.sum(), rtol=0, atol=TOL)
            torch.testing.assert_close(logps.rejected_sum()[i], want_r.sum(), rtol=0, atol=TOL)
    assert logps.chosen_mask.equal(batch["chosen_mask"]) and logps.rejected_mask.equal(batch["rejected_mask"])
    assert (logps.chosen[~logps.chosen_mask] == 0).all() and (logps.rejected[~logps.rejected_mask] == 0).all()
    assert logps.chosen.dtype == logps.rejected.dtype == torch.float32
    # The values span a wide range, so a wrong context would show (see the test below).
    assert logps.chosen_sum().min() < -10


@pytest.mark.parametrize("G", [1, 3, 5])
def test_group_logps_equals_separate_forwards(any_model, G):
    """G completions per prompt (the on-policy layout): each block scores as if alone after its prompt; a pair is
    the G = 2 case, and `GroupLogps` pads blocks of different widths with masked zeros."""
    g = torch.Generator().manual_seed(G)
    keys = group_completion_keys(G)
    examples = [{"prompt_input_ids": random_ids(p, g), **{k: random_ids(1 + (3 * i + j) % 6, g)
                                                          for j, k in enumerate(keys)}}
                for i, p in enumerate((2, 6, 4))]
    batch = SharedPromptCollator(0, completion_keys=keys)(examples)
    with torch.no_grad():
        got = group_logps(any_model, batch)
        assert got.logps.shape[:2] == got.mask.shape[:2] == (3, G)
        for i, ex in enumerate(examples):
            for j, k in enumerate(keys):
                want = plain_logps(any_model, ex["prompt_input_ids"], ex[k])
                n = len(ex[k])
                assert got.lengths()[i, j] == n and not got.mask[i, j, n:].any()
                torch.testing.assert_close(got.logps[i, j, :n], want, rtol=0, atol=TOL)
                torch.testing.assert_close(got.sums()[i, j], want.sum(), rtol=0, atol=TOL)
    assert (got.logps[~got.mask] == 0).all()


def test_wrong_mask_would_be_detected(any_model, examples):
    """Power check: letting the rejected block see the chosen one changes its log-probs by far more than TOL."""
    batch = SharedPromptCollator(pad_token_id=0)(examples)
    leaky = dict(batch, segment_ids=batch["segment_ids"].masked_fill(batch["segment_ids"] == 3, 2))
    with torch.no_grad():
        good, bad = pair_logps(any_model, batch), pair_logps(any_model, leaky)
    assert (good.rejected - bad.rejected).abs().max() > 0.1
    torch.testing.assert_close(good.chosen, bad.chosen, rtol=0, atol=TOL)  # chosen comes first: unaffected


def test_cross_example_attention_would_be_detected(any_model, examples):
    """Power check: letting the second example of a shared row see the first changes its log-probs."""
    batch = SharedPromptCollator(pad_token_id=0)(examples)
    owners = batch["example_ids"]
    shared = [r for r in range(len(owners)) if len(set(owners[r].tolist()) - {-1}) > 1]
    assert shared
    leaky = batch["example_ids"].clone()
    for r in shared:
        leaky[r][leaky[r] >= 0] = leaky[r][0]
    with torch.no_grad():
        good, bad = pair_logps(any_model, batch), pair_logps(any_model, dict(batch, example_ids=leaky))
    second = [int(owners[r][owners[r] >= 0][-1]) for r in shared]
    assert (good.chosen[second] - bad.chosen[second]).abs().max() > 0.1


def test_logits_are_computed_only_at_scored_positions(sharp_model, examples):
    """The vocabulary projection sees the T positions that predict a completion token, not the R x W grid; a model
    without `get_output_embeddings` gets the same log-probs from its full logits."""
    batch = SharedPromptCollator(pad_token_id=0)(examples)
    shapes = []
    handle = sharp_model.get_output_embeddings().register_forward_hook(lambda m, a, out: shapes.append(out.shape))
    try:
        with torch.no_grad():
            fast = pair_logps(sharp_model, batch)
    finally:
        handle.remove()
    T = sum(c + r for _, c, r in LENGTHS)
    assert shapes == [(1, T, sharp_model.config.vocab_size)]

    class NoHead(torch.nn.Module):  # a wrapper that hides the output embedding: logits come back for every position
        def __init__(self, model):
            super().__init__()
            self.inner, self.config = model, model.config

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    with torch.no_grad():
        full = pair_logps(NoHead(sharp_model), batch)
    torch.testing.assert_close(full.chosen, fast.chosen, rtol=0, atol=TOL)
    torch.testing.assert_close(full.rejected, fast.rejected, rtol=0, atol=TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_pair_logps_gradients_equal_separate_forwards(tiny_model_dir, examples, impl):
    model = load_sharp(tiny_model_dir, impl)
    params = [p for p in model.parameters()]
    batch = SharedPromptCollator(pad_token_id=0)(examples)
    logps = pair_logps(model, batch)
    # Different weights for chosen and rejected, so swapped blocks would not cancel out.
    packed_grads = torch.autograd.grad((logps.chosen_sum() - 0.5 * logps.rejected_sum()).sum(), params)
    total = 0
    for ex in examples:
        total = total + plain_logps(model, ex["prompt_input_ids"], ex["chosen_input_ids"]).sum()
        total = total - 0.5 * plain_logps(model, ex["prompt_input_ids"], ex["rejected_input_ids"]).sum()
    plain_grads = torch.autograd.grad(total, params)
    for (name, _), got, want in zip(model.named_parameters(), packed_grads, plain_grads):
        assert want.abs().max() > 0, name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item(), msg=name)


def test_three_completion_blocks(sharp_model, examples):
    keys = ("chosen_input_ids", "rejected_input_ids", "third_input_ids")
    g = torch.Generator().manual_seed(1)
    rows = [dict(ex, third_input_ids=random_ids(n, g)) for ex, n in zip(examples, (2, 6, 1, 3))]
    batch = SharedPromptCollator(pad_token_id=0, completion_keys=keys)(rows)
    with torch.no_grad():
        out = completion_token_logps(sharp_model, batch, keys)
        for k, (logps, mask) in zip(keys, out):
            for i, ex in enumerate(rows):
                want = plain_logps(sharp_model, ex["prompt_input_ids"], ex[k])
                torch.testing.assert_close(logps[i][mask[i]], want, rtol=0, atol=TOL)


# --------------------------------------------------------------------------------------------- masking invariance


@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
def test_pad_token_ids_do_not_change_logps(sharp_model, examples, pad_to_multiple_of):
    """METHODS §1 test 4: padding is never attended to or scored, whatever its token id."""
    reference = None
    with torch.no_grad():
        for pad in (0, 1, 17, 69):
            batch = SharedPromptCollator(pad_token_id=pad, pad_to_multiple_of=pad_to_multiple_of)(examples)
            chosen, rejected = packed_rows(pair_logps(sharp_model, batch))
            if reference is None:
                reference = chosen, rejected
                continue
            for got, want in zip(chosen + rejected, reference[0] + reference[1]):
                torch.testing.assert_close(got, want, rtol=0, atol=TOL)


def test_extra_padding_does_not_change_logps(sharp_model, examples):
    with torch.no_grad():
        a = packed_rows(pair_logps(sharp_model, SharedPromptCollator(0)(examples)))
        b = packed_rows(pair_logps(sharp_model, SharedPromptCollator(0, pad_to_multiple_of=16)(examples)))
        # A batch of one pair has no padding at all.
        c = [packed_rows(pair_logps(sharp_model, SharedPromptCollator(0)([ex]))) for ex in examples]
    for i in range(len(examples)):
        for side in (0, 1):
            torch.testing.assert_close(b[side][i], a[side][i], rtol=0, atol=TOL)
            torch.testing.assert_close(c[i][side][0], a[side][i], rtol=0, atol=TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_model_gives_fp32_logps(tiny_model_dir, examples, impl):
    model32 = load_sharp(tiny_model_dir, impl)
    model16 = load_sharp(tiny_model_dir, impl, dtype=torch.bfloat16)
    batch = SharedPromptCollator(pad_token_id=0)(examples)
    with torch.no_grad():
        got = pair_logps(model16, batch)
        want = pair_logps(model32, batch)
    assert got.chosen.dtype == got.rejected.dtype == torch.float32
    assert torch.isfinite(got.chosen).all() and torch.isfinite(got.rejected).all()
    assert (got.chosen[~got.chosen_mask] == 0).all()
    # bf16 weights change the values a little, not the picture.
    torch.testing.assert_close(got.chosen, want.chosen, rtol=0.05, atol=0.3)
    torch.testing.assert_close(got.rejected, want.rejected, rtol=0.05, atol=0.3)
    # ... and the packed bf16 forward still equals the separate bf16 forward at bf16 resolution.
    with torch.no_grad():
        ex = examples[0]
        alone = plain_logps(model16, ex["prompt_input_ids"], ex["chosen_input_ids"])
    torch.testing.assert_close(got.chosen[0][got.chosen_mask[0]], alone, rtol=0.02, atol=0.1)


# --------------------------------------------------------------------------------------------- score_completions


def test_score_completions_equals_separate_forwards(sharp_model, examples):
    prompts = [ex["prompt_input_ids"] for ex in examples]
    completions = [ex["chosen_input_ids"] for ex in examples] + [ex["rejected_input_ids"] for ex in examples]
    prompts = prompts + prompts
    scored = score_completions(sharp_model, prompts, completions)
    chunked = score_completions(sharp_model, prompts, completions, batch_size=3)  # batches of 3, 3, 2
    assert len(scored) == len(chunked) == len(completions)
    with torch.no_grad():
        for got, got_chunked, p, c in zip(scored, chunked, prompts, completions):
            assert got.shape == (len(c),) and got.dtype == torch.float32 and got.device.type == "cpu"
            assert not got.requires_grad
            want = plain_logps(sharp_model, p, c)
            torch.testing.assert_close(got, want, rtol=0, atol=TOL)
            torch.testing.assert_close(got_chunked, want, rtol=0, atol=TOL)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_score_completions_temperature_scales_logits(sharp_model, examples, temperature):
    prompts = [ex["prompt_input_ids"] for ex in examples]
    completions = [ex["chosen_input_ids"] for ex in examples]
    scored = score_completions(sharp_model, prompts, completions, temperature=temperature)
    untempered = score_completions(sharp_model, prompts, completions)
    with torch.no_grad():
        for got, p, c in zip(scored, prompts, completions):
            torch.testing.assert_close(got, plain_logps(sharp_model, p, c, temperature), rtol=0, atol=TOL)
    # the temperature really changed something
    assert max(float((got - base).abs().max()) for got, base in zip(scored, untempered)) > 1e-2
