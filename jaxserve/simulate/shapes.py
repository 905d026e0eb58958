"""What a step costs depends on: the padded shapes a `StepPlan` runs as (`StepShape`).

Mirrors `jaxserve.batch.BatchBuilder`'s padding (decode batch buckets, prefill token buckets,
one padded shape for every dp group) without importing it: batch.py pulls in jax through
`state.py`, and the simulator must not. `tests/test_simulate.py` checks the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxserve.config import SchedulerConfig
from jaxserve.request import Request
from jaxserve.scheduler import PrefillChunk, StepPlan, _round_up

# The CPU attention reference walks the KV in chunks of 8 pages of 16 tokens (kernels/reference).
ATTENTION_CHUNK_TOKENS = 128


@dataclass(frozen=True)
class StepShape:
    """One step as the device sees it: real and padded rows, and the attention work."""

    mode: str  # "extend" | "decode" | "mixed" (ForwardMode values)
    decode_rows: int = 0  # busy decode rows
    decode_rows_padded: int = 0  # the batch bucket the decode part runs
    decode_context: int = 0  # sum over busy rows of keys attended (KV tokens read)
    decode_max_context: int = 0  # the longest busy row's keys
    prefill_seqs: int = 0
    prefill_tokens: int = 0  # real tokens of the prefill chunks
    prefill_tokens_padded: int = 0  # the token bucket the prefill part runs
    prefill_pairs: int = 0  # causal (query, key) pairs of the chunks
    prefill_kv_read: int = 0  # cached-prefix tokens the chunks read (sum of starts)
    prefill_max_context: int = 0  # the deepest position any chunk reaches, + 1
    slot_moves: int = 0

    @property
    def rows_padded(self) -> int:
        """Every row the matmuls run: decode bucket + prefill bucket."""
        return self.decode_rows_padded + self.prefill_tokens_padded

    @property
    def output_rows(self) -> int:
        """Rows whose next token is sampled (busy decode rows + prompts that end here)."""
        return self.decode_rows + self.prefill_seqs


def decode_buckets(cfg: SchedulerConfig) -> tuple[int, ...]:
    """The decode batch sizes that get compiled (`BatchBuilder.decode_batch_buckets`)."""
    slots = cfg.max_running_requests
    return tuple(sorted({b for b in cfg.decode_batch_buckets if b < slots} | {slots}))


def smallest_bucket(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket holding n (buckets sorted ascending)."""
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


class ShapeOf:
    """Turns plans into `StepShape`s for one scheduler config and `dp` groups; call it right
    after `schedule()`, before `update()` moves the requests on."""

    def __init__(self, cfg: SchedulerConfig, dp: int = 1):
        self.cfg = cfg
        self.dp = dp
        self.decode_buckets = decode_buckets(cfg)
        self.prefill_buckets = tuple(sorted(cfg.prefill_buckets))

    def __call__(self, plan: StepPlan) -> StepShape:
        """The step's shape with one group (with dp groups: `groups`)."""
        if self.dp != 1:
            raise ValueError(f"dp={self.dp}: a step has one shape per group; use groups(plan)")
        return self.groups(plan)[0]

    def groups(self, plan: StepPlan) -> list[StepShape]:
        """One shape per dp group, as `BatchBuilder` pads them: every group runs the same
        padded sizes (one SPMD program), from the fullest group's highest local decode slot
        and the largest per-group sum of block-rounded chunks; real rows, contexts and pairs
        are each group's own. Slot moves are one gather over every group's slots."""
        slots, block = self.cfg.max_running_requests, self.cfg.prefill_block
        decode: list[list[Request]] = [[] for _ in range(self.dp)]
        chunks: list[list[PrefillChunk]] = [[] for _ in range(self.dp)]
        for r in plan.decode:
            decode[r.slot // slots].append(r)
        for c in plan.prefill:
            chunks[c.request.slot // slots].append(c)
        padded: dict[str, int] = {}
        if plan.decode:
            top_slot = max(r.slot % slots for r in plan.decode)
            padded["decode_rows_padded"] = smallest_bucket(top_slot + 1, self.decode_buckets)
        if plan.prefill:
            used = max(sum(_round_up(c.length, block) for c in cs) for cs in chunks)
            padded["prefill_tokens_padded"] = smallest_bucket(used, self.prefill_buckets)
        common = {"mode": plan.mode.value, "slot_moves": len(plan.slot_moves), **padded}
        return [
            StepShape(**common, **_decode_work(d), **_prefill_work(c))
            for d, c in zip(decode, chunks, strict=True)
        ]


def _decode_work(rows: list[Request]) -> dict[str, int]:
    """Busy decode rows and the keys they attend to (num_computed + 1 each)."""
    if not rows:
        return {}
    contexts = [r.num_computed + 1 for r in rows]
    return dict(
        decode_rows=len(rows), decode_context=sum(contexts), decode_max_context=max(contexts)
    )


def _prefill_work(chunks: list[PrefillChunk]) -> dict[str, int]:
    """Real tokens, causal pairs and cached-prefix reads of the prefill chunks."""
    if not chunks:
        return {}
    return dict(
        prefill_seqs=len(chunks),
        prefill_tokens=sum(c.length for c in chunks),
        prefill_pairs=sum(c.length * c.start + c.length * (c.length + 1) // 2 for c in chunks),
        prefill_kv_read=sum(c.start for c in chunks),
        prefill_max_context=max(c.start + c.length for c in chunks),
    )
