"""/metrics and usage against the real server: prefix-cache hits on a shared-system-prompt
workload (and `usage.prompt_tokens_details.cached_tokens`, both endpoints, streamed too), steps
and device time by forward mode, compiled step functions, KV usage, success by finish reason.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jaxserve.config import ServerConfig
from jaxserve.server import Bridge
from tests.conftest import assert_engine_idle
from tests.http_server import MODEL, serve_engine

FILLER = (
    "You answer questions about the history of science in plain words, citing the year of "
    "each discovery and the people involved, and you never invent a source or a date; when "
    "unsure you say so and suggest where a reader could look the answer up."
)


@pytest.fixture(scope="module")
def live(engine) -> Iterator[tuple[str, Bridge]]:
    with serve_engine(engine, ServerConfig()) as (url, bridge):
        yield url, bridge


@pytest.fixture
def url(live) -> Iterator[str]:
    yield live[0]
    live[1].call(assert_engine_idle)


def scrape(url: str) -> dict[str, float]:
    """Every sample, keyed `name` or `name{label=value}` (histograms: only the counts)."""
    out = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            if "le" in s.labels:
                continue
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after[name] - before[name]


def shared_pages(a: list[int], b: list[int], page_size: int) -> int:
    """Tokens of the full pages a and b have in common from the start."""
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return n // page_size * page_size


def post(url: str, path: str, body: dict) -> httpx.Response:
    r = httpx.post(f"{url}/v1/{path}", json={"model": MODEL, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r


def streamed_usage(url: str, path: str, body: dict) -> dict:
    body = {"model": MODEL, **body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/{path}", json=body, timeout=120) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    return json.loads(events[-2])["usage"]


def test_shared_system_prompt_hits_the_prefix_cache_chat(url, engine):
    page_size = engine.cfg.cache.page_size
    system = f"{uuid.uuid4().hex} {FILLER}"  # a first page no earlier test has cached
    chats = [
        [{"role": "system", "content": system}, {"role": "user", "content": question}]
        for question in ("Who measured the speed of light first?", "What did Mendel study?")
    ]
    tok = engine.tokenizer
    ids = [tok.encode(tok.apply_chat_template(m)) for m in chats]
    want = shared_pages(ids[0], ids[1], page_size)
    assert want >= 3 * page_size  # the system prompt spans several full pages

    before = scrape(url)
    first = post(url, "chat/completions", {"messages": chats[0], "max_tokens": 4}).json()
    mid = scrape(url)
    second = streamed_usage(url, "chat/completions", {"messages": chats[1], "max_tokens": 4})
    after = scrape(url)

    assert first["usage"]["prompt_tokens"] == len(ids[0])
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["prompt_tokens"] == len(ids[1])
    assert second["prompt_tokens_details"]["cached_tokens"] == want > 0
    assert delta(before, mid, "jaxserve_prefix_cache_hits_total") == 0
    assert delta(before, mid, "jaxserve_prefix_cache_queries_total") == len(ids[0])
    assert delta(mid, after, "jaxserve_prefix_cache_hits_total") == want
    assert delta(mid, after, "jaxserve_prefix_cache_queries_total") == len(ids[1])
    # the cached tokens are not prefilled again
    assert delta(mid, after, "jaxserve_prompt_tokens_total") == len(ids[1]) - want


def test_shared_prefix_completions_with_n_choices(url, engine):
    page_size = engine.cfg.cache.page_size
    rng = np.random.default_rng(uuid.uuid4().int % 2**32)
    shared = rng.integers(1000, 40000, 5 * page_size + 3).tolist()
    a, b = shared + [1011, 1012, 1013], shared + [1021, 1022, 1023, 1024]
    want = 5 * page_size

    first = post(url, "completions", {"prompt": a, "max_tokens": 3}).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    before = scrape(url)
    # two choices of one prompt: its tokens are counted once, cached ones too
    second = post(url, "completions", {"prompt": b, "max_tokens": 3, "n": 2}).json()
    after = scrape(url)
    assert second["usage"]["prompt_tokens"] == len(b)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == want
    assert delta(before, after, "jaxserve_prefix_cache_hits_total") == 2 * want  # per request
    assert delta(before, after, "jaxserve_prefix_cache_queries_total") == 2 * len(b)
    again = streamed_usage(url, "completions", {"prompt": a, "max_tokens": 3})
    assert again["prompt_tokens_details"]["cached_tokens"] == want  # a's pages: len(a) // 16


def test_steps_by_mode_step_functions_kv_usage_and_success(url, engine):
    before = scrape(url)
    body = {"prompt": "Count: one, two,", "max_tokens": 6, "ignore_eos": True}
    post(url, "completions", body)
    post(url, "completions", {"prompt": "The end.", "max_tokens": 30, "stop": ["."]})
    after = scrape(url)

    steps = {m: delta(before, after, f"jaxserve_forward_steps_total{{mode={m}}}") for m in
             ("extend", "decode", "mixed")}  # fmt: skip
    assert steps["extend"] >= 2 and steps["decode"] >= 5
    assert sum(steps.values()) == delta(before, after, "jaxserve_engine_steps_total")
    for mode, n in steps.items():
        seconds = delta(before, after, f"jaxserve_forward_device_seconds_total{{mode={mode}}}")
        assert (seconds > 0) == (n > 0), mode

    assert after["jaxserve_step_functions"] == engine.num_step_functions > 1
    assert after["jaxserve_compiles_total"] == after["jaxserve_step_functions"]
    assert after["jaxserve_kv_cache_usage_ratio"] == 0.0  # idle: cached pages count as free
    assert 0 < after["jaxserve_kv_pages_used"] == after["jaxserve_kv_pages_cached"]

    length = delta(before, after, "jaxserve_request_success_total{finish_reason=length}")
    stop = delta(before, after, "jaxserve_request_success_total{finish_reason=stop}")
    assert length + stop == 2 and length >= 1


def test_kv_usage_while_a_request_runs(live, engine):
    url, bridge = live
    prompt = "Once upon a time"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 200, "ignore_eos": True}
    seen = []
    stream = {**body, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=stream, timeout=120) as r:
        for line in r.iter_lines():  # refreshed every KV_USAGE_REFRESH_S: keep looking
            if line.startswith("data: {") and not any(seen):
                seen.append(scrape(url)["jaxserve_kv_cache_usage_ratio"])
    pages = (len(engine.tokenizer.encode(prompt)) + 200) // engine.cfg.cache.page_size + 1
    assert 0 < max(seen) <= pages / engine.cfg.cache.num_pages
    assert scrape(url)["jaxserve_kv_cache_usage_ratio"] == 0.0  # finished: nothing held
    bridge.call(assert_engine_idle)
