"""A turn's rows once it streams: checkpointed while it does, finalized once. (``opening``
writes its first rows, before the first byte.)

Every write runs on chatproxy's database thread (``database``) and is awaited through
``asyncio.shield``: a cancellation (the client leaving) that lands while a write runs must not
stop it, or the answer would stay ``streaming`` forever.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from weakref import WeakKeyDictionary

from django.utils import timezone

from .conf import conf
from .database import run
from .models import Message, Status
from .reservations import settle
from .tools import ToolResult
from .turns import Turn, TurnOutcome

logger = logging.getLogger("chatproxy.records")

INTERRUPTED = {
    "client_disconnected": "The client left before the answer finished.",
    "cancelled": "The answer was stopped on request.",
}

# Tasks finishing the rows of turns whose client left while they started; kept so they are
# not garbage-collected before they end.
_abandoned: set[asyncio.Task[None]] = set()


class Checkpoints:
    """The checkpoints of one event loop's running turns, written together: while one batch is
    written (one trip to the database thread, one transaction), the next one fills up. A
    thousand answers streaming at once then cost a few writes per interval, not a thousand."""

    __slots__ = ("texts", "written", "writer")

    def __init__(self) -> None:
        self.texts: dict[uuid.UUID, str] = {}
        self.written: asyncio.Future[None] | None = None  # resolved once ``texts`` are saved
        self.writer: asyncio.Task[None] | None = None

    def add(self, answer_id: uuid.UUID, text: str) -> asyncio.Future[None]:
        """Queue an answer's text; return the future of the write that will include it."""
        loop = asyncio.get_running_loop()
        self.texts[answer_id] = text
        if self.written is None:
            self.written = loop.create_future()
        if self.writer is None:
            self.writer = loop.create_task(self._write())
        return self.written

    async def _write(self) -> None:
        try:
            while self.texts:
                texts, written = self.texts, self.written
                self.texts, self.written = {}, None
                assert written is not None
                try:
                    await run(Message.objects.checkpoint, texts)
                except Exception as exc:
                    written.set_exception(exc)
                else:
                    written.set_result(None)
        finally:
            self.writer = None


_checkpoints: WeakKeyDictionary[asyncio.AbstractEventLoop, Checkpoints] = WeakKeyDictionary()


async def checkpoint(turn: Turn) -> None:
    """Save the text so far, so a worker killed mid-answer leaves it behind."""
    assert turn.answer_id is not None
    loop = asyncio.get_running_loop()
    batch = _checkpoints.get(loop) or _checkpoints.setdefault(loop, Checkpoints())
    await asyncio.shield(batch.add(turn.answer_id, turn.state.text))


def _outcome(turn: Turn) -> TurnOutcome:
    outcome = turn.state.outcome()
    outcome.model = turn.model
    if (route := turn.stream and turn.stream.route) is not None:  # the upstream that answered
        outcome.upstream, outcome.upstream_model = route.upstream.name, route.model
    if not conf.CHATPROXY_STORE_CONTENT:  # metadata only: no text, reasoning or call arguments
        outcome.content = outcome.raw_content = outcome.reasoning = ""
        outcome.tool_calls = []
    return outcome


def _finish(turn: Turn) -> None:
    assert turn.conversation_id is not None and turn.answer_id is not None
    outcome = _outcome(turn)
    outcome.cost = turn.cost
    outcome.metadata = turn.metadata or None
    if turn.dropped_messages:
        outcome.metadata = {**turn.metadata, "history": turn.history_cut()}
    Message.objects.finish_turn(turn.conversation_id, turn.answer_id, outcome)
    settle(turn)


def _save_step(turn: Turn, results: list[ToolResult], placement: str) -> None:
    assert turn.conversation_id is not None and turn.answer_id is not None
    step = None
    if placement == "step":
        turn.state.end(Status.COMPLETED)
        outcome = _outcome(turn)
        step = {k: v for k, v in dataclasses.asdict(outcome).items() if v is not None}
        step["finished_at"] = timezone.now()
    store = conf.CHATPROXY_STORE_CONTENT
    rows = [
        {
            "tool_call_id": result.call["id"],
            "content": result.content() if store else "",
            "metadata": result.metadata(),
            "finished_at": timezone.now(),
        }
        for result in results
    ]
    before = placement == "before"
    Message.objects.save_step(turn.conversation_id, turn.answer_id, step, rows, before)


async def save_step(turn: Turn, results: list[ToolResult], placement: str) -> None:
    """Save tool results where ``placement`` says (``steps.Placement``: with the step as a
    message of its own, after the answer, or before it); shielded, like every write."""
    await asyncio.shield(asyncio.ensure_future(run(_save_step, turn, results, placement)))


async def save(turn: Turn) -> bool:
    """Write the answer's final state once; an unfinished one is ``interrupted``."""
    if turn.state.status is Status.STREAMING:
        code = turn.interrupt_code
        turn.state.end(Status.INTERRUPTED, code, INTERRUPTED.get(code, ""))
    try:
        await run(_finish, turn)
    except Exception:
        logger.exception("Saving chat answer %s failed", turn.answer_id)
        return False
    return True
