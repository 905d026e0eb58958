"""Fitting a `LinearCost` to measured steps: records (shape, seconds) in JSONL, least squares
with one outlier pass, residuals per mode, and the TOML the simulator reads back.

Collecting the records needs the real engine: `scripts/fit_step_cost.py`. Refitting saved
records does not: `jaxserve simulate fit --records out/step_records.jsonl`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxserve.simulate.cost import LinearCost, feature_vector
from jaxserve.simulate.shapes import StepShape

# Shared coefficients per unit of work, one fixed cost per mode (see docs/simulation.md).
CPU_FEATURES = (
    "extend",
    "decode",
    "mixed",
    "decode_rows_padded",
    "prefill_tokens_padded",
    "decode_attention",
    "prefill_attention",
    "slot_moves",
)


@dataclass(frozen=True)
class StepRecord:
    shape: StepShape
    seconds: float  # wall time of Engine.step()
    tag: str = ""  # which config / workload produced it
    load_1m: float = 0.0  # the machine's 1-minute load average when it ran


def save_records(records: list[StepRecord], path: str | Path, append: bool = False) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a" if append else "w") as f:
        for r in records:
            row = {**dataclasses.asdict(r), "shape": dataclasses.asdict(r.shape)}
            f.write(json.dumps(row) + "\n")


def load_records(path: str | Path) -> list[StepRecord]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [StepRecord(**{**r, "shape": StepShape(**r["shape"])}) for r in rows]


@dataclass(frozen=True)
class FitReport:
    cost: LinearCost
    num_steps: int
    num_outliers: int  # dropped before the final fit (a neighbour's job, a GC pause)
    rmse_s: float
    r2: float
    # per mode: steps, mean measured s, mean |residual| / measured
    by_mode: dict[str, dict[str, float]]
    by_tag: dict[str, dict[str, float]]


def _summary(rows: list[tuple[StepRecord, float]]) -> dict[str, float]:
    meas = np.array([r.seconds for r, _ in rows])
    pred = np.array([p for _, p in rows])
    return {
        "steps": len(rows),
        "mean_measured_s": float(meas.mean()),
        "mean_predicted_s": float(pred.mean()),
        "mean_abs_rel_err": float(np.mean(np.abs(pred - meas) / meas)),
    }


def _nonnegative_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0 (a cost never shrinks with more work): drop
    the most negative feature and refit until none is negative. Unseen features get 0."""
    active = [j for j in range(a.shape[1]) if np.any(a[:, j])]
    coef = np.zeros(a.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        if sol.min() >= 0:
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return coef


def fit_linear(
    records: list[StepRecord],
    features: tuple[str, ...] = CPU_FEATURES,
    platform: str = "cpu",
    name: str = "cpu-measured",
    outlier_factor: float = 3.0,
) -> FitReport:
    """Non-negative least squares in relative terms, so a 30 ms decode step counts as much as
    a 1 s prefill: noise on a shared machine is multiplicative (a neighbour slows every step
    by a factor). Each residual is weighted by 1 / the model's own prediction, iterated
    (weighting by 1 / measured would favour the lucky fast steps and price every step low),
    and the fit is redone once without the steps more than `outlier_factor` off (a compile,
    a page-in); slow steps short of that are kept, since a neighbour's burst is part of what a
    run on this machine costs."""
    x = np.array([feature_vector(r.shape, features) for r in records])
    y = np.array([r.seconds for r in records])
    keep = np.ones(len(y), bool)
    for _ in range(2):
        scale = y[keep]
        for _ in range(4):
            w = 1.0 / scale
            coef = _nonnegative_lstsq(x[keep] * w[:, None], y[keep] * w)
            scale = np.maximum(x[keep] @ coef, 1e-3)
        # By log ratio: a relative residual never exceeds 1 when the step is slower.
        err = np.log(y / np.maximum(x @ coef, 1e-6))
        keep = np.abs(err) <= np.log(outlier_factor)
    pred = x @ coef
    cost = LinearCost(tuple(features), tuple(float(c) for c in coef), platform, name)
    resid = pred[keep] - y[keep]
    ss_tot = float(np.sum((y[keep] - y[keep].mean()) ** 2))
    pairs = list(zip(records, pred.tolist(), strict=True))
    kept = [p for p, k in zip(pairs, keep, strict=True) if k]
    groups: dict[str, dict[str, list]] = {"mode": {}, "tag": {}}
    for rec, p in kept:
        groups["mode"].setdefault(rec.shape.mode, []).append((rec, p))
        groups["tag"].setdefault(rec.tag, []).append((rec, p))
    return FitReport(
        cost=cost,
        num_steps=int(keep.sum()),
        num_outliers=int((~keep).sum()),
        rmse_s=float(np.sqrt(np.mean(resid**2))),
        r2=1.0 - float(np.sum(resid**2)) / max(ss_tot, 1e-12),
        by_mode={m: _summary(v) for m, v in sorted(groups["mode"].items())},
        by_tag={t: _summary(v) for t, v in sorted(groups["tag"].items())},
    )


def _toml_value(v: Any) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, float):
        return f"{v:.6g}" if v == v else "nan"
    return str(v)


def fit_toml(report: FitReport, source: dict[str, Any]) -> str:
    """The TOML `cost.load_linear` reads, with the fit's quality and provenance as comments
    and tables (ignored by the loader)."""
    c = report.cost
    lines = [
        f"# Step-cost model fitted by least squares to {report.num_steps} measured engine steps",
        "# (scripts/fit_step_cost.py); seconds = sum of coef_s[feature] * feature(step shape).",
        "# Features: jaxserve/simulate/cost.py FEATURES; docs/simulation.md explains the form.",
        "[linear]",
        f"name = {_toml_value(c.name)}",
        f"platform = {_toml_value(c.platform)}",
        "",
        "[linear.coef_s]",
        *(f"{f} = {v:.6g}" for f, v in zip(c.features, c.coef, strict=True)),
        "",
        "[quality]",
        f"num_steps = {report.num_steps}",
        f"num_outliers = {report.num_outliers}",
        f"rmse_s = {report.rmse_s:.6g}",
        f"r2 = {report.r2:.4f}",
    ]
    for title, table in (("quality.by_mode", report.by_mode), ("quality.by_tag", report.by_tag)):
        for key, stats in table.items():
            lines += ["", f'[{title}."{key}"]']
            lines += [f"{k} = {_toml_value(v)}" for k, v in stats.items()]
    lines += ["", "[source]"] + [f"{k} = {_toml_value(v)}" for k, v in source.items()]
    return "\n".join(lines) + "\n"
