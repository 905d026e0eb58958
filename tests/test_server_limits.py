"""The limits a public endpoint needs (issue 15), against a real uvicorn over the real model:
body size (413) and read time (408), prompt and choice counts (400), header size and time,
keep-alive, open connections, and tokenization off the event loop.

Most tests use small limits; the 50 MB body and the long prompt are the only big payloads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from jaxserve.cli import build_parser, server_config
from jaxserve.config import ServerConfig, load_config
from jaxserve.server import Bridge, create_app
from jaxserve.server.connection import LimitedH11Protocol, ServeConfig
from jaxserve.server.params import encode
from tests.conftest import TEST_CONFIG, assert_engine_idle
from tests.http_server import MODEL, assert_error, run_server

SMALL = ServerConfig(
    max_request_body_bytes=64 * 1024,
    max_prompt_chars=1000,
    max_prompt_tokens=600,
    max_prompts_per_request=4,
    max_n=4,
    max_choices_per_request=8,
    max_stop_string_chars=32,
    header_read_timeout_s=1.0,
    body_read_timeout_s=1.0,
    keep_alive_timeout_s=1.0,
    max_connections=16,
)
# Defaults, but room for a prompt that takes the tokenizer a second or more.
BIG = ServerConfig(max_prompt_chars=2_000_000)
CMPL = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
HEALTH_BOUND_S = 1.0  # a liveness bound, far above the few ms /health takes when the loop is free


@pytest.fixture(scope="module")
def bridge(engine) -> Iterator[Bridge]:
    bridge = Bridge(engine)
    bridge.start()
    try:
        yield bridge
    finally:
        bridge.stop()
    assert_engine_idle(engine)


@pytest.fixture(scope="module")
def url(bridge) -> Iterator[str]:
    with run_server(bridge, SMALL) as url:
        yield url


@pytest.fixture(scope="module")
def big_url(bridge) -> Iterator[str]:
    with run_server(bridge, BIG) as url:
        yield url


@pytest.fixture
def idle(bridge) -> Iterator[Bridge]:
    """No refused request may leave work, a slot or a page behind."""
    yield bridge
    bridge.call(assert_engine_idle)


def post(url: str, body: object, path: str = "completions") -> httpx.Response:
    return httpx.post(f"{url}/v1/{path}", json=body, timeout=60)


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def read_until_closed(sock: socket.socket, timeout_s: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def parse_response(raw: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, json.loads(body)


def assert_error_body(body: dict, code: str, names: str | None = None) -> None:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    if names is not None:
        assert names in err["message"], err


def health_while(url: str, busy: threading.Thread) -> list[float]:
    """Seconds each `/health` took while `busy` ran (one at least, each answered 200)."""
    latencies = []
    while busy.is_alive() or not latencies:
        t0 = time.perf_counter()
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        latencies.append(time.perf_counter() - t0)
    busy.join()
    return latencies


def in_thread(fn: Callable[[], object], results: list) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.append(fn()), daemon=True)
    thread.start()
    return thread


# ---- the body: 413 and 408 ---------------------------------------------------------------
def test_declared_oversized_body_gets_413_before_it_is_sent(url, idle):
    with connect(url) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10000000\r\n\r\n"  # and no body: the answer must not wait for it
        )
        status, headers, body = parse_response(read_until_closed(sock))
    assert status == 413 and headers["connection"] == "close"
    assert_error_body(body, "request_too_large", "max_request_body_bytes")
    r = httpx.post(f"{url}/v1/completions", content=b"x" * (64 * 1024 + 1), timeout=30)
    assert_error(r, 413, code="request_too_large")
    assert post(url, CMPL).status_code == 200  # a body at the limit is fine
    assert post(url, {**CMPL, "user": "u" * (60 * 1024)}).status_code == 200


def test_chunked_oversized_body_gets_413_once_the_count_passes_the_limit(url, idle):
    def chunks() -> Iterator[bytes]:
        for _ in range(64):  # 1 MiB offered, 64 KiB allowed
            yield b" " * (16 * 1024)

    r = httpx.post(f"{url}/v1/completions", content=chunks(), timeout=30)
    assert "content-length" not in r.request.headers
    err = assert_error(r, 413, code="request_too_large")
    assert err["type"] == "invalid_request_error" and "max_request_body_bytes" in err["message"]
    assert r.headers["connection"] == "close"
    # by hand: the answer comes while the body is still open, after ~64 KiB of it
    with connect(url) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"4000\r\n" + b" " * 0x4000 + b"\r\n"
        while not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(chunk)
            except OSError:  # closed after the answer: read it
                break
        status, headers, body = parse_response(read_until_closed(sock))
    assert status == 413 and headers["connection"] == "close"
    assert_error_body(body, "request_too_large", "max_request_body_bytes")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_health_answers_within_1s_while_a_50mb_body_is_refused(big_url, idle, chunked):
    payload = b"x" * (50 * 1024 * 1024)
    content = (
        (payload[i : i + 2**20] for i in range(0, len(payload), 2**20)) if chunked else payload
    )
    results: list = []

    def send() -> object:
        try:
            return httpx.post(f"{big_url}/v1/completions", content=content, timeout=60)
        except httpx.TransportError as exc:  # the server may close while the body is still going
            return exc

    sender = in_thread(send, results)
    latencies = health_while(big_url, sender)
    assert max(latencies) < HEALTH_BOUND_S, latencies
    (r,) = results
    if isinstance(r, httpx.Response):
        assert_error(r, 413, code="request_too_large")
    else:
        assert chunked, f"a declared 50 MB body must get its 413, not {r!r}"


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": [1.5] * 400_000}, "prompt"),  # 1.6 MB: pydantic took ~50 s on the loop
        ({"prompt": [[1, 2]] * 1000 + [["x"]]}, "prompt"),
        ({"prompt": "hi", "stop": [1.5] * 50_000}, "stop"),
        ({"messages": [1.5] * 100_000}, "messages"),
    ],
    ids=["float-ids", "mixed-nested", "long-stop-list", "non-object-messages"],
)
def test_lists_pydantic_would_chew_on_get_a_quick_400(big_url, idle, body, param):
    path = "chat/completions" if "messages" in body else "completions"
    results: list = []
    sender = in_thread(lambda: post(big_url, body, path), results)
    latencies = health_while(big_url, sender)
    assert max(latencies) < HEALTH_BOUND_S, latencies
    err = assert_error(results[0], 400, param=param)
    assert len(err["message"]) < 200  # one error, not one per element


def test_trickled_body_gets_408_after_the_read_timeout(url, idle):
    with connect(url) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{"
        )
        t0 = time.monotonic()
        while not select.select([sock], [], [], 0.2)[0]:  # a byte every 0.2 s, never done
            assert time.monotonic() - t0 < 10, "no 408"
            sock.sendall(b" ")
        elapsed = time.monotonic() - t0
        status, headers, body = parse_response(read_until_closed(sock))
    assert status == 408 and headers["connection"] == "close"
    assert_error_body(body, "request_timeout", "body_read_timeout_s")
    assert 0.9 <= elapsed < 5, elapsed  # the whole body's deadline, not an idle timeout


def test_client_leaving_mid_body_is_not_an_error(url, idle, caplog):
    with caplog.at_level(logging.ERROR), connect(url) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.1)
    time.sleep(0.3)
    assert httpx.get(f"{url}/health").status_code == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# ---- request contents: 400 before any work -----------------------------------------------
def _over(path: str, body: dict, param: str, limit: str):
    return pytest.param(path, body, param, limit, id=limit + "-" + path.split("/")[0])


TOO_MUCH = [
    _over("completions", {**CMPL, "prompt": ["a"] * 5}, "prompt", "max_prompts_per_request"),
    _over("completions", {**CMPL, "prompt": [[7]] * 5}, "prompt", "max_prompts_per_request"),
    _over("completions", {**CMPL, "n": 5}, "n", "max_n"),
    _over("chat/completions", {**CHAT, "n": 5}, "n", "max_n"),
    _over("completions", {**CMPL, "prompt": ["a"] * 3, "n": 3}, "n", "max_choices_per_request"),
    _over("completions", {**CMPL, "prompt": "a" * 1001}, "prompt", "max_prompt_chars"),
    _over("completions", {**CMPL, "prompt": ["a" * 500, "b" * 501]}, "prompt", "max_prompt_chars"),
    _over(
        "chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "a" * 1001}]}]},
        "messages",
        "max_prompt_chars",
    ),
    _over("completions", {**CMPL, "prompt": [7] * 601}, "prompt", "max_prompt_tokens"),
    _over("completions", {**CMPL, "prompt": [[7] * 300, [7] * 301]}, "prompt", "max_prompt_tokens"),
    _over("completions", {**CMPL, "stop": ["ok", "s" * 33]}, "stop", "max_stop_string_chars"),
    _over("chat/completions", {**CHAT, "stop": "s" * 10_000}, "stop", "max_stop_string_chars"),
]


@pytest.mark.parametrize(("path", "body", "param", "limit"), TOO_MUCH)
def test_requests_over_a_limit_get_400_naming_it(url, idle, path, body, param, limit):
    tokens_before = idle.snapshot.prompt_tokens
    for stream in (False, True):
        err = assert_error(post(url, {**body, "stream": stream}, path), 400, param)
        assert err["type"] == "invalid_request_error" and limit in err["message"], err
    assert idle.snapshot.prompt_tokens == tokens_before  # nothing reached the engine


def test_at_the_limits_is_fine(url, idle):
    ok = [
        post(url, {**CMPL, "prompt": ["a"] * 4, "n": 2}),
        post(url, {**CMPL, "prompt": "hello " * 166 + "a" * 4}),  # 1,000 characters
        post(url, {**CMPL, "prompt": [[7] * 300, [7] * 300]}),
        post(url, {**CMPL, "stop": "s" * 32}),
        post(url, {**CHAT, "n": 4}, "chat/completions"),
    ]
    assert [r.status_code for r in ok] == [200] * len(ok), [r.text for r in ok]
    assert len(ok[0].json()["choices"]) == 8


def test_text_prompts_over_the_token_total_get_400_after_tokenizing(url, idle):
    tokenizer = idle.engine.tokenizer
    prompts = ["7" * 240] * 4  # 960 characters, a token each; each prompt inside the context
    assert sum(len(tokenizer.encode(p)) for p in prompts) > SMALL.max_prompt_tokens
    err = assert_error(post(url, {**CMPL, "prompt": prompts}), 400, "prompt")
    assert "max_prompt_tokens" in err["message"]


def test_more_choices_than_the_queue_holds_is_400_not_429(url, idle):
    cfg = idle.engine.cfg
    small = dataclasses.replace(cfg, scheduler=dataclasses.replace(cfg.scheduler, max_waiting=2))
    idle.call(lambda e: setattr(e, "cfg", small))
    try:
        never = post(url, {**CMPL, "prompt": ["a", "b"], "n": 2})
        fits = post(url, {**CMPL, "n": 2})
    finally:
        idle.call(lambda e: setattr(e, "cfg", cfg))
    err = assert_error(never, 400, "n")
    assert "max_waiting" in err["message"] and err["type"] == "invalid_request_error"
    assert fits.status_code == 200 and len(fits.json()["choices"]) == 2


# ---- tokenization off the event loop -----------------------------------------------------
def test_long_prompt_is_tokenized_while_health_answers(big_url, idle):
    tokenizer = idle.engine.tokenizer
    text = "The quick brown fox jumps over the lazy dog; 0123456789! "
    prompt = (text * (BIG.max_prompt_chars // len(text) + 1))[: BIG.max_prompt_chars - 1]
    results: list = []
    t0 = time.perf_counter()
    sender = in_thread(lambda: post(big_url, {**CMPL, "prompt": prompt}), results)
    latencies = health_while(big_url, sender)
    took_s = time.perf_counter() - t0
    (r,) = results
    # The token count in the 400 is known only after tokenizing all ~2M characters.
    err = assert_error(r, 400, "prompt")
    assert "max_prompt_tokens" in err["message"] and "characters" not in err["message"], err
    assert max(latencies) < HEALTH_BOUND_S, (took_s, latencies)
    assert len(latencies) >= 2, (took_s, latencies)
    # the ids are the tokenizer's own (the server encodes with the GIL-free batch call)
    for s in ("Hello, world!", "<|im_start|>user\nhi<|im_end|>", "  naïve  café 😀 \n\t x"):
        assert encode(tokenizer, s, "prompt") == tokenizer.encode(s)


# ---- the connection: headers, keep-alive, how many ---------------------------------------
def test_partial_headers_are_cut_off_after_the_header_timeout(url):
    for first_bytes in (b"", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le"):
        with connect(url) as sock:
            sock.sendall(first_bytes)
            t0 = time.monotonic()
            assert read_until_closed(sock) == b""
            assert 0.9 <= time.monotonic() - t0 < 5


def test_idle_keep_alive_connection_is_closed(url):
    with connect(url) as sock:
        for _ in range(2):  # the connection is reused, then left idle
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            response = b""
            while not response.endswith(b'{"status":"ok"}'):
                response += sock.recv(65536)
            assert response.startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        assert read_until_closed(sock) == b""
        assert 0.9 <= time.monotonic() - t0 < 5


def test_oversized_headers_get_431(url):
    header = b"X-Big: " + b"a" * (SMALL.max_header_bytes + 1)
    whole = b"GET /health HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n"
    for raw in (whole, whole[: len(whole) - 4]):  # all of it at once, or never finished
        with connect(url) as sock:
            sock.sendall(raw)
            status, headers, body = parse_response(read_until_closed(sock))
        assert status == 431 and headers["connection"] == "close"
        assert_error_body(body, "headers_too_large", "max_header_bytes")
    with connect(url) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        status, _, body = parse_response(read_until_closed(sock))
    assert status == 400
    assert_error_body(body, "invalid_http")


def test_connections_over_the_limit_get_503(url):
    idle_socks = [connect(url) for _ in range(SMALL.max_connections)]
    try:
        time.sleep(0.2)  # all accepted
        r = httpx.get(f"{url}/health", timeout=5)
    finally:
        for sock in idle_socks:
            sock.close()
    err = assert_error(r, 503, code="too_many_connections")
    assert "max_connections" in err["message"] and r.headers["connection"] == "close"
    time.sleep(0.2)
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200


# ---- configuration -----------------------------------------------------------------------
def test_limits_reach_uvicorn_and_the_cli_flags_override_them():
    cfg = load_config()  # the default TOML spells its limits out
    assert cfg.server.max_prompt_tokens == 128 * cfg.scheduler.max_model_len
    assert cfg.server.max_prompts_per_request == 128
    args = build_parser().parse_args(
        [
            "serve",
            "--max-request-body-bytes",
            "1000",
            "--max-prompt-chars",
            "50",
            "--max-connections",
            "3",
            "--keep-alive-timeout",
            "2.5",
        ]
    )
    s = server_config(args, load_config(TEST_CONFIG))
    assert (s.max_request_body_bytes, s.max_prompt_chars) == (1000, 50)
    assert (s.max_connections, s.keep_alive_timeout_s) == (3, 2.5)
    assert server_config(build_parser().parse_args(["serve"]), cfg) == cfg.server
    config = ServeConfig(create_app(Bridge(), s, MODEL), s)
    assert config.http is LimitedH11Protocol and config.lifespan == "off"
    assert (config.timeout_keep_alive, config.h11_max_incomplete_event_size) == (2.5, 16384)
