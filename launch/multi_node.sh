#!/usr/bin/env bash
# align train on SEVERAL nodes listed in a DeepSpeed hostfile, under DeepSpeed ZeRO, with the `deepspeed` runner.
#
#   HOSTFILE=hostfile launch/multi_node.sh --config configs/dpo.yaml [dotted.key=value ...]
#
# The hostfile has one line per node, `hostname slots=N` (N processes = GPUs on that node), e.g.
#   worker-0 slots=8
#   worker-1 slots=8
# Run the script on the first node. The runner reaches every node with pdsh over passwordless ssh, `cd`s to the
# current directory there and starts DeepSpeed's per-node launcher with the same Python interpreter path, so the
# nodes need the same environment at the same paths (a shared filesystem); outputs are written by global rank 0
# (training.output_dir should be on shared storage if you resume from checkpoints). The runner forwards environment
# variables whose names start with NCCL, PYTHON, UCX, MV2 or MLFLOW; put any others (HF_HOME, HF_TOKEN, WANDB_*) one
# per line as KEY=VALUE in a `.deepspeed_env` file in this directory or in your home directory.
# Everything after the script name is passed to `align train` unchanged; the script only adds
# `training.deepspeed=<launch/$ZERO.json>` (unless you already gave a training.deepspeed=... override).
#
# Knobs (environment variables):
#   HOSTFILE       the hostfile (default /job/hostfile, DeepSpeed's default). Required to exist: without one the
#                  runner would quietly fall back to this machine alone.
#   ZERO           zero2 | zero3 (default) | zero2_offload | zero3_offload, or a path to your own DeepSpeed JSON; see
#                  launch/single_node.sh for what each one does.
#   MASTER_ADDR    address of the first node as every node can reach it (the rendezvous runs there). Default: the
#                  runner asks the first host of the hostfile over ssh (`hostname -I`, first address); for a
#                  hostfile that lists only this machine, 127.0.0.1.
#   MASTER_PORT    rendezvous port (default 29500); must be free on the first node.
#   NUM_NODES      use only the first NUM_NODES hosts of the hostfile (default: all).
#   NUM_GPUS       processes per node (default: each host's slots).
#   SSH_PORT       ssh port of the nodes, if not 22.
#   LAUNCHER_ARGS  extra pdsh options, one string (e.g. "-R ssh").
#   NODE_RANK      no-ssh mode, for clusters without passwordless ssh (Kubernetes, SLURM): start this script yourself
#                  on EVERY node, with the same HOSTFILE, MASTER_ADDR (required) and MASTER_PORT, and NODE_RANK set to
#                  that node's line in the hostfile (0 = first line, the master). Each node then starts only its own
#                  processes. Under SLURM: one task per node, NODE_RANK=$SLURM_NODEID.
#   PYTHON         interpreter that has align and deepspeed installed. Default: the project's .venv/bin/python when it
#                  exists (no need to activate it), else python on PATH.
#   DRY_RUN=1      print the runner command instead of running it.
#
# Why the `deepspeed` runner: it reads the hostfile, fans out over pdsh and gives each process RANK, LOCAL_RANK,
# WORLD_SIZE, MASTER_ADDR and MASTER_PORT, which is what transformers reads. It appends `--local_rank=N` to the
# script's arguments unless told `--no_local_rank`; `align train` takes only --config and overrides, so the script
# always passes --no_local_rank (the local rank is in the LOCAL_RANK variable). DeepSpeed's other backends
# (openmpi, mvapich, slurm) start `align` directly under mpirun/srun without its per-node launcher, so those
# variables are not set the way transformers expects; use NODE_RANK under SLURM instead.
# DeepSpeed runs a hostfile that lists ONE host on the local machine without ssh; the script then skips the ssh check
# when that host is this machine (`localhost slots=2` works without sshd) and otherwise forces the ssh path.
set -euo pipefail

usage() {
    echo "usage: HOSTFILE=FILE [ZERO=zero2|zero3|zero2_offload|zero3_offload|FILE.json] [MASTER_ADDR=A]" \
         "[MASTER_PORT=P] [NODE_RANK=R] $0 --config RECIPE.yaml [dotted.key=value ...]" >&2
    if [[ $# -gt 0 ]]; then
        echo "error: $*" >&2
        exit 2
    fi
    exit 0
}

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$LAUNCH_DIR/common.sh"  # ALIGN_COMMAND, --config and overrides, ZERO -> training.deepspeed

# --- hostfile ------------------------------------------------------------------------------------------------------
HOSTFILE="${HOSTFILE:-/job/hostfile}"
[[ -f "$HOSTFILE" ]] || usage "HOSTFILE '$HOSTFILE': no such file (one 'hostname slots=N' line per node)"
# The hosts, in order, as DeepSpeed parses them (comments and blank lines skipped).
mapfile -t hosts < <(awk '/^[[:space:]]*(#|$)/ { next } { print $1 }' "$HOSTFILE")
[[ ${#hosts[@]} -gt 0 ]] || usage "HOSTFILE '$HOSTFILE' lists no host"
host_line='^[[:space:]]*[^[:space:]]+[[:space:]]+slots=[0-9]+([[:space:]].*)?$'  # DeepSpeed's own pattern
if bad=$(grep -Ev "^[[:space:]]*(#|\$)|$host_line" "$HOSTFILE"); then
    usage "HOSTFILE '$HOSTFILE': bad line '$(head -n 1 <<< "$bad")' (expected 'hostname slots=N')"
fi

is_this_machine() {
    local host="$1" name
    for name in localhost 127.0.0.1 ::1 "$(hostname)" "$(hostname -s 2> /dev/null || true)" \
                "$(hostname -f 2> /dev/null || true)" $(hostname -I 2> /dev/null || true); do
        [[ -n "$name" && "$host" == "$name" ]] && return 0
    done
    return 1
}

# --- runner options ------------------------------------------------------------------------------------------------
runner=(--hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}")
[[ -z "${NUM_NODES:-}" ]] || runner+=(--num_nodes "$NUM_NODES")
[[ -z "${NUM_GPUS:-}" ]] || runner+=(--num_gpus "$NUM_GPUS")
[[ -z "${SSH_PORT:-}" ]] || runner+=(--ssh_port "$SSH_PORT")
[[ -z "${LAUNCHER_ARGS:-}" ]] || runner+=(--launcher_args "$LAUNCHER_ARGS")
master_addr="${MASTER_ADDR:-}"
if [[ -n "${NODE_RANK:-}" ]]; then
    [[ "$NODE_RANK" =~ ^[0-9]+$ && "$NODE_RANK" -lt ${#hosts[@]} ]] \
        || usage "NODE_RANK must be 0..$((${#hosts[@]} - 1)) (a line of the hostfile), got '$NODE_RANK'"
    [[ -n "$master_addr" ]] || usage "NODE_RANK needs MASTER_ADDR (the first node's address, the same on every node)"
    runner+=(--no_ssh --node_rank "$NODE_RANK")
elif [[ ${#hosts[@]} -eq 1 || "${NUM_NODES:-}" == 1 ]]; then
    if is_this_machine "${hosts[0]}"; then
        runner+=(--no_ssh_check)  # DeepSpeed launches one host locally: nothing to ssh to
        master_addr="${master_addr:-127.0.0.1}"
    else
        runner+=(--force_multi)  # otherwise DeepSpeed would run the job here instead of on that host
    fi
fi
[[ -z "$master_addr" ]] || runner+=(--master_addr "$master_addr")

cmd=("$PYTHON" -m deepspeed.launcher.runner "${runner[@]}" --no_local_rank --module align.cli "${align_command[@]}" "$@"
     ${extra[@]+"${extra[@]}"})

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
