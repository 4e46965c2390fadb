"""The admin dashboard's figures for a period, each aggregated in the database: turns, tokens and
cost per day; by model; errors by code; time to first token p50/p95 per day; the top users.
Days are UTC days."""

from __future__ import annotations

import datetime
from collections import defaultdict
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

from django.db.models import Count, F, Func, IntegerField, QuerySet, Sum
from django.utils import timezone

from . import charts
from .models import Message, Role
from .owners import owner_label

PERIODS = (7, 30, 90, 365)  # days
EPOCH = datetime.date(1970, 1, 1)
DEFAULT_PERIOD = 30
BUCKET_MS = 10  # the percentiles' resolution: first-token times are counted in 10 ms buckets
TOP_USERS = 10


class EpochDay(Func):
    """The UTC day of a datetime as days since 1970-01-01, with the database's own functions:
    Django's TruncDate is a Python function per row on SQLite (2.3 s for 170,000 answers)."""

    output_field = IntegerField()
    template = "FLOOR(EXTRACT(EPOCH FROM %(expressions)s) / 86400)"  # PostgreSQL, MySQL, Oracle

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        # julianday() counts from noon, 24 November 4714 BC; 1970-01-01 is day 2440587.5.
        template = "CAST(julianday(%(expressions)s) - 2440587.5 AS INTEGER)"
        return super().as_sql(compiler, connection, template=template, **extra)


def _day(number: int) -> str:
    return (EPOCH + datetime.timedelta(days=int(number))).isoformat()


def period_days(text: str | None) -> int:
    """The chosen period in days: one of PERIODS, else the default."""
    return int(text) if text and text.isdigit() and int(text) in PERIODS else DEFAULT_PERIOD


def answers(since: datetime.datetime) -> QuerySet[Message]:
    """The answers of the period: assistant messages that were answered here (not a history
    a client sent)."""
    return Message.objects.filter(created_at__gte=since, role=Role.ASSISTANT).exclude(status="")


def figures(days: int) -> dict[str, Any]:
    """The dashboard's sections, each a chart and the table of its figures."""
    since = timezone.now() - datetime.timedelta(days=days)
    rows = answers(since)
    # Per day and per model from one GROUP BY (day, model): grouped by the model alone,
    # SQLite walked the whole model index instead of the period's rows (0.66 s against 0.16).
    cells = (
        rows.annotate(day=EpochDay("created_at"))
        .values("day", "model")
        .annotate(turns=Count("pk"), tokens=Sum("total_tokens"), cost=Sum("cost"))
        .order_by()
    )
    per_day = _totals(cells, "day")
    for row in per_day:
        row["day"] = _day(row["day"])
    per_day.sort(key=lambda r: r["day"])
    by_model = sorted(_totals(cells, "model"), key=lambda r: (-r["turns"], r["model"]))
    errors = list(
        rows.exclude(error_code="")
        .values("error_code")
        .annotate(count=Count("pk"))
        .order_by("-count", "error_code")
    )
    users = list(
        rows.values("conversation__owner_id", "conversation__owner__username")
        .annotate(tokens=Sum("total_tokens"), turns=Count("pk"))
        .filter(tokens__gt=0)
        .order_by("-tokens")[:TOP_USERS]
    )
    latency = _percentiles(
        rows.filter(first_token_ms__isnull=False)
        .annotate(day=EpochDay("created_at"), bucket=F("first_token_ms") / BUCKET_MS)
        .values_list("day", "bucket")
        .annotate(count=Count("pk"))
    )
    days_shown = [d["day"] for d in per_day]
    return {
        "totals": {
            "turns": sum(d["turns"] for d in per_day),
            "tokens": sum(d["tokens"] or 0 for d in per_day),
            "cost": sum((d["cost"] or Decimal(0) for d in per_day), Decimal(0)),
            "errors": sum(e["count"] for e in errors),
        },
        "sections": [
            _section(
                "Turns per day",
                charts.columns("Turns per day", [(str(d["day"]), d["turns"]) for d in per_day]),
                ["Day", "Turns"],
                [(str(d["day"]), d["turns"]) for d in per_day],
            ),
            _section(
                "Tokens per day",
                charts.columns(
                    "Tokens per day", [(str(d["day"]), d["tokens"] or 0) for d in per_day]
                ),
                ["Day", "Tokens"],
                [(str(d["day"]), d["tokens"] or 0) for d in per_day],
            ),
            _section(
                "Cost per day",
                charts.columns(
                    "Cost per day",
                    [(str(d["day"]), float(d["cost"] or 0)) for d in per_day],
                    alt=True,
                ),
                ["Day", "Cost"],
                [(str(d["day"]), f"{d['cost'] or 0:.6f}") for d in per_day],
            ),
            _section(
                "By model",
                charts.rows("Turns by model", [(m["model"] or "—", m["turns"]) for m in by_model]),
                ["Model", "Turns", "Tokens", "Cost"],
                [
                    (m["model"] or "—", m["turns"], m["tokens"] or 0, f"{m['cost'] or 0:.6f}")
                    for m in by_model
                ],
            ),
            _section(
                "Errors by code",
                charts.rows("Errors by code", [(e["error_code"], e["count"]) for e in errors]),
                ["Error code", "Answers"],
                [(e["error_code"], e["count"]) for e in errors],
            ),
            _section(
                "Time to first token, p95 per day (ms)",
                charts.columns(
                    "Time to first token, p95 per day",
                    [(day, latency[day][1]) for day in days_shown if day in latency],
                    alt=True,
                ),
                ["Day", "p50 ms", "p95 ms"],
                [(day, *latency[day]) for day in days_shown if day in latency],
            ),
            _section(
                "Top users by tokens",
                charts.rows("Top users by tokens", [(_user(u), u["tokens"]) for u in users]),
                ["User", "Tokens", "Turns"],
                [(_user(u), u["tokens"], u["turns"]) for u in users],
            ),
        ],
    }


def _totals(cells: Iterable[Mapping[str, Any]], key: str) -> list[dict[str, Any]]:
    """Sum the (day, model) cells' turns, tokens and cost by ``key``."""
    found: dict[Any, dict[str, Any]] = {}
    for cell in cells:
        row = found.setdefault(cell[key], {key: cell[key], "turns": 0, "tokens": 0, "cost": None})
        row["turns"] += cell["turns"]
        row["tokens"] += cell["tokens"] or 0
        if cell["cost"] is not None:
            row["cost"] = (row["cost"] or Decimal(0)) + cell["cost"]
    return list(found.values())


def _user(row: Mapping[str, Any]) -> str:
    if row["conversation__owner_id"] is None:
        return "anonymous sessions (all)"
    return owner_label(row["conversation__owner__username"], "")


def _section(
    title: str, chart: Any, header: list[str], table: Iterable[Iterable[Any]]
) -> dict[str, Any]:
    return {"title": title, "chart": chart, "header": header, "rows": [list(r) for r in table]}


def _percentiles(buckets: Iterable[tuple[Any, int, int]]) -> dict[str, tuple[int, int]]:
    """Per day, (p50, p95) of the first-token times, from their counts per 10 ms bucket (each
    bucket stands for its upper bound, so a percentile is at most 10 ms high)."""
    counts: dict[str, dict[int, int]] = defaultdict(dict)
    for day, bucket, count in buckets:
        counts[_day(day)][int(bucket)] = count
    found = {}
    for day, histogram in counts.items():
        total, seen, p50, p95 = sum(histogram.values()), 0, None, None
        for bucket in sorted(histogram):
            seen += histogram[bucket]
            if p50 is None and seen >= total * 0.5:
                p50 = (bucket + 1) * BUCKET_MS
            if seen >= total * 0.95:
                p95 = (bucket + 1) * BUCKET_MS
                break
        found[day] = (p50 or 0, p95 or 0)
    return found
