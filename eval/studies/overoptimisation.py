"""Study `overoptimisation` (Coste et al. 2023, METHODS §8): does optimising a weak proxy reward ensemble hurt the
gold reward, and do conservative aggregations (WCO, UWO) prevent it?

Setup:
1. A WEAK proxy ensemble is trained once per run, as Coste et al. build theirs (members of one architecture and
   data, differing by seed), but starved: 3 members (`ensemble.kind: seeds`) on only 150 gold-labelled toy pairs with
   35% label noise, one epoch (`align rm train` with configs/rm/toy-ensemble.yaml's other settings). Its held-out
   pairwise accuracy against gold (500 pairs, no noise) is reported; it comes out near 60%. Each member is z-scored
   on the training responses (`aggregation.normalize: true`, stored with the ensemble), so that β and UWO's λ act on
   a known scale: a proxy reward of 1 is one standard deviation of a member's scores on the data.
2. The SFT policy is trained with reverse-KL f-DPG to the exponential target π_sft·exp(r̂/β) with a small KL weight
   (β = 0.02), where r̂ is the ensemble under each aggregation: mean, wco (min over members) and uwo (mean − λ·var
   over members, λ = 0.5, population variance: the Coste repo's best-of-n default; on z-scored members its PPO value
   λ = 0.1 would be a negligible penalty). The gold reward is logged at every logging step but never optimised.
3. Measured: gold reward, the proxy (mean of the members, the same scale for every aggregation), the optimised
   aggregate, sampled KL and completion length over training steps (training batches, mean ± std over seeds); and
   after training, on held-out prompts (`measure_policy`): gold, proxy, member disagreement (per-sample std over
   members), KL to SFT and length, beside the SFT policy's.

Verdict (in results.json `verdict`): an aggregation is over-optimised when, after training, the held-out proxy is
above the SFT policy's while the held-out gold is below the SFT policy's by more than 0.5 (half a toy gold unit:
one adjective). Coste et al.'s direction shows when mean is over-optimised and wco and uwo are not. What is seen is
reported, whichever way it goes.

Outputs: results.json, results.md (the table and verdict), overoptimisation.png (curves over steps per aggregation
and the held-out bars).
"""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from eval.studies.common import (
    Study,
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

#: Held-out gold must fall by more than this below the SFT policy's to count as over-optimisation.
GOLD_DROP = 0.5


@dataclass
class Settings:
    rm_train_pairs: int = 150
    rm_eval_pairs: int = 500
    rm_label_noise: float = 0.35
    rm_members: int = 3
    rm_epochs: float = 1.0
    rm_learning_rate: float = 3e-3
    beta: float = 0.02
    steps: int = 150
    learning_rate: float = 1e-4
    logging_steps: int = 10
    aggregations: list[dict] = field(default_factory=lambda: [{"method": "mean"}, {"method": "wco"},
                                                              {"method": "uwo", "lam": 0.5}])
    eval_prompts: int = 128
    eval_samples: int = 2


FULL = Settings()
QUICK = Settings(rm_train_pairs=64, rm_eval_pairs=64, steps=4, logging_steps=2, eval_prompts=16)
DEFAULT_SEEDS = 3


def label(spec: dict) -> str:
    return spec["method"] + "".join(f"(λ={v})" for k, v in spec.items() if k == "lam")


def train_proxy(study: Study, s: Settings) -> tuple[str, dict]:
    """Trains the weak proxy ensemble under `<work>/rm/` → (ensemble dir, its accuracy report)."""
    from align import toy_world
    from reward_models.config import load_rm_config
    from reward_models.train import train_reward_model

    home = study.run_dir("rm")
    shutil.rmtree(home, ignore_errors=True)  # an ensemble is never overwritten: this run's own, rebuilt each time
    data = toy_world.save_reward_model_world(home / "data", n_train=s.rm_train_pairs, n_eval=s.rm_eval_pairs, seed=0)
    recipe = {
        "model": {"name_or_path": str(data / "base"), "dtype": "float32"},
        "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"), "max_length": 64,
                 "max_prompt_length": None},
        "ensemble": {"kind": "seeds", "members": s.rm_members},
        "loss": {"label_noise": s.rm_label_noise},
        "aggregation": {"method": "mean", "normalize": True},
        "training": {"output_dir": str(home / "run"), "per_device_train_batch_size": 32,
                     "per_device_eval_batch_size": 64, "num_train_epochs": s.rm_epochs,
                     "learning_rate": s.rm_learning_rate, "lr_scheduler_type": "linear", "warmup_steps": 10,
                     "logging_steps": 10, "save_strategy": "no", "report_to": "none", "disable_tqdm": True},
        "seed": 0,
    }
    from eval.studies.common import _stdout_to

    with _stdout_to(home / "train.log"):
        summary = train_reward_model(load_rm_config(None, base=recipe))
    ev = summary["eval"]
    report = {"members": {k: v["accuracy"] for k, v in ev["members"].items()},
              "ensemble_mean": ev["ensemble"]["accuracy"], "eval_pairs": s.rm_eval_pairs,
              "train_pairs": s.rm_train_pairs, "label_noise": s.rm_label_noise, "flipped": summary["label_noise"]
              ["flipped"], "normalization": summary["normalization"]}
    return summary["ensemble_dir"], report


def proxy_metrics(ensemble, prompts: list[str], texts: list[str], spec: dict | None) -> dict[str, float]:
    """Held-out proxy scores of samples: mean of the (z-scored) members, the aggregate under `spec`, and the member
    disagreement (per-sample std over members, ddof 0), averaged over samples."""
    from reward_models.aggregate import aggregate

    members, _ = ensemble.score(prompts, texts, batch_size=64)
    out = {"proxy_mean_of_members": float(members.mean()),
           "member_disagreement": float(members.std(dim=1, unbiased=False).mean())}
    if spec is not None:
        params = {k: v for k, v in spec.items() if k != "method"}
        out["proxy_optimised"] = float(aggregate(members.double(), spec["method"], **params).mean())
    return out


def run(study: Study) -> dict:
    from reward_models.ensemble import RewardEnsemble

    s = QUICK if study.quick else FULL
    sft_dir = study.sft()
    tokenizer, sft = load_tokenizer(sft_dir), load_model(sft_dir)
    prompts = eval_prompts(s.eval_prompts)
    t0 = time.perf_counter()
    ensemble_dir, accuracy = train_proxy(study, s)
    rm_time = time.perf_counter() - t0
    study.log(f"weak proxy ensemble: held-out accuracy {accuracy['ensemble_mean']:.3f} (members "
              f"{', '.join(f'{a:.3f}' for a in accuracy['members'].values())}) in {rm_time:.0f} s")
    ensemble = RewardEnsemble.load(ensemble_dir)

    def measure(policy, seed: int, spec: dict | None) -> tuple[dict, list[str]]:
        m = measure_policy(policy, sft, tokenizer, prompts, num_samples=s.eval_samples, seed=10_000 + seed)
        return {**m.metrics, **proxy_metrics(ensemble, m.prompts, m.texts, spec)}, m.texts

    baseline = [measure(sft, seed, None)[0] for seed in study.seeds]
    labels = [label(spec) for spec in s.aggregations]
    per_agg = {name: [] for name in labels}
    histories = {name: [] for name in labels}
    examples, run_times = {}, {name: [] for name in labels}
    for seed in study.seeds:
        for spec, name in zip(s.aggregations, labels):
            t0 = time.perf_counter()
            reward = {"kind": "ensemble", "ensemble": ensemble_dir, "aggregation": dict(spec)}
            summary = run_fdpg(fdpg_recipe(sft_dir, study.run_dir(f"{spec['method']}-seed{seed}"), seed=seed,
                                           steps=s.steps, learning_rate=s.learning_rate, reward=reward,
                                           target={"kind": "exponential", "beta": s.beta},
                                           logging_steps=s.logging_steps))
            metrics, texts = measure(load_model(summary["final_model"]), seed, spec)
            per_agg[name].append(metrics)
            histories[name].append(train_curves(summary["log_history"]))
            if seed == study.seeds[0]:
                examples[name] = texts[:4]
            run_times[name].append(time.perf_counter() - t0)
            study.log(f"seed {seed} {name}: gold {metrics['gold_reward']:+.2f}, proxy "
                      f"{metrics['proxy_mean_of_members']:+.2f}, KL {metrics['kl_to_sft']:.2f} "
                      f"({run_times[name][-1]:.0f} s)")

    table = {"sft": summarize_runs(baseline), **{n: summarize_runs(per_agg[n]) for n in labels}}

    def proxy_of(h: dict) -> float:  # mean of the z-scored members in a logged step
        return statistics.fmean(v for k, v in h.items() if k.startswith("reward/member_"))

    curves = {n: {key: dict(zip(("steps", "mean", "std"), mean_curve(histories[n], fn)))
                  for key, fn in (("gold_reward", "gold_reward"), ("proxy_mean_of_members", proxy_of),
                                  ("proxy_optimised", "reward"), ("kl/sampled", "kl/sampled"),
                                  ("length/completion", "length/completion"))}
              for n in labels}
    verdict = _verdict(table, labels)
    columns = [("gold_reward", "gold reward"), ("proxy_mean_of_members", "proxy (mean of members)"),
               ("proxy_optimised", "optimised aggregate"), ("member_disagreement", "member disagreement (std)"),
               ("kl_to_sft", "KL to SFT (nats)"), ("length", "length (tokens)")]
    rows = [[n, *(fmt(table[n][k]) if k in table[n] else "—" for k, _ in columns)] for n in table]
    markdown = markdown_table(["policy (aggregation)", *(c for _, c in columns)], rows)
    markdown += (f"\nWeak proxy: {s.rm_members} members, {s.rm_train_pairs} pairs, {s.rm_label_noise:.0%} label "
                 f"noise, {s.rm_epochs:g} epoch; held-out accuracy vs gold {accuracy['ensemble_mean']:.3f} (ensemble "
                 f"mean), members {', '.join(f'{a:.3f}' for a in accuracy['members'].values())}. Reverse-KL f-DPG "
                 f"to π_sft·exp(r̂/β), β = {s.beta}, {s.steps} steps at learning rate {s.learning_rate}; measured "
                 f"on "
                 f"{s.eval_prompts} held-out prompts x {s.eval_samples} samples.\n\n"
                 + "\n".join(verdict["lines"]) + "\n")
    results = {
        "settings": asdict(s),
        "what": "reverse-KL f-DPG against a weak proxy ensemble under mean / wco / uwo with a small KL weight "
                "(Coste et al. 2023): gold and proxy reward over training steps and after training",
        "proxy_accuracy": accuracy,
        "proxy_training_s": round(rm_time, 1),
        "table": table,
        "curves": curves,
        "verdict": {k: v for k, v in verdict.items() if k != "lines"},
        "findings": verdict["lines"],
        "examples": {n: t for n, t in examples.items()},
        "run_time_s": {n: [round(t, 1) for t in ts] for n, ts in run_times.items()},
        "deviations": [] if not study.quick else ["quick mode: 1 seed, a few steps, tiny proxy; not a result"],
    }
    return study.write(results, _figure(table, curves, s, accuracy), markdown)


def _verdict(table: dict, labels: list[str]) -> dict:
    sft_gold, sft_proxy = table["sft"]["gold_reward"]["mean"], table["sft"]["proxy_mean_of_members"]["mean"]
    over = {}
    lines = [(f"- SFT policy (held-out): gold {fmt(table['sft']['gold_reward'])}, proxy "
              f"{fmt(table['sft']['proxy_mean_of_members'])}.")]
    for n in labels:
        gold, proxy = table[n]["gold_reward"], table[n]["proxy_mean_of_members"]
        over[n] = proxy["mean"] > sft_proxy and gold["mean"] < sft_gold - GOLD_DROP
        lines.append(f"- {n}: proxy {fmt(proxy)} ({'up' if proxy['mean'] > sft_proxy else 'not up'}), gold "
                     f"{fmt(gold)} → {'OVER-OPTIMISED (gold fell)' if over[n] else 'gold held'}.")
    lines.append("- member disagreement (held-out, per-sample std over the z-scored members): SFT "
                 f"{fmt(table['sft']['member_disagreement'])}; after training "
                 + ", ".join(f"{n} {fmt(table[n]['member_disagreement'])}" for n in labels)
                 + ". WCO and UWO can only penalise what the members disagree on.")
    conservative = [n for n in labels if not n.startswith("mean")]
    mean_label = next((n for n in labels if n.startswith("mean")), None)
    shown = bool(mean_label and over[mean_label] and not any(over[n] for n in conservative))
    lines.append(f"- Coste et al.'s direction (gold falls under mean, wco/uwo hold it): "
                 f"{'SHOWN' if shown else 'NOT shown'} here.")
    return {"overoptimised": over, "paper_direction_shown": shown, "gold_drop_threshold": GOLD_DROP, "lines": lines}


def _figure(table: dict, curves: dict, s: Settings, accuracy: dict):
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), dpi=100)
    panels = [("gold_reward", "gold reward (training batches)", "gold_reward"),
              ("proxy_mean_of_members", "proxy: mean of z-scored members", "proxy_mean_of_members"),
              ("proxy_optimised", "optimised aggregate (its own scale)", None),
              ("kl/sampled", "sampled KL to π_sft, nats", None),
              ("length/completion", "completion length, tokens", "length")]
    for ax, (key, title, sft_key) in zip(axes.flat, panels):
        for i, n in enumerate(curves):
            c = curves[n][key]
            ax.plot(c["steps"], c["mean"], color=f"C{i}", label=n)
            ax.fill_between(c["steps"], [m - e for m, e in zip(c["mean"], c["std"])],
                            [m + e for m, e in zip(c["mean"], c["std"])], color=f"C{i}", alpha=0.2)
        if sft_key is not None:
            ax.axhline(table["sft"][sft_key]["mean"], color="#777", linestyle=":", label="SFT (held-out)")
        ax.set_xlabel("optimizer step")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    ax = axes[1][2]
    names = list(table)
    x = torch.arange(len(names)).tolist()
    for off, key, color in ((-0.2, "gold_reward", "#d62728"), (0.2, "proxy_mean_of_members", "#1f77b4")):
        ax.bar([i + off for i in x], [table[n][key]["mean"] for n in names], width=0.4, color=color, alpha=0.75,
               yerr=[table[n][key]["std"] for n in names], capsize=3, label=key.replace("_", " "))
    ax.set_xticks(x, names, fontsize=8)
    ax.set_title("held-out after training: gold vs proxy", fontsize=9)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Over-optimisation of a weak proxy ensemble (held-out acc. {accuracy['ensemble_mean']:.2f}) by "
                 f"reverse-KL f-DPG, β = {s.beta}: mean ± std over seeds")
    fig.tight_layout()
    return fig
