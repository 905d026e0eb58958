"""OpenAI request fields -> prompt token ids and engine `SamplingParams`, with the checks
that need the serving limits (model name, n, stops, prompt sizes, context length).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request
from pydantic import BaseModel

from jaxserve.config import ServerConfig
from jaxserve.errors import ContextLengthError, InvalidRequestError
from jaxserve.request import GrammarSpec, SamplingParams
from jaxserve.server.body_shape import check_body
from jaxserve.server.errors import APIError
from jaxserve.server.protocol import ChatMessage, SamplingFields

if TYPE_CHECKING:
    from jaxserve.weights import Tokenizer

M = TypeVar("M", bound=BaseModel)
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: the server's limits, the engine's context and queue."""

    model_names: tuple[str, ...]
    max_model_len: int
    max_waiting: int  # a request with more choices than this could never be queued
    server: ServerConfig
    lora_names: tuple[str, ...] = ()  # LoRA adapters served now; a request's model picks one


# OpenAI fields this server does not implement: named as such rather than "unrecognized".
UNSUPPORTED_FIELDS = frozenset(
    {
        "logit_bias",
        "functions",
        "function_call",
        "best_of",
        "audio",
        "modalities",
        "prediction",
        "reasoning_effort",
        "web_search_options",
        "service_tier",
    }
)


def check_unknown_fields(req: SamplingFields) -> None:
    """A field the server would otherwise ignore is a 400 naming it (as OpenAI answers); null,
    empty and false values mean "not asked for" and pass."""
    for key, value in (req.model_extra or {}).items():
        if value is None or value is False or value == {} or value == []:
            continue
        what = "is not supported by this server" if key in UNSUPPORTED_FIELDS else "is unknown"
        raise InvalidRequestError(f"the request field {key!r} {what}", param=key)


def check_request(req: SamplingFields, limits: Limits, num_prompts: int = 1) -> None:
    """Everything knowable before tokenizing; runs before any work, so 400 comes before 429."""
    check_unknown_fields(req)
    s = limits.server
    if req.model is not None and req.model not in (*limits.model_names, *limits.lora_names):
        raise APIError(
            404,
            f"the model {req.model!r} does not exist; this server serves "
            f"{', '.join(map(repr, (*limits.model_names, *limits.lora_names)))}",
            param="model",
            code="model_not_found",
        )
    if not 1 <= req.n <= s.max_n:
        raise InvalidRequestError(f"n={req.n} must be in [1, {s.max_n}] (max_n)", param="n")
    choices = req.n * num_prompts
    if choices > s.max_choices_per_request:
        raise InvalidRequestError(
            f"{num_prompts} prompts x n={req.n} exceeds {s.max_choices_per_request} choices "
            "(max_choices_per_request)",
            param="n",
        )
    if choices > limits.max_waiting:  # a 429 would be retried forever
        raise InvalidRequestError(
            f"{num_prompts} prompts x n={req.n} is more than the {limits.max_waiting} requests "
            "the server ever queues (max_waiting)",
            param="n",
        )
    stops = stop_strings(req)
    if len(stops) > s.max_stop_strings:
        raise InvalidRequestError(
            f"{len(stops)} stop strings; at most {s.max_stop_strings}", param="stop"
        )
    longest = max(map(len, stops), default=0)
    if longest > s.max_stop_string_chars:
        raise InvalidRequestError(
            f"a stop string of {longest} characters; at most {s.max_stop_string_chars} "
            "(max_stop_string_chars)",
            param="stop",
        )
    if req.stream_options is not None and not req.stream:
        raise InvalidRequestError("stream_options needs stream=true", param="stream_options")


def stop_strings(req: SamplingFields) -> tuple[str, ...]:
    if req.stop is None:
        return ()
    return (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)


def sampling_params(
    req: SamplingFields,
    prompt_len: int,
    max_tokens: int | None,
    default_max_tokens: int | None,
    logprobs: int | None,
    limits: Limits,
    grammar: GrammarSpec | None = None,
) -> SamplingParams:
    """One prompt's params; `default_max_tokens=None` means up to the context length."""
    room = limits.max_model_len - prompt_len  # tokens left for the completion
    if max_tokens is None:
        max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
        max_tokens = max(max_tokens, 1)  # a too-long prompt is reported by the engine
    defaults = SamplingParams()
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_pick(req.temperature, defaults.temperature),
        top_p=_pick(req.top_p, defaults.top_p),
        top_k=_pick(req.top_k, defaults.top_k),
        min_p=_pick(req.min_p, defaults.min_p),
        repetition_penalty=_pick(req.repetition_penalty, defaults.repetition_penalty),
        presence_penalty=_pick(req.presence_penalty, defaults.presence_penalty),
        frequency_penalty=_pick(req.frequency_penalty, defaults.frequency_penalty),
        seed=req.seed,
        stop=stop_strings(req),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens,
        grammar=grammar,
        lora=req.model if req.model in limits.lora_names else None,
    )
    params.validate()
    if 0 < room < max_tokens:
        raise ContextLengthError(
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context "
            f"length of {limits.max_model_len} tokens; shorten the prompt or lower max_tokens",
            param="max_tokens",
        )
    return params


def per_choice(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n choices of one prompt; with a seed, choice i uses seed + i (different, reproducible)."""
    if params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=params.seed + i) for i in range(n)]


def _pick(value, default):
    return default if value is None else value


# ---- prompts -----------------------------------------------------------------------------
def check_prompt_size(prompt: Any, limits: Limits) -> None:
    """Counts on the raw JSON `prompt`, before pydantic walks a list of maybe millions of ids.

    Only the first element decides the shape (as `num_prompts` does); pydantic then rejects
    mixed lists, so whatever passes both was counted exactly.
    """
    s = limits.server
    if isinstance(prompt, str):
        _check_chars(len(prompt), s, "prompt")
        return
    if not isinstance(prompt, list) or not prompt:
        return  # pydantic or `completion_prompts` names the problem
    if isinstance(prompt[0], int):  # one prompt of token ids
        _check_tokens(len(prompt), s, "prompt")
        return
    if len(prompt) > s.max_prompts_per_request:
        raise InvalidRequestError(
            f"{len(prompt)} prompts in one request; at most {s.max_prompts_per_request} "
            "(max_prompts_per_request)",
            param="prompt",
        )
    _check_chars(sum(len(p) for p in prompt if isinstance(p, str)), s, "prompt")
    _check_tokens(sum(len(p) for p in prompt if isinstance(p, list)), s, "prompt")


def _check_chars(num_chars: int, s: ServerConfig, param: str) -> None:
    if num_chars > s.max_prompt_chars:
        raise InvalidRequestError(
            f"{param} has {num_chars} characters; at most {s.max_prompt_chars} (max_prompt_chars)",
            param=param,
        )


def _check_tokens(num_tokens: int, s: ServerConfig, param: str) -> None:
    if num_tokens > s.max_prompt_tokens:
        raise InvalidRequestError(
            f"{param} has {num_tokens} tokens; at most {s.max_prompt_tokens} in one request "
            "(max_prompt_tokens)",
            param=param,
        )


def encode(
    tokenizer: Tokenizer, text: str, param: str, add_special_tokens: bool = False
) -> list[int]:
    """`add_special_tokens`: the model's BOS for plain text (completions, as vLLM and HF do);
    a rendered chat template writes its own."""
    try:
        text.encode("utf-8")  # lone surrogates from JSON escapes such as "\ud800" fail here
    except UnicodeError as exc:
        raise InvalidRequestError(f"{param} is not valid Unicode: {exc}", param=param) from exc
    # Same ids as `tokenizer.encode`, but the batch call releases the GIL while it runs, so
    # the event loop keeps serving during a long prompt (`encode` holds it throughout).
    return tokenizer.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids


def completion_prompts(prompt: str | list, tokenizer: Tokenizer, limits: Limits) -> list[list[int]]:
    """A string, strings, token ids or lists of token ids -> one token list per prompt.

    Tokenizes: call it off the event loop (`Offload.run`).
    """
    if isinstance(prompt, str):
        prompts = [encode(tokenizer, prompt, "prompt", add_special_tokens=True)]
    elif not prompt:
        raise InvalidRequestError("prompt is empty", param="prompt")
    elif isinstance(prompt[0], str):
        prompts = [encode(tokenizer, p, "prompt", add_special_tokens=True) for p in prompt]
    elif isinstance(prompt[0], int):
        prompts = [list(prompt)]
    else:
        prompts = [list(p) for p in prompt]
    for i, ids in enumerate(prompts):
        if not ids:
            which = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            raise InvalidRequestError(f"{which} is empty (no tokens)", param="prompt")
    _check_tokens(sum(map(len, prompts)), limits.server, "prompt")
    return prompts


def message_chars(messages: list[ChatMessage]) -> int:
    total = 0
    for m in messages:
        if isinstance(m.content, str):
            total += len(m.content)
        elif m.content is not None:
            total += sum(len(part.text) for part in m.content)
    return total


def chat_prompt(
    messages: list[ChatMessage],
    tokenizer: Tokenizer,
    limits: Limits,
    tools: list[dict] | None = None,
) -> list[int]:
    """Render the model's chat template (with the assistant turn opened) and tokenize it.

    Renders and tokenizes: call it off the event loop (`Offload.run`).
    """
    if not messages:
        raise InvalidRequestError("messages must not be empty", param="messages")
    _check_chars(message_chars(messages), limits.server, "messages")
    rendered = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        rendered.append({**(m.model_extra or {}), "role": m.role, "content": content or ""})
    text = tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tools=tools)
    # Extra message fields reach the template too: bound what the tokenizer gets.
    _check_chars(len(text), limits.server, "messages")
    return encode(tokenizer, text, "messages")


def num_prompts(prompt: str | list) -> int:
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return 1
    return len(prompt)


# ---- the body ----------------------------------------------------------------------------
def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request) -> dict[str, Any]:
    """Strict UTF-8, strict JSON (no NaN), and an object."""
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(
            400, f"request body is not valid UTF-8 (at byte {exc.start})", code="invalid_encoding"
        ) from exc
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:  # JSONDecodeError is a ValueError
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise APIError(
            400,
            f"request body must be a JSON object, not {type(data).__name__}",
            code="invalid_json",
        )
    return data


async def parse_body(request: Request, model: type[M]) -> M:
    """`read_json`, then the pydantic model (400 on types, as OpenAI answers)."""
    body = await read_json(request)
    check_body(body)  # lists pydantic would take seconds over
    return model.model_validate(body)
