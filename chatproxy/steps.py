"""The loop of a turn whose model calls server tools: run a step's calls, save, go on.

A step is one upstream call. When it ends with calls to server tools, ``run_tools`` runs them
(concurrently, at most CHATPROXY_MAX_PARALLEL_TOOLS at once), sends a ``tool_result`` line per
call as it ends, saves the step and its results, and adds them to ``turn.messages`` for the
next step. The step's calls to the client's own tools, if any, end the turn instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from typing import Any, Literal, cast

from . import records, tracing
from .conf import conf
from .events import PING, Event, ToolCall
from .models import upstream_message
from .tools import ToolResult, run_call
from .turns import Turn, TurnState

INTERRUPTED = "The tool run was interrupted."
DENIED = "The user denied this call."
TOOL_STEPS = "tool_steps"
APPROVALS = "approvals"
SERVER_RESULTS = "server_results"


def split_calls(turn: Turn) -> tuple[list[ToolCall], list[ToolCall]]:
    """The step's calls to server tools, and those to the client's."""
    server = [call for call in turn.state.tool_calls if call["name"] in turn.tools]
    client = [call for call in turn.state.tool_calls if call["name"] not in turn.tools]
    return server, client


def client_calls(turn: Turn) -> list[ToolCall]:
    return split_calls(turn)[1]


def needs_approval(turn: Turn, calls: list[ToolCall]) -> list[ToolCall]:
    return [call for call in calls if turn.tools[call["name"]].requires_approval]


# Where a run's results are saved: "step", the step as a message of its own and the turn goes
# on; "after" the answer, which stays this step (the client or the user answers next);
# "before" the answer (approved calls, run as a turn starts).
Placement = Literal["step", "after", "before"]


async def run_tools(
    turn: Turn,
    calls: list[ToolCall],
    placement: Placement,
    event_line: Callable[[Event], bytes],
    heartbeat: float | None,
    denied: frozenset[str] = frozenset(),
) -> AsyncGenerator[bytes, None]:
    """Run ``calls`` and yield their ``tool_result`` lines (a ``ping`` per silent interval);
    the ``denied`` ones (by id) are not run, their result is the user's denial. If the run is
    cut short (a cancel, the client gone), unfinished calls are cancelled and get an error
    result, and a step's results are saved after its answer."""
    limit = asyncio.Semaphore(conf.CHATPROXY_MAX_PARALLEL_TOOLS)

    async def bounded(call: ToolCall) -> ToolResult:
        found = turn.tools.get(call["name"])
        if found is None:
            return ToolResult(call, error=f"The tool {call['name']} is not available here.")
        async with limit:
            with tracing.tool_run(turn, call) as span:
                result = await run_call(turn, found, call)
                tracing.tool_ended(span, result)
                return result

    results: dict[str, ToolResult] = {
        call["id"]: ToolResult(call, error=DENIED) for call in calls if call["id"] in denied
    }
    if results:
        turn.results += [result.event() for result in results.values()]
        yield b"".join(event_line(result.event()) for result in results.values())
    tasks = [asyncio.ensure_future(bounded(call)) for call in calls if call["id"] not in denied]
    pending: set[asyncio.Future[Any]] = set(tasks)
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
        if placement == "step" and len(results) < len(calls):
            placement = "after"
        if placement == "after":  # saved with the answer: whose results follow it
            turn.metadata[SERVER_RESULTS] = [call["id"] for call in calls]
        ordered = [results.get(call["id"]) or ToolResult(call, error=INTERRUPTED) for call in calls]
        await records.save_step(turn, ordered, placement)
    if placement == "step":
        _next_step(turn, ordered)
    elif placement == "before":
        turn.messages += [_tool_message(result) for result in ordered]
        turn.earlier += turn.results  # a follower attaching later gets them first
        turn.results = []


def _tool_message(result: ToolResult) -> dict[str, str]:
    return {"role": "tool", "tool_call_id": result.call["id"], "content": result.content()}


def approval_events(calls: list[ToolCall]) -> list[Event]:
    return [{"event": "approval_required", **call} for call in calls]


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
    turn.messages += [_tool_message(result) for result in results]
    if state.reasoning:
        turn.earlier.append({"event": "reasoning", "content": state.reasoning})
    if state.text:
        turn.earlier.append({"event": "answering", "content": state.text})
    turn.earlier += [{"event": "tool_call", **call} for call in state.tool_calls]
    # Saved with the answer: how many steps before it a resume replays (saved_loop.events_before).
    turn.metadata[TOOL_STEPS] = turn.metadata.get(TOOL_STEPS, 0) + 1
    turn.earlier += turn.results
    turn.results = []
    turn.spent = turn.usage()
    turn.state = TurnState(state.transforming, state.transforming_reasoning)
