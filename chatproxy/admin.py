"""Staff read, judge and export transcripts here. The transcript is an audit trail, so nothing
said is editable: reviewers add marks beside it (chatproxy.review)."""

from __future__ import annotations

import uuid
from typing import Any, cast
from weakref import WeakKeyDictionary

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.views.main import PAGE_VAR, SEARCH_VAR, ChangeList
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Count, OuterRef, Q, QuerySet, Subquery, Sum
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.text import smart_split, unescape_string_literal
from django.utils.translation import gettext_lazy as _

from .budgets import spent
from .conversations import review
from .dashboard import PERIODS, figures, period_days
from .export import EXPORT_PERMISSION, export, response
from .feedback import Rating
from .listfilters import (
    ErrorCodeFilter,
    FlagFilter,
    HierarchyQuerySet,
    OwnerFilter,
    RatingFilter,
    ReviewStateFilter,
)
from .models import ApiKey, Budget, Conversation, Message, Role, Spend
from .owners import owner_label
from .pagination import OneScanPaginator, page_number
from .review import REVIEW_PERMISSION, Annotation, ReviewForm
from .spending import PeriodFilter, summary
from .transcript import transcript


class ReadOnlyMixin:
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def _per_conversation(expression: Any) -> Subquery:
    """One aggregate of a conversation's messages, as a subquery: a join would be multiplied
    by the search on message text."""
    rows = Message.objects.filter(conversation=OuterRef("pk")).order_by().values("conversation")
    return Subquery(rows.annotate(value=expression).values("value"))


class ConversationChangeList(ChangeList):
    """The conversation list, without the date hierarchy while a search is on: its links come
    from the matching rows, and with the message text in the search each one is another scan
    of the messages (2 of the 4 a search of 1,000,000 messages ran). The page and its count
    come from one more (``OneScanPaginator``)."""

    def __init__(self, request: HttpRequest, *args: Any, **kwargs: Any) -> None:
        super().__init__(request, *args, **kwargs)
        if self.query:
            self.date_hierarchy = None

    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        if isinstance(self.paginator, OneScanPaginator) and not self.multi_page:
            # One page holds every match: its rows by primary key, not by a second search.
            self.result_list = self.paginator.page(1).object_list


@admin.register(Conversation)
class ConversationAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = [
        "__str__",
        "owned_by",
        "model",
        "status",
        "message_count",
        "tokens",
        "cost",
        "updated_at",
    ]
    list_filter = [
        "status",
        ErrorCodeFilter,
        "model",
        "created_at",
        OwnerFilter,
        FlagFilter,
        RatingFilter,
        ReviewStateFilter,
    ]
    search_fields = ["title"]  # and more: see get_search_results
    search_help_text = _("Searches titles, message text and owners' user names and e-mails.")
    readonly_fields = [
        "title", "owned_by", "model", "status", "created_at", "updated_at", "deleted_at", "id"
    ]  # fmt: skip
    fields = [
        "title", "owned_by", "model", "status", "created_at", "updated_at", "deleted_at", "id"
    ]  # fmt: skip
    date_hierarchy = "created_at"
    actions = ["export_jsonl", "export_csv"]
    # The transcript and the review form (see transcript.html and change_view), and a live
    # view of an answer that is still streaming (see views.watch).
    change_form_template = "admin/chatproxy/conversation/change_form.html"
    change_list_template = "admin/chatproxy/conversation/change_list.html"  # a dashboard link

    def get_queryset(self, request: HttpRequest) -> QuerySet[Conversation]:
        queryset: QuerySet[Conversation] = super().get_queryset(request)
        queryset = HierarchyQuerySet(Conversation, query=queryset.query, using=queryset.db)
        return queryset.select_related("owner").annotate(
            message_total=_per_conversation(Count("pk")),
            token_total=_per_conversation(Sum("total_tokens")),
            cost_total=_per_conversation(Sum("cost")),
        )

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return ConversationChangeList

    def get_paginator(
        self,
        request: HttpRequest,
        queryset: QuerySet[Conversation],
        per_page: int,
        orphans: int = 0,
        allow_empty_first_page: bool = True,
    ) -> Paginator[Any]:
        """While a search is on, the page and the count from one scan of the messages."""
        if not request.GET.get(SEARCH_VAR):
            return super().get_paginator(request, queryset, per_page, orphans)
        number = page_number(request.GET.get(PAGE_VAR))
        return OneScanPaginator(queryset, per_page, number, self.get_queryset(request))

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Conversation], search_term: str
    ) -> tuple[QuerySet[Conversation], bool]:
        """Find the conversations with every word in their title, owner or one of their
        messages, as the admin's own search does; the messages as ``pk IN (the ids of
        conversations with a matching message)``, one scan of them, where a join would give a
        row per matching message (and made a search of 1,000,000 messages take 24 s)."""
        for word in smart_split(search_term):
            if word[0] in "\"'" and word[-1] == word[0]:
                word = unescape_string_literal(word)
            said = Message.objects.filter(content__icontains=word).values("conversation_id")
            queryset = queryset.filter(
                Q(title__icontains=word)
                | Q(owner__username__icontains=word)
                | Q(owner__email__icontains=word)
                | Q(pk__in=said)
            )
        return queryset, False

    @admin.display(description="owner", ordering="owner__username")
    def owned_by(self, obj: Conversation) -> str:
        return owner_label(obj.owner.get_username() if obj.owner else None, obj.session_key)

    # Not sortable: ordering 100,000 conversations by a sum over their messages took 1.4 s.
    @admin.display(description="messages")
    def message_count(self, obj: Conversation) -> int:
        return int(getattr(obj, "message_total", None) or 0)

    @admin.display(description="tokens")
    def tokens(self, obj: Conversation) -> int:
        return int(getattr(obj, "token_total", None) or 0)

    @admin.display(description="cost")
    def cost(self, obj: Conversation) -> str:
        total = getattr(obj, "cost_total", None)
        return "—" if total is None else f"{total:.6f}"

    def has_review_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.has_perm(REVIEW_PERMISSION))

    def has_export_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.has_perm(EXPORT_PERMISSION))

    @admin.action(description=_("Export as JSONL (fine-tuning format)"), permissions=["export"])
    def export_jsonl(
        self, request: HttpRequest, queryset: QuerySet[Conversation]
    ) -> StreamingHttpResponse:
        return response(request, export(queryset, "jsonl"), "jsonl")

    @admin.action(description=_("Export as CSV (a row per message)"), permissions=["export"])
    def export_csv(
        self, request: HttpRequest, queryset: QuerySet[Conversation]
    ) -> StreamingHttpResponse:
        return response(request, export(queryset, "csv"), "csv")

    def get_urls(self) -> list[URLPattern]:
        review = path(
            "<path:object_id>/review/",
            self.admin_site.admin_view(self.review_view),
            name="chatproxy_conversation_review",
        )
        dashboard = path(
            "dashboard/",
            self.admin_site.admin_view(self.dashboard_view),
            name="chatproxy_conversation_dashboard",
        )
        return [review, dashboard, *super().get_urls()]

    def dashboard_view(self, request: HttpRequest) -> HttpResponse:
        """Charts of the chosen period's turns, tokens, cost, errors, latency and top users."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        days = period_days(request.GET.get("days"))
        context = {
            **self.admin_site.each_context(request),
            "title": _("Dashboard"),
            "opts": self.opts,
            "days": days,
            "periods": PERIODS,
            **figures(days),
        }
        return TemplateResponse(request, "admin/chatproxy/dashboard.html", context)

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        conversation = self.get_object(request, object_id)
        context = dict(extra_context or {})
        if conversation is not None and self.has_view_permission(request, conversation):
            context["transcript"] = transcript(conversation)
            # The branches partial (admin/chatproxy/conversation/branches.html), where there
            # are branches or one is asked for: the active path, or with ?branch=<message id>
            # the newest branch through that message.
            through = _uuid(request.GET.get("branch", ""))
            branches = review(conversation, through)
            if branches["branches"] > 1 or through is not None:
                context["branches"] = branches
            if self.has_review_permission(request):
                context["review_form"] = self._review_form(conversation, None)
                context["review_url"] = reverse(
                    "admin:chatproxy_conversation_review", args=[conversation.pk]
                )
        return super().change_view(request, object_id, form_url, context)

    def review_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """Add the reviewer's marks (POST), then show the conversation again."""
        conversation = self.get_object(request, object_id)
        if conversation is None or not self.has_view_permission(request, conversation):
            raise Http404("No conversation with that id.")
        if not self.has_review_permission(request):
            raise PermissionDenied
        if request.method != "POST":
            return redirect("admin:chatproxy_conversation_change", conversation.pk)
        form = self._review_form(conversation, request.POST)
        if form.is_valid():
            Annotation.objects.bulk_create(form.marks(conversation.pk, request.user))
            self.message_user(request, _("Added to the review."), messages.SUCCESS)
        else:  # the transcript is long: say what to fix at its top, not deep in a form
            for field, errors in form.errors.items():
                label = "" if field == "__all__" else f"{form.fields[field].label}: "
                for error in errors:
                    self.message_user(request, f"{label}{error}", messages.ERROR)
        return redirect("admin:chatproxy_conversation_change", conversation.pk)

    def _review_form(self, conversation: Conversation, data: Any) -> ReviewForm:
        answers = Message.objects.filter(conversation=conversation, role=Role.ASSISTANT)
        choices = [
            (str(pk), f"the answer #{position}")
            for pk, position in answers.exclude(status="").values_list("pk", "position")
        ]
        return ReviewForm(data, answers=choices)


def _uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


@admin.register(Message)
class MessageAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = [
        "__str__",
        "conversation",
        "role",
        "status",
        "model",
        "upstream",
        "total_tokens",
        "created_at",
    ]
    list_filter = ["role", "status", "model", "upstream", "created_at"]
    search_fields = ["content", "conversation__title"]
    readonly_fields = [f.name for f in Message._meta.fields]
    list_select_related = ["conversation"]


@admin.register(Rating)
class RatingAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    """Users' verdicts on answers; only their owners give or change them."""

    list_display = ["value", "comment", "conversation", "message", "updated_at"]
    list_filter = ["value", "updated_at"]
    search_fields = ["comment"]
    readonly_fields = ["message", "conversation", "value", "comment", "created_at", "updated_at"]
    list_select_related = ["conversation", "message"]


@admin.register(Annotation)
class AnnotationAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    """The review log: who flagged, tagged, noted or reviewed what, and when."""

    list_display = ["kind", "label", "note", "conversation", "message", "author", "created_at"]
    list_filter = ["kind", "value", "created_at"]
    search_fields = ["value", "note"]
    readonly_fields = ["conversation", "message", "kind", "value", "note", "author", "created_at"]
    list_select_related = ["conversation", "message", "author"]


ISSUE_FOR_OTHERS = "chatproxy.issue_apikey_for_others"
OWN_KEYS_ONLY = (
    "You may create API keys only for yourself: a key lets whoever holds it act as its user. "
    "Creating one for another user needs the “Can create API keys for other users” permission."
)


class ApiKeyAddForm(forms.ModelForm):  # type: ignore[type-arg]
    """A new key is for the requester, unless they may issue keys for others: a key acts as
    its user on the chat API, transcripts included."""

    requester: Any = None  # set on the class ApiKeyAdmin.get_form makes for each request

    def clean_user(self) -> Any:
        user = self.cleaned_data["user"]
        if user.pk != self.requester.pk and not self.requester.has_perm(ISSUE_FOR_OTHERS):
            raise forms.ValidationError(OWN_KEYS_ONLY, code="own_keys_only")
        return user


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["name", "user", "prefix", "revoked", "created_at", "last_used_at"]
    list_filter = ["revoked", "created_at"]
    search_fields = ["name", "user__username", "prefix"]
    raw_id_fields = ["user"]
    readonly_fields = ["prefix", "created_at", "last_used_at"]

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return (
            ["user", "name"] if obj is None else ["user", "name", "revoked", *self.readonly_fields]
        )

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        if obj is None:
            return self.readonly_fields
        # Revoking is for good: brought back, a leaked key would work again.
        return ["user", *(["revoked"] if obj.revoked else []), *self.readonly_fields]

    def get_form(
        self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any
    ) -> Any:
        if obj is not None:
            return super().get_form(request, obj, change, **kwargs)
        # A subclass of ApiKeyAddForm made for this request alone (modelform_factory).
        form = cast(
            type[ApiKeyAddForm],
            super().get_form(request, obj, change, form=ApiKeyAddForm, **kwargs),
        )
        form.requester = request.user
        return form

    def get_changeform_initial_data(self, request: HttpRequest) -> dict[str, Any]:
        return {"user": request.user.pk, **super().get_changeform_initial_data(request)}

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        # The raw key exists only now: only its hash is stored, and response_add shows it once.
        key, raw = ApiKey.objects.issue(obj.user, obj.name)
        obj.pk, obj.prefix, obj.created_at = key.pk, key.prefix, key.created_at
        _new_keys[request] = raw

    def response_add(
        self, request: HttpRequest, obj: ApiKey, post_url_continue: str | None = None
    ) -> HttpResponse:
        """Show the new key on this response, never in a message: messages travel in a cookie
        (signed, not encrypted) or the session."""
        raw = _new_keys.pop(request, None)
        if raw is None:
            return super().response_add(request, obj, post_url_continue)
        context = {
            **self.admin_site.each_context(request),
            "title": _("Copy the new API key"),
            "opts": self.opts,
            "key": obj,
            "raw_key": raw,
            "has_view_permission": self.has_view_or_change_permission(request, obj),
        }
        return TemplateResponse(request, "admin/chatproxy/apikey/created.html", context)


# The raw key an add request issued, from save_model to response_add of the same request.
_new_keys: WeakKeyDictionary[HttpRequest, str] = WeakKeyDictionary()


@admin.register(Budget)
class BudgetAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Budgets that replace CHATPROXY_BUDGETS for their target (docs/budgets.md)."""

    list_display = ["__str__", "scope", "user", "group", "api_key", "period", "tokens", "cost"]
    list_display += ["spent"]
    list_filter = ["scope", "period"]
    search_fields = ["user__username", "group__name", "api_key__name"]
    raw_id_fields = ["user", "api_key"]
    change_list_template = "admin/chatproxy/budget/change_list.html"  # a link to the spend

    @admin.display(description=_("spent this period"))
    def spent(self, obj: Budget) -> str:
        """What counts against the budget now (one query a row: a page lists a few)."""
        standing = spent(obj)
        parts = [f"{standing.tokens} tokens"] if obj.tokens is not None else []
        if obj.cost is not None:
            parts.append(f"{standing.cost} in cost")
        return ", ".join(parts)


@admin.register(Spend)
class SpendAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    """What each turn spent against the budgets, read-only; above the list, the spend per user
    and per group in the chosen period, beside their budgets (docs/budgets.md)."""

    list_display = ["created_at", "user", "api_key", "tokens", "cost", "settled"]
    list_filter = [PeriodFilter, "settled"]
    search_fields = ["user__username"]
    list_select_related = ["user", "api_key"]
    change_list_template = "admin/chatproxy/spend/change_list.html"

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # the budgets count it: deleting a row would give its spend back

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        response = super().changelist_view(request, extra_context)
        context = getattr(response, "context_data", None)
        if context is not None and "cl" in context:  # not a redirect after a bad lookup
            changelist = context["cl"]
            [period] = [f for f in changelist.filter_specs if isinstance(f, PeriodFilter)]
            context["summary"] = summary(changelist.queryset, period.value())
        return response
