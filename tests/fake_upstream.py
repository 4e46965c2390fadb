"""Fake OpenAI-compatible chat-completions upstream: a real HTTP/1.1 server on raw asyncio.

No framework, so we control the wire: keep-alive, chunked SSE flushed per event, abrupt drops,
stalls, and noticing a client that hangs up mid-stream. Tests run it in a daemon thread
(start/stop); the benchmark runs it as a process (Django-free to stay light):

    python -m tests.fake_upstream --port 9100 [--tokens 200] [--delay 0.0] [--token-text "tok "]
                                  [--reasoning 0] [--tool-calls 0]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import gzip
import itertools
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

try:
    import orjson

    _dumps: Callable[[Any], bytes] = orjson.dumps
    _loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - orjson is optional
    import json

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    _loads = json.loads


@dataclass
class Reply:
    """What the fake answers to one chat request (see _Exchange.chat for the wire)."""

    tokens: list[str] = field(default_factory=lambda: ["Hel", "lo", " there", "."])
    status: int = 200  # non-200: JSON error body with Content-Length, no SSE
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # before each content token
    first_delay: float = 0.0  # extra wait before the first content token (after the role chunk)
    burst: bool = False  # every token and the end in one write: deltas that arrive together
    gzip: bool = False  # with burst: the SSE body gzip-compressed (Content-Encoding: gzip)
    finish_reason: str = "stop"
    usage: bool = True  # send the usage chunk if the request asked for include_usage
    # None | "drop" | "stall" | "stall_head" | "malformed_json" | "malformed_sse" | "inband_error"
    fail: str | None = None
    fail_after: int = 0  # content tokens sent before the failure (clamped to len(tokens))
    error_message: str = "upstream exploded"  # tests assert this never leaks to end users
    # Sent as delta.reasoning_content before the tokens, one chunk each.
    reasoning: list[str] = field(default_factory=list)
    # Sent after the tokens as delta.tool_calls, OpenAI's way: the id and name first, then
    # the arguments in pieces of ``argument_piece`` characters; finish_reason "tool_calls".
    tool_calls: list[dict[str, str]] = field(default_factory=list)
    argument_piece: int = 8
    # A recorded stream (tests/fixtures/*.sse) sent as it is, each piece of it cut at ``cuts``
    # in a chunk of its own (flushed apart, so the client likely reads them apart).
    raw: bytes | None = None
    cuts: list[int] = field(default_factory=list)
    content_type: str = "text/event-stream"
    # A server that ignores stream: true: this JSON body (or the default chat.completion).
    body: Any = None
    ignore_stream: bool = False

    def deltas(self) -> int:
        """How many chunks of the stream carry a delta: each reasoning piece, content token
        and tool-call piece (the role, finish and usage chunks not counted)."""
        return len(self.reasoning) + len(self.tokens) + len(_tool_call_deltas(self))


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case keys
    json: Any
    closed_by_client: threading.Event = field(default_factory=threading.Event)
    completed: threading.Event = field(default_factory=threading.Event)

    async def wait_closed_by_client(self, timeout: float = 5.0) -> bool:
        # threading.Event: the server runs on its own loop in another thread than the test.
        return await asyncio.to_thread(self.closed_by_client.wait, timeout)


def _texts(body: dict[str, Any]) -> list[str]:
    """Text of each message; content may be a string or a list of parts (multimodal form)."""
    out = []
    for m in body.get("messages") or []:
        c = m.get("content") if isinstance(m, dict) else None
        parts = c if isinstance(c, list) else [{"text": c if isinstance(c, str) else ""}]
        out.append(" ".join(str(p.get("text", "")) for p in parts if isinstance(p, dict)))
    return out


def echo_reply(body: dict[str, Any]) -> Reply:
    """Deterministic default: "Echo: <last message>" cut into 3-character tokens."""
    text = "Echo: " + (_texts(body) or [""])[-1]
    return Reply(tokens=[text[i : i + 3] for i in range(0, len(text), 3)])


def prompt_tokens(body: dict[str, Any]) -> int:
    """Deterministic stand-in for a tokenizer: whitespace-separated words in all messages."""
    return sum(len(t.split()) for t in _texts(body))


def sse_chunk(payload: bytes | str | dict[str, Any]) -> bytes:
    """One SSE event `data: <payload>\\n\\n`; dicts are JSON-encoded, bytes sent verbatim."""
    if isinstance(payload, dict):
        payload = _dumps(payload)
    return b"data: " + (payload.encode() if isinstance(payload, str) else payload) + b"\n\n"


def http_chunk(data: bytes) -> bytes:
    """One Transfer-Encoding: chunked frame."""
    return b"%x\r\n%b\r\n" % (len(data), data)


_END = b"0\r\n\r\n"  # the terminating zero-length chunk
_DONE = http_chunk(sse_chunk(b"[DONE]")) + _END
_CHUNK_HEAD = (
    b'{"id":"chatcmpl-%d","object":"chat.completion.chunk","created":%d,"model":%b,'
    b'"system_fingerprint":null,"choices":['
)
_CHOICE = b'%b{"index":0,"delta":%b,"logprobs":null,"finish_reason":%b}]%b'
_PHRASES = {s.value: s.phrase for s in HTTPStatus}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}


def _error_body(status: int, message: str) -> dict[str, Any]:
    kind = "rate_limit_error" if status == 429 else _ERROR_TYPES.get(status, "server_error")
    code = "rate_limit_exceeded" if status == 429 else None
    return {"error": {"message": message, "type": kind, "code": code}}


@functools.lru_cache(maxsize=8192)
def _content_delta(token: str) -> bytes:
    # Benchmark streams repeat the same tokens thousands of times: JSON-encode each once.
    return b'{"content":' + _dumps(token) + b"}"


@functools.lru_cache(maxsize=8192)
def _reasoning_delta(piece: str) -> bytes:
    return b'{"reasoning_content":' + _dumps(piece) + b"}"


def _tool_call_deltas(reply: Reply) -> list[bytes]:
    deltas = []
    for index, call in enumerate(reply.tool_calls):
        head = {"index": index, "id": call["id"], "type": "function"}
        deltas.append(
            _dumps({"tool_calls": [{**head, "function": {"name": call["name"], "arguments": ""}}]})
        )
        arguments, step = call["arguments"], reply.argument_piece
        for start in range(0, len(arguments), step):
            piece = {"index": index, "function": {"arguments": arguments[start : start + step]}}
            deltas.append(_dumps({"tool_calls": [piece]}))
    return deltas


class _Conn:
    """Buffered request reader. Own buffer rather than StreamReader.readuntil because the
    hang-up watcher also reads the socket while a reply is sent, and whatever it gets must be
    kept for the next keep-alive request."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader, self.buf = reader, bytearray()

    async def _fill(self) -> None:
        data = await self.reader.read(65536)
        if not data:
            raise EOFError
        self.buf += data

    async def _until(self, sep: bytes) -> bytes:
        while (i := self.buf.find(sep)) < 0:
            if len(self.buf) > 65536:
                raise ValueError("header section too large")
            await self._fill()
        out = bytes(self.buf[:i])
        del self.buf[: i + len(sep)]
        return out

    async def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def read_request(self) -> tuple[str, str, dict[str, str], bytes] | None:
        """None on a clean EOF between requests; ValueError if malformed."""
        try:
            head = await self._until(b"\r\n\r\n")
        except EOFError:
            if self.buf.strip():
                raise ValueError("truncated request") from None
            return None
        lines = head.lstrip(b"\r\n").decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")  # ValueError unless exactly 3 parts
        if not version.startswith("HTTP/1."):
            raise ValueError("not HTTP/1.x")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise ValueError("malformed header line")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            chunks = []
            while size := int((await self._until(b"\r\n")).split(b";")[0], 16):
                chunks.append(await self._exact(size))
                await self._until(b"\r\n")
            while await self._until(b"\r\n"):  # trailers, up to the empty line
                pass
            return method, target, headers, b"".join(chunks)
        length = int(headers.get("content-length", "0"))
        if length < 0:
            raise ValueError("negative Content-Length")
        return method, target, headers, await self._exact(length)

    async def watch_hangup(self) -> None:
        """Returns once the client closed or reset the connection; stashes any early bytes."""
        with contextlib.suppress(EOFError, OSError):
            while True:
                await self._fill()


@dataclass
class _Exchange:
    """Sends one response on a connection; methods return whether to keep the connection."""

    writer: asyncio.StreamWriter
    rec: RecordedRequest
    n: int
    close: bool  # the client sent Connection: close

    def _head(self, status: int, headers: dict[str, str]) -> bytes:
        phrase = _PHRASES.get(status, "Unknown")
        lines = [f"HTTP/1.1 {status} {phrase}"]
        # A Reply's own x-request-id (say, a hostile one) replaces the default.
        headers = {"x-request-id": f"req_{self.n}", **headers}
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines += ["connection: close"] if self.close else []
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _finish(self, data: bytes) -> bool:
        # Set *before* the last write so a test that has read the whole body always sees it
        # set (no race with this thread); _respond clears it again if the write fails.
        self.rec.completed.set()
        self.writer.write(data)
        await self.writer.drain()
        return not self.close

    async def json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> bool:
        data = _dumps(payload)
        hdrs = {"content-type": "application/json", "content-length": str(len(data))}
        return await self._finish(self._head(status, {**hdrs, **(headers or {})}) + data)

    async def _fail_stop(self, fail: str | None) -> None:
        """The failures that end the reply: "drop" aborts (no terminating chunk), "stall"
        hangs until cancelled by the hang-up watcher or by stop()."""
        if fail == "drop":
            self.writer.transport.abort()
            raise EOFError
        if fail == "stall":
            await asyncio.get_running_loop().create_future()

    async def _raw(self, reply: Reply) -> bool:
        assert reply.raw is not None
        hdrs = {"content-type": reply.content_type, "transfer-encoding": "chunked"}
        self.writer.write(self._head(200, {**hdrs, **reply.headers}))
        bounds = [0, *sorted(reply.cuts), len(reply.raw)]
        for start, end in zip(bounds, bounds[1:], strict=False):
            if end > start:
                self.writer.write(http_chunk(reply.raw[start:end]))
                await self.writer.drain()
        return await self._finish(_END)

    async def chat(self, body: dict[str, Any], reply: Reply) -> bool:
        if reply.fail == "stall_head":  # never a status line
            await asyncio.get_running_loop().create_future()
        if reply.status != 200:
            err = _error_body(reply.status, reply.error_message)
            return await self.json(reply.status, err, reply.headers)
        tokens, model = reply.tokens, body.get("model")
        if reply.raw is not None:
            return await self._raw(reply)
        if reply.body is not None:
            return await self.json(200, reply.body, reply.headers)
        if not body.get("stream") or reply.ignore_stream:
            await self._fail_stop(reply.fail)
            p, c = prompt_tokens(body), len(tokens)
            message = {"role": "assistant", "content": "".join(tokens), "refusal": None}
            choice = {"index": 0, "message": message, "logprobs": None}
            return await self.json(200, {
                "id": f"chatcmpl-{self.n}", "object": "chat.completion", "model": model,
                "created": int(time.time()), "system_fingerprint": None,
                "choices": [{**choice, "finish_reason": reply.finish_reason}],
                "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
            }, reply.headers)  # fmt: skip

        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        head = _CHUNK_HEAD % (self.n, int(time.time()), _dumps(model))  # shared by all chunks
        tail = b',"usage":null}' if include_usage else b"}"

        def event(delta: bytes, finish: bytes = b"null") -> bytes:
            return sse_chunk(_CHOICE % (head, delta, finish, tail))

        def chunk(delta: bytes, finish: bytes = b"null") -> bytes:
            return http_chunk(event(delta, finish))

        role = b'{"role":"assistant","content":""}'
        hdrs = {"content-type": "text/event-stream", "cache-control": "no-cache"}
        hdrs |= {"transfer-encoding": "chunked", **reply.headers}
        if reply.gzip:  # one compressed body: every event, the end and [DONE]
            sse = b"".join(event(delta) for delta in [role, *map(_content_delta, tokens)])
            sse += event(b"{}", _dumps(reply.finish_reason)) + sse_chunk(b"[DONE]")
            hdrs["content-encoding"] = "gzip"
            return await self._finish(self._head(200, hdrs) + http_chunk(gzip.compress(sse)) + _END)
        self.writer.write(self._head(200, hdrs) + chunk(role))
        await self.writer.drain()
        for piece in reply.reasoning:
            if reply.delay:
                await asyncio.sleep(reply.delay)
            self.writer.write(chunk(_reasoning_delta(piece)))
            await self.writer.drain()
        finish = reply.finish_reason
        if reply.tool_calls and finish == "stop":
            finish = "tool_calls"
        end = b"".join(chunk(delta) for delta in _tool_call_deltas(reply))
        end += chunk(b"{}", _dumps(finish))
        if include_usage and reply.usage:
            p, c = prompt_tokens(body), len(tokens)
            usage = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
            end += http_chunk(sse_chunk(head + b'],"usage":' + _dumps(usage) + b"}"))
        if reply.burst:
            deltas = b"".join(chunk(_content_delta(token)) for token in tokens)
            return await self._finish(deltas + end + _DONE)
        fail_at = min(reply.fail_after, len(tokens)) if reply.fail else -1
        for i in range(len(tokens) + 1):
            if i == fail_at:
                await self._fail_stop(reply.fail)
                if reply.fail == "inband_error":  # like OpenAI: an error event, then body ends
                    err = {"message": reply.error_message, "type": "server_error", "code": None}
                    return await self._finish(http_chunk(sse_chunk({"error": err})) + _END)
                if reply.fail == "malformed_json":  # then carry on as if nothing happened
                    self.writer.write(http_chunk(b"data: {not json\n\n"))
                elif reply.fail == "malformed_sse":
                    self.writer.write(http_chunk(b"data: \xff\xfe garbage\n\n"))
            if i == len(tokens):
                break
            if i == 0 and reply.first_delay:
                await asyncio.sleep(reply.first_delay)
            if reply.delay:
                await asyncio.sleep(reply.delay)
            self.writer.write(chunk(_content_delta(tokens[i])))
            await self.writer.drain()  # flush per token so the client sees them one by one
        return await self._finish(end + _DONE)


async def _respond(conn: _Conn, rec: RecordedRequest, sending: Coroutine[Any, Any, bool]) -> bool:
    """Runs the sender against a hang-up watcher, so a client leaving mid-reply (even during a
    delay or stall) is noticed at once. Returns whether to keep the connection."""
    sender = asyncio.ensure_future(sending)
    watcher = asyncio.ensure_future(conn.watch_hangup())
    try:
        await asyncio.wait((sender, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        sender.cancel()
        watcher.cancel()
        # Let both really finish: a cancelled reader.read() holds the StreamReader until its
        # task resumes, and the next keep-alive request needs it.
        await asyncio.wait((sender, watcher))
    if not sender.cancelled():  # else the watcher saw the client leave first
        if (exc := sender.exception()) is None:
            return sender.result()
        if isinstance(exc, EOFError):  # our own "drop"
            return False
        if not isinstance(exc, OSError):  # a write hitting a closed socket is ConnectionError
            raise exc
    rec.completed.clear()  # before closed_by_client, which is what tests wait on
    rec.closed_by_client.set()
    return False


class FakeUpstream:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self._port = host, port
        self.default_reply: Callable[[dict[str, Any]], Reply] | None = echo_reply
        self.requests: list[RecordedRequest] = []
        self.record_requests = True  # the long-running benchmark turns this off
        self._queue: collections.deque[Reply] = collections.deque()
        self._cond = threading.Condition()  # guards _queue/requests, wakes wait_for_request
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self._port}/v1"

    def enqueue(self, *replies: Reply) -> None:
        with self._cond:
            self._queue.extend(replies)

    def reset(self) -> None:
        with self._cond:
            self._queue.clear()
            self.requests.clear()
            self.default_reply = echo_reply

    async def wait_for_request(self, n: int = 1, timeout: float = 5.0) -> RecordedRequest:
        def wait() -> bool:
            with self._cond:
                return self._cond.wait_for(lambda: len(self.requests) >= n, timeout)

        if not await asyncio.to_thread(wait):
            raise TimeoutError(f"{len(self.requests)} of {n} requests arrived in {timeout}s")
        return self.requests[n - 1]

    def start(self) -> None:
        loop, ready, errors = asyncio.new_event_loop(), threading.Event(), []

        def run() -> None:
            try:
                loop.run_until_complete(self._listen())
            except BaseException as exc:  # e.g. port in use: re-raised in start()
                errors.append(exc)
            ready.set()
            if not errors:
                loop.run_forever()
            loop.close()

        self._loop, self._thread = loop, threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait()
        if errors:
            raise errors[0]

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._loop = self._thread = None

    async def _listen(self) -> None:
        # Big backlog: the benchmark opens ~1000 connections at once.
        self._server = await asyncio.start_server(self._handle, self.host, self._port, backlog=4096)
        self._port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()  # their finally blocks close the connections
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _pick_reply(self, rec: RecordedRequest) -> Reply:
        with self._cond:
            if self._queue:
                return self._queue.popleft()
            factory = self.default_reply
        return factory(rec.json) if factory is not None else Reply()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = _Conn(reader)
        try:
            while True:  # one iteration per request on this keep-alive connection
                try:
                    if (req := await conn.read_request()) is None:
                        return
                    method, path, headers, raw = req
                    body = _loads(raw) if raw else None
                except ValueError as exc:  # malformed HTTP or JSON: 400 and close
                    bad = _Exchange(writer, RecordedRequest("", "", {}, None), 0, close=True)
                    await bad.json(400, _error_body(400, f"bad request: {exc}"))
                    return
                rec = RecordedRequest(method, path, headers, body)
                if self.record_requests:
                    with self._cond:
                        self.requests.append(rec)
                        self._cond.notify_all()
                close = headers.get("connection", "").lower() == "close"
                ex = _Exchange(writer, rec, next(self._ids), close)
                sending: Coroutine[Any, Any, bool]
                if method != "POST" or not path.split("?")[0].endswith("/chat/completions"):
                    sending = ex.json(404, _error_body(404, f"no route for {method} {path}"))
                elif not isinstance(body, dict):
                    sending = ex.json(400, _error_body(400, "expected a JSON object body"))
                else:
                    sending = ex.chat(body, self._pick_reply(rec))
                if not await _respond(conn, rec, sending) or close:
                    return
        except (EOFError, OSError):  # client vanished mid-request
            return
        except asyncio.CancelledError:
            # stop(). Swallowed on purpose: 3.11's start_server callback calls
            # task.exception() on this task, which raises (and logs) if it ends cancelled.
            return
        finally:
            self._tasks.discard(task)
            writer.close()


@functools.lru_cache(maxsize=64)
def _bench_tokens(count: int, text: str | None) -> list[str]:
    return [text if text is not None else f"t{i} " for i in range(count)]


class _BenchUpstream(FakeUpstream):
    """Serves forever; per-request overrides via `x-fake-tokens` / `x-fake-delay` headers."""

    def __init__(
        self,
        host: str,
        port: int,
        tokens: int,
        delay: float,
        text: str | None,
        reasoning: int = 0,
        tool_calls: int = 0,
    ) -> None:
        super().__init__(host, port)
        self.record_requests = False  # would grow without bound
        self.tokens, self.delay, self.text = tokens, delay, text
        self.reasoning, self.tool_calls = reasoning, tool_calls

    def _pick_reply(self, rec: RecordedRequest) -> Reply:
        count = int(rec.headers.get("x-fake-tokens", self.tokens))
        delay = float(rec.headers.get("x-fake-delay", self.delay))
        return bench_reply(count, delay, self.text, self.reasoning, self.tool_calls)


@functools.lru_cache(maxsize=64)
def bench_reply(
    tokens: int, delay: float, text: str | None = None, reasoning: int = 0, tool_calls: int = 0
) -> Reply:
    """The benchmark's answer: ``reasoning`` pieces, ``tokens`` tokens, then ``tool_calls``
    calls of ``lookup``."""
    return Reply(
        tokens=_bench_tokens(tokens, text),
        delay=delay,
        reasoning=[f"r{i} " for i in range(reasoning)],
        tool_calls=[
            {"id": f"call_{i}", "name": "lookup", "arguments": f'{{"query": "item {i}", "n": 3}}'}
            for i in range(tool_calls)
        ],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI chat-completions upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--token-text", default=None, help='every token is this (default "t<i> ")')
    parser.add_argument("--reasoning", type=int, default=0, help="reasoning tokens first")
    parser.add_argument("--tool-calls", type=int, default=0, help="tool calls after the answer")
    args = parser.parse_args(argv)
    upstream = _BenchUpstream(
        args.host,
        args.port,
        args.tokens,
        args.delay,
        args.token_text,
        args.reasoning,
        args.tool_calls,
    )

    async def serve() -> None:
        await upstream._listen()
        print(f"listening on {upstream.port}", flush=True)
        await asyncio.get_running_loop().create_future()  # forever

    try:  # uvloop, when installed, cuts per-chunk overhead: the benchmark runs on one core
        import uvloop

        run: Callable[[Coroutine[Any, Any, None]], None] = uvloop.run
    except ImportError:
        run = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        run(serve())


if __name__ == "__main__":
    main()
