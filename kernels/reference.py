"""Pure-jnp attention over a paged KV cache: the CPU production path and the test oracle.

Every Pallas kernel in `kernels/gpu` and `kernels/tpu` is tested against these functions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG_INF = -1e30


def write_kv(
    k_pages: jax.Array,  # [N, page_size, KVH, D]
    v_pages: jax.Array,  # [N, page_size, KVH, D]
    k_new: jax.Array,  # [T, KVH, D]
    v_new: jax.Array,  # [T, KVH, D]
    slot_mapping: jax.Array,  # [T] int32: page * page_size + offset, < 0 = do not write
) -> tuple[jax.Array, jax.Array]:
    """Scatter new K/V rows into their pages; in place when the pages are donated."""
    num_pages, page_size, kvh, d = k_pages.shape
    total = num_pages * page_size
    # Out-of-range rows are dropped by the scatter, so padding never touches a real page.
    idx = jnp.where(slot_mapping < 0, total, slot_mapping)
    if idx.shape[0] == 1:
        # XLA:CPU rewrites a one-row scatter into a dynamic-update-slice and then copies the
        # whole page array (seen: 5 s per decode step at batch 1). A dropped second row keeps
        # it a scatter, which updates in place.
        idx = jnp.concatenate([idx, jnp.array([total], idx.dtype)])
        k_new = jnp.concatenate([k_new, k_new])
        v_new = jnp.concatenate([v_new, v_new])
    k_flat = k_pages.reshape(total, kvh, d).at[idx].set(k_new.astype(k_pages.dtype), mode="drop")
    v_flat = v_pages.reshape(total, kvh, d).at[idx].set(v_new.astype(v_pages.dtype), mode="drop")
    return k_flat.reshape(k_pages.shape), v_flat.reshape(v_pages.shape)


def _masked_softmax_attend(
    q: jax.Array,  # [R, KVH, G, D]
    k: jax.Array,  # [S, KVH, D]
    v: jax.Array,  # [S, KVH, D]
    mask: jax.Array,  # [R, S] bool
    scale: float,
    soft_cap: float | None,
) -> jax.Array:  # [R, KVH, G, D]
    s = jnp.einsum("rkgd,skd->rkgs", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    m = mask[:, None, None, :]
    s = jnp.where(m, s, _NEG_INF)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    p = jnp.where(m, p, 0.0)  # rows with no visible key become exact zeros, never NaN
    denom = jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    return jnp.einsum("rkgs,skd->rkgd", p / denom, v.astype(jnp.float32))


def paged_attention(
    q: jax.Array,  # [B, H, D]
    k_pages: jax.Array,  # [N, page_size, KVH, D]
    v_pages: jax.Array,  # [N, page_size, KVH, D]
    page_table: jax.Array,  # [B, P] int32
    lengths: jax.Array,  # [B] int32, keys visible to each query (0 = inactive slot)
    *,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:  # [B, H, D]
    """Decode attention: one query per slot over its first `lengths[b]` cached tokens."""
    b, h, d = q.shape
    _, page_size, kvh, _ = k_pages.shape
    num_ctx = page_table.shape[1] * page_size
    pos = jnp.arange(num_ctx)

    def one(q_b, pages_b, len_b):
        k = k_pages[pages_b].reshape(num_ctx, kvh, d)
        v = v_pages[pages_b].reshape(num_ctx, kvh, d)
        mask = pos < len_b
        if sliding_window is not None:
            mask &= pos >= len_b - sliding_window
        out = _masked_softmax_attend(
            q_b.reshape(1, kvh, h // kvh, d), k, v, mask[None], scale, soft_cap
        )
        return out.reshape(h, d)

    return jax.vmap(one)(q, page_table, lengths).astype(q.dtype)


def extend_attention(
    q: jax.Array,  # [T, H, D], T = num_blocks * block_q, tokens of several sequences packed
    k_pages: jax.Array,  # [N, page_size, KVH, D], new K/V already written
    v_pages: jax.Array,  # [N, page_size, KVH, D]
    page_table: jax.Array,  # [S, P] int32, one row per sequence in this step
    block_seq: jax.Array,  # [T // block_q] int32, row of page_table for each query block
    positions: jax.Array,  # [T] int32, absolute position of each query token, < 0 = padding
    *,
    block_q: int,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:  # [T, H, D]
    """Ragged prefill/extend: each token attends causally to its own sequence's pages.

    Sequences start at multiples of `block_q`, so each query block belongs to one sequence;
    that is what lets a kernel walk one page-table row per block.
    """
    t, h, d = q.shape
    _, page_size, kvh, _ = k_pages.shape
    nb = t // block_q
    token_seq = jnp.repeat(block_seq, block_q)  # [T]
    valid = positions >= 0
    # When every sequence in the step starts at position 0 (plain prefill, no cached prefix),
    # all keys are the step's own tokens: attend within the packed tokens and skip the page
    # gather over the whole context, which dominated prefill time on CPU.
    num_seqs = page_table.shape[0]
    count = jax.ops.segment_sum(valid.astype(jnp.int32), token_seq, num_seqs)
    last = jax.ops.segment_max(jnp.where(valid, positions, -1), token_seq, num_seqs)
    no_prefix = jnp.all((count == 0) | (last + 1 == count))

    def packed(_):
        pos = jnp.maximum(positions, 0)
        pages = page_table[token_seq, pos // page_size]
        k = k_pages[pages, pos % page_size]  # [T, KVH, D], the tokens just written
        v = v_pages[pages, pos % page_size]
        mask = (token_seq[:, None] == token_seq[None, :]) & valid[:, None] & valid[None, :]
        mask &= positions[None, :] <= positions[:, None]
        if sliding_window is not None:
            mask &= positions[None, :] > positions[:, None] - sliding_window
        out = _masked_softmax_attend(q.reshape(t, kvh, h // kvh, d), k, v, mask, scale, soft_cap)
        return out.reshape(t, h, d)

    def paged(_):
        num_ctx = page_table.shape[1] * page_size
        kpos = jnp.arange(num_ctx)

        def one(args):
            q_blk, pos_blk, seq = args  # [block_q, H, D], [block_q], []
            pages = page_table[seq]
            k = k_pages[pages].reshape(num_ctx, kvh, d)
            v = v_pages[pages].reshape(num_ctx, kvh, d)
            mask = (kpos[None, :] <= pos_blk[:, None]) & (pos_blk[:, None] >= 0)
            if sliding_window is not None:
                mask &= kpos[None, :] > pos_blk[:, None] - sliding_window
            out = _masked_softmax_attend(
                q_blk.reshape(block_q, kvh, h // kvh, d), k, v, mask, scale, soft_cap
            )
            return out.reshape(block_q, h, d)

        out = jax.lax.map(
            one, (q.reshape(nb, block_q, h, d), positions.reshape(nb, block_q), block_seq)
        )
        return out.reshape(t, h, d)

    return jax.lax.cond(no_prefix, packed, paged, None).astype(q.dtype)
