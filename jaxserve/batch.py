"""Turns a StepPlan into fixed-shape numpy batches: padding, buckets, page tables.

This is the only place that knows how requests map onto padded device rows.
"""

from __future__ import annotations

import numpy as np

from jaxserve.config import SchedulerConfig
from jaxserve.request import Request
from jaxserve.scheduler import PrefillChunk, _round_up
from jaxserve.state import DecodeBatch, PrefillBatch, SeqSampling


def smallest_bucket(n: int, buckets: tuple[int, ...]) -> int:
    for b in sorted(buckets):
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {max(buckets)}")


def seed32(seed: int) -> int:
    """Fold a 64-bit seed into the uint32 the device PRNG takes."""
    return (seed ^ (seed >> 32)) & 0xFFFFFFFF


class BatchBuilder:
    def __init__(self, cfg: SchedulerConfig, page_size: int):
        self.cfg = cfg
        self.page_size = page_size
        self.num_slots = cfg.max_running_requests
        self.max_pages = -(-cfg.max_model_len // page_size)
        # Decode runs the first n slots for a few n; the largest is always all slots.
        self.decode_batch_buckets = tuple(
            sorted({b for b in cfg.decode_batch_buckets if b < self.num_slots} | {self.num_slots})
        )

    def prefill(self, chunks: list[PrefillChunk]) -> PrefillBatch:
        cfg, block = self.cfg, self.cfg.prefill_block
        s = cfg.max_prefill_seqs
        used = sum(_round_up(c.length, block) for c in chunks)
        t = smallest_bucket(used, cfg.prefill_buckets)
        tokens = np.zeros((t,), np.int32)
        positions = np.full((t,), -1, np.int32)
        token_seq = np.full((t,), s, np.int32)
        is_output = np.zeros((t,), np.bool_)
        page_table = np.zeros((s, self.max_pages), np.int32)
        block_seq = np.zeros((t // block,), np.int32)
        last_idx = np.zeros((s,), np.int32)
        seq_slot = np.full((s,), self.num_slots, np.int32)
        is_first = np.zeros((s,), np.bool_)
        do_sample = np.zeros((s,), np.bool_)
        sampling = SeqSampling.empty(s)
        off = 0
        for i, c in enumerate(chunks):
            req = c.request
            ids = req.all_token_ids[c.start : c.start + c.length]
            end = off + c.length
            tokens[off:end] = ids
            positions[off:end] = np.arange(c.start, c.start + c.length)
            token_seq[off:end] = i
            n_prompt = len(req.prompt_token_ids)
            is_output[off:end] = positions[off:end] >= n_prompt
            page_table[i, : len(req.pages)] = req.pages
            nxt = off + _round_up(c.length, block)
            block_seq[off // block : nxt // block] = i
            last_idx[i] = end - 1
            seq_slot[i] = req.slot
            is_first[i] = c.is_first
            do_sample[i] = c.is_last
            self._write_sampling(sampling, i, req)
            off = nxt
        return PrefillBatch(
            tokens,
            positions,
            token_seq,
            is_output,
            page_table,
            block_seq,
            last_idx,
            seq_slot,
            is_first,
            do_sample,
            sampling,
        )

    @staticmethod
    def _write_sampling(out: SeqSampling, i: int, req: Request) -> None:
        p = req.params
        out.temperature[i] = p.temperature
        out.top_k[i] = p.top_k
        out.top_p[i] = p.top_p
        out.min_p[i] = p.min_p
        out.repetition_penalty[i] = p.repetition_penalty
        out.presence_penalty[i] = p.presence_penalty
        out.frequency_penalty[i] = p.frequency_penalty
        out.seed[i] = seed32(req.seed)

    def decode(self, reqs: list[Request]) -> DecodeBatch:
        """Rows are slots 0..n-1, n the smallest batch bucket holding every running slot."""
        n = smallest_bucket(max(r.slot for r in reqs) + 1, self.decode_batch_buckets)
        positions = np.full((n,), -1, np.int32)
        # Full width: attention walks only as many pages as the longest row needs.
        page_table = np.zeros((n, self.max_pages), np.int32)
        for r in reqs:
            positions[r.slot] = r.num_computed  # the input token's position
            page_table[r.slot, : len(r.pages)] = r.pages
        return DecodeBatch(positions, page_table)

    def mixed_prefill_buckets(self) -> tuple[int, ...]:
        """Prefill buckets a MIXED step can use (none when mixing is off)."""
        cfg = self.cfg
        if not cfg.enable_mixed_steps or cfg.policy != "continuous":
            return ()
        return tuple(b for b in cfg.prefill_buckets if b <= cfg.mixed_step_tokens)

    def warmup_batches(self) -> list[tuple[DecodeBatch | None, PrefillBatch | None]]:
        """All-padding (decode, prefill) parts, one pair per compiled step function:
        every prefill bucket alone (EXTEND), every decode bucket alone (DECODE), and every
        decode bucket with every prefill bucket that fits a MIXED step."""
        prefills = {t: self._empty_prefill(t) for t in self.cfg.prefill_buckets}
        decodes = [
            DecodeBatch(np.full((n,), -1, np.int32), np.zeros((n, self.max_pages), np.int32))
            for n in self.decode_batch_buckets
        ]
        pairs: list[tuple[DecodeBatch | None, PrefillBatch | None]]
        pairs = [(None, p) for p in prefills.values()] + [(d, None) for d in decodes]
        pairs += [(d, prefills[t]) for d in decodes for t in self.mixed_prefill_buckets()]
        return pairs

    def _empty_prefill(self, t: int) -> PrefillBatch:
        s, block = self.cfg.max_prefill_seqs, self.cfg.prefill_block
        return PrefillBatch(
            np.zeros((t,), np.int32),
            np.full((t,), -1, np.int32),
            np.full((t,), s, np.int32),
            np.zeros((t,), np.bool_),
            np.zeros((s, self.max_pages), np.int32),
            np.zeros((t // block,), np.int32),
            np.zeros((s,), np.int32),
            np.full((s,), self.num_slots, np.int32),
            np.zeros((s,), np.bool_),
            np.zeros((s,), np.bool_),
            SeqSampling.empty(s),
        )
