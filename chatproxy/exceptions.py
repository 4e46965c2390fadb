"""Errors chatproxy raises, each with a stable ``code`` that reaches the client.

    ChatproxyError
    ├── RequestError           the client must change its request; a 4xx before the first byte,
    │                          or an ``error`` frame on a WebSocket
    └── TurnError              a running turn ended early; the stream's terminal ``error`` event
        ├── UpstreamError      the upstream API failed, timed out or misbehaved
        ├── ServerShutdownError  the server stopped before the answer could finish
        ├── TurnCancelledError   a client stopped the answer
        ├── TurnRejectedError  an interceptor refused the turn on purpose
        ├── ContentBlockedError  a guardrail stopped the answer mid-stream
        └── ReservationExceededError  an answer went past what its turn reserved (budgets)

Messages are written for the person reading the error: they say what happened and what to do,
and never carry an API key, an upstream body or a traceback.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # models imports this module
    from .models import Message

ERROR_CODES: dict[str, str] = {
    # Client errors, answered before streaming (HTTP status in brackets).
    "invalid_json": "The body is not valid UTF-8 JSON (400).",
    "invalid_request": "The body is JSON but not the expected shape: wrong type or field (400).",
    "unknown_field": "The body has a field chatproxy does not accept (400).",
    "invalid_messages": "`messages` is missing, empty, or holds a malformed message (400).",
    "role_not_allowed": "A message has a role the client may not send (400).",
    "too_many_messages": "More messages than CHATPROXY_MAX_MESSAGES (400).",
    "too_many_characters": "More characters than CHATPROXY_MAX_CHARS (400).",
    "model_not_allowed": "The requested model is not in CHATPROXY_MODELS (400).",
    "parameter_not_allowed": "A sampling parameter not in CHATPROXY_PARAMETERS (400).",
    "invalid_parameter": "A parameter of the wrong type, or not one of its values (400).",
    "invalid_content_part": "A text or image_url content part of the wrong shape (400).",
    "part_type_not_allowed": "A part type not accepted (see CHATPROXY_EXTRA_PART_TYPES) (400).",
    "invalid_image": "An image that is no https: URL nor a base64 data:image URL (400).",
    "image_host_not_allowed": "An image URL's host is not in CHATPROXY_IMAGE_HOSTS (400).",
    "too_many_images": "More images than CHATPROXY_MAX_IMAGES (400).",
    "image_too_large": "The data-URL images add up to more than CHATPROXY_MAX_IMAGE_BYTES (400).",
    "invalid_tools": "`tools` is not a list of function tools with valid names and schemas (400).",
    "too_many_tools": "More tools than CHATPROXY_MAX_TOOLS (400).",
    "tools_too_large": "The tools take more JSON bytes than CHATPROXY_MAX_TOOLS_BYTES (400).",
    "invalid_tool_choice": "`tool_choice` is malformed, or names a function not in `tools` (400).",
    "invalid_response_format": "`response_format` is not text, json_object or json_schema (400).",
    "schema_too_large": "The json_schema is larger than CHATPROXY_MAX_SCHEMA_BYTES (400).",
    "invalid_stop": "`stop` is not a string or a list of 1 to 4 strings (400).",
    "invalid_tool_calls": "An assistant message's `tool_calls` is malformed (400).",
    "tool_results_mismatch": "The tool messages do not answer exactly the pending calls (400).",
    "invalid_approvals": '`approvals` is not a list of {"id", "approved"}, or comes '
    "without a conversation_id (400).",
    "approvals_mismatch": "The approvals do not answer exactly the calls waiting for approval "
    "(400).",
    "tool_name_taken": "A tool in `tools` has the name of a tool that runs on the server (400).",
    "authentication_required": "The request carries no logged-in user (401).",
    "invalid_api_key": "The Authorization: Bearer key is unknown or revoked (401).",
    "csrf_failed": "A request identified by a session cookie lacks a valid CSRF token (403).",
    "conversation_not_found": "No conversation with that id belongs to you (404).",
    "metrics_token_required": "The metrics endpoint needs Authorization: Bearer "
    "CHATPROXY_METRICS_TOKEN, or a superuser's session (401).",
    "metrics_off": "The metrics endpoint with CHATPROXY_METRICS off (404).",
    "invalid_rating": 'A rating is not {"value": "up" or "down", "comment": text} (400).',
    "message_not_found": "No answer with that id belongs to you, to rate; or regenerate, edit "
    "or a branch switch names no message of the conversation (404).",
    "invalid_branch": "regenerate or edit sent wrongly: both, without conversation_id, with "
    "messages to regenerate, or naming a message of the wrong role (400).",
    "invalid_title": "A rename whose title is not a string of 1 to 80 characters (400).",
    "conversation_streaming": "A delete while an answer streams in the conversation (409).",
    "method_not_allowed": "Only POST is accepted (405).",
    "unsupported_media_type": "The body is not sent as application/json (415).",
    "body_too_large": "The body is larger than CHATPROXY_MAX_BODY_BYTES (413).",
    "rate_limited": "More requests than CHATPROXY_RATE_LIMIT allows; see Retry-After (429).",
    "budget_exceeded": (
        "The turn's worst case does not fit a budget; see the message and Retry-After (429)."
    ),
    "too_many_streams": "More answers streaming at once than CHATPROXY_MAX_STREAMS (429).",
    "too_many_anonymous_streams": "More answers streaming to anonymous visitors than "
    "CHATPROXY_MAX_ANONYMOUS_STREAMS (429).",
    "too_many_followers": "A resume or watch past CHATPROXY_MAX_FOLLOWERS on the answer, or "
    "CHATPROXY_MAX_FOLLOWERS_PER_USER for the user (429; an error frame on a WebSocket).",
    # Errors after the first line: the terminal `error` event.
    "upstream_timeout": "The upstream did not answer, or went silent, within CHATPROXY_TIMEOUT.",
    "upstream_unreachable": "The upstream could not be reached.",
    "upstream_disconnected": "The upstream dropped the connection mid-answer.",
    "upstream_rate_limited": "The upstream refused the call with 429 (rate limit or quota).",
    "upstream_auth_failed": "The upstream refused the site's API key (401/403): a server fix.",
    "upstream_rejected": "The upstream refused the request (another 4xx), e.g. a context too long.",
    "upstream_error": "The upstream failed (5xx) or reported an error inside the stream.",
    "upstream_bad_response": "The upstream sent a chunk chatproxy could not read.",
    "model_not_served": "No upstream in CHATPROXY_UPSTREAMS serves the turn's model (an "
    "interceptor changed it to one no upstream serves): a server fix.",
    "internal_error": "chatproxy itself failed; the traceback is in the server log.",
    "interceptor_failed": "An interceptor raised an unexpected exception (logged with traceback).",
    "reservation_exceeded": "The answer went past the completion tokens its turn reserved "
    "against the budgets (the upstream ignored max_tokens): stopped, saved `failed` and "
    "charged what it used.",
    "too_many_tool_steps": "The model called server tools CHATPROXY_MAX_TOOL_STEPS times in a "
    "row without answering (saved `failed`).",
    "turn_rejected": "An interceptor refused the turn (saved `blocked`); it may use its own code.",
    "content_blocked": "A guardrail stopped the answer mid-stream (saved `blocked`).",
    "busy": "WebSocket only: a turn is already running on this socket.",
    "cancelled": "A cancel frame or POST …/cancel stopped the answer (saved `interrupted`).",
    "not_streaming": "POST …/cancel found no answer streaming in that conversation (409).",
    "invalid_idempotency_key": "The Idempotency-Key is empty or longer than 200 characters (400).",
    "server_shutdown": "The server shut down before the answer finished (saved `interrupted`).",
    "follower_too_slow": "A resume or watch fell too far behind the answer and was dropped; "
    "the answer itself goes on.",
    "worker_lost": "The worker generating the answer died: a resume serves the checkpointed "
    "text, then this (also saved by `markinterrupted`).",
    # Saved on an answer, never sent: nobody is listening any more.
    "client_disconnected": "Saved on an interrupted answer: the client left mid-turn.",
}


class ChatproxyError(Exception):
    """Raised for every failure chatproxy reports to a client; ``code`` is in ERROR_CODES."""

    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class RequestError(ChatproxyError):
    """Raised when the client's request is wrong; ``status`` is the HTTP answer."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int = 400,
        retry_after: int | None = None,
        allow: str | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.retry_after = retry_after
        self.allow = allow


class TurnError(ChatproxyError):
    """Raised to end a running turn; the saved answer gets ``status`` and ``code``."""

    status = "failed"


class UpstreamError(TurnError):
    """Raised when the upstream API fails, times out or sends something unreadable."""

    code = "upstream_error"


class ServerShutdownError(TurnError):
    """Raised when the server shuts down before a turn could finish within the grace period."""

    code = "server_shutdown"
    status = "interrupted"


class TurnCancelledError(TurnError):
    """Raised when a client stops a running turn (a cancel frame, or the cancel endpoint)."""

    code = "cancelled"
    status = "interrupted"


class TurnRejectedError(TurnError):
    """Raised by an interceptor to refuse a turn with its own code and message."""

    code = "turn_rejected"
    status = "blocked"


class ContentBlockedError(TurnError):
    """Raised when a guardrail stops an answer; the saved answer becomes ``blocked``."""

    code = "content_blocked"
    status = "blocked"


class ReservationExceededError(TurnError):
    """Raised when an answer passes the completion tokens its turn reserved against the
    budgets: an upstream that ignores ``max_tokens``. The answer so far is saved ``failed``."""

    code = "reservation_exceeded"


class DuplicateTurnError(Exception):
    """Raised when an idempotency key already belongs to a turn; ``answer_id`` is its answer.
    ``opening.open_turn`` loads that row into ``answer`` before the error reaches its caller.
    Not a ``ChatproxyError``: the transports answer it by replaying that turn."""

    answer: Message

    def __init__(self, answer_id: uuid.UUID) -> None:
        super().__init__(str(answer_id))
        self.answer_id = answer_id
