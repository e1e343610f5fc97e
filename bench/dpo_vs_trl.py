#!/usr/bin/env python
"""Benchmark: align's DPO (`PreferenceTrainer` + `fdpo`) against TRL's `DPOTrainer`, same model, data and settings.

    python bench/dpo_vs_trl.py                 # full run: three workloads x two frameworks x 3 repeats, ~15 min
    python bench/dpo_vs_trl.py --quick         # smoke run (small model, few steps; what the test suite runs)
    python bench/dpo_vs_trl.py --workloads short --repeats 5

What is compared
----------------
- Model: a tiny Llama from `align.toy_world.build_tiny_model` (random init) over the toy world's word-level tokenizer
  extended with synthetic words to `vocab_size` (`common.build_tokenizer`), written with `save_pretrained` once and
  loaded by both frameworks. Policy and frozen reference (a second copy loaded from the same folder) on both sides.
- Data: synthetic preference pairs from a fixed seed (Zipf-like word frequencies), identical on both sides: the bench
  checks that both frameworks tokenize them to the same ids. Lengths in words (= tokens; the prompt gets BOS, each
  response EOS), each drawn uniformly from its range:
    normal  prompt 48-64, responses 48-64      (prompt ≈ response)
    long    prompt 192-256, responses 48-64    (prompts 4x the responses)
    short   prompt 12-20, responses 8-48       (chosen and rejected drawn independently: very different lengths)
- Training: fp32, no activation checkpointing (TRL 1.16 defaults to bf16 and checkpointing, so both are set off),
  AdamW (`adamw_torch`), same learning rate, linear schedule, beta (sigmoid / reverse-KL DPO), batch size, max length
  (above every sequence: nothing is truncated), seed and thread count; dropout off; `report_to: none`.

Two measures
------------
- `normal`, `long`: steps/s of training alone. Each (framework, workload, repeat) is its own worker process
  (`--worker`); a `TrainerCallback` timestamps every optimizer step, and after `--warmup` steps the wall time of the
  next `--steps` steps gives steps/s (collation, forward, backward, optimizer, logging). Memory: the worker's peak RSS
  and the training peak (VmHWM reset right before `trainer.train()`, minus the RSS then). Sanity: before training each
  worker computes its trainer's loss on the dataset's first `--batch-size` pairs (policy = reference, so log 2 on both)
  and the mean chosen log-prob of that batch, which must agree between the frameworks (align's packed shared-prompt
  forward against TRL's plain one).
- `short`: the WHOLE PROCESS, start-up imports, data loading and tokenization, model loading, `--short-steps`
  training steps and saving the final model, from process start to exit, timed by the bench (the parent) with the
  child's peak RSS from `wait4`. align: the real CLI, `<venv>/bin/align train --config <recipe>` with a recipe the
  bench writes (`short-recipe.yaml`: model, `data.train` = the bench's JSONL file, fdpo reverse-KL, frozen reference,
  the `training:` fields below). TRL: `python bench/dpo_vs_trl.py --worker trl-process`, which does what a TRL user's
  script does: read the same JSONL, `DPOTrainer(...).train()`, `save_model`. Both log every step; the first logged
  loss must be log 2 on both, both must run `--short-steps` steps, and a preparation process checks that align's
  recipe path (`build_preference_dataset`) and `DPOTrainer` tokenize the JSONL to the same ids.

Repeats run interleaved (the frameworks alternate, `common.interleaved`); every run is kept in the JSON. The headline
per workload is the median over repeats of the paired ratio (repeat i's align against repeat i's TRL, which ran back
to back) with its min, max and spread (max − min) / median; the best-of-k ratio is given beside it. Workers run with
`OMP_WAIT_POLICY=PASSIVE` unless the environment sets it (spinning waits made steps 7-13x slower on a busy 2-core
machine).

Targets (issue 13): align >= 1.5x TRL's steps/s on `normal`, >= 2x on `long`, TRL's process wall / align's >= 1.3 on
`short`; align's peak RSS <= TRL's on every workload. Results: one table, and JSON at `--output` (atomically).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import common

FRAMEWORKS = ("align", "trl")
WORKLOADS = ("normal", "long", "short")
STEP_WORKLOADS = ("normal", "long")  # steps/s of training alone; `short` times whole processes
#: (what is compared, align / TRL or TRL / align, target)
TARGETS = {"normal": ("steps/s align / TRL", 1.5), "long": ("steps/s align / TRL", 2.0),
           "short": ("process wall TRL / align", 1.3)}

# Lengths in words, (low, high) inclusive: each sequence's length is drawn uniformly from it. --quick: a smaller model,
# shorter normal/long sequences (short's are short already), fewer steps.
FULL = {
    "model": {"vocab_size": 4096, "hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 4,
              "intermediate_size": 1024},
    "lengths": {"normal": {"prompt": (48, 64), "response": (48, 64)},
                "long": {"prompt": (192, 256), "response": (48, 64)},
                "short": {"prompt": (12, 20), "response": (8, 48)}},
    "steps": 15, "warmup": 2, "short_steps": 50, "batch_size": 8, "repeats": 3,
}
PRESETS = {"full": FULL, "quick": {
    **FULL,
    "model": dict(FULL["model"], vocab_size=1024, hidden_size=64, num_layers=2, num_kv_heads=2, intermediate_size=256),
    "lengths": dict(FULL["lengths"], normal={"prompt": (12, 16), "response": (12, 16)},
                    long={"prompt": (48, 64), "response": (12, 16)}),
    "steps": 3, "warmup": 1, "short_steps": 4, "batch_size": 4, "repeats": 1,
}}
LEARNING_RATE = 1e-6
BETA = 0.1
MAX_LENGTH = 1024  # prompt + one completion; above every generated sequence, so nothing is truncated on either side


# ---------------------------------------------------------------------------------------------------------------
# Data and settings (deterministic, built identically in every process)


def make_rows(spec: dict, workload: str) -> list[dict[str, str]]:
    """The workload's synthetic prompt/chosen/rejected rows (TRL's explicit-prompt text format): `batch_size` per
    step. Words follow a Zipf-like law over the synthetic vocabulary; completions start with a space (TRL's
    convention), so `prompt + chosen` tokenizes to the prompt's ids followed by the chosen ids."""
    lengths = spec["lengths"][workload]
    words = common.synthetic_words(common.build_tokenizer(spec["model"]["vocab_size"]))
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    rng = random.Random(f"{spec['seed']}-{workload}")

    def text(low_high) -> str:
        return " ".join(rng.choices(words, weights=weights, k=rng.randint(*low_high)))

    steps = spec["short_steps"] if workload == "short" else spec["warmup"] + spec["steps"]
    return [{"prompt": text(lengths["prompt"]), "chosen": " " + text(lengths["response"]),
             "rejected": " " + text(lengths["response"])} for _ in range(spec["batch_size"] * steps)]


def ids_digest(triples) -> str:
    """sha256 of the token ids of every (prompt, chosen, rejected) triple: both frameworks must train on the same."""
    h = hashlib.sha256()
    for p, c, r in triples:
        h.update(json.dumps([list(p), list(c), list(r)]).encode())
    return h.hexdigest()[:16]


def mean_tokens(triples) -> dict:
    return {k: sum(len(t[i]) for t in triples) / len(triples) for i, k in enumerate(("prompt", "chosen", "rejected"))}


def training_kwargs(spec: dict, output_dir: str, max_steps: int, logging_steps: int) -> dict:
    """`TrainingArguments` fields shared by both frameworks (and the `training:` section of align's recipe)."""
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": spec["batch_size"],
        "gradient_accumulation_steps": 1,
        "max_steps": max_steps,
        "learning_rate": LEARNING_RATE,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "optim": "adamw_torch",
        "weight_decay": 0.0,
        "bf16": False,
        "fp16": False,
        # align's name (and transformers >= 5.20's); `trl_config` passes it under the installed transformers' name.
        # TRL 1.16 defaults it to True.
        "activation_checkpointing": False,
        # One process on CPU, on both sides (no process group: a `ddp_backend` without torchrun cannot start).
        "use_cpu": True,
        "logging_steps": logging_steps,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": spec["seed"],
    }


def trl_config(spec: dict, output_dir: str, max_steps: int, logging_steps: int):
    from trl import DPOConfig

    from align.config import installed_training_key

    kwargs = training_kwargs(spec, output_dir, max_steps, logging_steps)
    kwargs[installed_training_key("activation_checkpointing")] = kwargs.pop("activation_checkpointing")
    return DPOConfig(**kwargs, beta=BETA,
                     loss_type=["sigmoid"], max_length=MAX_LENGTH, disable_dropout=True,
                     precompute_ref_log_probs=False)


def align_recipe(spec: dict, model_dir: str, data_path: str, output_dir: str) -> dict:
    """The `align train` recipe of the `short` workload (the same settings as TRL's `DPOConfig`)."""
    return {
        "model": {"name_or_path": model_dir, "dtype": "float32", "attn_implementation": "sdpa"},
        "data": {"train": data_path, "max_length": MAX_LENGTH, "max_prompt_length": None},
        "objective": {"name": "fdpo", "divergence": "reverse_kl", "beta": BETA},
        "reference": {"kind": "frozen"},
        "training": training_kwargs(spec, output_dir, spec["short_steps"], logging_steps=1),
        "seed": spec["seed"],
        "disable_dropout": True,
    }


# ---------------------------------------------------------------------------------------------------------------
# Workers: `prepare` (model, data, recipe, tokenization check), `align` / `trl` (steps/s of one workload), and
# `trl-process` (the TRL side of `short`: a whole training script)


def _build_align(spec: dict, rows: list[dict], model_dir: str, output_dir: str, max_steps: int, timer):
    from align.data import tokenize_preference_rows
    from align.modeling import ModelConfig, load_policy, load_tokenizer
    from align.objectives import get_objective
    from align.references import build_reference
    from align.trainer import PreferenceTrainer, disable_dropout, training_arguments

    model_config = ModelConfig(name_or_path=model_dir, dtype="float32", attn_implementation="sdpa")
    args = training_arguments(training_kwargs(spec, output_dir, max_steps, logging_steps=10), seed=spec["seed"])
    tokenizer = load_tokenizer(model_config)
    dataset, _ = tokenize_preference_rows(rows, tokenizer, max_length=MAX_LENGTH, max_prompt_length=None)
    policy = load_policy(model_config)
    disable_dropout(policy)
    reference = build_reference("frozen", {}, policy=policy, model_config=model_config)
    disable_dropout(reference.model)
    objective = get_objective("fdpo", beta=BETA, seed=spec["seed"])
    trainer = PreferenceTrainer(model=policy, args=args, objective=objective, reference=reference,
                                train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
    first = [dataset[i] for i in range(spec["batch_size"])]
    return trainer, _align_triples(dataset), first


def _align_triples(dataset) -> list[tuple]:
    return [(ex["prompt_input_ids"], ex["chosen_input_ids"], ex["rejected_input_ids"])
            for ex in (dataset[i] for i in range(len(dataset)))]


def _build_trl(spec: dict, rows: list[dict], model_dir: str, output_dir: str, max_steps: int, timer):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    args = trl_config(spec, output_dir, max_steps, logging_steps=10)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    policy.config.use_cache = False  # as align's loader does; neither forward uses a cache
    # ref_model=None: TRL loads the frozen reference from the policy's folder with the policy's dtype and attention.
    trainer = DPOTrainer(model=policy, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[timer] if timer else None)
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    triples = [tuple(row[k] for k in keys) for row in trainer.train_dataset.select_columns(list(keys))]
    first = [dict(zip(keys, triples[i])) for i in range(spec["batch_size"])]
    return trainer, triples, first


def _mean_chosen_logps(framework: str, trainer, inputs) -> float:
    """Mean over the batch of log π(chosen | prompt), from each framework's own batch layout.

    align: its packed shared-prompt forward (`align.logps.pair_logps`). TRL: a plain forward of TRL's
    [prompt+chosen ; prompt+rejected] batch, log-softmax at the labels over the completion mask. The two agree only if
    align's packing (4D mask, position ids, kept logits) reproduces the unpacked computation.
    """
    import torch

    model = trainer.model
    with torch.no_grad():
        if framework == "align":
            from align.logps import pair_logps

            return float(pair_logps(model, inputs).chosen_sum().mean())
        ids, mask = inputs["input_ids"], inputs["completion_mask"]
        logits = model(input_ids=ids, attention_mask=inputs["attention_mask"], use_cache=False).logits
        logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        per_sequence = (logps * mask[:, 1:]).sum(-1)
        return float(per_sequence[: len(ids) // 2].mean())  # the first half of TRL's batch is the chosen rows


def measure_steps(framework: str, workload: str, spec: dict, model_dir: str) -> dict:
    """Steps/s, memory and the step-0 sanity figures of one framework on one workload."""
    import torch

    from align.config import installed_training_key

    timer = common.step_timer(spec["warmup"], spec["steps"])
    output_dir = tempfile.mkdtemp(prefix=f"bench-{framework}-{workload}-")
    try:
        build = _build_align if framework == "align" else _build_trl
        trainer, triples, first = build(spec, make_rows(spec, workload), model_dir, output_dir,
                                        spec["warmup"] + spec["steps"], timer)

        # Sanity: loss and mean chosen log-prob on the same first batch, before any update (policy = reference).
        inputs = trainer._prepare_inputs(trainer.data_collator(first))
        with torch.no_grad():
            initial_loss = float(trainer.compute_loss(trainer.model, inputs))
        # What the bench promises about both runs, checked on the objects that train.
        settings_used = {
            "bf16": bool(trainer.args.bf16), "fp16": bool(trainer.args.fp16),
            "activation_checkpointing": bool(getattr(trainer.args, installed_training_key("activation_checkpointing"))),
            "model_dtype": str(trainer.model.dtype),
            "attn_implementation": trainer.model.config._attn_implementation,
            "optim": str(getattr(trainer.args.optim, "value", trainer.args.optim)),
            "learning_rate": trainer.args.learning_rate, "batch_size": trainer.args.per_device_train_batch_size,
        }
        if settings_used["bf16"] or settings_used["fp16"] or settings_used["activation_checkpointing"]:
            raise RuntimeError(f"{framework}: the run is not fp32 without checkpointing: {settings_used}")
        initial_chosen_logps = _mean_chosen_logps(framework, trainer, inputs)
        for metrics in getattr(trainer, "_metrics", {}).values():  # keep the sanity batch out of the logged metrics
            metrics.clear() if hasattr(metrics, "clear") else metrics.flush()  # TRL: dicts; align: MetricWindow

        ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        rss_before = common.status_kib("VmRSS")
        hwm_reset = common.reset_peak_rss()
        trainer.train()
        settings_used["gradient_checkpointing_active"] = bool(getattr(trainer.model, "is_gradient_checkpointing",
                                                                      False))
        ru_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        hwm_after = common.status_kib("VmHWM")
        train_peak_kb = hwm_after if (hwm_reset and hwm_after is not None) else ru_after
        result = {
            "framework": framework,
            "workload": workload,
            **timer.summary(),
            "peak_rss_mib": max(ru_before, ru_after) / 1024,
            "rss_before_train_mib": rss_before / 1024,
            "train_peak_increase_mib": (train_peak_kb - rss_before) / 1024,
            # Without a high-water reset, a peak reached before train() would hide the training peak.
            "train_peak_exact": bool(hwm_reset or ru_after > ru_before),
            "initial_loss": initial_loss,
            "initial_chosen_logps": initial_chosen_logps,
            "ids_digest": ids_digest(triples),
            "pairs": len(triples),
            "mean_tokens": mean_tokens(triples),
            "threads": torch.get_num_threads(),
            "settings_used": settings_used,
        }
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    return result


def short_tokenization(framework: str, spec: dict, model_dir: str, work: Path) -> dict:
    """The ids digest of the `short` JSONL as each side's timed process tokenizes it: align through the recipe
    (`load_train_config` + `build_preference_dataset`, what `align train --config` runs), TRL through `DPOTrainer`."""
    if framework == "align":
        from align.config import load_train_config
        from align.data import build_preference_dataset
        from align.modeling import load_tokenizer

        config = load_train_config(work / "short-recipe.yaml")
        dataset, _ = build_preference_dataset(config.data, load_tokenizer(config.model), "train")
        triples = _align_triples(dataset)
    else:
        rows = [json.loads(line) for line in (work / "short.jsonl").read_text().splitlines()]
        output_dir = tempfile.mkdtemp(prefix="bench-trl-short-ids-")
        try:
            _, triples, _ = _build_trl(spec, rows, model_dir, output_dir, spec["short_steps"], None)
        finally:
            shutil.rmtree(output_dir, ignore_errors=True)
    return {"ids_digest": ids_digest(triples), "mean_tokens": mean_tokens(triples)}


def run_worker(framework: str, workloads: list[str], spec: dict, work: Path, result_path: str,
               check_short: bool) -> None:
    """One worker process: `measure_steps` for each of `workloads` (one per process, except with --quick), then,
    with `check_short`, the `short` data's tokenization (after everything measured)."""
    import torch

    torch.set_num_threads(spec["threads"])
    model_dir = str(work / "model")
    result = {"runs": {w: measure_steps(framework, w, spec, model_dir) for w in workloads}}
    if check_short:
        result["short"] = short_tokenization(framework, spec, model_dir, work)
    Path(result_path).write_text(json.dumps(result))


def prepare(spec: dict, work: Path) -> dict:
    """Writes the model and, for `short`, its JSONL and align recipe (into `work`)."""
    import yaml

    model_dir = common.save_tiny_model(work / "model", seed=spec["seed"], max_positions=2 * MAX_LENGTH,
                                       **spec["model"])
    if "short" in spec["workloads"]:
        rows = make_rows(spec, "short")
        (work / "short.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        recipe = align_recipe(spec, str(model_dir), str(work / "short.jsonl"), str(work / "unused"))
        (work / "short-recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    from transformers import AutoModelForCausalLM

    return {"parameters": AutoModelForCausalLM.from_pretrained(model_dir).num_parameters()}


def trl_process(spec: dict, model_dir: str, data_path: str, output_dir: str) -> None:
    """The TRL side of `short`: what a user's TRL script does, start to end (the bench times the whole process)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    with open(data_path) as f:
        dataset = Dataset.from_list([json.loads(line) for line in f])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    trainer = DPOTrainer(model=policy, args=trl_config(spec, output_dir, spec["short_steps"], logging_steps=1),
                         train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(Path(output_dir) / "final"))  # as `align train` writes final/
    (Path(output_dir) / "trl_summary.json").write_text(json.dumps(
        {"global_step": trainer.state.global_step, "log_history": trainer.state.log_history}))


# ---------------------------------------------------------------------------------------------------------------
# Driver


def _steps_run(framework: str, workloads: list[str], rep: int, spec: dict, work: Path, check_short: bool) -> dict:
    """One worker process: {workload: run} (and the `short` tokenization check under "short")."""
    result_path = work / f"{framework}-{'-'.join(workloads) or 'check'}-{rep}.json"
    t0, load0 = time.time(), os.getloadavg()[0]
    common.run_script(__file__, ["--worker", framework, "--workload", *workloads, "--spec", json.dumps(spec),
                                 "--model-dir", str(work), "--result", str(result_path),
                                 *(["--check-short"] if check_short else [])],
                      f"{framework} / {', '.join(workloads) or 'short tokenization'}",
                      env=common.worker_env(spec["threads"]))
    result = json.loads(result_path.read_text())
    for workload, run in result["runs"].items():
        run.update(repeat=rep, process_wall_s=time.time() - t0, loadavg_start=load0, loadavg_end=os.getloadavg()[0])
        print(f"  {workload:6} {framework:5} run {rep + 1}: {run['steps_per_s']:.3f} steps/s, median step "
              f"{run['step_s_median']:.3f}s, peak RSS {run['peak_rss_mib']:.0f} MiB (load {load0:.1f}->"
              f"{run['loadavg_end']:.1f})", flush=True)
    return result


def _process_run(framework: str, rep: int, spec: dict, work: Path) -> dict:
    output_dir = work / f"short-{framework}-{rep}"
    if framework == "align":
        cmd = [str(Path(sys.executable).parent / "align"), "train", "--config", str(work / "short-recipe.yaml"),
               f"training.output_dir={output_dir}"]
        summary_file = output_dir / "train_summary.json"
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "trl-process", "--spec", json.dumps(spec),
               "--model-dir", str(work / "model"), "--data", str(work / "short.jsonl"), "--result", str(output_dir)]
        summary_file = output_dir / "trl_summary.json"
    load0 = os.getloadavg()[0]
    run = common.timed_process(cmd, work / f"short-{framework}-{rep}.log", env=common.worker_env(spec["threads"]))
    summary = json.loads(summary_file.read_text())
    losses = [h["loss"] for h in summary["log_history"] if "loss" in h]
    run.update(framework=framework, repeat=rep, global_step=summary["global_step"],
               first_logged_loss=losses[0] if losses else None, command="align train --config short-recipe.yaml" if framework == "align" else
               "python bench/dpo_vs_trl.py --worker trl-process",
               loadavg_start=load0, loadavg_end=os.getloadavg()[0])
    shutil.rmtree(output_dir, ignore_errors=True)
    print(f"  short  {framework:5} run {rep + 1}: whole process {run['process_wall_s']:.2f}s (CPU "
          f"{run['process_cpu_s']:.1f}s), peak RSS {run['peak_rss_mib']:.0f} MiB (load {load0:.1f}->"
          f"{run['loadavg_end']:.1f})", flush=True)
    return run


def _summarise(workload: str, runs: dict[str, list[dict]], short_check: dict, spec: dict) -> dict:
    """Per-framework spreads, paired ratios (median over repeats), targets and sanity of one workload."""
    a, t = runs["align"], runs["trl"]
    if workload == "short":
        key, higher = "process_wall_s", False
        speed = common.paired_ratios(t, a, key)  # TRL wall / align wall
        figures = {fw: {key: common.spread(r[key] for r in rs), "process_cpu_s": common.spread(
            r["process_cpu_s"] for r in rs), "peak_rss_mib": common.spread(r["peak_rss_mib"] for r in rs)}
            for fw, rs in runs.items()}
        sanity = {
            "same token ids on both sides": len({c["ids_digest"] for c in short_check.values()}) == 1,
            "first logged loss = log 2 on both": all(r["first_logged_loss"] is not None and
                                                     abs(r["first_logged_loss"] - math.log(2)) < 1e-3
                                                     for r in a + t),
            f"{spec['short_steps']} optimizer steps on both": all(r["global_step"] == spec["short_steps"]
                                                                  for r in a + t),
        }
    else:
        key, higher = "steps_per_s", True
        speed = common.paired_ratios(a, t, key)
        figures = {fw: {k: common.spread(r[k] for r in rs) for k in ("steps_per_s", "step_s_median",
                                                                        "cpu_s_per_step", "peak_rss_mib",
                                                                        "train_peak_increase_mib")}
                   for fw, rs in runs.items()}
        sanity = {
            "same token ids on both sides": len({r["ids_digest"] for r in a + t}) == 1,
            "initial loss = log 2 on both": all(abs(r["initial_loss"] - math.log(2)) < 1e-4 for r in a + t),
            "initial chosen log-probs agree": all(abs(x["initial_chosen_logps"] - y["initial_chosen_logps"])
                                                  <= 1e-3 * max(1.0, abs(y["initial_chosen_logps"]))
                                                  for x in a for y in t),
            "fp32, no activation checkpointing on both": not any(
                r["settings_used"][k] for r in a + t
                for k in ("bf16", "fp16", "activation_checkpointing", "gradient_checkpointing_active")),
        }
    best = {fw: common.best_of(rs, key, higher=higher) for fw, rs in runs.items()}
    best_ratio = (best["align"][key] / best["trl"][key]) if higher else (best["trl"][key] / best["align"][key])
    memory = common.paired_ratios(a, t, "peak_rss_mib")
    what, target = TARGETS[workload]
    targets = {f"{what} >= {target}": speed["median"] >= target,
               "peak RSS align <= TRL": memory["median"] <= 1.0}
    if workload != "short":
        training = common.paired_ratios(a, t, "train_peak_increase_mib")
        targets["training peak RSS increase align <= TRL"] = training["median"] <= 1.0
    else:
        training = None
    return {"measure": what, "target": target, "ratio": speed, "best_of_k_ratio": best_ratio,
            "speed_target_met": speed["median"] >= target, "every_repeat_meets_target": speed["min"] >= target, "peak_rss_ratio": memory,
            "train_peak_increase_ratio": training, "figures": figures, "targets": targets,
            "targets_met": all(targets.values()), "sanity": sanity, "sane": all(sanity.values()), "runs": runs}


def _print_table(results: dict, spec: dict) -> None:
    print("\n| workload | measure | align | TRL | ratio (median, min–max, ±spread) | target | met | "
          "peak RSS align / TRL | ≤ 1 |\n|---|---|---:|---:|---:|---:|---|---:|---|")
    for workload, w in results["workloads"].items():
        key = "process_wall_s" if workload == "short" else "steps_per_s"
        unit = "process wall (s)" if workload == "short" else "steps/s"
        fmt = ".2f" if workload == "short" else ".3f"
        met = w["speed_target_met"]
        print(f"| {workload} | {unit} | {common.fmt_spread(w['figures']['align'][key], fmt)} | "
              f"{common.fmt_spread(w['figures']['trl'][key], fmt)} | {common.fmt_spread(w['ratio'])} | "
              f"≥ {w['target']} | {'yes' if met else 'NO'}"
              f"{'' if w['every_repeat_meets_target'] or not met else ' (not every repeat)'} | "
              f"{common.fmt_spread(w['peak_rss_ratio'])} | {'yes' if w['peak_rss_ratio']['median'] <= 1 else 'NO'} |")
    print(f"\n{spec['repeats']} repeat(s), interleaved; ratio = align / TRL steps/s (normal, long), TRL / align "
          "whole-process wall time (short), per repeat pair; best-of-k ratios: " + ", ".join(
              f"{k} {w['best_of_k_ratio']:.2f}" for k, w in results["workloads"].items()))
    for workload, w in results["workloads"].items():
        print(common.check_lines({**w["targets"], **{f"sanity: {k}": v for k, v in w["sanity"].items()}},
                                 prefix=f"{workload}: "))


def main(argv: list[str] | None = None) -> int:
    full, quick = PRESETS["full"], PRESETS["quick"]
    parser = common.bench_parser(__doc__, "dpo_vs_trl", threads=os.cpu_count(),
                                 threads_help="torch / OpenMP threads in every worker and process",
                                 repeats_help=f"runs per (framework, workload), interleaved (default: "
                                              f"{full['repeats']}; quick: {quick['repeats']})")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--steps", type=int, help=f"normal/long: timed optimizer steps per run (default: "
                        f"{full['steps']}; quick: {quick['steps']})")
    parser.add_argument("--warmup", type=int, help=f"normal/long: untimed warm-up steps before them (default: "
                        f"{full['warmup']}; quick: {quick['warmup']})")
    parser.add_argument("--short-steps", type=int, help=f"short: optimizer steps of each whole process (default: "
                        f"{full['short_steps']}; quick: {quick['short_steps']})")
    parser.add_argument("--batch-size", type=int, help=f"preference pairs per step (default: {full['batch_size']}; "
                        f"quick: {quick['batch_size']})")
    # Internal: the driver re-invokes this script once per process it measures.
    parser.add_argument("--worker", choices=(*FRAMEWORKS, "prepare", "trl-process"), help=argparse.SUPPRESS)
    parser.add_argument("--workload", nargs="*", choices=STEP_WORKLOADS, default=[], help=argparse.SUPPRESS)
    parser.add_argument("--check-short", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker == "prepare":
        Path(args.result).write_text(json.dumps(prepare(json.loads(args.spec), Path(args.model_dir))))
        return 0
    if args.worker == "trl-process":
        trl_process(json.loads(args.spec), args.model_dir, args.data, args.result)
        return 0
    if args.worker:
        run_worker(args.worker, args.workload, json.loads(args.spec), Path(args.model_dir), args.result,
                   args.check_short)
        return 0

    preset = PRESETS["quick" if args.quick else "full"]
    spec = {**common.apply_overrides(preset, args, ("steps", "warmup", "short_steps", "batch_size", "repeats")),
            "workloads": args.workloads, "threads": args.threads, "seed": args.seed, "quick": args.quick}
    if min(spec["warmup"], spec["steps"], spec["short_steps"], spec["repeats"], spec["batch_size"]) < 1:
        parser.error("--warmup, --steps, --short-steps, --batch-size and --repeats must be >= 1 (the first step "
                     "includes one-off set-up)")

    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="bench-dpo-vs-trl-"))
    results: dict = {"spec": {**spec, "learning_rate": LEARNING_RATE, "beta": BETA, "max_length": MAX_LENGTH,
                              "optimizer": "adamw_torch", "precision": "fp32", "activation_checkpointing": False,
                              "attn_implementation": "sdpa", "targets": TARGETS},
                     "machine": common.machine(), "workloads": {}}
    try:
        common.run_script(__file__, ["--worker", "prepare", "--spec", json.dumps(spec), "--model-dir", str(work),
                                     "--result", str(work / "prepare.json")], "model and data preparation",
                          env=common.worker_env(spec["threads"]))
        prepared = json.loads((work / "prepare.json").read_text())
        results["parameters"] = prepared["parameters"]
        m = spec["model"]
        print(f"tiny Llama ({prepared['parameters'] / 1e6:.1f}M parameters): vocab {m['vocab_size']}, hidden "
              f"{m['hidden_size']}, {m['num_layers']} layers, {m['num_heads']} heads; fp32, sdpa, {spec['threads']} "
              f"threads; batch {spec['batch_size']} pairs; normal/long: {spec['warmup']} warm-up + {spec['steps']} "
              f"timed steps; short: whole processes of {spec['short_steps']} steps; {spec['repeats']} interleaved "
              f"repeat(s) (load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)", flush=True)
        # normal / long: one worker process per (framework, workload, repeat); --quick: one per (framework,
        # repeat) for both, to keep the smoke run short. The first process of each framework also checks how it
        # tokenizes the `short` data; with no step workload, a process does only that.
        step_workloads = [w for w in spec["workloads"] if w in STEP_WORKLOADS]
        groups = [step_workloads] if spec["quick"] or not step_workloads else [[w] for w in step_workloads]
        short_check: dict[str, dict] = {}

        def steps_run(framework: str, rep: int, group: list[str]) -> dict:
            check = "short" in spec["workloads"] and framework not in short_check
            result = _steps_run(framework, group, rep, spec, work, check)
            if check:
                short_check[framework] = result["short"]
            return result["runs"]

        for group in groups:
            if not group and "short" not in spec["workloads"]:
                continue
            reps = spec["repeats"] if group else 1
            grouped = common.interleaved(FRAMEWORKS, reps, lambda fw, rep: steps_run(fw, rep, group))
            for workload in group:
                runs = {fw: [r[workload] for r in rs] for fw, rs in grouped.items()}
                summary = results["workloads"][workload] = _summarise(workload, runs, short_check, spec)
                summary["mean_tokens"] = runs["align"][0]["mean_tokens"]
        if "short" in spec["workloads"]:
            runs = common.interleaved(FRAMEWORKS, spec["repeats"], lambda fw, rep: _process_run(fw, rep, spec, work))
            summary = results["workloads"]["short"] = _summarise("short", runs, short_check, spec)
            summary["mean_tokens"] = short_check["align"]["mean_tokens"]
            summary["tokenization"] = short_check
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _print_table(results, spec)
    results["all_targets_met"] = all(w["targets_met"] for w in results["workloads"].values())
    results["all_sane"] = all(w["sane"] for w in results["workloads"].values())
    results["wall_s"] = time.time() - started
    results["align_source_changed_during_run"] = common.source_digest() != results["machine"]["align_source_digest"]
    common.write_json(args.output, results)
    print(f"all targets {'met' if results['all_targets_met'] else 'NOT met'}; sanity "
          f"{'ok' if results['all_sane'] else 'FAILED'}; {results['wall_s']:.0f}s in all; results in {args.output}")
    if results["align_source_changed_during_run"]:
        print("WARNING: align's source changed while the bench ran: runs measured different code")
    return 0 if results["all_sane"] else 1


if __name__ == "__main__":
    sys.exit(main())
