"""Engine behaviour: streaming, stop conditions, bad input, admission control, failures."""

from __future__ import annotations

import pytest
import torch

from cluster.config import EngineConfig
from cluster.engine import LLMEngine
from cluster.sampling_params import SamplingParams
from cluster.scheduler import AdmissionError

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model):
    return LLMEngine(EngineConfig(model=str(tiny_model("olmoe")), kv_cache_tokens=128, block_size=8,
                                  max_model_len=64))


def test_stream_deltas_add_up_to_final_output(engine):
    outs = list(engine.stream("hello", GREEDY))
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert sum((o.new_token_ids for o in outs), ()) == outs[-1].token_ids
    assert "".join(o.new_text for o in outs) == outs[-1].text
    assert len(outs[-1].token_ids) == 8 and outs[-1].num_prompt_tokens == 5


def test_stop_string_truncates_text(engine):
    full = engine.generate(["abc"], GREEDY)[0]
    stop = full.text[2:4]
    assert stop, "need visible text to pick a stop string from"
    out = engine.generate(["abc"], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, stop=(stop,)))[0]
    assert out.finish_reason == "stop" and out.text == full.text[: full.text.find(stop)]


def test_eos_ends_request(engine):
    first = engine.generate([[5, 6, 7]], GREEDY)[0].token_ids[0]
    engine.eos_ids = frozenset({first})
    try:
        out = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0.0))[0]
    finally:
        engine.eos_ids = frozenset(engine.spec.eos_token_ids) | {engine.tokenizer.eos_token_id}
    assert out.finish_reason == "stop" and out.token_ids == (first,)


@pytest.mark.parametrize("prompt, params, error, message", [
    ([1, 2, 10**6], GREEDY, ValueError, "token ids out of range"),
    ([1, -1], GREEDY, ValueError, "token ids out of range"),
    ([], GREEDY, AdmissionError, "prompt is empty"),
    ("x" * 60, GREEDY, AdmissionError, "exceeds max_model_len 64"),
])
def test_bad_requests_are_rejected_and_engine_keeps_serving(engine, prompt, params, error, message):
    with pytest.raises(error, match=message):
        engine.add_request(prompt, params)
    assert not engine.has_unfinished()
    assert engine.generate([[3, 4]], GREEDY)[0].finish_reason == "length"


def test_waiting_request_admitted_after_others_finish(tiny_model):
    eng = LLMEngine(EngineConfig(model=str(tiny_model("olmoe")), kv_cache_tokens=32, block_size=8))
    outs = eng.generate([[1] * 10, [2] * 10, [3] * 10], GREEDY)  # each needs 17 of the 32 slots
    assert [o.finish_reason for o in outs] == ["length"] * 3


@pytest.mark.parametrize("caching", [False, True])
def test_requests_outgrowing_the_cache_are_preempted_and_keep_their_tokens(tiny_model, caching):
    """64 KV slots for 4 requests of up to 50 tokens: they run together, the latest admitted are
    preempted and recomputed when the cache runs out, and every output is the one with room to spare."""
    path = str(tiny_model("olmoe"))
    prompts = [[i + 1] * 9 + [50 + i] for i in range(4)]
    tight = LLMEngine(EngineConfig(model=path, kv_cache_tokens=64, block_size=8, enable_prefix_caching=caching))
    ample = LLMEngine(EngineConfig(model=path, kv_cache_tokens=1024, block_size=8))
    for params in (SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
                   SamplingParams(max_tokens=40, temperature=0.9, seed=2, ignore_eos=True)):
        running = []
        step = tight.step
        tight.step = lambda: (step(), running.append(len(tight.scheduler.running)))[0]
        assert [o.token_ids for o in tight.generate(prompts, params)] == \
            [o.token_ids for o in ample.generate(prompts, params)]
        tight.step = step
        assert max(running) > 1  # whole reservations (6 of the 8 blocks each) would run one at a time
    assert tight.scheduler.num_preemptions > 0
    assert tight.scheduler.blocks.num_free == 8 and not tight.has_unfinished()


def test_abort_frees_the_slot(engine):
    rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=30, temperature=0.0))
    engine.step()
    out = engine.abort(rid)
    assert out.finished and out.finish_reason == "abort"
    assert not engine.has_unfinished() and engine.scheduler.blocks.num_free == engine.config.num_blocks


def test_failing_step_ends_its_requests_not_the_engine(engine, monkeypatch):
    def boom(batch):
        raise RuntimeError("injected")
    rid = engine.add_request([1, 2], GREEDY)
    monkeypatch.setattr(engine.model, "forward", boom)
    outs = engine.step()
    monkeypatch.undo()
    assert [(o.request_id, o.finish_reason) for o in outs] == [(rid, "error")]
    assert "injected" in outs[0].error
    assert engine.generate([[1, 2]], GREEDY)[0].finish_reason == "length"


def test_bfloat16_engine_generates(tiny_model):
    eng = LLMEngine(EngineConfig(model=str(tiny_model("mixtral", "bfloat16")), dtype="bfloat16",
                                 kv_cache_tokens=64))
    assert eng.model.attention.k_cache[0].dtype == torch.bfloat16
    assert len(eng.generate([[1, 2, 3]], GREEDY)[0].token_ids) == 8
