"""Frozen configuration dataclasses and their loading from `configs/*.toml`.

Defaults live here and nowhere else; environment variables are read only in `cli.py`.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (`rope_scaling.rope_type == "llama3"`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family model."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position: int = 2048
    tie_embeddings: bool = True
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    add_bos: bool = False
    name: str = "model"


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: `num_pages` pages of `page_size` tokens per layer."""

    page_size: int = 16
    num_pages: int = 2048
    dtype: str = "auto"  # "auto": float32 on CPU, bfloat16 on GPU/TPU


@dataclass(frozen=True)
class SchedulerConfig:
    """Admission, batching and bucketing limits of the scheduler."""

    max_running_requests: int = 32  # also the number of padded decode slots B
    max_prefill_tokens: int = 512  # per EXTEND step (nothing decoding), the largest bucket
    # MIXED steps: prefill chunks ride along with one token of every decoding request, in one
    # device call, so an admission never stalls decode. The budget is shared, decode rows
    # first (as vLLM V1); prefill chunks get the rest, capped by the largest prefill bucket
    # that fits it. Smaller = lower inter-token latency while prompts arrive.
    enable_mixed_steps: bool = True
    mixed_step_tokens: int = 0  # 0 = by backend (MIXED_STEP_TOKENS)
    max_prefill_seqs: int = 8  # sequences packed into one prefill step
    prefill_block: int = 16  # each sequence starts a new block of this many tokens
    prefill_buckets: tuple[int, ...] = (64, 512)
    decode_batch_buckets: tuple[int, ...] = (4, 16)  # plus max_running_requests, always
    max_model_len: int = 2048
    chunked_prefill: bool = True
    policy: str = "continuous"  # or "static"
    enable_prefix_cache: bool = True
    schedule_order: str = "lpm"  # longest cached prefix first (queues up to 128), or "fcfs"
    init_new_token_ratio: float = 0.7
    min_new_token_ratio: float = 0.1
    new_token_ratio_decay: float = 0.001
    max_waiting: int = 1024


# Default MIXED step budget by backend. On CPU a step costs about its row count (the matmuls
# are compute-bound), so a 128-token chunk keeps decode latency near one DECODE step plus
# ~100 ms (docs/benchmarks.md); on accelerators a step costs its weight reads until a few
# hundred rows, so chunks ride along almost for free.
MIXED_STEP_TOKENS = {"cpu": 160, "gpu": 2048, "tpu": 2048}


def resolve_for_platform(cfg: SchedulerConfig, platform: str) -> SchedulerConfig:
    """Fill the settings whose default depends on the backend ("cpu", "gpu", "tpu")."""
    if cfg.mixed_step_tokens > 0:
        return cfg
    tokens = MIXED_STEP_TOKENS.get(platform, MIXED_STEP_TOKENS["gpu"])
    return dataclasses.replace(cfg, mixed_step_tokens=tokens)


@dataclass(frozen=True)
class ServerConfig:
    """HTTP front end, and what one request or connection may cost it (README: Limits)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    shutdown_timeout_s: float = 30.0
    # Per request, checked before any tokenizing or engine work: 400 (the body: 413).
    max_request_body_bytes: int = 8 * 1024 * 1024  # counted as it arrives, chunked or not
    max_prompt_chars: int = 1_000_000  # all prompts or chat messages of a request, ~250k tokens
    max_prompt_tokens: int = 262_144  # summed over a batch; each prompt is also < max_model_len
    max_prompts_per_request: int = 128  # a /v1/completions batch
    max_n: int = 128  # choices per prompt
    max_choices_per_request: int = 128  # prompts x n (engine requests); also <= max_waiting
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256  # each stop string is matched on the engine thread
    # Per connection, so a slow or idle client cannot hold one forever.
    header_read_timeout_s: float = 10.0  # connect (or a next request's first byte) -> headers
    body_read_timeout_s: float = 60.0  # headers -> whole body, else 408 (8 MiB at 140 kB/s)
    keep_alive_timeout_s: float = 5.0  # idle between requests (behind a proxy: above its own)
    max_header_bytes: int = 16 * 1024  # request line + headers, else 431
    # Beyond this, 503; above max_waiting + max_running_requests so the engine's 429 comes first.
    max_connections: int = 2048
    offload_threads: int = 4  # tokenizing, chat templates, big responses: off the event loop


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs; one TOML file maps onto it."""

    model: str = "smollm2-135m"
    cache_dir: str | None = None  # where presets are fetched to; None = ~/.cache/jaxserve
    dtype: str = "auto"  # "auto": float32 on CPU, bfloat16 on GPU/TPU
    attention_impl: str | None = None  # None = by backend; "reference" | "pallas" | "interpret"
    # Matmul weights: "none" (exact, matches transformers), "bf16", or "int8" (steps of at most
    # int8_max_rows rows, bf16 above). Approximate options; errors in docs/benchmarks.md.
    quantization: str = "none"
    int8_max_rows: int = 16
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)


def _build(cls, data: dict):
    """Instantiate a dataclass from a dict, turning lists into tuples and nested tables."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    kwargs = {}
    for key, value in data.items():
        sub = {"cache": CacheConfig, "scheduler": SchedulerConfig, "server": ServerConfig}
        if cls is EngineConfig and key in sub:
            value = _build(sub[key], value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def load_config(path: str | Path | None = None, **overrides) -> EngineConfig:
    """Read an EngineConfig from TOML (default `configs/smollm2-135m.toml`), then override."""
    path = Path(path) if path is not None else CONFIG_DIR / "smollm2-135m.toml"
    with open(path, "rb") as f:
        cfg = _build(EngineConfig, tomllib.load(f))
    return replace(cfg, **overrides) if overrides else cfg


def replace(cfg: EngineConfig, **overrides) -> EngineConfig:
    """Override fields; `scheduler`/`cache`/`server` accept dicts of their own fields."""
    for key in ("cache", "scheduler", "server"):
        if isinstance(overrides.get(key), dict):
            overrides[key] = dataclasses.replace(getattr(cfg, key), **overrides[key])
    return dataclasses.replace(cfg, **overrides)
