"""What one HTTP request may be, as pure ASGI middleware: headers too large (431), body too
large (413) or too slow to arrive (408).

Body bytes are counted as they arrive, so an oversized or trickled body is refused before it
is read whole (and before the memory and parsing time it would cost).
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jaxserve.server.errors import APIError

# Each refusal leaves the rest of the request unread, so the connection cannot carry another.
CLOSE = {"Connection": "close"}


def headers_too_large(num_bytes: int, max_bytes: int) -> APIError:
    return APIError(
        431,
        f"request line and headers are {num_bytes} bytes; at most {max_bytes} (max_header_bytes)",
        code="headers_too_large",
        headers=CLOSE,
    )


def body_too_large(max_bytes: int) -> APIError:
    return APIError(
        413,
        f"request body is larger than {max_bytes} bytes (max_request_body_bytes)",
        code="request_too_large",
        headers=CLOSE,
    )


def body_too_slow(timeout_s: float) -> APIError:
    return APIError(
        408,
        f"request body not received within {timeout_s:g} s (body_read_timeout_s)",
        code="request_timeout",
        headers=CLOSE,
    )


def _head_bytes(scope: Scope) -> int:
    target = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
    return target + sum(len(name) + len(value) for name, value in scope["headers"])


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:  # h11 already rejects these; be safe with other servers
                return None
    return None


class RequestLimits:
    """Headers over the limit, or a declared `Content-Length` over it, are answered before the
    app runs; a chunked body raises its 413 from `receive` once the count passes the limit
    (408 past the deadline), which the app's error handlers turn into the usual JSON error.
    """

    def __init__(
        self, app: ASGIApp, max_header_bytes: int, max_body_bytes: int, body_timeout_s: float
    ) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # uvicorn's h11 bounds only a head still arriving; one that came whole is counted here.
        head = _head_bytes(scope)
        declared = _content_length(scope)
        if head > self.max_header_bytes:
            err = headers_too_large(head, self.max_header_bytes)
        elif declared is not None and declared > self.max_body_bytes:
            err = body_too_large(self.max_body_bytes)
        else:
            body = _BodyReceive(receive, self.max_body_bytes, self.body_timeout_s)
            await self.app(scope, body, send)
            return
        await err.response()(scope, receive, send)


class _BodyReceive:
    """One request's `receive`: the body must arrive whole within the deadline and the limit.

    After the last body message it is plain `receive` again (handlers wait on it for the
    client's disconnect while they stream, with no deadline).
    """

    def __init__(self, receive: Receive, max_bytes: int, timeout_s: float) -> None:
        self._receive = receive
        self._max_bytes = max_bytes
        self._timeout_s = timeout_s
        self._deadline = asyncio.get_running_loop().time() + timeout_s  # from the headers on
        self._received = 0  # body bytes so far
        self._done = False

    async def __call__(self) -> Message:
        if self._done:
            return await self._receive()
        try:
            async with asyncio.timeout_at(self._deadline):
                message = await self._receive()
        except TimeoutError:
            raise body_too_slow(self._timeout_s) from None
        if message["type"] != "http.request":  # the client is gone
            self._done = True
            return message
        self._received += len(message.get("body", b""))
        if self._received > self._max_bytes:
            raise body_too_large(self._max_bytes)
        self._done = not message.get("more_body", False)
        return message
