"""Weight sync from a DeepSpeed ZeRO-3 policy on 2 CPU processes (torchrun, gloo): the stream equals the gathered
weights (everywhere), and a colocated vLLM engine on each rank samples from the trained weights (marked vllm)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess
WORKER = Path(__file__).with_name("_zero3_worker.py")


def _run(tiny_model_dir, out, *flags) -> list[dict]:
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(WORKER),
           str(tiny_model_dir), str(out), *flags]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _assert_streamed_exactly(results):
    for r in results:
        assert r["partitioned"] and r["still_partitioned_after_stream"]  # gathered one module at a time, released
        assert r["names_match"] and r["max_stream_error"] == 0.0
        assert r["moved_from_checkpoint"] > 1e-3  # the optimizer step changed the weights


def test_zero3_policy_streams_its_gathered_weights(tiny_model_dir, tmp_path):
    _assert_streamed_exactly(_run(tiny_model_dir, tmp_path / "out"))


@pytest.mark.vllm
def test_zero3_policy_synced_into_a_vllm_engine_on_each_rank(tiny_model_dir, tmp_path):
    results = _run(tiny_model_dir, tmp_path / "out", "--vllm")
    _assert_streamed_exactly(results)
    for r in results:
        assert r["greedy_equal"], r
        assert r["max_logp_gap"] <= 1e-4 and r["sampled_tokens"] > 16, r
