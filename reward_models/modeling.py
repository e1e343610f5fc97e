"""The model pieces every ensemble kind is built from: a transformers sequence-classification model, its linear
`score` head, the seeded head initialisation, and the reward read at each row's last token of a right-padded batch.

Rewards. A row is `prompt + response` as tokens (`align.data.tokenize_pairs`), right-padded by `pad_right`; the
reward is the head applied to the hidden state of each row's last attended token (the response's EOS), found from
`attention_mask` rather than from `pad_token_id`: transformers' own pooling looks for the last token that is not the
pad id, which reads the wrong position for tokenizers whose pad token is their EOS (common: the pad falls back to EOS
when a tokenizer has none). `model.config.pad_token_id` is still set from the tokenizer (`set_pad`), so the plain
`model(**inputs)` works too.

Head initialisation. Row k of a head = N(0, initializer_range²) drawn from a `torch.Generator` seeded with
`seeds[k]` (the distribution transformers itself uses for a fresh head), so a seed gives the same head in every
kind and on every device, and K distinct seeds give K distinct heads (METHODS §8 test 4).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from align.errors import ConfigError


def pad_right(sequences: Sequence[Sequence[int]], pad_token_id: int, device=None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads N id lists → `input_ids[N, T]` (long) and `attention_mask[N, T]` (long, 1 on tokens), T = the
    longest row."""
    if not sequences:
        raise ValueError("pad_right: no sequences")
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    return input_ids.to(device), attention_mask.to(device)


def last_token_hidden(backbone: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
                      ) -> torch.Tensor:
    """One backbone forward → the hidden state of each row's last attended token, `[N, H]` (model dtype).

    `input_ids`, `attention_mask`: `[N, T]`, right-padded (position ids are the backbone's default 0..T−1, right
    for right padding). The last attended position is found from the mask, so the pad id may equal EOS.
    """
    outputs = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]  # [N, T, H]
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (positions * attention_mask.to(positions.dtype)).argmax(dim=-1)  # [N]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def score_head(model, where: str) -> torch.nn.Module:
    """The linear reward head of a transformers seq-cls model (`score`: Llama, Qwen2, Mistral, Gemma, GPT-NeoX...),
    weight `[num_labels, H]`; a model without one is a ConfigError naming `where`."""
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise ConfigError(f"{where}: {type(model).__name__} has no linear `score` head; reward ensembles support "
                          "decoder models whose sequence-classification class scores the last token (Llama, Qwen2, "
                          "Mistral, Gemma, GPT-NeoX, ...)")
    return head


def init_head_rows(head: torch.nn.Linear, seeds: Sequence[int], std: float) -> None:
    """Row k of the head's weight `[len(seeds), H]` ← N(0, std²) from a generator seeded with `seeds[k]`; bias ← 0.

    Drawn in fp32 on the CPU and copied (so a seed gives the same head on any device and in any kind)."""
    weight = head.weight
    if weight.shape[0] != len(seeds):
        raise ValueError(f"head has {weight.shape[0]} rows for {len(seeds)} seeds")
    with torch.no_grad():
        for row, seed in enumerate(seeds):
            generator = torch.Generator().manual_seed(int(seed))
            weight[row].copy_(torch.randn(weight.shape[1], generator=generator) * std)
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()


def initializer_range(model) -> float:
    """The std transformers initialises a fresh head with (the text config's `initializer_range`, default 0.02)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return float(getattr(config, "initializer_range", 0.02))


def load_seq_cls(path, *, num_labels: int | None, dtype: torch.dtype, attn_implementation: str,
                 revision: str | None = None, trust_remote_code: bool = False, where: str,
                 local_files_only: bool = False):
    """`AutoModelForSequenceClassification.from_pretrained(path)` with `num_labels` heads (None: the saved number);
    a failure is one ConfigError line naming `where`. The KV cache is off: training and scoring never reuse one."""
    from transformers import AutoModelForSequenceClassification

    kwargs = {} if num_labels is None else {"num_labels": num_labels}
    if local_files_only:
        kwargs["local_files_only"] = True
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), dtype=dtype, attn_implementation=attn_implementation, revision=revision,
            trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{where}: cannot load '{path}' as a sequence-classification model "
                          f"({one_line(e)})") from e
    model.config.use_cache = False
    return model


def set_pad(model, tokenizer) -> None:
    """`model.config.pad_token_id` ← the tokenizer's: transformers' own seq-cls pooling finds the last token from it,
    and without one it refuses batches of more than one row."""
    model.config.pad_token_id = tokenizer.pad_token_id


def one_line(error: Exception) -> str:
    """The first line of an exception's message (its type when the message is empty), for one-line errors."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
