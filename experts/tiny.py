"""Tiny random Mixture-of-Experts checkpoints for tests, demos and benchmarks.

``make_tiny`` writes a complete Hugging Face checkpoint directory (config,
generation config, safetensors weights, byte-level tokenizer) for one of the
supported MoE families, with random weights drawn from a fixed seed.

Invariants:
  * same arguments -> byte-identical files (weights are drawn on CPU in
    float32 from ``torch.manual_seed(seed)`` inside a forked RNG, so the
    caller's RNG state is neither used nor changed);
  * a ``dtype`` other than float32 is a cast of exactly those float32 weights;
  * weights are written by the model's own ``save_pretrained`` in the
    per-expert Hugging Face layout, loadable by
    ``AutoModelForCausalLM.from_pretrained(out_dir)``;
  * config token ids agree with the tokenizer: eos = pad = 256, no bos.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

from experts.tokenizer_build import (
    BYTE_VOCAB_SIZE,
    EOS_TOKEN_ID,
    PAD_TOKEN_ID,
    write_byte_tokenizer,
)

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

# Supported families; each name is also the transformers ``model_type``.
FAMILIES: tuple[str, ...] = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Keys naming the expert count; families disagree on which one is canonical.
_EXPERT_COUNT_KEYS = frozenset({"num_experts", "num_local_experts"})

# Shape shared by all tiny models. initializer_range 0.1 (5x the usual 0.02)
# makes random logits peaked enough that greedy decoding is not decided by
# float rounding differences between implementations.
_COMMON_DEFAULTS: dict[str, Any] = {
    "vocab_size": BYTE_VOCAB_SIZE,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 512,
    "initializer_range": 0.1,
    "tie_word_embeddings": False,
    "eos_token_id": EOS_TOKEN_ID,
    "pad_token_id": PAD_TOKEN_ID,
    "bos_token_id": None,
}

# Per-family keys; the expert-count key listed here is the family's canonical one.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": {
        "intermediate_size": 32,
        "num_local_experts": 8,
        "sliding_window": None,
    },
    "qwen2_moe": {
        "moe_intermediate_size": 32,
        "intermediate_size": 32,
        "num_experts": 8,
        "shared_expert_intermediate_size": 48,
        "norm_topk_prob": False,
    },
    "qwen3_moe": {
        "moe_intermediate_size": 32,
        "intermediate_size": 32,
        "num_experts": 8,
        "norm_topk_prob": True,
    },
    "olmoe": {
        "moe_intermediate_size": 32,
        "intermediate_size": 32,
        "num_experts": 8,
    },
}

# Real OLMoE-1B-7B vocabulary size, used by the benchmark preset.
OLMOE_VOCAB_SIZE = 50304


def olmoe_bench_config() -> dict[str, Any]:
    """Overrides for the benchmark model: ``make_tiny("olmoe", d, **olmoe_bench_config())``.

    About 261M parameters. The tokenizer is still the 259-token byte
    tokenizer; the larger vocab only makes the embedding and LM head
    realistically sized (ids >= 259 are never produced by the tokenizer).
    """
    return {
        "vocab_size": OLMOE_VOCAB_SIZE,
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "num_experts": 32,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 512,
        "intermediate_size": 512,
        "max_position_embeddings": 4096,
    }


def _expert_count_key(family: str) -> str:
    """The expert-count key that ``family``'s defaults use."""
    (key,) = _EXPERT_COUNT_KEYS & _FAMILY_DEFAULTS[family].keys()
    return key


def tiny_config_kwargs(family: str, **overrides: Any) -> dict[str, Any]:
    """Config kwargs for ``family``: tiny defaults replaced by ``overrides``.

    Either expert-count spelling (``num_experts`` / ``num_local_experts``) is
    accepted in ``overrides`` and mapped to the family's own key, so the
    resulting config never holds two conflicting expert counts.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown MoE family {family!r}; valid families: {', '.join(FAMILIES)}")
    given = _EXPERT_COUNT_KEYS & overrides.keys()
    if len(given) > 1:
        raise ValueError(f"give only one of {sorted(given)}; they name the same setting")
    kwargs = {**_COMMON_DEFAULTS, **_FAMILY_DEFAULTS[family]}
    for key, value in overrides.items():
        kwargs[_expert_count_key(family) if key in _EXPERT_COUNT_KEYS else key] = value
    return kwargs


def build_tiny_model(family: str, *, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """Build the random float32 model that ``make_tiny`` would save (nothing written)."""
    config = AutoConfig.for_model(family, **tiny_config_kwargs(family, **overrides))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def _state_dict_bytes(model: torch.nn.Module) -> int:
    """Total bytes of the model's tensors as they will be written."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' tqdm bars, restoring the previous setting after."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def make_tiny(
    family: str,
    out_dir: Path,
    *,
    seed: int = 0,
    dtype: str = "float32",
    shards: int = 1,
    progress: Progress | None = None,
    **overrides: Any,
) -> Path:
    """Write a tiny random ``family`` checkpoint into ``out_dir`` and return it.

    ``out_dir`` must be absent or empty. ``shards > 1`` splits the weights into
    at least ``shards`` ``*.safetensors`` files plus
    ``model.safetensors.index.json``; ``shards == 1`` writes a single
    ``model.safetensors``. ``overrides`` replace any config key.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown MoE family {family!r}; valid families: {', '.join(FAMILIES)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid dtypes: {', '.join(DTYPES)}")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty")

    report = progress or (lambda message: logger.info("%s", message))
    report(f"building tiny {family} model (seed {seed}, {dtype})")
    model = build_tiny_model(family, seed=seed, **overrides)
    if DTYPES[dtype] != torch.float32:
        model = model.to(DTYPES[dtype])
        model.config.dtype = DTYPES[dtype]

    # floor(total / shards) bytes per shard forces at least `shards` files.
    max_shard_size: int | str = "50GB"
    if shards > 1:
        max_shard_size = max(1, _state_dict_bytes(model) // shards)

    report(f"saving to {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with _quiet_progress_bars():
        model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    write_byte_tokenizer(out_dir)
    return out_dir
