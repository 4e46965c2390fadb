"""Django's thread per request, reused: an ASGI wrapper for the HTTP application.

Under ASGI, Django runs a request's synchronous work (the receivers of ``request_started`` and
``request_finished``, a sync view, a sync middleware hook) on a thread of the request's own.
asgiref starts that thread at the request's first such call and, when the request ends, joins
it from one more thread started for that: two threads started and joined per request, where a
chat turn's own synchronous work takes a few microseconds. ``ReusedThreads(app)`` keeps the
rule (one thread per request, never shared by two at once) and hands each request a thread an
earlier request finished with, through asgiref's ``ThreadSensitiveContext`` with an executor
(asgiref 3.13+).

A task that outlives its request must not make thread-sensitive calls from the request's
context: asgiref raises ``RuntimeError`` for them once the request has ended. A detached turn
runs in a context of its own for that reason (``detach``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from asgiref.sync import ThreadSensitiveContext
from django.db import connections

P = ParamSpec("P")
T = TypeVar("T")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

THREAD_PREFIX = "django-request"


class RequestThread(ThreadPoolExecutor):
    """One thread, started by the first work given to it, and whether that work is still
    running (a request that ended while a sync call of its ran: the call goes on to its end,
    and the thread is not handed out)."""

    def __init__(self, prefix: str = THREAD_PREFIX) -> None:
        super().__init__(max_workers=1, thread_name_prefix=prefix)
        self.pending: set[Future[Any]] = set()
        self.used = False

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        self.used = True
        future = super().submit(fn, *args, **kwargs)
        self.pending.add(future)
        future.add_done_callback(self.pending.discard)
        return future

    def retire(self) -> None:
        """End the thread once its work is done, closing the database connections the work
        opened on it (Django's are per thread, and nothing else would close them)."""
        if self.used:
            super().submit(connections.close_all)
        self.shutdown(wait=False)


class ReusedThreads:
    """Wrap Django's ASGI application (``get_asgi_application()``) so that each HTTP request
    runs its synchronous work on a reused thread. At most ``keep`` idle threads are kept; a
    burst beyond them starts threads that end with their request."""

    def __init__(self, app: ASGIApp, keep: int = 64) -> None:
        self.app = app
        self.keep = keep
        self.idle: list[RequestThread] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        thread = self.idle.pop() if self.idle else RequestThread()
        try:
            async with ThreadSensitiveContext(executor=thread):
                await self.app(scope, receive, send)
        finally:
            if thread.pending or len(self.idle) >= self.keep:
                thread.retire()  # its thread ends once its work has
            else:
                self.idle.append(thread)
