"""Structured output on the host: grammars compiled once per spec (LRU) and per-request matchers.

llguidance compiles a `GrammarSpec` against the model's tokenizer; each constrained request
walks a copy of the cached matcher and fills its slot's row of the packed token mask.
"""

from __future__ import annotations

import collections
import json
import threading
from collections.abc import Callable, Sequence

import llguidance
import llguidance.numpy as llnp
import numpy as np
from llguidance.gbnf_to_lark import any_to_lark

from jaxserve.errors import InvalidRequestError
from jaxserve.request import GrammarSpec

# Compact JSON with one space after ':' and ',' (as json.dumps writes it): free whitespace lets
# a small model emit newlines until max_tokens at temperature 1.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_GRAMMARS = 256  # distinct compiled grammars kept
RUST_REGEX_META = set("\\.+*?()|[]{}^$#&-~")  # what Rust's regex::escape escapes


def mask_words(vocab_size: int) -> int:
    """int32 words of one packed mask row: bit t % 32 of word t // 32 = token t allowed."""
    return (vocab_size + 31) // 32


def escape_regex(text: str) -> str:
    return "".join("\\" + c if c in RUST_REGEX_META else c for c in text)


def grammar_text(spec: GrammarSpec, param: str | None = None) -> str:
    """The llguidance grammar of a spec; raises InvalidRequestError on a malformed source."""
    grammar = llguidance.LLMatcher
    if spec.kind == "json_object":
        return grammar.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if spec.kind == "json_schema":
        try:
            return grammar.grammar_from_json_schema(spec.source, defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise InvalidRequestError(f"invalid JSON schema: {exc}", param) from exc
    if spec.kind == "regex":
        return grammar.grammar_from_regex(spec.source)
    if spec.kind == "choice":
        choices = json.loads(spec.source)
        return grammar.grammar_from_regex("|".join(f"({escape_regex(c)})" for c in choices))
    try:  # GBNF (llama.cpp / xgrammar EBNF) too, as vLLM's `grammar` takes it
        source = any_to_lark(spec.source)
    except Exception as exc:  # noqa: BLE001 - its parser raises plain exceptions
        raise InvalidRequestError(f"invalid grammar: {exc}", param) from exc
    return grammar.grammar_from_lark(source)


class GrammarCache:
    """Compiled grammars by spec, least recently used dropped first; safe from any thread.

    The LLTokenizer (about 0.2 s for a 49k vocabulary, from the `tokenizer.json` text that
    `tokenizer_json()` returns) is built on first use; the server
    compiles a request's grammar on its offload threads, so the engine loop only copies it.
    """

    def __init__(
        self,
        tokenizer_json: Callable[[], str],
        vocab_size: int,
        eos_token_ids: Sequence[int],
        max_grammars: int = MAX_GRAMMARS,
    ):
        self._tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size  # the LM head's width: ids past the tokenizer stay masked
        self._eos = list(eos_token_ids)
        self._max = max_grammars
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: collections.OrderedDict[GrammarSpec, llguidance.LLMatcher] = (
            collections.OrderedDict()
        )
        self.num_compiled = 0  # grammars compiled (cache misses)

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.LLTokenizer(
                    self._tokenizer_json(), n_vocab=self.vocab_size, eos_token=self._eos or None
                )
            return self._tokenizer

    def compile(self, spec: GrammarSpec, param: str | None = None) -> llguidance.LLMatcher:
        """The spec's compiled matcher (shared: copy it); InvalidRequestError with the reason,
        naming `param` (the request field the spec came from)."""
        with self._lock:
            if spec in self._compiled:
                self._compiled.move_to_end(spec)
                return self._compiled[spec]
        text = grammar_text(spec, param)
        # Compiling drops the GIL; two threads may compile one spec at once, harmlessly.
        matcher = llguidance.LLMatcher(self.tokenizer, text, log_level=0)
        if matcher.is_error():
            error = matcher.get_error()
            raise InvalidRequestError(f"invalid {spec.kind.replace('_', ' ')}: {error}", param)
        with self._lock:
            self.num_compiled += 1
            self._compiled[spec] = matcher
            while len(self._compiled) > self._max:
                self._compiled.popitem(last=False)
        return matcher

    def matcher(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """A fresh matcher at the grammar's start."""
        return self.compile(spec).deep_copy()


class TokenMasks:
    """The running constrained requests' matchers and the packed mask they fill each step.

    `bits` is [num_slots, ceil(V / 32)] int32, all ones (-1) in every row but those being
    constrained this step. The engine loop is the only caller.
    """

    def __init__(self, grammars: GrammarCache, num_slots: int):
        self.grammars = grammars
        self.bits = np.full((num_slots, mask_words(grammars.vocab_size)), -1, np.int32)
        self._matchers: dict[str, llguidance.LLMatcher] = {}
        self._executor = llguidance.LLExecutor()
        self._dirty: list[int] = []  # rows filled last step, reset before the next fill
        self.num_rejected = 0  # sampled tokens a matcher refused (a masking bug if ever > 0)

    def add(self, request_id: str, spec: GrammarSpec) -> None:
        self._matchers[request_id] = self.grammars.matcher(spec)

    def remove(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._matchers

    def __len__(self) -> int:
        return len(self._matchers)

    def fill(self, rows: Sequence[tuple[int, str]]) -> np.ndarray | None:
        """Masks for this step's sampled rows, as (slot, request_id); None if none constrained."""
        self.bits[self._dirty] = -1
        targets = [(m, slot) for slot, rid in rows if (m := self._matchers.get(rid)) is not None]
        self._dirty = [slot for _, slot in targets]
        if not targets:
            return None
        llnp.fill_next_token_bitmask_par(self._executor, targets, self.bits)
        return self.bits

    def advance(self, request_id: str, token: int) -> bool:
        """Feed a sampled token; True when the output is complete (or the matcher failed)."""
        matcher = self._matchers.get(request_id)
        if matcher is None:
            return False
        if not matcher.consume_token(token):
            self.num_rejected += 1
            return True
        return matcher.is_stopped()
