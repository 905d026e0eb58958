"""Hugging Face directories (config.json + *.safetensors) -> `ModelConfig` + `LlamaParams`.

Families: Llama, Qwen2/2.5, Qwen3, Gemma 3 text (`families.py`).

Shards are found by globbing; bf16/f16 tensors become float32 numpy arrays laid out [in, out].
`lazy=True` returns `LazyTensor`s instead: a device mesh reads each device's slice on its own.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from jaxserve.config import Arch, ModelConfig
from jaxserve.errors import UnsupportedModelError
from jaxserve.models.llama import LayerParams, LlamaParams
from jaxserve.weights.families import MATRICES, hf_arch, hf_family, hf_layer_tensors

# Llama's HF tensor name per LayerParams field ("model.layers.N." prefix, ".weight" suffix);
# every family's names: `families.hf_layer_tensors`.
LAYER_TENSORS = {f: n.removesuffix(".weight") for f, n in hf_layer_tensors(Arch()).items()}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UnsupportedModelError(f"{path} is not readable JSON: {e}") from e


def _ids(value: Any) -> list[int]:
    """HF writes token ids as an int, a list of ints, or null."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def hf_config(path: Path) -> ModelConfig:
    """ModelConfig from config.json (v4 `rope_scaling` or v5 `rope_parameters` style)."""
    c = _read_json(path / "config.json")
    family = hf_family(c, path)
    arch, rope_theta, scaling = hf_arch(c, family, path)
    hidden, num_heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    eos = _ids(c.get("eos_token_id"))
    if (path / "generation_config.json").is_file():  # instruct models stop on more ids here
        eos += _ids(_read_json(path / "generation_config.json").get("eos_token_id"))
    bos = _ids(c.get("bos_token_id"))
    return ModelConfig(
        vocab_size=int(c["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(c["intermediate_size"]),
        num_layers=int(c["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(c.get("num_key_value_heads") or num_heads),
        head_dim=int(c.get("head_dim") or hidden // num_heads),
        rope_theta=rope_theta,
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        max_position=int(c.get("max_position_embeddings", 2048)),
        # Gemma's config classes default to tied embeddings, Llama's and Qwen's to untied.
        tie_embeddings=bool(c.get("tie_word_embeddings", family == "gemma3")),
        rope_scaling=scaling,
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=tuple(dict.fromkeys(eos)),
        add_bos=False,  # decided by the tokenizer's post-processor; load_model fills it in
        name=path.name,
        arch=arch,
    )


def _tensor_names(cfg: ModelConfig) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    layer = hf_layer_tensors(cfg.arch).values()
    for i in range(cfg.num_layers):
        names += [f"model.layers.{i}.{t}" for t in layer]
    return names + ([] if cfg.tie_embeddings else ["lm_head.weight"])


class LazyTensor:
    """A float32 view of one stored tensor (matrices as [in, out]), read slice by slice.

    `jax.make_array_from_callback` asks each device's slice (`t[idx]`), so a tensor split over
    a mesh is never read whole; `np.asarray(t)` reads all of it.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, file: Path, name: str, shape: tuple[int, ...], transpose: bool):
        self.file, self.name, self.transpose = file, name, transpose
        self.shape = shape[::-1] if transpose else shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __getitem__(self, idx: Any) -> np.ndarray:
        idx = idx if isinstance(idx, tuple) else (idx,)
        if not all(isinstance(i, slice) for i in idx):
            raise TypeError(f"LazyTensor {self.name} takes slices only, not {idx}")
        idx += (slice(None),) * (self.ndim - len(idx))
        with safe_open(str(self.file), framework="np") as f:
            part = f.get_slice(self.name)[idx[::-1] if self.transpose else idx]
        part = np.asarray(part).astype(np.float32, copy=False)
        return np.ascontiguousarray(part.T) if self.transpose else part

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[()]
        return whole if dtype is None else whole.astype(dtype, copy=False)


def load_hf_params(path: Path, cfg: ModelConfig, lazy: bool = False) -> LlamaParams:
    """Read every needed tensor from the (possibly sharded) safetensors files."""
    with ExitStack() as stack:
        where: dict[str, Any] = {}
        files: dict[str, Path] = {}
        for file in sorted(path.glob("*.safetensors")):
            try:
                handle = stack.enter_context(safe_open(str(file), framework="np"))
            except Exception as e:  # safetensors raises its own SafetensorError
                raise UnsupportedModelError(
                    f"{file} is not a readable safetensors file: {e}"
                ) from e
            where.update(dict.fromkeys(handle.keys(), handle))
            files.update(dict.fromkeys(handle.keys(), file))
        missing = [n for n in _tensor_names(cfg) if n not in where]
        if missing:
            raise UnsupportedModelError(f"{path}: missing tensors {missing[:4]} ({len(missing)})")

        def get(name: str) -> np.ndarray | LazyTensor:  # float32, HF's [out, in] for matrices
            if lazy:
                shape = tuple(where[name].get_slice(name).get_shape())
                return LazyTensor(files[name], name, shape, transpose=False)
            return np.asarray(where[name].get_tensor(name)).astype(np.float32, copy=False)

        def matrix(name: str) -> np.ndarray | LazyTensor:  # [in, out]
            if lazy:
                shape = tuple(where[name].get_slice(name).get_shape())
                return LazyTensor(files[name], name, shape, transpose=True)
            return np.ascontiguousarray(get(name).T)

        layers = []
        for i in range(cfg.num_layers):
            pre = f"model.layers.{i}."
            fields = {
                field: matrix(pre + name) if field in MATRICES else get(pre + name)
                for field, name in hf_layer_tensors(cfg.arch).items()
            }
            layers.append(LayerParams(**fields))
        return LlamaParams(
            embed=get("model.embed_tokens.weight"),  # [V, Dm]
            layers=tuple(layers),
            final_norm=get("model.norm.weight"),
            lm_head=None if cfg.tie_embeddings else matrix("lm_head.weight"),
        )
