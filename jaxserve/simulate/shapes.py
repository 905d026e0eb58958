"""What a step costs depends on: the padded shapes a `StepPlan` runs as (`StepShape`).

Mirrors `jaxserve.batch.BatchBuilder`'s padding (decode batch buckets, prefill token buckets)
without importing it: batch.py pulls in jax through `state.py`, and the simulator must not.
`tests/test_simulate.py` checks the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxserve.config import SchedulerConfig
from jaxserve.scheduler import StepPlan, _round_up

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
    """Turns plans into `StepShape`s for one scheduler config; call it right after
    `schedule()`, before `update()` moves the requests on."""

    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg
        self.decode_buckets = decode_buckets(cfg)
        self.prefill_buckets = tuple(sorted(cfg.prefill_buckets))

    def __call__(self, plan: StepPlan) -> StepShape:
        shape = {"mode": plan.mode.value, "slot_moves": len(plan.slot_moves)}
        if plan.decode:
            # Positions are num_computed; each row attends to num_computed + 1 keys.
            contexts = [r.num_computed + 1 for r in plan.decode]
            top_slot = max(r.slot for r in plan.decode)
            shape |= dict(
                decode_rows=len(plan.decode),
                decode_rows_padded=smallest_bucket(top_slot + 1, self.decode_buckets),
                decode_context=sum(contexts),
                decode_max_context=max(contexts),
            )
        if plan.prefill:
            block = self.cfg.prefill_block
            used = sum(_round_up(c.length, block) for c in plan.prefill)
            shape |= dict(
                prefill_seqs=len(plan.prefill),
                prefill_tokens=sum(c.length for c in plan.prefill),
                prefill_tokens_padded=smallest_bucket(used, self.prefill_buckets),
                prefill_pairs=sum(
                    c.length * c.start + c.length * (c.length + 1) // 2 for c in plan.prefill
                ),
                prefill_kv_read=sum(c.start for c in plan.prefill),
                prefill_max_context=max(c.start + c.length for c in plan.prefill),
            )
        return StepShape(**shape)
