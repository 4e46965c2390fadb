"""The WebSocket transport: the same turns and events as HTTP, many turns per socket, cancel.

Each turn runs in a task the consumer owns, so a ``cancel`` frame or a disconnect is handled at
once: Channels dispatches one message at a time, and a turn run inside ``receive_json`` would
hold every later frame until its answer ended.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from channels.generic.websocket import AsyncJsonWebsocketConsumer

from . import database, followers
from .auth import user_from_bearer
from .conf import conf
from .events import Encoder, error_event
from .exceptions import RequestError
from .interception import InterceptorSpec
from .models import DuplicateTurnError, Message, Owner
from .payload import decode_json, validate_request
from .pipeline import prepare_turn, run_turn
from .resume import latest_answer, replay
from .turns import Turn

CLOSE_UNAUTHENTICATED = 4401
FRAME_FIELDS = ("type", "request_id", "idempotency_key")
Lines = AsyncIterator[bytes]
BUSY = "A turn is still running on this socket: wait for its last event, or cancel it."


class ChatConsumer(AsyncJsonWebsocketConsumer):  # type: ignore[misc]
    owner: Owner
    user: Any = None
    interceptors: Sequence[InterceptorSpec] | None = None  # None: CHATPROXY_INTERCEPTORS
    task: asyncio.Task[None] | None = None
    turn: Turn | None = None
    following: uuid.UUID | None = None  # the answer a resumed socket follows
    busy = False  # a turn runs and its terminal event has not been sent yet
    closed = False  # the server closed the socket: later frames are ignored

    async def connect(self) -> None:
        """Called when a client opens the socket: accept it only for someone allowed to chat."""
        self.user = user = self.scope.get("user")
        await self.accept()
        headers = dict(self.scope.get("headers", []))
        try:
            authorization = headers.get(b"authorization", b"").decode("latin-1")
            bearer = await database.run(user_from_bearer, authorization)
        except RequestError:  # a wrong key is refused, even where anonymous chat is allowed
            await self.refuse()
            return
        if bearer is not None:
            self.user, self.owner = bearer, Owner(user_id=bearer.pk)
        elif user is not None and user.is_authenticated:
            self.owner = Owner(user_id=user.pk)
        elif conf.CHATPROXY_ALLOW_ANONYMOUS:
            # A socket cannot set a cookie, so an anonymous socket owns its conversations
            # under a key of its own unless the browser already has a session.
            session = self.scope.get("session")
            key = getattr(session, "session_key", None) or f"ws-{uuid.uuid4().hex}"
            self.owner = Owner(session_key=key)
        else:
            await self.refuse()

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
            await self.cancel_turn("cancelled")
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
            self.busy = True
            self.task = asyncio.create_task(self.relay(lines))
        else:
            await self.send_error(
                "invalid_request",
                'Each frame needs "type": "chat" (with messages), "resume" or "cancel".',
                request_id,
            )

    async def disconnect(self, code: int) -> None:
        """Called when the socket closes: stop the running turn and let it save."""
        await self.cancel_turn("client_disconnected")

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
            self.turn = await prepare_turn(
                lambda: (owner, user),
                request,
                extra=extra,
                interceptors=self.interceptors,
                idempotency_key=key,
            )
        except DuplicateTurnError as duplicate:  # the key's turn ran or runs: follow it
            return self._follow(duplicate.answer, extra)
        self.following = None
        return run_turn(self.turn)

    async def resume(self, content: dict[str, Any], extra: dict[str, Any]) -> Lines:
        raw = content.get("conversation_id")
        try:
            conversation_id = uuid.UUID(str(raw))
            answer = await latest_answer(self.owner, conversation_id)
        except ValueError:
            answer = None
        if answer is None:
            raise RequestError(
                "conversation_not_found", "No conversation with that id belongs to you.", status=404
            )
        return self._follow(answer, extra)

    def _follow(self, answer: Message, extra: dict[str, Any]) -> Lines:
        self.turn, self.following = None, answer.pk
        return replay(answer, extra)

    async def relay(self, lines: Lines) -> None:
        try:
            async for chunk in lines:
                for line in chunk[:-1].split(b"\n"):  # one or more lines, a frame each
                    if _is_terminal(line):
                        # The turn is over for the client once it has the terminal line; the
                        # next chat frame must not be refused while this task tidies up.
                        self.busy = False
                    await self.send(text_data=line.decode())
        finally:
            self.busy = False

    async def cancel_turn(self, reason: str) -> None:
        task, turn = self.task, self.turn
        if task is None or task.done() or (reason == "cancelled" and not self.busy):
            return
        if turn is None:
            # Following a turn that runs elsewhere: a cancel stops that turn; its terminal
            # event arrives through the channel layer. A disconnect just stops following.
            if reason == "cancelled" and self.following is not None:
                await followers.cancel(self.following)
            else:
                task.cancel()
                await asyncio.wait({task})
            return
        turn.interrupt_code = reason
        task.cancel()
        await asyncio.wait({task})
        if reason == "cancelled":
            ids = turn.ids()
            event = error_event("cancelled", "The answer was stopped on request.", **ids)
            await self.send_event(event, turn.extra)

    async def send_error(
        self, code: str, message: str, request_id: str | None, retry_after: int | None = None
    ) -> None:
        extra: dict[str, Any] = {} if request_id is None else {"request_id": request_id}
        event = error_event(code, message)
        if retry_after is not None:
            event["retry_after"] = retry_after  # type: ignore[typeddict-unknown-key]
        await self.send_event(event, extra)

    async def send_event(self, event: Any, extra: dict[str, Any]) -> None:
        """Send one event as a text frame: its NDJSON line without the newline."""
        await self.send(text_data=Encoder(extra).event(event)[:-1].decode())


def _is_terminal(line: bytes) -> bool:
    return line.startswith((b'{"event":"completed"', b'{"event":"error"'))
