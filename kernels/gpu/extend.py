"""Ragged prefill/extend flash attention over a paged KV cache for GPU (Pallas, Triton).

Grid (query block, kv head, row tile): each program takes a tile of (token, query head) rows
sharing one KV head and walks its sequence's pages up to the tile's causal bound.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.gpu import common


def _extend_kernel(
    block_seq_ref,  # [num_blocks] int32, whole array
    page_table_ref,  # [S * P] int32, whole array
    q_ref,  # [block_m, D], rows are (token, query head) pairs of one KV head
    row_pos_ref,  # [block_m] int32, position of each row's token, < 0 = padding
    k_ref,  # [N, page_size, D], this program's KV head
    v_ref,  # [N, page_size, D]
    o_ref,  # [block_m, D]
    *,
    pages_per_seq: int,
    block_pages: int,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
):
    seq = block_seq_ref[pl.program_id(0)]
    rows, head_dim = q_ref.shape
    page_size = k_ref.shape[1]
    block_kv = block_pages * page_size
    row_pos = row_pos_ref[...]
    valid = row_pos >= 0
    # Padding rows hold -1, so the max is the causal bound of the tile (-1 if all padding).
    max_pos = jnp.max(row_pos)
    num_pages = (max_pos + page_size) // page_size
    lo = 0
    if sliding_window is not None:
        min_pos = jnp.min(jnp.where(valid, row_pos, max_pos))
        lo = jnp.maximum(min_pos - sliding_window + 1, 0) // block_kv
    hi = (num_pages + block_pages - 1) // block_pages
    q = q_ref[...]

    def body(blk, carry):
        page_pos = jnp.minimum(blk * block_pages + jnp.arange(block_pages), num_pages - 1)
        pages = page_table_ref[seq * pages_per_seq + page_pos]
        k = k_ref[pages].reshape(block_kv, head_dim)
        v = v_ref[pages].reshape(block_kv, head_dim)
        kpos = blk * block_kv + jnp.arange(block_kv)
        mask = (kpos[None, :] <= row_pos[:, None]) & valid[:, None]
        if sliding_window is not None:
            mask &= kpos[None, :] > row_pos[:, None] - sliding_window
        return common.online_softmax_step(q, k, v, mask, carry, scale, soft_cap)

    _, l_sum, acc = lax.fori_loop(lo, hi, body, common.init_carry(rows, head_dim))
    o_ref[...] = common.normalise(l_sum, acc).astype(o_ref.dtype)


@functools.partial(
    jax.jit,
    static_argnames=(
        "block_q",
        "scale",
        "sliding_window",
        "soft_cap",
        "interpret",
        "block_kv",
        "block_m",
        "num_warps",
        "num_stages",
    ),
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
    block_kv: int = 64,
    block_m: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> jax.Array:  # [T, H, D]
    """Ragged extend attention; contract in `kernels.reference.extend_attention`."""
    tokens, num_heads, head_dim = q.shape
    num_pages, page_size, kv_heads, _ = k_pages.shape
    if num_heads % kv_heads or tokens % block_q:
        raise ValueError(f"bad shapes: q {q.shape}, kv_heads {kv_heads}, block_q {block_q}")
    for name, value in (
        ("block_q", block_q),
        ("page_size", page_size),
        ("head_dim", head_dim),
        ("block_kv", block_kv),
        ("block_m", block_m),
    ):
        common.check_power_of_2(name, value)
    group = num_heads // kv_heads
    # Pad the group to a power of two and each tile to >= 16 rows (tl.dot's minimum).
    group_p = max(common.next_power_of_2(group), -(-16 // block_q))
    rows = block_q * group_p
    block_m = min(block_m, rows)
    num_blocks = tokens // block_q
    pages_per_seq = page_table.shape[1]
    block_pages = common.pages_per_block(page_size, block_kv, pages_per_seq)

    # [T, H, D] -> [blocks, KVH, block_q * Gp, D]: a kv head's rows are contiguous.
    q5 = q.astype(k_pages.dtype).reshape(num_blocks, block_q, kv_heads, group, head_dim)
    q5 = jnp.pad(q5, ((0, 0), (0, 0), (0, 0), (0, group_p - group), (0, 0)))
    q_rows = q5.transpose(0, 2, 1, 3, 4).reshape(num_blocks, kv_heads, rows, head_dim)
    row_pos = jnp.repeat(positions.astype(jnp.int32).reshape(num_blocks, block_q), group_p, 1)

    kernel = functools.partial(
        _extend_kernel,
        pages_per_seq=pages_per_seq,
        block_pages=block_pages,
        scale=scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    kv_spec = pl.BlockSpec((num_pages, page_size, None, head_dim), lambda i, h, r: (0, 0, h, 0))
    rows_spec = pl.BlockSpec((None, None, block_m, head_dim), lambda i, h, r: (i, h, r, 0))
    out = pl.pallas_call(
        kernel,
        grid=(num_blocks, kv_heads, rows // block_m),
        in_specs=[
            pl.no_block_spec,
            pl.no_block_spec,
            rows_spec,
            pl.BlockSpec((None, block_m), lambda i, h, r: (i, r)),
            kv_spec,
            kv_spec,
        ],
        out_specs=rows_spec,
        out_shape=jax.ShapeDtypeStruct(q_rows.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_extend_attention",
    )(
        block_seq.astype(jnp.int32),
        page_table.reshape(-1).astype(jnp.int32),
        q_rows,
        row_pos,
        k_pages,
        v_pages,
    )
    out = out.reshape(num_blocks, kv_heads, block_q, group_p, head_dim)[:, :, :, :group]
    return out.transpose(0, 2, 1, 3, 4).reshape(tokens, num_heads, head_dim)
