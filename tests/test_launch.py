"""launch/: the DeepSpeed ZeRO configs and the single-node / multi-node launch scripts, run for real on CPU.

On a machine without GPUs the scripts start their processes on CPU (DS_ACCELERATOR=cpu, gloo): the single-node script
with NUM_GPUS=2, the multi-node script with hostfiles whose hosts are all this machine (`localhost slots=2`, and two
"nodes" started by hand with NODE_RANK). What cannot run here: the ssh/pdsh fan-out to other machines (checked as the
command the script builds, parsed by DeepSpeed's own runner). The offload configs need DeepSpeed's CPU Adam extension,
compiled on first use: that test is opt-in (ALIGN_TEST_OFFLOAD=1).
"""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from align import toy_world
from align.trainer import training_arguments

pytestmark = pytest.mark.multiprocess

LAUNCH = Path(__file__).resolve().parent.parent / "launch"
ZERO_CONFIGS = sorted(LAUNCH.glob("*.json"))
STEPS = 3


def free_port() -> int:
    with socket.socket() as s:  # other jobs may share the machine: never a fixed port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SCRIPT_KNOBS = ("NUM_GPUS", "ZERO", "MASTER_ADDR", "MASTER_PORT", "HOSTFILE", "NODE_RANK", "NUM_NODES", "SSH_PORT",
                "LAUNCHER_ARGS", "TORCHRUN_ARGS", "DRY_RUN", "CUDA_VISIBLE_DEVICES")


def start_script(script: str, args: list[str], env: dict, **popen_kwargs) -> subprocess.Popen:
    # A session of its own, so that a test that gives up can stop the launcher and every process it started.
    return subprocess.Popen([str(LAUNCH / script), *args], env=env, start_new_session=True, **popen_kwargs)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_script(script: str, args: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    proc = start_script(script, args, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        stop(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def script_env(**extra) -> dict:
    """This environment without the scripts' knobs (a CI runner may set some), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_KNOBS}
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable,
            **extra}


# --- the ZeRO configs ------------------------------------------------------------------------------------------------


def test_the_four_configs_are_shipped():
    assert [p.name for p in ZERO_CONFIGS] == ["zero2.json", "zero2_offload.json", "zero3.json", "zero3_offload.json"]


def _filled(raw: dict, args, model) -> dict:
    """The config as the Trainer hands it to DeepSpeed: every "auto" replaced from TrainingArguments and the model."""
    from transformers.integrations.deepspeed import (HfTrainerDeepSpeedConfig, is_deepspeed_zero3_enabled,
                                                     unset_hf_deepspeed_config)

    hf_config = HfTrainerDeepSpeedConfig(json.loads(json.dumps(raw)))  # registers itself globally (ZeRO-3 loading)
    try:
        hf_config.trainer_config_process(args)
        hf_config.trainer_config_finalize(args, model, num_training_steps=100)  # raises on a value that mismatches
        return hf_config.config
    finally:
        del hf_config
        unset_hf_deepspeed_config()
        assert not is_deepspeed_zero3_enabled()  # later tests must not load models partitioned


@pytest.mark.parametrize("path", ZERO_CONFIGS, ids=lambda p: p.name)
def test_zero_config_is_accepted_by_transformers_and_deepspeed(path, tmp_path):
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads(path.read_text())
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                "gradient_clipping"):
        assert raw[key] == "auto", key  # from the recipe's training: section, so one recipe fits any GPU count
    assert raw["bf16"]["enabled"] == "auto" and raw["fp16"]["enabled"] == "auto"

    args = training_arguments({"output_dir": str(tmp_path), "per_device_train_batch_size": 4,
                               "gradient_accumulation_steps": 2, "max_grad_norm": 2.0, "learning_rate": 3e-6,
                               "weight_decay": 0.01}, seed=0)
    model = toy_world.build_tiny_model(toy_world.build_tokenizer())
    filled = _filled(raw, args, model)
    assert "auto" not in json.dumps(filled)  # every "auto" is one transformers knows how to fill
    ds = DeepSpeedConfig(filled)  # DeepSpeed's own validation (pydantic; unknown ZeRO keys are errors)
    assert (ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps, ds.train_batch_size) == (4, 2, 8)
    assert ds.gradient_clipping == 2.0

    stage = 3 if path.name.startswith("zero3") else 2
    offload = "offload" in path.name
    zero = ds.zero_config
    assert ds.zero_optimization_stage == stage
    if stage == 3:
        assert zero.gather_16bit_weights_on_model_save  # final/ is a full model, not shards
        assert zero.prefetch_bucket_size == int(0.9 * 64 * 64)  # "auto" from the model's hidden size
    if offload:
        assert zero.offload_optimizer.device == "cpu" and zero.offload_optimizer.pin_memory
        # DeepSpeed refuses a client (torch) optimizer with optimizer offload: its CPU Adam does the step
        assert ds.optimizer_name == "adamw"
        assert ds.optimizer_params == {"lr": 3e-6, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}
    else:
        assert zero.offload_optimizer is None and ds.optimizer_name is None  # the Trainer's optimizer
    if offload and stage == 3:
        assert zero.offload_param.device == "cpu" and zero.offload_param.pin_memory
    else:
        assert zero.offload_param is None

    # the validation has teeth: a misspelt ZeRO key is refused
    typo = json.loads(json.dumps(filled))
    typo["zero_optimization"]["overlap_com"] = typo["zero_optimization"].pop("overlap_comm")
    with pytest.raises(Exception, match="overlap_com"):
        DeepSpeedConfig(typo)


# --- the scripts, for real -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("launch")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in toy_world.make_preference_rows(16, seed=0)))
    return {"root": root, "model": tiny_model_dir, "pairs": pairs}


def align_args(job, out: Path) -> list[str]:
    """`align train` arguments: 16 pairs, 2 pairs per process, 2 processes ⇒ 4 steps per epoch; STEPS steps."""
    return ["--config", "/dev/null", f"model.name_or_path={job['model']}", "model.dtype=float32",
            f"data.train={job['pairs']}", "data.max_length=48", "data.max_prompt_length=16",
            f"training.output_dir={out}", "training.per_device_train_batch_size=2", f"training.max_steps={STEPS}",
            "training.learning_rate=0.001", "training.logging_steps=1", "training.save_strategy=no"]


def assert_trained_on_two_processes(out: Path, initial_model: Path):
    summary = json.loads((out / "train_summary.json").read_text())
    history = summary["log_history"]
    assert summary["global_step"] == STEPS, history
    losses = [h["loss"] for h in history if "loss" in h]
    # policy == reference at step 0
    assert len(losses) == STEPS and losses[0] == pytest.approx(0.693147, abs=1e-4), history
    # 16 pairs / (2 processes x 2 pairs) = 4 steps per epoch: one process alone would be at epoch 3/8
    assert history[-1]["epoch"] == pytest.approx(STEPS / 4), history
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "tokenizer.json").is_file()
    initial = AutoModelForCausalLM.from_pretrained(initial_model)
    final = AutoModelForCausalLM.from_pretrained(out / "final")  # a full model (ZeRO-3 gathered it to save)
    assert [p.shape for p in final.parameters()] == [p.shape for p in initial.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(initial.parameters(), final.parameters()))


def test_single_node_zero2_two_processes(job):
    out = job["root"] / "single"
    proc = run_script("single_node.sh", align_args(job, out),
                      script_env(NUM_GPUS="2", ZERO="zero2", MASTER_PORT=str(free_port())), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_trained_on_two_processes(out, job["model"])
    resolved = yaml.safe_load((out / "align_config.yaml").read_text())
    assert resolved["training"]["deepspeed"] == str(LAUNCH / "zero2.json")  # what the script appended
    # Quiet by default (issue 12, finding 8): the summary line once, not once per process; no library
    # FutureWarnings, per-load weight bars or load reports.
    output = proc.stdout + proc.stderr
    assert output.count("trained ") == 1, output[-3000:]
    for noise in ("FutureWarning", "Loading weights", "Writing model shards", "MISSING"):
        assert noise not in output, noise


def test_multi_node_two_nodes_without_ssh(job):
    """Two "nodes" on this machine (the hostfile lists it twice, by two names), each started by hand with its
    NODE_RANK, as on a cluster without passwordless ssh: DeepSpeed's runner and per-node launcher, ZeRO-3."""
    out = job["root"] / "multi"
    hostfile = job["root"] / "hostfile_two_nodes"
    hostfile.write_text("# two nodes with one process each\nlocalhost slots=1\n127.0.0.1 slots=1\n")
    env = script_env(HOSTFILE=str(hostfile), ZERO="zero3", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    # Each node logs to a file: a pipe read only after the other node finishes could fill up and stall it.
    log_files = [job["root"] / f"node{rank}.log" for rank in (0, 1)]
    nodes = []
    try:
        for rank, log_file in enumerate(log_files):
            with open(log_file, "w") as log:
                nodes.append(start_script("multi_node.sh", align_args(job, out), {**env, "NODE_RANK": str(rank)},
                                          stdout=log, stderr=subprocess.STDOUT))
        for node in nodes:
            node.wait(timeout=300)
    finally:
        for node in nodes:
            stop(node)
    for rank, (node, log_file) in enumerate(zip(nodes, log_files)):
        log = log_file.read_text()
        assert node.returncode == 0, log[-3000:]
        assert f"nnodes=2, num_local_procs=1, node_rank={rank}" in log, log[-3000:]  # DeepSpeed saw two nodes
    assert_trained_on_two_processes(out, job["model"])


def test_multi_node_hostfile_of_this_machine_runs_without_ssh(job):
    """`localhost slots=2`: DeepSpeed's runner launches a one-host hostfile locally; the script skips its ssh check
    (there is no sshd here) and the default ZERO (zero3) applies."""
    out = job["root"] / "localhost"
    hostfile = job["root"] / "hostfile_localhost"
    hostfile.write_text("localhost slots=2\n")
    proc = run_script("multi_node.sh", align_args(job, out),
                      script_env(HOSTFILE=str(hostfile), MASTER_PORT=str(free_port())), timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "nnodes=1, num_local_procs=2, node_rank=0" in proc.stdout + proc.stderr
    assert_trained_on_two_processes(out, job["model"])
    assert yaml.safe_load((out / "align_config.yaml").read_text())["training"]["deepspeed"] == str(LAUNCH / "zero3.json")


# --- what the scripts build (no processes started) -----------------------------------------------------------------


def dry_run(script: str, *args: str, **env) -> list[str]:
    proc = run_script(script, list(args), script_env(DRY_RUN="1", **env), timeout=60)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


def test_launch_scripts_find_the_project_venv(tmp_path):
    """From a fresh shell (no PYTHON, no activated venv) the scripts run the project's .venv when it exists."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    venv = LAUNCH.parent / ".venv" / "bin" / "python"
    want = str(venv) if venv.exists() else "python"
    assert dry_run("single_node.sh", "--config", str(recipe), NUM_GPUS="1", PYTHON="")[0] == want
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n")
    assert dry_run("multi_node.sh", "--config", str(recipe), HOSTFILE=str(hostfile), PYTHON="")[0] == want


def test_single_node_command(tmp_path):
    from torch.distributed.run import get_args_parser

    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    cmd = dry_run("single_node.sh", "--config", str(recipe), "objective.beta=0.2", CUDA_VISIBLE_DEVICES="0,3")
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    torchrun = get_args_parser().parse_args(cmd[3:])  # torchrun accepts what the script built
    assert torchrun.nproc_per_node == "2" and torchrun.standalone and torchrun.module
    assert [torchrun.training_script, *torchrun.training_script_args] == [
        "align.cli", "train", "--config", str(recipe), "objective.beta=0.2", f"training.deepspeed={LAUNCH}/zero3.json"]
    # a training.deepspeed override of the user's wins; ZERO picks the shipped file
    cmd = dry_run("single_node.sh", "--config", str(recipe), "training.deepspeed=mine.json", NUM_GPUS="8")
    assert cmd[-1] == "training.deepspeed=mine.json" and sum(a.startswith("training.deepspeed=") for a in cmd) == 1
    cmd = dry_run("single_node.sh", "--config", str(recipe), NUM_GPUS="1", ZERO="zero2_offload", MASTER_PORT="1234")
    assert cmd[-1] == f"training.deepspeed={LAUNCH}/zero2_offload.json"
    assert get_args_parser().parse_args(cmd[3:]).master_port == 1234
    # ALIGN_COMMAND="rm train" launches reward-model training, with ZeRO-2 by default (rm train refuses ZeRO-3)
    cmd = dry_run("single_node.sh", "--config", str(recipe), NUM_GPUS="2", ALIGN_COMMAND="rm train")
    torchrun = get_args_parser().parse_args(cmd[3:])
    assert [torchrun.training_script, *torchrun.training_script_args] == [
        "align.cli", "rm", "train", "--config", str(recipe), f"training.deepspeed={LAUNCH}/zero2.json"]


def test_multi_node_command_over_ssh(tmp_path):
    """Several remote hosts: the pdsh path, which needs other machines; here only the command is checked."""
    from deepspeed.launcher.runner import parse_args

    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-0 slots=8\nworker-1 slots=8\n")
    cmd = dry_run("multi_node.sh", "--config", str(recipe), "objective.beta=0.2", HOSTFILE=str(hostfile),
                  ZERO="zero2", MASTER_ADDR="10.0.0.1", MASTER_PORT="29555", NUM_GPUS="4")
    assert cmd[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    runner = parse_args(cmd[3:])  # DeepSpeed's own runner accepts every option the script passes
    assert runner.hostfile == str(hostfile) and runner.master_addr == "10.0.0.1" and runner.master_port == 29555
    assert runner.num_gpus == 4 and runner.launcher == "pdsh" and not runner.no_ssh and not runner.no_ssh_check
    assert runner.no_local_rank and runner.module  # align train must not receive --local_rank=N
    assert [runner.user_script, *runner.user_args] == [
        "align.cli", "train", "--config", str(recipe), "objective.beta=0.2", f"training.deepspeed={LAUNCH}/zero2.json"]

    # a hostfile of this machine alone: DeepSpeed runs it locally, so no ssh check and the master is 127.0.0.1
    hostfile.write_text("localhost slots=2\n")
    runner = parse_args(dry_run("multi_node.sh", "--config", str(recipe), HOSTFILE=str(hostfile))[3:])
    assert runner.no_ssh_check and runner.master_addr == "127.0.0.1" and not runner.force_multi
    # ... one remote host: forced through ssh, otherwise DeepSpeed would run the job on this machine
    hostfile.write_text("worker-7 slots=2\n")
    runner = parse_args(dry_run("multi_node.sh", "--config", str(recipe), HOSTFILE=str(hostfile))[3:])
    assert runner.force_multi and not runner.no_ssh_check


@pytest.mark.parametrize("script, args, env, message", [
    ("single_node.sh", [], {}, "missing --config"),
    ("single_node.sh", ["--config", "/nope.yaml"], {"NUM_GPUS": "2"}, "no such file"),
    ("single_node.sh", ["--config", "/dev/null", "--local_rank=0"], {"NUM_GPUS": "2"}, "unknown option"),
    ("single_node.sh", ["--config", "/dev/null"], {"NUM_GPUS": "2", "ZERO": "zero4"}, "ZERO must be"),
    ("single_node.sh", ["--config", "/dev/null"], {"NUM_GPUS": "two"}, "NUM_GPUS must be"),
    ("single_node.sh", ["--config", "/dev/null", "training.deepspeed=x.json"], {"NUM_GPUS": "2", "ZERO": "zero2"},
     "give one"),
    ("single_node.sh", ["--config", "/dev/null"], {"CUDA_VISIBLE_DEVICES": ""}, "no GPU visible"),
    ("multi_node.sh", ["--config", "/dev/null"], {"HOSTFILE": "/nope"}, "no such file"),
    ("multi_node.sh", ["--config", "/dev/null"], {"HOSTFILE": "BAD"}, "bad line"),
    ("multi_node.sh", ["--config", "/dev/null"], {"HOSTFILE": "TWO", "NODE_RANK": "1"}, "needs MASTER_ADDR"),
    ("multi_node.sh", ["--config", "/dev/null"], {"HOSTFILE": "TWO", "NODE_RANK": "2", "MASTER_ADDR": "a"},
     "NODE_RANK must be 0..1"),
])
def test_bad_arguments_print_the_usage(tmp_path, script, args, env, message):
    hostfiles = {"BAD": "worker-0 slots=8\nworker-1 eight\n", "TWO": "worker-0 slots=8\nworker-1 slots=8\n"}
    if env.get("HOSTFILE") in hostfiles:
        (tmp_path / "hostfile").write_text(hostfiles[env["HOSTFILE"]])
        env = {**env, "HOSTFILE": str(tmp_path / "hostfile")}
    proc = run_script(script, args, script_env(DRY_RUN="1", **env), timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("usage: ") and message in proc.stderr, proc.stderr


# --- offload on CPU -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zero", ["zero2_offload", "zero3_offload"])
def test_offload_configs_train_on_cpu(job, zero):
    """The shipped offload configs, with one change: the torch AdamW the Trainer builds instead of DeepSpeed's CPU
    Adam (`zero_force_ds_cpu_optimizer: false`), whose C++ extension takes minutes to compile on a cold machine. The
    offload settings themselves (optimizer state, and for ZeRO-3 the weights, in CPU memory) are exercised as
    shipped; the shipped optimizer section is validated by DeepSpeed in test_zero_config_is_accepted_..."""
    config = json.loads((LAUNCH / f"{zero}.json").read_text())
    assert config.pop("optimizer")["type"] == "AdamW"
    config["zero_force_ds_cpu_optimizer"] = False
    path = job["root"] / f"{zero}-torch-adamw.json"
    path.write_text(json.dumps(config))
    out = job["root"] / zero
    proc = run_script("single_node.sh", align_args(job, out),
                      script_env(NUM_GPUS="2", ZERO=str(path), MASTER_PORT=str(free_port())), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_trained_on_two_processes(out, job["model"])
