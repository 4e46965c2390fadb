"""Staff review: flags, tags, notes and "reviewed" marks on a conversation or one answer.

Each is a row of its own, kept with who added it and when, so a review is a log that nobody
rewrites: a mark is added, never edited.
"""

from __future__ import annotations

from typing import Any, cast

from django import forms
from django.conf import settings
from django.db import models
from django.utils.translation import gettext_lazy as _

from .conf import TAG_LENGTH, conf

REVIEW_PERMISSION = "chatproxy.review_conversation"
NOTE_LENGTH = 2000


class Kind(models.TextChoices):
    FLAG = "flag", _("flag")
    TAG = "tag", _("tag")
    NOTE = "note", _("note")
    REVIEWED = "reviewed", _("reviewed")


def flag_choices() -> list[tuple[str, str]]:
    """The flags reviewers may add: CHATPROXY_REVIEW_FLAGS, as (key, label) pairs."""
    return list(conf.CHATPROXY_REVIEW_FLAGS.items())


def read_tags(text: str) -> list[str]:
    """Split comma-separated tags, trimmed, lower-cased, without repeats or empties."""
    tags = (t.strip().lower() for t in text.split(","))
    return list(dict.fromkeys(t for t in tags if t))


class Annotation(models.Model):
    """One reviewer's mark: a flag (from CHATPROXY_REVIEW_FLAGS), a tag, a note, or the
    conversation marked reviewed; on the conversation, or on one of its answers."""

    conversation = models.ForeignKey(
        "chatproxy.Conversation",
        on_delete=models.CASCADE,
        related_name="annotations",
        verbose_name=_("conversation"),
    )
    message = models.ForeignKey(
        "chatproxy.Message",
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="annotations",
        verbose_name=_("answer"),
        help_text=_("Empty for a mark on the whole conversation."),
    )
    kind = models.CharField(_("kind"), max_length=8, choices=Kind.choices)
    value = models.CharField(
        _("value"), max_length=TAG_LENGTH, blank=True, help_text=_("The flag's key, or the tag.")
    )
    note = models.TextField(_("note"), blank=True, max_length=NOTE_LENGTH)
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        related_name="+",
        verbose_name=_("by"),
    )
    created_at = models.DateTimeField(_("added"), auto_now_add=True)

    class Meta:
        verbose_name = _("review mark")
        verbose_name_plural = _("review marks")
        ordering = ["created_at"]
        indexes = [
            models.Index(fields=["conversation", "kind"]),
            models.Index(fields=["kind", "value"]),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.value}".strip()

    @property
    def label(self) -> str:
        """What the mark says: a flag's label (its key if the setting dropped it), a tag."""
        if self.kind == Kind.FLAG:
            return str(conf.CHATPROXY_REVIEW_FLAGS.get(self.value, self.value))
        return self.value


class ReviewForm(forms.Form):
    """What a reviewer adds in one go: any of a flag, tags and a note, on the conversation or
    one answer, and whether the conversation is now reviewed."""

    target = forms.ChoiceField(label=_("On"), required=False)
    flag = forms.ChoiceField(label=_("Flag"), required=False)
    tags = forms.CharField(
        label=_("Tags"), required=False, max_length=500, help_text=_("Separate tags with commas.")
    )
    note = forms.CharField(
        label=_("Note"),
        required=False,
        max_length=NOTE_LENGTH,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
    )
    reviewed = forms.BooleanField(label=_("Mark the conversation reviewed"), required=False)

    def __init__(self, *args: Any, answers: list[tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        target = cast(forms.ChoiceField, self.fields["target"])
        target.choices = [("", _("the whole conversation")), *answers]
        flag = cast(forms.ChoiceField, self.fields["flag"])
        flag.choices = [("", "—"), *flag_choices()]

    def clean_tags(self) -> list[str]:
        tags = read_tags(self.cleaned_data["tags"])
        if any(len(tag) > TAG_LENGTH for tag in tags):
            raise forms.ValidationError(
                f"Keep each tag to {TAG_LENGTH} characters or fewer.", code="tag_too_long"
            )
        return tags

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        wanted = data.get("flag") or data.get("tags") or data.get("note") or data.get("reviewed")
        if not wanted and not self.errors:  # a wrong field says so itself
            raise forms.ValidationError(
                "Add a flag, a tag or a note, or mark the conversation reviewed.", code="empty"
            )
        return data

    def marks(self, conversation_id: Any, author: Any) -> list[Annotation]:
        """The review marks the valid form adds, unsaved."""
        data = self.cleaned_data
        on = {"conversation_id": conversation_id, "author": author}
        message = {"message_id": data["target"] or None}
        marks = [Annotation(kind=Kind.TAG, value=tag, **on, **message) for tag in data["tags"]]
        if data["flag"]:
            marks.insert(0, Annotation(kind=Kind.FLAG, value=data["flag"], **on, **message))
        if data["note"]:
            marks.append(Annotation(kind=Kind.NOTE, note=data["note"], **on, **message))
        if data["reviewed"]:
            marks.append(Annotation(kind=Kind.REVIEWED, **on))
        return marks
