"""Tools that run on the server: Python functions the model calls, declared with ``@tool``.

A tool's JSON schema comes from its type hints: ``str``, ``int``, ``float``, ``bool``,
``X | None`` (optional), ``list[T]`` of those, ``Literal[...]`` of strings or integers, and
``enum.Enum`` subclasses with string values; ``Annotated[T, "text"]`` describes a parameter. A
parameter with a default is not required. A parameter named ``turn`` is
not offered to the model: chatproxy passes the running turn, whose ``user`` the tool acts as.
A hint outside that list is refused at start-up by the check ``chatproxy.E021``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import inspect
import logging
import time
import types
import typing
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

import orjson
from asgiref.sync import sync_to_async
from django.db import close_old_connections
from django.utils.module_loading import import_string

from .conf import conf
from .exceptions import RequestError
from .parameters import check_together

if TYPE_CHECKING:
    from .events import ToolCall
    from .turns import Turn

logger = logging.getLogger("chatproxy.tools")

JSON = dict[str, Any]
Permission = Callable[["Turn"], bool | Awaitable[bool]]

_SCALARS: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


class UnsupportedHintError(TypeError):
    """Raised when a tool's parameter has a type hint chatproxy cannot describe in JSON."""


@dataclasses.dataclass(eq=False)
class Tool:
    """A function the model may call, with what the model is told of it."""

    function: Callable[..., Any]
    name: str
    description: str
    timeout: float | None = None  # None: CHATPROXY_TOOL_TIMEOUT
    permission: Permission | None = None
    requires_approval: bool = False
    parameters: JSON = dataclasses.field(default_factory=dict)
    problem: str = ""  # why the schema could not be derived (the check reports it)
    wants_turn: bool = False
    _enums: dict[str, type[enum.Enum]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            self.parameters = self._derive()
        except UnsupportedHintError as exc:
            self.problem = str(exc)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    def schema(self) -> JSON:
        """The tool as the upstream's ``tools`` list takes it."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }

    def _derive(self) -> JSON:
        # ``Turn`` may be imported for type checking only: the ``turn`` parameter is known by
        # its name, and its hint need not resolve.
        hints = typing.get_type_hints(self.function, localns={"Turn": object}, include_extras=True)
        properties: JSON = {}
        required: list[str] = []
        for name, parameter in inspect.signature(self.function).parameters.items():
            hint = hints.get(name, inspect.Parameter.empty)
            if name == "turn":
                self.wants_turn = True
                continue
            if hint is inspect.Parameter.empty:
                raise UnsupportedHintError(f"{self.name}({name}) has no type hint: add one.")
            properties[name] = self._property(name, hint)
            if parameter.default is inspect.Parameter.empty:
                required.append(name)
        return {
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": False,
        }

    def _property(self, name: str, hint: Any) -> JSON:
        description = ""
        if get_origin(hint) is Annotated:
            hint, *extras = get_args(hint)
            description = next((e for e in extras if isinstance(e, str)), "")
        schema = _schema(hint, f"{self.name}({name})")
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            self._enums[name] = hint
        if description:
            schema["description"] = description
        return schema

    def arguments(self, text: str) -> JSON:
        """Parse and check the model's arguments; raise ``ValueError`` saying what is wrong."""
        try:
            values = orjson.loads(text or "{}")
        except orjson.JSONDecodeError:
            raise ValueError("The arguments are not valid JSON.") from None
        if not isinstance(values, dict):
            raise ValueError("The arguments must be a JSON object.")
        _check(values, self.parameters, "arguments")
        return {
            key: self._enums[key](value) if key in self._enums and value is not None else value
            for key, value in values.items()
        }


ToolSpec = str | Tool


def _schema(hint: Any, where: str) -> JSON:
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType) and type(None) in args and len(args) == 2:
        inner = _schema(next(a for a in args if a is not type(None)), where)
        return {"anyOf": [inner, {"type": "null"}]}
    if origin is list and len(args) == 1:
        return {"type": "array", "items": _schema(args[0], where)}
    if origin is Literal and args and all(type(a) in (str, int) for a in args):
        kinds = {type(a) for a in args}
        schema: JSON = {"enum": list(args)}
        if len(kinds) == 1:
            schema["type"] = _SCALARS[kinds.pop()]
        return schema
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        values = [member.value for member in hint]
        if values and all(isinstance(v, str) for v in values):
            return {"type": "string", "enum": values}
    raise UnsupportedHintError(
        f"{where} has the type {hint!r}, which chatproxy cannot describe to the model: use "
        "str, int, float, bool, X | None, list[X], Literal[...] or a str Enum."
    )


def _check(value: Any, schema: JSON, where: str) -> None:
    if "anyOf" in schema:
        if value is None:
            return
        _check(value, schema["anyOf"][0], where)
        return
    kind = schema.get("type")
    if kind == "object":
        missing = [key for key in schema["required"] if key not in value]
        if missing:
            raise ValueError(f"{where} lack the required {', '.join(missing)}.")
        extra = [key for key in value if key not in schema["properties"]]
        if extra:
            raise ValueError(f"{where} have the unknown {', '.join(extra)}.")
        for key, item in value.items():
            _check(item, schema["properties"][key], key)
        return
    if "enum" in schema and value not in schema["enum"]:
        raise ValueError(f"{where} must be one of {', '.join(map(repr, schema['enum']))}.")
    ok = {
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "array": isinstance(value, list),
        None: True,
    }[kind]
    if not ok:
        raise ValueError(f"{where} must be of type {kind}.")
    if kind == "array":
        for item in value:
            _check(item, schema["items"], where)


def tool(
    function: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float | None = None,
    permission: Permission | None = None,
    requires_approval: bool = False,
) -> Any:
    """Declare a function, sync or async, as a tool the model may call; use bare (``@tool``)
    or with options (``@tool(timeout=5)``). The description defaults to the docstring's first
    paragraph; ``permission(turn)`` returns whether this turn may run it."""

    def declare(function: Callable[..., Any]) -> Tool:
        doc = inspect.getdoc(function) or ""
        return Tool(
            function=function,
            name=name or function.__name__,
            description=description if description is not None else doc.split("\n\n")[0],
            timeout=timeout,
            permission=permission,
            requires_approval=requires_approval,
        )

    return declare if function is None else declare(function)


def load(specs: Sequence[ToolSpec] | None = None) -> dict[str, Tool]:
    """The tools by name: ``specs`` (dotted paths or tools), by default CHATPROXY_TOOLS."""
    found: dict[str, Tool] = {}
    for spec in conf.CHATPROXY_TOOLS if specs is None else specs:
        item = import_string(spec) if isinstance(spec, str) else spec
        if not isinstance(item, Tool):
            raise TypeError(f"{spec!r} is not a chatproxy tool: declare it with @tool.")
        found[item.name] = item
    return found


def offer_tools(params: JSON, tools: dict[str, Tool]) -> None:
    """Add the server's tools to a request's ``params``, after the client's; refuse a client
    tool that takes a server tool's name. Then check the tool parameters against all of them:
    a ``tool_choice`` may name a server tool."""
    client = params.get("tools") or []
    for offered in client:
        name = offered["function"]["name"]
        if name in tools:
            raise RequestError(
                "tool_name_taken",
                f"The tool name {name!r} belongs to a tool that runs on the server: rename "
                "your tool.",
            )
    if tools:
        params["tools"] = [*client, *(found.schema() for found in tools.values())]
    check_together(params)


@dataclasses.dataclass(slots=True)
class ToolResult:
    """What one call gave: its ``result``, or an ``error`` the model (and client) sees."""

    call: ToolCall
    result: Any = None
    error: str = ""
    duration_ms: int = 0

    def content(self) -> str:
        """The ``tool`` message's content: the result, or the error, as JSON text."""
        body = {"error": self.error} if self.error else self.result
        return orjson.dumps(body).decode()

    def event(self) -> JSON:
        event: JSON = {"event": "tool_result", "id": self.call["id"], "name": self.call["name"]}
        if self.error:
            event["error"] = self.error
        else:
            event["result"] = self.result
        return event

    def metadata(self) -> JSON:
        meta: JSON = {"name": self.call["name"], "duration_ms": self.duration_ms}
        if self.error:
            meta["error"] = True
        return meta


def _in_thread(function: Callable[..., Any], kwargs: JSON) -> Any:
    try:
        return function(**kwargs)
    finally:
        # A tool's thread is asgiref's, not chatproxy's: it keeps no connection between calls
        # (left open, SQLite's would be closed only when the thread is collected).
        close_old_connections()


async def _call_function(function: Callable[..., Any], kwargs: JSON) -> Any:
    if inspect.iscoroutinefunction(function):
        return await function(**kwargs)
    # Not on chatproxy's database threads: a slow tool must not hold up every turn's writes.
    return await sync_to_async(_in_thread, thread_sensitive=False)(function, kwargs)


async def _allowed(turn: Turn, found: Tool) -> bool:
    if found.permission is None:
        return True
    if inspect.iscoroutinefunction(found.permission):
        return bool(await found.permission(turn))
    return bool(
        await sync_to_async(_in_thread, thread_sensitive=False)(found.permission, {"turn": turn})
    )


async def run_call(turn: Turn, found: Tool, call: ToolCall) -> ToolResult:
    """Run one call: check its arguments and permission, then the tool under its timeout.
    Every failure is the call's error result; only cancellation propagates."""
    started = time.monotonic()
    outcome = ToolResult(call)
    try:
        kwargs = found.arguments(call["arguments"])
        if not await _allowed(turn, found):
            outcome.error = f"You may not use the tool {found.name} in this conversation."
        else:
            if found.wants_turn:
                kwargs["turn"] = turn
            timeout = conf.CHATPROXY_TOOL_TIMEOUT if found.timeout is None else found.timeout
            result = await asyncio.wait_for(_call_function(found.function, kwargs), timeout)
            orjson.dumps(result)  # the model gets JSON: refuse what cannot be sent as such
            outcome.result = result
    except ValueError as exc:  # the arguments do not fit the schema
        outcome.error = f"Invalid arguments: {exc}"
    except TimeoutError:
        outcome.error = f"The tool {found.name} did not finish in time."
    except orjson.JSONEncodeError:
        logger.error("Tool %s returned a value that is not JSON", found.name)
        outcome.error = f"The tool {found.name} failed."
    except Exception:
        logger.exception("Tool %s failed (call %s)", found.name, call["id"])
        outcome.error = f"The tool {found.name} failed."
    outcome.duration_ms = round((time.monotonic() - started) * 1000)
    return outcome
