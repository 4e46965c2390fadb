"""One chat turn, transport-agnostic: save, intercept, stream from upstream, finalize.

``run_turn()`` is an async generator of NDJSON: each item is one or more whole lines (the
``answering`` lines of deltas that arrived together go out in one write). The HTTP view streams
the items as they are; the WebSocket consumer sends each line as a text frame. It knows nothing
of requests or sockets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable, Coroutine
from contextlib import aclosing
from typing import Any

from . import metrics, records, shutdown, steps, tracing
from .conf import conf
from .events import PING, Encoder, Event, ToolCall, error_event
from .exceptions import TurnError
from .followers import TurnChannel
from .models import APPROVAL_REQUIRED, Message, Status
from .reservations import Meter
from .signals import turn_finished
from .turns import Pieces, Turn
from .upstream import AnswerStream

logger = logging.getLogger("chatproxy.pipeline")


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
    started = metrics.turn_started()
    tracing.turn_started(turn)
    try:
        ids = turn.ids()
        yield encoder.event({"event": "analyzing", **ids, "model": turn.model})
        channel = TurnChannel(turn)
        await channel.open()

        def event_line(event: Event) -> bytes:
            channel.event(event)
            return encoder.event(event)

        heartbeat = conf.CHATPROXY_HEARTBEAT or None
        # Only a turn holding a reservation is metered: the stream of any other pays nothing.
        meter = None if turn.budget is None else Meter(turn.budget)
        try:
            if chain.before:
                stage = _while_emitting(turn, chain.before_upstream(turn), heartbeat)
                async with aclosing(stage):
                    async for event in stage:
                        yield event_line(event)
            if turn.approvals:
                calls = [call for call, _ in turn.approvals]
                # Saved with the answer: who approved what, and what a resume replays first.
                turn.metadata[steps.APPROVALS] = {c["id"]: ok for c, ok in turn.approvals}
                denied = frozenset(call["id"] for call, approved in turn.approvals if not approved)
                tool_lines = steps.run_tools(turn, calls, "before", event_line, heartbeat, denied)
                async with aclosing(tool_lines):
                    async for line in tool_lines:
                        yield line
            step = 1
            while True:
                state = turn.state
                async with aclosing(
                    _stream_step(turn, encoder, channel, event_line, heartbeat, meter)
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
        metrics.turn_ended(turn, started)
        tracing.turn_ended(turn)
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
    meter: Meter | None,
) -> AsyncGenerator[bytes, None]:
    """Stream one upstream call of the turn into ``turn.state``, yielding its lines; with a
    ``meter``, stop it once the turn uses more than it reserved."""
    state, chain = turn.state, turn.chain
    stream: AnswerStream | None = None
    call_span, error = None, ""
    if meter is not None:
        meter.next_step()
    try:
        if turn.aborted is not None:
            raise turn.aborted
        with tracing.upstream_call(turn) as call_span:  # current while the call task starts
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
            if meter is not None:  # after the lines: the client gets what is saved
                meter.check(batch)
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
    except TurnError as exc:
        error = exc.code
        raise
    finally:
        if stream is not None:
            shutdown.forget(stream)
            await stream.aclose()
        tracing.upstream_call_ended(call_span, turn, error)


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
