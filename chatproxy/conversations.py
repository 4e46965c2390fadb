"""A conversation as a whole, for its owner: list and search them, read one (its active
branch, with the siblings of each message), rename, delete, switch branch, list branches.

Synchronous, for chatproxy's database thread: the HTTP views (``pages``) and the WebSocket
consumer run the same functions and answer with the same bodies. Every function raises the
same 404 for an id that does not exist as for someone else's, so ids cannot be probed.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.db import transaction
from django.db.models import Exists, OuterRef, Q, QuerySet
from django.utils import timezone

from .branches import chain_unlinked, children, leaves, newest_leaf, path
from .conf import conf
from .events import RatingBody
from .exceptions import RequestError
from .feedback import Rating
from .models import APPROVAL_REQUIRED, TITLE_LENGTH, Conversation, Message, Status
from .owners import Owner

PAGE_SIZE = 50
MAX_PAGE_SIZE = 100
MAX_QUERY = 200


def not_found() -> RequestError:
    return RequestError(
        "conversation_not_found",
        "No conversation with that id belongs to you. Pick one from the list.",
        status=404,
    )


def summary(conversation: Conversation) -> dict[str, Any]:
    """A conversation as the list shows it."""
    return {
        "id": str(conversation.pk),
        "title": conversation.title,
        "status": conversation.status,
        "model": conversation.model,
        "updated_at": conversation.updated_at.isoformat(),
    }


def listing(owner: Owner, query: str = "", page: int = 1, limit: int = PAGE_SIZE) -> dict[str, Any]:
    """One page of the owner's conversations, the latest first; with ``query``, those whose
    title or any message holds it (case-insensitive)."""
    rows: QuerySet[Conversation] = Conversation.objects.owned_by(owner)
    if query:
        said = Message.objects.filter(conversation=OuterRef("pk"), content__icontains=query)
        rows = rows.filter(Q(title__icontains=query) | Q(Exists(said)))
    start = (page - 1) * limit
    found = list(rows.order_by("-updated_at", "-created_at")[start : start + limit + 1])
    return {
        "conversations": [summary(c) for c in found[:limit]],
        "page": page,
        "next_page": page + 1 if len(found) > limit else None,
    }


def owned(owner: Owner, conversation_id: uuid.UUID) -> Conversation:
    found = Conversation.objects.owned_by(owner).filter(pk=conversation_id).first()
    if found is None:
        raise not_found()
    return found


def transcript(owner: Owner, conversation_id: uuid.UUID) -> dict[str, Any]:
    """The conversation's active branch, root first; each message with its id, its parent's,
    and, where it has siblings (other branches from its parent), their ids in order."""
    conversation = owned(owner, conversation_id)
    messages = list(Message.objects.filter(conversation=conversation))
    by_id = {m.pk: (m.pk, m.parent_id, m) for m in messages}
    tree = children((m.pk, m.parent_id) for m in messages)
    leaf = conversation.active_leaf_id or (messages[-1].pk if messages else None)
    if messages and all(m.parent_id is None for m in messages):  # written before the tree
        branch = messages
        tree = {}
    else:
        branch = [row[2] for row in path(by_id, leaf)]
    ratings = {r.message_id: r.as_json() for r in Rating.objects.filter(conversation=conversation)}
    shown = [_shown(m, tree.get(m.parent_id, []), ratings.get(m.pk)) for m in branch]
    return {
        "id": str(conversation.pk),
        "title": conversation.title,
        "active_leaf": None if leaf is None else str(leaf),
        "messages": shown,
    }


def _shown(
    message: Message, siblings: list[uuid.UUID], rating: RatingBody | None
) -> dict[str, Any]:
    """A saved message as the page draws it; parts, reasoning and tool calls when it has them,
    and an answer's rating."""
    shown: dict[str, Any] = {
        "id": str(message.pk),
        "parent_id": None if message.parent_id is None else str(message.parent_id),
        "role": message.role,
        "content": message.content,
        "status": message.status,
    }
    for name in ("parts", "reasoning", "tool_calls", "tool_call_id"):
        if value := getattr(message, name):
            shown[name] = value
    if message.finish_reason == APPROVAL_REQUIRED and isinstance(message.metadata, dict):
        shown[APPROVAL_REQUIRED] = message.metadata.get(APPROVAL_REQUIRED, [])
    if len(siblings) > 1:
        shown["siblings"] = [str(s) for s in siblings]
    if rating is not None:
        shown["rating"] = rating
    return shown


def rename(owner: Owner, conversation_id: uuid.UUID, title: Any) -> dict[str, Any]:
    """Give the conversation the owner's ``title``; return its summary."""
    if not isinstance(title, str) or not (title := " ".join(title.split())):
        raise RequestError(
            "invalid_title", 'Send the new title as a non-empty string: {"title": "Trip plans"}.'
        )
    if len(title) > TITLE_LENGTH:
        raise RequestError(
            "invalid_title", f"The title has {len(title)} characters: keep it to {TITLE_LENGTH}."
        )
    conversation = owned(owner, conversation_id)
    conversation.title = title
    conversation.save(update_fields=["title", "updated_at"])
    return summary(conversation)


def delete(owner: Owner, conversation_id: uuid.UUID) -> dict[str, Any]:
    """Delete the conversation as CHATPROXY_DELETE says: its rows ("hard"), or only from its
    owner's sight ("soft"). Refused while an answer streams in it."""
    with transaction.atomic():
        conversation = owned(owner, conversation_id)
        if conversation.messages.filter(status=Status.STREAMING).exists():
            raise RequestError(
                "conversation_streaming",
                "An answer is still streaming in this conversation: stop it (POST "
                "completions/<id>/cancel) or let it finish, then delete the conversation.",
                status=409,
            )
        if conf.CHATPROXY_DELETE == "soft":
            conversation.deleted_at = timezone.now()
            conversation.save(update_fields=["deleted_at"])
        else:
            conversation.delete()
    return {"id": str(conversation_id), "deleted": True}


def switch(owner: Owner, conversation_id: uuid.UUID, message_id: Any) -> dict[str, Any]:
    """Make the branch through ``message_id`` active (down to its newest leaf: the last answer
    written on it); return the new transcript."""
    with transaction.atomic():
        conversation = owned(owner, conversation_id)
        pairs = list(
            Message.objects.filter(conversation=conversation).values_list("pk", "parent_id")
        )
        target = _message_id(message_id)
        if target not in {pk for pk, _ in pairs}:
            raise RequestError(
                "message_not_found",
                "message_id names no message of this conversation. Use an id from its "
                "transcript, such as one of a message's siblings.",
                status=404,
            )
        conversation.active_leaf_id = newest_leaf(children(pairs), target)
        conversation.save(update_fields=["active_leaf"])
    return transcript(owner, conversation_id)


def _message_id(value: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(value) if isinstance(value, str) else None
    except ValueError:
        return None


def branches(owner: Owner, conversation_id: uuid.UUID) -> dict[str, Any]:
    """Every branch of the conversation, the order they were written in: its leaf, how many
    messages lead there, and where it parts from the others."""
    conversation = owned(owner, conversation_id)
    listed = Message.objects.filter(conversation=conversation).values_list(
        "pk", "parent_id", "role", "content", "created_at"
    )
    rows = {row[0]: row for row in chain_unlinked(list(listed))}
    order = {pk: i for i, pk in enumerate(rows)}
    tree = children((pk, row[1]) for pk, row in rows.items())
    found = []
    for leaf in sorted(leaves(tree), key=order.__getitem__):
        branch = path(rows, leaf)
        last_question = next((r[3] for r in reversed(branch) if r[2] == "user"), "")
        found.append(
            {
                "leaf": str(leaf),
                "messages": len(branch),
                "question": last_question[:TITLE_LENGTH],
                "created_at": rows[leaf][4].isoformat(),
                "active": leaf == conversation.active_leaf_id,
            }
        )
    return {
        "id": str(conversation.pk),
        "active_leaf": _str(conversation.active_leaf_id),
        "branches": found,
    }


def _str(value: uuid.UUID | None) -> str | None:
    return None if value is None else str(value)


def review(conversation: Conversation, through: uuid.UUID | None = None) -> dict[str, Any]:
    """A conversation's branches for staff (the admin), whoever owns it: the active branch, or
    the newest one through ``through``, each message with its siblings to reach the others.
    Reading it changes nothing: the owner's active leaf stays."""
    listed = Message.objects.filter(conversation=conversation).values_list(
        "pk", "parent_id", "position", "role", "status", "content"
    )
    rows = {row[0]: row for row in chain_unlinked(list(listed))}
    tree = children((pk, row[1]) for pk, row in rows.items())
    leaf = conversation.active_leaf_id or next(reversed(rows), None)
    if through in rows:
        leaf = newest_leaf(tree, through)
    shown = []
    for row in path(rows, leaf):
        siblings = tree.get(row[1], [])
        shown.append(
            {
                "id": str(row[0]),
                "position": row[2],
                "role": row[3],
                "status": row[4],
                "excerpt": " ".join(row[5].split())[:TITLE_LENGTH],
                "siblings": [
                    {"id": str(s), "position": rows[s][2], "current": s == row[0]} for s in siblings
                ]
                if len(siblings) > 1
                else [],
            }
        )
    return {
        "path": shown,
        "branches": len(leaves(tree)),
        "active": leaf == (conversation.active_leaf_id or leaf),
    }
