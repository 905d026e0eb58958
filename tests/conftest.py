"""Shared fixtures: one warmed real engine per test session, and a leak check after each use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path.home() / ".cache/jaxserve/jax"))

TEST_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "test.toml"


@pytest.fixture(scope="session")
def engine():
    """The real default model, warmed once with configs/test.toml."""
    from jaxserve.config import load_config
    from jaxserve.engine import Engine
    from jaxserve.jaxutil import enable_compilation_cache

    enable_compilation_cache()
    return Engine.from_config(load_config(TEST_CONFIG))


@pytest.fixture(scope="session")
def llm(engine):
    from jaxserve.llm import LLM

    return LLM(engine=engine)


def assert_engine_idle(engine) -> None:
    """No request, slot or KV page may outlive a test."""
    s = engine.scheduler
    assert not s.waiting, f"{len(s.waiting)} requests still waiting"
    assert all(slot is None for slot in s.slots), "a slot is still taken"
    cached = s.prefix_cache.num_pages if s.prefix_cache is not None else 0
    assert s.allocator.num_used == cached, f"{s.allocator.num_used - cached} KV pages leaked"
    if s.prefix_cache is not None:  # cached pages are held by the cache alone
        assert s.prefix_cache.num_evictable() == cached
    assert not engine.requests, f"requests still tracked: {list(engine.requests)[:5]}"


@pytest.fixture
def idle_engine(engine):
    """The shared engine, checked for leaks after the test."""
    yield engine
    assert_engine_idle(engine)


@pytest.fixture
def engines():
    """Fake-model engines (`tests.test_scheduler.make_engine`); every engine a test makes must
    end with all pages and slots free."""
    from tests.test_scheduler import make_engine

    made = []

    def factory(**kw):
        made.append(make_engine(**kw))
        return made[-1]

    yield factory
    for e in made:
        cache = e.scheduler.prefix_cache
        assert cache.num_evictable() == cache.num_pages  # only the cache holds pages now
        cache.clear()
        assert e.scheduler.allocator.num_free == e.scheduler.allocator.num_pages
        assert all(s is None for s in e.scheduler.slots)
        assert not e.scheduler.waiting
