"""Serving simulator: the real `Scheduler` driven by a request trace and a step-cost model
(measured on this machine, or a roofline of any chip) instead of a device. Imports no jax.

`simulate(trace, cost, scheduler_cfg, cache_cfg)` runs one trace; `summarize` gives its
figures; `jaxserve simulate` is the command line (docs/simulation.md).
"""

from jaxserve.simulate.cost import ConstantCost, CostModel, LinearCost, load_linear
from jaxserve.simulate.hardware import ChipSpec, load_chip, load_model_shape
from jaxserve.simulate.metrics import summarize
from jaxserve.simulate.roofline import RooflineCost
from jaxserve.simulate.shapes import ShapeOf, StepShape
from jaxserve.simulate.sim import SimState, simulate
from jaxserve.simulate.trace import TraceRequest, jsonl_trace, poisson_trace, scenario_trace

__all__ = [
    "ChipSpec",
    "ConstantCost",
    "CostModel",
    "LinearCost",
    "RooflineCost",
    "ShapeOf",
    "SimState",
    "StepShape",
    "TraceRequest",
    "jsonl_trace",
    "load_chip",
    "load_linear",
    "load_model_shape",
    "poisson_trace",
    "scenario_trace",
    "simulate",
    "summarize",
]
