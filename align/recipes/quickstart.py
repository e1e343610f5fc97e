"""`align quickstart`: a full preference-alignment run on the embedded toy world, on CPU, in a few minutes.

    1. build   a tiny Llama and the word-level tokenizer, saved with `save_pretrained`      → base/
    2. SFT     on grammar samples (TRL's SFTTrainer), loaded back like a Hub model           → sft/
    3. sample  two responses per prompt from the SFT model; label them with the gold reward → pairs.jsonl
    4. f-DPO   with `align train` on those pairs (the recipe is `QUICKSTART_RECIPE`, which is
               `configs/quickstart.yaml` with the paths filled in)                          → dpo/final/
    5. measure gold reward, length and KL(policy ‖ SFT) on held-out prompts, before and after
                                                                                              → summary.json,
                                                                                                gold_reward.png

Everything is built under a temporary name; when complete, the quickstart's own entries (`QUICKSTART_OUTPUTS`)
replace those of a previous quickstart in the output folder, each renamed into place, and nothing else there is
touched (a run trained into `outputs/quickstart/dpo-rerun`, a user's notes). A non-empty folder that no quickstart
wrote is refused unless `overwrite` is set.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import torch

from align import toy_world
from align.io import atomic_write_json, held_entries, replace_entry, scratch_directory

#: The f-DPO stage, identical to `configs/quickstart.yaml` (a test keeps them equal). Paths are relative to the
#: quickstart's output directory.
QUICKSTART_RECIPE = {
    "model": {"name_or_path": "sft", "dtype": "float32"},
    "data": {"train": "pairs.jsonl", "max_length": 48, "max_prompt_length": 16},
    "objective": {"name": "fdpo", "divergence": "reverse_kl", "beta": 0.1},
    "reference": {"kind": "frozen"},
    "training": {
        "output_dir": "dpo",
        "per_device_train_batch_size": 32,
        "num_train_epochs": 2,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 5,
        "logging_steps": 10,
        "save_strategy": "no",
        "report_to": "tensorboard",
    },
    "seed": 0,
}

#: What the quickstart writes into its output folder; nothing else there is touched. MARKER says a quickstart wrote
#: the folder, so a rerun may replace these entries.
QUICKSTART_OUTPUTS = ("base", "sft", "pairs.jsonl", "dpo", "summary.json", "gold_reward.png")
MARKER = ".align-quickstart"

SFT_ROWS, SFT_EPOCHS = 3000, 2
PAIR_PROMPTS, EVAL_PROMPTS, EVAL_SAMPLES = 1500, 256, 2
MAX_NEW_TOKENS = 24


def _sample(model, tokenizer, prompts, n, seed, progress=True):
    from align.rollout import HFRollout, SamplingParams

    rollout = HFRollout(model, tokenizer, batch_size=128, progress=progress)
    # Plain ancestral sampling (temperature 1, no top-k/top-p) so the samples are draws from the policy itself and
    # the KL estimate below is unbiased.
    return rollout.generate(prompts, n=n, sampling=SamplingParams(max_new_tokens=MAX_NEW_TOKENS, seed=seed))


def train_toy_sft(base_dir: Path, out_dir: Path, seed: int) -> None:
    """The quickstart's SFT stage: TRL's SFTTrainer on grammar samples, saved to `out_dir` (reused by tests and
    studies)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from align.config import installed_training_key

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(out_dir), per_device_train_batch_size=64, num_train_epochs=SFT_EPOCHS, learning_rate=3e-3,
        lr_scheduler_type="cosine", warmup_steps=10, logging_steps=25, save_strategy="no", report_to="none",
        max_length=64, seed=seed,
        # TRL turns both on by default even on CPU, where bf16 matmuls are emulated: keep fp32, no recomputation.
        bf16=False, dataloader_pin_memory=torch.cuda.is_available(),
        **{installed_training_key("activation_checkpointing"): False},  # gradient_checkpointing in transformers 5.19
    )
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(toy_world.make_sft_rows(SFT_ROWS, seed=seed)))
    trainer.train()
    trainer.save_model(str(out_dir))


def _gold_stats(completions) -> dict:
    texts = [c.text for group in completions for c in group]
    gold = toy_world.gold_rewards(texts)
    return {"gold": gold, "mean": statistics.fmean(gold), "std": statistics.pstdev(gold),
            "length": statistics.fmean(toy_world.num_words(t) for t in texts)}


def check_output_folder(output_dir: Path, overwrite: bool) -> None:
    """Refuses a non-empty `output_dir` that no quickstart wrote (it has no MARKER), unless `overwrite`."""
    from align.errors import AlignError

    if overwrite or not output_dir.is_dir() or (output_dir / MARKER).is_file():
        return
    shown = held_entries(output_dir)
    if shown:
        raise AlignError(f"--output-dir: '{output_dir}' already holds files that no quickstart wrote ({shown}); "
                         "choose another folder, or pass --overwrite to write the quickstart's files into it (the "
                         "other files are kept)")


def install_outputs(work: Path, output_dir: Path) -> list[str]:
    """Moves the quickstart's own entries from the finished `work` folder into `output_dir`, each replacing the entry
    of the same name by a rename; returns the names that replaced existing ones. Other entries are left alone."""
    output_dir.mkdir(parents=True, exist_ok=True)
    replaced = [name for name in QUICKSTART_OUTPUTS if (output_dir / name).exists()]
    for name in QUICKSTART_OUTPUTS:
        replace_entry(work / name, output_dir / name)
    (output_dir / MARKER).write_text(json.dumps({"outputs": list(QUICKSTART_OUTPUTS)}) + "\n")
    return replaced


def run_quickstart(output_dir: str | Path = "outputs/quickstart", *, seed: int = 0, overwrite: bool = False) -> dict:
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.config import load_train_config
    from align.logps import score_completions
    from align.recipes.train import train

    output_dir = Path(output_dir)
    check_output_folder(output_dir, overwrite)  # before anything is built
    console = Console()
    start = time.time()
    stages: dict[str, float] = {}

    def stage(name: str, t0: float) -> None:
        stages[name] = round(time.time() - t0, 1)
        console.print(f"[green]✓[/] {name} ({stages[name]} s)")

    # Built in a temporary sibling folder (removed however the run ends) and installed entry by entry once complete.
    with scratch_directory(output_dir) as work:
        t0 = time.time()
        console.rule("[bold]align quickstart[/]: toy world, SFT → pairs → f-DPO")
        toy_world.save_base_model(work / "base", seed=seed)
        stage("built tiny Llama + word-level tokenizer", t0)

        t0 = time.time()
        train_toy_sft(work / "base", work / "sft", seed)
        stage("SFT", t0)

        # Load the SFT model back exactly as a user's Hub model would be loaded.
        tokenizer = AutoTokenizer.from_pretrained(work / "sft")
        sft = AutoModelForCausalLM.from_pretrained(work / "sft", dtype=torch.float32).eval()

        t0 = time.time()
        pair_prompts = toy_world.make_prompts(PAIR_PROMPTS, seed=seed + 1)
        samples = _sample(sft, tokenizer, pair_prompts, n=2, seed=seed + 1)
        pairs = []
        for prompt, (a, b) in zip(pair_prompts, samples):
            ra, rb = toy_world.gold_reward(a.text), toy_world.gold_reward(b.text)
            if ra != rb and a.text and b.text:  # ties carry no preference
                chosen, rejected = (a, b) if ra > rb else (b, a)
                pairs.append({"prompt": prompt, "chosen": " " + chosen.text, "rejected": " " + rejected.text})
        (work / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        stage(f"sampled {len(pairs)} gold-labelled pairs from the SFT model", t0)

        t0 = time.time()
        eval_prompts = toy_world.make_prompts(EVAL_PROMPTS, seed=seed + 2)
        before = _gold_stats(_sample(sft, tokenizer, eval_prompts, n=EVAL_SAMPLES, seed=seed + 3, progress=False))
        stage("measured the SFT policy", t0)

        t0 = time.time()
        recipe = json.loads(json.dumps(QUICKSTART_RECIPE))
        recipe["model"]["name_or_path"] = str(work / "sft")
        recipe["data"]["train"] = str(work / "pairs.jsonl")
        recipe["training"]["output_dir"] = str(work / "dpo")
        recipe["seed"] = seed
        train_summary = train(load_train_config(None, base=recipe))
        _name_final_paths(work / "dpo", work, output_dir)
        stage("f-DPO", t0)

        t0 = time.time()
        policy = AutoModelForCausalLM.from_pretrained(work / "dpo" / "final", dtype=torch.float32).eval()
        after_samples = _sample(policy, tokenizer, eval_prompts, n=EVAL_SAMPLES, seed=seed + 3, progress=False)
        after = _gold_stats(after_samples)
        # KL(π ‖ π_sft) per response = E_{y∼π}[log π(y|x) − log π_sft(y|x)], estimated from the samples above.
        flat = [c for group in after_samples for c in group]
        prompt_ids = tokenizer([eval_prompts[c.prompt_index] for c in flat])["input_ids"]
        ref_logps = score_completions(sft, prompt_ids, [c.token_ids for c in flat])
        kl = statistics.fmean(float(c.logps.sum() - r.sum()) for c, r in zip(flat, ref_logps))
        stage("measured the aligned policy", t0)

        summary = {
            "gold_reward_before": round(before["mean"], 4),
            "gold_reward_after": round(after["mean"], 4),
            "gold_reward_std_before": round(before["std"], 4),
            "gold_reward_std_after": round(after["std"], 4),
            "gold_reward_optimum": toy_world.GOLD_OPTIMUM,
            "kl_to_reference": round(kl, 4),
            "mean_length_before": round(before["length"], 3),
            "mean_length_after": round(after["length"], 3),
            "pairs": len(pairs),
            "eval_samples": len(flat),
            "dpo_steps": train_summary["global_step"],
            "objective": QUICKSTART_RECIPE["objective"],
            "stage_seconds": stages,
            "wall_time_s": None,
        }
        _plot(before["gold"], after["gold"], summary, work / "gold_reward.png")
        summary["wall_time_s"] = round(time.time() - start, 1)
        atomic_write_json(work / "summary.json", summary)
        replaced = install_outputs(work, output_dir)

    _print_table(console, summary, output_dir)
    if replaced:
        console.print(f"replaced the previous quickstart's {', '.join(replaced)} in {output_dir}; other files there "
                      "are kept")
    return summary


def _name_final_paths(run_dir: Path, work: Path, final: Path) -> None:
    """The f-DPO stage saved its recipe and summary while the quickstart was still being built under a temporary
    name: make them name the paths the files will have once it is renamed to `final`."""
    from align.io import atomic_write_text

    for name in ("align_config.yaml", "train_summary.json"):
        path = run_dir / name
        if path.is_file():
            atomic_write_text(path, path.read_text().replace(str(work), str(final)))


def _plot(before: list[float], after: list[float], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Gold rewards are multiples of 0.5 (integer sentiment, LENGTH_COST = 1.5 per extra word): one bar per value.
    lo, hi = math.floor(min(before + after) * 2) / 2, math.ceil(max(before + after) * 2) / 2
    bins = [lo - 0.25 + 0.5 * i for i in range(int((hi - lo) / 0.5) + 2)]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.hist(before, bins=bins, alpha=0.55, label=f"SFT (mean {summary['gold_reward_before']:+.2f})", color="#888")
    ax.hist(after, bins=bins, alpha=0.65, label=f"f-DPO (mean {summary['gold_reward_after']:+.2f})", color="#1f77b4")
    for value, color in ((summary["gold_reward_before"], "#555"), (summary["gold_reward_after"], "#1f77b4")):
        ax.axvline(value, color=color, linestyle="--", linewidth=1)
    ax.set_xlabel("gold reward of a sampled response")
    ax.set_ylabel("responses")
    ax.set_title(f"Toy world: gold reward before and after f-DPO (KL to SFT = {summary['kl_to_reference']:.2f} nats)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _print_table(console, summary: dict, output_dir: Path) -> None:
    from rich.table import Table

    table = Table(title="align quickstart: toy world", title_style="bold")
    table.add_column("metric")
    table.add_column("SFT (before)", justify="right")
    table.add_column("f-DPO (after)", justify="right")
    table.add_row("gold reward (mean)", f"{summary['gold_reward_before']:+.3f}", f"{summary['gold_reward_after']:+.3f}")
    table.add_row("gold reward (std)", f"{summary['gold_reward_std_before']:.3f}", f"{summary['gold_reward_std_after']:.3f}")
    table.add_row("response length (words)", f"{summary['mean_length_before']:.2f}", f"{summary['mean_length_after']:.2f}")
    table.add_row("KL to reference (nats)", "0", f"{summary['kl_to_reference']:.3f}")
    console.print(table)
    console.print(f"gold optimum {summary['gold_reward_optimum']:.0f}; {summary['pairs']} pairs; "
                  f"{summary['dpo_steps']} f-DPO steps; wall time {summary['wall_time_s']} s")
    console.print(f"outputs: {output_dir}/summary.json, {output_dir}/gold_reward.png, {output_dir}/dpo/final/")
