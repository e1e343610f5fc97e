"""Benchmark: align's on-policy f-DPG recipe (`align train`, reverse KL to the exponential target) against TRL's
`RLOOTrainer` on the same work: samples/s, peak memory, and the gold reward and KL reached after equal steps.

    python bench/onpolicy_vs_trl.py            # toy and d=256 x 4 models, {align, trl} x 2 repeats; ~8 min on 2 cores
    python bench/onpolicy_vs_trl.py --quick    # smoke run (toy model without SFT, 3 steps; timings meaningless)

What is compared
----------------
- Models: `toy` (the quickstart's: `toy_world.save_base_model` defaults, d=64, 2 layers, then
  `quickstart.train_toy_sft`) and `d256x4` (hidden 256, 4 layers, 4 heads of dim 64, 4 kv heads, MLP 1024, SFT'd
  by the same `train_toy_sft`). Both are built once per bench run into a temporary folder and loaded from disk by
  both frameworks. The SFT model is the initial policy and the frozen reference on both sides.
- Work per optimizer step, identical: 8 toy-world prompts x 4 completions (TRL: per_device_train_batch_size=32,
  num_generations=4; align: training.per_device_train_batch_size=8, generation.num_samples=4), at most 24 new
  tokens, temperature 1, no top-k/top-p, sampled in-process with the transformers model and its KV cache, no vLLM
  (align: `rollout.backend: hf`, i.e. `HFRollout`; TRL: `model.generate`), fp32, AdamW (`adamw_torch`), lr 1e-4
  constant, max_grad_norm 1.0, no activation checkpointing, dropout off, same seed and `--threads`. Reward: the toy
  world's gold reward. KL strength: TRL's default beta = 0.05 (RLOO: reward - beta * sequence log-ratio to the
  reference); align: `target: {kind: exponential, beta: 0.05}` with reverse-KL f-DPG, whose optimum
  a(y) exp(r(y)/beta) is the optimum of the same KL-regularised objective. Training prompts:
  `toy_world.make_prompts(2048, seed=1000)` on both sides (the recipe's `prompts.toy_world`); each side draws its own
  order from the seed.
- align runs the real recipe code path: `configs/fdpg-toy.yaml` + overrides → `align.config.load_train_config` →
  `align.recipes.train.train` (which saves `final/` and `summary.json` as usual; its before/after evaluation is off). TRL
  runs `RLOOTrainer(model=<path>, reward_funcs=[toy_world], args=RLOOConfig(...), train_dataset=Dataset({"prompt":
  text}))`. The bench checks that both sides tokenize the prompts to the same ids (both prepend `<bos>`).
- Timing: every run is its own subprocess (`--worker`). A `TrainerCallback` (TRL: passed to the trainer; align: added
  to `OnPolicyTrainer` by wrapping its `__init__`, nothing else changes) timestamps every optimizer step; after
  `--warmup` steps the next `--steps` steps give steps/s and samples/s (completions: 32 per step), everything a step
  does included (sampling, reward, reference and policy forwards, backward, optimizer, logging every step on both).
  Runs rotate between the frameworks (`common.interleaved`); every run is kept. The tables give the median over
  `--repeats` of samples/s and of each ratio to TRL (repeat i's align over repeat i's TRL, run back to back) with
  min, max and spread (max − min) / median; the fastest run of each framework is kept as `best`. The policies drift apart from the first update, and so do their completion lengths: the mean completion
  length over the timed steps (each framework's own per-step log) is printed beside samples/s, with tokens/s.
- Memory: peak RSS of the worker process (VmHWM) at the end of the timed window. Both workers import the same
  libraries (torch, transformers, datasets, trl, align) before anything else, so the RSS baseline is alike.
- Quality after equal steps: the first repeat of each framework keeps training to `--quality-steps` optimizer steps
  (timings come from its first `warmup + steps` steps like every other repeat), saves the model, then both are
  measured identically: 2 samples on each of 128 held-out prompts (`make_prompts(128, seed=2000)`; 8 with --quick)
  from the trained policy with `align.rollout.HFRollout` (plain sampling, fixed seed), mean gold reward, and
  Monte-Carlo KL(pi || pi_sft) = mean over samples of log pi(y|x) - log pi_sft(y|x) (`align.logps.score_completions`),
  as `align quickstart` measures. The SFT model is measured the same way (the "before" row). Each framework's own
  per-step log is kept in the JSON (`curve`), with its definitions (they differ: see `LOGGED_METRICS`). The default
  40 quality steps keep the full run near 8 minutes on 2 busy cores; pass e.g. `--quality-steps 300` for more.
- The align side runs whatever `align/` is in the working tree: the JSON records git HEAD and a digest of
  align/**/*.py per run, and the bench warns when the source changed while it ran.
- Threads: `--threads` (default 1; these models gain nothing from more on shared cores) sets OMP_NUM_THREADS,
  MKL_NUM_THREADS and torch's intra-op threads in every worker alike. `--no-sft` / `--sft` override the preset.

Results: a table and JSON at `--output` (default bench/results/onpolicy_vs_trl.json), written atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import common

REPO_ROOT = common.REPO_ROOT
RECIPE = REPO_ROOT / "configs" / "fdpg-toy.yaml"
#: align: one optimizer step per sampling call (as TRL's default); align_k: `generation.steps_per_generation = K`
#: (`--steps-per-generation`, default 4): one call samples for K steps, the later K-1 corrected by importance weights.
FRAMEWORKS = ("align", "align_k", "trl")
MODELS = {
    "toy": {},  # toy_world.build_tiny_model's defaults: d=64, 2 layers, 2 heads (head_dim 32), 1 kv head; 0.1M
    "d256x4": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 4, "intermediate_size": 1024},
}
PRESETS = {
    "full": {"models": ["toy", "d256x4"], "steps": 10, "warmup": 2, "quality_steps": 40, "repeats": 2,
             "sft": True, "eval_prompts": 128},
    "quick": {"models": ["toy"], "steps": 2, "warmup": 1, "quality_steps": 3, "repeats": 1,
              "sft": False, "eval_prompts": 8},
}
PROMPTS_PER_STEP, SAMPLES_PER_PROMPT, MAX_NEW_TOKENS = 8, 4, 24
LEARNING_RATE, BETA, MAX_GRAD_NORM = 1e-4, 0.05, 1.0
TRAIN_PROMPTS, TRAIN_PROMPTS_SEED = 2048, 1000
EVAL_PROMPTS_SEED, EVAL_SAMPLES, EVAL_SAMPLING_SEED = 2000, 2, 3
#: What each framework logs every step (logging_steps=1 on both), and what it means; `curve` in the JSON renames them
#: gold / kl / length.
LOGGED_METRICS = {
    "align": {"gold_reward": "mean gold reward of the step's 32 samples",
              "kl/sampled": "mean over samples of the sequence log pi(y|x) - log a(y|x) (nats per completion)",
              "length/completion": "mean completion length in tokens (EOS included)"},
    "trl": {"rewards/toy_world/mean": "mean gold reward of the step's 32 samples",
            "kl": "per-token mean of log pi_old - log pi_ref over the step's completion tokens (nats per token)",
            "completions/mean_length": "mean completion length in tokens (EOS included)"},
}


# ---------------------------------------------------------------------------------------------------------------
# Worker pieces


def _record_settings(timer, args, model) -> None:
    """At the start of training: the settings the trainer really runs with (checked equal on both sides)."""
    from align.config import installed_training_key

    checkpointing = installed_training_key("activation_checkpointing")
    dropouts = [m.p for m in model.modules() if type(m).__name__ == "Dropout"] if model is not None else []
    config_dropouts = {k: v for k, v in model.config.to_dict().items() if "dropout" in k and v}
    timer.settings = {
        "bf16": bool(args.bf16), "fp16": bool(args.fp16),
        "activation_checkpointing": bool(getattr(args, checkpointing)),
        "gradient_checkpointing_active": bool(getattr(model, "is_gradient_checkpointing", False)),
        "model_dtype": str(model.dtype), "attn_implementation": model.config._attn_implementation,
        "optim": str(getattr(args.optim, "value", args.optim)), "learning_rate": args.learning_rate,
        "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "max_grad_norm": args.max_grad_norm, "weight_decay": args.weight_decay,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps, "seed": args.seed,
        "max_dropout": max(dropouts + list(config_dropouts.values()), default=0.0),
    }


def _curve(log_history: list[dict], framework: str) -> list[dict]:
    """The per-step log (logging_steps=1) as [{step, gold, kl, length}], in each framework's own definitions."""
    names = dict(zip(("gold", "kl", "length"), LOGGED_METRICS[framework]))
    return [{"step": h["step"], **{k: h.get(name) for k, name in names.items()}}
            for h in log_history if names["length"] in h]


def _window_stats(curve: list[dict], first: int, last: int) -> dict:
    """Means of the logged metrics over steps first..last (inclusive)."""
    rows = [r for r in curve if first <= r["step"] <= last]
    return {k: sum(r[k] for r in rows) / len(rows) if rows and all(r[k] is not None for r in rows) else None
            for k in ("gold", "kl", "length")}


def _ids_digest(ids: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def measure(model_dir: str, sft_dir: str, spec: dict) -> dict:
    """Gold reward and Monte-Carlo KL(pi || pi_sft) of the model in `model_dir` on held-out prompts, the same way
    for every framework (and for the SFT model itself): 2 plain samples per prompt with HFRollout, scored by the SFT
    model with `score_completions` (align quickstart's measurement)."""
    import statistics

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align import toy_world
    from align.data import tokenize_prompts
    from align.logps import score_completions
    from align.rollout import HFRollout, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sft = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32).eval()
    prompts = toy_world.make_prompts(spec["eval_prompts"], seed=EVAL_PROMPTS_SEED)
    sampling = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, seed=EVAL_SAMPLING_SEED)
    groups = HFRollout(policy, tokenizer, batch_size=128).generate(prompts, n=EVAL_SAMPLES, sampling=sampling)
    flat = [c for group in groups for c in group]
    prompt_ids = tokenize_prompts(tokenizer, prompts)
    with torch.no_grad():
        sft_logps = score_completions(sft, [prompt_ids[c.prompt_index] for c in flat], [c.token_ids for c in flat])
    gold = toy_world.gold_rewards([c.text for c in flat])
    return {"gold": statistics.fmean(gold), "gold_std": statistics.pstdev(gold),
            "kl": statistics.fmean(float(c.logps.sum() - r.sum()) for c, r in zip(flat, sft_logps)),
            "length": statistics.fmean(len(c.token_ids) for c in flat),
            "finished": statistics.fmean(float(c.finished) for c in flat), "samples": len(flat)}


def _run_align(spec: dict, sft_dir: str, output_dir: str, max_steps: int, timer, steps_per_generation: int = 1
               ) -> tuple[str, dict]:
    """The `align train` recipe (configs/fdpg-toy.yaml with the compared settings overridden), timer attached."""
    from align.config import load_train_config
    from align.data import tokenize_prompts
    from align.modeling import load_tokenizer
    from align.onpolicy_trainer import OnPolicyTrainer
    from align.prompts import load_prompts
    from align.recipes.train import train

    overrides = [
        f"model.name_or_path={sft_dir}", "model.dtype=float32",
        f"prompts.toy_world={TRAIN_PROMPTS}", f"prompts.seed={TRAIN_PROMPTS_SEED}",
        "reward.kind=toy_world",
        "objective.name=fdpg", "objective.divergence=reverse_kl",
        "target.kind=exponential", f"target.beta={BETA}",
        "reference.kind=frozen",
        "rollout.backend=hf",
        f"generation.num_samples={SAMPLES_PER_PROMPT}", f"generation.max_new_tokens={MAX_NEW_TOKENS}",
        "generation.temperature=1.0", "generation.top_k=0", "generation.top_p=1.0",
        f"generation.steps_per_generation={steps_per_generation}",
        "evaluation.prompts=null", "evaluation.gold=toy_world",  # gold logged per step; no before/after sampling
        f"training.output_dir={output_dir}", f"training.max_steps={max_steps}",
        f"training.per_device_train_batch_size={PROMPTS_PER_STEP}", "training.gradient_accumulation_steps=1",
        f"training.learning_rate={LEARNING_RATE}", "training.lr_scheduler_type=constant", "training.warmup_steps=0",
        "training.optim=adamw_torch", "training.weight_decay=0.0", f"training.max_grad_norm={MAX_GRAD_NORM}",
        "training.bf16=false", "training.fp16=false", "training.activation_checkpointing=false",
        "training.logging_steps=1", "training.save_strategy=no", "training.report_to=none",
        "training.disable_tqdm=true", "training.dataloader_num_workers=0",
        f"seed={spec['seed']}", "disable_dropout=true",
    ]
    config = load_train_config(RECIPE, overrides)
    prompts = load_prompts(config.prompts)
    ids = tokenize_prompts(load_tokenizer(config.model), prompts)  # what the recipe trains on (same call)

    original_init = OnPolicyTrainer.__init__

    def init_with_timer(self, *args, callbacks=None, **kwargs):
        original_init(self, *args, callbacks=[*(callbacks or []), timer], **kwargs)

    OnPolicyTrainer.__init__ = init_with_timer
    try:
        summary = train(config)
    finally:
        OnPolicyTrainer.__init__ = original_init
    recipe = {"objective": config.objective, "target": config.target, "reference": config.reference,
              "generation": dataclasses.asdict(config.generation)}
    return summary["final_model"], {"prompt_ids_digest": _ids_digest(ids), "first_prompt_ids": ids[0],
                                    "curve": _curve(summary["log_history"], "align"), "recipe": recipe}


def _run_trl(spec: dict, sft_dir: str, output_dir: str, max_steps: int, timer) -> tuple[str, dict]:
    import torch
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    from align import toy_world
    from align.config import installed_training_key

    def toy_world_gold(prompts, completions, **kwargs):  # TRL logs it as rewards/toy_world/mean
        return toy_world.gold_rewards(completions)

    toy_world_gold.__name__ = "toy_world"
    args = RLOOConfig(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=PROMPTS_PER_STEP * SAMPLES_PER_PROMPT,
        num_generations=SAMPLES_PER_PROMPT, gradient_accumulation_steps=1, max_completion_length=MAX_NEW_TOKENS,
        temperature=1.0, top_p=1.0, top_k=0, learning_rate=LEARNING_RATE, lr_scheduler_type="constant",
        warmup_steps=0, optim="adamw_torch", weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM, beta=BETA,
        num_iterations=1, bf16=False, fp16=False, **{installed_training_key("activation_checkpointing"): False},
        disable_dropout=True, use_vllm=False, model_init_kwargs={"dtype": torch.float32},
        use_cpu=True, dataloader_pin_memory=False, dataloader_num_workers=0, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=spec["seed"],
    )
    prompts = toy_world.make_prompts(TRAIN_PROMPTS, seed=TRAIN_PROMPTS_SEED)
    trainer = RLOOTrainer(model=sft_dir, reward_funcs=[toy_world_gold], args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=[timer])
    ids = trainer._tokenize_prompts(prompts)[0]  # exactly what RLOOTrainer._generate does with a batch's prompts
    trainer.train()
    final_dir = str(Path(output_dir) / "final")
    trainer.save_model(final_dir)
    return final_dir, {"prompt_ids_digest": _ids_digest(ids), "first_prompt_ids": ids[0],
                       "curve": _curve(trainer.state.log_history, "trl")}


def run_worker(framework: str, spec: dict, sft_dir: str, result_path: str, quality: bool) -> None:
    digest = common.source_digest()  # before align is imported
    import torch

    torch.set_num_threads(spec["threads"])
    # The same imports on both sides before the RSS baseline: each framework imports the other's stack anyway
    # (align's trainer uses trl.models.utils), and the baseline then measures the same thing.
    import datasets  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401
    from trl import RLOOTrainer  # noqa: F401

    import align.recipes.train
    import align.recipes.train_on_policy  # noqa: F401

    rss_baseline = common.status_mib("VmRSS")
    timer = common.step_timer(spec["warmup"], spec["steps"], on_train_begin=_record_settings)
    max_steps = spec["quality_steps"] if quality else spec["warmup"] + spec["steps"]  # quality_steps >= the latter
    output_dir = tempfile.mkdtemp(prefix=f"bench-onpolicy-{framework}-")
    try:
        start = time.perf_counter()
        if framework == "trl":
            final_dir, info = _run_trl(spec, sft_dir, output_dir, max_steps, timer)
        else:
            k = spec["steps_per_generation"] if framework == "align_k" else 1
            final_dir, info = _run_align(spec, sft_dir, output_dir, max_steps, timer, steps_per_generation=k)
        train_wall = time.perf_counter() - start
        timed = timer.summary()
        timed.update(samples_per_s=timed["steps_per_s"] * PROMPTS_PER_STEP * SAMPLES_PER_PROMPT,
                     peak_rss_mib=timer.peak_rss_window_mib)
        window = _window_stats(info["curve"], spec["warmup"] + 1, spec["warmup"] + spec["steps"])
        last = _window_stats(info["curve"], len(timer.ends) - 9, len(timer.ends))
        result = {"framework": framework, **timed, "timed_window_logged": window, "last_10_steps_logged": last,
                  "completion_tokens_timed": window["length"],
                  "tokens_per_s": timed["samples_per_s"] * window["length"] if window["length"] else None,
                  "align_source_digest": digest, "peak_rss_run_mib": common.peak_rss_mib(),
                  "rss_baseline_mib": rss_baseline, "optimizer_steps": len(timer.ends), "run_wall_s": train_wall,
                  "threads": torch.get_num_threads(), "settings_used": timer.settings, **info}
        if quality:
            result["quality"] = measure(final_dir, sft_dir, spec)
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    with open(result_path, "w") as f:
        json.dump(result, f)


def prepare(model_name: str, spec: dict, work: Path) -> dict:
    """Builds the base model and its SFT (`quickstart.train_toy_sft`; skipped by --quick), measures the SFT model."""
    import torch

    from align.recipes.quickstart import train_toy_sft

    torch.set_num_threads(spec["threads"])
    base, sft = work / "base", work / "sft"
    common.save_tiny_model(base, seed=spec["seed"], **MODELS[model_name])
    t0 = time.perf_counter()
    if spec["sft"]:
        train_toy_sft(base, sft, seed=spec["seed"])
    else:
        shutil.copytree(base, sft)
    sft_s = time.perf_counter() - t0
    from transformers import AutoModelForCausalLM

    parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(sft).parameters())
    return {"sft_dir": str(sft), "sft_s": sft_s, "parameters": parameters, "sft_measure": measure(sft, sft, spec)}


# ---------------------------------------------------------------------------------------------------------------
# Driver


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    full, quick = PRESETS["full"], PRESETS["quick"]
    parser = common.bench_parser(__doc__, "onpolicy_vs_trl", threads=1,
                                 threads_help="torch / OpenMP threads in every worker (1: these models are too small "
                                              "to gain from more, and the cores are shared)",
                                 repeats_help=f"runs per (model, framework), in rotating order (default: "
                                              f"{full['repeats']}; quick: {quick['repeats']})")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help="model sizes (default: preset)")
    parser.add_argument("--steps", type=int, help=f"timed optimizer steps per run (default: {full['steps']}; quick: "
                        f"{quick['steps']})")
    parser.add_argument("--warmup", type=int, help=f"untimed steps before them (default: {full['warmup']}; quick: "
                        f"{quick['warmup']})")
    parser.add_argument("--quality-steps", type=int,
                        help="optimizer steps of the first repeat, after which gold reward and KL are measured "
                             f"(default: {full['quality_steps']}; quick: {quick['quality_steps']})")
    parser.add_argument("--sft", action=argparse.BooleanOptionalAction, default=None,
                        help="SFT the base models first (quickstart.train_toy_sft; default: yes; quick: no)")
    parser.add_argument("--steps-per-generation", type=int, default=4,
                        help="K of the align_k variant (generation.steps_per_generation; default 4)")
    # Internal: the driver re-invokes this script once per prepared model and per (model, framework, repeat).
    parser.add_argument("--worker", choices=(*FRAMEWORKS, "prepare"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--quality", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker == "prepare":
        info = prepare(args.model, json.loads(args.spec), Path(args.dir))
        Path(args.result).write_text(json.dumps(info))
        return 0
    if args.worker:
        run_worker(args.worker, json.loads(args.spec), args.dir, args.result, args.quality)
        return 0

    preset = common.apply_overrides(PRESETS["quick" if args.quick else "full"], args,
                                    ("models", "steps", "warmup", "quality_steps", "repeats", "sft"))
    spec = {**preset, "threads": args.threads, "seed": args.seed, "quick": args.quick,
            "steps_per_generation": args.steps_per_generation}
    if spec["warmup"] < 1 or spec["steps"] < 1 or spec["repeats"] < 1:
        parser.error("--warmup, --steps and --repeats must be >= 1 (the first step includes one-off setup)")
    spec["quality_steps"] = max(spec["quality_steps"], spec["warmup"] + spec["steps"])
    spec_json = json.dumps(spec)

    started = time.time()
    machine = common.machine()
    digest_start = machine["align_source_digest"]
    work = Path(tempfile.mkdtemp(prefix="bench-onpolicy-vs-trl-"))
    results: dict = {
        "align_git_head": machine["align_git_head"], "align_source_digest": digest_start, "machine": machine,
        "spec": {**spec, "prompts_per_step": PROMPTS_PER_STEP, "samples_per_prompt": SAMPLES_PER_PROMPT,
                 "completions_per_step": PROMPTS_PER_STEP * SAMPLES_PER_PROMPT, "max_new_tokens": MAX_NEW_TOKENS,
                 "temperature": 1.0, "learning_rate": LEARNING_RATE, "lr_scheduler_type": "constant", "beta": BETA,
                 "max_grad_norm": MAX_GRAD_NORM, "optimizer": "adamw_torch", "precision": "fp32",
                 "activation_checkpointing": False,
                 "generation": {"align": "rollout.backend hf (align.rollout.HFRollout, the transformers model "
                                         "in-process with its KV cache)",
                                "trl": "model.generate (use_vllm=False)"},
                 "train_prompts": {"toy_world": TRAIN_PROMPTS, "seed": TRAIN_PROMPTS_SEED},
                 "eval": {"prompts": spec["eval_prompts"], "prompts_seed": EVAL_PROMPTS_SEED,
                          "samples_per_prompt": EVAL_SAMPLES, "sampling_seed": EVAL_SAMPLING_SEED},
                 "align_recipe": str(RECIPE.relative_to(REPO_ROOT))},
        "logged_metric_definitions": LOGGED_METRICS,
        "notes": [
            ("TRL's RLOO puts beta * (sequence log-ratio to the reference) into the reward and uses a leave-one-out "
            "baseline with one PPO-style (clipped) policy-gradient step per batch; align's f-DPG (reverse KL, "
            "exponential target with the same beta) fits the same optimum a(y) exp(r(y)/beta) with the recipe's "
            "moving-average baseline."),
            ("TRL does two no-grad forwards per step (the policy's 'old' log-probs and the reference's) plus the "
            "training forward; align does the reference forward and the training forward (its hf sampler is the "
            "policy itself, untempered, so the sampler's log-probs are the training forward's)."),
            ("TRL's logged 'kl' is a per-token mean (nats per token); align's 'kl/sampled' is per completion "
            "(nats per sequence). The 'gold after' and 'KL after' columns are measured by the bench the same way "
            "for both (KL to the SFT model per completion)."),
            ("Prompt tokenization: align's `tokenize_prompts` (text, add_special_tokens=True) and TRL's "
            "`RLOOTrainer._tokenize_prompts` (processing_class(text=prompts), special tokens on by default) both give "
            "<bos> + one id per word; the bench compares digests of all training prompts' ids. Prompt order differs "
            "(each trainer's own seeded shuffle; TRL repeats each prompt num_generations times in its sampler)."),
            ("align's run also logs the gold reward per step (evaluation.gold), scoring each completion twice with "
            "the same string function (negligible next to a forward)."),
        ],
        "models": {},
    }
    print(f"{', '.join(spec['models'])}; {PROMPTS_PER_STEP} prompts x {SAMPLES_PER_PROMPT} samples x "
          f"{MAX_NEW_TOKENS} new tokens per step; fp32, {spec['threads']} thread(s); {spec['warmup']} warm-up + "
          f"{spec['steps']} timed steps, {spec['repeats']} repeat(s) in rotating order; gold/KL after "
          f"{spec['quality_steps']} steps (load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)",
          flush=True)
    try:
        for model_name in spec["models"]:
            model_work = work / model_name
            t0 = time.time()
            common.run_script(__file__, ["--worker", "prepare", "--model", model_name, "--spec", spec_json, "--dir",
                                         str(model_work), "--result", str(work / f"{model_name}-prepare.json")],
                              f"{model_name}: model build / SFT", common.worker_env(spec["threads"]))
            prepared = json.loads((work / f"{model_name}-prepare.json").read_text())
            sft_m = prepared["sft_measure"]
            print(f"  {model_name}: {prepared['parameters'] / 1e6:.2f}M parameters; "
                  f"{'SFT' if spec['sft'] else 'no SFT'} in {prepared['sft_s']:.0f}s ({time.time() - t0:.0f}s in "
                  f"all); SFT policy: gold {sft_m['gold']:+.3f}, length {sft_m['length']:.1f} tokens, "
                  f"{100 * sft_m['finished']:.0f}% finished", flush=True)

            def run_one(framework: str, rep: int) -> dict:
                result_path = work / f"{model_name}-{framework}-{rep}.json"
                t0, load0 = time.time(), os.getloadavg()[0]
                common.run_script(__file__, ["--worker", framework, "--spec", spec_json, "--dir", prepared["sft_dir"],
                                             "--result", str(result_path), *(["--quality"] if rep == 0 else [])],
                                  f"{model_name} / {framework}", common.worker_env(spec["threads"]))
                run = json.loads(result_path.read_text())
                run.update(repeat=rep, process_wall_s=time.time() - t0, loadavg_start=load0,
                           loadavg_end=os.getloadavg()[0])
                q = run.get("quality")
                print(f"    {framework:5} run {rep + 1}: {run['samples_per_s']:.1f} samples/s "
                      f"({run['steps_per_s']:.3f} steps/s, {_fmt(run['completion_tokens_timed'], '.1f')} "
                      f"tokens/completion), peak RSS {run['peak_rss_mib']:.0f} MiB"
                      + (f"; after {run['optimizer_steps']} steps gold {q['gold']:+.3f}, KL {q['kl']:.3f}"
                         if q else "")
                      + f" ({run['process_wall_s']:.0f}s, load {load0:.1f}->{run['loadavg_end']:.1f})",
                      flush=True)
                return run

            runs = common.interleaved(FRAMEWORKS, spec["repeats"], run_one)
            digests = {r["prompt_ids_digest"] for rs in runs.values() for r in rs}
            best = {fw: common.best_of(rs, "samples_per_s") for fw, rs in runs.items()}
            quality = {fw: rs[0]["quality"] for fw, rs in runs.items()}
            samples_per_s = {fw: common.spread(r["samples_per_s"] for r in rs) for fw, rs in runs.items()}
            for rs in runs.values():
                for r in rs:
                    r["peak_rss_increase_mib"] = r["peak_rss_mib"] - r["rss_baseline_mib"]
            a, t = best["align"], best["trl"]
            # Ratios to TRL per repeat (the frameworks of one repeat ran back to back): median, min, max, spread.
            ratios = {fw: {"samples_per_s": common.paired_ratios(runs[fw], runs["trl"], "samples_per_s"),
                           "tokens_per_s": common.paired_ratios(runs[fw], runs["trl"], "tokens_per_s")
                           if all(r["tokens_per_s"] for r in runs[fw] + runs["trl"]) else None,
                           "peak_rss": common.paired_ratios(runs[fw], runs["trl"], "peak_rss_mib"),
                           "peak_rss_increase": common.paired_ratios(runs[fw], runs["trl"], "peak_rss_increase_mib"),
                           "cpu_s_per_step": common.paired_ratios(runs[fw], runs["trl"], "cpu_s_per_step"),
                           "best_of_k_samples_per_s": best[fw]["samples_per_s"] / t["samples_per_s"]}
                      for fw in FRAMEWORKS if fw != "trl"}
            sanity = {
                "same prompt token ids on both sides": len(digests) == 1,
                "fp32, no activation checkpointing, dropout 0 on both": not any(
                    r["settings_used"][k] for r in (a, t)
                    for k in ("bf16", "fp16", "activation_checkpointing", "gradient_checkpointing_active",
                              "max_dropout")),
                "same optimizer settings": all(a["settings_used"][k] == t["settings_used"][k] for k in (
                    "optim", "learning_rate", "lr_scheduler_type", "max_grad_norm", "weight_decay", "seed",
                    "model_dtype")),
                "finite gold and KL after training": all(math.isfinite(q["gold"]) and math.isfinite(q["kl"])
                                                         for q in quality.values()),
            }
            results["models"][model_name] = {
                "parameters": prepared["parameters"], **(MODELS[model_name] or {"defaults": True}),
                "sft_s": prepared["sft_s"], "sft": sft_m, "best": best, "samples_per_s": samples_per_s, "quality": quality,
                "ratios": ratios, "sanity": sanity, "runs": runs,
            }
            for name, ok in sanity.items():
                print(f"    [{'x' if ok else ' '}] {name}", flush=True)
            if not sanity["same prompt token ids on both sides"]:
                raise SystemExit(f"{model_name}: align and TRL tokenized the prompts differently "
                                 f"({a['first_prompt_ids']} vs {t['first_prompt_ids']})")
        worker_digests = {r["align_source_digest"] for m in results["models"].values()
                          for rs in m["runs"].values() for r in rs}
        results["align_source_changed_during_run"] = worker_digests | {common.source_digest()} != {digest_start}
        if results["align_source_changed_during_run"]:
            print("WARNING: align's source (align/**/*.py) changed while the bench ran: runs measured different "
                  "code (see align_source_digest per run in the JSON)", flush=True)
        results["wall_s"] = time.time() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\ngold/KL: after {spec['quality_steps']} optimizer steps, {spec['eval_prompts']} held-out prompts x "
          f"{EVAL_SAMPLES} samples; KL = KL(policy || SFT) in nats per completion\n")
    print("| model | framework | steps/s (best) | samples/s (median, min–max, ±spread) | tokens/completion (timed) | "
          "peak RSS MiB | gold after | KL after |\n|---|---|---:|---:|---:|---:|---:|---:|")
    for model_name, m in results["models"].items():
        print(f"| {model_name} | SFT (before) | - | - | {m['sft']['length']:.1f} | - | {m['sft']['gold']:+.3f} | 0 |")
        for fw in FRAMEWORKS:
            b, q = m["best"][fw], m["quality"][fw]
            print(f"| {model_name} | {fw} | {b['steps_per_s']:.3f} | {common.fmt_spread(m['samples_per_s'][fw], '.1f')} "
                  f"| {_fmt(b['completion_tokens_timed'], '.1f')} | "
                  f"{_fmt(b['peak_rss_mib'], '.0f')} | {q['gold']:+.3f} | {q['kl']:.3f} |")
    print("\n| model | align variant | samples/s /TRL | tokens/s /TRL | peak RSS /TRL | peak RSS above baseline /TRL "
          "| CPU s/step /TRL |\n|---|---|---:|---:|---:|---:|---:|")
    for model_name, m in results["models"].items():
        for fw, r in m["ratios"].items():
            print(f"| {model_name} | {fw} | {common.fmt_spread(r['samples_per_s'])} | "
                  f"{common.fmt_spread(r['tokens_per_s']) if r['tokens_per_s'] else '-'} | "
                  f"{common.fmt_spread(r['peak_rss'])} | {common.fmt_spread(r['peak_rss_increase'])} | "
                  f"{common.fmt_spread(r['cpu_s_per_step'])} |")
    print("(ratios: median over repeats of repeat i's figure / TRL's repeat i, with min–max and spread)")
    common.write_json(args.output, results)
    print(f"\n{results['wall_s']:.0f}s in all; results in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
