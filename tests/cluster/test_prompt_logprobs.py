"""Prompt logprobs (scoring a text): every prompt token after the first, against transformers'
log-softmax over the prompt, through chunked prefill, preemption and prefix caching."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from cluster.config import EngineConfig
from cluster.engine import LLMEngine
from cluster.sampling_params import SamplingParams

PROMPT = [(i * 29) % 200 + 3 for i in range(40)]


def _reference(path, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, V] transformers' log-probabilities of each position's next token."""
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([prompt])).logits[0, :-1].float(), dim=-1)


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_prompt_logprobs_match_transformers_through_chunked_prefill(tiny_model, family):
    path = tiny_model(family)
    engine = LLMEngine(EngineConfig(model=str(path), max_num_batched_tokens=9, block_size=4, kv_cache_tokens=256))
    out = engine.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3))[0]
    ref = _reference(path, PROMPT)
    want = ref.gather(1, torch.tensor(PROMPT[1:])[:, None]).squeeze(1)
    assert [lp.token_id for lp in out.prompt_logprobs] == PROMPT[1:]  # 39 scores over 5 chunks of 9 tokens
    assert torch.tensor([lp.logprob for lp in out.prompt_logprobs]) == pytest.approx(want, abs=1e-4)
    best = torch.topk(ref, 3, dim=-1)
    assert [[t for t, _ in lp.top] for lp in out.prompt_logprobs] == best.indices.tolist()
    plain = engine.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0.0))[0]
    assert out.token_ids == plain.token_ids and plain.prompt_logprobs is None


def test_scores_are_neither_lost_nor_repeated_by_preemption_or_prefix_caching(tiny_model):
    path = tiny_model("olmoe")
    ample = LLMEngine(EngineConfig(model=str(path), kv_cache_tokens=1024, block_size=8))
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    prompts = [PROMPT[:12] + [i] for i in range(4)]
    want = ample.generate(prompts, params)
    tight = LLMEngine(EngineConfig(model=str(path), kv_cache_tokens=64, block_size=8, enable_prefix_caching=True))
    tight.generate([PROMPT[:12] + [9]], SamplingParams(max_tokens=1, temperature=0.0))  # a cached prefix
    got = tight.generate(prompts, params)
    assert tight.scheduler.num_preemptions > 0
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids and len(g.prompt_logprobs) == 12
        assert [lp.logprob for lp in g.prompt_logprobs] == pytest.approx([lp.logprob for lp in w.prompt_logprobs],
                                                                         abs=1e-5)
        assert all(lp.top == () for lp in g.prompt_logprobs)  # 0 alternatives asked for


def test_prompt_logprobs_are_refused_where_they_cannot_be_given():
    with pytest.raises(ValueError, match=r"prompt_logprobs must be an integer in \[0, 20\]"):
        SamplingParams(prompt_logprobs=21)
