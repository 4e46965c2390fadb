"""Health for load balancers: quick, unauthenticated, and revealing nothing.

``health`` answers 200 while the database, the cache (CHATPROXY_CACHE) and the channel layer
answer, 503 when one does not; ``ready`` also answers 503 once a SIGTERM has started the
shutdown grace (``shutdown.draining``), so a balancer stops sending new turns to a worker
that is finishing its last ones. The body is only ``{"status": ...}``: which part failed,
and why, goes to the log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from channels.layers import get_channel_layer
from django.core.cache import caches
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_safe

from . import shutdown
from .conf import conf
from .database import run

logger = logging.getLogger("chatproxy.health")

# Seconds each part may take: a balancer probes often and waits little.
TIMEOUT = 2.0
HEADERS = {"Cache-Control": "no-store"}


def _ping_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _ping_cache() -> None:
    cache = caches[conf.CHATPROXY_CACHE]
    cache.set("chatproxy:health", 1, 10)
    if cache.get("chatproxy:health") != 1:
        raise RuntimeError("the cache did not keep a value")


async def _ping_channel_layer() -> None:
    layer = get_channel_layer()
    if layer is None:  # no CHANNEL_LAYERS: nothing to reach (followers need one)
        return
    name = await layer.new_channel()
    await layer.send(name, {"type": "chatproxy.health"})
    await layer.receive(name)


async def _check(part: str, probe: Awaitable[None]) -> bool:
    try:
        async with asyncio.timeout(TIMEOUT):
            await probe
    except Exception:  # whatever breaks it, the part is down: logged, never shown
        logger.warning("Health check: the %s is unreachable", part, exc_info=True)
        return False
    return True


async def reachable() -> bool:
    """Whether the database, the cache and the channel layer all answer, probed at once."""
    results = await asyncio.gather(
        _check("database", run(_ping_database)),
        _check("cache", asyncio.to_thread(_ping_cache)),
        _check("channel layer", _ping_channel_layer()),
    )
    return all(results)


def _answer(status: str) -> JsonResponse:
    return JsonResponse({"status": status}, status=200 if status == "ok" else 503, headers=HEADERS)


@require_safe
async def health(request: HttpRequest) -> JsonResponse:
    """Answer 200 ``ok`` while the database, cache and channel layer answer, else 503."""
    return _answer("ok" if await reachable() else "unavailable")


@require_safe
async def ready(request: HttpRequest) -> JsonResponse:
    """As ``health``, and 503 ``draining`` once the server is shutting down."""
    if shutdown.draining():
        return _answer("draining")
    return _answer("ok" if await reachable() else "unavailable")
