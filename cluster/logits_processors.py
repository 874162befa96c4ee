"""Per-request logit adjustments before sampling: the tokens that would end a request too early
(min_tokens), logit bias, then repetition, frequency and presence penalties, in the order and with
the arithmetic of vLLM's sampler (OpenAI's for the last two; `transformers`'
RepetitionPenaltyLogitsProcessor for the repetition penalty)."""

from __future__ import annotations

from typing import Collection, Sequence

import torch

from cluster.sampling_params import SamplingParams


def adjust_logits(logits: torch.Tensor, params: list[SamplingParams], prompts: list[Sequence[int]],
                  outputs: list[Sequence[int]], stop_ids: list[Collection[int]]) -> torch.Tensor:
    """logits: [S, V] float32, row i for a sequence with prompt ids prompts[i], output ids so far
    outputs[i], and stop_ids[i] the tokens that would end it. -> the logits to sample from: `logits`
    itself when no row asks for an adjustment, else a copy with the adjusted rows (the raw logits
    stay for the reported logprobs)."""
    rows = [i for i, p in enumerate(params) if p.adjusts_logits]
    if not rows:
        return logits
    out = logits.clone()
    for i in rows:
        _adjust_row(out[i], params[i], prompts[i], outputs[i], stop_ids[i])
    return out


def _adjust_row(row: torch.Tensor, p: SamplingParams, prompt: Sequence[int], output: Sequence[int],
                stop_ids: Collection[int]) -> None:
    if len(output) < p.min_tokens and stop_ids:
        row[torch.tensor(sorted(stop_ids), device=row.device)] = float("-inf")
    if p.logit_bias:
        ids, bias = zip(*p.logit_bias)
        row.index_add_(0, torch.tensor(ids, device=row.device), torch.tensor(bias, dtype=row.dtype, device=row.device))
    if p.repetition_penalty != 1.0:
        seen = torch.tensor([*prompt, *output], dtype=torch.long, device=row.device).unique()
        values = row[seen]
        row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if output and (p.frequency_penalty or p.presence_penalty):
        ids, counts = torch.tensor(output, dtype=torch.long, device=row.device).unique(return_counts=True)
        row[ids] -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty
