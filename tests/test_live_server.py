"""Against a real uvicorn process: lines stream as they arrive; the WebSocket works end to end."""

from __future__ import annotations

import asyncio
import socket

import httpx2
import orjson
import pytest
import websockets
from asgiref.sync import sync_to_async

from chatproxy.models import ApiKey, Message
from tests.conftest import CSRF_TOKEN, RawWebSocket, session_cookie, shared_database_name
from tests.fake_upstream import Reply
from tests.server import ServerProcess

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.server]

HI = {"messages": [{"role": "user", "content": "Hi"}]}


async def test_http_lines_reach_the_client_while_the_upstream_is_still_sending(
    server, upstream, user
):
    upstream.enqueue(Reply(tokens=["a", "b", "c", "d"], delay=0.2))
    cookie = await session_cookie(user)
    headers = {"Cookie": cookie, "X-CSRFToken": CSRF_TOKEN, "Content-Type": "application/json"}
    async with (
        httpx2.AsyncClient(base_url=server.url) as http,
        http.stream("POST", "/completions", content=orjson.dumps(HI), headers=headers) as response,
    ):
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = response.aiter_lines()
        assert orjson.loads(await anext(lines))["event"] == "analyzing"
        first = orjson.loads(await anext(lines))
        # The first delta arrived while the upstream still had three to send: nothing buffered.
        assert first == {"event": "answering", "content": "a"}
        assert not upstream.requests[0].completed.is_set()
        rest = [orjson.loads(line) async for line in lines]
    assert [e["event"] for e in rest] == ["answering"] * 3 + ["completed"]


def ws_headers(cookie: str) -> dict[str, str]:
    return {"Cookie": cookie}


async def receive_until_terminal(ws) -> list[dict]:
    frames = []
    while True:
        frame = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
        frames.append(frame)
        if frame["event"] in ("completed", "error"):
            return frames


async def test_websocket_end_to_end_two_turns_malformed_frame_and_cancel(server, upstream, user):
    upstream.enqueue(
        Reply(tokens=["One"]), Reply(tokens=[f"w{i} " for i in range(300)], delay=0.02)
    )
    url = f"ws://127.0.0.1:{server.port}/ws/chat/"
    async with websockets.connect(
        url,
        origin=f"http://127.0.0.1:{server.port}",
        additional_headers=ws_headers(await session_cookie(user)),
    ) as ws:
        await ws.send(orjson.dumps({"type": "chat", **HI}).decode())
        first = await receive_until_terminal(ws)
        await ws.send("{not json")
        malformed = await receive_until_terminal(ws)
        await ws.send(
            orjson.dumps(
                {"type": "chat", "conversation_id": first[0]["conversation_id"], **HI}
            ).decode()
        )
        second = [orjson.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(3)]
        await ws.send('{"type": "cancel"}')
        rest = await receive_until_terminal(ws)

    assert [f["event"] for f in first] == ["analyzing", "answering", "completed"]
    assert malformed[0]["error"]["code"] == "invalid_json"
    assert second[0]["event"] == "analyzing"
    assert rest[-1]["error"]["code"] == "cancelled"
    assert await upstream.requests[1].wait_closed_by_client()
    answer = await Message.objects.aget(pk=second[0]["message_id"])
    assert (answer.status, answer.error_code) == ("interrupted", "cancelled")
    assert answer.content.startswith("".join(f.get("content", "") for f in second + rest))


async def test_websocket_without_login_is_closed_with_4401(server):
    url = f"ws://127.0.0.1:{server.port}/ws/chat/"
    async with websockets.connect(url, origin=f"http://127.0.0.1:{server.port}") as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)

    assert closed.value.rcvd.code == 4401


async def test_websocket_from_a_foreign_origin_is_refused(server, user):
    url = f"ws://127.0.0.1:{server.port}/ws/chat/"

    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(
            url,
            origin="http://evil.example",
            additional_headers=ws_headers(await session_cookie(user)),
        )

    assert refused.value.response.status_code == 403


async def test_websocket_from_another_port_of_the_same_host_is_refused(server, user):
    url = f"ws://127.0.0.1:{server.port}/ws/chat/"

    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(
            url,
            origin=f"http://127.0.0.1:{server.port + 1}",
            additional_headers=ws_headers(await session_cookie(user)),
        )

    assert refused.value.response.status_code == 403


async def test_websocket_without_origin_chats_with_a_bearer_key(server, user):
    _, raw = await sync_to_async(ApiKey.objects.issue)(user, "bot")
    url = f"ws://127.0.0.1:{server.port}/ws/chat/"

    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {raw}"}) as ws:
        await ws.send(orjson.dumps({"type": "chat", **HI}).decode())
        frames = await receive_until_terminal(ws)

    assert frames[-1]["event"] == "completed"
    answer = await Message.objects.aget(pk=frames[0]["message_id"])
    assert answer.status == "completed"


async def test_websocket_without_origin_is_not_logged_in_by_its_session_cookie(server, user):
    url = f"ws://127.0.0.1:{server.port}/ws/chat/"

    async with websockets.connect(
        url, additional_headers=ws_headers(await session_cookie(user))
    ) as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)

    assert closed.value.rcvd.code == 4401


# Sockets that die: the server is started with one stream per user, so an answer left
# `streaming` would refuse that user's next chat with too_many_streams.

SEND_TIMEOUT = 1.0
LONG_AND_FAST = [f"w{i} " for i in range(100_000)]
WIDE = ["x" * 1000] * 20_000  # frames of a kilobyte: a stopped reader's buffers fill at once


@pytest.fixture(scope="module")
def strict_server(django_db_blocker, upstream_server):
    settings = {"CHATPROXY_MAX_STREAMS": 1, "CHATPROXY_SEND_TIMEOUT": SEND_TIMEOUT}
    process = ServerProcess(
        shared_database_name(django_db_blocker), upstream_server.base_url, settings
    )
    process.start()
    yield process
    process.stop()


async def settled(message_id: str, timeout: float = 10) -> Message:
    """The answer once it is no longer `streaming` (another process saves it: no event to
    wait on, so a bounded poll)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (answer := await Message.objects.aget(pk=message_id)).status == "streaming":
        assert loop.time() < deadline, "the answer is still streaming"
        await asyncio.sleep(0.05)
    return answer


async def chat_again(server, cookie: str) -> list[dict]:
    headers = {"Cookie": cookie, "X-CSRFToken": CSRF_TOKEN, "Content-Type": "application/json"}
    async with httpx2.AsyncClient(base_url=server.url) as http:
        response = await http.post("/completions", content=orjson.dumps(HI), headers=headers)
    assert response.status_code == 200, response.text
    return [orjson.loads(line) for line in response.content.splitlines()]


@pytest.fixture
def open_raw():
    """Open raw WebSockets to a server as the session's user; each is closed at the end."""
    opened: list[RawWebSocket] = []

    async def open_raw(server, cookie: str, receive_buffer: int | None = None) -> RawWebSocket:
        origin = f"http://127.0.0.1:{server.port}"
        ws = RawWebSocket(server.port, {"Origin": origin, "Cookie": cookie}, receive_buffer)
        opened.append(ws)
        assert await ws.connect() == 101
        return ws

    yield open_raw
    for ws in opened:
        ws.sock.close()


async def test_socket_closed_abruptly_mid_answer_saves_interrupted_and_closes_upstream(
    strict_server, upstream, user, open_raw
):
    upstream.enqueue(Reply(tokens=LONG_AND_FAST))
    cookie = await session_cookie(user)
    ws = await open_raw(strict_server, cookie)
    await ws.send_json({"type": "chat", **HI})
    frames = [await ws.receive_json() for _ in range(3)]

    ws.abort()

    assert await upstream.requests[0].wait_closed_by_client(timeout=15)
    answer = await settled(frames[0]["message_id"])
    assert (answer.status, answer.error_code) == ("interrupted", "client_disconnected")
    assert answer.content.startswith("".join(f.get("content", "") for f in frames))
    assert (await chat_again(strict_server, cookie))[-1]["event"] == "completed"


async def test_socket_that_never_reads_then_closes_saves_interrupted_and_closes_upstream(
    strict_server, upstream, user, open_raw
):
    upstream.enqueue(Reply(tokens=WIDE, delay=0.001))
    cookie = await session_cookie(user)
    ws = await open_raw(strict_server, cookie, receive_buffer=4096)
    await ws.send_json({"type": "chat", **HI})
    await filled(ws)

    ws.abort()

    assert await upstream.requests[0].wait_closed_by_client(timeout=15)
    answer = await Message.objects.aget(role="assistant")
    answer = await settled(str(answer.pk))
    assert (answer.status, answer.error_code) == ("interrupted", "client_disconnected")
    assert (await chat_again(strict_server, cookie))[-1]["event"] == "completed"


async def test_socket_that_stops_reading_is_dropped_after_the_send_timeout(
    strict_server, upstream, user, open_raw
):
    upstream.enqueue(Reply(tokens=WIDE, delay=0.001))
    cookie = await session_cookie(user)
    ws = await open_raw(strict_server, cookie, receive_buffer=4096)
    await ws.send_json({"type": "chat", **HI})
    await filled(ws)

    assert await upstream.requests[0].wait_closed_by_client(timeout=SEND_TIMEOUT + 10)
    # Reading again, the client gets what was queued for it, then the close.
    while (frame := await ws.receive())[0] == 1:
        pass
    assert frame[0] == 8 and frame[1][:2] == (4408).to_bytes(2)
    ws.abort()
    answer = await settled(str((await Message.objects.aget(role="assistant")).pk))
    assert (answer.status, answer.error_code) == ("interrupted", "client_disconnected")
    assert (await chat_again(strict_server, cookie))[-1]["event"] == "completed"


async def filled(ws: RawWebSocket, timeout: float = 10) -> None:
    """Wait until the client's receive buffer is full: it stopped reading, the server's frames
    pile up (the answer is far larger than every buffer on the way, so its sends block)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    full = ws.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 4
    while ws.unread() < full:
        assert loop.time() < deadline, f"only {ws.unread()} bytes arrived"
        await asyncio.sleep(0.02)
