# Shared by launch/single_node.sh and launch/multi_node.sh (sourced, not run): which align subcommand to launch,
# the `--config FILE [dotted.key=value ...]` arguments, and the DeepSpeed config they get. Expects the caller's
# `usage` function and LAUNCH_DIR; sets `align_command`, `config`, `ds_config` and `extra` (the override to append).

# ALIGN_COMMAND: the align subcommand to launch, `train` (default: policy training) or `rm train` (reward models and
# ensembles, configs/rm/*.yaml; its default ZERO is zero2). Both take --config and dotted overrides.
case "${ALIGN_COMMAND:-train}" in
    train) align_command=(train) ;;
    "rm train") align_command=(rm train) ;;
    *) echo "error: ALIGN_COMMAND must be 'train' or 'rm train', got '${ALIGN_COMMAND}'" >&2; exit 2 ;;
esac

# --- arguments: `--config FILE` (or --config=FILE) plus dotted overrides, as `align train` takes them ---------------
[[ $# -eq 0 ]] && usage "missing --config"
config=""
user_deepspeed=0
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --config)
            [[ $((i + 1)) -lt ${#args[@]} ]] || usage "--config needs a file"
            config="${args[i + 1]}"
            i=$((i + 1)) ;;
        --config=*) config="${args[i]#--config=}" ;;
        -h|--help) usage ;;
        training.deepspeed=*) user_deepspeed=1 ;;
        -*) usage "unknown option '${args[i]}' (align train takes --config and dotted key=value overrides)" ;;
        *=*) ;;
        *) usage "'${args[i]}' is not a dotted key=value override" ;;
    esac
done
[[ -n "$config" ]] || usage "missing --config"
[[ -e "$config" ]] || usage "--config '$config': no such file"

# --- DeepSpeed config ----------------------------------------------------------------------------------------------
if [[ $user_deepspeed -eq 1 && -n "${ZERO:-}" ]]; then
    usage "ZERO=$ZERO and a training.deepspeed=... override both choose the DeepSpeed config; give one"
fi
# `align rm train` refuses ZeRO-3 (reward ensembles are trained with ZeRO-2), so its default is zero2.
if [[ "${ALIGN_COMMAND:-train}" == "rm train" ]]; then ZERO="${ZERO:-zero2}"; else ZERO="${ZERO:-zero3}"; fi
case "$ZERO" in
    zero2|zero3|zero2_offload|zero3_offload) ds_config="$LAUNCH_DIR/$ZERO.json" ;;
    *.json)
        [[ -f "$ZERO" ]] || usage "ZERO='$ZERO': no such file"
        ds_config="$(cd "$(dirname "$ZERO")" && pwd)/$(basename "$ZERO")" ;;  # absolute: every process finds it
    *) usage "ZERO must be zero2, zero3, zero2_offload, zero3_offload or a .json file, got '$ZERO'" ;;
esac
extra=()
[[ $user_deepspeed -eq 1 ]] || extra=("training.deepspeed=$ds_config")

# --- the interpreter -------------------------------------------------------------------------------------------------
# $PYTHON, else the project's .venv (what `make quickstart` / scripts/setup.sh create), else python on PATH: the
# scripts work from a fresh shell without activating the venv.
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$LAUNCH_DIR/../.venv/bin/python" ]]; then
        PYTHON="$(cd "$LAUNCH_DIR/.." && pwd)/.venv/bin/python"
    else
        PYTHON=python
    fi
fi
