"""The `align` command line.

    align train --config configs/dpo.yaml [dotted.key=value ...]
    align soup --out DIR CKPT CKPT... [--weights W W...]
    align quickstart [--output-dir DIR] [--overwrite]
    align rm train --config configs/rm/toy-ensemble.yaml [dotted.key=value ...]
    align rm score --ensemble DIR --input F.jsonl --output G.jsonl [--batch-size N] [--aggregation wco] [--lam 0.5]
    align rm toy-data --out DIR
    align bon --config configs/bon/toy.yaml [dotted.key=value ...]
    align study fdpg_divergences|overoptimisation|frontier [--quick] [--output-dir DIR] [--seeds N]

Bad input (a config key, a data row, a model path) is reported as one line naming the key, file, row or field,
with exit status 2 and no traceback.

With `align.recipes`, this is the recipe layer (DESIGN.md): the one floor that may import reward_models and eval.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _quiet_environment(verbose: bool) -> None:
    """What a user sees by default: align's own lines, one progress bar per stage of work (training, sampling,
    scoring), errors. Library noise a user cannot act on is off: transformers' per-load weight bars and load reports
    (`score.weight | MISSING` for a reward head that is meant to be new), FutureWarnings from libraries (150 of them in
    a 2-process launch). `align -v ...` shows everything."""
    # DeepSpeed probes for an accelerator when transformers imports it; on a CPU machine tell it up front so it
    # neither warns nor guesses.
    if not os.path.exists("/dev/nvidia0") and "DS_ACCELERATOR" not in os.environ:
        os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Every process of a distributed run would print each line once; only the main one reports, the others speak up
    # for errors only.
    level = logging.INFO if is_main_process() or verbose else logging.ERROR
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose:
        return
    import warnings

    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")  # worker processes
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is first imported
    # `datasets`' per-map bars (TRL's SFT prints five before its training bar); read when datasets is imported.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for noisy in ("httpx", "urllib3", "DeepSpeed", "torch.distributed", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards", once per model load and save


def is_main_process() -> bool:
    """True in a single-process run and on global rank 0 of a distributed one (torchrun and deepspeed set RANK)."""
    return int(os.environ.get("RANK", "0")) == 0


def _train(ns: argparse.Namespace) -> int:
    from align.config import load_train_config

    config = load_train_config(ns.config, ns.overrides)  # before importing the trainer: bad keys fail fast
    from align.recipes.train import train

    summary = train(config)
    if is_main_process():  # every process of a distributed run returns the summary; one line is enough
        print(f"trained {summary['global_step']} steps; final model in {summary['final_model']}")
    return 0


def _quickstart(ns: argparse.Namespace) -> int:
    from align.recipes.quickstart import run_quickstart

    run_quickstart(ns.output_dir, seed=ns.seed, overwrite=ns.overwrite)
    return 0


def _split_weights(ns: argparse.Namespace) -> None:
    """`--weights` takes every value after it, so in `--weights 0.7 0.3 A B` (the order `--help` shows) argparse hands
    it the checkpoints too: the leading numbers are the weights, the rest are checkpoints, in command-line order."""
    if ns.weights is None:
        return
    weights = []
    for i, item in enumerate(ns.weights):
        try:
            weights.append(float(item))
        except ValueError:
            ns.checkpoints = [*ns.checkpoints, *ns.weights[i:]]
            break
    if not weights:
        from align.errors import ConfigError

        raise ConfigError(f"--weights: expected numbers, got '{ns.weights[0]}'")
    ns.weights = weights


def _soup(ns: argparse.Namespace) -> int:
    from align.soup import write_soup

    _split_weights(ns)
    out = write_soup(ns.out, ns.checkpoints, ns.weights)
    print(f"wrote the soup of {len(ns.checkpoints)} checkpoints to {out}")
    return 0


def _rm_train(ns: argparse.Namespace) -> int:
    from reward_models.config import load_rm_config

    config = load_rm_config(ns.config, ns.overrides)  # before importing the trainer: bad keys fail fast
    from reward_models.train import train_reward_model

    summary = train_reward_model(config)
    if "wall_time_s" not in summary:  # a non-main process of a distributed run: the main one reports
        return 0
    line = (f"trained {summary['num_members']} reward member(s) ({summary['kind']}, "
            f"{sum(summary['global_steps'])} steps); ensemble in {summary['ensemble_dir']}")
    evaluation = summary["eval"]
    if evaluation is not None:
        members = list(evaluation["members"].values())
        accuracy = ", ".join(f"{m['accuracy']:.3f}" for m in members)
        ece = ", ".join(f"{m['ece']:.3f}" for m in members)
        line += f"; eval accuracy per member {accuracy} (ECE {ece})"
        if evaluation["ensemble"] is not None:
            ens = evaluation["ensemble"]
            line += f"; ensemble ({ens['method']}) accuracy {ens['accuracy']:.3f} (ECE {ens['ece']:.3f})"
    print(line)
    return 0


def _rm_score(ns: argparse.Namespace) -> int:
    from reward_models.score import score_file

    result = score_file(ns.ensemble, ns.input, ns.output, batch_size=ns.batch_size, aggregation=ns.aggregation,
                        lam=ns.lam, ddof=ns.ddof, max_length=ns.max_length, overwrite=ns.overwrite)
    params = ", ".join(f"{k}={v}" for k, v in result["aggregation"].items() if k != "method")
    print(f"scored {result['rows']} rows with {result['members']} member(s), aggregation "
          f"{result['aggregation']['method']}{f' ({params})' if params else ''}; wrote {result['output']}")
    return 0


def _rm_toy_data(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from align import toy_world
    from align.errors import AlignError

    out = Path(ns.out)
    if out.exists() and not ns.overwrite:
        raise AlignError(f"{ns.out}: already exists; pass --overwrite to replace it")
    toy_world.save_reward_model_world(out, n_train=ns.train_pairs, n_eval=ns.eval_pairs, seed=ns.seed)
    print(f"wrote {out}/base (tiny Llama + toy tokenizer), {out}/train.jsonl ({ns.train_pairs} gold-labelled pairs), "
          f"{out}/eval.jsonl ({ns.eval_pairs} held-out pairs)")
    return 0


def _bon(ns: argparse.Namespace) -> int:
    from eval.bon import format_table, load_bon_config, run_bon

    config = load_bon_config(ns.config, ns.overrides)  # before loading models: bad keys fail fast
    results = run_bon(config)
    print(format_table(results))
    print(f"best-of-n over {results['num_prompts']} prompts x N={results['num_samples']} samples; outputs in "
          f"{config.output_dir} (results.json, per_prompt.csv, samples.jsonl, *_vs_kl.png)")
    return 0


def _study(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from eval.studies import run_study

    results = run_study(ns.name, output_dir=ns.output_dir, seeds=ns.seeds, quick=ns.quick)
    print(Path(results["outputs"]["table"]).read_text())
    print(f"{ns.name}: {len(results['seeds'])} seed(s), {results['wall_time_s']} s; wrote "
          f"{results['outputs']['results']} and {results['outputs']['figure']}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_rm_parser(sub) -> None:
    from align import toy_world

    rm = sub.add_parser("rm", help="reward models: train a Bradley–Terry model or ensemble, score responses")
    rm_sub = rm.add_subparsers(dest="rm_command", required=True)

    p = rm_sub.add_parser("train", help="train a reward model or an ensemble of K with a YAML recipe (configs/rm/)")
    p.add_argument("--config", required=True, help="YAML recipe (see configs/rm/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. ensemble.members=5 loss.label_noise=0.25")
    p.set_defaults(func=_rm_train)

    p = rm_sub.add_parser("score", help="score prompt/response rows with a trained ensemble (per member and aggregated)")
    p.add_argument("--ensemble", required=True, help="ensemble directory (<output_dir>/ensemble of align rm train)")
    p.add_argument("--input", required=True, help="rows {prompt, response}: .jsonl (or .json/.parquet/.csv, a dataset)")
    p.add_argument("--output", required=True, help="JSON Lines to write: every input field + rewards + reward")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="rows per forward (default 16)")
    p.add_argument("--aggregation", help="mean | wco | uwo (default: the ensemble's saved aggregation)")
    p.add_argument("--lam", type=float, help="λ of uwo (>= 0; default 0.5)")
    p.add_argument("--ddof", type=int, help="variance of uwo: 0 population (default), 1 unbiased")
    p.add_argument("--max-length", type=_positive_int, help="keep the last N tokens of longer rows (default: none)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=_rm_score)

    p = rm_sub.add_parser("toy-data", help="write the toy world's reward-model data and base model "
                                           "(for configs/rm/toy-ensemble.yaml)")
    p.add_argument("--out", default="outputs/rm-toy", help="directory to write (default outputs/rm-toy)")
    p.add_argument("--train-pairs", type=_positive_int, default=toy_world.RM_TRAIN_PAIRS)
    p.add_argument("--eval-pairs", type=_positive_int, default=toy_world.RM_EVAL_PAIRS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.set_defaults(func=_rm_toy_data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align", description="Preference alignment for LLMs.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show every library log line, load report, progress bar and warning")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a policy on preference pairs with a YAML recipe")
    p.add_argument("--config", required=True, help="YAML recipe (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. objective.beta=0.2")
    p.set_defaults(func=_train)

    p = sub.add_parser("soup", help="average checkpoints into a model soup (SALSA), saved with save_pretrained")
    p.add_argument("--out", required=True, help="new directory for the soup")
    p.add_argument("checkpoints", nargs="*", metavar="CKPT", help="two or more checkpoints of one architecture")
    p.add_argument("--weights", nargs="+", metavar="W",
                   help="mixing weights (>= 0, sum 1), one per checkpoint in order; before or after the checkpoints; "
                        "default uniform")
    p.set_defaults(func=_soup)

    p = sub.add_parser("quickstart", help="SFT → preference pairs → f-DPO on the embedded toy world, on CPU")
    p.add_argument("--output-dir", default="outputs/quickstart",
                   help="where the run's files go; a rerun replaces only the previous quickstart's own files there")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty folder that no quickstart wrote (its other files are kept)")
    p.set_defaults(func=_quickstart)

    _add_rm_parser(sub)

    p = sub.add_parser("bon", help="offline best-of-n study: sample N per prompt, score with a reward ensemble, "
                                   "reward vs KL curves")
    p.add_argument("--config", required=True, help="YAML study (see configs/bon/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. num_samples=16")
    p.set_defaults(func=_bon)

    p = sub.add_parser("study", help="on-policy studies on the toy world: fdpg_divergences, overoptimisation, "
                                     "frontier (results.json + PNG in docs/studies/NAME/)")
    p.add_argument("name", help="fdpg_divergences | overoptimisation | frontier")
    p.add_argument("--quick", action="store_true", help="1 seed, a few steps, tiny sizes (a smoke run, < 1 min)")
    p.add_argument("--output-dir", help="where results.json, results.md and the PNG go (default docs/studies/NAME; "
                                        "models go to outputs/studies/NAME/work, or DIR/work with --output-dir)")
    p.add_argument("--seeds", type=_positive_int, help="number of seeds (default: the study's own; 1 with --quick)")
    p.set_defaults(func=_study)
    return parser


def _process_group_initialized() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized())


def _shut_down_process_group() -> None:
    """Ends a distributed job in step: every rank waits for the others, then leaves the process group.

    Without it ranks exit in any order; under DeepSpeed's launcher rank 0 hosts the rendezvous store, and a rank
    still talking to it when rank 0 exits was seen to abort ("terminate called without an active exception") after
    training had finished and `final/` was written.
    """
    import torch

    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    _quiet_environment(ns.verbose)
    from align.errors import AlignError

    # Only a process group this command started is shut down: `main` called in a process that already has one (a
    # notebook, a test session holding an in-process vLLM engine) leaves it alone.
    had_process_group = _process_group_initialized()
    try:
        status = ns.func(ns)
        if _process_group_initialized() and not had_process_group:
            _shut_down_process_group()
        return status
    except AlignError as e:
        print(f"align: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("align: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
