"""Offline best-of-n study (METHODS §7 and §8; Gao et al. 2023, Coste et al. 2023): `align bon --config X.yaml`.

What `run_bon` does:

1. Samples N = `num_samples` responses per prompt ONCE from the base policy (`align.rollout.build_rollout`, backend
   `rollout.backend`, with a progress bar), keeping for each response `log_eps` = the sum of its per-token
   log-probs. Sampling must be plain ancestral sampling (temperature 1, no top-k, no top-p; refused otherwise): only then is `log_eps` the base
   policy's full-sequence `log π_ref(y|x)` that Beirami et al.'s KL estimator needs, and only then are the samples
   draws from π_ref, which the best-of-n curves and both KL columns are about. A response cut by `max_new_tokens`
   is still a valid outcome of that sampler (its probability is the product of its token probabilities).
2. Scores every (prompt, response) with the reward ensemble (per member `[P·N, K]`, progress bar) and aggregates
   the members with every entry of `aggregations` (default mean, wco, uwo λ=0.5) → a proxy reward `[P, N]` each;
   with `gold: toy_world`, also the toy world's gold reward `[P, N]`.
3. For every n in 1, 2, 4, …, N and N itself (`bon_ns`), per aggregation, averaged over prompts:
   - proxy reward: `expected_best_of_n(proxy, n)`, the unbiased order-statistics estimator of the expected proxy
     reward of best-of-n (n of the N samples without replacement), not one random draw (METHODS §8);
   - gold reward: `expected_best_of_n_by(proxy, gold, n)`, the expected gold reward of the proxy-best sample;
   - kl_bound: `log n − (n−1)/n` (METHODS §7; the KL axis of Gao's and Coste's plots);
   - kl_estimate: Beirami et al.'s estimator `KL̂_n(ε)`, ε = π_ref(y_n|x) of the selected response (METHODS §7),
     averaged over the best-of-n selection law that the N samples imply: `expected_best_of_n_by(proxy,
     KL̂_n(log_eps), n)`. This is the exact expectation of the per-draw estimator when best-of-n draws its n samples
     from the N (the empirical distribution) — the limit of "average over M independent best-of-n draws" as M → ∞,
     with no extra sampling. Each KL̂ lies in [0, bound], so the average does too. It depends on the aggregation
     (which response is selected); the bound does not. Ties in the proxy are broken uniformly (as in
     `expected_best_of_n_by`).
4. Writes to `output_dir` (each file atomically; results.json last, so its presence means a finished run):
   - `samples.jsonl`: one row per sample (prompt_index, sample, prompt, response, finished, log_eps, rewards = the
     K member scores, gold) — enough to redo the scoring or the study without sampling again;
   - `per_prompt.csv`: aggregation, n, prompt_index, proxy_reward, gold_reward, kl_estimate;
   - `gold_vs_kl.png`, `proxy_vs_kl.png`: reward against KL per aggregation (the shape of Gao et al.'s and Coste et
     al.'s best-of-n figures); solid = against the KL estimate, dashed = against the bound (one curve where the two
     agree within 0.01 nats at every n, as they do when no sample is likely: the legend says so);
   - `results.json`: `rows` (aggregation, method, params, n, proxy_reward, gold_reward, kl_bound, kl_estimate), the
     resolved config, N, P, the fraction of responses cut by max_new_tokens, and timings.
   An existing results.json is not overwritten unless `overwrite: true`.

Tokenizers: the ensemble scores TEXT with its own tokenizer (saved with it), so it need not share the base policy's
vocabulary. What is refused is a tokenizer that cannot represent the text: when the ensemble's tokenizer maps
words of the prompts (checked before sampling) or of the sampled responses (checked before scoring) to its unknown
token while the base's tokenizer does not, the ensemble was trained with another tokenizer, and its rewards would
be read from `<unk>` tokens.

Errors a user can cause are `AlignError`s naming the config key, file, row or field (the CLI prints one line, exit 2).
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from align.errors import AlignError, ConfigError
from align.io import atomic_save_figure
from align.prompts import PromptsConfig as BonPrompts, load_prompts  # noqa: F401  (re-exported)
from align.modeling import ModelConfig
from align.rollout.base import SamplingParams
from align.rollout.config import RolloutConfig
from reward_models.reward import check_tokenizers  # noqa: F401  (re-exported)
from eval.best_of_n import bon_ns, expected_best_of_n, expected_best_of_n_by
from eval.kl import bon_kl_bound, bon_kl_estimate

__all__ = [
    "DEFAULT_AGGREGATIONS",
    "BonConfig",
    "BonPrompts",
    "aggregation_label",
    "check_tokenizers",
    "format_table",
    "load_bon_config",
    "load_prompts",
    "run_bon",
]

#: The aggregations of a study when none are given: Coste et al.'s three (METHODS §8), uwo with the repo's BoN λ.
DEFAULT_AGGREGATIONS = ({"method": "mean"}, {"method": "wco"}, {"method": "uwo", "lam": 0.5, "ddof": 0})
GOLD_SCORERS = ("toy_world",)


def _default_sampling() -> SamplingParams:
    return SamplingParams(max_new_tokens=24)


@dataclass
class BonConfig:
    """An offline best-of-n study (`align bon --config configs/bon/X.yaml [dotted.key=value ...]`)."""

    model: ModelConfig = field(metadata={"help": "The base policy π_ref that is sampled (align's ModelConfig)."})
    prompts: BonPrompts = field(metadata={"help": "The prompts (see BonPrompts)."})
    ensemble: str = field(metadata={"help": "Reward-ensemble directory (`<training.output_dir>/ensemble` of "
                                            "`align rm train`)."})
    num_samples: int = field(default=64, metadata={"help": "N: responses sampled per prompt (n runs 1, 2, 4, …, N)."})
    sampling: SamplingParams = field(default_factory=_default_sampling, metadata={
        "help": "align's SamplingParams. temperature must be 1 and top_k 0, top_p 1 (plain sampling from the base: "
                "the KL estimate needs log π_ref of the samples). seed null: the top-level seed."})
    aggregations: list[dict] = field(default_factory=lambda: [dict(a) for a in DEFAULT_AGGREGATIONS], metadata={
        "help": "Ensemble aggregations to compare: a list of {method, <params>} (reward_models/aggregate.py: mean, "
                "wco, uwo with lam, ddof)."})
    gold: Literal["toy_world"] | None = field(default=None, metadata={
        "help": "Gold scorer: null (none) or toy_world (align.toy_world.gold_rewards)."})
    output_dir: str = field(default="outputs/bon", metadata={"help": "Where the outputs go."})
    seed: int = field(default=0, metadata={"help": "Sampling seed (when sampling.seed is null)."})
    batch_size: int = field(default=64, metadata={"help": "Sequences per forward, for sampling and for scoring."})
    max_length: int | None = field(default=None, metadata={
        "help": "Scoring: keep the last max_length tokens of longer prompt+response rows (None: the ensemble's "
                "trained max_length, from its manifest; no truncation for an ensemble saved without one)."})
    progress: bool = field(default=True, metadata={"help": "Progress bars for sampling and scoring."})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={
        "help": "Sampling backend and its engine options (align.rollout.RolloutConfig)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace the outputs of a finished run in output_dir."})


def aggregation_label(spec: dict) -> str:
    """'mean', 'wco', 'uwo(lam=0.5)': the method with its non-default-free parameters (ddof shown when not 0)."""
    params = {k: v for k, v in spec.items() if k != "method" and not (k == "ddof" and v == 0)}
    return spec["method"] + (f"({', '.join(f'{k}={v}' for k, v in params.items())})" if params else "")


def _check_config(config: BonConfig) -> list[dict]:
    """Validates what the dataclasses cannot → the aggregations with their parameters filled in."""
    from reward_models.aggregate import check_aggregation

    def positive(name, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}: must be an integer >= 1, got {value!r}")

    positive("num_samples", config.num_samples)
    positive("batch_size", config.batch_size)
    positive("sampling.max_new_tokens", config.sampling.max_new_tokens)
    if config.max_length is not None:
        positive("max_length", config.max_length)
    s = config.sampling
    why = ("best-of-n is studied on plain samples from the base policy, and the KL estimate needs log π_ref(y|x) of "
           "them; set sampling.temperature=1 sampling.top_k=0 sampling.top_p=1")
    if s.temperature != 1:
        raise ConfigError(f"sampling.temperature: must be 1, got {s.temperature} ({why})")
    if s.top_k not in (0, None):
        raise ConfigError(f"sampling.top_k: must be 0 (off), got {s.top_k} ({why})")
    if s.top_p != 1:
        raise ConfigError(f"sampling.top_p: must be 1 (off), got {s.top_p} ({why})")
    if config.gold is not None and config.gold not in GOLD_SCORERS:
        raise ConfigError(f"gold: unknown gold scorer {config.gold!r}; known: null, {', '.join(GOLD_SCORERS)}")
    if not config.aggregations:
        raise ConfigError("aggregations: need at least one, e.g. [{method: mean}]")
    specs, labels = [], set()
    for i, spec in enumerate(config.aggregations):
        if not isinstance(spec, dict) or not isinstance(spec.get("method"), str):
            raise ConfigError(f"aggregations[{i}]: expected a mapping with a `method` (mean, wco, uwo), got {spec!r}")
        params = {k: v for k, v in spec.items() if k != "method"}
        try:
            full = check_aggregation(spec["method"], params)
        except ConfigError as e:
            raise ConfigError(f"aggregations[{i}]: {e}") from None
        full = {"method": spec["method"], **full}
        label = aggregation_label(full)
        if label in labels:
            raise ConfigError(f"aggregations[{i}]: {label} is listed twice")
        labels.add(label)
        specs.append(full)
    if not str(config.ensemble):
        raise ConfigError("ensemble: required (the directory of a trained reward ensemble)")
    return specs


def load_bon_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> BonConfig:
    """Reads a YAML study (or starts from `base`), applies `dotted.key=value` overrides, validates every key."""
    from align.config import from_dict, load_recipe

    def validate(raw: dict) -> BonConfig:
        config = from_dict(BonConfig, raw)
        _check_config(config)
        return config

    return load_recipe(path, overrides, base, validate)


#: Below this gap (nats) between Beirami et al.'s KL estimate and the bound log n − (n−1)/n at every n, the two
#: curves of an aggregation would be drawn on top of each other: it is drawn once and the legend says so.
SAME_KL_NATS = 0.01


def _plot(rows: list[dict], key: str, ylabel: str, title: str, path: Path) -> list[str]:
    """Draws `key` against the KL of best-of-n, one colour per aggregation: solid against the KL estimate, dashed
    against the bound, or one curve where they agree within SAME_KL_NATS at every n. Returns the legend labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    labels = list(dict.fromkeys(r["aggregation"] for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, label in enumerate(labels):
        mine = [r for r in rows if r["aggregation"] == label]
        color = colors[i % len(colors)]
        y = [r[key] for r in mine]
        same = max(abs(r["kl_estimate"] - r["kl_bound"]) for r in mine) < SAME_KL_NATS
        ax.plot([r["kl_estimate"] for r in mine], y, "o-", color=color,
                label=f"{label} (KL estimate = bound within {SAME_KL_NATS})" if same else f"{label} (KL estimate)")
        if not same:
            ax.plot([r["kl_bound"] for r in mine], y, "s--", color=color, alpha=0.6, markersize=3,
                    label=f"{label} (KL bound)")
    for r in rows:   # n labels on the first aggregation's estimate curve
        if r["aggregation"] == labels[0]:
            ax.annotate(f"n={r['n']}", (r["kl_estimate"], r[key]), textcoords="offset points", xytext=(3, 4),
                        fontsize=7, color="#444")
    ax.set_xlabel("KL(best-of-n ‖ base) [nats]")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)
    return legend


def run_bon(config: BonConfig) -> dict[str, Any]:
    """Runs the study described in the module docstring → the results dict (also written to results.json)."""
    from align.io import atomic_write_json, atomic_write_text
    from align.modeling import load_causal_lm, load_tokenizer
    from align.rollout import build_rollout
    from reward_models.aggregate import aggregate, check_aggregation
    from reward_models.ensemble import RewardEnsemble

    t_start = time.perf_counter()
    specs = _check_config(config)
    out = Path(config.output_dir)
    if (out / "results.json").exists() and not config.overwrite:
        raise AlignError(f"output_dir '{out}': holds the results of a finished study (results.json); choose another "
                         f"output_dir or set overwrite=true to replace them")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: '{out}' is a file, not a directory")
    if config.rollout.backend == "vllm":               # no vLLM, an unknown engine option, a shape it cannot run
        from align.rollout.vllm import check_can_run

        check_can_run(config.model.name_or_path, engine_kwargs=config.rollout.engine_kwargs,
                      enable_sleep_mode=config.rollout.enable_sleep_mode)
    prompts = load_prompts(config.prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise ConfigError("prompts.dataset: align bon takes text prompts; this dataset's prompts are chat messages")
    ensemble = RewardEnsemble.load(config.ensemble)   # before sampling: a bad ensemble fails in seconds
    for spec in specs:                                 # e.g. wco/uwo with a 1-member ensemble
        try:
            check_aggregation(spec["method"], {k: v for k, v in spec.items() if k != "method"},
                              num_members=ensemble.num_members)
        except ConfigError as e:
            raise ConfigError(f"aggregations ({aggregation_label(spec)}) with ensemble '{config.ensemble}': {e}") from None
    tokenizer = load_tokenizer(config.model)
    check_tokenizers(tokenizer, ensemble.tokenizer, prompts, what="prompts", ensemble_dir=config.ensemble)
    if config.rollout.backend == "vllm":  # vLLM builds its own engine from the checkpoint: no HF copy in memory
        model = None
        rollout = build_rollout("vllm", config.model.name_or_path, tokenizer, seed=config.seed,
                                progress=config.progress, **config.rollout.backend_options())
    else:
        model = load_causal_lm(config.model)
        if torch.cuda.is_available():
            model = model.to("cuda")
        rollout = build_rollout(config.rollout.backend, model, tokenizer, batch_size=config.batch_size,
                                progress=config.progress)

    # 1. Sample N per prompt once.
    P, N = len(prompts), config.num_samples
    sampling = SamplingParams(**{**asdict(config.sampling),
                                 "seed": config.sampling.seed if config.sampling.seed is not None else config.seed})
    t0 = time.perf_counter()
    completions = rollout.generate(prompts, n=N, sampling=sampling)
    sampling_s = time.perf_counter() - t0
    responses = [c.text for per_prompt in completions for c in per_prompt]          # [P·N], prompt-major
    finished = [c.finished for per_prompt in completions for c in per_prompt]
    log_eps = torch.tensor([[float(c.logps.double().sum()) for c in per_prompt] for per_prompt in completions],
                           dtype=torch.float64).clamp(max=0.0)                       # [P, N], log π_ref(y|x)
    del model, rollout
    check_tokenizers(tokenizer, ensemble.tokenizer, responses, what="sampled responses", ensemble_dir=config.ensemble)

    # 2. Score once; aggregate per method.
    t0 = time.perf_counter()
    flat_prompts = [p for p in prompts for _ in range(N)]
    max_length = config.max_length if config.max_length is not None else ensemble.max_length  # as it was trained
    members, _ = ensemble.score(flat_prompts, responses, batch_size=config.batch_size, progress=config.progress,
                                max_length=max_length)                               # [P·N, K]
    scoring_s = time.perf_counter() - t0
    members = members.to(torch.float64)
    proxies = {aggregation_label(s): aggregate(members, s["method"], **{k: v for k, v in s.items() if k != "method"})
               .reshape(P, N) for s in specs}
    gold = None
    if config.gold == "toy_world":
        from align import toy_world

        gold = torch.tensor(toy_world.gold_rewards(responses), dtype=torch.float64).reshape(P, N)

    # 3. Best-of-n curves.
    ns = bon_ns(N)
    rows, per_prompt = [], []
    for spec in specs:
        label = aggregation_label(spec)
        proxy = proxies[label]
        for n in ns:
            p_proxy = expected_best_of_n(proxy, n)                                       # [P]
            p_gold = expected_best_of_n_by(proxy, gold, n) if gold is not None else None
            p_kl = expected_best_of_n_by(proxy, bon_kl_estimate(n, log_eps), n)          # [P], METHODS §7
            rows.append({"aggregation": label, "method": spec["method"],
                         "params": {k: v for k, v in spec.items() if k != "method"}, "n": n,
                         "proxy_reward": float(p_proxy.mean()),
                         "gold_reward": float(p_gold.mean()) if p_gold is not None else None,
                         "kl_bound": bon_kl_bound(n), "kl_estimate": float(p_kl.mean())})
            for i in range(P):
                per_prompt.append((label, n, i, float(p_proxy[i]), float(p_gold[i]) if p_gold is not None else "",
                                   float(p_kl[i])))

    # 4. Outputs (results.json last).
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(P):
        for j in range(N):
            k = i * N + j
            lines.append(json.dumps({"prompt_index": i, "sample": j, "prompt": prompts[i], "response": responses[k],
                                     "finished": finished[k], "log_eps": float(log_eps[i, j]),
                                     "rewards": [float(x) for x in members[k]],
                                     "gold": float(gold[i, j]) if gold is not None else None}))
    atomic_write_text(out / "samples.jsonl", "\n".join(lines) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["aggregation", "n", "prompt_index", "proxy_reward", "gold_reward", "kl_estimate"])
    writer.writerows(per_prompt)
    atomic_write_text(out / "per_prompt.csv", buf.getvalue())
    plots = {"proxy_vs_kl": str(out / "proxy_vs_kl.png")}
    _plot(rows, "proxy_reward", "proxy reward of best-of-n (ensemble aggregate)",
          f"Best-of-n: proxy reward vs KL (P={P} prompts, N={N})", out / "proxy_vs_kl.png")
    if gold is not None:
        plots["gold_vs_kl"] = str(out / "gold_vs_kl.png")
        _plot(rows, "gold_reward", f"gold reward of best-of-n ({config.gold})",
              f"Best-of-n: gold reward vs KL, selected by each proxy (P={P}, N={N})", out / "gold_vs_kl.png")
    results = {
        "rows": rows,
        "num_prompts": P,
        "num_samples": N,
        "num_members": ensemble.num_members,
        "ns": ns,
        "truncated_fraction": 1.0 - sum(finished) / len(finished),
        "scoring_max_length": max_length,  # the ensemble's trained length unless the config set one
        "kl_estimate": "Beirami et al.'s estimator averaged over the best-of-n selection law of the N samples "
                       "(expected_best_of_n_by(proxy, KL̂_n(log_eps), n)), then over prompts",
        "outputs": {"samples": str(out / "samples.jsonl"), "per_prompt": str(out / "per_prompt.csv"), **plots},
        "timing": {"sampling_s": sampling_s, "scoring_s": scoring_s, "total_s": time.perf_counter() - t_start},
        "config": asdict(config),
    }
    atomic_write_json(out / "results.json", results)
    return results


def format_table(results: dict) -> str:
    """A small text table: n, KL bound, then per aggregation proxy / gold / KL estimate."""
    rows = results["rows"]
    labels = list(dict.fromkeys(r["aggregation"] for r in rows))
    by = {(r["aggregation"], r["n"]): r for r in rows}
    has_gold = any(r["gold_reward"] is not None for r in rows)
    head = f"{'n':>5} {'KL bound':>9}"
    for label in labels:
        head += f" | {label + ' proxy':>18}" + (f" {'gold':>7}" if has_gold else "") + f" {'KL est':>7}"
    lines = [head, "-" * len(head)]
    for n in results["ns"]:
        line = f"{n:>5} {bon_kl_bound(n):>9.3f}"
        for label in labels:
            r = by[(label, n)]
            line += f" | {r['proxy_reward']:>18.3f}" + (f" {r['gold_reward']:>7.3f}" if has_gold else "") + \
                    f" {r['kl_estimate']:>7.3f}"
        lines.append(line)
    return "\n".join(lines)
