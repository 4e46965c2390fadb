"""Budgets: quotas in tokens and/or cost per period, on a user, a group (its members
together), an API key, anonymous visitors (together) and the whole site.

CHATPROXY_BUDGETS gives the defaults; a ``Budget`` row in the admin replaces them for its
target. Every applicable budget must hold, so the tightest one wins; ``reservations`` holds a
turn's worst case against them. Synchronous: this runs on chatproxy's database thread.
"""

from __future__ import annotations

import dataclasses
import datetime
from decimal import Decimal
from typing import Any

from django.contrib.auth.models import Group
from django.db.models import Min, Q, Sum
from django.utils import timezone

from .conf import conf
from .models import Budget, Period, Scope, Spend
from .owners import Owner

CENT = Decimal("0.000001")
LABELS = {Period.DAY: "daily", Period.WEEK: "weekly", Period.MONTH: "monthly"}


@dataclasses.dataclass(frozen=True, slots=True)
class Limit:
    """One budget that applies to a turn, from the settings or from a ``Budget`` row."""

    scope: str
    name: str  # the user's or group's name; "anonymous"; "site"
    period: str
    tokens: int | None = None
    cost: Decimal | None = None
    window: int | None = None  # seconds, for a rolling window
    target: int | None = None  # the user's or group's id

    def start(self, now: datetime.datetime) -> datetime.datetime:
        """When the period that holds ``now`` began."""
        if self.period == Period.ROLLING:
            return now - datetime.timedelta(seconds=self.window or 0)
        local = timezone.localtime(now).replace(hour=0, minute=0, second=0, microsecond=0)
        if self.period == Period.WEEK:
            return local - datetime.timedelta(days=local.weekday())
        if self.period == Period.MONTH:
            return local.replace(day=1)
        return local

    def resets(self, now: datetime.datetime, oldest: datetime.datetime | None) -> datetime.datetime:
        """When the period ends; for a rolling window, when its oldest counted spend leaves."""
        if self.period == Period.ROLLING:
            return (oldest or now) + datetime.timedelta(seconds=self.window or 0)
        start = self.start(now)
        if self.period == Period.DAY:
            following = start + datetime.timedelta(days=1)
        elif self.period == Period.WEEK:
            following = start + datetime.timedelta(days=7)
        else:
            following = (start + datetime.timedelta(days=32)).replace(day=1)
        # Through the calendar, not the clock, so a daylight-saving change keeps midnight.
        return timezone.make_aware(following.replace(tzinfo=None), start.tzinfo)

    def spenders(self) -> Q:
        """Whose spend counts against this budget."""
        if self.scope == Scope.USER:
            return Q(user_id=self.target)
        if self.scope == Scope.GROUP:
            members = Group.user_set.through.objects.filter(group_id=self.target or 0)
            return Q(user_id__in=members.values("user_id"))
        if self.scope == Scope.API_KEY:
            return Q(api_key_id=self.target)
        if self.scope == Scope.ANONYMOUS:
            return Q(user__isnull=True)
        return Q()

    def label(self) -> str:
        period = LABELS.get(self.period) or f"{self.window}-second"  # type: ignore[call-overload]
        if self.scope == Scope.USER:
            return f"Your {period} budget"
        if self.scope == Scope.GROUP:
            return f"The {period} budget of the group {self.name!r}"
        if self.scope == Scope.API_KEY:
            return f"The {period} budget of this API key"
        if self.scope == Scope.ANONYMOUS:
            return f"The {period} budget of visitors without an account"
        return f"The site's {period} budget"


@dataclasses.dataclass(frozen=True, slots=True)
class Standing:
    """A budget with what has been spent against it in its current period."""

    limit: Limit
    tokens: int
    cost: Decimal
    resets_at: datetime.datetime

    def fits(self, tokens: int, cost: Decimal) -> bool:
        return (self.limit.tokens is None or self.tokens + tokens <= self.limit.tokens) and (
            self.limit.cost is None or self.cost + cost <= self.limit.cost
        )

    def describe(self) -> dict[str, Any]:
        """The budget as ``GET budgets`` shows it."""
        shown: dict[str, Any] = {"scope": self.limit.scope, "name": self.limit.name}
        shown["label"] = self.limit.label()
        shown["period"] = self.limit.period
        if self.limit.window:
            shown["window"] = self.limit.window
        if self.limit.tokens is not None:
            left = max(0, self.limit.tokens - self.tokens)
            shown["tokens"] = {"limit": self.limit.tokens, "used": self.tokens, "remaining": left}
        if self.limit.cost is not None:
            left_cost = max(Decimal(0), self.limit.cost - self.cost)
            shown["cost"] = {
                "limit": money(self.limit.cost),
                "used": money(self.cost),
                "remaining": money(left_cost),
            }
        shown["resets_at"] = self.resets_at.isoformat()
        return shown


def money(value: Decimal) -> str:
    return str(value.quantize(CENT))  # as the cost columns store it


def _limits(entries: Any, scope: str, name: str, target: int | None = None) -> list[Limit]:
    return [
        Limit(
            scope,
            name,
            entry["period"],
            tokens=entry.get("tokens"),
            cost=None if entry.get("cost") is None else Decimal(str(entry["cost"])),
            window=entry.get("window"),
            target=target,
        )
        for entry in entries or []
    ]


def applicable(owner: Owner, user: Any) -> list[Limit]:
    """The budgets a turn of ``owner`` must fit: a statement for the user's groups (for a
    user) and one for the admin's budgets."""
    settings = conf.CHATPROXY_BUDGETS or {}
    groups: dict[int, str] = {}
    rows = Q(scope__in=[Scope.SITE, Scope.ANONYMOUS] if owner.user_id is None else [Scope.SITE])
    if owner.user_id is not None:
        groups = dict(Group.objects.filter(user=owner.user_id).values_list("id", "name"))
        rows |= Q(user_id=owner.user_id) | Q(group_id__in=list(groups))
    if owner.api_key_id is not None:
        rows |= Q(api_key_id=owner.api_key_id)
    overrides: dict[tuple[str, int | None], list[Limit]] = {}
    for row in Budget.objects.filter(rows):
        target: int | None = None
        name = str(row.scope)
        if row.scope == Scope.USER:
            target, name = row.user_id, str(user.get_username()) if user is not None else ""
        elif row.scope == Scope.GROUP:
            target, name = row.group_id, groups.get(row.group_id or 0, "")
        elif row.scope == Scope.API_KEY:
            target, name = row.api_key_id, "this key"
        limit = Limit(row.scope, name, row.period, row.tokens, row.cost, row.window, target)
        overrides.setdefault((row.scope, target), []).append(limit)
    wanted: list[tuple[str, str, int | None, Any]] = [(Scope.SITE, "site", None, "site")]
    if owner.user_id is None:
        wanted.append((Scope.ANONYMOUS, "anonymous", None, "anonymous"))
    else:
        username = str(user.get_username()) if user is not None else ""
        wanted.append((Scope.USER, username, owner.user_id, "user"))
        wanted += [(Scope.GROUP, name, pk, ("groups", name)) for pk, name in groups.items()]
    if owner.api_key_id is not None:
        wanted.append((Scope.API_KEY, "this key", owner.api_key_id, "api_key"))
    limits: list[Limit] = []
    for scope, name, target, key in wanted:
        if (scope, target) in overrides:
            limits += overrides[(scope, target)]
        else:
            if isinstance(key, str):
                entries = settings.get(key)
            else:
                entries = (settings.get("groups") or {}).get(key[1])
            limits += _limits(entries, scope, name, target)
    return limits


def limits_of(scope: str, names: dict[int, str]) -> dict[int, list[Limit]]:
    """The budgets of each user or group in ``names`` (id to name; ``scope`` says which),
    the admin's rows replacing the settings: one statement however many there are."""
    settings = conf.CHATPROXY_BUDGETS
    if settings is None or not names:
        return {}
    field = "user_id" if scope == Scope.USER else "group_id"
    found: dict[int, list[Limit]] = {}
    for row in Budget.objects.filter(scope=scope, **{f"{field}__in": list(names)}):
        target = getattr(row, field)
        limit = Limit(scope, names[target], row.period, row.tokens, row.cost, row.window, target)
        found.setdefault(target, []).append(limit)
    groups = settings.get("groups") or {}
    for target, name in names.items():
        if target not in found:
            entries = settings.get("user") if scope == Scope.USER else groups.get(name)
            found[target] = _limits(entries, scope, name, target)
    return found


def standings(limits: list[Limit], now: datetime.datetime) -> list[Standing]:
    """What has been spent against each budget: one statement however many there are."""
    if not limits:
        return []
    sums: dict[str, Any] = {}
    for i, limit in enumerate(limits):
        counted = Q(created_at__gte=limit.start(now)) & limit.spenders()
        sums[f"t{i}"] = Sum("tokens", filter=counted)
        sums[f"c{i}"] = Sum("cost", filter=counted)
        sums[f"o{i}"] = Min("created_at", filter=counted)
    since = min(limit.start(now) for limit in limits)
    spent = Spend.objects.filter(created_at__gte=since).aggregate(**sums)
    return [
        Standing(
            limit,
            int(spent[f"t{i}"] or 0),
            Decimal(spent[f"c{i}"] or 0),
            limit.resets(now, spent[f"o{i}"]),
        )
        for i, limit in enumerate(limits)
    ]


def spent(row: Budget) -> Standing:
    """What has been spent against an admin's budget in its current period (for the admin)."""
    target: dict[str, int | None] = {
        Scope.USER: row.user_id,
        Scope.GROUP: row.group_id,
        Scope.API_KEY: row.api_key_id,
    }
    limit = Limit(
        row.scope, str(row), row.period, row.tokens, row.cost, row.window, target.get(row.scope)
    )
    return standings([limit], timezone.now())[0]


def report(owner: Owner, user: Any) -> list[dict[str, Any]]:
    """The caller's budgets as ``GET budgets`` and the ``budgets`` frame show them."""
    if conf.CHATPROXY_BUDGETS is None:
        return []
    return [s.describe() for s in standings(applicable(owner, user), timezone.now())]
