"""The `align` command line.

    align train --config configs/dpo.yaml [dotted.key=value ...]
    align soup --out DIR CKPT CKPT... [--weights W W...]
    align quickstart [--output-dir DIR]

Bad input (a config key, a data row, a model path) is reported as one line naming the key, file, row or field,
with exit status 2 and no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _quiet_environment() -> None:
    # DeepSpeed probes for an accelerator when transformers imports it; on a CPU machine tell it up front so it
    # neither warns nor guesses.
    if not os.path.exists("/dev/nvidia0") and "DS_ACCELERATOR" not in os.environ:
        os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "DeepSpeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _train(ns: argparse.Namespace) -> int:
    from align.config import load_train_config

    config = load_train_config(ns.config, ns.overrides)  # before importing the trainer: bad keys fail fast
    from align.train import train

    summary = train(config)
    print(f"trained {summary['global_step']} steps; final model in {summary['final_model']}")
    return 0


def _quickstart(ns: argparse.Namespace) -> int:
    from align.quickstart import run_quickstart

    run_quickstart(ns.output_dir, seed=ns.seed)
    return 0


def _soup(ns: argparse.Namespace) -> int:
    from align.soup import write_soup

    out = write_soup(ns.out, ns.checkpoints, ns.weights)
    print(f"wrote the soup of {len(ns.checkpoints)} checkpoints to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align", description="Preference alignment for LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a policy on preference pairs with a YAML recipe")
    p.add_argument("--config", required=True, help="YAML recipe (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. objective.beta=0.2")
    p.set_defaults(func=_train)

    p = sub.add_parser("soup", help="average checkpoints into a model soup (SALSA), saved with save_pretrained")
    p.add_argument("--out", required=True, help="new directory for the soup")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="two or more checkpoints of one architecture")
    p.add_argument("--weights", type=float, nargs="+", help="mixing weights (>= 0, sum 1); default uniform")
    p.set_defaults(func=_soup)

    p = sub.add_parser("quickstart", help="SFT → preference pairs → f-DPO on the embedded toy world, on CPU")
    p.add_argument("--output-dir", default="outputs/quickstart", help="where the run's files go")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    _quiet_environment()
    from align.errors import AlignError

    try:
        return ns.func(ns)
    except AlignError as e:
        print(f"align: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("align: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
