"""Users rate the answers they were given: up or down, with an optional comment."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from django.db import models
from django.utils.translation import gettext_lazy as _

from .events import RatingBody
from .exceptions import RequestError
from .owners import Owner

COMMENT_LENGTH = 1000


class Verdict(models.TextChoices):
    UP = "up", _("up")
    DOWN = "down", _("down")


def read_rating(body: Any) -> tuple[str, str]:
    """Return the (value, comment) of a rating request body, or raise a ``RequestError``
    that says what to send."""
    if not isinstance(body, dict) or set(body) - {"value", "comment"}:
        raise RequestError(
            "invalid_rating", 'Send {"value": "up" or "down", "comment": "optional text"}.'
        )
    value, comment = body.get("value"), body.get("comment", "")
    if value not in Verdict.values:
        raise RequestError("invalid_rating", '"value" must be "up" or "down".')
    if not isinstance(comment, str) or len(comment) > COMMENT_LENGTH:
        raise RequestError(
            "invalid_rating", f'"comment" must be text of at most {COMMENT_LENGTH} characters.'
        )
    return value, comment.strip()


def not_found() -> RequestError:
    return RequestError("message_not_found", "No answer with that id belongs to you.", status=404)


class RatingManager(models.Manager["Rating"]):
    def rate(self, owner: Owner, message_id: uuid.UUID, value: str, comment: str) -> Rating:
        """Save (or change) the owner's rating of one of their answers; raise a 404
        ``RequestError`` for any other message, so ids cannot be probed."""
        # models imports this module (to register Rating), so the model comes from the field.
        messages = self.model._meta.get_field("message").related_model
        answer = (
            messages._default_manager.filter(
                pk=message_id,
                role="assistant",
                **{f"conversation__{k}": v for k, v in owner.filter().items()},
            )
            .exclude(status="")  # a sent history's assistant turns were never answered here
            .values_list("pk", "conversation_id")
            .first()
        )
        if answer is None:
            raise not_found()
        rating, _ = self.update_or_create(
            message_id=answer[0],
            defaults={"conversation_id": answer[1], "value": value, "comment": comment},
        )
        return rating


class Rating(models.Model):
    """The owner's verdict on one answer; a later rating replaces it."""

    message = models.OneToOneField(
        "chatproxy.Message",
        on_delete=models.CASCADE,
        related_name="rating",
        verbose_name=_("answer"),
    )
    conversation = models.ForeignKey(
        "chatproxy.Conversation",
        on_delete=models.CASCADE,
        related_name="ratings",
        verbose_name=_("conversation"),
        help_text=_("The answer's conversation, kept here so the admin filters by it fast."),
    )
    value = models.CharField(_("rating"), max_length=4, choices=Verdict.choices)
    comment = models.TextField(_("comment"), blank=True, max_length=COMMENT_LENGTH)
    created_at = models.DateTimeField(_("created"), auto_now_add=True)
    updated_at = models.DateTimeField(_("changed"), auto_now=True)

    objects = RatingManager()

    class Meta:
        verbose_name = _("rating")
        verbose_name_plural = _("ratings")
        ordering = ["-updated_at"]
        indexes = [models.Index(fields=["conversation", "value"])]

    def __str__(self) -> str:
        return f"{self.value}: {self.message_id}"

    def as_json(self) -> RatingBody:
        value: Literal["up", "down"] = "up" if self.value == Verdict.UP else "down"
        return {"message_id": str(self.message_id), "value": value, "comment": self.comment}
