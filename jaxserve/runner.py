"""Device side: params, the paged KV cache, slot state and the two compiled step functions.

Decode runs all B slots with the cache and slot state donated; prefill runs one of a few
token buckets. Every trace is counted, so tests can assert nothing compiles after warm-up.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

import kernels
from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.models import llama
from jaxserve.sampling import SampleOutput, sample
from jaxserve.state import DecodeBatch, PrefillBatch, SlotState, init_slot_state


def resolve_dtype(name: str) -> jnp.dtype:
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


@dataclass(frozen=True)
class StepResult:
    """Host copies of one step's samples, one row per prefill sequence or decode slot."""

    tokens: np.ndarray  # [R] int32
    logprobs: np.ndarray  # [R] float32
    top_ids: np.ndarray  # [R, K] int32
    top_logprobs: np.ndarray  # [R, K] float32
    device_s: float  # wall time of the device call incl. the copy back


class Runner:
    """Owns every device array; turns numpy batches into sampled tokens."""

    def __init__(self, model_cfg: ModelConfig, params: llama.LlamaParams, cfg: EngineConfig):
        self.model_cfg = model_cfg
        self.cfg = cfg
        self.dtype = resolve_dtype(cfg.dtype)
        self.page_size = cfg.cache.page_size
        self.num_compiles = 0
        self.impl = kernels.resolve_impl(cfg.attention_impl)
        self.params = jax.tree.map(lambda a: jnp.asarray(a, self.dtype), params)
        kv_dtype = self.dtype if cfg.cache.dtype == "auto" else jnp.dtype(cfg.cache.dtype)
        self.kv = llama.init_kv_cache(model_cfg, cfg.cache.num_pages, self.page_size, kv_dtype)
        self.slots = init_slot_state(cfg.scheduler.max_running_requests, model_cfg.vocab_size)
        self._prefill_fn = jax.jit(self._prefill_step, donate_argnames=("kv", "slots"))
        self._decode_fn = jax.jit(self._decode_step, donate_argnames=("kv", "slots"))
        self._permute_fn = jax.jit(self._permute_step, donate_argnames=("slots",))

    # ---- host API ------------------------------------------------------------------------
    def prefill(self, batch: PrefillBatch) -> StepResult:
        t0 = time.perf_counter()
        self.kv, self.slots, out = self._prefill_fn(self.params, self.kv, self.slots, batch)
        return self._to_host(out, t0)

    def decode(self, batch: DecodeBatch) -> StepResult:
        t0 = time.perf_counter()
        self.kv, self.slots, out = self._decode_fn(self.params, self.kv, self.slots, batch)
        return self._to_host(out, t0)

    def permute_slots(self, perm: np.ndarray) -> None:
        """Slot i takes the device state of slot perm[i] (perm: [B] int32 permutation)."""
        self.slots = self._permute_fn(self.slots, np.asarray(perm, np.int32))

    def _permute_step(self, slots: SlotState, perm: jax.Array) -> SlotState:
        self._count_trace()
        return jax.tree.map(lambda a: a[perm], slots)

    def reset_if_invalid(self) -> bool:
        """After a failed step: rebuild donated buffers that were consumed; True if it did."""
        leaves = jax.tree.leaves((self.kv, self.slots))
        if not any(a.is_deleted() for a in leaves):
            return False
        cfg = self.cfg
        self.kv = llama.init_kv_cache(
            self.model_cfg, cfg.cache.num_pages, self.page_size, self.kv.k[0].dtype
        )
        self.slots = init_slot_state(cfg.scheduler.max_running_requests, self.model_cfg.vocab_size)
        return True

    @staticmethod
    def _to_host(out: SampleOutput, t0: float) -> StepResult:
        host = jax.device_get(out)
        return StepResult(
            host.tokens, host.logprobs, host.top_ids, host.top_logprobs, time.perf_counter() - t0
        )

    # ---- traced step functions ---------------------------------------------------------
    def _count_trace(self) -> None:
        # Runs only while tracing, i.e. once per compiled shape.
        self.num_compiles += 1

    def _attend_decode(self, page_table, lengths):
        return functools.partial(
            kernels.paged_attention,
            page_table=page_table,
            lengths=lengths,
            scale=llama.softmax_scale(self.model_cfg),
            impl=self.impl,
        )

    def _decode_step(self, params, kv, slots: SlotState, batch: DecodeBatch):
        """Decode the first n slots (n = the batch bucket); the rest of the state is untouched."""
        self._count_trace()
        ps = self.page_size
        positions = batch.positions  # [n]
        n = positions.shape[0]
        num_slots = slots.tokens.shape[0]
        active = positions >= 0
        pos = jnp.maximum(positions, 0)
        page = jnp.take_along_axis(batch.page_table, (pos // ps)[:, None], axis=1)[:, 0]
        slot_mapping = jnp.where(active, page * ps + pos % ps, -1)
        lengths = jnp.where(active, positions + 1, 0)
        attend = self._attend_decode(batch.page_table, lengths)
        hidden, kv = llama.forward(
            params, self.model_cfg, kv, slots.tokens[:n], positions, slot_mapping, attend
        )
        rows = jax.tree.map(lambda a: a[:n], slots.rows)
        out = sample(llama.lm_head(params, hidden), rows, positions + 1)
        updated = jnp.where(active, jnp.arange(n), num_slots)  # inactive -> dropped
        counts = slots.rows.output_counts.at[updated, out.tokens].add(1, mode="drop")
        slots = SlotState(
            tokens=slots.tokens.at[updated].set(out.tokens, mode="drop"),
            rows=slots.rows.replace(output_counts=counts),
        )
        return kv, slots, out

    def _prefill_step(self, params, kv, slots: SlotState, batch: PrefillBatch):
        self._count_trace()
        ps, cfg = self.page_size, self.model_cfg
        num_slots = slots.tokens.shape[0]
        num_seqs = batch.seq_slot.shape[0]
        valid = batch.positions >= 0
        seq = jnp.minimum(batch.token_seq, num_seqs - 1)
        pos = jnp.maximum(batch.positions, 0)
        page = batch.page_table[seq, pos // ps]
        slot_mapping = jnp.where(valid, page * ps + pos % ps, -1)
        attend = functools.partial(
            kernels.extend_attention,
            page_table=batch.page_table,
            block_seq=batch.block_seq,
            positions=batch.positions,
            block_q=self.cfg.scheduler.prefill_block,
            scale=llama.softmax_scale(cfg),
            impl=self.impl,
        )
        hidden, kv = llama.forward(
            params, cfg, kv, batch.tokens, batch.positions, slot_mapping, attend
        )
        logits = llama.lm_head(params, hidden[batch.last_idx])  # [S, V]

        # New sequences take over their slot: settings written, token history cleared.
        first = jnp.where(batch.is_first & (batch.seq_slot < num_slots), batch.seq_slot, num_slots)
        rows = slots.rows
        updates = {
            name: getattr(rows, name).at[first].set(getattr(batch.sampling, name), mode="drop")
            for name in (
                "temperature",
                "top_k",
                "top_p",
                "min_p",
                "repetition_penalty",
                "presence_penalty",
                "frequency_penalty",
                "seed",
            )
        }
        prompt_mask = rows.prompt_mask.at[first].set(False, mode="drop")
        counts = rows.output_counts.at[first].set(0, mode="drop")
        tok_slot = jnp.where(valid, batch.seq_slot[seq], num_slots)
        prompt_rows = jnp.where(batch.is_output, num_slots, tok_slot)
        prompt_mask = prompt_mask.at[prompt_rows, batch.tokens].set(True, mode="drop")
        output_rows = jnp.where(batch.is_output, tok_slot, num_slots)
        counts = counts.at[output_rows, batch.tokens].add(1, mode="drop")
        rows = rows.replace(prompt_mask=prompt_mask, output_counts=counts, **updates)

        gather = jnp.minimum(batch.seq_slot, num_slots - 1)
        seq_rows = jax.tree.map(lambda a: a[gather], rows)
        out = sample(logits, seq_rows, batch.positions[batch.last_idx] + 1)
        sampled = jnp.where(
            batch.do_sample & (batch.seq_slot < num_slots), batch.seq_slot, num_slots
        )
        counts = rows.output_counts.at[sampled, out.tokens].add(1, mode="drop")
        slots = SlotState(
            tokens=slots.tokens.at[sampled].set(out.tokens, mode="drop"),
            rows=rows.replace(output_counts=counts),
        )
        return kv, slots, out
