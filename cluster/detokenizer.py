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
        self._done = ""  # the text of output_ids[:_read], final
        self._prefix = self._read = 0  # the decode window starts at _prefix; _read tokens are in _done

    def update(self, output_ids: list[int], final: bool = False, check_stop: bool = True) -> tuple[str, bool]:
        """Decode the output; returns (newly released text, whether a stop string was hit). With
        check_stop False (the output is shorter than min_tokens) stop strings are neither looked for
        nor held back; afterwards they are looked for in the text not yet released (and across its edge)."""
        text = self._decoded(output_ids)
        hit = self._find_stop(text) if check_stop else None
        if hit is not None:
            self.text = text[:hit]
            return self._release(len(self.text)), True
        self.text = text
        if final:
            return self._release(len(text)), False
        return self._release(len(text) - self._holdback(text, check_stop)), False

    def _decoded(self, ids: list[int]) -> str:
        """decode(ids), decoding only the tokens since the last complete text and the chunk before
        them (context: a leading space, a character split across tokens). A whole decode per step
        grows with the output: 0.46 ms a step at 4,000 tokens with the demo tokenizer. When the
        context changes how the earlier chunk decodes, it falls back to decoding everything."""
        if len(ids) < self._read:  # not the same output: start over
            self._done, self._prefix, self._read = "", 0, 0
        before = self.decode(ids[self._prefix:self._read])
        window = self.decode(ids[self._prefix:])
        if not window.startswith(before):
            text = self.decode(ids)
            if not text.endswith(_INCOMPLETE):
                self._done, self._prefix, self._read = text, self._read, len(ids)
            return text
        tail = window[len(before):]
        if tail and not tail.endswith(_INCOMPLETE):  # complete: the next window starts at this chunk
            self._done += tail
            self._prefix, self._read = self._read, len(ids)
            return self._done
        return self._done + tail

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

    def _holdback(self, text: str, check_stop: bool = True) -> int:
        """Characters at the end of `text` that are not final yet."""
        n = len(text) - len(text.rstrip(_INCOMPLETE))
        for s in self.stop if check_stop else ():
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    n = max(n, k)
                    break
        return n
