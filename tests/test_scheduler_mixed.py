"""MIXED steps on the hand-computable fake model: one token budget shared by decode rows and
prefill chunks, long prompts chunked while every decoding request advances, retraction."""

from __future__ import annotations

import pytest

from jaxserve.engine import Engine
from jaxserve.errors import ContextLengthError
from jaxserve.scheduler import ForwardMode, StepPlan
from tests.fake_model import expected_tokens
from tests.test_scheduler import greedy, run

# Block 4, buckets 8 and 32: a MIXED step of 10 tokens carries at most an 8-token chunk.
MIXED = dict(mixed_step_tokens=10, prefill_buckets=(8, 32), max_prefill_tokens=32)


def record_plans(e: Engine) -> list[StepPlan]:
    """Every plan the engine runs from now on (wraps the scheduler's `schedule`)."""
    plans: list[StepPlan] = []
    schedule = e.scheduler.schedule

    def recording() -> StepPlan:
        plans.append(schedule())
        return plans[-1]

    e.scheduler.schedule = recording
    return plans


@pytest.mark.parametrize(("num_decoding", "chunk"), [(1, 8), (3, 4), (6, 4), (7, 0)])
def test_budget_is_shared_decode_rows_first(engines, num_decoding, chunk):
    e = engines(slots=8, max_prefill_seqs=8, **MIXED)
    plans = record_plans(e)
    for i in range(num_decoding):
        e.add_request(f"d{i}", [i + 1, 2], greedy(40))
    e.step()  # EXTEND: the decoders' prompts
    e.add_request("long", list(range(1, 30)), greedy(3))
    e.step()
    # 10 tokens minus one per decode row, capped by the 8-token bucket, rounded down to the
    # 4-token block: 1 row -> 8, 3 or 6 rows -> 4, 7 rows -> no room (a plain DECODE step).
    plan = plans[-1]
    assert len(plan.decode) == num_decoding
    assert [c.length for c in plan.prefill] == ([chunk] if chunk else [])
    assert plan.mode is (ForwardMode.MIXED if chunk else ForwardMode.DECODE)
    for rid in list(e.requests):
        e.abort(rid)


def test_long_prompt_is_chunked_while_every_decoder_advances(engines):
    e = engines(slots=4, **MIXED)
    plans = record_plans(e)
    prompts = {f"d{i}": [i + 1, 2, 3] for i in range(3)}
    for rid, p in prompts.items():
        e.add_request(rid, p, greedy(30))
    out: dict[str, list[int]] = {}
    for o in e.step():  # EXTEND: the three decoders' prompts
        out.setdefault(o.request_id, []).extend(o.new_token_ids)
    long_prompt = list(range(5, 63))  # 58 tokens: 10 chunks of at most 7 with 3 decoders
    e.add_request("long", long_prompt, greedy(5))
    start = len(plans)
    while e.has_work():
        for o in e.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    prefilling = [
        p for p in plans[start:] if any(c.request.request_id == "long" for c in p.prefill)
    ]
    assert len(prefilling) >= 58 // 8
    for p in prefilling:  # no decoder ever waits for the long prompt
        assert p.mode is ForwardMode.MIXED
        assert sorted(r.request_id for r in p.decode) == ["d0", "d1", "d2"]
    assert out == {
        **{rid: expected_tokens(p, 30) for rid, p in prompts.items()},
        "long": expected_tokens(long_prompt, 5),
    }


@pytest.mark.parametrize("mixed", [True, False])
def test_staggered_arrivals_give_identical_output_with_and_without_mixing(engines, mixed):
    e = engines(slots=3, enable_mixed_steps=mixed, **{k: v for k, v in MIXED.items()})
    plans = record_plans(e)
    prompts = {f"r{i}": [(7 * i) % 11 + 1] * (3 + 5 * i) for i in range(7)}
    out: dict[str, list[int]] = {}
    pending = list(prompts.items())
    step = 0
    while pending or e.has_work():
        if pending and step % 3 == 0:  # a new request every third step
            rid, p = pending.pop(0)
            e.add_request(rid, p, greedy(6 + step % 5))
        for o in e.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
        step += 1
    modes = {p.mode for p in plans}
    assert (ForwardMode.MIXED in modes) == mixed
    assert ForwardMode.DECODE in modes and ForwardMode.EXTEND in modes
    for rid, p in prompts.items():
        assert out[rid] == expected_tokens(p, len(out[rid])), rid


def test_retraction_during_mixed_steps_keeps_output_and_leaks_nothing(engines):
    reference = engines(num_pages=256, **MIXED)
    # 64 tokens of KV for 6 growing requests, admitted optimistically (a 5% reserve).
    e = engines(num_pages=16, page_size=4, init_new_token_ratio=0.05, **MIXED)
    plans = record_plans(e)
    got: dict[str, dict[str, list[int]]] = {}
    for name, eng in (("ref", reference), ("tight", e)):
        out: dict[str, list[int]] = {}
        for i in range(6):
            eng.add_request(f"r{i}", [i + 1, 3] * (1 + i % 3), greedy(25))
            for _ in range(2):  # arrivals while others decode: MIXED steps
                for o in eng.step():
                    out.setdefault(o.request_id, []).extend(o.new_token_ids)
        for rid, ids in run(eng).items():
            out.setdefault(rid, []).extend(ids)
        got[name] = out
    assert e.scheduler.num_retractions > 0
    assert any(p.mode is ForwardMode.MIXED for p in plans)
    assert any(p.retracted for p in plans)
    assert got["tight"] == got["ref"]
    for i in range(6):
        assert got["ref"][f"r{i}"] == expected_tokens([i + 1, 3] * (1 + i % 3), 25)


def test_without_chunking_a_prompt_waits_for_room_and_too_long_ones_are_refused(engines):
    e = engines(chunked_prefill=False, **MIXED)
    plans = record_plans(e)
    with pytest.raises(ContextLengthError):
        e.add_request("huge", list(range(1, 40)), greedy(2))  # > max_prefill_tokens = 32
    e.add_request("d", [1, 2], greedy(6))
    e.step()
    e.add_request("p", list(range(1, 20)), greedy(3))  # 19 tokens: too big for a MIXED step
    out = run(e)
    assert out["p"] == expected_tokens(list(range(1, 20)), 3)
    p_plans = [p for p in plans if any(c.request.request_id == "p" for c in p.prefill)]
    assert len(p_plans) == 1 and p_plans[0].mode is ForwardMode.EXTEND  # after d finished
