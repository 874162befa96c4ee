"""SamplingParams: per-request decoding settings, validated on construction (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

MAX_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 disable those filters; `logprobs` N asks for
    each sampled token's log-probability and the N most likely alternatives (None: none)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        _check(_integer(self.max_tokens) and self.max_tokens >= 1,
               f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        _check(_number(self.temperature) and 0.0 <= self.temperature <= 100.0,
               f"temperature must be in [0, 100], got {self.temperature!r}")
        _check(_integer(self.top_k) and self.top_k >= 0,
               f"top_k must be an integer >= 0, got {self.top_k!r}")
        _check(_number(self.top_p) and 0.0 < self.top_p <= 1.0,
               f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(self.seed is None or (_integer(self.seed) and 0 <= self.seed < 2**63),
               f"seed must be a non-negative integer, got {self.seed!r}")
        _check(isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop),
               f"stop must be a tuple of non-empty strings, got {self.stop!r}")
        _check(self.logprobs is None or (_integer(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
               f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _integer(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
