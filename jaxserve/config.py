"""Frozen configuration dataclasses and their loading from `configs/*.toml`.

Defaults live here and nowhere else; environment variables are read only in `cli.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: Llama-3 style (`rope_type == "llama3"`) or linear (every
    frequency divided by `factor`, Gemma 3's global layers)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    kind: Literal["llama3", "linear"] = "llama3"


@dataclass(frozen=True)
class Arch:
    """How a family's decoder differs from Llama's: the switches of `models/llama.py`.

    The defaults are Llama; `jaxserve/weights/families.py` sets them per family from a
    config.json or GGUF metadata.
    """

    family: str = "llama"  # config.json model_type / GGUF general.architecture it came from
    qkv_bias: bool = False  # q/k/v projections add a bias (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + w): 1 for Gemma
    post_norms: bool = False  # RMSNorm on the attention and MLP outputs too (Gemma 2/3)
    embed_scale: bool = False  # embeddings times sqrt(hidden_size), in the model dtype (Gemma)
    mlp_act: Literal["silu", "gelu_tanh"] = "silu"  # of the gated MLP's gate branch
    query_scale: float | None = None  # attention softmax scale; None = head_dim ** -0.5
    sliding_window: int | None = None  # keys a local layer sees, itself included
    local_layers: tuple[bool, ...] = ()  # per layer: True = local (sliding window); () = none
    # Local layers' RoPE base (unscaled); None = the global rope_theta and rope_scaling.
    local_rope_theta: float | None = None

    def is_local(self, layer: int) -> bool:
        return bool(self.local_layers) and self.local_layers[layer]


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-like model; `arch` holds what its family changes."""

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
    arch: Arch = Arch()


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: `num_pages` pages of `page_size` tokens per layer."""

    page_size: int = 16  # tokens per KV page
    num_pages: int = 0  # 0 = size from free device memory (kv_cache_memory_fraction)
    kv_cache_memory_fraction: float = 0.9  # with num_pages = 0: share of free memory for KV
    dtype: str = "auto"  # KV cache dtype; "auto": the model's dtype


@dataclass(frozen=True)
class SchedulerConfig:
    """Admission, batching and bucketing limits of the scheduler."""

    max_running_requests: int = 32  # also the number of padded decode slots B
    # per EXTEND step (nothing decoding), the largest bucket; budgets are per dp group
    max_prefill_tokens: int = 512
    # MIXED steps: prefill chunks ride along with one token of every decoding request, in one
    # device call, so an admission never stalls decode. The budget is shared, decode rows
    # first (as vLLM V1); prefill chunks get the rest, capped by the largest prefill bucket
    # that fits it. Smaller = lower inter-token latency while prompts arrive.
    enable_mixed_steps: bool = True
    mixed_step_tokens: int = 0  # MIXED step token budget; 0 = by backend (MIXED_STEP_TOKENS)
    max_prefill_seqs: int = 8  # sequences packed into one prefill step (per dp group)
    prefill_block: int = 16  # each sequence starts a new block of this many tokens
    prefill_buckets: tuple[int, ...] = (64, 512)  # prefill step sizes compiled, in tokens
    decode_batch_buckets: tuple[int, ...] = (4, 16)  # plus max_running_requests, always
    max_model_len: int = 2048  # prompt + output tokens of one request
    chunked_prefill: bool = True  # split prompts longer than a step's budget
    policy: Literal["continuous", "static"] = "continuous"  # static: classic static batching
    enable_prefix_cache: bool = True  # reuse KV pages of earlier requests' common prefixes
    # Longest cached prefix first (queues up to 128), or first come first served.
    schedule_order: Literal["lpm", "fcfs"] = "lpm"
    init_new_token_ratio: float = 0.7  # decode-token reserve at admission, after a retraction
    min_new_token_ratio: float = 0.1  # the decode-token reserve decays to this ...
    new_token_ratio_decay: float = 0.001  # ... by this much per decode step
    # Out of pages while decoding: retract until the rest can decode this many more steps.
    retract_decode_steps: int = 20
    max_waiting: int = 1024  # waiting queue bound; beyond it, 429
    # dp > 1: a request goes to the group caching the longest prefix of it (the next turn of a
    # chat to its history), unless that group has more than this many fewer free slots than
    # the freest group; then to the freest.
    dp_balance_slots: int = 8


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

    host: str = "127.0.0.1"  # address to listen on
    port: int = 8000  # port to listen on
    api_key: str | None = None  # require 'Authorization: Bearer KEY' on /v1 (or $JAXSERVE_API_KEY)
    served_model_name: str | None = None  # the model name clients use; unset = model
    shutdown_timeout_s: float = 30.0  # seconds in-flight requests get after SIGTERM
    # Per request, checked before any tokenizing or engine work: 400 (the body: 413).
    max_request_body_bytes: int = 8 * 1024 * 1024  # else 413, counted as it arrives (chunked too)
    max_prompt_chars: int = 1_000_000  # all prompts or chat messages of a request, ~250k tokens
    max_prompt_tokens: int = 262_144  # summed over a batch; each prompt is also < max_model_len
    max_prompts_per_request: int = 128  # a /v1/completions batch
    max_n: int = 128  # choices per prompt
    max_choices_per_request: int = 128  # prompts x n (engine requests); also <= max_waiting
    max_stop_strings: int = 16  # per request
    max_stop_string_chars: int = 256  # each stop string is matched on the engine thread
    # Per connection, so a slow or idle client cannot hold one forever.
    header_read_timeout_s: float = 10.0  # connect (or a next request's first byte) -> headers
    body_read_timeout_s: float = 60.0  # headers -> whole body, else 408 (8 MiB at 140 kB/s)
    keep_alive_timeout_s: float = 5.0  # idle between requests (behind a proxy: above its own)
    max_header_bytes: int = 16 * 1024  # request line + headers, else 431
    # Beyond this, 503; above max_waiting + max_running_requests so the engine's 429 comes first.
    max_connections: int = 2048
    offload_threads: int = 4  # tokenizing, chat templates, big responses: off the event loop
    # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's); off by default.
    enable_runtime_lora: bool = False
    lora_dir: str | None = None  # runtime loads read only adapters inside this directory


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-host serving with jax.distributed (docs/scaling.md): one mesh over all processes."""

    # HOST:PORT process 0 listens on (or $JAXSERVE_COORDINATOR); "auto": jax reads it, the
    # process count and id from the cluster (Cloud TPU pod slice, SLURM, Open MPI, Kubernetes)
    coordinator: str | None = None
    num_processes: int = 1  # processes of the job (or $JAXSERVE_NUM_PROCESSES)
    process_id: int = 0  # this one (or $JAXSERVE_PROCESS_ID): 0 serves HTTP, others follow it
    keepalive_s: float = 2.0  # an idle process 0 pings the others this often (finds dead ones)
    # a device call after warm-up taking longer means a process is stuck; keep it below
    # jax's 100 s heartbeat timeout, after which jax aborts every process of the job
    step_timeout_s: float = 60.0


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs; one TOML file maps onto it."""

    model: str = "smollm2-135m"  # preset name, .gguf file or Hugging Face directory
    cache_dir: str | None = None  # where presets are fetched to; unset = ~/.cache/jaxserve
    dtype: str = "auto"  # weights and activations; "auto": float32 on CPU, bfloat16 on GPU/TPU
    attention_impl: Literal["reference", "pallas", "interpret"] | None = None  # unset = by backend
    # Matmul weights: "none" (exact, matches transformers), "bf16", or "int8" (steps of at most
    # int8_max_rows rows, bf16 above). Approximate options; errors in docs/benchmarks.md.
    quantization: str = "none"
    int8_max_rows: int = 16  # quantization = "int8": int8 weights in steps up to these rows
    seed: int = 0  # draws the seed of every request that gives none
    # Device mesh (docs/scaling.md): tp * dp devices, one jitted program per step over all.
    tp: int = 1  # tensor parallel: attention/KV heads, MLP hidden dim and vocab split over tp
    # data parallel: dp groups, each with max_running_requests slots and num_pages KV pages
    dp: int = 1
    # LoRA (jaxserve/lora.py): adapters share fixed stacked buffers, so loading one never
    # compiles.
    lora_modules: tuple[str, ...] = ()  # NAME=PATH (a PEFT dir) served from the start; LoRA on
    enable_lora: bool = False  # allocate the LoRA buffers even with no lora_modules
    max_loras: int = 4  # adapters resident at once (buffer slots; slot 0 is "no adapter")
    max_lora_rank: int = 16  # buffers' rank; lower-rank adapters are zero-padded
    # Projections the buffers cover (PEFT names); adapters may target a subset.
    lora_target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @property
    def lora_enabled(self) -> bool:
        return self.enable_lora or bool(self.lora_modules)


TABLES = {
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "server": ServerConfig,
    "distributed": DistributedConfig,
}


def _build(cls, data: dict):
    """Instantiate a dataclass from a dict, turning lists into tuples and nested tables."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if cls is EngineConfig and key in TABLES:
            value = _build(TABLES[key], value)
        elif isinstance(value, list):
            value = tuple(value)
        choices = literal_choices(hints[key])
        if choices and value not in choices:
            raise ValueError(f"{cls.__name__}.{key}={value!r}; expected one of {choices}")
        kwargs[key] = value
    return cls(**kwargs)


def literal_choices(hint: Any) -> tuple[Any, ...]:
    """The allowed values of a `Literal[...]` (or `Literal[...] | None`) hint, else ()."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    if len(args) == 1 and typing.get_origin(args[0]) is Literal:
        return typing.get_args(args[0])
    return ()


def parse_config(text: str) -> EngineConfig:
    """An EngineConfig from TOML text (missing keys keep their defaults)."""
    return _build(EngineConfig, tomllib.loads(text))


def load_config(path: str | Path | None = None, **overrides) -> EngineConfig:
    """Read an EngineConfig from TOML (default `configs/smollm2-135m.toml`), then override."""
    path = Path(path) if path is not None else CONFIG_DIR / "smollm2-135m.toml"
    cfg = parse_config(path.read_text(encoding="utf-8"))
    return replace(cfg, **overrides) if overrides else cfg


def replace(cfg: EngineConfig, **overrides) -> EngineConfig:
    """Override fields; each table (`scheduler`, `cache`, ...) accepts a dict of its fields."""
    for key in TABLES:
        if isinstance(overrides.get(key), dict):
            overrides[key] = dataclasses.replace(getattr(cfg, key), **overrides[key])
    return dataclasses.replace(cfg, **overrides)


# ---- TOML out (`jaxserve serve --print-config`) ---------------------------------------------
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)  # inf, -inf, nan
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON's escapes are valid TOML ones
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as TOML")


def _toml_table(obj: Any) -> list[str]:
    lines = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:  # TOML has no null; a missing key loads as the default, None
            lines.append(f"# {f.name} = (unset)")
        elif not dataclasses.is_dataclass(value):
            lines.append(f"{f.name} = {_toml_value(value)}")
    return lines


def dump_toml(cfg: EngineConfig) -> str:
    """The config as TOML that `parse_config` reads back to an equal config."""
    lines = _toml_table(cfg)
    for name in TABLES:
        lines += ["", f"[{name}]", *_toml_table(getattr(cfg, name))]
    return "\n".join(lines) + "\n"


# ---- KV cache sizing (`num_pages = 0`) ------------------------------------------------------
# Without device memory statistics (CPU) the budget is the host's available memory, capped:
# the KV cache then shares RAM with everything else on the machine.
HOST_KV_CACHE_MAX_BYTES = 2 * 1024**3


def resolve_num_pages(
    cfg: EngineConfig,
    page_bytes: int,
    free_bytes: int | None,
    host_available_bytes: int,
    weight_bytes: int = 0,
) -> CacheConfig:
    """`num_pages = 0`: as many pages as `kv_cache_memory_fraction` of the free memory holds.

    `free_bytes`: device memory not in use (None where the device keeps no statistics, i.e.
    CPU: then `host_available_bytes`, capped at HOST_KV_CACHE_MAX_BYTES); `weight_bytes`: the
    weights that will still be placed there. Pure, so the arithmetic is testable anywhere.
    """
    cache = cfg.cache
    if cache.num_pages > 0:
        return cache
    fraction = cache.kv_cache_memory_fraction
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"kv_cache_memory_fraction={fraction} must be in (0, 1]")
    if free_bytes is None:
        budget = min(host_available_bytes * fraction, HOST_KV_CACHE_MAX_BYTES)
        where = f"{fraction} of {host_available_bytes / 2**30:.1f} GiB available host memory"
    else:
        budget = (free_bytes - weight_bytes) * fraction
        where = f"{fraction} of {free_bytes / 2**30:.1f} GiB free device memory less weights"
    num_pages = max(int(budget), 0) // page_bytes
    need = -(-cfg.scheduler.max_model_len // cache.page_size)
    if num_pages < need:
        raise ValueError(
            f"KV cache sized from memory ({where}) has {num_pages} pages; one request of "
            f"max_model_len={cfg.scheduler.max_model_len} needs {need}: lower max_model_len, "
            f"raise kv_cache_memory_fraction or set num_pages"
        )
    return dataclasses.replace(cache, num_pages=num_pages)
