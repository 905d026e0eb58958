"""One HTTP request's engine requests (its choices): submit, follow their outputs, abort leftovers.

Also the two ways a response ends early: the client disconnects (abort everything it asked for)
or the engine reports an error (500, or 503 when the server is shutting down).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import anyio
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from jaxserve.errors import JaxserveError
from jaxserve.request import FinishReason, RequestOutput, SamplingParams, TokenLogprob
from jaxserve.server.bridge import Bridge
from jaxserve.server.errors import APIError, from_engine_error
from jaxserve.server.protocol import ErrorResponse, PromptTokensDetails, Usage, now_s


@dataclass
class Choice:
    index: int
    request_id: str
    prompt_index: int
    prompt_len: int
    cached_tokens: int = 0  # of the prompt, served from the prefix cache
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    done: bool = False
    finish_reason: str | None = None
    error: APIError | None = None


def _error_of(out: RequestOutput) -> APIError:
    if out.finish_reason is FinishReason.ERROR:
        return APIError(500, out.error or "generation failed", "server_error", code="engine_error")
    return APIError(503, out.error or "request aborted", "server_error", code="shutting_down")


class Generation:
    """The engine requests behind one HTTP request, choice i having id `f"{base_id}-{i}"`."""

    def __init__(
        self, bridge: Bridge, base_id: str, choices: list[tuple[int, list[int], SamplingParams]]
    ):
        self.bridge = bridge
        self.id = base_id
        self.created = now_s()  # one timestamp for the response and all of its chunks
        self.choices: list[Choice] = []
        self._submissions: list[tuple[str, list[int], SamplingParams]] = []
        for i, (prompt_index, prompt_ids, params) in enumerate(choices):
            rid = f"{base_id}-{i}"
            self._submissions.append((rid, prompt_ids, params))
            self.choices.append(Choice(i, rid, prompt_index, len(prompt_ids)))
        self._by_id = {c.request_id: c for c in self.choices}
        self._queue: asyncio.Queue[RequestOutput] | None = None

    async def start(self) -> None:
        try:
            self._queue = await self.bridge.submit(self._submissions)
        except JaxserveError as exc:
            raise from_engine_error(exc) from exc

    async def events(self) -> AsyncIterator[tuple[Choice, RequestOutput]]:
        """Each output as it comes, after it has been folded into its choice."""
        assert self._queue is not None
        while not all(c.done for c in self.choices):
            out = await self._queue.get()
            choice = self._by_id[out.request_id]
            choice.text += out.new_text
            choice.token_ids += out.new_token_ids
            choice.logprobs += out.logprobs or []
            choice.cached_tokens = out.num_cached_tokens
            if out.finished:
                choice.done = True
                if out.error is not None or out.finish_reason in (None, FinishReason.ABORT):
                    choice.error = _error_of(out)
                else:
                    choice.finish_reason = out.finish_reason.value
            yield choice, out

    def close(self) -> None:
        """Abort whatever is still running (client gone, handler cancelled); idempotent."""
        self.bridge.abort(c.request_id for c in self.choices if not c.done)
        for c in self.choices:
            c.done = True

    def first_error(self) -> APIError | None:
        return next((c.error for c in self.choices if c.error is not None), None)

    def usage(self) -> Usage:
        # n choices share one prompt, counted once, with the cached tokens of its first choice
        first = {c.prompt_index: c for c in reversed(self.choices)}.values()
        completion = sum(len(c.token_ids) for c in self.choices)
        total = sum(c.prompt_len for c in first)
        return Usage(
            prompt_tokens=total,
            completion_tokens=completion,
            total_tokens=total + completion,
            prompt_tokens_details=PromptTokensDetails(
                cached_tokens=sum(c.cached_tokens for c in first)
            ),
        )

    async def collect(self, request: Request) -> bool:
        """Run to the end; False if the client disconnected first (everything is aborted)."""

        async def consume() -> None:
            async for _ in self.events():
                pass

        consumer = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(wait_disconnect(request.receive))
        try:
            await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if consumer.done():
                consumer.result()
                return True
            return False
        finally:
            for task in (consumer, watcher):
                task.cancel()
            self.close()


async def wait_disconnect(receive: Receive) -> None:
    """Returns once the client is gone (the request body must have been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


def sse_error(err: APIError) -> str:
    return sse(ErrorResponse(error=err.info).model_dump_json())


class EventStream(StreamingResponse):
    """Server-sent events that stop, and run `on_close`, as soon as the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._content = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the client went away mid-write
                        await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await wait_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            self._on_close()
            with contextlib.suppress(Exception):
                await self._content.aclose()  # type: ignore[attr-defined]
