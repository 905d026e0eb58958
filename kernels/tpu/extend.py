"""Ragged prefill/extend attention for TPU (Pallas Mosaic) with scalar-prefetched page tables.

Grid (query block,): each program walks its sequence's pages up to the block's causal bound with
double-buffered DMAs, all KV heads per page copy; rows are (token, query head) pairs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.tpu import common


def _extend_kernel(
    block_seq_ref,  # [num_blocks] int32 SMEM (prefetched)
    page_table_ref,  # [S * P] int32 SMEM (prefetched)
    max_pos_ref,  # [num_blocks] int32 SMEM: last valid position in the block, -1 if none
    min_pos_ref,  # [num_blocks] int32 SMEM: first valid position in the block
    q_ref,  # [KVH, block_q * G, D]
    row_pos_ref,  # [block_q * G, 1] int32, position of each row's token, < 0 = padding
    k_hbm,  # [N, page_size, KVH, D]
    v_hbm,  # [N, page_size, KVH, D]
    o_ref,  # [KVH, block_q * G, D]
    *scratch,
    pages_per_seq: int,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
):
    i = pl.program_id(0)
    _, block_pages, page_size, _, _ = scratch[0].shape
    block_kv = block_pages * page_size
    num_pages = (max_pos_ref[i] + page_size) // page_size  # 0 for an all-padding block
    lo_blk = 0
    if sliding_window is not None:
        lo_blk = jnp.maximum(min_pos_ref[i] - sliding_window + 1, 0) // block_kv
    row_pos = row_pos_ref[...]

    def mask_fn(kpos):  # [1, K] -> [M, K], causal within the token's own sequence
        visible = (kpos <= row_pos) & (row_pos >= 0)
        if sliding_window is not None:
            visible &= kpos > row_pos - sliding_window
        return visible

    common.attend_pages(
        q_ref,
        k_hbm,
        v_hbm,
        o_ref,
        page_table_ref,
        scratch,
        table_offset=block_seq_ref[i] * pages_per_seq,
        num_pages=num_pages,
        lo_blk=lo_blk,
        hi_blk=(num_pages + block_pages - 1) // block_pages,
        mask_fn=mask_fn,
        scale=scale,
        soft_cap=soft_cap,
    )


@functools.partial(
    jax.jit,
    static_argnames=("block_q", "scale", "sliding_window", "soft_cap", "interpret", "block_kv"),
)
def extend_attention(
    q: jax.Array,  # [T, H, D]
    k_pages: jax.Array,  # [N, page_size, KVH, D]
    v_pages: jax.Array,  # [N, page_size, KVH, D]
    page_table: jax.Array,  # [S, P] int32
    block_seq: jax.Array,  # [T // block_q] int32
    positions: jax.Array,  # [T] int32, < 0 = padding
    *,
    block_q: int,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    interpret: bool = False,
    block_kv: int = 256,
) -> jax.Array:  # [T, H, D]
    """Ragged extend attention; contract in `kernels.reference.extend_attention`."""
    tokens, num_heads, head_dim = q.shape
    _, page_size, kv_heads, _ = k_pages.shape
    if num_heads % kv_heads or tokens % block_q:
        raise ValueError(f"bad shapes: q {q.shape}, kv_heads {kv_heads}, block_q {block_q}")
    group = num_heads // kv_heads
    rows = block_q * group
    num_blocks = tokens // block_q
    pages_per_seq = page_table.shape[1]
    block_pages = common.pages_per_block(page_size, block_kv, pages_per_seq)

    # [T, H, D] -> [blocks, KVH, block_q * G, D]: a KV head's query rows are contiguous.
    q5 = q.astype(k_pages.dtype).reshape(num_blocks, block_q, kv_heads, group, head_dim)
    q_rows = q5.transpose(0, 2, 1, 3, 4).reshape(num_blocks, kv_heads, rows, head_dim)
    pos = positions.astype(jnp.int32).reshape(num_blocks, block_q)
    row_pos = jnp.repeat(pos, group, axis=1)[..., None]  # [blocks, rows, 1]
    max_pos = jnp.max(pos, axis=1)
    min_pos = jnp.min(jnp.where(pos >= 0, pos, jnp.iinfo(jnp.int32).max), axis=1)

    rows_spec = pl.BlockSpec((None, kv_heads, rows, head_dim), lambda i, *_: (i, 0, 0, 0))
    kernel = functools.partial(
        _extend_kernel,
        pages_per_seq=pages_per_seq,
        scale=scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(num_blocks,),
            in_specs=[
                rows_spec,
                pl.BlockSpec((None, rows, 1), lambda i, *_: (i, 0, 0)),
                pl.BlockSpec(memory_space=pl.ANY),
                pl.BlockSpec(memory_space=pl.ANY),
            ],
            out_specs=rows_spec,
            scratch_shapes=common.scratch_shapes(
                block_pages, page_size, kv_heads, rows, head_dim, k_pages.dtype
            ),
        ),
        out_shape=jax.ShapeDtypeStruct(q_rows.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="paged_extend_attention_tpu",
    )(
        block_seq.astype(jnp.int32),
        page_table.reshape(-1).astype(jnp.int32),
        max_pos,
        min_pos,
        q_rows,
        row_pos,
        k_pages,
        v_pages,
    )
    out = out.reshape(num_blocks, kv_heads, block_q, group, head_dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(tokens, num_heads, head_dim)
