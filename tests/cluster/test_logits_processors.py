"""Logit bias and repetition, frequency and presence penalties, against transformers on a tiny model:
its `generate(repetition_penalty=...)`, and a greedy loop over its logits with OpenAI's arithmetic."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from cluster.config import EngineConfig
from cluster.engine import LLMEngine
from cluster.logits_processors import adjust_logits
from cluster.sampling_params import SamplingParams

PROMPT = [5, 9, 5, 12, 9, 5, 30, 31]
NEW = 24


@pytest.fixture(scope="module")
def olmoe(tiny_model):
    path = tiny_model("olmoe")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    return LLMEngine(EngineConfig(model=str(path), kv_cache_tokens=512, block_size=4)), hf


def _greedy(engine: LLMEngine, **adjust) -> list[int]:
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, **adjust)
    return list(engine.generate([PROMPT], params)[0].token_ids)


def _reference(hf, presence=0.0, frequency=0.0, bias=()) -> list[int]:
    """Greedy over transformers' logits, adjusted with plain Python arithmetic."""
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(NEW):
            logits = hf(torch.tensor([ids])).logits[0, -1].tolist()
            for token, b in bias:
                logits[token] += b
            output = ids[len(PROMPT):]
            for token in set(output):
                logits[token] -= frequency * output.count(token) + presence
            ids.append(max(range(len(logits)), key=logits.__getitem__))
    return ids[len(PROMPT):]


def test_repetition_penalty_matches_transformers_generate(olmoe):
    engine, hf = olmoe
    ours = _greedy(engine, repetition_penalty=1.8)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, do_sample=False,
                          repetition_penalty=1.8)[0, len(PROMPT):].tolist()
    assert ours == ref
    assert ours != _greedy(engine)  # the penalty changed the continuation: the comparison means something


@pytest.mark.parametrize("adjust, ref", [
    ({"frequency_penalty": 1.5}, {"frequency": 1.5}),
    ({"presence_penalty": 2.0}, {"presence": 2.0}),
    ({"presence_penalty": 0.7, "frequency_penalty": -0.4}, {"presence": 0.7, "frequency": -0.4}),
])
def test_frequency_and_presence_penalties_follow_the_openai_formula(olmoe, adjust, ref):
    engine, hf = olmoe
    ours = _greedy(engine, **adjust)
    assert ours == _reference(hf, **ref)
    assert ours != _greedy(engine)


def test_logit_bias_adds_to_the_logits_and_can_force_or_ban_a_token(olmoe):
    engine, hf = olmoe
    plain = _greedy(engine)
    banned = plain[0]
    ours = _greedy(engine, logit_bias=((banned, -100.0), (7, 0.5)))
    assert ours == _reference(hf, bias=((banned, -100.0), (7, 0.5))) and banned not in ours
    forced = SamplingParams(max_tokens=6, temperature=1.0, seed=0, ignore_eos=True, logit_bias=((42, 100.0),))
    assert engine.generate([PROMPT], forced)[0].token_ids == (42,) * 6


def test_logprobs_stay_those_of_the_model_and_batch_mates_are_unaffected(olmoe):
    engine, _ = olmoe
    plain = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=3)
    biased = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=3, logit_bias=((42, 100.0),),
                            frequency_penalty=2.0)
    alone = engine.generate([PROMPT], plain)[0]
    a = engine.add_request(PROMPT, plain)
    b = engine.add_request(PROMPT, biased)
    final = {}
    while engine.has_unfinished():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert final[a].token_ids == alone.token_ids
    assert [lp.logprob for lp in final[a].logprobs] == pytest.approx([lp.logprob for lp in alone.logprobs], abs=1e-5)
    first, model = final[b].logprobs[0], alone.logprobs[0]
    assert first.token_id == 42 and final[b].token_ids == (42,) * 4
    # the model's own alternatives, unbiased, and 42 is not what the model itself prefers
    assert [t for t, _ in first.top] == [t for t, _ in model.top] and 42 not in [t for t, _ in model.top]
    assert [v for _, v in first.top] == pytest.approx([v for _, v in model.top], abs=1e-5)
    assert first.logprob < model.logprob


def test_adjust_logits_leaves_plain_rows_and_the_input_alone():
    logits = torch.tensor([[1.0, -2.0, 3.0, 0.5], [1.0, -2.0, 3.0, 0.5]])
    params = [SamplingParams(), SamplingParams(repetition_penalty=2.0, presence_penalty=0.25, frequency_penalty=0.5,
                                               logit_bias=((3, 1.0),))]
    out = adjust_logits(logits, params, [[0], [0, 1]], [[2], [2, 2]], [{3}, {3}])
    assert out[0].tolist() == logits[0].tolist() and logits[1].tolist() == [1.0, -2.0, 3.0, 0.5]
    # token 0 and 1 in the prompt, 2 twice in the output, 3 biased
    assert out[1].tolist() == [0.5, -4.0, 3.0 / 2 - 2 * 0.5 - 0.25, 1.5]
    assert adjust_logits(logits, [SamplingParams()] * 2, [[0]] * 2, [[1]] * 2, [{3}] * 2) is logits
    short = adjust_logits(logits, [SamplingParams(min_tokens=2), SamplingParams(min_tokens=1)], [[0]] * 2, [[1]] * 2,
                          [{0, 3}, {0, 3}])
    assert short[0].tolist() == [float("-inf"), -2.0, 3.0, float("-inf")]  # 1 token out of 2: eos and stops held
    assert short[1].tolist() == logits[1].tolist()  # min_tokens reached


@pytest.mark.parametrize("bad, words", [
    ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2]"),
    ({"frequency_penalty": math.nan}, "frequency_penalty must be in [-2, 2]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be a number > 0"),
    ({"logit_bias": ((3, 101.0),)}, "logit_bias must be"),
    ({"logit_bias": ((-1, 1.0),)}, "logit_bias must be"),
    ({"logit_bias": [(3, 1.0)]}, "logit_bias must be"),
])
def test_bad_adjustments_are_refused_naming_the_field(bad, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(**bad)


def test_a_bias_on_a_token_outside_the_vocabulary_is_refused(olmoe):
    engine, _ = olmoe
    vocab = engine.spec.vocab_size
    with pytest.raises(ValueError, match=rf"logit_bias token ids out of range \[0, {vocab}\): \[{vocab}\]"):
        engine.add_request(PROMPT, SamplingParams(logit_bias=((vocab, 1.0),)))
    assert not engine.has_unfinished()


def test_stop_token_ids_end_the_request_as_eos_does(olmoe):
    engine, _ = olmoe
    plain = _greedy(engine)
    stop = plain[5]
    end = plain.index(stop) + 1
    out = engine.generate([PROMPT], SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True,
                                                   stop_token_ids=(stop,)))[0]
    assert out.token_ids == tuple(plain[:end]) and out.finish_reason == "stop"


def test_min_tokens_holds_back_eos_and_stop_tokens(olmoe):
    engine, _ = olmoe
    (eos,) = engine.eos_ids
    pushed = SamplingParams(max_tokens=NEW, temperature=0.0, logit_bias=((eos, 100.0),))
    assert engine.generate([PROMPT], pushed)[0].token_ids == (eos,)
    out = engine.generate([PROMPT], SamplingParams(max_tokens=NEW, temperature=0.0, logit_bias=((eos, 100.0),),
                                                   min_tokens=5))[0]
    assert len(out.token_ids) == 6 and out.token_ids[-1] == eos and eos not in out.token_ids[:5]
    assert out.finish_reason == "stop"
    forced = SamplingParams(max_tokens=NEW, temperature=0.8, seed=1, ignore_eos=True, logit_bias=((42, 100.0),),
                            stop_token_ids=(42,), min_tokens=3)
    out = engine.generate([PROMPT], forced)[0]
    assert len(out.token_ids) == 4 and out.token_ids[-1] == 42 and 42 not in out.token_ids[:3]


def test_min_tokens_looks_for_stop_strings_only_once_reached():
    from cluster.demo import ensure_demo_model

    engine = LLMEngine(EngineConfig(model=str(ensure_demo_model())))
    greedy = dict(max_tokens=32, temperature=0.0, ignore_eos=True)
    plain = engine.generate(["def add(a, b):"], SamplingParams(**greedy))[0]
    stop = "self"
    first = plain.text.index(stop)
    early = engine.generate(["def add(a, b):"], SamplingParams(**greedy, stop=(stop,)))[0]
    assert early.text == plain.text[:first] and early.finish_reason == "stop"
    out = engine.generate(["def add(a, b):"], SamplingParams(**greedy, stop=(stop,), min_tokens=6))[0]
    assert len(out.token_ids) >= 6 and out.token_ids == plain.token_ids[:len(out.token_ids)]
    assert stop in out.text and plain.text.startswith(out.text)  # the early occurrence did not stop it
    assert out.finish_reason == "stop" and plain.text[len(out.text):].startswith(stop)  # the next one did
