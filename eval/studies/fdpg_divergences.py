"""Study `fdpg_divergences` (Go et al. 2023, METHODS §5): which f-divergence to the same target aligns best and keeps
the most diversity?

Setup: the toy world's SFT policy (`Study.sft`) is trained with on-policy f-DPG to the exponential target
P(y) = π_sft(y)·exp(r(y)/β) with the toy gold reward r and β = 0.1 (equal for every divergence), with each of the
divergences reverse_kl (= KL-regularised RLHF), forward_kl (= DPG), js and tv, for the same number of steps, the same
learning rate and the same seeds (configs/fdpg-toy.yaml otherwise: 8 prompts x 4 samples a step, moving baseline).

Measured after training (`eval.studies.common.measure_policy`, on samples of held-out prompts): the gold reward, the
Monte-Carlo KL to the SFT model, and diversity: distinct-2 (pooled and within prompt) and the per-token entropy of
the samples. The SFT policy itself is measured the same way as the starting point. Mean ± std over seeds.

Go et al. report that reverse KL aligns strongly but loses diversity, and that JS balances alignment and diversity
best (often beating forward KL). Here every divergence gets the same budget of steps, which does not bring all of
them to their optimum: the table compares them after equal work, as the paper's training curves do.

Outputs: results.json, results.md (the table), fdpg_divergences.png (bars of each metric, ± std and each seed, and
the gold reward and sampled KL over training steps).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from eval.studies.common import (
    Study,
    bar_panel,
    eval_prompts,
    fdpg_recipe,
    fmt,
    load_model,
    load_tokenizer,
    markdown_table,
    mean_curve,
    measure_policy,
    pyplot,
    run_fdpg,
    summarize_runs,
    train_curves,
)

DIVERGENCES = ("reverse_kl", "forward_kl", "js", "tv")
METRICS = ("gold_reward", "kl_to_sft", "distinct_2", "distinct_2_within_prompt", "entropy_per_token", "length")


@dataclass
class Settings:
    beta: float = 0.1
    steps: int = 200
    learning_rate: float = 1e-4
    logging_steps: int = 10
    eval_prompts: int = 128
    eval_samples: int = 4
    divergences: tuple[str, ...] = DIVERGENCES


FULL = Settings()
QUICK = Settings(steps=4, logging_steps=2, eval_prompts=16, eval_samples=2)
DEFAULT_SEEDS = 3


def run(study: Study) -> dict:
    s = QUICK if study.quick else FULL
    sft_dir = study.sft()
    tokenizer, sft = load_tokenizer(sft_dir), load_model(sft_dir)
    prompts = eval_prompts(s.eval_prompts)

    baseline = [measure_policy(sft, sft, tokenizer, prompts, num_samples=s.eval_samples, seed=10_000 + seed).metrics
                for seed in study.seeds]
    per_method: dict[str, list[dict]] = {d: [] for d in s.divergences}
    histories: dict[str, list[list[dict]]] = {d: [] for d in s.divergences}
    run_times: dict[str, list[float]] = {d: [] for d in s.divergences}
    for seed in study.seeds:
        for divergence in s.divergences:
            t0 = time.perf_counter()
            out = study.run_dir(f"{divergence}-seed{seed}")
            summary = run_fdpg(fdpg_recipe(sft_dir, out, seed=seed, steps=s.steps, learning_rate=s.learning_rate,
                                           divergence=divergence, target={"kind": "exponential", "beta": s.beta},
                                           logging_steps=s.logging_steps))
            policy = load_model(summary["final_model"])
            m = measure_policy(policy, sft, tokenizer, prompts, num_samples=s.eval_samples, seed=10_000 + seed)
            per_method[divergence].append(m.metrics)
            histories[divergence].append(train_curves(summary["log_history"]))
            run_times[divergence].append(time.perf_counter() - t0)
            study.log(f"seed {seed} {divergence}: gold {m.metrics['gold_reward']:+.2f}, KL {m.metrics['kl_to_sft']:.2f}"
                      f", distinct-2 {m.metrics['distinct_2']:.3f} ({run_times[divergence][-1]:.0f} s)")

    table = {"sft": summarize_runs(baseline), **{d: summarize_runs(per_method[d]) for d in s.divergences}}
    curves = {d: {key: dict(zip(("steps", "mean", "std"), mean_curve(histories[d], key)))
                  for key in ("gold_reward", "kl/sampled", "completion/distinct_2", "entropy/token")}
              for d in s.divergences}
    rows = [[name, *(fmt(table[name][k], 3 if k.startswith("distinct") else 2) for k in METRICS)]
            for name in table]
    markdown = markdown_table(["policy", "gold reward", "KL to SFT (nats)", "distinct-2 (pooled)",
                               "distinct-2 (within prompt)", "entropy/token (nats)", "length (tokens)"], rows)
    markdown += (f"\nf-DPG to the exponential target with β = {s.beta}, {s.steps} steps at learning rate "
                 f"{s.learning_rate}, 8 prompts x 4 samples a step; measured on {s.eval_prompts} held-out prompts x "
                 f"{s.eval_samples} samples. `sft` is the starting policy.\n\n" + "\n".join(_findings(table, s)) + "\n")
    results = {
        "settings": asdict(s),
        "what": "f-DPG (Go et al. 2023) to the exponential target with equal β, steps and seeds per divergence; "
                "gold reward, Monte-Carlo KL to the SFT policy and diversity of held-out samples after training",
        "metrics": {"gold_reward": "mean toy-world gold reward of held-out samples",
                    "kl_to_sft": "mean of log π(y|x) − log π_sft(y|x) over held-out samples of π (nats)",
                    "distinct_2": "distinct bigrams / bigrams over all held-out samples pooled",
                    "distinct_2_within_prompt": "the same within each prompt's samples, averaged over prompts",
                    "entropy_per_token": "mean over samples of −log π(y|x)/|y| (MC per-token entropy, nats)",
                    "length": "mean completion length in tokens (EOS included)"},
        "table": table,
        "curves": curves,
        "run_time_s": {d: [round(t, 1) for t in ts] for d, ts in run_times.items()},
        "findings": _findings(table, s),
        "deviations": [] if not study.quick else ["quick mode: 1 seed, a few steps, tiny measurement; not a result"],
    }
    return study.write(results, _figure(table, curves, s), markdown)


def _findings(table: dict, s: Settings) -> list[str]:
    """Plain statements read off the table (no claim beyond the numbers)."""
    methods = [d for d in s.divergences if d in table]
    def ranked(key: str) -> list[str]:
        return sorted(methods, key=lambda d: -table[d][key]["mean"])

    gold, div, ent = ranked("gold_reward"), ranked("distinct_2"), ranked("entropy_per_token")
    lines = [(f"- highest gold reward: {gold[0]} ({fmt(table[gold[0]]['gold_reward'])}); lowest: {gold[-1]} "
              f"({fmt(table[gold[-1]]['gold_reward'])})."),
             (f"- most diverse (pooled distinct-2): {div[0]} ({fmt(table[div[0]]['distinct_2'], 3)}); least: "
              f"{div[-1]} ({fmt(table[div[-1]]['distinct_2'], 3)}); SFT {fmt(table['sft']['distinct_2'], 3)}."),
             f"- highest per-token entropy: {ent[0]}; lowest: {ent[-1]}."]
    if "reverse_kl" in methods and "js" in methods:
        r, j = table["reverse_kl"], table["js"]
        lines.append(f"- Go et al.'s direction (reverse KL aligns most but loses diversity; JS keeps more): reverse_kl "
                     f"gold {fmt(r['gold_reward'])} vs js {fmt(j['gold_reward'])}; distinct-2 "
                     f"{fmt(r['distinct_2'], 3)} vs {fmt(j['distinct_2'], 3)}.")
    return lines


def _figure(table: dict, curves: dict, s: Settings):
    plt = pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5), dpi=100)
    names = list(table)
    colors = ["#999999"] + [f"C{i}" for i in range(len(names) - 1)]
    for ax, (key, title) in zip(axes[0], (("gold_reward", "gold reward (held-out)"),
                                          ("kl_to_sft", "KL(π‖π_sft), nats"),
                                          ("distinct_2", "distinct-2 (pooled)"),
                                          ("entropy_per_token", "entropy per token, nats"))):
        bar_panel(ax, names, [table[n][key] for n in names], title, colors=colors)
    for ax, (key, title) in zip(axes[1], (("gold_reward", "gold reward (training batches)"),
                                          ("kl/sampled", "sampled KL to π_sft (training batches)"),
                                          ("completion/distinct_2", "distinct-2 (training batches)"),
                                          ("entropy/token", "entropy/token (training batches)"))):
        for i, d in enumerate(curves):
            c = curves[d][key]
            lo = [m - e for m, e in zip(c["mean"], c["std"])]
            hi = [m + e for m, e in zip(c["mean"], c["std"])]
            ax.plot(c["steps"], c["mean"], color=f"C{i}", label=d)
            ax.fill_between(c["steps"], lo, hi, color=f"C{i}", alpha=0.2)
        ax.set_xlabel("optimizer step")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[1][0].legend(fontsize=8)
    fig.suptitle(f"f-DPG divergences to the exponential target (β = {s.beta}, {s.steps} steps): mean ± std over "
                 f"seeds, dots = seeds")
    fig.tight_layout()
    return fig
