"""Llama-like decoder (RMSNorm, RoPE, GQA, gated MLP) as pure functions; families as switches.

Parameters are Flax struct dataclasses (pytrees); attention goes through `kernels`, every matmul
through `quant.dense`, so projection weights may be float, bf16 or int8 (`quant.quantize_params`).
The model knows nothing about requests or slots: token rows + positions + a paged cache -> logits.

Llama, Qwen2/2.5, Qwen3 and Gemma 3 are one `forward` with the named switches of
`config.Arch` (q/k/v bias, q/k norm, norm offset, post norms, embedding scale, MLP activation,
query scale, local sliding-window layers with their own RoPE base) rather than one file per
family: the four differ in a dozen lines out of ~100, so a file per family would be four
copies of the same paged-cache and kernel plumbing that every later change (a kernel argument,
a cache layout, quantization) must edit alike, and each switch reads as the one place the
families differ. A family whose block is not a variation of this one (MoE, Mamba) would get
its own file with the same `forward` / `lm_head` signature. The per-family knowledge of
config and tensor names lives in `jaxserve/weights/families.py`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp

import kernels
from jaxserve.config import ModelConfig
from jaxserve.lora import LoraFn
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
    # Family extras (`cfg.arch`); None where the family has none.
    bq: jax.Array | None = None  # [H * D], arch.qkv_bias
    bk: jax.Array | None = None  # [KVH * D]
    bv: jax.Array | None = None  # [KVH * D]
    q_norm: jax.Array | None = None  # [D], arch.qk_norm
    k_norm: jax.Array | None = None  # [D]
    post_attn_norm: jax.Array | None = None  # [Dm], arch.post_norms
    post_mlp_norm: jax.Array | None = None  # [Dm]


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


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> jax.Array:  # [D // 2] float32
    """RoPE inverse frequencies of a global (or `local`: sliding-window) layer, as in HF.

    Global layers use `rope_theta` with `rope_scaling` (Llama-3 or linear); local layers of a
    family with its own local base (Gemma 3) use that base, unscaled.
    """
    d = cfg.head_dim
    local_theta = cfg.arch.local_rope_theta if local else None
    theta = cfg.rope_theta if local_theta is None else local_theta
    inv = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    rs = None if local_theta is not None else cfg.rope_scaling
    if rs is None:
        return inv
    if rs.kind == "linear":
        return inv / rs.factor
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


def rms_norm(x: jax.Array, w: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
    """RMSNorm over the last axis in float32, scaled by (offset + w) (Gemma: offset 1)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * (offset + w.astype(jnp.float32))).astype(x.dtype)


def _add_bias(x: jax.Array, b: jax.Array | None) -> jax.Array:
    return x if b is None else x + b.astype(x.dtype)


# attend(q [N, H, D], k_pages, v_pages) -> [N, H, D]; local layers add sliding_window=W
AttendFn = Callable[..., jax.Array]


def forward(
    params: LlamaParams,
    cfg: ModelConfig,
    kv: KVCache,
    tokens: jax.Array,  # [N] int32
    positions: jax.Array,  # [N] int32, < 0 = padding
    slot_mapping: jax.Array,  # [N] int32, where each token's K/V goes; < 0 = nowhere
    attend: AttendFn,
    lora: LoraFn | None = None,
) -> tuple[jax.Array, KVCache]:  # hidden [N, Dm] after the final norm, updated cache
    """Run all layers over N token rows, writing their K/V into the paged cache.

    Every `cfg.arch` switch is a Python branch, so each family traces to its own program.
    `lora(y, layer, target)` adds each row's adapter delta to the projections it covers
    (`jaxserve/lora.py`); without it the program is the base model's, unchanged.
    """
    n = tokens.shape[0]
    h, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    arch, eps = cfg.arch, cfg.rms_norm_eps
    norm = functools.partial(rms_norm, eps=eps, offset=arch.norm_offset)
    inv_freq = {False: rope_inv_freq(cfg), True: rope_inv_freq(cfg, local=True)}
    gelu_tanh = functools.partial(jax.nn.gelu, approximate=True)
    act = jax.nn.silu if arch.mlp_act == "silu" else gelu_tanh
    x = params.embed[tokens]
    if arch.embed_scale:  # HF rounds sqrt(hidden) to the model dtype first
        x = x * jnp.asarray(math.sqrt(cfg.hidden_size), x.dtype)
    new_k, new_v = [], []

    def proj(y: jax.Array, w: Weight, layer: int, target: str) -> jax.Array:
        out = dense(y, w)
        delta = None if lora is None else lora(y, layer, target)
        return out if delta is None else out + delta.astype(out.dtype)

    # Layers are unrolled: a scan carrying the whole cache copied it every step (FACTS.md).
    for i, lp in enumerate(params.layers):
        local = arch.is_local(i)
        y = norm(x, lp.attn_norm)
        q = _add_bias(proj(y, lp.wq, i, "q_proj"), lp.bq).reshape(n, h, d)
        k = _add_bias(proj(y, lp.wk, i, "k_proj"), lp.bk).reshape(n, kvh, d)
        v = _add_bias(proj(y, lp.wv, i, "v_proj"), lp.bv).reshape(n, kvh, d)
        if arch.qk_norm:
            q, k = norm(q, lp.q_norm), norm(k, lp.k_norm)
        q = apply_rope(q, positions, inv_freq[local])
        k = apply_rope(k, positions, inv_freq[local])
        k_pages, v_pages = kernels.write_kv(kv.k[i], kv.v[i], k, v, slot_mapping)
        new_k.append(k_pages)
        new_v.append(v_pages)
        if local:
            o = attend(q, k_pages, v_pages, sliding_window=arch.sliding_window)
        else:
            o = attend(q, k_pages, v_pages)
        o = proj(o.reshape(n, h * d), lp.wo, i, "o_proj")
        x = x + (norm(o, lp.post_attn_norm) if arch.post_norms else o)
        y = norm(x, lp.mlp_norm)
        gate, up = proj(y, lp.w_gate, i, "gate_proj"), proj(y, lp.w_up, i, "up_proj")
        o = proj(act(gate) * up, lp.w_down, i, "down_proj")
        x = x + (norm(o, lp.post_mlp_norm) if arch.post_norms else o)
    return norm(x, params.final_norm), KVCache(tuple(new_k), tuple(new_v))


def lm_head(params: LlamaParams, hidden: jax.Array) -> jax.Array:  # [R, V] float32
    w = params.embed.T if params.lm_head is None else params.lm_head
    return dense(hidden, w).astype(jnp.float32)


def softmax_scale(cfg: ModelConfig) -> float:
    if cfg.arch.query_scale is not None:
        return cfg.arch.query_scale
    return 1.0 / math.sqrt(cfg.head_dim)
