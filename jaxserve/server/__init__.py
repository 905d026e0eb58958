"""OpenAI-compatible HTTP server over the engine: `create_app(bridge, server_cfg, model_name)`.

`Bridge` runs the engine in its own thread; the app never touches the engine directly.
"""

from jaxserve.server.app import create_app
from jaxserve.server.bridge import Bridge, EngineUnavailableError

__all__ = ["Bridge", "EngineUnavailableError", "create_app"]
