"""Follow and stop a running turn from any request, in this process or, through a shared
Channels layer, in another.

Each running turn is registered in this process (``_running``, by answer id): a request here
that follows or stops it reaches it directly. With a layer shared between processes (Redis),
the turn also listens on a channel of its own, in the group ``chatproxy.turn.<answer id>``, so
a request on another worker can send it ``turn.cancel``, or ``turn.follow`` with a reply
channel: the turn then sends the follower the text so far and every event after it, up to the
terminal one. Nothing is published while nobody follows, so an unfollowed turn pays for a dict
entry (and with a shared layer, for joining and leaving its group). The in-memory layer reaches
no other process, so with it a turn does not join the layer at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from channels.layers import InMemoryChannelLayer, get_channel_layer

from .conf import conf
from .events import TERMINAL_EVENTS, Event
from .exceptions import TurnCancelledError
from .turns import Turn

logger = logging.getLogger("chatproxy.followers")

FOLLOW_TIMEOUT = 3.0

# Listeners cancelled but still finishing a channel-layer read; they end by themselves.
lingering: set[asyncio.Task[None]] = set()


class TurnGone(Exception):
    """No process runs the turn (any more), and it sent no terminal event: read the database."""


def turn_group(answer_id: uuid.UUID | str) -> str:
    """The channel-layer group of one running turn."""
    return f"chatproxy.turn.{answer_id}"


def shared_layer() -> Any:
    """The channel layer, if it reaches other processes; else None."""
    layer = get_channel_layer()
    return None if isinstance(layer, InMemoryChannelLayer) else layer


class TurnChannel:
    """The running turn's end: followers attach to it, and a cancel reaches it, from this
    process directly and from others through a shared layer."""

    __slots__ = ("turn", "key", "layer", "name", "group", "listener", "followers")

    def __init__(self, turn: Turn) -> None:
        self.turn = turn
        self.key = str(turn.answer_id)
        self.layer: Any = None
        self.name = self.group = ""
        self.listener: asyncio.Task[None] | None = None
        self.followers: list[_LocalFollower | _LayerFollower] = []

    async def open(self) -> None:
        _running[self.key] = self
        self.layer = shared_layer()
        if self.layer is None:
            return
        self.name = await self.layer.new_channel()
        self.group = turn_group(self.key)
        await self.layer.group_add(self.group, self.name)
        self.listener = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        while True:
            message = await self.layer.receive(self.name)
            if message.get("type") == "turn.cancel":
                self.cancel()
            elif message.get("type") == "turn.follow" and message.get("reply_to"):
                self.attach(_LayerFollower(self.layer, str(message["reply_to"])))

    def attach(self, follower: _LocalFollower | _LayerFollower) -> None:
        # The snapshot is queued first and synchronously, so no later event can overtake it:
        # the follower gets the text so far, then everything after it.
        follower.put({"kind": "snapshot", "text": self.turn.state.text})
        self.followers.append(follower)

    def cancel(self) -> None:
        self.turn.abort(TurnCancelledError("The answer was stopped on request."))

    def text(self, text: str) -> None:
        for follower in self.followers:
            follower.put({"kind": "text", "text": text})

    def event(self, event: Event) -> None:
        for follower in self.followers:
            follower.put({"kind": "event", "event": dict(event)})

    async def close(self) -> None:
        """Called once the turn's answer is saved: followers still waiting for a terminal
        event (the turn's own client left) are told to read the answer from the database."""
        _running.pop(self.key, None)
        if self.listener is not None:
            # Not awaited: channels_redis finishes a Redis read it was cancelled in (up to its
            # BRPOP timeout) before the task ends, and the turn must not wait for that.
            self.listener.cancel()
            lingering.add(self.listener)
            self.listener.add_done_callback(lingering.discard)
        for follower in self.followers:
            follower.put(CLOSED)
            await follower.finish()
        if self.layer is not None and self.name:
            with contextlib.suppress(Exception):
                await self.layer.group_discard(self.group, self.name)


_running: dict[str, TurnChannel] = {}
CLOSED: dict[str, Any] = {"kind": "closed"}


def _last(item: dict[str, Any]) -> bool:
    """Whether nothing follows ``item``: the terminal event, or the turn's end without one."""
    return item["kind"] == "closed" or (
        item["kind"] == "event" and item["event"]["event"] in TERMINAL_EVENTS
    )


class _LocalFollower:
    """A follower in this process: ``follow()`` reads its queue."""

    __slots__ = ("queue",)

    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def put(self, item: dict[str, Any]) -> None:
        self.queue.put_nowait(item)

    async def finish(self) -> None:
        pass


class _LayerFollower:
    """Send one follower in another process its items in order, batching whatever piled up
    into one message."""

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
            if any(_last(item) for item in items):
                return

    async def finish(self) -> None:
        """Wait, briefly, for the last items to go out."""
        try:
            await asyncio.wait_for(asyncio.shield(self.task), FOLLOW_TIMEOUT)
        except (TimeoutError, asyncio.CancelledError):
            self.task.cancel()


async def follow(answer_id: uuid.UUID | str) -> AsyncIterator[dict[str, Any]]:
    """Yield a running turn's items: a ``snapshot`` first, then ``text`` and ``event`` items up
    to the terminal event. Raise ``TurnGone`` if no process runs that turn, or it ended (its
    answer saved) without sending a terminal event."""
    local = _running.get(str(answer_id))
    if local is not None:
        follower = _LocalFollower()
        local.attach(follower)
        try:
            while True:
                item = await follower.queue.get()
                if item["kind"] == "closed":
                    raise TurnGone(str(answer_id))
                yield item
                if _last(item):
                    return
        finally:
            with contextlib.suppress(ValueError):
                local.followers.remove(follower)
    layer = shared_layer()
    if layer is None:
        raise TurnGone(str(answer_id))
    reply_to = await layer.new_channel()
    await layer.group_send(
        turn_group(str(answer_id)), {"type": "turn.follow", "reply_to": reply_to}
    )
    # The turn answers at once if it is alive; after that it forwards a ping at least every
    # CHATPROXY_HEARTBEAT seconds, so a longer silence means its process died.
    heartbeat = conf.CHATPROXY_HEARTBEAT
    timeout: float | None = FOLLOW_TIMEOUT
    while True:
        try:
            message = await asyncio.wait_for(layer.receive(reply_to), timeout)
        except TimeoutError:
            raise TurnGone(str(answer_id)) from None
        timeout = heartbeat * 2 + FOLLOW_TIMEOUT if heartbeat else None
        for item in message["items"]:
            if item["kind"] == "closed":
                raise TurnGone(str(answer_id))
            yield item
            if _last(item):
                return


async def cancel(answer_id: uuid.UUID | str) -> bool:
    """Stop the turn, in this process or through a shared layer in whichever process runs it;
    False if it runs in no process this one can reach."""
    local = _running.get(str(answer_id))
    if local is not None:
        local.cancel()
        return True
    layer = shared_layer()
    if layer is None:
        return False
    await layer.group_send(turn_group(str(answer_id)), {"type": "turn.cancel"})
    return True
