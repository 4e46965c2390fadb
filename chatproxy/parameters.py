"""The request's fields beyond its messages: each parameter CHATPROXY_PARAMETERS allows, checked
by its validator (a clamped number, one of a list of values, or a kind named in ``KINDS``).

Pure: no database, no I/O. Each failure is a ``RequestError`` whose message says what to fix.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import orjson

from .conf import ParameterSpec, conf
from .exceptions import RequestError

TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
TOOL_CHOICES = ("none", "auto", "required")
MAX_STOP = 4
MAX_DESCRIPTION = 1024
TOOL_EXAMPLE = (
    '[{"type": "function", "function": {"name": "get_time", "description": "...", '
    '"parameters": {"type": "object", "properties": {}}}}]'
)


def validate_parameter(name: str, spec: ParameterSpec, value: Any) -> Any:
    """Return ``value`` as the upstream gets it, or raise the error that says what to fix."""
    if isinstance(spec, str):
        return KINDS[spec](name, value)
    low, high = spec[0], spec[-1]
    if isinstance(low, str) or isinstance(high, str):
        if value not in spec:
            choices = ", ".join(map(repr, spec))
            raise RequestError("invalid_parameter", f"{name} must be one of {choices}.")
        return value
    return _number(name, value, low, high)


def check_together(params: dict[str, Any]) -> None:
    """Check the parameters that depend on each other: a tool choice needs its tools."""
    tools = params.get("tools") or []
    names = {tool["function"]["name"] for tool in tools}
    choice = params.get("tool_choice")
    if isinstance(choice, dict) and choice["function"]["name"] not in names:
        raise RequestError(
            "invalid_tool_choice",
            f"tool_choice names the function {choice['function']['name']!r}, which is not in "
            "tools: add it to tools, or choose one of the functions it has.",
        )
    if choice == "required" and not tools:
        raise RequestError(
            "invalid_tool_choice", "tool_choice 'required' needs tools: send them, or leave it out."
        )
    if "parallel_tool_calls" in params and not tools:
        raise RequestError(
            "invalid_parameter", "parallel_tool_calls applies only with tools: send them too."
        )


def _number(name: str, value: Any, low: float, high: float) -> int | float:
    integral = isinstance(low, int) and isinstance(high, int)
    ok = isinstance(value, int) if integral else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or not math.isfinite(value):
        kind = "an integer" if integral else "a number"
        raise RequestError("invalid_parameter", f"{name} must be {kind} from {low} to {high}.")
    # Out-of-range values are clamped rather than refused: the request is still meaningful.
    clamped = min(max(value, low), high)
    return int(clamped) if integral else float(clamped)


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RequestError("invalid_parameter", f"{name} must be true or false.")
    return value


def _stop(name: str, value: Any) -> str | list[str]:
    if isinstance(value, str) and value:
        return value
    if (
        isinstance(value, list)
        and 1 <= len(value) <= MAX_STOP
        and all(isinstance(s, str) and s for s in value)
    ):
        return value
    raise RequestError(
        "invalid_stop",
        f"{name} must be a non-empty string or a list of 1 to {MAX_STOP} non-empty strings.",
    )


def _tools(name: str, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise RequestError(
            "invalid_tools",
            f"{name} must be a non-empty list of function tools, as in {TOOL_EXAMPLE}.",
        )
    limit = conf.CHATPROXY_MAX_TOOLS
    if len(value) > limit:
        raise RequestError(
            "too_many_tools", f"Send at most {limit} tools; this request has {len(value)}."
        )
    size, limit = len(orjson.dumps(value)), conf.CHATPROXY_MAX_TOOLS_BYTES
    if size > limit:
        raise RequestError(
            "tools_too_large",
            f"The tools take {size} bytes as JSON; send at most {limit}: shorten the "
            "descriptions and schemas, or send fewer tools.",
        )
    seen: set[str] = set()
    for i, tool in enumerate(value):
        _tool(f"{name}[{i}]", tool)
        function = tool["function"]["name"]
        if function in seen:
            raise RequestError(
                "invalid_tools", f"{name}[{i}] repeats the function name {function!r}: rename one."
            )
        seen.add(function)
    return value


def _tool(where: str, tool: Any) -> None:
    if (
        not isinstance(tool, dict)
        or tool.get("type") != "function"
        or set(tool) != {"type", "function"}
        or not isinstance(tool["function"], dict)
    ):
        raise RequestError(
            "invalid_tools",
            f'{where} must be {{"type": "function", "function": {{...}}}}, as in {TOOL_EXAMPLE}.',
        )
    function = tool["function"]
    unknown = set(function) - {"name", "description", "parameters", "strict"}
    if unknown:
        raise RequestError(
            "invalid_tools",
            f"{where}.function has unknown keys {sorted(unknown)}; it takes name, description, "
            "parameters and strict.",
        )
    name = function.get("name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise RequestError(
            "invalid_tools",
            f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-'.",
        )
    description = function.get("description", "")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
        raise RequestError(
            "invalid_tools",
            f"{where}.function.description must be a string of at most {MAX_DESCRIPTION} "
            "characters.",
        )
    parameters = function.get("parameters", {"type": "object"})
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise RequestError(
            "invalid_tools",
            f'{where}.function.parameters must be a JSON schema object: {{"type": "object", '
            '"properties": {...}}.',
        )
    if not isinstance(function.get("strict", False), bool):
        raise RequestError("invalid_tools", f"{where}.function.strict must be true or false.")


def _tool_choice(name: str, value: Any) -> Any:
    if value in TOOL_CHOICES:
        return str(value)
    if (
        isinstance(value, dict)
        and set(value) == {"type", "function"}
        and value["type"] == "function"
        and isinstance(value["function"], dict)
        and set(value["function"]) == {"name"}
        and isinstance(value["function"]["name"], str)
    ):
        return value
    raise RequestError(
        "invalid_tool_choice",
        f'{name} must be "none", "auto", "required", or '
        '{"type": "function", "function": {"name": "..."}} naming one of the tools.',
    )


def _response_format(name: str, value: Any) -> Any:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind in ("text", "json_object") and set(value) == {"type"}:
        return value
    if kind == "json_schema" and set(value) == {"type", "json_schema"}:
        spec = value["json_schema"]
        if (
            isinstance(spec, dict)
            and isinstance(spec.get("name"), str)
            and TOOL_NAME.fullmatch(spec["name"])
            and set(spec) <= {"name", "description", "schema", "strict"}
            and isinstance(spec.get("schema", {}), dict)
            and isinstance(spec.get("strict", False), bool)
            and isinstance(spec.get("description", ""), str)
        ):
            size, limit = len(orjson.dumps(spec)), conf.CHATPROXY_MAX_SCHEMA_BYTES
            if size > limit:
                raise RequestError(
                    "schema_too_large",
                    f"{name}.json_schema takes {size} bytes as JSON; send at most {limit}.",
                )
            return value
    raise RequestError(
        "invalid_response_format",
        f'{name} must be {{"type": "text"}}, {{"type": "json_object"}}, or {{"type": '
        '"json_schema", "json_schema": {"name": "...", "schema": {...}, "strict": true}}.',
    )


KINDS: dict[str, Callable[[str, Any], Any]] = {
    "boolean": _boolean,
    "stop": _stop,
    "tools": _tools,
    "tool_choice": _tool_choice,
    "response_format": _response_format,
}
