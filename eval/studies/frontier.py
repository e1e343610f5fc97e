"""Study `frontier`: gold reward against KL to the SFT policy for four ways of using the toy world's gold reward.

Every method starts from the same SFT policy π_sft (`Study.sft`) and optimises the gold reward r itself (no proxy):

- f-DPG, reverse KL to the exponential target π_sft·exp(r/β) (KL-regularised RL with KL weight β, Go et al. 2023) at
  β = 0.05, 0.1, 0.2, 0.5;
- f-DPG, reverse KL to the best-of-n target π_n (METHODS §7.1; its reward CDF under π_sft estimated per prompt from
  32 samples) at n = 4 and 16; beside it, the target's own KL (`target/kl_to_reference`, and the bound
  log n − (n−1)/n);
- best-of-n sampling itself with gold as the selector: N = 128 samples per prompt from π_sft for 48 held-out prompts,
  the expected gold of the best of n (`eval.best_of_n.expected_best_of_n`, the unbiased order-statistics estimator)
  for n = 1, 2, 4, …, 128, at three KLs: the exact KL of best-of-n over each prompt's empirical gold law, ties
  included (`eval.kl.exact_bon_kl` with the N samples as a uniform law; the toy gold takes few distinct values, so
  ties are heavy and this is the KL to read; a plug-in estimate, it reads low as n nears N, where the top reward
  levels rest on a few samples), the bound log n − (n−1)/n (`eval.kl.bon_kl_bound`, exact only for an atomless
  reward) and Beirami et al.'s estimate (`eval.kl.bon_kl_estimate` from the selected sample's log π_sft, averaged
  over the best-of-n selection law of the N samples, as `align bon` does; it models one atom, the selected
  sequence, whose probability is tiny here, so it sits at the bound and does not see the ties of the reward);
- TRL 1.16's RLOOTrainer (eval/studies/rloo.py) with gold as reward function and KL coefficient β = 0.05 and 0.2:
  the same objective as reverse-KL f-DPG to the exponential target at that β, optimised by another estimator.

The f-DPG and RLOO runs take the same steps (200), batch (8 prompts x 4 samples), learning rate (1e-4, AdamW,
constant) and seeds, and their final policies are measured alike (`eval.studies.common.measure_policy`): samples of
held-out prompts, mean gold, Monte-Carlo KL = mean(log π(y|x) − log π_sft(y|x)). Trained points are where each
method got in 200 steps, not its optimum: a point below another method's curve at equal KL means less gold for the
same divergence from the SFT policy within that budget.

Outputs: results.json, results.md (the table), frontier.png (gold vs KL, every method on one plot, ± std over seeds).
"""

from __future__ import annotations

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
    measure_policy,
    pyplot,
    run_fdpg,
    summarize,
    summarize_runs,
)


@dataclass
class Settings:
    steps: int = 200
    learning_rate: float = 1e-4
    logging_steps: int = 20
    fdpg_betas: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.5])
    bon_target_ns: list[int] = field(default_factory=lambda: [4, 16])
    bon_target_samples: int = 32
    rloo_betas: list[float] = field(default_factory=lambda: [0.05, 0.2])
    bon_prompts: int = 48
    bon_samples: int = 128
    eval_prompts: int = 128
    eval_samples: int = 4


FULL = Settings()
QUICK = Settings(steps=4, logging_steps=2, fdpg_betas=[0.1], bon_target_ns=[4], bon_target_samples=4,
                 rloo_betas=[0.1], bon_prompts=8, bon_samples=8, eval_prompts=16, eval_samples=2)
#: 2 seeds, not 3: 8 trained policies per seed (2 of them RLOO, twice as slow as f-DPG here) must fit in 10 minutes.
DEFAULT_SEEDS = 2


@torch.no_grad()
def best_of_n_curve(sft, tokenizer, prompts: list[str], num_samples: int, seed: int) -> list[dict]:
    """Best-of-n sampling from π_sft with the gold reward as selector (module docstring) → one row per n."""
    from align import toy_world
    from align.data import tokenize_prompts
    from align.rollout import HFRollout, SamplingParams
    from eval.best_of_n import bon_ns, expected_best_of_n, expected_best_of_n_by
    from eval.kl import bon_kl_bound, bon_kl_estimate, exact_bon_kl

    groups = HFRollout(sft, tokenizer, batch_size=256).generate(
        tokenize_prompts(tokenizer, prompts, source="best-of-n"), n=num_samples,
        sampling=SamplingParams(max_new_tokens=24, seed=seed))
    gold = torch.tensor([toy_world.gold_rewards([c.text for c in g]) for g in groups], dtype=torch.float64)
    log_eps = torch.tensor([[float(c.logps.double().sum()) for c in g] for g in groups],
                           dtype=torch.float64).clamp(max=0.0)
    uniform = torch.full((num_samples,), 1.0 / num_samples, dtype=torch.float64)
    rows = []
    for n in bon_ns(num_samples):
        rows.append({"n": n, "gold_reward": float(expected_best_of_n(gold, n).mean()),
                     "kl_exact_ties": sum(exact_bon_kl(uniform, g, n) for g in gold) / len(gold),
                     "kl_bound": bon_kl_bound(n),
                     "kl_estimate": float(expected_best_of_n_by(gold, bon_kl_estimate(n, log_eps), n).mean())})
    return rows


def run(study: Study) -> dict:
    from eval.studies.rloo import train_rloo

    s = QUICK if study.quick else FULL
    sft_dir = study.sft()
    tokenizer, sft = load_tokenizer(sft_dir), load_model(sft_dir)
    prompts = eval_prompts(s.eval_prompts)

    methods = ([("fdpg_exponential", f"β={b}", {"kind": "exponential", "beta": b}) for b in s.fdpg_betas]
               + [("fdpg_best_of_n", f"n={n}", {"kind": "best_of_n", "n": n, "samples": s.bon_target_samples})
                  for n in s.bon_target_ns]
               + [("rloo", f"β={b}", b) for b in s.rloo_betas])
    per_method = {(m, p): [] for m, p, _ in methods}
    run_times = {f"{m} {p}": [] for m, p, _ in methods}
    baseline, bon_rows = [], []
    for seed in study.seeds:
        measure_seed = 10_000 + seed
        baseline.append(measure_policy(sft, sft, tokenizer, prompts, num_samples=s.eval_samples,
                                       seed=measure_seed).metrics)
        t0 = time.perf_counter()
        bon_rows.append(best_of_n_curve(sft, tokenizer, eval_prompts(s.bon_prompts), s.bon_samples, seed=20_000 + seed))
        study.log(f"seed {seed} best-of-n sampling: N={s.bon_samples} x {s.bon_prompts} prompts "
                  f"({time.perf_counter() - t0:.0f} s)")
        for method, param, spec in methods:
            t0 = time.perf_counter()
            out = study.run_dir(f"{method}-{param.replace('=', '')}-seed{seed}")
            extra = {}
            if method == "rloo":
                policy, summary = train_rloo(sft_dir, out, beta=spec, steps=s.steps, learning_rate=s.learning_rate,
                                             seed=seed, logging_steps=s.logging_steps)
            else:
                summary = run_fdpg(fdpg_recipe(sft_dir, out, seed=seed, steps=s.steps, learning_rate=s.learning_rate,
                                               target=spec, logging_steps=s.logging_steps))
                policy = load_model(summary["final_model"])
                if "target/kl_to_reference" in summary:
                    extra = {"target_kl": summary["target/kl_to_reference"],
                             "target_kl_bound": summary["target/kl_bound"]}
            m = measure_policy(policy, sft, tokenizer, prompts, num_samples=s.eval_samples, seed=measure_seed)
            per_method[(method, param)].append({**m.metrics, **extra})
            run_times[f"{method} {param}"].append(time.perf_counter() - t0)
            study.log(f"seed {seed} {method} {param}: gold {m.metrics['gold_reward']:+.2f}, KL "
                      f"{m.metrics['kl_to_sft']:.2f} ({run_times[f'{method} {param}'][-1]:.0f} s)")

    points = [{"method": "sft", "param": "", **summarize_runs(baseline)}]
    points += [{"method": m, "param": p, **summarize_runs(per_method[(m, p)])} for m, p, _ in methods]
    bon = [{"n": rows[0]["n"], **{k: summarize([r[k] for r in rows])
                                     for k in ("gold_reward", "kl_exact_ties", "kl_bound", "kl_estimate")}}
           for rows in zip(*bon_rows)]
    rows = [[p["method"], p["param"], fmt(p["gold_reward"]), fmt(p["kl_to_sft"]),
             fmt(p["target_kl"]) if "target_kl" in p else "—"] for p in points]
    rows += [["best_of_n_sampling", f"n={b['n']}", fmt(b["gold_reward"]),
              f"{fmt(b['kl_exact_ties'])} (bound {b['kl_bound']['mean']:.2f}, Beirami est. {fmt(b['kl_estimate'])})",
              "—"] for b in bon]
    markdown = markdown_table(["method", "parameter", "gold reward", "KL to SFT (nats)", "target's KL (nats)"], rows)
    findings = _findings(points, bon)
    markdown += (f"\nTrained policies: {s.steps} steps, learning rate {s.learning_rate}, 8 prompts x 4 samples a step; "
                 f"measured on {s.eval_prompts} held-out prompts x {s.eval_samples} samples (gold mean, MC KL). "
                 f"Best-of-n sampling: N = {s.bon_samples} samples of π_sft for each of {s.bon_prompts} held-out "
                 f"prompts; KL = the exact KL over each prompt's empirical gold law (ties included), beside the "
                 f"bound log n − (n−1)/n and Beirami et al.'s estimate.\n\n"
                 + "\n".join(findings) + "\n")
    results = {
        "settings": asdict(s),
        "what": "gold reward vs Monte-Carlo KL to the SFT policy: f-DPG (exponential target at several β, best-of-n "
                "targets), best-of-n sampling with gold as selector, TRL RLOOTrainer; all optimising the gold reward",
        "points": points,
        "best_of_n_sampling": bon,
        "findings": findings,
        "run_time_s": {k: [round(t, 1) for t in ts] for k, ts in run_times.items()},
        "deviations": (["2 seeds by default (not 3) so the full study stays under 10 minutes on 2 CPU cores"]
                       if not study.quick else ["quick mode: 1 seed, a few steps, tiny sizes; not a result"]),
    }
    return study.write(results, _figure(points, bon, s), markdown)


def _interpolate_bon(bon: list[dict], kl: float, key: str) -> float | None:
    """Gold of best-of-n sampling at KL `kl` (linear between its n points on the `key` axis); None beyond them."""
    xs, ys = [b[key]["mean"] for b in bon], [b["gold_reward"]["mean"] for b in bon]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= kl <= x1 and x1 > x0:
            return y0 + (y1 - y0) * (kl - x0) / (x1 - x0)
    return None


def _findings(points: list[dict], bon: list[dict]) -> list[str]:
    lines = []
    for p in points[1:]:
        at = _interpolate_bon(bon, p["kl_to_sft"]["mean"], "kl_exact_ties")
        where = (f"best-of-n sampling at that KL (exact, ties included): {at:+.2f}" if at is not None
                 else "beyond the KL range of best-of-n sampling here")
        lines.append(f"- {p['method']} {p['param']}: gold {fmt(p['gold_reward'])} at KL {fmt(p['kl_to_sft'])}; "
                     f"{where}.")
    top = bon[-1]
    lines.append(f"- best-of-n sampling reaches gold {fmt(top['gold_reward'])} at n={top['n']} with KL "
                 f"{fmt(top['kl_exact_ties'])} (ties included; bound {top['kl_bound']['mean']:.2f}, Beirami "
                 f"estimate {fmt(top['kl_estimate'])}).")
    fd = {p["param"]: p for p in points if p["method"] == "fdpg_exponential"}
    rl = {p["param"]: p for p in points if p["method"] == "rloo"}
    for param in sorted(set(fd) & set(rl)):
        lines.append(f"- same objective, same β ({param}): f-DPG gold {fmt(fd[param]['gold_reward'])} at KL "
                     f"{fmt(fd[param]['kl_to_sft'])}; RLOO gold {fmt(rl[param]['gold_reward'])} at KL "
                     f"{fmt(rl[param]['kl_to_sft'])}.")
    return lines


def _figure(points: list[dict], bon: list[dict], s: Settings):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 6.5), dpi=110)
    style = {"sft": ("k", "*", "SFT", (0, 0)),
             "fdpg_exponential": ("C0", "o", "f-DPG reverse KL, exponential target", (-6, 8)),
             "fdpg_best_of_n": ("C2", "s", "f-DPG reverse KL, best-of-n target", (8, -12)),
             "rloo": ("C3", "^", "TRL RLOOTrainer (gold reward)", (8, -14))}
    for method, (color, marker, name, offset) in style.items():
        mine = [p for p in points if p["method"] == method]
        if not mine:
            continue
        xs, ys = [p["kl_to_sft"]["mean"] for p in mine], [p["gold_reward"]["mean"] for p in mine]
        ax.errorbar(xs, ys, xerr=[p["kl_to_sft"]["std"] for p in mine], yerr=[p["gold_reward"]["std"] for p in mine],
                    color=color, marker=marker, linestyle="-" if method == "fdpg_exponential" else "none",
                    markersize=8, capsize=3, label=name)
        for p, x, y in zip(mine, xs, ys):
            if p["param"]:
                ax.annotate(p["param"], (x, y), textcoords="offset points", xytext=offset, fontsize=8, color=color)
    gold = [b["gold_reward"]["mean"] for b in bon]
    ax.plot([b["kl_exact_ties"]["mean"] for b in bon], gold, "-", color="C1", marker="D", markersize=4,
            label="best-of-n sampling (gold selector), exact KL with reward ties")
    ax.plot([b["kl_bound"]["mean"] for b in bon], gold, "--", color="C1", alpha=0.6,
            label="best-of-n sampling, KL = bound log n − (n−1)/n")
    ax.plot([b["kl_estimate"]["mean"] for b in bon], gold, ":", color="C4", alpha=0.8,
            label="best-of-n sampling, KL = Beirami estimate")
    for b in bon:
        ax.annotate(f"n={b['n']}", (b["kl_exact_ties"]["mean"], b["gold_reward"]["mean"]), textcoords="offset points",
                    xytext=(-10, 6), fontsize=7, color="C1")
    ax.set_xlabel("KL(π ‖ π_sft), nats (Monte-Carlo on held-out samples; best-of-n: bound / estimate)")
    ax.set_ylabel("gold reward (held-out mean)")
    ax.set_title(f"Toy world: gold reward vs KL to SFT ({s.steps} training steps; mean ± std over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig
