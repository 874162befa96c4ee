"""Per-family tensor-name tables (torch-free).

Each family maps checkpoint tensor names to model parts:
- globals: part -> name (embeddings, final norm, LM head);
- layer parts: part -> name template with `{l}` (attention, norms, router, shared/dense MLPs);
- experts: "gate" | "up" | "down" -> template with `{l}` and `{e}` (per-expert HF layout);
- fused experts: "gate_up" [E, 2I, H] and "down" [E, H, I] templates with `{l}` (3-D layout).
"""

from __future__ import annotations

from dataclasses import dataclass

_P = "model.layers.{l}."


@dataclass(frozen=True, slots=True)
class FamilyTable:
    globals: dict[str, str]
    layer: dict[str, str]
    experts: dict[str, str]
    fused_experts: dict[str, str]


_GLOBALS = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}
_ATTN = {
    "input_norm": _P + "input_layernorm.weight",
    "post_norm": _P + "post_attention_layernorm.weight",
    "q": _P + "self_attn.q_proj.weight",
    "k": _P + "self_attn.k_proj.weight",
    "v": _P + "self_attn.v_proj.weight",
    "o": _P + "self_attn.o_proj.weight",
    "q_bias": _P + "self_attn.q_proj.bias",
    "k_bias": _P + "self_attn.k_proj.bias",
    "v_bias": _P + "self_attn.v_proj.bias",
    "q_norm": _P + "self_attn.q_norm.weight",
    "k_norm": _P + "self_attn.k_norm.weight",
}
_MLP = {  # dense MLP of non-MoE layers and the Qwen2-MoE shared expert
    "dense_gate": _P + "mlp.gate_proj.weight",
    "dense_up": _P + "mlp.up_proj.weight",
    "dense_down": _P + "mlp.down_proj.weight",
    "shared_gate": _P + "mlp.shared_expert.gate_proj.weight",
    "shared_up": _P + "mlp.shared_expert.up_proj.weight",
    "shared_down": _P + "mlp.shared_expert.down_proj.weight",
    "shared_score": _P + "mlp.shared_expert_gate.weight",
}
_FUSED = {
    "gate_up": _P + "mlp.experts.gate_up_proj",
    "down": _P + "mlp.experts.down_proj",
}
_QWEN_EXPERTS = {
    "gate": _P + "mlp.experts.{e}.gate_proj.weight",
    "up": _P + "mlp.experts.{e}.up_proj.weight",
    "down": _P + "mlp.experts.{e}.down_proj.weight",
}

MIXTRAL = FamilyTable(
    globals=_GLOBALS,
    layer={**_ATTN, "router": _P + "block_sparse_moe.gate.weight"},
    experts={
        "gate": _P + "block_sparse_moe.experts.{e}.w1.weight",
        "up": _P + "block_sparse_moe.experts.{e}.w3.weight",
        "down": _P + "block_sparse_moe.experts.{e}.w2.weight",
    },
    fused_experts=_FUSED,
)
QWEN_MOE = FamilyTable(  # Qwen2-MoE, Qwen3-MoE and OLMoE share the `mlp.` naming
    globals=_GLOBALS,
    layer={**_ATTN, **_MLP, "router": _P + "mlp.gate.weight"},
    experts=_QWEN_EXPERTS,
    fused_experts=_FUSED,
)
TABLES = {"mixtral": MIXTRAL, "qwen2_moe": QWEN_MOE, "qwen3_moe": QWEN_MOE, "olmoe": QWEN_MOE}


def layer_name(table: FamilyTable, part: str, layer: int) -> str:
    return table.layer[part].format(l=layer)


def expert_name(table: FamilyTable, proj: str, layer: int, expert: int) -> str:
    return table.experts[proj].format(l=layer, e=expert)


def fused_name(table: FamilyTable, proj: str, layer: int) -> str:
    return table.fused_experts[proj].format(l=layer)
