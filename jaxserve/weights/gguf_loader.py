"""GGUF files (llama, qwen2, qwen3, gemma3) -> `ModelConfig` and float32 numpy `LlamaParams`.

The cheap checks (magic, architecture, tensor names, quant types) run before any dequantisation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from jaxserve.config import Arch, ModelConfig, RopeScaling
from jaxserve.errors import UnsupportedModelError
from jaxserve.models.llama import LayerParams, LlamaParams
from jaxserve.weights.families import (
    GGUF_ARCHS,
    MATRICES,
    gguf_arch,
    gguf_layer_tensors,
    unsupported,
)

SUPPORTED_QUANTS = frozenset(
    GGMLQuantizationType[name]
    for name in (
        *("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"),
        *("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"),
    )
)


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # numpy order, e.g. [out, in] (GGUF lists dims the other way round)
    qtype: GGMLQuantizationType
    data: np.ndarray  # uint8 [..., bytes per row], a view of the memory-mapped file


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    meta: dict[str, Any]  # key -> str/int/float/bool or list of them
    tensors: dict[str, GGUFTensor]


# GGUF value type -> struct format; 8 is a string, 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q"}
_SCALARS |= {11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_QTYPE_IDS = frozenset(int(q) for q in GGML_QUANT_SIZES)


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError("string runs past the end of the file")
        self.pos += n
        return str(self.buf[self.pos - n : self.pos], "utf-8")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            return self.scalar(_SCALARS[vtype])
        item_type, count = self.scalar("<I"), self.scalar("<Q")
        if item_type in (_STRING, _ARRAY):
            return [self.value(item_type) for _ in range(count)]
        fmt = _SCALARS[item_type]
        items = np.frombuffer(self.buf, np.dtype(fmt), count=count, offset=self.pos)
        self.pos += items.nbytes
        return items.tolist()


def open_gguf(path: Path) -> GGUFFile:
    """Parse the header and metadata; tensors stay in the memory map until dequantised.

    gguf's own GGUFReader takes ~2 s on a 49k-token vocabulary (an object per array item);
    this reads the same format in ~0.2 s. Any parse failure means a corrupt file.
    """
    try:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        cur = _Cursor(memoryview(mm))
        if bytes(cur.buf[:4]) != b"GGUF":
            raise ValueError(f"bad magic {bytes(cur.buf[:4])!r}")
        cur.pos = 4
        version, n_tensors, n_kv = cur.scalar("<I"), cur.scalar("<Q"), cur.scalar("<Q")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (expected 2 or 3)")
        meta = {}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name, n_dims = cur.string(), cur.scalar("<I")
            dims = [cur.scalar("<Q") for _ in range(n_dims)]
            infos.append((name, tuple(reversed(dims)), cur.scalar("<I"), cur.scalar("<Q")))
        align = int(meta.get("general.alignment", 32))
        data_start = -(-cur.pos // align) * align
        tensors = {}
        for name, shape, qtype_id, offset in infos:
            if qtype_id not in _QTYPE_IDS:
                raise UnsupportedModelError(
                    f"{path}: tensor {name} has unknown quantisation type id {qtype_id}"
                )
            qtype = GGMLQuantizationType(qtype_id)
            block, type_size = GGML_QUANT_SIZES[qtype]
            row_bytes = shape[-1] // block * type_size
            n_bytes = int(np.prod(shape[:-1], dtype=np.int64)) * row_bytes
            begin = data_start + offset
            if begin + n_bytes > len(mm):
                raise ValueError(f"tensor {name} runs past the end of the file (truncated?)")
            data = mm[begin : begin + n_bytes].reshape(*shape[:-1], row_bytes)
            tensors[name] = GGUFTensor(name, shape, qtype, data)
    except UnsupportedModelError:
        raise
    except (ValueError, KeyError, IndexError, OverflowError, struct.error, UnicodeDecodeError) as e:
        raise UnsupportedModelError(f"{path} is not a readable GGUF file: {e}") from e
    return GGUFFile(path, meta, tensors)


def gguf_config(gf: GGUFFile) -> ModelConfig:
    """ModelConfig from `{arch}.*` metadata, after checking every tensor is one we can load."""
    meta, path, tensors = gf.meta, gf.path, gf.tensors
    arch_name = meta.get("general.architecture")
    if arch_name not in GGUF_ARCHS:
        raise UnsupportedModelError(f"{path}: {unsupported('architecture', arch_name, GGUF_ARCHS)}")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch_name}.{key}", default)
        if value is None:
            raise UnsupportedModelError(f"{path}: metadata {arch_name}.{key} is missing")
        return value

    hidden, num_heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // num_heads))
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise UnsupportedModelError(f"{path}: partial rotary embeddings are not supported")
    num_layers = int(get("block_count"))
    dims = dict(num_layers=num_layers, head_dim=head_dim, hidden_size=hidden, num_heads=num_heads)
    arch = gguf_arch(meta, arch_name, dims)
    _check_tensors(tensors, num_layers, arch, path)
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get(f"{arch_name}.vocab_size") or (len(tokens) if tokens else None)
    eos = [meta.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    default_theta = 1e6 if arch_name == "gemma3" else 10000.0
    return ModelConfig(
        vocab_size=int(vocab or tensors["token_embd.weight"].shape[0]),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rope_theta=_f32(get("rope.freq_base", default_theta)),
        rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position=int(get("context_length", 2048)),
        tie_embeddings="output.weight" not in tensors,
        rope_scaling=_rope_scaling(meta, arch_name, tensors, head_dim, path),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(i) for i in eos if i is not None)),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        name=path.stem,
        arch=arch,
    )


def _f32(value: float) -> float:
    """Shortest decimal of a float32 metadata value: 1e-05, not 9.999999747378752e-06."""
    return float(str(np.float32(value)))


def _check_tensors(tensors: dict[str, Any], num_layers: int, arch: Arch, path: Path) -> None:
    names = ["token_embd.weight", "output_norm.weight"]
    layer = gguf_layer_tensors(arch).values()
    names += [f"blk.{i}.{t}" for i in range(num_layers) for t in layer]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise UnsupportedModelError(
            f"{path}: missing tensors {missing[:4]} ({len(missing)} in all)"
        )
    for t in tensors.values():
        if t.qtype not in SUPPORTED_QUANTS:
            raise UnsupportedModelError(
                f"{path}: tensor {t.name} has unsupported quantisation {t.qtype.name}"
            )


def _rope_scaling(
    meta: dict, arch_name: str, tensors: dict, head_dim: int, path: Path
) -> RopeScaling | None:
    kind = meta.get(f"{arch_name}.rope.scaling.type", "none")
    if kind == "linear":  # Gemma 3's global layers (llama.cpp leaves local layers unscaled)
        return RopeScaling(factor=_f32(meta[f"{arch_name}.rope.scaling.factor"]), kind="linear")
    if kind not in ("none", None):
        raise UnsupportedModelError(f"{path}: rope scaling type {kind!r} is not supported")
    if "rope_freqs.weight" not in tensors:
        return None
    if arch_name != "llama":
        raise UnsupportedModelError(f"{path}: rope_freqs is only supported for llama")
    # llama.cpp bakes Llama-3 scaling into per-frequency divisors; recover the HF parameters
    # (llama.cpp's converter only writes this for rope_type llama3) and check they reproduce it.
    freqs = dequantize(tensors["rope_freqs.weight"].data, tensors["rope_freqs.weight"].qtype)
    original = int(meta.get(f"{arch_name}.rope.scaling.original_context_length", 8192))
    scaling = RopeScaling(factor=float(freqs.max()), original_max_position=original)
    theta = _f32(meta.get("llama.rope.freq_base", 10000.0))
    if not np.allclose(llama3_freq_divisors(scaling, theta, head_dim), freqs.ravel(), rtol=1e-3):
        raise UnsupportedModelError(f"{path}: rope_freqs is not Llama-3 scaling with defaults")
    return scaling


def llama3_freq_divisors(rs: RopeScaling, theta: float, head_dim: int) -> np.ndarray:
    """What llama.cpp stores as `rope_freqs`: unscaled / scaled inverse frequency per pair."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv
    smooth = (rs.original_max_position / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    mid = 1.0 / ((1 - smooth) / rs.factor + smooth)
    low_wavelen = rs.original_max_position / rs.low_freq_factor
    high_wavelen = rs.original_max_position / rs.high_freq_factor
    out = np.where(wavelen > low_wavelen, rs.factor, 1.0)
    return np.where((wavelen <= low_wavelen) & (wavelen >= high_wavelen), mid, out)


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation ([out, in]) back to HF's rotate-half layout."""
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).swapaxes(1, 2).reshape(w.shape)


def load_gguf_params(gf: GGUFFile, cfg: ModelConfig) -> LlamaParams:
    """Dequantise every tensor to float32 and lay matrices out as [in, out].

    Two llama.cpp conventions are undone: Llama's Q/K rows are permuted for its RoPE layout
    (the other families use the half-split layout already), and Gemma's norm weights are
    stored with the 1 of `(1 + w)` added.
    """
    tensors = gf.tensors
    permuted = cfg.arch.family == "llama"
    norm_shift = cfg.arch.norm_offset

    def out_in(name: str) -> np.ndarray:  # [out, in] float32, as dequantize returns it
        t = tensors[name]
        w = dequantize(t.data, t.qtype)
        # F32 comes back as a view of the memory-mapped file; own the memory instead.
        w = w.copy() if t.qtype == GGMLQuantizationType.F32 else w.astype(np.float32, copy=False)
        return w.reshape(t.shape)

    def norm(name: str) -> np.ndarray:
        return out_in(name) - np.float32(norm_shift) if norm_shift else out_in(name)

    def matrix(name: str, n_heads: int | None = None) -> np.ndarray:  # [in, out]
        w = out_in(name)
        if n_heads is not None and permuted:
            w = unpermute_rows(w, n_heads)
        return np.ascontiguousarray(w.T)

    heads = {"wq": cfg.num_heads, "wk": cfg.num_kv_heads}
    layers = []
    for i in range(cfg.num_layers):
        pre = f"blk.{i}."
        fields = {}
        for field, gguf_name in gguf_layer_tensors(cfg.arch).items():
            if field in MATRICES:
                fields[field] = matrix(pre + gguf_name, heads.get(field))
            elif field.startswith("b"):  # q/k/v biases
                fields[field] = out_in(pre + gguf_name)
            else:
                fields[field] = norm(pre + gguf_name)
        layers.append(LayerParams(**fields))
    return LlamaParams(
        embed=out_in("token_embd.weight"),  # [V, Dm]: rows are tokens already
        layers=tuple(layers),
        final_norm=norm("output_norm.weight"),
        lm_head=None if cfg.tie_embeddings else matrix("output.weight"),
    )
