"""Rollouts with the transformers model itself (batched, KV cache): the default backend, on CPU and GPU."""

from __future__ import annotations

import math

import torch

from align.rollout.base import Completion, RolloutBackend, SamplingParams, prompt_token_ids


class HFRollout(RolloutBackend):
    """Samples in left-padded batches of `batch_size` sequences (`sample_batch`: the model's forward with its KV
    cache, what `generate` computes, keeping each sampled token's log-prob as it goes).

    Prompts (text, message lists or token ids) are tokenized by the data pipeline's own prompt tokenization
    (`prompt_token_ids`), so sampled completions train on exactly the contexts they were sampled from.
    """

    samples_live_policy = True

    def __init__(self, model, tokenizer, *, batch_size: int = 64, progress: bool = False, score: bool = True):
        """`score=False` returns `Completion.logps` as None: an on-policy trainer whose sampler is the policy itself,
        untempered, takes them from its own training forward."""
        self.model, self.tokenizer, self.batch_size, self.progress = model, tokenizer, batch_size, progress
        self.score = score

    def load_weights(self, model) -> None:
        # generate runs on the very module being trained: pointing at it is the whole weight sync.
        self.model = model

    @torch.no_grad()
    def generate(self, prompts: list, n: int = 1, sampling: SamplingParams | None = None
                 ) -> list[list[Completion]]:
        sampling = sampling or SamplingParams()
        tok, model = self.tokenizer, self.model
        prompt_ids = prompt_token_ids(tok, prompts)
        jobs = [i for i in range(len(prompts)) for _ in range(n)]
        eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()  # dropout would make the samples and their log-probs noisy
        try:
            generated = self._sample_jobs([prompt_ids[i] for i in jobs], sampling, pad, eos, device)
        finally:
            model.train(was_training)
        result: list[list[Completion]] = [[] for _ in prompts]
        for i, (ids, lp) in zip(jobs, generated):
            result[i].append(Completion(prompt_index=i, token_ids=ids, logps=lp if self.score else None,
                                        finished=bool(ids) and ids[-1] == eos,
                                        text=tok.decode(ids, skip_special_tokens=True)))
        return result

    def _sample_jobs(self, prompts: list[list[int]], sampling: SamplingParams, pad: int, eos: int, device
                     ) -> list[tuple[list[int], torch.Tensor]]:
        """(ids cut after the first EOS, their log-probs) for each prompt, in left-padded batches of `batch_size`."""
        out: list[tuple[list[int], torch.Tensor]] = []
        steps = range(0, len(prompts), self.batch_size)
        if self.progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="sampling", unit="batch")
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            for start in steps:
                out.extend(sample_batch(self.model, prompts[start:start + self.batch_size], sampling, pad, eos,
                                        device))
        return out


def _cache_argument(model) -> str:
    """The name the model's forward takes its KV cache under (`cache` from transformers 5.2x, `past_key_values`
    before), looked up on the innermost model so PEFT's `**kwargs` wrapper does not hide it."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(inner).forward).parameters else "past_key_values"


def _processed_logits(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """`[B, V]` fp32 logits → the logits sampled from: tempered, then top-k and top-p masked to −inf (as
    transformers' TopK/TopP warpers do: top-p keeps the smallest set of most likely tokens whose mass reaches
    top_p, at least one)."""
    z = logits / sampling.temperature
    if sampling.top_k > 0 and sampling.top_k < z.shape[-1]:
        kth = torch.topk(z, sampling.top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, -math.inf)
    if sampling.top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        mass_before = sorted_z.softmax(-1).cumsum(-1) - sorted_z.softmax(-1)
        drop = mass_before >= sampling.top_p
        drop[:, 0] = False
        z = z.masked_fill(drop.scatter(1, order, drop), -math.inf)
    return z


def sample_batch(model, prompts: list[list[int]], sampling: SamplingParams, pad: int, eos: int, device
                 ) -> list[tuple[list[int], torch.Tensor]]:
    """Ancestral sampling of one left-padded batch with the model's own forward and KV cache: a prefill, then one
    forward per new token until every row has emitted EOS or `max_new_tokens` are out.

    It is what `model.generate(do_sample=...)` computes (same processed logits, same position ids and attention
    mask for left padding), without generate's per-token machinery, which dominates for small models (about 1.3-1.6x
    faster for the toy model on CPU); and it keeps the log-prob of each sampled token as it goes (temperature
    applied, top-k/top-p not renormalised; untempered when greedy), so no second, teacher-forced pass is needed.
    Draws come from torch's current RNG (the caller seeds and forks it).
    """
    B, width = len(prompts), max(map(len, prompts))
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache_key = _cache_argument(model)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    cache = getattr(out, cache_key)  # the output names the cache as the forward does
    logits, next_position = out.logits[:, -1].float(), positions[:, -1] + 1
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, logps = [], []
    for _ in range(sampling.max_new_tokens):
        if sampling.temperature > 0:
            z = _processed_logits(logits, sampling)
            token = torch.multinomial(z.softmax(-1), 1).squeeze(1)
            logp = (logits / sampling.temperature).log_softmax(-1)
        else:
            token = logits.argmax(-1)
            logp = logits.log_softmax(-1)
        token = token.masked_fill(done, pad)
        tokens.append(token)
        logps.append(logp.gather(1, token[:, None]).squeeze(1))
        done |= token == eos
        if bool(done.all()):
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_position[:, None],
                    use_cache=True, **{cache_key: cache})
        logits, next_position = out.logits[:, -1].float(), next_position + 1
    ids = torch.stack(tokens, 1).tolist() if tokens else [[] for _ in range(B)]
    token_logps = torch.stack(logps, 1).cpu() if logps else torch.zeros(B, 0)
    result = []
    for row, lp in zip(ids, token_logps):
        cut = row.index(eos) + 1 if eos in row else len(row)
        result.append((row[:cut], lp[:cut].clone()))
    return result
