"""Sampling the next token per request: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import functools
import secrets
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cluster.sampling_params import SamplingParams

NUCLEUS_CANDIDATES = (64, 1024)  # top-p looks for its nucleus among this many best tokens before sorting all


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A sampled token's log-probability under the model and the most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


_MASK64 = (1 << 64) - 1


class TokenRandom:
    """A sampled request's random numbers: one uniform per output position, a pure function of the
    request's seed and the position (splitmix64). So a seeded request draws the same tokens alone or
    in any batch, whatever its steps (speculative decoding samples several positions in one step),
    and a draft at a position is kept exactly when the token drawn there equals it (which is
    rejection sampling against a draft that proposes one token: the kept token's distribution is
    the model's)."""

    __slots__ = ("seed",)

    def __init__(self, seed: int | None = None) -> None:
        self.seed = secrets.randbits(64) if seed is None else seed

    def uniform(self, position: int) -> float:
        """A uniform in [0, 1) for output position `position` (53 random bits)."""
        z = (self.seed + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return ((z ^ (z >> 31)) >> 11) * 2.0 ** -53


def new_random(params: SamplingParams) -> TokenRandom | None:
    """A request's own random numbers (None for greedy): seeded by params.seed, else at random."""
    return None if params.greedy else TokenRandom(params.seed)


def sample(logits: torch.Tensor, params: list[SamplingParams], randoms: list[TokenRandom | None],
           positions: list[int]) -> list[int]:
    """logits: [S, V] float32 -> one token id per row; a sampled row draws with its request's uniform
    for its output position (`positions[i]`: the output tokens before the row's). Float32 rows on CPU
    are drawn in C (kernels/cpu_sample.c), one at a time; elsewhere the non-greedy rows are filtered
    and drawn together: row by row, sampling took 25 ms of a 40 ms decode step of the demo model at
    batch 64 (top_p 0.9), together 5 ms. The inverse CDF runs over the candidates in
    token order: in probability order, two tail tokens whose probabilities differ in the last bits
    (the same row computed in a batch of another shape) could swap places and so swap which one a
    uniform picks; in token order a change of the last bits moves the draw only where the uniform
    lies within that change of a boundary."""
    out = greedy_tokens(logits)
    vocab = logits.shape[-1]
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    lib = _native_sampler() if drawn and logits.device.type == "cpu" and logits.dtype == torch.float32 else None
    if lib is not None:  # kernels/cpu_sample.c: the same draws without ~30 small torch ops a step
        from kernels.cpu_native import sample_native
        tokens = sample_native(logits[drawn], [params[i].temperature for i in drawn],
                               [params[i].top_k if 0 < params[i].top_k < vocab else 0 for i in drawn],
                               [params[i].top_p for i in drawn], [randoms[i].uniform(positions[i]) for i in drawn],
                               lib)
        for i, token in zip(drawn, tokens):
            out[i] = token
        return out
    plain = [i for i, p in enumerate(params) if not p.greedy and not _filters(p, vocab)]
    cut = [i for i, p in enumerate(params) if not p.greedy and _filters(p, vocab)]
    if plain:  # temperature only: every token is a candidate
        temps = logits.new_tensor([params[i].temperature for i in plain])[:, None]
        drawn = _draw(torch.softmax(logits[plain] / temps, dim=-1), [randoms[i].uniform(positions[i]) for i in plain])
        for i, token in zip(plain, drawn.tolist()):
            out[i] = token
    if cut:
        weights, ids = _candidates(logits[cut], [params[i] for i in cut])
        ids, order = ids.sort(dim=-1)  # drawn in token order, not probability order (docstring)
        weights = weights.gather(1, order)
        drawn = ids.gather(1, _draw(weights, [randoms[i].uniform(positions[i]) for i in cut])[:, None]).squeeze(1)
        for i, token in zip(cut, drawn.tolist()):
            out[i] = token
    return out


@functools.cache
def _native_sampler():
    """The C kernels' library (kernels/cpu_native.py), or None where they cannot run."""
    from kernels import cpu_native
    return cpu_native.load()


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """The argmax of each row (the first of equal maxima, a NaN before all). On CPU through numpy,
    which has the same rule: torch's argmax took 43 us for one row of 50,304 logits, numpy's 4."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return logits.numpy().argmax(axis=-1).tolist()
    return logits.argmax(dim=-1).tolist()


def _filters(p: SamplingParams, vocab: int) -> bool:
    return 0 < p.top_k < vocab or p.top_p < 1.0


def _candidates(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [R, V] with top-k and/or top-p -> (weights [R, n], proportional to each row's
    probabilities and 0 past its candidates; token ids [R, n]), most likely first. First the best
    max(64, top_k) tokens of every row at once; the top-p rows whose nucleus reaches further are
    searched again together among their best 1024, then sorted whole."""
    vocab = logits.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    scaled = logits / logits.new_tensor([p.temperature for p in params])[:, None]
    full = torch.softmax(scaled, dim=-1)  # one fused op: logsumexp alone took 13.6 us for 4,096 logits, this 3.5
    values, ids = torch.topk(scaled, min(vocab, max(NUCLEUS_CANDIDATES[0], *top_k)))  # [R, k] descending
    beyond_k = torch.arange(values.shape[1], device=values.device) >= values.new_tensor(top_k)[:, None]
    has_k = values.new_tensor([k > 0 for k in top_k], dtype=torch.bool)[:, None]
    probs = torch.where(has_k, torch.softmax(values.masked_fill(beyond_k & has_k, float("-inf")), dim=-1),
                        full.gather(1, ids))
    top_p = [p.top_p if p.top_p < 1.0 else float("inf") for p in params]
    short = [r for r, m in enumerate(probs.sum(dim=-1).tolist()) if top_k[r] == 0 and m < top_p[r]]
    for k in (*NUCLEUS_CANDIDATES[1:], vocab):
        if not short:
            break
        if k <= probs.shape[1]:  # top_k already gave every row this many
            continue
        rows = scaled[short]
        wide_ids = torch.topk(rows, k).indices if k < vocab else torch.sort(rows, descending=True).indices
        wide = full[short].gather(1, wide_ids)
        grow = (0, wide.shape[1] - probs.shape[1])  # every row padded with zero weights
        probs, ids = F.pad(probs, grow), F.pad(ids, grow)
        probs[short], ids[short] = wide, wide_ids
        short = [r for r, m in zip(short, wide.sum(dim=-1).tolist()) if m < top_p[r]]
    return _nucleus(probs, probs.new_tensor(top_p)[:, None]), ids


def _nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero every token whose more likely predecessors already reach its row's top_p (inf: none)."""
    return probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)


def _draw(weights: torch.Tensor, uniforms: list[float]) -> torch.Tensor:
    """[R, n] weights -> [R] indices, row r drawn with probability proportional to weights[r] by
    inverse CDF at uniforms[r] in [0, 1) (`torch.multinomial` took 1.1 ms for 50k weights, cumsum +
    searchsorted 0.06 ms)."""
    cdf = weights.cumsum(dim=-1)
    total = cdf[:, -1:].contiguous()
    u = torch.tensor(uniforms, dtype=cdf.dtype, device=weights.device)[:, None] * total
    drawn = torch.searchsorted(cdf, u, right=True)
    last = torch.searchsorted(cdf, total)  # the last drawable index, should u round up to the total
    return torch.minimum(drawn, last).squeeze(1)


def token_logprobs(logits: torch.Tensor, rows: list[int], tokens: list[int], tops: list[int]) -> list[TokenLogprob]:
    """logits: [S, V] float32; for each of `rows`, the log-softmax of the model's raw distribution
    (before temperature or filtering) at its sampled token, and its `tops[i]` best tokens."""
    logp = torch.log_softmax(logits[rows], dim=-1)  # [R, V]
    chosen = logp.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1).tolist()
    k = max(tops, default=0)
    best = torch.topk(logp, k, dim=-1) if k else None
    out = []
    for i, (token, lp, n) in enumerate(zip(tokens, chosen, tops)):
        top = () if best is None else tuple(zip(best.indices[i, :n].tolist(), best.values[i, :n].tolist()))
        out.append(TokenLogprob(token, lp, top))
    return out
