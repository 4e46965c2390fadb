"""Turns that outlive their client: ``"detach": true`` in a chat request.

Without it, a client that leaves (a closed tab, a reload, a dropped socket) stops its turn: the
upstream request is closed and the answer saved ``interrupted``. With it, the turn runs in a
task of its own to its end and is saved as it ends; the transport only reads its lines, and
stops reading when the client leaves. Anyone may then re-attach (resume) and see the rest
live; stopping it takes the cancel endpoint, or a ``cancel`` frame.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing

from asgiref.sync import ThreadSensitiveContext

from .threads import RequestThread

Lines = AsyncGenerator[bytes, None]

# The turns running on their own; kept so their tasks are not garbage-collected before they end.
_running: set[asyncio.Task[None]] = set()


async def detached(lines: Lines) -> Lines:
    """Yield ``lines`` (a turn's) while they are run by a task of their own, which goes on to
    the turn's end when this generator is closed or cancelled."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()
    reading = True

    async def run() -> None:
        # The turn outlives the request, and so the request's thread: its synchronous work
        # (a sync receiver of turn_finished, say) gets a thread of its own, started if needed.
        thread = RequestThread("chatproxy-detached")
        try:
            async with ThreadSensitiveContext(executor=thread), aclosing(lines):
                async for line in lines:
                    if reading:  # once nobody reads, the lines are dropped, not kept
                        queue.put_nowait(line)
        finally:
            queue.put_nowait(None)
            thread.retire()

    task = asyncio.create_task(run())
    _running.add(task)
    task.add_done_callback(_running.discard)
    try:
        while (line := await queue.get()) is not None:
            yield line
    finally:
        reading = False
