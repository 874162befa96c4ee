"""`moe-serve plan`: the placement of a model on a cluster, as a table or JSON (torch-free)."""

from __future__ import annotations

import json
from pathlib import Path

from cluster.cluster_spec import DEFAULT_CLUSTER_FILE, load_cluster
from cluster.placement import ModelFootprint, PlannerConfig, fmt_bytes, plan
from experts.config import ModelSpec, load_spec

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def footprint_of(spec: ModelSpec, dtype: str = "float32") -> ModelFootprint:
    """The bytes the engine loads for `spec` in `dtype` (the tensors experts/loader.py reads)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    size = DTYPE_BYTES[dtype]
    return ModelFootprint(
        moe_layers=spec.moe_layers, num_experts=spec.num_experts, expert_bytes=spec.expert_numel * size,
        dense_bytes=dense_numel(spec) * size,
        kv_bytes_per_token=2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * size)


def dense_numel(spec: ModelSpec) -> int:
    """Elements of everything but the routed experts."""
    h = spec.hidden_size
    heads = spec.vocab_size * h * (1 if spec.tie_word_embeddings else 2)  # embedding (+ LM head)
    return heads + h + sum(_layer_numel(spec, sparse) for sparse in spec.sparse_layers)  # + final norm


def _layer_numel(spec: ModelSpec, sparse: bool) -> int:
    h, d = spec.hidden_size, spec.head_dim
    q_out, kv_out = spec.num_heads * d, spec.num_kv_heads * d
    n = (q_out + 2 * kv_out) * h + h * q_out + 2 * h  # qkv, o, input and post norms
    if spec.qkv_bias:
        n += q_out + 2 * kv_out
    if spec.qk_norm == "head":
        n += 2 * d
    elif spec.qk_norm == "full":
        n += q_out + kv_out
    if not sparse:
        return n + 3 * spec.dense_intermediate * h  # dense MLP
    n += spec.num_experts * h  # router
    if spec.shared_intermediate > 0:
        n += 3 * spec.shared_intermediate * h + h  # shared expert and its sigmoid gate
    return n


def run_plan(model_dir: str, cluster_file: str | None, as_json: bool, *, dtype: str = "float32",
             config: PlannerConfig | None = None) -> str:
    """The text `moe-serve plan` prints; `cluster_file` None means cluster/clusters/local.yaml."""
    spec = load_spec(Path(model_dir))
    cluster = load_cluster(cluster_file)
    footprint = footprint_of(spec, dtype)
    result = plan(footprint, cluster, config)
    if as_json:
        return json.dumps({"model": str(model_dir), "dtype": dtype, "cluster": cluster.source,
                           **result.to_dict()}, indent=2)
    header = (f"model: {model_dir} ({spec.family}, {dtype}): {len(footprint.moe_layers)} MoE layers x "
              f"{footprint.num_experts} experts of {fmt_bytes(footprint.expert_bytes)} = "
              f"{fmt_bytes(footprint.total_expert_bytes)}; dense {fmt_bytes(footprint.dense_bytes)}; "
              f"KV {fmt_bytes(footprint.kv_bytes_per_token)}/token\n"
              f"cluster: {cluster_file or DEFAULT_CLUSTER_FILE}")
    return f"{header}\n{result.describe()}"
