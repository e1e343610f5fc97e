"""Scaffolding shared by every benchmark under bench/: common flags, interleaved repeats and their spread, atomic
JSON, worker processes (plain and torchrun), memory sampling, and the tiny model built from `align.toy_world`.

A bench script imports it as `common` (Python puts the script's folder, bench/, first on sys.path); importing it
puts the repository root on sys.path too, so `align` imports from this checkout. Only the standard library is
imported here at module level: worker processes that import it pay nothing for what they do not use.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


# --- flags ----------------------------------------------------------------------------------------------------------

def bench_parser(doc: str, name: str, *, threads: int | None, threads_help: str = "torch / OpenMP threads",
                 repeats_help: str = "timed runs per variant, in rotating order") -> argparse.ArgumentParser:
    """The parser every bench starts from: `--quick`, `--repeats`, `--threads`, `--seed` and `--output` (default
    bench/results/<name>.json). `--repeats` defaults to None: the bench's preset decides (see `apply_overrides`)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: small model, few steps (what the test "
                                                             "suite runs; timings meaningless)")
    parser.add_argument("--repeats", type=int, help=f"{repeats_help} (default: the preset's)")
    parser.add_argument("--threads", type=int, default=threads,
                        help=f"{threads_help} (default: {threads if threads else 'all cores'})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / f"{name}.json",
                        help="JSON results, written atomically (default: %(default)s)")
    return parser


def apply_overrides(preset: dict, args: argparse.Namespace, keys) -> dict:
    """A copy of `preset` with each of `keys` replaced by the flag of that name where it was given."""
    out = dict(preset)
    for key in keys:
        if getattr(args, key, None) is not None:
            out[key] = getattr(args, key)
    return out


# --- interleaved repeats and their spread ---------------------------------------------------------------------------

def rotation(variants, rep: int) -> list:
    """The order of repeat `rep`: `variants` rotated by `rep` (two variants alternate), so that no variant always
    runs first, or always right after the same other one, on a machine whose load drifts."""
    variants = list(variants)
    shift = rep % len(variants)
    return variants[shift:] + variants[:shift]


def interleaved(variants, repeats: int, run_one) -> dict[str, list]:
    """Runs `run_one(variant, rep)` `repeats` times per variant, in rotating order; every result is kept."""
    runs: dict[str, list] = {v: [] for v in variants}
    for rep in range(repeats):
        for variant in rotation(variants, rep):
            runs[variant].append(run_one(variant, rep))
    return runs


def spread(values) -> dict:
    """Median, min, max and relative spread (max − min) / median of the repeats' values (all kept in `values`)."""
    values = [float(v) for v in values]
    median = statistics.median(values)
    return {"n": len(values), "median": median, "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / abs(median) if median else 0.0, "values": values}


def fmt_spread(s: dict, fmt: str = ".2f") -> str:
    """`1.53 (1.41–1.60, ±12%)`: median (min–max, relative spread); just the value for a single repeat."""
    if s["n"] == 1:
        return format(s["median"], fmt)
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}–{s['max']:{fmt}}, ±{100 * s['spread']:.0f}%)"


def best_of(runs: list[dict], key: str, *, higher: bool = True) -> dict:
    """The run with the highest (or lowest) `key`: best-of-k, the usual defence against a shared machine."""
    return (max if higher else min)(runs, key=lambda r: r[key])


def paired_ratios(numerators: list[dict], denominators: list[dict], key: str) -> dict:
    """Spread of repeat i's `key` ratio, numerators[i] / denominators[i]: the pair ran back to back, so their
    ratio is steadier than either figure alone on a machine whose load drifts."""
    return spread([a[key] / b[key] for a, b in zip(numerators, denominators)])


def write_json(path: Path, data) -> None:
    """Writes the results atomically (align's own helper): a reader never sees half a file."""
    from align.io import atomic_write_json

    atomic_write_json(path, data)


def check_lines(checks: dict[str, bool], prefix: str = "") -> str:
    """`  [x] name` per check, for the printed report."""
    return "\n".join(f"  [{'x' if ok else ' '}] {prefix}{name}" for name, ok in checks.items())


# --- processes ------------------------------------------------------------------------------------------------------

def worker_env(threads: int | None = None, **extra: str) -> dict[str, str]:
    """The environment of a worker process: this checkout first on PYTHONPATH, offline, quiet, and sleeping OpenMP
    waits unless OMP_WAIT_POLICY is set (spinning waits made steps 7-13x slower and erratic on a busy 2-core
    machine). With `threads`, OMP_NUM_THREADS and MKL_NUM_THREADS too."""
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore",
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(extra)
    return env


def _failed(what: str, returncode: int, output: str) -> SystemExit:
    first = output.find("[rank")  # torchrun: the first worker's traceback, not the launcher's summary of it
    shown = output[first:][:6000] if first >= 0 else output[-6000:]
    sys.stderr.write(shown + "\n")
    return SystemExit(f"{what} failed (exit {returncode})")


def run_script(script: str | Path, argv: list[str], what: str, env: dict | None = None) -> str:
    """Runs `python <script> <argv>` in the repository root; its output, or SystemExit with its tail on failure."""
    proc = subprocess.run([sys.executable, str(script), *argv], env=env or worker_env(), cwd=REPO_ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if proc.returncode != 0:
        raise _failed(what, proc.returncode, proc.stdout)
    return proc.stdout


def run_torchrun(script: str | Path, argv: list[str], what: str, *, nproc: int = 2, env: dict | None = None) -> str:
    """`torchrun --standalone --nproc_per_node <nproc> <script> <argv>` on CPU (DS_ACCELERATOR=cpu, one thread per
    process); output, or SystemExit with the first rank's traceback."""
    env = env or worker_env(threads=1, DS_ACCELERATOR="cpu")
    cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(script), *argv]
    proc = subprocess.run([sys.executable, *cmd], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise _failed(what, proc.returncode, proc.stderr + proc.stdout)
    return proc.stdout


def timed_process(cmd: list[str], log_path: Path, env: dict | None = None) -> dict:
    """Runs `cmd` to its exit and measures the whole process from the parent: wall seconds from start to exit, CPU
    seconds (user + system) and peak RSS (`wait4`'s ru_maxrss: this child alone). Output goes to `log_path`."""
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env or worker_env(), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise _failed(" ".join(cmd[:3]), proc.returncode, Path(log_path).read_text())
    return {"process_wall_s": wall, "process_cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": usage.ru_maxrss / 1024}


# --- memory ---------------------------------------------------------------------------------------------------------

def status_kib(field: str) -> int | None:
    """A `/proc/self/status` field in KiB (VmRSS, VmHWM, RssAnon, ...), or None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def status_mib(field: str) -> float:
    return (status_kib(field) or 0) / 1024


def peak_rss_mib() -> float:
    """Peak RSS of this process so far (VmHWM; getrusage where /proc has none), MiB."""
    return (status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def reset_peak_rss() -> bool:
    """Resets this process's RSS high-water mark (VmHWM) to its RSS (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def settle() -> float:
    """Frees what can be freed (gc, then malloc_trim so freed heap goes back to the OS and the baseline is live
    memory only), resets the high-water mark, and returns the RSS (MiB)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    reset_peak_rss()
    return status_mib("VmRSS")


class PeakSampler:
    """Samples a /proc/self/status field (`VmRSS`: the process RSS; `RssAnon`: private memory only, what an OOM kill
    counts, without the page-cache pages of mapped files) every millisecond in a thread while the block runs; torch
    ops release the GIL, so it keeps sampling. `baseline` and `peak` are in MiB; `extra` = peak − baseline."""

    def __init__(self, field: str = "VmRSS", interval_s: float = 0.001):
        self.field, self.interval_s = field, interval_s

    def __enter__(self):
        self.baseline = self.peak = status_mib(self.field)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, status_mib(self.field))
            time.sleep(self.interval_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_mib(self.field))

    @property
    def extra(self) -> float:
        return self.peak - self.baseline


# --- the tiny model -------------------------------------------------------------------------------------------------

SYNTHETIC_WORD = "w{}"


def build_tokenizer(vocab_size: int | None = None):
    """`align.toy_world.build_tokenizer()` (word-level, one token per word, `<bos>` prepended), its vocabulary
    extended to `vocab_size` entries with synthetic words `w0`, `w1`, ... when given (a bench that wants a larger
    embedding and LM head than the toy world's 70 words)."""
    from tokenizers import models

    from align import toy_world

    tokenizer = toy_world.build_tokenizer()
    if vocab_size is None:
        return tokenizer
    vocab = dict(tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True))
    base = len(vocab)
    if vocab_size <= base:
        raise ValueError(f"vocab_size {vocab_size}: the toy world's vocabulary already has {base} entries")
    vocab.update({SYNTHETIC_WORD.format(i): base + i for i in range(vocab_size - base)})
    tokenizer.backend_tokenizer.model = models.WordLevel(vocab=vocab, unk_token="<unk>")
    return tokenizer


def synthetic_words(tokenizer) -> list[str]:
    """The synthetic words `build_tokenizer(vocab_size)` added, in id order."""
    vocab = tokenizer.get_vocab()
    return sorted((w for w in vocab if w[0] == "w" and w[1:].isdigit()), key=vocab.__getitem__)


def save_tiny_model(model_dir: str | Path, *, seed: int = 0, vocab_size: int | None = None, **model_kwargs) -> Path:
    """A random-init Llama from `align.toy_world.build_tiny_model` (`model_kwargs`: hidden_size, num_layers,
    num_heads, num_kv_heads, intermediate_size, max_positions) and its tokenizer, written with `save_pretrained`."""
    from align import toy_world

    if vocab_size is None:
        return toy_world.save_base_model(model_dir, seed=seed, **model_kwargs)
    model_dir = Path(model_dir)
    tokenizer = build_tokenizer(vocab_size)
    toy_world.build_tiny_model(tokenizer, seed=seed, **model_kwargs).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


# --- training steps and provenance ----------------------------------------------------------------------------------

def step_timer(warmup: int, steps: int, on_train_begin=None):
    """A `TrainerCallback` that timestamps (wall and process CPU) the end of every optimizer step and records the
    peak RSS when the timed window closes; `summary()` gives steps/s over the `steps` steps after `warmup` (the end of
    the last warm-up step opens the window: the first steps include one-off set-up). `on_train_begin(timer, args,
    model)`, if given, runs at the start of training (to record the settings the trainer really uses)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends: list[tuple[float, float]] = []
            self.peak_rss_window_mib: float | None = None
            self.settings: dict = {}

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if on_train_begin is not None:
                on_train_begin(self, args, model)

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append((time.perf_counter(), time.process_time()))
            if len(self.ends) == warmup + steps:
                self.peak_rss_window_mib = peak_rss_mib()

        def summary(self) -> dict:
            if len(self.ends) < warmup + steps:
                raise RuntimeError(f"only {len(self.ends)} optimizer steps ran, expected {warmup + steps}")
            timed = self.ends[warmup - 1:warmup + steps]
            durations = [b[0] - a[0] for a, b in zip(timed, timed[1:])]
            wall = timed[-1][0] - timed[0][0]
            return {"timed_steps": steps, "timed_wall_s": wall, "steps_per_s": steps / wall,
                    "step_s_median": statistics.median(durations),
                    "cpu_s_per_step": (timed[-1][1] - timed[0][1]) / steps, "step_s": durations}

    return StepTimer()


def git_head() -> str | None:
    return subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=False).stdout.strip() or None


def source_digest() -> str:
    """sha256 of align/**/*.py: the align code a run used (the working tree may change while a bench runs)."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted((REPO_ROOT / "align").rglob("*.py")):
        h.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def machine() -> dict:
    """Where the figures come from: cores, load, git HEAD and align's source digest at the start."""
    import platform

    return {"cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()[0], "python": platform.python_version(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), "align_git_head": git_head(),
            "align_source_digest": source_digest()}
