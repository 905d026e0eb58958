"""The supported model families: each one's `Arch` switches and tensor names in both formats.

A fork adds a family here: how its config.json / GGUF metadata maps onto `Arch`, and which
HF / GGUF tensor fills each `LayerParams` field; `models/llama.py` gets a switch only for math
no family had before.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jaxserve.config import Arch, RopeScaling
from jaxserve.errors import UnsupportedModelError

# config.json model_type -> family; the GGUF architecture names are the family names.
HF_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}
GGUF_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
GEMMA3_SLIDING_PATTERN = 6  # every 6th layer global, when neither format says otherwise


def unsupported(kind: str, value: Any, supported: tuple[str, ...] | list[str]) -> str:
    return f"{kind} {value!r} is not supported (supported: {', '.join(supported)})"


def hf_family(c: dict[str, Any], path: Path) -> str:
    model_type = c.get("model_type")
    if model_type == "gemma3" and "text_config" in c:
        raise UnsupportedModelError(
            f"{path}: model_type 'gemma3' (the multimodal checkpoint) is not supported; "
            "text-only 'gemma3_text' checkpoints are (supported: "
            f"{', '.join(HF_MODEL_TYPES)})"
        )
    if model_type not in HF_MODEL_TYPES:
        supported = list(HF_MODEL_TYPES)
        raise UnsupportedModelError(f"{path}: {unsupported('model_type', model_type, supported)}")
    return HF_MODEL_TYPES[model_type]


def rope_from_hf(params: dict[str, Any], path: Path) -> RopeScaling | None:
    """One `rope_scaling` / `rope_parameters` dict -> RopeScaling (None = unscaled)."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type == "linear":
        return RopeScaling(factor=float(params["factor"]), kind="linear")
    if rope_type == "llama3":
        return RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position=int(params["original_max_position_embeddings"]),
        )
    raise UnsupportedModelError(
        f"{path}: {unsupported('rope scaling type', rope_type, ['default', 'linear', 'llama3'])}"
    )


def _local_layers(c: dict[str, Any], num_layers: int, default_pattern: int | None) -> tuple:
    """Which layers are sliding-window ones: `layer_types` (transformers v5), else the older
    `sliding_window_pattern` (Gemma) / `use_sliding_window` + `max_window_layers` (Qwen)."""
    if c.get("layer_types"):
        return tuple(t == "sliding_attention" for t in c["layer_types"])
    if c.get("use_sliding_window"):  # Qwen: layers from max_window_layers on are local
        first = int(c.get("max_window_layers", num_layers))
        return tuple(i >= first for i in range(num_layers))
    pattern = c.get("sliding_window_pattern", default_pattern)
    if pattern is None:
        return ()
    return tuple((i + 1) % int(pattern) != 0 for i in range(num_layers))


def hf_arch(c: dict[str, Any], family: str, path: Path) -> tuple[Arch, float, RopeScaling | None]:
    """(Arch, global rope_theta, global rope scaling) from a config.json dict."""
    for flag in ("mlp_bias", "attn_logit_softcapping", "final_logit_softcapping"):
        if c.get(flag):
            raise UnsupportedModelError(f"{path}: {flag}={c[flag]!r} is not supported")
    if c.get("use_bidirectional_attention"):
        raise UnsupportedModelError(f"{path}: use_bidirectional_attention is not supported")
    if c.get("attention_bias") and family != "qwen2":  # would also put a bias on o_proj
        raise UnsupportedModelError(f"{path}: attention_bias=true is not supported for {family}")
    act = c.get("hidden_activation") or c.get("hidden_act") or "silu"
    acts = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
    if act not in acts:
        raise UnsupportedModelError(f"{path}: {unsupported('hidden_act', act, list(acts))}")
    num_layers = int(c["num_hidden_layers"])
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    per_type = "full_attention" in rope  # v5 Gemma 3: one dict per layer type
    global_rope = rope.get("full_attention", {}) if per_type else rope
    theta = float(
        global_rope.get("rope_theta") or c.get("rope_theta") or (1e6 if family == "gemma3" else 1e4)
    )
    # v4 Gemma 3 configs keep `rope_scaling` for the global layers only.
    scaling = rope_from_hf(global_rope if per_type else (c.get("rope_scaling") or rope), path)
    local = _local_layers(c, num_layers, GEMMA3_SLIDING_PATTERN if family == "gemma3" else None)
    window = c.get("sliding_window") if any(local) else None
    if any(local) and not window:
        raise UnsupportedModelError(f"{path}: sliding-window layers without a sliding_window")
    arch = Arch(
        family=family,
        qkv_bias=family == "qwen2",
        mlp_act=acts[act],
        sliding_window=int(window) if window else None,
        local_layers=local if any(local) else (),
    )
    if family == "qwen3":
        arch = dataclasses.replace(arch, qk_norm=True)
    if family == "gemma3":
        local_rope = rope.get("sliding_attention", {}) if per_type else {}
        if rope_from_hf(local_rope, path) is not None:
            raise UnsupportedModelError(f"{path}: scaled RoPE on local layers is not supported")
        arch = dataclasses.replace(
            arch,
            qk_norm=True,
            norm_offset=1.0,
            post_norms=True,
            embed_scale=True,
            query_scale=float(c.get("query_pre_attn_scalar", 256)) ** -0.5,
            local_rope_theta=float(
                local_rope.get("rope_theta") or c.get("rope_local_base_freq") or 10000.0
            ),
        )
    return arch, theta, scaling


def gguf_arch(meta: dict[str, Any], arch_name: str, dims: dict[str, int]) -> Arch:
    """Arch from GGUF metadata, with llama.cpp's fixed choices where it stores none."""
    key = lambda k: meta.get(f"{arch_name}.{k}")  # noqa: E731
    if arch_name != "gemma3":
        window = key("attention.sliding_window")
        if window and arch_name != "llama":
            raise UnsupportedModelError(f"{arch_name}: sliding-window GGUF files are not supported")
        return Arch(family=arch_name, qkv_bias=arch_name == "qwen2", qk_norm=arch_name == "qwen3")
    num_layers = dims["num_layers"]
    pattern = key("attention.sliding_window_pattern")
    if isinstance(pattern, list):  # per layer: true = local
        local = tuple(bool(p) for p in pattern)
    else:  # llama.cpp fixes Gemma 3's period at 6 (the last of every 6 layers is global)
        period = int(pattern or GEMMA3_SLIDING_PATTERN)
        local = tuple((i + 1) % period != 0 for i in range(num_layers))
    # llama.cpp stores no query_pre_attn_scalar: 27B (62 layers) uses hidden / heads, others
    # head_dim, which is what every released Gemma 3 config says. An explicit
    # `attention.scale` (the key other architectures use) wins.
    scalar = dims["head_dim"]
    if num_layers == 62:
        scalar = dims["hidden_size"] // dims["num_heads"]
    scale = key("attention.scale")
    return Arch(
        family="gemma3",
        qk_norm=True,
        norm_offset=1.0,
        post_norms=True,
        embed_scale=True,
        mlp_act="gelu_tanh",
        query_scale=float(scale) if scale else scalar**-0.5,
        sliding_window=int(key("attention.sliding_window") or 512) if any(local) else None,
        local_layers=local if any(local) else (),
        local_rope_theta=float(key("rope.freq_base_swa") or 10000.0),
    )


# ---- tensor names per LayerParams field ---------------------------------------------------
_HF_BASE = {
    "attn_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}
_GGUF_BASE = {
    "attn_norm": "attn_norm.weight",
    "wq": "attn_q.weight",
    "wk": "attn_k.weight",
    "wv": "attn_v.weight",
    "wo": "attn_output.weight",
    "mlp_norm": "ffn_norm.weight",
    "w_gate": "ffn_gate.weight",
    "w_up": "ffn_up.weight",
    "w_down": "ffn_down.weight",
}
MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def hf_layer_tensors(arch: Arch) -> dict[str, str]:
    """LayerParams field -> HF tensor name after "model.layers.N."."""
    names = dict(_HF_BASE)
    if arch.post_norms:  # Gemma's post_attention_layernorm is an output norm, not the MLP's
        names |= {
            "post_attn_norm": "post_attention_layernorm.weight",
            "mlp_norm": "pre_feedforward_layernorm.weight",
            "post_mlp_norm": "post_feedforward_layernorm.weight",
        }
    if arch.qkv_bias:
        names |= {f"b{x}": f"self_attn.{x}_proj.bias" for x in "qkv"}
    if arch.qk_norm:
        names |= {"q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight"}
    return names


def gguf_layer_tensors(arch: Arch) -> dict[str, str]:
    """LayerParams field -> GGUF tensor name after "blk.N."."""
    names = dict(_GGUF_BASE)
    if arch.post_norms:
        names |= {
            "post_attn_norm": "post_attention_norm.weight",
            "post_mlp_norm": "post_ffw_norm.weight",
        }
    if arch.qkv_bias:
        names |= {f"b{x}": f"attn_{x}.bias" for x in "qkv"}
    if arch.qk_norm:
        names |= {"q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight"}
    return names
