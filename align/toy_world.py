"""The toy world: a tiny synthetic language with a known gold reward.

Everything here is built locally (no downloads) and is importable by the quickstart, the tests and every toy
recipe, so that an alignment run can be checked end to end on a laptop:

- a small grammar of prompts ("describe the movie .") and responses ("the movie was really great and it was
  dull .");
- a **gold reward**: the number of positive minus negative adjectives, minus a steep length cost past
  `FREE_LENGTH` words. Its maximum over all strings is known: `FREE_LENGTH`, reached by a response of exactly
  `FREE_LENGTH` positive adjectives; inside the grammar the best responses pack as many positive clauses as fit
  in `FREE_LENGTH` words;
- a word-level tokenizer (one token per whitespace-separated word, with BOS/EOS/PAD/UNK and a chat template);
- a tiny Llama-architecture model builder.

The tokenizer and model are saved with `save_pretrained` and loaded back with `Auto*.from_pretrained`, the
same code path a user's Hub model takes.
"""

from __future__ import annotations

import random
from pathlib import Path

POSITIVE = ("great", "lovely", "wonderful", "excellent", "fun", "brilliant", "charming", "superb")
NEGATIVE = ("awful", "boring", "terrible", "dull", "bad", "poor", "bland", "messy")
NEUTRAL = ("long", "short", "new", "old", "loud", "quiet", "busy", "simple")
TOPICS = ("movie", "book", "meal", "trip", "game", "song", "city", "class", "hotel", "concert", "show", "park")
ASPECTS = ("story", "food", "music", "service", "ending", "price", "staff", "view")
INTENSIFIERS = ("really", "very", "quite")
PROMPT_TEMPLATES = (
    "tell me about the {topic} .",
    "what did you think of the {topic} ?",
    "describe the {topic} .",
    "review the {topic} .",
)

#: Words a response may use without paying the length cost.
FREE_LENGTH = 16
#: Gold-reward cost of each word past `FREE_LENGTH`. It is > 1 so that no extra positive word pays for itself,
#: which makes `FREE_LENGTH` positive adjectives the unique optimum length.
LENGTH_COST = 1.5
#: The maximum of `gold_reward` over all strings.
GOLD_OPTIMUM = float(FREE_LENGTH)

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
ROLE_TOKENS = ("<system>", "<user>", "<assistant>")
_FUNCTION_WORDS = ("the", "was", "it", "and", ".", "?", "tell", "me", "about", "what", "did", "you", "think", "of",
                   "describe", "review")
CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}> {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)

_POSITIVE, _NEGATIVE = frozenset(POSITIVE), frozenset(NEGATIVE)


def vocabulary() -> list[str]:
    """All tokens of the toy world, specials first (so `<pad>` is id 0)."""
    words = [*SPECIAL_TOKENS, *ROLE_TOKENS, *_FUNCTION_WORDS, *TOPICS, *ASPECTS, *INTENSIFIERS,
             *POSITIVE, *NEGATIVE, *NEUTRAL]
    assert len(words) == len(set(words)), "toy vocabulary has duplicates"
    return words


def gold_reward(response: str) -> float:
    """Gold reward of one response text: #positive − #negative adjectives − LENGTH_COST·max(0, #words − FREE_LENGTH).

    Special tokens (`<eos>` etc.) are not words and are ignored.
    """
    words = [w for w in response.split() if not (w.startswith("<") and w.endswith(">"))]
    sentiment = sum(w in _POSITIVE for w in words) - sum(w in _NEGATIVE for w in words)
    return float(sentiment - LENGTH_COST * max(0, len(words) - FREE_LENGTH))


def gold_rewards(responses: list[str]) -> list[float]:
    return [gold_reward(r) for r in responses]


def gold_reward_function():
    """The gold reward as an `align.rewards.RewardFunction` (named `toy_world`; prompts are not needed)."""
    from align.rewards import CallableReward

    return CallableReward(lambda prompts, completions: gold_rewards(completions), name="toy_world")


def num_words(response: str) -> int:
    return sum(1 for w in response.split() if not (w.startswith("<") and w.endswith(">")))


def sample_prompt(rng: random.Random) -> tuple[str, str]:
    """Returns (prompt text, its topic)."""
    topic = rng.choice(TOPICS)
    return rng.choice(PROMPT_TEMPLATES).format(topic=topic), topic


def sample_response(rng: random.Random, topic: str, p_positive: float = 0.35, p_negative: float = 0.35) -> str:
    """One grammatical response about `topic`: 1–3 clauses joined by "and", ending with ".".

    Each clause's adjective is positive / negative / neutral with the given probabilities, so the SFT
    distribution has zero mean sentiment by default and alignment has room to move it.
    """
    clauses = []
    for _ in range(rng.choices((1, 2, 3), weights=(0.3, 0.4, 0.3))[0]):
        subject = rng.choice((f"the {topic}", f"the {rng.choice(ASPECTS)}", "it"))
        u = rng.random()
        adjectives = POSITIVE if u < p_positive else NEGATIVE if u < p_positive + p_negative else NEUTRAL
        intensifier = f"{rng.choice(INTENSIFIERS)} " if rng.random() < 0.3 else ""
        clauses.append(f"{subject} was {intensifier}{rng.choice(adjectives)}")
    return " and ".join(clauses) + " ."


def make_sft_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` prompt/completion rows (TRL's standard prompt-completion format) from the grammar.

    Completions start with a space, TRL's convention: trainers that tokenize `prompt + completion` as one string
    (TRL's SFTTrainer) then see the same word boundaries as trainers that tokenize the two apart.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, topic = sample_prompt(rng)
        rows.append({"prompt": prompt, "completion": " " + sample_response(rng, topic)})
    return rows


def make_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [sample_prompt(rng)[0] for _ in range(n)]


def make_preference_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` prompt/chosen/rejected rows: two grammar samples per prompt, ordered by gold reward (ties re-drawn).

    Completions start with a space (see `make_sft_rows`)."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        prompt, topic = sample_prompt(rng)
        a, b = sample_response(rng, topic), sample_response(rng, topic)
        ra, rb = gold_reward(a), gold_reward(b)
        if ra == rb:
            continue
        chosen, rejected = (a, b) if ra > rb else (b, a)
        rows.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected})
    return rows


def build_tokenizer():
    """A word-level `PreTrainedTokenizerFast`: one token per whitespace-separated word, unknown words → `<unk>`.

    `add_special_tokens=True` prepends `<bos>`; the chat template renders `<role> content` turns.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=list(ROLE_TOKENS),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(tokenizer, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2,
                     num_kv_heads: int = 1, intermediate_size: int | None = None, max_positions: int = 256,
                     seed: int = 0):
    """A randomly initialised `LlamaForCausalLM` sized for CPU tests (≈0.1M parameters by default).

    The default head_dim is 32 (64 / 2 heads; one key/value head): the smallest that vLLM's CPU attention has a
    kernel for (16 has none), so the same toy model runs under both rollout backends.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def save_base_model(output_dir: str | Path, *, seed: int = 0, **model_kwargs) -> Path:
    """Builds the toy tokenizer and an untrained tiny model and saves both with `save_pretrained`."""
    output_dir = Path(output_dir)
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed, **model_kwargs)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


# --- reward models ----------------------------------------------------------------------------------------------

#: Sizes of the data `save_reward_model_world` writes (`configs/rm/toy-ensemble.yaml` trains on them).
RM_TRAIN_PAIRS, RM_EVAL_PAIRS = 2000, 500


def make_reward_model_splits(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Gold-labelled preference pairs for training proxy reward models and for measuring them against the gold
    reward: `(train rows, held-out rows)`.

    Train rows are `make_preference_rows(n_train, seed)`; held-out rows come from another stream
    (`make_preference_rows` with seed `seed + 1`), leaving out any pair of responses to a prompt that also occurs in
    the training rows (in either order), so held-out accuracy is measured on pairs no proxy saw. Both are labelled
    by the gold reward, chosen above rejected, with no noise (label noise is injected by `align rm train`).
    """
    train = make_preference_rows(n_train, seed=seed)
    seen = {(r["prompt"], frozenset((r["chosen"], r["rejected"]))) for r in train}
    held_out: list[dict] = []
    extra = 0
    while len(held_out) < n_eval:
        # Draw a larger stream (a prefix of a longer draw is the shorter draw) until enough pairs are unseen.
        candidates = make_preference_rows(n_eval + extra, seed=seed + 1)
        held_out = [r for r in candidates if (r["prompt"], frozenset((r["chosen"], r["rejected"]))) not in seen]
        extra += max(16, n_eval - len(held_out))
    return train, held_out[:n_eval]


def save_reward_model_world(output_dir: str | Path, *, n_train: int = RM_TRAIN_PAIRS, n_eval: int = RM_EVAL_PAIRS,
                            seed: int = 0) -> Path:
    """Writes what `configs/rm/toy-ensemble.yaml` trains on, atomically (`align rm toy-data --out DIR`):

        base/         the toy tokenizer and an untrained tiny Llama (`save_base_model`): the proxies' backbone
        train.jsonl   `n_train` gold-labelled prompt/chosen/rejected pairs
        eval.jsonl    `n_eval` held-out gold-labelled pairs (`make_reward_model_splits`)
    """
    import json

    from align.io import atomic_directory

    train, held_out = make_reward_model_splits(n_train, n_eval, seed=seed)
    output_dir = Path(output_dir)
    with atomic_directory(output_dir) as tmp:
        save_base_model(tmp / "base", seed=seed)
        for name, rows in (("train.jsonl", train), ("eval.jsonl", held_out)):
            (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return output_dir
