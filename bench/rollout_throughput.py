"""Benchmark: rollout throughput (generated tokens/s) of vLLM against HF `generate`, and vLLM's weight-sync time, at two
model sizes, on whatever device is here (vLLM's CPU build on CPU; the CUDA build on a GPU).

    python bench/rollout_throughput.py            # toy model (d=64, 2 layers) and d=512, 8 layers; 64 x 8 x 24 tokens
    python bench/rollout_throughput.py --quick    # smoke run (toy model, few prompts, 2 repeats; timings meaningless)
    python bench/rollout_throughput.py --quick --backends hf    # without vLLM (what the main test suite runs)

What is measured: `RolloutBackend.generate(prompts, n, SamplingParams(max_new_tokens, temperature=1, seed=0))` end
to end: sampling plus the per-token log-probs every backend returns (HF recomputes them with one teacher-forced pass;
vLLM returns them while sampling). Models are random-init Llamas over the toy world's vocabulary
(`toy_world.build_tiny_model`, saved with `save_pretrained`); prompts are toy-world prompts. Throughput = generated
tokens (sum of `len(token_ids)`, EOS included, padding not) / wall seconds. Random weights rarely emit EOS, so both
backends generate nearly `max_new_tokens` per sample.

- `hf`: HFRollout, left-padded batches of `--batch-size` sequences with a KV cache;
- `vllm`: VLLMRollout (`enforce_eager` on CPU, where there is nothing to compile for; CUDA graphs on a GPU);
- `sync`: `VLLMRollout.load_weights(model)`, the in-place reload of the HF model's weights (median of at least 3).

Both run in fp32 on CPU, bf16 on a GPU. The two backends alternate (`common.interleaved`), each timed `--repeats` times
after one full-size warm-up; the table gives the median tokens/s with its spread (max − min) / median, and the vLLM /
HF ratio per repeat (the two ran back to back), median and spread; every run is kept in the JSON. Without vLLM the HF figures are still
measured and the reason is printed. Results: a table and JSON at `--output` (default
bench/results/rollout_throughput.json), written atomically.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP waits collapse on shared cores
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import common  # noqa: E402  (after the environment it reads at import)

BACKENDS = ("hf", "vllm")
MODELS = {
    "toy": {},  # toy_world.build_tiny_model's defaults: d=64, 2 layers, 2 heads (head_dim 32), the quickstart's
    "d512x8": {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 8, "intermediate_size": 2048,
               "max_positions": 512},
}
PRESETS = {
    "full": {"models": ["toy", "d512x8"], "prompts": 64, "n": 8, "max_new_tokens": 24, "batch_size": 64,
             "repeats": 3},
    "quick": {"models": ["toy"], "prompts": 4, "n": 2, "max_new_tokens": 4, "batch_size": 8, "repeats": 2},
}


def vllm_unavailable() -> str | None:
    """Why vLLM cannot run here, or None."""
    from align.errors import ConfigError
    from align.rollout.vllm import import_vllm

    try:
        import_vllm()
    except ConfigError as e:
        return str(e)
    return None


def time_generate(rollout, prompts, n, sampling) -> dict:
    start = time.perf_counter()
    result = rollout.generate(prompts, n=n, sampling=sampling)
    wall = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for group in result for c in group)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall}


def main(argv: list[str] | None = None) -> int:
    parser = common.bench_parser(__doc__, "rollout_throughput", threads=None, threads_help="torch threads on CPU",
                                 repeats_help="timed runs per backend, alternating")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help="model sizes (default: preset)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                        help="backends to measure (default: both; vLLM is skipped, with the reason, where missing)")
    parser.add_argument("--prompts", type=int, help="number of prompts (default: preset)")
    parser.add_argument("--n", type=int, help="samples per prompt (default: preset)")
    parser.add_argument("--max-new-tokens", type=int, help="tokens per completion (default: preset)")
    parser.add_argument("--batch-size", type=int, help="HF: sequences per generate call (default: preset)")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align import toy_world
    from align.rollout import SamplingParams, build_rollout

    preset = common.apply_overrides(PRESETS["quick" if args.quick else "full"], args,
                                    ("models", "prompts", "n", "max_new_tokens", "batch_size", "repeats"))
    on_gpu = torch.cuda.is_available()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    device = torch.cuda.get_device_name() if on_gpu else f"cpu ({os.cpu_count()} cores)"
    prompts = toy_world.make_prompts(preset["prompts"], seed=args.seed)
    n, repeats = preset["n"], preset["repeats"]
    sampling = SamplingParams(max_new_tokens=preset["max_new_tokens"], temperature=1.0, seed=args.seed)
    no_vllm = vllm_unavailable() if "vllm" in args.backends else "not asked for (--backends)"
    results: dict = {"setup": {**preset, "backends": args.backends, "device": device,
                               "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
                               "torch": torch.__version__, "quick": args.quick},
                     "machine": common.machine(), "vllm_unavailable": no_vllm, "models": {}}
    if no_vllm:
        print(f"vLLM: not measured ({no_vllm})", flush=True)
    else:
        import vllm

        results["setup"]["vllm"] = vllm.__version__
    print(f"{device}, {str(dtype).removeprefix('torch.')}; {len(prompts)} prompts x {n} samples x "
          f"{preset['max_new_tokens']} new tokens; {repeats} repeats, backends alternating", flush=True)

    started = time.time()
    for size in preset["models"]:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = common.save_tiny_model(Path(tmp) / size, seed=args.seed, **MODELS[size])
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
            if on_gpu:
                model = model.cuda()
            entry = {"parameters": sum(p.numel() for p in model.parameters()), **(MODELS[size] or {"defaults": True})}
            backends = {}
            if "hf" in args.backends:
                backends["hf"] = build_rollout("hf", model, tokenizer, batch_size=preset["batch_size"])
            if not no_vllm:
                backends["vllm"] = build_rollout(
                    "vllm", str(model_dir), tokenizer, dtype=str(dtype).removeprefix("torch."), seed=args.seed,
                    max_model_len=256, enforce_eager=not on_gpu,
                    **({"gpu_memory_utilization": 0.3} if on_gpu else
                       {"engine_kwargs": {"kv_cache_memory_bytes": 512 << 20}}))
            for rollout in backends.values():
                rollout.generate(prompts, n=n, sampling=sampling)  # warm-up at full size (allocations, kernels)
            runs = common.interleaved(backends, repeats,
                                      lambda name, rep, b=backends: time_generate(b[name], prompts, n, sampling))
            for name, rs in runs.items():
                entry[name] = {"tokens_per_s": common.spread(r["tokens_per_s"] for r in rs), "runs": rs}
            if "vllm" in backends:
                syncs = []
                for _ in range(max(3, repeats)):
                    start = time.perf_counter()
                    backends["vllm"].load_weights(model)
                    syncs.append(time.perf_counter() - start)
                entry["sync_s"] = common.spread(syncs)
                if "hf" in backends:
                    entry["vllm_x_hf"] = common.paired_ratios(runs["vllm"], runs["hf"], "tokens_per_s")
            results["models"][size] = entry
            print(f"  {size} ({entry['parameters'] / 1e6:.1f}M): " + ", ".join(
                f"{name} {common.fmt_spread(entry[name]['tokens_per_s'], '.0f')} tokens/s" for name in backends)
                  + (f"; sync {entry['sync_s']['median'] * 1e3:.0f} ms" if "sync_s" in entry else ""), flush=True)
            del backends, model

    def cell(e, key, fmt):
        return common.fmt_spread(e[key]["tokens_per_s"], fmt) if key in e else "-"

    print("\n| model | parameters | HF tokens/s | vLLM tokens/s | vLLM / HF | weight sync (ms) |\n"
          "|---|---:|---:|---:|---:|---:|")
    for size, e in results["models"].items():
        ratio = common.fmt_spread(e["vllm_x_hf"]) + "x" if "vllm_x_hf" in e else "-"
        sync = common.fmt_spread({**e["sync_s"], **{k: 1e3 * e["sync_s"][k] for k in ("median", "min", "max")}},
                                 ".0f") if "sync_s" in e else "-"
        print(f"| {size} | {e['parameters'] / 1e6:.1f}M | {cell(e, 'hf', '.0f')} | {cell(e, 'vllm', '.0f')} | "
              f"{ratio} | {sync} |")
    print("(median over the repeats (min–max, ±spread = (max − min) / median))")
    results["wall_s"] = time.time() - started
    common.write_json(args.output, results)
    print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
