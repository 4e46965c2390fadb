"""Validate a chat request (an HTTP body or a WebSocket frame) into a :class:`ChatRequest`.

Pure: no database, no I/O. Each failure is a ``RequestError`` whose message says what to fix.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from typing import Any

import orjson

from .conf import conf
from .exceptions import RequestError

FIELDS = ("messages", "conversation_id", "model")
EXAMPLE = '{"messages": [{"role": "user", "content": "Hi"}]}'


@dataclasses.dataclass(frozen=True, slots=True)
class ChatRequest:
    messages: list[dict[str, str]]
    model: str
    params: dict[str, int | float]
    conversation_id: uuid.UUID | None = None


def decode_json(body: bytes | str) -> Any:
    """Parse a JSON document, or raise ``invalid_json``."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise RequestError(
            "invalid_json", f"The body is not valid UTF-8 JSON. Send an object like {EXAMPLE}."
        ) from None


def validate_request(data: Any, *, ignore: tuple[str, ...] = ()) -> ChatRequest:
    """Check a decoded request against the settings; ``ignore`` names transport-level keys."""
    if not isinstance(data, dict):
        raise RequestError("invalid_request", f"The body must be a JSON object, such as {EXAMPLE}.")
    allowed = conf.CHATPROXY_PARAMETERS
    for key in data:
        if key not in FIELDS and key not in allowed and key not in ignore:
            accepted = ", ".join([*FIELDS, *allowed])
            raise RequestError(
                "unknown_field", f"Unknown field {key!r}. The accepted fields are: {accepted}."
            )
    conversation_id = _conversation_id(data.get("conversation_id"))
    # With CHATPROXY_STORE_CONTENT off the server keeps no history, so the client sends it.
    continuing = conversation_id is not None and conf.CHATPROXY_STORE_CONTENT
    messages = _messages(data.get("messages"), continuing=continuing)
    return ChatRequest(
        messages=messages,
        model=_model(data.get("model")),
        params={
            name: _parameter(name, data[name], *allowed[name]) for name in allowed if name in data
        },
        conversation_id=conversation_id,
    )


def _conversation_id(value: Any) -> uuid.UUID | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestError(
            "invalid_request",
            "conversation_id must be a string: the id from an earlier analyzing event.",
        )
    try:
        return uuid.UUID(value)
    except ValueError:
        # Same answer as an unknown id, so ids cannot be probed for their format.
        raise RequestError(
            "conversation_not_found",
            "No conversation with that id belongs to you. Leave conversation_id out to start one.",
            status=404,
        ) from None


def _messages(value: Any, *, continuing: bool) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RequestError(
            "invalid_messages",
            f'messages must be a non-empty list of {{"role", "content"}} objects, as in {EXAMPLE}.',
        )
    limit = conf.CHATPROXY_MAX_MESSAGES
    if len(value) > limit:
        raise RequestError(
            "too_many_messages", f"Send at most {limit} messages; this request has {len(value)}."
        )
    roles = {"user", "assistant"} | ({"system"} if conf.CHATPROXY_ALLOW_SYSTEM_MESSAGES else set())
    messages, total = [], 0
    for i, message in enumerate(value):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise RequestError(
                "invalid_messages",
                f"messages[{i}] must be an object with exactly the keys 'role' and 'content'.",
            )
        role, content = message["role"], message["content"]
        if role not in roles:
            raise RequestError("role_not_allowed", _role_hint(i, role, roles))
        if role == "assistant" and continuing:
            raise RequestError(
                "role_not_allowed",
                f"messages[{i}] is an assistant message, but this conversation's history is kept "
                "by the server: send only the new user message with conversation_id.",
            )
        if not isinstance(content, str) or not content.strip():
            raise RequestError(
                "invalid_messages", f"messages[{i}].content must be a non-empty string."
            )
        total += len(content)
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise RequestError(
            "invalid_messages",
            "The last message must have the role 'user': it is what gets answered.",
        )
    if total > conf.CHATPROXY_MAX_CHARS:
        raise RequestError(
            "too_many_characters",
            f"Send at most {conf.CHATPROXY_MAX_CHARS} characters of content; "
            f"this request has {total}.",
        )
    return messages


def _role_hint(i: int, role: Any, roles: set[str]) -> str:
    if role == "system":
        return (
            f"messages[{i}] has the role 'system', which clients may not send: the server sets "
            "the system prompt (CHATPROXY_ALLOW_SYSTEM_MESSAGES is off)."
        )
    return f"messages[{i}].role {role!r} is not allowed; use one of: {', '.join(sorted(roles))}."


def _model(value: Any) -> str:
    # Which models this user may use is checked with the user, in limits.check_model().
    if value is None:
        return conf.CHATPROXY_DEFAULT_MODEL
    if not isinstance(value, str) or not value:
        raise RequestError("model_not_allowed", "model must be the name of an allowed model.")
    return value


def _parameter(name: str, value: Any, low: float, high: float) -> int | float:
    integral = isinstance(low, int) and isinstance(high, int)
    ok = isinstance(value, int) if integral else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or not math.isfinite(value):
        kind = "an integer" if integral else "a number"
        raise RequestError("invalid_parameter", f"{name} must be {kind} from {low} to {high}.")
    # Out-of-range values are clamped rather than refused: the request is still meaningful.
    clamped = min(max(value, low), high)
    return int(clamped) if integral else float(clamped)
