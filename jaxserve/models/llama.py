"""Llama-family transformer (RMSNorm, RoPE incl. llama3 scaling, GQA, SwiGLU) as pure functions.

Parameters are Flax struct dataclasses (pytrees); attention goes through `kernels`, every matmul
through `quant.dense`, so projection weights may be float, bf16 or int8 (`quant.quantize_params`).
The model knows nothing about requests or slots: token rows + positions + a paged cache -> logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp

import kernels
from jaxserve.config import ModelConfig
from jaxserve.quant import Weight, dense


@flax.struct.dataclass
class LayerParams:
    attn_norm: jax.Array  # [Dm]
    wq: Weight  # [Dm, H * D]
    wk: Weight  # [Dm, KVH * D]
    wv: Weight  # [Dm, KVH * D]
    wo: Weight  # [H * D, Dm]
    mlp_norm: jax.Array  # [Dm]
    w_gate: Weight  # [Dm, F]
    w_up: Weight  # [Dm, F]
    w_down: Weight  # [F, Dm]


@flax.struct.dataclass
class LlamaParams:
    embed: jax.Array  # [V, Dm]
    layers: tuple[LayerParams, ...]
    final_norm: jax.Array  # [Dm]
    lm_head: Weight | None  # [Dm, V]; None = tied to embed (quantized params always have one)


@flax.struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [num_pages, page_size, KVH, D]
    v: tuple[jax.Array, ...]  # per layer [num_pages, page_size, KVH, D]


def init_kv_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype) -> KVCache:
    shape = (num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    zeros = lambda: jnp.zeros(shape, dtype)  # noqa: E731
    return KVCache(
        k=tuple(zeros() for _ in range(cfg.num_layers)),
        v=tuple(zeros() for _ in range(cfg.num_layers)),
    )


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:  # [D // 2] float32
    """RoPE inverse frequencies, with Llama-3 scaling when configured (as in HF)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    low_wavelen = rs.original_max_position / rs.low_freq_factor
    high_wavelen = rs.original_max_position / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (rs.original_max_position / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    scaled = jnp.where(wavelen > low_wavelen, inv / rs.factor, inv)
    mid = (1 - smooth) * inv / rs.factor + smooth * inv
    is_mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return jnp.where(is_mid, mid, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x: [N, heads, D] in HF's half-split layout; positions: [N]."""
    angles = jnp.maximum(positions, 0).astype(jnp.float32)[:, None] * inv_freq[None, :]
    cos = jnp.cos(angles)[:, None, :]
    sin = jnp.sin(angles)[:, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * w.astype(jnp.float32)).astype(x.dtype)


# attend(layer_index, q [N, H, D], k_pages, v_pages) -> [N, H, D]
AttendFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def forward(
    params: LlamaParams,
    cfg: ModelConfig,
    kv: KVCache,
    tokens: jax.Array,  # [N] int32
    positions: jax.Array,  # [N] int32, < 0 = padding
    slot_mapping: jax.Array,  # [N] int32, where each token's K/V goes; < 0 = nowhere
    attend: AttendFn,
) -> tuple[jax.Array, KVCache]:  # hidden [N, Dm] after the final norm, updated cache
    """Run all layers over N token rows, writing their K/V into the paged cache."""
    n = tokens.shape[0]
    h, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    inv_freq = rope_inv_freq(cfg)
    x = params.embed[tokens]
    new_k, new_v = [], []
    # Layers are unrolled: a scan carrying the whole cache copied it every step (FACTS.md).
    for i, lp in enumerate(params.layers):
        y = rms_norm(x, lp.attn_norm, cfg.rms_norm_eps)
        q = apply_rope(dense(y, lp.wq).reshape(n, h, d), positions, inv_freq)
        k = apply_rope(dense(y, lp.wk).reshape(n, kvh, d), positions, inv_freq)
        v = dense(y, lp.wv).reshape(n, kvh, d)
        k_pages, v_pages = kernels.write_kv(kv.k[i], kv.v[i], k, v, slot_mapping)
        new_k.append(k_pages)
        new_v.append(v_pages)
        o = attend(q, k_pages, v_pages)
        x = x + dense(o.reshape(n, h * d), lp.wo)
        y = rms_norm(x, lp.mlp_norm, cfg.rms_norm_eps)
        x = x + dense(jax.nn.silu(dense(y, lp.w_gate)) * dense(y, lp.w_up), lp.w_down)
    return rms_norm(x, params.final_norm, cfg.rms_norm_eps), KVCache(tuple(new_k), tuple(new_v))


def lm_head(params: LlamaParams, hidden: jax.Array) -> jax.Array:  # [R, V] float32
    w = params.embed.T if params.lm_head is None else params.lm_head
    return dense(hidden, w).astype(jnp.float32)


def softmax_scale(cfg: ModelConfig) -> float:
    return 1.0 / math.sqrt(cfg.head_dim)
