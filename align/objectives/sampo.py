"""SamPO (Lu et al. 2024, "Eliminating Biased Length Reliance of DPO via Down-Sampled KL Divergence") — METHODS §6.

DPO's sequence log-ratios are sums over tokens, so longer responses get larger-magnitude implicit rewards. SamPO
sums the token log-ratios of both responses over the **same number** of tokens `T_m = min(T_w, T_l)`:

    r(y) = β Σ_{t ∈ S(y)} [log π_θ(y_t|·) − log π_ref(y_t|·)],   |S(y)| = T_m,

where the shorter response keeps all its completion positions and the longer one keeps `T_m` positions drawn
uniformly **without replacement** (official repo `LuJunru/SamPO`, `get_batch_logps` with `len_norm=True`: a
multinomial over the completion mask; sums, no averaging). The down-sampled sums then go through the f-DPO loss,
so SamPO composes with every divergence (the paper uses reverse KL, i.e. DPO).

Index sets: with `shared_indices=True` (toolkit default, METHODS §6 recommendation) one subset is drawn per
sequence and step and used for both π_θ and π_ref, so ℓ is a genuine sub-sum of token log-ratios. With
`shared_indices=False` the policy and the reference draw independent subsets, as the official repo does (its
policy and reference forwards each call the sampler); that adds noise `Σ_{S1} log π_θ − Σ_{S2} log π_ref` that does
not vanish at π_θ = π_ref.

Randomness comes from a CPU `torch.Generator` owned by the objective and seeded once (like the repo's
global-RNG seeding), so a run is reproducible and its `state_dict()` makes a resumed run exact. Every call draws
(evaluation too), and the number of draws depends only on tensor shapes, not on values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from align.divergences import Divergence
from align.errors import ConfigError
from align.logps import PairLogps
from align.objectives.base import check_number, register_objective
from align.objectives.fdpo import FDPO, FDivergenceParams, _compute_dtype, _range_dtype, fdpo_loss_from_logratios

__all__ = ["SamPO", "SamPOParams", "sampo_downsample_masks", "sampo_loss"]


def _select(mask: torch.Tensor, keep: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Keep `keep[b]` positions of row b of `mask` `[B, T]`, uniformly without replacement.

    Random keys are drawn on the CPU generator (so CUDA tensors get the same draws as CPU ones) in fp64 (53-bit
    keys: ties are negligible even for very long sequences); invalid positions get key +inf. A position is kept iff
    the rank of its key within the row is < keep[b]; since every valid key is finite, the `keep[b] ≤ T_valid`
    smallest keys are valid positions, and sorting i.i.d. uniform keys gives a uniformly random subset.
    """
    keys = torch.rand(mask.shape, generator=generator, dtype=torch.float64).to(mask.device)
    keys = keys.masked_fill(~mask, float("inf"))
    order = keys.argsort(dim=-1, stable=True)
    ranks = order.argsort(dim=-1, stable=True)  # rank of each position's key within its row
    return mask & (ranks < keep.unsqueeze(-1))


def sampo_downsample_masks(
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw SamPO's token subsets for a batch of pairs.

    Args:
        chosen_mask: `[B, Tc]` bool (or 0/1), True on chosen completion tokens.
        rejected_mask: `[B, Tr]` bool (or 0/1).
        generator: a CPU `torch.Generator` (None = torch's global CPU generator). Keys are drawn on the CPU and
            moved to the masks' device, so the result does not depend on the device.

    Returns:
        `(chosen_sel [B, Tc], rejected_sel [B, Tr])` bool, subsets of the masks: per pair `T_m = min(T_w, T_l)`;
        the shorter response keeps all its positions, the longer exactly `T_m` uniformly drawn ones (equal lengths
        keep everything). Random keys are drawn for both masks every call, so the generator advances by an amount
        that depends only on the shapes.
    """
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"sampo_downsample_masks needs a CPU torch.Generator, got one on {generator.device}")
    chosen_mask = chosen_mask.bool()
    rejected_mask = rejected_mask.bool()
    t_min = torch.minimum(chosen_mask.sum(-1), rejected_mask.sum(-1))  # T_m [B]
    return _select(chosen_mask, t_min, generator), _select(rejected_mask, t_min, generator)


def _masked_sum(token_logps: torch.Tensor, sel: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # `where`, not multiplication: unselected positions contribute exactly 0 and get exactly zero gradient even if
    # they hold -inf/NaN padding.
    return torch.where(sel, token_logps.to(dtype), torch.zeros((), dtype=dtype, device=token_logps.device)).sum(-1)


def sampo_loss(
    policy_chosen_token_logps: torch.Tensor,
    policy_rejected_token_logps: torch.Tensor,
    ref_chosen_token_logps: torch.Tensor,
    ref_rejected_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    beta: float,
    divergence: Divergence | str,
    generator: torch.Generator | None,
    shared_indices: bool = True,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SamPO loss: f-DPO on token log-ratios summed over down-sampled, equal-size token subsets.

    Args:
        policy_chosen_token_logps, ref_chosen_token_logps: `[B, Tc]` per-token log-probs of y_w.
        policy_rejected_token_logps, ref_rejected_token_logps: `[B, Tr]` per-token log-probs of y_l.
        chosen_mask, rejected_mask: `[B, Tc]`, `[B, Tr]` completion masks.
        beta, divergence, label_smoothing: as in `fdpo_loss`.
        generator: CPU `torch.Generator` for the subsets (see `sampo_downsample_masks`).
        shared_indices: one subset for policy and reference (True), or independent subsets, policy drawn first
            (False; reproduces the official repo).

    Returns:
        `(losses [B] fp32, metrics)` with the f-DPO metrics (`logps/*` are the down-sampled policy sums) plus
        `sampo/kept_fraction` = kept / valid tokens of the pair, `2 T_m / (T_w + T_l)`.
    """
    tensors = (policy_chosen_token_logps, policy_rejected_token_logps, ref_chosen_token_logps, ref_rejected_token_logps)
    dt = _compute_dtype(*tensors)
    chosen_mask = chosen_mask.bool()
    rejected_mask = rejected_mask.bool()
    sel_c, sel_r = sampo_downsample_masks(chosen_mask, rejected_mask, generator)
    if shared_indices:
        ref_sel_c, ref_sel_r = sel_c, sel_r
    else:
        ref_sel_c, ref_sel_r = sampo_downsample_masks(chosen_mask, rejected_mask, generator)
    pol_c = _masked_sum(policy_chosen_token_logps, sel_c, dt)
    pol_r = _masked_sum(policy_rejected_token_logps, sel_r, dt)
    ref_c = _masked_sum(ref_chosen_token_logps, ref_sel_c, dt)
    ref_r = _masked_sum(ref_rejected_token_logps, ref_sel_r, dt)
    losses, metrics = fdpo_loss_from_logratios(
        pol_c - ref_c,
        pol_r - ref_r,
        beta=beta,
        divergence=divergence,
        label_smoothing=label_smoothing,
        input_dtype=_range_dtype(*tensors),
    )
    with torch.no_grad():
        kept = (sel_c.sum(-1) + sel_r.sum(-1)).float()
        valid = (chosen_mask.sum(-1) + rejected_mask.sum(-1)).float().clamp(min=1.0)
        metrics["logps/chosen"] = pol_c.detach().float()
        metrics["logps/rejected"] = pol_r.detach().float()
        metrics["sampo/kept_fraction"] = kept / valid
    return losses, metrics


@dataclass
class SamPOParams(FDivergenceParams):
    """f-DPO parameters plus SamPO's sampling options."""

    shared_indices: bool = field(
        default=True,
        metadata={
            "help": "Use one random token subset per sequence for both policy and reference (toolkit default). "
            "False draws them independently, reproducing the official SamPO repo."
        },
    )
    seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of SamPO's token-subset generator; unset (null) uses the run's seed. Seeded once per run; "
            "the generator state is saved in checkpoints so a resumed run draws the same subsets."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.shared_indices, bool):
            raise ConfigError(
                f"shared_indices must be true or false, got {type(self.shared_indices).__name__}: "
                f"{self.shared_indices!r}"
            )
        if self.seed is not None:
            self.seed = check_number("seed", self.seed, integer=True)


@register_objective("sampo")
class SamPO(FDPO):
    """SamPO: f-DPO on down-sampled token log-ratio sums (METHODS §6). Needs per-token reference log-probs."""

    Params = SamPOParams

    def __init__(self, params: SamPOParams | None = None, *, seed: int = 0):
        super().__init__(params, seed=seed)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.params.seed if self.params.seed is not None else seed)

    def __call__(self, policy: PairLogps, reference: PairLogps) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`policy`, `reference`: token log-probs `[B, T]` with masks (the policy's masks are used)."""
        if policy.chosen.shape != reference.chosen.shape or policy.rejected.shape != reference.rejected.shape:
            raise ValueError(
                "SamPO needs per-token reference log-probs aligned with the policy's: got chosen "
                f"{tuple(reference.chosen.shape)} vs {tuple(policy.chosen.shape)}, rejected "
                f"{tuple(reference.rejected.shape)} vs {tuple(policy.rejected.shape)}"
            )
        return sampo_loss(
            policy.chosen,
            policy.rejected,
            reference.chosen,
            reference.rejected,
            policy.chosen_mask,
            policy.rejected_mask,
            beta=self.params.beta,
            divergence=self.divergence,
            generator=self.generator,
            shared_indices=self.params.shared_indices,
            label_smoothing=self.params.label_smoothing,
        )

    def state_dict(self) -> dict[str, Any]:
        """`{"generator": ByteTensor}`: the RNG state, so the next draw after a resume is the same."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"generator"}:
            raise ValueError(f"SamPO state must have exactly the key 'generator', got {sorted(state)}")
        self.generator.set_state(state["generator"])
