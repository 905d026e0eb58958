"""The simulation loop: the real `Scheduler` plans every step, a cost model prices it, and a
simulated clock moves by that price. No device, no jax; tokens are a fixed non-EOS id.

What it mirrors of `Engine`: the admission checks of `add_request` (context length, prompts
too long without chunking, the waiting-queue bound), `schedule -> run -> update`, which rows
emit a token (a prompt's last chunk, every decode row), and data parallel: `dp` groups of
slots with `cache.num_pages` pages each. The groups run a step in parallel on their own chips,
padded to one shape, so a step costs what its slowest group costs.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from jaxserve.config import CacheConfig, SchedulerConfig, resolve_for_platform
from jaxserve.request import Request, SamplingParams
from jaxserve.scheduler import Scheduler
from jaxserve.simulate.cost import CostModel
from jaxserve.simulate.shapes import ShapeOf, StepShape
from jaxserve.simulate.trace import TraceRequest

TOKEN_ID = 7  # what every step "samples": any id that is not EOS; requests end by max_tokens


@dataclass
class StepLog:
    """One simulated step, for timelines and the fit-vs-measured plots."""

    start_s: float
    end_s: float
    shape: StepShape  # the group that set the step's price (the slowest; with dp = 1, the step)
    busy_slots: int  # requests holding a slot when the step ran
    waiting: int  # requests still queued after it was planned
    groups: tuple[StepShape, ...] = ()  # every dp group's shape


@dataclass
class SimState:
    """Raw per-request and per-step tallies; `metrics.summarize` turns them into figures."""

    arrival: list[float]
    output_len: list[int]
    first: list[float]  # first token time, nan = never
    finish: list[float]
    itl: list[float] = field(default_factory=list)  # gaps between a request's tokens
    rejected: int = 0  # refused at submission, as the engine would (context, queue full)
    steps_by_mode: collections.Counter[str] = field(default_factory=collections.Counter)
    seconds_by_mode: collections.Counter[str] = field(default_factory=collections.Counter)
    busy_slot_steps: int = 0  # EngineStats' counters: decode rows over decode/mixed steps
    total_slot_steps: int = 0
    padded_decode_rows: int = 0
    prompt_tokens_run: int = 0  # prefill tokens computed, recomputation included
    retractions: int = 0
    sustained_end_s: float = float("nan")  # end of the step that emptied the queue
    sustained_tokens: int = 0
    output_tokens: int = 0
    start_s: float = 0.0
    end_s: float = 0.0
    num_slots: int = 0  # all groups' slots
    dp: int = 1
    steps: list[StepLog] | None = None


def _admit_error(cfg: SchedulerConfig, n_prompt: int, waiting: int) -> bool:
    """What `Engine.add_request` refuses (ContextLengthError, QueueFullError)."""
    too_long = n_prompt >= cfg.max_model_len or (
        not cfg.chunked_prefill and n_prompt > cfg.max_prefill_tokens
    )
    return too_long or waiting >= cfg.max_waiting


def _price(cost: CostModel, shapes: list[StepShape]) -> tuple[float, StepShape]:
    """A step's seconds and the group that sets them: the groups run in parallel, each on its
    own chips, and the step ends when the slowest does."""
    prices = [cost.step_seconds(s) for s in shapes]
    slowest = max(range(len(shapes)), key=prices.__getitem__)
    return prices[slowest], shapes[slowest]


def simulate(
    trace: list[TraceRequest],
    cost: CostModel,
    scheduler: SchedulerConfig,
    cache: CacheConfig,
    record_steps: bool = False,
    dp: int = 1,
) -> SimState:
    """Run `trace` to completion; the clock starts at the first arrival.

    `dp` groups, built as `Engine` builds them: `scheduler` slots and `cache.num_pages` pages
    each (`cost` prices one group's part of a step).
    """
    if dp < 1:
        raise ValueError(f"dp={dp} must be >= 1")
    cfg = resolve_for_platform(scheduler, cost.platform)
    sched = Scheduler(cfg, cache.page_size, cache.num_pages * dp, eos_token_ids=(), num_groups=dp)
    shape_of = ShapeOf(cfg, dp)
    order = sorted(range(len(trace)), key=lambda i: trace[i].arrival_s)
    n = len(trace)
    nan = float("nan")
    st = SimState(
        arrival=[r.arrival_s for r in trace],
        output_len=[r.output_len for r in trace],
        first=[nan] * n,
        finish=[nan] * n,
        num_slots=cfg.max_running_requests * dp,
        dp=dp,
        steps=[] if record_steps else None,
    )
    last_token = [0.0] * n
    index: dict[int, int] = {}  # id(Request) -> trace index
    pending = collections.deque(order)
    clock = st.start_s = trace[order[0]].arrival_s if trace else 0.0
    while pending or sched.has_work():
        while pending and trace[pending[0]].arrival_s <= clock:
            i = pending.popleft()
            tr = trace[i]
            if _admit_error(cfg, len(tr.prompt_token_ids), len(sched.waiting)):
                st.rejected += 1
                continue
            params = SamplingParams(max_tokens=tr.output_len, temperature=0.0, ignore_eos=True)
            # Distinct arrival times, increasing in submission order, as the engine's clock
            # gives: retraction breaks ties by the newest arrival.
            req = Request(str(i), list(tr.prompt_token_ids), params, arrival_time=clock + i * 1e-9)
            index[id(req)] = i
            sched.add(req)
        if not sched.has_work():  # idle until the next arrival (if any is left)
            if pending:
                clock = trace[pending[0]].arrival_s
            continue
        plan = sched.schedule()
        if plan.is_idle:  # nothing can run until something arrives
            if not pending:
                raise RuntimeError("the scheduler planned an idle step with work left")
            clock = trace[pending[0]].arrival_s
            continue
        shapes = shape_of.groups(plan)
        price, shape = _price(cost, shapes)
        start = clock
        clock += price
        # Rows that emit a token, decided before update() moves the requests on.
        emitting = [c.request for c in plan.prefill if c.is_last] + plan.decode
        if plan.decode:
            st.busy_slot_steps += len(plan.decode)
            st.total_slot_steps += st.num_slots
            st.padded_decode_rows += sum(s.decode_rows_padded for s in shapes)
        st.steps_by_mode[shape.mode] += 1
        st.seconds_by_mode[shape.mode] += clock - start
        st.prompt_tokens_run += sum(s.prefill_tokens for s in shapes)
        if st.steps is not None:
            busy = sum(s is not None for s in sched.slots)
            log = StepLog(start, clock, shape, busy, len(sched.waiting), tuple(shapes))
            st.steps.append(log)
        sched.update(plan, [TOKEN_ID] * (len(plan.prefill) + len(plan.decode)))
        for req in emitting:
            i = index[id(req)]
            if st.first[i] != st.first[i]:  # nan: the first token
                st.first[i] = clock
            else:
                st.itl.append(clock - last_token[i])
            last_token[i] = clock
            if req.finished:
                st.finish[i] = clock
                del index[id(req)]
        st.output_tokens += len(emitting)
        st.end_s = clock  # the last step's end (a refused late arrival does not count)
        if st.sustained_end_s != st.sustained_end_s and not sched.waiting and not pending:
            st.sustained_end_s, st.sustained_tokens = clock, st.output_tokens
    st.retractions = sched.num_retractions
    st.end_s = max(st.end_s, st.start_s)
    return st
