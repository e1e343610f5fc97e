"""On-policy studies on the toy world, one command each: `align study NAME [--quick] [--output-dir DIR] [--seeds N]`.

- `fdpg_divergences` (eval/studies/fdpg_divergences.py): f-DPG to the exponential target with reverse KL, forward KL,
  JS and TV (Go et al. 2023): gold reward, KL to the SFT policy and diversity after equal steps.
- `overoptimisation` (eval/studies/overoptimisation.py): reverse-KL f-DPG against a weak proxy reward ensemble under
  mean, WCO and UWO aggregation with a small KL weight (Coste et al. 2023): gold and proxy reward over steps.
- `frontier` (eval/studies/frontier.py): gold reward against KL to the SFT policy for f-DPG at several β, f-DPG to
  best-of-n targets, best-of-n sampling with the gold reward as selector, and TRL's RLOOTrainer.

Each study starts from the quickstart's SFT policy (built once per run and cached in the work folder), runs several
seeds, and writes `results.json` (mean ± std and min–max over seeds, the settings, the timings), `results.md` (the
table) and `<name>.png` into its output folder: `docs/studies/<name>/` by default. Models and training logs go to
the work folder: `outputs/studies/<name>/work` for the default output folder (git-ignored), `<DIR>/work` for
`--output-dir DIR`. `--quick` runs 1 seed, a few steps and tiny sizes (under a minute; the tests run it): its
numbers are not results.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from align.errors import ConfigError

#: study name → module under eval/studies/ (each has `run(study)`, `DEFAULT_SEEDS`).
STUDIES = {"fdpg_divergences": "eval.studies.fdpg_divergences",
           "overoptimisation": "eval.studies.overoptimisation",
           "frontier": "eval.studies.frontier"}


def default_output_dir(name: str) -> Path:
    return Path("docs/studies") / name


def run_study(name: str, *, output_dir: str | Path | None = None, seeds: int | None = None, quick: bool = False,
              work_dir: str | Path | None = None, sft_dir: str | Path | None = None) -> dict:
    """Runs study `name` → its results (also written to `<output_dir>/results.json`).

    seeds: the number of seeds (0, 1, …, N−1); default the study's own (1 in quick mode). work_dir: where models
    and logs go (default above). sft_dir: an SFT policy to start from instead of building one (tests).
    """
    if name not in STUDIES:
        raise ConfigError(f"study: unknown study {name!r}; known: {', '.join(STUDIES)}")
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        raise ConfigError(f"--seeds: must be a positive integer, got {seeds!r}")
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir(name)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output-dir: '{output_dir}' is a file, not a directory")
    if work_dir is None:
        work_dir = (Path("outputs/studies") / name / "work") if output_dir == default_output_dir(name) \
            else output_dir / "work"
    module = importlib.import_module(STUDIES[name])
    from eval.studies.common import Study, default_threads

    default_threads()
    count = seeds if seeds is not None else (1 if quick else module.DEFAULT_SEEDS)
    study = Study(name=name, output_dir=output_dir, work_dir=Path(work_dir), seeds=list(range(count)), quick=quick,
                  sft_dir=Path(sft_dir) if sft_dir is not None else None)
    study.log(f"{'quick' if quick else 'full'} run, seeds {study.seeds}; outputs in {output_dir}, work in {work_dir}")
    return module.run(study)


__all__ = ["STUDIES", "default_output_dir", "run_study"]
