"""The model's tokenizer: `tokenizer.json` (HF tokenizers) plus `tokenizer_config.json`."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from experts.errors import CheckpointError


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, config: dict) -> None:
        self.tok, self.config = tokenizer, config
        self.eos_token_id = self._token_id(config.get("eos_token"))
        self.bos_token_id = self._token_id(config.get("bos_token"))
        self.chat_template: str | None = config.get("chat_template")

    def _token_id(self, token) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        return self.tok.token_to_id(token) if isinstance(token, str) else None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if self.config.get("add_bos_token") and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(model_dir: str | Path) -> TextTokenizer | None:
    """None when the directory has no tokenizer.json (the engine then takes token ids only)."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        raise CheckpointError(f"{path}: cannot load tokenizer ({exc})") from exc
    config_path = model_dir / "tokenizer_config.json"
    config = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_path}: corrupt JSON ({exc})") from exc
    return TextTokenizer(tok, config)
