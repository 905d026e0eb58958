"""Structured-output request fields -> one `GrammarSpec`: OpenAI's `response_format`, vLLM's
`structured_outputs` and its older `guided_*` names; at most one constraint per request.

Only shapes are checked here (cheap, on the event loop); the grammar itself is compiled, and
so validated, by `compile_grammar` on an offload thread before the request reaches the engine.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from jaxserve.errors import InvalidRequestError
from jaxserve.request import GrammarKind, GrammarSpec
from jaxserve.server.protocol import SamplingFields

if TYPE_CHECKING:
    from jaxserve.structured import GrammarCache


def schema_spec(schema: Any, param: str) -> GrammarSpec:
    """A JSON schema (object or JSON text) -> spec. Key order stays: properties are generated
    in the schema's order."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise InvalidRequestError(f"{param} is not valid JSON: {exc}", param) from exc
    if not isinstance(schema, dict | bool):
        raise InvalidRequestError(f"{param} must be a JSON schema object", param)
    return GrammarSpec("json_schema", json.dumps(schema, separators=(",", ":")))


def _spec(kind: GrammarKind, value: Any, param: str) -> GrammarSpec:
    if kind == "json_schema":
        return schema_spec(value, param)
    if kind == "choice":
        if not value or not all(value):
            raise InvalidRequestError(
                f"{param} must be a non-empty list of non-empty strings", param
            )
        return GrammarSpec("choice", json.dumps(list(value)))
    if not value:
        raise InvalidRequestError(f"{param} must not be empty", param)
    return GrammarSpec(kind, value)


def _candidates(req: SamplingFields) -> list[tuple[str, GrammarKind, Any]]:
    """(param, kind, value) of every constraint the request sets."""
    found: list[tuple[str, GrammarKind, Any]] = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", "json_object", None))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise InvalidRequestError(
                "response_format of type json_schema needs json_schema.schema", "response_format"
            )
        found.append(("response_format", "json_schema", fmt.json_schema.schema_))
    so = req.structured_outputs
    if so is not None:
        for name, kind, value in (
            ("json", "json_schema", so.json_),
            ("regex", "regex", so.regex),
            ("choice", "choice", so.choice),
            ("grammar", "lark", so.grammar),
        ):
            if value is not None:
                found.append((f"structured_outputs.{name}", kind, value))
        if so.json_object:
            found.append(("structured_outputs.json_object", "json_object", None))
    for name, kind in (
        ("guided_json", "json_schema"),
        ("guided_regex", "regex"),
        ("guided_choice", "choice"),
        ("guided_grammar", "lark"),
    ):
        if (value := getattr(req, name)) is not None:
            found.append((name, kind, value))
    return found


def grammar_spec(req: SamplingFields) -> tuple[GrammarSpec, str] | None:
    """The request's constraint and the field it came from; None if it sets none."""
    found = _candidates(req)
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(param for param, _, _ in found)
        raise InvalidRequestError(f"only one structured output constraint at a time; got {names}")
    param, kind, value = found[0]
    if kind == "json_object":
        return GrammarSpec("json_object"), param
    return _spec(kind, value, param), param


def compile_grammar(grammars: GrammarCache, spec: GrammarSpec, param: str) -> GrammarSpec:
    """Compile (and cache) the grammar: a bad schema, regex or grammar is a 400 here, before
    the engine sees the request. Compiles: call it off the event loop (`Offload.run`)."""
    grammars.compile(spec, param)
    return spec
