"""Opening a turn: everything that can still refuse it with a 4xx, and its first rows, in one
trip to chatproxy's database thread, before the first byte.

Who asks, a retried submission (its idempotency key, looked up once), the limits, the history
of a continued conversation, then the user messages and the ``streaming`` answer in one
transaction (``ConversationManager.start_turn``). ``records`` writes the turn's rows after
that: its checkpoints and its final state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Callable, Sequence
from typing import Any, cast

from django.db import transaction

from .conf import conf
from .database import run
from .events import ToolCall
from .exceptions import DuplicateTurnError, RequestError
from .interception import Chain, InterceptorSpec, build_chain
from .limits import bound_history, check_model, check_rate, check_streams
from .models import Conversation, IdempotencyKey, Message, Thread, message_fields
from .owners import Owner
from .payload import ChatRequest, check_approvals, check_tool_results, pending_tool_calls
from .records import save
from .reservations import hold, reserve
from .rows import row_exists
from .tools import Tool, ToolSpec, offer_tools
from .tools import load as load_tools
from .turns import Turn, TurnState

Identify = Callable[[], tuple[Owner, Any]]
OpenSession = Callable[[Owner], Owner]
NameConversation = Callable[[Owner], uuid.UUID]

# Tasks finishing the rows of turns whose client left while they opened; kept so they are not
# garbage-collected before they end.
_abandoned: set[asyncio.Task[None]] = set()


async def open_turn(
    identify: Identify,
    request: ChatRequest,
    *,
    extra: dict[str, Any] | None = None,
    interceptors: Sequence[InterceptorSpec] | None = None,
    tools: Sequence[ToolSpec] | None = None,
    idempotency_key: str = "",
    open_session: OpenSession | None = None,
    conversation_for: NameConversation | None = None,
) -> Turn:
    """Open a turn in one trip to the database thread: who is asking (``identify()``,
    synchronous: e.g. ``auth.identify`` for a request, or the socket's known owner and user),
    the limits, the history of a continued conversation (404 if the owner has no such one),
    and the turn's first rows.

    Raises ``DuplicateTurnError`` (with its ``answer`` loaded) when ``idempotency_key`` already
    started a turn. ``interceptors`` replaces CHATPROXY_INTERCEPTORS for this turn, ``tools``
    CHATPROXY_TOOLS.
    ``open_session`` gives an owner that ``is_new`` (an anonymous visitor without a session)
    one, once the turn has passed every limit (e.g. ``auth.open_session`` for a request). If
    the caller is cancelled meanwhile (the client left), the turn's rows, once written, are
    finalized as ``interrupted``. ``conversation_for(owner)`` names the conversation the turn
    belongs to (a client's own chat id, e.g.): continued if the owner has it, else created
    under that id.
    """
    chain, offered = build_chain(interceptors), load_tools(tools)
    task = asyncio.ensure_future(
        run(
            _open,
            identify,
            request,
            chain,
            offered,
            extra or {},
            idempotency_key,
            open_session,
            conversation_for,
        )
    )
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        finisher = asyncio.ensure_future(_abandon(task))
        _abandoned.add(finisher)
        finisher.add_done_callback(_abandoned.discard)
        raise


async def _abandon(opened: asyncio.Future[Turn]) -> None:
    try:
        turn = await opened
    except Exception:
        return  # refused: nothing was written
    await save(turn)


def _open(
    identify: Identify,
    request: ChatRequest,
    chain: Chain,
    offered: dict[str, Tool],
    extra: dict[str, Any],
    key: str,
    open_session: OpenSession | None,
    conversation_for: NameConversation | None = None,
) -> Turn:
    try:
        owner, user = identify()
        if (
            key
            and not owner.is_new  # who has no session has started no turn
            and (claimed := IdempotencyKey.objects.live_answer(owner, key)) is not None
        ):
            raise DuplicateTurnError(claimed)  # before the limits: a retry is not a new turn
        check_rate(owner)
        check_model(request.model, user)
        new_id = None
        if conversation_for is not None:
            request, new_id = _named(owner, request, conversation_for(owner))
        history: list[dict[str, Any]] = []
        thread = None
        if request.conversation_id is not None:
            thread = Conversation.objects.thread(
                owner, request.conversation_id, regenerate=request.regenerate, edit=request.edit
            )
            if thread is None:
                raise RequestError(
                    "conversation_not_found",
                    "No conversation with that id belongs to you. "
                    "Leave conversation_id out to start one.",
                    status=404,
                )
            history = thread.history
        approvals: list[tuple[ToolCall, bool]] = []
        if request.conversation_id is not None and thread and conf.CHATPROXY_STORE_CONTENT:
            pending = pending_tool_calls(history)
            # Calls waiting for approval have no result yet: only when some call has none.
            waiting = (
                Message.objects.awaiting_approval(request.conversation_id, thread.path)
                if pending
                else []
            )
            check_approvals(request.approvals, [call["id"] for call in waiting])
            approvals = [(cast(ToolCall, c), request.approvals[c["id"]]) for c in waiting]
            asked = {call["id"] for call in waiting}
            check_tool_results(request.tool_results, [i for i in pending if i not in asked])
        elif request.approvals:
            check_approvals(request.approvals, [])
        # Bounded here, before the interceptors, which keep what they add (a system prompt).
        history, dropped = bound_history(history, request.messages)
        turn = Turn(
            owner=owner,
            request=request,
            history=history,
            user=user,
            extra=extra,
            chain=chain,
            state=TurnState(chain.transforming, bool(chain.reasonings)),
            idempotency_key=key,
            dropped_messages=dropped,
            tools=offered,
            approvals=approvals,
        )
        offer_tools(turn.params, offered)
        if conf.CHATPROXY_SEND_USER:
            turn.params["user"] = owner.upstream_user  # never the client's: it names the owner
        # Written before the first byte, so a limit (429) or a duplicate submission can
        # still be answered as such.
        _begin(turn, open_session, thread, new_id)
    except DuplicateTurnError as duplicate:  # the key's turn, or a race for it lost
        duplicate.answer = Message.objects.get(pk=duplicate.answer_id)
        raise
    return turn


def _named(
    owner: Owner, request: ChatRequest, named: uuid.UUID
) -> tuple[ChatRequest, uuid.UUID | None]:
    """The request as a continuation of the owner's conversation ``named``, or, if the owner
    has none by that id, as its first turn (and the id to create it with)."""
    if owner.user_id is not None:  # on every turn of a chat: one SELECT, not the ORM's
        exists = row_exists(Conversation, named, owner=owner.user_id)
    else:
        exists = Conversation.objects.owned_by(owner).filter(pk=named).exists()
    if exists:
        return dataclasses.replace(request, conversation_id=named), None
    if request.tool_results or request.approvals:
        raise RequestError(
            "tool_results_mismatch",
            "This chat has no answer waiting for tool results or approvals: send a user message.",
        )
    return dataclasses.replace(request, conversation_id=None), named


def _begin(
    turn: Turn,
    open_session: OpenSession | None,
    thread: Thread | None,
    new_id: uuid.UUID | None = None,
) -> None:
    """Save the new messages and the ``streaming`` answer where ``thread`` says, in a new
    conversation of id ``new_id`` if given; fill in the turn's ids. A new
    anonymous visitor gets their session from ``open_session`` here, after the last limit, so
    a refused turn leaves no session behind."""
    if conf.CHATPROXY_STORE_CONTENT:
        messages = [message_fields(m) for m in turn.request.messages]
    else:
        messages = [{"role": m["role"], "content": ""} for m in turn.request.messages]
    with transaction.atomic():
        check_streams(turn.owner)
        reserved = reserve(turn)  # the last limit
        if turn.owner.is_new:
            if open_session is None:
                raise TypeError("An owner without a session needs open_session to start a turn.")
            turn.owner = open_session(turn.owner)
        turn.conversation_id, turn.answer_id = Conversation.objects.start_turn(
            turn.owner,
            turn.request.conversation_id,
            messages,
            turn.model,
            turn.idempotency_key,
            None if thread is None else thread.parent,
            root=thread is not None and thread.parent is None,
            new_id=new_id,
        )
        if reserved is not None:
            hold(turn, reserved)
