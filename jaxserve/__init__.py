"""jaxserve: a continuous-batching LLM serving engine on JAX (CPU, GPU, TPU).

`from jaxserve import LLM, SamplingParams` is the offline entry point (imported lazily, so
that jax-free modules such as the scheduler stay jax-free).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxserve.llm import LLM, GenerationOutput
    from jaxserve.request import SamplingParams

__all__ = ["LLM", "GenerationOutput", "SamplingParams"]


def __getattr__(name: str):
    if name in ("LLM", "GenerationOutput"):
        from jaxserve import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from jaxserve.request import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'jaxserve' has no attribute {name!r}")
