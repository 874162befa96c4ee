"""A request's engine-side state and the RequestOutput it streams out."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.detokenizer import IncrementalText
from cluster.sampler import TokenLogprob, TokenRandom
from cluster.sampling_params import SamplingParams
from cluster.sequence import Sequence


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """One update of a request: what is new since the last update, and the totals so far."""

    request_id: str
    new_token_ids: tuple[int, ...]
    new_text: str
    token_ids: tuple[int, ...]
    text: str
    num_prompt_tokens: int
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    new_logprobs: tuple[TokenLogprob, ...] | None = None  # one per new token, when params.logprobs is set
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token so far, when params.logprobs is set
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # one per prompt token after the first, when
    # params.prompt_logprobs is set (complete from the first output on: the prompt is scored by then)


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    seq: Sequence
    params: SamplingParams
    random: TokenRandom | None  # its uniforms, one per output position (None: greedy)
    text: IncrementalText | None  # None when the model has no tokenizer
    eos_ids: frozenset[int]
    num_reported: int = 0  # output tokens already sent in a RequestOutput
    stopped: bool = field(default=False)
    released: str = ""  # text released while a step's tokens were checked for stop strings, not yet sent
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output token, if asked for
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per prompt token after the first
    stop_ids: frozenset[int] = field(init=False)  # the tokens that end it: eos (unless ignored), its stop tokens

    def __post_init__(self) -> None:
        eos = frozenset() if self.params.ignore_eos else self.eos_ids
        self.stop_ids = eos | frozenset(self.params.stop_token_ids)

    @property
    def may_stop(self) -> bool:
        """Whether the output is long enough (min_tokens) for eos, stop tokens and stop strings to end it."""
        return len(self.seq.output_ids) >= self.params.min_tokens

    def cut(self, new: list[int]) -> list[int]:
        """A step's new tokens up to the first that would end the request (a stop token once
        min_tokens are out, max_tokens, or a stop string: the text is checked after each token but
        the last, as decoding one token per step would, and what that releases is kept in `released`;
        the engine checks the last token's text as usual)."""
        done = len(self.seq.output_ids)
        for i, token in enumerate(new):
            done += 1
            if self._ends(token, done) is not None:
                return new[:i + 1]
            if i < len(new) - 1 and self.text is not None and self.params.stop:
                text, self.stopped = self.text.update([*self.seq.output_ids, *new[:i + 1]],
                                                      check_stop=done >= self.params.min_tokens)
                self.released += text
                if self.stopped:
                    return new[:i + 1]
        return new

    def finish_reason(self) -> str | None:
        """Why this request is done after its latest token, or None to continue."""
        out = self.seq.output_ids
        if self.stopped:
            return "stop"
        return self._ends(out[-1], len(out)) if out else None

    def _ends(self, token: int, length: int) -> str | None:
        """Whether an output of `length` tokens whose last is `token` is complete: "stop" (a stop token
        once min_tokens are out), "length" (max_tokens), or None."""
        if length >= self.params.min_tokens and token in self.stop_ids:
            return "stop"
        return "length" if length >= self.params.max_tokens else None
