"""Measure the admin on a big table: the conversation list (plain, searched, filtered), a
conversation's page and the dashboard, with N messages on SQLite or PostgreSQL.

    python -m bench.admin --messages 1000000 [--database sqlite|postgres] [--runs 5]

SQLite: a file under /tmp (kept, so a second run reuses its rows: delete it to start over).
PostgreSQL: DATABASE_URL (e.g. postgres://postgres@127.0.0.1:5432/chatproxy_bench). The rows
come from ``manage.py generatetranscripts`` (10 messages per conversation, over 90 days); each
page is fetched once to warm up, then ``--runs`` times with Django's test client, in process,
as a superuser; the figures are the median and the slowest, in ms, with the page's SQL queries.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if args.database == "sqlite":
        os.environ.pop("DATABASE_URL", None)
        name = Path(tempfile.gettempdir()) / f"chatproxy-bench-admin-{args.messages}.sqlite3"
        os.environ["CHATPROXY_TEST_DATABASE_NAME"] = str(name)
    elif not os.environ.get("DATABASE_URL"):
        sys.exit("Set DATABASE_URL to the PostgreSQL database to fill and measure.")
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from chatproxy.models import Conversation, Message

    call_command("migrate", verbosity=0)
    have = Message.objects.count()
    if have < args.messages:
        started = time.perf_counter()
        call_command("generatetranscripts", conversations=(args.messages - have) // 10)
        print(f"generated in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("VACUUM ANALYZE")
        else:
            with connection.cursor() as cursor:
                cursor.execute("ANALYZE")
    from django.contrib.auth import get_user_model

    admin, _ = get_user_model().objects.get_or_create(
        username="bench-admin", defaults={"is_staff": True, "is_superuser": True}
    )
    client = Client()
    client.force_login(admin)
    conversation = Conversation.objects.order_by("-created_at").first()
    assert conversation is not None
    owner = Conversation.objects.exclude(owner=None).values_list("owner_id", flat=True).first()
    day = conversation.created_at
    base = "/admin/chatproxy/conversation/"
    pages = [
        ("list", base),
        ("list, search 'question'", f"{base}?q=question"),
        ("list, search 'zebra' (in no message)", f"{base}?q=zebra"),
        ("list, error code", f"{base}?error_code=upstream_timeout"),
        ("list, rated down", f"{base}?rating=down"),
        ("list, flagged, not reviewed", f"{base}?review=flagged"),
        ("list, one owner", f"{base}?owner={owner}"),
        ("list, one day", f"{base}?created_at__year={day.year}&created_at__month={day.month}"
         f"&created_at__day={day.day}"),
        ("list, sorted by last activity", f"{base}?o=-8"),
        ("conversation page", f"{base}{conversation.pk}/change/"),
        ("dashboard, 30 days", "/admin/chatproxy/conversation/dashboard/?days=30"),
        ("dashboard, 90 days", "/admin/chatproxy/conversation/dashboard/?days=90"),
    ]  # fmt: skip
    print(f"{Message.objects.count():,} messages, {Conversation.objects.count():,} conversations,"
          f" {connection.vendor}")  # fmt: skip
    print("| page | median ms | slowest ms | queries |\n|---|---:|---:|---:|")
    for label, url in pages:
        response = client.get(url)
        if response.status_code == 404:
            continue  # a page this version does not have
        assert response.status_code == 200, (url, response.status_code)
        times = []
        for _ in range(args.runs):
            with CaptureQueriesContext(connection) as queries:
                started = time.perf_counter()
                response = client.get(url)
                times.append((time.perf_counter() - started) * 1000)
        print(f"| {label} | {statistics.median(times):.0f} | {max(times):.0f} "
              f"| {len(queries)} |")  # fmt: skip
    rollup_cost(connection)


def rollup_cost(connection: Any) -> None:
    """What counting a finished answer into the dashboard's rollup costs, beside the answer's
    own UPDATE: each timed on the 2,000 newest answers, in one transaction rolled back."""
    from django.db import transaction
    from django.utils import timezone

    from chatproxy.models import DailyUsage, Message
    from chatproxy.rows import update_row

    answers = Message.objects.filter(role="assistant").exclude(status="").order_by("-created_at")
    pks = list(answers.values_list("pk", flat=True)[:2000])
    now = timezone.now()
    statements = {
        "the rollup's UPSERT": lambda pk: DailyUsage.objects.add_answer(Message.objects.all(), pk),
        "the answer's UPDATE": lambda pk: update_row(Message, pk, {"finished_at": now}),
    }
    for label, statement in statements.items():
        times = []
        with transaction.atomic():
            for pk in pks:
                started = time.perf_counter()
                statement(pk)
                times.append((time.perf_counter() - started) * 1e6)
            transaction.set_rollback(True)
        times.sort()
        print(f"{label}: median {statistics.median(times):.0f} µs, "
              f"p95 {times[len(times) * 95 // 100]:.0f} µs")  # fmt: skip


if __name__ == "__main__":
    main()
