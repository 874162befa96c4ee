"""The engine's routing trace: every token of every request at every MoE layer, as transformers routes it."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from cluster.config import EngineConfig
from cluster.engine import LLMEngine
from cluster.sampling_params import SamplingParams
from router.stats import popularity, route_table
from router.traces import read_trace

PROMPTS = [[5, 6, 7, 8, 9], [40, 41, 42]]


def test_recorded_routes_are_the_models_routes(tiny_model, tmp_path):
    path, trace = tiny_model("olmoe"), tmp_path / "routes.jsonl"
    engine = LLMEngine(EngineConfig(model=str(path), kv_cache_tokens=256, block_size=4, record_trace=str(trace)))
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    engine.shutdown()
    records = read_trace(trace)
    spec = engine.spec
    ran = {o.request_id: p + list(o.token_ids[:-1]) for o, p in zip(outs, PROMPTS)}  # tokens the model saw
    assert len(records) == sum(len(t) for t in ran.values()) * len(spec.moe_layers)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for request, ids in ran.items():
        with torch.no_grad():
            router = hf(torch.tensor([ids]), output_router_logits=True).router_logits  # L x [T, E]
        mine = {(r.pos, r.layer): r for r in records if r.request == request}
        assert sorted(mine) == [(p, layer) for p in range(len(ids)) for layer in spec.moe_layers]
        for (pos, layer), r in mine.items():
            probs = torch.softmax(router[layer][pos].float(), dim=-1)
            top = torch.topk(probs, spec.top_k)
            assert set(r.experts) == set(top.indices.tolist())
            torch.testing.assert_close(torch.tensor(sorted(r.weights)), top.values.sort().values, atol=1e-5, rtol=0)
    counts = popularity(route_table(records))
    assert counts.sum() == len(records) * spec.top_k

