"""A tiny random Llama (real code path, random weights) and a dense, unpaged reference forward.

Used to check the paged prefill/decode machinery against plain causal attention.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.models.llama import LayerParams, LlamaParams

TINY = ModelConfig(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rope_theta=10000.0,
    eos_token_ids=(127,),
)


def tiny_params(cfg: ModelConfig = TINY, seed: int = 0) -> LlamaParams:
    rng = np.random.default_rng(seed)

    def r(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    dm, h, kv, d, f = (
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.intermediate_size,
    )
    ones = np.ones(dm, np.float32)
    layers = tuple(
        LayerParams(
            ones + 0.1 * r(dm),
            r(dm, h * d),
            r(dm, kv * d),
            r(dm, kv * d),
            r(h * d, dm),
            ones,
            r(dm, f),
            r(dm, f),
            r(f, dm),
        )
        for _ in range(cfg.num_layers)
    )
    return LlamaParams(3 * r(cfg.vocab_size, dm), layers, ones, None)


def dense_logits(params: LlamaParams, cfg: ModelConfig, tokens: list[int]) -> np.ndarray:
    """[T, V] float64 logits with textbook causal attention, no cache, no pages."""
    p = _np(params)
    t = len(tokens)
    h, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2) / d))
    ang = np.arange(t)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rope(x):
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.rms_norm_eps) * w

    x = p.embed[tokens]
    mask = np.tril(np.ones((t, t), bool))
    for lp in p.layers:
        y = norm(x, lp.attn_norm)
        q = rope((y @ lp.wq).reshape(t, h, d))
        k = np.repeat(rope((y @ lp.wk).reshape(t, kvh, d)), h // kvh, axis=1)
        v = np.repeat((y @ lp.wv).reshape(t, kvh, d), h // kvh, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
        s = np.where(mask, s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", w, v).reshape(t, h * d) @ lp.wo
        y = norm(x, lp.mlp_norm)
        g = y @ lp.w_gate
        x = x + (g / (1 + np.exp(-g)) * (y @ lp.w_up)) @ lp.w_down
    return norm(x, p.final_norm) @ p.embed.T


def _np(params: LlamaParams) -> LlamaParams:
    import jax

    return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


def save_hf_dir(path: Path, cfg: ModelConfig, params: LlamaParams) -> Path:
    """A Llama as a Hugging Face directory: config.json and one safetensors file (weights
    [out, in], tied embeddings)."""
    from safetensors.numpy import save_file

    from jaxserve.weights.safetensors_loader import LAYER_TENSORS

    path.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": True,
        "eos_token_id": list(cfg.eos_token_ids),
    }
    (path / "config.json").write_text(json.dumps(config))
    tensors = {"model.embed_tokens.weight": params.embed, "model.norm.weight": params.final_norm}
    for i, layer in enumerate(params.layers):
        for field, name in LAYER_TENSORS.items():
            w = np.asarray(getattr(layer, field))
            tensors[f"model.layers.{i}.{name}.weight"] = w if w.ndim == 1 else w.T.copy()
    save_file(tensors, str(path / "model.safetensors"))
    return path
