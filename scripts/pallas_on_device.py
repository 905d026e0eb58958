"""pytest plugin: tests/test_kernels.py with the Pallas kernels compiled for the device.

The kernel tests pass `interpret=True` so that they run on CPU; on a GPU (or TPU) this plugin
drops the flag for that platform's kernel module, so every case (decode, extend, MIXED,
dispatch) runs the real Triton (Mosaic) kernel against the jnp reference, with the tests' own
inputs and tolerances. On CPU it changes nothing. Used by scripts/device_check.sh:

    PYTHONPATH=scripts python -m pytest tests/test_kernels.py -p pallas_on_device -k "not tpu"
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import pytest

import kernels.gpu
import kernels.tpu

MODULES = {"gpu": kernels.gpu, "tpu": kernels.tpu}


def _compiled(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def call(*args, **kwargs):
        kwargs["interpret"] = False
        return fn(*args, **kwargs)

    return call


def pytest_configure(config: pytest.Config) -> None:
    module = MODULES.get(jax.default_backend())
    if module is None:
        return
    for name in ("paged_attention", "extend_attention"):
        setattr(module, name, _compiled(getattr(module, name)))


def pytest_report_header(config: pytest.Config) -> str:
    backend = jax.default_backend()
    how = "compiled" if backend in MODULES else "interpret mode (no accelerator)"
    return f"pallas_on_device: {backend} kernels {how}; devices {jax.devices()}"
