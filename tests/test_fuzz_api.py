"""Schema fuzzing of the HTTP API: schemathesis generates requests from the server's own
OpenAPI document (valid ones, and invalid ones that break it on purpose) and sends them to a
real server with the default model. Every answer must be documented (status code, content
type, body schema) and none may be a 5xx.

CI runs JAXSERVE_FUZZ_EXAMPLES (default 20) cases per route and mode; a longer run is the same
test with a larger number, e.g. `JAXSERVE_FUZZ_EXAMPLES=500 python -m pytest -q
tests/test_fuzz_api.py -s`. The hypothesis seed is printed on a failure.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="pip install -e '.[test]'")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from jaxserve.config import ServerConfig  # noqa: E402
from tests.http_server import serve_engine  # noqa: E402

EXAMPLES = int(os.environ.get("JAXSERVE_FUZZ_EXAMPLES", "20"))
ROUTES = [
    ("/v1/completions", "POST"),
    ("/v1/chat/completions", "POST"),
    ("/v1/models", "GET"),
    ("/health", "GET"),
]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
MAX_TOKENS = 4  # generated requests ask for up to the context length: keep CI short


@pytest.fixture(scope="module")
def live(engine) -> Iterator[tuple[str, object]]:
    with serve_engine(engine, ServerConfig()) as (url, bridge):
        yield url, schemathesis.openapi.from_url(f"{url}/openapi.json")


def bound(body: object) -> None:
    """Cap what a valid body may cost (tokens, choices); everything else stays generated."""
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and not isinstance(body.get(key), bool):
            body[key] = min(body[key], MAX_TOKENS)
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_TOKENS
    if isinstance(body.get("n"), int) and not isinstance(body.get("n"), bool):
        body["n"] = min(body["n"], 2)


# GET routes take no input: nothing to break, so only valid requests.
CASES = [
    (path, method, mode)
    for path, method in ROUTES
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if method == "POST" or mode is GenerationMode.POSITIVE
]


@pytest.mark.parametrize("path,method,mode", CASES, ids=lambda x: str(getattr(x, "value", x)))
def test_fuzzed_requests_get_documented_answers_and_no_5xx(live, path, method, mode):
    url, schema = live
    operation = schema[path][method]
    seen: collections.Counter = collections.Counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        bound(case.body)
        response = case.call(base_url=url, timeout=120)
        seen[response.status_code] += 1
        assert response.status_code < 500, (case.body, response.text[:300])
        case.validate_response(response, checks=CHECKS)

    run()
    print(f"{method} {path} {mode.value}: {sum(seen.values())} cases, statuses {dict(seen)}")
    assert sum(seen.values()) >= 1
    if mode is GenerationMode.NEGATIVE and method == "POST":
        assert any(400 <= s < 500 for s in seen), seen  # invalid bodies were refused
