"""`POST /v1/chat/completions`: messages rendered with the model's chat template.

Streams open each choice with a role chunk (with its first output), then content (or
tool-call) deltas, then the finish reason. Structured output and tool calls:
`constraints.py`, `tools.py`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import Response

from jaxserve.errors import InvalidRequestError
from jaxserve.request import GrammarSpec
from jaxserve.server.bridge import Bridge
from jaxserve.server.constraints import compile_grammar, grammar_spec
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
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    ToolCall,
    call_id,
    random_id,
)
from jaxserve.server.tools import ToolPlan, parse_tool_calls, plan_tools, tool_schemas

if TYPE_CHECKING:
    from jaxserve.structured import GrammarCache
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
    tools = plan_tools(body, tokenizer.chat_template)
    grammar = await offload.run(_grammar, body, tools, bridge.engine.grammars)
    prompt_ids = await offload.run(
        chat_prompt, body.messages, tokenizer, limits, tools.template_tools()
    )
    max_tokens = (
        body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    )
    params = sampling_params(body, len(prompt_ids), max_tokens, None, num_logprobs, limits, grammar)
    gen = Generation(
        bridge, random_id("chatcmpl"), [(0, prompt_ids, p) for p in per_choice(params, body.n)]
    )
    await gen.start()
    model = body.model if body.model in limits.lora_names else limits.model_names[0]
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        stream = _stream(gen, model, tokenizer, body.logprobs, usage, tools)
        return EventStream(stream, on_close=gen.close)
    if not await gen.collect(request):
        return Response(status_code=CLIENT_GONE)
    if (err := gen.first_error()) is not None:
        raise err
    content = await offload.run(_response_json, gen, model, tokenizer, body.logprobs, tools)
    return Response(content, media_type="application/json")


def _grammar(
    body: ChatCompletionRequest, tools: ToolPlan, grammars: GrammarCache
) -> GrammarSpec | None:
    """The request's constraint, compiled (so a bad one is a 400 before any engine work),
    and every tool's parameters schema checked the same way. Compiles: off the event loop."""
    for spec in tool_schemas(tools):
        compile_grammar(grammars, spec, "tools")
    found = grammar_spec(body)
    if found is not None and tools.constrained:
        raise InvalidRequestError(
            f"{found[1]} cannot be combined with tool_choice=required or a named function",
            found[1],
        )
    if tools.grammar is not None:
        return compile_grammar(grammars, tools.grammar, "tools")
    return None if found is None else compile_grammar(grammars, *found)


def _message(
    text: str, finish_reason: str | None, tools: ToolPlan
) -> tuple[AssistantMessage, str | None]:
    """A finished choice's message: tool calls when the output holds them."""
    if tools.mode == "none" or (tools.constrained and finish_reason != "stop"):
        return AssistantMessage(content=text), finish_reason
    content, calls = parse_tool_calls(tools, text)
    if not calls:
        return AssistantMessage(content=text), finish_reason
    return AssistantMessage(content=content, tool_calls=calls), "tool_calls"


def _response_json(
    gen: Generation, model: str, tokenizer: Tokenizer, logprobs: bool, tools: ToolPlan
) -> str:
    """The whole response; off the event loop, as logprobs decode a token per entry."""
    choices = []
    for c in gen.choices:
        message, finish_reason = _message(c.text, c.finish_reason, tools)
        choices.append(
            ChatChoice(
                index=c.index,
                message=message,
                finish_reason=finish_reason,
                logprobs=chat_logprobs(tokenizer, c.logprobs) if logprobs else None,
            )
        )
    response = ChatCompletionResponse(
        id=gen.id, created=gen.created, model=model, usage=gen.usage(), choices=choices
    )
    return response.model_dump_json()


def _tool_deltas(calls: list[ToolCall]) -> list[DeltaToolCall]:
    return [
        DeltaToolCall(
            index=i,
            id=call.id,
            type="function",
            function=DeltaFunctionCall(name=call.function.name, arguments=call.function.arguments),
        )
        for i, call in enumerate(calls)
    ]


async def _stream(
    gen: Generation,
    model: str,
    tokenizer: Tokenizer,
    with_logprobs: bool,
    include_usage: bool,
    tools: ToolPlan,
) -> AsyncIterator[str]:
    """A named function streams its arguments as they come; `required` (and `auto` with a
    template that takes tools) holds the output back and sends the parsed calls at the end."""

    def chunk(*choices: ChatChunkChoice) -> str:
        return sse(
            ChatCompletionChunk(
                id=gen.id, created=gen.created, model=model, choices=list(choices)
            ).model_dump_json()
        )

    named_started: set[int] = set()  # choices whose tool call header went out
    # A choice's role chunk goes out with its first output, as vLLM and SGLang send it: a
    # client timing the first chunk then measures the first token, not the acceptance.
    opened: set[int] = set()
    async for choice, out in gen.events():
        if choice.error is not None:
            yield sse_error(choice.error)
            break
        if choice.index not in opened:
            opened.add(choice.index)
            yield chunk(
                ChatChunkChoice(
                    index=choice.index, delta=DeltaMessage(role="assistant", content="")
                )
            )
        if not (out.new_text or out.finished or out.logprobs):
            continue  # text held back (a possible stop string): nothing to send yet
        logprobs = chat_logprobs(tokenizer, out.logprobs or []) if with_logprobs else None
        delta, finish_reason = DeltaMessage(content=out.new_text), choice.finish_reason
        if tools.mode == "named":
            call = DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=out.new_text))
            if choice.index not in named_started:  # the first delta names the call
                named_started.add(choice.index)
                call.id, call.type, call.function.name = call_id(), "function", tools.name
            delta = DeltaMessage(tool_calls=[call])
            if finish_reason == "stop":
                finish_reason = "tool_calls"
        elif tools.parses_output:
            if not out.finished:
                continue  # held back until the calls can be parsed
            message, finish_reason = _message(choice.text, finish_reason, tools)
            calls = _tool_deltas(message.tool_calls) or None
            delta = DeltaMessage(content=message.content, tool_calls=calls)
        yield chunk(
            ChatChunkChoice(
                index=choice.index, delta=delta, logprobs=logprobs, finish_reason=finish_reason
            )
        )
    else:
        if include_usage:
            yield sse(
                ChatCompletionChunk(
                    id=gen.id, created=gen.created, model=model, choices=[], usage=gen.usage()
                ).model_dump_json()
            )
    yield sse("[DONE]")
