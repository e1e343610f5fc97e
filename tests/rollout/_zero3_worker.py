"""One rank of the ZeRO-3 weight-sync check (launched by test_vllm_zero3.py with torchrun on 2 CPU processes).

Trains the tiny Llama one Adam step under DeepSpeed ZeRO-3, then checks on every rank that `iter_policy_weights`
streams exactly the gathered full weights under the checkpoint's names, and (with --vllm) that a colocated vLLM engine
synced with `load_weights` samples from the trained weights: greedy tokens equal HF greedy on a full copy, sampled
log-probs equal its teacher-forced ones. Writes rank<R>.json into the output folder.
"""

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch

PROMPTS = ["describe the movie .", "what did you think of the song ?", "review the park .",
           "tell me about the book ."]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("out")
    parser.add_argument("--vllm", action="store_true")
    args = parser.parse_args()

    import deepspeed
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.rollout.weights import iter_policy_weights

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
              "zero_force_ds_cpu_optimizer": False, "bf16": {"enabled": False}, "fp16": {"enabled": False}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=0.05),
                                      config=config)
    partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in engine.module.parameters())

    ids = torch.tensor([tokenizer("the movie was great and fun .")["input_ids"]])
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    engine.eval()

    streamed = [(name, t.clone()) for name, t in iter_policy_weights(engine)]
    still_partitioned = all(p.numel() == 0 for p in engine.module.parameters())
    full = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)  # the trained weights, whole
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        state = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
    full.load_state_dict(state, strict=False)
    full.tie_weights()
    full.eval()
    result = {
        "rank": rank, "partitioned": partitioned, "still_partitioned_after_stream": still_partitioned,
        "names_match": [n for n, _ in streamed] == list(state),
        "max_stream_error": max(float((t - state[n]).abs().max()) for n, t in streamed),
        "moved_from_checkpoint": max(float((a - b).abs().max()) for a, b in zip(
            state.values(), AutoModelForCausalLM.from_pretrained(args.model_dir).parameters())),
    }

    if args.vllm:
        from align.logps import score_completions
        from align.rollout import HFRollout, SamplingParams, build_rollout, prompt_token_ids

        rollout = build_rollout("vllm", args.model_dir, tokenizer, dtype="float32", enforce_eager=True,
                                max_model_len=256, seed=0, engine_kwargs={"kv_cache_memory_bytes": 64 << 20})
        rollout.load_weights(engine)  # every rank at once: each module's gather is a collective
        greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
        from_vllm = rollout.generate(PROMPTS, n=1, sampling=greedy)
        from_hf = HFRollout(full, tokenizer).generate(PROMPTS, n=1, sampling=greedy)
        sampled = rollout.generate(PROMPTS, n=4, sampling=SamplingParams(max_new_tokens=16, seed=rank))
        flat = [c for g in sampled for c in g]
        prompt_ids = prompt_token_ids(tokenizer, PROMPTS)
        with torch.no_grad():
            trainer = score_completions(full, [prompt_ids[c.prompt_index] for c in flat], [c.token_ids for c in flat])
        result.update(
            greedy_equal=[[c.token_ids for c in g] for g in from_vllm] == [[c.token_ids for c in g] for g in from_hf],
            max_logp_gap=max(float((c.logps - t).abs().max()) for c, t in zip(flat, trainer)),
            sampled_tokens=sum(len(c.token_ids) for c in flat))
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
