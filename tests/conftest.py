"""Shared fixtures: a real fake upstream over loopback, users, and NDJSON helpers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import connections
from django.test import AsyncClient

from chatproxy.interception import Interceptor
from chatproxy.upstream import close_clients
from tests.fake_upstream import FakeUpstream
from tests.server import ServerProcess

FIXTURES = Path(__file__).parent / "fixtures"


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


@pytest.fixture
def user(django_user_model: Any) -> Any:
    return django_user_model.objects.create_user("alice", password="pw")


@pytest.fixture
def other_user(django_user_model: Any) -> Any:
    return django_user_model.objects.create_user("bob", password="pw")


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
    cookie: str = "", origin: bytes = b"http://testserver"
) -> WebsocketCommunicator:
    headers = [(b"host", b"testserver"), (b"origin", origin)]
    if cookie:
        headers.append((b"cookie", cookie.encode()))
    return WebsocketCommunicator(_asgi_application(), "/ws/chat/", headers=headers)


async def frames_until_terminal(comm: WebsocketCommunicator) -> list[dict[str, Any]]:
    frames = []
    while True:
        frame = await comm.receive_json_from(timeout=5)
        frames.append(frame)
        if frame["event"] in ("completed", "error"):
            return frames


def _asgi_application() -> Any:
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
