"""A small runner of TRL's `RLOOTrainer` on the toy world, for the frontier study (eval/studies/frontier.py).

RLOO (Ahmadian et al. 2024, TRL 1.16's `RLOOTrainer`) maximises the toy world's gold reward minus β times the
sequence-level KL to the reference (TRL subtracts β·Σ_t(log π − log π_ref) from each completion's reward, with
π_ref a frozen copy of the SFT model), with the leave-one-out baseline over each prompt's completions: the same
KL-regularised objective as reverse-KL f-DPG to the exponential target a·exp(r/β). It is set up like the f-DPG runs
of the studies: the same SFT model, the same training prompt stream, 8 prompts x 4 completions a step (TRL counts
completions: per_device_train_batch_size 32, num_generations 4), 24 new tokens, plain sampling (temperature 1, no
top-k/top-p), one update per batch (num_iterations 1, so the clipped ratio is 1), a constant learning rate, AdamW.

The trained model is returned in memory and measured by `eval.studies.common.measure_policy`, exactly as the f-DPG
policies are (held-out samples, gold mean, Monte-Carlo KL to the SFT model).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from eval.studies.common import (
    MAX_NEW_TOKENS,
    TRAIN_PROMPT_SEED,
    TRAIN_PROMPTS,
    _stdout_to,
)


def toy_world_gold(prompts, completions, **kwargs) -> list[float]:
    """TRL reward function: the toy world's gold reward of each completion text (prompts are not needed)."""
    from align import toy_world

    return toy_world.gold_rewards(list(completions))


def train_rloo(sft: Path, output_dir: Path, *, beta: float, steps: int, learning_rate: float, seed: int,
               logging_steps: int = 10):
    """Trains the SFT policy with TRL's RLOOTrainer (module docstring) → (trained model in eval mode, summary with
    `log_history` and `train_runtime_s`)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    from align import toy_world
    from align.config import installed_training_key

    tokenizer = AutoTokenizer.from_pretrained(sft)
    model = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32)
    prompts = toy_world.make_prompts(TRAIN_PROMPTS, seed=TRAIN_PROMPT_SEED)
    args = RLOOConfig(
        output_dir=str(output_dir), per_device_train_batch_size=32, num_generations=4,
        max_completion_length=MAX_NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0, num_iterations=1, beta=beta,
        learning_rate=learning_rate, lr_scheduler_type="constant", max_steps=steps, logging_steps=logging_steps,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=seed, disable_dropout=True,
        # CPU: fp32, no pinned memory, no recomputation (TRL's defaults assume an accelerator)
        bf16=False, dataloader_pin_memory=torch.cuda.is_available(),
        **{installed_training_key("activation_checkpointing"): False},
    )
    start = time.perf_counter()
    output_dir.mkdir(parents=True, exist_ok=True)
    with _stdout_to(output_dir / "train.log"):
        trainer = RLOOTrainer(model=model, reward_funcs=toy_world_gold, args=args,
                              train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                              processing_class=tokenizer)
        result = trainer.train()
    summary = {"global_step": trainer.state.global_step, "train_runtime_s": result.metrics.get("train_runtime"),
               "wall_time_s": time.perf_counter() - start,
               "log_history": [dict(h) for h in trainer.state.log_history]}
    return trainer.model.eval(), summary
