"""Graceful shutdown: on SIGTERM/SIGINT stop accepting, let in-flight requests finish for
`shutdown_timeout_s`, then end the rest with an error so every connection closes cleanly.
"""

from __future__ import annotations

import logging
import threading
from types import FrameType

import uvicorn

from jaxserve.server.bridge import Bridge

log = logging.getLogger("jaxserve.server")


class GracefulServer(uvicorn.Server):
    """uvicorn's server plus the bridge's drain: 503 for new requests, a deadline for old ones."""

    def __init__(self, config: uvicorn.Config, bridge: Bridge, shutdown_timeout_s: float):
        super().__init__(config)
        self.bridge = bridge
        self.shutdown_timeout_s = shutdown_timeout_s
        self._deadline: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._deadline is None:
            self.begin_drain()
        super().handle_exit(sig, frame)

    def begin_drain(self) -> None:
        """Refuse new requests now; fail those still running after the timeout."""
        self.bridge.draining = True
        log.info("shutting down: %.1f s for in-flight requests", self.shutdown_timeout_s)
        self._deadline = threading.Timer(
            self.shutdown_timeout_s,
            self.bridge.fail_all,
            args=(
                f"server shut down before the request finished "
                f"(shutdown_timeout_s={self.shutdown_timeout_s})",
            ),
        )
        self._deadline.daemon = True
        self._deadline.start()
