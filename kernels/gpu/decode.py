"""Flash-decoding paged attention for GPU (Pallas, Triton lowering).

Grid (batch, kv head, split): each program folds its split's K/V pages into a partial result
(unnormalised output, running max and denominator); a jnp step then merges the splits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.gpu import common

# Enough programs to fill an H100 (132 SMs) about twice over when batch * kv heads is small.
_TARGET_PROGRAMS = 264


def _decode_kernel(
    lengths_ref,  # [B] int32, whole array
    page_table_ref,  # [B * P] int32, whole array
    q_ref,  # [Gp, D], query heads of one KV head, zero-padded to Gp rows
    k_ref,  # [N, page_size, D], this program's KV head
    v_ref,  # [N, page_size, D]
    o_ref,  # [Gp, D] float32, unnormalised partial output of this split
    m_ref,  # [Gp] float32, running max
    l_ref,  # [Gp] float32, softmax denominator
    *,
    pages_per_seq: int,
    pages_per_split: int,
    block_pages: int,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
):
    b, split = pl.program_id(0), pl.program_id(2)
    rows, head_dim = q_ref.shape
    page_size = k_ref.shape[1]
    block_kv = block_pages * page_size
    length = lengths_ref[b]
    num_pages = (length + page_size - 1) // page_size
    first_pos = 0 if sliding_window is None else jnp.maximum(length - sliding_window, 0)

    # Visit only this split's blocks that hold a visible key; an empty range writes zeros.
    blocks_per_split = pages_per_split // block_pages
    lo = jnp.maximum(split * blocks_per_split, first_pos // block_kv)
    hi = jnp.minimum((split + 1) * blocks_per_split, (num_pages + block_pages - 1) // block_pages)
    q = q_ref[...]

    def body(blk, carry):
        # Table entries past the last page may be stale: clamp, then mask by position.
        page_pos = jnp.minimum(blk * block_pages + jnp.arange(block_pages), num_pages - 1)
        pages = page_table_ref[b * pages_per_seq + page_pos]
        k = k_ref[pages].reshape(block_kv, head_dim)
        v = v_ref[pages].reshape(block_kv, head_dim)
        kpos = blk * block_kv + jnp.arange(block_kv)
        visible = (kpos < length) & (kpos >= first_pos)
        mask = jnp.broadcast_to(visible[None, :], (rows, block_kv))
        return common.online_softmax_step(q, k, v, mask, carry, scale, soft_cap)

    m, l_sum, acc = lax.fori_loop(lo, hi, body, common.init_carry(rows, head_dim))
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l_sum


def _num_splits(batch: int, kv_heads: int, num_blocks: int) -> int:
    return max(1, min(num_blocks, -(-_TARGET_PROGRAMS // (batch * kv_heads))))


@functools.partial(
    jax.jit,
    static_argnames=(
        "scale",
        "sliding_window",
        "soft_cap",
        "interpret",
        "block_kv",
        "num_splits",
        "num_warps",
        "num_stages",
    ),
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
    block_kv: int = 128,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> jax.Array:  # [B, H, D]
    """Decode attention; contract in `kernels.reference.paged_attention`."""
    batch, num_heads, head_dim = q.shape
    num_pages, page_size, kv_heads, _ = k_pages.shape
    if num_heads % kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of kv_heads {kv_heads}")
    for name, value in (("page_size", page_size), ("head_dim", head_dim), ("block_kv", block_kv)):
        common.check_power_of_2(name, value)
    group = num_heads // kv_heads
    rows = max(16, common.next_power_of_2(group))  # tl.dot needs at least 16 rows

    block_pages = common.pages_per_block(page_size, block_kv, page_table.shape[1])
    num_blocks = -(-page_table.shape[1] // block_pages)
    splits = num_splits or _num_splits(batch, kv_heads, num_blocks)
    pages_per_split = -(-num_blocks // splits) * block_pages

    # The dots want one element type: queries take the cache's dtype (output gets q's back).
    q4 = q.astype(k_pages.dtype).reshape(batch, kv_heads, group, head_dim)
    q4 = jnp.pad(q4, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    kernel = functools.partial(
        _decode_kernel,
        pages_per_seq=page_table.shape[1],
        pages_per_split=pages_per_split,
        block_pages=block_pages,
        scale=scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    kv_spec = pl.BlockSpec((num_pages, page_size, None, head_dim), lambda b, h, s: (0, 0, h, 0))
    partial_shape = (batch, kv_heads, splits, rows)
    o, m, l_sum = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, splits),
        in_specs=[
            pl.no_block_spec,
            pl.no_block_spec,
            pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0)),
            kv_spec,
            kv_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((*partial_shape, head_dim), jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_decode_attention",
    )(lengths.astype(jnp.int32), page_table.reshape(-1).astype(jnp.int32), q4, k_pages, v_pages)

    # Merge splits: rescale each partial to the global max; empty splits carry l == 0.
    m_max = jnp.max(m, axis=2, keepdims=True)
    weight = jnp.exp(m - m_max)  # [B, KVH, S, Gp]
    l_total = jnp.sum(weight * l_sum, axis=2)
    o_total = jnp.sum(weight[..., None] * o, axis=2)
    out = o_total / jnp.where(l_total > 0.0, l_total, 1.0)[..., None]
    return out[:, :, :group].reshape(batch, num_heads, head_dim).astype(q.dtype)
