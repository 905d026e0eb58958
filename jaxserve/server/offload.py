"""CPU-heavy request work off the event loop: tokenizing, chat templates, big JSON responses.

A small pool of its own, so a burst of large prompts queues here instead of stalling `/health`,
streams and every other request on the loop. The pool never touches the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class Offload:
    """`await offload.run(fn, *args)`: `fn(*args)` on one of `num_threads` worker threads.

    Python code there still shares the GIL with the loop (switched every few ms); the
    tokenizer's batch encode releases it, so long prompts cost the loop nothing.
    """

    def __init__(self, num_threads: int) -> None:
        if num_threads < 1:
            raise ValueError(f"offload_threads must be >= 1, got {num_threads}")
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="jaxserve-offload")

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
