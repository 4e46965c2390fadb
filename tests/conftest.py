"""Shared fixtures: a real fake upstream over loopback, users, and NDJSON helpers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import os
import re
import socket
import struct
import subprocess
import sys
import termios
import threading
import unittest.mock
import weakref
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import connections
from django.db.backends.signals import connection_created
from django.db.backends.utils import CursorWrapper
from django.test import AsyncClient

from chatproxy import followers
from chatproxy.database import THREAD_PREFIX
from chatproxy.interception import Interceptor
from chatproxy.signals import turn_finished
from chatproxy.upstream import close_clients
from tests.fake_upstream import FakeUpstream, Reply
from tests.server import ServerProcess

# The upstream API key of tests/settings.py: no client, log or saved row may ever show it.
KEY = "sk-test-NEVER-LEAK-0123456789abcdef"

# Every way the upstream fails: its reply, the error code the client gets, the text saved.
FAILURES = [
    (Reply(status=429, headers={"Retry-After": "0"}), "upstream_rate_limited", ""),
    (Reply(status=500), "upstream_error", ""),
    (Reply(status=503), "upstream_error", ""),
    (Reply(status=401), "upstream_auth_failed", ""),
    (Reply(status=400), "upstream_rejected", ""),
    (Reply(tokens=["a", "b", "c"], fail="drop", fail_after=2), "upstream_disconnected", "ab"),
    (Reply(tokens=["a", "b", "c"], fail="inband_error", fail_after=1), "upstream_error", "a"),
    (
        Reply(tokens=["a", "b", "c"], fail="malformed_json", fail_after=1),
        "upstream_bad_response",
        "a",
    ),
    (
        Reply(tokens=["a", "b", "c"], fail="malformed_sse", fail_after=1),
        "upstream_bad_response",
        "a",
    ),
]

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parent.parent


def run_demo_project(*args: str, **environ: str) -> subprocess.CompletedProcess[str]:
    """Run ``python <args>`` in the repository's root with the demo project's settings (and
    ``environ`` on top of this process's environment), as a server or a deploy would."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings", **environ}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def fixture(name: str) -> bytes:
    """A recorded upstream stream from tests/fixtures/, its bytes as they are."""
    return (FIXTURES / name).read_bytes()


@pytest.fixture(autouse=True)
async def close_thread_connections() -> AsyncIterator[None]:
    """Close the connection of asgiref's shared sync thread, where async ORM calls made outside
    a request run (left open it would keep PostgreSQL from dropping the test database), and
    this test's event loop's upstream clients."""
    yield
    await sync_to_async(connections.close_all)()
    await close_clients()


@pytest.fixture(scope="session")
def upstream_server() -> Iterator[FakeUpstream]:
    server = FakeUpstream()
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def upstream(upstream_server: FakeUpstream, settings: Any) -> Iterator[FakeUpstream]:
    """The fake upstream, emptied, with chatproxy pointed at it."""
    upstream_server.reset()
    settings.CHATPROXY_BASE_URL = upstream_server.base_url
    yield upstream_server
    upstream_server.reset()


@pytest.fixture(scope="session")
def backup_server() -> Iterator[FakeUpstream]:
    """A second fake upstream, in a thread of its own: another provider to fail over to."""
    server = FakeUpstream()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def backup(backup_server: FakeUpstream) -> Iterator[FakeUpstream]:
    """The second fake upstream, emptied (the settings name it only where a test does)."""
    backup_server.reset()
    yield backup_server
    backup_server.reset()


@pytest.fixture
def user(django_user_model: Any) -> Any:
    return django_user_model.objects.create_user("alice", password="pw")


@pytest.fixture
def other_user(django_user_model: Any) -> Any:
    return django_user_model.objects.create_user("bob", password="pw")


def staff_with(username: str, codenames: list[str]) -> Any:
    """A new staff user (no password) holding the permissions of these codenames."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission

    staff = get_user_model().objects.create_user(username, is_staff=True)
    staff.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return staff


@pytest.fixture
async def client(user: Any) -> AsyncClient:
    """An async test client logged in as ``user``."""
    c = AsyncClient()
    await c.aforce_login(user)
    return c


class ClientAt(AsyncClient):
    """A cookieless async test client whose requests come from ``address``: the ASGI scope's
    ``client``, which Django's test client fixes at 127.0.0.1."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.address = address

    def _base_scope(self, **request: Any) -> dict[str, Any]:
        scope = super()._base_scope(**request)
        scope["client"] = [self.address, 40000]
        return scope


async def chat(client: AsyncClient, body: Any, **kwargs: Any) -> Any:
    data = body if isinstance(body, bytes | str) else orjson.dumps(body)
    return await client.post(
        "/completions", data, content_type=kwargs.pop("content_type", "application/json"), **kwargs
    )


async def read_body(response: Any) -> bytes:
    return b"".join([chunk async for chunk in response.streaming_content])


async def read_events(response: Any) -> list[dict[str, Any]]:
    body = await read_body(response)
    assert body.endswith(b"\n"), body
    return [orjson.loads(line) for line in body.splitlines()]


def answer_text(events: list[dict[str, Any]]) -> str:
    return "".join(e["content"] for e in events if e["event"] == "answering")


def http_scope(path: str, *, cookies: str = "", method: str = "POST") -> dict[str, Any]:
    """A minimal ASGI HTTP scope for driving the real ASGI app with ApplicationCommunicator."""
    headers = [(b"host", b"testserver"), (b"content-type", b"application/json")]
    if cookies:
        headers.append((b"cookie", cookies.encode()))
        headers.append((b"x-csrftoken", CSRF_TOKEN.encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }


async def session_cookie(user: Any) -> str:
    """The Cookie header value of a logged-in session for ``user``."""
    c = AsyncClient()
    await c.aforce_login(user)
    return f"sessionid={c.cookies['sessionid'].value}; csrftoken={CSRF_TOKEN}"


CSRF_TOKEN = "t" * 32
# Debian's Chromium, headless and offline, for the browser tests.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="session")
def server(
    django_db_setup: Any, django_db_blocker: Any, upstream_server: FakeUpstream
) -> Iterator[ServerProcess]:
    """The project under a real uvicorn process, sharing the test database and fake upstream."""
    process = ServerProcess(shared_database_name(django_db_blocker), upstream_server.base_url)
    process.start()
    yield process
    process.stop()


def shared_database_name(django_db_blocker: Any) -> str:
    """The name of the database the tests use, for a server process to share."""
    from django.db import connection

    with django_db_blocker.unblock():
        return str(connection.settings_dict["NAME"])


async def open_socket(
    cookie: str = "", origin: bytes | None = b"http://testserver", bearer: str = ""
) -> WebsocketCommunicator:
    """A socket to the project's ASGI app; ``origin=None`` sends no Origin (not a browser)."""
    headers = [(b"host", b"testserver")]
    if origin is not None:
        headers.append((b"origin", origin))
    if cookie:
        headers.append((b"cookie", cookie.encode()))
    if bearer:
        headers.append((b"authorization", f"Bearer {bearer}".encode()))
    return WebsocketCommunicator(asgi_application(), "/ws/chat/", headers=headers)


async def frames_until_terminal(comm: WebsocketCommunicator) -> list[dict[str, Any]]:
    frames = []
    while True:
        frame = await comm.receive_json_from(timeout=5)
        frames.append(frame)
        if frame["event"] in ("completed", "error"):
            return frames


class StallingSocket:
    """The project's ASGI app behind a WebSocket whose client can stop reading, driven the way
    uvicorn drives it: while the client does not read, the app's sends block (its buffers are
    full); when the client vanishes, a blocked send raises OSError and the app is told
    ``websocket.disconnect``."""

    def __init__(self, cookie: str) -> None:
        headers = [(b"host", b"testserver"), (b"origin", b"http://testserver")]
        headers.append((b"cookie", cookie.encode()))
        scope = {"type": "websocket", "path": "/ws/chat/", "query_string": b"", "headers": headers}
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.reading, self.blocked = asyncio.Event(), asyncio.Event()
        self.reading.set()
        self.gone = False
        self.taken = 0  # messages the app has taken from the client
        self.taken_when_given_up: int | None = None  # ... when it gave up on a blocked send
        self.app = asyncio.create_task(asgi_application()(scope, self._receive, self._send))

    async def _receive(self) -> dict[str, Any]:
        message = await self.inbox.get()
        self.taken += 1
        return message

    async def _send(self, message: dict[str, Any]) -> None:
        if not self.reading.is_set():
            self.blocked.set()
            try:
                await self.reading.wait()
            except asyncio.CancelledError:
                self.taken_when_given_up = self.taken
                raise
        if self.gone:
            raise OSError("the connection is gone")
        self.received.put_nowait(message)

    async def connect(self) -> None:
        self.inbox.put_nowait({"type": "websocket.connect"})
        assert (await self.receive())["type"] == "websocket.accept"

    def send_json(self, content: Any) -> None:
        self.inbox.put_nowait({"type": "websocket.receive", "text": orjson.dumps(content).decode()})

    async def receive(self, timeout: float = 5) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            return await self.received.get()

    async def receive_json(self, timeout: float = 5) -> Any:
        message = await self.receive(timeout)
        assert message["type"] == "websocket.send", message
        return orjson.loads(message["text"])

    async def stop_reading(self) -> None:
        """Stop reading, and wait until the app has a frame it cannot send."""
        self.reading.clear()
        async with asyncio.timeout(5):
            await self.blocked.wait()

    def read_again(self) -> None:
        self.blocked.clear()
        self.reading.set()

    async def vanish(self) -> None:
        """The connection dies: blocked sends fail, the app is told, and it must end."""
        self.gone = True
        self.reading.set()
        self.inbox.put_nowait({"type": "websocket.disconnect", "code": 1006})
        async with asyncio.timeout(5):
            await self.app


@pytest.fixture
def saved_answers() -> Iterator[asyncio.Queue[Any]]:
    """Each answer as it is saved (the turn_finished signal): a turn ended, whatever the socket
    is doing."""
    answers: asyncio.Queue[Any] = asyncio.Queue()

    def receiver(sender: Any, message: Any, **kwargs: Any) -> None:
        answers.put_nowait(message)

    turn_finished.connect(receiver)
    yield answers
    turn_finished.disconnect(receiver)


def asgi_application() -> Any:
    from project.asgi import application

    return application


class ScriptedEvents(Interceptor):
    """Emits the ``reasoning`` and ``tool_call`` events of the stream protocol around a text
    answer, so the chat page's drawing of them can be tested where the upstream's parsing of
    ``delta.reasoning_content`` and ``delta.tool_calls`` is not in this build."""

    async def before_upstream(self, turn: Any) -> None:
        for piece in ("Thinking ", "about ", "the clock."):
            turn.emit({"event": "reasoning", "content": piece})

    async def after_response(self, turn: Any) -> None:
        call = {"id": "call_1", "name": "get_time", "arguments": '{"zone":"UTC"}'}
        turn.emit({"event": "tool_call", **call})


class RawWebSocket:
    """A WebSocket client on a bare TCP socket, for the ways a real client dies: it reads only
    when asked, so one that stops reading fills its receive buffer and the server's sends
    block; and it can vanish without a close frame (``abort``: SO_LINGER 0, a TCP reset)."""

    def __init__(
        self, port: int, headers: dict[str, str], receive_buffer: int | None = None
    ) -> None:
        self.port, self.headers = port, headers
        self.sock = socket.socket()
        if receive_buffer is not None:  # before connecting, so the window is offered small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.setblocking(False)
        self.buffer = b""

    async def connect(self) -> int:
        """Open the socket and do the handshake; return the HTTP status (101 when accepted)."""
        loop = asyncio.get_running_loop()
        await loop.sock_connect(self.sock, ("127.0.0.1", self.port))
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            "GET /ws/chat/ HTTP/1.1",
            f"Host: 127.0.0.1:{self.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in self.headers.items()),
        ]
        await loop.sock_sendall(self.sock, ("\r\n".join(lines) + "\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buffer:
            await self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        return int(head.split(b" ", 2)[1])

    async def send_json(self, content: Any) -> None:
        payload = orjson.dumps(content)
        mask = os.urandom(4)
        size = len(payload)
        if size < 126:
            head = struct.pack("!BB", 0x81, 0x80 | size)
        else:
            head = struct.pack("!BBH", 0x81, 0x80 | 126, size)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await asyncio.get_running_loop().sock_sendall(self.sock, head + mask + masked)

    async def receive(self, timeout: float = 5) -> tuple[int, bytes]:
        """The next frame from the server, as (opcode, payload): 1 text, 8 close."""
        async with asyncio.timeout(timeout):
            await self._need(2)
            opcode, size = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F
            start = 2
            if size >= 126:
                start = 4 if size == 126 else 10
                await self._need(start)
                size = int.from_bytes(self.buffer[2:start])
            await self._need(start + size)
            payload = self.buffer[start : start + size]
            self.buffer = self.buffer[start + size :]
            return opcode, payload

    async def receive_json(self, timeout: float = 5) -> Any:
        opcode, payload = await self.receive(timeout)
        assert opcode == 1, (opcode, payload)
        return orjson.loads(payload)

    def unread(self) -> int:
        """Bytes the kernel holds for this client, received and not read."""
        return int(struct.unpack("i", fcntl.ioctl(self.sock, termios.FIONREAD, b"\0" * 4))[0])

    def abort(self) -> None:
        """Vanish: close with SO_LINGER 0, so the server gets a reset and no close frame."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    async def _need(self, size: int) -> None:
        while len(self.buffer) < size:
            await self._fill()

    async def _fill(self) -> None:
        data = await asyncio.get_running_loop().sock_recv(self.sock, 65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buffer += data


@contextlib.contextmanager
def counted_queries() -> Iterator[list[str]]:
    """Every SQL statement any thread runs, counted at Django's cursor."""
    statements: list[str] = []
    original = CursorWrapper._execute

    def counting(self: CursorWrapper, sql: str, *args: Any, **kwargs: Any) -> Any:
        statements.append(sql)
        return original(self, sql, *args, **kwargs)

    with unittest.mock.patch.object(CursorWrapper, "_execute", counting):
        yield statements


def parse_sse(body: bytes) -> list[dict[str, Any]]:
    """Server-sent events as ``{"event", "id", "data"}`` dicts (``data`` decoded from JSON);
    a comment is ``{"comment": text}`` and a bare ``retry:`` block ``{"retry": ms}``."""
    events: list[dict[str, Any]] = []
    for block in body.decode().split("\n\n"):
        if not block:
            continue
        fields: dict[str, Any] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "":
                events.append({"comment": value})
            elif name == "data":
                fields["data"] = orjson.loads(value)
            elif name == "retry":
                fields["retry"] = int(value)
            else:
                fields[name] = value
        if fields:
            events.append(fields)
    return events


async def read_sse(response: Any) -> list[dict[str, Any]]:
    assert response["Content-Type"] == "text/event-stream", response["Content-Type"]
    return parse_sse(await read_body(response))


JS = Path(__file__).parent / "js"


@pytest.fixture(scope="session")
def node_clients() -> Path:
    """tests/js with its locked npm packages installed (``npm ci``, skipped when the installed
    ones already match the lock); the test is skipped if Node is not installed."""
    import hashlib
    import shutil
    import subprocess

    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("needs Node.js and npm (apt-get install nodejs npm) for the real JS clients")
    lock = hashlib.sha256((JS / "package-lock.json").read_bytes()).hexdigest()
    stamp = JS / "node_modules" / ".chatproxy-lock"
    if not stamp.exists() or stamp.read_text() != lock:
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=JS,
            check=True,
            capture_output=True,
        )
        stamp.write_text(lock)
    return JS


async def run_node(script: str, *args: str, timeout: float = 30) -> Any:
    """Run ``tests/js/<script>`` with ``args`` and return what it prints last, as JSON."""
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(JS / script),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return orjson.loads(out.splitlines()[-1])


class CuttingProxy:
    """A TCP proxy to ``port`` that drops the first connection whose response bytes hold
    ``marker``, right after forwarding them: a network that fails mid-stream, once."""

    def __init__(self, port: int, marker: bytes) -> None:
        self.target, self.marker = port, marker
        self.connections = 0
        self.cut = False
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, watch: bool) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                    if watch and not self.cut and self.marker in data:
                        self.cut = True
                        break
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                writer.close()
                up_writer.close()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def doc_blocks(page: str, section: str) -> list[str]:
    """The fenced code blocks of the section ``## <section>`` of docs/<page>, in order."""
    text = (ROOT / "docs" / page).read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [block.split("\n", 1)[1] for block in body.split("```")[1::2]]


def without_ids(text: str) -> str:
    """``text`` with its UUIDs and ``created`` times made the same in every run."""
    text = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<id>", text)
    return re.sub(r'"created": ?\d+', '"created":0', text).strip()


# Every database connection Django opens, in any thread, to count those still open.
_opened: weakref.WeakSet[Any] = weakref.WeakSet()
connection_created.connect(lambda sender, connection, **kw: _opened.add(connection), weak=False)


def open_connections() -> int:
    # chatproxy's SQLite database thread keeps one connection open on purpose (chatproxy.database).
    writers = {t.ident for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)}
    return sum(1 for c in _opened if c.connection is not None and c._thread_ident not in writers)


def open_sockets() -> int:
    """Open sockets (pipes and files vary with SQLite's own bookkeeping)."""
    sockets = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            sockets += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return sockets


async def snapshot() -> tuple[int, int]:
    # The test's own queries open a connection on asgiref's shared thread: close it first, so
    # only what the app leaves open is counted.
    await sync_to_async(connections.close_all)()
    return open_sockets(), open_connections()


async def assert_no_leaks(before: tuple[int, int]) -> None:
    sockets, connections_open = await snapshot()
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    # A cancelled channel-layer listener may still finish its Redis read (chatproxy.followers).
    assert [t for t in tasks if t not in followers.lingering] == []
    # A finished upstream stream leaves its connection in the pool (both ends of that loopback
    # connection live in this process), and the Redis channel layer keeps one connection.
    assert sockets <= before[0] + 3
    assert connections_open <= before[1]
