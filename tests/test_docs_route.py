"""`/docs` renders in a real headless Chromium with every request off this server
refused (as without internet): no console errors, and the API's routes listed.

Needs Playwright (test extras) and a Chromium binary: Debian's `apt-get install chromium`, or
$JAXSERVE_CHROMIUM; without them the browser tests are skipped, saying which is missing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from jaxserve.config import ServerConfig
from jaxserve.server import Bridge
from tests.http_server import run_server

ROUTES = ["/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics"]


def chromium_path() -> str | None:
    return os.environ.get("JAXSERVE_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None
    )


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    """The app without an engine: the docs need none (the /v1 routes answer 503)."""
    with run_server(Bridge(), ServerConfig()) as url:
        yield url


def test_docs_assets_are_served_locally(url):
    html = httpx.get(f"{url}/docs").text
    assets = [part.split('"')[1] for part in html.split("src=")[1:] + html.split("href=")[1:]]
    assert assets and all(a.startswith("/") for a in assets), assets  # nothing from a CDN
    for asset in assets:
        assert httpx.get(f"{url}{asset}").status_code == 200, asset
    schema = httpx.get(f"{url}/openapi.json").json()
    assert set(ROUTES) <= set(schema["paths"])
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"].endswith("ChatCompletionRequest")
    assert "messages" in schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')"
    )
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium binary: apt-get install chromium (or set $JAXSERVE_CHROMIUM)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, headless=True)
        yield browser
        browser.close()


def open_offline(browser, url: str, path: str):
    """The page at `path`, with requests to any other host refused; its console errors and
    the refused requests."""
    page = browser.new_page()
    errors: list[str] = []
    refused: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
    host = urlsplit(url).netloc

    def route(r) -> None:
        if urlsplit(r.request.url).netloc == host:
            r.continue_()
        else:
            refused.append(r.request.url)
            r.abort("internetdisconnected")

    page.route("**/*", route)
    page.goto(f"{url}{path}", wait_until="networkidle")
    return page, errors, refused


def test_swagger_ui_renders_offline(browser, url):
    page, errors, refused = open_offline(browser, url, "/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=15_000)
    listed = page.locator(".opblock-summary-path").all_inner_texts()
    assert [p.replace("\u200b", "") for p in listed] == ROUTES
    assert page.locator(".info .title").inner_text().startswith("jaxserve")
    # expanding a POST route shows its request body schema
    page.locator(".opblock-post .opblock-summary").first.click()
    page.wait_for_selector(
        ".opblock-post .body-param, .opblock-post .model-example", timeout=10_000
    )
    assert (errors, refused) == ([], [])


def test_redoc_is_off(url):
    assert httpx.get(f"{url}/redoc").status_code == 404  # its logo would come from a CDN


def test_docs_offer_the_bearer_scheme_when_a_key_is_set():
    from fastapi.testclient import TestClient

    from jaxserve.server import create_app

    schema = TestClient(create_app(Bridge(), ServerConfig(api_key="k"), "m")).get("/openapi.json")
    assert schema.json()["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert schema.json()["paths"]["/v1/completions"]["post"]["security"] == [{"HTTPBearer": []}]
