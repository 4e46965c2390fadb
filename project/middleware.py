"""Five of Django's middleware, with their hooks run on the event loop.

Under ASGI, Django runs every hook of a ``MiddlewareMixin`` middleware (``process_request``,
``process_response``) through ``sync_to_async``: a hop to the request's thread and back, on
every request, for hooks that may block. These five only read and write the request and the
response, so here they are called where the request already is. That saves eight of the
demo's thirteen hops per request (docs/deployment.md). ``SessionMiddleware`` and
``MessageMiddleware`` keep Django's hops: their ``process_response`` may write to the database.

``project/settings.py`` wraps ``MIDDLEWARE`` in its ``Middleware`` list, so Django's deploy
checks, which look for the exact dotted paths of Django's own, find these five as Django's.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth import middleware as auth
from django.http import HttpRequest
from django.middleware import clickjacking, common, csrf, security
from django.utils.deprecation import MiddlewareMixin


class OnTheLoop(MiddlewareMixin):
    """In an async stack, call the hooks inline, as ``MiddlewareMixin.__call__`` does in a
    sync one; for middleware whose hooks never block (no database, no files, no network)."""

    def inline(self) -> bool:
        return True

    async def __acall__(self, request: HttpRequest) -> Any:
        if not self.inline():
            return await super().__acall__(request)
        response = None
        if hasattr(self, "process_request"):
            response = self.process_request(request)
        response = response or await self.get_response(request)
        if hasattr(self, "process_response"):
            response = self.process_response(request, response)
        return response


class SecurityMiddleware(OnTheLoop, security.SecurityMiddleware):
    pass


class CommonMiddleware(OnTheLoop, common.CommonMiddleware):
    pass


class CsrfViewMiddleware(OnTheLoop, csrf.CsrfViewMiddleware):
    """Inline only while the token lives in its cookie: with CSRF_USE_SESSIONS its hooks read
    and write the session, which may load or save it from the database."""

    def inline(self) -> bool:
        return not settings.CSRF_USE_SESSIONS


class AuthenticationMiddleware(OnTheLoop, auth.AuthenticationMiddleware):
    pass  # sets the lazy request.user and request.auser(); loading the user is left to them


class XFrameOptionsMiddleware(OnTheLoop, clickjacking.XFrameOptionsMiddleware):
    pass
