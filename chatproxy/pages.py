"""The browser side: the chat page, and the JSON views over the owner's conversations
(``conversations``): list and search them, read, rename and delete one, list and switch its
branches.

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
from django.views.decorators.csrf import csrf_exempt, ensure_csrf_cookie

from . import conversations as library
from . import database
from .auth import authenticate
from .conf import conf
from .exceptions import RequestError
from .owners import Owner
from .views import PRIVATE_HEADERS, error_response, read_json

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
        # The page shows the caller's budgets (GET budgets) only where budgets are on.
        "budgets_on": conf.CHATPROXY_BUDGETS is not None,
    }
    response = render(request, "chatproxy/chat.html", context)
    for name, value in PRIVATE_HEADERS.items():  # it names the user, and sets their CSRF cookie
        response[name] = value
    return response


async def conversations(request: HttpRequest) -> HttpResponse:
    """List the owner's conversations, a page at a time (``?page=``, ``?limit=``), the latest
    first; ``?q=`` keeps those whose title or messages hold it."""
    try:
        owner = await _read_owner(request)
        query = request.GET.get("q", "").strip()[: library.MAX_QUERY]
        page = _whole(request.GET.get("page", "1"), "page", 1, None)
        size = request.GET.get("limit", str(library.PAGE_SIZE))
        limit = _whole(size, "limit", 1, library.MAX_PAGE_SIZE)
    except RequestError as exc:
        return _answer_error(exc)
    if owner is None:
        body: dict[str, Any] = {"conversations": [], "page": page, "next_page": None}
    else:
        body = await database.run(library.listing, owner, query, page, limit)
    return JsonResponse(body, headers=PRIVATE_HEADERS)


def _whole(value: str, name: str, low: int, high: int | None) -> int:
    number = int(value) if value.isdigit() else 0
    if number < low or (high is not None and number > high):
        upto = f" to {high}" if high is not None else " or more"
        raise RequestError("invalid_request", f"{name} must be a whole number from {low}{upto}.")
    return number


@csrf_exempt  # checked in authenticate(), for requests identified by a session cookie
async def conversation(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponse:
    """One of the owner's conversations: GET its transcript (the active branch), PATCH
    ``{"title"}`` to rename it, DELETE it (as CHATPROXY_DELETE says)."""
    try:
        if request.method in READ_METHODS:
            owner = await _read_owner(request)
            if owner is None:
                raise library.not_found()
            body = await database.run(library.transcript, owner, conversation_id)
        elif request.method == "PATCH":
            owner = await _write_owner(request)
            title = _json_body(request).get("title")
            body = await database.run(library.rename, owner, conversation_id, title)
        elif request.method == "DELETE":
            owner = await _write_owner(request)
            body = await database.run(library.delete, owner, conversation_id)
        else:
            raise RequestError(
                "method_not_allowed",
                "Read a conversation with GET, rename it with PATCH, delete it with DELETE.",
                status=405,
                allow="GET, HEAD, PATCH, DELETE",
            )
    except RequestError as exc:
        return error_response(exc)
    return JsonResponse(body, headers=PRIVATE_HEADERS)


async def branches(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponse:
    """List the conversation's branches: each one's leaf, length and last question."""
    try:
        owner = await _read_owner(request)
        if owner is None:
            raise library.not_found()
        body = await database.run(library.branches, owner, conversation_id)
    except RequestError as exc:
        return _answer_error(exc)
    return JsonResponse(body, headers=PRIVATE_HEADERS)


@csrf_exempt  # checked in authenticate(), for requests identified by a session cookie
async def branch(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponse:
    """Switch the conversation to the branch through ``{"message_id"}``; answer with the new
    transcript. The next turn continues that branch."""
    try:
        if request.method != "POST":
            raise RequestError(
                "method_not_allowed", "Switch branch with POST.", status=405, allow="POST"
            )
        owner = await _write_owner(request)
        message_id = _json_body(request).get("message_id")
        body = await database.run(library.switch, owner, conversation_id, message_id)
    except RequestError as exc:
        return error_response(exc)
    return JsonResponse(body, headers=PRIVATE_HEADERS)


async def _write_owner(request: HttpRequest) -> Owner:
    """Who changes a conversation: the same doors as a chat turn, CSRF checked for a cookie;
    a visitor without a session has nothing to change."""
    owner, _ = await authenticate(request)
    if owner.is_new:
        raise library.not_found()
    return owner


def _json_body(request: HttpRequest) -> dict[str, Any]:
    data = read_json(request)
    if not isinstance(data, dict):
        raise RequestError("invalid_request", "The body must be a JSON object.")
    return data


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
