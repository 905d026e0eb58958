"""The FastAPI app: OpenAI routes under `/v1` (behind the optional API key), health, metrics,
the live slot dashboard at `/dashboard`, and API docs at `/docs` that need no internet.

Routes only parse, validate and format; all engine work goes through the `Bridge`.
"""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST

from jaxserve.config import ServerConfig
from jaxserve.server.bridge import Bridge
from jaxserve.server.chat import create_chat_completion
from jaxserve.server.completions import create_completion
from jaxserve.server.dashboard import page_html, state
from jaxserve.server.docs import create_docs_app, generation_responses, json_body
from jaxserve.server.errors import APIError, install_error_handlers
from jaxserve.server.lora_routes import add_lora_routes
from jaxserve.server.offload import Offload
from jaxserve.server.params import Limits
from jaxserve.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from jaxserve.server.request_limits import RequestLimits


def _auth(api_key: str | None):
    expected = api_key.encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest runs in time independent of where the strings differ.
        if not (
            scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected)
        ):
            raise APIError(
                401,
                "missing or invalid API key; send 'Authorization: Bearer <key>'",
                param=None,
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


def create_app(bridge: Bridge, server_cfg: ServerConfig, model_name: str) -> FastAPI:
    """The app over a bridge that may still be warming up (`/health` says 503 until ready)."""
    app = create_docs_app(
        "jaxserve",
        "0.1.0",
        "OpenAI-compatible LLM serving on JAX. Streaming (`stream: true`) answers with "
        "server-sent events of the chunk types.",
    )
    install_error_handlers(app)
    app.add_middleware(
        RequestLimits,
        max_header_bytes=server_cfg.max_header_bytes,
        max_body_bytes=server_cfg.max_request_body_bytes,
        body_timeout_s=server_cfg.body_read_timeout_s,
    )
    offload = Offload(server_cfg.offload_threads)
    names = tuple(dict.fromkeys(n for n in (server_cfg.served_model_name, model_name) if n))

    def limits() -> Limits:
        if not bridge.ready or bridge.engine is None:
            raise APIError(
                503,
                f"server is {bridge.not_ready_reason}",
                "server_error",
                code="not_ready",
                headers={"Retry-After": "5"},
            )
        scheduler = bridge.engine.cfg.scheduler
        lora = bridge.engine.lora
        return Limits(
            model_names=names,
            max_model_len=scheduler.max_model_len,
            max_waiting=scheduler.max_waiting,
            server=server_cfg,
            lora_names=tuple(lora.names()) if lora is not None else (),
        )

    auth = [Depends(_auth(server_cfg.api_key))]
    if server_cfg.api_key:  # declares the scheme, so /docs has an "Authorize" button
        auth.append(Depends(HTTPBearer(auto_error=False)))
    v1 = APIRouter(prefix="/v1", dependencies=auth)

    @v1.get("/models")
    async def list_models() -> ModelList:
        max_len = bridge.engine.cfg.scheduler.max_model_len if bridge.engine else None
        cards = [ModelCard(id=name, max_model_len=max_len) for name in names]
        lora = bridge.engine.lora if bridge.engine else None
        for name in lora.names() if lora is not None else ():
            cards.append(ModelCard(id=name, max_model_len=max_len, parent=names[0]))
        return ModelList(data=cards)

    @v1.post(
        "/completions",
        openapi_extra=json_body(CompletionRequest),
        responses=generation_responses(CompletionResponse),
    )
    async def completions(request: Request) -> Response:
        return await create_completion(request, bridge, limits(), offload)

    @v1.post(
        "/chat/completions",
        openapi_extra=json_body(ChatCompletionRequest),
        responses=generation_responses(ChatCompletionResponse),
    )
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(request, bridge, limits(), offload)

    @v1.get("/dashboard/state", include_in_schema=False)
    async def dashboard_state() -> JSONResponse:
        return JSONResponse(state(bridge.dashboard, bridge.snapshot, bridge.ready))

    if server_cfg.enable_runtime_lora:  # off unless the operator turns it on
        add_lora_routes(v1, bridge, server_cfg, offload, names)
    app.include_router(v1)

    dashboard = page_html()

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard_page() -> HTMLResponse:
        """The live slot view; its data comes from /v1/dashboard/state (API key there)."""
        return HTMLResponse(dashboard)

    @app.get("/health")
    async def health() -> JSONResponse:
        if bridge.ready:
            return JSONResponse({"status": "ok"})
        if bridge.failure:  # the engine thread died: the process is about to exit non-zero
            return JSONResponse({"status": "failed", "error": bridge.failure}, status_code=500)
        status = "shutting_down" if bridge.draining else "loading"
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(bridge.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.state.bridge = bridge
    return app
