"""Spend per user and per group, as the admin shows it: what each spent in a period (a group,
what its members spent together), beside the budgets that apply to it and what each of those
has spent in its own current period. Synchronous: the admin's views call it.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterator
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django.contrib import admin
from django.contrib.admin.views.main import ChangeList
from django.db.models import QuerySet, Sum
from django.http import HttpRequest
from django.utils import timezone
from django.utils.functional import Promise
from django.utils.translation import gettext_lazy as _

if TYPE_CHECKING:  # the stubs' type of a filter's choice
    from django.contrib.admin.filters import _ListFilterChoices

from .budgets import LABELS, Limit, Standing, limits_of, money, standings
from .models import Period, Scope, Spend

# The periods the admin sums spend over, the first its default.
PERIODS: dict[str, Promise] = {
    Period.DAY: _("today"),
    Period.WEEK: _("this week"),
    Period.MONTH: _("this month"),
}
# The most users or groups a summary lists, those that spent the most tokens first.
SHOWN = 100


def period_start(period: str, now: datetime.datetime) -> datetime.datetime:
    """When the day, week or month that holds ``now`` began, as a budget's period does."""
    return Limit(Scope.SITE, "site", period).start(now)


class PeriodFilter(admin.SimpleListFilter):
    """The spend list's period: today, this week or this month, never all of it, so the
    summary above the list answers "how much so far in this period"."""

    title = _("period")
    parameter_name = "period"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[Any, Any]]:
        return list(PERIODS.items())

    def value(self) -> str:
        chosen = super().value()
        return chosen if chosen in PERIODS else Period.DAY

    def choices(self, changelist: ChangeList) -> Iterator[_ListFilterChoices]:
        for lookup, title in self.lookup_choices:
            yield {
                "selected": self.value() == lookup,
                "query_string": changelist.get_query_string({self.parameter_name: lookup}),
                "display": title,
            }

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset.filter(created_at__gte=period_start(self.value(), timezone.now()))


@dataclasses.dataclass(frozen=True, slots=True)
class Spender:
    """A user or a group, what it spent in the period, and its budgets' standings."""

    name: str
    tokens: int
    cost: Decimal
    budgets: list[Standing]

    @property
    def limits(self) -> list[str]:
        """Each budget as the admin reads it: "daily: 120 of 500 tokens"."""
        return [_describe(standing) for standing in self.budgets]


def _describe(standing: Standing) -> str:
    limit = standing.limit
    parts = [] if limit.tokens is None else [f"{standing.tokens} of {limit.tokens} tokens"]
    if limit.cost is not None:
        parts.append(f"{money(standing.cost)} of {money(limit.cost)} in cost")
    period = LABELS.get(limit.period) or f"{limit.window}-second"  # type: ignore[call-overload]
    return f"{period}: {', '.join(parts)}"


def summary(
    spend: QuerySet[Spend], period: str, now: datetime.datetime | None = None
) -> dict[str, object]:
    """The spend of ``spend`` (the rows the admin's list shows, of ``period``, a key of
        PERIODS) per user and per group, each
        with its budgets: five statements (two sums; with budgets on, the admin's budgets of the
    users and of the groups, then every budget's standing in one)."""
    now = now or timezone.now()
    spend = spend.order_by()
    by_user = (
        spend.filter(user__isnull=False)
        .values_list("user_id", "user__username")
        .annotate(tokens=Sum("tokens"), cost=Sum("cost"))
        .order_by("-tokens", "user__username")[:SHOWN]
    )
    by_group = (
        spend.filter(user__groups__isnull=False)
        .values_list("user__groups", "user__groups__name")
        .annotate(tokens=Sum("tokens"), cost=Sum("cost"))
        .order_by("-tokens", "user__groups__name")[:SHOWN]
    )
    user_rows, group_rows = list(by_user), list(by_group)
    tables = [
        (user_rows, limits_of(Scope.USER, {pk: name for pk, name, _, _ in user_rows})),
        (group_rows, limits_of(Scope.GROUP, {pk: name for pk, name, _, _ in group_rows})),
    ]
    every = [limit for rows, found in tables for row in rows for limit in found.get(row[0], [])]
    counted = iter(standings(every, now))  # in the order of ``every``
    users, groups = (
        [
            Spender(name, int(tokens), Decimal(cost), [next(counted) for _ in found.get(pk, [])])
            for pk, name, tokens, cost in rows
        ]
        for rows, found in tables
    )
    return {"period": PERIODS[period], "users": users, "groups": groups}
