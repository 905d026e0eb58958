"""`POST /v1/completions`: prompts as text or token ids, n choices each, streamed or not.

Choice i of prompt p has index `p * n + i`, as in OpenAI's API.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import Response

from jaxserve.errors import InvalidRequestError
from jaxserve.server.body_shape import check_body
from jaxserve.server.bridge import Bridge
from jaxserve.server.constraints import compile_grammar, grammar_spec
from jaxserve.server.errors import CLIENT_GONE
from jaxserve.server.generation import EventStream, Generation, sse, sse_error
from jaxserve.server.logprobs import completion_logprobs
from jaxserve.server.offload import Offload
from jaxserve.server.params import (
    COMPLETION_DEFAULT_MAX_TOKENS,
    Limits,
    check_prompt_size,
    check_request,
    completion_prompts,
    num_prompts,
    per_choice,
    read_json,
    sampling_params,
)
from jaxserve.server.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    random_id,
)

if TYPE_CHECKING:
    from jaxserve.weights import Tokenizer


async def create_completion(
    request: Request, bridge: Bridge, limits: Limits, offload: Offload
) -> Response:
    data = await read_json(request)
    check_body(data)  # lists pydantic would take seconds over
    check_prompt_size(data.get("prompt"), limits)
    body = CompletionRequest.model_validate(data)
    check_request(body, limits, num_prompts(body.prompt))
    if body.echo:
        raise InvalidRequestError("echo=true is not supported", param="echo")
    if body.suffix:
        raise InvalidRequestError("suffix is not supported", param="suffix")
    assert bridge.engine is not None
    tokenizer = bridge.engine.tokenizer
    grammar = None
    if (found := grammar_spec(body)) is not None:  # compiled: a bad one is a 400 right here
        grammar = await offload.run(compile_grammar, bridge.engine.grammars, *found)
    choices = []
    prompts = await offload.run(completion_prompts, body.prompt, tokenizer, limits)
    for p, prompt_ids in enumerate(prompts):
        params = sampling_params(
            body,
            len(prompt_ids),
            body.max_tokens,
            COMPLETION_DEFAULT_MAX_TOKENS,
            body.logprobs,
            limits,
            grammar,
        )
        choices += [(p, prompt_ids, choice) for choice in per_choice(params, body.n)]
    gen = Generation(bridge, random_id("cmpl"), choices)
    await gen.start()
    model = body.model if body.model in limits.lora_names else limits.model_names[0]
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return EventStream(_stream(gen, model, tokenizer, body, usage), on_close=gen.close)
    if not await gen.collect(request):
        return Response(status_code=CLIENT_GONE)
    if (err := gen.first_error()) is not None:
        raise err
    content = await offload.run(_response_json, gen, model, tokenizer, body.logprobs)
    return Response(content, media_type="application/json")


def _response_json(gen: Generation, model: str, tokenizer: Tokenizer, logprobs: int | None) -> str:
    """The whole response; off the event loop, as logprobs decode a token per entry."""
    response = CompletionResponse(
        id=gen.id,
        created=gen.created,
        model=model,
        usage=gen.usage(),
        choices=[
            CompletionChoice(
                index=c.index,
                text=c.text,
                finish_reason=c.finish_reason,
                logprobs=None if logprobs is None else completion_logprobs(tokenizer, c.logprobs),
            )
            for c in gen.choices
        ],
    )
    return response.model_dump_json()


async def _stream(
    gen: Generation, model: str, tokenizer: Tokenizer, body: CompletionRequest, include_usage: bool
) -> AsyncIterator[str]:
    offsets = [0] * len(gen.choices)  # characters of each choice already sent
    async for choice, out in gen.events():
        if choice.error is not None:
            yield sse_error(choice.error)
            break
        if not (out.new_text or out.finished or out.logprobs):
            continue  # text held back (a possible stop string): nothing to send yet
        logprobs = None
        if body.logprobs is not None:
            logprobs = completion_logprobs(tokenizer, out.logprobs or [], offsets[choice.index])
        offsets[choice.index] += len(out.new_text)
        chunk = CompletionChunk(
            id=gen.id,
            created=gen.created,
            model=model,
            choices=[
                CompletionChoice(
                    index=choice.index,
                    text=out.new_text,
                    logprobs=logprobs,
                    finish_reason=choice.finish_reason,
                )
            ],
        )
        yield sse(chunk.model_dump_json())
    else:
        if include_usage:
            yield sse(
                CompletionChunk(
                    id=gen.id, created=gen.created, model=model, choices=[], usage=gen.usage()
                ).model_dump_json()
            )
    yield sse("[DONE]")
