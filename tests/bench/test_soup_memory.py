"""`bench/soup_memory.py --quick --ks 2`: the `soup` reference built by 2 torchrun processes under ZeRO-2 and ZeRO-3
(full and LoRA ingredients) holds Σ_k w_k θ_k on every rank, and only the node's builder holds more than a loaded
model while building (about 35 s on 2 cores)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_quick_soup_memory_bench(tmp_path):
    output = tmp_path / "soup.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "soup_memory.py"), "--quick", "--ks", "2",
                           "--output", str(output)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(output.read_text())
    cells = {(c["kind"], c["stage"]): c for c in results["table"]}
    assert sorted(cells) == [("full", 2), ("full", 3), ("lora", 2), ("lora", 3)]
    for (kind, stage), cell in cells.items():
        after = cell["after"]
        # every rank's reference (gathered under ZeRO-3) is the soup of the files, to fp32 rounding
        assert after["failure"] is None and after["max_abs_error"] < 1e-6, (kind, stage, after)
    # the old code under ZeRO-3 averaged empty partitions (full: the first ingredient) or failed (LoRA)
    assert cells[("full", 3)]["before"]["max_abs_error"] > 1e-3
    assert "cannot load or merge the adapter" in cells[("lora", 3)]["before"]["failure"]
    for kind in ("full", "lora"):  # ZeRO-2: rank 1 only loads (the file's pages are shared), rank 0 also streams
        before, after = cells[(kind, 2)]["before"], cells[(kind, 2)]["after"]
        assert after["anon_peak_extra_mib"][1] < 0.25 * min(before["anon_peak_extra_mib"]), (kind, before, after)
        assert max(after["anon_peak_extra_mib"]) < max(before["anon_peak_extra_mib"]), (kind, before, after)
    assert results["leftover_soup_folders"] == []  # the builder deleted the written soup
    assert "peak anonymous RSS" in proc.stdout and "frozen reference" in proc.stdout
