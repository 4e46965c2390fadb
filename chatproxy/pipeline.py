"""One chat turn, transport-agnostic: save, intercept, stream from upstream, finalize.

``run_turn()`` is an async generator of NDJSON: each item is one or more whole lines (the
``answering`` lines of deltas that arrived together go out in one write). The HTTP view streams
the items as they are; the WebSocket consumer sends each line as a text frame. It knows nothing
of requests or sockets.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Sequence
from contextlib import aclosing
from typing import Any, cast

from . import records, shutdown, steps
from .conf import conf
from .events import PING, Encoder, Event, ToolCall, error_event
from .exceptions import RequestError, TurnError
from .followers import TurnChannel
from .interception import Chain, InterceptorSpec, build_chain
from .limits import bound_history, check_model, check_rate
from .models import (
    APPROVAL_REQUIRED,
    Conversation,
    DuplicateTurnError,
    IdempotencyKey,
    Message,
    Owner,
    Status,
)
from .payload import ChatRequest, check_approvals, check_tool_results, pending_tool_calls
from .signals import turn_finished
from .tools import Tool, ToolSpec, offer_tools
from .tools import load as load_tools
from .turns import Pieces, Turn, TurnState
from .upstream import AnswerStream

logger = logging.getLogger("chatproxy.pipeline")


Identify = Callable[[], tuple[Owner, Any]]
OpenSession = Callable[[Owner], Owner]


async def prepare_turn(
    identify: Identify,
    request: ChatRequest,
    *,
    extra: dict[str, Any] | None = None,
    interceptors: Sequence[InterceptorSpec] | None = None,
    tools: Sequence[ToolSpec] | None = None,
    idempotency_key: str = "",
    open_session: OpenSession | None = None,
) -> Turn:
    """Do everything that can still fail with a 4xx, before the first byte, in one trip to the
    database thread: who is asking (``identify()``, synchronous: e.g. ``auth.identify`` for a
    request, or the socket's known owner and user), the limits, the history of a continued
    conversation (404 if the owner has no such one), and the turn's first rows.

    Raises ``DuplicateTurnError`` (with its ``answer`` loaded) when ``idempotency_key`` already
    started a turn. ``interceptors`` replaces CHATPROXY_INTERCEPTORS for this turn, ``tools``
    CHATPROXY_TOOLS.
    ``open_session`` gives an owner that ``is_new`` (an anonymous visitor without a session)
    one, once the turn has passed every limit (e.g. ``auth.open_session`` for a request).
    """
    chain, offered = build_chain(interceptors), load_tools(tools)
    return await records.start(
        functools.partial(
            _open_turn,
            identify,
            request,
            chain,
            offered,
            extra or {},
            idempotency_key,
            open_session,
        )
    )


def _open_turn(
    identify: Identify,
    request: ChatRequest,
    chain: Chain,
    offered: dict[str, Tool],
    extra: dict[str, Any],
    key: str,
    open_session: OpenSession | None,
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
        history: list[dict[str, Any]] = []
        if request.conversation_id is not None:
            found = Conversation.objects.history(owner, request.conversation_id)
            if found is None:
                raise RequestError(
                    "conversation_not_found",
                    "No conversation with that id belongs to you. "
                    "Leave conversation_id out to start one.",
                    status=404,
                )
            history = found
        approvals: list[tuple[ToolCall, bool]] = []
        if request.conversation_id is not None and conf.CHATPROXY_STORE_CONTENT:
            pending = pending_tool_calls(history)
            # Calls waiting for approval have no result yet: only when some call has none.
            waiting = Message.objects.awaiting_approval(request.conversation_id) if pending else []
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
        records.begin(turn, open_session)
    except DuplicateTurnError as duplicate:  # the key's turn, or a race for it lost
        duplicate.answer = Message.objects.get(pk=duplicate.answer_id)
        raise
    return turn


def _internal_error(**ids: str) -> dict[str, Any]:
    return dict(error_event("internal_error", "Something went wrong on the server.", **ids))


async def run_turn(turn: Turn) -> AsyncGenerator[bytes, None]:
    """Run one turn and yield its NDJSON lines: ``analyzing``, ``answering``…, then exactly one
    of ``completed`` or ``error`` (the lines of deltas that arrived together in one item). If
    the consumer stops early (client gone, cancel), the upstream request is closed and the
    partial answer is saved as ``interrupted``."""
    encoder, state, chain = Encoder(turn.extra), turn.state, turn.chain
    save: asyncio.Future[bool] | None = None
    channel: TurnChannel | None = None
    try:
        ids = turn.ids()
        yield encoder.event({"event": "analyzing", **ids, "model": turn.model})
        channel = TurnChannel(turn)
        await channel.open()

        def event_line(event: Event) -> bytes:
            channel.event(event)
            return encoder.event(event)

        heartbeat = conf.CHATPROXY_HEARTBEAT or None
        try:
            if chain.before:
                stage = _while_emitting(turn, chain.before_upstream(turn), heartbeat)
                async with aclosing(stage):
                    async for event in stage:
                        yield event_line(event)
            if turn.approvals:
                calls = [call for call, _ in turn.approvals]
                denied = frozenset(call["id"] for call, approved in turn.approvals if not approved)
                tool_lines = steps.run_tools(turn, calls, "before", event_line, heartbeat, denied)
                async with aclosing(tool_lines):
                    async for line in tool_lines:
                        yield line
            step = 1
            while True:
                state = turn.state
                async with aclosing(
                    _stream_step(turn, encoder, channel, event_line, heartbeat)
                ) as lines:
                    async for line in lines:
                        yield line
                server, client = steps.split_calls(turn)
                if turn.stopped or not server:
                    break
                asked = steps.needs_approval(turn, server)
                run = [call for call in server if call not in asked]
                placement: steps.Placement = "after" if client or asked else "step"
                if run:
                    tool_lines = steps.run_tools(turn, run, placement, event_line, heartbeat)
                    async with aclosing(tool_lines):
                        async for line in tool_lines:
                            yield line
                if asked:  # the user answers them, in a turn of its own: see ``approvals``
                    yield b"".join(map(event_line, steps.approval_events(asked)))
                    turn.metadata[APPROVAL_REQUIRED] = [call["id"] for call in asked]
                    state.finish_reason = APPROVAL_REQUIRED
                if placement == "after":  # the client answers its own calls: the turn ends
                    break
                if step == conf.CHATPROXY_MAX_TOOL_STEPS:
                    raise TurnError(
                        f"The model called tools {step} times in a row without answering.",
                        code="too_many_tool_steps",
                    )
                step += 1
            if chain.transforming and (text := await chain.flush(turn)):
                state.deliver(text)
                channel.text(text)
                yield encoder.answering(text)
            state.end(Status.COMPLETED)
            if chain.after:
                stage = _while_emitting(turn, chain.after_response(turn), heartbeat)
                async with aclosing(stage):
                    async for event in stage:
                        yield event_line(event)
            terminal: dict[str, Any] = {
                "event": "completed",
                **ids,
                "finish_reason": state.finish_reason,
                "usage": turn.usage(),
            }
            if turn.dropped_messages:
                terminal["history"] = turn.history_cut()
            if calls := steps.client_calls(turn) if turn.tools else state.tool_calls:
                terminal["tool_calls"] = calls
        except TurnError as exc:
            state = turn.state
            if state.status is Status.STREAMING:
                state.end(Status(exc.status), exc.code, exc.message)
            await chain.notify("on_error", turn, exc)
            terminal = dict(error_event(exc.code, exc.message, **ids))
        except Exception:  # the one top-level guard: the stream must end with an error event
            logger.exception("Chat turn %s failed", turn.answer_id)
            state = turn.state
            if state.status is Status.STREAMING:
                state.end(Status.FAILED, "internal_error", "Something went wrong on the server.")
            terminal = _internal_error(**ids)
        save = asyncio.ensure_future(records.save(turn))
        # Saved before the terminal line goes out, so a client that continues the
        # conversation right after `completed` finds this answer in its history.
        if not await asyncio.shield(save):
            terminal = _internal_error(**ids)
        yield event_line(terminal)
    finally:
        # No `yield` in here: the generator may be closing (GeneratorExit).
        interrupted = save is None
        if save is None:
            save = asyncio.ensure_future(records.save(turn))
        saved = await asyncio.shield(save)
        if channel is not None:  # after the save: a follower left waiting reads the answer
            await channel.close()
        if saved:
            if interrupted:
                await chain.notify("on_interrupt", turn)
            await _announce(turn)


async def _stream_step(
    turn: Turn,
    encoder: Encoder,
    channel: TurnChannel,
    event_line: Callable[[Event], bytes],
    heartbeat: float | None,
) -> AsyncGenerator[bytes, None]:
    """Stream one upstream call of the turn into ``turn.state``, yielding its lines."""
    state, chain = turn.state, turn.chain
    stream: AnswerStream | None = None
    try:
        if turn.aborted is not None:
            raise turn.aborted
        turn.stream = stream = AnswerStream(
            turn.model, turn.messages, turn.params, f"chatproxy-{turn.answer_id}"
        )
        shutdown.track(stream)
        coalesce, transforming = conf.CHATPROXY_COALESCE_DELTAS, chain.transforming
        every = conf.CHATPROXY_CHECKPOINT_INTERVAL if conf.CHATPROXY_STORE_CONTENT else 0
        checkpoint_at = time.monotonic() + every
        while (batch := await stream.next_batch(heartbeat)) is not None:
            if not batch:
                yield event_line(PING)
                continue
            pieces = [piece for chunk in batch if (piece := state.feed(chunk))]
            if coalesce and len(pieces) > 1 and not state.mixed:
                pieces = ["".join(pieces)]  # type: ignore[arg-type]
            lines: list[bytes] = []  # one line per delta, written together
            for piece in pieces:
                # Reasoning or tool calls (a Pieces) are off the hot path of plain text.
                text = (
                    piece
                    if isinstance(piece, str)
                    else await _relay_pieces(turn, piece, lines, event_line)
                )
                if transforming and text and (text := await chain.on_delta(turn, text)):
                    state.deliver(text)
                if text:
                    if channel.followers:
                        channel.text(text)
                    lines.append(encoder.answering(text))
                if turn.pending:
                    lines.extend(event_line(event) for event in _take(turn))
            if lines:
                yield lines[0] if len(lines) == 1 else b"".join(lines)
            if turn.stopped:
                state.finish_reason = turn.stopped
                break
            if every and time.monotonic() >= checkpoint_at:
                # Awaited inline: at most one write per interval, never one per token.
                await records.checkpoint(turn)
                checkpoint_at = time.monotonic() + every
        await stream.aclose()
        if not turn.stopped and (state.reasoning_open or state.tool_calls_open):
            # The body ended with reasoning held back or calls open, and no finish reason.
            ended = state.reasoning_open
            last, lines = Pieces("", state.close(), "", ended), []
            await _relay_pieces(turn, last, lines, event_line)
            if lines:
                yield b"".join(lines)
    finally:
        if stream is not None:
            shutdown.forget(stream)
            await stream.aclose()


async def _relay_pieces(
    turn: Turn, pieces: Pieces, lines: list[bytes], event_line: Callable[[Event], bytes]
) -> str:
    """Add the lines of a chunk's reasoning and completed tool calls, through their hooks;
    return its answer text, which goes the way of any other."""
    chain, state = turn.chain, turn.state
    reasoning, calls, text, reasoning_ended = pieces
    if reasoning_ended and (held := await chain.flush_reasoning(turn)):
        state.deliver_reasoning(held)
        lines.append(event_line({"event": "reasoning", "content": held}))
    if reasoning and chain.reasonings:
        reasoning = await chain.on_reasoning(turn, reasoning)
        if reasoning:
            state.deliver_reasoning(reasoning)
    if reasoning:
        lines.append(event_line({"event": "reasoning", "content": reasoning}))
    for call in calls:
        kept: ToolCall | None = call
        if chain.tool_calls:
            kept = await chain.on_tool_call(turn, call)
            state.replace_call(call, kept)
        if kept is not None:
            lines.append(event_line({"event": "tool_call", **kept}))
    return text


def _take(turn: Turn) -> list[Any]:
    events, turn.pending = turn.pending, []
    return events


async def _while_emitting(
    turn: Turn, stage: Coroutine[Any, Any, None], heartbeat: float | None
) -> AsyncGenerator[Any, None]:
    """Run a stage, yielding what it emits as it emits it, and a ping per silent interval."""
    task = asyncio.ensure_future(stage)
    waiter: asyncio.Future[Any] | None = None
    try:
        while True:
            turn.wakeup.clear()
            for event in _take(turn):
                yield event
            if task.done():
                break
            waiter = asyncio.ensure_future(turn.wakeup.wait())
            done, _ = await asyncio.wait(
                {task, waiter}, timeout=heartbeat, return_when="FIRST_COMPLETED"
            )
            waiter.cancel()
            if not done:
                yield PING
        task.result()
    finally:
        if waiter is not None:
            waiter.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})


async def _announce(turn: Turn) -> None:
    """Send ``turn_finished`` with the saved answer, if anyone listens."""
    if turn.answer_id is None or not turn_finished.has_listeners(Message):
        return
    message = await Message.objects.aget(pk=turn.answer_id)
    for receiver, result in await turn_finished.asend_robust(Message, message=message, turn=turn):
        if isinstance(result, Exception):
            logger.error("turn_finished receiver %r failed", receiver, exc_info=result)
