"""The expert cache on CUDA: pinned host tier, moves on the copy stream, the CPU share beside the GPU.
Ray-free imports, so it runs on a GPU machine without Ray; skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from cluster.config import EngineConfig
from cluster.engine import LLMEngine
from cluster.sampling_params import SamplingParams
from experts.slow_tier import HostTier

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40, 41], [100, 3, 7, 200, 9]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def run(model, **config) -> tuple[list[tuple[int, ...]], LLMEngine]:
    engine = LLMEngine(EngineConfig(model=str(model), kv_cache_tokens=512, block_size=4, device="cuda",
                                    kernel_backend="torch", **config))
    return [o.token_ids for o in engine.generate(PROMPTS, GREEDY)], engine


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("schedule", ["auto", "load", "cpu"])
def test_gpu_fast_tier_over_pinned_host_memory_keeps_the_tokens(tiny_model, schedule):
    model = tiny_model("olmoe")
    want, _ = run(model)
    got, engine = run(model, expert_cache_fraction=0.25, expert_cache_schedule=schedule)
    assert got == want
    cache = engine.model.experts
    assert isinstance(cache.tier, HostTier) and cache.copy_stream is not None and cache.cost.overlap
    assert all(b.buffer.is_pinned() for b in cache.tier.banks.values())
    stats = cache.stats
    assert stats.loads + stats.cpu_computed == stats.misses > 0
    assert (stats.loads == 0) == (schedule == "cpu")
