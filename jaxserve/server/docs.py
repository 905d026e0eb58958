"""API docs that work offline: Swagger UI at `/docs`, its assets served from an installed package.

FastAPI's own pages load their scripts from a CDN and render blank without internet; the
`fastapi-offline` package ships the same assets and serves them from the app. The two POST
routes read their bodies by hand (limits first), so their schemas are added here.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from jaxserve.server.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse

BODIES: tuple[type[BaseModel], ...] = (CompletionRequest, ChatCompletionRequest)
_REF = "#/components/schemas/{model}"


def create_docs_app(title: str, version: str, description: str) -> FastAPI:
    """A FastAPI app whose /docs and /redoc need nothing but this server."""
    # ReDoc is left out: even the packaged one loads its logo from a CDN.
    app = FastAPIOffline(title=title, version=version, description=description, redoc_url=None)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` of a route whose body is `model`, read by the handler itself."""
    schema = {"$ref": _REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


# Every answer a generation route may give besides its 200, in OpenAI's error shape.
ERROR_STATUSES = {
    400: "Invalid request (bad JSON, a wrong type or value, a prompt too long)",
    401: "Missing or wrong API key",
    404: "Unknown model",
    408: "The request body arrived too slowly",
    413: "Request body too large",
    429: "Waiting queue full; retry after `Retry-After` seconds",
    503: "Warming up or shutting down; retry after `Retry-After` seconds",
}


def generation_responses(response: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """`responses` of a generation route: its JSON body, the SSE stream, and the errors."""
    sse = {"text/event-stream": {"schema": {"type": "string"}}}
    ok: dict[str, Any] = {"model": response, "content": sse}
    ok["description"] = "The response, or with `stream: true` server-sent events of chunks"
    errors = {
        code: {"model": ErrorResponse, "description": d} for code, d in ERROR_STATUSES.items()
    }
    return {200: ok, **errors}


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        _, defs = models_json_schema([(m, "validation") for m in BODIES], ref_template=_REF)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, body in defs.get("$defs", {}).items():
            components.setdefault(name, body)
        app.openapi_schema = schema
    return app.openapi_schema
