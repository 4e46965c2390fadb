"""A turn's reservation against its budgets: its worst case, held in the transaction that
starts it (``reserve``, ``hold``), then settled to what the answer used (``settle``).
Synchronous: this runs on chatproxy's database thread, in the trips that write the turn.
"""

from __future__ import annotations

import datetime
import math
import zlib
from decimal import Decimal
from typing import Any

from django.db import connection
from django.utils import timezone

from .budgets import Standing, applicable, money, standings
from .conf import conf
from .exceptions import RequestError
from .models import Spend
from .prices import price
from .rows import update_row
from .turns import Turn

# A rough count of a prompt's tokens: characters per token, and what each message and each
# image adds (OpenAI's price of one high-detail tile and its base).
CHARS_PER_TOKEN = 4
MESSAGE_TOKENS = 4
IMAGE_TOKENS = 255


def estimate(turn: Turn) -> tuple[int, int]:
    """The turn's prompt tokens, estimated from its messages, and its most completion tokens
    (its ``max_tokens``, clamped; CHATPROXY_BUDGET_MAX_TOKENS, sent upstream, without one)."""
    chars, images = 0, 0
    for message in turn.messages:
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                chars += len(part.get("text", "")) if part.get("type") == "text" else 0
                images += part.get("type") == "image_url"
        else:
            chars += len(content or "")
        calls: Any = message.get("tool_calls") or ()
        for call in calls:
            chars += len(call["function"]["name"]) + len(call["function"]["arguments"])
    prompt = math.ceil(chars / CHARS_PER_TOKEN) + MESSAGE_TOKENS * len(turn.messages)
    prompt += IMAGE_TOKENS * images
    most = turn.params.get("max_completion_tokens") or turn.params.get("max_tokens")
    if most is None:
        most = turn.params["max_tokens"] = conf.CHATPROXY_BUDGET_MAX_TOKENS
    return prompt, int(most)


def _cost(model: str, prompt: int, completion: int) -> Decimal:
    rates = conf.CHATPROXY_PRICES.get(model)
    if not rates:
        return Decimal(0)  # an unpriced model costs nothing, as the Cost interceptor says
    return price(rates, {"prompt_tokens": prompt, "completion_tokens": completion})


def reserve(turn: Turn) -> tuple[int, int, Decimal] | None:
    """Check that the turn's worst case fits every budget; return it (the prompt estimate, the
    tokens and the cost to hold), or None without budgets. Raises ``budget_exceeded``.

    Called inside the transaction that starts the turn: on PostgreSQL it first takes a lock
    per budget, held to the commit; on SQLite the transaction's IMMEDIATE write lock already
    serializes every start. So concurrent turns cannot all slip under a budget."""
    if conf.CHATPROXY_BUDGETS is None:
        return None
    limits = applicable(turn.owner, turn.user)
    if not limits:
        return None
    if connection.vendor == "postgresql":
        keys = sorted(
            {zlib.crc32(f"chatproxy:budget:{x.scope}:{x.target}".encode()) for x in limits}
        )
        with connection.cursor() as cursor:
            locks = ", ".join(["pg_advisory_xact_lock(%s)"] * len(keys))
            cursor.execute(f"SELECT {locks}", keys)
    prompt, completion = estimate(turn)
    tokens, cost = prompt + completion, _cost(turn.model, prompt, completion)
    now = timezone.now()
    over = [s for s in standings(limits, now) if not s.fits(tokens, cost)]
    if over:
        raise _exceeded(over, tokens, cost, now)
    return prompt, tokens, cost


def hold(turn: Turn, reserved: tuple[int, int, Decimal]) -> None:
    """Write the reservation of a turn whose answer row now exists."""
    prompt, tokens, cost = reserved
    spend = Spend.objects.create(
        answer_id=turn.answer_id,
        user_id=turn.owner.user_id,
        api_key_id=turn.owner.api_key_id,
        tokens=tokens,
        cost=cost,
    )
    turn.budget = (spend.pk, prompt)


def settle(turn: Turn) -> None:
    """Turn the reservation into what the answer used: its usage, priced as the ``Cost``
    interceptor priced it (or by CHATPROXY_PRICES); without usage (an answer cut short), the
    prompt as estimated and the text received."""
    if turn.budget is None:
        return
    spend_id, prompt = turn.budget
    usage: Any = turn.usage()
    if usage is None:
        usage = {"prompt_tokens": prompt, "completion_tokens": len(turn.state.text) // 4}
    tokens = usage["prompt_tokens"] + usage["completion_tokens"]
    cost = turn.cost
    if cost is None:
        rates = conf.CHATPROXY_PRICES.get(turn.model)
        cost = price(rates, usage) if rates else Decimal(0)
    update_row(Spend, spend_id, {"tokens": tokens, "cost": cost, "settled": True}, settled=False)


def _exceeded(
    over: list[Standing], tokens: int, cost: Decimal, now: datetime.datetime
) -> RequestError:
    # The tightest: the one that frees last, since the turn needs every one of them.
    tightest = max(over, key=lambda s: s.resets_at)
    limit, left = tightest.limit, []
    if limit.tokens is not None:
        left.append(f"{max(0, limit.tokens - tightest.tokens)} of {limit.tokens} tokens")
    if limit.cost is not None:
        left.append(
            f"{money(max(Decimal(0), limit.cost - tightest.cost))} of {money(limit.cost)} in cost"
        )
    retry = max(1, math.ceil((tightest.resets_at - now).total_seconds()))
    return RequestError(
        "budget_exceeded",
        f"{limit.label()} has {' and '.join(left)} left; this request may use up to "
        f"{tokens} tokens ({money(cost)} in cost). It resets at {tightest.resets_at.isoformat()} "
        f"(in {retry} seconds). Lower max_tokens or shorten the conversation, or try again then.",
        status=429,
        retry_after=retry,
    )
