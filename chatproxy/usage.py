"""The dashboard's daily rollup: per UTC day, the finished answers' turns, tokens and cost by
model, by error code, by owner, and their first-token times in 10 ms buckets. One UPSERT per
finished answer keeps it current (``MessageManager.finish_turn``), so the dashboard reads a few
hundred rows for a period instead of aggregating every answer of it (1.6 s for 30 days of a
1,000,000-message table on SQLite, 2.5 s for 90).

Deleting a conversation does not take its answers out of the rollup: the dashboard says what
was answered. ``rebuild`` recounts everything from the messages that are left. On a database
without ``INSERT ... ON CONFLICT (...) DO UPDATE`` (MySQL; SQLite and PostgreSQL have it) the
rollup stays empty rather than fail a turn's final write.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from django.db import connection, models, transaction
from django.db.models import CharField, Count, F, Func, IntegerField, Sum, Value
from django.db.models.functions import Cast, Coalesce
from django.utils.translation import gettext_lazy as _

if TYPE_CHECKING:
    from .models import Message

BUCKET_MS = 10  # the percentiles' resolution: first-token times are counted in 10 ms buckets


class Kind(models.TextChoices):
    MODEL = "model", _("model")
    ERROR = "error", _("error code")
    OWNER = "owner", _("owner")  # the label is the owner's primary key, "" for anonymous
    FIRST_TOKEN = "first_token", _("first-token bucket")  # the label is ms // BUCKET_MS


class EpochDay(Func):
    """The UTC day of a datetime as days since 1970-01-01, with the database's own functions:
    Django's TruncDate is a Python function per row on SQLite (2.3 s for 170,000 answers)."""

    output_field = IntegerField()
    template = "FLOOR(EXTRACT(EPOCH FROM %(expressions)s) / 86400)"  # PostgreSQL, MySQL, Oracle

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        # julianday() counts from noon, 24 November 4714 BC; 1970-01-01 is day 2440587.5.
        template = "CAST(julianday(%(expressions)s) - 2440587.5 AS INTEGER)"
        return super().as_sql(compiler, connection, template=template, **extra)


def _cells(answers: models.QuerySet[Message]) -> models.QuerySet[Any, Any]:
    """The rollup's rows for ``answers``, grouped: (day, kind, label, turns, tokens, cost)."""
    labels: dict[Kind, tuple[Any, dict[str, Any]]] = {
        Kind.MODEL: (F("model"), {}),
        Kind.ERROR: (F("error_code"), {"error_code": ""}),
        Kind.OWNER: (Coalesce(Cast("conversation__owner_id", CharField()), Value("")), {}),
        Kind.FIRST_TOKEN: (
            Cast(F("first_token_ms") / BUCKET_MS, CharField()),
            {"first_token_ms": None},
        ),
    }
    parts = [
        answers.exclude(**excluded)
        .order_by()
        .annotate(day=EpochDay("created_at"), kind=Value(str(kind)), label=label)
        .values("day", "kind", "label")
        .annotate(turns=Count("pk"), tokens=Coalesce(Sum("total_tokens"), 0), cost=Sum("cost"))
        .values_list("day", "kind", "label", "turns", "tokens", "cost")
        for kind, (label, excluded) in labels.items()
    ]
    # No ORDER BY: on Django 6.1 the union otherwise carries one that its grouped rows do not
    # satisfy (SQLite refuses it: "ORDER BY term does not match any column"); an insert
    # needs no order.
    return parts[0].union(*parts[1:], all=True).order_by()


def _upsert(select: str) -> str:
    quote = connection.ops.quote_name
    table = quote(DailyUsage._meta.db_table)
    columns = ", ".join(quote(c) for c in ("day", "kind", "label", "turns", "tokens", "cost"))
    # "WHERE true": SQLite would read the ON of ON CONFLICT as a join's.
    return (
        f"INSERT INTO {table} ({columns}) SELECT * FROM ({select}) cells WHERE true "
        f"ON CONFLICT ({quote('day')}, {quote('kind')}, {quote('label')}) DO UPDATE SET "
        f"turns = {table}.turns + excluded.turns, tokens = {table}.tokens + excluded.tokens, "
        f"cost = CASE WHEN excluded.cost IS NULL THEN {table}.cost "
        f"ELSE COALESCE({table}.cost, 0) + excluded.cost END"
    )


_SENTINEL = uuid.UUID(int=0)
_compiled: dict[str, tuple[str, list[Any], Any]] = {}  # per vendor: SQL, params, the pk's


class DailyUsageManager(models.Manager["DailyUsage"]):
    def add(self, answers: models.QuerySet[Message]) -> None:
        """Count ``answers`` in, one statement."""
        if not connection.features.supports_update_conflicts_with_target:
            return
        sql, params = _cells(answers).query.sql_with_params()
        with connection.cursor() as cursor:
            cursor.execute(_upsert(sql), params)

    def add_answer(self, messages: models.QuerySet[Message], answer_id: uuid.UUID) -> None:
        """Count one finished answer in, one statement; its SQL is built once (on the path
        every turn takes, the ORM's compiler would cost more than the statement)."""
        if not connection.features.supports_update_conflicts_with_target:
            return
        if connection.vendor not in _compiled:
            sql, compiled = _cells(messages.filter(pk=_SENTINEL)).query.sql_with_params()
            mark = messages.model._meta.pk.get_db_prep_value(_SENTINEL, connection)
            _compiled[connection.vendor] = (_upsert(sql), list(compiled), mark)
        sql, params, mark = _compiled[connection.vendor]
        pk = messages.model._meta.pk.get_db_prep_value(answer_id, connection)
        with connection.cursor() as cursor:
            cursor.execute(sql, [pk if p == mark else p for p in params])

    def rebuild(self, answers: models.QuerySet[Message]) -> None:
        """Recount the rollup from ``answers`` (every finished answer there is)."""
        with transaction.atomic():
            self.all().delete()
            self.add(answers)


class DailyUsage(models.Model):
    day = models.IntegerField(_("day"), help_text=_("Days since 1970-01-01, UTC."))
    kind = models.CharField(_("kind"), max_length=16, choices=Kind.choices)
    label = models.CharField(_("label"), max_length=255, blank=True)
    turns = models.PositiveIntegerField(_("turns"), default=0)
    tokens = models.PositiveBigIntegerField(_("tokens"), default=0)
    cost = models.DecimalField(_("cost"), max_digits=18, decimal_places=6, null=True)

    objects = DailyUsageManager()

    class Meta:
        verbose_name = _("daily usage")
        verbose_name_plural = _("daily usage")
        ordering = ["day", "kind", "label"]
        constraints = [
            models.UniqueConstraint(fields=["day", "kind", "label"], name="chatproxy_usage_cell")
        ]

    def __str__(self) -> str:
        return f"{self.day} {self.kind} {self.label}"
