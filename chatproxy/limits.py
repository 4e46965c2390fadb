"""Per-user limits checked before a turn starts: models, request rate, concurrent streams.

Synchronous: they run on chatproxy's database thread, in the trip that starts the turn.
"""

from __future__ import annotations

import datetime
import math
import time
import zlib
from typing import Any

from django.core.cache import caches
from django.db import connection
from django.utils import timezone

from .conf import conf
from .exceptions import RequestError
from .models import Message, Owner, Status


def check_model(model: str, user: Any) -> None:
    """Refuse a model outside CHATPROXY_MODELS and the user's CHATPROXY_GROUP_MODELS."""
    allowed = conf.CHATPROXY_MODELS
    if model in allowed:
        return
    group_models = conf.CHATPROXY_GROUP_MODELS
    if group_models and user is not None and user.is_authenticated:
        names = list(user.groups.values_list("name", flat=True))
        for name in names:
            allowed = [*allowed, *group_models.get(name, [])]
        if model in allowed:
            return
    raise RequestError(
        "model_not_allowed",
        f"The model {model!r} is not allowed here. Use one of: {', '.join(allowed)}, "
        "or leave model out for the default.",
    )


def check_rate(owner: Owner) -> None:
    """Count this request in a fixed window per owner; refuse it past CHATPROXY_RATE_LIMIT."""
    limit = conf.CHATPROXY_RATE_LIMIT
    if limit is None:
        return
    count, period = limit
    now = time.time()
    window = int(now // period)
    key = f"chatproxy:rate:{owner.key}:{window}"
    used = _count(key, period + 1)
    if used > count:
        retry = max(1, math.ceil((window + 1) * period - now))
        raise RequestError(
            "rate_limited",
            f"Too many chat requests: at most {count} every {period} seconds. "
            f"Try again in {retry} seconds.",
            status=429,
            retry_after=retry,
        )


def _count(key: str, timeout: int) -> int:
    # The cache's own incr is atomic (a lock in locmem, INCR in Redis); Django's async aincr
    # is a read and a write, and concurrent requests would slip through between them.
    cache = caches[conf.CHATPROXY_CACHE]
    if cache.add(key, 1, timeout=timeout):
        return 1
    try:
        return int(cache.incr(key))
    except ValueError:  # the window expired between add and incr
        cache.add(key, 1, timeout=timeout)
        return 1


def check_streams(owner: Owner) -> None:
    """Refuse a turn while the owner already has CHATPROXY_MAX_STREAMS answers streaming.

    Called inside the transaction that starts the turn, after taking a lock that serializes
    the owner's starts, so concurrent requests cannot all slip under the limit. Counted in the
    database, so it holds across processes; an answer left ``streaming`` by a dead worker stops
    counting after CHATPROXY_STALE_AFTER seconds.
    """
    limit = conf.CHATPROXY_MAX_STREAMS
    if limit is None:
        return
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [zlib.crc32(owner.key.encode())])
    # (SQLite's BEGIN IMMEDIATE already serializes every start.)
    since = timezone.now() - datetime.timedelta(seconds=conf.CHATPROXY_STALE_AFTER)
    owned = {f"conversation__{k}": v for k, v in owner.filter().items()}
    streaming = Message.objects.filter(status=Status.STREAMING, created_at__gte=since, **owned)
    if streaming.count() >= limit:
        raise RequestError(
            "too_many_streams",
            f"You already have {limit} answers streaming. Wait for one to finish, or stop one.",
            status=429,
            retry_after=5,
        )
