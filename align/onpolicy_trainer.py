"""`OnPolicyTrainer`: f-DPG (METHODS §5) as a thin layer over `transformers.Trainer` (through `AlignTrainer`).

One optimizer (micro-)step, top to bottom (DESIGN.md, "On-policy step"):

1. `get_batch_samples` → `_rollout`: the step's micro-batches are P prompts each. The rollout backend (`hf` samples
   from the live policy; `vllm` is synced with it every `sync_every` optimizer steps) samples G completions per
   prompt for all of them in one call (for `steps_per_generation` steps at once), as token ids with the sampler's
   log-probs, and the reward function scores them (`align.rewards`: per member and aggregated).
   `_prepare_inputs`: when a micro-batch is trained on, the reference manager gives log a(y|x) in one shared-prompt
   forward (`Reference.group_logps`) and the target gives log P(y|x) (`align.targets`).
2. `compute_loss`: one policy forward over the same batch (prompt once, G completion blocks) gives log π_θ(y|x); the
   log Z table is updated with every process's samples (so it is the same on all ranks), then `FDPG.loss`.
3. The Trainer runs backward and the optimizer step; the reference's `on_step_end` runs (TR-DPO).

Sampling is seeded per call from (run seed, process, call count), so a resumed run draws exactly what the
uninterrupted one drew; the call count, the log Z table, the baseline window and the target's fitted state are in
every checkpoint (`_process_state`). Completions are never decoded to be re-tokenized: the ids the sampler produced
are the ids trained on, after exactly the prompt ids it sampled from (`align.data.tokenize_prompts`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time

import torch

from align.logps import (
    GroupLogps,
    SharedPromptCollator,
    group_completion_keys,
    group_logps,
)
from align.rollout.base import SamplingParams
from align.rollout.config import GenerationConfig
from align.trainer import AlignTrainer

logger = logging.getLogger("align.onpolicy")


def prompt_key(ids: list[int]) -> str:
    """A prompt's key in the log Z table and the target's fitted state: a digest of its token ids."""
    return hashlib.blake2b(" ".join(map(str, ids)).encode(), digest_size=12).hexdigest()


class PromptDataset(torch.utils.data.Dataset):
    """Prompts as the trainer's dataset: `{"prompt": text, "prompt_input_ids": ids}` items."""

    def __init__(self, prompts: list, prompt_ids: list[list[int]]):
        self.prompts, self.prompt_ids = list(prompts), prompt_ids

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict:
        return {"prompt": self.prompts[index], "prompt_input_ids": self.prompt_ids[index]}


def collate_prompts(examples: list[dict]) -> dict:
    return {key: [ex[key] for ex in examples] for key in ("prompt", "prompt_input_ids")}


def distinct_2(sequences: list[list[int]]) -> float:
    """Distinct bigrams over all bigrams of the sequences (Li et al. 2016); 0 when there are none."""
    bigrams = [tuple(s[i:i + 2]) for s in sequences for i in range(len(s) - 1)]
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


class OnPolicyTrainer(AlignTrainer):
    """Trains a policy with f-DPG on its own samples.

    Args:
        model, args, processing_class: as `transformers.Trainer` (`args.per_device_train_batch_size` counts prompts).
        objective: `align.objectives.FDPG`.
        reference: an `align.references.Reference` (the prior a of the target).
        target: an `align.targets.Target`.
        reward: an `align.rewards.RewardFunction` (the optimised reward).
        rollout: an `align.rollout.RolloutBackend` sampling from the policy.
        generation: `GenerationConfig`.
        train_dataset: a `PromptDataset`.
        gold_reward: an optional `RewardFunction` that is logged (`gold_reward`) and never optimised.
        resume_with_changed_parameters: resume a checkpoint written with other objective, reference or target
            parameters (with a warning) instead of refusing it.
    """

    def __init__(self, *, model, args, objective, reference, target, reward, rollout, generation: GenerationConfig,
                 train_dataset, processing_class, gold_reward=None, callbacks=None,
                 resume_with_changed_parameters=False):
        super().__init__(model=model, args=args, objective=objective, reference=reference,
                         data_collator=collate_prompts, train_dataset=train_dataset, processing_class=processing_class,
                         callbacks=callbacks, resume_with_changed_parameters=resume_with_changed_parameters)
        self.target, self.reward, self.gold_reward = target, reward, gold_reward
        self.rollout, self.generation = rollout, generation
        self.completion_keys = group_completion_keys(generation.num_samples)
        self.collate_group = SharedPromptCollator(processing_class.pad_token_id, completion_keys=self.completion_keys)
        self._generate_calls = 0        # seeds each call's sampling: part of the checkpoint
        self._synced_at_step = None     # optimizer step whose weights the sampler holds (None: not yet synced)
        self._live_sampler = getattr(rollout, "samples_live_policy", False)
        self._pending: list[dict] = []  # rollouts of the current generation group not trained on yet

    # --- checkpoint state -------------------------------------------------------------------------------------

    def _process_state(self) -> dict:
        return {**super()._process_state(), "target": self.target.state_dict(), "generate_calls": self._generate_calls}

    def _load_process_state(self, state: dict) -> None:
        super()._load_process_state(state)
        self.target.load_state_dict(state["target"])
        self._generate_calls = state["generate_calls"]
        self._synced_at_step = None  # the engine holds the initial weights: sync before the first sampling

    def _checkpoint_identity(self) -> dict[str, str]:
        return {**super()._checkpoint_identity(), "target": self.target.kind}

    def _parameter_components(self) -> dict:
        # The target's parameters (β, n, threshold) define what the log Z table and its fitted state estimate.
        return {**super()._parameter_components(), "target": self.target}

    # --- sampling -----------------------------------------------------------------------------------------------

    def _sampling(self, purpose: str) -> SamplingParams:
        """This call's sampling parameters, seeded from the run seed, the process and the call count."""
        g = self.generation
        digest = hashlib.blake2b(f"{self.args.seed}:{self.args.process_index}:{purpose}:{self._generate_calls}"
                                 .encode(), digest_size=4).digest()
        self._generate_calls += 1
        return SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k,
                              top_p=g.top_p, seed=int.from_bytes(digest, "little") & 0x7FFFFFFF)

    @contextlib.contextmanager
    def _policy_for_generation(self):
        """The policy as a plain module that `generate` can run (ZeRO-3: parameters gathered for the block)."""
        from trl.models.utils import unwrap_model_for_generation

        with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as model:
            yield model

    def _sample(self, prompt_ids: list[list[int]], n: int, purpose: str = "train"):
        sampling = self._sampling(purpose)
        if self._live_sampler:
            with self._policy_for_generation() as model:
                self.rollout.load_weights(model)
                return self.rollout.generate(prompt_ids, n=n, sampling=sampling)
        step = self.state.global_step
        if self._synced_at_step is None or step - self._synced_at_step >= self.generation.sync_every:
            self.rollout.load_weights(self.model_wrapped)  # streams weights (PEFT merged, ZeRO-3 gathered)
            self._synced_at_step = step
        return self.rollout.generate(prompt_ids, n=n, sampling=sampling)

    def _fit_target(self, prompts: list, prompt_ids: list[list[int]], keys: list[str]) -> None:
        """Draws the target's reference samples for prompts it has not seen (best_of_n), once.

        With several processes, every rank samples the union of all ranks' new prompts with the same seed: the fitted
        state stays identical on all ranks, and a ZeRO-3-sharded reference runs the same forwards on every rank (its
        parameter hooks are collective)."""
        from accelerate.utils import gather_object

        todo = {key: (prompt, ids) for key, prompt, ids in zip(keys, prompts, prompt_ids)
                if not self.target.fitted(key)}
        if self.args.world_size > 1:
            todo = {key: item for part in gather_object([todo]) for key, item in part.items()}
        if not todo:
            return
        M, g = self.target.samples_per_prompt, self.generation
        seed = hashlib.blake2b(f"{self.args.seed}:target:{','.join(todo)}".encode(), digest_size=4).digest()
        sampling = SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k,
                                  top_p=g.top_p, seed=int.from_bytes(seed, "little") & 0x7FFFFFFF)
        with self._policy_for_generation() as policy, self.reference.sampling_model(policy) as model:
            from align.rollout import HFRollout

            sampler = HFRollout(model, self.processing_class, batch_size=g.batch_size, score=False)
            samples = sampler.generate([ids for _, ids in todo.values()], n=M, sampling=sampling)
        texts = [c.text for group in samples for c in group]
        scores = self.reward([prompt for prompt, _ in todo.values() for _ in range(M)], texts).reward
        for key, rewards in zip(todo, scores.reshape(len(todo), M)):
            self.target.fit_prompt(key, rewards)

    # --- the step -----------------------------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        """The next optimizer step's `num_batches` micro-batches, as rollouts. Every `steps_per_generation` steps one
        `generate` call samples for the prompts of that many steps (and all their micro-batches) at once; the later
        steps of the group are off-policy, which the importance weights π_θ/q correct."""
        if not self._pending:
            raw = []
            for _ in range(self.generation.steps_per_generation * num_batches):
                try:
                    raw.append(next(epoch_iterator))
                except StopIteration:
                    break
            self._pending = self._rollout(raw) if raw else []
        batches, self._pending = self._pending[:num_batches], self._pending[num_batches:]
        return batches, None

    def _rollout(self, batches: list[dict]) -> list[dict]:
        """Samples G completions for every prompt of `batches` in one call and scores them → one rollout per batch:
        `{"prompts", "prompt_ids", "keys", "completions", "scores" [P, G], "members" [P, G, K], "gold", "timing"}`."""
        prompts = [p for b in batches for p in b["prompt"]]
        prompt_ids = [ids for b in batches for ids in b["prompt_input_ids"]]
        keys = [prompt_key(ids) for ids in prompt_ids]
        G = self.generation.num_samples
        if self.target.samples_per_prompt:
            self._fit_target(prompts, prompt_ids, keys)
        t0 = time.perf_counter()
        completions = self._sample(prompt_ids, G)
        t1 = time.perf_counter()
        flat = [c for group in completions for c in group]
        texts = [c.text for c in flat]
        prompt_texts = [p for p in prompts for _ in range(G)]
        scores = self.reward.score_tokens([ids for ids in prompt_ids for _ in range(G)], [c.token_ids for c in flat],
                                          prompt_texts, texts)
        gold = self.gold_reward(prompt_texts, texts).reward if self.gold_reward is not None else None
        t2 = time.perf_counter()
        rewards, members = scores.reward.reshape(-1, G), scores.members.reshape(len(prompts), G, -1)
        out, start = [], 0
        for b in batches:
            P = len(b["prompt"])
            rows = slice(start, start + P)
            out.append({"prompts": prompts[rows], "prompt_ids": prompt_ids[rows], "keys": keys[rows],
                        "completions": completions[rows],
                        "rewards": rewards[rows], "members": members[rows],
                        "gold": gold.reshape(-1, G)[rows] if gold is not None else None,
                        "timing": ((t1 - t0) / len(batches), (t2 - t1) / len(batches))})
            start += P
        return out

    def _prepare_inputs(self, rollout: dict) -> dict:
        """A rollout → the group batch (one prompt copy, G completion blocks per row) with the reference's
        log-probs and the target's, computed now (a TR-DPO reference has moved since the rollout)."""
        if "completions" not in rollout:
            return super()._prepare_inputs(rollout)
        t0 = time.perf_counter()
        completions, keys = rollout["completions"], rollout["keys"]
        batch = self._prepare_group_batch(rollout["prompt_ids"], completions, self.collate_group, self.completion_keys)
        reference = self.reference.group_logps(self.model_wrapped, batch).sums()
        device = batch["input_ids"].device
        rewards = rollout["rewards"].to(device)
        flat = [c for group in completions for c in group]
        scored = bool(flat) and flat[0].logps is not None
        batch.update(
            keys=keys,
            rewards=rewards,
            reward_members=rollout["members"].to(device),
            gold_rewards=rollout["gold"].to(device) if rollout["gold"] is not None else None,
            reference_logps=reference,
            target_logps=self.target.log_prob(reference, rewards, keys),
            # The sampler's sequence log-probs; None when the sampler is the policy itself (hf, untempered, one step
            # per generation): then log q = log π_θ exactly and the policy forward gives it.
            sampler_logps=(torch.tensor([[float(c.logps.sum()) for c in group] for group in completions],
                                        device=device) if scored else None),
            sampler_token_logps=[c.logps for c in flat] if scored else None,
            timing=(*rollout["timing"], time.perf_counter() - t0),
            finished=torch.tensor([[c.finished for c in group] for group in completions], device=device),
            distinct_2=distinct_2([c.token_ids for c in flat]),
        )
        return batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        t0 = time.perf_counter()
        policy = group_logps(model, inputs)
        policy_sums = policy.sums()
        sampler = inputs["sampler_logps"] if inputs["sampler_logps"] is not None else policy_sums.detach()
        gather = self.accelerator.gather
        keys = inputs["keys"]
        all_keys = keys
        target, sampler_all = inputs["target_logps"], sampler
        if self.args.world_size > 1:
            from accelerate.utils import gather_object

            all_keys = gather_object(list(keys))
            target, sampler_all = gather(target.contiguous()), gather(sampler.double().contiguous())
        self.objective.update_log_z(all_keys, target.cpu(), sampler_all.cpu())
        losses, metrics = self.objective.loss(policy_sums, inputs["target_logps"], sampler, keys, gather=gather)
        loss = losses.mean()
        self._record(inputs, policy, metrics, time.perf_counter() - t0)
        return (loss, metrics) if return_outputs else loss

    # --- metrics ------------------------------------------------------------------------------------------------

    def _record(self, inputs: dict, policy: GroupLogps, metrics: dict, forward_s: float) -> None:
        lengths = policy.lengths().float()
        per_sample = {
            **metrics,
            "reward": inputs["rewards"].float(),
            # Monte-Carlo sequence KL(π‖a) = E_π[log π − log a]: exact in expectation when the sampler is π.
            "kl/sampled": (policy.sums().detach() - inputs["reference_logps"]).float(),
            "entropy/token": (-(policy.logps.detach() * policy.mask).sum(-1) / lengths.clamp(min=1)),
            "length/completion": lengths,
            "completion/finished": inputs["finished"].float(),
        }
        members = inputs["reward_members"]
        for k, name in enumerate(self.reward.member_names):
            per_sample[f"reward/{name}"] = members[..., k].float()
        if inputs["gold_rewards"] is not None:
            per_sample["gold_reward"] = inputs["gold_rewards"].float()
        if inputs["sampler_token_logps"] is not None:
            sampler = torch.cat([lp.float() for lp in inputs["sampler_token_logps"]]).to(policy.logps.device)
            mine = policy.logps.detach()[policy.mask]  # [P, G, T] masked, row-major = the flat completion order
            per_sample["sampler/logprob_gap"] = (sampler - mine).abs()
        generate_s, score_s, reference_s = inputs["timing"]
        tokens = lengths.sum()
        step = {
            "time/generate_s": torch.tensor([generate_s]),
            "time/score_s": torch.tensor([score_s]),
            "time/train_s": torch.tensor([reference_s + forward_s]),
            "completion/distinct_2": torch.tensor([inputs["distinct_2"]]),
            "throughput/generated_tokens_per_s": (tokens / max(generate_s, 1e-9)).reshape(1).cpu(),
        }
        device = policy.logps.device
        self._metrics["train"].add({**per_sample, **{k: v.to(device) for k, v in step.items()}},
                                   gather=self.accelerator.gather)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs.update(self._metrics["train"].flush())
        logs.update(self.reference.metrics())
        logs.update(self.target.metrics())
        super().log(logs, start_time)

    # --- measuring a policy -------------------------------------------------------------------------------------

    @torch.no_grad()
    def measure(self, prompts: list, prompt_ids: list[list[int]], num_samples: int, seed: int) -> dict:
        """Samples `num_samples` completions per prompt from the current policy (plain sampling, seeded) and returns
        the mean reward, gold reward (when given), length and Monte-Carlo KL(π‖a) to the reference (the
        quickstart's measurement). Every process must call it (ZeRO-3 gathers the policy to generate)."""
        from align.rollout import HFRollout

        keys = group_completion_keys(num_samples)
        collate = SharedPromptCollator(self.processing_class.pad_token_id, completion_keys=keys)
        sampling = SamplingParams(max_new_tokens=self.generation.max_new_tokens, seed=seed)
        with self._policy_for_generation() as model:
            was_training = model.training
            model.eval()
            try:
                completions = HFRollout(model, self.processing_class, batch_size=self.generation.batch_size
                                        ).generate(prompt_ids, n=num_samples, sampling=sampling)
            finally:
                model.train(was_training)
        flat = [c for group in completions for c in group]
        texts = [c.text for c in flat]
        prompt_texts = [p for p in prompts for _ in range(num_samples)]
        kl = []
        for start in range(0, len(prompt_ids), 32):
            part = completions[start:start + 32]
            batch = self._prepare_group_batch(prompt_ids[start:start + 32], part, collate, keys)
            reference = self.reference.group_logps(self.model, batch).sums().cpu()
            sampler = torch.tensor([[float(c.logps.sum()) for c in group] for group in part])
            kl.append((sampler - reference).reshape(-1))
        rewards = self.reward.score_tokens([ids for ids in prompt_ids for _ in range(num_samples)],
                                           [c.token_ids for c in flat], prompt_texts, texts)
        out = {"reward": float(rewards.reward.mean()),
               "kl_to_reference": float(torch.cat(kl).mean()),
               "length": sum(len(c.token_ids) for c in flat) / len(flat),
               "finished": sum(c.finished for c in flat) / len(flat)}
        if self.gold_reward is not None:
            out["gold_reward"] = float(self.gold_reward(prompt_texts, texts).reward.mean())
        return out

    def _prepare_group_batch(self, prompt_ids, completions, collate, keys) -> dict:
        batch = collate([{"prompt_input_ids": ids, **{k: c.token_ids for k, c in zip(keys, group)}}
                         for ids, group in zip(prompt_ids, completions)])
        return super()._prepare_inputs(batch)
