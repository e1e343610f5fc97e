"""What the on-policy studies share (`align study NAME`, eval/studies/): the run context, the SFT policy, f-DPG runs,
the measurement of a trained policy, mean ± spread over seeds, and the outputs.

- `Study`: one run of a study: its output and work folders, the seeds, quick or full, timing and progress lines.
- `Study.sft()`: the starting policy and KL reference of every study: the quickstart's SFT model
  (`toy_world.save_base_model(seed=0)` + `align.recipes.quickstart.train_toy_sft(seed=0)`), built once per study run and cached
  under `<work>/sft/` (a later run with the same work folder reuses it). The seeds of a study vary the training and
  the measurement, not the SFT model.
- `fdpg_recipe` / `run_fdpg`: an f-DPG run (`align.recipes.train.train`) from a recipe dict equal to configs/fdpg-toy.yaml
  except for what a study changes (steps, learning rate, divergence, target, reward), with no before/after
  measurement (`measure_policy` measures every method alike) and the trainer's per-step printout sent to
  `<run>/train.log`.
- `measure_policy`: samples `num_samples` completions for each held-out prompt from a policy (plain ancestral
  sampling, temperature 1, `max_new_tokens` 24, seeded) and reports, over those samples:
    gold_reward        mean toy-world gold reward;
    kl_to_sft          Monte-Carlo KL(π‖π_sft) = mean over samples of log π(y|x) − log π_sft(y|x), both sequence
                       sums from `align.logps.score_completions`-style teacher-forced passes (the sampler's own pass
                       for π, `score_completions` for π_sft) — unbiased because the samples are draws from π;
    entropy_per_token  mean over samples of −log π(y|x)/|y|: the Monte-Carlo estimate of the per-token entropy of
                       π's completions (what the trainer logs as `entropy/token`);
    distinct_2         distinct bigrams / all bigrams over every sample pooled (Li et al. 2016; the trainer's
                       `completion/distinct_2` over a batch);
    distinct_2_within_prompt  the same within each prompt's samples, averaged over prompts;
    length             mean completion length in tokens (EOS included).
- `summarize`: mean, sample std (ddof 1; 0 for one seed), min and max over seeds (`SPREAD` says so in every JSON).
- `Study.write`: results.json (atomic, `align.io.atomic_write_json`), results.md (the table), and the figure
  (`align.io.atomic_save_figure`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from align.io import (
    atomic_directory,
    atomic_save_figure,
    atomic_write_json,
    atomic_write_text,
)

#: How the spread over seeds is reported (every study's results.json carries it).
SPREAD = ("mean ± std over seeds (sample standard deviation, ddof=1; 0 with one seed); min and max over seeds are "
          "given beside it")

#: The toy prompt stream the policies train on and the held-out measurement prompts (as configs/fdpg-toy.yaml).
TRAIN_PROMPTS, TRAIN_PROMPT_SEED, EVAL_PROMPT_SEED = 2048, 1000, 2000
MAX_NEW_TOKENS = 24


@dataclass
class Study:
    """One run of a study. `seeds` are the training/measurement seeds; `sft_dir` (optional) is an SFT policy to
    reuse instead of building one (the tests pass theirs)."""

    name: str
    output_dir: Path
    work_dir: Path
    seeds: list[int]
    quick: bool
    sft_dir: Path | None = None
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def log(self, message: str) -> None:
        print(f"[{self.name} {self.elapsed():6.1f}s] {message}", file=sys.stderr, flush=True)

    def sft(self) -> Path:
        """The SFT policy (see the module docstring): `sft_dir` when given, else built once under `<work>/sft/`."""
        if self.sft_dir is not None:
            return Path(self.sft_dir)
        home = self.work_dir / "sft"
        model = home / "model"
        if not (model / "config.json").is_file():
            from align import toy_world
            from align.recipes.quickstart import train_toy_sft

            self.log("building the SFT policy (tiny Llama + TRL SFTTrainer on the toy grammar, seed 0)")
            with atomic_directory(home) as tmp, _stdout_to(tmp / "train.log"):
                toy_world.save_base_model(tmp / "base", seed=0)
                train_toy_sft(tmp / "base", tmp / "model", seed=0)
        self.sft_dir = model
        return model

    def run_dir(self, *parts: str) -> Path:
        return self.work_dir.joinpath(*parts)

    def write(self, results: dict, figure, markdown: str) -> dict:
        """Writes results.md, the figure (PNG) and results.json (last: its presence means a finished run) and returns
        `results` with the common fields added."""
        import matplotlib.pyplot as plt

        self.output_dir.mkdir(parents=True, exist_ok=True)
        png = self.output_dir / f"{self.name}.png"
        atomic_save_figure(figure, png)
        plt.close(figure)
        results = {
            "study": self.name,
            "command": f"align study {self.name}" + (" --quick" if self.quick else ""),
            "quick": self.quick,
            "seeds": self.seeds,
            "spread": SPREAD,
            **results,
            "wall_time_s": round(self.elapsed(), 1),
            "outputs": {"results": str(self.output_dir / "results.json"), "figure": str(png),
                        "table": str(self.output_dir / "results.md"), "work_dir": str(self.work_dir)},
        }
        header = (f"# `{results['command']}`\n\n{len(self.seeds)} seed(s) {self.seeds}; {SPREAD}. "
                  f"Wall time {results['wall_time_s']} s. Figure: `{png.name}`.\n\n")
        atomic_write_text(self.output_dir / "results.md", header + markdown)
        atomic_write_json(self.output_dir / "results.json", _finite(results))
        return results


# --- f-DPG runs ---------------------------------------------------------------------------------------------------


def fdpg_recipe(sft: Path, output_dir: Path, *, seed: int, steps: int, learning_rate: float,
                divergence: str = "reverse_kl", target: dict | None = None, reward: dict | None = None,
                logging_steps: int = 10) -> dict:
    """An on-policy f-DPG recipe: configs/fdpg-toy.yaml (8 prompts x 4 samples a step, 24 new tokens, moving
    baseline, frozen SFT reference, gold reward logged) with the given changes."""
    return {
        "model": {"name_or_path": str(sft), "dtype": "float32"},
        "prompts": {"toy_world": TRAIN_PROMPTS, "seed": TRAIN_PROMPT_SEED},
        "reward": reward or {"kind": "toy_world"},
        "objective": {"name": "fdpg", "divergence": divergence, "baseline": "moving"},
        "target": target or {"kind": "exponential", "beta": 0.1},
        "reference": {"kind": "frozen"},
        "generation": {"num_samples": 4, "max_new_tokens": MAX_NEW_TOKENS},
        "evaluation": {"gold": "toy_world", "prompts": None},
        "training": {"output_dir": str(output_dir), "per_device_train_batch_size": 8, "max_steps": steps,
                     "learning_rate": learning_rate, "lr_scheduler_type": "constant", "logging_steps": logging_steps,
                     "save_strategy": "no", "report_to": "none", "disable_tqdm": True},
        "seed": seed,
        "overwrite": True,  # the study's own run folder (it holds train.log; a rerun replaces the run)
    }


def run_fdpg(recipe: dict) -> dict:
    """Trains `recipe` with `align.recipes.train.train` → its summary (`final_model`, `log_history`, ...)."""
    from align.config import load_train_config
    from align.recipes.train import train

    config = load_train_config(None, base=recipe)
    out = Path(recipe["training"]["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    with _stdout_to(out / "train.log"):
        return train(config)


def train_curves(log_history: list[dict]) -> list[dict]:
    """The logged training steps of an on-policy run (entries with a `reward`), as plain dicts."""
    return [dict(h) for h in log_history if "reward" in h]


@contextlib.contextmanager
def _stdout_to(path: Path):
    """Sends stdout (the Trainer's per-step printout) to `path` for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f, contextlib.redirect_stdout(f):
        yield


# --- measuring a policy -------------------------------------------------------------------------------------------


def load_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def eval_prompts(n: int) -> list[str]:
    """The held-out measurement prompts (the toy prompt stream with seed 2000, as configs/fdpg-toy.yaml)."""
    from align import toy_world

    return toy_world.make_prompts(n, seed=EVAL_PROMPT_SEED)


@dataclass
class Measurement:
    """`metrics` (module docstring) and the samples they were measured on (prompt-major, `num_samples` each)."""

    metrics: dict[str, float]
    prompts: list[str]
    texts: list[str]


@torch.no_grad()
def measure_policy(policy, sft, tokenizer, prompts: list[str], *, num_samples: int, seed: int) -> Measurement:
    """Samples `num_samples` completions per prompt from `policy` and measures them (module docstring)."""
    from align import toy_world
    from align.data import tokenize_prompts
    from align.logps import score_completions
    from align.onpolicy_trainer import distinct_2
    from align.rollout import HFRollout, SamplingParams

    policy.eval()
    prompt_ids = tokenize_prompts(tokenizer, prompts, source="evaluation")
    groups = HFRollout(policy, tokenizer, batch_size=128).generate(
        prompt_ids, n=num_samples, sampling=SamplingParams(max_new_tokens=MAX_NEW_TOKENS, seed=seed))
    flat = [c for group in groups for c in group]
    texts = [c.text for c in flat]
    flat_prompts = [prompts[i] for i, group in enumerate(groups) for _ in group]
    own = [float(c.logps.double().sum()) for c in flat]
    ref = score_completions(sft, [prompt_ids[i] for i, group in enumerate(groups) for _ in group],
                            [c.token_ids for c in flat], batch_size=128)
    lengths = [max(len(c.token_ids), 1) for c in flat]
    metrics = {
        "gold_reward": statistics.fmean(toy_world.gold_rewards(texts)),
        "kl_to_sft": statistics.fmean(o - float(r.double().sum()) for o, r in zip(own, ref)),
        "entropy_per_token": statistics.fmean(-o / n for o, n in zip(own, lengths)),
        "distinct_2": distinct_2([c.token_ids for c in flat]),
        "distinct_2_within_prompt": statistics.fmean(distinct_2([c.token_ids for c in g]) for g in groups),
        "length": statistics.fmean(len(c.token_ids) for c in flat),
    }
    return Measurement(metrics=metrics, prompts=flat_prompts, texts=texts)


# --- mean ± spread ------------------------------------------------------------------------------------------------


def summarize(values: list[float]) -> dict:
    """{mean, std (ddof 1; 0 for one value), min, max, n, values} of one metric over seeds."""
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values), "values": values}


def summarize_runs(per_seed: list[dict[str, float]]) -> dict[str, dict]:
    """Per-seed metric dicts (same keys) → {metric: summarize(values over seeds)}."""
    return {key: summarize([m[key] for m in per_seed]) for key in per_seed[0]}


def fmt(summary: dict, digits: int = 2) -> str:
    """'1.23 ± 0.45' (mean ± std over seeds)."""
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def mean_curve(histories: list[list[dict]], key) -> tuple[list[int], list[float], list[float]]:
    """Steps logged by every seed, and the mean and std over seeds of `key` (a metric name, or a function of a
    logged step) at each."""
    get = key if callable(key) else (lambda h: h[key])
    steps = sorted(set.intersection(*[{h["step"] for h in hist} for hist in histories]))
    by_seed = [{h["step"]: get(h) for h in hist} for hist in histories]
    means, stds = [], []
    for step in steps:
        s = summarize([b[step] for b in by_seed])
        means.append(s["mean"])
        stds.append(s["std"])
    return steps, means, stds


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_panel(ax, labels: list[str], summaries: list[dict], title: str, colors=None) -> None:
    """Bars of the means with ±std error bars and each seed's value as a dot."""
    x = list(range(len(labels)))
    ax.bar(x, [s["mean"] for s in summaries], yerr=[s["std"] for s in summaries], capsize=4, alpha=0.75,
           color=colors)
    for i, s in enumerate(summaries):
        ax.plot([i] * len(s["values"]), s["values"], "k.", markersize=4)
    ax.set_xticks(x, labels, rotation=20, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def default_threads() -> None:
    """One torch thread unless OMP_NUM_THREADS says otherwise: the tiny models are fastest on one thread, and the
    studies share the CPU with other work."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def _finite(obj):
    """JSON-safe copy: non-finite floats (never expected) become None rather than invalid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps(obj) -> str:
    return json.dumps(_finite(obj), indent=2)
