"""The engine loop: schedule -> run -> update -> emit, one step at a time, single-threaded.

`Engine.step()` returns per-request deltas (`RequestOutput`); `add_request` and `abort`
are called between steps. Bad input raises before any device work.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from jaxserve.adapters import LoraServing, parse_lora_module
from jaxserve.batch import BatchBuilder
from jaxserve.config import EngineConfig, ModelConfig, replace, resolve_for_platform
from jaxserve.detokenize import Decoder, IncrementalDetokenizer
from jaxserve.errors import (
    ContextLengthError,
    InvalidRequestError,
    LoraNotFoundError,
    QueueFullError,
)
from jaxserve.request import (
    FinishReason,
    Request,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)
from jaxserve.runner import StepResult
from jaxserve.scheduler import ForwardMode, Scheduler, StepPlan
from jaxserve.state import DecodeBatch, PrefillBatch
from jaxserve.structured import GrammarCache, TokenMasks


class StepRunner(Protocol):
    num_compiles: int

    # `allowed` ([B, ceil(V / 32)] int32 token masks) is passed only by steps that need it.
    def run(
        self, decode: DecodeBatch | None, prefill: PrefillBatch | None, allowed: np.ndarray = ...
    ) -> StepResult: ...
    def permute_slots(self, perm: np.ndarray) -> None: ...


@dataclass
class EngineStats:
    """Counters for /metrics and the benchmarks' step-time breakdown."""

    num_steps: int = 0
    num_prefill_steps: int = 0  # EXTEND
    num_decode_steps: int = 0  # DECODE
    num_mixed_steps: int = 0  # MIXED
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_aborted: int = 0
    num_failed: int = 0
    schedule_s: float = 0.0
    device_s: float = 0.0
    prefill_device_s: float = 0.0
    decode_device_s: float = 0.0
    mixed_device_s: float = 0.0
    postprocess_s: float = 0.0
    mask_s: float = 0.0  # host time filling structured-output token masks (in postprocess_s)
    busy_slot_steps: int = 0  # sum over decode/mixed steps of slots doing useful work
    total_slot_steps: int = 0
    # (mode, slot owners) per step: mode is "prefill" (EXTEND), "decode" or "mixed"
    trace: list[tuple[str, tuple[str | None, ...]]] | None = None
    step_times: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=10_000)  # the latest steps only
    )


class Engine:
    def __init__(
        self, cfg: EngineConfig, model_cfg: ModelConfig, tokenizer: Decoder, runner: StepRunner
    ):
        platform = getattr(runner, "platform", "cpu")
        cfg = replace(cfg, scheduler=resolve_for_platform(cfg.scheduler, platform))
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.tokenizer = tokenizer
        self.runner = runner
        # Data parallel: dp groups of slots, each with cache.num_pages pages of its own.
        pages, dp = cfg.cache.num_pages, cfg.dp
        self.scheduler = Scheduler(
            cfg.scheduler, cfg.cache.page_size, pages * dp, model_cfg.eos_token_ids, dp
        )
        # LoRA: the runner's adapter buffers, served by name (None: LoRA off).
        bank = getattr(runner, "lora_bank", None)
        self.lora = None if bank is None else LoraServing(bank, model_cfg, cfg.max_lora_rank)
        self.builder = BatchBuilder(
            cfg.scheduler, cfg.cache.page_size, dp, pages, lora=self.lora is not None
        )
        self.requests: dict[str, Request] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._rng = np.random.default_rng(cfg.seed)
        self.stats = EngineStats()
        # Structured output: compiled grammars (the server compiles, i.e. validates, each
        # request's on its own threads) and the running requests' matchers and token masks.
        self.grammars = GrammarCache(
            lambda: tokenizer.backend.to_str(),  # type: ignore[attr-defined]
            model_cfg.vocab_size,
            model_cfg.eos_token_ids,
        )
        self._masks: TokenMasks | None = None  # built with the first constrained request

    @classmethod
    def from_config(cls, cfg: EngineConfig, warmup: bool = True) -> Engine:
        from jaxserve.memory import size_kv_cache
        from jaxserve.runner import Runner
        from jaxserve.weights import load_model

        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else None
        # On a mesh, weights are read per device slice as they are placed (sharding.py).
        loaded = load_model(cfg.model, cache_dir, lazy=cfg.tp * cfg.dp > 1)
        cfg = size_kv_cache(cfg, loaded.config, loaded.params)  # num_pages = 0: from memory
        engine = cls(
            cfg, loaded.config, loaded.tokenizer, Runner(loaded.config, loaded.params, cfg)
        )
        for spec in cfg.lora_modules:  # --lora NAME=PATH: served from the start
            name, path = parse_lora_module(spec)
            assert engine.lora is not None  # lora_modules turn LoRA on
            engine.lora.load(name, path)
        if warmup:
            engine.warmup()
        return engine

    def warmup(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Compile every prefill and decode bucket on all-padding batches.

        `progress(done, total)` is called after each compiled function.
        """
        pairs = self.builder.warmup_batches()
        total = len(pairs) + 1
        for done, (decode, prefill) in enumerate(pairs, 1):
            self.runner.run(decode, prefill)
            if progress is not None:
                progress(done, total)
        self.runner.permute_slots(np.arange(len(self.scheduler.slots)))
        if self.lora is not None:  # the adapter buffer write, so loading never compiles
            self.lora.bank.warmup()
        if progress is not None:
            progress(total, total)

    @property
    def num_step_functions(self) -> int:
        """Compiled functions of this config: step buckets of every mode + the slot permute
        (+ the LoRA buffer write)."""
        return len(self.builder.warmup_batches()) + 1 + (self.lora is not None)

    # ---- requests ----------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> Request:
        if request_id in self.requests:
            raise InvalidRequestError(f"duplicate request_id {request_id!r}", param="request_id")
        if not prompt_token_ids:
            raise InvalidRequestError("prompt is empty", param="prompt")
        # Length first: the id scan below costs time in the prompt's length.
        max_len = self.cfg.scheduler.max_model_len
        if len(prompt_token_ids) >= max_len:
            raise ContextLengthError(
                f"prompt has {len(prompt_token_ids)} tokens; max_model_len is {max_len}", "prompt"
            )
        vocab = self.model_cfg.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt token id {bad} not in [0, {vocab})", "prompt")
        sched = self.cfg.scheduler
        if not sched.chunked_prefill and len(prompt_token_ids) > sched.max_prefill_tokens:
            raise ContextLengthError(
                f"prompt has {len(prompt_token_ids)} tokens; without chunked prefill at most "
                f"max_prefill_tokens={sched.max_prefill_tokens} fit one step",
                "prompt",
            )
        params.validate(vocab)
        if len(self.scheduler.waiting) >= self.cfg.scheduler.max_waiting:
            raise QueueFullError(f"{len(self.scheduler.waiting)} requests already waiting")
        adapter = None
        if params.lora is not None:  # held until the request ends (its slot stays its own)
            if self.lora is None:
                raise LoraNotFoundError(f"LoRA adapter {params.lora!r} is not loaded (LoRA off)")
            adapter = self.lora.acquire(request_id, params.lora)
        if params.grammar is not None:  # compiled already when the server validated it
            if self._masks is None:
                self._masks = TokenMasks(self.grammars, len(self.scheduler.slots))
            self._masks.add(request_id, params.grammar)
        seed = params.seed if params.seed is not None else int(self._rng.integers(2**63))
        req = Request(request_id, list(prompt_token_ids), params, seed=seed)
        if adapter is not None:
            req.lora_slot, req.cache_salt = adapter.slot, adapter.cache_salt
        self.requests[request_id] = req
        self._detok[request_id] = IncrementalDetokenizer(
            self.tokenizer, params.stop, params.skip_special_tokens
        )
        self.scheduler.add(req)
        return req

    def abort(self, request_id: str) -> bool:
        """Free the request's slot and pages now; False if it is unknown or already done."""
        req = self.requests.pop(request_id, None)
        self._detok.pop(request_id, None)
        if self.lora is not None:
            self.lora.release(request_id)
        if self._masks is not None:
            self._masks.remove(request_id)
        if req is None or req.finished:
            return False
        self.scheduler.finish(req, FinishReason.ABORT)
        self.stats.num_aborted += 1
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- the loop ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        if plan.is_idle:
            return []
        t1 = time.perf_counter()
        try:
            result, width = self._run(plan)
        except Exception as exc:  # noqa: BLE001 - the step's requests fail, the engine lives
            return self._fail(plan, exc)
        # Result rows: the decode part's slots, then one per prefill sequence (per dp group).
        rows_of_chunks, rows_of_decodes = self.builder.result_rows(plan, width)
        chunk_rows = list(zip(rows_of_chunks, plan.prefill, strict=True))
        decode_rows = list(zip(rows_of_decodes, plan.decode, strict=True))
        tokens = result.tokens[[i for i, _ in chunk_rows] + [i for i, _ in decode_rows]]
        rows = [(i, c.request) for i, c in chunk_rows if c.is_last] + decode_rows
        self.scheduler.update(plan, tokens.tolist())
        outputs = self._emit(rows, result)
        t2 = time.perf_counter()
        s = self.stats
        s.num_steps += 1
        s.schedule_s += t1 - t0
        s.device_s += result.device_s
        mode = plan.mode
        if mode is ForwardMode.EXTEND:
            s.prefill_device_s += result.device_s
        elif mode is ForwardMode.DECODE:
            s.decode_device_s += result.device_s
        else:
            s.mixed_device_s += result.device_s
        s.postprocess_s += t2 - t1 - result.device_s
        s.step_times.append(t2 - t0)
        return outputs

    def _run(self, plan: StepPlan) -> tuple[StepResult, int]:
        """Run the plan's step; returns the result and the width of its decode part."""
        s = self.stats
        mode = plan.mode
        if s.trace is not None:
            owners = tuple(r.request_id if r else None for r in self.scheduler.slots)
            s.trace.append(("prefill" if mode is ForwardMode.EXTEND else mode.value, owners))
        if plan.slot_moves:
            perm = np.arange(len(self.scheduler.slots))
            for src, dst in plan.slot_moves:  # new slot dst takes the state of slot src
                perm[dst], perm[src] = src, dst
            self.runner.permute_slots(perm)
        decode = prefill = None
        if plan.prefill:
            s.prompt_tokens += sum(c.length for c in plan.prefill)
            for c in plan.prefill:  # for usage; released pages reset num_cached at the finish
                if c.is_first and c.request.num_retractions == 0:
                    c.request.num_cached_prompt = c.request.num_cached
            prefill = self.builder.prefill(plan.prefill)
        if plan.decode:
            s.busy_slot_steps += len(plan.decode)
            s.total_slot_steps += len(self.scheduler.slots)
            decode = self.builder.decode(plan.decode)
        s.num_prefill_steps += mode is ForwardMode.EXTEND
        s.num_decode_steps += mode is ForwardMode.DECODE
        s.num_mixed_steps += mode is ForwardMode.MIXED
        width = 0 if decode is None else len(decode.positions)
        if self._masks is None or not len(self._masks):
            return self.runner.run(decode, prefill), width
        # Masks for the rows sampled this step, from the tokens the last step sampled: the
        # step is one program (forward + sampling), so they are filled before it starts.
        t0 = time.perf_counter()
        sampled = [c.request for c in plan.prefill if c.is_last] + plan.decode
        allowed = self._masks.fill([(r.slot, r.request_id) for r in sampled])  # type: ignore[misc]
        s.mask_s += time.perf_counter() - t0
        if allowed is None:
            return self.runner.run(decode, prefill), width
        return self.runner.run(decode, prefill, allowed), width

    def _emit(self, rows: list[tuple[int, Request]], result: StepResult) -> list[RequestOutput]:
        """Detokenize each row's new token, apply stop strings, build the deltas."""
        outputs = []
        now = time.monotonic()
        for row, req in rows:
            if req.request_id not in self.requests:
                continue
            token = req.output_token_ids[-1]
            self.stats.generation_tokens += 1
            req.first_token_time = req.first_token_time or now
            detok = self._detok[req.request_id]
            detok.add(token)
            if detok.stopped and not req.finished:
                self.scheduler.finish(req, FinishReason.STOP)
            elif detok.stopped and req.finish_reason is FinishReason.LENGTH:
                req.finish_reason = FinishReason.STOP  # completed on the last allowed token
            # A complete structured output stops at once (no EOS step needed).
            if self._masks is not None and self._masks.advance(req.request_id, token):
                if not req.finished:
                    self.scheduler.finish(req, FinishReason.STOP)
            logprobs = None
            if req.params.logprobs is not None:
                k = req.params.logprobs
                top = tuple(
                    zip(
                        result.top_ids[row, :k].tolist(),
                        result.top_logprobs[row, :k].tolist(),
                        strict=True,
                    )
                )
                logprobs = [TokenLogprob(token, float(result.logprobs[row]), top)]
            outputs.append(self._output(req, [token], detok.take(req.finished), logprobs))
        return outputs

    def _output(
        self,
        req: Request,
        new_ids: list[int],
        text: str,
        logprobs: list[TokenLogprob] | None = None,
        error: str | None = None,
    ) -> RequestOutput:
        if req.finished:
            self.requests.pop(req.request_id, None)
            self._detok.pop(req.request_id, None)
            if self.lora is not None:
                self.lora.release(req.request_id)
            if self._masks is not None:
                self._masks.remove(req.request_id)
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=new_ids,
            new_text=text,
            finished=req.finished,
            finish_reason=req.finish_reason,
            num_prompt_tokens=len(req.prompt_token_ids),
            num_output_tokens=len(req.output_token_ids),
            logprobs=logprobs,
            error=error,
            num_cached_tokens=req.num_cached_prompt,
        )

    def _fail(self, plan: StepPlan, exc: Exception) -> list[RequestOutput]:
        """Fail the step's requests; recompute the others if the device state was lost."""
        victims = [c.request for c in plan.prefill] + plan.decode
        outputs = []
        for req in victims:
            if not req.finished:
                self.scheduler.finish(req, FinishReason.ERROR)
            self.stats.num_failed += 1
            outputs.append(self._output(req, [], "", error=f"{type(exc).__name__}: {exc}"))
        reset = getattr(self.runner, "reset_if_invalid", None)
        if reset is not None and reset():  # the KV cache is gone: nothing cached is valid
            for req in self.scheduler.running:
                self.scheduler.retract(req, cache=False)
            if self.scheduler.prefix_cache is not None:
                self.scheduler.prefix_cache.clear()
        return outputs

    def num_running(self) -> int:
        return sum(r is not None for r in self.scheduler.slots)
