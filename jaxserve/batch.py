"""Turns a StepPlan into fixed-shape numpy batches: padding, buckets, page tables.

This is the only place that knows how requests map onto padded device rows. With dp groups
every group gets a batch of the same shape, with its own slots and page ids made local; the
groups' batches are concatenated along the first axis (the runner splits them over `dp`).
"""

from __future__ import annotations

import jax
import numpy as np

from jaxserve.config import SchedulerConfig
from jaxserve.request import Request
from jaxserve.scheduler import PrefillChunk, StepPlan, _round_up
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
    def __init__(
        self,
        cfg: SchedulerConfig,
        page_size: int,
        dp: int = 1,
        pages_per_group: int = 0,
        lora: bool = False,
    ):
        self.cfg = cfg
        self.lora = lora  # batches carry each row's LoRA buffer slot (Request.lora_slot)
        self.page_size = page_size
        self.num_slots = cfg.max_running_requests  # per dp group
        self.dp = dp
        self.pages_per_group = pages_per_group  # used only with dp > 1
        self.max_pages = -(-cfg.max_model_len // page_size)
        # Decode runs the first n slots for a few n; the largest is always all slots.
        self.decode_batch_buckets = tuple(
            sorted({b for b in cfg.decode_batch_buckets if b < self.num_slots} | {self.num_slots})
        )

    def _group(self, req: Request) -> int:
        return req.slot // self.num_slots

    def _local_pages(self, req: Request, group: int) -> np.ndarray:
        """A request's page ids within its dp group's range (the group's devices hold them)."""
        pages = np.asarray(req.pages, np.int32) - group * self.pages_per_group
        if self.dp > 1 and len(pages) and (pages.min() < 0 or pages.max() >= self.pages_per_group):
            raise RuntimeError(
                f"request {req.request_id} in slot {req.slot} (dp group {group}) has pages "
                f"{req.pages} outside its group's range"
            )
        return pages

    def prefill(self, chunks: list[PrefillChunk]) -> PrefillBatch:
        block = self.cfg.prefill_block
        if self.dp == 1:
            used = sum(_round_up(c.length, block) for c in chunks)
            return self._prefill(chunks, smallest_bucket(used, self.cfg.prefill_buckets))
        groups = [[c for c in chunks if self._group(c.request) == g] for g in range(self.dp)]
        used = max(sum(_round_up(c.length, block) for c in cs) for cs in groups)
        t = smallest_bucket(used, self.cfg.prefill_buckets)  # one shape for every group
        return _concat([self._prefill(cs, t, g) for g, cs in enumerate(groups)])

    def _prefill(self, chunks: list[PrefillChunk], t: int, group: int = 0) -> PrefillBatch:
        cfg, block = self.cfg, self.cfg.prefill_block
        s = cfg.max_prefill_seqs
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
        seq_lora = np.zeros((s,), np.int32) if self.lora else None
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
            page_table[i, : len(req.pages)] = self._local_pages(req, group)
            nxt = off + _round_up(c.length, block)
            block_seq[off // block : nxt // block] = i
            last_idx[i] = end - 1
            seq_slot[i] = req.slot - group * self.num_slots
            is_first[i] = c.is_first
            do_sample[i] = c.is_last
            if seq_lora is not None:
                seq_lora[i] = req.lora_slot
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
            seq_lora,
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
        """Rows are slots 0..n-1, n the smallest batch bucket holding every running slot
        (per dp group: its local slots 0..n-1, n from the fullest group)."""
        local = [r.slot % self.num_slots for r in reqs]
        n = smallest_bucket(max(local) + 1, self.decode_batch_buckets)
        positions = np.full((self.dp, n), -1, np.int32)
        # Full width: attention walks only as many pages as the longest row needs.
        page_table = np.zeros((self.dp, n, self.max_pages), np.int32)
        lora_slot = np.zeros((self.dp, n), np.int32)
        for r, slot in zip(reqs, local, strict=True):
            g = self._group(r)
            positions[g, slot] = r.num_computed  # the input token's position
            page_table[g, slot, : len(r.pages)] = self._local_pages(r, g)
            if self.lora:
                lora_slot[g, slot] = r.lora_slot
        return DecodeBatch(
            positions.reshape(-1),
            page_table.reshape(self.dp * n, -1),
            lora_slot.reshape(-1) if self.lora else None,
        )

    def result_rows(self, plan: StepPlan, decode_width: int) -> tuple[list[int], list[int]]:
        """Rows of the step's result for the plan's prefill chunks and decode requests.

        The result holds, per dp group, its n decode rows (one per local slot) and then one
        row per prefill sequence slot; with one group: decode slots, then chunk i at n + i.
        """
        n = decode_width // self.dp
        per_group = n + (self.cfg.max_prefill_seqs if plan.prefill else 0)
        seen = [0] * self.dp
        chunk_rows = []
        for c in plan.prefill:
            g = self._group(c.request)
            chunk_rows.append(g * per_group + n + seen[g])
            seen[g] += 1
        decode_rows = [self._group(r) * per_group + r.slot % self.num_slots for r in plan.decode]
        return chunk_rows, decode_rows

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
        prefills = {t: self._prefill_padding(t) for t in self.cfg.prefill_buckets}
        decodes = [
            DecodeBatch(
                np.full((self.dp * n,), -1, np.int32),
                np.zeros((self.dp * n, self.max_pages), np.int32),
                np.zeros((self.dp * n,), np.int32) if self.lora else None,
            )
            for n in self.decode_batch_buckets
        ]
        pairs: list[tuple[DecodeBatch | None, PrefillBatch | None]]
        pairs = [(None, p) for p in prefills.values()] + [(d, None) for d in decodes]
        pairs += [(d, prefills[t]) for d in decodes for t in self.mixed_prefill_buckets()]
        return pairs

    def _prefill_padding(self, t: int) -> PrefillBatch:
        return _concat([self._empty_prefill(t) for _ in range(self.dp)])

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
            np.zeros((s,), np.int32) if self.lora else None,
        )


def _concat(batches: list[PrefillBatch]) -> PrefillBatch:
    """The dp groups' batches, one after the other along every field's first axis."""
    if len(batches) == 1:
        return batches[0]
    return jax.tree.map(lambda *xs: np.concatenate(xs), *batches)
