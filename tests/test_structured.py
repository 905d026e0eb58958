"""Structured output: packed masks on device, grammars and matchers on the host, the engine and
the HTTP API (response_format, vLLM's structured_outputs / guided_*, tools) end to end.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import httpx
import jax.numpy as jnp
import jsonschema
import llguidance.numpy as llnp
import numpy as np
import openai
import pydantic
import pytest

from jaxserve.config import ServerConfig
from jaxserve.errors import InvalidRequestError
from jaxserve.request import FinishReason, GrammarSpec, SamplingParams
from jaxserve.sampling import apply_token_mask, unpack_token_mask
from jaxserve.server.constraints import grammar_spec
from jaxserve.server.protocol import ChatCompletionRequest, CompletionRequest
from jaxserve.server.tools import parse_tool_calls, plan_tools
from jaxserve.structured import GrammarCache, TokenMasks, mask_words
from tests.http_server import assert_error, serve_engine

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,12}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "maxLength": 30},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "status": {"enum": ["open", "paid", "shipped"]},
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["status", "items"],
    "additionalProperties": False,
}
POINT = {
    "type": "object",
    "properties": {
        "pos": {
            "type": "object",
            "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
            "required": ["x", "y"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 2},
        "ok": {"type": "boolean"},
    },
    "required": ["pos", "ok"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
CHAT = [{"role": "user", "content": "Describe a person as JSON."}]


def spec(schema: dict) -> GrammarSpec:
    return GrammarSpec("json_schema", json.dumps(schema))


# ---- on device: the packed mask ----------------------------------------------------------
def test_unpack_matches_llguidance_numpy_reference():
    rng = np.random.default_rng(0)
    vocab = 77  # not a multiple of 32: the last word's high bits are past the vocab
    words = rng.integers(-(2**31), 2**31, (3, mask_words(vocab)), dtype=np.int64).astype(np.int32)
    logits = rng.normal(size=(3, vocab)).astype(np.float32)
    want = logits.copy()
    llnp.apply_token_bitmask_inplace(want, words)
    got = np.asarray(apply_token_mask(jnp.asarray(logits), jnp.asarray(words)))
    np.testing.assert_array_equal(got, want)
    bits = np.asarray(unpack_token_mask(jnp.asarray(words), vocab))
    np.testing.assert_array_equal(bits, np.isfinite(want))


def test_all_ones_mask_leaves_logits_bit_identical():
    logits = np.random.default_rng(1).normal(size=(4, 100)).astype(np.float32)
    words = np.full((4, mask_words(100)), -1, np.int32)
    out = np.asarray(apply_token_mask(jnp.asarray(logits), jnp.asarray(words)))
    assert out.tobytes() == logits.tobytes()


# ---- on the host: grammars, matchers, request fields -------------------------------------
@pytest.fixture(scope="module")
def grammars(engine) -> GrammarCache:
    return engine.grammars


def test_grammar_cache_compiles_each_spec_once_and_evicts_lru(engine):
    cache = GrammarCache(
        lambda: engine.tokenizer.backend.to_str(), engine.model_cfg.vocab_size, [2], 2
    )
    a, b, c = spec(PERSON), spec(ORDER), GrammarSpec("regex", "[0-9]+")
    assert cache.compile(a) is cache.compile(a)
    assert cache.num_compiled == 1
    cache.compile(b)
    cache.compile(a)  # a is now the most recently used: c evicts b
    cache.compile(c)
    assert cache.num_compiled == 3
    cache.compile(a)
    assert cache.num_compiled == 3
    cache.compile(b)
    assert cache.num_compiled == 4


@pytest.mark.parametrize(
    "bad, why",
    [
        (GrammarSpec("json_schema", '{"type": "strin"}'), "strin"),
        (GrammarSpec("json_schema", "{not json"), "JSON"),
        (GrammarSpec("regex", "(["), "regex"),
        (GrammarSpec("lark", "start: undefined_rule"), "undefined_rule"),
    ],
)
def test_invalid_grammars_raise_with_the_reason(grammars, bad, why):
    with pytest.raises(InvalidRequestError, match=why) as info:
        grammars.compile(bad, "response_format")
    assert info.value.param == "response_format"


def test_token_masks_fill_only_constrained_rows_and_reset_them(engine, grammars):
    masks = TokenMasks(grammars, 4)
    masks.add("r", GrammarSpec("choice", json.dumps(["yes", "no"])))
    bits = masks.fill([(2, "r"), (0, "unconstrained")])
    assert bits is not None and (bits[[0, 1, 3]] == -1).all() and (bits[2] != -1).any()
    allowed = np.flatnonzero(np.asarray(unpack_token_mask(jnp.asarray(bits[2:3]), 49152))[0])
    texts = {engine.tokenizer.decode([int(t)]) for t in allowed}
    assert texts and all("yes".startswith(t) or "no".startswith(t) for t in texts), texts
    assert masks.fill([(0, "unconstrained")]) is None and (masks.bits == -1).all()
    for t in engine.tokenizer.encode("yes")[:-1]:
        assert not masks.advance("r", t)
    assert masks.advance("r", engine.tokenizer.encode("yes")[-1])  # complete: stop now
    masks.remove("r")
    assert len(masks) == 0


def test_request_fields_map_to_one_grammar():
    def chat(**kw) -> ChatCompletionRequest:
        return ChatCompletionRequest(messages=CHAT, **kw)

    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    assert grammar_spec(chat(response_format=fmt)) == (spec_compact(PERSON), "response_format")
    assert grammar_spec(chat(response_format={"type": "json_object"}))[0].kind == "json_object"
    assert grammar_spec(chat(response_format={"type": "text"})) is None
    got = grammar_spec(CompletionRequest(prompt="x", structured_outputs={"regex": "a+"}))
    assert got == (GrammarSpec("regex", "a+"), "structured_outputs.regex")
    assert grammar_spec(chat(guided_choice=["a", "b"]))[0] == GrammarSpec("choice", '["a", "b"]')
    assert grammar_spec(chat(guided_json=json.dumps(PERSON)))[0] == spec_compact(PERSON)
    with pytest.raises(InvalidRequestError, match="only one"):
        grammar_spec(chat(guided_regex="a", response_format={"type": "json_object"}))
    with pytest.raises(InvalidRequestError, match="non-empty"):
        grammar_spec(chat(guided_choice=[]))


def spec_compact(schema: dict) -> GrammarSpec:
    return GrammarSpec("json_schema", json.dumps(schema, separators=(",", ":")))


def test_tool_plans_and_parsing():
    def plan(choice, parallel=True, tools=(WEATHER_TOOL, TIME_TOOL)):
        req = ChatCompletionRequest(
            messages=CHAT, tools=list(tools), tool_choice=choice, parallel_tool_calls=parallel
        )
        return plan_tools(req, template=None)

    required = plan("required", parallel=False)
    schema = json.loads(required.grammar.source)
    assert schema["minItems"] == 1 and schema["maxItems"] == 1
    content, calls = parse_tool_calls(
        required, '[{"name": "get_time", "arguments": {"zone": "UTC"}}]'
    )
    assert content is None and calls[0].function.name == "get_time"
    assert json.loads(calls[0].function.arguments) == {"zone": "UTC"}
    assert calls[0].id.startswith("call_")
    named = plan({"type": "function", "function": {"name": "get_weather"}})
    assert json.loads(named.grammar.source) == WEATHER_TOOL["function"]["parameters"]
    assert plan("auto").grammar is None and plan(None).mode == "auto"
    assert plan("none").template_tools() is None
    with pytest.raises(InvalidRequestError, match="not in tools"):
        plan({"type": "function", "function": {"name": "nope"}})
    with pytest.raises(InvalidRequestError, match="unique"):
        plan("auto", tools=(WEATHER_TOOL, WEATHER_TOOL))
    with pytest.raises(InvalidRequestError, match="needs tools"):
        plan("required", tools=())
    # A template that takes tools: Hermes blocks in auto mode become calls.
    auto = plan_tools(
        ChatCompletionRequest(messages=CHAT, tools=[WEATHER_TOOL]), template="{{ tools }}"
    )
    text = 'ok <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    content, calls = parse_tool_calls(auto, text)
    assert content == "ok" and calls[0].function.name == "get_weather"


# ---- the engine ----------------------------------------------------------------------------
def chat_ids(llm, text: str) -> list[int]:
    return llm.tokenizer.encode(
        llm.tokenizer.apply_chat_template([{"role": "user", "content": text}])
    )


def test_json_schemas_at_temperature_1_always_validate(llm, idle_engine):
    before = llm.engine.runner.num_compiles
    schemas = [PERSON, ORDER, POINT]
    prompts, params = [], []
    for i, schema in enumerate(schemas):
        for k in range(4):
            prompts.append(chat_ids(llm, f"Give me example {k} as JSON."))
            params.append(
                SamplingParams(
                    max_tokens=200, temperature=1.0, seed=10 * i + k, grammar=spec(schema)
                )
            )
    outs = llm.generate_tokens(prompts, params)
    for out, p in zip(outs, params, strict=True):
        assert out.finish_reason is FinishReason.STOP, out.text
        jsonschema.validate(json.loads(out.text), json.loads(p.grammar.source))
    assert llm.engine.runner.num_compiles == before
    assert len(llm.engine._masks) == 0  # every matcher released


def test_regex_and_choice(llm, idle_engine):
    outs = llm.generate_tokens(
        [chat_ids(llm, "Is the sky blue?")] * 2 + [chat_ids(llm, "A phone number?")],
        [
            SamplingParams(
                max_tokens=10,
                temperature=1.0,
                seed=s,
                grammar=GrammarSpec("choice", '["yes", "no"]'),
            )
            for s in (1, 2)
        ]
        + [
            # ASCII digits: `\d` also allows Unicode ones, several tokens each, which a
            # sampled run (seeded or not) may pick until max_tokens cuts the match short.
            SamplingParams(
                max_tokens=20,
                temperature=1.0,
                seed=3,
                grammar=GrammarSpec("regex", r"[0-9]{3}-[0-9]{4}"),
            )
        ],
    )
    assert {o.text for o in outs[:2]} <= {"yes", "no"}
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", outs[2].text), outs[2].text
    assert all(o.finish_reason is FinishReason.STOP for o in outs)


def test_unconstrained_greedy_outputs_unchanged_next_to_constrained_rows(llm, idle_engine):
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    plain = [chat_ids(llm, q) for q in ("What is 2 + 2?", "Name a color.", "Say hi.")]
    alone = [o.token_ids for o in llm.generate_tokens(plain, greedy)]
    constrained = [
        SamplingParams(max_tokens=60, temperature=1.0, seed=s, grammar=spec(POINT))
        for s in range(5)
    ]
    mixed = llm.generate_tokens(
        plain + [chat_ids(llm, "JSON please")] * 5, [greedy] * 3 + constrained
    )
    assert [o.token_ids for o in mixed[:3]] == alone


def test_bench_structured_smoke(llm, idle_engine):
    """scripts/bench_structured.py on a tiny workload: it runs and reports every field."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import bench_structured

    assert len(bench_structured.SCHEMAS) >= 10
    for schema in bench_structured.SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)
    r = bench_structured.validity(llm, 3, 200, constrained=True)
    assert r["valid"] == r["samples"] == 3 and r["num_schemas"] == len(bench_structured.SCHEMAS)
    stats = llm.engine.stats  # throughput() starts fresh counters: keep the session's
    try:
        t = bench_structured.throughput(llm, 2, 6, constrained=True)
    finally:
        llm.engine.stats = stats
    assert t["all_ran_to_max_tokens"] and t["compiles_during_run"] == 0 and t["mask_fill_s"] > 0


# ---- the HTTP API ----------------------------------------------------------------------------
# From the first test below to the module's end the server's engine thread drives the shared
# engine: tests that step it themselves (llm, idle_engine) belong above.
@pytest.fixture(scope="module")
def server(engine) -> Iterator[tuple[str, int]]:
    with serve_engine(engine, ServerConfig()) as (url, bridge):
        yield url, engine.runner.num_compiles


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def test_openai_response_format_json_schema_and_stream(server):
    url, _ = server
    fmt = {"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER, "strict": True}}
    r = client(url).chat.completions.create(
        model="smollm2-135m", messages=CHAT, response_format=fmt, max_tokens=200, seed=3
    )
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), ORDER)
    stream = client(url).chat.completions.create(
        model="smollm2-135m",
        messages=CHAT,
        response_format=fmt,
        max_tokens=200,
        seed=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), ORDER)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens > 0


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    age: int = pydantic.Field(ge=0, le=120)


def test_openai_parse_helper_with_a_pydantic_model(server):
    url, _ = server
    completions = client(url).chat.completions
    parse = getattr(completions, "parse", None) or client(url).beta.chat.completions.parse
    r = parse(model="smollm2-135m", messages=CHAT, response_format=Person, max_tokens=100)
    person = r.choices[0].message.parsed
    assert isinstance(person, Person) and 0 <= person.age <= 120


def test_openai_tools_required_and_named(server):
    url, _ = server
    r = client(url).chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice="required",
        max_tokens=200,
        seed=5,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    params = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER_TOOL, TIME_TOOL)}
    for call in choice.message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])
    # Named, streamed: the first delta carries id and name, the rest the arguments.
    stream = client(url).chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=100,
        stream=True,
    )
    deltas = [c.choices[0] for c in stream if c.choices]
    calls = [tc for d in deltas for tc in d.delta.tool_calls or []]
    assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    assert all(tc.id is None and tc.index == 0 for tc in calls[1:])
    arguments = "".join(tc.function.arguments or "" for tc in calls)
    jsonschema.validate(json.loads(arguments), params["get_weather"])
    assert deltas[-1].finish_reason == "tool_calls"
    # auto with SmolLM2's template (no tools in it): plain generation.
    r = client(url).chat.completions.create(
        model="smollm2-135m", messages=CHAT, tools=[WEATHER_TOOL], max_tokens=8
    )
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason in ("stop", "length")


def test_vllm_extra_params_on_both_endpoints(server):
    url, _ = server
    c = client(url)
    r = c.completions.create(
        model="smollm2-135m",
        prompt="The answer is",
        max_tokens=10,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
    )
    assert r.choices[0].text in ("yes", "no")
    r = c.completions.create(
        model="smollm2-135m",
        prompt="My number:",
        max_tokens=10,
        extra_body={"guided_regex": "[0-9]{4}"},
    )
    assert re.fullmatch("[0-9]{4}", r.choices[0].text)
    r = c.chat.completions.create(
        model="smollm2-135m",
        messages=CHAT,
        max_tokens=200,
        temperature=0,
        response_format={"type": "json_object"},
    )
    # Any object is allowed, so a small model may write one longer than max_tokens: then it
    # is an object cut short; complete, it must parse.
    choice = r.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.finish_reason == "length" and choice.message.content.startswith("{")
    r = c.chat.completions.create(
        model="smollm2-135m",
        messages=CHAT,
        max_tokens=200,
        temperature=0,
        extra_body={"guided_json": PERSON},
    )
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


@pytest.mark.parametrize(
    "extra, param",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "strin"}},
                }
            },
            "response_format",
        ),
        ({"structured_outputs": {"regex": "(["}}, "structured_outputs.regex"),
        ({"guided_grammar": "start: nothing_here"}, "guided_grammar"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, None),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}]},
            "tools",
        ),
        (
            {
                "tools": [WEATHER_TOOL],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
        ),
    ],
)
def test_bad_constraints_are_400_before_any_work(server, engine, extra, param):
    url, _ = server
    steps = engine.stats.num_steps
    body = {"model": "smollm2-135m", "messages": CHAT, "max_tokens": 5, **extra}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert_error(r, 400, param=param)
    assert engine.stats.num_steps == steps


def test_no_compiles_after_warmup_with_structured_requests(server, engine):
    _, compiles = server
    assert engine.runner.num_compiles == compiles
