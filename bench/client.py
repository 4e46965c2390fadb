"""A low-overhead HTTP/1.1 load client: one ``asyncio.Protocol`` per keep-alive connection.

It runs on the same core as the fake upstream, so it stays cheap: no HTTP library, the response
is parsed incrementally in ``data_received`` (status line, headers, chunked or Content-Length
body), split into lines, and each line is handled as it completes. Timestamps are taken when the
bytes arrive, with ``time.perf_counter``.

Two kinds of body:

- ``"ndjson"``: chatproxy's stream. Each line is one event; ``answering`` contents are joined.
- ``"sse"``: the upstream's OpenAI stream. ``data: {chunk}`` lines; the deltas' contents are
  joined; ``data: [DONE]`` ends it. ``"openai"``: chatproxy's OpenAI-compatible stream, read the
  same way (the answer id from the chunks' ``chatcmpl-<id>``).
- ``"events"``: chatproxy's stream as server-sent events: each ``data:`` line is an NDJSON event.
- ``"ui"``: chatproxy's Vercel AI SDK UI message stream: ``text-delta`` parts are joined,
  ``finish`` ends it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import orjson

Mode = Literal["ndjson", "sse", "openai", "events", "ui"]


@dataclass(slots=True)
class TurnResult:
    """One request's outcome. Times are seconds from writing the request."""

    index: int
    status: int = 0  # HTTP status; 0 if no response head arrived
    ttfb: float | None = None  # first body line (chatproxy: `analyzing`; upstream: role chunk)
    ttft: float | None = None  # first content (chatproxy: `answering`; upstream: content delta)
    total: float | None = None  # the whole body
    parts: list[str] = field(default_factory=list)
    terminal: str = ""  # "completed" / "error" (chatproxy), "done" (upstream's [DONE])
    error: str = ""  # the error event's code, the 4xx body's code, or a client-side failure
    message_id: str = ""  # chatproxy's answer id, from the `analyzing` event
    started: float = 0.0

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def lines(self) -> int:
        """Content lines: `answering` lines, or upstream deltas with content."""
        return len(self.parts)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; ``request()`` sends one request and waits for its response."""

    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.keep_alive = True
        self._buf = bytearray()
        self._lines = bytearray()
        self._turn: TurnResult | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._state = "head"  # head / chunked / length / done
        self._remaining = 0  # body bytes left (Content-Length)

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self._buf += data
        try:
            self._parse(now)
        except Exception as exc:  # a malformed response: fail the turn, drop the connection
            self._fail(f"client: bad response: {exc!r}")
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail("client: connection lost")

    # --- API ---

    async def request(self, data: bytes, turn: TurnResult) -> None:
        assert self.transport is not None
        if self.lost:
            raise ConnectionError("connection lost")
        self._turn, self._state = turn, "head"
        self._lines.clear()
        self._waiter = asyncio.get_running_loop().create_future()
        turn.started = time.perf_counter()
        self.transport.write(data)
        try:
            await self._waiter
        finally:
            self._turn = self._waiter = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # --- parsing ---

    def _fail(self, message: str) -> None:
        if self._turn is not None and not self._turn.error:
            self._turn.error = message
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _parse(self, now: float) -> None:
        buf, pos = self._buf, 0
        while self._turn is not None and self._state != "done":
            if self._state == "head":
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    break
                self._head(bytes(buf[pos:end]))
                pos = end + 4
            elif self._state == "length":
                take = min(self._remaining, len(buf) - pos)
                self._body(bytes(buf[pos : pos + take]), now)
                pos += take
                self._remaining -= take
                if self._remaining:
                    break
                self._end(now)
            else:  # chunked: "<hex size>\r\n<data>\r\n", ending with "0\r\n\r\n"
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
                if len(buf) < eol + 2 + size + 2:
                    break
                if size:
                    self._body(bytes(buf[eol + 2 : eol + 2 + size]), now)
                pos = eol + 2 + size + 2
                if not size:
                    self._end(now)
        del buf[:pos]

    def _head(self, head: bytes) -> None:
        assert self._turn is not None
        lines = head.split(b"\r\n")
        self._turn.status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        self.keep_alive = headers.get(b"connection") != b"close"
        if b"chunked" in headers.get(b"transfer-encoding", b""):
            self._state = "chunked"
        else:
            self._state, self._remaining = "length", int(headers.get(b"content-length", b"0"))

    def _body(self, data: bytes, now: float) -> None:
        self._lines += data
        if b"\n" not in data:
            return
        *complete, rest = bytes(self._lines).split(b"\n")
        self._lines[:] = rest
        handle = self._handler()
        for line in complete:
            handle(line, now)

    def _end(self, now: float) -> None:
        turn = self._turn
        assert turn is not None and self._waiter is not None
        if self._lines:  # a body without a final newline: a 4xx JSON error
            leftover, self._lines = bytes(self._lines), bytearray()
            if turn.status == 200:
                self._handler()(leftover, now)
            elif not turn.error:
                turn.error = _error_code(leftover)
        if turn.status != 200 and not turn.error:
            turn.error = f"http {turn.status}"
        turn.total = now - turn.started
        self._state = "done"
        if not self._waiter.done():
            self._waiter.set_result(None)
        if not self.keep_alive:
            self.close()

    def _handler(self) -> Callable[[bytes, float], None]:
        return {
            "ndjson": self._ndjson_line,
            "sse": self._sse_line,
            "openai": self._sse_line,
            "events": self._event_line,
            "ui": self._ui_line,
        }[self.mode]

    def _event_line(self, line: bytes, now: float) -> None:
        if line.startswith(b"data: "):
            self._ndjson_line(line[6:], now)

    def _ui_line(self, line: bytes, now: float) -> None:
        turn = self._turn
        assert turn is not None
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            return
        if turn.ttfb is None:
            turn.ttfb = now - turn.started
        part = orjson.loads(line[6:])
        kind = part["type"]
        if kind == "text-delta":
            if turn.ttft is None:
                turn.ttft = now - turn.started
            turn.parts.append(part["delta"])
        elif kind == "start":
            turn.message_id = part.get("messageId", "")
        elif kind == "finish":
            turn.terminal = "completed"
        elif kind in ("error", "abort"):
            turn.terminal, turn.error = "error", str(part.get("errorText", kind))

    def _ndjson_line(self, line: bytes, now: float) -> None:
        turn = self._turn
        assert turn is not None
        if turn.ttfb is None:
            turn.ttfb = now - turn.started
        event = orjson.loads(line)
        kind = event.get("event")
        if kind == "analyzing":
            turn.message_id = event.get("message_id", "")
        elif kind == "answering":
            if turn.ttft is None:
                turn.ttft = now - turn.started
            turn.parts.append(event["content"])
        elif kind in ("completed", "error"):
            if turn.terminal:
                turn.error = turn.error or "client: two terminal events"
            turn.terminal = kind
            if kind == "error":
                turn.error = str(event.get("error", {}).get("code", "error"))

    def _sse_line(self, line: bytes, now: float) -> None:
        turn = self._turn
        assert turn is not None
        if not line.startswith(b"data: "):
            return
        if turn.ttfb is None:
            turn.ttfb = now - turn.started
        payload = line[6:]
        if payload == b"[DONE]":
            turn.terminal = "done"
            return
        chunk = orjson.loads(payload)
        if self.mode == "openai" and not turn.message_id:
            turn.message_id = str(chunk.get("id", "")).removeprefix("chatcmpl-")
        if "error" in chunk:
            turn.terminal, turn.error = "error", "upstream in-band error"
            return
        choices = chunk.get("choices")
        if choices and (content := choices[0]["delta"].get("content")):
            if turn.ttft is None:
                turn.ttft = now - turn.started
            turn.parts.append(content)


def _error_code(body: bytes) -> str:
    try:
        data: Any = orjson.loads(body)
        return str(data["error"]["code"])
    except Exception:
        return body[:80].decode("utf-8", "replace")


def http_request(
    port: int, path: str, body: bytes, headers: dict[str, str], host: str = "127.0.0.1"
) -> bytes:
    """Return the bytes of one keep-alive POST with a JSON body."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def _worker(
    port: int,
    request: bytes | Callable[[int], bytes],
    mode: Mode,
    take: Callable[[], int | None],
    results: list[TurnResult],
    turn_timeout: float,
    host: str,
) -> None:
    loop = asyncio.get_running_loop()
    conn: _Connection | None = None
    try:
        while (index := take()) is not None:
            turn = TurnResult(index)
            try:
                async with asyncio.timeout(turn_timeout):
                    if conn is None or conn.lost or not conn.keep_alive:
                        if conn is not None:
                            conn.close()
                        _, conn = await loop.create_connection(
                            lambda: _Connection(mode), host, port
                        )
                    await conn.request(request(index) if callable(request) else request, turn)
            except (OSError, TimeoutError) as exc:
                turn.error = turn.error or f"client: {type(exc).__name__}: {exc}"
            if turn.error and conn is not None:  # start the next turn on a fresh connection
                conn.close()
                conn = None
            results.append(turn)
    finally:
        if conn is not None:
            conn.close()


async def run_load(
    port: int,
    request: bytes | Callable[[int], bytes],
    mode: Mode,
    *,
    concurrency: int,
    turns: int,
    turn_timeout: float = 60.0,
    host: str = "127.0.0.1",
) -> tuple[list[TurnResult], float]:
    """Send ``turns`` copies of ``request`` (or ``request(i)`` for turn i) over ``concurrency``
    connections, each keeping one turn in flight. Return the results (in completion order) and
    the wall time in seconds."""
    counter = iter(range(turns))
    results: list[TurnResult] = []

    def take() -> int | None:
        return next(counter, None)

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, turns)):
            group.create_task(_worker(port, request, mode, take, results, turn_timeout, host))
    return results, time.perf_counter() - started
