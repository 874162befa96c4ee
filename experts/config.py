"""ModelSpec: one family-normalised view of a HuggingFace MoE `config.json` (torch-free)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from experts.errors import CheckpointError

SUPPORTED_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Architecture of one MoE model; every field is family-independent."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    expert_intermediate: int
    norm_topk_prob: bool
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    qkv_bias: bool = False
    qk_norm: str = "none"  # "none" | "head" (Qwen3: per head) | "full" (OLMoE: whole projection)
    clip_qkv: float | None = None
    shared_intermediate: int = 0  # Qwen2-MoE shared expert; 0 = none
    dense_intermediate: int = 0  # dense MLP size for non-MoE layers
    sparse_layers: tuple[bool, ...] = field(default=())  # per layer: MoE (True) or dense MLP
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.family not in SUPPORTED_FAMILIES:
            raise CheckpointError(f"unsupported model family {self.family!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "num_experts", "top_k", "expert_intermediate"):
            if getattr(self, name) <= 0:
                raise CheckpointError(f"config: {name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError("config: num_attention_heads must be a multiple of num_key_value_heads")
        if self.top_k > self.num_experts:
            raise CheckpointError(f"config: num_experts_per_tok {self.top_k} > num_experts {self.num_experts}")
        if len(self.sparse_layers) != self.num_layers:
            raise CheckpointError("config: sparse_layers must list every layer")

    @property
    def expert_numel(self) -> int:
        """Elements of one expert's contiguous buffer: gate+up [2I, H] then down [H, I]."""
        return 3 * self.expert_intermediate * self.hidden_size

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i, s in enumerate(self.sparse_layers) if s)


def load_spec(model_dir: Path) -> ModelSpec:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: missing config.json (not a HuggingFace model directory)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt JSON ({exc})") from exc
    return spec_from_dict(raw)


def spec_from_dict(raw: dict) -> ModelSpec:
    family = raw.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise CheckpointError(
            f"unknown model_type {family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
    try:
        return ModelSpec(**_common(raw), **_family_fields(family, raw))
    except KeyError as exc:
        raise CheckpointError(f"config.json ({family}): missing key {exc.args[0]!r}") from exc


def _common(raw: dict) -> dict:
    heads = raw["num_attention_heads"]
    head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
    return dict(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
        num_layers=raw["num_hidden_layers"], num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads, head_dim=head_dim,
        top_k=raw["num_experts_per_tok"], rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(raw), max_position_embeddings=raw["max_position_embeddings"],
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        eos_token_ids=_ids(raw.get("eos_token_id")),
    )


def _rope_theta(raw: dict) -> float:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise CheckpointError(f"config: rope_type {kind!r} is not supported (only 'default')")
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def _family_fields(family: str, raw: dict) -> dict:
    layers = raw["num_hidden_layers"]
    if family == "mixtral":
        return dict(family=family, num_experts=raw["num_local_experts"],
                    expert_intermediate=raw["intermediate_size"], norm_topk_prob=True,
                    sliding_window=raw.get("sliding_window"), sparse_layers=(True,) * layers)
    fields = dict(family=family, num_experts=_num_experts(raw),
                  expert_intermediate=raw["moe_intermediate_size"],
                  norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
                  dense_intermediate=raw.get("intermediate_size", 0),
                  sparse_layers=_sparse_layers(raw, layers))
    if family == "qwen2_moe":
        fields.update(qkv_bias=bool(raw.get("qkv_bias", True)),
                      shared_intermediate=raw.get("shared_expert_intermediate_size", 0),
                      sliding_window=_qwen_window(raw))
    elif family == "qwen3_moe":
        fields.update(qk_norm="head", qkv_bias=bool(raw.get("attention_bias", False)),
                      sliding_window=_qwen_window(raw))
    else:
        fields.update(qk_norm="full", qkv_bias=bool(raw.get("attention_bias", False)),
                      clip_qkv=raw.get("clip_qkv"), sparse_layers=(True,) * layers)
    return fields


def _num_experts(raw: dict) -> int:
    """Qwen/OLMoE configs name it num_experts; transformers 5 writes num_local_experts for some."""
    return raw["num_experts"] if "num_experts" in raw else raw["num_local_experts"]


def _sparse_layers(raw: dict, layers: int) -> tuple[bool, ...]:
    step = raw.get("decoder_sparse_step", 1) or 1
    dense = set(raw.get("mlp_only_layers") or [])
    return tuple(i not in dense and (i + 1) % step == 0 for i in range(layers))


def _qwen_window(raw: dict) -> None:
    if raw.get("use_sliding_window", False):
        raise CheckpointError("config: use_sliding_window=true is not supported for Qwen MoE models")
    return None
