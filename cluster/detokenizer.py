"""Incremental detokenization with stop strings (torch-free).

Text is released as soon as it can no longer change: an incomplete UTF-8 character at the end, or
a tail that might be the start of a stop string, is held back until the next token decides it.
"""

from __future__ import annotations

from typing import Callable

_INCOMPLETE = "\ufffd"


class IncrementalText:
    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...]) -> None:
        self.decode, self.stop = decode, stop
        self.text = ""  # full visible text so far (never contains a stop string)
        self.emitted = 0  # characters of `text` already released

    def update(self, output_ids: list[int], final: bool = False) -> tuple[str, bool]:
        """Decode all output; returns (newly released text, whether a stop string was hit)."""
        text = self.decode(output_ids)
        hit = self._find_stop(text)
        if hit is not None:
            self.text = text[:hit]
            return self._release(len(self.text)), True
        self.text = text
        if final:
            return self._release(len(text)), False
        return self._release(len(text) - self._holdback(text)), False

    def _release(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        delta = self.text[self.emitted:upto]
        self.emitted = upto
        return delta

    def _find_stop(self, text: str) -> int | None:
        if not self.stop:
            return None
        start = max(0, self.emitted - max(len(s) for s in self.stop))
        found = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _holdback(self, text: str) -> int:
        """Characters at the end of `text` that are not final yet."""
        n = len(text) - len(text.rstrip(_INCOMPLETE))
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    n = max(n, k)
                    break
        return n
