"""OpenAI-compatible completions and chat over an AsyncLLMEngine (framework-free; serve_app routes to it).

A request becomes one engine request per (prompt, choice). All of them are admitted, and their first
outputs awaited, before a response starts: a bad parameter, a prompt that does not fit or an
overloaded engine is an HTTP error status, never a broken stream. Closing a response stream (client
disconnect) cancels its readers, which aborts every engine request behind it.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator

from cluster.async_engine import AsyncLLMEngine
from cluster.chat_template import ChatTemplateError, render_chat, special_tokens
from cluster.openai_logprobs import (ChatLogprobs, CompletionLogprobs, chat_logprobs, completion_logprobs,
                                     prompt_completion_logprobs)
from cluster.openai_responses import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse, ChatDelta,
    CompletionChoice, CompletionResponse, DetokenizeResponse, ModelCard, ModelList, TokenizeResponse, Usage, new_id,
    now)
from cluster.openai_schema import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from cluster.openai_streams import (DONE, OpenAIError, Stream, ended as _ended, error_for, finals as _finals,
                                    merge as _merge, parse, sampling_params as _params, sse as _sse,
                                    usage as _usage)
from cluster.request import RequestOutput
from cluster.sampling_params import SamplingParams

@dataclass(frozen=True, slots=True)
class _Choice:
    """One engine request of an HTTP request."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    echo: str  # text put in front of the completion ("" unless echo)


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name
        self.created = now()

    # ---- models ------------------------------------------------------------------------------
    def models(self) -> ModelList:
        return ModelList(data=[self.model_card()])

    def model_card(self, model_id: str | None = None) -> ModelCard:
        self._check_model(model_id)
        return ModelCard(id=self.model_name, created=self.created, root=self.model_name,
                         max_model_len=self.engine.max_model_len)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise OpenAIError(404, f"The model '{model}' does not exist (this server serves "
                              f"'{self.model_name}')", param="model", code="model_not_found")

    # ---- requests in ---------------------------------------------------------------------------
    def _tokenize(self, prompt: str | list[int], param: str) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        if self.engine.tokenizer is None:
            raise OpenAIError(400, "this model has no tokenizer: send the prompt as token ids", param=param)
        return self.engine.tokenizer.encode(prompt)

    def _choices(self, req: CompletionRequest | ChatCompletionRequest, prompts: list[list[int]],
                 max_tokens: int | None, echo: list[str], param: str, logprobs: int | None,
                 prompt_logprobs: int | None = None) -> list[_Choice]:
        limit = self.engine.max_model_len
        choices = []
        for p, ids in enumerate(prompts):
            want = max_tokens if max_tokens is not None else limit - len(ids)
            if len(ids) + want > limit or want < 1:
                raise OpenAIError(400, f"this model's context is {limit} tokens; the request needs "
                                  f"{len(ids)} prompt + {max(want, 1)} completion tokens",
                                  param=param, code="context_length_exceeded")
            for j in range(req.n):
                seed = None if req.seed is None else (req.seed + j) % 2**63
                top_k = req.top_k if req.top_k and req.top_k > 0 else 0
                temperature = 1.0 if req.temperature is None else req.temperature
                params = _params(max_tokens=want, temperature=temperature, top_p=req.top_p or 1.0,
                                 top_k=top_k, seed=seed, stop=req.stop_strings, ignore_eos=req.ignore_eos,
                                 logprobs=logprobs, prompt_logprobs=prompt_logprobs, **req.extra_sampling)
                choices.append(_Choice(p * req.n + j, ids, params, echo[p]))
        return choices

    async def _open(self, choices: list[_Choice]) -> list[Stream]:
        """Admit every choice and wait for its first output; on any error, abort them all."""
        gens = [self.engine.generate(c.prompt_ids, c.params) for c in choices]
        firsts = await asyncio.gather(*(anext(g) for g in gens), return_exceptions=True)
        failed = [f for f in firsts if isinstance(f, BaseException)]
        if failed:
            for g in gens:
                await g.aclose()
            err = error_for(failed[0])
            raise err if err is not None else failed[0]
        for first in firsts:
            if first.finish_reason in ("error", "abort"):
                for g in gens:
                    await g.aclose()
                raise _ended(first)
        return list(zip(firsts, gens))

    # ---- /v1/completions -----------------------------------------------------------------------
    async def completions(self, body: bytes) -> CompletionResponse | AsyncIterator[str]:
        req = parse(CompletionRequest, body)
        self._check_model(req.model)
        prompts = [self._tokenize(p, "prompt") for p in req.prompts]
        echo = [self._echo(p, ids) if req.echo else "" for p, ids in zip(req.prompts, prompts)]
        scored = req.logprobs if req.echo else None  # echo with logprobs: the prompt's logprobs too
        choices = self._choices(req, prompts, req.max_tokens, echo, "prompt", req.logprobs, scored)
        streams = await self._open(choices)
        rid, usage_prompt = new_id("cmpl"), sum(len(ids) for ids in prompts)
        if req.stream:
            return self._completion_events(req, rid, choices, streams, usage_prompt)
        finals = await _finals(streams)
        return CompletionResponse(
            id=rid, created=now(), model=self.model_name,
            choices=[CompletionChoice(index=c.index, text=c.echo + f.text, finish_reason=f.finish_reason,
                                      logprobs=self._with_prompt(c, f, self._completion_logprobs(f.logprobs,
                                                                                                 len(c.echo))))
                     for c, f in zip(choices, finals)],
            usage=_usage(usage_prompt, finals))

    def _decode(self, ids: list[int]) -> str:
        return self.engine.tokenizer.decode(ids) if self.engine.tokenizer is not None else str(ids[0])

    def _completion_logprobs(self, lps: tuple | None, offset: int) -> CompletionLogprobs | None:
        return None if lps is None else completion_logprobs(lps, self._decode, offset)

    def _with_prompt(self, choice: _Choice, out: RequestOutput,
                     logprobs: CompletionLogprobs | None) -> CompletionLogprobs | None:
        """The echoed prompt's logprobs in front of the completion's (echo with logprobs)."""
        if out.prompt_logprobs is None or logprobs is None:
            return logprobs
        return prompt_completion_logprobs(choice.prompt_ids, out.prompt_logprobs, self._decode) + logprobs

    def _chat_logprobs(self, lps: tuple | None) -> ChatLogprobs | None:
        return None if lps is None else chat_logprobs(lps, self._decode)

    def _echo(self, prompt: str | list[int], ids: list[int]) -> str:
        if isinstance(prompt, str):
            return prompt
        return self.engine.tokenizer.decode(ids) if self.engine.tokenizer is not None else ""

    async def _completion_events(self, req: CompletionRequest, rid: str, choices: list[_Choice],
                                 streams: list[Stream], usage_prompt: int) -> AsyncIterator[str]:
        created, last = now(), {}
        pending_echo = {c.index: c.echo for c in choices}
        offsets = {c.index: len(c.echo) for c in choices}  # where the next token's text starts
        async with aclosing(_merge(streams)) as outputs:
            async for i, out in outputs:
                last[i] = out
                if out.finish_reason in ("error", "abort"):
                    yield _sse(_ended(out).body)
                    break
                index = choices[i].index
                echoing = index in pending_echo  # the choice's first chunk
                text = pending_echo.pop(index, "") + out.new_text
                logprobs = self._completion_logprobs(out.new_logprobs, offsets[index])
                if logprobs is not None:
                    offsets[index] += sum(len(t) for t in logprobs.tokens)
                    if echoing:
                        logprobs = self._with_prompt(choices[i], out, logprobs)
                if text or out.finished or (logprobs is not None and logprobs.tokens):
                    choice = CompletionChoice(index=index, text=text, finish_reason=out.finish_reason,
                                              logprobs=logprobs)
                    yield _sse(CompletionResponse(id=rid, created=created, model=self.model_name, choices=[choice]))
            else:
                if req.include_usage:
                    yield _sse(CompletionResponse(id=rid, created=created, model=self.model_name, choices=[],
                                                  usage=_usage(usage_prompt, list(last.values()))))
        yield DONE

    # ---- /v1/chat/completions ------------------------------------------------------------------
    async def chat(self, body: bytes) -> ChatCompletionResponse | AsyncIterator[str]:
        req = parse(ChatCompletionRequest, body)
        self._check_model(req.model)
        ids = self._tokenize(self._render(req.messages, req.add_generation_prompt), "messages")
        choices = self._choices(req, [ids], req.token_limit, [""], "messages", req.logprob_count)
        streams = await self._open(choices)
        rid = new_id("chatcmpl")
        if req.stream:
            return self._chat_events(req, rid, streams, len(ids))
        finals = await _finals(streams)
        return ChatCompletionResponse(
            id=rid, created=now(), model=self.model_name,
            choices=[ChatChoice(index=i, message=AssistantMessage(content=f.text), finish_reason=f.finish_reason,
                                logprobs=self._chat_logprobs(f.logprobs))
                     for i, f in enumerate(finals)],
            usage=_usage(len(ids), finals))

    def _render(self, messages: list, add_generation_prompt: bool) -> str:
        tok = self.engine.tokenizer
        try:
            if tok is None:
                raise ChatTemplateError("this model has no tokenizer, so no chat template")
            return render_chat(tok.chat_template, [m.as_template_input() for m in messages], add_generation_prompt,
                               **special_tokens(tok.config))
        except ChatTemplateError as exc:
            raise OpenAIError(400, str(exc), param="messages") from None

    # ---- tokenizer routes (vLLM's) -------------------------------------------------------------
    async def tokenize(self, body: bytes) -> TokenizeResponse:
        """The token ids a completion prompt, or chat messages with the template, become."""
        req = parse(TokenizeRequest, body)
        self._check_model(req.model)
        if req.prompt is not None:
            ids = self._tokenize(req.prompt, "prompt")
        else:
            ids = self._tokenize(self._render(req.messages, req.add_generation_prompt), "messages")
        return TokenizeResponse(count=len(ids), max_model_len=self.engine.max_model_len, tokens=ids)

    async def detokenize(self, body: bytes) -> DetokenizeResponse:
        req = parse(DetokenizeRequest, body)
        self._check_model(req.model)
        if self.engine.tokenizer is None:
            raise OpenAIError(400, "this model has no tokenizer", param="tokens")
        vocab = self.engine.spec.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise OpenAIError(400, f"token ids out of range [0, {vocab}): {bad[:5]}", param="tokens")
        return DetokenizeResponse(prompt=self.engine.tokenizer.decode(req.tokens))

    async def _chat_events(self, req: ChatCompletionRequest, rid: str, streams: list[Stream],
                           usage_prompt: int) -> AsyncIterator[str]:
        created, last = now(), {}

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return _sse(ChatCompletionChunk(id=rid, created=created, model=self.model_name, choices=choices,
                                            usage=usage))

        for i in range(len(streams)):
            yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
        async with aclosing(_merge(streams)) as outputs:
            async for i, out in outputs:
                last[i] = out
                if out.finish_reason in ("error", "abort"):
                    yield _sse(_ended(out).body)
                    break
                logprobs = self._chat_logprobs(out.new_logprobs) if out.new_token_ids else None
                if out.new_text or out.finished or logprobs is not None:
                    delta = ChatDelta(content=out.new_text) if out.new_text else ChatDelta()
                    yield chunk([ChatChunkChoice(index=i, delta=delta, finish_reason=out.finish_reason,
                                                 logprobs=logprobs)])
            else:
                if req.include_usage:
                    yield chunk([], _usage(usage_prompt, list(last.values())))
        yield DONE
