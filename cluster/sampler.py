"""Sampling the next token per request: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A sampled token's log-probability under the model and the most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


def new_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A request's own RNG (None for greedy), so its samples do not depend on its batch mates."""
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """logits: [S, V] float32 -> one token id per row."""
    out = logits.argmax(dim=-1).tolist()
    for row, (p, gen) in enumerate(zip(params, generators)):
        if not p.greedy:
            out[row] = _sample_row(logits[row], p, gen)
    return out


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """logits: [V]."""
    scaled = logits / p.temperature
    if 0 < p.top_k < scaled.numel():
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if p.top_p < 1.0:
        scaled = _top_p(scaled, p.top_p)
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen).item())


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= top_p  # the more likely tokens already reach top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(0, order, sorted_logits)


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
