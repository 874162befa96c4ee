"""Render chat messages to a prompt with the tokenizer's Jinja chat template (tokenizer_config.json).

The environment matches what Hugging Face templates are written for: a sandbox, ``trim_blocks`` and
``lstrip_blocks``, a ``raise_exception`` global and a ``tojson`` filter.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The model has no chat template, or the template rejected the messages."""


def render_chat(template: str | None, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                **variables: Any) -> str:
    """`messages`: [{"role": str, "content": str, ...}]; `variables`: e.g. bos_token, eos_token."""
    if not template:
        raise ChatTemplateError("this model's tokenizer_config.json has no chat_template: "
                                "use /v1/completions with a plain prompt")
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **variables)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template: {exc}") from exc


def special_tokens(config: dict[str, Any]) -> dict[str, str]:
    """bos_token / eos_token / ... strings from a tokenizer config (plain or {"content": ...})."""
    out = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token = config.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str):
            out[name] = token
    return out


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(template)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from exc


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=False)
