"""Requests, their sampling parameters, lifecycle states and the outputs the engine emits.

Plain Python, no jax: the scheduler and the server both use these types.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Literal

from jaxserve.errors import InvalidRequestError

MAX_TOP_LOGPROBS = 20

GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "lark"]


@dataclass(frozen=True)
class GrammarSpec:
    """What a constrained request's output must match; hashable, the grammar cache's key.

    `source` is the schema as JSON text (json_schema), a regex, a Lark grammar, or the choices
    as a JSON list of strings (choice); empty for json_object.
    """

    kind: GrammarKind
    source: str = ""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling and stopping settings (OpenAI / vLLM semantics)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF style, over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI style, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None  # same seed -> same output, whatever else runs
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; k = chosen token + top-k alternatives
    skip_special_tokens: bool = True
    grammar: GrammarSpec | None = None  # structured output: tokens outside it are masked
    lora: str | None = None  # LoRA adapter name (the request's "model"); None = base model

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidRequestError naming the first bad field."""
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be in [0, 100]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k == -1 or self.top_k >= 0, "must be -1 (off) or >= 0"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "must be in (0, 10]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            (
                "logprobs",
                self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
                f"must be in [0, {MAX_TOP_LOGPROBS}]",
            ),
            ("seed", self.seed is None or 0 <= self.seed < 2**63, "must be in [0, 2**63)"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
        ]
        if vocab_size is not None:
            ok = all(0 <= t < vocab_size for t in self.stop_token_ids)
            checks.append(("stop_token_ids", ok, f"must be token ids in [0, {vocab_size})"))
        for name, ok, why in checks:
            if not ok:
                raise InvalidRequestError(f"{name}={getattr(self, name)!r} {why}", param=name)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


class RequestState(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"  # admitted; some prompt chunks still to run
    DECODING = "decoding"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, stop token or stop string
    LENGTH = "length"  # max_tokens or context length
    ABORT = "abort"  # client went away or shutdown
    ERROR = "error"  # a step failed


@dataclass
class Request:
    """One generation request as the scheduler tracks it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    state: RequestState = RequestState.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in this request's pages
    num_cached: int = 0  # of those, how many came from the prefix cache
    num_cached_prompt: int = 0  # prompt tokens the prefix cache served at first admission
    finish_reason: FinishReason | None = None
    num_retractions: int = 0
    first_token_time: float | None = None
    seed: int = 0  # the effective seed (drawn by the engine when params.seed is None)
    lora_slot: int = 0  # LoRA buffer slot of its adapter (0 = none), set by the engine
    cache_salt: bytes = b""  # prefix-cache namespace: its adapter's load (b"" = base model)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.state is RequestState.FINISHED


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob), best first


@dataclass(frozen=True)
class RequestOutput:
    """What one engine step produced for one request (a delta, for streaming)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (usage)
