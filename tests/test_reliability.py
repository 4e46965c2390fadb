"""Nothing lost: client departures in every phase, upstream faults, crashes, shutdown, retries."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from typing import Any

import httpx2
import orjson
import pytest
from asgiref.sync import sync_to_async
from asgiref.testing import ApplicationCommunicator
from django.core.asgi import get_asgi_application
from django.core.management import call_command

from chatproxy.interception import Interceptor
from chatproxy.models import Message
from tests.conftest import (
    CSRF_TOKEN,
    FAILURES,
    answer_text,
    assert_no_leaks,
    chat,
    frames_until_terminal,
    http_scope,
    open_socket,
    read_body,
    read_events,
    session_cookie,
    shared_database_name,
    snapshot,
)
from tests.fake_upstream import Reply
from tests.server import ServerProcess

HI = {"messages": [{"role": "user", "content": "Hi"}]}
BODY = orjson.dumps(HI)
db = pytest.mark.django_db(transaction=True)

# Interceptors that park a turn in one phase: the client leaves while the turn waits there.


class ParkBeforeUpstream(Interceptor):
    async def before_upstream(self, turn):
        turn.emit({"event": "analyzing", "detail": "parked"})
        await asyncio.Event().wait()


class ParkAfterLastToken(Interceptor):
    async def after_response(self, turn):
        turn.emit({"event": "parked"})
        await asyncio.Event().wait()


PHASES = {
    # phase: (interceptors, upstream reply, marker that the phase was reached, status, text)
    "before_upstream_call": ([ParkBeforeUpstream], None, '"detail":"parked"', "interrupted", ""),
    "before_first_token": (
        [],
        Reply(tokens=["late"], first_delay=30),
        '"analyzing"',
        "interrupted",
        "",
    ),
    "mid_answer": (
        [],
        Reply(tokens=["a", "b"] + ["c"] * 100, delay=0.02),
        '"content":"b"',
        "interrupted",
        None,
    ),
    "after_last_token": (
        [ParkAfterLastToken],
        Reply(tokens=["a", "b"]),
        '"parked"',
        "completed",
        "ab",
    ),
}


@db
@pytest.mark.parametrize("phase", PHASES)
async def test_http_client_leaving_in_each_phase(user, upstream, settings, phase):
    interceptors, reply, marker, status, text = PHASES[phase]
    settings.CHATPROXY_INTERCEPTORS = interceptors
    if reply:
        upstream.enqueue(reply)
    before = await snapshot()
    app = ApplicationCommunicator(
        get_asgi_application(), http_scope("/completions", cookies=await session_cookie(user))
    )
    await app.send_input({"type": "http.request", "body": BODY})
    assert (await app.receive_output(5))["status"] == 200
    received = b""
    while marker.encode() not in received:
        received += (await app.receive_output(5))["body"]
    if reply:
        await upstream.wait_for_request()

    await app.send_input({"type": "http.disconnect"})
    await app.wait(5)

    answer = await Message.objects.aget(role="assistant")
    assert answer.status == status
    delivered = "".join(
        orjson.loads(line).get("content", "")
        for line in received.splitlines()
        if b'"answering"' in line
    )
    if text is not None:
        assert answer.content == text
    assert answer.content.startswith(delivered)
    if upstream.requests:
        assert (
            await upstream.requests[0].wait_closed_by_client()
            or upstream.requests[0].completed.is_set()
        )
    else:
        assert phase == "before_upstream_call"
    await assert_no_leaks(before)


@db
@pytest.mark.parametrize("phase", PHASES)
async def test_websocket_client_leaving_in_each_phase(user, upstream, settings, phase):
    interceptors, reply, marker, status, text = PHASES[phase]
    settings.CHATPROXY_INTERCEPTORS = interceptors
    if reply:
        upstream.enqueue(reply)
    socket = await open_socket(await session_cookie(user))
    await socket.connect()
    await socket.send_json_to({"type": "chat", **HI})
    frames = []
    while marker not in orjson.dumps(frames).decode():
        frames.append(await socket.receive_json_from(timeout=5))
    if reply:
        await upstream.wait_for_request()

    await socket.disconnect()

    answer = await Message.objects.aget(role="assistant")
    assert answer.status == status
    assert answer.content.startswith(answer_text(frames))
    if text is not None:
        assert answer.content == text
    if phase == "before_upstream_call":
        assert upstream.requests == []
    elif status == "interrupted":
        assert await upstream.requests[0].wait_closed_by_client()


@db
@pytest.mark.parametrize(("reply", "code", "partial"), FAILURES)
async def test_upstream_faults_over_websocket(user, upstream, reply, code, partial):
    upstream.enqueue(reply)
    socket = await open_socket(await session_cookie(user))
    await socket.connect()

    await socket.send_json_to({"type": "chat", **HI})
    frames = await frames_until_terminal(socket)
    await socket.disconnect()

    assert frames[-1]["error"]["code"] == code
    assert answer_text(frames) == partial
    answer = await Message.objects.aget(role="assistant")
    assert (answer.status, answer.error_code, answer.content) == ("failed", code, partial)


@db
@pytest.mark.parametrize(("reply", "code", "partial"), FAILURES)
async def test_upstream_faults_leak_no_task_descriptor_or_connection(
    client, upstream, reply, code, partial
):
    await read_body(await chat(client, HI))  # warm the pooled upstream connection
    before = await snapshot()
    for _ in range(5):
        upstream.enqueue(reply)
        events = await read_events(await chat(client, HI))
        assert events[-1]["error"]["code"] == code

    for request in upstream.requests[1:]:
        # Closed by either side: the fake finished, or chatproxy hung up; "drop" is the fake's.
        ended = request.completed.is_set() or await request.wait_closed_by_client(timeout=1)
        assert ended or reply.fail == "drop"
    await assert_no_leaks(before)


@pytest.fixture
def blackhole():
    """A loopback port whose accept queue is full: connecting to it times out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname())
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    filler.close()
    listener.close()


@db
async def test_connect_timeout_ends_with_upstream_timeout(client, settings, blackhole):
    settings.CHATPROXY_BASE_URL = blackhole
    settings.CHATPROXY_CONNECT_TIMEOUT = 0.2

    events = await read_events(await chat(client, HI))

    assert events[-1]["error"]["code"] == "upstream_timeout"
    assert (await Message.objects.aget(role="assistant")).status == "failed"


# Retries: before the first byte only, honouring Retry-After up to a cap.


@db
async def test_retry_after_a_503_then_the_answer_streams(client, upstream, settings):
    settings.CHATPROXY_MAX_RETRIES = 2
    upstream.enqueue(Reply(status=503, headers={"Retry-After": "0"}), Reply(tokens=["ok"]))

    events = await read_events(await chat(client, HI))

    assert answer_text(events) == "ok" and events[-1]["event"] == "completed"
    assert len(upstream.requests) == 2


@db
async def test_retry_waits_for_retry_after_but_no_longer_than_the_cap(client, upstream, settings):
    settings.CHATPROXY_MAX_RETRIES = 2
    settings.CHATPROXY_RETRY_AFTER_CAP = 0.3
    upstream.enqueue(
        Reply(status=429, headers={"Retry-After": "0.2"}),
        Reply(status=429, headers={"Retry-After": "3600"}),
        Reply(tokens=["ok"]),
    )
    started = time.monotonic()

    events = await read_events(await chat(client, HI))

    elapsed = time.monotonic() - started
    assert events[-1]["event"] == "completed"
    assert 0.5 <= elapsed < 3, elapsed  # 0.2 s, then 0.3 s (capped), not an hour


@db
async def test_no_retry_after_the_stream_started(client, upstream, settings):
    settings.CHATPROXY_MAX_RETRIES = 3
    upstream.enqueue(Reply(tokens=["a", "b", "c"], fail="drop", fail_after=1))

    events = await read_events(await chat(client, HI))

    assert events[-1]["error"]["code"] == "upstream_disconnected"
    assert len(upstream.requests) == 1


@db
async def test_client_errors_from_upstream_are_not_retried(client, upstream, settings):
    settings.CHATPROXY_MAX_RETRIES = 3
    upstream.enqueue(Reply(status=400))

    events = await read_events(await chat(client, HI))

    assert events[-1]["error"]["code"] == "upstream_rejected"
    assert len(upstream.requests) == 1


# Crash safety and shutdown, against real server processes.


def server_with(django_db_blocker, upstream, **settings) -> ServerProcess:
    process = ServerProcess(shared_database_name(django_db_blocker), upstream.base_url, settings)
    process.start()
    return process


def open_stream(http: httpx2.AsyncClient, cookie: str):
    headers = {"Cookie": cookie, "X-CSRFToken": CSRF_TOKEN, "Content-Type": "application/json"}
    return http.stream("POST", "/completions", content=BODY, headers=headers)


@db
@pytest.mark.server
async def test_sigkill_mid_answer_leaves_the_checkpointed_text(user, upstream, django_db_blocker):
    process = server_with(django_db_blocker, upstream, CHATPROXY_CHECKPOINT_INTERVAL=0.1)
    upstream.enqueue(Reply(tokens=[f"w{i} " for i in range(200)], delay=0.05))
    try:
        cookie = await session_cookie(user)
        async with (
            httpx2.AsyncClient(base_url=process.url) as http,
            open_stream(http, cookie) as response,
        ):
            lines = response.aiter_lines()
            received = [orjson.loads(await anext(lines)) for _ in range(9)]
            # 8 tokens at 50 ms: at least one 100 ms checkpoint was written, inline, before
            # the last of them was sent.
            process.kill()
    finally:
        process.stop()

    answer = await Message.objects.aget(role="assistant")
    assert answer.status == "streaming"
    assert answer.content and answer_text(received).startswith(answer.content)
    await sync_to_async(call_command)("markinterrupted", "--older-than", "0")
    answer = await Message.objects.aget(role="assistant")
    assert (answer.status, answer.error_code) == ("interrupted", "worker_lost")
    assert answer.content and answer_text(received).startswith(answer.content)


async def sigterm_mid_answer(process: ServerProcess, user: Any, read_first: int) -> list[dict]:
    """Stream a turn from ``process``, send it SIGTERM after ``read_first`` lines, read the rest."""
    try:
        cookie = await session_cookie(user)
        async with (
            httpx2.AsyncClient(base_url=process.url) as http,
            open_stream(http, cookie) as response,
        ):
            lines = response.aiter_lines()
            events = [orjson.loads(await anext(lines)) for _ in range(read_first)]
            process.terminate()
            events += [orjson.loads(line) async for line in lines]
        # uvicorn re-raises the signal once its graceful shutdown is done.
        assert process.wait() == -signal.SIGTERM
    finally:
        process.stop()
    return events


@db
@pytest.mark.server
async def test_sigterm_ends_a_long_answer_with_server_shutdown(user, upstream, django_db_blocker):
    process = server_with(django_db_blocker, upstream, CHATPROXY_SHUTDOWN_GRACE=0.5)
    upstream.enqueue(Reply(tokens=[f"w{i} " for i in range(400)], delay=0.02))

    events = await sigterm_mid_answer(process, user, read_first=3)

    assert events[-1]["event"] == "error" and events[-1]["error"]["code"] == "server_shutdown"
    answer = await Message.objects.aget(role="assistant")
    assert (answer.status, answer.error_code) == ("interrupted", "server_shutdown")
    assert answer.content == answer_text(events)
    assert await upstream.requests[0].wait_closed_by_client()


@db
@pytest.mark.server
async def test_sigterm_lets_a_short_answer_finish(user, upstream, django_db_blocker):
    process = server_with(django_db_blocker, upstream, CHATPROXY_SHUTDOWN_GRACE=10)
    upstream.enqueue(Reply(tokens=[f"w{i} " for i in range(20)], delay=0.02))

    events = await sigterm_mid_answer(process, user, read_first=2)

    assert events[-1]["event"] == "completed"
    answer = await Message.objects.aget(role="assistant")
    assert (answer.status, answer.content) == ("completed", "".join(f"w{i} " for i in range(20)))


# Load: one uvicorn worker, many turns at once.


@db
@pytest.mark.server
async def test_500_concurrent_turns_on_one_worker_are_all_saved_whole(server, upstream, user):
    cookie = await session_cookie(user)
    headers = {"Cookie": cookie, "X-CSRFToken": CSRF_TOKEN, "Content-Type": "application/json"}
    limits = httpx2.Limits(max_connections=600, max_keepalive_connections=600)

    async def turn(http: httpx2.AsyncClient, i: int) -> tuple[int, str, str]:
        body = orjson.dumps({"messages": [{"role": "user", "content": f"turn {i}"}]})
        response = await http.post("/completions", content=body, headers=headers)
        if response.status_code != 200:
            return response.status_code, "", response.text
        events = [orjson.loads(line) for line in response.content.splitlines()]
        return response.status_code, events[-1].get("message_id", ""), answer_text(events)

    async with httpx2.AsyncClient(base_url=server.url, limits=limits, timeout=120) as http:
        results = await asyncio.gather(*(turn(http, i) for i in range(500)))

    failures = [r for r in results if r[0] != 200]
    log = "".join(line for line in server.output if "HTTP/1.1" not in line)
    assert failures == [], (len(failures), log[-3000:])
    assert sorted(text for _, _, text in results) == sorted(f"Echo: turn {i}" for i in range(500))
    saved = {str(m.pk): m async for m in Message.objects.filter(role="assistant")}
    assert all(
        saved[mid].content == text and saved[mid].status == "completed" for _, mid, text in results
    )
    assert "database is locked" not in "".join(server.output)


@db
@pytest.mark.parametrize("fault", ["stall", "refused", "connect_timeout"])
async def test_network_faults_over_websocket(user, upstream, settings, blackhole, fault):
    settings.CHATPROXY_TIMEOUT = 0.3
    settings.CHATPROXY_CONNECT_TIMEOUT = 0.2
    if fault == "stall":
        upstream.enqueue(Reply(tokens=["a", "b"], fail="stall", fail_after=1))
    else:
        settings.CHATPROXY_BASE_URL = "http://127.0.0.1:9/v1" if fault == "refused" else blackhole
    socket = await open_socket(await session_cookie(user))
    await socket.connect()

    await socket.send_json_to({"type": "chat", **HI})
    frames = await frames_until_terminal(socket)
    await socket.disconnect()

    expected = "upstream_unreachable" if fault == "refused" else "upstream_timeout"
    assert frames[-1]["error"]["code"] == expected
    answer = await Message.objects.aget(role="assistant")
    assert (answer.status, answer.error_code) == ("failed", expected)
    if fault == "stall":
        assert answer.content == "a"
        assert await upstream.requests[0].wait_closed_by_client()
