"""The fused attention block of a lone sequence's few new tokens (KernelOps.attention_block, the C
kernel: a decode token, a draft chunk, a short prompt) gives the bits of the unfused path through the
same kernels, in every family's attention variant."""

from __future__ import annotations

import pytest

from cluster.attention_worker import AttentionWorker
from cluster.config import EngineConfig
from cluster.engine import LLMEngine
from cluster.sampling_params import SamplingParams
from kernels import cpu_native

pytestmark = pytest.mark.skipif(cpu_native.load() is None, reason="the C kernels cannot be built here")

VARIANTS = {  # family, overrides: q/k norm none (bias: qwen2_moe), per head, whole projection, clipped, windowed
    "mixtral": ("mixtral", {}),
    "qwen2_moe": ("qwen2_moe", {}),
    "qwen3_moe": ("qwen3_moe", {}),
    "olmoe": ("olmoe", {}),
    "olmoe-clip": ("olmoe", {"clip_qkv": 0.05}),
    "mixtral-window": ("mixtral", {"sliding_window": 8}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("drafts", [0, 3])  # drafts: chunks of several queries, the prompt repeating itself
def test_fused_block_is_the_bits_of_the_unfused_path(tiny_model, monkeypatch, variant, drafts):
    family, overrides = VARIANTS[variant]
    path = tiny_model(family, **overrides)
    prompt = [3, 17, 5, 9, 11] if not drafts else [3, 17, 5, 3, 17, 5, 3, 17]
    sizes = []
    fused_block = AttentionWorker._attention_block

    def counted(self, layer, lw, h, batch):
        sizes.append(h.shape[0])
        return fused_block(self, layer, lw, h, batch)

    monkeypatch.setattr(AttentionWorker, "_attention_block", counted)
    fused = _run(path, prompt, drafts)
    assert len(prompt) in sizes, "the fused block never ran on the prompt"
    if "sliding_window" not in overrides:
        assert 1 in sizes, "the fused block never ran on a decode token"
        assert not drafts or {2, 3, 4} & set(sizes), "the fused block never ran on a draft chunk"
    monkeypatch.setattr(AttentionWorker, "_one_sequence_chunk", lambda self, batch: False)
    assert _run(path, prompt, drafts) == fused
    if "sliding_window" in overrides:  # past the window the unfused path masks: the block must not run
        assert len(sizes) < 23 * 2  # 2 layers


def _run(path, prompt: list[int], drafts: int = 0):
    """24 greedy tokens with their logprobs and 3 alternatives each (floats compared exactly)."""
    engine = LLMEngine(EngineConfig(model=str(path), kv_cache_tokens=128, block_size=4,
                                    num_speculative_tokens=drafts))
    engine.add_request(prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=3))
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            final = out
    return final.logprobs
