"""The admin dashboard's figures for a period, summed in the database from the daily rollup
(``usage``): turns, tokens and cost per day; by model; errors by code; time to first token
p50/p95 per day; the top users. Days are UTC days."""

from __future__ import annotations

import datetime
from collections import defaultdict
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

from django.contrib.auth import get_user_model
from django.db.models import QuerySet, Sum
from django.utils import timezone

from . import charts
from .models import DailyUsage, Message, Role
from .owners import owner_label
from .usage import BUCKET_MS, Kind

PERIODS = (7, 30, 90, 365)  # days
EPOCH = datetime.date(1970, 1, 1)
DEFAULT_PERIOD = 30
TOP_USERS = 10


def _day(number: int) -> str:
    return (EPOCH + datetime.timedelta(days=int(number))).isoformat()


def period_days(text: str | None) -> int:
    """The chosen period in days: one of PERIODS, else the default."""
    return int(text) if text and text.isdigit() and int(text) in PERIODS else DEFAULT_PERIOD


def answers() -> QuerySet[Message]:
    """Every answer the dashboard counts: assistant messages that were answered here (not a
    history a client sent). ``DailyUsage.objects.rebuild(answers())`` recounts the rollup."""
    return Message.objects.filter(role=Role.ASSISTANT).exclude(status="")


def figures(days: int) -> dict[str, Any]:
    """The dashboard's sections, each a chart and the table of its figures: the last ``days``
    UTC days, today included, from the daily rollup (``usage``)."""
    today = (timezone.now().date() - EPOCH).days
    cells = DailyUsage.objects.filter(day__gt=today - days).order_by()

    def kind(kind: Kind) -> QuerySet[DailyUsage]:
        return cells.filter(kind=kind)

    by_day_model = kind(Kind.MODEL).values_list("day", "label", "turns", "tokens", "cost")
    model_cells = [
        {"day": day, "model": model, "turns": turns, "tokens": tokens, "cost": cost}
        for day, model, turns, tokens, cost in by_day_model
    ]
    per_day = _totals(model_cells, "day")
    for row in per_day:
        row["day"] = _day(row["day"])
    per_day.sort(key=lambda r: r["day"])
    by_model = sorted(_totals(model_cells, "model"), key=lambda r: (-r["turns"], r["model"]))
    errors = [
        {"error_code": code, "count": count}
        for code, count in kind(Kind.ERROR)
        .values_list("label")
        .annotate(count=Sum("turns"))
        .order_by("-count", "label")
    ]
    users = _top_users(
        kind(Kind.OWNER)
        .values_list("label")
        .annotate(tokens=Sum("tokens"), turns=Sum("turns"))
        .filter(tokens__gt=0)
        .order_by("-tokens", "label")[:TOP_USERS]
    )
    latency = _percentiles(kind(Kind.FIRST_TOKEN).values_list("day", "label", "turns"))
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
                charts.rows("Top users by tokens", [(u["label"], u["tokens"]) for u in users]),
                ["User", "Tokens", "Turns"],
                [(u["label"], u["tokens"], u["turns"]) for u in users],
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


def _top_users(rows: Iterable[tuple[str, int, int]]) -> list[dict[str, Any]]:
    """The top owners' rows with a label each; their names from one query."""
    found = list(rows)
    model = get_user_model()
    pks = [model._meta.pk.to_python(label) for label, _, _ in found if label]
    names = {
        str(pk): name
        for pk, name in model._default_manager.filter(pk__in=pks).values_list(
            "pk", model.USERNAME_FIELD
        )
    }
    return [
        {
            "label": owner_label(names.get(label, label), "")
            if label
            else "anonymous sessions (all)",
            "tokens": tokens,
            "turns": turns,
        }
        for label, tokens, turns in found
    ]


def _section(
    title: str, chart: Any, header: list[str], table: Iterable[Iterable[Any]]
) -> dict[str, Any]:
    return {"title": title, "chart": chart, "header": header, "rows": [list(r) for r in table]}


def _percentiles(buckets: Iterable[tuple[int, str, int]]) -> dict[str, tuple[int, int]]:
    """Per day, (p50, p95) of the first-token times, from their counts per 10 ms bucket (each
    bucket stands for its upper bound, so a percentile is at most 10 ms high)."""
    counts: dict[str, dict[int, int]] = defaultdict(dict)
    for number, label, count in buckets:
        counts[_day(number)][int(label)] = count
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
