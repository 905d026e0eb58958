"""Incremental detokenization and stop strings with the real tokenizer."""

from __future__ import annotations

import pytest

from jaxserve.detokenize import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tok(engine):
    return engine.tokenizer


def stream(tok, ids, stop=()):
    d = IncrementalDetokenizer(tok, stop)
    pieces = []
    for i in ids:
        d.add(i)
        pieces.append(d.take())
        if d.stopped:
            break
    pieces.append(d.take(final=True))
    return pieces, d


TEXTS = ["Hello, world! 12345 ünïcødé → 日本語 🎉🎉", "  leading spaces\n\tand tabs", "a" * 50]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_full_decode(tok, text):
    ids = tok.encode(text)
    pieces, _ = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)  # never half a character


def test_special_tokens_skipped_and_window_stays_small(tok):
    ids = tok.encode("one two") + [tok.eos_token_ids[0]] * 200 + tok.encode(" three")
    pieces, d = stream(tok, ids)
    assert "".join(pieces) == "one two three"
    assert d._read_offset - d._prefix_offset <= 2  # advanced by offset, not re-decoding all


def test_stop_string_split_across_tokens_is_never_emitted(tok):
    text = "The answer is forty-two. END of story"
    ids = tok.encode(text)
    pieces, d = stream(tok, ids, stop=("END",))
    assert d.stopped
    assert "".join(pieces) == "The answer is forty-two. "
    assert not any("E" in p for p in pieces)  # not even the first letter leaked early


def test_earliest_of_several_stop_strings_wins(tok):
    ids = tok.encode("alpha beta gamma delta")
    pieces, _ = stream(tok, ids, stop=("delta", "beta"))
    assert "".join(pieces) == "alpha "


def test_held_back_prefix_is_released_when_it_cannot_match(tok):
    ids = tok.encode("x = a + b; x = c")
    pieces, d = stream(tok, ids, stop=("x = a + b + c",))
    assert not d.stopped
    assert "".join(pieces) == "x = a + b; x = c"
