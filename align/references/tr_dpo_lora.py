"""TR-DPO for a LoRA policy: the reference is a second LoRA adapter, named "reference", on the policy's own base model.

What it is (METHODS §2, toolkit note for LoRA). The policy is `W₀ + Δ_p` with Δ_p = s·B_p·A_p in every adapted
layer (s = the layer's LoRA scaling, B_p `[d_out, r_p]`, A_p `[r_p, d_in]`). The reference is `W₀ + Δ_r`, Δ_r =
s·B_r·A_r, held by an adapter of rank r_r (`reference.rank`, default the policy's rank) on the SAME module objects:
there is no second copy of the base weights, only r_r·(d_in + d_out) more numbers per layer. Its scaling is set to
the policy's, so that a hard update is a plain copy of the factors. It starts equal to the policy's adapter at build
time (the initial policy), never receives gradients and only changes in `on_step_end`.

Updates every `tau` optimizer steps (same schedule as the full-weight `TRDPOReference`):

- α = 1 (hard): B_r ← B_p, A_r ← A_p (zero-padded when r_r > r_p). Bit-exact: the reference forward then computes
  the policy's numbers (when r_r = r_p), and a batch's log-ratios are exactly 0.
- 0 < α < 1 (soft): TR-DPO asks for θ_ref ← α·θ + (1 − α)·θ_ref. Mixing A and B separately is wrong: B·A is
  bilinear, (αB_p + (1−α)B_r)(αA_p + (1−α)A_r) ≠ αB_pA_p + (1−α)B_rA_r (METHODS §2). The exact target per layer is

      Δ* = α·Δ_p + (1 − α)·Δ_r = s·U·V,   U = [α·B_p, (1−α)·B_r]  `[d_out, k]`,   V = [A_p; A_r]  `[k, d_in]`,

  k = r_p + r_r, so rank Δ* ≤ k. We store its best rank-r_r approximation (Eckart–Young), computed without ever
  forming a d_out × d_in matrix: thin QR U = Q_u·R_u and Vᵀ = Q_v·R_v, SVD of the small core R_u·R_vᵀ = W·Σ·Zᵀ, then
  B_r = Q_u·W_r·√Σ_r and A_r = √Σ_r·Z_rᵀ·Q_vᵀ (the top r_r singular triplets, √σ split evenly between the
  factors). This is the "low-rank re-projection" form. Its error is known exactly: ‖Δ* − Δ_r‖_F = s·√(Σ_{i>r_r} σ_i²)
  per layer; `metrics()` reports the relative error of the last update over all layers,
  `reference/update_rel_error` = √(Σ_layers err²) / √(Σ_layers ‖Δ*‖_F²), and the update count `reference/updates`.
  The update is exact (error at round-off, ~1e-7) whenever rank Δ* ≤ r_r: the first update from a standard LoRA
  init (B = 0, so Δ_r = 0); with `reference.rank` ≥ 2× the policy rank, the first update from any init and every
  update while Δ_p stays in one rank-r_p column/row space (e.g. a frozen policy, METHODS §2 test 3). Otherwise the
  per-update errors e_j = ‖Δ* − Δ_r‖_F do not compound: the reference's distance to the exact TR-DPO reference
  D_n obeys D_n ≤ (1−α)·D_{n−1} + e_n, so D_n ≤ Σ_j (1−α)^(n−j)·e_j ≤ max_j e_j / α.
- α = 0: the reference never moves.

Why this form rather than a full-rank reference delta: a dense Δ_r per layer would cost d_out·d_in numbers (for a 7B
model, a second copy of every adapted weight matrix: what a LoRA policy is chosen to avoid) and a dense matmul per
layer in every reference forward. The re-projection keeps the reference at LoRA size and its forward at LoRA cost,
and the approximation is optimal for the rank and reported.

Cost per update, per layer, with k = r_p + r_r: time O((d_out + d_in)·k² + k³) (two thin QRs, one k×k SVD, two
thin matmuls); transient memory O((d_out + d_in)·k) (layers of one shape are processed as a batch, in chunks of at
most `_CHUNK_ELEMENTS` numbers). The factorisation runs in fp64 (fp32 on MPS, which has no fp64); fp32 would be
only ~20% faster on CPU. Measured on one CPU thread: 3–4 ms per soft update for the tiny test model (14 layers,
d ≤ 256, r = 4 or 8; a hard update, a copy, < 1 ms); for Qwen2.5-0.5B's shapes with r = 16 on all linear layers
(168 layers) about 1 s, negligible at `tau: 64` (GPU timings not measured here).
Persistent memory: the reference adapter itself plus an fp32 master copy of its factors, 2·r_r·(d_in + d_out)
numbers per layer. The master copy is kept whatever the adapter's dtype: DeepSpeed casts every module weight
(frozen ones included) to bf16 after this object is built, and a small α rounds away in bf16 (METHODS §2,
precision); it is also what checkpoints hold, so a resumed run continues from the exact fp32 reference.

Saving: `PeftModel.save_pretrained` writes every adapter, so `final/` (and each checkpoint) also holds a
`reference/` subfolder with the moved reference adapter (its `adapter_config.json` has `inference_mode: true` and a
`lora_alpha` giving the same scaling as the policy). The policy adapter is saved at the top level as usual and loads
back on its own with `PeftModel.from_pretrained(base, final_dir)`.

Limits: vanilla LoRA on linear layers only (DoRA and other variants, `lora_bias`, `modules_to_save`,
`trainable_token_indices`, `target_parameters` and embedding/conv adapters are refused with a ConfigError); not
under DeepSpeed ZeRO-3, where the LoRA factors are partitioned across ranks (ZeRO-1/2 keep them whole on every rank
and work unchanged: every rank computes the same update from the same factors; a 2-process ZeRO-2 CPU run ended
within 4e-6 of a single-process run); `reference.name_or_path` is refused (the reference shares the policy's base
model).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections import defaultdict
from typing import Any

import torch

from align.errors import AlignError, ConfigError
from align.logps import batch_completion_keys, completion_token_logps
from align.modeling import adapter_active, is_peft_model
from align.references.base import Reference
from align.references.tr_dpo import TRDPOReference

logger = logging.getLogger("align.references")

#: Name of the reference adapter added to the policy's PeftModel (and of its subfolder in saved models).
REFERENCE_ADAPTER = "reference"

#: Largest stacked problem (layers × (d_out + d_in) × k numbers) factorised at once; bounds the transient memory of an
#: update (2^24 fp64 numbers = 128 MiB).
_CHUNK_ELEMENTS = 1 << 24


@torch.no_grad()
def mix_lora_factors(B_p: torch.Tensor, A_p: torch.Tensor, B_r: torch.Tensor, A_r: torch.Tensor, alpha: float,
                     rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors of α·B_p·A_p + (1 − α)·B_r·A_r, for a batch of G layers of one shape.

    Args:
        B_p: `[G, d_out, r_p]`, A_p: `[G, r_p, d_in]` the policy factors; B_r: `[G, d_out, r_r]`, A_r: `[G, r_r,
            d_in]` the current reference factors (all one float dtype, the one the math runs in).
        alpha: mixing weight α ∈ [0, 1].
        rank: rank of the result (the reference adapter's rank).

    Returns `(B, A, dropped, total)`: B `[G, d_out, rank]`, A `[G, rank, d_in]` with B·A the truncated SVD of the
    mix (columns/rows past the mix's rank are zero); `dropped` `[G]` = Σ_{i>rank} σ_i² = ‖mix − B·A‖_F², and
    `total` `[G]` = Σ_i σ_i² = ‖mix‖_F² (without the LoRA scaling s, which multiplies both by s²).
    Never forms a d_out × d_in matrix: O((d_out + d_in)·k²) time with k = r_p + r_r.
    """
    U = torch.cat([alpha * B_p, (1.0 - alpha) * B_r], dim=-1)  # [G, d_out, k]
    Vt = torch.cat([A_p, A_r], dim=-2).mT  # [G, d_in, k]
    Q_u, R_u = torch.linalg.qr(U)  # [G, d_out, m], [G, m, k], m = min(d_out, k)
    Q_v, R_v = torch.linalg.qr(Vt)  # [G, d_in, n], [G, n, k], n = min(d_in, k)
    W, S, Zh = torch.linalg.svd(R_u @ R_v.mT, full_matrices=False)  # [G, m, q], [G, q] descending, [G, q, n]
    keep = min(rank, S.shape[-1])
    root = S[:, :keep].sqrt()
    G, d_out, d_in = U.shape[0], U.shape[1], Vt.shape[1]
    B = U.new_zeros(G, d_out, rank)
    A = U.new_zeros(G, rank, d_in)
    B[:, :, :keep] = (Q_u @ W[:, :, :keep]) * root[:, None, :]
    A[:, :keep, :] = root[:, :, None] * (Zh[:, :keep, :] @ Q_v.mT)
    squares = S.square()
    return B, A, squares[:, keep:].sum(-1), squares.sum(-1)


class LoraTRDPOReference(Reference):
    """TR-DPO reference for a LoRA policy: a second adapter ("reference") on the policy's base model.

    Built by `TRDPOReference.build` for PEFT policies (kind `tr_dpo`, same parameters). See the module docstring for
    the update rule, its error and its cost.
    """

    moves = True

    kind = "tr_dpo"
    Params = TRDPOReference.Params

    def __init__(self, params, *, policy, model_config):
        super().__init__(params, policy=policy, model_config=model_config)
        if not is_peft_model(policy):
            raise ConfigError("reference.kind: this TR-DPO variant needs a LoRA policy (set model.lora)")
        if params.name_or_path is not None:
            raise ConfigError("reference.name_or_path: not available with a LoRA policy: the TR-DPO reference is a "
                              "second adapter on the policy's own base model, initialised to the policy's adapter; "
                              "leave it unset (or train full weights to start from another model)")
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.peft_model = policy
        self.policy_adapter = policy.active_adapter
        if not isinstance(self.policy_adapter, str):
            raise ConfigError(f"reference.kind: tr_dpo needs exactly one active policy adapter, got "
                              f"{self.policy_adapter}")
        if REFERENCE_ADAPTER in policy.peft_config:
            raise ValueError(f"tr_dpo: the policy already has an adapter named '{REFERENCE_ADAPTER}'")
        policy_config = policy.peft_config[self.policy_adapter]
        _check_supported(policy_config)
        self._adapted_layers(policy)  # refuses unsupported layers before the policy is touched
        policy.add_adapter(REFERENCE_ADAPTER, self._reference_config(policy_config, params.rank))
        try:
            self._layers = self._adapted_layers(policy, with_reference=True)
        except Exception:
            policy.delete_adapter(REFERENCE_ADAPTER)  # leave the policy as it came
            raise
        # Every tuner layer's active adapter is switched for the reference forward (see `reference_adapter_active`).
        self._tuner_layers = [m for m in policy.modules() if isinstance(m, BaseTunerLayer)]
        for _, module in self._layers:
            self._reference_factors(module)[0].requires_grad_(False)
            self._reference_factors(module)[1].requires_grad_(False)

        # fp32 master factors: B `[d_out, r_r]`, A `[r_r, d_in]` per layer (see the module docstring).
        self._B = [b.detach().float().clone() for b, _ in map(self._reference_factors, self._modules())]
        self._A = [a.detach().float().clone() for _, a in map(self._reference_factors, self._modules())]
        self.updates = 0
        self.last_rel_error: float | None = None
        # The initial reference is the initial policy (a hard copy; exact unless rank < policy rank).
        initial_error = self._move(1.0)
        if initial_error > 0.0:
            logger.warning("tr_dpo: reference.rank %s is below the policy adapter's rank; the initial reference is its "
                           "best rank-%s approximation (relative error %.3g)", params.rank, params.rank, initial_error)

    # --- construction helpers -----------------------------------------------------------------------------------

    def _adapted_layers(self, policy, with_reference: bool = False) -> list[tuple[str, Any]]:
        """(module path, LoraLayer) of every layer the policy adapter adapts, in model order, after checking that
        each is supported; `with_reference`: also gives the reference adapter the policy's scaling there."""
        from peft.tuners.lora import LoraLayer

        layers = []
        for name, module in policy.named_modules():
            if not (isinstance(module, LoraLayer) and self.policy_adapter in module.r):
                continue
            factor = module.lora_A[self.policy_adapter] if self.policy_adapter in module.lora_A else None
            if not isinstance(factor, torch.nn.Linear):
                raise ConfigError(f"model.lora.target_modules: tr_dpo supports LoRA on linear layers only; '{name}' "
                                  f"is a {type(module).__name__}")
            if self.policy_adapter in getattr(module, "lora_variant", {}):
                raise ConfigError(f"model.lora: tr_dpo supports vanilla LoRA only; '{name}' uses "
                                  f"{type(module.lora_variant[self.policy_adapter]).__name__}")
            if with_reference:
                if REFERENCE_ADAPTER not in module.lora_A:
                    raise ValueError(f"tr_dpo: PEFT did not add the reference adapter to '{name}'")
                # Same Δ = s·B·A convention for both adapters: a hard update is then a copy of the factors.
                module.scaling[REFERENCE_ADAPTER] = module.scaling[self.policy_adapter]
            layers.append((name, module))
        if not layers:
            raise ConfigError("model.lora: the policy has no LoRA layers")
        return layers

    @staticmethod
    def _reference_config(policy_config, rank: int | None):
        config = copy.deepcopy(policy_config)
        config.lora_dropout = 0.0  # the reference forward is deterministic
        config.inference_mode = True  # frozen; also what the saved adapter_config.json says
        # Standard init (B = 0): data-dependent inits (PiSSA, OLoRA, LoftQ, CorDA, EVA...) rewrite the base weights,
        # which the policy shares. The factors are overwritten with the policy's right after.
        config.init_lora_weights = True
        if rank is not None and rank != policy_config.r:
            if policy_config.rank_pattern or policy_config.alpha_pattern:
                raise ConfigError("reference.rank: the policy adapter has per-layer ranks or alphas (rank_pattern / "
                                  "alpha_pattern); leave reference.rank unset to use the policy's ranks")
            # Keep the policy's scaling s = lora_alpha / r (or / √r with rsLoRA) at the new rank, so the saved
            # reference adapter loads back with the same Δ = s·B·A. (The live scaling is also set directly, exactly.)
            scale = policy_config.lora_alpha / (math.sqrt(policy_config.r) if policy_config.use_rslora
                                                else policy_config.r)
            config.r = rank
            config.lora_alpha = scale * (math.sqrt(rank) if policy_config.use_rslora else rank)
        return config

    def _modules(self):
        return [module for _, module in self._layers]

    def _policy_factors(self, module) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_p `[d_out, r_p]`, A_p `[r_p, d_in]`) parameters of the policy adapter."""
        return module.lora_B[self.policy_adapter].weight, module.lora_A[self.policy_adapter].weight

    @staticmethod
    def _reference_factors(module) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_r `[d_out, r_r]`, A_r `[r_r, d_in]`) parameters of the reference adapter."""
        return module.lora_B[REFERENCE_ADAPTER].weight, module.lora_A[REFERENCE_ADAPTER].weight

    # --- trainer interface --------------------------------------------------------------------------------------

    def prepare(self, accelerator) -> None:
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        if plugin is not None and plugin.zero_stage == 3:
            raise ConfigError("training.deepspeed: tr_dpo with a LoRA policy is not available under ZeRO-3 (the LoRA "
                              "factors are partitioned across ranks and the update needs them whole); use ZeRO-2, "
                              "which keeps adapter factors whole on every rank")
        super().prepare(accelerator)

    @contextlib.contextmanager
    def reference_adapter_active(self):
        """Within the block, every LoRA layer computes with the reference adapter instead of the policy's
        (`align.modeling.adapter_active`: no `set_adapter`, so no requires_grad rewrites). Restored before any backward,
        which under activation checkpointing recomputes the policy forward and must see the policy adapter."""
        with adapter_active(self._tuner_layers, REFERENCE_ADAPTER):
            yield

    @torch.no_grad()
    def completion_logps(self, policy, batch):
        # The (possibly DDP/DeepSpeed-wrapped) policy's top-level forward, so wrappers see a normal call.
        with self.reference_adapter_active():
            return completion_token_logps(policy, batch, batch_completion_keys(batch))

    def on_step_end(self, policy, step: int) -> None:
        if step % self.params.tau != 0:
            return
        unwrapped = self.accelerator.unwrap_model(policy) if self.accelerator is not None else policy
        if unwrapped is not self.peft_model:
            raise ValueError("tr_dpo: on_step_end got another model than the policy the reference adapter lives on")
        self.last_rel_error = self._move(self.params.alpha)
        self.updates += 1

    def metrics(self) -> dict[str, float]:
        out = {"reference/updates": float(self.updates)}
        if self.last_rel_error is not None:
            out["reference/update_rel_error"] = self.last_rel_error
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "last_rel_error": self.last_rel_error,
                "factors": {name: {"B": B.detach().cpu().clone(), "A": A.detach().cpu().clone()}
                            for (name, _), B, A in zip(self._layers, self._B, self._A)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        factors = state["factors"]
        if list(factors) != [name for name, _ in self._layers]:
            raise AlignError("tr_dpo: the checkpoint's reference adapter does not match this policy's LoRA layers")
        with torch.no_grad():
            for i, (name, _) in enumerate(self._layers):
                if factors[name]["B"].shape != self._B[i].shape or factors[name]["A"].shape != self._A[i].shape:
                    raise AlignError(f"tr_dpo: the checkpoint's reference adapter has another rank at '{name}' "
                                     "(reference.rank changed?)")
                self._B[i].copy_(factors[name]["B"])
                self._A[i].copy_(factors[name]["A"])
            self._write_adapter()
        self.updates = state["updates"]
        self.last_rel_error = state["last_rel_error"]

    # --- the update -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _move(self, alpha: float) -> float:
        """Δ_r ← α·Δ_p + (1 − α)·Δ_r in every layer (exactly, or as its best rank-r_r approximation); returns the
        relative Frobenius error over all layers (0.0 when exact by construction)."""
        if alpha == 0.0:
            return 0.0
        modules = self._modules()
        for i, module in enumerate(modules):  # DeepSpeed/accelerate may have moved the adapter since the last call
            device = self._reference_factors(module)[0].device
            if self._B[i].device != device:
                self._B[i], self._A[i] = self._B[i].to(device), self._A[i].to(device)
        # Hard update with room for the policy's factors: a copy, exact.
        copy_layers, mix_layers = [], []
        for i, module in enumerate(modules):
            B_p, _ = self._policy_factors(module)
            (copy_layers if alpha == 1.0 and self._B[i].shape[1] >= B_p.shape[1] else mix_layers).append(i)
        for i in copy_layers:
            B_p, A_p = self._policy_factors(modules[i])
            r_p = B_p.shape[1]
            self._B[i][:, :r_p].copy_(B_p)
            self._B[i][:, r_p:].zero_()
            self._A[i][:r_p].copy_(A_p)
            self._A[i][r_p:].zero_()
        rel_error = self._mix(mix_layers, alpha) if mix_layers else 0.0
        self._write_adapter()
        return rel_error

    def _mix(self, layers: list[int], alpha: float) -> float:
        modules = self._modules()
        groups = defaultdict(list)  # layers of one shape are factorised as one batch
        for i in layers:
            B_p, A_p = self._policy_factors(modules[i])
            groups[(tuple(B_p.shape), tuple(A_p.shape), self._B[i].shape[1], self._B[i].device)].append(i)
        dropped, total = [], []
        for ((d_out, r_p), (_, d_in), r_r, device), members in groups.items():
            dtype = torch.float32 if device.type == "mps" else torch.float64
            size = max(1, _CHUNK_ELEMENTS // ((d_out + d_in) * (r_p + r_r)))
            for start in range(0, len(members), size):
                chunk = members[start:start + size]
                B_p = torch.stack([self._policy_factors(modules[i])[0] for i in chunk]).to(dtype)
                A_p = torch.stack([self._policy_factors(modules[i])[1] for i in chunk]).to(dtype)
                B_r = torch.stack([self._B[i] for i in chunk]).to(dtype)
                A_r = torch.stack([self._A[i] for i in chunk]).to(dtype)
                B, A, chunk_dropped, chunk_total = mix_lora_factors(B_p, A_p, B_r, A_r, alpha, r_r)
                for j, i in enumerate(chunk):
                    self._B[i].copy_(B[j])
                    self._A[i].copy_(A[j])
                # ‖s·X‖² = s²·‖X‖²: the error is about Δ, which includes each layer's scaling.
                scale2 = torch.tensor([modules[i].scaling[REFERENCE_ADAPTER] ** 2 for i in chunk], dtype=dtype,
                                      device=device)
                dropped.append((scale2 * chunk_dropped).sum().double().cpu())
                total.append((scale2 * chunk_total).sum().double().cpu())
        dropped_sum, total_sum = float(sum(dropped)), float(sum(total))
        return math.sqrt(dropped_sum / total_sum) if total_sum > 0.0 else 0.0

    def _write_adapter(self) -> None:
        """Copies the fp32 master factors into the reference adapter (cast to its dtype)."""
        for module, B, A in zip(self._modules(), self._B, self._A):
            B_r, A_r = self._reference_factors(module)
            B_r.data.copy_(B)
            A_r.data.copy_(A)


def _check_supported(config) -> None:
    """Refuses LoRA setups the update does not model (their Δ is not s·B·A, or other trained weights exist)."""
    from peft import PeftType

    if config.peft_type != PeftType.LORA:
        raise ConfigError(f"model.lora: tr_dpo supports LoRA adapters only, the policy has {config.peft_type}")
    unsupported = [(key, getattr(config, key, None)) for key in
                   ("use_dora", "lora_bias", "modules_to_save", "trainable_token_indices", "target_parameters")]
    for key, value in unsupported:
        if value:
            raise ConfigError(f"model.lora: tr_dpo does not support a policy adapter with {key}={value!r} (the "
                              "reference would not be W₀ + s·B·A of the same layers)")
