"""Attention over a paged KV cache: one entry point per op, dispatched by backend.

`impl=None` picks the Pallas kernel on GPU/TPU and the jnp reference on CPU; "reference",
"pallas" and "interpret" (Pallas in interpret mode, for CPU tests) force a choice.
This package depends only on JAX.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import reference

__all__ = ["extend_attention", "mixed_attention", "paged_attention", "write_kv", "resolve_impl"]

IMPLS = ("reference", "pallas", "interpret")


def resolve_impl(impl: str | None, platform: str | None = None) -> str:
    """The implementation to run: `impl` if given, else by the default backend's platform."""
    if impl is not None:
        if impl not in IMPLS:
            raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
        return impl
    platform = platform or jax.default_backend()
    return "reference" if platform == "cpu" else "pallas"


def _arrays(*xs):
    """numpy arrays, lists or jax arrays (tracers included) as jax arrays: the kernels index
    with traced values inside loops, which a numpy array can't take."""
    return tuple(jnp.asarray(x) for x in xs)


def write_kv(k_pages, v_pages, k, v, slot_mapping):
    """Scatter new K/V rows into their pages; see `kernels.reference.write_kv`."""
    return reference.write_kv(*_arrays(k_pages, v_pages, k, v, slot_mapping))


def _backend_module(platform: str):
    if platform == "tpu":
        from kernels import tpu

        return tpu
    from kernels import gpu

    return gpu


def paged_attention(
    q,
    k_pages,
    v_pages,
    page_table,
    lengths,
    *,
    scale,
    sliding_window=None,
    soft_cap=None,
    impl=None,
    platform=None,
):
    """Decode attention; see `kernels.reference.paged_attention` for the contract."""
    impl = resolve_impl(impl, platform)
    q, k_pages, v_pages, page_table, lengths = _arrays(q, k_pages, v_pages, page_table, lengths)
    kw = dict(scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)
    if impl == "reference":
        return reference.paged_attention(q, k_pages, v_pages, page_table, lengths, **kw)
    mod = _backend_module(platform or jax.default_backend())
    return mod.paged_attention(
        q, k_pages, v_pages, page_table, lengths, interpret=impl == "interpret", **kw
    )


def extend_attention(
    q,
    k_pages,
    v_pages,
    page_table,
    block_seq,
    positions,
    *,
    block_q,
    scale,
    sliding_window=None,
    soft_cap=None,
    impl=None,
    platform=None,
):
    """Ragged prefill/extend attention; see `kernels.reference.extend_attention`."""
    impl = resolve_impl(impl, platform)
    q, k_pages, v_pages, page_table, block_seq, positions = _arrays(
        q, k_pages, v_pages, page_table, block_seq, positions
    )
    kw = dict(block_q=block_q, scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)
    if impl == "reference":
        return reference.extend_attention(
            q, k_pages, v_pages, page_table, block_seq, positions, **kw
        )
    mod = _backend_module(platform or jax.default_backend())
    return mod.extend_attention(
        q, k_pages, v_pages, page_table, block_seq, positions, interpret=impl == "interpret", **kw
    )


def mixed_attention(
    q,
    k_pages,
    v_pages,
    decode_page_table,
    decode_lengths,
    page_table,
    block_seq,
    positions,
    *,
    block_q,
    scale,
    sliding_window=None,
    soft_cap=None,
    impl=None,
    platform=None,
):
    """Attention of a MIXED step: q [n + T, H, D] is n decode rows then T packed extend tokens.

    The decode rows (one query per slot; `decode_page_table` [n, P], `decode_lengths` [n])
    run the decode kernel and the extend tokens (`page_table`, `block_seq`, `positions` as in
    `extend_attention`) the extend kernel, inside one traced program: each part keeps the
    block sizes it is tuned for, as tpu-inference's ragged kernel runs decode-only and
    prefill ranges with their own static blocks. Returns [n + T, H, D].
    """
    q, decode_page_table = _arrays(q, decode_page_table)
    n = decode_page_table.shape[0]
    kw = dict(
        scale=scale, sliding_window=sliding_window, soft_cap=soft_cap, impl=impl, platform=platform
    )
    out_decode = paged_attention(q[:n], k_pages, v_pages, decode_page_table, decode_lengths, **kw)
    out_extend = extend_attention(
        q[n:], k_pages, v_pages, page_table, block_seq, positions, block_q=block_q, **kw
    )
    return jax.numpy.concatenate([out_decode, out_extend])
