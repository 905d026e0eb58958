"""Offline API: `LLM(model).generate(prompts, params)` and `.chat(messages, params)`.

Runs the engine loop in the caller's thread until every submitted request has finished.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from jaxserve.config import EngineConfig, load_config, replace
from jaxserve.engine import Engine
from jaxserve.request import FinishReason, SamplingParams, TokenLogprob

Message = dict[str, str]


@dataclass
class GenerationOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_s(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


class LLM:
    """A warmed engine plus a blocking generate loop."""

    def __init__(
        self,
        model: str = "smollm2-135m",
        config: EngineConfig | str | Path | None = None,
        engine: Engine | None = None,
        **overrides,
    ):
        if engine is None:
            cfg = config if isinstance(config, EngineConfig) else load_config(config)
            cfg = replace(cfg, model=model, **overrides)
            engine = Engine.from_config(cfg)
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[GenerationOutput]:
        """Prompts are strings or token-id lists; outputs come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        token_lists = [
            self.tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else list(p)
            for p in prompts
        ]
        return self.generate_tokens(token_lists, params)

    def chat(
        self,
        conversations: Sequence[Message] | Sequence[Sequence[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[GenerationOutput]:
        """One conversation (a list of messages) or several; renders the model's template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        # The template writes any BOS itself, so no special tokens are added on encoding.
        prompts = [
            self.tokenizer.encode(self.tokenizer.apply_chat_template(list(c)))
            for c in conversations
        ]
        return self.generate_tokens(prompts, params)

    def generate_tokens(
        self,
        token_lists: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[GenerationOutput]:
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(token_lists)
        if len(params) != len(token_lists):
            raise ValueError(f"{len(params)} SamplingParams for {len(token_lists)} prompts")
        results: dict[str, GenerationOutput] = {}
        order = []
        try:
            for ids, p in zip(token_lists, params, strict=True):
                rid = f"llm-{next(self._ids)}"
                req = self.engine.add_request(rid, list(ids), p)
                results[rid] = GenerationOutput(rid, list(ids), arrival_time=req.arrival_time)
                order.append(rid)
            pending = set(order)
            while pending:
                for out in self.engine.step():
                    res = results.get(out.request_id)
                    if res is None:
                        continue
                    res.token_ids += out.new_token_ids
                    res.text += out.new_text
                    if out.logprobs is not None:
                        res.logprobs = (res.logprobs or []) + out.logprobs
                    if res.first_token_time is None and out.new_token_ids:
                        res.first_token_time = time.monotonic()
                    if out.finished:
                        res.finish_reason, res.error = out.finish_reason, out.error
                        res.finish_time = time.monotonic()
                        pending.discard(out.request_id)
        finally:
            for rid in order:  # on any error, nothing keeps running
                self.engine.abort(rid)
        return [results[rid] for rid in order]
