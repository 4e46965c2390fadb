"""Staff review transcripts here; the transcript is an audit trail, so nothing is editable."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, cast
from weakref import WeakKeyDictionary

from django import forms
from django.contrib import admin
from django.db.models import Count, QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.utils.safestring import SafeString
from django.utils.translation import gettext_lazy as _

from .conf import conf
from .conversations import review
from .models import ApiKey, Conversation, Message

# Thumbnails only from URLs that cannot run anything: https:, or a data: URL of a raster type.
SAFE_IMAGE = re.compile(r"https://\S+|data:image/(png|jpeg|webp|gif);base64,[A-Za-z0-9+/=]+")


class ReadOnlyMixin:
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class MessageInline(ReadOnlyMixin, admin.StackedInline):  # type: ignore[type-arg]
    model = Message
    extra = 0
    can_delete = False
    classes = ["chatproxy-transcript"]
    fields = [
        ("role", "status", "model", "finish_reason", "error_code"),
        ("content", "raw_content"),
        "said",
        ("prompt_tokens", "completion_tokens", "total_tokens", "cost"),
        ("cached_tokens", "reasoning_tokens"),
        ("first_token_ms", "duration_ms", "created_at", "finished_at"),
    ]
    readonly_fields = [f for row in fields for f in ((row,) if isinstance(row, str) else row)]

    @admin.display(description="parts, reasoning and tool calls")
    def said(self, obj: Message) -> SafeString:
        return render_said(obj)


def render_said(message: Message) -> SafeString:
    """Render a message's parts in order, its reasoning folded and its tool calls with their
    arguments pretty-printed; empty for a message that is only text."""
    if not (message.parts or message.reasoning or message.tool_calls or message.tool_call_id):
        return SafeString("")
    context = {
        "parts": [_part(p) for p in message.parts],
        "reasoning": message.reasoning,
        "tool_calls": [
            {**c, "arguments": _pretty(c.get("arguments", ""))} for c in message.tool_calls
        ],
        "tool_call_id": message.tool_call_id,
        # A server tool's result carries its name and timing (chatproxy.steps).
        "server_tool": message.metadata if isinstance(message.metadata, dict) else None,
    }
    return SafeString(render_to_string("admin/chatproxy/message/said.html", context))


def _part(part: dict[str, Any]) -> dict[str, str]:
    kind = part.get("type")
    if kind == "text":
        return {"kind": "text", "text": str(part.get("text", ""))}
    url = str((part.get("image_url") or {}).get("url", "")) if kind == "image_url" else ""
    # A data URL longer than the request limit allows (a row from before it was lowered) is
    # named, not drawn.
    cap = len("data:image/jpeg;base64,") + conf.CHATPROXY_MAX_IMAGE_BYTES * 4 // 3 + 4
    if url and SAFE_IMAGE.fullmatch(url) and (url.startswith("https:") or len(url) <= cap):
        return {"kind": "image", "url": url}
    if kind == "image_url":
        return {"kind": "other", "label": f"[an image not shown: {len(url)} characters]"}
    return {"kind": "other", "label": f"[a {kind} part]"}


def _pretty(arguments: str) -> str:
    try:
        return json.dumps(json.loads(arguments), indent=2, ensure_ascii=False)
    except ValueError:
        return arguments  # not JSON (a model's mistake): shown as sent


@admin.register(Conversation)
class ConversationAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["__str__", "owner", "model", "message_count", "status", "created_at"]
    list_filter = ["status", "model", "created_at"]
    search_fields = ["title", "messages__content", "owner__username", "owner__email"]
    readonly_fields = [
        "id",
        "owner",
        "session_key",
        "title",
        "model",
        "status",
        "created_at",
        "updated_at",
        "deleted_at",
    ]
    date_hierarchy = "created_at"
    inlines = [MessageInline]
    # Adds a live view of an answer that is still streaming (see views.watch).
    change_form_template = "admin/chatproxy/conversation/change_form.html"

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        # The branches partial (admin/chatproxy/conversation/branches.html): the active path,
        # or with ?branch=<message id> the newest branch through that message.
        conversation = self.get_object(request, object_id)
        if conversation is not None and self.has_view_permission(request, conversation):
            through = _uuid(request.GET.get("branch", ""))
            extra_context = {**(extra_context or {}), "branches": review(conversation, through)}
        return super().change_view(request, object_id, form_url, extra_context)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Conversation]:
        queryset: QuerySet[Conversation] = super().get_queryset(request)
        # distinct: the search on messages__content joins the messages again, and each
        # matching message would otherwise count every message once more.
        return queryset.select_related("owner").annotate(Count("messages", distinct=True))

    @admin.display(description="messages", ordering="messages__count")
    def message_count(self, obj: Conversation) -> int:
        return int(obj.messages__count)  # type: ignore[attr-defined]


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
        "total_tokens",
        "created_at",
    ]
    list_filter = ["role", "status", "model", "created_at"]
    search_fields = ["content", "conversation__title"]
    readonly_fields = [f.name for f in Message._meta.fields]
    list_select_related = ["conversation"]


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
