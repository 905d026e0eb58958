"""The live slot dashboard: its JSON feed on the real engine, and the page in a real headless
Chromium (Debian's `chromium` through Playwright) filling its slots under a load of 20
requests, updating at least once a second, with no console errors.

Set JAXSERVE_DASHBOARD_SCREENSHOT=docs/img/dashboard.png to keep the screenshot.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from jaxserve.config import ServerConfig
from jaxserve.server import Bridge
from tests.http_server import MODEL, serve_engine
from tests.test_docs_route import browser, open_offline  # noqa: F401 - the browser fixture

KEY = "dash-key"


@pytest.fixture(scope="module")
def live(engine) -> Iterator[tuple[str, Bridge]]:
    with serve_engine(engine, ServerConfig(api_key=KEY)) as (url, bridge):
        yield url, bridge


def load(url: str, n: int, max_tokens: int) -> list[str]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)

    def one(i: int) -> str:
        r = client.completions.create(
            model=MODEL,
            prompt=f"Request {i}: list some rivers of Europe and say where each one flows",
            max_tokens=max_tokens,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        return r.choices[0].finish_reason

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_state_feed_shows_the_steps_and_needs_the_key(live):
    url, bridge = live
    assert httpx.get(f"{url}/v1/dashboard/state").status_code == 401
    assert load(url, 6, 8) == ["length"] * 6
    s = httpx.get(f"{url}/v1/dashboard/state", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert s["ready"] and s["num_slots"] == 32 and s["waiting"] == 0
    modes = {step["mode"] for step in s["steps"]}
    assert "extend" in modes and modes <= {"extend", "decode", "mixed"}
    assert max(sum(t is not None for t in step["slots"]) for step in s["steps"]) >= 2
    tags = {t for step in s["steps"] for t in step["slots"] if t is not None}
    assert len(tags) >= 6 and all(len(t) == 6 for t in tags)  # short hashes, not ids
    assert sum(step["tokens"] for step in s["steps"]) >= 48
    assert s["ttft"]["p50_ms"] > 0 and s["itl"]["p50_ms"] > 0
    kv = s["kv_pages"]
    assert kv["held_by_requests"] + kv["cache_only"] + kv["free"] == kv["total"]
    assert httpx.get(f"{url}/dashboard").status_code == 200  # the page itself holds no data


def test_page_fills_its_slots_under_load_in_chromium(live, browser, tmp_path):  # noqa: F811
    url, _ = live
    page, errors, refused = open_offline(browser, url, f"/dashboard#key={KEY}")
    page.wait_for_function("document.body.dataset.updates >= 1", timeout=15_000)
    busy_seen = 0
    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(load, url, 20, 48)
        t0, u0 = time.monotonic(), int(page.evaluate("document.body.dataset.updates"))
        shot = tmp_path / "dashboard.png"
        while not done.done():
            busy_seen = max(busy_seen, int(page.evaluate("document.body.dataset.busySlots")))
            if busy_seen >= 10 and not shot.exists():
                page.screenshot(path=str(shot), full_page=True)  # the slots mid-load
            time.sleep(0.1)
        elapsed = time.monotonic() - t0
        u1 = int(page.evaluate("document.body.dataset.updates"))
        assert done.result() == ["length"] * 20
    assert busy_seen >= 10, busy_seen  # the slots filled while the 20 requests ran
    assert (u1 - u0) / elapsed >= 1.0, (u1 - u0, elapsed)  # at least one update a second
    page.wait_for_function("document.body.dataset.busySlots === '0'", timeout=15_000)
    assert shot.stat().st_size > 5_000
    if target := os.environ.get("JAXSERVE_DASHBOARD_SCREENSHOT"):
        shutil.copy(shot, target)
    assert (errors, refused) == ([], [])
