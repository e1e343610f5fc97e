"""Benchmark: scoring throughput of reward-model ensembles (K = 4 multi-head vs K = 4 seeds vs one member).

    python bench/rm_scoring.py            # full: hidden 256, 4 layers, 512 rows, best of 3, ~1-2 min on 1 core
    python bench/rm_scoring.py --quick    # smoke run (tiny model, few rows; timings meaningless)

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
times in rotating order after one untimed warm-up call; the fastest run counts (the usual defence on a shared
machine; every run is kept in the JSON). Torch uses `--threads` threads (default 1: the machine is shared).

Sanity: with fresh heads and LoRA B = 0, member k of every kind computes the same function (same backbone, head k
from the same seed), so every variant's column k must agree with `seeds`' (and `single` with column 0).

Results: a table (rows/s, tokens/s, backbone forwards per batch, parameters held, ratios to `single` and to
`seeds`) and JSON at `--output` (default bench/results/rm_scoring.json), written atomically.
"""

from __future__ import annotations

import argparse
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

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
DEFAULT_OUTPUT = REPO_ROOT / "bench" / "results" / "rm_scoring.json"
K = 4
VARIANTS = ("single", "multi_head", "seeds", "lora")
PRESETS = {
    "full": {"model": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 4,
                       "intermediate_size": 1024}, "rows": 512, "batch_size": 32, "repeats": 3},
    "quick": {"model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 2,
                        "intermediate_size": 64}, "rows": 32, "batch_size": 8, "repeats": 1},
}


def save_model(model_dir: Path, spec: dict) -> None:
    """A random-init Llama causal LM of the given size over the toy world's vocabulary, with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from align import toy_world

    m = spec["model"]
    tokenizer = toy_world.build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_layers"], num_attention_heads=m["num_heads"], num_key_value_heads=m["num_kv_heads"],
        max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, attention_dropout=0.0,
    )
    torch.manual_seed(spec["seed"])
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model and few rows: a smoke run")
    parser.add_argument("--rows", type=int, help="(prompt, response) rows scored per run")
    parser.add_argument("--batch-size", type=int, help="rows per forward")
    parser.add_argument("--repeats", type=int, help="timed runs per variant; the fastest counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results (written atomically)")
    args = parser.parse_args(argv)

    import torch

    from align import toy_world
    from align.io import atomic_write_json
    from reward_models.ensemble import encode_pairs

    preset = PRESETS["quick" if args.quick else "full"]
    spec = {"model": preset["model"], "rows": args.rows or preset["rows"],
            "batch_size": args.batch_size or preset["batch_size"], "repeats": args.repeats or preset["repeats"],
            "threads": args.threads, "seed": args.seed, "num_members": K, "quick": args.quick}
    if min(spec["rows"], spec["batch_size"], spec["repeats"], spec["threads"]) < 1:
        parser.error("--rows, --batch-size, --repeats and --threads must be >= 1")
    torch.set_num_threads(spec["threads"])
    started = time.time()

    rows = toy_world.make_sft_rows(spec["rows"], seed=spec["seed"])
    prompts, responses = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    seeds = [spec["seed"] + 1000 + k for k in range(K)]

    with tempfile.TemporaryDirectory(prefix="bench-rm-scoring-") as work:
        model_dir = Path(work) / "model"
        save_model(model_dir, spec)
        ensembles = {variant: build(variant, model_dir, seeds) for variant in VARIANTS}
        tokens = sum(len(ids) for ids in encode_pairs(ensembles["single"].tokenizer, prompts, responses))
        m = spec["model"]
        print(f"Llama: hidden {m['hidden_size']}, {m['num_layers']} layers, intermediate {m['intermediate_size']}; "
              f"fp32, sdpa, {spec['threads']} thread(s); {spec['rows']} rows ({tokens / spec['rows']:.1f} tokens "
              f"each on average), batch {spec['batch_size']}; best of {spec['repeats']} "
              f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)", flush=True)

        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        scores = {}
        for variant, ensemble in ensembles.items():  # warm-up (first-call allocations, lazy imports)
            ensemble.score(prompts[:spec["batch_size"]], responses[:spec["batch_size"]], batch_size=spec["batch_size"])
        for rep in range(spec["repeats"]):
            order = VARIANTS[rep % len(VARIANTS):] + VARIANTS[:rep % len(VARIANTS)]
            for variant in order:
                load0 = os.getloadavg()[0]
                wall, cpu, per_member = time_score(ensembles[variant], prompts, responses, spec["batch_size"])
                scores[variant] = per_member
                runs[variant].append({"wall_s": wall, "cpu_s": cpu, "rows_per_s": spec["rows"] / wall,
                                      "tokens_per_s": tokens / wall, "loadavg_start": load0,
                                      "loadavg_end": os.getloadavg()[0]})
                print(f"  run {rep + 1} {variant:10} {spec['rows'] / wall:9.1f} rows/s ({wall:.2f}s, CPU {cpu:.2f}s)",
                      flush=True)

        reference = scores["seeds"]
        sanity = {
            "single = seeds member 0": bool(torch.allclose(scores["single"][:, 0], reference[:, 0], atol=1e-4)),
            "multi_head columns = seeds members": bool(torch.allclose(scores["multi_head"], reference, atol=1e-4)),
            "lora columns = seeds members (B = 0)": bool(torch.allclose(scores["lora"], reference, atol=1e-4)),
        }
        params = {v: sum(p.numel() for p in e.parameters()) for v, e in ensembles.items()}
        forwards = {"single": 1, "multi_head": 1, "seeds": K, "lora": K}

    best = {v: max(rs, key=lambda r: r["rows_per_s"]) for v, rs in runs.items()}
    ratios = {v: {"vs_single": best[v]["rows_per_s"] / best["single"]["rows_per_s"],
                  "vs_seeds": best[v]["rows_per_s"] / best["seeds"]["rows_per_s"]} for v in VARIANTS}

    print()
    print(f"{'variant':12}{'K':>3}{'rows/s':>10}{'tokens/s':>11}{'fwd/batch':>11}{'params (M)':>12}"
          f"{'x single':>10}{'x seeds':>9}")
    for v in VARIANTS:
        print(f"{v:12}{1 if v == 'single' else K:>3}{best[v]['rows_per_s']:>10.1f}{best[v]['tokens_per_s']:>11.0f}"
              f"{forwards[v]:>11}{params[v] / 1e6:>12.2f}{ratios[v]['vs_single']:>10.2f}{ratios[v]['vs_seeds']:>9.2f}")
    for name, ok in sanity.items():
        print(f"  [{'x' if ok else ' '}] sanity: {name}")

    results = {
        "spec": {**spec, "tokens": tokens, "precision": "fp32", "device": "cpu", "attn_implementation": "sdpa",
                 "lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
                 "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "cpu_count": os.cpu_count(),
                 "torch": torch.__version__, "python": platform.python_version()},
        "best": best, "ratios": ratios, "backbone_forwards_per_batch": forwards, "parameters": params,
        "sanity": sanity, "runs": runs, "wall_s": time.time() - started,
    }
    atomic_write_json(args.output, results)
    print(f"{results['wall_s']:.0f}s in all; results in {args.output}")
    return 0 if all(sanity.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
