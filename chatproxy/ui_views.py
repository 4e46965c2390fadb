"""The Vercel AI SDK's chat endpoint: ``POST ui/chat``, ``GET ui/chat/<id>/stream`` (the
transport's ``reconnectToStream``) and ``POST ui/chat/<id>/cancel``.

A chat id is the client's (``useChat``'s ``id``); the conversation saved for it is the user's
own (``uistream.conversation_for``). The turn is chatproxy's (``open_turn``, ``run_turn``).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.views import View
from django.views.decorators.csrf import csrf_exempt

from . import database, followers, uistream
from .auth import identify
from .exceptions import DuplicateTurnError, RequestError
from .interception import InterceptorSpec
from .models import Status
from .opening import open_turn
from .owners import Owner
from .payload import validate_request
from .pipeline import run_turn
from .resume import latest_answer, open_replay
from .tools import ToolSpec
from .tools import load as load_tools
from .views import PRIVATE_HEADERS, STREAM_HEADERS, error_response, idempotency_key, read_json


def identify_user(request: HttpRequest) -> tuple[Owner, Any]:
    """Who chats: a logged-in user (with the CSRF token) or an API key; never anonymous."""
    owner, user = identify(request)
    if owner.user_id is None:
        raise RequestError(
            "authentication_required",
            "Log in, or send an API key as Authorization: Bearer <key>: chats kept under the "
            "AI SDK's chat ids need a user.",
            status=401,
        )
    return owner, user


class UIChatView(View):
    """Stream one turn of a ``useChat`` chat as the AI SDK's UI message stream.

    ``UIChatView.as_view(interceptors=[...], tools=[...])`` gives a URL its own interceptors
    and server tools.
    """

    http_method_names = ["post"]
    interceptors: Sequence[InterceptorSpec] | None = None  # None: CHATPROXY_INTERCEPTORS
    tools: Sequence[ToolSpec] | None = None  # None: CHATPROXY_TOOLS

    @classmethod
    def as_view(cls, **initkwargs: Any) -> Any:
        # CSRF is checked in identify(), for requests identified by a session cookie.
        return csrf_exempt(super().as_view(**initkwargs))

    async def post(self, request: HttpRequest) -> HttpResponseBase:
        try:
            try:
                key = idempotency_key(request)
                chat_id, body, continued = uistream.read_request(read_json(request))
                # The server holds the chat's history (if it has the chat): see read_request.
                chat = validate_request(body, continuing=True)
            except RequestError:
                await database.run(identify_user, request)  # 401/403 before 400
                raise
            try:
                turn = await open_turn(
                    functools.partial(identify_user, request),
                    chat,
                    interceptors=self.interceptors,
                    tools=self.tools,
                    idempotency_key=key,
                    conversation_for=lambda owner: uistream.conversation_for(owner.key, chat_id),
                )
                lines, server_tools = run_turn(turn), turn.tools.keys()
            except DuplicateTurnError as duplicate:  # the key's turn ran or runs: replay it
                owner, _ = await database.run(identify_user, request)
                lines = await open_replay(duplicate.answer, who=owner.key)
                server_tools = load_tools(self.tools).keys()
        except RequestError as exc:
            return error_response(exc)
        return _stream(lines, server_tools, continued)

    async def http_method_not_allowed(  # type: ignore[override]
        self, request: HttpRequest, *args: Any, **kwargs: Any
    ) -> HttpResponseBase:
        return error_response(
            RequestError("method_not_allowed", "Send the chat request with POST.", status=405)
        )


chat = UIChatView.as_view()


def _stream(
    lines: AsyncGenerator[bytes, None], server_tools: Any, continued: str | None = None
) -> StreamingHttpResponse:
    writer = uistream.Writer(server_tools, continued)
    return StreamingHttpResponse(
        uistream.encode(lines, writer),
        content_type="text/event-stream",
        headers={**STREAM_HEADERS, **uistream.HEADERS},
    )


async def resume(request: HttpRequest, chat_id: str) -> HttpResponseBase:
    """The chat's answer while it streams, from its start (the SDK replaces what it had); 204
    when none streams, which tells the SDK there is nothing to resume."""
    if request.method != "GET":
        return error_response(
            RequestError("method_not_allowed", "Use GET here.", status=405, allow="GET")
        )
    try:
        owner, _ = await database.run(identify_user, request)
        conversation_id = uistream.conversation_for(owner.key, uistream.check_chat_id(chat_id))
        answer = await latest_answer(owner, conversation_id)
        if answer is None or answer.status != Status.STREAMING:
            return HttpResponse(status=204, headers=PRIVATE_HEADERS)
        lines = await open_replay(answer, who=owner.key)
    except RequestError as exc:
        return error_response(exc)
    return _stream(lines, load_tools().keys())


@csrf_exempt  # checked in identify(), for requests identified by a session cookie
async def cancel(request: HttpRequest, chat_id: str) -> HttpResponseBase:
    """Stop the chat's running answer, wherever it runs (the SDK's ``stop()`` only stops
    reading it)."""
    if request.method != "POST":
        return error_response(
            RequestError("method_not_allowed", "Use POST here.", status=405, allow="POST")
        )
    try:
        owner, _ = await database.run(identify_user, request)
        conversation_id = uistream.conversation_for(owner.key, uistream.check_chat_id(chat_id))
        answer = await latest_answer(owner, conversation_id)
        if answer is None:
            raise RequestError(
                "conversation_not_found", "No chat with that id belongs to you.", status=404
            )
        if answer.status != Status.STREAMING or not await followers.cancel(answer.pk):
            raise RequestError(
                "not_streaming",
                "No answer is streaming in this chat, so there is nothing to stop.",
                status=409,
            )
    except RequestError as exc:
        return error_response(exc)
    return JsonResponse(
        {"cancelling": True, "message_id": str(answer.pk)}, status=202, headers=PRIVATE_HEADERS
    )
