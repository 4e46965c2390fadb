"""The HTTP transport: check the request, then stream the turn's NDJSON lines."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.contrib.auth.models import AnonymousUser
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.http.request import RawPostDataException
from django.http.response import HttpResponseBase
from django.middleware.csrf import CsrfViewMiddleware
from django.views import View
from django.views.decorators.csrf import csrf_exempt

from .auth import user_from_bearer
from .conf import conf
from .exceptions import RequestError
from .interception import InterceptorSpec
from .models import Owner
from .payload import ChatRequest, decode_json, validate_request
from .pipeline import prepare_turn, run_turn

STREAM_HEADERS = {
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
}


def error_response(exc: RequestError) -> JsonResponse:
    """Return the 4xx JSON answer ``{"error": {"code", "message"}}`` for ``exc``."""
    response = JsonResponse(
        {"error": {"code": exc.code, "message": exc.message}}, status=exc.status
    )
    if exc.status == 405:
        response["Allow"] = "POST"
    if exc.status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="chatproxy"'
    if exc.retry_after is not None:
        response["Retry-After"] = str(exc.retry_after)
    return response


class CompletionsView(View):
    """Stream one chat turn as NDJSON: ``analyzing``, ``answering``…, ``completed``/``error``.

    ``CompletionsView.as_view(interceptors=[...])`` gives a URL its own interceptors.
    """

    http_method_names = ["post"]
    interceptors: Sequence[InterceptorSpec] | None = None  # None: CHATPROXY_INTERCEPTORS

    @classmethod
    def as_view(cls, **initkwargs: Any) -> Any:
        # CSRF is checked in authenticate(), for session-authenticated requests only.
        return csrf_exempt(super().as_view(**initkwargs))

    async def post(self, request: HttpRequest) -> HttpResponseBase:
        try:
            owner, user = await authenticate(request)
            chat = read_chat_request(request)
            turn = await prepare_turn(owner, chat, user=user, interceptors=self.interceptors)
        except RequestError as exc:
            return error_response(exc)
        return StreamingHttpResponse(
            run_turn(turn), content_type="application/x-ndjson", headers=STREAM_HEADERS
        )

    async def http_method_not_allowed(  # type: ignore[override]
        self, request: HttpRequest, *args: Any, **kwargs: Any
    ) -> HttpResponseBase:
        return error_response(
            RequestError("method_not_allowed", "Send the chat request with POST.", status=405)
        )


completions = CompletionsView.as_view()


async def authenticate(request: HttpRequest) -> tuple[Owner, Any]:
    """Return who is chatting and the user; raise if nobody may, or a session lacks CSRF."""
    bearer = await user_from_bearer(request.headers.get("Authorization", ""))
    if bearer is not None:
        return Owner(user_id=bearer.pk), bearer  # no cookie, so no CSRF to check
    user = await request.auser()
    if user.is_authenticated:
        # Like Django's own views, a session-authenticated request must carry the CSRF token.
        csrf = CsrfViewMiddleware(lambda r: HttpResponse())
        csrf.process_request(request)
        if csrf.process_view(request, _csrf_protected, (), {}) is not None:
            raise RequestError(
                "csrf_failed",
                "CSRF check failed. Send the csrftoken cookie's value in the X-CSRFToken header.",
                status=403,
            )
        return Owner(user_id=user.pk), user
    if not conf.CHATPROXY_ALLOW_ANONYMOUS:
        raise RequestError(
            "authentication_required", "Log in to chat: this endpoint needs a user.", status=401
        )
    return Owner(session_key=await anonymous_session_key(request, user)), user


def _csrf_protected(request: HttpRequest) -> HttpResponse:
    """Stand in for this view when asking CsrfViewMiddleware, which skips csrf_exempt views."""
    raise NotImplementedError


async def anonymous_session_key(request: HttpRequest, user: AnonymousUser) -> str:
    """Return the session key that owns an anonymous user's conversations, creating it."""
    session = request.session
    if session.session_key is None:
        session["chatproxy"] = True  # marks the session modified, so the cookie is sent
        await session.asave()
    return str(session.session_key)


def read_chat_request(request: HttpRequest) -> ChatRequest:
    """Check the body's size, type and content; the limits come from the settings."""
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
    return validate_request(decode_json(body))
