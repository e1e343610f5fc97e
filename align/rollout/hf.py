"""Rollouts with transformers `generate` (batched, KV cache): the CPU default backend."""

from __future__ import annotations

import torch

from align.logps import score_completions
from align.rollout.base import Completion, RolloutBackend, SamplingParams, prompt_token_ids


class HFRollout(RolloutBackend):
    """Samples with `model.generate` in left-padded batches of `batch_size` sequences.

    Prompts (text, message lists or token ids) are tokenized by the data pipeline's own prompt tokenization
    (`prompt_token_ids`), so sampled completions train on exactly the contexts they were sampled from. Per-token
    log-probs are recomputed with one teacher-forced pass instead of keeping generate's `[batch, T, vocab]` scores.
    """

    samples_live_policy = True

    def __init__(self, model, tokenizer, *, batch_size: int = 64, progress: bool = False, score: bool = True):
        """`score=False` skips the teacher-forced pass (`Completion.logps` is None): an on-policy trainer whose
        sampler is the policy itself, untempered, gets the same numbers from its own forward."""
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
        jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]
        eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        device = next(model.parameters()).device
        gen_kwargs = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                          do_sample=sampling.temperature > 0, use_cache=True)
        if sampling.temperature > 0:
            gen_kwargs.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        was_training = model.training
        model.eval()  # for sampling and scoring alike: dropout would make the log-probs noisy
        try:
            generated = self._generate_ids(prompt_ids, jobs, gen_kwargs, sampling.seed, pad, eos, device)
            logps = [None] * len(generated)
            if self.score:
                logps = score_completions(model, [prompt_ids[i] for i, _ in jobs], generated,
                                          temperature=sampling.temperature or 1.0, batch_size=self.batch_size)
        finally:
            model.train(was_training)
        result: list[list[Completion]] = [[] for _ in prompts]
        for (i, _), ids, lp in zip(jobs, generated, logps):
            result[i].append(Completion(prompt_index=i, token_ids=ids, logps=lp, finished=bool(ids) and ids[-1] == eos,
                                        text=tok.decode(ids, skip_special_tokens=True)))
        return result

    def _generate_ids(self, prompt_ids, jobs, gen_kwargs, seed, pad, eos, device) -> list[list[int]]:
        """Generated ids for each (prompt, sample) job, cut after the first EOS, in left-padded batches."""
        generated: list[list[int]] = []
        steps = range(0, len(jobs), self.batch_size)
        if self.progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="sampling", unit="batch")
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            for start in steps:
                chunk = [prompt_ids[i] for i, _ in jobs[start:start + self.batch_size]]
                width = max(map(len, chunk))
                input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
                attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
                out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
                for row in out[:, width:].tolist():
                    cut = row.index(eos) + 1 if eos in row else len(row)
                    generated.append(row[:cut])
        return generated
