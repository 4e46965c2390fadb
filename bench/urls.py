"""The demo project's URLs plus the benchmark's Django floors: ``POST /bench/floor`` and
``POST /bench/floor/bare``.

The floor is the least an async Django view with session authentication can do behind the
demo project's middleware: load the session's user (the session and user ``SELECT``s, the CSRF
check by the middleware) and stream one NDJSON line. What it costs per request is Django's share
of a turn, before chatproxy does anything. The bare floor streams the line without loading the
user: the least any view behind those middleware costs, and the soonest any view's first byte
can go out.
"""

from collections.abc import AsyncIterator

from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.urls import include, path


async def floor(request: HttpRequest) -> HttpResponse:
    user = await request.auser()
    if not user.is_authenticated:
        return JsonResponse({"error": {"code": "authentication_required"}}, status=401)

    async def lines() -> AsyncIterator[bytes]:
        yield b'{"event":"completed","user":%d}\n' % user.pk

    return StreamingHttpResponse(lines(), content_type="application/x-ndjson")


async def bare(request: HttpRequest) -> HttpResponse:
    async def lines() -> AsyncIterator[bytes]:
        yield b'{"event":"completed"}\n'

    return StreamingHttpResponse(lines(), content_type="application/x-ndjson")


urlpatterns = [
    path("bench/floor", floor),
    path("bench/floor/bare", bare),
    path("", include("project.urls")),
]
