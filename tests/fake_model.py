"""A tiny hand-computable stand-in for the device runner, for scheduler and engine tests.

Its "KV cache" stores token ids in the real page layout; the next token is the sum of every
token the sequence has, each weighted by its position + 1, read back through its page table,
modulo VOCAB. A wrong, leaked, overwritten or misordered page changes the output, so the
paging is checked, not assumed.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.runner import StepResult
from jaxserve.state import DecodeBatch, PrefillBatch

VOCAB = 97
EOS = 0
FAKE_MODEL = ModelConfig(
    vocab_size=VOCAB,
    hidden_size=1,
    intermediate_size=1,
    num_layers=1,
    num_heads=1,
    num_kv_heads=1,
    head_dim=1,
    eos_token_ids=(EOS,),
)


def next_token(seq) -> int:
    """The fake model: position-weighted sum of the sequence, modulo VOCAB."""
    return int(sum((i + 1) * int(t) for i, t in enumerate(seq)) % VOCAB)


def expected_tokens(prompt: list[int], max_tokens: int) -> list[int]:
    """What the fake model generates for `prompt`, computed without any engine."""
    seq, out = list(prompt), []
    for _ in range(max_tokens):
        nxt = next_token(seq)
        out.append(nxt)
        seq.append(nxt)
        if nxt == EOS:
            break
    return out


class FakeTokenizer:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(
            chr(ord("a") + i % 26) for i in ids if not (skip_special_tokens and i == EOS)
        )


class FakeRunner:
    def __init__(self, num_pages: int, page_size: int, num_slots: int):
        self.store = np.full((num_pages * page_size,), -1, np.int64)
        self.page_size = page_size
        self.slot_tokens = np.zeros((num_slots,), np.int64)
        self.num_compiles = 0
        self.calls: list[str] = []

    def _read(self, pages: np.ndarray, length: int) -> np.ndarray:
        pos = np.arange(length)
        return self.store[pages[pos // self.page_size] * self.page_size + pos % self.page_size]

    def _result(self, tokens: np.ndarray) -> StepResult:
        r = len(tokens)
        return StepResult(
            tokens.astype(np.int32),
            np.zeros(r, np.float32),
            np.zeros((r, 20), np.int32),
            np.zeros((r, 20), np.float32),
            0.0,
        )

    def run(self, decode: DecodeBatch | None, prefill: PrefillBatch | None) -> StepResult:
        """Rows: the decode part's n slots, then the prefill part's sequences."""
        self.calls.append(
            "mixed"
            if decode is not None and prefill is not None
            else "decode"
            if decode is not None
            else "prefill"
        )
        parts = []
        if decode is not None:
            parts.append(self._decode(decode))
        if prefill is not None:
            parts.append(self._prefill(prefill))
        return self._result(np.concatenate(parts))

    def _prefill(self, b: PrefillBatch) -> np.ndarray:
        ps = self.page_size
        for t in np.nonzero(b.positions >= 0)[0]:
            pos = b.positions[t]
            page = b.page_table[b.token_seq[t], pos // ps]
            self.store[page * ps + pos % ps] = b.tokens[t]
        out = np.zeros(len(b.seq_slot), np.int64)
        for i, slot in enumerate(b.seq_slot):
            if slot >= len(self.slot_tokens) or not b.do_sample[i]:
                continue
            n = b.positions[b.last_idx[i]] + 1
            seq = self._read(b.page_table[i], n)
            assert (seq >= 0).all(), "read a position that was never written"
            out[i] = next_token(seq)
            self.slot_tokens[slot] = out[i]
        return out

    def permute_slots(self, perm: np.ndarray) -> None:
        self.calls.append("permute")
        self.slot_tokens = self.slot_tokens[perm]

    def _decode(self, b: DecodeBatch) -> np.ndarray:
        ps, n = self.page_size, len(b.positions)
        out = self.slot_tokens[:n].copy()
        for slot in np.nonzero(b.positions >= 0)[0]:
            pos = b.positions[slot]
            self.store[b.page_table[slot, pos // ps] * ps + pos % ps] = self.slot_tokens[slot]
            seq = self._read(b.page_table[slot], pos + 1)
            assert (seq >= 0).all(), "read a position that was never written"
            out[slot] = next_token(seq)
        self.slot_tokens[:n] = out
        return out


class GroupedFakeRunner:
    """What the mesh runner does, on the host: one FakeRunner per dp group, each owning only
    its group's pages and slots and seeing only its slice of every batch (local ids). A page
    or slot of the wrong group reads never-written K/V or another request's tokens."""

    def __init__(self, dp: int, num_pages: int, page_size: int, slots: int):
        self.dp, self.slots = dp, slots
        self.groups = [FakeRunner(num_pages, page_size, slots) for _ in range(dp)]
        self.num_compiles = 0

    def run(self, decode, prefill) -> StepResult:
        parts = []
        for g, runner in enumerate(self.groups):
            piece = jax.tree.map(lambda a, g=g: np.split(a, self.dp)[g], (decode, prefill))
            parts.append(runner.run(*piece))
        fields = ("tokens", "logprobs", "top_ids", "top_logprobs")
        return StepResult(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in fields), device_s=0.0
        )

    def permute_slots(self, perm: np.ndarray) -> None:
        offsets = np.arange(self.dp)[:, None] * self.slots
        local = np.asarray(perm).reshape(self.dp, self.slots) - offsets
        assert ((local >= 0) & (local < self.slots)).all(), "a slot moved across dp groups"
        for runner, p in zip(self.groups, local, strict=True):
            runner.permute_slots(p)
