"""Fill the database with made-up conversations, for measuring the admin on a big table."""

from __future__ import annotations

import contextlib
import datetime
import random
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import models, transaction
from django.utils import timezone

from chatproxy.dashboard import answers
from chatproxy.feedback import Rating
from chatproxy.models import Conversation, DailyUsage, Message
from chatproxy.review import Annotation

MODELS = ["gpt-4o-mini", "gpt-4o", "o3-mini", "llama-3.1-70b"]
FAILURES = ["upstream_timeout", "upstream_rate_limited", "upstream_error", "content_blocked"]
WORDS = [
    "the",
    "a",
    "answer",
    "model",
    "token",
    "stream",
    "reply",
    "question",
    "chat",
    "why",
    "how",
    "when",
    "fast",
    "slow",
    "good",
]
BATCH = 500  # conversations per transaction


@contextlib.contextmanager
def dated_rows() -> Iterator[None]:
    """Let made-up rows keep the dates they are given: ``auto_now`` and ``auto_now_add`` would
    stamp them all with now."""
    fields = [
        f
        for model in (Conversation, Message)
        for f in model._meta.concrete_fields
        if isinstance(f, models.DateTimeField)
    ]
    saved = [(f, f.auto_now, f.auto_now_add) for f in fields]
    try:
        for f in fields:
            f.auto_now = f.auto_now_add = False
        yield
    finally:
        for f, now, now_add in saved:
            f.auto_now, f.auto_now_add = now, now_add


class Command(BaseCommand):
    help = (
        "Create N made-up conversations of M messages each (with ratings and review flags), "
        "spread over the last D days: to measure the admin and the dashboard on a big table."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--conversations", type=int, default=1000)
        parser.add_argument("--messages", type=int, default=10, help="Per conversation.")
        parser.add_argument("--days", type=int, default=90)
        parser.add_argument("--users", type=int, default=50)
        parser.add_argument("--seed", type=int, default=0)

    def handle(self, *args: Any, **options: Any) -> None:
        if min(options["conversations"], options["messages"], options["days"]) < 1:
            raise CommandError("--conversations, --messages and --days must be 1 or more.")
        rng = random.Random(options["seed"])
        users = self.users(options["users"])
        total, span = options["conversations"], options["days"] * 86400
        first = timezone.now() - datetime.timedelta(seconds=span)
        made = 0
        with dated_rows():
            while made < total:
                count = min(BATCH, total - made)
                # In the order of time, as a real table fills: rows of a period sit together.
                starts = [
                    first + datetime.timedelta(seconds=span * (made + i + rng.random()) / total)
                    for i in range(count)
                ]
                with transaction.atomic():
                    self.batch(rng, users, starts, options["messages"])
                made += count
        # Written around finish_turn, the rows are counted into the dashboard's rollup here.
        DailyUsage.objects.rebuild(answers())
        self.stdout.write(
            f"Created {made} conversations with {made * options['messages']} messages."
        )

    def users(self, count: int) -> list[Any]:
        model = get_user_model()
        names = [f"bench-user-{i}" for i in range(count)]
        existing = set(model.objects.filter(username__in=names).values_list("username", flat=True))
        model.objects.bulk_create([model(username=n) for n in names if n not in existing])
        return list(model.objects.filter(username__in=names))

    def batch(
        self, rng: random.Random, users: list[Any], starts: list[datetime.datetime], per: int
    ) -> None:
        conversations, messages, ratings, marks = [], [], [], []
        for started in starts:
            anonymous = not users or rng.random() < 0.1
            conversation = Conversation(
                id=uuid.uuid4(),
                owner=None if anonymous else rng.choice(users),
                session_key=uuid.uuid4().hex if anonymous else "",
                title=" ".join(rng.choices(WORDS, k=5)),
                model=rng.choice(MODELS),
                created_at=started,
            )
            at = started
            for position in range(per):
                at += datetime.timedelta(seconds=rng.uniform(2, 20))
                message = self.message(rng, conversation, position, at)
                messages.append(message)
                if message.status and rng.random() < 0.03:
                    value = "up" if rng.random() < 0.7 else "down"
                    ratings.append(Rating(message=message, conversation=conversation, value=value))
            conversation.status = messages[-1].status or "completed"
            conversation.updated_at = at
            conversations.append(conversation)
            if rng.random() < 0.01:
                marks.append(
                    Annotation(conversation=conversation, kind="flag", value="needs_review")
                )
        Conversation.objects.bulk_create(conversations)
        Message.objects.bulk_create(messages, batch_size=2000)
        Rating.objects.bulk_create(ratings)
        Annotation.objects.bulk_create(marks)

    def message(
        self, rng: random.Random, conversation: Conversation, position: int, at: datetime.datetime
    ) -> Message:
        text = " ".join(rng.choices(WORDS, k=rng.randint(5, 40)))
        if position % 2 == 0:
            return Message(
                id=uuid.uuid4(), conversation=conversation, position=position, role="user",
                content=text, created_at=at,
            )  # fmt: skip
        roll = rng.random()
        status, code = "completed", ""
        if roll < 0.04:
            status, code = "failed", rng.choice(FAILURES)
        elif roll < 0.06:
            status, code = "interrupted", "client_disconnected"
        prompt, completion = rng.randint(20, 3000), rng.randint(5, 800)
        first = int(rng.lognormvariate(6.2, 0.5))  # about 500 ms, a long tail
        return Message(
            id=uuid.uuid4(),
            conversation=conversation,
            position=position,
            role="assistant",
            content=text if status != "failed" else "",
            status=status,
            model=conversation.model,
            error_code=code,
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            first_token_ms=first,
            duration_ms=first + completion * rng.randint(8, 30),
            cost=Decimal(prompt * 15 + completion * 60) / Decimal(100_000_000),
            created_at=at,
            finished_at=at + datetime.timedelta(milliseconds=first + completion * 20),
        )
