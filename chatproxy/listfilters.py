"""The conversation list's filters that look past the conversation row: into its answers,
ratings and review marks, each as an ``EXISTS`` so no filter multiplies the rows."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import Exists, OuterRef, QuerySet
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _

from .exceptions import ERROR_CODES
from .feedback import Rating, Verdict
from .models import Message
from .review import Annotation, Kind, flag_choices

Choices = list[tuple[Any, Any]]  # (value, label); labels may be lazy


class OwnerFilter(admin.SimpleListFilter):
    title = _("owner")
    parameter_name = "owner"

    def lookups(self, request: HttpRequest, model_admin: Any) -> Choices:
        return [("users", _("signed-in users")), ("anonymous", _("anonymous sessions"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value == "users":
            return queryset.filter(owner__isnull=False)
        if value == "anonymous":
            return queryset.filter(owner__isnull=True)
        if value and value.isdigit():  # the owner column links to one user's conversations
            return queryset.filter(owner_id=int(value))
        return queryset


class ErrorCodeFilter(admin.SimpleListFilter):
    title = _("error code")
    parameter_name = "error_code"

    def lookups(self, request: HttpRequest, model_admin: Any) -> Choices:
        # The codes that occur (an interceptor may use its own), read from the index.
        found = Message.objects.exclude(error_code="").order_by("error_code")
        codes = found.values_list("error_code", flat=True).distinct()
        return [(code, code) for code in codes if code in ERROR_CODES or code.isidentifier()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if not self.value():
            return queryset
        failed = Message.objects.filter(conversation=OuterRef("pk"), error_code=self.value())
        return queryset.filter(Exists(failed))


class FlagFilter(admin.SimpleListFilter):
    title = _("flag")
    parameter_name = "flag"

    def lookups(self, request: HttpRequest, model_admin: Any) -> Choices:
        return flag_choices()

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if not self.value():
            return queryset
        flagged = Annotation.objects.filter(
            conversation=OuterRef("pk"), kind=Kind.FLAG, value=self.value()
        )
        return queryset.filter(Exists(flagged))


class RatingFilter(admin.SimpleListFilter):
    title = _("rating")
    parameter_name = "rating"

    def lookups(self, request: HttpRequest, model_admin: Any) -> Choices:
        return [
            (Verdict.UP, _("an answer rated up")),
            (Verdict.DOWN, _("an answer rated down")),
            ("none", _("not rated")),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if not value:
            return queryset
        rated = Rating.objects.filter(conversation=OuterRef("pk"))
        if value == "none":
            return queryset.filter(~Exists(rated))
        return queryset.filter(Exists(rated.filter(value=value)))


class ReviewStateFilter(admin.SimpleListFilter):
    title = _("review state")
    parameter_name = "review"

    def lookups(self, request: HttpRequest, model_admin: Any) -> Choices:
        return [
            ("reviewed", _("reviewed")),
            ("unreviewed", _("not reviewed")),
            ("flagged", _("flagged, not reviewed")),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        marks = Annotation.objects.filter(conversation=OuterRef("pk"))
        reviewed = Exists(marks.filter(kind=Kind.REVIEWED))
        if self.value() == "reviewed":
            return queryset.filter(reviewed)
        if self.value() == "unreviewed":
            return queryset.filter(~reviewed)
        if self.value() == "flagged":
            return queryset.filter(Exists(marks.filter(kind=Kind.FLAG)), ~reviewed)
        return queryset
