"""Token log-probabilities in OpenAI's two response shapes, built from the engine's TokenLogprobs.

Completions: parallel lists (`tokens`, `token_logprobs`, `top_logprobs` as {token: logprob},
`text_offset` into the choice's text). Chat: `content` as one entry per token with its UTF-8 bytes
and its `top_logprobs` alternatives. A token's string is its own decoding, so a token that holds
part of a multi-byte character decodes to U+FFFD, as in vLLM; `bytes` keeps the exact bytes.
"""

from __future__ import annotations

from typing import Callable, Sequence

from pydantic import BaseModel

from cluster.sampler import TokenLogprob

Decode = Callable[[list[int]], str]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: the first prompt token (echo), which nothing predicts
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]

    def __add__(self, other: "CompletionLogprobs") -> "CompletionLogprobs":
        return CompletionLogprobs(tokens=self.tokens + other.tokens,
                                  token_logprobs=self.token_logprobs + other.token_logprobs,
                                  top_logprobs=self.top_logprobs + other.top_logprobs,
                                  text_offset=self.text_offset + other.text_offset)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


def completion_logprobs(lps: Sequence[TokenLogprob], decode: Decode, offset: int = 0) -> CompletionLogprobs:
    """`offset`: where the first token's text starts in the choice's text (echo, earlier chunks)."""
    tokens = [decode([lp.token_id]) for lp in lps]
    offsets, at = [], offset
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=[lp.logprob for lp in lps], text_offset=offsets,
                              top_logprobs=[_top_by_text(lp, decode) for lp in lps])


def prompt_completion_logprobs(prompt_ids: Sequence[int], lps: Sequence[TokenLogprob],
                               decode: Decode) -> CompletionLogprobs:
    """The echoed prompt's entries: its first token with no logprob, then one per later token (lps)."""
    text = decode([prompt_ids[0]])
    first = CompletionLogprobs(tokens=[text], token_logprobs=[None], top_logprobs=[None], text_offset=[0])
    return first + completion_logprobs(lps, decode, len(text))


def _top_by_text(lp: TokenLogprob, decode: Decode) -> dict[str, float]:
    """{text: logprob}; tokens that decode alike (parts of one character) keep the likeliest value."""
    top: dict[str, float] = {}
    for token_id, value in lp.top:
        top.setdefault(decode([token_id]), value)
    return top


def chat_logprobs(lps: Sequence[TokenLogprob], decode: Decode) -> ChatLogprobs:
    def entry(token_id: int, logprob: float) -> dict:
        text = decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return ChatLogprobs(content=[
        ChatTokenLogprob(**entry(lp.token_id, lp.logprob), top_logprobs=[TopLogprob(**entry(t, v)) for t, v in lp.top])
        for lp in lps])
