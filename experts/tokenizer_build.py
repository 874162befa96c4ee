"""Byte-level BPE tokenizers for tiny test checkpoints and the demo model.

``build_byte_tokenizer`` needs no training data: it is a BPE model without
merges whose vocabulary is exactly the 256 byte-level symbols, so every UTF-8
byte of the input becomes one token and decoding reverses it exactly.
``train_byte_bpe`` learns merges on top of the same byte alphabet from a text
corpus (the demo model's tokenizer).

Invariants:
  * byte tokenizer: id ``b`` (0 <= b < 256) is the token for the raw byte
    value ``b``; the special tokens follow the bytes: ``<|endoftext|>`` = 256
    (eos and pad), ``<|im_start|>`` = 257, ``<|im_end|>`` = 258;
  * trained tokenizer: the special tokens take ids 0, 1, 2 in that order,
    every byte has a token, and decode(encode(text)) == text for any text;
  * the output files depend only on the inputs, never on time or randomness.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
# Order fixes the ids: the i-th special token gets id NUM_BYTES + i.
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN)

NUM_BYTES = 256
EOS_TOKEN_ID = NUM_BYTES + SPECIAL_TOKENS.index(EOS_TOKEN)
PAD_TOKEN_ID = EOS_TOKEN_ID
IM_START_TOKEN_ID = NUM_BYTES + SPECIAL_TOKENS.index(IM_START_TOKEN)
IM_END_TOKEN_ID = NUM_BYTES + SPECIAL_TOKENS.index(IM_END_TOKEN)
BYTE_VOCAB_SIZE = NUM_BYTES + len(SPECIAL_TOKENS)

MODEL_MAX_LENGTH = 2048

# ChatML: each message is "<|im_start|>{role}\n{content}<|im_end|>\n"; the
# generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def byte_to_unicode() -> dict[int, str]:
    """Map every byte value to a printable unicode character (GPT-2 scheme).

    Printable Latin-1 bytes map to themselves; the remaining bytes map, in
    increasing byte order, to code points 256, 257, ...  This is the same
    alphabet the ``ByteLevel`` pre-tokenizer emits, so the BPE vocab built
    from it covers every pre-tokenized symbol.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    next_code_point = NUM_BYTES
    for b in range(NUM_BYTES):
        if b not in mapping:
            mapping[b] = chr(next_code_point)
            next_code_point += 1
    return mapping


def build_byte_tokenizer() -> Tokenizer:
    """Return the in-memory byte-level tokenizer (no files written)."""
    symbols = byte_to_unicode()
    vocab = {symbols[b]: b for b in range(NUM_BYTES)}
    assert set(vocab) == set(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # Special tokens are not in the BPE vocab, so they are appended at 256+.
    tokenizer.add_special_tokens(
        [AddedToken(tok, special=True, normalized=False) for tok in SPECIAL_TOKENS]
    )
    assert tokenizer.get_vocab_size(with_added_tokens=True) == BYTE_VOCAB_SIZE
    for i, tok in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(tok) == NUM_BYTES + i
    return tokenizer


def tokenizer_config() -> dict[str, object]:
    """The ``tokenizer_config.json`` contents matching ``build_byte_tokenizer``."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "model_max_length": MODEL_MAX_LENGTH,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "additional_special_tokens": [IM_START_TOKEN, IM_END_TOKEN],
        "chat_template": CHAT_TEMPLATE,
    }


def train_byte_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Learn a byte-level BPE with ``vocab_size`` tokens (specials and bytes included) on ``texts``.

    Pre-tokenization is GPT-2's (words, runs of spaces, punctuation kept
    apart), so indentation runs become tokens of their own.
    """
    min_size = NUM_BYTES + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be >= {min_size} (bytes + special tokens), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(tok, special=True, normalized=False) for tok in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    for i, tok in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(tok) == i
    return tokenizer


def write_tokenizer(tokenizer: Tokenizer, out_dir: Path) -> int:
    """Write ``tokenizer`` as ``tokenizer.json`` plus ``tokenizer_config.json`` into ``out_dir``.

    ``tokenizer`` must hold the special tokens; creates ``out_dir`` if needed
    and returns the vocab size (added tokens included).
    """
    missing = [tok for tok in SPECIAL_TOKENS if tokenizer.token_to_id(tok) is None]
    if missing:
        raise ValueError(f"tokenizer lacks the special tokens {missing}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    with open(out_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(), f, indent=2, ensure_ascii=False)
        f.write("\n")
    return tokenizer.get_vocab_size(with_added_tokens=True)


def write_byte_tokenizer(out_dir: Path) -> int:
    """Write the byte tokenizer's files into ``out_dir``; returns the vocab size (259)."""
    return write_tokenizer(build_byte_tokenizer(), out_dir)
