"""What one TCP connection may hold: time to send its request headers, their size, idle
keep-alive time, and how many connections are open at once (uvicorn's h11 protocol).

uvicorn has no header-read timeout, and its own 400 (and `limit_concurrency` 503) are plain
text; the protocol here adds the timeout and a connection cap that answer in OpenAI-style JSON.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any

import h11
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from jaxserve.config import ServerConfig
from jaxserve.server.errors import APIError
from jaxserve.server.request_limits import headers_too_large


class ServeConfig(uvicorn.Config):
    """uvicorn's settings from a `ServerConfig`, which `LimitedH11Protocol` reads too."""

    def __init__(self, app: ASGIApp, server_cfg: ServerConfig, log_level: str = "info") -> None:
        super().__init__(
            app,
            host=server_cfg.host,
            port=server_cfg.port,
            http=LimitedH11Protocol,
            lifespan="off",
            log_level=log_level,
            timeout_keep_alive=server_cfg.keep_alive_timeout_s,  # type: ignore[arg-type]
            h11_max_incomplete_event_size=server_cfg.max_header_bytes,
            timeout_graceful_shutdown=int(server_cfg.shutdown_timeout_s) + 5,
        )
        self.server_cfg = server_cfg


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a header-read deadline and a cap on open connections.

    The deadline runs from the connection's start, or from the first byte of a next request
    on a kept-alive connection (idle time between requests is the keep-alive timeout's).
    """

    def __init__(self, config: ServeConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.limits = config.server_cfg
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self.app = self._over_capacity  # every request here gets a 503, then the close
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._cancel_head_timer()

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse: malformed, or a head still incomplete past the limit."""
        max_bytes = self.limits.max_header_bytes
        if len(self.conn.trailing_data[0]) > max_bytes:  # what h11 refused it for
            err = headers_too_large(len(self.conn.trailing_data[0]), max_bytes)
        else:
            err = APIError(400, msg, code="invalid_http")
        body = bytes(err.response().body)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        reason = HTTPStatus(err.status).phrase.encode()
        for event in (
            h11.Response(status_code=err.status, headers=headers, reason=reason),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))  # type: ignore[arg-type]
        self.transport.close()

    # ---- the header deadline -----------------------------------------------------------
    def _watch_head(self) -> None:
        """Arm while a request's headers are awaited (or partly in), disarm once they are in."""
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            self._cancel_head_timer()
            return
        # A new connection, or a kept-alive one that has begun sending its next request.
        started = self.cycle is None or bool(self.conn.trailing_data[0])
        if started and self._head_timer is None:
            timeout_s = self.limits.header_read_timeout_s
            self._head_timer = self.loop.call_later(timeout_s, self._head_timeout)

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()  # nothing to answer: no request was ever received

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    async def _over_capacity(self, scope: Scope, receive: Receive, send: Send) -> None:
        err = APIError(
            503,
            f"server has {len(self.connections)} open connections; at most "
            f"{self.limits.max_connections} (max_connections); retry shortly",
            "server_error",
            code="too_many_connections",
            headers={"Retry-After": "1", "Connection": "close"},
        )
        await err.response()(scope, receive, send)
