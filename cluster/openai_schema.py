"""OpenAI-compatible request schemas (pydantic), as vLLM and ray.serve.llm clients send them (the
responses: cluster/openai_responses.py).

Requests are strict (no string-to-number coercion) and forbid unknown fields, so a typo is a 400
naming the field rather than a silently ignored setting. Parameters the engine cannot honour
(suffix, best_of > 1) are rejected when set, never ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_PENALTY

MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # prompts x n per request
MAX_STOP = 16
MAX_REPETITION_PENALTY = 10.0
StopString = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[int], Field(min_length=1)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingRequest(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None  # None: the served model
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # None: 1.0; 0 is greedy
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # vLLM extension; -1 and 0 disable it
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM extension
    user: str | None = None  # accepted for compatibility; not used
    presence_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)  # None: 0
    frequency_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    repetition_penalty: float | None = Field(None, gt=0.0, le=MAX_REPETITION_PENALTY)  # vLLM extension; None: 1
    logit_bias: dict[str, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] | None = None
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_STOP)] | None = None  # vLLM
    min_tokens: int = Field(0, ge=0)  # vLLM extension

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        bad = [key for key in value or {} if not (key.isascii() and key.isdigit())]
        if bad:
            raise ValueError(f"keys must be token ids (non-negative integers as strings), got {bad[:5]}")
        return value

    @property
    def extra_sampling(self) -> dict:
        """The SamplingParams fields set beyond the basic ones: penalties, logit bias, stop tokens, min_tokens."""
        out = {name: getattr(self, name) for name in ("presence_penalty", "frequency_penalty", "repetition_penalty")
               if getattr(self, name) is not None}
        if self.logit_bias:
            out["logit_bias"] = tuple((int(k), float(v)) for k, v in self.logit_bias.items())
        if self.stop_token_ids:
            out["stop_token_ids"] = tuple(self.stop_token_ids)
        if self.min_tokens:
            out["min_tokens"] = self.min_tokens
        return out

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingRequest):
    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: int | None = Field(16, ge=1)  # None: up to the context length
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # alternatives per token, besides the chosen
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix is not supported by this server")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("best_of > 1 is not supported by this server")
        return value

    @model_validator(mode="after")
    def _bounded(self) -> "CompletionRequest":
        if len(self.prompts) * self.n > MAX_CHOICES:
            raise ValueError(f"prompts x n must be <= {MAX_CHOICES}")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts, each text or token ids."""
        p = self.prompt
        if isinstance(p, str) or isinstance(p[0], int):
            return [p]
        return list(p)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        message = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1)  # None: up to the context length
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name; wins when both are set
    add_generation_prompt: bool = True  # vLLM extension
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self

    @property
    def logprob_count(self) -> int | None:
        """Alternatives per token for the engine; None when logprobs are off."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TokenizeRequest(_Request):
    """vLLM's POST /tokenize: a completion prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_generation_prompt: bool = True  # with messages

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Request):
    """vLLM's POST /detokenize: token ids -> text."""

    model: str | None = None
    tokens: list[int]


