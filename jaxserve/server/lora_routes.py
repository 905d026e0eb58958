"""`POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` (vLLM's names and bodies).

Registered only when the operator sets `enable_runtime_lora`; behind the API key like every
`/v1` route; a load reads only adapters inside `lora_dir` (`adapters.resolve_in_dir`).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from jaxserve.adapters import resolve_in_dir
from jaxserve.config import ServerConfig
from jaxserve.errors import LoraAdapterError
from jaxserve.server.bridge import Bridge
from jaxserve.server.docs import json_body
from jaxserve.server.errors import APIError
from jaxserve.server.offload import Offload
from jaxserve.server.params import parse_body


class LoadLoraAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLoraAdapterRequest(BaseModel):
    lora_name: str
    lora_int_id: int | None = None  # vLLM's; ignored


def _serving(bridge: Bridge):
    engine = bridge.engine
    if not bridge.ready or engine is None:
        raise APIError(
            503, f"server is {bridge.not_ready_reason}", "server_error", code="not_ready"
        )
    if engine.lora is None:
        raise APIError(400, "LoRA is off: start the server with --enable-lora or --lora")
    return engine.lora


def add_lora_routes(
    v1: APIRouter,
    bridge: Bridge,
    server_cfg: ServerConfig,
    offload: Offload,
    base_names: tuple[str, ...],
) -> None:
    @v1.post("/load_lora_adapter", openapi_extra=json_body(LoadLoraAdapterRequest))
    async def load_lora_adapter(request: Request) -> PlainTextResponse:
        body = await parse_body(request, LoadLoraAdapterRequest)
        lora = _serving(bridge)
        if not body.lora_name or body.lora_name in base_names:
            raise LoraAdapterError(f"lora_name {body.lora_name!r} is empty or the base model's")
        path = resolve_in_dir(server_cfg.lora_dir, body.lora_path)
        adapter = await offload.run(lora.read, path)  # file reads off the loop and engine
        name = body.lora_name
        await offload.run(bridge.call, lambda engine: engine.lora.load(name, path, adapter))
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @v1.post("/unload_lora_adapter", openapi_extra=json_body(UnloadLoraAdapterRequest))
    async def unload_lora_adapter(request: Request) -> PlainTextResponse:
        body = await parse_body(request, UnloadLoraAdapterRequest)
        _serving(bridge)
        name = body.lora_name
        await offload.run(bridge.call, lambda engine: engine.lora.unload(name))
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
