"""Benchmark: rollout throughput (generated tokens/s) of the HF backend unbatched vs batched on CPU, and of vLLM vs
HF on a GPU where one (and vllm) is available.

    python bench/rollout_throughput.py            # CPU: hidden 256, 4 layers, 16 prompts x 8 samples x 32 tokens
    python bench/rollout_throughput.py --vllm     # also vLLM vs HF on the GPU (skipped, with the reason, without one)
    python bench/rollout_throughput.py --quick    # smoke run (tiny model; timings meaningless)

What is measured: `RolloutBackend.generate(prompts, n, SamplingParams(max_new_tokens, temperature=1, seed=0))` end
to end, i.e. sampling plus the per-token log-prob pass every backend returns. The model is a random-init Llama over
the toy world's vocabulary (`toy_world.build_tiny_model`, saved with `save_pretrained`), the prompts are toy-world
prompts (`toy_world.make_prompts`). Throughput = generated tokens (sum of `len(token_ids)`, EOS included, padding
not) / wall seconds. Variants:
- `hf_b1`: HFRollout, batch_size 1 (one sequence per `generate` call: the unbatched baseline);
- `hf_b64`: HFRollout, batch_size `--batch-size` (left-padded batches with KV cache);
- with `--vllm` on a GPU: `hf_gpu` (HFRollout on cuda, same batch size) and `vllm` (VLLMRollout), both bf16.
Each variant runs once untimed (warm-up) and is then timed `--repeats` times; the fastest run counts (every run is
kept in the JSON). The CPU variants use `--threads` torch threads (default 1: the machine is shared).

Results: a table with ratios and JSON at `--output` (default bench/results/rollout_throughput.json), atomically.
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
DEFAULT_OUTPUT = REPO_ROOT / "bench" / "results" / "rollout_throughput.json"
PRESETS = {
    "full": {"model": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 4,
                       "intermediate_size": 1024, "max_positions": 512},
             "prompts": 16, "n": 8, "max_new_tokens": 32, "batch_size": 64, "repeats": 2},
    "quick": {"model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 2,
                        "intermediate_size": 64}, "prompts": 2, "n": 2, "max_new_tokens": 4, "batch_size": 4,
              "repeats": 1},
}


def vllm_unavailable() -> str | None:
    """Why vLLM cannot run here, or None."""
    import importlib.util

    import torch

    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install 'align[vllm]', CUDA only)"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible"
    return None


def time_variant(rollout, prompts, n, sampling, repeats) -> dict:
    rollout.generate(prompts[:2], n=2, sampling=sampling)  # warm-up (allocations, kernels, CUDA graphs)
    runs = []
    for _ in range(repeats):
        load0 = os.getloadavg()[0]
        start = time.perf_counter()
        result = rollout.generate(prompts, n=n, sampling=sampling)
        wall = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for group in result for c in group)
        runs.append({"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "loadavg_start": load0,
                     "finished_fraction": sum(c.finished for g in result for c in g) / (len(prompts) * n)})
    best = max(runs, key=lambda r: r["tokens_per_s"])
    return {"tokens_per_s": best["tokens_per_s"], "best": best, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, few prompts")
    parser.add_argument("--vllm", action="store_true", help="also vLLM vs HF on the GPU (where available)")
    parser.add_argument("--prompts", type=int, help="number of prompts (default: preset)")
    parser.add_argument("--n", type=int, help="samples per prompt (default: preset)")
    parser.add_argument("--max-new-tokens", type=int, help="tokens per completion (default: preset)")
    parser.add_argument("--batch-size", type=int, help="sequences per batched generate call (default: preset)")
    parser.add_argument("--repeats", type=int, help="timed runs per variant, fastest counts (default: preset)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align import toy_world
    from align.io import atomic_write_json
    from align.rollout import SamplingParams, build_rollout

    preset = dict(PRESETS["quick" if args.quick else "full"])
    for key in ("prompts", "n", "max_new_tokens", "batch_size", "repeats"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    torch.set_num_threads(args.threads)
    prompts = toy_world.make_prompts(preset["prompts"], seed=0)
    n, bs, repeats = preset["n"], preset["batch_size"], preset["repeats"]
    sampling = SamplingParams(max_new_tokens=preset["max_new_tokens"], temperature=1.0, seed=0)

    results: dict = {"setup": {**preset, "threads": args.threads, "torch": torch.__version__,
                               "python": platform.python_version(), "cpu_count": os.cpu_count()},
                     "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        tokenizer = toy_world.build_tokenizer()
        toy_world.build_tiny_model(tokenizer, seed=0, **preset["model"]).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        n_params = sum(p.numel() for p in model.parameters())
        results["setup"]["parameters"] = n_params
        print(f"model: Llama {n_params / 1e6:.1f}M parameters; {len(prompts)} prompts x {n} samples x "
              f"{preset['max_new_tokens']} new tokens; best of {repeats}; {args.threads} thread(s); "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)

        variants = results["variants"]
        for name, batch_size in (("hf_b1", 1), (f"hf_b{bs}", bs)):
            rollout = build_rollout("hf", model, tokenizer, batch_size=batch_size)
            variants[name] = {"device": "cpu", "batch_size": batch_size,
                              **time_variant(rollout, prompts, n, sampling, repeats)}
            print(f"  {name}: {variants[name]['tokens_per_s']:.0f} tokens/s", flush=True)

        if args.vllm:
            reason = vllm_unavailable()
            if reason:
                results["vllm_skipped"] = reason
                print(f"vLLM vs HF on GPU: skipped ({reason})", flush=True)
            else:
                gpu_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
                rollout = build_rollout("hf", gpu_model, tokenizer, batch_size=bs)
                variants["hf_gpu"] = {"device": torch.cuda.get_device_name(), "batch_size": bs, "dtype": "bfloat16",
                                      **time_variant(rollout, prompts, n, sampling, repeats)}
                print(f"  hf_gpu: {variants['hf_gpu']['tokens_per_s']:.0f} tokens/s", flush=True)
                del rollout, gpu_model
                rollout = build_rollout("vllm", str(model_dir), tokenizer, dtype="bfloat16",
                                        gpu_memory_utilization=0.3, max_model_len=512)
                variants["vllm"] = {"device": torch.cuda.get_device_name(), "dtype": "bfloat16",
                                    **time_variant(rollout, prompts, n, sampling, repeats)}
                print(f"  vllm: {variants['vllm']['tokens_per_s']:.0f} tokens/s", flush=True)

    base = variants["hf_b1"]["tokens_per_s"]
    print("\n| variant | device | batch | tokens/s | x hf_b1 |\n|---|---|---:|---:|---:|")
    for name, v in variants.items():
        v["x_hf_b1"] = v["tokens_per_s"] / base
        print(f"| {name} | {v['device']} | {v.get('batch_size', '-')} | {v['tokens_per_s']:.0f} | "
              f"{v['x_hf_b1']:.2f} |")
    if "vllm" in variants:
        results["vllm_x_hf_gpu"] = variants["vllm"]["tokens_per_s"] / variants["hf_gpu"]["tokens_per_s"]
        print(f"vLLM / HF on GPU: {results['vllm_x_hf_gpu']:.2f}x")
    atomic_write_json(args.output, results)
    print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
