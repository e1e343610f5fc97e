"""The start of a training run, shared by every training recipe (`align train` of both families, `align rm train`):
DeepSpeed's communicator on CPU, the refusal of a used output folder, and the checkpoint a run resumes from."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from align.errors import ConfigError
from align.io import held_entries
from align.trainer import latest_checkpoint

logger = logging.getLogger("align.runs")


def init_deepspeed_on_cpu(training: dict) -> None:
    """Under torchrun without GPUs, DeepSpeed's own communicator must be started (with gloo) before anything else.

    On GPUs accelerate does this; on CPU it brings up plain torch.distributed instead, and `deepspeed.zero.Init`
    (run by `from_pretrained` under ZeRO-3) then sees a world size of 1 and rejects the batch sizes.
    """
    import torch

    if not training.get("deepspeed") or torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")


def check_output_dir(args, overwrite: bool) -> None:
    """Refuses a `training.output_dir` that already holds files, unless the run resumes from it or `overwrite` is
    set: a second `align train` with the same recipe must not silently replace a finished run."""
    output_dir = Path(args.output_dir)
    if overwrite or args.resume_from_checkpoint or not output_dir.is_dir():
        return
    shown = held_entries(output_dir)
    if shown:
        raise ConfigError(f"training.output_dir: '{output_dir}' already holds files ({shown}); resume it with "
                          "training.resume_from_checkpoint=latest, write into it anyway with overwrite=true, or "
                          "choose another output_dir")


def resume_point(args, output_dir: Path) -> str | None:
    """The checkpoint `training.resume_from_checkpoint` names: a path, or for `latest` the newest complete one."""
    resume = args.resume_from_checkpoint
    if resume == "latest":
        # The newest checkpoint marked complete: one cut short by a crash while saving is skipped. With none, the run
        # starts from step 0, so the same command serves a job's first launch and every relaunch after a preemption
        # (as Lightning's `ckpt_path="last"` does; transformers' `resume_from_checkpoint=True` would raise).
        resume = latest_checkpoint(str(output_dir))
        if resume is None:
            logger.warning("resume_from_checkpoint: latest: no complete checkpoint in %s; training from the start",
                           output_dir)
    if resume and not Path(resume).is_dir():
        raise ConfigError(f"training.resume_from_checkpoint: '{resume}' is not a checkpoint directory")
    if resume:
        logger.info("resuming from %s", resume)
    return resume or None
