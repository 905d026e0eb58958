"""Shared pieces of the Triton-lowered (GPU) attention kernels: online softmax and block sizes.

Everything here traces inside a Pallas kernel body, so it sticks to ops Triton lowering has.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# Finite, so `m_prev - m_next` stays finite when a row has seen no visible key yet.
MASK_VALUE = -1e30


def next_power_of_2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def check_power_of_2(name: str, value: int) -> None:
    """Triton tensors need power-of-two dims; reject other sizes before tracing."""
    if value <= 0 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two for the Triton kernels, got {value}")


def pages_per_block(page_size: int, block_kv: int, num_pages: int) -> int:
    """Pages gathered per inner step so one K/V tile covers about `block_kv` (>= 16) tokens."""
    return max(-(-16 // page_size), min(block_kv // page_size, next_power_of_2(num_pages)))


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b.T with float32 accumulation; float32 inputs use IEEE (not TF32) products."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b with float32 accumulation; float32 inputs use IEEE (not TF32) products."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(
        a, b, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def online_softmax_step(
    q: jax.Array,  # [M, D]
    k: jax.Array,  # [K, D]
    v: jax.Array,  # [K, D]
    mask: jax.Array,  # [M, K] bool, True = visible
    carry: tuple[jax.Array, jax.Array, jax.Array],  # m [M], l [M], acc [M, D] float32
    scale: float,
    soft_cap: float | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Fold one K/V tile into the running max, denominator and unnormalised output."""
    m_prev, l_prev, acc_prev = carry
    s = dot_nt(q, k) * scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    s = jnp.where(mask, s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    alpha = jnp.exp(m_prev - m_next)
    # Masked entries are zeroed explicitly: a fully masked row has s == m_next == MASK_VALUE.
    p = jnp.where(mask, jnp.exp(s - m_next[:, None]), 0.0)
    l_next = alpha * l_prev + jnp.sum(p, axis=1)
    acc_next = alpha[:, None] * acc_prev + dot_nn(p.astype(v.dtype), v)
    return m_next, l_next, acc_next


def init_carry(rows: int, head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    return (
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, head_dim), jnp.float32),
    )


def normalise(l_sum: jax.Array, acc: jax.Array) -> jax.Array:
    """acc / l with rows that saw no key (l == 0) left as exact zeros."""
    return acc / jnp.where(l_sum > 0.0, l_sum, 1.0)[:, None]
