#!/usr/bin/env bash
# align train on ONE node with N processes (one per GPU) under DeepSpeed ZeRO.
#
#   launch/single_node.sh --config configs/dpo.yaml [dotted.key=value ...]
#   NUM_GPUS=4 ZERO=zero2 launch/single_node.sh --config configs/sampo.yaml objective.beta=0.05
#
# Everything after the script name is passed to `align train` unchanged; the script only adds
# `training.deepspeed=<launch/$ZERO.json>` (unless you already gave a training.deepspeed=... override).
#
# Knobs (environment variables):
#   NUM_GPUS       processes to start, one per GPU. Default: the GPUs this process can see (the entries of
#                  CUDA_VISIBLE_DEVICES when it is set, else `nvidia-smi -L`). On a machine without GPUs set it
#                  explicitly: processes then run on CPU with gloo (DS_ACCELERATOR=cpu is set by `align` when no
#                  /dev/nvidia0 exists), which is how the tests run this script; useful for checking a setup only.
#   ZERO           which DeepSpeed config from launch/ to use (default zero3):
#                    zero2          shard optimizer state and gradients; full weights on every GPU (fastest when
#                                   the model fits: no parameter all-gather in forward/backward)
#                    zero3          also shard the weights; they are gathered layer by layer when needed and the
#                                   full model is gathered once to save final/
#                                   (stage3_gather_16bit_weights_on_model_save)
#                    zero2_offload  zero2 with optimizer state and the Adam step on CPU (DeepSpeed's CPU Adam)
#                    zero3_offload  zero3 with optimizer state and weights in CPU memory (largest models, slowest)
#                  The offload configs name the optimizer (AdamW, hyperparameters "auto" from the recipe) because
#                  DeepSpeed refuses a torch optimizer with optimizer offload; its CPU Adam is a C++ extension
#                  compiled on first use (needs g++ and ninja; minutes once, then cached in ~/.cache/torch_extensions).
#                  or a path to your own DeepSpeed JSON. Batch size, accumulation, clipping and bf16/fp16 are
#                  "auto" in these files: they come from the recipe's `training:` section, so one recipe runs on
#                  any number of GPUs (the global batch is NUM_GPUS x per_device_train_batch_size x
#                  gradient_accumulation_steps).
#   MASTER_PORT    port of the rendezvous on this node. Default: unset, torchrun --standalone picks a free port, so
#                  several jobs can share a node.
#   PYTHON         interpreter that has align installed. Default: the project's .venv/bin/python when it
#                  exists (no need to activate it), else python on PATH.
#   TORCHRUN_ARGS  extra torchrun options, one string split on spaces (e.g. "--max_restarts 0 --log_dir logs").
#   DRY_RUN=1      print the command instead of running it.
#
# Why torchrun and not the `deepspeed` launcher: on one node both start N processes with RANK/LOCAL_RANK/WORLD_SIZE
# in the environment, which is all transformers needs; torchrun also picks a free port (--standalone) and needs no
# hostfile. The `deepspeed` launcher appends `--local_rank=N` to the script's arguments unless given
# `--no_local_rank`, and `align train` (only --config and dotted key=value overrides) rejects that argument;
# launch/multi_node.sh uses that launcher, with --no_local_rank, because it reads hostfiles and fans out over ssh.
set -euo pipefail

usage() {
    echo "usage: [NUM_GPUS=N] [ZERO=zero2|zero3|zero2_offload|zero3_offload|FILE.json] [MASTER_PORT=P]" \
         "$0 --config RECIPE.yaml [dotted.key=value ...]" >&2
    if [[ $# -gt 0 ]]; then
        echo "error: $*" >&2
        exit 2
    fi
    exit 0
}

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$LAUNCH_DIR/common.sh"  # ALIGN_COMMAND, --config and overrides, ZERO -> training.deepspeed

# --- number of processes -------------------------------------------------------------------------------------------
if [[ -z "${NUM_GPUS:-}" ]]; then
    if [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
        # CUDA_VISIBLE_DEVICES="" means no GPU; "0,2" means two
        NUM_GPUS=$(awk -F, '{ n = 0; for (i = 1; i <= NF; i++) if ($i != "") n++; print n }' \
                       <<< "$CUDA_VISIBLE_DEVICES")
    elif command -v nvidia-smi > /dev/null 2>&1; then
        NUM_GPUS=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)
    else
        NUM_GPUS=0
    fi
    [[ "$NUM_GPUS" -gt 0 ]] || usage "no GPU visible; set NUM_GPUS (on CPU it runs with gloo, for testing only)"
fi
[[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]] || usage "NUM_GPUS must be a positive integer, got '$NUM_GPUS'"

# --- the command ---------------------------------------------------------------------------------------------------
if [[ -n "${MASTER_PORT:-}" ]]; then
    rendezvous=(--master_addr 127.0.0.1 --master_port "$MASTER_PORT")
else
    rendezvous=(--standalone)
fi
read -r -a torchrun_extra <<< "${TORCHRUN_ARGS:-}"
cmd=("$PYTHON" -m torch.distributed.run --nnodes 1 --nproc_per_node "$NUM_GPUS" "${rendezvous[@]}"
     ${torchrun_extra[@]+"${torchrun_extra[@]}"} -m align.cli "${align_command[@]}" "$@" ${extra[@]+"${extra[@]}"})

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
