"""Incremental detokenization, stop strings, sampling parameters and the sampler."""

from __future__ import annotations

import pytest
import torch

from cluster.detokenizer import IncrementalText
from cluster.sampler import new_generator, sample
from cluster.sampling_params import SamplingParams


def chars(ids):
    return "".join(chr(i) for i in ids)


def test_text_released_incrementally_and_truncated_at_stop():
    text = IncrementalText(chars, stop=("END",))
    ids, got = [], []
    for ch in "abcENxyEND tail":
        ids.append(ord(ch))
        delta, hit = text.update(ids)
        got.append(delta)
        if hit:
            break
    assert "".join(got) == "abcENxy" and text.text == "abcENxy"
    assert got[3:5] == ["", ""]  # "E", "N" held back: they may start "END"


def test_incomplete_utf8_is_held_back_until_complete():
    raw = "é".encode()
    text = IncrementalText(lambda ids: bytes(ids).decode("utf-8", errors="replace"), stop=())
    assert text.update([raw[0]]) == ("", False)
    assert text.update([raw[0], raw[1]]) == ("é", False)


def test_final_flushes_held_text():
    text = IncrementalText(chars, stop=("xyz",))
    assert text.update([ord("x")]) == ("", False)
    assert text.update([ord("x")], final=True) == ("x", False)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"top_p": 0.0}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"seed": -1}, "seed"), ({"stop": ("",)}, "stop"),
    ({"max_tokens": True}, "max_tokens"),
])
def test_invalid_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampler_filters_and_seeds():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0, 1.0]] * 3)
    greedy = SamplingParams(temperature=0.0)
    top1 = SamplingParams(top_k=1, seed=3)
    nucleus = SamplingParams(top_p=0.5, seed=3)
    gens = [new_generator(p, torch.device("cpu")) for p in (greedy, top1, nucleus)]
    assert gens[0] is None
    for _ in range(20):
        out = sample(logits, [greedy, top1, nucleus], gens)
        assert out[0] == 1 and out[1] == 1 and out[2] in (1, 2)
    wide = SamplingParams(temperature=5.0, seed=11)
    a = [sample(logits[:1], [wide], [new_generator(wide, torch.device("cpu"))]) for _ in range(2)]
    g = new_generator(wide, torch.device("cpu"))
    draws = {sample(logits[:1], [wide], [g])[0] for _ in range(50)}
    assert a[0] == a[1] and len(draws) >= 3  # same seed -> same draw; high temperature -> spread
