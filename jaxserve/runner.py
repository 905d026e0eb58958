"""Device side: params, the paged KV cache, slot state and the compiled step functions.

One step function covers DECODE (the first n slots, n a batch bucket), EXTEND (a prefill
token bucket) and MIXED (both parts in one call), with the cache and slot state donated.
Every trace is counted, so tests can assert nothing compiles after warm-up. With tp * dp > 1
the same step runs as one SPMD program over a device mesh (`jaxserve/sharding.py`).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

import kernels
from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.lora import LoraBank, LoraRows, LoraWeights, delta_fn
from jaxserve.models import llama
from jaxserve.quant import QuantPlan
from jaxserve.sampling import SampleOutput, SamplingRows, sample
from jaxserve.sharding import MeshLayout, check_mesh, make_mesh, replicate_kv_heads
from jaxserve.state import (
    SEQ_SAMPLING_FIELDS,
    DecodeBatch,
    PrefillBatch,
    SlotState,
    init_slot_state,
)
from jaxserve.structured import mask_words

log = logging.getLogger(__name__)


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
        self.cfg = cfg
        self.platform = jax.default_backend()
        self.dtype = resolve_dtype(cfg.dtype)
        self.page_size = cfg.cache.page_size
        self.num_compiles = 0
        self.impl = kernels.resolve_impl(cfg.attention_impl)
        self.num_kernel_fallbacks = 0  # Pallas programs that failed to build -> reference
        self.quant = QuantPlan.from_config(cfg.quantization, cfg.int8_max_rows)
        # tp = dp = 1: no mesh at all, the single-device path exactly as it always was.
        self.layout: MeshLayout | None = None
        if cfg.tp * cfg.dp > 1:
            check_mesh(model_cfg, cfg.tp, cfg.dp)
            model_cfg, params = replicate_kv_heads(model_cfg, params, cfg.tp)
            self.layout = MeshLayout(make_mesh(cfg.tp, cfg.dp), model_cfg)
        self.model_cfg = model_cfg
        if self.layout is None:
            params = jax.tree.map(lambda a: jnp.asarray(a, self.dtype), params)
            self.param_sets = self.quant.build(params)  # kind -> params, only the kinds in use
        else:
            params = self.layout.place_params(params, self.dtype)
            self.param_sets = {
                kind: self.layout.reshard_params(p) for kind, p in self.quant.build(params).items()
            }
        self.kv_dtype = self.dtype if cfg.cache.dtype == "auto" else jnp.dtype(cfg.cache.dtype)
        self.kv = self._init_kv()
        self.slots = self._init_slots()
        # LoRA: every adapter's A and B in fixed stacked buffers, an argument of each step, so
        # loading one is a buffer write (one compiled function), never a new step program.
        self.lora_bank: LoraBank | None = None
        if cfg.lora_enabled:
            if self.layout is not None:
                raise ValueError("LoRA with tp * dp > 1 is not supported yet")
            self.lora_bank = LoraBank(
                model_cfg,
                cfg.max_loras,
                cfg.max_lora_rank,
                cfg.lora_target_modules,
                self.dtype,
                self._count_trace,
            )
        # The token mask is an input of every step, so structured output never recompiles;
        # unconstrained steps pass this resident all-ones mask (no transfer).
        num_slots = cfg.scheduler.max_running_requests * cfg.dp
        all_allowed = np.full((num_slots, mask_words(model_cfg.vocab_size)), -1, np.int32)
        self._all_allowed = self._put_mask(all_allowed)  # [B, ceil(V / 32)] int32
        # One traced function for all three forward modes; which parts are present (and their
        # buckets) picks the compiled program.
        self._step_fn = self._jit_step()
        if self.layout is None:
            self._permute_fn = jax.jit(self._permute_step, donate_argnames=("slots",))
        else:
            self._permute_fn = self.layout.jit_permute(self._permute_step, self._slot_shardings)

    def _jit_step(self):
        # A fresh partial each time: a new jit cache, so a rebuilt step retraces with the
        # runner's current attention impl instead of reusing the old trace.
        step = functools.partial(Runner._step, self)
        if self.layout is None:
            return jax.jit(step, donate_argnames=("kv", "slots"))
        return self.layout.jit_step(step, self._slot_shardings)

    def _init_kv(self) -> llama.KVCache:
        """Pages of one dp group = cache.num_pages; each group's range lives on its devices."""
        cfg = self.cfg
        init = functools.partial(
            llama.init_kv_cache,
            self.model_cfg,
            cfg.cache.num_pages * cfg.dp,
            self.page_size,
            self.kv_dtype,
        )
        return init() if self.layout is None else self.layout.zeros(init, self.layout.kv_sharding)

    def _init_slots(self) -> SlotState:
        cfg = self.cfg
        init = functools.partial(
            init_slot_state, cfg.scheduler.max_running_requests * cfg.dp, self.model_cfg.vocab_size
        )
        if self.layout is None:
            return init()
        self._slot_shardings = self.layout.slot_shardings(jax.eval_shape(init))
        return self.layout.zeros(init, self._slot_shardings)

    # ---- host API ------------------------------------------------------------------------
    def _put_mask(self, allowed: np.ndarray) -> jax.Array:
        return jnp.asarray(allowed) if self.layout is None else self.layout.put_rows(allowed)

    def run(
        self,
        decode: DecodeBatch | None,
        prefill: PrefillBatch | None,
        allowed: np.ndarray | None = None,
    ) -> StepResult:
        """One step: DECODE (decode only), EXTEND (prefill only) or MIXED (both).

        Result rows: the decode batch's n slots first, then the prefill batch's S sequences
        (with dp groups: that layout once per group, one group after the other). `allowed`
        is [B, ceil(V / 32)] int32, each slot's packed token mask (None: all allowed).
        """
        t0 = time.perf_counter()
        rows = sum(len(b.positions) for b in (decode, prefill) if b is not None) // self.cfg.dp
        params = self.param_sets[self.quant.kind_for(rows)]  # by the rows of one dp group
        if self.layout is not None:
            decode, prefill = self.layout.put_rows((decode, prefill))
        mask = self._all_allowed if allowed is None else self._put_mask(allowed)
        extra = () if self.lora_bank is None else (self.lora_bank.weights,)
        self.kv, self.slots, out = self._call_step(params, decode, prefill, mask, *extra)
        return self._to_host(out, t0)

    def _call_step(self, params, *inputs):
        """The step function; a Pallas step that fails while it is built (traced, lowered or
        compiled: a kernel a device's compiler rejects) is rebuilt on the jnp reference
        attention and run again, once, with a warning and `num_kernel_fallbacks` counted."""
        compiles = self.num_compiles
        try:
            return self._step_fn(params, self.kv, self.slots, *inputs)
        except Exception as exc:
            built = self.num_compiles > compiles  # this call traced a new program
            intact = not any(a.is_deleted() for a in jax.tree.leaves((self.kv, self.slots)))
            if self.impl == "reference" or not (built and intact):
                raise
            failed_impl, failed_fn = self.impl, self._step_fn
            self.num_compiles = compiles  # the failed build left no program
            self.impl, self._step_fn = "reference", self._jit_step()
            try:
                result = self._step_fn(params, self.kv, self.slots, *inputs)
            except Exception:  # not the kernel's fault: keep the kernels, report this error
                self.impl, self._step_fn = failed_impl, failed_fn
                raise
            self.num_kernel_fallbacks += 1
            log.warning(
                "attention impl %r failed to build a step (%s: %s); "
                "falling back to the jnp reference attention",
                failed_impl,
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
            return result

    def permute_slots(self, perm: np.ndarray) -> None:
        """Slot i takes the device state of slot perm[i] (perm: [B] int32 permutation)."""
        perm = np.asarray(perm, np.int32)
        if self.layout is not None:  # dp groups permute their own slots, by local index
            per_group = self.cfg.scheduler.max_running_requests
            perm = perm - np.arange(len(perm)) // per_group * per_group
            if perm.min() < 0 or perm.max() >= per_group:
                raise ValueError(f"slot permutation {perm.tolist()} crosses dp groups")
            perm = self.layout.put_rows(perm)
        self.slots = self._permute_fn(self.slots, perm)

    def _permute_step(self, slots: SlotState, perm: jax.Array) -> SlotState:
        self._count_trace()
        return jax.tree.map(lambda a: a[perm], slots)

    def reset_if_invalid(self) -> bool:
        """After a failed step: rebuild donated buffers that were consumed; True if it did."""
        leaves = jax.tree.leaves((self.kv, self.slots))
        if not any(a.is_deleted() for a in leaves):
            return False
        self.kv = self._init_kv()
        self.slots = self._init_slots()
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

    def _attend(self, decode: DecodeBatch | None, prefill: PrefillBatch | None) -> llama.AttendFn:
        """The attention op of the step's mode: decode, extend, or both parts in one op."""
        kw = dict(scale=llama.softmax_scale(self.model_cfg), impl=self.impl)
        if decode is not None:
            lengths = jnp.where(decode.positions >= 0, decode.positions + 1, 0)  # [n]
            kw |= dict(decode_page_table=decode.page_table, decode_lengths=lengths)
        if prefill is not None:
            kw |= dict(
                page_table=prefill.page_table,
                block_seq=prefill.block_seq,
                positions=prefill.positions,
                block_q=self.cfg.scheduler.prefill_block,
            )
        if prefill is None:
            kw["page_table"], kw["lengths"] = kw.pop("decode_page_table"), kw.pop("decode_lengths")
            op = kernels.paged_attention
        else:
            op = kernels.extend_attention if decode is None else kernels.mixed_attention
        attend = functools.partial(op, **kw)
        # On a mesh each tp shard attends with its own heads (Pallas needs local arrays).
        return attend if self.layout is None else self.layout.shard_heads(attend)

    def _decode_part(self, slots: SlotState, batch: DecodeBatch) -> _Part:
        """The first n slots, one input token each (n = the batch bucket)."""
        ps, num_slots = self.page_size, slots.tokens.shape[0]
        positions = batch.positions  # [n]
        n = positions.shape[0]
        active = positions >= 0
        pos = jnp.maximum(positions, 0)
        page = jnp.take_along_axis(batch.page_table, (pos // ps)[:, None], axis=1)[:, 0]
        return _Part(
            tokens=slots.tokens[:n],
            positions=positions,
            slot_mapping=jnp.where(active, page * ps + pos % ps, -1),
            sample_idx=jnp.arange(n),
            sample_slot=jnp.arange(n),
            sample_pos=positions + 1,
            write_slot=jnp.where(active, jnp.arange(n), num_slots),  # inactive -> dropped
        )

    def _prefill_part(self, num_slots: int, batch: PrefillBatch) -> _Part:
        """T packed prompt tokens of up to S sequences; the last token of each is sampled."""
        ps = self.page_size
        num_seqs = batch.seq_slot.shape[0]
        valid = batch.positions >= 0
        seq = jnp.minimum(batch.token_seq, num_seqs - 1)
        pos = jnp.maximum(batch.positions, 0)
        page = batch.page_table[seq, pos // ps]
        sampled = batch.do_sample & (batch.seq_slot < num_slots)
        return _Part(
            tokens=batch.tokens,
            positions=batch.positions,
            slot_mapping=jnp.where(valid, page * ps + pos % ps, -1),
            sample_idx=batch.last_idx,
            sample_slot=jnp.minimum(batch.seq_slot, num_slots - 1),
            sample_pos=batch.positions[batch.last_idx] + 1,
            write_slot=jnp.where(sampled, batch.seq_slot, num_slots),
        )

    @staticmethod
    def _lora_rows(decode: DecodeBatch | None, prefill: PrefillBatch | None) -> LoraRows:
        """Each row's adapter: decode rows gather their own, prefill tokens go by sequence."""
        none = jnp.zeros((0,), jnp.int32)
        return LoraRows(
            row_slot=none if decode is None else decode.lora_slot,
            seq_slot=none if prefill is None else prefill.seq_lora,
            token_seq=none if prefill is None else prefill.token_seq,
        )

    @staticmethod
    def _start_sequences(rows: SamplingRows, batch: PrefillBatch, num_slots: int) -> SamplingRows:
        """New sequences take over their slot (settings written, token history cleared); the
        step's prompt tokens are recorded for the repetition penalty, resumed output tokens
        for the presence/frequency penalties."""
        num_seqs = batch.seq_slot.shape[0]
        valid = batch.positions >= 0
        seq = jnp.minimum(batch.token_seq, num_seqs - 1)
        first = jnp.where(batch.is_first & (batch.seq_slot < num_slots), batch.seq_slot, num_slots)
        updates = {
            name: getattr(rows, name).at[first].set(getattr(batch.sampling, name), mode="drop")
            for name in SEQ_SAMPLING_FIELDS
        }
        prompt_mask = rows.prompt_mask.at[first].set(False, mode="drop")
        counts = rows.output_counts.at[first].set(0, mode="drop")
        tok_slot = jnp.where(valid, batch.seq_slot[seq], num_slots)
        prompt_rows = jnp.where(batch.is_output, num_slots, tok_slot)
        prompt_mask = prompt_mask.at[prompt_rows, batch.tokens].set(True, mode="drop")
        output_rows = jnp.where(batch.is_output, tok_slot, num_slots)
        counts = counts.at[output_rows, batch.tokens].add(1, mode="drop")
        return rows.replace(prompt_mask=prompt_mask, output_counts=counts, **updates)

    def _step(
        self,
        params,
        kv,
        slots: SlotState,
        decode: DecodeBatch | None,
        prefill: PrefillBatch | None,
        allowed: jax.Array,  # [B, ceil(V / 32)] int32, packed token mask per slot
        lora: LoraWeights | None = None,
    ):
        """One forward over [decode rows | prefill tokens], then one sampling call.

        MIXED is a decode part and a prefill part of one program rather than decode rows as
        1-token segments of the packed extend layout: the matmuls (the whole cost on CPU, the
        weight reads on accelerators) run once over all rows, while attention keeps a kernel
        tuned for each shape (as tpu-inference's ragged kernel splits decode-only and prefill
        ranges). As 1-token segments each decode row would take a whole query block (16
        padded rows) and walk the extend kernel's per-block page loop.
        """
        self._count_trace()
        num_slots = slots.tokens.shape[0]
        rows = slots.rows
        parts = []
        if decode is not None:
            parts.append(self._decode_part(slots, decode))
        if prefill is not None:
            rows = self._start_sequences(rows, prefill, num_slots)
            parts.append(self._prefill_part(num_slots, prefill))
        sizes = [p.tokens.shape[0] for p in parts]
        offsets = np.cumsum([0, *sizes[:-1]]).tolist()
        attend = self._attend(decode, prefill)
        cat = lambda name: jnp.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        lora_fn = None if lora is None else delta_fn(lora, self._lora_rows(decode, prefill))
        hidden, kv = llama.forward(
            params,
            self.model_cfg,
            kv,
            cat("tokens"),
            cat("positions"),
            cat("slot_mapping"),
            attend,
            lora_fn,
        )
        sample_idx = jnp.concatenate(
            [p.sample_idx + off for p, off in zip(parts, offsets, strict=True)]
        )
        logits = llama.lm_head(params, hidden[sample_idx])  # [R, V]
        sample_slot = cat("sample_slot")
        out = sample(
            logits,
            jax.tree.map(lambda a: a[sample_slot], rows),
            cat("sample_pos"),
            allowed[sample_slot],
        )
        write = cat("write_slot")
        counts = rows.output_counts.at[write, out.tokens].add(1, mode="drop")
        slots = SlotState(
            tokens=slots.tokens.at[write].set(out.tokens, mode="drop"),
            rows=rows.replace(output_counts=counts),
        )
        return kv, slots, out


@dataclass(frozen=True)
class _Part:
    """One part of a step's rows (decode or prefill), traced values only."""

    tokens: jax.Array  # [N] int32
    positions: jax.Array  # [N] int32, < 0 = padding
    slot_mapping: jax.Array  # [N] int32, where each token's K/V goes
    sample_idx: jax.Array  # [R] int32, rows of the part whose next token is sampled
    sample_slot: jax.Array  # [R] int32, slot whose sampling settings each row uses
    sample_pos: jax.Array  # [R] int32, position of the sampled token (seeds fold it in)
    write_slot: jax.Array  # [R] int32, slot that takes the sampled token (B = none)
