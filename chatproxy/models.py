"""Conversations and their messages; persistence helpers live on the managers."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import secrets
import uuid
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, models, transaction
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from .branches import chain_unlinked, path
from .conf import conf
from .content import text_of
from .exceptions import DuplicateTurnError, RequestError
from .feedback import Rating
from .owners import Owner
from .review import Annotation
from .rows import insert_rows, update_row
from .usage import DailyUsage

if TYPE_CHECKING:  # turns imports this module
    from .turns import TurnOutcome

TITLE_LENGTH = 80


class Status(models.TextChoices):
    STREAMING = "streaming", _("streaming")
    COMPLETED = "completed", _("completed")
    INTERRUPTED = "interrupted", _("interrupted")
    FAILED = "failed", _("failed")
    BLOCKED = "blocked", _("blocked")


# The finish reason of an answer whose server tool calls wait for the user, and the key of its
# metadata that lists them.
APPROVAL_REQUIRED = "approval_required"


class Role(models.TextChoices):
    SYSTEM = "system", _("system")
    USER = "user", _("user")
    ASSISTANT = "assistant", _("assistant")
    TOOL = "tool", _("tool")


# The columns a history is rebuilt from, in upstream_message()'s order.
HISTORY = ("role", "content", "parts", "tool_calls", "tool_call_id", "reasoning")


def upstream_message(
    role: str,
    content: str,
    parts: list[dict[str, Any]],
    tool_calls: list[dict[str, str]],
    tool_call_id: str,
    reasoning: str,
    *,
    reasoning_field: str | None = None,
) -> dict[str, Any]:
    """Rebuild one saved message in the chat-completions request format."""
    if role == Role.TOOL:
        return {"role": role, "tool_call_id": tool_call_id, "content": content}
    if role != Role.ASSISTANT:
        return {"role": role, "content": parts or content}
    message: dict[str, Any] = {"role": role, "content": content or None}
    if tool_calls:
        message["tool_calls"] = [
            {
                "id": call["id"],
                "type": "function",
                "function": {"name": call["name"], "arguments": call["arguments"]},
            }
            for call in tool_calls
        ]
    elif message["content"] is None:
        message["content"] = ""
    if reasoning_field and reasoning:
        message[reasoning_field] = reasoning
    return message


def message_fields(message: dict[str, Any]) -> dict[str, Any]:
    """The ``Message`` fields that save one request message (in the upstream format)."""
    role, content = message["role"], message.get("content")
    if isinstance(content, list):
        return {"role": role, "content": text_of(content), "parts": content}
    fields: dict[str, Any] = {"role": role, "content": content or ""}
    if role == Role.TOOL:
        fields["tool_call_id"] = message["tool_call_id"]
    elif message.get("tool_calls"):
        fields["tool_calls"] = [
            {"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
            for c in message["tool_calls"]
        ]
    return fields


@dataclasses.dataclass(frozen=True, slots=True)
class Thread:
    """Where a turn goes in a conversation's tree: the history sent upstream (the path from
    the root to ``parent``, in the upstream's format), ``parent`` (what the turn's first new
    row hangs under), and the ids of that path, root first."""

    history: list[dict[str, Any]]
    parent: uuid.UUID | None
    path: list[uuid.UUID]


# The columns a thread is found with: id, parent, status, then HISTORY.
_THREAD = ("id", "parent_id", "status", *HISTORY)


def _message_not_found(field: str) -> RequestError:
    return RequestError(
        "message_not_found",
        f"{field} names no message of this conversation. Use a message id from its transcript "
        "(GET conversations/<id>).",
        status=404,
    )


class ConversationManager(models.Manager["Conversation"]):
    def owned_by(self, owner: Owner) -> models.QuerySet[Conversation]:
        """The owner's conversations; a soft-deleted one is nobody's any more."""
        return self.filter(**owner.filter(), deleted_at__isnull=True)

    def history(self, owner: Owner, conversation_id: uuid.UUID) -> list[dict[str, Any]] | None:
        """Return the messages of the owner's conversation on its active branch in the
        upstream's format, in order, or None if there is none. Rows with nothing to send (an
        answer that failed before its first token) are left out."""
        thread = self.thread(owner, conversation_id)
        return None if thread is None else thread.history

    def thread(
        self,
        owner: Owner,
        conversation_id: uuid.UUID,
        *,
        regenerate: uuid.UUID | None = None,
        edit: uuid.UUID | None = None,
    ) -> Thread | None:
        """Find where a turn goes in the owner's conversation (None: no such conversation),
        in two queries: after the active leaf; with ``regenerate`` (an answer), beside that
        answer, under the message its turn answered; with ``edit`` (a user message), beside
        that message. Raises ``message_not_found`` or ``invalid_branch`` for a wrong id."""
        found = list(
            self.owned_by(owner).filter(pk=conversation_id).values_list("active_leaf_id")[:1]
        )
        if not found:
            return None
        listed = Message.objects.filter(conversation_id=conversation_id).values_list(*_THREAD)
        rows = {row[0]: row for row in chain_unlinked(list(listed))}
        parent: uuid.UUID | None = found[0][0] or next(reversed(rows), None)
        if regenerate is not None:
            answer = rows.get(regenerate)
            if answer is None:
                raise _message_not_found("regenerate")
            if answer[3] != Role.ASSISTANT:
                raise RequestError(
                    "invalid_branch",
                    "regenerate names an answer (an assistant message). To ask something "
                    "else instead of a question, send edit with the new messages.",
                )
            parent = answer[1]
            # Up past the rows the server wrote in that turn (its tool steps and results):
            # the new answer answers what the client sent.
            while parent is not None and rows[parent][2]:
                parent = rows[parent][1]
        elif edit is not None:
            question = rows.get(edit)
            if question is None:
                raise _message_not_found("edit")
            if question[3] != Role.USER:
                raise RequestError(
                    "invalid_branch",
                    "edit names a question (a user message). To get another answer to the "
                    "same question, send regenerate with the answer's id.",
                )
            parent = question[1]
        reasoning_field = conf.CHATPROXY_REASONING_FIELD
        branch = path(rows, parent)
        history = [
            upstream_message(*row[3:], reasoning_field=reasoning_field)
            for row in branch
            if row[4] or row[5] or row[6] or row[7]
        ]
        return Thread(history, parent, [row[0] for row in branch])

    def start_turn(
        self,
        owner: Owner,
        conversation_id: uuid.UUID | None,
        messages: list[dict[str, Any]],
        model: str,
        idempotency_key: str = "",
        parent: uuid.UUID | None = None,
        *,
        root: bool = False,
        new_id: uuid.UUID | None = None,
    ) -> tuple[uuid.UUID, uuid.UUID]:
        """Save the new messages (``Message`` fields, as ``message_fields`` gives them) and a
        ``streaming`` answer, each the child of the one before, the first of ``parent`` (a
        ``Thread``'s; by default the conversation's active leaf; with ``root``, none); the
        answer becomes the conversation's active leaf. A new conversation gets the id
        ``new_id``, if given. Return (conversation, answer) ids.

        An ``idempotency_key`` is claimed for the answer: the caller has checked that it names
        no live turn (``opening.open_turn`` does, before the limits), and a concurrent claim
        of the same key loses with ``DuplicateTurnError``, saving nothing.
        """
        # No savepoint when called inside a transaction (opening's): a failure here fails
        # the whole start anyway, and the savepoint's two statements ran on every turn.
        answer_id = uuid.uuid4()
        with transaction.atomic(savepoint=False):
            if conversation_id is None:
                title = next((m["content"] for m in messages if m["role"] == Role.USER), "")
                # The answer is written just after, in this transaction: the foreign key is
                # checked at its end (Django declares them deferrable, initially deferred).
                conversation = self.create(
                    id=new_id or uuid.uuid4(),
                    owner_id=owner.user_id,
                    session_key="" if owner.user_id else owner.session_key or "",
                    title=" ".join(title.split())[:TITLE_LENGTH],
                    model=model,
                    status=Status.STREAMING,
                    active_leaf_id=answer_id,
                )
                position = 0
            else:
                # Lock the row so two turns on one conversation cannot take the same positions.
                conversation = self.select_for_update().get(pk=conversation_id)
                last = conversation.messages.aggregate(last=models.Max("position"))["last"]
                position = -1 if last is None else last
                position += 1
                if parent is None and not root:
                    parent = conversation.active_leaf_id
                values = {"status": Status.STREAMING, "model": model, "active_leaf": answer_id}
                update_row(Conversation, conversation_id, {**values, "updated_at": timezone.now()})
            rows = [
                Message(conversation=conversation, position=position + i, **m)
                for i, m in enumerate(messages)
            ]
            for row in rows:
                row.parent_id, parent = parent, row.id
            answer = Message(
                id=answer_id,
                conversation=conversation,
                parent_id=parent,
                position=position + len(rows),
                role=Role.ASSISTANT,
                status=Status.STREAMING,
                model=model,
                address_key="" if owner.user_id else owner.address,
            )
            insert_rows(Message, [*rows, answer])
            if idempotency_key:
                IdempotencyKey.objects.claim(owner, idempotency_key, answer)
        return conversation.pk, answer.pk


class Conversation(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="chat_conversations",
        verbose_name=_("owner"),
        help_text=_("Empty for anonymous chat, which belongs to a session instead."),
    )
    session_key = models.CharField(_("session key"), max_length=40, blank=True, db_index=True)
    title = models.CharField(_("title"), max_length=TITLE_LENGTH, blank=True)
    model = models.CharField(_("model"), max_length=100, blank=True)
    status = models.CharField(
        _("last status"),
        max_length=16,
        choices=Status.choices,
        blank=True,
        help_text=_("Status of the latest answer."),
    )
    created_at = models.DateTimeField(_("created"), auto_now_add=True)
    updated_at = models.DateTimeField(_("updated"), auto_now=True)
    active_leaf = models.ForeignKey(
        "Message",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=_("active leaf"),
        help_text=_("The last message of the branch the owner is on: the next turn follows it."),
    )
    deleted_at = models.DateTimeField(
        _("deleted"),
        null=True,
        blank=True,
        help_text=_(
            "Set when its owner deleted it and CHATPROXY_DELETE is 'soft': kept for review."
        ),
    )

    objects = ConversationManager()

    class Meta:
        verbose_name = _("conversation")
        verbose_name_plural = _("conversations")
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["owner", "-created_at"]),
            models.Index(fields=["-created_at"]),
            models.Index(fields=["status"]),
            models.Index(fields=["model"]),
            models.Index(fields=["-updated_at"]),
        ]
        permissions = [
            ("review_conversation", "Can flag, tag, annotate and mark conversations reviewed"),
            ("export_conversation", "Can export conversations"),
        ]

    def __str__(self) -> str:
        return self.title or str(self.pk)


class MessageManager(models.Manager["Message"]):
    def finish_turn(
        self, conversation_id: uuid.UUID, answer_id: uuid.UUID, outcome: TurnOutcome
    ) -> None:
        """Write the answer's final state and the conversation's last status in one
        transaction: every field of the outcome (each is a ``Message`` field) that is set;
        and count the answer in the dashboard's daily rollup (``usage``)."""
        fields = {
            f.name: value
            for f in dataclasses.fields(outcome)
            if (value := getattr(outcome, f.name)) is not None
        }
        now = timezone.now()
        with transaction.atomic():
            update_row(Message, answer_id, {**fields, "finished_at": now})
            update_row(Conversation, conversation_id, {"status": outcome.status, "updated_at": now})
            DailyUsage.objects.add_answer(self.all(), answer_id)  # the dashboard's rollup

    def save_step(
        self,
        conversation_id: uuid.UUID,
        answer_id: uuid.UUID,
        step: dict[str, Any] | None,
        results: list[dict[str, Any]],
        before: bool = False,
    ) -> None:
        """Save a finished step of a turn that ran server tools: with ``step`` (the fields of
        its assistant message), that message takes the answer's place and the answer moves
        after the ``results`` (the fields of the ``tool`` messages); without, the results
        follow the answer, which is the turn's last step, or precede it (``before``: approved
        calls run at a turn's start). Positions stay dense and ordered."""
        with transaction.atomic():
            conversation = Conversation.objects.select_for_update().get(pk=conversation_id)
            answer = self.get(pk=answer_id)
            last = conversation.messages.aggregate(last=models.Max("position"))["last"]
            rows = [Message(role=Role.TOOL, status=Status.COMPLETED, **r) for r in results]
            if step is not None:
                rows.insert(0, Message(role=Role.ASSISTANT, **step))
            parent: uuid.UUID | None = answer.pk
            if step is None and not before:  # after the answer, on the way to the leaf
                first = last + 1
            else:
                # Where the answer was, when it was the last row written; else (a turn on
                # another branch wrote since) after the last row.
                first = answer.position if answer.position == last else last + 1
                parent = answer.parent_id
                update_row(Message, answer_id, {"position": first + len(rows)})
            for i, row in enumerate(rows):
                row.conversation, row.position = conversation, first + i
                row.parent_id, parent = parent, row.id
            insert_rows(Message, rows)
            if step is None and not before:
                update_row(Conversation, conversation_id, {"active_leaf": parent})
            else:
                update_row(Message, answer_id, {"parent": parent})

    def awaiting_approval(
        self, conversation_id: uuid.UUID, among: list[uuid.UUID] | None = None
    ) -> list[dict[str, str]]:
        """The calls of the conversation's last answer (``among`` those ids: a ``Thread``'s
        path) that wait for the user's approval."""
        answers = self.filter(conversation_id=conversation_id, role=Role.ASSISTANT)
        if among is not None:
            answers = answers.filter(pk__in=among)
        last = (
            answers.exclude(status="")
            .order_by("-position")
            .values_list("finish_reason", "tool_calls", "metadata")
            .first()
        )
        if last is None or last[0] != APPROVAL_REQUIRED:
            return []
        waiting = (last[2] or {}).get(APPROVAL_REQUIRED, [])
        return [call for call in last[1] if call["id"] in waiting]

    def checkpoint(self, texts: dict[uuid.UUID, str]) -> None:
        """Save the text so far of answers still streaming, in one transaction, so a crash
        leaves it behind. An answer that has ended meanwhile keeps its final text."""
        with transaction.atomic():
            for answer_id, text in texts.items():
                update_row(Message, answer_id, {"content": text}, status=Status.STREAMING)

    def interrupt_stale(self, older_than: float) -> int:
        """Mark answers left ``streaming`` (by a worker that died) as ``interrupted``."""
        cutoff = timezone.now() - datetime.timedelta(seconds=older_than)
        stale = self.filter(status=Status.STREAMING, created_at__lt=cutoff)
        with transaction.atomic():
            rows = list(stale.values_list("pk", "conversation_id"))
            conversations = [conversation for _pk, conversation in rows]
            # Whoever knew what the answer used is gone: its reservation is released.
            Spend.objects.filter(
                answer__in=[pk for pk, _conversation in rows], settled=False
            ).update(tokens=0, cost=0, settled=True)
            count = stale.update(
                status=Status.INTERRUPTED, error_code="worker_lost", finished_at=timezone.now()
            )
            Conversation.objects.filter(pk__in=conversations, status=Status.STREAMING).update(
                status=Status.INTERRUPTED
            )
        return count


class Message(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    conversation = models.ForeignKey(
        Conversation,
        on_delete=models.CASCADE,
        related_name="messages",
        verbose_name=_("conversation"),
    )
    parent = models.ForeignKey(
        "self",
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="children",
        verbose_name=_("parent"),
        help_text=_("The message this one follows; siblings are other branches from it."),
    )
    position = models.PositiveIntegerField(
        _("position"), help_text=_("Order of writing in the conversation, across its branches.")
    )
    role = models.CharField(_("role"), max_length=16, choices=Role.choices)
    content = models.TextField(_("content"), blank=True, help_text=_("The text the client saw."))
    raw_content = models.TextField(
        _("upstream text"),
        blank=True,
        help_text=_("What the upstream sent, kept only when interceptors changed it."),
    )
    status = models.CharField(_("status"), max_length=16, choices=Status.choices, blank=True)
    finish_reason = models.CharField(_("finish reason"), max_length=32, blank=True)
    model = models.CharField(_("model"), max_length=100, blank=True)
    response_id = models.CharField(_("upstream response id"), max_length=200, blank=True)
    error_code = models.CharField(_("error code"), max_length=64, blank=True)
    error_message = models.CharField(_("error message"), max_length=300, blank=True)
    prompt_tokens = models.PositiveIntegerField(_("prompt tokens"), null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(_("completion tokens"), null=True, blank=True)
    total_tokens = models.PositiveIntegerField(_("total tokens"), null=True, blank=True)
    first_token_ms = models.PositiveIntegerField(
        _("time to first token (ms)"), null=True, blank=True
    )
    duration_ms = models.PositiveIntegerField(_("duration (ms)"), null=True, blank=True)
    cost = models.DecimalField(_("cost"), max_digits=12, decimal_places=6, null=True, blank=True)
    metadata = models.JSONField(_("metadata"), default=dict, blank=True)
    address_key = models.CharField(
        _("address key"),
        max_length=32,
        blank=True,
        help_text=_(
            "For anonymous chat, a keyed digest of the client's network address (never the "
            "address): the per-address stream cap counts it."
        ),
    )
    parts = models.JSONField(
        _("content parts"),
        default=list,
        blank=True,
        help_text=_("The parts of a message sent as a list (text and images), in order."),
    )
    reasoning = models.TextField(
        _("reasoning"), blank=True, help_text=_("The answer's reasoning, kept apart from its text.")
    )
    tool_calls = models.JSONField(
        _("tool calls"),
        default=list,
        blank=True,
        help_text=_('The answer\'s tool calls: [{"id", "name", "arguments"}].'),
    )
    tool_call_id = models.CharField(
        _("tool call id"),
        max_length=100,
        blank=True,
        help_text=_("On a tool message: the call it answers."),
    )
    cached_tokens = models.PositiveIntegerField(_("cached prompt tokens"), null=True, blank=True)
    reasoning_tokens = models.PositiveIntegerField(_("reasoning tokens"), null=True, blank=True)
    upstream = models.CharField(
        _("upstream"),
        max_length=100,
        blank=True,
        help_text=_("The upstream that served the answer (a name in CHATPROXY_UPSTREAMS)."),
    )
    upstream_model = models.CharField(
        _("upstream model"),
        max_length=200,
        blank=True,
        help_text=_("The model as that upstream named it (after aliases)."),
    )
    created_at = models.DateTimeField(_("created"), auto_now_add=True)
    finished_at = models.DateTimeField(_("finished"), null=True, blank=True)

    objects = MessageManager()

    class Meta:
        verbose_name = _("message")
        verbose_name_plural = _("messages")
        ordering = ["conversation", "position"]
        constraints = [
            models.UniqueConstraint(
                fields=["conversation", "position"], name="chatproxy_message_position"
            )
        ]
        indexes = [
            models.Index(fields=["status"]),
            models.Index(fields=["model"]),
            models.Index(fields=["-created_at"]),
            models.Index(fields=["error_code"]),
        ]

    def __str__(self) -> str:
        return f"{self.role} #{self.position}"


# Registered with this app's models; defined in the modules of their concepts.
__all__ = [
    "Annotation",
    "ApiKey",
    "Conversation",
    "DailyUsage",
    "IdempotencyKey",
    "Message",
    "Rating",
]

KEY_PREFIX = "cpx_"


def _digest(raw: str) -> str:
    # Keys carry 256 random bits, so a fast hash is enough: there is nothing to brute-force.
    return hashlib.sha256(raw.encode()).hexdigest()


class ApiKeyManager(models.Manager["ApiKey"]):
    def issue(self, user: Any, name: str) -> tuple[ApiKey, str]:
        """Create a key for ``user``; return it and the raw key, which is never stored."""
        prefix = secrets.token_hex(4)
        raw = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
        return self.create(user=user, name=name, prefix=prefix, hashed=_digest(raw)), raw

    def user_for(self, raw: str) -> Any:
        """Return the active user a raw key belongs to, or None."""
        key = self.key_for(raw)
        return None if key is None else key.user

    def key_for(self, raw: str) -> ApiKey | None:
        """Return the key ``raw`` is, with its user, if it is live and its user active."""
        prefix = raw[len(KEY_PREFIX) : len(KEY_PREFIX) + 8]
        if not raw.startswith(KEY_PREFIX) or raw[len(KEY_PREFIX) + 8 : len(KEY_PREFIX) + 9] != "_":
            return None
        key = self.select_related("user").filter(prefix=prefix, revoked=False).first()
        if key is None or not hmac.compare_digest(key.hashed, _digest(raw)):
            return None
        if not key.user.is_active:
            return None
        now = timezone.now()
        if key.last_used_at is None or (now - key.last_used_at).total_seconds() > 60:
            self.filter(pk=key.pk).update(last_used_at=now)
        return key


class ApiKey(models.Model):
    """A bearer key for server-to-server clients; only its hash is kept."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="chat_api_keys",
        verbose_name=_("user"),
    )
    name = models.CharField(_("name"), max_length=100, help_text=_("What the key is for."))
    prefix = models.CharField(_("prefix"), max_length=8, unique=True, editable=False)
    hashed = models.CharField(_("hash"), max_length=64, editable=False)
    revoked = models.BooleanField(_("revoked"), default=False)
    created_at = models.DateTimeField(_("created"), auto_now_add=True)
    last_used_at = models.DateTimeField(_("last used"), null=True, blank=True, editable=False)

    objects = ApiKeyManager()

    class Meta:
        verbose_name = _("API key")
        verbose_name_plural = _("API keys")
        ordering = ["-created_at"]
        # A key acts as its user on the chat API (their transcripts included), so a key for
        # anyone but oneself needs this, or a superuser.
        permissions = [("issue_apikey_for_others", "Can create API keys for other users")]

    def __str__(self) -> str:
        return f"{self.name} ({KEY_PREFIX}{self.prefix}_…)"


class IdempotencyKeyManager(models.Manager["IdempotencyKey"]):
    def live_answer(self, owner: Owner, key: str) -> uuid.UUID | None:
        """The answer a key named within CHATPROXY_IDEMPOTENCY_WINDOW, if any."""
        cutoff = timezone.now() - datetime.timedelta(seconds=conf.CHATPROXY_IDEMPOTENCY_WINDOW)
        found = self.filter(owner_key=owner.key, key=key, created_at__gte=cutoff).first()
        return None if found is None else found.answer_id

    def claim(self, owner: Owner, key: str, answer: Message) -> None:
        """Tie ``key`` to ``answer``; a concurrent claim of the same key loses with a
        ``DuplicateTurnError`` (and its transaction rolls back)."""
        self.filter(owner_key=owner.key, key=key).delete()  # an expired claim
        try:
            with transaction.atomic():
                self.create(owner_key=owner.key, key=key, answer=answer)
        except IntegrityError:
            winner = self.filter(owner_key=owner.key, key=key).values_list("answer_id", flat=True)
            raise DuplicateTurnError(winner[0]) from None


class IdempotencyKey(models.Model):
    """A client's ``Idempotency-Key``: a retried submission attaches to the turn it started."""

    owner_key = models.CharField(_("owner"), max_length=60)
    key = models.CharField(_("key"), max_length=200)
    answer = models.ForeignKey(
        Message, on_delete=models.CASCADE, related_name="+", verbose_name=_("answer")
    )
    created_at = models.DateTimeField(_("created"), auto_now_add=True, db_index=True)

    objects = IdempotencyKeyManager()

    class Meta:
        verbose_name = _("idempotency key")
        verbose_name_plural = _("idempotency keys")
        constraints = [
            models.UniqueConstraint(fields=["owner_key", "key"], name="chatproxy_idempotency_key")
        ]

    def __str__(self) -> str:
        return self.key


class Scope(models.TextChoices):
    USER = "user", _("a user")
    GROUP = "group", _("a group (its members together)")
    API_KEY = "api_key", _("an API key")
    ANONYMOUS = "anonymous", _("anonymous visitors (together)")
    SITE = "site", _("the whole site")


class Period(models.TextChoices):
    DAY = "day", _("day")
    WEEK = "week", _("week (from Monday)")
    MONTH = "month", _("month")
    ROLLING = "rolling", _("rolling window")


class Budget(models.Model):
    """A quota in tokens and/or cost per period, set in the admin. For its target (a user, a
    group, anonymous visitors, the site) it replaces what CHATPROXY_BUDGETS says."""

    scope = models.CharField(_("scope"), max_length=16, choices=Scope.choices)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="chat_budgets",
        verbose_name=_("user"),
    )
    group = models.ForeignKey(
        "auth.Group",
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="chat_budgets",
        verbose_name=_("group"),
    )
    api_key = models.ForeignKey(
        ApiKey,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="budgets",
        verbose_name=_("API key"),
    )
    period = models.CharField(_("period"), max_length=16, choices=Period.choices)
    window = models.PositiveIntegerField(
        _("window (seconds)"), null=True, blank=True, help_text=_("For a rolling window only.")
    )
    tokens = models.PositiveBigIntegerField(
        _("tokens"), null=True, blank=True, help_text=_("Prompt and completion tokens.")
    )
    cost = models.DecimalField(
        _("cost"),
        max_digits=12,
        decimal_places=6,
        null=True,
        blank=True,
        help_text=_("In the currency of CHATPROXY_PRICES."),
    )

    class Meta:
        verbose_name = _("budget")
        verbose_name_plural = _("budgets")
        ordering = ["scope", "period"]

    def __str__(self) -> str:
        target = self.user or self.group or self.api_key or self.get_scope_display()
        return f"{target}: {self.tokens or '-'} tokens, {self.cost or '-'} per {self.period}"

    def clean(self) -> None:
        if (self.scope == Scope.USER) != (self.user_id is not None):
            raise ValidationError(_("A user budget names its user, and only it does."))
        if (self.scope == Scope.GROUP) != (self.group_id is not None):
            raise ValidationError(_("A group budget names its group, and only it does."))
        if (self.scope == Scope.API_KEY) != (self.api_key_id is not None):
            raise ValidationError(_("An API key's budget names its key, and only it does."))
        if (self.period == Period.ROLLING) != bool(self.window):
            raise ValidationError(_("A rolling window has a window in seconds; a period not."))
        if self.tokens is None and self.cost is None:
            raise ValidationError(_("Give the budget tokens, a cost, or both."))


class Spend(models.Model):
    """What one turn holds against the budgets: its worst case (reserved) until it ends, then
    what it really used (settled)."""

    answer = models.OneToOneField(
        Message,
        on_delete=models.SET_NULL,  # deleting a conversation must not give its spend back
        null=True,
        related_name="spend",
        verbose_name=_("answer"),
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        null=True,
        related_name="chat_spend",
        verbose_name=_("user"),
    )
    api_key = models.ForeignKey(
        ApiKey,
        on_delete=models.SET_NULL,
        null=True,
        related_name="spend",
        verbose_name=_("API key"),
    )
    tokens = models.PositiveBigIntegerField(_("tokens"))
    cost = models.DecimalField(_("cost"), max_digits=12, decimal_places=6)
    settled = models.BooleanField(_("settled"), default=False)
    created_at = models.DateTimeField(_("created"), default=timezone.now)

    class Meta:
        verbose_name = _("spend")
        verbose_name_plural = _("spend")
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["created_at"], name="chatproxy_spend_created"),
            models.Index(fields=["user", "created_at"], name="chatproxy_spend_user"),
            models.Index(fields=["api_key", "created_at"], name="chatproxy_spend_key"),
        ]

    def __str__(self) -> str:
        return f"{self.tokens} tokens, {self.cost} ({'settled' if self.settled else 'reserved'})"
