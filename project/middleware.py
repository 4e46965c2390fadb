"""Django's seven middleware of the demo, with their hooks run on the event loop.

Under ASGI, Django runs every hook of a ``MiddlewareMixin`` middleware (``process_request``,
``process_view``, ``process_response``) through ``sync_to_async``: a hop to the request's
thread and back, on every request, for hooks that may block. Five of these only ever read and
write the request and the response, so here they are called where the request already is. The
session's and the messages' hooks may reach the database (saving a modified session; reading
stored messages loads it), so those hop as Django's do, but only on the requests where they
might: a chat turn neither changes its session nor reads messages. Together that saves the
demo's thirteen hops per such request (docs/deployment.md).

``project/settings.py`` wraps ``MIDDLEWARE`` in its ``Middleware`` list, so Django's deploy
checks, which look for the exact dotted paths of Django's own, find these as Django's.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import middleware as auth
from django.contrib.messages import middleware as messages
from django.contrib.sessions import middleware as sessions
from django.http import HttpRequest, HttpResponseBase
from django.middleware import clickjacking, common, csrf, security
from django.utils.deprecation import MiddlewareMixin


class OnTheLoop(MiddlewareMixin):
    """In an async stack, call the hooks inline, as ``MiddlewareMixin.__call__`` does in a
    sync one; for middleware whose hooks never block (no database, no files, no network), or
    that say, request by request, when one might (then it hops as Django's would)."""

    def __init__(self, get_response: Any) -> None:
        super().__init__(get_response)
        if self.async_mode and hasattr(self, "process_view"):
            # Django adapts a synchronous process_view with a hop; an async one it calls as is.
            self.process_view = self._process_view_on_the_loop  # type: ignore[method-assign]

    def inline(self) -> bool:
        return True

    async def _process_view_on_the_loop(self, request: HttpRequest, *view: Any) -> Any:
        hook = type(self).process_view.__get__(self)  # the class's own, synchronous one
        if self.inline():
            return hook(request, *view)
        return await sync_to_async(hook, thread_sensitive=True)(request, *view)

    def inline_response(self, request: HttpRequest, response: HttpResponseBase) -> bool:
        return True

    async def __acall__(self, request: HttpRequest) -> Any:
        if not self.inline():
            return await super().__acall__(request)
        response = None
        if hasattr(self, "process_request"):
            response = self.process_request(request)
        response = response or await self.get_response(request)
        if hasattr(self, "process_response"):
            if self.inline_response(request, response):
                response = self.process_response(request, response)
            else:
                hook = sync_to_async(self.process_response, thread_sensitive=True)
                response = await hook(request, response)
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


class SessionMiddleware(OnTheLoop, sessions.SessionMiddleware):
    """Its ``process_request`` only makes the lazy session. Its ``process_response`` saves it,
    which hops, when it was modified (or every request, if SESSION_SAVE_EVERY_REQUEST says
    so); otherwise it only sets ``Vary`` or deletes the cookie of an emptied session."""

    def inline_response(self, request: HttpRequest, response: HttpResponseBase) -> bool:
        session = getattr(request, "session", None)
        if session is None:
            return True
        saving = session.modified or settings.SESSION_SAVE_EVERY_REQUEST
        return not saving or session.is_empty()


class AuthenticationMiddleware(OnTheLoop, auth.AuthenticationMiddleware):
    pass  # sets the lazy request.user and request.auser(); loading the user is left to them


class MessageMiddleware(OnTheLoop, messages.MessageMiddleware):
    """Its ``process_request`` only makes the storage. Its ``process_response`` stores the
    messages, which may first load those already stored (from the session, so the database):
    it hops when the request read or added messages, and is a no-op otherwise."""

    def inline_response(self, request: HttpRequest, response: HttpResponseBase) -> bool:
        storage = getattr(request, "_messages", None)
        return storage is None or not (storage.used or storage.added_new)


class XFrameOptionsMiddleware(OnTheLoop, clickjacking.XFrameOptionsMiddleware):
    pass
