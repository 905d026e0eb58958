"""SGLang-style scheduler: a waiting queue, a running batch in fixed slots, and a StepPlan per step.

A step is EXTEND (prefill chunks only), DECODE (one token for every decoding request) or MIXED
(both in one device call, decode rows first under one token budget), as the seed's
`get_forward_mode` names them. Admission is limited by free KV pages (with a decaying
`new_token_ratio` reserve for the running requests' future tokens), by the slot count and by
the step's token budget; when decode runs out of pages the cheapest request is retracted and
recomputed later. Plain Python: no jax here.
"""

from __future__ import annotations

import collections
import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from jaxserve.config import SchedulerConfig
from jaxserve.pages import PageAllocator, pages_for
from jaxserve.prefix_cache import PrefixCache
from jaxserve.request import FinishReason, Request, RequestState


@dataclass(frozen=True)
class PrefillChunk:
    request: Request
    start: int  # first token of the chunk (tokens before it are already in the cache)
    length: int
    is_first: bool  # first chunk since admission: the slot's sampling state is reset

    @property
    def is_last(self) -> bool:
        return self.start + self.length == self.request.num_tokens


class ForwardMode(enum.StrEnum):
    EXTEND = "extend"  # prefill chunks only
    DECODE = "decode"  # one token per decoding request
    MIXED = "mixed"  # both, in one device call
    IDLE = "idle"


@dataclass
class StepPlan:
    prefill: list[PrefillChunk] = field(default_factory=list)
    decode: list[Request] = field(default_factory=list)
    retracted: list[Request] = field(default_factory=list)
    slot_moves: list[tuple[int, int]] = field(default_factory=list)  # (from, to), before the step

    @property
    def mode(self) -> ForwardMode:
        if self.prefill:
            return ForwardMode.MIXED if self.decode else ForwardMode.EXTEND
        return ForwardMode.DECODE if self.decode else ForwardMode.IDLE

    @property
    def is_idle(self) -> bool:
        return not self.prefill and not self.decode


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


class Scheduler:
    """Owns the waiting queue, the slots and the page allocator; returns one StepPlan per step."""

    def __init__(
        self,
        cfg: SchedulerConfig,
        page_size: int,
        num_pages: int,
        eos_token_ids: tuple[int, ...] = (),
        num_groups: int = 1,
    ):
        # num_groups > 1 (data parallel): each group has max_running_requests slots and
        # num_pages / num_groups pages of its own; a request's pages come from its slot's group.
        group_pages = num_pages // num_groups
        if group_pages * page_size < cfg.max_model_len:
            raise ValueError(
                f"num_pages * page_size = {group_pages * page_size} tokens cannot hold one "
                f"request of max_model_len={cfg.max_model_len}"
            )
        self.cfg = cfg
        self.page_size = page_size
        self.eos_token_ids = eos_token_ids
        self.num_groups = num_groups
        self.slots_per_group = cfg.max_running_requests
        self.allocator = PageAllocator(num_pages, num_groups)
        self.prefix_cache = (
            PrefixCache(self.allocator, page_size) if cfg.enable_prefix_cache else None
        )
        self.waiting: collections.deque[Request] = collections.deque()
        self.slots: list[Request | None] = [None] * (cfg.max_running_requests * num_groups)
        self.new_token_ratio = cfg.init_new_token_ratio
        self.num_retractions = 0
        # static policy: a group admits only while its new batch is being filled (each dp group
        # batches on its own, as a separate engine would)
        self._batch_open = [True] * num_groups

    # ---- queue -------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        req.state = RequestState.WAITING
        self.waiting.append(req)

    @property
    def running(self) -> list[Request]:
        return [r for r in self.slots if r is not None]

    def has_work(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slots)

    def finish(self, req: Request, reason: FinishReason) -> None:
        """Finish a request now: its slot and pages are free for this very step's refill."""
        if req.state is RequestState.WAITING:
            self.waiting.remove(req)
        self._release(req, cache=reason is not FinishReason.ERROR)
        req.state = RequestState.FINISHED
        req.finish_reason = reason

    def _release(self, req: Request, cache: bool = True) -> None:
        """Give back the slot and pages; full pages of computed tokens go to the prefix cache."""
        if cache and self.prefix_cache is not None and req.pages:
            tokens = req.all_token_ids[: req.num_computed]
            self.prefix_cache.insert(tokens, req.pages, req.cache_salt)
        self.allocator.free(req.pages)
        req.pages = []
        req.num_computed = 0
        req.num_cached = 0
        if req.slot is not None:
            self.slots[req.slot] = None
            req.slot = None

    # ---- planning ----------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """EXTEND while nobody decodes; else DECODE, with prefill chunks mixed in if enabled."""
        cfg = self.cfg
        mixing = cfg.enable_mixed_steps and cfg.policy == "continuous"
        if not mixing or not any(r.state is RequestState.DECODING for r in self.running):
            plan = self._schedule_prefill([cfg.max_prefill_tokens] * self.num_groups)
            if plan.prefill:
                return plan
        plan = self._schedule_decode()
        if mixing and not plan.retracted:  # after a retraction memory is short: admit nothing
            decoding = collections.Counter(self.group_of(r.slot) for r in plan.decode)
            budgets = []
            for g in range(self.num_groups):
                budget = min(cfg.mixed_step_tokens - decoding[g], self.max_mixed_prefill)
                budgets.append(max(budget - budget % cfg.prefill_block, 0))
            if any(budgets):
                plan.prefill = self._schedule_prefill(budgets).prefill
        return plan

    @property
    def max_mixed_prefill(self) -> int:
        """Prefill tokens a MIXED step can carry: the largest bucket within the step budget."""
        fitting = [b for b in self.cfg.prefill_buckets if b <= self.cfg.mixed_step_tokens]
        return max(fitting, default=0)

    def _group_running(self, group: int) -> list[Request]:
        return [r for r in self.running if self.group_of(r.slot) == group]

    def _reserved_tokens(self, group: int = 0) -> int:
        """Future decode tokens of a group's running requests, discounted by `new_token_ratio`."""
        total = 0
        for r in self._group_running(group):
            left = r.params.max_tokens - len(r.output_token_ids)
            total += math.ceil(max(left, 0) * self.new_token_ratio)
        return total

    def _schedule_prefill(self, budgets: list[int]) -> StepPlan:
        """Chunks of admitted prompts first, then new admissions; each dp group fills its own
        step budget (`budgets[g]` tokens, `max_prefill_seqs` sequences), as its own devices
        run its part of the step."""
        cfg = self.cfg
        static = cfg.policy == "static"
        if static:
            for group in range(self.num_groups):
                if not self._group_running(group):
                    self._batch_open[group] = True
            if not any(self._batch_open):
                return StepPlan()
        chunks: list[PrefillChunk] = []
        budgets = list(budgets)
        seqs = [0] * self.num_groups

        def room(group: int) -> bool:
            open_batch = self._batch_open[group] or not static
            return open_batch and budgets[group] > 0 and seqs[group] < cfg.max_prefill_seqs

        def take(chunk: PrefillChunk, group: int) -> None:
            chunks.append(chunk)
            budgets[group] -= _round_up(chunk.length, cfg.prefill_block)
            seqs[group] += 1

        # Requests already admitted whose prompt is longer than one step's budget go first.
        for req in self.running:
            group = self.group_of(req.slot)
            if req.state is RequestState.PREFILLING and room(group):
                n = min(req.num_tokens - req.num_computed, budgets[group])
                take(PrefillChunk(req, req.num_computed, n, is_first=False), group)
        if (
            cfg.schedule_order == "lpm"
            and self.prefix_cache is not None
            and 1 < len(self.waiting) <= 128
            and None in self.slots  # nothing can be admitted without a free slot
        ):
            # Longest cached prefix first, as SGLang does for short queues (stable on ties).
            cache, ps = self.prefix_cache, self.page_size
            self.waiting = collections.deque(
                sorted(self.waiting, key=lambda r: -self._peek(cache, r, ps))
            )
        while self.waiting:
            req = self.waiting[0]
            # The preferred group first; with dp, the next ones when its pages are short.
            for group in self._admission_groups(room, req):
                cached = self._match_prefix(req, group)
                length = self._admissible(req, group, cached, budgets[group], bool(chunks))
                if length is not None:
                    break
                self.allocator.free(cached)
            else:
                break
            self.waiting.popleft()
            slot = self.slots.index(None, group * self.slots_per_group)
            req.slot = slot
            self.slots[slot] = req
            req.pages = cached + self._alloc(
                pages_for(req.num_tokens, self.page_size) - len(cached), group
            )
            req.num_computed = req.num_cached = len(cached) * self.page_size
            if self.prefix_cache is not None:  # counted when admitted, not per refused try
                self.prefix_cache.hits += req.num_cached
                self.prefix_cache.queries += req.num_tokens
            req.state = RequestState.PREFILLING
            take(PrefillChunk(req, req.num_computed, length, is_first=True), group)
        return StepPlan(prefill=chunks)

    def group_of(self, slot: int) -> int:
        """The dp group that owns `slot` (and the pages of its request)."""
        return slot // self.slots_per_group

    def _admissible(
        self, req: Request, group: int, cached: list[int], budget: int, has_chunks: bool
    ) -> int | None:
        """The first chunk's length if `req` can start in `group` now (its `cached` pages
        locked already), None if the group's pages or the step cannot take it."""
        n, ps = req.num_tokens, self.page_size
        left = req.params.max_tokens - len(req.output_token_ids)
        # After the match: its pages are locked now, so they no longer count as free.
        # Requests admitted above hold their pages and reserve their future tokens.
        free_pages = self._free_pages(group)
        free_tokens = free_pages * ps - self._reserved_tokens(group)
        need_pages = pages_for(n, ps) - len(cached)
        # The reserve only applies while others run: a lone request always gets in.
        estimate = n - len(cached) * ps + math.ceil(left * self.new_token_ratio)
        blocked = need_pages > free_pages or (
            bool(self._group_running(group)) and estimate > free_tokens  # (chunks too)
        )
        length = min(n - len(cached) * ps, budget)
        if length < n - len(cached) * ps and not self.cfg.chunked_prefill:
            # Without chunking a prompt waits for a step with room for all of it; one that
            # fits no step (a retracted request's prompt + output) is chunked anyway when it
            # would run alone, rather than never.
            blocked |= has_chunks or bool(self.running)
        return None if blocked else length

    def _admission_groups(self, room: Callable[[int], bool], req: Request) -> list[int]:
        """The groups that could take `req` (a free slot and `room` in this step), best first.

        First the group with the most free slots (lowest on ties); with dp groups, the group
        caching the longest prefix of `req` instead while it has at most `dp_balance_slots`
        fewer free slots (cache-aware routing, as SGLang's router); then the others, freest
        first, for when the first one's pages cannot hold the request.
        """
        b = self.slots_per_group
        free = [
            self.slots[g * b : (g + 1) * b].count(None) if room(g) else 0
            for g in range(self.num_groups)
        ]
        groups = sorted((g for g in range(self.num_groups) if free[g]), key=lambda g: -free[g])
        if len(groups) > 1 and self._uses_cache(req):
            assert self.prefix_cache is not None
            tokens, pages = req.all_token_ids, (req.num_tokens - 1) // self.page_size
            cached = {g: self.prefix_cache.peek(tokens, pages, g, req.cache_salt) for g in groups}
            best = max(groups, key=lambda g: cached[g])  # the freest of the longest
            if cached[best] > cached[groups[0]]:
                if free[groups[0]] - free[best] <= self.cfg.dp_balance_slots:
                    groups.remove(best)
                    groups.insert(0, best)
        return groups

    def _peek(self, cache: PrefixCache, req: Request, ps: int) -> int:
        tokens, salt = req.all_token_ids, req.cache_salt
        return max(cache.peek(tokens, len(tokens) // ps, g, salt) for g in range(self.num_groups))

    def _uses_cache(self, req: Request) -> bool:
        """Requests with penalties skip the cache: their token history on device is rebuilt
        from the tokens they prefill, so every token has to go through prefill."""
        p = req.params
        penalised = (
            p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
        )
        return self.prefix_cache is not None and not penalised

    def _match_prefix(self, req: Request, group: int = 0) -> list[int]:
        """Cached pages for req's prefix, retained for it (at least one token is left to run)."""
        if not self._uses_cache(req):
            return []
        assert self.prefix_cache is not None
        max_pages = (req.num_tokens - 1) // self.page_size
        pages = self.prefix_cache.match(req.all_token_ids, max_pages, group, req.cache_salt)
        self.allocator.retain(pages)
        return pages

    def _free_pages(self, group: int | None = None) -> int:
        """Free pages plus those the prefix cache could give back (of one group, or all)."""
        extra = self.prefix_cache.num_evictable(group) if self.prefix_cache is not None else 0
        a = self.allocator
        return (a.num_free if group is None else a.num_free_in(group)) + extra

    def _alloc(self, n: int, group: int = 0) -> list[int]:
        short = n - self.allocator.num_free_in(group)
        if short > 0 and self.prefix_cache is not None:
            self.prefix_cache.evict(short, group)
        return self.allocator.alloc(n, group)

    def _compact_slots(self) -> list[tuple[int, int]]:
        """Move requests from high slots into holes below, so decode runs a smaller bucket.

        Holes appear only when nobody is waiting to fill them (prefill takes the lowest free
        slot), e.g. in the tail of a batch; a move costs one small on-device gather.
        """
        moves: list[tuple[int, int]] = []
        b = self.slots_per_group
        for base in range(0, len(self.slots), b):  # within each dp group: pages stay put
            occupied = [i for i in range(base, base + b) if self.slots[i] is not None]
            n = base + len(occupied)
            holes = [i for i in range(base, n) if self.slots[i] is None]
            moves += zip([i for i in occupied if i >= n], holes, strict=True)
        for src, dst in moves:
            req = self.slots[src]
            self.slots[dst], self.slots[src] = req, None
            req.slot = dst
        return moves

    def _schedule_decode(self) -> StepPlan:
        self._batch_open = [False] * self.num_groups
        moves = self._compact_slots()
        decoding = [r for r in self.running if r.state is RequestState.DECODING]
        retracted: list[Request] = []

        def missing(r: Request, steps: int = 1) -> int:
            """Pages r needs to write its next `steps` tokens (no more than it may produce)."""
            left = max(1, min(r.params.max_tokens - len(r.output_token_ids), steps))
            left = min(left, max(1, self.cfg.max_model_len - r.num_computed))
            return max(0, pages_for(r.num_computed + left, self.page_size) - len(r.pages))

        def short(reqs: list[Request], group: int, steps: int = 1) -> bool:
            return sum(missing(r, steps) for r in reqs) > self._free_pages(group)

        def cheapest(reqs: list[Request]) -> Request:
            """As SGLang: the fewest output tokens; longest prompt, then newest, on ties."""
            return min(
                reqs,
                key=lambda r: (len(r.output_token_ids), -len(r.prompt_token_ids), -r.arrival_time),
            )

        for group in range(self.num_groups):  # each dp group decodes from its own pages
            mine = [r for r in decoding if self.group_of(r.slot) == group]
            if not short(mine, group):
                continue
            # Out of pages. Requests still in a chunked prefill hold their prompt's pages
            # and have produced nothing: they go back first, as far as this step needs.
            prefilling = [r for r in self._group_running(group) if r not in mine]
            while prefilling and short(mine, group):
                victim = cheapest(prefilling)
                prefilling.remove(victim)
                self.retract(victim)
                retracted.append(victim)
            # Then decoding ones, until the rest have room for `retract_decode_steps` more
            # steps, so retractions don't repeat every step.
            steps = self.cfg.retract_decode_steps
            while len(mine) > 1 and (short(mine, group) or short(mine, group, steps)):
                victim = cheapest(mine)
                mine.remove(victim)
                decoding.remove(victim)
                self.retract(victim)
                retracted.append(victim)
        for r in decoding:
            r.pages += self._alloc(missing(r), self.group_of(r.slot))
        if retracted:
            self.new_token_ratio = self.cfg.init_new_token_ratio
        else:
            self.new_token_ratio = max(
                self.cfg.min_new_token_ratio, self.new_token_ratio - self.cfg.new_token_ratio_decay
            )
        return StepPlan(decode=decoding, retracted=retracted, slot_moves=moves)

    def retract(self, req: Request, cache: bool = True) -> None:
        """Back to the front of the queue; its output is kept and recomputed on re-admission."""
        self._release(req, cache=cache)
        req.state = RequestState.WAITING
        req.num_retractions += 1
        self.num_retractions += 1
        self.waiting.appendleft(req)

    # ---- results -----------------------------------------------------------------------
    def update(self, plan: StepPlan, next_tokens: list[int]) -> list[Request]:
        """Record sampled tokens, one per prefill chunk then one per decode row; return the
        finished requests."""
        finished = []
        rows: list[PrefillChunk | Request] = [*plan.prefill, *plan.decode]
        for row, token in zip(rows, next_tokens, strict=True):
            if isinstance(row, PrefillChunk):
                req = row.request
                req.num_computed = row.start + row.length
                if not row.is_last:
                    continue
                req.state = RequestState.DECODING
            else:
                req = row
                req.num_computed += 1
            req.output_token_ids.append(int(token))
            reason = self._finish_reason(req)
            if reason is not None:
                self.finish(req, reason)
                finished.append(req)
        return finished

    def _finish_reason(self, req: Request) -> FinishReason | None:
        token = req.output_token_ids[-1]
        p = req.params
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return FinishReason.STOP
        if len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.cfg.max_model_len:
            return FinishReason.LENGTH
        return None
