"""A paginator that reads a page and the count of all the rows in one query: a search on
message text scans the messages, and the admin's own paginator scans them twice (the count,
then the page), 0.48 s and 0.43 s of a 1.4 s page on 1,000,000 messages on PostgreSQL."""

from __future__ import annotations

from typing import Any

from django.core.paginator import Page, Paginator
from django.db.models import Count, QuerySet, Window
from django.utils.functional import cached_property


class OneScanPaginator(Paginator):  # type: ignore[type-arg]
    """For the page ``number`` (the one the request asks for): its primary keys and the total
    from one ``SELECT pk, COUNT(*) OVER ()``, then that page's rows by primary key from
    ``unfiltered`` (the same rows before the search, which the page query would scan for
    again). Another page, or one past the end, falls back to a count of its own."""

    def __init__(
        self, object_list: QuerySet[Any], per_page: int, number: int, unfiltered: QuerySet[Any]
    ) -> None:
        super().__init__(object_list, per_page)
        self.rows, self.unfiltered = object_list, unfiltered
        self.number = number
        self._pks: list[Any] | None = None

    @cached_property
    def count(self) -> int:
        bottom = (self.number - 1) * self.per_page
        rows = list(
            self.rows.values_list("pk").annotate(total=Window(Count("pk")))[
                bottom : bottom + self.per_page
            ]
        )
        if not rows:
            return int(self.rows.count()) if self.number > 1 else 0
        self._pks = [pk for pk, _ in rows]
        return int(rows[0][1])

    def page(self, number: Any) -> Page[Any]:
        number = self.validate_number(number)
        if number != self.number or self._pks is None:
            return super().page(number)
        rows = self.unfiltered.filter(pk__in=self._pks).order_by(*self.rows.query.order_by)
        return Page(rows, number, self)


def page_number(value: str | None) -> int:
    """The 1-based page a request asks for, as the admin's change list reads it."""
    try:
        return max(1, int(value or 1))
    except ValueError:
        return 1
