"""A turn's reservation against its budgets: its worst case, held in the transaction that
starts it (``reserve``, ``hold``), watched while the answer streams (``Meter``), then settled
to what the answer used (``settle``). Apart from ``Meter``, which runs on the event loop and
touches no database, this is synchronous: it runs on chatproxy's database thread, in the trips
that write the turn.
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
from .chunks import Chunk
from .conf import conf
from .exceptions import RequestError, ReservationExceededError
from .models import Spend
from .prices import price
from .rows import update_row
from .turns import Reservation, Turn, TurnState

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
    turn.budget = Reservation(spend.pk, prompt, tokens - prompt)


def completion_estimate(chars: int) -> int:
    """The completion tokens of ``chars`` characters received, counted as ``estimate`` counts
    a prompt's."""
    return math.ceil(chars / CHARS_PER_TOKEN)


def _received(state: TurnState) -> int:
    """The characters of an answer the upstream sent: its text, reasoning and call arguments."""
    calls = sum(len(call["arguments"]) for call in state.tool_calls)
    return len(state.raw_text) + sum(map(len, state.raw_reasoning)) + calls


class Meter:
    """The completion tokens of a turn that holds a reservation, counted as its chunks arrive:
    the usage chunk's count once one arrives, until then an estimate from the characters
    received. Steps of a tool loop share the turn's one reservation. Only a turn with a
    reservation gets one, so the stream of any other costs nothing."""

    __slots__ = ("reserved", "before", "chars", "counted")

    def __init__(self, reservation: Reservation) -> None:
        self.reserved = reservation.completion
        self.before = 0  # what the turn's earlier steps used
        self.chars = 0
        self.counted: int | None = None

    def next_step(self) -> None:
        """Another upstream call of the turn starts: what the last one used is kept."""
        self.before, self.chars, self.counted = self.used, 0, None

    @property
    def used(self) -> int:
        now = completion_estimate(self.chars) if self.counted is None else self.counted
        return self.before + now

    def check(self, batch: list[Chunk]) -> None:
        """Count a batch of chunks. Raises ``reservation_exceeded`` once the turn has used
        more than it reserved."""
        for text, reasoning, calls, _, usage, _ in batch:
            if usage is not None:
                self.counted = usage["completion_tokens"]
            self.chars += len(text) + len(reasoning) + sum(len(call.arguments) for call in calls)
        if self.used > self.reserved:
            raise ReservationExceededError(
                f"The answer went past the {self.reserved} tokens reserved for it against the "
                "budgets, so it was stopped: the model server did not keep to max_tokens. What "
                "it used so far counts against the budgets."
            )


def settle(turn: Turn) -> None:
    """Turn the reservation into what the answer used: its usage, priced as the ``Cost``
    interceptor priced it (or by CHATPROXY_PRICES); without usage (an answer cut short), the
    prompt as estimated and what was received, counted as ``Meter`` counts it."""
    if turn.budget is None:
        return
    spend_id, prompt, _ = turn.budget
    usage: Any = turn.usage()
    if usage is None:
        received = completion_estimate(_received(turn.state))
        usage = {"prompt_tokens": prompt, "completion_tokens": received}
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
