"""Paged decode attention for TPU (Pallas Mosaic) with scalar-prefetched page tables.

Grid (batch,): each program walks its sequence's visible pages with double-buffered DMAs and
serves every KV head from one copy of each page.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.tpu import common


def _decode_kernel(
    lengths_ref,  # [B] int32 SMEM (prefetched)
    page_table_ref,  # [B * P] int32 SMEM (prefetched)
    q_ref,  # [KVH, G, D]
    k_hbm,  # [N, page_size, KVH, D]
    v_hbm,  # [N, page_size, KVH, D]
    o_ref,  # [KVH, G, D]
    *scratch,
    pages_per_seq: int,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
):
    b = pl.program_id(0)
    _, block_pages, page_size, _, _ = scratch[0].shape
    block_kv = block_pages * page_size
    length = lengths_ref[b]
    num_pages = (length + page_size - 1) // page_size
    first_pos = 0 if sliding_window is None else jnp.maximum(length - sliding_window, 0)

    def mask_fn(kpos):  # [1, K] -> visible keys of the single query at position length - 1
        return (kpos < length) & (kpos >= first_pos)

    common.attend_pages(
        q_ref,
        k_hbm,
        v_hbm,
        o_ref,
        page_table_ref,
        scratch,
        table_offset=b * pages_per_seq,
        num_pages=num_pages,
        lo_blk=first_pos // block_kv,
        hi_blk=(num_pages + block_pages - 1) // block_pages,
        mask_fn=mask_fn,
        scale=scale,
        soft_cap=soft_cap,
    )


@functools.partial(
    jax.jit, static_argnames=("scale", "sliding_window", "soft_cap", "interpret", "block_kv")
)
def paged_attention(
    q: jax.Array,  # [B, H, D]
    k_pages: jax.Array,  # [N, page_size, KVH, D]
    v_pages: jax.Array,  # [N, page_size, KVH, D]
    page_table: jax.Array,  # [B, P] int32
    lengths: jax.Array,  # [B] int32
    *,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    interpret: bool = False,
    block_kv: int = 256,
) -> jax.Array:  # [B, H, D]
    """Decode attention; contract in `kernels.reference.paged_attention`."""
    batch, num_heads, head_dim = q.shape
    _, page_size, kv_heads, _ = k_pages.shape
    if num_heads % kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of kv_heads {kv_heads}")
    group = num_heads // kv_heads
    pages_per_seq = page_table.shape[1]
    block_pages = common.pages_per_block(page_size, block_kv, pages_per_seq)

    q_spec = pl.BlockSpec((None, kv_heads, group, head_dim), lambda b, *_: (b, 0, 0, 0))
    kernel = functools.partial(
        _decode_kernel,
        pages_per_seq=pages_per_seq,
        scale=scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch,),
            in_specs=[q_spec, pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=q_spec,
            scratch_shapes=common.scratch_shapes(
                block_pages, page_size, kv_heads, group, head_dim, k_pages.dtype
            ),
        ),
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, group, head_dim), q.dtype),
        # Each program primes its own first copy, so batch rows may be split across cores.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="paged_decode_attention_tpu",
    )(
        lengths.astype(jnp.int32),
        page_table.reshape(-1).astype(jnp.int32),
        q.astype(k_pages.dtype).reshape(batch, kv_heads, group, head_dim),
        k_pages,
        v_pages,
    )
    return out.reshape(batch, num_heads, head_dim)
