"""The engine thread: the only code that touches the Engine, fed by a queue of commands.

Handlers on the asyncio loop submit and abort through it; each step's outputs reach the
handlers' asyncio queues with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from jaxserve.engine import Engine
from jaxserve.errors import JaxserveError, QueueFullError
from jaxserve.request import FinishReason, RequestOutput, SamplingParams
from jaxserve.server.dashboard import DashboardFeed
from jaxserve.server.metrics import EngineSnapshot, ServingMetrics

log = logging.getLogger("jaxserve.server")

IDLE_POLL_S = 0.1  # how often an idle engine thread looks at its stop flag
# Distinct KV pages of the running requests: a walk over their page lists, so at most this
# often while busy (and at once when nothing runs).
KV_USAGE_REFRESH_S = 0.5
T = TypeVar("T")
Submission = tuple[str, list[int], SamplingParams]  # (request_id, prompt_token_ids, params)


class EngineUnavailableError(JaxserveError):
    """The engine is still warming up or the server is shutting down (HTTP 503)."""


@dataclass
class _Stream:
    """Where one engine request's outputs go, and its timings for the latency histograms."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput]
    arrival_time: float  # time.monotonic(), as Request.arrival_time
    last_token_time: float | None = None


def _resolve(fut: asyncio.Future, exc: BaseException | None) -> None:
    if not fut.done():  # the handler may have been cancelled meanwhile
        fut.set_result(None) if exc is None else fut.set_exception(exc)


def _deliver(items: list[tuple[asyncio.Queue[RequestOutput], RequestOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)


class Bridge:
    """Runs `engine.step()` in a thread; `submit`/`abort` are queued to it between steps."""

    def __init__(self, engine: Engine | None = None, on_crash: Callable[[str], None] | None = None):
        self.engine = engine
        # The engine thread died: /health fails, and `on_crash` (the CLI: stop the server,
        # exit non-zero) hears why. A supervisor restarts the process; nothing here can.
        self.failure: str | None = None
        self.on_crash = on_crash
        self.snapshot = EngineSnapshot()
        self.metrics = ServingMetrics(lambda: self.snapshot)
        self.dashboard = DashboardFeed()
        self.draining = False  # shutdown began: refuse new requests, finish the others
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # owned by the engine thread
        self._thread: threading.Thread | None = None
        self._running = False
        self._num_step_functions = 0
        self._kv_pages_held = 0  # by running requests, refreshed every KV_USAGE_REFRESH_S
        self._kv_refresh_at = 0.0

    # ---- lifecycle ---------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._running and not self.draining

    @property
    def not_ready_reason(self) -> str:
        if self.failure:
            return f"failed ({self.failure})"
        return "shutting down" if self.draining else "warming up; retry shortly"

    def start(self, engine: Engine | None = None) -> None:
        self.engine = engine or self.engine
        if self.engine is None:
            raise ValueError("Bridge.start needs an engine")
        self._running = True
        self._num_step_functions = self.engine.num_step_functions
        self._snapshot()
        self._thread = threading.Thread(target=self._loop, name="jaxserve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """End the thread; requests still running get an error output."""
        if self._thread is None:
            return
        self._commands.put(lambda: setattr(self, "_running", False))
        self._thread.join(timeout_s)
        self._thread = None

    # ---- called from the event loop (or any thread) -------------------------------------
    async def submit(self, requests: Sequence[Submission]) -> asyncio.Queue[RequestOutput]:
        """Add all requests atomically (all or none); engine input errors raise here."""
        if not self.ready:
            raise EngineUnavailableError(f"server is {self.not_ready_reason}")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def add() -> None:
            assert self.engine is not None
            added: list[str] = []
            try:
                for rid, prompt_ids, params in requests:
                    req = self.engine.add_request(rid, prompt_ids, params)
                    self._streams[rid] = _Stream(loop, outputs, req.arrival_time)
                    added.append(rid)
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                for rid in added:
                    self._abort_one(rid)
                loop.call_soon_threadsafe(_resolve, done, exc)
                return
            loop.call_soon_threadsafe(_resolve, done, None)

        self._commands.put(add)
        try:
            await done
        except QueueFullError:
            self.metrics.rejected.inc()
            raise
        return outputs

    def abort(self, request_ids: Iterable[str]) -> None:
        """Free the requests' slots and pages before the next step; unknown ids are ignored."""
        ids = list(request_ids)
        if ids:
            self._commands.put(lambda: [self._abort_one(rid) for rid in ids])

    def fail_all(self, message: str) -> None:
        """End every request now with an error output (shutdown timeout)."""
        self._commands.put(lambda: self._fail_streams(message))

    def call(self, fn: Callable[[Engine], T], timeout_s: float = 30.0) -> T:
        """Run `fn(engine)` on the engine thread and wait for it (tests, admin)."""
        assert self.engine is not None
        if self._thread is None:
            return fn(self.engine)
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            assert self.engine is not None
            try:
                fut.set_result(fn(self.engine))
            except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread
                fut.set_exception(exc)

        self._commands.put(run)
        return fut.result(timeout_s)

    # ---- the engine thread -------------------------------------------------------------
    def _loop(self) -> None:
        assert self.engine is not None
        engine = self.engine
        try:
            while self._running:
                self._drain(block=not engine.has_work())
                if self._running and engine.has_work():
                    self._step()
                self._snapshot()
        except Exception as exc:
            log.exception("engine thread crashed")
            self.failure = f"engine thread crashed: {type(exc).__name__}: {exc}"
        finally:
            self._running = False
            while not self._commands.empty():  # resolve submits that raced with stop
                self._run_command(self._commands.get_nowait())
            if self.failure:
                self._fail_streams(self.failure, FinishReason.ERROR)
            else:
                self._fail_streams("server stopped")
            if self.failure and self.on_crash is not None:
                self.on_crash(self.failure)

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=IDLE_POLL_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        self._run_command(cmd)
        while self._running and not self._commands.empty():
            self._run_command(self._commands.get_nowait())

    @staticmethod
    def _run_command(cmd: Callable[[], None]) -> None:
        try:
            cmd()
        except Exception:
            log.exception("engine command failed")

    def _step(self) -> None:
        assert self.engine is not None
        st = self.engine.stats
        before = (st.num_prefill_steps, st.num_decode_steps, st.num_mixed_steps)
        generated = st.generation_tokens
        try:
            outputs = self.engine.step()
        except Exception as exc:  # the engine catches device errors; this is the last net
            log.exception("engine step failed")
            self._fail_streams(
                f"engine step failed: {type(exc).__name__}: {exc}", FinishReason.ERROR
            )
            return
        after = (st.num_prefill_steps, st.num_decode_steps, st.num_mixed_steps)
        for mode, b, a in zip(("extend", "decode", "mixed"), before, after, strict=True):
            if a > b:
                owners = [r.request_id if r else None for r in self.engine.scheduler.slots]
                self.dashboard.record_step(mode, owners, st.generation_tokens - generated)
        self._snapshot()  # before the handlers hear of a finish, /metrics already shows it
        self._dispatch(outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.new_token_ids:
                if stream.last_token_time is None:
                    self.metrics.ttft.observe(now - stream.arrival_time)
                    self.dashboard.ttft_s.append(now - stream.arrival_time)
                else:
                    gap = (now - stream.last_token_time) / len(out.new_token_ids)
                    self.metrics.itl.observe(gap)
                    self.dashboard.itl_s.append(gap)
                stream.last_token_time = now
            if out.finished:
                del self._streams[out.request_id]
                if out.error is None:
                    self.metrics.e2e.observe(now - stream.arrival_time)
                    self.metrics.finished(out.finish_reason)
            by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed: nobody is listening
                pass

    def _abort_one(self, request_id: str) -> None:
        assert self.engine is not None
        self._streams.pop(request_id, None)
        self.engine.abort(request_id)

    def _fail_streams(self, message: str, reason: FinishReason = FinishReason.ABORT) -> None:
        assert self.engine is not None
        outputs = []
        for rid in list(self._streams):
            try:
                self.engine.abort(rid)
            except Exception:
                log.exception("abort of %s failed", rid)
            outputs.append(RequestOutput(rid, [], "", True, reason, 0, 0, error=message))
        self._dispatch(outputs)

    def _snapshot(self) -> None:
        assert self.engine is not None
        e = self.engine
        s = e.scheduler
        st = e.stats
        cache = s.prefix_cache
        running = s.running
        now = time.monotonic()
        if not running or now >= self._kv_refresh_at:
            self._kv_pages_held = len(set().union(*(r.pages for r in running)))
            self._kv_refresh_at = now + KV_USAGE_REFRESH_S
        total = s.allocator.num_pages
        self.snapshot = EngineSnapshot(
            num_running=len(running),
            num_waiting=len(s.waiting),
            kv_pages_used=s.allocator.num_used,
            kv_pages_total=total,
            kv_pages_cached=cache.num_pages if cache is not None else 0,
            kv_usage_ratio=self._kv_pages_held / total,
            prompt_tokens=st.prompt_tokens,
            generation_tokens=st.generation_tokens,
            prefix_cache_queries=cache.queries if cache is not None else 0,
            prefix_cache_hits=cache.hits if cache is not None else 0,
            num_compiles=e.runner.num_compiles,
            num_kernel_fallbacks=getattr(e.runner, "num_kernel_fallbacks", 0),
            num_step_functions=self._num_step_functions,
            num_retractions=s.num_retractions,
            num_aborted=st.num_aborted,
            num_failed=st.num_failed,
            num_steps=st.num_steps,
            steps_by_mode=(st.num_prefill_steps, st.num_decode_steps, st.num_mixed_steps),
            device_s_by_mode=(st.prefill_device_s, st.decode_device_s, st.mixed_device_s),
        )
