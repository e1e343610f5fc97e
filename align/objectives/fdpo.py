"""f-DPO (Wang et al. 2023, "Beyond Reverse KL", ICLR 2024) — METHODS.md §1 and §4. DPO is the reverse-KL case.

For a divergence with invertible f' and 0 ∉ dom f', the RLHF optimum gives the implicit reward
`r(x, y) = β f'(u) + const(x)`, `u = π_θ(y|x)/π_ref(y|x)`, and the Bradley–Terry likelihood becomes

    L = −log σ(β [f'(u_w) − f'(u_l)])                                  [P: f-DPO §4; DPO Eq. 7 for f = u log u]

with cDPO label smoothing ε (probability that a label is flipped; METHODS §1):

    L_ε = −(1 − ε) log σ(z) − ε log σ(−z),   z = β [f'(u_w) − f'(u_l)].

Everything is computed from log-ratios ℓ = log u (never from u) through `Divergence.score_from_log`, i.e.
`f'(u) − f'(1)`; the constant cancels in z, and with reverse KL the score is ℓ itself so the loss is bit-for-bit
DPO. Note: TRL ≥ 0.29 (incl. 1.16) no longer applies `label_smoothing` to its `sigmoid` loss (only to `robust`,
`exo_pair`, `aot*`); this module keeps the cDPO formula of TRL ≤ 0.28.

**Logged rewards.** The implicit reward of f-DPO is `β f'(u)` (up to a per-prompt constant), so the metrics
report `rewards/chosen = β s(ℓ_w)`, `rewards/rejected = β s(ℓ_l)`, `rewards/margins = z` (the loss logit) and
`rewards/accuracies = [z > 0]`, with `s = f' − f'(1)` (zero at π = π_ref). TRL instead logs `β ℓ` whatever the
divergence; that quantity is reported here as `β · logratios/*`, and the two coincide for reverse KL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from align.divergences import AlphaDivergence, Divergence, get_divergence
from align.errors import ConfigError
from align.logps import PairLogps
from align.objectives.base import Objective, check_number, register_objective

__all__ = ["FDPO", "FDivergenceParams", "fdpo_loss", "fdpo_loss_from_logratios"]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs, fp64 if any input is fp64 (METHODS §0: log-probs are summed in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _range_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype whose range gradients must respect: fp16 if any input is fp16 (selects the exp cap)."""
    return torch.float16 if any(t.dtype == torch.float16 for t in tensors) else torch.float32


def _resolve(divergence: Divergence | str) -> Divergence:
    return divergence if isinstance(divergence, Divergence) else get_divergence(divergence)


def fdpo_loss_from_logratios(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    beta: float,
    divergence: Divergence | str,
    label_smoothing: float = 0.0,
    input_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """f-DPO loss from sequence log-ratios ℓ_w, ℓ_l `[B]` (any float dtype; computed in fp32).

    `input_dtype` selects the exp cap of the divergence (default: the log-ratios' dtype); pass fp16 when the
    log-ratios were upcast from fp16 tensors that receive the gradient.

    Returns `(losses [B] fp32, metrics {key: [B] fp32, detached})`.
    """
    div = _resolve(divergence)
    if input_dtype is None:
        input_dtype = _range_dtype(chosen_logratios, rejected_logratios)
    s_w = div.score_from_log(chosen_logratios, input_dtype=input_dtype)  # f'(u_w) − f'(1)
    s_l = div.score_from_log(rejected_logratios, input_dtype=input_dtype)
    logits = beta * (s_w - s_l)  # z = β[f'(u_w) − f'(u_l)]
    if label_smoothing == 0.0:
        losses = -F.logsigmoid(logits)  # DPO Eq. 7 / f-DPO; softplus(−z), overflow-free
    else:
        # cDPO: the label is flipped with probability ε (METHODS §1).
        losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    with torch.no_grad():
        metrics = {
            "rewards/chosen": (beta * s_w).detach().float(),
            "rewards/rejected": (beta * s_l).detach().float(),
            "rewards/margins": logits.detach().float(),
            "rewards/accuracies": (logits > 0).float(),
            "logratios/chosen": chosen_logratios.detach().float(),
            "logratios/rejected": rejected_logratios.detach().float(),
        }
    return losses, metrics


def fdpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    divergence: Divergence | str,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """f-DPO loss from sequence log-probs (sums over completion tokens), all `[B]`.

    Args:
        policy_chosen_logps, policy_rejected_logps: `[B]` log π_θ(y_w|x), log π_θ(y_l|x).
        ref_chosen_logps, ref_rejected_logps: `[B]` log π_ref(y_w|x), log π_ref(y_l|x) (no gradient needed).
        beta: β > 0.
        divergence: a `Divergence` or a registered name (`"reverse_kl"` gives DPO exactly).
        label_smoothing: cDPO ε ∈ [0, 0.5).

    Returns:
        `(losses [B] fp32, metrics)`: metrics are `[B]` fp32 detached tensors — `rewards/chosen`,
        `rewards/rejected`, `rewards/margins`, `rewards/accuracies`, `logratios/chosen`, `logratios/rejected`,
        `logps/chosen`, `logps/rejected`.
    """
    inputs = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    dt = _compute_dtype(*inputs)
    # Log-ratios in fp32 (the subtraction of two large sums loses digits in half precision); the exp cap follows
    # the narrowest input dtype because that is where the gradient lands.
    chosen_logratios = policy_chosen_logps.to(dt) - ref_chosen_logps.to(dt)
    rejected_logratios = policy_rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    losses, metrics = fdpo_loss_from_logratios(
        chosen_logratios,
        rejected_logratios,
        beta=beta,
        divergence=divergence,
        label_smoothing=label_smoothing,
        input_dtype=_range_dtype(*inputs),
    )
    metrics["logps/chosen"] = policy_chosen_logps.detach().float()
    metrics["logps/rejected"] = policy_rejected_logps.detach().float()
    return losses, metrics


@dataclass
class FDivergenceParams:
    """Parameters shared by the f-divergence objectives (f-DPO, SamPO)."""

    beta: float = field(
        default=0.1,
        metadata={
            "help": "β > 0: strength of the f-divergence regulariser towards the reference. Higher β keeps the "
            "policy closer to the reference. TRL's default is 0.1."
        },
    )
    divergence: str = field(
        default="reverse_kl",
        metadata={
            "help": "f-divergence regulariser (f-DPO paper): `reverse_kl` (= DPO), `forward_kl`, `js` (aliases "
            "`jsd`, `js_divergence`; 2×JS scaling as in the paper and TRL) or `alpha` (alias `alpha_divergence`). "
            "TV and χ² do not admit the f-DPO closed form and are rejected."
        },
    )
    alpha: float | None = field(
        default=None,
        metadata={
            "help": "α ∈ (0, 1) of the α-divergence in the f-DPO PAPER convention f'(u) = (1 − u^-α)/α (α → 0 is "
            "reverse KL, α → 1 forward KL). Only valid with `divergence: alpha`; unset means 0.5. To port TRL ≥ 0.29 "
            "`f_alpha_divergence_coef: c`, use `alpha: 1 − c`; TRL ≤ 0.28's coef is α itself."
        },
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "cDPO label smoothing ε ∈ [0, 0.5): assumed probability that a preference label is flipped; "
            "loss = −(1−ε) log σ(z) − ε log σ(−z). 0 gives the plain (f-)DPO loss."
        },
    )

    def __post_init__(self) -> None:
        self.beta = check_number("beta", self.beta, gt=0)
        self.label_smoothing = check_number("label_smoothing", self.label_smoothing, ge=0, lt=0.5)
        if not isinstance(self.divergence, str):
            raise ConfigError(
                f"divergence must be a name (string), got {type(self.divergence).__name__}: {self.divergence!r}"
            )
        try:
            divergence = get_divergence(self.divergence)
        except ConfigError as e:  # name the field, so the config layer reports `objective.divergence: ...`
            raise ConfigError(f"divergence: {e}") from None
        if self.alpha is not None:
            if not isinstance(divergence, AlphaDivergence):
                raise ConfigError(
                    f"alpha is only used with divergence 'alpha' (alpha_divergence), got divergence "
                    f"{self.divergence!r}; remove alpha or set divergence: alpha"
                )
        self.build_divergence()  # validates the name and alpha's value now, not at the first step

    def build_divergence(self) -> Divergence:
        """The `Divergence` these parameters describe."""
        kwargs: dict[str, Any] = {} if self.alpha is None else {"alpha": self.alpha}
        return get_divergence(self.divergence, **kwargs)


@register_objective("fdpo", "dpo", "f_dpo")
class FDPO(Objective):
    """f-DPO on sequence log-probs; with the default `divergence: reverse_kl` it is DPO (hence alias `dpo`)."""

    Params = FDivergenceParams

    def __init__(self, params: FDivergenceParams | None = None, *, seed: int = 0):
        super().__init__(params, seed=seed)
        self.divergence = self.params.build_divergence()

    def __call__(self, policy: PairLogps, reference: PairLogps) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`policy`, `reference`: token log-probs `[B, T]` with masks; returns `(losses [B], metrics {[B]})`."""
        return fdpo_loss(
            policy.chosen_sum(),
            policy.rejected_sum(),
            reference.chosen_sum(),
            reference.rejected_sum(),
            beta=self.params.beta,
            divergence=self.divergence,
            label_smoothing=self.params.label_smoothing,
        )
