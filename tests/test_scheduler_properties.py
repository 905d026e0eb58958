"""Stateful property tests of the scheduler on the hand-computable fake model (hypothesis).

Random interleavings of add / abort / step under tiny page and slot budgets, with chunked
prefill, retraction, the prefix cache, MIXED steps, both policies and one or two dp groups.
After every step each page is free, or held exactly by the requests whose tables list it
plus the cache; no slot holds a finished request nor a page of another dp group; at the end
every request finished or was aborted exactly once and each finished request's tokens equal
the model run alone. `JAXSERVE_HYPOTHESIS_EXAMPLES` raises the example count (CI runs a
bounded number; `scripts/soak_scheduler.sh` longer).
"""

from __future__ import annotations

import collections
import os

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from jaxserve.engine import Engine
from jaxserve.errors import ContextLengthError
from jaxserve.request import FinishReason, SamplingParams
from tests.fake_model import expected_tokens
from tests.test_scheduler import make_engine

EXAMPLES = int(os.environ.get("JAXSERVE_HYPOTHESIS_EXAMPLES", "60"))
TOKENS = st.integers(1, 6)  # a small alphabet, so prompts share prefixes (cache hits)


class SchedulerMachine(RuleBasedStateMachine):
    engine: Engine

    @initialize(
        num_pages=st.integers(8, 14),
        slots=st.integers(1, 4),
        mixed=st.booleans(),
        policy=st.sampled_from(["continuous", "continuous", "static"]),
        chunked=st.booleans(),
        prefix_cache=st.booleans(),
        ratio=st.sampled_from([0.05, 0.5, 1.0]),
        dp=st.sampled_from([1, 1, 2]),  # dp groups: a fake runner each, own pages and slots
    )
    def setup(self, num_pages, slots, mixed, policy, chunked, prefix_cache, ratio, dp):
        event(f"dp={dp}")
        self.engine = make_engine(
            num_pages=num_pages,
            dp=dp,
            page_size=4,
            slots=slots,
            max_model_len=32,
            max_prefill_tokens=16,
            prefill_buckets=(8, 16),
            mixed_step_tokens=10,
            enable_mixed_steps=mixed,
            policy=policy,
            chunked_prefill=chunked,
            enable_prefix_cache=prefix_cache,
            init_new_token_ratio=ratio,
            min_new_token_ratio=min(ratio, 0.1),
        )
        self.prompts: dict[str, tuple[list[int], int]] = {}
        self.tokens: dict[str, list[int]] = collections.defaultdict(list)
        self.ended: collections.Counter[str] = collections.Counter()
        self.reason: dict[str, FinishReason] = {}
        self.next_id = 0

    @rule(prompt=st.lists(TOKENS, min_size=1, max_size=20), max_tokens=st.integers(1, 12))
    def add(self, prompt, max_tokens):
        rid = f"r{self.next_id}"
        self.next_id += 1
        try:
            self.engine.add_request(
                rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0)
            )
        except ContextLengthError:  # only without chunking, for prompts over one step
            assert not self.engine.cfg.scheduler.chunked_prefill and len(prompt) > 16
            return
        self.prompts[rid] = (prompt, max_tokens)

    @precondition(lambda self: bool(self.engine.requests))
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.engine.requests)))
        assert self.engine.abort(rid)
        self.ended[rid] += 1
        self.reason[rid] = FinishReason.ABORT

    @rule()
    def step(self):
        retractions = self.engine.scheduler.num_retractions
        mixed = self.engine.stats.num_mixed_steps
        outs = self.engine.step()
        if self.engine.scheduler.num_retractions > retractions:
            event("retraction")
        if self.engine.stats.num_mixed_steps > mixed:
            event("mixed step")
        for out in outs:
            assert out.error is None, out.error
            assert self.ended[out.request_id] == 0, f"{out.request_id} emitted after it ended"
            self.tokens[out.request_id] += out.new_token_ids
            if out.finished:
                self.ended[out.request_id] += 1
                self.reason[out.request_id] = out.finish_reason

    @invariant()
    def pages_add_up(self):
        s = self.engine.scheduler
        holders = collections.Counter()
        for req in s.running:
            holders.update(req.pages)
        cache = s.prefix_cache
        cached = collections.Counter(cache._pages.values()) if cache is not None else {}
        for page in range(s.allocator.num_pages):
            refs = s.allocator.ref_count(page)
            assert refs == holders[page] + cached.get(page, 0), (page, refs)
        if cache is not None:  # the O(1) count of pages eviction can free
            only_cache = sum(s.allocator.ref_count(p) == 1 for p in cached)
            assert cache.num_evictable() == only_cache
        free = set(s.allocator._free)
        assert len(free) == s.allocator.num_free  # no page twice on the free list
        assert all(s.allocator.ref_count(p) == 0 for p in free)

    @invariant()
    def slots_hold_only_live_requests(self):
        s = self.engine.scheduler
        group_pages = s.allocator.num_pages // s.num_groups
        for i, req in enumerate(s.slots):
            if req is not None:
                assert not req.finished and req.slot == i
                assert all(p // group_pages == s.group_of(i) for p in req.pages), "wrong group"
        assert all(r.slot is None for r in s.waiting)

    def teardown(self):
        if not hasattr(self, "engine"):
            return
        for _ in range(2000):
            if not self.engine.has_work():
                break
            self.step()
        assert not self.engine.has_work(), "the engine did not drain"
        for rid, (prompt, max_tokens) in self.prompts.items():
            assert self.ended[rid] == 1, f"{rid} ended {self.ended[rid]} times"
            if self.reason[rid] is not FinishReason.ABORT:
                assert self.tokens[rid] == expected_tokens(prompt, max_tokens), rid
        s = self.engine.scheduler
        if s.prefix_cache is not None:
            s.prefix_cache.clear()
        assert s.allocator.num_free == s.allocator.num_pages, "pages leaked"


SchedulerMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,  # a failure prints the reproducing seed/blob
)
test_scheduler_state_machine = SchedulerMachine.TestCase
