"""Step-cost models: seconds for one `StepShape`. A constant (for hand-checked tests) and a
linear model over named shape features (fitted to measured steps, stored as TOML).

The roofline model (hardware spec + model shapes) lives in `roofline.py`.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from jaxserve.simulate.shapes import ATTENTION_CHUNK_TOKENS, StepShape


class CostModel(Protocol):
    """Anything that prices a step; `platform` picks backend defaults (mixed_step_tokens)."""

    platform: str

    def step_seconds(self, shape: StepShape) -> float: ...


@dataclass(frozen=True)
class ConstantCost:
    """Every step costs `seconds`, whatever it runs."""

    seconds: float = 1.0
    platform: str = "cpu"

    def step_seconds(self, shape: StepShape) -> float:
        return self.seconds


def _chunked(n: int) -> int:
    return -(-n // ATTENTION_CHUNK_TOKENS) * ATTENTION_CHUNK_TOKENS


def _prefill_attention(s: StepShape) -> float:
    # The CPU extend path: attention within the packed tokens (T x T) when no chunk has a
    # cached prefix, else every token walks the pages up to the deepest position.
    t = s.prefill_tokens_padded
    if s.prefill_kv_read == 0:
        return float(t * t)
    return float(t * _chunked(s.prefill_max_context))


# Named features a linear model may use: what the device computes, in padded units.
FEATURES: dict[str, Callable[[StepShape], float]] = {
    "extend": lambda s: float(s.mode == "extend"),  # per-mode fixed cost (intercepts)
    "decode": lambda s: float(s.mode == "decode"),
    "mixed": lambda s: float(s.mode == "mixed"),
    "decode_rows_padded": lambda s: float(s.decode_rows_padded),
    "prefill_tokens_padded": lambda s: float(s.prefill_tokens_padded),
    # rows x keys walked: the decode reference walks 128-key chunks up to the longest row.
    "decode_attention": lambda s: float(s.decode_rows_padded * _chunked(s.decode_max_context)),
    "prefill_attention": _prefill_attention,
    "decode_context": lambda s: float(s.decode_context),  # KV tokens read (GPU-style kernels)
    "prefill_pairs": lambda s: float(s.prefill_pairs),
    "slot_moves": lambda s: float(s.slot_moves > 0),  # one on-device gather of slot state
}


def feature_vector(shape: StepShape, names: tuple[str, ...]) -> list[float]:
    return [FEATURES[n](shape) for n in names]


@dataclass(frozen=True)
class LinearCost:
    """seconds = sum(coef[f] * feature f(shape)); fitted by `fit.fit_linear`."""

    features: tuple[str, ...]
    coef: tuple[float, ...]  # seconds per unit of each feature
    platform: str = "cpu"
    name: str = "linear"

    def __post_init__(self) -> None:
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown:
            raise ValueError(f"unknown cost features {unknown}; known: {sorted(FEATURES)}")
        if len(self.features) != len(self.coef):
            raise ValueError(f"{len(self.features)} features but {len(self.coef)} coefficients")

    def step_seconds(self, shape: StepShape) -> float:
        x = feature_vector(shape, self.features)
        return max(sum(c * v for c, v in zip(self.coef, x, strict=True)), 0.0)


def load_linear(path: str | Path) -> LinearCost:
    """Read a `[linear]` table: name, platform and `[linear.coef_s]` (feature = seconds)."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    if "linear" not in data:
        raise ValueError(f"{path}: no [linear] table (is it a chip spec? use --hardware)")
    t = data["linear"]
    coef = t["coef_s"]
    return LinearCost(
        features=tuple(coef),
        coef=tuple(float(v) for v in coef.values()),
        platform=t.get("platform", "cpu"),
        name=t.get("name", Path(path).stem),
    )
