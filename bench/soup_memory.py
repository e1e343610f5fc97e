#!/usr/bin/env python
"""Benchmark: peak memory per rank of building the `soup` reference under DeepSpeed ZeRO-2 and ZeRO-3.

    python bench/soup_memory.py            # 29.6M-parameter Llama (113 MiB fp32), 2 CPU processes, 2 repeats
    python bench/soup_memory.py --quick    # 5.3M parameters (20 MiB fp32), before and after only, < 60 s
    python bench/soup_memory.py --quick --ks 2   # K = 2 only (tests/bench/test_soup_memory.py)

Ingredients (written by the bench, fp32): `full` — K save_pretrained checkpoints of one architecture (different
seeds); `lora` — K LoRA adapters (r = 16 on every linear layer, random A and B) on one base. K = 2 and 4, weights
uniform. One `torchrun` job of 2 CPU processes (gloo, DS_ACCELERATOR=cpu) measures, for each ZeRO stage (a live
`HfDeepSpeedConfig`, as `TrainingArguments` leaves it before align builds its reference), kind and K, three ways
of building the reference model (`--quick`: `before` and `after` only):

- `before`: the code before this change, verbatim — `build_soup` on every rank (the running fp32 soup plus one fp32
  ingredient), cast to the policy dtype. Under ZeRO-3 its `from_pretrained` calls partition while loading (the
  live config), so it averages empty placeholders: the `max |err|` column shows what that reference really was.
- `in-memory`: the same in-memory algorithm with whole models (`_build_in_memory`, which `write_soup_weights` falls
  back to): what `before` would have cost had it been right under ZeRO-3.
- `after`: `SoupReference` as it is now — local rank 0 streams the soup to a temporary folder tensor by tensor
  (`align.soup.write_soup_weights`), every rank loads it with `load_causal_lm` (partitioned while loading under
  ZeRO-3), the folder is deleted.
- `frozen` (once per stage, for scale): `load_causal_lm` of one checkpoint, i.e. a `frozen` reference. Every rank
  of `after` does this load too, so it is the floor `after` cannot go under. Under ZeRO-3 on CPU that floor is
  DeepSpeed's own: building a model under `zero.Init` costs about as much as `from_pretrained` does (measured with
  `from_config`, no weights read), one to two models' worth of transient heap per rank at this size.

Each build runs `--repeats` times (default 2; `--quick` 1), the variants in rotating order within a repeat; the
tables give per rank the median over the repeats, with ± the larger rank's max − min in MiB, and the JSON every
build and the spread of each figure (`common.spread`).

Peak memory: each rank resets its high-water mark (`/proc/self/clear_refs` ← 5, after `gc` and `malloc_trim`),
builds, reads every parameter (as the first forward will), and reads `VmHWM`; the figure is that peak minus the RSS
right before the build (the libraries and the interpreter, ~0.5 GB, are the same for all), per rank. A second
table gives the peak of `RssAnon` (private memory, sampled every ms): `VmHWM` also counts the pages of a mapped
file, e.g. the soup's safetensors file that `from_pretrained` maps under ZeRO-2, which the ranks of a node share
through the page cache. Each build is preceded by an unrecorded warm-up per stage (lazy imports, DeepSpeed set-up). Each rank then checks the reference it holds (gathered
parameter by parameter under ZeRO-3) against Σ_k w_k θ_k computed by the bench in fp64 from the ingredients' files
(for adapters: W0 + (α/r)·B·A by hand), and reports the max abs error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from unittest import mock

import common

MODELS = {  # untied embeddings: the embedding and the LM head are the largest tensors
    "full": {"vocab_size": 16384, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4,
             "num_attention_heads": 8, "num_key_value_heads": 8, "tie_word_embeddings": False},
    "quick": {"vocab_size": 4096, "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": False},
}
KS = (2, 4)
STAGES = (2, 3)
KINDS = ("full", "lora")
VARIANTS = ("before", "in-memory", "after")
MEASURES = {"peak_extra_mib": "peak RSS (VmHWM: private memory and mapped file pages)",
            "anon_peak_extra_mib": "peak anonymous RSS (RssAnon, sampled every ms: private memory only)"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R, LORA_ALPHA = 16, 32


# --- ingredients and the expected soups (parent process) ----------------------------------------------------------

def make_ingredients(root: Path, model_size: str, ks: tuple[int, ...]) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from align import toy_world

    tokenizer = toy_world.build_tokenizer()
    config = LlamaConfig(**MODELS[model_size], bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    full = []
    for seed in range(max(ks)):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        path = root / f"full{seed}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        full.append(str(path))
    base = full[0]
    lora = []
    for seed in range(max(ks)):
        model = get_peft_model(LlamaForCausalLM.from_pretrained(base, dtype=torch.float32),
                               LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS))
        generator = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:  # B A of the size of the weights' own spread
                    p.copy_(0.05 * torch.randn(p.shape, generator=generator))
        path = root / f"lora{seed}"
        model.save_pretrained(path)
        lora.append(str(path))
    n_params = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(base).parameters())
    ingredients = {"full": full, "lora": lora, "parameters": n_params}
    # Σ_k w_k θ_k per (kind, K) in fp64 from the files, independent of align's code
    from safetensors.torch import load_file

    for kind in KINDS:
        for k in ks:
            w = 1.0 / k
            expected = {}
            base_tensors = load_file(str(Path(base) / "model.safetensors"))
            for i in range(k):
                if kind == "full":
                    tensors = {n: t.double() for n, t in load_file(str(Path(full[i]) / "model.safetensors")).items()}
                else:
                    tensors = {n: t.double() for n, t in base_tensors.items()}
                    adapter = load_file(str(Path(lora[i]) / "adapter_model.safetensors"))
                    for key, a in adapter.items():
                        if key.endswith(".lora_A.weight"):
                            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                            b = adapter[key.replace(".lora_A.", ".lora_B.")]
                            tensors[module + ".weight"] += (LORA_ALPHA / LORA_R) * (b.double() @ a.double())
                for n, t in tensors.items():
                    expected[n] = expected.get(n, 0) + w * t
            path = root / f"expected-{kind}-{k}.safetensors"
            save_file({n: t.float() for n, t in expected.items()}, str(path))
            ingredients[f"expected-{kind}-{k}"] = str(path)
    return ingredients


# --- the measurement (each torchrun worker) -----------------------------------------------------------------------

def _touch(model) -> None:
    """Reads every parameter, as the first forward will: pages `from_pretrained` left mapped but unread count."""
    for p in model.parameters():
        p.data.sum()


def _before(checkpoints, weights, model_config):
    """`SoupReference.__init__` before this change: `build_soup` in memory on every rank, then cast. `build_soup`
    now loads under `_whole_models`, which the old code did not have: patched away, this is the old code path."""
    from align.soup import build_soup

    with mock.patch("align.soup._whole_models", contextlib.nullcontext):
        model, _ = build_soup(checkpoints, weights, attn_implementation=model_config.attn_implementation)
    return model.to(model_config.torch_dtype()).eval().requires_grad_(False)


def _in_memory(checkpoints, weights, model_config):
    from align.soup import _build_in_memory, check_ingredients

    weights, ingredients, first_config = check_ingredients(checkpoints, weights)
    model = _build_in_memory(ingredients, weights, first_config, model_config.attn_implementation)
    return model.to(model_config.torch_dtype()).eval().requires_grad_(False)


def _after(checkpoints, weights, model_config):
    from align.references import build_reference

    return build_reference("soup", {"checkpoints": checkpoints, "weights": weights}, policy=None,
                           model_config=model_config).model


def _frozen(checkpoints, weights, model_config):
    """Not a soup: the `frozen` reference of one checkpoint, loaded as every rank loads the soup in `after` (the
    floor `after` cannot go under: the soup still has to be loaded)."""
    from align.modeling import load_causal_lm

    return load_causal_lm(model_config, model_config.name_or_path).eval().requires_grad_(False)


def _max_error(model, expected_path: str) -> float:
    import deepspeed
    from safetensors import safe_open

    worst = 0.0
    with safe_open(expected_path, "pt") as expected:
        for name, p in model.named_parameters():  # the same order on every rank (gathers are collective)
            want = expected.get_tensor(name)
            partitioned = hasattr(p, "ds_id")
            with (deepspeed.zero.GatheredParameters([p]) if partitioned else contextlib.nullcontext()):
                got = p.data.detach().float().reshape(want.shape) if p.data.numel() == want.numel() else None
                error = float("inf") if got is None else (got - want).abs().max().item()
            worst = max(worst, error)
    return worst


def worker(spec_path: Path, output: Path) -> None:
    import deepspeed
    import torch
    from transformers.integrations import HfDeepSpeedConfig

    from align.modeling import ModelConfig

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    deepspeed.init_distributed(dist_backend="gloo")
    rank = deepspeed.comm.get_rank()
    build = {"before": _before, "in-memory": _in_memory, "after": _after, "frozen": _frozen}
    rows = []
    for stage in spec["stages"]:
        ds_config = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": 1,
                     "gradient_accumulation_steps": 1, "bf16": {"enabled": False}, "fp16": {"enabled": False}}
        hf_ds_config = HfDeepSpeedConfig(ds_config)  # while it is alive, transformers sees ZeRO-`stage`
        # Warm-up, not recorded: the first builds pay for lazy imports (peft, safetensors), DeepSpeed's partitioning
        # set-up and allocator growth, which would land on whichever variant happened to run first.
        warm_config = ModelConfig(name_or_path=spec["ingredients"]["full"][0], dtype="float32")
        for variant in ("in-memory", "after"):
            build[variant](spec["ingredients"]["lora"][:2], [0.5, 0.5], warm_config)
        model_config = ModelConfig(name_or_path=spec["ingredients"]["full"][0], dtype="float32")
        # Every repeat builds each (kind, K) with the variants in rotating order (common.rotation), then `frozen`.
        cases = [(rep, kind, k, variant) for rep in range(spec["repeats"]) for kind in spec["kinds"]
                 for k in spec["ks"] for variant in [*common.rotation(spec["variants"], rep)]]
        cases += [(rep, "frozen", 1, "frozen") for rep in range(spec["repeats"])]
        for repeat, kind, k, variant in cases:
            checkpoints = spec["ingredients"]["full"][:1] if kind == "frozen" else spec["ingredients"][kind][:k]
            deepspeed.comm.barrier()
            baseline = common.settle()
            start = time.perf_counter()
            row = {"rank": rank, "stage": stage, "kind": kind, "k": k, "variant": variant, "repeat": repeat,
                   "baseline_mib": baseline}
            with common.PeakSampler("RssAnon") as anon:
                try:  # the old code fails on LoRA ingredients under ZeRO-3, on every rank alike
                    model = build[variant](checkpoints, [1.0 / k] * k, model_config)
                    _touch(model)
                except Exception as e:  # noqa: BLE001 - recorded in the table
                    row["failure"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
                    model = None
            row["seconds"] = time.perf_counter() - start
            peak, held = common.status_mib("VmHWM"), common.status_mib("VmRSS")
            row.update(peak_mib=peak, peak_extra_mib=peak - baseline, held_extra_mib=held - baseline,
                       anon_peak_extra_mib=anon.extra)
            if model is not None and kind != "frozen" and repeat == 0:  # the same soup every repeat
                row["max_abs_error"] = _max_error(model, spec["ingredients"][f"expected-{kind}-{k}"])
            rows.append(row)
            del model
        del hf_ds_config
    (output.parent / f"{output.stem}.rank{rank}.json").write_text(json.dumps(rows))


# --- driver -------------------------------------------------------------------------------------------------------

def per_rank(rows: list[dict], measure: str) -> tuple[list[float], list[dict]]:
    """(median over the repeats per rank, spread per rank) of `measure` in `rows` (ranks 0 and 1)."""
    spreads = [common.spread(r[measure] for r in rows if r["rank"] == rank) for rank in range(2)]
    return [s["median"] for s in spreads], spreads


def main(argv: list[str] | None = None) -> None:
    parser = common.bench_parser(__doc__, "soup_memory", threads=1, threads_help="torch threads per process",
                                 repeats_help="builds per (stage, kind, K, variant) in one job, variants in rotating "
                                              "order (default: 2; quick: 1)")
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS), help="numbers of ingredients (default 2 4)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # the spec file
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.output)
        return
    if min(args.ks) < 2:
        parser.error("--ks: a soup has at least 2 ingredients")
    repeats = args.repeats or (1 if args.quick else 2)

    model_size = "quick" if args.quick else "full"
    variants = ("before", "after") if args.quick else VARIANTS  # --quick: the two the ratio needs
    args.output.parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="soup-memory-"))
    machine = common.machine()
    try:
        started = time.perf_counter()
        ingredients = make_ingredients(root, model_size, tuple(args.ks))
        spec = {"ingredients": ingredients, "stages": list(STAGES), "kinds": list(KINDS), "ks": list(args.ks),
                "variants": list(variants), "repeats": repeats, "threads": args.threads}
        spec_path = root / "spec.json"
        spec_path.write_text(json.dumps(spec))
        common.run_torchrun(__file__, ["--worker", str(spec_path), "--output", str(args.output)], "soup worker",
                            env=common.worker_env(args.threads, DS_ACCELERATOR="cpu", TMPDIR=str(root)))
        rows = []
        for rank in range(2):
            part = args.output.parent / f"{args.output.stem}.rank{rank}.json"
            rows += json.loads(part.read_text())
            part.unlink()
        leftovers = sorted(p.name for p in root.iterdir() if p.name.startswith("align-soup-"))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    table = []
    for stage in STAGES:
        for kind in KINDS:
            for k in args.ks:
                cell = {"stage": stage, "kind": kind, "k": k}
                for variant in variants:
                    mine = [r for r in rows if (r["stage"], r["kind"], r["k"], r["variant"])
                            == (stage, kind, k, variant)]
                    # per rank: the median over the repeats, and its spread (min, max, (max - min) / median)
                    cell[variant] = {}
                    for measure in (*MEASURES, "held_extra_mib"):
                        cell[variant][measure], cell[variant][f"{measure}_spread"] = per_rank(mine, measure)
                    cell[variant].update(seconds=max(r["seconds"] for r in mine),
                                         failure=next((r["failure"] for r in mine if "failure" in r), None),
                                         max_abs_error=max(r.get("max_abs_error", math.inf) for r in mine
                                                           if r["repeat"] == 0))
                for measure in MEASURES:  # per-rank maximum, after over before
                    after = max(cell["after"][measure])
                    cell[f"{measure}_ratio_after_over_before"] = after / max(cell["before"][measure])
                    if "in-memory" in cell:
                        cell[f"{measure}_ratio_after_over_in_memory"] = after / max(cell["in-memory"][measure])
                table.append(cell)
    frozen = {stage: {measure: per_rank([r for r in rows if r["kind"] == "frozen" and r["stage"] == stage],
                                        measure)[0] for measure in MEASURES} for stage in STAGES}
    params = ingredients["parameters"]
    summary = {"frozen_reference": frozen, "model": model_size, "parameters": params,
               "model_mib_fp32": params * 4 / 2**20, "processes": 2, "dtype": "float32", "repeats": repeats,
               "machine": machine, "table": table, "rows": rows, "leftover_soup_folders": leftovers,
               "seconds": time.perf_counter() - started}
    common.write_json(args.output, summary)

    def ranks(c, v, measure):
        if v not in c:
            return "-"
        cell = "/".join(f"{x:.0f}" for x in c[v][measure]) + ("!" if c[v]["failure"] else "")
        if repeats > 1:  # the larger rank's spread over the repeats, in MiB (a ratio of near-zero MiB means nothing)
            cell += " ±" + f"{max(s['max'] - s['min'] for s in c[v][f'{measure}_spread']):.0f}"
        return cell

    def error(c, v):
        return "failed" if c[v]["failure"] else f"{c[v]['max_abs_error']:.1e}"

    print(f"soup reference build, {params / 1e6:.1f}M-parameter Llama ({params * 4 / 2**20:.0f} MiB fp32 per "
          "ingredient), fp32, 2 CPU processes. MiB above the RSS before the build, rank 0 / rank 1"
          + (f" (median of {repeats} builds, ± the larger rank's max − min)" if repeats > 1 else "")
          + "; ratio: after / before of the larger rank")
    for measure, title in MEASURES.items():
        print(f"\n{title}")
        print(f"{'kind':<5}{'K':>3}{'ZeRO':>5}  {'before':>15}  {'in-memory':>15}  {'after':>15}  {'ratio':>6}  "
              f"{'max |err| before':>16}  {'after':>8}")
        for c in table:
            print(f"{c['kind']:<5}{c['k']:>3}{c['stage']:>5}  {ranks(c, 'before', measure):>15}  "
                  f"{ranks(c, 'in-memory', measure):>15}  {ranks(c, 'after', measure):>15}  "
                  f"{c[f'{measure}_ratio_after_over_before']:>6.2f}  {error(c, 'before'):>16}  {error(c, 'after'):>8}")
        for stage in STAGES:  # the floor: what loading one checkpoint as a `frozen` reference costs
            floor = "/".join(f"{frozen[stage][measure][r]:.0f}" for r in range(2))
            print(f"  frozen reference (one checkpoint, for scale), ZeRO-{stage}: {floor}")
    for c in table:
        for v in variants:
            if c[v]["failure"]:
                print(f"! {v}, {c['kind']} K={c['k']} ZeRO-{c['stage']}: {c[v]['failure']}")
    print(f"(written to {args.output}; {summary['seconds']:.0f} s)")

if __name__ == "__main__":
    main()
