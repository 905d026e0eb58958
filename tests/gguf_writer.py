"""Write a Hugging Face fixture directory as a float32 GGUF, the way llama.cpp's converter does.

Qwen2 / Qwen3 / Gemma 3 with a byte-level BPE tokenizer. llama.cpp's conventions kept: no Q/K
row permutation for these architectures, Gemma's norm weights stored as 1 + w, tied
embeddings as a missing `output.weight`. Imports only numpy, gguf and safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

ARCHS = {"qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}
LAYER = {  # HF name after "model.layers.N." -> GGUF name after "blk.N."
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GEMMA_LAYER = {
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}


def _tensor_name(hf: str, gemma: bool) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf.split(".", 3)
    table = LAYER | (
        GEMMA_LAYER if gemma else {"post_attention_layernorm.weight": "ffn_norm.weight"}
    )
    return f"blk.{layer}.{table[rest]}"


def write_gguf(hf_dir: Path, out: Path) -> Path:
    c = json.loads((hf_dir / "config.json").read_text())
    arch = ARCHS[c["model_type"]]
    gemma = arch == "gemma3"
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(hf_dir.name)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_key_length(c["head_dim"])
    w.add_value_length(c["head_dim"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    rope = c.get("rope_parameters") or {}
    if gemma:
        full, local = rope["full_attention"], rope["sliding_attention"]
        w.add_rope_freq_base(full["rope_theta"])
        w.add_rope_freq_base_swa(local["rope_theta"])
        if full.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(full["factor"])
        w.add_sliding_window(c["sliding_window"])
        w.add_sliding_window_pattern([t == "sliding_attention" for t in c["layer_types"]])
        w.add_attention_scale(c["query_pre_attn_scalar"] ** -0.5)
    else:
        w.add_rope_freq_base(rope.get("rope_theta") or c["rope_theta"])

    # Tokenizer: byte-level BPE, ids in order, specials as control tokens.
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    tc = json.loads((hf_dir / "tokenizer_config.json").read_text())
    vocab = dict(tj["model"]["vocab"])
    kinds = {}
    for t in tj["added_tokens"]:
        vocab[t["content"]] = t["id"]
        kinds[t["id"]] = gguf.TokenType.CONTROL if t["special"] else gguf.TokenType.USER_DEFINED
    tokens = [None] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([kinds.get(i, gguf.TokenType.NORMAL) for i in range(len(tokens))])
    w.add_token_merges(merges)
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    w.add_eos_token_id(eos[0])
    if len(eos) > 1:
        w.add_eot_token_id(eos[1])
    if tc.get("bos_token"):
        w.add_bos_token_id(vocab[tc["bos_token"]])
    w.add_add_bos_token(bool(tc.get("bos_token")))
    template = hf_dir / "chat_template.jinja"
    w.add_chat_template(template.read_text() if template.is_file() else tc["chat_template"])

    tensors = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        tensors |= load_file(str(file))
    for name, t in tensors.items():
        t = np.asarray(t, np.float32)
        if gemma and name.endswith("norm.weight"):
            t = t + np.float32(1.0)
        w.add_tensor(_tensor_name(name, gemma), np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
