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

Followers are counted where the turn runs, which is the one place that sees them all: per answer
(CHATPROXY_MAX_FOLLOWERS) and per user across the answers this process runs
(CHATPROXY_MAX_FOLLOWERS_PER_USER). Each follower's queue holds at most ``QUEUE_SIZE`` items; one
that falls further behind is dropped with a ``follower_too_slow`` error event.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from channels.exceptions import ChannelFull
from channels.layers import InMemoryChannelLayer, get_channel_layer

from . import metrics
from .conf import conf
from .events import TERMINAL_EVENTS, Event, error_event
from .exceptions import RequestError, TurnCancelledError
from .turns import Turn

logger = logging.getLogger("chatproxy.followers")

FOLLOW_TIMEOUT = 3.0
# Items (text deltas and events) a follower may fall behind the turn before it is dropped.
QUEUE_SIZE = 1000
RETRY_AFTER = 5
TOO_SLOW = (
    "This answer went on faster than it could be sent to you, so it stopped being sent. "
    "Resume it to catch up."
)

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


# How many followers each user has on the turns this process runs.
_follows: collections.Counter[str] = collections.Counter()


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
                reply_to, who = str(message["reply_to"]), str(message.get("who") or "")
                refusal = self.refusal(who)
                if refusal is not None:
                    with contextlib.suppress(Exception):  # the follower then times out
                        await self.layer.send(reply_to, _refused(refusal))
                    continue
                self.attach(_LayerFollower(self.layer, reply_to, who, self.dropped_event()))

    def refusal(self, who: str) -> RequestError | None:
        """Why one more follower (of the user ``who``, if known) may not attach, or None."""
        per_answer = conf.CHATPROXY_MAX_FOLLOWERS
        if per_answer is not None and len(self.followers) >= per_answer:
            return _too_many(
                f"This answer already has {per_answer} followers. Close a tab or window that "
                "follows it, or wait for it to finish."
            )
        per_user = conf.CHATPROXY_MAX_FOLLOWERS_PER_USER
        if who and per_user is not None and _follows[who] >= per_user:
            return _too_many(
                f"You already follow {per_user} running answers. Close a tab or window that "
                "follows one, or wait for it to finish."
            )
        return None

    def attach(self, follower: _LocalFollower | _LayerFollower) -> None:
        """Add a follower, or raise ``too_many_followers`` (a ``RequestError``, 429)."""
        refusal = self.refusal(follower.who)
        if refusal is not None:
            raise refusal
        # The snapshot is queued first and synchronously, so no later event can overtake it:
        # the follower gets the text so far, then everything after it.
        turn = self.turn
        for event in turn.earlier:
            follower.put({"kind": "event", "event": dict(event)})
        follower.put({"kind": "snapshot", "text": turn.state.text})
        if turn.tools:  # a step running server tools: its calls, and the results so far
            for call in turn.state.tool_calls:
                follower.put({"kind": "event", "event": {"event": "tool_call", **call}})
            for event in turn.results:
                follower.put({"kind": "event", "event": dict(event)})
        self.followers.append(follower)
        metrics.followers_changed(1)
        if follower.who:
            _follows[follower.who] += 1

    def detach(self, follower: _LocalFollower | _LayerFollower) -> None:
        if follower in self.followers:
            self.followers.remove(follower)
            metrics.followers_changed(-1)
            if follower.who:
                _follows[follower.who] -= 1
                if not _follows[follower.who]:
                    del _follows[follower.who]

    def dropped_event(self) -> dict[str, Any]:
        """The item a follower that fell behind gets last: the terminal error event."""
        event = error_event("follower_too_slow", TOO_SLOW, **self.turn.ids())
        return {"kind": "event", "event": dict(event)}

    def cancel(self) -> None:
        self.turn.abort(TurnCancelledError("The answer was stopped on request."))

    def text(self, text: str) -> None:
        self._send({"kind": "text", "text": text})

    def event(self, event: Event) -> None:
        self._send({"kind": "event", "event": dict(event)})

    def _send(self, item: dict[str, Any]) -> None:
        behind = [follower for follower in self.followers if not follower.put(item)]
        for follower in behind:
            self.detach(follower)

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
        for follower in list(self.followers):
            follower.put(CLOSED)
            await follower.finish()
            self.detach(follower)
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


def _too_many(message: str) -> RequestError:
    return RequestError("too_many_followers", message, status=429, retry_after=RETRY_AFTER)


def _refused(refusal: RequestError) -> dict[str, Any]:
    return {"type": "turn.refused", "code": refusal.code, "message": refusal.message}


class _Follower:
    """One follower's bounded queue of items."""

    __slots__ = ("who", "queue", "dropped")

    def __init__(self, who: str, dropped: dict[str, Any]) -> None:
        self.who = who
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_SIZE)
        self.dropped = dropped

    def put(self, item: dict[str, Any]) -> bool:
        """Queue ``item``; False if the follower fell QUEUE_SIZE items behind and is dropped:
        what it has not read is let go, and the ``follower_too_slow`` event ends it."""
        try:
            self.queue.put_nowait(item)
            return True
        except asyncio.QueueFull:
            pass
        while not self.queue.empty():
            self.queue.get_nowait()
        # At the turn's end the saved answer holds everything let go: read it from there.
        self.queue.put_nowait(item if item is CLOSED else self.dropped)
        return item is CLOSED

    async def finish(self) -> None:
        pass


class _LocalFollower(_Follower):
    """A follower in this process: ``follow()`` reads its queue."""

    __slots__ = ()


class _LayerFollower(_Follower):
    """Send one follower in another process its items in order, batching whatever piled up
    into one message."""

    __slots__ = ("layer", "reply_to", "task")

    def __init__(self, layer: Any, reply_to: str, who: str, dropped: dict[str, Any]) -> None:
        super().__init__(who, dropped)
        self.layer, self.reply_to = layer, reply_to
        self.task = asyncio.create_task(self._send())

    def put(self, item: dict[str, Any]) -> bool:
        # A follower whose sending ended (it went away) is dropped too.
        return super().put(item) and not self.task.done()

    async def _send(self) -> None:
        while True:
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            if not await self._deliver(items):
                return
            if any(_last(item) for item in items):
                return

    async def _deliver(self, items: list[dict[str, Any]]) -> bool:
        # The follower's channel is full while it reads slowly: keep trying for a while, as
        # more items wait in the (bounded) queue meanwhile.
        give_up = time.monotonic() + FOLLOW_TIMEOUT
        while True:
            try:
                await self.layer.send(self.reply_to, {"type": "turn.items", "items": items})
                return True
            except ChannelFull:
                if time.monotonic() >= give_up:
                    logger.warning("Dropped a follower of a turn: its channel stayed full")
                    return False
                await asyncio.sleep(0.1)
            except Exception:  # a follower that went away is dropped
                logger.warning("Dropped a follower of a turn", exc_info=True)
                return False

    async def finish(self) -> None:
        """Wait, briefly, for the last items to go out."""
        try:
            await asyncio.wait_for(asyncio.shield(self.task), FOLLOW_TIMEOUT)
        except (TimeoutError, asyncio.CancelledError):
            self.task.cancel()


async def follow(answer_id: uuid.UUID | str, who: str = "") -> AsyncIterator[dict[str, Any]]:
    """Attach to a running turn as a follower of the user ``who`` (an ``Owner.key``, or ''),
    and return its items: a ``snapshot`` first, then ``text`` and ``event`` items up to the
    terminal event. Raise ``TurnGone`` if no process runs that turn, and ``too_many_followers``
    (a ``RequestError``) if it takes no more followers; iterating raises ``TurnGone`` if it
    ends (its answer saved) without sending a terminal event."""
    local = _running.get(str(answer_id))
    if local is not None:
        follower = _LocalFollower(who, local.dropped_event())
        local.attach(follower)
        return _read_local(local, follower, str(answer_id))
    layer = shared_layer()
    if layer is None:
        raise TurnGone(str(answer_id))
    reply_to = await layer.new_channel()
    await layer.group_send(
        turn_group(str(answer_id)), {"type": "turn.follow", "reply_to": reply_to, "who": who}
    )
    # The turn answers at once if it is alive.
    try:
        first = await asyncio.wait_for(layer.receive(reply_to), FOLLOW_TIMEOUT)
    except TimeoutError:
        raise TurnGone(str(answer_id)) from None
    if first.get("type") == "turn.refused":
        raise _too_many(str(first["message"]))
    return _read_layer(layer, reply_to, first, str(answer_id))


async def _read_local(
    channel: TurnChannel, follower: _LocalFollower, answer_id: str
) -> AsyncIterator[dict[str, Any]]:
    try:
        while True:
            item = await follower.queue.get()
            if item["kind"] == "closed":
                raise TurnGone(answer_id)
            yield item
            if _last(item):
                return
    finally:
        channel.detach(follower)


async def _read_layer(
    layer: Any, reply_to: str, message: dict[str, Any], answer_id: str
) -> AsyncIterator[dict[str, Any]]:
    # After its first answer the turn forwards a ping at least every CHATPROXY_HEARTBEAT
    # seconds, so a longer silence means its process died.
    heartbeat = conf.CHATPROXY_HEARTBEAT
    timeout = heartbeat * 2 + FOLLOW_TIMEOUT if heartbeat else None
    while True:
        for item in message["items"]:
            if item["kind"] == "closed":
                raise TurnGone(answer_id)
            yield item
            if _last(item):
                return
        try:
            message = await asyncio.wait_for(layer.receive(reply_to), timeout)
        except TimeoutError:
            raise TurnGone(answer_id) from None


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
