"""Who is chatting: a bearer API key, or the session's user, shared by HTTP and WebSocket."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse
from django.middleware.csrf import CsrfViewMiddleware

from . import database
from .conf import conf
from .exceptions import RequestError
from .models import ApiKey, Owner


def user_from_bearer(authorization: str) -> Any | None:
    """Return the user of an ``Authorization: Bearer <key>`` header; None if there is no
    bearer header; raise ``invalid_api_key`` for a key that is unknown or revoked."""
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    user = ApiKey.objects.user_for(key.strip())
    if user is None:
        raise RequestError(
            "invalid_api_key",
            "The API key is unknown or revoked. Ask the site's staff for a new one.",
            status=401,
        )
    return user


def identify(request: HttpRequest, create_session: bool = True) -> tuple[Owner, Any]:
    """Return who is chatting and the user; raise if nobody may, or a cookie lacks CSRF.

    Synchronous, for chatproxy's database thread (``database.run``), where a turn does all of
    its reads and its first writes in one trip. ``create_session=False`` is for reads: an
    anonymous visitor without a session owns nothing.
    """
    bearer = user_from_bearer(request.headers.get("Authorization", ""))
    if bearer is not None:
        return Owner(user_id=bearer.pk), bearer  # no cookie, so no CSRF to check
    user = request.user  # set by AuthenticationMiddleware, which loads the session
    if user.is_authenticated:
        _check_csrf(request)
        return Owner(user_id=user.pk), user
    if not conf.CHATPROXY_ALLOW_ANONYMOUS:
        raise RequestError(
            "authentication_required", "Log in to chat: this endpoint needs a user.", status=401
        )
    if request.session.session_key is not None:
        # An anonymous session is an identity carried by a cookie, which another site's form
        # would send too. (A cookieless request has none to forge.)
        _check_csrf(request)
    if not create_session:
        return Owner(session_key=request.session.session_key or ""), user
    return Owner(session_key=session_key(request)), user


async def authenticate(request: HttpRequest, *, create_session: bool = True) -> tuple[Owner, Any]:
    """``identify()`` from async code, on chatproxy's database thread."""
    return await database.run(identify, request, create_session)


def _check_csrf(request: HttpRequest) -> None:
    """Refuse a request without the CSRF token, as Django's own views do (the middleware lets
    safe methods such as GET through)."""
    csrf = CsrfViewMiddleware(lambda r: HttpResponse())
    csrf.process_request(request)
    if csrf.process_view(request, _csrf_protected, (), {}) is not None:
        raise RequestError(
            "csrf_failed",
            "CSRF check failed. Send the csrftoken cookie's value in the X-CSRFToken header.",
            status=403,
        )


def _csrf_protected(request: HttpRequest) -> HttpResponse:
    """Stand in for a view when asking CsrfViewMiddleware, which skips csrf_exempt views."""
    raise NotImplementedError


def session_key(request: HttpRequest) -> str:
    """Return the session key that owns an anonymous user's conversations, creating it."""
    session = request.session
    if session.session_key is None:
        session["chatproxy"] = True  # marks the session modified, so the cookie is sent
        session.save()
    return str(session.session_key)
