"""`POST /v1/chat/completions`: messages rendered with the model's chat template.

Streams open each choice with a role chunk, then content deltas, then the finish reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import Response

from jaxserve.errors import InvalidRequestError
from jaxserve.server.bridge import Bridge
from jaxserve.server.errors import CLIENT_GONE
from jaxserve.server.generation import EventStream, Generation, sse, sse_error
from jaxserve.server.logprobs import chat_logprobs
from jaxserve.server.offload import Offload
from jaxserve.server.params import (
    Limits,
    chat_prompt,
    check_request,
    parse_body,
    per_choice,
    sampling_params,
)
from jaxserve.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaMessage,
    random_id,
)

if TYPE_CHECKING:
    from jaxserve.weights import Tokenizer


async def create_chat_completion(
    request: Request, bridge: Bridge, limits: Limits, offload: Offload
) -> Response:
    body = await parse_body(request, ChatCompletionRequest)
    check_request(body, limits)
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs=true", param="top_logprobs")
    num_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    assert bridge.engine is not None
    tokenizer = bridge.engine.tokenizer
    prompt_ids = await offload.run(chat_prompt, body.messages, tokenizer, limits)
    max_tokens = (
        body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    )
    params = sampling_params(body, len(prompt_ids), max_tokens, None, num_logprobs, limits)
    gen = Generation(
        bridge, random_id("chatcmpl"), [(0, prompt_ids, p) for p in per_choice(params, body.n)]
    )
    await gen.start()
    model = limits.model_names[0]
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return EventStream(_stream(gen, model, tokenizer, body.logprobs, usage), on_close=gen.close)
    if not await gen.collect(request):
        return Response(status_code=CLIENT_GONE)
    if (err := gen.first_error()) is not None:
        raise err
    content = await offload.run(_response_json, gen, model, tokenizer, body.logprobs)
    return Response(content, media_type="application/json")


def _response_json(gen: Generation, model: str, tokenizer: Tokenizer, logprobs: bool) -> str:
    """The whole response; off the event loop, as logprobs decode a token per entry."""
    response = ChatCompletionResponse(
        id=gen.id,
        model=model,
        usage=gen.usage(),
        choices=[
            ChatChoice(
                index=c.index,
                message=AssistantMessage(content=c.text),
                finish_reason=c.finish_reason,
                logprobs=chat_logprobs(tokenizer, c.logprobs) if logprobs else None,
            )
            for c in gen.choices
        ],
    )
    return response.model_dump_json()


async def _stream(
    gen: Generation, model: str, tokenizer: Tokenizer, with_logprobs: bool, include_usage: bool
) -> AsyncIterator[str]:
    def chunk(*choices: ChatChunkChoice) -> str:
        return sse(
            ChatCompletionChunk(id=gen.id, model=model, choices=list(choices)).model_dump_json()
        )

    for c in gen.choices:
        yield chunk(
            ChatChunkChoice(index=c.index, delta=DeltaMessage(role="assistant", content=""))
        )
    async for choice, out in gen.events():
        if choice.error is not None:
            yield sse_error(choice.error)
            break
        if not (out.new_text or out.finished or out.logprobs):
            continue  # text held back (a possible stop string): nothing to send yet
        logprobs = chat_logprobs(tokenizer, out.logprobs or []) if with_logprobs else None
        yield chunk(
            ChatChunkChoice(
                index=choice.index,
                delta=DeltaMessage(content=out.new_text),
                logprobs=logprobs,
                finish_reason=choice.finish_reason,
            )
        )
    else:
        if include_usage:
            yield sse(
                ChatCompletionChunk(
                    id=gen.id, model=model, choices=[], usage=gen.usage()
                ).model_dump_json()
            )
    yield sse("[DONE]")
