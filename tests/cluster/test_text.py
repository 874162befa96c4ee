"""Incremental detokenization, stop strings, sampling parameters and the sampler."""

from __future__ import annotations

import pytest
import torch

from cluster.detokenizer import IncrementalText
from cluster.sampler import TokenRandom, new_random, sample
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
    randoms = [new_random(p) for p in (greedy, top1, nucleus)]
    assert randoms[0] is None
    for position in range(20):
        out = sample(logits, [greedy, top1, nucleus], randoms, [position] * 3)
        assert out[0] == 1 and out[1] == 1 and out[2] in (1, 2)
    wide = SamplingParams(temperature=5.0, seed=11)
    a = [sample(logits[:1], [wide], [new_random(wide)], [7]) for _ in range(2)]
    draws = {sample(logits[:1], [wide], [new_random(wide)], [position])[0] for position in range(50)}
    assert a[0] == a[1] and len(draws) >= 3  # same seed and position -> same draw; high temperature -> spread
    unseeded = SamplingParams(temperature=5.0)
    assert len({sample(logits[:1], [unseeded], [new_random(unseeded)], [0])[0] for _ in range(50)}) >= 3


def test_uniforms_are_uniform_and_a_function_of_seed_and_position():
    u = torch.tensor([TokenRandom(seed).uniform(pos) for seed in range(40) for pos in range(250)], dtype=torch.float64)
    assert 0 <= float(u.min()) and float(u.max()) < 1
    counts = torch.histc(u, bins=10, min=0, max=1) / u.numel()  # 10,000 draws over 10 bins
    assert float((counts - 0.1).abs().max()) < 0.01
    assert TokenRandom(3).uniform(5) == TokenRandom(3).uniform(5) != TokenRandom(4).uniform(5)
    assert TokenRandom(3).uniform(5) != TokenRandom(3).uniform(6)
    adjacent = torch.tensor([TokenRandom(9).uniform(p) for p in range(2001)], dtype=torch.float64)
    assert abs(float(torch.corrcoef(torch.stack([adjacent[:-1], adjacent[1:]]))[0, 1])) < 0.05


def reference_distribution(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """[V] probabilities by masking and sorting the whole vocabulary, as the sampler once did."""
    scaled = logits / p.temperature
    if 0 < p.top_k < scaled.numel():
        scaled = scaled.masked_fill(scaled < torch.topk(scaled, p.top_k).values[-1], float("-inf"))
    if p.top_p < 1.0:
        values, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(values, dim=-1)
        values = values.masked_fill(probs.cumsum(dim=-1) - probs >= p.top_p, float("-inf"))
        scaled = torch.empty_like(scaled).scatter_(0, order, values)
    return torch.softmax(scaled, dim=-1)


@pytest.mark.parametrize("spread", [0.5, 3.0, 30.0])  # flat (nucleus beyond 1024 tokens) to peaked
def test_batched_candidates_are_each_rows_full_sort_distribution(spread):
    """Rows with different filters are cut together (the best 64 tokens of every row, wider searches
    for nuclei beyond them, up to sorting all 5,000); each row's distribution is the one the
    whole-vocabulary sort gives it."""
    from cluster.sampler import _candidates
    params = [SamplingParams(seed=0, **kw) for kw in ({"top_p": 0.9}, {"top_p": 0.5, "temperature": 0.7},
                                                     {"top_k": 50}, {"top_k": 2000, "top_p": 0.8},
                                                     {"top_k": 3, "temperature": 2.0}, {"top_p": 0.99})]
    logits = torch.randn(len(params), 5000, generator=torch.Generator().manual_seed(int(spread * 10))) * spread
    weights, ids = _candidates(logits, params)
    for row, p in enumerate(params):
        got = torch.zeros(5000).index_add_(0, ids[row], weights[row] / weights[row].sum())
        want = reference_distribution(logits[row], p)
        assert torch.equal(got > 0, want > 0), p
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_draws_follow_the_distribution_and_skip_zero_weights():
    from cluster.sampler import _draw
    weights = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [0.1, 0.0, 0.0, 0.0, 0.0, 0.9]])
    draws = torch.stack([_draw(weights, [TokenRandom(5).uniform(i), TokenRandom(6).uniform(i)])
                         for i in range(4000)])  # [4000, 2]
    for row in range(2):
        counts = torch.bincount(draws[:, row], minlength=6).float() / 4000
        assert counts[weights[row] == 0].sum() == 0
        torch.testing.assert_close(counts, weights[row], atol=0.03, rtol=0)


def test_a_rows_draws_do_not_depend_on_its_batch_mates():
    """Each request draws with its own uniforms: the same seed gives the same tokens alone or beside
    other requests (greedy, temperature-only, top-k, top-p)."""
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)) * 3
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5, seed=1),
              SamplingParams(top_k=5, seed=2), SamplingParams(top_p=0.8, seed=3)]

    def run(rows):
        randoms = [new_random(params[r]) for r in rows]
        return [sample(logits[rows], [params[r] for r in rows], randoms, [step] * len(rows)) for step in range(20)]

    together = run([0, 1, 2, 3])
    for r in range(4):
        assert [step[r] for step in together] == [step[0] for step in run([r])]


def _llama_style_tokenizer():
    """A SentencePiece-style BPE as Mixtral and Llama checkpoints ship: Metaspace, byte fallback for
    characters outside its vocabulary, a decoder that strips the leading space."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    chars = ["▁"] + [chr(c) for c in range(33, 127)]
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("e", "n"), ("▁", "a"), ("▁", "▁")]
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for piece in chars + ["".join(m) for m in merges]:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


TEXTS = ["def add(a, b):\n    return a + b  # ünïcödé €uro", "  leading spaces and 中文 and 😀 emoji",
         "x" * 300 + " tail with ümlauts", "\n\n  \t mixed   whitespace  "]


@pytest.mark.parametrize("kind", ["byte-bpe", "llama"])
def test_windowed_decoding_gives_the_whole_decode(kind):
    """One token at a time, the released deltas add up to decode(all ids), and the text at every
    step is what decoding everything would show (once complete)."""
    if kind == "llama":
        tok = _llama_style_tokenizer()
    else:
        from tokenizers import Tokenizer

        from cluster.demo import ensure_demo_model
        tok = Tokenizer.from_file(str(ensure_demo_model() / "tokenizer.json"))
    calls = []

    def decode(ids):
        calls.append(len(ids))
        return tok.decode(ids)

    for text in TEXTS:
        ids = tok.encode(text).ids
        inc, released = IncrementalText(decode, stop=()), ""
        for n in range(1, len(ids) + 1):
            delta, _ = inc.update(ids[:n], final=n == len(ids))
            released += delta
            whole = tok.decode(ids[:n])
            if not whole.endswith("\ufffd"):
                assert inc.text == whole
        assert released == inc.text == tok.decode(ids)
    assert max(calls) < 40  # windows, never the 300-token output whole


def test_draws_barely_move_when_the_logits_change_in_their_last_bits():
    """The same row computed in batches of other shapes differs in its last bits; drawn in token
    order, a uniform still picks the same token almost always (in probability order, candidates of
    nearly equal probability swap places and with them their draws)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 5000, generator=g) - 20
    best = torch.randperm(5000, generator=g)[:200]  # 200 clear candidates, many of equal probability
    logits[0, best] = 2 + torch.round(torch.randn(200, generator=g) * 4) / 4
    nudged = logits * (1 + 1e-6 * torch.randn(1, 5000, generator=g))
    params = SamplingParams(top_k=200, temperature=0.8, seed=1)
    r = new_random(params)
    moved = sum(sample(logits, [params], [r], [i]) != sample(nudged, [params], [r], [i]) for i in range(300))
    assert moved <= 2


def _torch_path(monkeypatch):
    import cluster.sampler as sampler
    monkeypatch.setattr(sampler, "_native_sampler", lambda: None)


@pytest.mark.parametrize("kw", [{"temperature": 0.7, "top_p": 0.95}, {"top_k": 50}, {"temperature": 1.3},
                                {"temperature": 0.5, "top_k": 200, "top_p": 0.8}, {"temperature": 0.9, "top_p": 0.5}])
def test_the_c_sampler_draws_what_the_torch_path_draws(monkeypatch, kw):
    from cluster import sampler
    if sampler._native_sampler() is None:
        pytest.skip("the C kernels cannot be built here")
    g = torch.Generator().manual_seed(len(kw))
    logits = torch.cat([torch.randn(2, 4096, generator=g) * s for s in (0.5, 3.0, 10.0)])  # flat to peaked
    params = [SamplingParams(seed=1, **kw)] * 6
    randoms = [TokenRandom(r) for r in range(6)]
    native = [sample(logits, params, randoms, [i] * 6) for i in range(100)]
    _torch_path(monkeypatch)
    assert [sample(logits, params, randoms, [i] * 6) for i in range(100)] == native


@pytest.mark.parametrize("vocab", [5003, 20011])  # neither a multiple of the C passes' 16 or 64
@pytest.mark.parametrize("threads", [1, 2])
def test_the_c_sampler_on_odd_vocabularies_rows_of_their_own(monkeypatch, vocab, threads):
    """Each row with its own settings, flat to peaked, the rows shared among threads: the C sampler
    (which selects only among tokens above a bound it derives, and draws by blocks) draws what the
    torch path draws."""
    from cluster import sampler
    if sampler._native_sampler() is None:
        pytest.skip("the C kernels cannot be built here")
    g = torch.Generator().manual_seed(vocab)
    logits = torch.cat([torch.randn(3, vocab, generator=g) * s for s in (0.3, 2.0, 6.0, 15.0)])
    kinds = [{"temperature": 0.7, "top_p": 0.95}, {"top_k": 50}, {"temperature": 1.3}, {"top_k": 1, "top_p": 0.5},
             {"temperature": 0.5, "top_k": 400, "top_p": 0.8}, {"temperature": 0.9, "top_p": 0.3}]
    params = [SamplingParams(seed=1, **kinds[r % len(kinds)]) for r in range(len(logits))]
    randoms = [TokenRandom(r) for r in range(len(logits))]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        native = [sample(logits, params, randoms, [i] * len(logits)) for i in range(40)]
        _torch_path(monkeypatch)
        assert [sample(logits, params, randoms, [i] * len(logits)) for i in range(40)] == native
    finally:
        torch.set_num_threads(before)


def test_the_c_sampler_keeps_ties_with_the_kth_and_the_edge_of_the_nucleus():
    from cluster import sampler
    if sampler._native_sampler() is None:
        pytest.skip("the C kernels cannot be built here")
    logits = torch.full((1, 300), -5.0)
    logits[0, [7, 70, 170]] = 4.0  # three tokens tied for the largest
    draws = {sample(logits, [SamplingParams(top_k=2, seed=0)], [TokenRandom(0)], [i])[0] for i in range(300)}
    assert draws == {7, 70, 170}  # HF keeps every token tied with the k-th
    draws = {sample(logits, [SamplingParams(top_p=0.5, seed=0)], [TokenRandom(0)], [i])[0] for i in range(300)}
    assert draws == {7, 70, 170}  # the nucleus' edge falls among equals: all of them are kept
    peaked = torch.tensor([[0.0, 9.0, 1.0, 8.5]])
    assert {sample(peaked, [SamplingParams(top_p=0.01, seed=0)], [TokenRandom(0)], [i])[0] for i in range(50)} == {1}
