"""Helpers shared by the HTTP server tests: uvicorn in a thread of the test process, configured
as `jaxserve serve` configures it, and the OpenAI error-body check.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from jaxserve.config import ServerConfig
from jaxserve.server import Bridge, create_app
from jaxserve.server.connection import ServeConfig

MODEL = "smollm2-135m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def run_server(bridge: Bridge, server_cfg: ServerConfig) -> Iterator[str]:
    port = free_port()
    server_cfg = dataclasses.replace(server_cfg, host="127.0.0.1", port=port)
    app = create_app(bridge, server_cfg, MODEL)
    server = uvicorn.Server(ServeConfig(app, server_cfg, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def serve_engine(engine, server_cfg: ServerConfig) -> Iterator[tuple[str, Bridge]]:
    """A real server over the session's `engine` (its thread started here and stopped after);
    the engine must end with no request, slot or page left."""
    from tests.conftest import assert_engine_idle

    bridge = Bridge(engine)
    bridge.start()
    try:
        with run_server(bridge, server_cfg) as url:
            yield url, bridge
    finally:
        bridge.stop()
    assert_engine_idle(engine)


def assert_error(
    r: httpx.Response, status: int, param: str | None = None, code: str | None = None
) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err
