"""Our engine against HuggingFace transformers on tiny random models of every family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from cluster.batch import build_batch
from cluster.config import EngineConfig
from cluster.engine import LLMEngine
from cluster.sampling_params import SamplingParams
from cluster.scheduler import ScheduledChunk, SchedulerOutput
from experts.tiny import FAMILIES

PROMPT = list(range(3, 40, 2))  # 19 tokens
BF16_TOL = 2e-2  # bfloat16 keeps 8 mantissa bits; measured <= 0.5% on the tiny models


def hf_model(path, dtype):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    return model


def engine_prompt_logits(engine: LLMEngine, ids: list[int]) -> torch.Tensor:
    """Logits of the last prompt token, from one prefill chunk."""
    bs = engine.config.block_size
    chunk = ScheduledChunk(0, tuple(ids), 0, tuple(range(-(-len(ids) // bs))), True)
    batch = build_batch(SchedulerOutput((chunk,)), bs, engine.spec.sliding_window, engine.device)
    return engine.model.forward(batch)[0]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_last_token_logits_match_transformers(tiny_model, family, dtype):
    path = tiny_model(family, dtype)
    torch_dtype = getattr(torch, dtype)
    engine = LLMEngine(EngineConfig(model=str(path), dtype=dtype, kv_cache_tokens=256))
    ours = engine_prompt_logits(engine, PROMPT)
    with torch.no_grad():
        ref = hf_model(path, torch_dtype)(torch.tensor([PROMPT])).logits[0, -1].float()
    rel = (ours - ref).abs().max() / ref.abs().max()
    assert rel <= (1e-4 if dtype == "float32" else BF16_TOL), f"{family} {dtype}: rel err {rel:.2e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_continuation_matches_transformers(tiny_model, family):
    path = tiny_model(family)
    engine = LLMEngine(EngineConfig(model=str(path), kv_cache_tokens=256, block_size=4))
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    ours = engine.generate([PROMPT], params)[0].token_ids
    with torch.no_grad():
        ref = hf_model(path, torch.float32).generate(
            torch.tensor([PROMPT]), max_new_tokens=32, do_sample=False)[0, len(PROMPT):]
    assert list(ours) == ref.tolist()


def run_staggered(engine: LLMEngine, jobs: list[tuple[int, list[int], SamplingParams]]) -> dict[str, tuple]:
    """Add job i at step `arrive_i`; run to completion; request id -> output token ids."""
    pending, step, done = sorted(jobs, key=lambda j: j[0]), 0, {}
    names = {}
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            arrive, prompt, params = pending.pop(0)
            names[engine.add_request(prompt, params)] = len(names)
        for out in engine.step():
            if out.finished:
                done[names[out.request_id]] = out.token_ids
        step += 1
    return done


@pytest.mark.parametrize("family", FAMILIES)
def test_output_is_independent_of_batch(tiny_model, family):
    path = tiny_model(family)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    jobs = [(0, PROMPT, greedy), (0, [5, 6, 7], seeded), (2, list(range(50, 90)), greedy),
            (3, [9] * 7, seeded), (5, [100, 3, 4, 200, 11], greedy)]
    cfg = EngineConfig(model=str(path), kv_cache_tokens=512, block_size=8, max_num_batched_tokens=24)
    batched = run_staggered(LLMEngine(cfg), jobs)
    alone_engine = LLMEngine(cfg)
    for i, (_, prompt, params) in enumerate(jobs):
        alone = alone_engine.generate([prompt], params)[0].token_ids
        assert batched[i] == alone, f"job {i} differs when batched"


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_are_the_models_log_softmax(tiny_model, temperature):
    """Each streamed token's logprob and top alternatives equal transformers' log-softmax at that
    position (the raw distribution, whatever the temperature), token by token."""
    path = tiny_model("qwen2_moe")
    engine = LLMEngine(EngineConfig(model=str(path), kv_cache_tokens=256, block_size=4))
    params = SamplingParams(max_tokens=10, temperature=temperature, seed=3, ignore_eos=True, logprobs=3)
    outs = list(engine.stream(PROMPT, params))
    got = [lp for o in outs for lp in o.new_logprobs]
    tokens = list(outs[-1].token_ids)
    assert outs[-1].logprobs == tuple(got)
    assert [lp.token_id for lp in got] == tokens and all(len(lp.top) == 3 for lp in got)
    with torch.no_grad():
        logits = hf_model(path, torch.float32)(torch.tensor([PROMPT + tokens])).logits[0]
    ref = torch.log_softmax(logits[len(PROMPT) - 1:-1].float(), dim=-1)  # [10, V]: rows predicting each token
    ours = torch.tensor([lp.logprob for lp in got])
    torch.testing.assert_close(ours, ref[torch.arange(len(tokens)), tokens], atol=1e-4, rtol=0)
    top = torch.topk(ref, 3, dim=-1)
    assert [[t for t, _ in lp.top] for lp in got] == top.indices.tolist()
    torch.testing.assert_close(torch.tensor([[v for _, v in lp.top] for lp in got]), top.values, atol=1e-4, rtol=0)
    if temperature == 0.0:
        assert all(lp.top[0][0] == lp.token_id for lp in got)
    plain = engine.generate([PROMPT], SamplingParams(max_tokens=10, temperature=temperature, seed=3, ignore_eos=True))
    assert plain[0].token_ids == outs[-1].token_ids and plain[0].new_logprobs is plain[0].logprobs is None
