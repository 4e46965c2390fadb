"""The loop of a turn whose model calls server tools: run a step's calls, save, go on.

A step is one upstream call. When it ends with calls to server tools, ``run_tools`` runs them
(concurrently, at most CHATPROXY_MAX_PARALLEL_TOOLS at once), sends a ``tool_result`` line per
call as it ends, saves the step and its results, and adds them to ``turn.messages`` for the
next step. The step's calls to the client's own tools, if any, end the turn instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from typing import Any, cast

from . import records
from .conf import conf
from .events import PING, Event, ToolCall
from .models import upstream_message
from .tools import ToolResult, run_call
from .turns import Turn, TurnState

INTERRUPTED = "The tool run was interrupted."


def split_calls(turn: Turn) -> tuple[list[ToolCall], list[ToolCall]]:
    """The step's calls to server tools, and those to the client's."""
    server = [call for call in turn.state.tool_calls if call["name"] in turn.tools]
    client = [call for call in turn.state.tool_calls if call["name"] not in turn.tools]
    return server, client


def client_calls(turn: Turn) -> list[ToolCall]:
    return split_calls(turn)[1]


async def run_tools(
    turn: Turn,
    calls: list[ToolCall],
    go_on: bool,
    event_line: Callable[[Event], bytes],
    heartbeat: float | None,
) -> AsyncGenerator[bytes, None]:
    """Run ``calls`` and yield their ``tool_result`` lines (a ``ping`` per silent interval).
    With ``go_on`` (no client calls), the step is saved as a message of its own and the turn
    moves to the next step; otherwise, or if the run is cut short (a cancel, the client
    gone: unfinished calls are cancelled and get an error result), the results are saved
    after the answer, which stays this step."""
    limit = asyncio.Semaphore(conf.CHATPROXY_MAX_PARALLEL_TOOLS)

    async def bounded(call: ToolCall) -> ToolResult:
        async with limit:
            return await run_call(turn, turn.tools[call["name"]], call)

    tasks = [asyncio.ensure_future(bounded(call)) for call in calls]
    pending: set[asyncio.Future[Any]] = set(tasks)
    results: dict[str, ToolResult] = {}
    try:
        while pending:
            if turn.aborted is not None:
                raise turn.aborted
            turn.wakeup.clear()
            waiter = asyncio.ensure_future(turn.wakeup.wait())
            try:
                done, _ = await asyncio.wait(
                    {*pending, waiter}, timeout=heartbeat, return_when="FIRST_COMPLETED"
                )
            finally:
                waiter.cancel()
            pending -= done
            if not done:
                yield event_line(PING)
                continue
            lines = []
            for task in tasks:  # in the calls' order when several end together
                if task in done and not task.cancelled():
                    result = task.result()
                    results[result.call["id"]] = result
                    turn.results.append(result.event())
                    lines.append(event_line(result.event()))
            if lines:
                yield b"".join(lines)
    finally:
        for unfinished in pending:
            unfinished.cancel()
        if pending:
            await asyncio.wait(pending)
        finished = len(results) == len(calls)
        ordered = [results.get(call["id"]) or ToolResult(call, error=INTERRUPTED) for call in calls]
        await records.save_step(turn, ordered, go_on and finished)
    if go_on:
        _next_step(turn, ordered)


def _next_step(turn: Turn, results: list[ToolResult]) -> None:
    """Send the step and its results upstream with the next step, which starts afresh."""
    state = turn.state
    turn.messages.append(
        upstream_message(
            "assistant",
            state.text,
            [],
            cast("list[dict[str, str]]", state.tool_calls),
            "",
            state.reasoning,
            reasoning_field=conf.CHATPROXY_REASONING_FIELD,
        )
    )
    for result in results:
        turn.messages.append(
            {"role": "tool", "tool_call_id": result.call["id"], "content": result.content()}
        )
    if state.reasoning:
        turn.earlier.append({"event": "reasoning", "content": state.reasoning})
    if state.text:
        turn.earlier.append({"event": "answering", "content": state.text})
    turn.earlier += [{"event": "tool_call", **call} for call in state.tool_calls]
    turn.earlier += turn.results
    turn.results = []
    turn.spent = turn.usage()
    turn.state = TurnState(state.transforming, state.transforming_reasoning)
