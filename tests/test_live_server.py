"""Against a real uvicorn process: lines stream as they arrive; the WebSocket works end to end."""

from __future__ import annotations

import asyncio

import httpx2
import orjson
import pytest
import websockets

from chatproxy.models import Message
from tests.conftest import CSRF_TOKEN, session_cookie
from tests.fake_upstream import Reply

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
