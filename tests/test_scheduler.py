"""Scheduler behaviour on a hand-computable fake model (see tests/fake_model.py)."""

from __future__ import annotations

import pytest

from jaxserve.config import CacheConfig, EngineConfig, SchedulerConfig
from jaxserve.engine import Engine
from jaxserve.request import FinishReason, RequestState, SamplingParams
from jaxserve.scheduler import Scheduler
from tests.fake_model import (
    FAKE_MODEL,
    FakeRunner,
    FakeTokenizer,
    GroupedFakeRunner,
    expected_tokens,
)


def make_engine(num_pages=64, page_size=4, slots=4, dp=1, **sched) -> Engine:
    """The fake model's engine; with dp > 1 one fake runner per group (`num_pages` each)."""
    sched = {
        "max_running_requests": slots,
        "max_prefill_tokens": 32,
        "prefill_block": 4,
        "prefill_buckets": (8, 32),
        "max_model_len": 64,
        "max_prefill_seqs": 4,
        **sched,
    }
    cfg = EngineConfig(
        cache=CacheConfig(page_size=page_size, num_pages=num_pages),
        scheduler=SchedulerConfig(**sched),
        dp=dp,
    )
    if dp == 1:
        runner = FakeRunner(num_pages, page_size, slots)
    else:
        runner = GroupedFakeRunner(dp, num_pages, page_size, slots)
    engine = Engine(cfg, FAKE_MODEL, FakeTokenizer(), runner)
    engine.stats.trace = []
    return engine


def run(engine: Engine, max_steps: int = 10_000) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not engine.has_work():
            return out
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    raise AssertionError("engine did not drain")


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0)


PROMPTS = {f"r{i}": [3 + i, 5, 7 + 2 * i] * (1 + i % 3) for i in range(6)}


def add_all(engine: Engine, max_tokens: int = 12) -> None:
    for rid, prompt in PROMPTS.items():
        engine.add_request(rid, prompt, greedy(max_tokens))


def test_outputs_match_hand_computation(engines):
    e = engines()
    add_all(e)
    out = run(e)
    assert out == {rid: expected_tokens(p, 12) for rid, p in PROMPTS.items()}


@pytest.mark.parametrize("mixed", [False, True])
def test_prefill_has_priority_over_decode(engines, mixed):
    e = engines(enable_mixed_steps=mixed)
    e.add_request("a", [1, 2, 3], greedy(20))
    e.step()  # prefill a
    e.step()  # decode a
    e.add_request("b", [4, 5], greedy(5))
    outs = e.step()
    # Without mixing, a stalls for b's prefill; with it, both advance in one MIXED step.
    assert e.runner.calls[-1] == ("mixed" if mixed else "prefill")
    assert sorted(o.request_id for o in outs) == (["a", "b"] if mixed else ["b"])
    assert e.scheduler.slots.count(None) == 2
    run(e)


def test_finished_slot_is_refilled_on_the_next_step(engines):
    e = engines(slots=2)
    e.add_request("short", [1, 1], greedy(2))
    e.add_request("long", [2, 2], greedy(10))
    e.add_request("late", [3, 3], greedy(3))
    e.step()  # prefill short + long; late waits for a slot
    assert e.scheduler.waiting[0].request_id == "late"
    outs = e.step()  # decode: short finishes (its 2nd token)
    assert any(o.request_id == "short" and o.finished for o in outs)
    assert e.scheduler.slots.count(None) == 1  # freed at once
    e.step()
    kind, owners = e.stats.trace[-1]
    assert kind == "mixed" and "late" in owners  # long decodes while late prefills
    out = run(e)
    assert out["late"] == expected_tokens([3, 3], 3)[1:]  # first token came in the earlier step


def test_admission_is_limited_by_free_pages(engines):
    # 7 free pages of 4 tokens: each 10-token prompt needs 3 pages, so only two fit at once.
    e = engines(num_pages=16, page_size=4, max_model_len=32)
    for i in range(4):
        e.add_request(f"p{i}", [i + 1] * 10, greedy(4))
    held = e.scheduler.allocator.alloc(9)  # memory held elsewhere
    first = {o.request_id: o.new_token_ids for o in e.step()}
    assert len(e.scheduler.running) == 2
    assert len(e.scheduler.waiting) == 2
    e.scheduler.allocator.free(held)
    out = run(e)
    for rid, ids in first.items():
        out[rid] = ids + out[rid]
    assert out == {f"p{i}": expected_tokens([i + 1] * 10, 4) for i in range(4)}


def test_retraction_under_page_exhaustion_gives_identical_output(engines):
    reference = engines(num_pages=256)
    add_all(reference, max_tokens=30)
    want = run(reference)
    e = engines(num_pages=17, page_size=4)  # 68 tokens of KV for 6 requests growing to ~40
    add_all(e, max_tokens=30)
    got = run(e)
    assert e.scheduler.num_retractions > 0
    assert got == want


def test_retraction_resets_new_token_ratio():
    cfg = SchedulerConfig(
        max_running_requests=2,
        max_model_len=8,
        init_new_token_ratio=0.3,
        new_token_ratio_decay=0.05,
        min_new_token_ratio=0.1,
    )
    s = Scheduler(cfg, page_size=4, num_pages=3)
    from jaxserve.request import Request

    a, b = Request("a", [1, 2, 3, 4], greedy(5)), Request("b", [1, 2, 3, 4], greedy(5))
    s.add(a)
    s.add(b)
    plan = s.schedule()
    assert [c.request for c in plan.prefill] == [a, b]
    s.update(plan, [1, 1])
    plan = s.schedule()  # both need a second page for position 4; one page left -> retract
    assert plan.retracted == [b] and plan.decode == [a]
    assert b.state is RequestState.WAITING and b.output_token_ids == [1]
    assert s.new_token_ratio == 0.3  # reset, not decayed to 0.25
    s.update(plan, [2])
    s.finish(a, FinishReason.ABORT)
    s.finish(b, FinishReason.ABORT)
    assert s.allocator.num_free + s.prefix_cache.num_pages == 3
    s.prefix_cache.clear()
    assert s.allocator.num_free == 3


@pytest.mark.parametrize("steps,victims", [(1, ["a"]), (20, ["a", "c"])])
def test_retraction_picks_fewest_outputs_longest_prompt_and_keeps_room(steps, victims):
    """SGLang's rule: the fewest output tokens, longest prompt on ties (newest next), and
    retract until the rest can decode `retract_decode_steps` more steps."""
    cfg = SchedulerConfig(
        max_running_requests=3,
        max_model_len=16,
        init_new_token_ratio=0.0,
        min_new_token_ratio=0.0,
        retract_decode_steps=steps,
    )
    s = Scheduler(cfg, page_size=4, num_pages=6)
    from jaxserve.request import Request

    a = Request("a", [1] * 8, greedy(8))
    b, c = Request("b", [2] * 4, greedy(12)), Request("c", [3] * 4, greedy(12))
    for r in (a, b, c):
        s.add(r)
    plan = s.schedule()
    assert [ch.request for ch in plan.prefill] == [a, b, c]
    s.update(plan, [1, 1, 1])
    plan = s.schedule()  # 3 pages needed, 2 free: retract a (the longest prompt) first
    assert [r.request_id for r in plan.retracted] == victims
    assert [r.request_id for r in plan.decode] == [x for x in "abc" if x not in victims]


def test_new_token_ratio_decays_while_memory_is_fine(engines):
    e = engines()
    e.add_request("a", [1], greedy(10))
    start = e.scheduler.new_token_ratio
    run(e)
    assert e.scheduler.new_token_ratio < start


def test_chunked_prefill_splits_long_prompts(engines):
    e = engines(max_prefill_tokens=8, prefill_buckets=(8,))
    prompt = list(range(1, 30))
    e.add_request("long", prompt, greedy(5))
    out = run(e)
    assert out["long"] == expected_tokens(prompt, 5)
    assert e.stats.num_prefill_steps == 4  # 29 tokens in chunks of 8


def test_static_policy_waits_for_the_whole_batch(engines):
    e = engines(slots=2, policy="static")
    e.add_request("a", [1, 1], greedy(2))
    e.add_request("b", [2, 2], greedy(8))
    e.add_request("c", [3, 3], greedy(2))
    out = run(e)
    kinds = [k for k, _ in e.stats.trace]
    # c is admitted only after b (the longest of the first batch) finished.
    c_step = next(i for i, (_, owners) in enumerate(e.stats.trace) if "c" in owners)
    assert all("b" not in owners for _, owners in e.stats.trace[c_step:])
    assert kinds.count("prefill") == 2
    assert out == {
        "a": expected_tokens([1, 1], 2),
        "b": expected_tokens([2, 2], 8),
        "c": expected_tokens([3, 3], 2),
    }


def test_continuous_policy_refills_while_others_run(engines):
    e = engines(slots=2)
    e.add_request("a", [1, 1], greedy(2))
    e.add_request("b", [2, 2], greedy(8))
    e.add_request("c", [3, 3], greedy(2))
    run(e)
    assert any("b" in owners and "c" in owners for _, owners in e.stats.trace)


def test_continuous_has_higher_slot_utilisation_than_static(engines):
    util = {}
    for policy in ("static", "continuous"):
        e = engines(slots=4, policy=policy)
        for i in range(12):
            e.add_request(f"{policy}{i}", [i + 1, 2], greedy(2 + (i * 7) % 15))
        run(e)
        util[policy] = e.stats.busy_slot_steps / e.stats.total_slot_steps
    assert util["continuous"] > util["static"]


def test_abort_frees_slot_and_pages_at_once(engines):
    e = engines()
    e.add_request("a", [1, 2, 3], greedy(50))
    e.add_request("w", [1, 2, 3], greedy(5))
    e.step()
    assert e.scheduler.allocator.num_used > 0
    assert e.abort("a") and e.abort("w")
    assert e.scheduler.allocator.num_used == 0 and not e.has_work()
    assert not e.abort("a")


def test_stop_token_ids_and_eos(engines):
    e = engines()
    prompt = [5, 5]
    want = expected_tokens(prompt, 10)
    e.add_request(
        "s", prompt, SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(want[2],))
    )
    assert run(e)["s"] == want[:3]


def test_scheduler_module_does_not_import_jax():
    import subprocess
    import sys

    code = "import sys, jaxserve.scheduler; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_prefix_cache_skips_computed_pages_and_keeps_output(engines):
    e = engines()
    prompt = list(range(1, 23))  # 22 tokens: 5 full pages of 4 can be reused
    e.add_request("first", prompt, greedy(6))
    first = run(e)["first"]
    computed = e.stats.prompt_tokens
    e.add_request("again", prompt, greedy(6))
    e.add_request("longer", prompt + [9, 9, 9], greedy(6))
    out = run(e)
    assert out["again"] == first == expected_tokens(prompt, 6)
    assert out["longer"] == expected_tokens(prompt + [9, 9, 9], 6)
    # "again" recomputes 2 tokens (22 - 5*4), "longer" 5 (25 - 5*4).
    assert e.stats.prompt_tokens - computed == 2 + 5
    assert e.scheduler.prefix_cache.hits >= 40


def test_prefix_cache_is_evicted_when_pages_run_out(engines):
    e = engines(num_pages=20, page_size=4, max_model_len=32)
    for i in range(8):  # each leaves ~4 full pages in the cache; 8 of them do not fit
        e.add_request(f"r{i}", [i + 1] * 15, greedy(3))
        assert run(e)[f"r{i}"] == expected_tokens([i + 1] * 15, 3)
    cache = e.scheduler.prefix_cache
    assert cache.peek([8] * 15, 3) == 3  # the newest prompt is still cached
    assert cache.peek([1] * 15, 3) == 0  # the oldest was evicted to make room


def test_lpm_admits_the_longest_cached_prefix_first(engines):
    e = engines(slots=1)
    shared = list(range(1, 17))
    e.add_request("warm", shared + [1], greedy(1))
    run(e)
    e.add_request("cold", [50] * 17, greedy(1))
    e.add_request("hot", shared + [2], greedy(1))
    e.step()
    assert e.stats.trace[-1] == ("prefill", ("hot",))
    run(e)


def test_requests_with_penalties_do_not_use_the_prefix_cache(engines):
    e = engines()
    prompt = list(range(1, 23))
    e.add_request("a", prompt, greedy(2))
    run(e)
    before = e.stats.prompt_tokens
    e.add_request("pen", prompt, SamplingParams(max_tokens=2, temperature=0, presence_penalty=1.0))
    run(e)
    assert e.stats.prompt_tokens - before == len(prompt)


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(engines):
    e = engines()
    e.add_request("a", [1, 2], greedy(5))
    e.step()  # prefill a
    real_run = e.runner.run

    def broken(decode, prefill):
        e.runner.run = real_run  # fails once
        raise RuntimeError("device fell over")

    e.runner.run = broken
    outs = e.step()
    assert [(o.request_id, o.finish_reason, o.finished) for o in outs] == [
        ("a", FinishReason.ERROR, True)
    ]
    assert "device fell over" in outs[0].error
    e.add_request("b", [3, 4], greedy(3))
    assert run(e)["b"] == expected_tokens([3, 4], 3)


def test_tail_requests_move_down_to_low_slots(engines):
    e = engines(slots=4)
    for i, n in enumerate([2, 2, 2, 9]):
        e.add_request(f"r{i}", [i + 1, 5], greedy(n))
    out = run(e)
    assert "permute" in e.runner.calls
    # r3 started in slot 3 and finished in slot 0, its output unchanged by the move.
    assert e.stats.trace[-1] == ("decode", ("r3", None, None, None))
    assert out["r3"] == expected_tokens([4, 5], 9)


def test_admission_does_not_count_matched_prefix_pages_twice():
    """Matched cache pages are locked at admission: they stop being free (evictable) pages.

    Counting them as free too admitted C here, and C's growth would force a retraction."""
    from jaxserve.request import Request

    cfg = SchedulerConfig(
        max_running_requests=4, max_model_len=64, init_new_token_ratio=1.0, max_prefill_tokens=32
    )
    s = Scheduler(cfg, page_size=4, num_pages=16)
    shared = list(range(1, 25))  # 6 full pages, cached once A is done
    a = Request("a", shared, greedy(1))
    s.add(a)
    s.update(s.schedule(), [7])
    assert a.finished and s.prefix_cache.num_evictable() == 6
    b = Request("b", [50] * 8, greedy(20))  # holds 2 pages, reserves 20 future tokens
    s.add(b)
    s.update(s.schedule(), [7])
    c = Request("c", shared + [9, 9, 9, 9], greedy(24))  # 6 cached pages + 1, 24 to come
    s.add(c)
    plan = s.schedule()  # b decodes (a 3rd page for position 8); can c come in beside it?
    # Free after c's match: 7 pages (28 tokens) - b's 19 reserved = 9 < c's 4 + 24: c waits.
    # Counting c's 6 matched pages as free as well gave 33 and admitted it.
    assert c.state is RequestState.WAITING and all(ch.request is not c for ch in plan.prefill)
    assert s.allocator.num_free + s.prefix_cache.num_evictable() == 13  # c's match released


def test_prefix_cache_chains_pages_with_sha256_digests():
    """Page keys chain a cryptographic digest, not Python's hash() (CVE-2025-25183)."""
    import array
    import hashlib

    from jaxserve.pages import PageAllocator
    from jaxserve.prefix_cache import PrefixCache

    cache = PrefixCache(PageAllocator(8), page_size=2)
    keys = list(cache._keys([1, 2, 3, 4, 5, 6], 3))
    first = hashlib.sha256(array.array("q", [1, 2]).tobytes()).digest()
    assert keys[0] == (b"", (1, 2))
    assert keys[1] == (first, (3, 4))
    assert keys[2][0] == hashlib.sha256(first + array.array("q", [3, 4]).tobytes()).digest()


@pytest.mark.parametrize("max_tokens,reason", [(3, "stop"), (2, "length"), (4, "stop")])
def test_stop_string_completed_on_the_last_allowed_token_reports_stop(max_tokens, reason):
    """OpenAI reports `stop` when a stop string ends the text, even on the last token."""
    e = make_engine()
    prompt = [1, 2, 3]
    text = FakeTokenizer().decode(expected_tokens(prompt, 4))
    e.add_request("s", prompt, SamplingParams(max_tokens=max_tokens, stop=(text[1:3],)))
    outs = [o for _ in range(20) for o in e.step() if o.finished]
    assert [o.finish_reason.value for o in outs] == [reason]


def test_decode_short_of_pages_retracts_a_request_still_in_prefill():
    """Found by the long hypothesis run: the only decoding request needs a page while a
    request mid-way through a chunked prefill holds the rest. Retraction used to consider
    decoding requests only (and never the last one), so allocation raised."""
    cfg = SchedulerConfig(
        max_running_requests=2,
        max_model_len=32,
        max_prefill_tokens=8,
        mixed_step_tokens=12,
        prefill_block=4,
        prefill_buckets=(8,),
        init_new_token_ratio=0.0,
        min_new_token_ratio=0.0,
    )
    s = Scheduler(cfg, page_size=4, num_pages=8)
    from jaxserve.request import Request

    a, b = Request("a", [1, 2, 3], greedy(8)), Request("b", list(range(1, 29)), greedy(4))
    s.add(a)
    plan = s.schedule()
    s.update(plan, [7])  # a decodes; its page holds positions 0-3
    s.add(b)
    plan = s.schedule()  # MIXED: a's token 3, b admitted with all 7 of its pages
    assert plan.decode == [a] and [c.request for c in plan.prefill] == [b]
    s.update(plan, [7, 9])
    assert s.allocator.num_free == 0 and b.state is RequestState.PREFILLING
    plan = s.schedule()  # a needs a page for position 4: b (still prefilling) gives way
    assert plan.retracted == [b] and plan.decode == [a] and len(a.pages) == 2
