"""Benchmark: scoring throughput of reward-model ensembles (K = 4 multi-head vs K = 4 seeds vs one member).

    python bench/rm_scoring.py            # full: hidden 256, 4 layers, 512 rows, best of 3, ~1-2 min on 1 core
    python bench/rm_scoring.py --quick    # smoke run (tiny model, few rows, 2 repeats; timings meaningless)

What is compared (METHODS §8; `reward_models.RewardEnsemble.score`, the path `align rm score` takes):
- `single`: one reward model (kind `seeds`, K = 1);
- `multi_head`: K members as K linear heads on ONE backbone: one backbone forward per batch;
- `seeds`: K independent full models (the Coste setup): K backbone forwards per batch, K x the weights;
- `lora`: one frozen base with K LoRA adapters: K backbone forwards per batch (one per adapter), one set of base
  weights. Shown for completeness.
All are built by `RewardEnsemble.build` from the same locally built Llama (`LlamaConfig`, random init, saved with
`save_pretrained`) and the toy world's tokenizer, fp32 on CPU, sdpa attention, eval mode, no gradients. The rows
are toy-world (prompt, response) pairs (`align.toy_world.make_sft_rows`), identical for every variant; `score`
tokenizes them, sorts them by length and scores `--batch-size` rows at a time. Each variant is timed `--repeats`
times in rotating order after one untimed warm-up call (`common.interleaved`); the table gives the median rows/s
with min, max and spread (max − min) / median over the repeats, and the ratios per repeat (the variants of one
repeat ran back to back) with theirs; the fastest run of each is in the JSON too, with every run.
Torch uses `--threads` threads (default 1: the machine is shared).

Sanity: with fresh heads and LoRA B = 0, member k of every kind computes the same function (same backbone, head k
from the same seed), so every variant's column k must agree with `seeds`' (and `single` with column 0).

Results: a table (rows/s, tokens/s, backbone forwards per batch, parameters held, ratios to `single` and to
`seeds`) and JSON at `--output` (default bench/results/rm_scoring.json), written atomically.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP waits collapse on shared cores
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import common  # noqa: E402  (after the environment it reads at import)

K = 4
VARIANTS = ("single", "multi_head", "seeds", "lora")
PRESETS = {
    "full": {"model": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 4,
                       "intermediate_size": 1024}, "rows": 512, "batch_size": 32, "repeats": 3},
    "quick": {"model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 2,
                        "intermediate_size": 64}, "rows": 32, "batch_size": 8, "repeats": 2},
}


def build(variant: str, model_dir: Path, seeds: list[int]):
    from align.modeling import LoraSection, ModelConfig
    from reward_models import RewardEnsemble

    config = ModelConfig(name_or_path=str(model_dir), dtype="float32", attn_implementation="sdpa")
    if variant == "single":
        return RewardEnsemble.build("seeds", config, 1, seeds=seeds[:1])
    lora = LoraSection(r=16, lora_alpha=32) if variant == "lora" else None
    return RewardEnsemble.build(variant, config, K, seeds=seeds, lora=lora).eval()


def time_score(ensemble, prompts, responses, batch_size: int) -> tuple[float, float, object]:
    """(wall s, process CPU s, per-member scores) of one `score` call."""
    wall, cpu = time.perf_counter(), time.process_time()
    per_member, _ = ensemble.score(prompts, responses, batch_size=batch_size)
    return time.perf_counter() - wall, time.process_time() - cpu, per_member


def main(argv: list[str] | None = None) -> int:
    parser = common.bench_parser(__doc__, "rm_scoring", threads=1, threads_help="torch threads",
                                 repeats_help="timed runs per variant, in rotating order; the fastest counts")
    parser.add_argument("--rows", type=int, help="(prompt, response) rows scored per run")
    parser.add_argument("--batch-size", type=int, help="rows per forward")
    args = parser.parse_args(argv)

    import torch

    from align import toy_world

    preset = common.apply_overrides(PRESETS["quick" if args.quick else "full"], args, ("rows", "batch_size", "repeats"))
    spec = {**preset, "threads": args.threads, "seed": args.seed, "num_members": K, "quick": args.quick}
    if min(spec["rows"], spec["batch_size"], spec["repeats"], spec["threads"]) < 1:
        parser.error("--rows, --batch-size, --repeats and --threads must be >= 1")
    torch.set_num_threads(spec["threads"])
    started = time.time()
    machine = common.machine()

    rows = toy_world.make_sft_rows(spec["rows"], seed=spec["seed"])
    prompts, responses = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    seeds = [spec["seed"] + 1000 + k for k in range(K)]

    with tempfile.TemporaryDirectory(prefix="bench-rm-scoring-") as work:
        model_dir = common.save_tiny_model(Path(work) / "model", seed=spec["seed"], **spec["model"])
        ensembles = {variant: build(variant, model_dir, seeds) for variant in VARIANTS}
        # prompt + response words, BOS and EOS: the tokens one member's backbone reads per row
        tokenizer = ensembles["single"].tokenizer
        tokens = sum(len(ids) + 1 for ids in tokenizer([p + r for p, r in zip(prompts, responses)]).input_ids)
        m = spec["model"]
        print(f"Llama: hidden {m['hidden_size']}, {m['num_layers']} layers, intermediate {m['intermediate_size']}; "
              f"fp32, sdpa, {spec['threads']} thread(s); {spec['rows']} rows ({tokens / spec['rows']:.1f} tokens "
              f"each on average), batch {spec['batch_size']}; {spec['repeats']} repeats in rotating order "
              f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)", flush=True)

        scores = {}
        for variant, ensemble in ensembles.items():  # warm-up (first-call allocations, lazy imports)
            ensemble.score(prompts[:spec["batch_size"]], responses[:spec["batch_size"]], batch_size=spec["batch_size"])

        def run_one(variant: str, rep: int) -> dict:
            load0 = os.getloadavg()[0]
            wall, cpu, scores[variant] = time_score(ensembles[variant], prompts, responses, spec["batch_size"])
            print(f"  run {rep + 1} {variant:10} {spec['rows'] / wall:9.1f} rows/s ({wall:.2f}s, CPU {cpu:.2f}s)",
                  flush=True)
            return {"wall_s": wall, "cpu_s": cpu, "rows_per_s": spec["rows"] / wall, "tokens_per_s": tokens / wall,
                    "loadavg_start": load0, "loadavg_end": os.getloadavg()[0]}

        runs = common.interleaved(VARIANTS, spec["repeats"], run_one)
        reference = scores["seeds"]
        sanity = {
            "single = seeds member 0": bool(torch.allclose(scores["single"][:, 0], reference[:, 0], atol=1e-4)),
            "multi_head columns = seeds members": bool(torch.allclose(scores["multi_head"], reference, atol=1e-4)),
            "lora columns = seeds members (B = 0)": bool(torch.allclose(scores["lora"], reference, atol=1e-4)),
        }
        params = {v: sum(p.numel() for p in e.parameters()) for v, e in ensembles.items()}
        forwards = {"single": 1, "multi_head": 1, "seeds": K, "lora": K}

    rows_per_s = {v: common.spread(r["rows_per_s"] for r in rs) for v, rs in runs.items()}
    best = {v: common.best_of(rs, "rows_per_s") for v, rs in runs.items()}
    # Ratios per repeat (the variants of one repeat ran back to back), median and spread over the repeats.
    ratios = {v: {"vs_single": common.paired_ratios(runs[v], runs["single"], "rows_per_s"),
                  "vs_seeds": common.paired_ratios(runs[v], runs["seeds"], "rows_per_s")} for v in VARIANTS}

    print("\n| variant | K | rows/s (median, min–max, ±spread) | fwd/batch | params (M) | x single | x seeds |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for v in VARIANTS:
        print(f"| {v} | {1 if v == 'single' else K} | {common.fmt_spread(rows_per_s[v], '.1f')} | {forwards[v]} | "
              f"{params[v] / 1e6:.2f} | {common.fmt_spread(ratios[v]['vs_single'])} | "
              f"{common.fmt_spread(ratios[v]['vs_seeds'])} |")
    print(common.check_lines(sanity, prefix="sanity: "))

    results = {
        "spec": {**spec, "tokens": tokens, "precision": "fp32", "device": "cpu", "attn_implementation": "sdpa",
                 "lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
                 "torch": torch.__version__, "python": platform.python_version()},
        "machine": machine, "rows_per_s": rows_per_s, "best": best, "ratios": ratios,
        "backbone_forwards_per_batch": forwards, "parameters": params, "sanity": sanity, "runs": runs,
        "wall_s": time.time() - started,
    }
    common.write_json(args.output, results)
    print(f"{results['wall_s']:.0f}s in all; results in {args.output}")
    return 0 if all(sanity.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
