#!/usr/bin/env python
"""Benchmark: peak memory of one TR-DPO reference update under DeepSpeed ZeRO-3, align against TRL's way.

    python bench/tr_dpo_zero3_memory.py            # ~420 MB fp32 Llama, 2 CPU processes, 2 jobs per variant
    python bench/tr_dpo_zero3_memory.py --quick    # small model, both variants in one job (tests/bench)

What is compared (same model, same 2 processes, same α):
- `align`: `TRDPOReference.on_step_end` — the policy is gathered one module at a time (`GatheredParameters` on the
  module's own parameters, read-only) and each rank mixes its own reference partition in place; the reference is
  never gathered.
- `trl`: what TRL's `SyncRefModelCallback` does under ZeRO-3 — `GatheredParameters(list(ref.parameters()) +
  list(policy.parameters()), modifier_rank=0)`, rank 0 mixes, and the context re-partitions from rank 0's copy: both
  full models are materialised on every rank at once.

Both models are built partitioned under `deepspeed.zero.Init` (DS_ACCELERATOR=cpu, gloo), as `from_pretrained` does
under a ZeRO-3 Trainer. Each variant runs in its own `torchrun` job so that peak memory is its own (`--quick`: one job
measures align, then TRL, to keep the smoke run short): a sampler thread reads the process RSS every millisecond
during the update; the figure is the peak RSS during the update minus the RSS right before it (after `malloc_trim`,
so freed heap is not reused unseen), per rank (max over ranks). Afterwards
each rank checks its reference partition against the formula `θ_ref ← α θ + (1 − α) θ_ref` applied to its partition
before the update and the same slice of the policy (max abs error printed). `--repeats` jobs per variant run with the
variants alternating (`common.interleaved`); the table gives the median over the jobs with min, max and spread
(max − min) / median, and the align / TRL ratio per pair of jobs likewise.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import common

VARIANTS = ("align", "trl")
MODELS = {  # ~105M parameters = 420 MB fp32, untied embeddings (the embedding is the largest module)
    "full": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                 num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=False),
    "quick": dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
}
ALPHA = 0.5


def worker(variants: list[str], model_size: str, output: Path, threads: int) -> None:
    """One torchrun process: measures each of `variants` in turn (one per job, except with --quick)."""
    import deepspeed
    import torch

    torch.set_num_threads(threads)
    deepspeed.init_distributed(dist_backend="gloo")
    for variant in variants:
        measure_update(variant, model_size, output)
        deepspeed.comm.barrier()


def measure_update(variant: str, model_size: str, output: Path) -> None:
    import deepspeed
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from align.references import TRDPOReference, soft_update_reference

    rank, world = deepspeed.comm.get_rank(), deepspeed.comm.get_world_size()
    # fp32 via the config, not `dtype=`: DeepSpeed 0.19's `Init._set_dtype` reads `dtype or torch.float16 if
    # fp16_supported else torch.bfloat16 ...`, so on a CPU accelerator an explicit dtype=torch.float32 becomes bf16.
    ds_config = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1,
                 "bf16": {"enabled": False}, "fp16": {"enabled": False}}
    config = LlamaConfig(**MODELS[model_size])
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        torch.manual_seed(0)
        reference_model = LlamaForCausalLM(config)
        torch.manual_seed(1)
        policy = LlamaForCausalLM(config)
    n_params = sum(p.ds_numel for p in policy.parameters())
    assert all(p.dtype == torch.float32 for p in policy.parameters())

    # For the correctness check: this rank's reference partitions before the update (live, so both variants carry
    # them in their baseline alike).
    before = [p.ds_tensor.detach().clone() for p in reference_model.parameters()]
    deepspeed.comm.barrier()

    if variant == "align":
        reference = TRDPOReference.__new__(TRDPOReference)  # the real update code, without loading from a path
        reference.params = TRDPOReference.Params(alpha=ALPHA, tau=1)
        reference.model, reference.updates, reference._master, reference.accelerator = reference_model, 0, None, None

        def update():
            reference.on_step_end(policy, 1)
    else:
        def update():  # TRL's SyncRefModelCallback._sync_target_model under ZeRO-3
            params = list(reference_model.parameters()) + list(policy.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                if rank == 0:
                    for p_ref, p in zip(reference_model.parameters(), policy.parameters()):
                        p_ref.data.mul_(1.0 - ALPHA).add_(p.data, alpha=ALPHA)

    # The first update is a warm-up (communication buffers, lazily built state) and is measured separately; the
    # second is the steady state a training run sees at every later update. The check below accounts for both.
    peaks, seconds = [], []
    for _ in range(2):
        common.settle()  # gc and malloc_trim: freed heap goes back to the OS, so the baseline is live memory only
        with common.PeakSampler("VmRSS") as rss:
            start = time.perf_counter()
            update()
            seconds.append(time.perf_counter() - start)
        peaks.append(rss.extra)
        deepspeed.comm.barrier()
    deepspeed.comm.barrier()
    # Check: each rank's partition equals lerp(its partition before, the same slice of the full policy tensor).
    max_error = 0.0
    for (name, p_ref), p, old in zip(reference_model.named_parameters(), policy.parameters(), before):
        size = p_ref.ds_tensor.ds_numel
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            piece = p.data.reshape(-1)[rank * size:(rank + 1) * size].clone()  # the gathered buffer is freed on exit
        expected = old.clone()
        for _ in range(2):
            soft_update_reference([expected[:piece.numel()]], [piece], ALPHA)
        max_error = max(max_error, (p_ref.ds_tensor - expected).abs().max().item())
    result = {"rank": rank, "world": world, "variant": variant, "parameters": n_params,
              "model_mib_fp32": n_params * 4 / 2**20, "update_peak_mib": peaks[1],
              "first_update_peak_mib": peaks[0], "rss_before_mib": rss.baseline, "seconds": seconds[1],
              "first_update_seconds": seconds[0], "max_abs_error": max_error}
    (output.parent / f"{output.stem}.{variant}.{rank}.json").write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    parser = common.bench_parser(__doc__, "tr_dpo_zero3_memory", threads=1, threads_help="torch threads per process",
                                 repeats_help="torchrun jobs per variant, the variants alternating (default: 2; "
                                              "quick: 1)")
    parser.add_argument("--worker", nargs="+", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="full", help=argparse.SUPPRESS)
    parser.add_argument("--job", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.model, args.output.parent / f"{args.output.stem}.{args.job}.json", args.threads)
        return

    args.output.parent.mkdir(parents=True, exist_ok=True)
    model = "quick" if args.quick else "full"
    repeats = args.repeats or (1 if args.quick else 2)
    machine = common.machine()

    def job(variant: str, rep: int) -> dict:
        """One torchrun job of 2 processes: the variant's two updates; the figures of its larger rank. With --quick
        one job measures both variants, align then TRL, to keep the smoke run short."""
        if not args.quick or variant == VARIANTS[0]:
            common.run_torchrun(__file__, ["--worker", *(VARIANTS if args.quick else [variant]), "--model", model,
                                           "--output", str(args.output), "--job", str(rep), "--threads",
                                           str(args.threads)], f"{variant} worker")
        ranks = []
        for rank in range(2):
            part = args.output.parent / f"{args.output.stem}.{rep}.{variant}.{rank}.json"
            ranks.append(json.loads(part.read_text()))
            part.unlink()
        print(f"  {variant} job {rep + 1}: peak extra RSS {max(r['update_peak_mib'] for r in ranks):.1f} MiB",
              flush=True)
        return {"per_rank": ranks, **{key: max(r[key] for r in ranks) for key in (
            "update_peak_mib", "first_update_peak_mib", "seconds", "max_abs_error")}}

    runs = common.interleaved(VARIANTS, repeats, job) if not args.quick else {
        v: [job(v, rep) for rep in range(repeats)] for v in VARIANTS}
    results = {variant: {**{key: common.spread(r[key] for r in rs) for key in (
        "update_peak_mib", "first_update_peak_mib", "seconds")}, "max_abs_error": max(r["max_abs_error"] for r in rs),
        "jobs": rs} for variant, rs in runs.items()}
    info = runs["align"][0]["per_rank"][0]
    summary = {"model": model, "parameters": info["parameters"], "model_mib_fp32": info["model_mib_fp32"],
               "processes": 2, "alpha": ALPHA, "repeats": repeats, "machine": machine, **results,
               "peak_ratio_align_over_trl": common.paired_ratios(runs["align"], runs["trl"], "update_peak_mib")}
    common.write_json(args.output, summary)
    print(f"TR-DPO reference update under ZeRO-3, {info['parameters'] / 1e6:.1f}M params "
          f"({info['model_mib_fp32']:.0f} MiB fp32), 2 CPU processes, alpha={ALPHA}; {repeats} job(s) per variant, "
          "median (min–max, ±spread)")
    print(f"{'variant':<8}{'peak extra RSS, MiB (max rank)':>34}{'1st update':>26}{'time (s)':>24}{'max |err|':>12}")
    for variant in VARIANTS:
        r = results[variant]
        print(f"{variant:<8}{common.fmt_spread(r['update_peak_mib'], '.1f'):>34}"
              f"{common.fmt_spread(r['first_update_peak_mib'], '.1f'):>26}{common.fmt_spread(r['seconds']):>24}"
              f"{r['max_abs_error']:>12.2e}")
    print(f"align / trl peak: {common.fmt_spread(summary['peak_ratio_align_over_trl'], '.3f')}   (written to "
          f"{args.output})")


if __name__ == "__main__":
    main()
