"""Chip specs and model shapes for the roofline cost model, read from TOML under
`configs/hardware/` (chips) and `configs/hardware/models/` (model shapes).

A chip file has one `[chip]` table (`ChipSpec` fields); a model file one `[model]` table of
`jaxserve.config.ModelConfig` fields. Names resolve to files: `--hardware h100` reads
`configs/hardware/h100.toml`; a path works too.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

from jaxserve.config import CONFIG_DIR, ModelConfig

HARDWARE_DIR = CONFIG_DIR / "hardware"
MODELS_DIR = HARDWARE_DIR / "models"


@dataclass(frozen=True)
class ChipSpec:
    """One accelerator (or host CPU) as the roofline sees it; all figures per chip."""

    name: str
    platform: str  # "gpu" | "tpu" | "cpu": picks backend defaults such as mixed_step_tokens
    peak_flops: float  # dense FLOP/s at the dtype below (datasheet bf16 for accelerators)
    memory_bandwidth: float  # bytes/s (HBM)
    memory_bytes: float  # capacity; sizes the KV cache when the run does not say
    interconnect_bandwidth: float = 0.0  # bytes/s per chip, bidirectional (NVLink, ICI)
    chips: int = 1  # default tensor-parallel degree (chips per dp group)
    # Chips the machine has (an HGX board, a TPU slice): tp * dp above it is refused; 0 = chips.
    max_chips: int = 0
    flops_efficiency: float = 0.5  # share of peak a serving step's matmuls reach
    bandwidth_efficiency: float = 0.8  # share of peak bandwidth weight/KV streaming reaches
    step_overhead_s: float = 0.002  # per step: host scheduling, dispatch, tokens back
    collective_latency_s: float = 10e-6  # per all-reduce, on top of its bytes
    dtype_bytes: int = 2  # weights and KV cache (bf16); 4 for jaxserve's float32 on CPU
    source: str = ""  # where the figures come from

    def __post_init__(self) -> None:
        if self.platform not in ("gpu", "tpu", "cpu"):
            raise ValueError(f"platform={self.platform!r} must be gpu, tpu or cpu")
        for name in ("peak_flops", "memory_bandwidth", "memory_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")
        for name in ("flops_efficiency", "bandwidth_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be in (0, 1]")
        if self.chips < 1 or self.max_chips < 0:
            raise ValueError(f"chips={self.chips} must be >= 1, max_chips={self.max_chips} >= 0")
        if self.max_chips and self.max_chips < self.chips:
            raise ValueError(f"max_chips={self.max_chips} is below chips={self.chips}")

    @property
    def available_chips(self) -> int:
        """The most chips a run may use (tp * dp)."""
        return self.max_chips or self.chips


def _resolve(name_or_path: str, folder: Path) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        return path
    candidate = folder / f"{name_or_path}.toml"
    if not candidate.exists():
        known = sorted(p.stem for p in folder.glob("*.toml"))
        raise ValueError(f"no spec {name_or_path!r} in {folder}; known: {known}")
    return candidate


def _table(path: Path, table: str) -> dict:
    with open(path, "rb") as f:
        data = tomllib.load(f)
    if table not in data:
        raise ValueError(f"{path}: no [{table}] table")
    return data[table]


def load_chip(name_or_path: str) -> ChipSpec:
    t = _table(_resolve(name_or_path, HARDWARE_DIR), "chip")
    fields = {f.name for f in dataclasses.fields(ChipSpec)}
    unknown = set(t) - fields
    if unknown:
        raise ValueError(f"{name_or_path}: unknown [chip] keys {sorted(unknown)}")
    return ChipSpec(**t)


def load_model_shape(name_or_path: str) -> ModelConfig:
    t = dict(_table(_resolve(name_or_path, MODELS_DIR), "model"))
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(t) - fields
    if unknown:
        raise ValueError(f"{name_or_path}: unknown [model] keys {sorted(unknown)}")
    if "eos_token_ids" in t:
        t["eos_token_ids"] = tuple(t["eos_token_ids"])
    return ModelConfig(**t)


def known_chips() -> list[str]:
    return sorted(p.stem for p in HARDWARE_DIR.glob("*.toml") if "chip" in _tables(p))


def _tables(path: Path) -> set[str]:
    with open(path, "rb") as f:
        return set(tomllib.load(f))
