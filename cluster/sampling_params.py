"""SamplingParams: per-request decoding settings, validated on construction (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on a logit_bias value
MAX_PENALTY = 2.0  # OpenAI's bound on presence and frequency penalties (either sign)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 disable those filters; `logprobs` N asks for
    each sampled token's log-probability and the N most likely alternatives (None: none);
    `prompt_logprobs` N the same for every prompt token after the first (scoring a text).
    `stop_token_ids` end the request as eos does, even with `ignore_eos`; until `min_tokens` tokens
    are out, eos and the stop tokens cannot be drawn and stop strings are not looked for.

    Before temperature and the filters (greedy included), the logits are adjusted as OpenAI and vLLM
    do (cluster/logits_processors.py): `logit_bias` ((token id, bias) pairs) is added; a token already
    in the prompt or the output has its logit divided by `repetition_penalty` when positive, multiplied
    when negative (1: off); each token of the output so far lowers its logit by `frequency_penalty`
    per occurrence plus `presence_penalty` once."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    prompt_logprobs: int | None = None  # each prompt token's logprob and N alternatives
    stop_token_ids: tuple[int, ...] = ()  # tokens that end the request as eos does (kept in the output)
    min_tokens: int = 0  # tokens before eos, a stop token or a stop string may end the request

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
        _check(self.prompt_logprobs is None
               or (_integer(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
               f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_number(value) and -MAX_PENALTY <= value <= MAX_PENALTY,
                   f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value!r}")
        _check(_number(self.repetition_penalty) and 0.0 < self.repetition_penalty < float("inf"),
               f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}")
        _check(isinstance(self.logit_bias, tuple) and all(
            isinstance(pair, tuple) and len(pair) == 2 and _integer(pair[0]) and pair[0] >= 0 and _number(pair[1])
            and abs(pair[1]) <= MAX_LOGIT_BIAS for pair in self.logit_bias),
            f"logit_bias must be (token id >= 0, bias in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]) pairs, "
            f"got {self.logit_bias!r}")
        _check(isinstance(self.stop_token_ids, tuple) and all(_integer(t) and t >= 0 for t in self.stop_token_ids),
               f"stop_token_ids must be a tuple of token ids >= 0, got {self.stop_token_ids!r}")
        _check(_integer(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
               f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Whether any logit bias, penalty or minimum length is set."""
        return bool(self.logit_bias) or bool(self.presence_penalty) or bool(self.frequency_penalty) \
            or self.repetition_penalty != 1.0 or self.min_tokens > 0


def _integer(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
