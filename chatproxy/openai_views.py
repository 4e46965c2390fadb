"""The OpenAI-compatible HTTP API: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Existing code that uses an OpenAI SDK points its ``base_url`` at the site and its ``api_key``
at a chatproxy API key: the turn is chatproxy's own (``open_turn``, ``run_turn``), with the
user's limits, interceptors, tools and saved conversation; only the wire is OpenAI's.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from django.http import HttpRequest, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.views import View
from django.views.decorators.csrf import csrf_exempt

from . import database, openai_api
from .auth import identify
from .exceptions import DuplicateTurnError, RequestError
from .interception import InterceptorSpec
from .limits import allowed_models
from .opening import open_turn
from .owners import Owner
from .pipeline import run_turn
from .resume import open_replay
from .tools import ToolSpec
from .views import PRIVATE_HEADERS, STREAM_HEADERS, idempotency_key, read_json

CONVERSATION_HEADER = "Chatproxy-Conversation-Id"


def error_response(exc: RequestError) -> JsonResponse:
    """A 4xx in OpenAI's error shape, which the SDKs raise as their own exceptions."""
    response = JsonResponse(
        openai_api.error_body(exc.code, exc.message, exc.status),
        status=exc.status,
        headers=PRIVATE_HEADERS,
    )
    if exc.status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="chatproxy"'
    if exc.status == 405:
        response["Allow"] = exc.allow or "POST"
    if exc.retry_after is not None:
        response["Retry-After"] = str(exc.retry_after)
    return response


def identify_key(request: HttpRequest) -> tuple[Owner, Any]:
    """Who calls: only a chatproxy API key (``Authorization: Bearer``), as OpenAI's API."""
    if not request.headers.get("Authorization", "").lower().startswith("bearer "):
        raise RequestError(
            "authentication_required",
            "Send your chatproxy API key as the header Authorization: Bearer <key> (the SDKs' "
            "api_key).",
            status=401,
        )
    return identify(request)


class ChatCompletionsView(View):
    """OpenAI's ``POST /v1/chat/completions``, streaming (``"stream": true``) or not."""

    http_method_names = ["post"]
    interceptors: Sequence[InterceptorSpec] | None = None  # None: CHATPROXY_INTERCEPTORS
    tools: Sequence[ToolSpec] | None = None  # None: CHATPROXY_TOOLS

    @classmethod
    def as_view(cls, **initkwargs: Any) -> Any:
        return csrf_exempt(super().as_view(**initkwargs))  # a bearer key only: no cookie

    async def post(self, request: HttpRequest) -> HttpResponseBase:
        try:
            try:
                key = idempotency_key(request)
                chat, streaming, usage = openai_api.read_request(read_json(request))
            except RequestError:
                await database.run(identify_key, request)  # 401 before 400
                raise
            writer = openai_api.Writer(chat.model, usage_chunk=usage)
            try:
                turn = await open_turn(
                    functools.partial(identify_key, request),
                    chat,
                    interceptors=self.interceptors,
                    tools=self.tools,
                    idempotency_key=key,
                )
                lines, conversation_id = run_turn(turn), str(turn.conversation_id)
            except DuplicateTurnError as duplicate:  # a retry of a call that ran: replay it
                owner, _ = await database.run(identify_key, request)
                lines = await open_replay(duplicate.answer, who=owner.key)
                conversation_id = str(duplicate.answer.conversation_id)
        except RequestError as exc:
            return error_response(exc)
        headers = {CONVERSATION_HEADER: conversation_id}
        if streaming:
            return StreamingHttpResponse(
                openai_api.stream(lines, writer),
                content_type="text/event-stream",
                headers={**STREAM_HEADERS, **headers},
            )
        try:
            completion = await openai_api.collect(lines, writer)
        except openai_api.TurnFailed as failed:
            status = openai_api.turn_status(failed.code)
            body = openai_api.error_body(failed.code, failed.message, status)
            return JsonResponse(body, status=status, headers={**PRIVATE_HEADERS, **headers})
        return JsonResponse(completion, headers={**PRIVATE_HEADERS, **headers})

    async def http_method_not_allowed(  # type: ignore[override]
        self, request: HttpRequest, *args: Any, **kwargs: Any
    ) -> HttpResponseBase:
        return error_response(
            RequestError("method_not_allowed", "Send chat completions with POST.", status=405)
        )


chat_completions = ChatCompletionsView.as_view()


async def models(request: HttpRequest) -> HttpResponseBase:
    """OpenAI's ``GET /v1/models``: the models the key's user may ask for."""
    if request.method != "GET":
        return error_response(
            RequestError("method_not_allowed", "Use GET here.", status=405, allow="GET")
        )
    try:
        names = await database.run(_models, request)
    except RequestError as exc:
        return error_response(exc)
    return JsonResponse(openai_api.model_list(names), headers=PRIVATE_HEADERS)


def _models(request: HttpRequest) -> list[str]:
    _, user = identify_key(request)
    return list(dict.fromkeys(allowed_models(user)))
