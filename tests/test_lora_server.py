"""LoRA over HTTP: `model` picks the adapter, /v1/models lists them, runtime load / unload (off
by default, behind the API key, only inside lora_dir), 404 for an unknown adapter.

A random tiny model with the byte tokenizer keeps this fast; the real model is in test_lora.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from jaxserve import lora
from jaxserve.config import CacheConfig, EngineConfig, SchedulerConfig, ServerConfig
from jaxserve.engine import Engine
from jaxserve.llm import LLM
from jaxserve.request import SamplingParams
from jaxserve.server import Bridge
from jaxserve.weights.random_model import SHAPES
from tests.conftest import assert_engine_idle
from tests.http_server import MODEL, assert_error, run_server
from tests.test_lora import random_adapter

TINY = SHAPES["tiny"]
KEY = "sekrit"
PROMPT = "Hello there, how are"


def completion(url: str, model: str | None, key: str = KEY, **kw) -> httpx.Response:
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, **kw}
    if model is not None:
        body["model"] = model
    return httpx.post(f"{url}/v1/completions", json=body, headers=auth(key), timeout=60)


def auth(key: str | None = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loras")
    for i, name in enumerate(["fmt", "other", "late"]):
        lora.write_adapter(root / name, random_adapter(20 + i, 4, cfg=TINY, size=3.0))
    lora.write_adapter(root / "too_big", random_adapter(30, 16, cfg=TINY))
    return root


@pytest.fixture(scope="module")
def engine(lora_dir) -> Engine:
    cfg = EngineConfig(
        model="random:tiny",
        lora_modules=(f"fmt={lora_dir / 'fmt'}", f"other={lora_dir / 'other'}"),
        max_loras=3,
        max_lora_rank=8,
        cache=CacheConfig(page_size=16, num_pages=64),
        scheduler=SchedulerConfig(
            max_running_requests=4,
            max_prefill_tokens=64,
            prefill_buckets=(64,),
            decode_batch_buckets=(),
            max_model_len=128,
        ),
    )
    return Engine.from_config(cfg)


@pytest.fixture(scope="module")
def offline(engine) -> dict[str | None, str]:
    """Each model's greedy text, from the engine alone (before the server starts)."""
    llm = LLM(engine=engine)
    params = SamplingParams(max_tokens=12, temperature=0.0)
    return {
        name: llm.generate([PROMPT], dataclasses.replace(params, lora=name))[0].text
        for name in (None, "fmt", "other")
    }


@pytest.fixture(scope="module")
def url(engine, offline, lora_dir) -> Iterator[str]:
    bridge = Bridge(engine)
    bridge.start()
    server_cfg = ServerConfig(api_key=KEY, enable_runtime_lora=True, lora_dir=str(lora_dir))
    try:
        with run_server(bridge, server_cfg) as url:
            yield url
    finally:
        bridge.stop()
    assert_engine_idle(engine)


def test_model_field_picks_the_adapter(url, offline):
    assert len(set(offline.values())) == 3  # the adapters change the output
    for model, want in [(None, offline[None]), (MODEL, offline[None])] + [
        (n, offline[n]) for n in ("fmt", "other")
    ]:
        r = completion(url, model)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want, model
        assert r.json()["model"] == (model if model in ("fmt", "other") else MODEL)
    chat = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "fmt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        headers=auth(),
        timeout=60,
    )
    assert chat.status_code == 200 and chat.json()["model"] == "fmt"


def test_models_lists_base_and_adapters(url):
    data = httpx.get(f"{url}/v1/models", headers=auth()).json()["data"]
    assert [(m["id"], m["parent"]) for m in data] == [
        (MODEL, None),
        ("fmt", MODEL),
        ("other", MODEL),
    ]


def test_unknown_adapter_is_404(url):
    assert_error(completion(url, "nope"), 404, "model", "model_not_found")


def test_runtime_load_and_unload(url, engine, lora_dir):
    compiles = engine.runner.num_compiles
    load = f"{url}/v1/load_lora_adapter"
    unload = f"{url}/v1/unload_lora_adapter"
    body = {"lora_name": "late", "lora_path": "late"}
    assert httpx.post(load, json=body).status_code == 401  # the API key guards it
    r = httpx.post(load, json=body, headers=auth())
    assert r.status_code == 200 and "added" in r.text
    ids = [m["id"] for m in httpx.get(f"{url}/v1/models", headers=auth()).json()["data"]]
    assert ids == [MODEL, "fmt", "other", "late"]
    late = completion(url, "late")
    assert late.status_code == 200 and late.json()["model"] == "late"
    assert_error(httpx.post(load, json=body, headers=auth()), 400)  # already loaded
    r = httpx.post(unload, json={"lora_name": "late"}, headers=auth())
    assert r.status_code == 200 and "removed" in r.text
    assert_error(completion(url, "late"), 404, "model", "model_not_found")
    assert_error(httpx.post(unload, json={"lora_name": "late"}, headers=auth()), 404)
    assert engine.runner.num_compiles == compiles  # loading is a buffer write


def test_runtime_load_refuses_bad_adapters_and_paths(url, lora_dir, tmp_path):
    load = f"{url}/v1/load_lora_adapter"
    outside = tmp_path / "outside"
    lora.write_adapter(outside, random_adapter(40, 4, cfg=TINY))
    (lora_dir / "escape").symlink_to(outside)
    for path, why in [
        ("too_big", "exceeds max_lora_rank=8"),
        (str(outside), "outside lora_dir"),
        ("../outside", "outside lora_dir"),
        ("escape", "outside lora_dir"),
        ("missing", "not a LoRA adapter"),
    ]:
        r = httpx.post(load, json={"lora_name": "x", "lora_path": path}, headers=auth())
        err = assert_error(r, 400)
        assert why in err["message"], (path, err)
        if path == "escape":  # where the link points is not told
            assert str(outside) not in err["message"]
    assert_error(
        httpx.post(load, json={"lora_name": MODEL, "lora_path": "fmt"}, headers=auth()), 400
    )
    assert completion(url, "fmt").status_code == 200  # still serving


def test_runtime_routes_are_off_by_default(engine):
    bridge = Bridge(engine)  # not started: the routes' absence needs no engine thread
    with run_server(bridge, ServerConfig()) as url:
        r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "a"})
        assert r.status_code == 404
