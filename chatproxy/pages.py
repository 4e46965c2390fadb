"""The browser side: the chat page, and the two read-only JSON views it needs to list the
owner's conversations and reopen one.

The JSON views answer with the same ``{"error": {"code", "message"}}`` bodies as the completions
endpoint, and the same 404 for an id that does not exist as for someone else's, so ids cannot be
probed.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.apps import apps
from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.csrf import ensure_csrf_cookie

from .auth import authenticate
from .conf import conf
from .events import RatingBody
from .exceptions import RequestError
from .feedback import Rating
from .models import APPROVAL_REQUIRED, Conversation, Message
from .owners import Owner
from .views import PRIVATE_HEADERS, error_response

CONVERSATION_LIST_LIMIT = 50
# Where chatproxy.routing mounts the consumer; not reversible, since Django's URL resolver does
# not know WebSocket routes, and importing routing here would make channels a requirement.
WEBSOCKET_PATH = "/ws/chat/"
READ_METHODS = ("GET", "HEAD")


@ensure_csrf_cookie
async def chat_page(request: HttpRequest) -> HttpResponse:
    """Render the chat page; the cookie it sets is the CSRF token the page's requests send.

    It creates no session for an anonymous visitor (a page view must not cost a row): their
    first accepted turn over HTTP does, and sockets opened after it share it.
    """
    user = await request.auser()
    if not user.is_authenticated and not conf.CHATPROXY_ALLOW_ANONYMOUS:
        return redirect_to_login(request.get_full_path())
    context = {
        "username": user.get_username() if user.is_authenticated else "",
        # The switch is offered only when the project can route the consumer.
        "websocket_path": WEBSOCKET_PATH if apps.is_installed("channels") else "",
        # What an attached image may be, checked in the page before it is sent.
        "max_images": conf.CHATPROXY_MAX_IMAGES,
        "max_image_bytes": conf.CHATPROXY_MAX_IMAGE_BYTES,
        # The page offers the tools it runs itself (the browser's clock) where tools are allowed.
        "offer_tools": "tools" in conf.CHATPROXY_PARAMETERS,
    }
    response = render(request, "chatproxy/chat.html", context)
    for name, value in PRIVATE_HEADERS.items():  # it names the user, and sets their CSRF cookie
        response[name] = value
    return response


async def conversations(request: HttpRequest) -> HttpResponse:
    """List the owner's latest conversations, for the page's sidebar."""
    try:
        owner = await _read_owner(request)
    except RequestError as exc:
        return _answer_error(exc)
    if owner is None:
        return JsonResponse({"conversations": []}, headers=PRIVATE_HEADERS)
    rows = Conversation.objects.owned_by(owner).order_by("-updated_at", "-created_at")
    found = [
        {
            "id": str(c.pk),
            "title": c.title,
            "status": c.status,
            "model": c.model,
            "updated_at": c.updated_at.isoformat(),
        }
        async for c in rows[:CONVERSATION_LIST_LIMIT]
    ]
    return JsonResponse({"conversations": found}, headers=PRIVATE_HEADERS)


async def conversation(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponse:
    """Return one of the owner's conversations with its transcript, to continue it."""
    try:
        owner = await _read_owner(request)
        found = None
        if owner is not None:
            found = await Conversation.objects.owned_by(owner).filter(pk=conversation_id).afirst()
        if found is None:
            raise RequestError(
                "conversation_not_found",
                "No conversation with that id belongs to you. Pick one from the list.",
                status=404,
            )
    except RequestError as exc:
        return _answer_error(exc)
    rows = Message.objects.filter(conversation=found).order_by("position")
    ratings = {r.message_id: r.as_json() async for r in Rating.objects.filter(conversation=found)}
    messages: list[dict[str, Any]] = [_shown(m, ratings.get(m.pk)) async for m in rows]
    return JsonResponse(
        {"id": str(found.pk), "title": found.title, "messages": messages}, headers=PRIVATE_HEADERS
    )


def _shown(message: Message, rating: RatingBody | None) -> dict[str, Any]:
    """A saved message as the page draws it; parts, reasoning and tool calls when it has them,
    and an answer's rating."""
    shown: dict[str, Any] = {
        "id": str(message.pk),
        "role": message.role,
        "content": message.content,
        "status": message.status,
    }
    for name in ("parts", "reasoning", "tool_calls", "tool_call_id"):
        if value := getattr(message, name):
            shown[name] = value
    if rating is not None:
        shown["rating"] = rating
    if message.finish_reason == APPROVAL_REQUIRED and isinstance(message.metadata, dict):
        shown[APPROVAL_REQUIRED] = message.metadata.get(APPROVAL_REQUIRED, [])
    return shown


async def _read_owner(request: HttpRequest) -> Owner | None:
    """Return whose conversations this request may read; None for a visitor with no session yet.

    Reading needs no CSRF token (a cross-site page cannot read the answer), and, unlike a chat
    turn, never creates a session: a visitor without one simply has no conversations.
    """
    if request.method not in READ_METHODS:
        raise RequestError("method_not_allowed", "Read conversations with GET.", status=405)
    # The same doors as a chat turn: a bearer API key, the session's user, or anonymous chat.
    owner, _ = await authenticate(request)
    return None if owner.is_new else owner


def _answer_error(exc: RequestError) -> JsonResponse:
    response = error_response(exc)
    if exc.status == 405:
        response["Allow"] = ", ".join(READ_METHODS)  # error_response names the chat's POST
    return response
