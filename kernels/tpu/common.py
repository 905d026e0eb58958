"""The K/V page loop shared by the TPU (Mosaic) kernels: double-buffered DMAs + online softmax.

Whole pages [page_size, KVH, D] are copied HBM -> VMEM; each KV head is then read out of them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.typing import DTypeLike

# Finite, so `m_prev - m_next` stays finite while a row has seen no visible key.
MASK_VALUE = -1e30
LANES = 128  # running max / denominator are kept lane-replicated, as Mosaic likes


def pages_per_block(page_size: int, block_kv: int, num_pages: int) -> int:
    """Pages copied per loop step so one K/V tile covers about `block_kv` tokens."""
    return max(1, min(block_kv // page_size, num_pages))


def scratch_shapes(
    block_pages: int, page_size: int, kv_heads: int, rows: int, head_dim: int, dtype: DTypeLike
) -> list:
    """VMEM/semaphore scratch for `attend_pages`: two K and V slots, softmax state per head."""
    buf = pltpu.VMEM((2, block_pages, page_size, kv_heads, head_dim), dtype)
    return [
        buf,
        buf,
        pltpu.SemaphoreType.DMA((2, 2)),
        pltpu.VMEM((kv_heads, rows, LANES), jnp.float32),
        pltpu.VMEM((kv_heads, rows, LANES), jnp.float32),
        pltpu.VMEM((kv_heads, rows, head_dim), jnp.float32),
    ]


def _flash_step(q, k, v, mask, m_ref, l_ref, acc_ref, scale: float, soft_cap: float | None):
    """Fold one [K, D] tile into one head's state; q [M, D], mask [M, K]."""
    # float32 asks for full-precision MXU passes; the default would round inputs to bfloat16.
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    dims = (((1,), (1,)), ((), ()))
    s = lax.dot_general(q, k, dims, precision=precision, preferred_element_type=jnp.float32)
    s = s * scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    s = jnp.where(mask, s, MASK_VALUE)
    m_prev = m_ref[...]  # [M, LANES], all lanes equal
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)
    # Zero masked entries explicitly: a fully masked row has s == m_next == MASK_VALUE.
    p = jnp.where(mask, jnp.exp(s - m_next[:, :1]), 0.0)
    m_ref[...] = m_next
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    pv = jnp.dot(p.astype(v.dtype), v, precision=precision, preferred_element_type=jnp.float32)
    acc_ref[...] = alpha[:, :1] * acc_ref[...] + pv


def _head_tile(buf, slot, head: int) -> jax.Array:
    """[block_pages * page_size, D] keys (or values) of one KV head from a VMEM slot."""
    block_pages = buf.shape[1]
    pages = [buf[slot, i, :, head, :] for i in range(block_pages)]
    return pages[0] if block_pages == 1 else jnp.concatenate(pages, axis=0)


def attend_pages(
    q_ref,  # [KVH, M, D] VMEM, rows of each KV head's query heads
    k_hbm,  # [N, page_size, KVH, D] HBM
    v_hbm,  # [N, page_size, KVH, D] HBM
    o_ref,  # [KVH, M, D] VMEM
    page_table_ref,  # [S * P] SMEM
    scratch: tuple,  # the refs made from `scratch_shapes`
    *,
    table_offset: jax.Array,  # index of this sequence's first page in `page_table_ref`
    num_pages: jax.Array,  # pages holding visible keys; later table entries are not read
    lo_blk: jax.Array,  # first and one-past-last K/V block to visit
    hi_blk: jax.Array,
    mask_fn: Callable[[jax.Array], jax.Array],  # kpos [1, K] -> visible [M, K]
    scale: float,
    soft_cap: float | None,
) -> None:
    """o_ref <- softmax(q k^T) v over blocks [lo_blk, hi_blk); rows with no key get zeros."""
    k_buf, v_buf, sems, m_ref, l_ref, acc_ref = scratch
    _, block_pages, page_size, kv_heads, head_dim = k_buf.shape
    block_kv = block_pages * page_size
    m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def copies(blk, slot):
        out = []
        for i in range(block_pages):
            # Clamp into the visible pages: later table entries may be stale; masked anyway.
            pos = jnp.minimum(blk * block_pages + i, num_pages - 1)
            page = page_table_ref[table_offset + pos]
            for kind, (hbm, buf) in enumerate(((k_hbm, k_buf), (v_hbm, v_buf))):
                out.append(
                    pltpu.make_async_copy(hbm.at[page], buf.at[slot, i], sems.at[kind, slot])
                )
        return out

    @pl.when(lo_blk < hi_blk)
    def _():
        for c in copies(lo_blk, 0):
            c.start()

    def body(blk, carry):
        slot = lax.rem(blk - lo_blk, 2)

        @pl.when(blk + 1 < hi_blk)
        def _():
            for c in copies(blk + 1, 1 - slot):
                c.start()

        for c in copies(blk, slot):
            c.wait()
        mask = mask_fn(blk * block_kv + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1))
        for h in range(kv_heads):
            k = _head_tile(k_buf, slot, h)
            v = _head_tile(v_buf, slot, h)
            _flash_step(
                q_ref[h], k, v, mask, m_ref.at[h], l_ref.at[h], acc_ref.at[h], scale, soft_cap
            )
        return carry

    lax.fori_loop(lo_blk, hi_blk, body, 0)
    l_sum = l_ref[...][:, :, :1]
    o_ref[...] = (acc_ref[...] / jnp.where(l_sum > 0.0, l_sum, 1.0)).astype(o_ref.dtype)
