"""Incremental detokenization by token offset, with stop strings held back until they can't match.

Decodes only a short window per token (vLLM's prefix/read offsets); a stop string is never
emitted, even when it is split across tokens.
"""

from __future__ import annotations

from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: Decoder, stop: tuple[str, ...] = (), skip_special_tokens: bool = True
    ):
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_special = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # all text decoded so far (emitted or held back)
        self.emitted = 0  # characters of `text` already handed out
        self._prefix_offset = 0
        self._read_offset = 0
        self.stopped = False  # a stop string matched; `text` is cut just before it

    def add(self, token_id: int) -> None:
        """Append one token and extend `text` (may cut it at a stop string)."""
        if self.stopped:
            return
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self._prefix_offset : self._read_offset], self.skip_special)
        full = decode(self.ids[self._prefix_offset :], self.skip_special)
        if full.endswith("\ufffd"):
            return  # an incomplete UTF-8 sequence: wait for the next byte token
        # Advance by token offset even when nothing new is visible (special tokens decode to
        # ""), so the window never grows and decoding stays linear.
        self.text += full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.ids)
        if self.stop:
            self._check_stop()

    def _check_stop(self) -> None:
        longest = max(len(s) for s in self.stop)
        start = max(0, self.emitted - longest)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _safe_end(self) -> int:
        """End of the text that can't be the start of a stop string."""
        if self.stopped or not self.stop:
            return len(self.text)
        for k in range(min(len(self.text), max(len(s) for s in self.stop) - 1), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return len(self.text) - k
        return len(self.text)

    def take(self, final: bool = False) -> str:
        """New text to hand out; on `final` also whatever was held back."""
        end = len(self.text) if final else max(self.emitted, self._safe_end())
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
