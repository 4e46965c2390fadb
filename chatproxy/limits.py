"""Per-user limits checked before a turn starts: models, request rate, concurrent streams."""

from __future__ import annotations

import datetime
import math
import time
from typing import Any

from django.core.cache import caches
from django.utils import timezone

from .conf import conf
from .exceptions import RequestError
from .models import Message, Owner, Status


async def check_model(model: str, user: Any) -> None:
    """Refuse a model outside CHATPROXY_MODELS and the user's CHATPROXY_GROUP_MODELS."""
    allowed = conf.CHATPROXY_MODELS
    if model in allowed:
        return
    group_models = conf.CHATPROXY_GROUP_MODELS
    if group_models and user is not None and user.is_authenticated:
        names = [name async for name in user.groups.values_list("name", flat=True)]
        for name in names:
            allowed = [*allowed, *group_models.get(name, [])]
        if model in allowed:
            return
    raise RequestError(
        "model_not_allowed",
        f"The model {model!r} is not allowed here. Use one of: {', '.join(allowed)}, "
        "or leave model out for the default.",
    )


def _owner_key(owner: Owner) -> str:
    return f"user:{owner.user_id}" if owner.user_id is not None else f"session:{owner.session_key}"


async def check_rate(owner: Owner) -> None:
    """Count this request in a fixed window per owner; refuse it past CHATPROXY_RATE_LIMIT."""
    limit = conf.CHATPROXY_RATE_LIMIT
    if limit is None:
        return
    count, period = limit
    now = time.time()
    window = int(now // period)
    key = f"chatproxy:rate:{_owner_key(owner)}:{window}"
    cache = caches[conf.CHATPROXY_CACHE]
    if await cache.aadd(key, 1, timeout=period + 1):
        used = 1
    else:
        try:
            used = await cache.aincr(key)
        except ValueError:  # the window expired between add and incr
            used = 1
    if used > count:
        retry = max(1, math.ceil((window + 1) * period - now))
        raise RequestError(
            "rate_limited",
            f"Too many chat requests: at most {count} every {period} seconds. "
            f"Try again in {retry} seconds.",
            status=429,
            retry_after=retry,
        )


async def check_streams(owner: Owner) -> None:
    """Refuse a turn while the owner already has CHATPROXY_MAX_STREAMS answers streaming.

    Counted in the database, so it holds across processes; an answer left ``streaming`` by a
    dead worker stops counting after CHATPROXY_STALE_AFTER seconds.
    """
    limit = conf.CHATPROXY_MAX_STREAMS
    if limit is None:
        return
    since = timezone.now() - datetime.timedelta(seconds=conf.CHATPROXY_STALE_AFTER)
    owned = {f"conversation__{k}": v for k, v in owner.filter().items()}
    streaming = Message.objects.filter(status=Status.STREAMING, created_at__gte=since, **owned)
    if await streaming.acount() >= limit:
        raise RequestError(
            "too_many_streams",
            f"You already have {limit} answers streaming. Wait for one to finish, or stop one.",
            status=429,
            retry_after=5,
        )
