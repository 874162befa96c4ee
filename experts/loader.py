"""Load a model's dense parts and any subset of its experts from a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from experts import huge_pages
from experts.checkpoint import Checkpoint
from experts.config import ModelSpec
from experts.expert_bank import ExpertBank
from experts.families import TABLES, expert_name, fused_name, layer_name

Progress = Callable[[int], None]


@dataclass(slots=True)
class MLPWeights:
    gate_up: torch.Tensor  # [2I, H]
    down: torch.Tensor  # [H, I]


@dataclass(slots=True)
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    post_norm: torch.Tensor  # [H]
    qkv: torch.Tensor  # [(nh + 2 nkv) * D, H]
    qkv_bias: torch.Tensor | None  # [(nh + 2 nkv) * D]
    o: torch.Tensor  # [H, nh * D]
    q_norm: torch.Tensor | None  # [D] (head) or [nh * D] (full)
    k_norm: torch.Tensor | None  # [D] (head) or [nkv * D] (full)
    router: torch.Tensor | None  # [E, H]; None on dense layers
    shared: MLPWeights | None  # Qwen2-MoE shared expert, or the dense MLP of a non-MoE layer
    shared_score: torch.Tensor | None  # [1, H] sigmoid gate of the shared expert


@dataclass(slots=True)
class DenseWeights:
    embed: torch.Tensor  # [V, H]
    final_norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H]
    layers: list[LayerWeights]


def load_dense(ckpt: Checkpoint, spec: ModelSpec, dtype: torch.dtype,
               device: torch.device | str = "cpu", progress: Progress | None = None) -> DenseWeights:
    """Everything but the routed experts: embeddings, attention, norms, routers, LM head."""
    table = TABLES[spec.family]
    v, h = spec.vocab_size, spec.hidden_size
    embed = ckpt.read(table.globals["embed"], (v, h), dtype, device)
    if spec.tie_word_embeddings and table.globals["lm_head"] not in ckpt:
        lm_head = embed = huge_pages.copy(embed)  # every decode step reads all of the LM head
    else:
        lm_head = huge_pages.copy(ckpt.read(table.globals["lm_head"], (v, h), dtype, device))
    layers = []
    for layer in range(spec.num_layers):
        layers.append(_load_layer(ckpt, spec, layer, dtype, device))
        if progress:
            progress(1)
    final_norm = ckpt.read(table.globals["final_norm"], (h,), dtype, device)
    return DenseWeights(embed, final_norm, lm_head, layers)


def _load_layer(ckpt: Checkpoint, spec: ModelSpec, layer: int, dtype: torch.dtype,
                device: torch.device | str) -> LayerWeights:
    table = TABLES[spec.family]
    h, d = spec.hidden_size, spec.head_dim
    q_out, kv_out = spec.num_heads * d, spec.num_kv_heads * d

    def read(part: str, shape: tuple[int, ...]) -> torch.Tensor:
        return ckpt.read(layer_name(table, part, layer), shape, dtype, device)

    qkv = huge_pages.copy(torch.cat([read("q", (q_out, h)), read("k", (kv_out, h)), read("v", (kv_out, h))]))
    bias = None
    if spec.qkv_bias:
        bias = torch.cat([read("q_bias", (q_out,)), read("k_bias", (kv_out,)), read("v_bias", (kv_out,))])
    q_norm = k_norm = None
    if spec.qk_norm != "none":
        full = spec.qk_norm == "full"
        q_norm = read("q_norm", (q_out if full else d,))
        k_norm = read("k_norm", (kv_out if full else d,))
    sparse = spec.sparse_layers[layer]
    shared, score = _load_shared(read, spec, sparse)
    return LayerWeights(
        input_norm=read("input_norm", (h,)), post_norm=read("post_norm", (h,)),
        qkv=qkv, qkv_bias=bias, o=huge_pages.copy(read("o", (h, q_out))),
        q_norm=q_norm, k_norm=k_norm,
        router=read("router", (spec.num_experts, h)) if sparse else None,
        shared=shared, shared_score=score)


def _load_shared(read, spec: ModelSpec, sparse: bool) -> tuple[MLPWeights | None, torch.Tensor | None]:
    h = spec.hidden_size
    if not sparse:
        i = spec.dense_intermediate
        return _mlp(read, "dense", i, h), None
    if spec.shared_intermediate <= 0:
        return None, None
    mlp = _mlp(read, "shared", spec.shared_intermediate, h)
    return mlp, read("shared_score", (1, h))


def _mlp(read, prefix: str, i: int, h: int) -> MLPWeights:
    gate_up = torch.cat([read(f"{prefix}_gate", (i, h)), read(f"{prefix}_up", (i, h))])  # [2I, H]
    return MLPWeights(gate_up=huge_pages.copy(gate_up), down=huge_pages.copy(read(f"{prefix}_down", (h, i))))


def load_experts(ckpt: Checkpoint, spec: ModelSpec, layer: int, expert_ids: Iterable[int],
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> ExpertBank:
    """An ExpertBank with only `expert_ids` of `layer`, reading only their tensors."""
    ids = tuple(expert_ids)
    bad = [e for e in ids if not 0 <= e < spec.num_experts]
    if bad:
        raise ValueError(f"layer {layer}: expert ids {bad} out of range [0, {spec.num_experts})")
    h, i = spec.hidden_size, spec.expert_intermediate
    bank = ExpertBank.empty(layer, ids, spec.num_experts, h, i, dtype, device)
    for row, expert in enumerate(ids):
        bank.set_expert(row, *expert_views(ckpt, spec, layer, expert))  # one copy each, converting the dtype
    return bank


def expert_views(ckpt: Checkpoint, spec: ModelSpec, layer: int,
                 expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate [I, H], up [I, H], down [H, I] of one expert in the checkpoint's dtype, over the
    memory-mapped file without a copy (Checkpoint.view): to be read, or copied where they are kept."""
    table = TABLES[spec.family]
    h, i = spec.hidden_size, spec.expert_intermediate
    if expert_name(table, "gate", layer, expert) not in ckpt and fused_name(table, "gate_up", layer) in ckpt:
        gate_up = ckpt.view_row(fused_name(table, "gate_up", layer), expert, (2 * i, h))
        down = ckpt.view_row(fused_name(table, "down", layer), expert, (h, i))
        return gate_up[:i], gate_up[i:], down
    return tuple(ckpt.view(expert_name(table, p, layer, expert), shape)
                 for p, shape in (("gate", (i, h)), ("up", (i, h)), ("down", (h, i))))
