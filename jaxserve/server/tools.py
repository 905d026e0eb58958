"""OpenAI `tools` / `tool_choice`: the JSON schema that constrains `required` and named calls,
and turning a finished output back into `tool_calls`.

`required` generates `[{"name": ..., "arguments": {...}}, ...]` (an anyOf over the tools, at
least one call; one at most without `parallel_tool_calls`); a named function generates its
arguments object alone. `auto` generates freely and parses Hermes-style
`<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks, the format of ChatML
templates that take tools; a template without tools (SmolLM2's) never sees them, so with it
`auto` is plain generation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

from jaxserve.errors import InvalidRequestError
from jaxserve.request import GrammarSpec
from jaxserve.server.constraints import schema_spec
from jaxserve.server.protocol import ChatCompletionRequest, FunctionCall, Tool, ToolCall

FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
EMPTY_PARAMETERS = {"type": "object", "properties": {}}

ToolMode = Literal["none", "auto", "required", "named"]


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses its tools."""

    mode: ToolMode
    tools: tuple[Tool, ...] = ()
    name: str | None = None  # the function of a named tool_choice
    grammar: GrammarSpec | None = None  # required / named: the output's JSON schema
    template_has_tools: bool = False  # auto: the model was told about the tools

    @property
    def parses_output(self) -> bool:
        """The output may hold tool calls (so a stream holds it back until it is complete)."""
        return self.constrained or (self.mode == "auto" and self.template_has_tools)

    @property
    def constrained(self) -> bool:
        return self.mode in ("required", "named")

    def template_tools(self) -> list[dict] | None:
        """What the chat template gets as `tools` (nothing with tool_choice none)."""
        if self.mode == "none" or not self.tools:
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]


def parameters(tool: Tool) -> dict:
    return tool.function.parameters if tool.function.parameters is not None else EMPTY_PARAMETERS


def template_takes_tools(template: str | None) -> bool:
    """Whether a chat template renders `tools` at all (SmolLM2's does not)."""
    return template is not None and re.search(r"\btools\b", template) is not None


def plan_tools(req: ChatCompletionRequest, template: str | None) -> ToolPlan:
    """Check the tool definitions and tool_choice; 400 names the bad one."""
    tools = tuple(req.tools or ())
    choice = req.tool_choice
    names = [t.function.name for t in tools]
    for i, name in enumerate(names):
        if not FUNCTION_NAME.match(name):
            raise InvalidRequestError(
                f"tools[{i}].function.name={name!r} must match {FUNCTION_NAME.pattern}", "tools"
            )
    if len(set(names)) != len(names):
        raise InvalidRequestError(f"tool names must be unique; got {names}", "tools")
    if choice is None:  # OpenAI: auto with tools, none without
        choice = "auto" if tools else "none"
    if isinstance(choice, str):
        if choice == "required" and not tools:
            raise InvalidRequestError("tool_choice=required needs tools", "tool_choice")
        if choice != "required":
            return ToolPlan(choice, tools, template_has_tools=template_takes_tools(template))
        items = [_call_schema(t) for t in tools]
        schema: dict = {"type": "array", "items": {"anyOf": items}, "minItems": 1}
        if not req.parallel_tool_calls:
            schema["maxItems"] = 1
        return ToolPlan("required", tools, grammar=schema_spec(schema, "tools"))
    name = choice.function.name
    tool = next((t for t in tools if t.function.name == name), None)
    if tool is None:
        raise InvalidRequestError(
            f"tool_choice names function {name!r}, which is not in tools {names}", "tool_choice"
        )
    return ToolPlan("named", tools, name, schema_spec(parameters(tool), "tools"))


def _call_schema(tool: Tool) -> dict:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": parameters(tool)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def tool_schemas(plan: ToolPlan) -> list[GrammarSpec]:
    """Every tool's parameters as a grammar: compiling them rejects a bad definition (400)."""
    return [schema_spec(parameters(t), "tools") for t in plan.tools]


def parse_tool_calls(plan: ToolPlan, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, tool calls) of a finished output; no calls if it does not parse as any."""
    if plan.mode == "named":
        assert plan.name is not None
        return None, [ToolCall(function=FunctionCall(name=plan.name, arguments=text))]
    if plan.mode == "required":
        try:
            calls = json.loads(text)
        except ValueError:
            return text, []
        return None, [_call(c) for c in calls]
    if plan.mode == "auto" and plan.template_has_tools and "<tool_call>" in text:
        calls = []
        for block in HERMES_CALL.findall(text):
            try:
                call = json.loads(block)
            except ValueError:
                return text, []
            if not isinstance(call, dict) or "name" not in call:
                return text, []
            calls.append(_call(call))
        content = HERMES_CALL.sub("", text).strip()
        return content or None, calls
    return text, []


def _call(call: dict) -> ToolCall:
    arguments = call.get("arguments", call.get("parameters", {}))
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return ToolCall(function=FunctionCall(name=call["name"], arguments=text))
