"""Reference kind `soup`: SALSA weight-averaged reference (METHODS §3)."""

from __future__ import annotations

from dataclasses import dataclass, field


from align.errors import ConfigError
from align.references.base import Reference, register_reference
from align.references.frozen import FrozenReference


@register_reference("soup")
class SoupReference(FrozenReference):
    """SALSA (Chegini et al. 2024): the reference is the weight average Σ_k w_k θ_k of several SFT checkpoints
    (same architecture and tokenizer), built in memory in fp32. A LoRA SFT ingredient (an adapter folder) counts as
    its merged weights W0 + s·B·A (`align.soup`). The policy may start from the soup (write it first with
    `align soup`) or from one ingredient."""

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
        from align.soup import build_soup

        Reference.__init__(self, params, policy=policy, model_config=model_config)
        try:
            model, _ = build_soup(params.checkpoints, params.weights,
                                  attn_implementation=model_config.attn_implementation)
        except ConfigError as e:
            raise ConfigError(f"reference.checkpoints: {e}") from None
        self.model = model.to(model_config.torch_dtype()).eval().requires_grad_(False)
