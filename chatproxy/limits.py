"""Limits checked before a turn starts: models, request rate, concurrent streams.

Each counts per user, or for anonymous chat per session and per client address as well (a
fresh session is free to get, an address is not), plus one cap on all anonymous streams.
Synchronous: they run on chatproxy's database thread, in the trip that starts the turn.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import time
import zlib
from typing import Any

from django.core.cache import caches
from django.db import connection
from django.utils import timezone

from .conf import conf
from .content import text_of
from .exceptions import RequestError
from .models import Message, Status
from .owners import Owner


def allowed_models(user: Any) -> list[str]:
    """CHATPROXY_MODELS and the models CHATPROXY_GROUP_MODELS gives the user's groups."""
    allowed = conf.CHATPROXY_MODELS
    group_models = conf.CHATPROXY_GROUP_MODELS
    if group_models and user is not None and user.is_authenticated:
        for name in user.groups.values_list("name", flat=True):
            allowed = [*allowed, *group_models.get(name, [])]
    return allowed


def check_model(model: str, user: Any) -> None:
    """Refuse a model outside CHATPROXY_MODELS and the user's CHATPROXY_GROUP_MODELS."""
    if model in conf.CHATPROXY_MODELS:
        return
    allowed = allowed_models(user)
    if model in allowed:
        return
    raise RequestError(
        "model_not_allowed",
        f"The model {model!r} is not allowed here. Use one of: {', '.join(allowed)}, "
        "or leave model out for the default.",
    )


# The rate limit's window is cut into this many slots, each counted on its own.
SLOTS = 10
# The PostgreSQL advisory lock that serializes the starts of all anonymous turns.
ANONYMOUS_LOCK = zlib.crc32(b"chatproxy:anonymous")


def bound_history(
    history: list[dict[str, Any]], messages: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], int]:
    """Return the stored ``history`` cut to fit, with the request's own ``messages``, in
    CHATPROXY_MAX_HISTORY_CHARS characters, and how many of its messages were dropped.

    The oldest exchanges go first, each whole: a user message and the answers after it.
    System messages stay, and so do the request's own messages (CHATPROXY_MAX_CHARS bounds
    them). What interceptors add later (a system prompt, context) comes on top.
    """
    limit = conf.CHATPROXY_MAX_HISTORY_CHARS
    total = sum(map(_size, [*history, *messages]))
    if total <= limit:
        return history, 0
    exchanges: list[list[int]] = []
    for i, message in enumerate(history):
        if message["role"] == "system":
            continue
        if message["role"] == "user" or not exchanges:
            exchanges.append([])
        exchanges[-1].append(i)
    dropped: set[int] = set()
    for exchange in exchanges:
        if total <= limit:
            break
        dropped.update(exchange)
        total -= sum(_size(history[i]) for i in exchange)
    return [m for i, m in enumerate(history) if i not in dropped], len(dropped)


def _size(message: dict[str, Any]) -> int:
    """The characters a message takes in the upstream request: its text, its images' URLs (a
    data URL is its image), its tool calls' names and arguments."""
    content = message.get("content")
    if isinstance(content, list):
        size = len(text_of(content))
        size += sum(len(p["image_url"]["url"]) for p in content if p.get("type") == "image_url")
    else:
        size = len(content or "")
    for call in message.get("tool_calls") or ():
        size += len(call["function"]["name"]) + len(call["function"]["arguments"])
    return size


def check_rate(owner: Owner, *, now: float | None = None) -> None:
    """Count this request in a sliding window per owner (and, for anonymous chat, per client
    address); refuse it past CHATPROXY_RATE_LIMIT in either.

    The window is the current slot (a tenth of the period) and the ``SLOTS`` before it, so it
    always covers the whole last period: no more than the limit passes in any period, at the
    cost of counting up to a tenth of a period more. Each slot is one cache counter, raised with
    the cache's atomic ``incr``, so the limit holds across workers sharing the cache. A refused
    request is taken back out, so a client retrying while refused does not lock itself out.
    """
    limit = conf.CHATPROXY_RATE_LIMIT
    if limit is None:
        return
    count, period = limit
    now = time.time() if now is None else now
    scopes = [] if owner.is_new else [owner.key]
    if owner.user_id is None and owner.address:
        scopes.append(f"address:{owner.address}")
    width = period / SLOTS
    slot = math.floor(now / width)
    cache = caches[conf.CHATPROXY_CACHE]
    counted, frees_at = [], 0.0
    for scope in scopes:
        keys = [f"chatproxy:rate:{scope}:{s}" for s in range(slot - SLOTS, slot + 1)]
        # A slot stays in the window for SLOTS + 1 slot widths after it starts.
        current = _count(keys[-1], math.ceil(period + width) + 1)
        counted.append(keys[-1])
        earlier = cache.get_many(keys[:-1])
        counts = [int(earlier.get(key, 0)) for key in keys[:-1]] + [current]
        if sum(counts) > count:
            frees_at = max(frees_at, _frees_at(counts, count, slot, width))
    if not frees_at:
        return
    for key in counted:
        with contextlib.suppress(ValueError):  # expired meanwhile: nothing left to take back
            cache.decr(key)
    retry = max(1, math.ceil(frees_at - now))
    raise RequestError(
        "rate_limited",
        f"Too many chat requests: at most {count} every {period} seconds. "
        f"Try again in {retry} seconds.",
        status=429,
        retry_after=retry,
    )


def _frees_at(counts: list[int], count: int, slot: int, width: float) -> float:
    """When enough of the oldest slots have left the window for one more request to fit."""
    # Without this refused request, the window holds sum(counts) - 1; one more needs count - 1.
    excess, gone, age = sum(counts) - count, 0, 0
    while gone + counts[age] < excess:
        gone += counts[age]
        age += 1
    # Slot number `slot - SLOTS + age` leaves the window when slot `slot + age + 1` begins.
    return (slot + age + 1) * width


def _count(key: str, timeout: int) -> int:
    # The cache's own incr is atomic (a lock in locmem, INCR in Redis); Django's async aincr
    # is a read and a write, and concurrent requests would slip through between them.
    cache = caches[conf.CHATPROXY_CACHE]
    if cache.add(key, 1, timeout=timeout):
        return 1
    try:
        return int(cache.incr(key))
    except ValueError:  # the slot expired between add and incr
        cache.add(key, 1, timeout=timeout)
        return 1


def check_streams(owner: Owner) -> None:
    """Refuse a turn while the owner already has CHATPROXY_MAX_STREAMS answers streaming; for
    anonymous chat, also while as many stream to the owner's address, or
    CHATPROXY_MAX_ANONYMOUS_STREAMS to anonymous owners altogether.

    Called inside the transaction that starts the turn, after taking a lock that serializes
    the owner's starts (all anonymous starts, for anonymous chat), so concurrent requests cannot
    all slip under a limit. Counted in the database, so it holds across processes; an answer
    left ``streaming`` by a dead worker stops counting after CHATPROXY_STALE_AFTER seconds.
    """
    limit = conf.CHATPROXY_MAX_STREAMS
    anonymous = owner.user_id is None
    everyone = conf.CHATPROXY_MAX_ANONYMOUS_STREAMS if anonymous else None
    if limit is None and everyone is None:
        return
    if connection.vendor == "postgresql":
        lock = ANONYMOUS_LOCK if anonymous else zlib.crc32(owner.key.encode())
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [lock])
    # (SQLite's BEGIN IMMEDIATE already serializes every start.)
    since = timezone.now() - datetime.timedelta(seconds=conf.CHATPROXY_STALE_AFTER)
    streaming = Message.objects.filter(status=Status.STREAMING, created_at__gte=since)
    if limit is not None:
        owned = {f"conversation__{k}": v for k, v in owner.filter().items()}
        if not owner.is_new and streaming.filter(**owned).count() >= limit:
            raise _too_many(
                f"You already have {limit} answers streaming. Wait for one to finish, or stop one."
            )
        if (
            anonymous
            and owner.address
            and streaming.filter(address_key=owner.address).count() >= limit
        ):
            raise _too_many(
                f"{limit} answers are already streaming to your network address. "
                "Wait for one to finish, or log in."
            )
    if everyone is not None and (
        streaming.filter(conversation__owner__isnull=True).count() >= everyone
    ):
        raise RequestError(
            "too_many_anonymous_streams",
            "The site is answering as many visitors without an account as it can "
            f"({everyone} at once). Try again in a moment, or log in.",
            status=429,
            retry_after=5,
        )


def _too_many(message: str) -> RequestError:
    return RequestError("too_many_streams", message, status=429, retry_after=5)
