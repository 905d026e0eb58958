"""What `num_pages = 0` sizes the KV cache from: free device memory and the bytes of one page.

The arithmetic is `config.resolve_num_pages` (pure, testable anywhere); this module asks the
device, and the host where the device keeps no statistics (CPU).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import psutil

from jaxserve.config import EngineConfig, ModelConfig, replace, resolve_num_pages
from jaxserve.models.llama import LlamaParams
from jaxserve.runner import resolve_dtype
from jaxserve.sharding import kv_heads_per_device

log = logging.getLogger("jaxserve")


def kv_page_bytes(model_cfg: ModelConfig, page_size: int, dtype: jnp.dtype) -> int:
    """K and V of `page_size` tokens in every layer."""
    per_token = 2 * model_cfg.num_layers * model_cfg.num_kv_heads * model_cfg.head_dim
    return per_token * page_size * jnp.dtype(dtype).itemsize


def free_device_bytes(device: jax.Device) -> int | None:
    """Memory the allocator can still hand out; None without statistics (CPU)."""
    stats = device.memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def size_kv_cache(cfg: EngineConfig, model_cfg: ModelConfig, params: LlamaParams) -> EngineConfig:
    """`cfg` with `cache.num_pages` resolved; unchanged when it is set already.

    Per device: with tensor parallelism the weights and the KV heads are split over `tp`
    devices (one KV head each when tp > KV heads); each data-parallel group has `num_pages`
    pages on its own.
    """
    if cfg.cache.num_pages > 0:
        return cfg
    dtype = resolve_dtype(cfg.dtype)  # what the runner casts the weights to
    kv_dtype = dtype if cfg.cache.dtype == "auto" else jnp.dtype(cfg.cache.dtype)
    weights = sum(a.size for a in jax.tree.leaves(params)) * jnp.dtype(dtype).itemsize
    heads = kv_heads_per_device(model_cfg, cfg.tp)
    page_bytes = kv_page_bytes(model_cfg, cfg.cache.page_size, kv_dtype) * heads
    page_bytes //= model_cfg.num_kv_heads
    weight_bytes = weights // cfg.tp
    cache = resolve_num_pages(
        cfg,
        page_bytes,
        free_device_bytes(jax.devices()[0]),
        psutil.virtual_memory().available // (cfg.tp * cfg.dp),  # CPU devices share the host
        weight_bytes,
    )
    log.info(
        "KV cache sized from memory: %d pages, %.2f GiB",
        cache.num_pages,
        cache.num_pages * page_bytes / 2**30,
    )
    return replace(cfg, cache=cache)
