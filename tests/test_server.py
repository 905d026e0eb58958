"""The HTTP server end to end: the official `openai` client and raw httpx against a real server.

uvicorn runs in a thread of the test process over the session's warmed engine; only the
SIGTERM test starts a real `jaxserve serve` subprocess.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import jax
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jaxserve.config import ServerConfig
from jaxserve.llm import LLM
from jaxserve.request import SamplingParams
from jaxserve.server import Bridge, create_app
from tests.conftest import TEST_CONFIG, assert_engine_idle
from tests.http_server import MODEL, assert_error, free_port, run_server

API_KEY = "test-key-123"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was"]
CHAT = [{"role": "user", "content": "What is 2 + 2? Answer briefly."}]


@dataclass
class Server:
    url: str
    bridge: Bridge
    num_compiles_at_start: int

    @property
    def engine(self):
        return self.bridge.engine

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw
        )

    def wait_idle(self, timeout_s: float = 15.0) -> None:
        """Every request aborted or finished, then the leak check (on the engine thread)."""

        def idle(e) -> bool:
            return not e.requests and not e.has_work() and not self.bridge._streams

        deadline = time.monotonic() + timeout_s
        while not self.bridge.call(idle) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.bridge.call(assert_engine_idle)


@pytest.fixture(scope="module")
def server(engine) -> Iterator[Server]:
    bridge = Bridge(engine)
    bridge.start()
    try:
        with run_server(bridge, ServerConfig()) as url:
            yield Server(url, bridge, engine.runner.num_compiles)
    finally:
        bridge.stop()
    assert_engine_idle(engine)


@pytest.fixture(scope="module")
def auth_url(server) -> Iterator[str]:
    with run_server(server.bridge, ServerConfig(api_key=API_KEY)) as url:
        yield url


@pytest.fixture
def srv(server) -> Iterator[Server]:
    """The shared server, checked for leaked requests, slots and pages after the test."""
    yield server
    server.wait_idle()


def offline(server: Server, prompts, params: SamplingParams, chat: bool = False):
    """What `LLM` gives for the same prompts (run on the engine thread, between steps)."""

    def run(engine):
        llm = LLM(engine=engine)
        return llm.chat(prompts, params) if chat else llm.generate(prompts, params)

    return server.bridge.call(run, timeout_s=120)


# ---- the openai client -------------------------------------------------------------------
def test_models_and_health(srv):
    assert [m.id for m in srv.client().models.list().data] == [MODEL]
    assert httpx.get(f"{srv.url}/health").json() == {"status": "ok"}


def concurrently(*calls: Callable[[], object]) -> list:
    """Run the calls at once (the engine batches them, which keeps the suite fast)."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


def test_greedy_completion_equals_llm_generate_streamed_and_not(srv):
    want = offline(srv, PROMPTS, SamplingParams(max_tokens=24, temperature=0.0))
    client = srv.client()
    kw = dict(model=MODEL, max_tokens=24, temperature=0)
    plain = [partial(client.completions.create, prompt=p, **kw) for p in PROMPTS]
    streamed = [
        partial(lambda p: list(client.completions.create(prompt=p, stream=True, **kw)), p)
        for p in PROMPTS
    ]
    results = concurrently(*plain, *streamed)
    for ref, r, chunks in zip(want, results[:3], results[3:], strict=True):
        assert r.choices[0].text == ref.text
        assert r.choices[0].finish_reason == ref.finish_reason.value
        assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert r.usage.completion_tokens == len(ref.token_ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert "".join(c.choices[0].text for c in chunks) == ref.text
        assert chunks[-1].choices[0].finish_reason == ref.finish_reason.value


def test_batch_and_token_id_prompts(srv):
    ids = [srv.engine.tokenizer.encode(p) for p in PROMPTS]
    client = srv.client()
    by_text = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=8, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    one = client.completions.create(model=MODEL, prompt=ids[1], max_tokens=8, temperature=0)
    assert [c.index for c in by_text.choices] == [0, 1, 2]
    assert [c.text for c in by_text.choices] == [c.text for c in by_ids.choices]
    assert one.choices[0].text == by_text.choices[1].text
    assert by_text.usage.prompt_tokens == sum(map(len, ids))


def test_greedy_chat_equals_llm_chat_streamed_and_not(srv):
    ref = offline(srv, CHAT, SamplingParams(max_tokens=32, temperature=0.0), chat=True)[0]
    client = srv.client()
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=32, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason.value
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (
        len(ref.prompt_token_ids),
        len(ref.token_ids),
    )
    stream = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_completion_tokens=32,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)
    assert chunks[-2].choices[0].finish_reason == ref.finish_reason.value


def test_length_and_stop_strings(srv):
    client = srv.client()
    kw = dict(
        model=MODEL,
        prompt=PROMPTS[2],
        temperature=0,
        max_tokens=40,
        extra_body={"ignore_eos": True},
    )
    full = client.completions.create(**kw)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 40
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    want = text[: text.index(stop)]
    calls = []
    for stops in (stop, ["zzzqqq", stop]):
        calls.append(partial(client.completions.create, stop=stops, **kw))
        calls.append(
            partial(lambda s: list(client.completions.create(stop=s, stream=True, **kw)), stops)
        )
    plain, chunks, plain2, chunks2 = concurrently(*calls)
    for r in (plain, plain2):
        assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    for cs in (chunks, chunks2):
        assert "".join(c.choices[0].text for c in cs) == want
        assert cs[-1].choices[0].finish_reason == "stop"


def test_n_choices_and_seed_reproducibility(srv):
    client = srv.client()
    kw = dict(model=MODEL, prompt=PROMPTS[2], max_tokens=16, temperature=1.0, n=3)
    chat_kw = dict(model=MODEL, messages=CHAT, max_tokens=12, n=2, seed=3, temperature=1.0)
    a, b, c, chat, again, stream = concurrently(
        partial(client.completions.create, seed=7, **kw),
        partial(client.completions.create, seed=7, **kw),
        partial(client.completions.create, seed=8, **kw),
        partial(client.chat.completions.create, **chat_kw),
        partial(client.chat.completions.create, **chat_kw),
        lambda: list(client.chat.completions.create(stream=True, **chat_kw)),
    )
    texts = [ch.text for ch in a.choices]
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert texts == [ch.text for ch in b.choices]
    assert len(set(texts)) > 1, "choices with seeds 7, 8, 9 should differ"
    assert texts[1:] == [ch.text for ch in c.choices][:2], "choice i uses seed + i"
    assert 3 <= a.usage.completion_tokens <= 48
    assert [x.message.content for x in chat.choices] == [x.message.content for x in again.choices]
    streamed: dict[int, str] = {}
    for chunk in stream:
        for ch in chunk.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + (ch.delta.content or "")
    assert streamed == {x.index: x.message.content for x in chat.choices}


def test_logprobs_completions_and_chat(srv):
    client = srv.client()
    r = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens == 6
    assert "".join(lp.tokens) == r.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) <= 3 and chosen <= 0.0
        assert chosen == pytest.approx(max(top.values()), abs=1e-4)  # greedy = the best
    assert lp.text_offset == sorted(lp.text_offset)
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3, stream=True
        )
    )
    assert sum(len(c.choices[0].logprobs.tokens) for c in chunks) == 6
    c = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert content[0].token == content[0].top_logprobs[0].token
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_sampling_parameters_are_accepted(srv):
    r = srv.client().completions.create(
        model=MODEL,
        prompt=PROMPTS[1],
        max_tokens=8,
        temperature=0.8,
        top_p=0.9,
        seed=1,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        user="tester",
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1},
    )
    assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("stop", "length")


# ---- bad input: OpenAI-style errors, never a 500 -----------------------------------------
def _post(url: str, path: str, content: bytes | str | None = None, body: object = None, **kw):
    if body is not None:
        content = json.dumps(body)
    headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
    return httpx.post(f"{url}/v1/{path}", content=content, headers=headers, timeout=60, **kw)


CMPL = {"model": MODEL, "prompt": "Hi", "max_tokens": 4}
CHATB = {"model": MODEL, "messages": CHAT, "max_tokens": 4}

CTX = "context_length_exceeded"


def bad(path: str, body: dict, status: int, param: str | None, code: str | None = None):
    changed = {k: v for k, v in body.items() if k not in ("model", "max_tokens")}
    return pytest.param(path, body, status, param, code, id=f"{path}-{changed}"[:60])


BAD_BODIES = [
    bad("completions", {**CMPL, "max_tokens": "lots"}, 400, "max_tokens"),
    bad("completions", {**CMPL, "prompt": 5}, 400, "prompt"),
    bad("completions", {"model": MODEL}, 400, "prompt"),
    bad("completions", {**CMPL, "stop": [1, 2]}, 400, "stop"),
    bad("chat/completions", {**CHATB, "messages": "hi"}, 400, "messages"),
    bad("chat/completions", {**CHATB, "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    bad("completions", {**CMPL, "prompt": ""}, 400, "prompt"),
    bad("completions", {**CMPL, "prompt": []}, 400, "prompt"),
    bad("completions", {**CMPL, "prompt": [[1, 2], []]}, 400, "prompt"),
    bad("completions", {**CMPL, "prompt": [10**9]}, 400, "prompt"),
    bad("chat/completions", {**CHATB, "messages": []}, 400, "messages"),
    bad("completions", {**CMPL, "max_tokens": -1}, 400, "max_tokens"),
    bad("completions", {**CMPL, "max_tokens": 0}, 400, "max_tokens"),
    bad("completions", {**CMPL, "temperature": -1}, 400, "temperature"),
    bad("completions", {**CMPL, "temperature": 1e9}, 400, "temperature"),
    bad("completions", {**CMPL, "top_p": 0}, 400, "top_p"),
    bad("completions", {**CMPL, "top_k": -5}, 400, "top_k"),
    bad("completions", {**CMPL, "min_p": 2}, 400, "min_p"),
    bad("completions", {**CMPL, "presence_penalty": 5}, 400, "presence_penalty"),
    bad("completions", {**CMPL, "frequency_penalty": -9}, 400, "frequency_penalty"),
    bad("completions", {**CMPL, "repetition_penalty": 0}, 400, "repetition_penalty"),
    bad("completions", {**CMPL, "seed": -1}, 400, "seed"),
    bad("completions", {**CMPL, "n": 0}, 400, "n"),
    bad("completions", {**CMPL, "n": 10**6}, 400, "n"),
    bad("completions", {**CMPL, "logprobs": 99}, 400, "logprobs"),
    bad("completions", {**CMPL, "stop": [""]}, 400, "stop"),
    bad("completions", {**CMPL, "stop": [f"s{i}" for i in range(17)]}, 400, "stop"),
    bad("completions", {**CMPL, "echo": True}, 400, "echo"),
    bad("chat/completions", {**CHATB, "top_logprobs": 3}, 400, "top_logprobs"),
    bad("chat/completions", {**CHATB, "logprobs": True, "top_logprobs": 21}, 400, "logprobs"),
    bad("completions", {**CMPL, "max_tokens": 10**12}, 400, "max_tokens", CTX),
    bad("completions", {**CMPL, "prompt": "hello " * 600}, 400, "prompt", CTX),
    bad("completions", {**CMPL, "prompt": [7] * 500, "max_tokens": 100}, 400, "max_tokens", CTX),
    bad("chat/completions", {**CHATB, "max_completion_tokens": 10**6}, 400, "max_tokens", CTX),
    bad("completions", {**CMPL, "logit_bias": {"5": 1}}, 400, "logit_bias"),
    bad("chat/completions", {**CHATB, "frobnicate": 1}, 400, "frobnicate"),
    bad("completions", {**CMPL, "best_of": 3}, 400, "best_of"),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), BAD_BODIES)
def test_bad_parameters_give_openai_errors(srv, path, body, status, param, code):
    err = assert_error(_post(srv.url, path, body=body), status, param, code)
    assert err["type"] == "invalid_request_error"
    # a stream request is rejected the same way, before any event is sent
    assert_error(_post(srv.url, path, body={**body, "stream": True}), status, param, code)


def test_unset_unknown_fields_pass_and_set_ones_are_named(srv):
    """null, false and empty values of fields the server lacks mean "not asked for"."""
    body = {**CMPL, "logit_bias": None, "store": False, "metadata": {}, "functions": []}
    assert _post(srv.url, "completions", body=body).status_code == 200
    err = assert_error(_post(srv.url, "completions", body={**CMPL, "logit_bias": {"7": 2}}), 400)
    assert err["message"] == "the request field 'logit_bias' is not supported by this server"
    err = assert_error(_post(srv.url, "completions", body={**CMPL, "min_tokenz": 3}), 400)
    assert err["message"] == "the request field 'min_tokenz' is unknown"


@pytest.mark.parametrize("path", ["chat/completions", "completions"])
def test_stream_chunks_share_id_and_created_and_deltas_send_no_nulls(srv, path):
    body = {**(CHATB if path.startswith("chat") else CMPL), "max_tokens": 48, "stream": True}
    body |= {"ignore_eos": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{srv.url}/v1/{path}", json=body, timeout=120) as r:
        lines = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
    chunks = [json.loads(x) for x in lines if x != "[DONE]"]
    assert len(chunks) >= 24  # a chunk per token, or fewer where text is held back
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    if path.startswith("chat"):
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        assert deltas[0] == {"role": "assistant", "content": ""}
        assert all(set(d) == {"content"} for d in deltas[1:]), deltas[1:3]


def test_the_role_chunk_comes_with_the_first_token_not_on_acceptance(srv):
    """A chat stream sends nothing while its request waits in the queue (as vLLM and SGLang):
    a client timing its first chunk measures the first token. The scheduler is made to plan
    nothing, so the accepted request waits; once it may run, the role chunk opens the stream."""
    from jaxserve.scheduler import StepPlan

    def pause(engine) -> None:
        engine.scheduler.schedule = StepPlan  # an idle plan: nothing is admitted

    def resume(engine) -> None:
        del engine.scheduler.schedule

    srv.bridge.call(pause)
    got: list[tuple[float, str]] = []

    def stream() -> None:
        body = {**CHATB, "max_tokens": 4, "stream": True}
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=60) as r:
            got.extend((time.monotonic(), x) for x in r.iter_lines() if x.startswith("data:"))

    reader = threading.Thread(target=stream)
    reader.start()
    try:
        deadline = time.monotonic() + 10
        while not srv.bridge.call(lambda e: len(e.scheduler.waiting)):
            assert time.monotonic() < deadline, "the request was not accepted"
            time.sleep(0.02)
        time.sleep(1.0)  # accepted and waiting: the old code had sent its role chunk by now
        assert not got
    finally:
        resumed_at = time.monotonic()
        srv.bridge.call(resume)
    reader.join(60)
    chunks = [json.loads(x[5:]) for _, x in got if x != "data: [DONE]"]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert got[0][0] >= resumed_at and len(chunks) > 1


def test_stream_options_need_stream(srv):
    body = {**CMPL, "stream_options": {"include_usage": True}}
    assert_error(_post(srv.url, "completions", body=body), 400, "stream_options")


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (b'{"model": "smollm2-135m", "prompt": ', "truncated"),
        (b"not json at all", "garbage"),
        (b'{"prompt": "a", "temperature": NaN}', "NaN"),
        (b'{"prompt": "\xff\xfe bad utf-8"}', "utf8"),
        (b"[1, 2, 3]", "array"),
        (b"", "empty"),
    ],
)
def test_malformed_bodies_give_400(srv, content, what):
    for path in ("completions", "chat/completions"):
        assert_error(_post(srv.url, path, content=content), 400)


def test_unknown_model_route_and_method(srv):
    assert_error(
        _post(srv.url, "completions", body={**CMPL, "model": "gpt-9"}),
        404,
        "model",
        "model_not_found",
    )
    assert_error(_post(srv.url, "chat/completions", body={**CHATB, "model": "x"}), 404, "model")
    assert_error(httpx.get(f"{srv.url}/v1/nothing"), 404)
    assert_error(httpx.get(f"{srv.url}/v1/completions"), 405)
    lone_surrogate = b'{"prompt": "\\ud800 hi", "max_tokens": 2}'
    assert _post(srv.url, "completions", content=lone_surrogate).status_code == 400
    ok = _post(srv.url, "completions", body=CMPL)  # and the engine still serves
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


# ---- disconnects, overload, faults -------------------------------------------------------
LONG = {
    "model": MODEL,
    "prompt": "Tell me a long story.",
    "max_tokens": 400,
    "temperature": 0.7,
    "ignore_eos": True,
}


def test_disconnect_storm_of_50_streams_frees_everything(srv):
    aborted_before = srv.bridge.snapshot.num_aborted

    async def client_that_leaves(client: httpx.AsyncClient, i: int) -> int:
        body = {**LONG, "seed": i, "stream": True}
        events = 0
        async with client.stream("POST", f"{srv.url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                events += line.startswith("data: ")
                if events >= 3:
                    break  # leave mid-stream: closing the response drops the connection
        return events

    async def storm() -> list[int]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*(client_that_leaves(client, i) for i in range(50)))

    assert asyncio.run(asyncio.wait_for(storm(), 300)) == [3] * 50
    srv.wait_idle()  # zero pages, slots and requests in use
    assert srv.bridge.snapshot.num_aborted - aborted_before == 50


def test_non_streaming_disconnect_aborts(srv):
    aborted_before = srv.bridge.snapshot.num_aborted
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{srv.url}/v1/completions", json=LONG, timeout=1.5)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{srv.url}/v1/chat/completions",
            timeout=1.5,
            json={**{k: v for k, v in LONG.items() if k != "prompt"}, "messages": CHAT},
        )
    srv.wait_idle()
    assert srv.bridge.snapshot.num_aborted - aborted_before == 2


def test_overload_gives_429_with_retry_after_and_running_requests_finish(srv):
    cfg = srv.engine.cfg
    small = dataclasses.replace(cfg, scheduler=dataclasses.replace(cfg.scheduler, max_waiting=2))
    body = {**LONG, "max_tokens": 32, "temperature": 0}
    url = f"{srv.url}/v1/completions"

    async def scenario() -> tuple[list[tuple[int, str]], list[httpx.Response]]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            running = asyncio.Semaphore(0)

            async def steady() -> tuple[int, str]:
                texts = []
                async with client.stream("POST", url, json={**body, "stream": True}) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            texts.append(json.loads(line[6:])["choices"][0]["text"])
                            if len(texts) == 1:
                                running.release()
                return r.status_code, "".join(texts)

            steady_tasks = [asyncio.create_task(steady()) for _ in range(8)]
            for _ in steady_tasks:
                await running.acquire()  # all 8 are streaming: admitted and running
            await asyncio.to_thread(srv.bridge.call, lambda e: setattr(e, "cfg", small))
            flood = await asyncio.gather(*(client.post(url, json=body) for _ in range(60)))
            return await asyncio.gather(*steady_tasks), flood

    try:
        steady, flood = asyncio.run(asyncio.wait_for(scenario(), 300))
    finally:
        srv.bridge.call(lambda e: setattr(e, "cfg", cfg))
    codes = [r.status_code for r in flood]
    assert set(codes) <= {200, 429} and 429 in codes, codes
    for r in flood:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert_error(r, 429, code="queue_full")
    reference = _post(srv.url, "completions", body=body).json()["choices"][0]["text"]
    assert steady == [(200, reference)] * 8, "running requests are unaffected by the overload"
    accepted = [r.json() for r in flood if r.status_code == 200]
    assert all(a["choices"][0]["text"] == reference for a in accepted)
    assert all(a["usage"]["completion_tokens"] == 32 for a in accepted)
    assert metric_values(srv.url)["jaxserve_rejected_requests_total"] >= codes.count(429)


def test_step_exception_fails_requests_with_500_and_server_keeps_serving(srv):
    failed_before = srv.bridge.snapshot.num_failed

    def boom(decode, prefill):
        raise RuntimeError("injected step failure")

    srv.bridge.call(lambda e: setattr(e.runner, "run", boom))
    try:
        err = assert_error(_post(srv.url, "completions", body={**CMPL, "max_tokens": 8}), 500)
        assert err["type"] == "server_error" and "injected" in err["message"]
        with pytest.raises(openai.APIError, match="injected"):
            list(
                srv.client().chat.completions.create(
                    model=MODEL, messages=CHAT, max_tokens=8, stream=True
                )
            )
    finally:
        srv.bridge.call(lambda e: delattr(e.runner, "run"))
    assert srv.bridge.snapshot.num_failed - failed_before == 2
    ok = _post(srv.url, "completions", body={**CMPL, "max_tokens": 8})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


# ---- auth, health, metrics ---------------------------------------------------------------
def test_api_key_is_required_on_v1_routes(srv, auth_url):
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": API_KEY},
        {"Authorization": f"Basic {API_KEY}"},
    ):
        assert_error(
            _post(auth_url, "completions", body=CMPL, headers=headers), 401, code="invalid_api_key"
        )
        assert_error(httpx.get(f"{auth_url}/v1/models", headers=headers), 401)
    ok = _post(auth_url, "completions", body=CMPL, headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200
    client = openai.OpenAI(base_url=f"{auth_url}/v1", api_key=API_KEY, max_retries=0)
    assert client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3).usage
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{auth_url}/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(f"{auth_url}/health").status_code == 200  # health and metrics stay open
    assert httpx.get(f"{auth_url}/metrics").status_code == 200


def test_not_ready_until_the_engine_runs():
    from fastapi.testclient import TestClient

    client = TestClient(create_app(Bridge(), ServerConfig(), MODEL))
    r = client.get("/health")
    assert r.status_code == 503 and r.json() == {"status": "loading"}
    assert_error(client.post("/v1/completions", json=CMPL), 503, code="not_ready")
    assert client.get("/metrics").status_code == 200


def test_dead_engine_thread_fails_health_and_requests():
    """The engine thread dies (not a step error: the loop itself): /health answers 500
    "failed", new requests get 503, and `on_crash` hears why (the CLI stops and exits 1)."""
    from fastapi.testclient import TestClient

    from tests.test_scheduler import make_engine

    engine = make_engine()
    heard: list[str] = []
    bridge = Bridge(engine, on_crash=heard.append)
    client = TestClient(create_app(bridge, ServerConfig(), MODEL))
    bridge.start()
    assert client.get("/health").json() == {"status": "ok"}

    def broken() -> bool:
        raise RuntimeError("boom")

    engine.has_work = broken  # type: ignore[method-assign]
    bridge._commands.put(lambda: None)  # wake the loop
    deadline = time.monotonic() + 10
    while bridge.failure is None and time.monotonic() < deadline:
        time.sleep(0.01)
    r = client.get("/health")
    assert r.status_code == 500 and r.json()["status"] == "failed"
    assert "RuntimeError: boom" in r.json()["error"]
    assert heard == [bridge.failure]
    err = assert_error(client.post("/v1/completions", json=CMPL), 503, code="not_ready")
    assert "failed" in err["message"]
    bridge.stop()


def metric_values(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {
        s.name: s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if not s.labels or s.labels.get("le") == "+Inf"
    }


def test_metrics_parse_and_count(srv):
    before = metric_values(srv.url)
    srv.client().completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    after = metric_values(srv.url)
    for name in (
        "jaxserve_num_requests_running",
        "jaxserve_num_requests_waiting",
        "jaxserve_kv_pages_used",
        "jaxserve_retractions_total",
        "jaxserve_aborted_requests_total",
        "jaxserve_rejected_requests_total",
    ):
        assert name in after, name
    assert (
        after["jaxserve_generation_tokens_total"] - before["jaxserve_generation_tokens_total"] == 5
    )
    assert after["jaxserve_prompt_tokens_total"] > before["jaxserve_prompt_tokens_total"]
    assert (
        after["jaxserve_time_to_first_token_seconds_count"]
        == before["jaxserve_time_to_first_token_seconds_count"] + 1
    )
    assert (
        after["jaxserve_inter_token_latency_seconds_count"]
        == before["jaxserve_inter_token_latency_seconds_count"] + 4
    )
    assert (
        after["jaxserve_e2e_request_latency_seconds_count"]
        == before["jaxserve_e2e_request_latency_seconds_count"] + 1
    )
    # pages outlive requests only in the prefix cache
    assert after["jaxserve_kv_pages_used"] == after["jaxserve_kv_pages_cached"]
    # no compilation after warm-up, whatever the server has been through
    assert after["jaxserve_compiles_total"] == srv.num_compiles_at_start


# ---- a real `jaxserve serve` process and SIGTERM -----------------------------------------
def test_sigterm_finishes_in_flight_then_fails_stragglers_and_exits_0(tmp_path: Path):
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "jaxserve.cli",
        "serve",
        "--config",
        str(TEST_CONFIG),
        "--port",
        str(port),
        "--shutdown-timeout",
        "4",
        "--log-level",
        "warning",
    ]
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).parent.parent,
        env={**os.environ},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, health = time.monotonic() + 300, []
        while time.monotonic() < deadline and proc.poll() is None and 200 not in health:
            try:  # 503 while warming up, then 200
                health.append(httpx.get(f"{url}/health", timeout=2).status_code)
            except httpx.TransportError:
                time.sleep(0.5)
        assert health and set(health) <= {200, 503} and health[-1] == 200, log.read()
        results: dict[str, object] = {}

        def short() -> None:
            results["short"] = httpx.post(
                f"{url}/v1/completions",
                timeout=60,
                json={**CMPL, "max_tokens": 20, "temperature": 0, "ignore_eos": True},
            )

        def long() -> None:
            with httpx.stream(
                "POST",
                f"{url}/v1/completions",
                timeout=60,
                json={**LONG, "max_tokens": 500, "stream": True},
            ) as r:
                results["long"] = [line for line in r.iter_lines() if line]

        threads = [threading.Thread(target=f) for f in (short, long)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # both are running
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        try:  # new requests: refused (socket closed) or 503 (draining)
            late = httpx.post(f"{url}/v1/completions", json=CMPL, timeout=5).status_code
        except httpx.TransportError:
            late = None
        assert late in (None, 503)
        for t in threads:
            t.join(60)
        assert proc.wait(60) == 0
        short_r = results["short"]
        assert short_r.status_code == 200 and short_r.json()["usage"]["completion_tokens"] == 20
        events = results["long"]
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2].removeprefix("data: "))
        if "error" in last or jax.default_backend() == "cpu":  # 500 tokens take > 4 s on CPU
            assert last["error"]["code"] == "shutting_down", last
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
