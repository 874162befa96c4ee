"""EngineConfig: everything the engine needs, validated once (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("float32", "bfloat16")
BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str
    dtype: str = "float32"
    device: str = "cpu"
    kernel_backend: str = "auto"
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    kv_cache_tokens: int = 16384  # KV-cache budget in tokens, over all sequences
    block_size: int = 16
    show_progress: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.kernel_backend not in BACKENDS:
            raise ValueError(f"kernel_backend must be one of {', '.join(BACKENDS)}, got {self.kernel_backend!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_tokens", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be > 0, got {self.max_model_len}")

    @property
    def num_blocks(self) -> int:
        return -(-self.kv_cache_tokens // self.block_size)
