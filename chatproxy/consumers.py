"""The WebSocket transport: the same turns and events as HTTP, many turns per socket, cancel.

Each turn runs in a task the consumer owns, so a ``cancel`` frame or a disconnect is handled at
once: Channels dispatches one message at a time, and a turn run inside ``receive_json`` would
hold every later frame until its answer ended. Frames go out through a queue and a task of
their own (``deliver``), so neither a turn nor the dispatch of frames ever waits for the client:
one that stops reading holds up no cancel, and no follower of its turn. A client whose
connection dies, or that takes no frame for CHATPROXY_SEND_TIMEOUT seconds, is dropped, and its
turn stops as over HTTP: upstream closed, answer saved ``interrupted`` (``client_disconnected``).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import Any

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.contrib.auth.models import AnonymousUser

from . import conversations as library
from . import database, followers
from .auth import key_from_bearer, scope_address_key
from .budgets import report
from .conf import conf
from .detach import detached
from .events import Encoder, RatedEvent, error_event
from .exceptions import DuplicateTurnError, RequestError
from .feedback import Rating, not_found, read_rating
from .interception import InterceptorSpec
from .models import Message
from .opening import open_turn
from .owners import Owner
from .payload import decode_json, validate_request
from .pipeline import run_turn
from .resume import latest_answer, replay
from .tools import ToolSpec
from .turns import Turn

CLOSE_UNAUTHENTICATED = 4401
CLOSE_TOO_SLOW = 4408
FRAME_FIELDS = ("type", "request_id", "idempotency_key")
Lines = AsyncGenerator[bytes, None]
Frame = tuple[str, bool]  # its text, and whether it ends the running turn
BUSY = "A turn is still running on this socket: wait for its last event, or cancel it."


class ChatConsumer(AsyncJsonWebsocketConsumer):  # type: ignore[misc]
    owner: Owner
    user: Any = None
    interceptors: Sequence[InterceptorSpec] | None = None  # None: CHATPROXY_INTERCEPTORS
    tools: Sequence[ToolSpec] | None = None  # None: CHATPROXY_TOOLS
    task: asyncio.Task[None] | None = None  # runs the turn, queueing its frames
    turn: Turn | None = None
    following: uuid.UUID | None = None  # the answer a resumed socket follows
    busy = False  # a turn runs and its terminal event has not been sent yet
    answered = False  # the running turn's terminal event is queued; it only tidies up
    closed = False  # the server closed the socket, or gave up on it: later frames are ignored
    outbox: asyncio.Queue[Frame]
    flowing: asyncio.Event  # set while no send is stuck on a client that does not read
    sender: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        """Called when a client opens the socket: accept it only for someone allowed to chat."""
        headers = dict(self.scope.get("headers", []))
        # Browsers always send Origin, and chatproxy.origin.OriginValidator checks it: only a
        # socket whose origin was checked may use the session. One without Origin is not a
        # browser, and like a cookieless API client only a bearer key authenticates it.
        browser = b"origin" in headers
        self.user = user = self.scope.get("user") if browser else AnonymousUser()
        await self.accept()
        try:
            authorization = headers.get(b"authorization", b"").decode("latin-1")
            bearer = await database.run(key_from_bearer, authorization)
        except RequestError:  # a wrong key is refused, even where anonymous chat is allowed
            await self.refuse()
            return
        if bearer is not None:
            self.user = bearer.user
            self.owner = Owner(user_id=bearer.user.pk, api_key_id=bearer.pk)
        elif user is not None and user.is_authenticated:
            self.owner = Owner(user_id=user.pk)
        elif conf.CHATPROXY_ALLOW_ANONYMOUS:
            # A socket cannot set a cookie, so an anonymous socket owns its conversations
            # under a key of its own unless the browser already has a session.
            session = self.scope.get("session") if browser else None
            key = getattr(session, "session_key", None) or f"ws-{uuid.uuid4().hex}"
            self.owner = Owner(session_key=key, address=scope_address_key(self.scope))
        else:
            await self.refuse()
            return
        self.outbox, self.flowing = asyncio.Queue(), asyncio.Event()
        self.flowing.set()
        self.sender = asyncio.create_task(self.deliver())

    async def refuse(self) -> None:
        self.closed = True
        await self.close(code=CLOSE_UNAUTHENTICATED)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Called with each frame: answer a malformed one with an ``error`` frame, keep going."""
        if self.closed:  # e.g. sent before the client saw its 4401: nobody to answer
            return
        try:
            if text_data is None:
                raise RequestError("invalid_json", "Send frames as JSON text, not binary.")
            if len(text_data.encode()) > conf.CHATPROXY_MAX_BODY_BYTES:
                raise RequestError(
                    "body_too_large",
                    f"The frame is larger than {conf.CHATPROXY_MAX_BODY_BYTES} bytes. Send less.",
                    status=413,
                )
            content = decode_json(text_data)
        except RequestError as exc:
            await self.send_error(exc.code, exc.message, None)
            return
        await self.receive_json(content)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """Called with each decoded frame: start a turn, resume one, or cancel the running one."""
        request_id = content.get("request_id") if isinstance(content, dict) else None
        if request_id is not None and not (isinstance(request_id, str) and len(request_id) <= 100):
            await self.send_error(
                "invalid_request", "request_id must be a string of at most 100 characters.", None
            )
            return
        kind = content.get("type") if isinstance(content, dict) else None
        if kind == "cancel":
            await self.cancel()
        elif kind == "rate":  # quick, and not part of a turn: answered even while one runs
            await self.rate(content, request_id)
        elif kind == "budgets":  # like rate: quick, answered even while a turn runs
            body = await database.run(report, self.owner, self.user)
            await self.flowing.wait()
            self.send_event({"event": "budgets", "budgets": body}, _extra(request_id))
        elif kind in MANAGING:
            await self.manage(kind, content, request_id)
        elif kind in ("chat", "resume"):
            if self.busy:
                await self.send_error("busy", BUSY, request_id)
                return
            extra = {} if request_id is None else {"request_id": request_id}
            try:
                lines = await (self.start_turn if kind == "chat" else self.resume)(content, extra)
            except RequestError as exc:
                await self.send_error(exc.code, exc.message, request_id, exc.retry_after)
                return
            self.busy, self.answered = True, False
            self.task = asyncio.create_task(self.run(lines))
        else:
            await self.send_error(
                "invalid_request",
                'Each frame needs "type": "chat" (with messages), "resume", "cancel", "rate", '
                '"budgets", '
                "or one of " + ", ".join(f'"{kind}"' for kind in MANAGING) + ".",
                request_id,
            )

    async def disconnect(self, code: int) -> None:
        """Called when the socket closes: stop the running turn and let it save."""
        self.closed = True
        await self.stop("client_disconnected")
        if self.sender is not None:
            self.sender.cancel()
            await asyncio.wait({self.sender})

    async def manage(self, kind: str, content: dict[str, Any], request_id: str | None) -> None:
        """Answer a frame about a conversation as a whole with one event (``MANAGING``), the
        same body as over HTTP; it may come while a turn runs."""
        extra = {} if request_id is None else {"request_id": request_id}
        try:
            body = await database.run(_managed, kind, self.owner, content)
        except RequestError as exc:
            await self.send_error(exc.code, exc.message, request_id)
            return
        await self.flowing.wait()
        self.send_event({"event": MANAGING[kind], **body}, extra)

    async def start_turn(self, content: dict[str, Any], extra: dict[str, Any]) -> Lines:
        key = content.get("idempotency_key", "")
        if not isinstance(key, str) or len(key) > 200:
            raise RequestError(
                "invalid_idempotency_key",
                "idempotency_key must be a string of 1 to 200 characters.",
            )
        request = validate_request(content, ignore=FRAME_FIELDS)
        owner, user = self.owner, self.user
        try:
            self.turn = await open_turn(
                lambda: (owner, user),
                request,
                extra=extra,
                interceptors=self.interceptors,
                tools=self.tools,
                idempotency_key=key,
            )
        except DuplicateTurnError as duplicate:  # the key's turn ran or runs: follow it
            return self._follow(duplicate.answer, extra)
        self.following = None
        lines = run_turn(self.turn)
        # Detached, a disconnect (stop()) only stops reading: the turn runs to its end.
        return detached(lines) if request.detach else lines

    async def resume(self, content: dict[str, Any], extra: dict[str, Any]) -> Lines:
        raw, message = content.get("conversation_id"), content.get("message_id")
        try:
            conversation_id = uuid.UUID(str(raw))
            message_id = None if message is None else uuid.UUID(str(message))
            answer = await latest_answer(self.owner, conversation_id, message_id)
        except ValueError:
            answer = None
        if answer is None:
            raise RequestError(
                "conversation_not_found", "No conversation with that id belongs to you.", status=404
            )
        return self._follow(answer, extra)

    def _follow(self, answer: Message, extra: dict[str, Any]) -> Lines:
        self.turn, self.following = None, answer.pk
        return replay(answer, extra, self.owner.key)

    async def rate(self, content: dict[str, Any], request_id: str | None) -> None:
        """Rate one of the owner's answers, as the HTTP rating endpoint does."""
        fields = {k: v for k, v in content.items() if k not in ("type", "request_id")}
        raw = fields.pop("message_id", None)
        try:
            value, comment = read_rating(fields)
            try:
                message_id = uuid.UUID(str(raw))
            except ValueError:
                raise not_found() from None
            rating = await database.run(Rating.objects.rate, self.owner, message_id, value, comment)
        except RequestError as exc:
            await self.send_error(exc.code, exc.message, request_id)
            return
        await self.flowing.wait()
        extra = {} if request_id is None else {"request_id": request_id}
        self.send_event(RatedEvent(event="rated", rating=rating.as_json()), extra)

    async def run(self, lines: Lines) -> None:
        """Run one turn, queueing its lines as frames: it never waits for the client."""
        answered = False
        task = asyncio.current_task()
        try:
            async with aclosing(lines):  # closed however this ends, as its ``finally`` saves
                async for chunk in lines:
                    for line in chunk[:-1].split(b"\n"):  # one or more lines, a frame each
                        if _is_terminal(line):
                            answered = self.answered = True
                        self.outbox.put_nowait((line.decode(), answered))
                    if task is not None and task.cancelling() and not answered:
                        # Stopped, but the cancellation was swallowed on its way (Python
                        # 3.11's asyncio.wait_for, in redis-py, loses one that lands as its
                        # command completes): stop here, at the turn's next line.
                        raise asyncio.CancelledError
        finally:
            if not answered:  # stopped, or failed, before its terminal event
                self.busy = False

    async def deliver(self) -> None:
        """Send the queued frames in order, each within CHATPROXY_SEND_TIMEOUT seconds."""
        try:
            while True:
                text, last = await self.outbox.get()
                self.flowing.clear()
                async with asyncio.timeout(conf.CHATPROXY_SEND_TIMEOUT or None):
                    await self.send(text_data=text)
                self.flowing.set()
                if last:
                    self.busy = False
        except TimeoutError:  # the client stopped reading
            await self.drop(CLOSE_TOO_SLOW)
        except OSError:  # the server's word (ASGI) for a connection that is gone
            await self.drop(None)
        finally:
            self.flowing.set()  # frames still waiting to be answered are now ignored

    async def drop(self, code: int | None) -> None:
        """Give up on the client: stop its turn as a disconnect does, then close with ``code``
        (sent if it ever reads again; its disconnect then ends the consumer)."""
        self.closed = True
        await self.stop("client_disconnected")
        if code is not None:
            with contextlib.suppress(OSError):
                await self.close(code=code)

    async def stop(self, reason: str) -> None:
        """Stop the running turn (its upstream closed, its answer saved) and wait for it."""
        task, turn = self.task, self.turn
        if task is None or task.done():
            return
        # Once answered, the turn only tidies up (followers, turn_finished): let it. And only
        # the first stop cancels: a second cancel would cut short the turn's own cleanup.
        if not self.answered and not task.cancelling():
            if turn is not None:
                turn.interrupt_code = reason
            task.cancel()
        await asyncio.wait({task})

    async def cancel(self) -> None:
        """Stop the running turn on request; its terminal event is ``cancelled``."""
        task, turn = self.task, self.turn
        if task is None or task.done() or not self.busy or self.answered:
            return
        if turn is None:
            # Following a turn that runs elsewhere: stop that turn; its terminal event arrives
            # through the channel layer.
            if self.following is not None:
                await followers.cancel(self.following)
            return
        if turn.request.detach:  # it runs on its own: stop it there; its terminal event follows
            if turn.answer_id is not None:
                await followers.cancel(turn.answer_id)
            return
        await self.stop("cancelled")
        if not self.answered:  # else it finished just before the cancel landed
            event = error_event("cancelled", "The answer was stopped on request.", **turn.ids())
            self.send_event(event, turn.extra, last=True)

    async def send_error(
        self, code: str, message: str, request_id: str | None, retry_after: int | None = None
    ) -> None:
        """Answer a frame with an ``error`` frame, once no send is stuck: a client that does
        not read gets its frames read no further (TCP pushes back), not replies piling up."""
        await self.flowing.wait()
        extra: dict[str, Any] = {} if request_id is None else {"request_id": request_id}
        event = error_event(code, message)
        if retry_after is not None:
            event["retry_after"] = retry_after  # type: ignore[typeddict-unknown-key]
        self.send_event(event, extra)

    def send_event(self, event: Any, extra: dict[str, Any], last: bool = False) -> None:
        """Queue one event as a text frame: its NDJSON line without the newline."""
        self.outbox.put_nowait((Encoder(extra).event(event)[:-1].decode(), last))


# The frames about a conversation as a whole, each with the event that answers it.
MANAGING = {
    "conversations": "conversations",
    "conversation": "conversation",
    "rename": "renamed",
    "delete": "deleted",
    "switch": "switched",
    "branches": "branches",
}


def _managed(kind: str, owner: Owner, content: dict[str, Any]) -> dict[str, Any]:
    """Run a ``MANAGING`` frame's operation (``conversations``), on the database thread."""
    if kind == "conversations":
        query, page = content.get("q", ""), content.get("page", 1)
        whole = isinstance(page, int) and not isinstance(page, bool)
        if not isinstance(query, str) or not whole or page < 1:
            raise RequestError(
                "invalid_request", "q must be a string and page a whole number from 1."
            )
        return library.listing(owner, query.strip()[: library.MAX_QUERY], page)
    try:
        conversation_id = uuid.UUID(str(content.get("conversation_id")))
    except ValueError:
        raise library.not_found() from None
    if kind == "conversation":
        return library.transcript(owner, conversation_id)
    if kind == "rename":
        return library.rename(owner, conversation_id, content.get("title"))
    if kind == "delete":
        return library.delete(owner, conversation_id)
    if kind == "switch":
        return library.switch(owner, conversation_id, content.get("message_id"))
    return library.branches(owner, conversation_id)


def _extra(request_id: str | None) -> dict[str, Any]:
    return {} if request_id is None else {"request_id": request_id}


def _is_terminal(line: bytes) -> bool:
    return line.startswith((b'{"event":"completed"', b'{"event":"error"'))
