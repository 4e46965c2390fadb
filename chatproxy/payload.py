"""Validate a chat request (an HTTP body or a WebSocket frame) into a :class:`ChatRequest`.

Pure: no database, no I/O. Each failure is a ``RequestError`` whose message says what to fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from typing import Any

import orjson

from .conf import conf
from .content import PART_EXAMPLE, Tally, validate_parts
from .exceptions import RequestError
from .parameters import TOOL_NAME, validate_parameter

FIELDS = ("messages", "conversation_id", "model", "approvals", "regenerate", "edit", "detach")
EXAMPLE = '{"messages": [{"role": "user", "content": "Hi"}]}'
MAX_ID = 100  # the length of Message.tool_call_id


@dataclasses.dataclass(frozen=True, slots=True)
class ChatRequest:
    messages: list[dict[str, Any]]  # in the upstream's chat-completions format
    model: str
    params: dict[str, Any]
    conversation_id: uuid.UUID | None = None
    # The answers to calls waiting for approval: approved (True) or denied, by call id.
    approvals: dict[str, bool] = dataclasses.field(default_factory=dict)
    # A new branch of the conversation: another answer beside this answer (``regenerate``),
    # or the request's messages beside this user message (``edit``).
    regenerate: uuid.UUID | None = None
    edit: uuid.UUID | None = None
    # The turn runs to its end when its client leaves (``detach``).
    detach: bool = False

    @property
    def tool_results(self) -> list[str]:
        """The ``tool_call_id`` of each ``tool`` message, in order."""
        return [m["tool_call_id"] for m in self.messages if m["role"] == "tool"]


def decode_json(body: bytes | str) -> Any:
    """Parse a JSON document, or raise ``invalid_json``."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise RequestError(
            "invalid_json", f"The body is not valid UTF-8 JSON. Send an object like {EXAMPLE}."
        ) from None


def validate_request(
    data: Any, *, ignore: tuple[str, ...] = (), continuing: bool | None = None
) -> ChatRequest:
    """Check a decoded request against the settings; ``ignore`` names transport-level keys.
    ``continuing``: whether the server holds the history before the messages (by default,
    when the request names a conversation and CHATPROXY_STORE_CONTENT is on)."""
    if not isinstance(data, dict):
        raise RequestError("invalid_request", f"The body must be a JSON object, such as {EXAMPLE}.")
    allowed = conf.CHATPROXY_PARAMETERS
    for key in data:
        if key not in FIELDS and key not in allowed and key not in ignore:
            if key == "user":
                raise RequestError(
                    "unknown_field",
                    "Leave out the field 'user': the server sets it from who is asking.",
                )
            accepted = ", ".join([*FIELDS, *allowed])
            raise RequestError(
                "unknown_field", f"Unknown field {key!r}. The accepted fields are: {accepted}."
            )
    conversation_id = _conversation_id(data.get("conversation_id"))
    # With CHATPROXY_STORE_CONTENT off the server keeps no history, so the client sends it.
    if continuing is None:
        continuing = conversation_id is not None and conf.CHATPROXY_STORE_CONTENT
    approvals = _approvals(data.get("approvals"), continuing)
    regenerate, edit = _branch(data, conversation_id)
    if regenerate is not None:
        if data.get("messages") or approvals:
            raise RequestError(
                "invalid_branch",
                "regenerate asks again what the answer answered: leave out messages and "
                "approvals (to change the question, send edit instead).",
            )
        messages: list[dict[str, Any]] = []
    elif approvals and not data.get("messages") and edit is None:
        messages = []  # approving is enough to go on
    else:
        messages = validate_messages(data.get("messages"), continuing=continuing)
    params = {
        name: validate_parameter(name, spec, data[name])
        for name, spec in allowed.items()
        if name in data
    }
    return ChatRequest(
        messages=messages,
        model=_model(data.get("model")),
        params=params,
        conversation_id=conversation_id,
        approvals=approvals,
        regenerate=regenerate,
        edit=edit,
        detach=_detach(data.get("detach", False)),
    )


def _detach(value: Any) -> bool:
    if not isinstance(value, bool):
        raise RequestError(
            "invalid_request",
            "detach must be true (the answer goes on if the client leaves) or false.",
        )
    return value


def _branch(
    data: dict[str, Any], conversation_id: uuid.UUID | None
) -> tuple[uuid.UUID | None, uuid.UUID | None]:
    """The ``regenerate`` and ``edit`` message ids: at most one, with a conversation whose
    history the server keeps."""
    regenerate, edit = data.get("regenerate"), data.get("edit")
    if regenerate is None and edit is None:
        return None, None
    if regenerate is not None and edit is not None:
        raise RequestError(
            "invalid_branch", "Send regenerate or edit, not both: each starts one new branch."
        )
    field = "regenerate" if regenerate is not None else "edit"
    if conversation_id is None:
        raise RequestError(
            "invalid_branch",
            f"{field} names a message of a saved conversation: send its conversation_id too.",
        )
    if not conf.CHATPROXY_STORE_CONTENT:
        raise RequestError(
            "invalid_branch",
            f"{field} needs the server to keep the history (CHATPROXY_STORE_CONTENT is off): "
            "send the whole conversation in messages instead.",
        )
    value = data[field]
    message_id = None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            message_id = uuid.UUID(value)
    if message_id is None:
        raise RequestError(
            "invalid_branch",
            f"{field} must be a message id (a string), such as an answer's message_id from its "
            "analyzing event.",
        )
    return (message_id, None) if field == "regenerate" else (None, message_id)


APPROVALS_EXAMPLE = '[{"id": "call_abc123", "approved": true}]'


def _approvals(value: Any, continuing: bool) -> dict[str, bool]:
    if value is None:
        return {}
    if not continuing:
        raise RequestError(
            "invalid_approvals",
            "approvals answer the calls of a saved conversation: send its conversation_id too.",
        )
    if not isinstance(value, list) or not value:
        raise RequestError(
            "invalid_approvals", f"approvals must be a non-empty list, as in {APPROVALS_EXAMPLE}."
        )
    approvals: dict[str, bool] = {}
    for i, item in enumerate(value):
        if not (
            isinstance(item, dict)
            and set(item) == {"id", "approved"}
            and isinstance(item["id"], str)
            and isinstance(item["approved"], bool)
        ):
            raise RequestError(
                "invalid_approvals",
                f'approvals[{i}] must be {{"id": "<call id>", "approved": true or false}}.',
            )
        approvals[item["id"]] = item["approved"]
    return approvals


def check_approvals(approvals: dict[str, bool], waiting: list[str]) -> None:
    """Refuse approvals that do not answer exactly the calls ``waiting`` for approval."""
    if sorted(approvals) == sorted(waiting):
        return
    if not waiting:
        raise RequestError(
            "approvals_mismatch",
            "This conversation has no calls waiting for approval: leave out approvals.",
        )
    raise RequestError(
        "approvals_mismatch",
        f"The last answer waits for your approval of the calls {', '.join(waiting)}: send "
        f'approvals with exactly one {{"id", "approved"}} for each; this request answers '
        f"{', '.join(approvals) or 'none'}.",
    )


def pending_tool_calls(history: list[dict[str, Any]]) -> list[str]:
    """The ids of the last answer's tool calls that no ``tool`` message has answered yet."""
    pending: list[str] = []
    for message in history:
        if message["role"] == "assistant":
            pending = [call["id"] for call in message.get("tool_calls") or ()]
        elif message["role"] == "tool" and message["tool_call_id"] in pending:
            pending.remove(message["tool_call_id"])
        else:
            pending = []
    return pending


def check_tool_results(answered: list[str], pending: list[str]) -> None:
    """Refuse new messages that do not answer exactly the ``pending`` tool calls, first."""
    if answered == pending or sorted(answered) == sorted(pending):
        return
    if not pending:
        raise RequestError(
            "tool_results_mismatch",
            "This conversation has no tool calls waiting for results: leave out the tool "
            "messages, or send them with the answer that called the tools.",
        )
    raise RequestError(
        "tool_results_mismatch",
        f"The last answer called the tools {', '.join(pending)}: start the new messages with "
        f"exactly one tool message for each (tool_call_id); this request answers "
        f"{', '.join(answered) or 'none'}.",
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


def validate_messages(value: Any, *, continuing: bool) -> list[dict[str, Any]]:
    """Check the request's messages; ``continuing``: the server holds the history before them."""
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
    roles = {"user", "assistant", "tool"}
    if conf.CHATPROXY_ALLOW_SYSTEM_MESSAGES:
        roles.add("system")
    messages: list[dict[str, Any]] = []
    tally, pending = Tally(), list[str]()
    for i, message in enumerate(value):
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str) or role not in roles:
            if not isinstance(message, dict) or "role" not in message:
                raise RequestError(
                    "invalid_messages",
                    f"messages[{i}] must be an object with the keys 'role' and 'content'.",
                )
            raise RequestError("role_not_allowed", _role_hint(i, role, roles))
        if role == "assistant":
            if continuing:
                raise RequestError(
                    "role_not_allowed",
                    f"messages[{i}] is an assistant message, but this conversation's history is "
                    "kept by the server: send only the new messages with conversation_id.",
                )
            if pending:
                raise _unanswered(i, pending)
            checked = _assistant(i, message, tally)
            pending = [call["id"] for call in checked.get("tool_calls", ())]
        elif role == "tool":
            checked = _tool_result(i, message, tally)
            if continuing:
                if messages and messages[-1]["role"] != "tool":
                    raise RequestError(
                        "invalid_messages",
                        f"messages[{i}] is a tool message after a {messages[-1]['role']} "
                        "message: put the tool results first.",
                    )
            elif checked["tool_call_id"] in pending:
                pending.remove(checked["tool_call_id"])
            else:
                raise RequestError(
                    "tool_results_mismatch",
                    f"messages[{i}].tool_call_id {checked['tool_call_id']!r} answers no tool call "
                    "of the assistant message before it: use one of its tool_calls' ids.",
                )
        else:
            if pending:
                raise _unanswered(i, pending)
            checked = _said(i, message, role, tally)
        messages.append(checked)
    if messages[-1]["role"] not in ("user", "tool") or pending:
        raise RequestError(
            "invalid_messages",
            "The last message must have the role 'user' (or be the tool results the last "
            "answer asked for): it is what gets answered.",
        )
    tally.check()
    return messages


def _unanswered(i: int, pending: list[str]) -> RequestError:
    return RequestError(
        "tool_results_mismatch",
        f"messages[{i}] comes before the tool calls {', '.join(pending)} have results: "
        "send a tool message for each first.",
    )


def _said(i: int, message: dict[str, Any], role: str, tally: Tally) -> dict[str, Any]:
    """A user or system message: its content is a string or a list of parts."""
    if set(message) != {"role", "content"}:
        raise RequestError(
            "invalid_messages",
            f"messages[{i}] must be an object with exactly the keys 'role' and 'content'.",
        )
    content = message["content"]
    if isinstance(content, list):
        validate_parts(f"messages[{i}].content", content, tally, images=role == "user")
    elif not isinstance(content, str) or not content.strip():
        raise RequestError(
            "invalid_messages",
            f"messages[{i}].content must be a non-empty string or a list of parts, as in "
            f"{PART_EXAMPLE}.",
        )
    else:
        tally.chars += len(content)
    return {"role": role, "content": content}


def _assistant(i: int, message: dict[str, Any], tally: Tally) -> dict[str, Any]:
    """An earlier answer, in a history the client holds: text, tool calls, or both."""
    if not set(message) <= {"role", "content", "tool_calls"}:
        raise RequestError(
            "invalid_messages",
            f"messages[{i}] is an assistant message: it takes 'content' and 'tool_calls' only.",
        )
    content, calls = message.get("content"), message.get("tool_calls")
    checked: dict[str, Any] = {"role": "assistant", "content": content}
    if calls is not None:
        checked["tool_calls"] = _tool_calls(i, calls, tally)
    if content is None and calls is not None:
        return checked
    if not isinstance(content, str) or not content.strip():
        raise RequestError(
            "invalid_messages",
            f"messages[{i}].content must be a non-empty string (or null, with tool_calls).",
        )
    tally.chars += len(content)
    return checked


def _tool_calls(i: int, calls: Any, tally: Tally) -> list[dict[str, Any]]:
    example = '[{"id": "call_1", "type": "function", "function": {"name", "arguments"}}]'
    if not isinstance(calls, list) or not calls:
        raise RequestError(
            "invalid_tool_calls", f"messages[{i}].tool_calls must be a list such as {example}."
        )
    ids = set()
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not (
            isinstance(call, dict)
            and set(call) == {"id", "type", "function"}
            and call["type"] == "function"
            and _is_id(call["id"])
            and isinstance(function, dict)
            and set(function) == {"name", "arguments"}
            and isinstance(function["name"], str)
            and TOOL_NAME.fullmatch(function["name"])
            and isinstance(function["arguments"], str)
        ):
            raise RequestError(
                "invalid_tool_calls",
                f"messages[{i}].tool_calls[{j}] must be like {example}: an id of 1 to 100 "
                "characters, a function name, and its arguments as a JSON string.",
            )
        if call["id"] in ids:
            raise RequestError(
                "invalid_tool_calls",
                f"messages[{i}].tool_calls[{j}] repeats the id {call['id']!r}.",
            )
        ids.add(call["id"])
        tally.chars += len(function["arguments"])
    return calls


def _tool_result(i: int, message: dict[str, Any], tally: Tally) -> dict[str, Any]:
    if (
        set(message) != {"role", "tool_call_id", "content"}
        or not _is_id(message["tool_call_id"])
        or not isinstance(message["content"], str)
    ):
        raise RequestError(
            "invalid_messages",
            f'messages[{i}] is a tool message: send {{"role": "tool", "tool_call_id": "<the '
            'call\'s id>", "content": "<the result as a string>"}.',
        )
    tally.chars += len(message["content"])
    return {"role": "tool", "tool_call_id": message["tool_call_id"], "content": message["content"]}


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID


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
