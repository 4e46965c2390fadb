"""Follow and stop a running turn from any process, through the Channels layer.

Each running turn listens on a channel of its own, in the group ``chatproxy.turn.<answer id>``.
Another request (on any worker, with a shared layer such as Redis) can send it ``turn.cancel``,
or ``turn.follow`` with a reply channel: the turn then sends the follower the text so far and
every event after it, up to the terminal one. Nothing is published while nobody follows, so an
unfollowed turn pays only for joining and leaving the group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from channels.layers import get_channel_layer

from .conf import conf
from .events import TERMINAL_EVENTS, Event
from .exceptions import TurnCancelledError
from .turns import Turn

logger = logging.getLogger("chatproxy.followers")

FOLLOW_TIMEOUT = 3.0

# Listeners cancelled but still finishing a channel-layer read; they end by themselves.
lingering: set[asyncio.Task[None]] = set()


def turn_group(answer_id: uuid.UUID | str) -> str:
    """The channel-layer group of one running turn."""
    return f"chatproxy.turn.{answer_id}"


class TurnChannel:
    """The running turn's end: answers ``turn.cancel`` and ``turn.follow`` messages."""

    __slots__ = ("turn", "layer", "name", "group", "listener", "followers")

    def __init__(self, turn: Turn) -> None:
        self.turn = turn
        self.layer: Any = None
        self.name = self.group = ""
        self.listener: asyncio.Task[None] | None = None
        self.followers: list[_Follower] = []

    async def open(self) -> None:
        self.layer = get_channel_layer()
        if self.layer is None:
            return
        self.name = await self.layer.new_channel()
        self.group = turn_group(str(self.turn.answer_id))
        await self.layer.group_add(self.group, self.name)
        self.listener = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        while True:
            message = await self.layer.receive(self.name)
            if message.get("type") == "turn.cancel":
                self.turn.abort(TurnCancelledError("The answer was stopped on request."))
            elif message.get("type") == "turn.follow" and message.get("reply_to"):
                follower = _Follower(self.layer, str(message["reply_to"]))
                # The snapshot is queued first and synchronously, so no later event can
                # overtake it: the follower gets the text so far, then everything after it.
                follower.put({"kind": "snapshot", "text": self.turn.state.text})
                self.followers.append(follower)

    def text(self, text: str) -> None:
        for follower in self.followers:
            follower.put({"kind": "text", "text": text})

    def event(self, event: Event) -> None:
        for follower in self.followers:
            follower.put({"kind": "event", "event": dict(event)})

    async def close(self) -> None:
        if self.listener is not None:
            # Not awaited: channels_redis finishes a Redis read it was cancelled in (up to its
            # BRPOP timeout) before the task ends, and the turn must not wait for that.
            self.listener.cancel()
            lingering.add(self.listener)
            self.listener.add_done_callback(lingering.discard)
        for follower in self.followers:
            await follower.finish()
        if self.layer is not None and self.name:
            with contextlib.suppress(Exception):
                await self.layer.group_discard(self.group, self.name)


class _Follower:
    """Send one follower its items in order, batching whatever piled up into one message."""

    __slots__ = ("layer", "reply_to", "queue", "task")

    def __init__(self, layer: Any, reply_to: str) -> None:
        self.layer, self.reply_to = layer, reply_to
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.task = asyncio.create_task(self._send())

    def put(self, item: dict[str, Any]) -> None:
        self.queue.put_nowait(item)

    async def _send(self) -> None:
        while True:
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            try:
                await self.layer.send(self.reply_to, {"type": "turn.items", "items": items})
            except Exception:  # a follower that went away or fell behind is dropped
                logger.warning("Dropped a follower of a turn", exc_info=True)
                return
            if any(i["kind"] == "event" and i["event"]["event"] in TERMINAL_EVENTS for i in items):
                return

    async def finish(self) -> None:
        """Wait, briefly, for the terminal event to go out."""
        try:
            await asyncio.wait_for(asyncio.shield(self.task), FOLLOW_TIMEOUT)
        except (TimeoutError, asyncio.CancelledError):
            self.task.cancel()


async def follow(answer_id: uuid.UUID | str) -> AsyncIterator[dict[str, Any]]:
    """Yield a running turn's items: a ``snapshot`` first, then ``text`` and ``event`` items up
    to the terminal event. Raise ``TimeoutError`` if no process runs that turn."""
    layer = get_channel_layer()
    if layer is None:
        raise TimeoutError("no channel layer")
    reply_to = await layer.new_channel()
    await layer.group_send(
        turn_group(str(answer_id)), {"type": "turn.follow", "reply_to": reply_to}
    )
    # The turn answers at once if it is alive; after that it forwards a ping at least every
    # CHATPROXY_HEARTBEAT seconds, so a longer silence means its process died.
    heartbeat = conf.CHATPROXY_HEARTBEAT
    timeout: float | None = FOLLOW_TIMEOUT
    while True:
        message = await asyncio.wait_for(layer.receive(reply_to), timeout)
        timeout = heartbeat * 2 + FOLLOW_TIMEOUT if heartbeat else None
        for item in message["items"]:
            yield item
            if item["kind"] == "event" and item["event"]["event"] in TERMINAL_EVENTS:
                return


async def cancel(answer_id: uuid.UUID | str) -> bool:
    """Ask whichever process runs the turn to stop it; False without a channel layer."""
    layer = get_channel_layer()
    if layer is None:
        return False
    await layer.group_send(turn_group(str(answer_id)), {"type": "turn.cancel"})
    return True
