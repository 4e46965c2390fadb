"""The WebSocket's CSRF defence: a browser's handshake must come from the site itself.

Django's CSRF check refuses a POST whose ``Origin`` is not the request's own scheme, host and
port, or an entry of ``CSRF_TRUSTED_ORIGINS``; a WebSocket gets no CSRF check, so the same rule
is applied here, at the handshake. Channels' ``AllowedHostsOriginValidator`` compares host names
only, so a page on another port or scheme of the same host could chat as a logged-in user.
"""

from __future__ import annotations

import io
from urllib.parse import urlsplit

from asgiref.typing import (
    ASGI3Application,
    ASGIReceiveCallable,
    ASGISendCallable,
    Scope,
    WebSocketScope,
)
from channels.security.websocket import WebsocketDenier
from django.core.exceptions import DisallowedHost
from django.core.handlers.asgi import ASGIRequest
from django.utils.http import is_same_domain

from .conf import conf

SCHEMES = {"ws": "http", "wss": "https"}


class OriginValidator:
    """Wrap the WebSocket application: refuse (HTTP 403) a handshake whose ``Origin`` another
    site sent, or whose ``Host`` is not in ``ALLOWED_HOSTS``.

    A handshake without ``Origin`` is let through: browsers always send one, so it comes from
    another kind of client, which ``ChatConsumer`` authenticates by bearer key only.
    """

    def __init__(self, application: ASGI3Application) -> None:
        self.application = application

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "websocket" and not origin_allowed(scope):
            await WebsocketDenier()(scope, receive, send)
            return
        await self.application(scope, receive, send)


def origin_allowed(scope: WebSocketScope) -> bool:
    """Whether a handshake passes the rule of Django's CSRF origin check (``_origin_verified``
    in ``django/middleware/csrf.py``), with its host checked as every Django request's is."""
    # The handshake as Django sees a request: Host, X-Forwarded-Host and SECURE_PROXY_SSL_HEADER
    # are then read by Django's own code, and the socket's ws/wss scheme counts as http/https.
    scheme = scope.get("scheme", "ws")
    scheme = SCHEMES.get(scheme, scheme)
    request = ASGIRequest({**scope, "method": "GET", "scheme": scheme}, io.BytesIO())
    try:
        host = request.get_host()
    except DisallowedHost:
        return False
    origin = request.META.get("HTTP_ORIGIN")
    if origin is None:
        return True
    if origin == f"{'https' if request.is_secure() else 'http'}://{host}":
        return True
    trusted = conf.trusted_origins
    if origin in {entry for entry in trusted if "*" not in entry}:
        return True
    try:
        parsed = urlsplit(origin)
    except ValueError:
        return False
    return any(
        is_same_domain(parsed.netloc, entry.netloc.lstrip("*"))
        for entry in map(urlsplit, (entry for entry in trusted if "*" in entry))
        if entry.scheme == parsed.scheme
    )
