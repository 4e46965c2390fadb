"""Resume, follow, stop and deduplicate a turn from any process.

The cross-process tests run two real uvicorn processes (two hosts behind a load balancer) on
the shared database and the Redis channel layer; `.ci/run` runs them in its PostgreSQL + Redis
pass. The in-process tests run everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import httpx2
import orjson
import pytest

from chatproxy.models import Message
from tests.conftest import (
    CSRF_TOKEN,
    answer_text,
    chat,
    frames_until_terminal,
    open_socket,
    read_events,
    session_cookie,
    shared_database_name,
)
from tests.fake_upstream import Reply
from tests.server import ServerProcess

HI = {"messages": [{"role": "user", "content": "Hi"}]}
db = pytest.mark.django_db(transaction=True)
SLOW = [f"w{i} " for i in range(60)]


# In-process: finished answers, ownership, the cancel endpoint with the in-memory layer.


@db
async def test_resume_a_finished_answer_replays_it_with_the_same_terminal_event(client, upstream):
    upstream.enqueue(Reply(tokens=["Hel", "lo"]))
    original = await read_events(await chat(client, HI))

    resumed = await read_events(
        await client.get(f"/completions/{original[0]['conversation_id']}/stream")
    )

    assert resumed[0] == {**original[0], "resumed": True}
    assert answer_text(resumed) == "Hello"
    assert resumed[-1] == original[-1]
    assert len(upstream.requests) == 1


@db
async def test_resume_a_failed_answer_ends_with_its_error(client, upstream):
    upstream.enqueue(Reply(tokens=["a", "b"], fail="drop", fail_after=1))
    original = await read_events(await chat(client, HI))

    resumed = await read_events(
        await client.get(f"/completions/{original[0]['conversation_id']}/stream")
    )

    assert answer_text(resumed) == "a"
    assert resumed[-1] == original[-1]


@db
async def test_resume_and_cancel_of_someone_elses_conversation_are_404(client, other_user):
    original = await read_events(await chat(client, HI))
    from django.test import AsyncClient

    stranger = AsyncClient()
    await stranger.aforce_login(other_user)
    conversation_id = original[0]["conversation_id"]

    resumed = await stranger.get(f"/completions/{conversation_id}/stream")
    cancelled = await stranger.post(f"/completions/{conversation_id}/cancel")

    assert resumed.status_code == cancelled.status_code == 404


@db
async def test_cancel_with_nothing_streaming_is_409(client):
    original = await read_events(await chat(client, HI))

    response = await client.post(f"/completions/{original[0]['conversation_id']}/cancel")

    assert response.status_code == 409
    assert orjson.loads(response.content)["error"]["code"] == "not_streaming"


@db
async def test_cancel_endpoint_stops_a_turn_running_on_a_websocket(user, client, upstream):
    upstream.enqueue(Reply(tokens=SLOW, delay=0.05))
    socket = await open_socket(await session_cookie(user))
    await socket.connect()
    await socket.send_json_to({"type": "chat", **HI})
    analyzing = await socket.receive_json_from(timeout=5)
    await socket.receive_json_from(timeout=5)  # the first answering frame: the upstream answers

    response = await client.post(f"/completions/{analyzing['conversation_id']}/cancel")
    frames = await frames_until_terminal(socket)
    await socket.disconnect()

    assert response.status_code == 202
    assert frames[-1]["error"]["code"] == "cancelled"
    answer = await Message.objects.aget(role="assistant")
    assert (answer.status, answer.error_code) == ("interrupted", "cancelled")
    assert await upstream.requests[0].wait_closed_by_client()


@db
async def test_cancel_while_the_upstream_call_waits_to_retry_sends_no_more_requests(
    user, client, upstream, settings
):
    settings.CHATPROXY_MAX_RETRIES = 1
    upstream.enqueue(Reply(status=503, headers={"retry-after-ms": "5000"}), Reply(tokens=["no"]))
    socket = await open_socket(await session_cookie(user))
    await socket.connect()
    await socket.send_json_to({"type": "chat", **HI})
    analyzing = await socket.receive_json_from(timeout=5)
    await upstream.wait_for_request()

    response = await client.post(f"/completions/{analyzing['conversation_id']}/cancel")
    frames = await frames_until_terminal(socket)
    await socket.disconnect()

    assert response.status_code == 202
    assert [f["event"] for f in frames] == ["error"]
    assert frames[-1]["error"]["code"] == "cancelled"
    answer = await Message.objects.aget(role="assistant")
    assert (answer.status, answer.error_code) == ("interrupted", "cancelled")
    assert len(upstream.requests) == 1  # the retry never went out


async def a_turn_and_a_follower(user):
    """Start a slow turn on one socket and send a resume frame for it on a second one."""
    first = await open_socket(await session_cookie(user))
    second = await open_socket(await session_cookie(user))
    await first.connect()
    await second.connect()
    await first.send_json_to({"type": "chat", **HI})
    analyzing = await first.receive_json_from(timeout=5)
    await second.send_json_to({"type": "resume", "conversation_id": analyzing["conversation_id"]})
    return first, second, analyzing


@db
async def test_websocket_resume_frame_follows_a_turn_running_elsewhere(user, upstream):
    upstream.enqueue(Reply(tokens=SLOW, delay=0.02))
    first, second, analyzing = await a_turn_and_a_follower(user)

    followed = await frames_until_terminal(second)
    original = [analyzing, *await frames_until_terminal(first)]
    await first.disconnect()
    await second.disconnect()

    assert followed[0]["resumed"] is True
    assert answer_text(followed) == answer_text(original) == "".join(SLOW)
    assert followed[-1] == original[-1]
    assert len(upstream.requests) == 1


@db
async def test_a_follower_gets_the_saved_answer_when_the_turns_own_client_leaves(user, upstream):
    upstream.enqueue(Reply(tokens=SLOW, delay=0.02))
    first, second, _ = await a_turn_and_a_follower(user)
    await second.receive_json_from(timeout=5)  # analyzing: the second socket follows

    await first.disconnect()
    followed = await frames_until_terminal(second)
    await second.disconnect()

    answer = await Message.objects.aget(role="assistant")
    assert (answer.status, answer.error_code) == ("interrupted", "client_disconnected")
    assert answer_text(followed) == answer.content
    assert followed[-1]["error"]["code"] == "client_disconnected"


@db
async def test_idempotent_resubmission_attaches_instead_of_calling_again(client, upstream):
    headers = {"Idempotency-Key": "order-42"}
    upstream.enqueue(Reply(tokens=["Once"]))

    first = await read_events(await chat(client, HI, headers=headers))
    again = await read_events(await chat(client, HI, headers=headers))
    other = await read_events(await chat(client, HI, headers={"Idempotency-Key": "order-43"}))

    assert again[0]["message_id"] == first[0]["message_id"] and again[0]["resumed"] is True
    assert answer_text(again) == "Once" and again[-1] == first[-1]
    assert other[0]["message_id"] != first[0]["message_id"]
    assert len(upstream.requests) == 2
    assert await Message.objects.filter(role="assistant").acount() == 2


# Across processes: two uvicorn workers, the Redis layer.

needs_redis = pytest.mark.skipif(
    not os.environ.get("REDIS_URL"), reason="needs the Redis channel layer (REDIS_URL)"
)


@needs_redis
async def test_the_redis_layer_waits_on_an_idle_channel_past_its_read_timeout():
    # Followers and the turn's cancel listener wait on the layer for up to a heartbeat or two.
    # redis-py 8 with channels-redis 4.3 raised redis's TimeoutError after 5 idle seconds;
    # the layer must stay quiet until a message comes.
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    channel = await layer.new_channel()

    with pytest.raises(TimeoutError) as waited:
        await asyncio.wait_for(layer.receive(channel), 6.5)

    assert type(waited.value) is TimeoutError  # asyncio's own, not redis's


@pytest.fixture
def workers(django_db_blocker, upstream_server):
    processes = [
        ServerProcess(
            shared_database_name(django_db_blocker),
            upstream_server.base_url,
            {"CHATPROXY_CHECKPOINT_INTERVAL": 0.1},
        )
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    yield processes
    for process in processes:
        process.stop()


def headers(cookie: str, **more: str) -> dict[str, str]:
    return {"Cookie": cookie, "X-CSRFToken": CSRF_TOKEN, "Content-Type": "application/json", **more}


@contextlib.asynccontextmanager
async def turn_on(worker: ServerProcess, request_headers: dict[str, str]):
    """Start a turn on ``worker``; give a client for more requests and the turn's line iterator."""
    async with (
        httpx2.AsyncClient(timeout=30) as http,
        http.stream(
            "POST", f"{worker.url}/completions", content=orjson.dumps(HI), headers=request_headers
        ) as response,
    ):
        yield http, response.aiter_lines()


async def lines_of(response) -> list[dict]:
    return [orjson.loads(line) async for line in response.aiter_lines()]


@db
@needs_redis
@pytest.mark.server
async def test_resume_on_another_worker_gets_the_text_so_far_then_the_rest_live(
    workers, upstream, user
):
    upstream.enqueue(Reply(tokens=SLOW, delay=0.03))
    cookie = await session_cookie(user)
    a, b = workers
    async with turn_on(a, headers(cookie)) as (http, lines):
        started = [orjson.loads(await anext(lines)) for _ in range(6)]
        conversation_id = started[0]["conversation_id"]
        async with http.stream(
            "GET", f"{b.url}/completions/{conversation_id}/stream", headers=headers(cookie)
        ) as resumed:
            followed = await lines_of(resumed)
        original = started + [orjson.loads(line) async for line in lines]

    assert followed[0]["resumed"] is True and followed[0]["message_id"] == started[0]["message_id"]
    assert answer_text(followed) == answer_text(original) == "".join(SLOW)
    assert followed[-1] == original[-1] and followed[-1]["event"] == "completed"
    assert len(upstream.requests) == 1


@db
@needs_redis
@pytest.mark.server
async def test_cancel_through_another_worker(workers, upstream, user):
    upstream.enqueue(Reply(tokens=SLOW, delay=0.05))
    cookie = await session_cookie(user)
    a, b = workers
    async with turn_on(a, headers(cookie)) as (http, lines):
        started = [orjson.loads(await anext(lines)) for _ in range(3)]
        cancelled = await http.post(
            f"{b.url}/completions/{started[0]['conversation_id']}/cancel",
            headers=headers(cookie),
        )
        rest = [orjson.loads(line) async for line in lines]

    assert cancelled.status_code == 202
    assert rest[-1]["event"] == "error" and rest[-1]["error"]["code"] == "cancelled"
    answer = await Message.objects.aget(role="assistant")
    assert (answer.status, answer.error_code) == ("interrupted", "cancelled")
    assert await upstream.requests[0].wait_closed_by_client()


@db
@needs_redis
@pytest.mark.server
async def test_idempotent_retry_on_another_worker_attaches_to_the_running_turn(
    workers, upstream, user
):
    upstream.enqueue(Reply(tokens=SLOW, delay=0.03))
    cookie = await session_cookie(user)
    a, b = workers
    retry = headers(cookie, **{"Idempotency-Key": "checkout-7"})
    async with turn_on(a, retry) as (http, lines):
        started = [orjson.loads(await anext(lines)) for _ in range(3)]
        again = await http.post(f"{b.url}/completions", content=orjson.dumps(HI), headers=retry)
        original = started + [orjson.loads(line) async for line in lines]

    attached = [orjson.loads(line) for line in again.content.splitlines()]
    assert attached[0]["message_id"] == started[0]["message_id"] and attached[0]["resumed"] is True
    assert answer_text(attached) == answer_text(original) == "".join(SLOW)
    assert len(upstream.requests) == 1
    assert await Message.objects.filter(role="assistant").acount() == 1


@db
@needs_redis
@pytest.mark.server
async def test_worker_killed_mid_answer_another_serves_the_checkpointed_text(
    workers, upstream, user
):
    upstream.enqueue(Reply(tokens=SLOW, delay=0.05))
    cookie = await session_cookie(user)
    a, b = workers
    async with httpx2.AsyncClient(timeout=30) as http:
        async with http.stream(
            "POST", f"{a.url}/completions", content=orjson.dumps(HI), headers=headers(cookie)
        ) as first:
            lines = first.aiter_lines()
            started = [orjson.loads(await anext(lines)) for _ in range(9)]
            # Eight tokens 50 ms apart: a 100 ms checkpoint was written before the last one.
            await asyncio.to_thread(a.kill)
        resumed = await http.get(
            f"{b.url}/completions/{started[0]['conversation_id']}/stream", headers=headers(cookie)
        )

    events = [orjson.loads(line) for line in resumed.content.splitlines()]
    assert events[0]["resumed"] is True
    assert answer_text(events) and answer_text(started).startswith(answer_text(events))
    assert events[-1]["event"] == "error" and events[-1]["error"]["code"] == "worker_lost"
    answer = await Message.objects.aget(role="assistant")
    assert (answer.status, answer.error_code) == ("interrupted", "worker_lost")


# Staff follow a running answer live from the admin.


@db
async def test_staff_follow_a_running_answer_live_and_others_cannot(
    user, other_user, upstream, django_user_model
):
    from asgiref.sync import sync_to_async
    from django.contrib.auth.models import Permission
    from django.test import AsyncClient, Client

    staff = await django_user_model.objects.acreate(username="staff", is_staff=True)
    await sync_to_async(staff.user_permissions.add)(
        await Permission.objects.aget(codename="view_conversation")
    )
    upstream.enqueue(Reply(tokens=SLOW, delay=0.02))
    socket = await open_socket(await session_cookie(user))
    await socket.connect()
    await socket.send_json_to({"type": "chat", **HI})
    analyzing = await socket.receive_json_from(timeout=5)
    conversation_id = analyzing["conversation_id"]
    page = Client()
    await sync_to_async(page.force_login)(staff)
    watcher, outsider = AsyncClient(), AsyncClient()
    await watcher.aforce_login(staff)
    await outsider.aforce_login(other_user)

    admin_page = await sync_to_async(page.get)(
        f"/admin/chatproxy/conversation/{conversation_id}/change/"
    )
    watched = await read_events(await watcher.get(f"/completions/{conversation_id}/watch"))
    refused = await outsider.get(f"/completions/{conversation_id}/watch")
    original = [analyzing, *await frames_until_terminal(socket)]
    await socket.disconnect()

    assert f'data-watch-url="/completions/{conversation_id}/watch"' in admin_page.content.decode()
    assert answer_text(watched) == answer_text(original) == "".join(SLOW)
    assert watched[-1] == original[-1]
    assert refused.status_code == 404


# Followers are metered: per answer, per user, and each with a bounded queue.


async def a_streaming_answer(user) -> tuple[object, str]:
    """A slow turn of ``user``'s running on a socket; its socket and conversation id."""
    socket = await open_socket(await session_cookie(user))
    await socket.connect()
    await socket.send_json_to({"type": "chat", **HI})
    analyzing = await socket.receive_json_from(timeout=5)
    return socket, analyzing["conversation_id"]


@db
async def test_followers_of_one_answer_are_capped(user, client, upstream, settings):
    settings.CHATPROXY_MAX_FOLLOWERS = 2
    upstream.enqueue(Reply(tokens=SLOW, delay=0.02))
    socket, conversation_id = await a_streaming_answer(user)
    url = f"/completions/{conversation_id}/stream"

    followers = [await client.get(url), await client.get(url)]
    refused = await client.get(url)
    late_socket = await open_socket(await session_cookie(user))
    await late_socket.connect()
    await late_socket.send_json_to({"type": "resume", "conversation_id": conversation_id})
    refused_frame = await late_socket.receive_json_from(timeout=5)
    await late_socket.disconnect()
    followed = [await read_events(response) for response in followers]
    original = await frames_until_terminal(socket)
    await socket.disconnect()

    assert refused.status_code == 429 and refused["Retry-After"] == "5"
    assert orjson.loads(refused.content)["error"] == {
        "code": "too_many_followers",
        "message": "This answer already has 2 followers. Close a tab or window that follows "
        "it, or wait for it to finish.",
    }
    assert refused_frame["event"] == "error"
    assert refused_frame["error"]["code"] == "too_many_followers"
    for events in followed:
        assert answer_text(events) == "".join(SLOW) and events[-1] == original[-1]
    # Once the answer is finished, a resume replays it from the database, uncounted.
    assert (await read_events(await client.get(url)))[-1] == original[-1]


@db
async def test_followers_are_capped_per_user_across_answers(user, client, upstream, settings):
    settings.CHATPROXY_MAX_FOLLOWERS_PER_USER = 1
    upstream.enqueue(Reply(tokens=SLOW, delay=0.02), Reply(tokens=SLOW, delay=0.02))
    first_socket, first = await a_streaming_answer(user)
    second_socket, second = await a_streaming_answer(user)

    following = await client.get(f"/completions/{first}/stream")
    refused = await client.get(f"/completions/{second}/stream")
    await read_events(following)
    for socket in (first_socket, second_socket):
        await frames_until_terminal(socket)
        await socket.disconnect()

    assert following.status_code == 200
    assert refused.status_code == 429
    assert orjson.loads(refused.content)["error"] == {
        "code": "too_many_followers",
        "message": "You already follow 1 running answers. Close a tab or window that follows "
        "one, or wait for it to finish.",
    }


@db
async def test_a_follower_that_falls_behind_is_dropped_with_an_error_event(client, upstream):
    from chatproxy.followers import QUEUE_SIZE

    # Trickled, so the follower attaches with well over a queue's worth still to come.
    upstream.enqueue(Reply(tokens=["t "] * (QUEUE_SIZE + 300), delay=0.002))
    turn = await chat(client, HI)
    lines = turn.streaming_content.__aiter__()
    analyzing = orjson.loads(await anext(lines))
    await anext(lines)  # the turn runs: its channel is open
    # A follower that reads nothing while the whole answer streams past it.
    stalled = await client.get(f"/completions/{analyzing['conversation_id']}/stream")
    rest = b"".join([chunk async for chunk in lines])

    followed = await read_events(stalled)

    assert rest.endswith(b"\n") and orjson.loads(rest.splitlines()[-1])["event"] == "completed"
    assert followed[0]["resumed"] is True
    assert followed[-1] == {
        "event": "error",
        "error": {
            "code": "follower_too_slow",
            "message": "This answer went on faster than it could be sent to you, so it "
            "stopped being sent. Resume it to catch up.",
        },
        "conversation_id": analyzing["conversation_id"],
        "message_id": analyzing["message_id"],
    }
    assert len(followed) < QUEUE_SIZE // 2  # what piled up was let go, not kept


@pytest.fixture
def capped_workers(django_db_blocker, upstream_server):
    processes = [
        ServerProcess(
            shared_database_name(django_db_blocker),
            upstream_server.base_url,
            {"CHATPROXY_MAX_FOLLOWERS": 1},
        )
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    yield processes
    for process in processes:
        process.stop()


@db
@needs_redis
@pytest.mark.server
async def test_followers_through_the_layer_are_counted_where_the_turn_runs(
    capped_workers, upstream, user
):
    upstream.enqueue(Reply(tokens=SLOW, delay=0.03))
    cookie = await session_cookie(user)
    a, b = capped_workers
    async with turn_on(a, headers(cookie)) as (http, lines):
        started = [orjson.loads(await anext(lines)) for _ in range(3)]
        url = f"{b.url}/completions/{started[0]['conversation_id']}/stream"
        async with http.stream("GET", url, headers=headers(cookie)) as following:
            refused = await http.get(url, headers=headers(cookie))
            followed = await lines_of(following)
        original = started + [orjson.loads(line) async for line in lines]

    assert refused.status_code == 429
    assert orjson.loads(refused.content)["error"]["code"] == "too_many_followers"
    assert answer_text(followed) == answer_text(original) and followed[-1] == original[-1]


@pytest.fixture
def tool_workers(django_db_blocker, upstream_server):
    processes = [
        ServerProcess(
            shared_database_name(django_db_blocker),
            upstream_server.base_url,
            {"CHATPROXY_TOOLS": ["tests.sample_tools.add"]},
        )
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    yield processes
    for process in processes:
        process.stop()


@db
@needs_redis
@pytest.mark.server
async def test_resume_on_another_worker_mid_tool_loop_gets_the_earlier_steps_then_the_rest(
    tool_workers, upstream, user
):
    add = {"id": "a", "name": "add", "arguments": '{"a": 1, "b": 1}'}
    upstream.enqueue(Reply(tokens=["Adding."], tool_calls=[add]), Reply(tokens=SLOW, delay=0.03))
    cookie = await session_cookie(user)
    a, b = tool_workers
    async with turn_on(a, headers(cookie)) as (http, lines):
        started = []
        while not started or started[-1]["event"] != "tool_result":
            started.append(orjson.loads(await anext(lines)))
        started.append(orjson.loads(await anext(lines)))  # the next step streams
        conversation_id = started[0]["conversation_id"]
        async with http.stream(
            "GET", f"{b.url}/completions/{conversation_id}/stream", headers=headers(cookie)
        ) as resumed:
            followed = await lines_of(resumed)
        original = started + [orjson.loads(line) async for line in lines]

    def tool_events(events):
        return [e for e in events if e["event"] in ("tool_call", "tool_result")]

    assert (
        tool_events(followed)
        == tool_events(original)
        == [
            {"event": "tool_call", **add},
            {"event": "tool_result", "id": "a", "name": "add", "result": 2},
        ]
    )
    assert answer_text(followed) == answer_text(original) == "Adding." + "".join(SLOW)
    assert followed[-1] == original[-1] and followed[-1]["event"] == "completed"
    assert len(upstream.requests) == 2
