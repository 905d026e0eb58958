"""Roofline step cost: a chip spec and a model's shapes give each step's time as the larger
of its matmul/attention FLOPs and its weight + KV bytes, plus all-reduces and a fixed overhead.

Per step of one dp group, on its `tp` chips with the weights and KV heads split across them
(with `dp` groups each holds a copy of the weights and its own KV pages; the groups run in
parallel and exchange nothing, so the simulator prices each group and takes the slowest):
  flops = 2 * matmul_params * rows_padded + 2 * hidden * vocab * sampled_rows
          + 4 * layers * heads * head_dim * (decode keys + prefill causal pairs)
  bytes = all weights once + KV bytes of every key read and every token written
  time  = overhead + max(flops / (tp * peak * eff_f), bytes / (tp * bw * eff_b))
          + 2 * layers all-reduces of [rows_padded, hidden] (tp > 1)
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxserve.config import ModelConfig
from jaxserve.simulate.hardware import ChipSpec
from jaxserve.simulate.shapes import StepShape


@dataclass(frozen=True)
class ModelCounts:
    """What the roofline needs from a model's shapes."""

    matmul_params: int  # per token: q, k, v, o and the three MLP matrices of every layer
    lm_head_params: int  # hidden * vocab, per sampled row
    total_params: int  # what sits in memory: an untied embedding once more, and the norms
    attention_flops_per_pair: int  # one query x one key, all layers and heads (QK and PV)
    kv_bytes_per_token: int  # K and V, all layers, at the chip's dtype
    hidden_size: int
    num_layers: int

    @classmethod
    def of(cls, m: ModelConfig, dtype_bytes: int) -> ModelCounts:
        q, kv, h = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim, m.hidden_size
        layer = h * q + 2 * h * kv + q * h + 3 * h * m.intermediate_size
        lm_head = h * m.vocab_size
        embedding = 0 if m.tie_embeddings else lm_head
        return cls(
            matmul_params=m.num_layers * layer,
            lm_head_params=lm_head,
            total_params=m.num_layers * (layer + 2 * h) + lm_head + embedding + h,
            attention_flops_per_pair=4 * m.num_layers * q,
            kv_bytes_per_token=2 * m.num_layers * kv * dtype_bytes,
            hidden_size=h,
            num_layers=m.num_layers,
        )


@dataclass(frozen=True)
class RooflineCost:
    chip: ChipSpec
    model: ModelConfig
    tp: int = 0  # chips one dp group splits the model over; 0 = the spec's `chips`
    dp: int = 1  # data-parallel groups, each on tp chips of its own

    def __post_init__(self) -> None:
        if self.tp < 0 or self.dp < 1:
            raise ValueError(f"tp={self.tp} must be >= 0 (0: the spec's), dp={self.dp} >= 1")
        if self.total_chips > self.chip.available_chips:
            raise ValueError(
                f"tp={self.group_chips} x dp={self.dp} = {self.total_chips} chips, but the "
                f"{self.chip.name} spec has {self.chip.available_chips} (max_chips)"
            )

    @property
    def platform(self) -> str:
        return self.chip.platform

    @property
    def group_chips(self) -> int:
        """Chips of one dp group: the tensor-parallel degree."""
        return self.tp or self.chip.chips

    @property
    def total_chips(self) -> int:
        return self.group_chips * self.dp

    @property
    def counts(self) -> ModelCounts:
        return ModelCounts.of(self.model, self.chip.dtype_bytes)

    def kv_pages(self, page_size: int, memory_fraction: float = 0.9) -> int:
        """KV pages of one dp group (`cache.num_pages`): what fits beside one copy of the
        weights in `memory_fraction` of its tp chips' memory."""
        c, chip, tp = self.counts, self.chip, self.group_chips
        free = tp * chip.memory_bytes * memory_fraction
        free -= c.total_params * chip.dtype_bytes
        if free <= 0:
            raise ValueError(
                f"{self.model.name} needs {c.total_params * chip.dtype_bytes / 1e9:.1f} GB of "
                f"weights; {tp} x {chip.name} (tp={tp}) hold "
                f"{tp * chip.memory_bytes * memory_fraction / 1e9:.1f} GB"
            )
        return int(free // (page_size * c.kv_bytes_per_token))

    def breakdown(self, s: StepShape) -> dict[str, float]:
        """Seconds of each part of one group's step: compute, memory, communication (within
        the group), overhead."""
        c, chip, tp = self.counts, self.chip, self.group_chips
        rows = s.rows_padded
        sampled = s.decode_rows_padded + s.prefill_seqs
        flops = (
            2 * c.matmul_params * rows
            + 2 * c.lm_head_params * sampled
            + c.attention_flops_per_pair * (s.decode_context + s.prefill_pairs)
        )
        kv_tokens = (
            s.decode_context + s.prefill_kv_read + s.prefill_tokens  # keys read
            + s.decode_rows + s.prefill_tokens  # new K/V written
        )  # fmt: skip
        weight_bytes = (c.matmul_params + c.lm_head_params) * chip.dtype_bytes
        mem_bytes = weight_bytes + c.kv_bytes_per_token * kv_tokens
        comm = 0.0
        if tp > 1:
            if chip.interconnect_bandwidth <= 0:
                raise ValueError(f"{chip.name}: tp={tp} needs interconnect_bandwidth")
            # Ring all-reduce: each chip sends 2 (tp - 1) / tp of the buffer, one direction.
            size = rows * c.hidden_size * chip.dtype_bytes * 2 * (tp - 1) / tp
            per_allreduce = chip.collective_latency_s + size / (chip.interconnect_bandwidth / 2)
            comm = 2 * c.num_layers * per_allreduce
        return {
            "compute_s": flops / (tp * chip.peak_flops * chip.flops_efficiency),
            "memory_s": mem_bytes / (tp * chip.memory_bandwidth * chip.bandwidth_efficiency),
            "comm_s": comm,
            "overhead_s": chip.step_overhead_s,
        }

    def step_seconds(self, shape: StepShape) -> float:
        b = self.breakdown(shape)
        return b["overhead_s"] + max(b["compute_s"], b["memory_s"]) + b["comm_s"]
