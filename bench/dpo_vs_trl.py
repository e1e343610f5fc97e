#!/usr/bin/env python
"""Benchmark: align's DPO (`PreferenceTrainer` + `fdpo`) against TRL's `DPOTrainer`, same model, data and settings.

    python bench/dpo_vs_trl.py                 # full run (two settings x two frameworks x 2 repeats), ~6-7 min on 2 cores
    python bench/dpo_vs_trl.py --quick         # smoke run (small model, few steps)

What is compared
----------------
- Model: a tiny Llama (`LlamaConfig`, random init) and a word-level tokenizer built here, written with
  `save_pretrained` once and loaded with `from_pretrained` by both frameworks. Policy and frozen reference (a second
  copy loaded from the same folder) on both sides; no PEFT.
- Data: synthetic preference pairs generated from a fixed seed, identical on both sides (the bench checks that both
  frameworks tokenize them to the same ids). Two settings: `normal` (prompt and responses of similar length) and
  `long` (prompts 4x longer than responses).
- Training: fp32, no gradient checkpointing (TRL 1.16 defaults to bf16 and gradient checkpointing, so both are set
  off explicitly), AdamW (`adamw_torch`), same learning rate, schedule, beta (sigmoid / reverse-KL DPO), batch size,
  max length (large enough that nothing is truncated), seed and thread count; dropout disabled; no saving;
  `report_to="none"`.
- Each (framework, setting) runs in its own subprocess (`--worker`), so peak memory is per run. A `TrainerCallback`
  timestamps every optimizer step; after `--warmup` steps, the wall time of the next `--steps` steps gives steps/s
  (everything a training step does: data collation, forward, backward, optimizer, logging). Each pair of runs is
  repeated `--repeats` times in alternating order and the fastest run of each framework counts (the usual defence
  against a shared machine; every run is kept in the JSON). Process CPU seconds per step are reported too.
  Workers run with `OMP_WAIT_POLICY=PASSIVE` unless the environment sets it: with spinning OpenMP waits, steps on a
  busy 2-core machine were measured 7-13x slower and erratic.
- Memory: peak RSS of the worker (`getrusage(RUSAGE_SELF).ru_maxrss`, whole process) and the training peak: the
  highest RSS during `trainer.train()` minus the RSS right before it (the kernel's RSS high-water mark is reset
  just before `train()` via /proc/self/clear_refs where permitted, so this isolates training memory).
- Sanity: before training, each worker computes its trainer's loss on the same first batch (the dataset's first
  `--batch-size` pairs). Policy = reference there, so both must be log 2 = 0.6931; the mean chosen sequence
  log-prob of that batch must agree between the frameworks (it checks align's shared-prompt packing against TRL's
  plain forward).

Targets (from the issue): align >= 1.5x TRL's steps/s with peak memory <= TRL's on normal data; >= 2x steps/s on
long-prompt data. Results are printed as a table and written as JSON to `--output` (atomically).
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "bench" / "results" / "dpo_vs_trl.json"
FRAMEWORKS = ("align", "trl")
SETTINGS = ("normal", "long")
# Speed target (align steps/s ÷ TRL steps/s) per setting; memory target: align peak <= TRL peak on `normal`.
SPEED_TARGETS = {"normal": 1.5, "long": 2.0}
MEMORY_TARGET_SETTINGS = ("normal",)

# Full and quick presets. Lengths are in words (= tokens with the word-level tokenizer); each sequence's length is
# drawn uniformly from [0.75 L, L], then the prompt gets BOS and each response EOS.
PRESETS = {
    "full": {
        "model": {"vocab_size": 4096, "hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 4,
                  "intermediate_size": 1024},
        "lengths": {"normal": (64, 64), "long": (256, 64)},  # (prompt, response)
        "steps": 15, "warmup": 2, "batch_size": 8, "repeats": 2,
    },
    "quick": {
        "model": {"vocab_size": 1024, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 256},
        "lengths": {"normal": (16, 16), "long": (64, 16)},
        "steps": 3, "warmup": 1, "batch_size": 4,
    },
}
LEARNING_RATE = 1e-6
BETA = 0.1
MAX_LENGTH = 1024  # prompt + one completion; above every generated sequence, so nothing is truncated on either side


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces: tokenizer, model, data (deterministic, built identically in every worker)


SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


def vocabulary(vocab_size: int) -> list[str]:
    """Specials first (`<pad>` = 0), then synthetic words `w0 ... w{n}` up to `vocab_size` entries."""
    return [*SPECIAL_TOKENS, *(f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS)))]


def build_tokenizer(vocab_size: int):
    """A word-level fast tokenizer in the style of `align.toy_world.build_tokenizer`, over a larger vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary(vocab_size))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def save_model(model_dir: Path, spec: dict) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    m = spec["model"]
    tokenizer = build_tokenizer(m["vocab_size"])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_layers"], num_attention_heads=m["num_heads"],
        num_key_value_heads=m["num_kv_heads"], max_position_embeddings=2 * MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
        attention_dropout=0.0,
    )
    torch.manual_seed(spec["seed"])
    model = LlamaForCausalLM(config)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)


def make_rows(spec: dict, setting: str) -> list[dict[str, str]]:
    """`batch_size * (warmup + steps)` synthetic prompt/chosen/rejected rows (TRL's explicit-prompt text format).

    Words follow a Zipf-like law over the synthetic vocabulary; completions start with a space (TRL's convention),
    so `prompt + chosen` tokenizes to the prompt's ids followed by the chosen ids.
    """
    prompt_len, response_len = spec["lengths"][setting]
    n_words = spec["model"]["vocab_size"] - len(SPECIAL_TOKENS)
    words = [f"w{i}" for i in range(n_words)]
    weights = [1.0 / (rank + 1) for rank in range(n_words)]
    rng = random.Random(f"{spec['seed']}-{setting}")

    def text(length: int) -> str:
        n = rng.randint(max(1, round(0.75 * length)), length)
        return " ".join(rng.choices(words, weights=weights, k=n))

    n_rows = spec["batch_size"] * (spec["warmup"] + spec["steps"])
    return [{"prompt": text(prompt_len), "chosen": " " + text(response_len), "rejected": " " + text(response_len)}
            for _ in range(n_rows)]


def ids_digest(triples) -> str:
    """sha256 of the token ids of every (prompt, chosen, rejected) triple: both frameworks must train on the same."""
    h = hashlib.sha256()
    for p, c, r in triples:
        h.update(json.dumps([list(p), list(c), list(r)]).encode())
    return h.hexdigest()[:16]


def training_kwargs(spec: dict, output_dir: str) -> dict:
    """`TrainingArguments` fields shared by both frameworks."""
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": spec["batch_size"],
        "gradient_accumulation_steps": 1,
        "max_steps": spec["warmup"] + spec["steps"],
        "learning_rate": LEARNING_RATE,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "optim": "adamw_torch",
        "weight_decay": 0.0,
        "bf16": False,
        "fp16": False,
        # transformers 5 name; `gradient_checkpointing` is its deprecated alias, and TRL 1.16 defaults it to True.
        "activation_checkpointing": False,
        # One process on CPU, on both sides (no process group: a `ddp_backend` without torchrun cannot start).
        "use_cpu": True,
        "ddp_backend": None,
        "logging_steps": 10,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": spec["seed"],
    }


# ---------------------------------------------------------------------------------------------------------------
# Worker: one framework, one setting, in its own process


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Resets the kernel's RSS high-water mark (VmHWM) of this process (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _step_timer(warmup: int):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Timestamps (wall and process CPU time) the end of every optimizer step, after optimizer and scheduler."""

        def __init__(self):
            self.ends: list[tuple[float, float]] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append((time.perf_counter(), time.process_time()))

        def summary(self, steps: int) -> dict:
            if len(self.ends) < warmup + steps:
                raise RuntimeError(f"only {len(self.ends)} optimizer steps ran, expected {warmup + steps}")
            timed = self.ends[warmup - 1:warmup + steps]  # the end of the last warm-up step opens the window
            durations = [b[0] - a[0] for a, b in zip(timed, timed[1:])]
            wall = timed[-1][0] - timed[0][0]
            return {"timed_steps": steps, "timed_wall_s": wall, "steps_per_s": steps / wall,
                    "step_s_median": sorted(durations)[len(durations) // 2],
                    "cpu_s_per_step": (timed[-1][1] - timed[0][1]) / steps, "step_s": durations}

    return StepTimer()


def _build_align(spec: dict, setting: str, model_dir: str, output_dir: str, timer):
    from align.data import tokenize_preference_rows
    from align.modeling import ModelConfig, load_policy, load_tokenizer
    from align.objectives import get_objective
    from align.references import build_reference
    from align.trainer import PreferenceTrainer, disable_dropout, training_arguments

    model_config = ModelConfig(name_or_path=model_dir, dtype="float32", attn_implementation="sdpa")
    args = training_arguments(training_kwargs(spec, output_dir), seed=spec["seed"])
    tokenizer = load_tokenizer(model_config)
    dataset, _ = tokenize_preference_rows(make_rows(spec, setting), tokenizer, source=setting,
                                          max_length=MAX_LENGTH, max_prompt_length=None)
    policy = load_policy(model_config)
    disable_dropout(policy)
    reference = build_reference("frozen", {}, policy=policy, model_config=model_config)
    disable_dropout(reference.model)
    objective = get_objective("fdpo", beta=BETA, seed=spec["seed"])
    trainer = PreferenceTrainer(model=policy, args=args, objective=objective, reference=reference,
                                train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
    triples = [(ex["prompt_input_ids"], ex["chosen_input_ids"], ex["rejected_input_ids"])
               for ex in (dataset[i] for i in range(len(dataset)))]
    first = [dataset[i] for i in range(spec["batch_size"])]
    return trainer, triples, first


def _build_trl(spec: dict, setting: str, model_dir: str, output_dir: str, timer):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**training_kwargs(spec, output_dir), beta=BETA, loss_type=["sigmoid"], max_length=MAX_LENGTH,
                     disable_dropout=True, precompute_ref_log_probs=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    policy.config.use_cache = False  # as align's loader does; neither forward uses a cache
    # ref_model=None: TRL loads the frozen reference from the policy's folder with the policy's dtype and attention.
    trainer = DPOTrainer(model=policy, args=args, train_dataset=Dataset.from_list(make_rows(spec, setting)),
                         processing_class=tokenizer, callbacks=[timer])
    ds = trainer.train_dataset
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    triples = [tuple(row[k] for k in keys) for row in ds.select_columns(list(keys))]
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


def run_worker(framework: str, setting: str, spec: dict, model_dir: str, result_path: str) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    timer = _step_timer(spec["warmup"])
    output_dir = tempfile.mkdtemp(prefix=f"bench-{framework}-{setting}-")
    try:
        build = _build_align if framework == "align" else _build_trl
        trainer, triples, first = build(spec, setting, model_dir, output_dir, timer)

        # Sanity: loss and mean chosen log-prob on the same first batch, before any update (policy = reference).
        inputs = trainer._prepare_inputs(trainer.data_collator(first))
        with torch.no_grad():
            initial_loss = float(trainer.compute_loss(trainer.model, inputs))
        # What the bench promises about both runs, checked on the objects that train.
        settings_used = {
            "bf16": bool(trainer.args.bf16), "fp16": bool(trainer.args.fp16),
            "activation_checkpointing": bool(trainer.args.activation_checkpointing),
            "model_dtype": str(trainer.model.dtype),
            "attn_implementation": trainer.model.config._attn_implementation,
            "optim": str(getattr(trainer.args.optim, "value", trainer.args.optim)), "learning_rate": trainer.args.learning_rate,
            "batch_size": trainer.args.per_device_train_batch_size,
        }
        if settings_used["bf16"] or settings_used["fp16"] or settings_used["activation_checkpointing"]:
            raise RuntimeError(f"{framework}: the run is not fp32 without checkpointing: {settings_used}")
        initial_chosen_logps = _mean_chosen_logps(framework, trainer, inputs)
        for metrics in getattr(trainer, "_metrics", {}).values():  # keep the sanity batch out of the logged metrics
            metrics.clear()

        ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        rss_before = _proc_status_kb("VmRSS")
        hwm_reset = _reset_peak_rss()
        trainer.train()
        settings_used["gradient_checkpointing_active"] = bool(getattr(trainer.model, "is_gradient_checkpointing",
                                                                      False))
        ru_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        hwm_after = _proc_status_kb("VmHWM")
        train_peak_kb = hwm_after if (hwm_reset and hwm_after is not None) else ru_after
        result = {
            "framework": framework,
            "setting": setting,
            **timer.summary(spec["steps"]),
            "peak_rss_mib": max(ru_before, ru_after) / 1024,
            "rss_before_train_mib": rss_before / 1024,
            "train_peak_increase_mib": (train_peak_kb - rss_before) / 1024,
            # Without a high-water reset, a peak reached before train() would hide the training peak.
            "train_peak_exact": bool(hwm_reset or ru_after > ru_before),
            "initial_loss": initial_loss,
            "initial_chosen_logps": initial_chosen_logps,
            "ids_digest": ids_digest(triples),
            "pairs": len(triples),
            "mean_tokens": {k: sum(len(t[i]) for t in triples) / len(triples)
                            for i, k in enumerate(("prompt", "chosen", "rejected"))},
            "threads": torch.get_num_threads(),
            "settings_used": settings_used,
        }
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    with open(result_path, "w") as f:
        json.dump(result, f)


# ---------------------------------------------------------------------------------------------------------------
# Driver


def _run_subprocess(argv: list[str], what: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore",
           # OpenMP threads that spin while waiting collapse when the cores are shared (a step measured 7-13x slower
           # on a busy 2-core machine); sleeping waits keep the timings stable. Set it yourself to override.
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], env=env, cwd=REPO_ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-6000:])
        raise SystemExit(f"{what} failed (exit {proc.returncode})")


def _fmt_table(setting: str, spec: dict, best: dict, ratios: dict) -> str:
    a, t = best["align"], best["trl"]
    prompt_tokens = a["mean_tokens"]["prompt"]
    response_tokens = (a["mean_tokens"]["chosen"] + a["mean_tokens"]["rejected"]) / 2
    rows = [
        ("steps/s", "{:.3f}", "steps_per_s", f"{ratios['speed']:.2f}x"),
        ("median step (s)", "{:.3f}", "step_s_median", f"{ratios['speed_median_step']:.2f}x"),
        ("CPU s/step", "{:.2f}", "cpu_s_per_step", f"{t['cpu_s_per_step'] / a['cpu_s_per_step']:.2f}x"),
        ("peak RSS (MiB)", "{:.0f}", "peak_rss_mib", f"{ratios['peak_rss']:.2f}"),
        ("train peak +RSS (MiB)", "{:.0f}", "train_peak_increase_mib", f"{ratios['train_peak_increase']:.2f}"),
        ("initial loss", "{:.4f}", "initial_loss", ""),
        ("initial logps/chosen", "{:.3f}", "initial_chosen_logps", ""),
        ("load avg (1 min)", "{:.1f}", "loadavg_end", ""),
    ]
    lines = [f"== {setting}: prompt ~{prompt_tokens:.0f} tokens, responses ~{response_tokens:.0f} tokens; "
             f"batch {spec['batch_size']} pairs; {spec['steps']} timed steps, best of {spec['repeats']} ==",
             f"{'':24}{'align':>12}{'trl':>12}{'align/trl':>12}"]
    for label, fmt, key, ratio in rows:
        lines.append(f"{label:24}{fmt.format(a[key]):>12}{fmt.format(t[key]):>12}{ratio:>12}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model and few steps: a smoke run")
    parser.add_argument("--steps", type=int, help="timed optimizer steps per run (default: %d; quick: %d)"
                        % (PRESETS["full"]["steps"], PRESETS["quick"]["steps"]))
    parser.add_argument("--warmup", type=int, help="untimed warm-up steps before them (default: %d; quick: %d)"
                        % (PRESETS["full"]["warmup"], PRESETS["quick"]["warmup"]))
    parser.add_argument("--batch-size", type=int, help="preference pairs per step (default: %d; quick: %d)"
                        % (PRESETS["full"]["batch_size"], PRESETS["quick"]["batch_size"]))
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per (framework, setting), alternating the order; the fastest counts "
                             "(default: %d; quick: 1)" % PRESETS["full"]["repeats"])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in every worker")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results (written atomically)")
    # Internal: the driver re-invokes this script once per (framework, setting, repeat).
    parser.add_argument("--worker", choices=(*FRAMEWORKS, "prepare"), help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker == "prepare":
        save_model(Path(args.model_dir), json.loads(args.spec))
        return 0
    if args.worker:
        run_worker(args.worker, args.setting, json.loads(args.spec), args.model_dir, args.result)
        return 0

    preset = PRESETS["quick" if args.quick else "full"]
    spec = {
        "model": preset["model"],
        "lengths": preset["lengths"],
        "steps": args.steps or preset["steps"],
        "warmup": args.warmup if args.warmup is not None else preset["warmup"],
        "batch_size": args.batch_size or preset["batch_size"],
        "repeats": args.repeats or preset.get("repeats", 1),
        "threads": args.threads,
        "seed": args.seed,
    }
    if spec["warmup"] < 1 or spec["steps"] < 1 or spec["repeats"] < 1:
        parser.error("--warmup, --steps and --repeats must be >= 1 (the first step includes one-off setup)")

    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="bench-dpo-vs-trl-"))
    results: dict = {"spec": {**spec, "learning_rate": LEARNING_RATE, "beta": BETA, "max_length": MAX_LENGTH,
                              "optimizer": "adamw_torch", "precision": "fp32", "activation_checkpointing": False,
                              "attn_implementation": "sdpa", "quick": args.quick,
                              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                              "cpu_count": os.cpu_count()},
                     "settings": {}}
    try:
        model_dir = work / "model"
        spec_json = json.dumps(spec)
        _run_subprocess(["--worker", "prepare", "--spec", spec_json, "--model-dir", str(model_dir)], "model build")
        m = spec["model"]
        print(f"tiny Llama: vocab {m['vocab_size']}, hidden {m['hidden_size']}, {m['num_layers']} layers, "
              f"{m['num_heads']} heads; fp32, sdpa, {spec['threads']} threads; batch {spec['batch_size']} pairs; "
              f"{spec['warmup']} warm-up + {spec['steps']} timed steps; best of {spec['repeats']} runs "
              f"(load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)", flush=True)
        all_met = True
        for setting in args.settings:
            runs: dict[str, list[dict]] = {fw: [] for fw in FRAMEWORKS}
            for rep in range(spec["repeats"]):
                for framework in (FRAMEWORKS if rep % 2 == 0 else FRAMEWORKS[::-1]):
                    result_path = work / f"{framework}-{setting}-{rep}.json"
                    t0, load0 = time.time(), os.getloadavg()[0]
                    _run_subprocess(["--worker", framework, "--setting", setting, "--spec", spec_json,
                                     "--model-dir", str(model_dir), "--result", str(result_path)],
                                    f"{framework} / {setting}")
                    run = json.loads(result_path.read_text())
                    run.update(process_wall_s=time.time() - t0, loadavg_start=load0, loadavg_end=os.getloadavg()[0])
                    runs[framework].append(run)
                    print(f"  {setting:6} {framework:5} run {rep + 1}: {run['steps_per_s']:.3f} steps/s, "
                          f"median step {run['step_s_median']:.2f}s ({run['process_wall_s']:.0f}s in all, "
                          f"load {load0:.1f}->{run['loadavg_end']:.1f})", flush=True)
            best = {fw: max(rs, key=lambda r: r["steps_per_s"]) for fw, rs in runs.items()}
            a, t = best["align"], best["trl"]
            if len({r["ids_digest"] for rs in runs.values() for r in rs}) != 1:
                raise SystemExit(f"{setting}: align and TRL tokenized the pairs differently; the comparison would "
                                 "be meaningless")
            ratios = {
                "speed": a["steps_per_s"] / t["steps_per_s"],
                "speed_median_step": t["step_s_median"] / a["step_s_median"],
                "peak_rss": a["peak_rss_mib"] / t["peak_rss_mib"],
                "train_peak_increase": a["train_peak_increase_mib"] / t["train_peak_increase_mib"],
            }
            checks = {f"speed >= {SPEED_TARGETS[setting]}x TRL": ratios["speed"] >= SPEED_TARGETS[setting]}
            if setting in MEMORY_TARGET_SETTINGS:
                checks["peak RSS <= TRL"] = ratios["peak_rss"] <= 1.0
                checks["training peak RSS increase <= TRL"] = ratios["train_peak_increase"] <= 1.0
            sanity = {
                "initial loss = log 2 on both": all(abs(r["initial_loss"] - math.log(2)) < 1e-4 for r in (a, t)),
                "initial chosen log-probs agree": abs(a["initial_chosen_logps"] - t["initial_chosen_logps"])
                <= 1e-3 * max(1.0, abs(t["initial_chosen_logps"])),
                "fp32, no activation checkpointing on both": not any(
                    r["settings_used"][k] for r in (a, t)
                    for k in ("bf16", "fp16", "activation_checkpointing", "gradient_checkpointing_active")),
            }
            met = all(checks.values())
            all_met &= met
            print()
            print(_fmt_table(setting, spec, best, ratios))
            for name, ok in {**checks, **{f"sanity: {k}": v for k, v in sanity.items()}}.items():
                print(f"  [{'x' if ok else ' '}] {name}")
            print(f"  {setting}: targets {'MET' if met else 'NOT MET'}\n", flush=True)
            results["settings"][setting] = {"best": best, "ratios": ratios, "targets": checks, "targets_met": met,
                                            "sanity": sanity, "runs": runs}
        results["all_targets_met"] = all_met
        results["wall_s"] = time.time() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(f".{args.output.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, args.output)
    print(f"all targets {'met' if results['all_targets_met'] else 'NOT met'}; {results['wall_s']:.0f}s in all; "
          f"results in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
