"""The HTTP transport: check the request, then stream the turn's NDJSON lines."""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from asgiref.sync import sync_to_async
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.http.request import RawPostDataException
from django.http.response import HttpResponseBase
from django.views import View
from django.views.decorators.csrf import csrf_exempt

from . import database, followers, sse
from .auth import authenticate, identify, open_session
from .budgets import report
from .conf import conf
from .detach import detached
from .exceptions import DuplicateTurnError, RequestError
from .feedback import Rating, read_rating
from .interception import InterceptorSpec
from .models import Message, Status
from .opening import open_turn
from .owners import Owner
from .payload import ChatRequest, decode_json, validate_request
from .pipeline import run_turn
from .resume import last_answer, latest_answer, open_replay
from .tools import ToolSpec

# Every answer here depends on who asks (the session cookie or the bearer key) and may carry a
# transcript: no cache, the browser's included, may keep it or hand it to someone else.
PRIVATE_HEADERS = {"Cache-Control": "private, no-store", "Vary": "Cookie, Authorization"}
# no-transform: a proxy that compresses or re-chunks the body would hold back its lines.
STREAM_HEADERS = {
    **PRIVATE_HEADERS,
    "Cache-Control": "private, no-store, no-transform",
    "X-Accel-Buffering": "no",
}


def error_response(exc: RequestError) -> JsonResponse:
    """Return the 4xx JSON answer ``{"error": {"code", "message"}}`` for ``exc``."""
    response = JsonResponse(
        {"error": {"code": exc.code, "message": exc.message}},
        status=exc.status,
        headers=PRIVATE_HEADERS,
    )
    if exc.status == 405:
        response["Allow"] = exc.allow or "POST"
    if exc.status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="chatproxy"'
    if exc.retry_after is not None:
        response["Retry-After"] = str(exc.retry_after)
    return response


class CompletionsView(View):
    """Stream one chat turn as NDJSON: ``analyzing``, ``answering``…, ``completed``/``error``.

    ``CompletionsView.as_view(interceptors=[...], tools=[...])`` gives a URL its own interceptors
    and server tools.
    """

    http_method_names = ["post"]
    interceptors: Sequence[InterceptorSpec] | None = None  # None: CHATPROXY_INTERCEPTORS
    tools: Sequence[ToolSpec] | None = None  # None: CHATPROXY_TOOLS

    @classmethod
    def as_view(cls, **initkwargs: Any) -> Any:
        # CSRF is checked in authenticate(), for requests identified by a session cookie.
        return csrf_exempt(super().as_view(**initkwargs))

    async def post(self, request: HttpRequest) -> HttpResponseBase:
        try:
            try:
                key = idempotency_key(request)
                chat = read_chat_request(request)
            except RequestError:
                await authenticate(request)  # who asks is answered first: 401/403 before 400
                raise
            try:
                turn = await open_turn(
                    functools.partial(identify, request),
                    chat,
                    interceptors=self.interceptors,
                    tools=self.tools,
                    idempotency_key=key,
                    open_session=functools.partial(open_session, request),
                )
                lines = detached(run_turn(turn)) if chat.detach else run_turn(turn)
            except DuplicateTurnError as duplicate:  # the key's turn ran or runs: replay it
                owner, _ = await authenticate(request)
                lines = await open_replay(duplicate.answer, who=owner.key)
        except RequestError as exc:
            return error_response(exc)
        return stream_response(request, lines)

    async def http_method_not_allowed(  # type: ignore[override]
        self, request: HttpRequest, *args: Any, **kwargs: Any
    ) -> HttpResponseBase:
        return error_response(
            RequestError("method_not_allowed", "Send the chat request with POST.", status=405)
        )


completions = CompletionsView.as_view()


async def resume(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponseBase:
    """Re-attach to a conversation's latest answer (or ``?message_id=``'s, on any branch): the
    text so far, then the rest live from whichever worker generates it, ending with the turn's
    own terminal event."""
    if request.method != "GET":
        return error_response(_not_allowed("GET"))
    try:
        owner, _ = await authenticate(request)
        answer = await _owned_answer(owner, conversation_id, request)
        after = sse.Cursor.parse(request.headers.get("Last-Event-ID", ""))
        if after is not None and after.ended and after.message_id == str(answer.pk):
            # An EventSource that got the terminal event reconnects: 204 tells it to stop.
            return HttpResponse(status=204, headers=PRIVATE_HEADERS)
        lines = await open_replay(answer, who=owner.key)
    except RequestError as exc:
        return error_response(exc)
    return stream_response(request, lines, after)


@csrf_exempt  # checked in authenticate(), for requests identified by a session cookie
async def cancel(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponseBase:
    """Stop the conversation's running answer (or ``?message_id=``'s) in whichever worker
    generates it."""
    if request.method != "POST":
        return error_response(_not_allowed("POST"))
    try:
        owner, _ = await authenticate(request)
        answer = await _owned_answer(owner, conversation_id, request)
        if answer.status != Status.STREAMING or not await followers.cancel(answer.pk):
            raise RequestError(
                "not_streaming",
                "No answer is streaming in this conversation, so there is nothing to stop.",
                status=409,
            )
    except RequestError as exc:
        return error_response(exc)
    return JsonResponse(
        {"cancelling": True, "message_id": str(answer.pk)}, status=202, headers=PRIVATE_HEADERS
    )


async def watch(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponseBase:
    """Follow any conversation's latest answer (or ``?message_id=``'s) live: for staff who may
    view transcripts."""
    user = await request.auser()
    allowed = user.is_active and user.is_staff
    if allowed:
        allowed = await sync_to_async(user.has_perm)("chatproxy.view_conversation")
    try:
        message_id = _message_id(request)
        answer = await last_answer(conversation_id, message_id) if allowed else None
        if answer is None:
            raise _not_found()
        lines = await open_replay(answer, who=f"user:{user.pk}")
    except RequestError as exc:
        return error_response(exc)
    return stream_response(request, lines)


def stream_response(
    request: HttpRequest, lines: AsyncGenerator[bytes, None], after: sse.Cursor | None = None
) -> StreamingHttpResponse:
    """Stream a turn's lines as NDJSON, or as server-sent events when ``Accept`` asks for
    ``text/event-stream`` (then skipping what the ``Last-Event-ID`` cursor ``after`` covers)."""
    headers = {**STREAM_HEADERS, "Vary": "Cookie, Authorization, Accept"}
    if sse.wants_sse(request):
        return StreamingHttpResponse(
            sse.encode(lines, after), content_type=sse.CONTENT_TYPE, headers=headers
        )
    return StreamingHttpResponse(lines, content_type="application/x-ndjson", headers=headers)


async def budgets(request: HttpRequest) -> HttpResponseBase:
    """Tell the caller their budgets: each one's limits, what is used and left, and when it
    resets (``[]`` when CHATPROXY_BUDGETS is off)."""
    if request.method != "GET":
        return error_response(_not_allowed("GET"))
    try:
        shown = await database.run(_budgets, request)
    except RequestError as exc:
        return error_response(exc)
    return JsonResponse({"budgets": shown}, headers=PRIVATE_HEADERS)


def _budgets(request: HttpRequest) -> list[dict[str, Any]]:
    owner, user = identify(request)
    return report(owner, user)


@csrf_exempt  # checked in authenticate(), for requests identified by a session cookie
async def rate(request: HttpRequest, message_id: uuid.UUID) -> HttpResponseBase:
    """Rate one of the owner's answers up or down, with an optional comment; rating it again
    changes the rating. Anyone else's answer, or an unknown id, is a 404."""
    if request.method != "POST":
        return error_response(_not_allowed("POST"))
    try:
        owner, _ = await authenticate(request)  # who asks is answered first: 401/403 before 400
        value, comment = read_rating(read_json(request))
        rating = await database.run(Rating.objects.rate, owner, message_id, value, comment)
    except RequestError as exc:
        return error_response(exc)
    return JsonResponse({"rating": rating.as_json()}, headers=PRIVATE_HEADERS)


async def _owned_answer(owner: Owner, conversation_id: uuid.UUID, request: HttpRequest) -> Message:
    """The latest answer of the owner's conversation, on any branch, or the one the query's
    ``message_id`` names; 404 for anyone else's."""
    answer = await latest_answer(owner, conversation_id, _message_id(request))
    if answer is None:
        raise _not_found()
    return answer


def _message_id(request: HttpRequest) -> uuid.UUID | None:
    """The query's ``message_id``: an answer on any branch; a malformed one finds nothing."""
    raw = request.GET.get("message_id")
    if raw is None:
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise _not_found() from None


def _not_found() -> RequestError:
    return RequestError(
        "conversation_not_found", "No conversation with that id belongs to you.", status=404
    )


def _not_allowed(method: str) -> RequestError:
    return RequestError("method_not_allowed", f"Use {method} here.", status=405, allow=method)


def idempotency_key(request: HttpRequest) -> str:
    """The ``Idempotency-Key`` header: a retried submission attaches to the turn it started."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return ""
    key = key.strip()
    if not key or len(key) > 200:
        raise RequestError(
            "invalid_idempotency_key",
            "Idempotency-Key must be 1 to 200 characters, such as a UUID.",
        )
    return key


def read_chat_request(request: HttpRequest) -> ChatRequest:
    """Check the body's size, type and content; the limits come from the settings."""
    return validate_request(read_json(request))


def read_json(request: HttpRequest) -> Any:
    """The JSON body, once its size and content type are checked."""
    limit = conf.CHATPROXY_MAX_BODY_BYTES
    too_large = RequestError(
        "body_too_large", f"The body is larger than {limit} bytes. Send less.", status=413
    )
    try:
        if int(request.headers.get("Content-Length") or 0) > limit:
            raise too_large
        body = request.body
    except (RequestDataTooBig, RawPostDataException, ValueError):
        raise too_large from None
    if len(body) > limit:
        raise too_large
    if request.content_type != "application/json":
        raise RequestError(
            "unsupported_media_type",
            "Send the body as JSON with the header Content-Type: application/json.",
            status=415,
        )
    return decode_json(body)
