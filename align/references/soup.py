"""Reference kind `soup`: SALSA weight-averaged reference (METHODS §3)."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from align.errors import ConfigError
from align.schema import ConfigKeyError
from align.modeling import load_causal_lm
from align.references.base import Reference, register_reference
from align.references.frozen import FrozenReference


@register_reference("soup")
class SoupReference(FrozenReference):
    """SALSA (Chegini et al. 2024): the reference is the weight average Σ_k w_k θ_k of several SFT checkpoints
    (same architecture and tokenizer), averaged in fp32. A LoRA SFT ingredient (an adapter folder) counts as its
    merged weights W0 + s·B·A (`align.soup`). The policy may start from the soup (write it first with `align soup`)
    or from one ingredient.

    How it is built, and why. The soup is written to disk once per node and then loaded like a `frozen` reference:

    1. Every process checks the ingredients (configs, tokenizers, weights; no tensors), so a bad soup is the same
       one-line error on every rank.
    2. One process per node (local rank 0) writes the soup with `align.soup.write_soup_weights`: tensor by tensor,
       each ingredient's tensor read from its files, mixed into a running fp32 mean and appended to a safetensors
       shard in the first ingredient's dtype. It never holds a model: its peak is a shard (≤ 256 MiB) and a few
       tensors, plus an adapter for a LoRA ingredient. The folder is `$TMPDIR/align-soup-<run>-node<n>`: a token
       drawn by rank 0 and broadcast makes it the run's own (two jobs on a node never share or delete each other's)
       and the node index (first global rank of the node) gives each node its own copy, also when TMPDIR is a
       shared filesystem; node-local disks mean no node waits on another's file system. TMPDIR must hold one copy
       of the model in the ingredients' dtype.
    3. A barrier; the builder's status is shared first, so a failed build is an error on every rank, not a hang.
    4. Every process loads the folder with `load_causal_lm`, exactly as `frozen` loads its model: in the policy's
       dtype and attention settings and, under ZeRO-3, through `from_pretrained`'s `deepspeed.zero.Init`, so each
       rank only ever materialises its partition; `prepare` then wraps it like a frozen reference.
    5. A barrier, and the builder deletes the folder.

    Before this, every rank built the whole soup in memory (the running fp32 mean plus one fp32 ingredient: two
    fp32 models per rank, whatever the ZeRO stage) and cast it. Under ZeRO-3 that was also wrong: with the
    trainer's ZeRO-3 config alive, each ingredient's `from_pretrained` partitioned while loading, so the average ran
    over empty placeholders and the reference silently stayed the first ingredient's partitions
    (bench/soup_memory.py measures both). The soup written here is bit-for-bit the in-memory one (same fp32 running
    mean, same cast to the first ingredient's dtype); loading it in the policy's dtype is `align soup`'s output
    loaded as the policy would be, so a policy started from that output has zero KL to this reference.
    """

    @dataclass
    class Params:
        checkpoints: list[str] = field(
            default_factory=list,
            metadata={"help": "Two or more checkpoints: save_pretrained folders or LoRA adapter folders (each merged "
                              "onto its base_model_name_or_path in fp32)."})
        weights: list[float] | None = field(
            default=None, metadata={"help": "Mixing weights, >= 0 and summing to 1; default uniform (SALSA's ½, ½)."})

        def __post_init__(self):
            from align.soup import soup_weights

            try:
                self.weights = soup_weights(self.weights, len(self.checkpoints))
            except ConfigError as e:
                field_name = "checkpoints" if len(self.checkpoints) < 2 else "weights"
                raise ConfigError(f"{field_name}: {e}") from None

    def __init__(self, params, *, policy, model_config):
        from align.soup import check_ingredients, write_soup_weights

        Reference.__init__(self, params, policy=policy, model_config=model_config)
        try:
            checked = check_ingredients(params.checkpoints, params.weights)  # every rank: same error everywhere
        except ConfigError as e:
            raise ConfigKeyError("reference.checkpoints", str(e)) from None
        folder, builder = _build_folder()
        try:
            failure = None
            if builder:
                try:
                    write_soup_weights(folder / "soup", params.checkpoints, params.weights,
                                       attn_implementation=model_config.attn_implementation, checked=checked)
                # Re-raised below once every rank knows: the others must not wait for the folder forever.
                except Exception as e:  # noqa: BLE001
                    failure = e
            message = _first_failure(failure)
            if failure is not None:
                if isinstance(failure, ConfigError):
                    raise ConfigKeyError("reference.checkpoints", str(failure)) from None
                raise failure
            if message is not None:
                raise ConfigKeyError("reference.checkpoints", f"{message} (on the process building the soup)")
            self.model = load_causal_lm(model_config, str(folder / "soup"), key="reference.checkpoints")
            self.model.eval().requires_grad_(False)
        finally:
            _barrier()  # every rank has loaded (or failed) before the builder deletes the files
            if builder:
                shutil.rmtree(folder, ignore_errors=True)


def _distributed():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def _build_folder() -> tuple[Path, bool]:
    """(folder the soup is written to and loaded from, whether this process writes it): see `SoupReference`."""
    dist = _distributed()
    if dist is None:
        return Path(tempfile.mkdtemp(prefix="align-soup-")), True
    rank = dist.get_rank()
    # torchrun, the deepspeed launcher and accelerate set LOCAL_RANK; without it each process is its own node.
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    node = rank - local_rank
    token = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    folder = Path(tempfile.gettempdir()) / f"align-soup-{token[0]}-node{node}"
    if local_rank == 0:
        folder.mkdir(parents=True)
    return folder, local_rank == 0


def _first_failure(failure: Exception | None) -> str | None:
    """The first builder's failure, as a message, on every process (None when all builds succeeded)."""
    dist = _distributed()
    if dist is None:
        return None if failure is None else str(failure)
    messages = [None] * dist.get_world_size()
    mine = None if failure is None else (str(failure) if isinstance(failure, ConfigError)
                                         else f"{type(failure).__name__}: {failure}")
    dist.all_gather_object(messages, mine)
    return next((m for m in messages if m is not None), None)


def _barrier() -> None:
    dist = _distributed()
    if dist is not None:
        dist.barrier()
